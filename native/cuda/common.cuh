// common.cuh - shared by every CUDA file of the backend (internal): error checking, the ggml
// block layouts as the GPU reads them, and the per-type "8 values of a 32-value chunk"
// dequantiser that the GEMV, the prefill GEMM and the embedding lookup are all built on.
//
// Chunk scheme: every supported weight type is read as 32-value chunks (a whole block for the
// 32-value types, one sub-block of a 256-value K-quant block). Lane part s (0..3) of a chunk
// dequantises 8 of its values: out[0..3] are values off0 .. off0+3 of the chunk and out[4..7]
// are values off1 .. off1+3, so four cooperating threads read one chunk's bytes together and
// the matching activations as two float4 loads.
#ifndef CKV_CUDA_COMMON_CUH
#define CKV_CUDA_COMMON_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

extern "C" {
#include "error.h"
}

// Records a CUDA failure through ckv_fail and returns CKV_ERR_CUDA from the enclosing function.
#define CKV_CUDA_CHECK(call)                                                                   \
    do {                                                                                       \
        cudaError_t err_ = (call);                                                             \
        if (err_ != cudaSuccess) {                                                             \
            return ckv_fail(CKV_ERR_CUDA, "CUDA error %s (%s) at %s:%d", cudaGetErrorName(err_), \
                            cudaGetErrorString(err_), __FILE__, __LINE__);                    \
        }                                                                                      \
    } while (0)

// error.h's TRY under the name the CUDA files use.
#define TRY_OK(call) TRY(call)

#define CKV_WARP 32

// ggml type ids (the same numbers as quants.h; repeated so CUDA files need no C-only header).
enum cuda_ggml_type {
    CT_F32 = 0, CT_F16 = 1, CT_Q4_0 = 2, CT_Q4_1 = 3, CT_Q5_0 = 6, CT_Q5_1 = 7, CT_Q8_0 = 8,
    CT_Q4_K = 12, CT_Q5_K = 13, CT_Q6_K = 14, CT_BF16 = 30,
    // Backend-internal layout, never in a file: q4_0 rows regrouped at upload (ckv_cuda_weight_
    // repack) so that each group of 8 blocks (256 values, 144 bytes, the q4_0 row size of 256
    // values) holds the 8 fp16 scales first (16 bytes) and then the 8 x 16 quant bytes. A lane
    // then reads a whole block's quants with one 16-byte load; ggml's 18-byte blocks allow
    // only 2-byte loads. Rows need n_in % 256 == 0 and 16-byte aligned starts.
    CT_Q4_0_X8 = 1002,
    // The same for q6_K (ckv_cuda_weight_repack; n_in % 2048 == 0): groups of 8 super-blocks
    // (1680 bytes) hold the 8 ql arrays, then the 8 qh arrays, the 8 scale arrays and the 8
    // fp16 d, so a lane reads 16 bytes of ql and of qh with one load each (a q6_K block is
    // 210 bytes, 2-byte aligned).
    CT_Q6_K_X8 = 1014,
};
template <int T> __host__ __device__ constexpr bool is_regrouped() { return T == CT_Q4_0_X8 || T == CT_Q6_K_X8; }

// Block layouts, byte for byte as in ggml-common.h (they are copied from the GGUF image).
struct cq4_0 { __half d; uint8_t qs[16]; };
struct cq4_1 { __half d, m; uint8_t qs[16]; };
struct cq5_0 { __half d; uint8_t qh[4]; uint8_t qs[16]; };
struct cq5_1 { __half d, m; uint8_t qh[4]; uint8_t qs[16]; };
struct cq8_0 { __half d; int8_t qs[32]; };
enum { X8_GROUP_BYTES = 144, X8_SCALES_BYTES = 16 };   // CT_Q4_0_X8: one group of 8 blocks
enum { Q6X_GROUP_BYTES = 1680, Q6X_QH = 1024, Q6X_SC = 1536, Q6X_D = 1664 };   // CT_Q6_K_X8
struct cq4_K { __half d, dmin; uint8_t scales[12]; uint8_t qs[128]; };
struct cq5_K { __half d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; };
struct cq6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; __half d; };
static_assert(sizeof(cq4_0) == 18 && sizeof(cq4_1) == 20 && sizeof(cq5_0) == 22, "block size");
static_assert(sizeof(cq5_1) == 24 && sizeof(cq8_0) == 34, "block size");
static_assert(sizeof(cq4_K) == 144 && sizeof(cq5_K) == 176 && sizeof(cq6_K) == 210, "block size");

// Activations quantised for the int8 GEMV: 32 values per block as in ggml's q8_1 (d = amax /
// 127, qs = round-half-even(x * 127 / amax)), but with d and d * sum(qs) kept as f32.
struct cq8x { float2 ds; int8_t qs[32]; };
static_assert(sizeof(cq8x) == 40, "block size");

// Value offsets inside a 32-value chunk of the two float4 groups of lane part s.
template <int T> __host__ __device__ constexpr bool nibble_split_chunks() {   // byte i holds values i and i + 16
    return T == CT_Q4_0 || T == CT_Q4_1 || T == CT_Q5_0 || T == CT_Q5_1 || T == CT_Q4_0_X8;
}
template <int T> __device__ __forceinline__ int chunk_off0(int s) {
    return nibble_split_chunks<T>() ? 4 * s : 8 * s;
}
template <int T> __device__ __forceinline__ int chunk_off1(int s) {
    return nibble_split_chunks<T>() ? 16 + 4 * s : 8 * s + 4;
}

__device__ __forceinline__ uint32_t load_u32_unaligned(const uint8_t * p) {
    return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24;
}

// The 6-bit scale and min of sub-block j of a q4_K / q5_K block (ggml's get_scale_min_k4).
__device__ __forceinline__ void scale_min_k4(int j, const uint8_t * q, float * sc, float * m) {
    if (j < 4) {
        *sc = (float) (q[j] & 63);
        *m  = (float) (q[j + 4] & 63);
    } else {
        *sc = (float) ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m  = (float) ((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

// Dequantises the 8 values of lane part s of 32-value chunk c of a row (see the file comment).
// Each formula is the one of the CPU's dequantize_row_* (quants.c), so results agree exactly
// up to the rounding of one float multiply-add.
template <int T>
__device__ __forceinline__ void dequant8(const uint8_t * row, int64_t c, int s, float out[8]) {
    if constexpr (T == CT_F32) {
        const float * p = (const float *) row + c * 32 + 8 * s;
        float4 a = *(const float4 *) p, b = *(const float4 *) (p + 4);
        out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
        out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
    } else if constexpr (T == CT_F16) {
        const __half2 * p = (const __half2 *) ((const __half *) row + c * 32 + 8 * s);
        for (int i = 0; i < 4; i++) {
            float2 f = __half22float2(p[i]);
            out[2 * i] = f.x; out[2 * i + 1] = f.y;
        }
    } else if constexpr (T == CT_BF16) {
        const uint16_t * p = (const uint16_t *) row + c * 32 + 8 * s;
        for (int i = 0; i < 8; i++) out[i] = __uint_as_float((uint32_t) p[i] << 16);
    } else if constexpr (T == CT_Q4_0_X8) {
        const uint8_t * g = row + (c >> 3) * X8_GROUP_BYTES;
        int      j = (int) (c & 7);
        uint32_t q4 = *(const uint32_t *) (g + X8_SCALES_BYTES + 16 * j + 4 * s);
        float    d = __half2float(((const __half *) g)[j]);
        for (int i = 0; i < 4; i++) {
            uint32_t q = (q4 >> (8 * i)) & 0xFF;
            out[i]     = (float) ((int) (q & 0xF) - 8) * d;
            out[4 + i] = (float) ((int) (q >> 4) - 8) * d;
        }
    } else if constexpr (T == CT_Q4_0 || T == CT_Q4_1) {
        // The lane's 4 quant bytes in one or two loads: qs is 4-byte aligned in a q4_1 block
        // (20 bytes) and 2-byte aligned in a q4_0 block (18 bytes) of a 2-aligned row.
        uint32_t q4;
        float    d, m;
        if constexpr (T == CT_Q4_0) {
            const cq4_0 * b = (const cq4_0 *) row + c;
            const uint16_t * p = (const uint16_t *) (b->qs + 4 * s);
            q4 = (uint32_t) p[0] | (uint32_t) p[1] << 16;
            d = __half2float(b->d); m = -8.0f * d;
        } else {
            const cq4_1 * b = (const cq4_1 *) row + c;
            q4 = *(const uint32_t *) (b->qs + 4 * s);
            d = __half2float(b->d); m = __half2float(b->m);
        }
        for (int i = 0; i < 4; i++) {
            uint32_t q = (q4 >> (8 * i)) & 0xFF;
            if constexpr (T == CT_Q4_0) {  // ((q & 15) - 8) * d exactly as the CPU rounds it
                out[i]     = (float) ((int) (q & 0xF) - 8) * d;
                out[4 + i] = (float) ((int) (q >> 4) - 8) * d;
            } else {
                out[i]     = (float) (q & 0xF) * d + m;
                out[4 + i] = (float) (q >> 4) * d + m;
            }
        }
    } else if constexpr (T == CT_Q5_0 || T == CT_Q5_1) {
        const uint8_t * qs;
        uint32_t qh;
        float d, m = 0.0f;
        if constexpr (T == CT_Q5_0) {
            const cq5_0 * b = (const cq5_0 *) row + c;
            qs = b->qs; qh = load_u32_unaligned(b->qh); d = __half2float(b->d);
        } else {
            const cq5_1 * b = (const cq5_1 *) row + c;
            qs = b->qs; qh = load_u32_unaligned(b->qh); d = __half2float(b->d); m = __half2float(b->m);
        }
        for (int i = 0; i < 4; i++) {
            int j = 4 * s + i;
            int x0 = (qs[j] & 0xF) | (((qh >> j) & 1) << 4);
            int x1 = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
            if constexpr (T == CT_Q5_0) {
                out[i] = (float) (x0 - 16) * d; out[4 + i] = (float) (x1 - 16) * d;
            } else {
                out[i] = (float) x0 * d + m; out[4 + i] = (float) x1 * d + m;
            }
        }
    } else if constexpr (T == CT_Q8_0) {
        const cq8_0 * b = (const cq8_0 *) row + c;   // 34-byte blocks: qs is 2-byte aligned
        float d = __half2float(b->d);
        const uint16_t * p = (const uint16_t *) (b->qs + 8 * s);
        for (int i = 0; i < 4; i++) {
            uint16_t two = p[i];
            out[2 * i]     = (float) (int8_t) (two & 0xFF) * d;
            out[2 * i + 1] = (float) (int8_t) (two >> 8) * d;
        }
    } else if constexpr (T == CT_Q4_K || T == CT_Q5_K) {
        // sub-block j of block c/8: bytes 32*(j/2) .. of qs, low nibble for even j, high for odd.
        int j = (int) (c & 7);
        float sc, mn, d, dmin;
        const uint8_t *qs, *scales, *qh = nullptr;
        if constexpr (T == CT_Q4_K) {
            const cq4_K * b = (const cq4_K *) row + (c >> 3);
            d = __half2float(b->d); dmin = __half2float(b->dmin); scales = b->scales; qs = b->qs;
        } else {
            const cq5_K * b = (const cq5_K *) row + (c >> 3);
            d = __half2float(b->d); dmin = __half2float(b->dmin); scales = b->scales; qs = b->qs;
            qh = b->qh;
        }
        scale_min_k4(j, scales, &sc, &mn);
        float dl = d * sc, ml = dmin * mn;
        const uint8_t * q = qs + 32 * (j >> 1) + 8 * s;
        int shift = (j & 1) * 4;
        for (int i = 0; i < 8; i++) {
            int v = (q[i] >> shift) & 0xF;
            if constexpr (T == CT_Q5_K) {
                v += (qh[8 * s + i] >> j) & 1 ? 16 : 0;
            }
            out[i] = dl * (float) v - ml;
        }
    } else if constexpr (T == CT_Q6_K || T == CT_Q6_K_X8) {
        // sub-block j of block c/8: half h = j/4 and group g = j%4 of dequantize_row_q6_K.
        const uint8_t *qlb, *qhb;
        const int8_t * scales;
        __half         dh;
        if constexpr (T == CT_Q6_K) {
            const cq6_K * b = (const cq6_K *) row + (c >> 3);
            qlb = b->ql; qhb = b->qh; scales = b->scales; dh = b->d;
        } else {
            const uint8_t * grp = row + (c >> 6) * Q6X_GROUP_BYTES;
            int sb = (int) ((c >> 3) & 7);
            qlb = grp + 128 * sb; qhb = grp + Q6X_QH + 64 * sb;
            scales = (const int8_t *) (grp + Q6X_SC + 16 * sb); dh = ((const __half *) (grp + Q6X_D))[sb];
        }
        int j = (int) (c & 7), h = j >> 2, g = j & 3;
        const uint8_t * ql = qlb + 64 * h + (g & 1) * 32;
        const uint8_t * qh = qhb + 32 * h;
        float dl = __half2float(dh) * (float) scales[8 * h + 2 * g + (s >> 1)];
        int lshift = (g >> 1) * 4, hshift = 2 * g;
        for (int i = 0; i < 8; i++) {
            int l = 8 * s + i;
            int q = (((ql[l] >> lshift) & 0xF) | (((qh[l] >> hshift) & 3) << 4)) - 32;
            out[i] = dl * (float) q;
        }
    }
}

// Calls fn.template operator()<T>() for the run-time type id; false for a type without kernels.
template <typename Fn> bool dispatch_type(uint32_t type, Fn && fn) {
    switch (type) {
        case CT_F32:  fn.template operator()<CT_F32>();  return true;
        case CT_F16:  fn.template operator()<CT_F16>();  return true;
        case CT_BF16: fn.template operator()<CT_BF16>(); return true;
        case CT_Q4_0: fn.template operator()<CT_Q4_0>(); return true;
        case CT_Q4_0_X8: fn.template operator()<CT_Q4_0_X8>(); return true;
        case CT_Q4_1: fn.template operator()<CT_Q4_1>(); return true;
        case CT_Q5_0: fn.template operator()<CT_Q5_0>(); return true;
        case CT_Q5_1: fn.template operator()<CT_Q5_1>(); return true;
        case CT_Q8_0: fn.template operator()<CT_Q8_0>(); return true;
        case CT_Q4_K: fn.template operator()<CT_Q4_K>(); return true;
        case CT_Q5_K: fn.template operator()<CT_Q5_K>(); return true;
        case CT_Q6_K: fn.template operator()<CT_Q6_K>(); return true;
        case CT_Q6_K_X8: fn.template operator()<CT_Q6_K_X8>(); return true;
        default: return false;
    }
}

// True for the types dequant8 handles, so callers can reject a model before uploading it.
static inline bool cuda_type_supported(uint32_t type) {
    switch (type) {
        case CT_F32: case CT_F16: case CT_BF16: case CT_Q4_0: case CT_Q4_1: case CT_Q5_0:
        case CT_Q5_1: case CT_Q8_0: case CT_Q4_K: case CT_Q5_K: case CT_Q6_K: return true;
        default: return false;
    }
}

// Programmatic dependent launch (Hopper): every forward-pass kernel is launched with
// launch_pdl and starts with pdl_begin, which lets the next kernel of the stream be scheduled as
// soon as all of this one's blocks have started, and then waits until the previous kernel has
// finished and its writes are visible. A decode step is ~200 small dependent launches, so
// overlapping each launch with its predecessor's tail is a large share of the step. Without
// the launch attribute (or before sm_90) the wait returns at once. Kernels with work that
// needs nothing of the previous kernel (their weights) call the two halves with that work
// between them.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_begin() {
    pdl_launch_dependents();
    pdl_wait();
}

// Asks L2 for the 128-byte lines of [p, p + n), thread `lane` of `lanes` taking every lanes-th
// line: a GEMV's weight rows fetched while the kernel before it still runs.
__device__ __forceinline__ void prefetch_l2(const void * p, size_t n, int lane, int lanes) {
    for (size_t off = (size_t) lane * 128; off < n; off += (size_t) lanes * 128) {
        asm volatile("prefetch.global.L2 [%0];" ::"l"((const char *) p + off));
    }
}

// kern<<<grid, block, smem, s>>>(args...), with programmatic stream serialisation on streams
// other than the legacy default stream (which the op tests use).
template <typename... K, typename... A>
static cudaError_t launch_pdl(void (*kern)(K...), dim3 grid, dim3 block, size_t smem, cudaStream_t s,
                              A &&... args) {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cfg.attrs = attr;
    cfg.numAttrs = s ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kern, static_cast<K>(args)...);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Quantises 32 values (one per lane) into *dst (the formula of quantize_row_q8_1_ref, scale and
// sum kept in f32).
__device__ __forceinline__ void quantize_chunk_warp(float v, struct cq8x * dst) {
    int   lane = threadIdx.x % CKV_WARP;
    float amax = warp_max(fabsf(v));
    float d = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
    int   q = __float2int_rn(v * id);
    int   sum = __reduce_add_sync(0xffffffffu, q);
    dst->qs[lane] = (int8_t) q;
    if (lane == 0) {
        dst->ds = make_float2(d, (float) sum * d);
    }
}

// c += a b on the tensor cores: one m16n8k16 tile, f16 in, f32 accumulate. Fragment layouts
// are the PTX ISA's: lane = 4 g + t4; A regs (row g | g+8, cols 2t4 | 2t4+8), B regs (k rows
// 2t4 | 2t4+8, col g), C (row g | g+8, cols 2t4, 2t4+1).
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#endif  // CKV_CUDA_COMMON_CUH
