// quants-impl.h - block structs and the kernel table shared by quants.c (scalar reference
// kernels, dispatch) and the ISA files quants-avx2.c / quants-avx512.c (internal).
//
// Block layouts are ggml's (src/ggml-common.h), byte for byte: they are read straight out of
// the mmapped GGUF image, so every struct is packed by construction (fp16 and byte members
// only, sizes checked below). The scalar kernels define the semantics; an ISA file registers
// faster versions of some entries in struct quants_kernels and must agree with the scalar
// ones up to float summation order (bit for bit for the activation quantisers).
#ifndef CKV_QUANTS_IMPL_H
#define CKV_QUANTS_IMPL_H

#include "quants.h"

#define QK4_0 32
#define QK4_1 32
#define QK5_0 32
#define QK5_1 32
#define QK8_0 32
#define QK8_1 32
#define QK_K  256
#define K_SCALE_SIZE 12

typedef struct {
    ckv_fp16 d;            // scale
    uint8_t  qs[QK4_0/2];  // element j in the low nibble of byte j, j+16 in the high nibble
} block_q4_0;

typedef struct {
    ckv_fp16 d;            // scale
    ckv_fp16 m;            // minimum
    uint8_t  qs[QK4_1/2];  // as q4_0
} block_q4_1;

typedef struct {
    ckv_fp16 d;
    uint8_t  qh[4];        // little-endian u32: bit j is the 5th bit of element j
    uint8_t  qs[QK5_0/2];
} block_q5_0;

typedef struct {
    ckv_fp16 d;
    ckv_fp16 m;
    uint8_t  qh[4];
    uint8_t  qs[QK5_1/2];
} block_q5_1;

typedef struct {
    ckv_fp16 d;
    int8_t   qs[QK8_0];
} block_q8_0;

typedef struct {
    ckv_fp16 d;
    ckv_fp16 s;            // d * sum(qs), lets q4_1/q5_1 fold their minimum in once per block
    int8_t   qs[QK8_1];
} block_q8_1;

typedef struct {
    uint8_t  scales[QK_K/16];  // low nibble scale, high nibble min, per 16 elements
    uint8_t  qs[QK_K/4];       // 2-bit quants, 4 per byte
    ckv_fp16 d;
    ckv_fp16 dmin;
} block_q2_K;

typedef struct {
    uint8_t  hmask[QK_K/8];    // high bit, set means "no -4 offset"
    uint8_t  qs[QK_K/4];       // low 2 bits
    uint8_t  scales[12];       // 16 x 6-bit scales, offset by 32
    ckv_fp16 d;
} block_q3_K;

typedef struct {
    ckv_fp16 d;
    ckv_fp16 dmin;
    uint8_t  scales[K_SCALE_SIZE];  // 8 x (6-bit scale, 6-bit min), see get_scale_min_k4
    uint8_t  qs[QK_K/2];
} block_q4_K;

typedef struct {
    ckv_fp16 d;
    ckv_fp16 dmin;
    uint8_t  scales[K_SCALE_SIZE];
    uint8_t  qh[QK_K/8];
    uint8_t  qs[QK_K/2];
} block_q5_K;

typedef struct {
    uint8_t  ql[QK_K/2];       // low 4 bits
    uint8_t  qh[QK_K/4];       // high 2 bits
    int8_t   scales[QK_K/16];  // one per 16 elements
    ckv_fp16 d;                // last, unlike the other types
} block_q6_K;

typedef struct {
    float   d;                 // fp32 scale (activations only)
    int8_t  qs[QK_K];
    int16_t bsums[QK_K/16];    // sum of each 16 quants, for the K-quant minimum terms
} block_q8_K;

_Static_assert(sizeof(block_q4_0) == 18,  "block_q4_0 size");
_Static_assert(sizeof(block_q4_1) == 20,  "block_q4_1 size");
_Static_assert(sizeof(block_q5_0) == 22,  "block_q5_0 size");
_Static_assert(sizeof(block_q5_1) == 24,  "block_q5_1 size");
_Static_assert(sizeof(block_q8_0) == 34,  "block_q8_0 size");
_Static_assert(sizeof(block_q8_1) == 36,  "block_q8_1 size");
_Static_assert(sizeof(block_q2_K) == 84,  "block_q2_K size");
_Static_assert(sizeof(block_q3_K) == 110, "block_q3_K size");
_Static_assert(sizeof(block_q4_K) == 144, "block_q4_K size");
_Static_assert(sizeof(block_q5_K) == 176, "block_q5_K size");
_Static_assert(sizeof(block_q6_K) == 210, "block_q6_K size");
_Static_assert(sizeof(block_q8_K) == 292, "block_q8_K size");

// The 6-bit scale and min of sub-block j (0..7) of a q4_K / q5_K block.
static inline void get_scale_min_k4(int j, const uint8_t * q, uint8_t * sc, uint8_t * m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m  = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m  = (q[j + 4] >> 4)  | ((q[j] >> 6) << 4);
    }
}

// ---------------------------------------------------------------------------------------------
// Kernel table
// ---------------------------------------------------------------------------------------------

typedef void (*quantize_row_fn)(const float * src, void * dst, int64_t n);

struct quants_kernels {
    ggml_vec_dot_fn      vec_dot[GGML_TYPE_COUNT_MAX];       // by weight type
    ggml_vec_dot_rows_fn vec_dot_rows[GGML_TYPE_COUNT_MAX];  // NULL: loop over vec_dot
    ggml_vec_dot_tile_fn vec_dot_tile[GGML_TYPE_COUNT_MAX];  // NULL: none (matmuls use vec_dot)
    quantize_row_fn      quantize_row[GGML_TYPE_COUNT_MAX];  // by activation type
    float (*dot_f16_f32)(int64_t n, const ckv_fp16 * a, const float * b);
    void  (*axpy_f16_f32)(int64_t n, float alpha, const ckv_fp16 * x, float * y);
    void  (*fp16_to_fp32_row)(const ckv_fp16 * src, float * dst, int64_t n);
    void  (*fp32_to_fp16_row)(const float * src, ckv_fp16 * dst, int64_t n);
};

enum quants_isa {
    QUANTS_ISA_SCALAR = 0,
    QUANTS_ISA_AVX2   = 1,  // AVX2 + FMA + F16C
    QUANTS_ISA_AVX512 = 2,  // AVX-512 F/BW/VL/DQ + VNNI on top of AVX2
};

// Highest level this CPU (and this build) supports.
int  quants_isa_best(void);
// Selects the kernels of one level (capped at quants_isa_best()) and returns the level now in
// force. For tests and benchmarks: not safe while another thread runs kernels.
int  quants_set_isa(int isa);
int  quants_isa_current(void);
// Shorthand: force the scalar reference kernels (true) or go back to the best ones (false).
void quants_set_force_scalar(bool force);

#if defined(CKV_HAVE_X86_KERNELS)
// Overwrite the entries each ISA file implements; called in order scalar -> avx2 -> avx512.
void quants_register_avx2(struct quants_kernels * k);
void quants_register_avx512(struct quants_kernels * k);
#endif

// Scalar reference kernels (quants.c), also used by the ISA files for odd tails.
float vec_dot_q4_0_q8_0_ref(int64_t n, const void * w, const void * x);
float vec_dot_q4_1_q8_1_ref(int64_t n, const void * w, const void * x);
float vec_dot_q5_0_q8_0_ref(int64_t n, const void * w, const void * x);
float vec_dot_q5_1_q8_1_ref(int64_t n, const void * w, const void * x);
float vec_dot_q8_0_q8_0_ref(int64_t n, const void * w, const void * x);
float vec_dot_q2_K_q8_K_ref(int64_t n, const void * w, const void * x);
float vec_dot_q3_K_q8_K_ref(int64_t n, const void * w, const void * x);
float vec_dot_q4_K_q8_K_ref(int64_t n, const void * w, const void * x);
float vec_dot_q5_K_q8_K_ref(int64_t n, const void * w, const void * x);
float vec_dot_q6_K_q8_K_ref(int64_t n, const void * w, const void * x);
float vec_dot_f32_f32_ref(int64_t n, const void * w, const void * x);
float vec_dot_f16_f32_ref(int64_t n, const void * w, const void * x);
float vec_dot_bf16_f32_ref(int64_t n, const void * w, const void * x);

void quantize_row_q8_0_ref(const float * src, void * dst, int64_t n);
void quantize_row_q8_1_ref(const float * src, void * dst, int64_t n);
void quantize_row_q8_K_ref(const float * src, void * dst, int64_t n);

#endif  // CKV_QUANTS_IMPL_H
