// matmul.cu - y[t][r] = dot(W row r, x[t]) (+ bias) on quantised weights, for every weight
// type of common.cuh. Twin: ops_matmul (quantised activations there, f32 / f16 here).
//
// Decode (one token): GEMV, optionally with the preceding RMSNorm fused (the block normalises x
// first). Quantised weights: int8 GEMV on activations quantised to 8 bits per 32 values (as the
// CPU's vec_dot does; ggml's mmvq). q4_0 and q6_K matrices are regrouped at upload (q4_0x8,
// q6_Kx8 in common.cuh) so that a lane reads 16 weight bytes per load. F32 / F16 / BF16
// weights: f32 GEMV on f32 activations, one warp per row. f32 accumulation throughout.
//
// Prefill (n_tokens > 1): cuBLAS on f16 operands where the build has it (blas.cu); otherwise
// 64 x 64 output tiles (weight rows x tokens) per 128-thread block; each 32-wide k step
// dequantises the weight tile to f16 in shared memory, converts the activations to f16, and 4
// warps multiply with WMMA 16x16x16 (f32 accumulators). f16 activations keep 11 bits of
// mantissa, more than the CPU's 8-bit activation quantisation.
#include <mma.h>
#include <stdlib.h>
#include <string.h>

#include "common.cuh"
#include "cuda-ops.cuh"

// --- GEMV ------------------------------------------------------------------------------------

enum { MMV_WARPS = 4 };

// Sum over a block of MMV_WARPS warps (threadIdx.x the lane, threadIdx.y the warp).
__device__ __forceinline__ float mmv_block_sum(float v) {
    __shared__ float part[MMV_WARPS];
    v = warp_sum(v);
    if (threadIdx.x == 0) part[threadIdx.y] = v;
    __syncthreads();
    float s = 0.0f;
    for (int w = 0; w < MMV_WARPS; w++) s += part[w];
    return s;
}

// The GEMV's input vector: x itself, or (NORM) x / rms(x) * norm_w computed by the whole block
// into shared memory `sx` (the formula of ops_rmsnorm), so the RMSNorm that precedes q/k/v, the
// FFN and the output head costs no launch of its own. Every block redoes the norm: its n_in
// floats come from L2 and are few next to the block's weight rows.
template <bool NORM>
__device__ __forceinline__ const float * mmv_input(const float * __restrict__ x, int64_t n_in,
                                                   const float * __restrict__ norm_w, float eps,
                                                   float * sx) {
    if constexpr (!NORM) {
        return x;
    } else {
        int   tid = threadIdx.y * CKV_WARP + threadIdx.x;
        float sum = 0.0f;
        for (int64_t i = tid; i < n_in / 4; i += MMV_WARPS * CKV_WARP) {
            float4 v = ((const float4 *) x)[i];
            ((float4 *) sx)[i] = v;
            sum += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
        float scale = 1.0f / sqrtf(mmv_block_sum(sum) / (float) n_in + eps);
        for (int64_t i = tid; i < n_in / 4; i += MMV_WARPS * CKV_WARP) {
            float4 v = ((float4 *) sx)[i], g = ((const float4 *) norm_w)[i];
            ((float4 *) sx)[i] = make_float4(v.x * scale * g.x, v.y * scale * g.y, v.z * scale * g.z,
                                             v.w * scale * g.w);
        }
        __syncthreads();
        return sx;
    }
}

// dot(weight row, x) by one warp: lane l reads part s = l % 4 of chunk l / 4 + 8i of the row
// (8 values, see dequant8), so the warp streams 8 consecutive chunks per step; the unrolled
// loop keeps several steps' loads in flight.
template <int T>
__device__ __forceinline__ float mmv_row_dot(const uint8_t * __restrict__ wrow, int64_t n_in,
                                             const float * x) {
    int   s = threadIdx.x & 3;
    float sum = 0.0f;
#pragma unroll 2
    for (int64_t c = threadIdx.x >> 2; c < n_in / 32; c += 8) {
        float v[8];
        dequant8<T>(wrow, c, s, v);
        float4 a = *(const float4 *) (x + c * 32 + chunk_off0<T>(s));
        float4 b = *(const float4 *) (x + c * 32 + chunk_off1<T>(s));
        sum += v[0] * a.x + v[1] * a.y + v[2] * a.z + v[3] * a.w;
        sum += v[4] * b.x + v[5] * b.y + v[6] * b.z + v[7] * b.w;
    }
    return warp_sum(sum);
}

// Up to three matrices over the same input in one launch (q, k and v; or a single matmul):
// blocks take consecutive rows of the concatenated outputs, one warp per row. All jobs share
// the weight type and n_in.
struct mmv_jobs {
    const uint8_t * w[3];
    size_t          row_size[3];
    int64_t         n_out[3];
    float *         y[3];
    const float *   bias[3];
    bool            accumulate[3];
    int64_t         ldy[3];   // a multi-token GEMV: token t's outputs at y + t * ldy
    int             n_jobs;
};

// Row `row` of the concatenated jobs. Only constant indices into j: a run-time index makes
// the compiler copy the whole parameter struct to every thread's local memory, which cost
// more memory traffic than the weights themselves in the q/k/v and output projections
// (~130 bytes written and read per thread; measured with ncu, 2026-11-28).
struct mmv_row {
    const uint8_t * w;   // the row's weights
    float *         y;   // its output element
    const float *   bias;
    bool            accumulate;
    int64_t         ldy;
};
__device__ __forceinline__ mmv_row mmv_job_row(const struct mmv_jobs & j, int64_t row) {
    mmv_row out = {j.w[0] + row * j.row_size[0], j.y[0] + row, j.bias[0] ? j.bias[0] + row : nullptr,
                   j.accumulate[0], j.ldy[0]};
#pragma unroll
    for (int k = 1; k < 3; k++) {
        row -= j.n_out[k - 1];
        if (k < j.n_jobs && row >= 0) {
            out = {j.w[k] + row * j.row_size[k], j.y[k] + row, j.bias[k] ? j.bias[k] + row : nullptr,
                   j.accumulate[k], j.ldy[k]};
        }
    }
    return out;
}

template <int T, bool NORM>
static __global__ void __launch_bounds__(MMV_WARPS * CKV_WARP)
mmv_kernel(struct mmv_jobs j, int64_t n_in, const float * __restrict__ x,
           const float * __restrict__ norm_w, float eps, int64_t total_rows) {
    pdl_begin();
    extern __shared__ float4 mmv_smem[];
    const float * xin = mmv_input<NORM>(x, n_in, norm_w, eps, (float *) mmv_smem);
    int64_t row = (int64_t) blockIdx.x * MMV_WARPS + threadIdx.y;
    if (row >= total_rows) {
        return;
    }
    mmv_row jr = mmv_job_row(j, row);
    float sum = mmv_row_dot<T>(jr.w, n_in, xin);
    if (threadIdx.x == 0) {
        if (jr.bias) {
            sum += *jr.bias;
        }
        *jr.y = jr.accumulate ? *jr.y + sum : sum;
    }
}

// y[r] = act(dot(gate row r, x)) * dot(up row r, x): the FFN's two projections and the gated
// activation (ops_silu_mul / ops_gelu_mul formulas) in one pass.
template <int T, bool NORM>
static __global__ void __launch_bounds__(MMV_WARPS * CKV_WARP)
mmv_glu_kernel(const uint8_t * __restrict__ wg, const uint8_t * __restrict__ wu, size_t row_size,
               int64_t n_in, int64_t n_out, const float * __restrict__ x, float * __restrict__ y,
               bool gelu, const float * __restrict__ norm_w, float eps) {
    pdl_begin();
    extern __shared__ float4 mmv_smem[];
    const float * xin = mmv_input<NORM>(x, n_in, norm_w, eps, (float *) mmv_smem);
    int64_t row = (int64_t) blockIdx.x * MMV_WARPS + threadIdx.y;
    if (row >= n_out) {
        return;
    }
    float sg = mmv_row_dot<T>(wg + row * row_size, n_in, xin);
    float su = mmv_row_dot<T>(wu + row * row_size, n_in, xin);
    if (threadIdx.x == 0) {
        if (gelu) {
            const float sqrt_2_over_pi = 0.79788456080286535588f;
            y[row] = 0.5f * sg * (1.0f + tanhf(sqrt_2_over_pi * sg * (1.0f + 0.044715f * sg * sg))) * su;
        } else {
            y[row] = sg / (1.0f + expf(-sg)) * su;
        }
    }
}

// Launches kern<T, NORM> with the shared memory the norm needs (opting in above 48 KiB).
template <typename K>
static cudaError_t launch_mmv(K kern, bool norm, int64_t n_in, int64_t rows, cudaStream_t s, auto... args) {
    size_t smem = norm ? (size_t) n_in * sizeof(float) : 0;
    if (smem > 48 * 1024) {
        cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem);
        if (e != cudaSuccess) return e;
    }
    return launch_pdl(kern, (unsigned) ((rows + MMV_WARPS - 1) / MMV_WARPS), dim3(CKV_WARP, MMV_WARPS), smem,
                      s, args...);
}

// --- int8 GEMV (quantised weight types) --------------------------------------------------------
//
// The activation vector is quantised once to cq8x blocks (32 int8 values, f32 scale and sum),
// and each lane multiplies its 8 weight quants with the matching 8 activation bytes by two
// __dp4a. Against the f32 GEMV above this cuts the activation bytes each lane reads from 32 to
// 8 (+ the block's scale pair) per 8 weights and the instructions per weight by ~4x, which is
// what bound that kernel (on-chip bandwidth and issue, not HBM). Lane layout as dequant8: lane
// part s = lane % 4 of chunk c; for q6_K a warp step is one 256-value super-block (q4_K and
// q5_K take a lane per sub-block pair instead: mmvq_rows_k_pairs).
//
// A lane's result for its 8 values is A * d_x * sumi + B * s_x, where sumi is the integer dot,
// d_x / s_x the chunk's activation scale and scale * sum(qs), A the weight scale of the lane's
// values and B a quarter of the chunk's weight offset (q4_1 / q5_1 m): the
// four lanes of a chunk add up to the whole offset term.

// Bytes a - k for bytes 0 <= a < 128 and k <= 128, without borrows between bytes.
__device__ __forceinline__ int sub_bytes(uint32_t a, uint32_t k) {
    return (int) (((a | 0x80808080u) - k) ^ 0x80808080u);
}
__device__ __forceinline__ uint32_t ld_u32_a2(const uint8_t * p) {   // 2-byte aligned
    const uint16_t * h = (const uint16_t *) p;
    return (uint32_t) h[0] | (uint32_t) h[1] << 16;
}
// Bit i (0..3) of the nibble h to bit 4 of byte i (the fifth bit of q5_0 / q5_1 quants).
__device__ __forceinline__ uint32_t spread_bit4(uint32_t h) {
    return (h << 4 & 0x10u) | (h << 11 & 0x1000u) | (h << 18 & 0x100000u) | (h << 25 & 0x10000000u);
}
// The 6-bit scale and min of sub-block j from the three words of a K-quant's 12 scale bytes
// (scale_min_k4 without byte loads).
__device__ __forceinline__ void scale_min_k4_words(int j, const uint32_t * w, float * sc, float * m) {
    int      jj = (j & 3) * 8;
    uint32_t b0 = (w[0] >> jj) & 0xFF, b1 = (w[1] >> jj) & 0xFF, b2 = (w[2] >> jj) & 0xFF;
    if (j < 4) {
        *sc = (float) (b0 & 63);
        *m  = (float) (b1 & 63);
    } else {
        *sc = (float) ((b2 & 0xF) | (b0 >> 6) << 4);
        *m  = (float) ((b2 >> 4) | (b1 >> 6) << 4);
    }
}

template <int T> constexpr bool has_q8_gemv() {
    return T == CT_Q4_0 || T == CT_Q4_1 || T == CT_Q5_0 || T == CT_Q5_1 || T == CT_Q8_0 ||
           T == CT_Q4_K || T == CT_Q5_K || T == CT_Q6_K || T == CT_Q4_0_X8 || T == CT_Q6_K_X8;
}

// 16 weight bytes that are read once: skip L1, which then keeps the activations every warp
// of the SM reads.
__device__ __forceinline__ uint4 ld_stream_u4(const void * p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ float ld_stream_half(const void * p) {
    unsigned short h;
    asm("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=h"(h) : "l"(p));
    return __half2float(__ushort_as_half(h));
}

// Lane part s of chunk c of a row times the activation ints xa (values off0..off0+3 of the
// chunk) and xb (off1..off1+3), with the chunk's ds = (d_x, s_x).
template <int T>
__device__ __forceinline__ float vdot_q8(const uint8_t * __restrict__ row, int64_t c, int s, int xa,
                                         int xb, float2 ds) {
    int   wa, wb;
    float A, B = 0.0f;
    if constexpr (T == CT_Q4_0) {
        const cq4_0 * b = (const cq4_0 *) row + c;
        uint32_t q = ld_u32_a2(b->qs + 4 * s);
        wa = sub_bytes(q & 0x0F0F0F0F, 0x08080808);
        wb = sub_bytes(q >> 4 & 0x0F0F0F0F, 0x08080808);
        A = __half2float(b->d);
    } else if constexpr (T == CT_Q4_1) {
        const cq4_1 * b = (const cq4_1 *) row + c;
        uint32_t q = *(const uint32_t *) (b->qs + 4 * s);
        float2   dm = __half22float2(*(const __half2 *) &b->d);
        wa = (int) (q & 0x0F0F0F0F);
        wb = (int) (q >> 4 & 0x0F0F0F0F);
        A = dm.x;
        B = 0.25f * dm.y;
    } else if constexpr (T == CT_Q5_0) {
        const cq5_0 * b = (const cq5_0 *) row + c;
        uint32_t q = ld_u32_a2(b->qs + 4 * s), qh = ld_u32_a2(b->qh);
        wa = sub_bytes((q & 0x0F0F0F0F) | spread_bit4(qh >> (4 * s) & 0xF), 0x10101010);
        wb = sub_bytes((q >> 4 & 0x0F0F0F0F) | spread_bit4(qh >> (4 * s + 16) & 0xF), 0x10101010);
        A = __half2float(b->d);
    } else if constexpr (T == CT_Q5_1) {
        const cq5_1 * b = (const cq5_1 *) row + c;
        uint32_t q = *(const uint32_t *) (b->qs + 4 * s), qh = *(const uint32_t *) b->qh;
        float2   dm = __half22float2(*(const __half2 *) &b->d);
        wa = (int) ((q & 0x0F0F0F0F) | spread_bit4(qh >> (4 * s) & 0xF));
        wb = (int) ((q >> 4 & 0x0F0F0F0F) | spread_bit4(qh >> (4 * s + 16) & 0xF));
        A = dm.x;
        B = 0.25f * dm.y;
    } else if constexpr (T == CT_Q8_0) {
        const cq8_0 * b = (const cq8_0 *) row + c;
        wa = (int) ld_u32_a2((const uint8_t *) b->qs + 8 * s);
        wb = (int) ld_u32_a2((const uint8_t *) b->qs + 8 * s + 4);
        A = __half2float(b->d);
    } else if constexpr (T == CT_Q6_K) {
        const cq6_K * b = (const cq6_K *) row + (c >> 3);
        int j = (int) (c & 7), h = j >> 2, g = j & 3;
        const uint8_t * ql = b->ql + 64 * h + (g & 1) * 32 + 8 * s;
        const uint8_t * qh = b->qh + 32 * h + 8 * s;
        int lshift = (g >> 1) * 4, hshift = 2 * g;
        uint32_t la = ld_u32_a2(ql), lb = ld_u32_a2(ql + 4), ha = ld_u32_a2(qh), hb = ld_u32_a2(qh + 4);
        wa = sub_bytes((la >> lshift & 0x0F0F0F0F) | (ha >> hshift & 0x03030303) << 4, 0x20202020);
        wb = sub_bytes((lb >> lshift & 0x0F0F0F0F) | (hb >> hshift & 0x03030303) << 4, 0x20202020);
        A = __half2float(b->d) * (float) b->scales[8 * h + 2 * g + (s >> 1)];
    }
    int sumi = __dp4a(wb, xb, __dp4a(wa, xa, 0));
    return A * (ds.x * (float) sumi) + B * ds.y;
}

enum { MMVQ_WARPS = 8, MMVQ_THREADS = MMVQ_WARPS * CKV_WARP };

// Sum over the block's warps (blockDim.x threads in one dimension); every thread gets it.
__device__ __forceinline__ float mmvq_block_sum(float v) {
    __shared__ float part[32];
    v = warp_sum(v);
    int lane = threadIdx.x % CKV_WARP, warp = threadIdx.x / CKV_WARP;
    if (lane == 0) part[warp] = v;
    __syncthreads();
    float s = 0.0f;
    for (int w = 0; w < (int) blockDim.x / CKV_WARP; w++) s += part[w];
    return s;
}

// The block's quantised input: xq itself when the producer wrote it, else x (optionally RMS-
// normalised, NORM) quantised by the block into shared memory `sq`, one chunk per warp.
template <bool NORM>
__device__ __forceinline__ const cq8x * mmvq_input(const float * __restrict__ x, const cq8x * xq,
                                                   int64_t n_in, const float * __restrict__ norm_w,
                                                   float eps, cq8x * sq) {
    if (xq) {
        return xq;
    }
    float scale = 1.0f;
    if constexpr (NORM) {
        float sum = 0.0f;
#pragma unroll 4
        for (int64_t i = threadIdx.x; i < n_in / 4; i += blockDim.x) {
            float4 v = ((const float4 *) x)[i];
            sum += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
        scale = 1.0f / sqrtf(mmvq_block_sum(sum) / (float) n_in + eps);
    }
    // Warp w quantises chunks w, w + n_warps, ...; each batch's loads are all issued before the
    // first chunk's reductions, so the prologue costs a few L2 round trips, not one per chunk.
    constexpr int BATCH = 8;
    int     lane = threadIdx.x % CKV_WARP, warp = threadIdx.x / CKV_WARP, n_warps = blockDim.x / CKV_WARP;
    int64_t n_chunks = n_in / 32;
    for (int64_t c0 = warp; c0 < n_chunks; c0 += (int64_t) BATCH * n_warps) {
        float v[BATCH];
#pragma unroll
        for (int k = 0; k < BATCH; k++) {
            int64_t c = c0 + (int64_t) k * n_warps;
            v[k] = c < n_chunks ? x[c * 32 + lane] : 0.0f;
            if constexpr (NORM) {
                v[k] = c < n_chunks ? v[k] * scale * norm_w[c * 32 + lane] : 0.0f;
            }
        }
#pragma unroll
        for (int k = 0; k < BATCH; k++) {
            int64_t c = c0 + (int64_t) k * n_warps;
            if (c < n_chunks) quantize_chunk_warp(v[k], sq + c);
        }
    }
    __syncthreads();
    return sq;
}

// out[r][t] = the warp's sum of acc[r][t] (every lane gets it).
template <int R, int NT>
__device__ __forceinline__ void warp_sums(const float (&acc)[R][NT], float (&out)[R][NT]) {
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < NT; t++) out[r][t] = warp_sum(acc[r][t]);
}

// The one-input (NT = 1) results of a multi-input row dot, as the one-token kernels take them.
template <int R>
__device__ __forceinline__ void first_input(const float (&o)[R][1], float (&out)[R]) {
#pragma unroll
    for (int r = 0; r < R; r++) out[r] = o[r][0];
}

// R rows' dots with the quantised input by one warp, U warp steps (8 chunks each) unrolled so
// that R * U steps' weight loads are in flight together. Every lane gets the sums.
// With W > 1, W warps share each row: warp part wr takes chunks 8 wr .. 8 wr + 7 of every
// 8 W, and the caller adds the W partial sums.
//
// CT_Q4_0_X8 (regrouped q4_0, common.cuh): lane l takes whole blocks wr * 32 + l + 32 W i, one
// 16-byte load of quants and one scale each, so a warp step reads 4 whole groups (576
// contiguous bytes) with 2 load instructions per lane instead of 8 steps of 3 small loads.
// Nibbles are used unsigned and the -8 offset comes from the activation block's sum:
// sum((q - 8) x) = sum(q x) - 8 sum(x), with d_x * sum(x_q) = ds.y.
// NT > 1 (a batched decode step): NT activation vectors, quantised one after the other
// (x_stride blocks apart), share each weight load; out[r][t] is row r's dot with input t, and
// inputs t >= n_tok are neither read nor summed.
template <int R, int U, int W, int NT>
__device__ __forceinline__ void mmvq_rows_x8_nt(const uint8_t * const (&rows)[R], int64_t n_in, const cq8x * xq,
                                                int64_t x_stride, int n_tok, float (&out)[R][NT], int wr) {
    int   lane = threadIdx.x % CKV_WARP;
    float acc[R][NT];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < NT; t++) acc[r][t] = 0.0f;
    const int64_t n_blocks = n_in / 32;
#pragma unroll U
    for (int64_t c = wr * CKV_WARP + lane; c < n_blocks; c += CKV_WARP * W) {
        float2 ds[NT];
        int2   x[NT][4];
#pragma unroll
        for (int t = 0; t < NT; t++) {
            if (t >= n_tok) break;
            const cq8x * xb = xq + t * x_stride + c;
            ds[t] = xb->ds;
#pragma unroll
            for (int k = 0; k < 4; k++) x[t][k] = ((const int2 *) xb->qs)[k];
        }
        int64_t goff = (c >> 3) * X8_GROUP_BYTES;
        int     j = (int) (c & 7);
#pragma unroll
        for (int r = 0; r < R; r++) {
            const uint8_t * g = rows[r] + goff;
            uint4 q = ld_stream_u4(g + X8_SCALES_BYTES + 16 * j);
            float d = ld_stream_half(g + 2 * j);
            const uint32_t m = 0x0F0F0F0Fu;
#pragma unroll
            for (int t = 0; t < NT; t++) {
                if (t >= n_tok) break;
                int sumi = __dp4a((int) (q.x & m), x[t][0].x, 0);
                sumi = __dp4a((int) (q.y & m), x[t][0].y, sumi);
                sumi = __dp4a((int) (q.z & m), x[t][1].x, sumi);
                sumi = __dp4a((int) (q.w & m), x[t][1].y, sumi);
                sumi = __dp4a((int) (q.x >> 4 & m), x[t][2].x, sumi);
                sumi = __dp4a((int) (q.y >> 4 & m), x[t][2].y, sumi);
                sumi = __dp4a((int) (q.z >> 4 & m), x[t][3].x, sumi);
                sumi = __dp4a((int) (q.w >> 4 & m), x[t][3].y, sumi);
                acc[r][t] += d * (ds[t].x * (float) sumi - 8.0f * ds[t].y);
            }
        }
    }
    warp_sums(acc, out);
}

// CT_Q6_K_X8 (regrouped q6_K): 8 lanes per super-block, lane part p = 4 h + m reads 16
// bytes of ql (bytes 16 m .. of half h) and the 16 matching qh bytes, i.e. the values
// base .. base + 15 (low nibbles) and base + 64 .. base + 79 (high nibbles) with
// base = 128 h + 32 (m / 2) + 16 (m % 2), each 16 under one scale (dequantize_row_q6_K's
// value order). Those are halves of activation blocks base / 32 and base / 32 + 2.
template <int R, int U, int W, int NT>
__device__ __forceinline__ void mmvq_rows_q6x8_nt(const uint8_t * const (&rows)[R], int64_t n_in, const cq8x * xq,
                                                  int64_t x_stride, int n_tok, float (&out)[R][NT], int wr) {
    int   lane = threadIdx.x % CKV_WARP;
    float acc[R][NT];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < NT; t++) acc[r][t] = 0.0f;
    const int64_t n_units = n_in / 32;
#pragma unroll U
    for (int64_t u = wr * CKV_WARP + lane; u < n_units; u += CKV_WARP * W) {
        int64_t sbi = u >> 3;
        int     p = (int) (u & 7), h = p >> 2, m = p & 3, half16 = 16 * (m & 1);
        int     base = 128 * h + 32 * (m >> 1) + half16;
        int     xl[NT][4], xh[NT][4];
        float   dlo[NT], dhi[NT];
#pragma unroll
        for (int t = 0; t < NT; t++) {
            if (t >= n_tok) break;
            const cq8x * xlo = xq + t * x_stride + sbi * 8 + (base >> 5), * xhi = xlo + 2;
            int2 l0 = *(const int2 *) (xlo->qs + half16), l1 = *(const int2 *) (xlo->qs + half16 + 8);
            int2 h0 = *(const int2 *) (xhi->qs + half16), h1 = *(const int2 *) (xhi->qs + half16 + 8);
            xl[t][0] = l0.x; xl[t][1] = l0.y; xl[t][2] = l1.x; xl[t][3] = l1.y;
            xh[t][0] = h0.x; xh[t][1] = h0.y; xh[t][2] = h1.x; xh[t][3] = h1.y;
            dlo[t] = xlo->ds.x;
            dhi[t] = xhi->ds.x;
        }
        int     shift = 2 * (m >> 1);
        int64_t goff = (sbi >> 3) * Q6X_GROUP_BYTES;
        int     sb = (int) (sbi & 7);
#pragma unroll
        for (int r = 0; r < R; r++) {
            const uint8_t * g = rows[r] + goff;
            uint4 ql = ld_stream_u4(g + 128 * sb + 64 * h + 16 * m);
            uint4 qh = ld_stream_u4(g + Q6X_QH + 64 * sb + 32 * h + half16);
            const int8_t * sc = (const int8_t *) (g + Q6X_SC + 16 * sb);
            float slo = (float) sc[base >> 4], shi = (float) sc[(base >> 4) + 4];
            float d = __half2float(((const __half *) (g + Q6X_D))[sb]);
            const uint32_t q[4] = {ql.x, ql.y, ql.z, ql.w}, hb[4] = {qh.x, qh.y, qh.z, qh.w};
            int lo[4], hi[4];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                lo[k] = sub_bytes((q[k] & 0x0F0F0F0Fu) | (hb[k] >> shift & 0x03030303u) << 4, 0x20202020u);
                hi[k] = sub_bytes((q[k] >> 4 & 0x0F0F0F0Fu) | (hb[k] >> (shift + 4) & 0x03030303u) << 4, 0x20202020u);
            }
#pragma unroll
            for (int t = 0; t < NT; t++) {
                if (t >= n_tok) break;
                int sumlo = 0, sumhi = 0;
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    sumlo = __dp4a(lo[k], xl[t][k], sumlo);
                    sumhi = __dp4a(hi[k], xh[t][k], sumhi);
                }
                acc[r][t] += d * (slo * dlo[t] * (float) sumlo + shi * dhi[t] * (float) sumhi);
            }
        }
    }
    warp_sums(acc, out);
}

template <int T, int R, int U, int W>
__device__ __forceinline__ void mmvq_rows_parts(const uint8_t * const (&rows)[R], int64_t n_in,
                                                const cq8x * xq, float (&out)[R], int wr) {
    int   lane = threadIdx.x % CKV_WARP, s = lane & 3;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
#pragma unroll U
    for (int64_t c = wr * 8 + (lane >> 2); c < n_in / 32; c += 8 * W) {
        const cq8x * xb = xq + c;
        int    xa = *(const int *) (xb->qs + chunk_off0<T>(s)), xc = *(const int *) (xb->qs + chunk_off1<T>(s));
        float2 ds = xb->ds;
#pragma unroll
        for (int r = 0; r < R; r++) acc[r] += vdot_q8<T>(rows[r], c, s, xa, xc, ds);
    }
#pragma unroll
    for (int r = 0; r < R; r++) out[r] = warp_sum(acc[r]);
}

// q4_K / q5_K: one lane per sub-block pair, i.e. per 64 values (the 32 quant bytes whose low
// nibbles are sub-block 2p and high nibbles 2p + 1), instead of vdot_q8's lane parts of 8
// values that each load 8 quant bytes and the header words. A lane issues three 16-byte loads
// per row: the header (d, dmin, the 12 scale bytes; a super-block's four lanes read the same
// one) and the two halves of its quants; q5_K adds the 32 high-bit bytes (bit j of byte i is
// the fifth bit of value i of sub-block j) as two more. Both activation chunks are taken whole.
template <int T, int R, int U, int W>
__device__ __forceinline__ void mmvq_rows_k_pairs(const uint8_t * const (&rows)[R], int64_t n_in, const cq8x * xq,
                                                  float (&out)[R], int wr) {
    constexpr bool   Q5 = T == CT_Q5_K;
    constexpr size_t BLOCK = Q5 ? sizeof(cq5_K) : sizeof(cq4_K), QS = Q5 ? 48 : 16;
    int   lane = threadIdx.x % CKV_WARP;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
    const int64_t  n_pairs = n_in / 64;
    const uint32_t m = 0x0F0F0F0Fu;
#pragma unroll U
    for (int64_t p = wr * CKV_WARP + lane; p < n_pairs; p += CKV_WARP * W) {
        const cq8x * xb = xq + 2 * p;   // chunk 2p: the low nibbles' values, 2p + 1: the high ones
        int2 xl[4], xh[4];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            xl[k] = ((const int2 *) xb[0].qs)[k];
            xh[k] = ((const int2 *) xb[1].qs)[k];
        }
        float2 dsl = xb[0].ds, dsh = xb[1].ds;
        int    pair = (int) (p & 3);
#pragma unroll
        for (int r = 0; r < R; r++) {
            const uint8_t * blk = rows[r] + (p >> 2) * BLOCK;
            uint4  hdr = ld_stream_u4(blk);
            uint4  qa = ld_stream_u4(blk + QS + 32 * pair), qb = ld_stream_u4(blk + QS + 16 + 32 * pair);
            float2 dm = __half22float2(*(const __half2 *) &hdr.x);
            const uint32_t sw[3] = {hdr.y, hdr.z, hdr.w};
            float sc_lo, mn_lo, sc_hi, mn_hi;
            scale_min_k4_words(2 * pair, sw, &sc_lo, &mn_lo);
            scale_min_k4_words(2 * pair + 1, sw, &sc_hi, &mn_hi);
            const uint32_t q[8] = {qa.x, qa.y, qa.z, qa.w, qb.x, qb.y, qb.z, qb.w};
            uint32_t lo[8], hi[8];
#pragma unroll
            for (int k = 0; k < 8; k++) {
                lo[k] = q[k] & m;
                hi[k] = q[k] >> 4 & m;
            }
            if constexpr (Q5) {
                uint4 ha = ld_stream_u4(blk + 16), hb = ld_stream_u4(blk + 32);
                const uint32_t h[8] = {ha.x, ha.y, ha.z, ha.w, hb.x, hb.y, hb.z, hb.w};
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    lo[k] |= (h[k] >> (2 * pair) & 0x01010101u) << 4;
                    hi[k] |= (h[k] >> (2 * pair + 1) & 0x01010101u) << 4;
                }
            }
            int sum_lo = 0, sum_hi = 0;
#pragma unroll
            for (int k = 0; k < 4; k++) {
                sum_lo = __dp4a((int) lo[2 * k], xl[k].x, sum_lo);
                sum_lo = __dp4a((int) lo[2 * k + 1], xl[k].y, sum_lo);
                sum_hi = __dp4a((int) hi[2 * k], xh[k].x, sum_hi);
                sum_hi = __dp4a((int) hi[2 * k + 1], xh[k].y, sum_hi);
            }
            acc[r] += dm.x * (sc_lo * dsl.x * (float) sum_lo + sc_hi * dsh.x * (float) sum_hi) -
                      dm.y * (mn_lo * dsl.y + mn_hi * dsh.y);
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) out[r] = warp_sum(acc[r]);
}

// Values one lane takes per step of a row: a whole chunk for the regrouped types, a sub-block
// pair for q4_K and q5_K, a quarter chunk (vdot_q8's lane part) for the others. Wide steps
// want fewer warps per row and no extra unrolling (their loads are 16 bytes already).
template <int T> __host__ __device__ constexpr int lane_step_values() {
    return is_regrouped<T>() ? 32 : T == CT_Q4_K || T == CT_Q5_K ? 64 : 8;
}

template <int T, int R, int U, int W = 1>
__device__ __forceinline__ void mmvq_rows(const uint8_t * const (&rows)[R], int64_t n_in,
                                          const cq8x * xq, float (&out)[R], int wr = 0) {
    if constexpr (T == CT_Q4_0_X8 || T == CT_Q6_K_X8) {   // the multi-input dots with one input
        float o[R][1];
        if constexpr (T == CT_Q4_0_X8) {
            mmvq_rows_x8_nt<R, U, W, 1>(rows, n_in, xq, 0, 1, o, wr);
        } else {
            mmvq_rows_q6x8_nt<R, U, W, 1>(rows, n_in, xq, 0, 1, o, wr);
        }
        first_input(o, out);
    } else if constexpr (T == CT_Q4_K || T == CT_Q5_K) {
        mmvq_rows_k_pairs<T, R, U, W>(rows, n_in, xq, out, wr);
    } else {
        mmvq_rows_parts<T, R, U, W>(rows, n_in, xq, out, wr);
    }
}

// The int8 twin of mmv_kernel: each warp takes R consecutive rows of the concatenated jobs;
// blocks stride over the row groups (the grid is capped near one wave, so the input is
// quantised a bounded number of times for the output head's 100k+ rows).
template <int T, bool NORM, int R, int U>
static __global__ void __launch_bounds__(MMVQ_THREADS)
mmvq_kernel(struct mmv_jobs j, int64_t n_in, const float * __restrict__ x, const cq8x * xq,
            const float * __restrict__ norm_w, float eps, int64_t total_rows) {
    pdl_begin();
    extern __shared__ float4 mmv_smem[];
    const cq8x * xin = mmvq_input<NORM>(x, xq, n_in, norm_w, eps, (cq8x *) mmv_smem);
    int warp = threadIdx.x / CKV_WARP;
    for (int64_t base = ((int64_t) blockIdx.x * MMVQ_WARPS + warp) * R; base < total_rows;
         base += (int64_t) gridDim.x * MMVQ_WARPS * R) {
        const uint8_t * rows[R];
        mmv_row jr[R];
#pragma unroll
        for (int r = 0; r < R; r++) {   // a row past the end reads row 0 and is not written
            jr[r] = mmv_job_row(j, base + r < total_rows ? base + r : 0);
            rows[r] = jr[r].w;
        }
        float sum[R];
        mmvq_rows<T, R, U>(rows, n_in, xin, sum);
        if (threadIdx.x % CKV_WARP == 0) {
#pragma unroll
            for (int r = 0; r < R; r++) {
                if (base + r < total_rows) {
                    float v = sum[r] + (jr[r].bias ? *jr[r].bias : 0.0f);
                    *jr[r].y = jr[r].accumulate ? *jr[r].y + v : v;
                }
            }
        }
    }
}

__device__ __forceinline__ float glu_act(float g, float u, bool gelu) {
    if (gelu) {
        const float sqrt_2_over_pi = 0.79788456080286535588f;
        return 0.5f * g * (1.0f + tanhf(sqrt_2_over_pi * g * (1.0f + 0.044715f * g * g))) * u;
    }
    return g / (1.0f + expf(-g)) * u;
}

// The int8 twin of mmv_glu_kernel: a block of 32 / R warps owns 32 consecutive rows (R per
// warp, gate and up together), so it also writes its 32 outputs as one cq8x block (yq, or
// NULL), the input of the down projection, and saves that a quantising pass.
template <int T, bool NORM, int R>
static __global__ void __launch_bounds__(32 / R * CKV_WARP)
mmvq_glu_kernel(const uint8_t * __restrict__ wg, const uint8_t * __restrict__ wu, size_t row_size,
                int64_t n_in, int64_t n_out, const float * __restrict__ x, float * __restrict__ y,
                cq8x * yq, bool gelu, const float * __restrict__ norm_w, float eps) {
    pdl_begin();
    extern __shared__ float4 mmv_smem[];
    __shared__ float outs[32];
    const cq8x * xin = mmvq_input<NORM>(x, nullptr, n_in, norm_w, eps, (cq8x *) mmv_smem);
    int     warp = threadIdx.x / CKV_WARP, lane = threadIdx.x % CKV_WARP;
    int64_t row0 = (int64_t) blockIdx.x * 32 + warp * R;
    const uint8_t * rows[2 * R];
#pragma unroll
    for (int r = 0; r < R; r++) {   // rows past n_out (n_out % 32 != 0, yq NULL) read row 0
        int64_t rr = row0 + r < n_out ? row0 + r : 0;
        rows[r] = wg + rr * row_size;
        rows[R + r] = wu + rr * row_size;
    }
    float sum[2 * R];
    mmvq_rows<T, 2 * R, (lane_step_values<T>() >= 32 ? 1 : R >= 2 ? 2 : 4)>(rows, n_in, xin, sum);
    if (lane < R) {
        float v = 0.0f;
#pragma unroll
        for (int r = 0; r < R; r++) v = lane == r ? glu_act(sum[r], sum[R + r], gelu) : v;
        outs[warp * R + lane] = v;
        if (row0 + lane < n_out) y[row0 + lane] = v;
    }
    if (yq) {
        __syncthreads();
        if (warp == 0) quantize_chunk_warp(outs[lane], yq + blockIdx.x);
    }
}

// Rows row0 .. row0 + R - 1 of the concatenated jobs; a row past the end reads row 0 (its
// result is not written).
template <int R>
__device__ __forceinline__ void job_rows(const struct mmv_jobs & j, int64_t row0, int64_t total_rows,
                                         mmv_row (&jr)[R], const uint8_t * (&rows)[R]) {
#pragma unroll
    for (int r = 0; r < R; r++) {
        jr[r] = mmv_job_row(j, row0 + r < total_rows ? row0 + r : 0);
        rows[r] = jr[r].w;
    }
}

// The decode path's GEMV (input quantised beforehand, xq): W warps per row group of R rows,
// so a block has a whole row's loads in flight at once (one warp per row left each warp with a
// single step of loads in flight: ~1 TB/s); no prologue. Block: 8 warps = 8 / W row groups.
template <int T, int W, int R = 1>
static __global__ void __launch_bounds__(MMVQ_THREADS)
mmvq_split_kernel(struct mmv_jobs j, int64_t n_in, const cq8x * __restrict__ xq, int64_t total_rows, bool prefetch) {
    pdl_launch_dependents();
    __shared__ float part[MMVQ_WARPS][R];
    int     warp = threadIdx.x / CKV_WARP, wr = warp % W;
    int64_t row0 = ((int64_t) blockIdx.x * (MMVQ_WARPS / W) + warp / W) * R;
    mmv_row jr[R];
    const uint8_t * rows[R];
    job_rows(j, row0, total_rows, jr, rows);
    if (prefetch) {   // the weights do not depend on the kernel before: L2 fetches them meanwhile
#pragma unroll
        for (int r = 0; r < R; r++) prefetch_l2(rows[r], j.row_size[0], wr * CKV_WARP + threadIdx.x % CKV_WARP, W * CKV_WARP);
    }
    pdl_wait();
    float sum[R];
    mmvq_rows<T, R, (R == 1 ? 4 : 2), W>(rows, n_in, xq, sum, wr);
    if constexpr (W > 1) {
        if (threadIdx.x % CKV_WARP == 0) {
#pragma unroll
            for (int r = 0; r < R; r++) part[warp][r] = sum[r];
        }
        __syncthreads();
        if (wr == 0) {
            for (int k = 1; k < W; k++)
#pragma unroll
                for (int r = 0; r < R; r++) sum[r] += part[warp + k][r];
        }
    }
    if (threadIdx.x % CKV_WARP == 0 && wr == 0) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            if (row0 + r < total_rows) {
                float v = sum[r] + (jr[r].bias ? *jr[r].bias : 0.0f);
                *jr[r].y = jr[r].accumulate ? *jr[r].y + v : v;
            }
        }
    }
}

// A batched decode step's GEMV (regrouped q4_0 / q6_K): n_tok <= NT inputs, quantised one
// after the other (xq, n_in / 32 blocks each), share every weight load, so a step of n tokens
// reads the weights once instead of n times. Layout as mmvq_split_kernel (W warps per group of
// R rows); up to three jobs over the same input (q, k, v), token t's outputs at y + t * ldy.
template <int T, int W, int R, int NT>
static __global__ void __launch_bounds__(MMVQ_THREADS)
mmvq_tokens_kernel(struct mmv_jobs j, int64_t n_in, const cq8x * __restrict__ xq, int n_tok, int64_t total_rows) {
    pdl_begin();
    __shared__ float part[MMVQ_WARPS][R][NT];
    int     warp = threadIdx.x / CKV_WARP, wr = warp % W;
    int64_t row0 = ((int64_t) blockIdx.x * (MMVQ_WARPS / W) + warp / W) * R;
    mmv_row jr[R];
    const uint8_t * rows[R];
    job_rows(j, row0, total_rows, jr, rows);
    float sum[R][NT];
    if constexpr (T == CT_Q4_0_X8) {
        mmvq_rows_x8_nt<R, 1, W, NT>(rows, n_in, xq, n_in / 32, n_tok, sum, wr);
    } else {
        mmvq_rows_q6x8_nt<R, 1, W, NT>(rows, n_in, xq, n_in / 32, n_tok, sum, wr);
    }
    if constexpr (W > 1) {
        if (threadIdx.x % CKV_WARP == 0) {
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int t = 0; t < NT; t++) part[warp][r][t] = sum[r][t];
        }
        __syncthreads();
        if (wr == 0) {
            for (int k = 1; k < W; k++)
#pragma unroll
                for (int r = 0; r < R; r++)
#pragma unroll
                    for (int t = 0; t < NT; t++) sum[r][t] += part[warp + k][r][t];
        }
    }
    if (threadIdx.x % CKV_WARP == 0 && wr == 0) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            if (row0 + r >= total_rows) continue;
#pragma unroll
            for (int t = 0; t < NT; t++) {
                if (t >= n_tok) break;
                float * y = jr[r].y + t * jr[r].ldy;
                float   v = sum[r][t] + (jr[r].bias ? *jr[r].bias : 0.0f);
                *y = jr[r].accumulate ? *y + v : v;
            }
        }
    }
}

// The same product for regrouped q4_0 on the tensor cores: a warp computes a tile of 16 rows x
// 8 tokens with mma.sync m16n8k32 (s8 x s8 -> s32), one q4_0 block (32 values under one
// scale) per k step, and applies the block's weight and activation scales to the s32 results,
// so the multiply costs one instruction per 16 x 8 x 32 instead of a __dp4a per 4 values and
// token. Fragments (PTX ISA, lane = 4 g + t): A rows g, g + 8, k 4t..4t+3 and 16+4t..16+4t+3,
// which are the low and high nibbles of the block's quant word t (q4_0 packs values i and
// i + 16 in byte i); B token g, the same k, i.e. words t and 4 + t of its activation block;
// C rows g, g + 8 x tokens 2t, 2t + 1. The nibbles enter unsigned and the -8 comes from the
// activation block's sum, as in mmvq_rows_x8_nt. KW warps split a tile's groups of 8 blocks
// and add their sums through shared memory; tokens >= n_tok read zeros and are not written.
// Its weight loads are 4-byte words (a lane quad reads one block's 16 bytes), so it moves
// weights slower than the __dp4a kernel's 16-byte loads: that kernel still wins up to 4 tokens.
// Staging weight tiles through shared memory with 16-byte copies is the next step here.
enum { MMQ_WARPS = 8 };
__device__ __forceinline__ void mma_s8_16x8x32(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <int KW>
static __global__ void __launch_bounds__(MMQ_WARPS * CKV_WARP)
mmq_tokens_q4x8_kernel(struct mmv_jobs j, int64_t n_in, const cq8x * __restrict__ xq, int n_tok,
                       int64_t total_rows) {
    pdl_begin();
    __shared__ float part[MMQ_WARPS][CKV_WARP][4];
    const int     lane = threadIdx.x % CKV_WARP, warp = threadIdx.x / CKV_WARP, g = lane >> 2, t = lane & 3;
    const int     kw = warp % KW, t0 = 2 * t, t1 = 2 * t + 1;
    const int64_t row = ((int64_t) blockIdx.x * (MMQ_WARPS / KW) + warp / KW) * 16 + g;   // and row + 8
    const mmv_row jr[2] = {mmv_job_row(j, row < total_rows ? row : 0),
                           mmv_job_row(j, row + 8 < total_rows ? row + 8 : 0)};
    const int64_t n_blocks = n_in / 32;
    const cq8x *  xb  = xq + (g < n_tok ? g : 0) * n_blocks;     // B: token g
    const cq8x *  xd0 = xq + (t0 < n_tok ? t0 : 0) * n_blocks;   // the scales of C's tokens
    const cq8x *  xd1 = xq + (t1 < n_tok ? t1 : 0) * n_blocks;
    const bool    has_b = g < n_tok, has0 = t0 < n_tok, has1 = t1 < n_tok;
    const uint32_t m = 0x0F0F0F0Fu;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t grp = kw; grp < n_blocks / 8; grp += KW) {
        const uint8_t * w0 = jr[0].w + grp * X8_GROUP_BYTES, * w1 = jr[1].w + grp * X8_GROUP_BYTES;
        const uint4     s0 = *(const uint4 *) w0, s1 = *(const uint4 *) w1;   // the group's 8 scales
        const __half *  d0 = (const __half *) &s0, * d1 = (const __half *) &s1;
#pragma unroll
        for (int jb = 0; jb < 8; jb++) {
            const int64_t  b  = grp * 8 + jb;
            const uint32_t q0 = *(const uint32_t *) (w0 + X8_SCALES_BYTES + 16 * jb + 4 * t);
            const uint32_t q1 = *(const uint32_t *) (w1 + X8_SCALES_BYTES + 16 * jb + 4 * t);
            const uint32_t b0 = has_b ? ((const uint32_t *) xb[b].qs)[t] : 0u;
            const uint32_t b1 = has_b ? ((const uint32_t *) xb[b].qs)[4 + t] : 0u;
            const float2   x0 = has0 ? xd0[b].ds : make_float2(0.0f, 0.0f);
            const float2   x1 = has1 ? xd1[b].ds : make_float2(0.0f, 0.0f);
            int c[4] = {0, 0, 0, 0};
            mma_s8_16x8x32(c, q0 & m, q1 & m, q0 >> 4 & m, q1 >> 4 & m, b0, b1);
            const float dw0 = __half2float(d0[jb]), dw1 = __half2float(d1[jb]);
            acc[0] += dw0 * (x0.x * (float) c[0] - 8.0f * x0.y);
            acc[1] += dw0 * (x1.x * (float) c[1] - 8.0f * x1.y);
            acc[2] += dw1 * (x0.x * (float) c[2] - 8.0f * x0.y);
            acc[3] += dw1 * (x1.x * (float) c[3] - 8.0f * x1.y);
        }
    }
    if constexpr (KW > 1) {
#pragma unroll
        for (int i = 0; i < 4; i++) part[warp][lane][i] = acc[i];
        __syncthreads();
        if (kw != 0) return;
        for (int k = 1; k < KW; k++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[i] += part[warp + k][lane][i];
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int     r = i / 2, tok = i % 2 ? t1 : t0;
        const int64_t rr = row + 8 * r;
        if (rr >= total_rows || tok >= n_tok) continue;
        float * y = jr[r].y + tok * jr[r].ldy;
        float   v = acc[i] + (jr[r].bias ? *jr[r].bias : 0.0f);
        *y = jr[r].accumulate ? *y + v : v;
    }
}

// 16-row tiles, KW warps each (split over the groups) for ~4096 warps in all.
static cudaError_t launch_mmq_tokens_q4x8(const struct mmv_jobs & j, int64_t n_in, int64_t rows, const cq8x * xq,
                                          int n_tok, cudaStream_t s) {
    const int64_t tiles = (rows + 15) / 16, groups = n_in / 256;
    int KW = 1;
    while (KW < 8 && tiles * KW < 4096 && groups >= 2 * KW) KW *= 2;
    const int64_t per_block = MMQ_WARPS / KW;
    const unsigned grid = (unsigned) ((tiles + per_block - 1) / per_block);
    auto go = [&](auto kern) { return launch_pdl(kern, grid, MMQ_WARPS * CKV_WARP, 0, s, j, n_in, xq, n_tok, rows); };
    switch (KW) {
        case 1: return go(mmq_tokens_q4x8_kernel<1>);
        case 2: return go(mmq_tokens_q4x8_kernel<2>);
        case 4: return go(mmq_tokens_q4x8_kernel<4>);
        default: return go(mmq_tokens_q4x8_kernel<8>);
    }
}

template <int T>
static cudaError_t launch_mmvq_tokens(const struct mmv_jobs & j, int64_t n_in, int64_t rows, const cq8x * xq,
                                      int n_tok, cudaStream_t s) {
    // q4_0 for more than 4 tokens: the tensor cores, whose cost does not grow with the tokens
    // (8B Q4_0 aggregate t/s at depth 0 on the H200, __dp4a vs mma: batch 4 818-827 vs 734-754,
    // 5 646 vs 805, 6 711 vs 860, 8 848-850 vs 1008-1032; 2026-11-29_h200_session9.json).
    if constexpr (T == CT_Q4_0_X8) {
        if (n_tok > 4) return launch_mmq_tokens_q4x8(j, n_in, rows, xq, n_tok, s);
    }
    // Rows per warp group: 2, or 4 for more than 4 tokens (each activation load then serves
    // more weight rows); warps per group: 1, or as launch_mmvq for 4 rows (8B Q4_0 on the H200,
    // aggregate t/s at depth 0: batch 4 786 with R = 2, W = 1 vs 765 with W = 2 and 741 with
    // R = 4; batch 8 816 with R = 4 vs 728 with R = 2; unrolling 2 steps was slower).
    const int R = n_tok > 4 ? 4 : 2;
    int       W = 1;
    while (R == 4 && W < 2 && rows / R * W < 4096 && n_in / 32 >= 2 * CKV_WARP * W) W *= 2;
    int64_t  per_block = (int64_t) (MMVQ_WARPS / W) * R;
    unsigned grid = (unsigned) ((rows + per_block - 1) / per_block);
    auto go = [&](auto kern) { return launch_pdl(kern, grid, MMVQ_THREADS, 0, s, j, n_in, xq, n_tok, rows); };
    if (n_tok <= 2) return go(mmvq_tokens_kernel<T, 1, 2, 2>);
    if (n_tok <= 4) return go(mmvq_tokens_kernel<T, 1, 2, 4>);
    return W == 1 ? go(mmvq_tokens_kernel<T, 1, 4, 8>) : go(mmvq_tokens_kernel<T, 2, 4, 8>);
}

// The GLU on a quantised input: 32 rows per block as mmvq_glu_kernel, 4 rows (gate and up) per
// warp group of W warps.
template <int T, int W>
static __global__ void __launch_bounds__(8 * W * CKV_WARP)
mmvq_glu_split_kernel(const uint8_t * __restrict__ wg, const uint8_t * __restrict__ wu, size_t row_size,
                      int64_t n_in, int64_t n_out, const cq8x * __restrict__ xq, float * __restrict__ y,
                      cq8x * yq, bool gelu, bool prefetch) {
    pdl_launch_dependents();
    constexpr int R = 4;
    __shared__ float part[8 * W][2 * R];
    __shared__ float outs[32];
    int     warp = threadIdx.x / CKV_WARP, lane = threadIdx.x % CKV_WARP, wr = warp % W, grp = warp / W;
    int64_t row0 = (int64_t) blockIdx.x * 32 + grp * R;
    const uint8_t * rows[2 * R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        int64_t rr = row0 + r < n_out ? row0 + r : 0;
        rows[r] = wg + rr * row_size;
        rows[R + r] = wu + rr * row_size;
    }
    if (prefetch) {   // as mmvq_split_kernel
#pragma unroll
        for (int r = 0; r < 2 * R; r++) prefetch_l2(rows[r], row_size, wr * CKV_WARP + lane, W * CKV_WARP);
    }
    pdl_wait();
    float sum[2 * R];
    mmvq_rows<T, 2 * R, (lane_step_values<T>() >= 32 ? 1 : 2), W>(rows, n_in, xq, sum, wr);
    if constexpr (W > 1) {
        if (lane == 0) {
#pragma unroll
            for (int r = 0; r < 2 * R; r++) part[warp][r] = sum[r];
        }
        __syncthreads();
        if (wr == 0) {
            for (int k = 1; k < W; k++)
#pragma unroll
                for (int r = 0; r < 2 * R; r++) sum[r] += part[warp + k][r];
        }
    }
    if (wr == 0 && lane < R) {
        float v = 0.0f;
#pragma unroll
        for (int r = 0; r < R; r++) v = lane == r ? glu_act(sum[r], sum[R + r], gelu) : v;
        outs[grp * R + lane] = v;
        if (row0 + lane < n_out) y[row0 + lane] = v;
    }
    if (yq) {
        __syncthreads();
        if (warp == 0) quantize_chunk_warp(outs[lane], yq + blockIdx.x);
    }
}

static int g_split_w = 0, g_glu_w = 0;   // CKV_MMVQ_W / CKV_GLU_W (A/B runs), 0 = default

static int g_mmvq_rows = 0, g_glu_rows = 0;   // CKV_MMVQ_ROWS / CKV_GLU_ROWS (A/B runs), 0 = auto
static int g_prefetch = 1;   // CKV_GEMV_PREFETCH=0: no weight prefetch before the PDL wait (A/B runs)

// Whether a decode GEMV over `bytes` of weights prefetches them before its PDL wait: only small
// launches, which wait on latency. H100, same call (bench/results/2026-12-07_h100_prefetch.json):
// SmolLM2-shape tg128 (per-layer launches of 0.2-1.1 MB) +4-5% at depths 0 / 2048 / 8000; 8B
// Q4_0 tg64 (9-66 MB per launch, bandwidth-bound: the prefetches are extra requests) -3.5% at d0.
enum { PREFETCH_MAX_BYTES = 4 << 20 };
static bool prefetch_weights(size_t bytes) { return g_prefetch && bytes <= PREFETCH_MAX_BYTES; }

static void read_mmvq_env(void) {
    static bool done = false;
    if (!done) {
        const char * e = getenv("CKV_MMVQ_ROWS");
        g_mmvq_rows = e ? atoi(e) : 0;
        e = getenv("CKV_GLU_ROWS");
        g_glu_rows = e ? atoi(e) : 0;
        e = getenv("CKV_MMVQ_W");
        g_split_w = e ? atoi(e) : 0;
        e = getenv("CKV_GLU_W");
        g_glu_w = e ? atoi(e) : 0;
        e = getenv("CKV_GEMV_PREFETCH");
        g_prefetch = !(e && strcmp(e, "0") == 0);
        done = true;
    }
}

int32_t ckv_cuda_sm_count(void) {
    static int n = 0;
    if (!n) {
        int dev = 0;
        if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
            cudaGetLastError();
            n = 132;
        }
    }
    return n;
}

template <typename K> static cudaError_t set_smem(K kern, size_t smem) {
    return smem > 48 * 1024 ? cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem)
                            : cudaSuccess;
}

// Rows per warp: one (the most warps) for per-layer matrices, two for the output head, where
// the grid is capped and each block then quantises the input once for many rows.
template <int T, bool NORM>
static cudaError_t launch_mmvq(const struct mmv_jobs & j, int64_t n_in, int64_t rows, const float * x,
                               const cq8x * xq, const float * norm_w, float eps, cudaStream_t s) {
    read_mmvq_env();
    if (xq) {
        const bool prefetch = prefetch_weights((size_t) rows * j.row_size[0]);
        // Warps per row: 2 measured best on the H200 (8B Q4_0 tg128: 2 -> 286, 4 -> 276, 8 -> 245
        // tok/s; bench/results/2026-11-28_h200_gpu-3.json).
        int      W = g_split_w == 1 || g_split_w == 2 || g_split_w == 4 || g_split_w == 8 ? g_split_w : 2;
        if constexpr (lane_step_values<T>() >= 32) {
            // Regrouped q4_0 / q6_K (a lane's step is 32 values), q4_K and q5_K (64): rows are 4-8x
            // shorter in steps; R rows per warp group keep R loads in flight per lane
            // (CKV_MMVQ_ROWS, default 2). Default W: the fewest warps per row group that give
            // ~4096 warps (a full wave at 32 warps per SM), while every lane still has two steps.
            int R = g_mmvq_rows == 1 || g_mmvq_rows == 2 || g_mmvq_rows == 4 ? g_mmvq_rows : 2;
            W = 1;
            while (W < 8 && rows / R * W < 4096 && n_in / lane_step_values<T>() >= 2 * CKV_WARP * W) W *= 2;
            if (g_split_w == 1 || g_split_w == 2 || g_split_w == 4 || g_split_w == 8) W = g_split_w;
            int64_t  per_block = (int64_t) (MMVQ_WARPS / W) * R;
            unsigned grid = (unsigned) ((rows + per_block - 1) / per_block);
            auto go = [&](auto kern) { return launch_pdl(kern, grid, MMVQ_THREADS, 0, s, j, n_in, xq, rows, prefetch); };
            switch (W * 10 + R) {
                case 11: return go(mmvq_split_kernel<T, 1, 1>);
                case 12: return go(mmvq_split_kernel<T, 1, 2>);
                case 14: return go(mmvq_split_kernel<T, 1, 4>);
                case 21: return go(mmvq_split_kernel<T, 2, 1>);
                case 22: return go(mmvq_split_kernel<T, 2, 2>);
                case 24: return go(mmvq_split_kernel<T, 2, 4>);
                case 41: return go(mmvq_split_kernel<T, 4, 1>);
                case 42: return go(mmvq_split_kernel<T, 4, 2>);
                case 44: return go(mmvq_split_kernel<T, 4, 4>);
                case 81: return go(mmvq_split_kernel<T, 8, 1>);
                case 82: return go(mmvq_split_kernel<T, 8, 2>);
                default: return go(mmvq_split_kernel<T, 8, 4>);
            }
        }
        unsigned grid = (unsigned) ((rows + MMVQ_WARPS / W - 1) / (MMVQ_WARPS / W));
        switch (W) {
            case 1: return launch_pdl(mmvq_split_kernel<T, 1>, grid, MMVQ_THREADS, 0, s, j, n_in, xq, rows, prefetch);
            case 2: return launch_pdl(mmvq_split_kernel<T, 2>, grid, MMVQ_THREADS, 0, s, j, n_in, xq, rows, prefetch);
            case 8: return launch_pdl(mmvq_split_kernel<T, 8>, grid, MMVQ_THREADS, 0, s, j, n_in, xq, rows, prefetch);
            default: return launch_pdl(mmvq_split_kernel<T, 4>, grid, MMVQ_THREADS, 0, s, j, n_in, xq, rows, prefetch);
        }
    }
    int    R = g_mmvq_rows == 1 || g_mmvq_rows == 2 ? g_mmvq_rows : (rows > 32768 ? 2 : 1);
    size_t smem = xq ? 0 : (size_t) n_in / 32 * sizeof(cq8x);
    int64_t groups = (rows + MMVQ_WARPS * R - 1) / (MMVQ_WARPS * R);
    int64_t cap = (int64_t) ckv_cuda_sm_count() * 8;
    unsigned grid = (unsigned) (groups < cap ? groups : cap);
    cudaError_t e;
    if (R == 1) {
        auto kern = mmvq_kernel<T, NORM, 1, 8>;
        e = set_smem(kern, smem);
        if (e == cudaSuccess) e = launch_pdl(kern, grid, MMVQ_THREADS, smem, s, j, n_in, x, xq, norm_w, eps, rows);
    } else {
        auto kern = mmvq_kernel<T, NORM, 2, 4>;
        e = set_smem(kern, smem);
        if (e == cudaSuccess) e = launch_pdl(kern, grid, MMVQ_THREADS, smem, s, j, n_in, x, xq, norm_w, eps, rows);
    }
    return e;
}

template <int T, bool NORM>
static cudaError_t launch_mmvq_glu(const uint8_t * wg, const uint8_t * wu, size_t row_size, int64_t n_in,
                                   int64_t n_out, const float * x, const cq8x * xq, float * y, cq8x * yq,
                                   bool gelu, const float * norm_w, float eps, cudaStream_t s) {
    read_mmvq_env();
    if (xq) {
        const bool prefetch = prefetch_weights(2 * (size_t) n_out * row_size);
        // 4 warps per row group where that fits 64 registers (1024 threads) without spills.
        // Regrouped types: 1 (8B q4_0 tg128 on the H200: 1 -> 413, 2 -> 402, 4 -> 372 tok/s;
        // 2026-11-29_h200_gpu-1.json), and q4_K / q5_K, whose lanes take 64 values a step; the
        // others as measured before.
        constexpr int w_default = lane_step_values<T>() >= 32 ? 1 : T == CT_Q4_0 || T == CT_Q4_1 || T == CT_Q8_0 ? 4 : 2;
        int      W = g_glu_w == 1 || g_glu_w == 2 || g_glu_w == 4 ? g_glu_w : w_default;
        unsigned grid = (unsigned) ((n_out + 31) / 32);
        switch (W) {
            case 1: return launch_pdl(mmvq_glu_split_kernel<T, 1>, grid, 8 * CKV_WARP, 0, s, wg, wu, row_size, n_in, n_out, xq, y, yq, gelu, prefetch);
            case 2: return launch_pdl(mmvq_glu_split_kernel<T, 2>, grid, 16 * CKV_WARP, 0, s, wg, wu, row_size, n_in, n_out, xq, y, yq, gelu, prefetch);
            default: return launch_pdl(mmvq_glu_split_kernel<T, 4>, grid, 32 * CKV_WARP, 0, s, wg, wu, row_size, n_in, n_out, xq, y, yq, gelu, prefetch);
        }
    }
    int      R = g_glu_rows == 1 || g_glu_rows == 2 || g_glu_rows == 4 ? g_glu_rows : 2;
    size_t   smem = (size_t) n_in / 32 * sizeof(cq8x);
    unsigned grid = (unsigned) ((n_out + 31) / 32);
    cudaError_t e;
    auto go = [&](auto kern, int threads) {
        e = set_smem(kern, smem);
        if (e == cudaSuccess) e = launch_pdl(kern, grid, threads, smem, s, wg, wu, row_size, n_in, n_out, x, y, yq,
                                             gelu, norm_w, eps);
    };
    if (R == 1) go(mmvq_glu_kernel<T, NORM, 1>, 32 * CKV_WARP);
    else if (R == 2) go(mmvq_glu_kernel<T, NORM, 2>, 16 * CKV_WARP);
    else go(mmvq_glu_kernel<T, NORM, 4>, 8 * CKV_WARP);
    return e;
}

// x [n_rows][n] (n % 32 == 0) to cq8x blocks, one warp per block.
static __global__ void quantize_q8_kernel(const float * __restrict__ x, cq8x * xq, int64_t n_blocks) {
    pdl_begin();
    int64_t c = (int64_t) blockIdx.x * (blockDim.x / CKV_WARP) + threadIdx.x / CKV_WARP;
    if (c < n_blocks) {
        quantize_chunk_warp(x[c * 32 + threadIdx.x % CKV_WARP], xq + c);
    }
}

// y = x / rms(x) * w (ops_rmsnorm's formula; y = x without w) and its cq8x blocks. Every
// block sums the squares of the whole row (n floats from L2, a few KB) and quantises its own
// NQ_WARPS chunks, one per warp: 16 blocks for n = 4096 instead of one block walking all 128
// chunks (6.3 us per launch in ncu, 2 launches per layer). Each warp's chunk and weights are
// loaded before the reduction, so their latency overlaps it.
enum { NQ_WARPS = 8, NQ_THREADS = NQ_WARPS * CKV_WARP };
static __global__ void __launch_bounds__(NQ_THREADS)
norm_quantize_kernel(float * __restrict__ y, cq8x * yq, const float * __restrict__ x,
                     const float * __restrict__ w, int64_t n, float eps) {
    pdl_begin();
    int     lane = threadIdx.x % CKV_WARP, warp = threadIdx.x / CKV_WARP;
    int64_t c = (int64_t) blockIdx.x * NQ_WARPS + warp;
    bool    mine = c < n / 32;
    float   v = mine ? x[c * 32 + lane] : 0.0f;
    float   g = mine && w ? w[c * 32 + lane] : 1.0f;
    float   scale = 1.0f;
    if (w) {
        float sum = 0.0f;
#pragma unroll 4
        for (int64_t i = threadIdx.x; i < n / 4; i += NQ_THREADS) {
            float4 t = ((const float4 *) x)[i];
            sum += t.x * t.x + t.y * t.y + t.z * t.z + t.w * t.w;
        }
        scale = 1.0f / sqrtf(mmvq_block_sum(sum) / (float) n + eps);
    }
    if (mine) {
        if (w) v = v * scale * g;
        if (y) y[c * 32 + lane] = v;
        quantize_chunk_warp(v, yq + c);
    }
}

int32_t ckv_cuda_rmsnorm_quantize_q8(float * y, void * yq, const float * x, const float * w, int64_t n,
                                     float eps, cudaStream_t s) {
    if (n < 32 || n % 32 != 0) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "cuda rmsnorm_quantize_q8: n %lld is not a positive multiple "
                        "of 32", (long long) n);
    }
    unsigned grid = (unsigned) ((n / 32 + NQ_WARPS - 1) / NQ_WARPS);
    CKV_CUDA_CHECK(launch_pdl(norm_quantize_kernel, grid, NQ_THREADS, 0, s, y, (cq8x *) yq, x, w, n, eps));
    return CKV_OK;
}

int32_t ckv_cuda_quantize_q8(const float * x, void * xq, int64_t n, cudaStream_t s) {
    if (n < 32 || n % 32 != 0) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "cuda quantize_q8: n %lld is not a positive multiple of 32",
                        (long long) n);
    }
    int64_t blocks = n / 32;
    CKV_CUDA_CHECK(launch_pdl(quantize_q8_kernel, (unsigned) ((blocks + 7) / 8), 256, 0, s, x, (cq8x *) xq, blocks));
    return CKV_OK;
}

// --- weight regrouping (CT_Q4_0_X8, CT_Q6_K_X8) -------------------------------------------------

enum { RP_THREADS = 256, RP_SMEM_HALVES = 8 * Q6X_GROUP_BYTES / 2 };

// Source 2-byte word of output word k of a group (see the layouts in common.cuh).
template <int T> __device__ __forceinline__ int regroup_src(int k) {
    if constexpr (T == CT_Q4_0) {   // q4_0 block = 9 words: the scale, then 8 words of quants
        return k < 8 ? k * 9 : ((k - 8) / 8) * 9 + 1 + (k - 8) % 8;
    } else {                        // q6_K block = 105 words: ql 64, qh 32, scales 8, d 1
        if (k < 512) return (k / 64) * 105 + k % 64;
        if (k < 768) return ((k - 512) / 32) * 105 + 64 + (k - 512) % 32;
        if (k < 832) return ((k - 768) / 8) * 105 + 96 + (k - 768) % 8;
        return (k - 832) * 105 + 104;
    }
}

// In place: each block moves whole groups to shared memory as 2-byte words and writes them
// back regrouped. Blocks touch disjoint bytes, so no block reads what another rewrites.
template <int T>
static __global__ void __launch_bounds__(RP_THREADS) regroup_kernel(uint16_t * data, int64_t n_groups) {
    constexpr int HALVES = (T == CT_Q4_0 ? X8_GROUP_BYTES : Q6X_GROUP_BYTES) / 2;
    constexpr int GROUPS = RP_SMEM_HALVES / HALVES;
    __shared__ uint16_t tile[GROUPS * HALVES];
    int64_t g0 = (int64_t) blockIdx.x * GROUPS;
    int64_t n  = (n_groups - g0 < GROUPS ? n_groups - g0 : GROUPS) * HALVES;
    uint16_t * base = data + g0 * HALVES;
    for (int64_t i = threadIdx.x; i < n; i += RP_THREADS) tile[i] = base[i];
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n; i += RP_THREADS) {
        base[i] = tile[(i / HALVES) * HALVES + regroup_src<T>((int) (i % HALVES))];
    }
}

int32_t ckv_cuda_weight_repack(struct cuda_weight * w, cudaStream_t s) {
    bool q4 = w->type == CT_Q4_0 && w->n_in % 256 == 0 && w->row_size == (size_t) w->n_in / 32 * sizeof(cq4_0);
    bool q6 = w->type == CT_Q6_K && w->n_in % 2048 == 0 && w->row_size == (size_t) w->n_in / 256 * sizeof(cq6_K);
    if ((!q4 && !q6) || ((uintptr_t) w->data & 15) != 0) {
        return CKV_OK;
    }
    int64_t n_groups = w->n_out * (w->n_in / (q4 ? 256 : 2048));
    int     group_bytes = q4 ? (int) X8_GROUP_BYTES : (int) Q6X_GROUP_BYTES;
    int     per_block = RP_SMEM_HALVES / (group_bytes / 2);
    unsigned grid = (unsigned) ((n_groups + per_block - 1) / per_block);
    CKV_CUDA_CHECK(q4 ? launch_pdl(regroup_kernel<CT_Q4_0>, grid, RP_THREADS, 0, s, (uint16_t *) w->data, n_groups)
                      : launch_pdl(regroup_kernel<CT_Q6_K>, grid, RP_THREADS, 0, s, (uint16_t *) w->data, n_groups));
    w->type = q4 ? CT_Q4_0_X8 : CT_Q6_K_X8;
    return CKV_OK;
}

// --- tensor-core GEMM ------------------------------------------------------------------------

enum { MM_BM = 64, MM_BN = 64, MM_BK = 32, MM_LDK = MM_BK + 8, MM_LDC = MM_BM + 4, MM_THREADS = 128 };

using namespace nvcuda;

template <int T>
static __global__ void __launch_bounds__(MM_THREADS)
mm_kernel(const uint8_t * __restrict__ w, size_t row_size, int64_t n_in, int64_t n_out,
          const float * __restrict__ x, int64_t n_tokens, float * __restrict__ y, int64_t ldy,
          const float * __restrict__ bias, bool accumulate) {
    pdl_begin();
    // The f16 tiles and the f32 output tile are never live together: share the memory.
    __shared__ __align__(128) unsigned char smem[MM_BN * MM_LDC * sizeof(float)];
    __half * As = (__half *) smem;                 // [MM_BM][MM_LDK] weight rows x k
    __half * Bs = As + MM_BM * MM_LDK;             // [MM_BN][MM_LDK] tokens x k
    float *  Cs = (float *) smem;                  // [MM_BN][MM_LDC] tokens x rows
    static_assert(2 * MM_BM * MM_LDK * sizeof(__half) <= sizeof(smem), "tiles fit");

    int64_t row0 = (int64_t) blockIdx.x * MM_BM, tok0 = (int64_t) blockIdx.y * MM_BN;
    int     tid = threadIdx.x, warp = tid / 32, wm = warp >> 1, wn = warp & 1;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) wmma::fill_fragment(acc[i][j], 0.0f);

    for (int64_t c = 0; c < n_in / 32; c++) {
        for (int item = tid; item < MM_BM * 4; item += MM_THREADS) {   // weight tile, 8 values each
            int r = item >> 2, s = item & 3;
            float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            if (row0 + r < n_out) {
                dequant8<T>(w + (row0 + r) * row_size, c, s, v);
            }
            __half * dst = As + r * MM_LDK;
            for (int i = 0; i < 4; i++) {
                dst[chunk_off0<T>(s) + i] = __float2half(v[i]);
                dst[chunk_off1<T>(s) + i] = __float2half(v[4 + i]);
            }
        }
        for (int item = tid; item < MM_BN * 8; item += MM_THREADS) {   // activation tile, float4s
            int    t = item >> 3, k4 = (item & 7) * 4;
            float4 v = make_float4(0, 0, 0, 0);
            if (tok0 + t < n_tokens) {
                v = *(const float4 *) (x + (tok0 + t) * n_in + c * 32 + k4);
            }
            __half * dst = Bs + t * MM_LDK + k4;
            dst[0] = __float2half(v.x); dst[1] = __float2half(v.y);
            dst[2] = __float2half(v.z); dst[3] = __float2half(v.w);
        }
        __syncthreads();
        for (int kk = 0; kk < MM_BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb[2];
            for (int i = 0; i < 2; i++) {
                wmma::load_matrix_sync(fa[i], As + (wm * 32 + i * 16) * MM_LDK + kk, MM_LDK);
                wmma::load_matrix_sync(fb[i], Bs + (wn * 32 + i * 16) * MM_LDK + kk, MM_LDK);
            }
            for (int i = 0; i < 2; i++)
                for (int j = 0; j < 2; j++) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        __syncthreads();
    }
    // acc[i][j] element (m, n) is weight row wm*32+16i+m, token wn*32+16j+n: Cs[token][row].
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++)
            wmma::store_matrix_sync(Cs + (wn * 32 + j * 16) * MM_LDC + wm * 32 + i * 16, acc[i][j],
                                    MM_LDC, wmma::mem_col_major);
    __syncthreads();
    for (int item = tid; item < MM_BM * MM_BN; item += MM_THREADS) {
        int t = item / MM_BM, r = item % MM_BM;
        if (tok0 + t < n_tokens && row0 + r < n_out) {
            float   v   = Cs[t * MM_LDC + r] + (bias ? bias[row0 + r] : 0.0f);
            float * dst = y + (tok0 + t) * ldy + row0 + r;
            *dst = accumulate ? *dst + v : v;
        }
    }
}

// --- launcher --------------------------------------------------------------------------------

static int32_t check_matmul(const struct cuda_matmul_args * a) {
    const struct cuda_weight * w = a->w;
    if (w->n_in % 32 != 0 || a->n_tokens < 1 || a->ldy < w->n_out) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "cuda matmul: n_in %lld is not a multiple of 32, or "
                        "n_tokens %lld < 1, or ldy %lld < n_out %lld", (long long) w->n_in,
                        (long long) a->n_tokens, (long long) a->ldy, (long long) w->n_out);
    }
    if (a->xq && (a->n_tokens != 1 || a->norm_w)) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "cuda matmul: a pre-quantised input (xq) needs one token "
                        "and no fused norm (got %lld tokens)", (long long) a->n_tokens);
    }
    if (a->norm_w && a->n_tokens != 1) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "cuda matmul: the fused input norm needs one token, "
                        "not %lld (run ckv_cuda_rmsnorm first)", (long long) a->n_tokens);
    }
    return CKV_OK;
}

// One-token jobs over the same input, one launch (the caller checked they may share it).
// The GEMV kernels' job table of n_jobs (<= 3) matmuls; *rows = their output rows together.
static struct mmv_jobs jobs_of(const struct cuda_matmul_args * jobs, int n_jobs, int64_t * rows) {
    struct mmv_jobs j = {};
    *rows = 0;
    for (int i = 0; i < n_jobs; i++) {
        j.w[i] = (const uint8_t *) jobs[i].w->data;
        j.row_size[i] = jobs[i].w->row_size;
        j.n_out[i] = jobs[i].w->n_out;
        j.y[i] = jobs[i].y;
        j.bias[i] = jobs[i].bias;
        j.accumulate[i] = jobs[i].accumulate;
        j.ldy[i] = jobs[i].ldy;
        *rows += jobs[i].w->n_out;
    }
    j.n_jobs = n_jobs;
    return j;
}

static int32_t launch_gemv_jobs(const struct cuda_matmul_args * jobs, int n_jobs, cudaStream_t s) {
    int64_t rows;
    const struct mmv_jobs j = jobs_of(jobs, n_jobs, &rows);
    const float * norm = jobs[0].norm_w;
    int64_t       n_in = jobs[0].w->n_in;
    const cq8x *  xq = (const cq8x *) jobs[0].xq;
    cudaError_t   err = cudaSuccess;
    bool known = dispatch_type(jobs[0].w->type, [&]<int T>() {
        if constexpr (has_q8_gemv<T>()) {
            err = norm && !xq ? launch_mmvq<T, true>(j, n_in, rows, jobs[0].x, xq, norm, jobs[0].norm_eps, s)
                              : launch_mmvq<T, false>(j, n_in, rows, jobs[0].x, xq, NULL, 0.0f, s);
        } else {
            err = norm ? launch_mmv(mmv_kernel<T, true>, true, n_in, rows, s, j, n_in, jobs[0].x, norm, jobs[0].norm_eps, rows)
                       : launch_mmv(mmv_kernel<T, false>, false, n_in, rows, s, j, n_in, jobs[0].x, norm, 0.0f, rows);
        }
    });
    if (!known) {
        return ckv_fail(CKV_ERR_UNSUPPORTED, "cuda matmul: no kernel for ggml type %u", jobs[0].w->type);
    }
    CKV_CUDA_CHECK(err);
    return CKV_OK;
}

// A few tokens (2 .. CKV_GEMV_MAX_TOKENS) through regrouped q4_0 / q6_K weights: the inputs
// quantised once into the workspace, then one launch reads each weight row for all of them.
static bool tokens_gemv_fits(const struct cuda_matmul_args * a) {
    const struct cuda_weight * w = a->w;
    return a->n_tokens >= 2 && a->n_tokens <= CKV_GEMV_MAX_TOKENS && !a->xq && !a->norm_w &&
           (w->type == CT_Q4_0_X8 || w->type == CT_Q6_K_X8) && a->ws && a->ws->gemv_xq &&
           a->ws->gemv_xq_bytes >= sizeof(cq8x) * (size_t) (a->n_tokens * w->n_in / 32);
}

// Jobs that fit (tokens_gemv_fits) over the same input x and weight type: one quantisation,
// one launch.
static int32_t tokens_gemv(const struct cuda_matmul_args * jobs, int n_jobs, cudaStream_t s) {
    const struct cuda_weight * w = jobs[0].w;
    TRY_OK(ckv_cuda_quantize_q8(jobs[0].x, jobs[0].ws->gemv_xq, jobs[0].n_tokens * w->n_in, s));
    int64_t rows;
    const struct mmv_jobs j = jobs_of(jobs, n_jobs, &rows);
    const cq8x * xq = (const cq8x *) jobs[0].ws->gemv_xq;
    const int    n  = (int) jobs[0].n_tokens;
    CKV_CUDA_CHECK(w->type == CT_Q4_0_X8 ? launch_mmvq_tokens<CT_Q4_0_X8>(j, w->n_in, rows, xq, n, s)
                                         : launch_mmvq_tokens<CT_Q6_K_X8>(j, w->n_in, rows, xq, n, s));
    return CKV_OK;
}

int32_t ckv_cuda_matmul(const struct cuda_matmul_args * a, cudaStream_t s) {
    int32_t st = check_matmul(a);
    if (st != CKV_OK) {
        return st;
    }
    if (a->n_tokens == 1) {
        return launch_gemv_jobs(a, 1, s);
    }
    if (a->n_tokens <= CKV_GEMV_MAX_TOKENS && !a->xq) {
        if (tokens_gemv_fits(a)) {
            return tokens_gemv(a, 1, s);
        }
        for (int64_t t = 0; t < a->n_tokens; t++) {   // other types: one GEMV per token
            struct cuda_matmul_args one = *a;
            one.x        = a->x + t * a->w->n_in;
            one.y        = a->y + t * a->ldy;
            one.n_tokens = 1;
            int32_t st = launch_gemv_jobs(&one, 1, s);
            if (st != CKV_OK) return st;
        }
        return CKV_OK;
    }
    if (a->ws && a->ws->handle && a->n_tokens >= CKV_BLAS_MIN_TOKENS) {
        return ckv_cuda_gemm_blas(a, s);
    }
    const struct cuda_weight * w = a->w;
    const uint8_t * wd = (const uint8_t *) w->data;
    cudaError_t err = cudaSuccess;
    bool known = dispatch_type(w->type, [&]<int T>() {
        dim3 grid((unsigned) ((w->n_out + MM_BM - 1) / MM_BM), (unsigned) ((a->n_tokens + MM_BN - 1) / MM_BN));
        err = launch_pdl(mm_kernel<T>, grid, MM_THREADS, 0, s, wd, w->row_size, w->n_in, w->n_out, a->x,
                         a->n_tokens, a->y, a->ldy, a->bias, a->accumulate);
    });
    if (!known) {
        return ckv_fail(CKV_ERR_UNSUPPORTED, "cuda matmul: no kernel for ggml type %u", w->type);
    }
    CKV_CUDA_CHECK(err);
    return CKV_OK;
}

// Jobs over one input: fused into one launch when the weights share type and shape of input,
// for a single token or a few (tokens_gemv); otherwise one ckv_cuda_matmul per job.
int32_t ckv_cuda_matmul_multi(const struct cuda_matmul_args * jobs, int n_jobs, cudaStream_t s) {
    bool fuse = n_jobs >= 1 && n_jobs <= 3, few = true;
    for (int i = 0; i < n_jobs; i++) {
        int32_t st = check_matmul(&jobs[i]);
        if (st != CKV_OK) {
            return st;
        }
        fuse = fuse && jobs[i].n_tokens == jobs[0].n_tokens && jobs[i].w->type == jobs[0].w->type &&
               jobs[i].w->n_in == jobs[0].w->n_in && jobs[i].x == jobs[0].x &&
               jobs[i].norm_w == jobs[0].norm_w && jobs[i].norm_eps == jobs[0].norm_eps &&
               jobs[i].xq == jobs[0].xq;
        few = few && tokens_gemv_fits(&jobs[i]);
    }
    if (fuse && jobs[0].n_tokens == 1) {
        return launch_gemv_jobs(jobs, n_jobs, s);
    }
    if (fuse && few) {
        return tokens_gemv(jobs, n_jobs, s);
    }
    for (int i = 0; i < n_jobs; i++) {
        int32_t st = ckv_cuda_matmul(&jobs[i], s);
        if (st != CKV_OK) return st;
    }
    return CKV_OK;
}

int32_t ckv_cuda_matmul_glu(const struct cuda_weight * gate, const struct cuda_weight * up,
                            const float * x, float * y, float * up_out, int64_t n_tokens, bool gelu,
                            const float * norm_w, float norm_eps, const void * xq, void * yq,
                            cudaStream_t s, const struct cuda_gemm_ws * ws) {
    struct cuda_matmul_args g = {gate, x, y, gate->n_out, NULL, n_tokens, false, norm_w, norm_eps, xq, ws};
    struct cuda_matmul_args u = {up, x, up_out, up->n_out, NULL, n_tokens, false, norm_w, norm_eps, xq, ws};
    int32_t st = check_matmul(&g);
    if (st == CKV_OK) st = check_matmul(&u);
    if (st != CKV_OK) {
        return st;
    }
    if (yq && (n_tokens != 1 || gate->n_out % 32 != 0)) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "cuda matmul_glu: a quantised output needs one token and "
                        "n_out %% 32 == 0 (got %lld tokens, n_out %lld)", (long long) n_tokens,
                        (long long) gate->n_out);
    }
    bool fuse = n_tokens == 1 && gate->type == up->type && gate->n_in == up->n_in &&
                gate->n_out == up->n_out && gate->row_size == up->row_size;
    if (!fuse) {   // gate and up as two jobs over one input (one launch for a few tokens), then the GLU
        struct cuda_matmul_args gu[2] = {g, u};
        st = ckv_cuda_matmul_multi(gu, 2, s);
        if (st == CKV_OK) st = ckv_cuda_glu(y, up_out, n_tokens * gate->n_out, gelu, s);
        return st == CKV_OK && yq ? ckv_cuda_quantize_q8(y, yq, gate->n_out, s) : st;
    }
    const uint8_t * wg = (const uint8_t *) gate->data, * wu = (const uint8_t *) up->data;
    cudaError_t err = cudaSuccess;
    bool        quantised_out = false;
    bool known = dispatch_type(gate->type, [&]<int T>() {
        if constexpr (has_q8_gemv<T>()) {
            quantised_out = true;
            const cq8x * q = (const cq8x *) xq;
            err = norm_w ? launch_mmvq_glu<T, true>(wg, wu, gate->row_size, gate->n_in, gate->n_out, x, q, y,
                                                    (cq8x *) yq, gelu, norm_w, norm_eps, s)
                         : launch_mmvq_glu<T, false>(wg, wu, gate->row_size, gate->n_in, gate->n_out, x, q, y,
                                                     (cq8x *) yq, gelu, norm_w, norm_eps, s);
        } else {
            err = norm_w ? launch_mmv(mmv_glu_kernel<T, true>, true, gate->n_in, gate->n_out, s, wg, wu,
                                      gate->row_size, gate->n_in, gate->n_out, x, y, gelu, norm_w, norm_eps)
                         : launch_mmv(mmv_glu_kernel<T, false>, false, gate->n_in, gate->n_out, s, wg, wu,
                                      gate->row_size, gate->n_in, gate->n_out, x, y, gelu, norm_w, norm_eps);
        }
    });
    if (!known) {
        return ckv_fail(CKV_ERR_UNSUPPORTED, "cuda matmul: no kernel for ggml type %u", gate->type);
    }
    CKV_CUDA_CHECK(err);
    return yq && !quantised_out ? ckv_cuda_quantize_q8(y, yq, gate->n_out, s) : CKV_OK;
}
