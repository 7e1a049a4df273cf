// quants.h - ggml tensor types: block layouts, dequantisation, activation quantisation and the
// dot products the matmuls run on (internal). Kernels are picked at run time (AVX2/FMA/F16C,
// AVX-512 where present) with a portable scalar fallback that defines the exact semantics.
#ifndef CKV_QUANTS_H
#define CKV_QUANTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

// ggml type ids as stored in GGUF tensor infos.
enum ggml_type {
    GGML_TYPE_F32  = 0,
    GGML_TYPE_F16  = 1,
    GGML_TYPE_Q4_0 = 2,
    GGML_TYPE_Q4_1 = 3,
    GGML_TYPE_Q5_0 = 6,
    GGML_TYPE_Q5_1 = 7,
    GGML_TYPE_Q8_0 = 8,
    GGML_TYPE_Q8_1 = 9,   // activations only
    GGML_TYPE_Q2_K = 10,
    GGML_TYPE_Q3_K = 11,
    GGML_TYPE_Q4_K = 12,
    GGML_TYPE_Q5_K = 13,
    GGML_TYPE_Q6_K = 14,
    GGML_TYPE_Q8_K = 15,  // activations only
    GGML_TYPE_BF16 = 30,
    GGML_TYPE_COUNT_MAX = 40,
};

typedef uint16_t ckv_fp16;

// dot(w_row, x_row) over n elements: w_row in the weight type, x_row already quantised to the
// weight type's vec_dot_type.
typedef float (*ggml_vec_dot_fn)(int64_t n, const void * w_row, const void * x_row);
// out[r] = dot(row r of w, x_row) for r < n_rows, row r starting w_stride bytes after row r-1:
// one activation row against a group of weight rows, so SIMD kernels load and convert the
// activation once per group and reduce several rows together (the GEMV fast path).
typedef void (*ggml_vec_dot_rows_fn)(int64_t n, int64_t n_rows, const void * w, size_t w_stride,
                                     const void * x_row, float * out);
// A tile of VEC_DOT_TILE_ROWS weight rows x VEC_DOT_TILE_TOKENS activation rows (prefill):
// out[t * out_stride + r] = vec_dot(n, w + r * w_stride, x + t * x_stride), bit for bit, with
// each weight block unpacked once for all the tokens and each activation block once for all
// the rows.
enum { VEC_DOT_TILE_ROWS = 2, VEC_DOT_TILE_TOKENS = 4 };
typedef void (*ggml_vec_dot_tile_fn)(int64_t n, const void * w, size_t w_stride, const void * x, size_t x_stride,
                                     float * out, int64_t out_stride);

// Every ggml type id a GGUF file may hold has traits (name and block layout), so files with
// other quantisations still open and list; only the types with is_weight set have kernels:
// for the rest (IQ*, TQ*, MXFP4, I8..F64) vec_dot, dequantize_row and quantize_row are NULL.
struct ggml_type_traits {
    const char *    name;           // "q4_K"
    int64_t         block_size;     // elements per block
    size_t          type_size;      // bytes per block
    bool            is_weight;      // may appear in a model file and is supported here
    uint32_t        vec_dot_type;   // activation type the dot product wants (Q8_0, Q8_1, Q8_K, F32...)
    ggml_vec_dot_fn vec_dot;        // best kernel for this CPU (set by quants_init)
    void (*dequantize_row)(const void * src, float * dst, int64_t n);
    void (*quantize_row)(const float * src, void * dst, int64_t n);  // activation types only
                                    // (and F32, a copy, so F16/BF16/F32 weights fit the scheme)
    ggml_vec_dot_rows_fn vec_dot_rows;  // weight types: several rows at once (set by quants_init)
    ggml_vec_dot_tile_fn vec_dot_tile;  // NULL, or a rows x tokens tile kernel (set by quants_init)
};

// Detects CPU features and selects kernels; idempotent and thread-safe (call once at load).
void quants_init(void);

// NULL for unknown ids.
const struct ggml_type_traits * ggml_type_traits_get(uint32_t type);
const char * ggml_type_name(uint32_t type);   // "unknown" for unknown ids

// Bytes of n elements; 0 if n is not a multiple of the block size or the type is unknown.
size_t ggml_row_size(uint32_t type, int64_t n);

// Convenience wrappers over the traits. type must have the kernel (dequantize_row, vec_dot and
// vec_dot_rows: is_weight types; quantize_row_act: F32, Q8_0, Q8_1, Q8_K) and n must be a
// multiple of the block size; callers check ggml_type_traits_get(type)->is_weight first.
void  dequantize_row(uint32_t type, const void * src, float * dst, int64_t n);
void  quantize_row_act(uint32_t vec_dot_type, const float * src, void * dst, int64_t n);
float vec_dot(uint32_t type, int64_t n, const void * w_row, const void * x_row);
void  vec_dot_rows(uint32_t type, int64_t n, int64_t n_rows, const void * w, size_t w_stride,
                   const void * x_row, float * out);

// Half precision.
float    ckv_fp16_to_fp32(ckv_fp16 h);
ckv_fp16 ckv_fp32_to_fp16(float f);   // round to nearest even
void     ckv_fp32_to_fp16_row(const float * src, ckv_fp16 * dst, int64_t n);
void     ckv_fp16_to_fp32_row(const ckv_fp16 * src, float * dst, int64_t n);
// sum_i a[i] * b[i] with a in fp16 and b in fp32, accumulated in fp32 (attention scores).
float    ckv_dot_f16_f32(int64_t n, const ckv_fp16 * a, const float * b);
// y[i] += alpha * x[i] with x in fp16 (attention value accumulation).
void     ckv_axpy_f16_f32(int64_t n, float alpha, const ckv_fp16 * x, float * y);

// "AVX2=1 FMA=1 F16C=1 AVX512=1 AVX512_VNNI=1"
const char * quants_cpu_features(void);

#endif  // CKV_QUANTS_H
