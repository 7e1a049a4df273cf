// attention.cu - causal attention over the f16 KV cache. Twin: ops_attention.
//
//   out[t][h] = softmax_j(scale * q[t][h] . K[kvh][j]) . V[kvh][j],  j in [lo, pos0 + t]
//   kvh = h / (n_head / n_head_kv),  lo = max(0, pos0 + t - window + 1) when window > 0
//
// Two kernels: a few queries (decode) use the split-K ("flash-decode") kernel with one block
// per KV head and split, merged by merge_kernel; CKV_FLASH_MIN_TOKENS or more queries (prefill)
// use the tensor-core flash-attention kernel, which reads each K/V tile once per 64 queries.
#include <stdlib.h>

#include "common.cuh"
#include "cuda-ops.cuh"
#include "rope.cuh"

// The positions [lo, hi] query t sees, and the part of them split `split` of n_split takes:
// splits are at least ATT_MIN_CHUNK positions long, so with the position read from device
// memory (a graph captured for n_ctx) only as many splits as the current length needs do work.
// Returns the number of splits that have positions; [*j0, *j1) is empty for the others.
enum { ATT_MIN_CHUNK = 64, ATT_MAX_SPLITS = 128 };
__device__ __forceinline__ int64_t query_pos(const struct cuda_attention_args & a, int64_t t) {
    return (a.pos_dev ? *a.pos_dev : a.pos0) + t;
}
__device__ __forceinline__ int split_range(const struct cuda_attention_args & a, int64_t t, int split,
                                           int64_t * j0, int64_t * j1) {
    int64_t hi = query_pos(a, t);   // inclusive
    int64_t lo = a.window > 0 && hi - a.window + 1 > 0 ? hi - a.window + 1 : 0;
    int64_t len = hi - lo + 1, chunk = (len + a.n_split - 1) / a.n_split;
    chunk = chunk < ATT_MIN_CHUNK ? ATT_MIN_CHUNK : chunk;
    *j0 = lo + split * chunk;
    *j1 = min(hi + 1, *j0 + chunk);
    return (int) ((len + chunk - 1) / chunk);
}

// --- decode: one block per (KV head, split, token), serving the whole GQA group --------------
//
// The block loads each K and V row of its range once for up to DEC_GMAX query heads of the
// group (Llama-3: 4, SmolLM2: 3). Positions go in tiles of DEC_TILE, and every load of a tile,
// K and V, is issued first, as 16-byte loads (a block of a decode step usually has a single
// tile, so nothing later would hide their latency): two threads per position hold half a K row
// each; for V, HD / 8 threads cover a row with 8 dims each and the block's threads take
// DEC_THREADS / (HD / 8) positions at a time. The pairs compute the group's scores, one warp
// per head updates its running max / sum, and each thread then accumulates p * V for its
// positions and 8 dims; the position groups are summed through shared memory at the end.
//
// With a.rope set (one decode token) the kernel also does rope_kv's work: every block rotates
// its query heads in shared memory, and the block(s) whose split ends at the new position
// rotate its key, use the new K/V row from shared memory and store it to the cache. The first
// tile's older rows are then loaded before the PDL wait, while the q/k/v GEMV still runs.

// DEC_GMAX (a template parameter: 4 or 8) sizes the per-thread accumulators, so it is the
// smallest that holds the group; 1 (heads_per_block) gives each query head a block of its own,
// which re-reads the K/V rows per head but shortens the serial per-head loops 4x: better while
// the grid is too small to fill the GPU (ckv_cuda_attention_narrow).
enum { DEC_THREADS = 128, DEC_TILE = 64 };

template <int HD> struct dec_layout {
    static constexpr int NCG = HD / 8, PG = DEC_THREADS / NCG, VPOS = DEC_TILE / PG;   // V layout
    static_assert(DEC_THREADS == 2 * DEC_TILE && DEC_THREADS % NCG == 0 && DEC_TILE % PG == 0, "layout");
};

__device__ __forceinline__ void half8_to_float(uint4 raw, float f[8]) {
    const __half2 * h = (const __half2 *) &raw;
    for (int e = 0; e < 4; e++) {
        float2 v = __half22float2(h[e]);
        f[2 * e] = v.x;
        f[2 * e + 1] = v.y;
    }
}

// This thread's loads of the tile's n_pos rows from `tile` on: half a K row of position tid / 2,
// and 8 V dims (column group tid % NCG) of positions tid / NCG + PG k. Rows past the range
// may hold NaN, and row `skip` (the new position, when its loads start before it is stored)
// is not there yet: zeros instead.
template <int HD>
__device__ __forceinline__ void load_tile(const __half * kbase, const __half * vbase, int64_t tile, int n_pos,
                                          int64_t skip, uint4 (&kraw)[HD / 16], uint4 (&vraw)[dec_layout<HD>::VPOS]) {
    using L = dec_layout<HD>;
    int tid = threadIdx.x, p = tid >> 1, half = tid & 1, cg = tid % L::NCG, pg = tid / L::NCG;
    bool    kin = p < n_pos && tile + p != skip;
    const uint4 * kr = (const uint4 *) (kbase + (tile + p) * HD + half * (HD / 2));
#pragma unroll
    for (int i = 0; i < HD / 16; i++) kraw[i] = kin ? kr[i] : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int k = 0; k < L::VPOS; k++) {
        int  vp  = pg + L::PG * k;
        bool vin = vp < n_pos && tile + vp != skip;
        vraw[k] = vin ? ((const uint4 *) (vbase + (tile + vp) * HD))[cg] : make_uint4(0, 0, 0, 0);
    }
}

// rope_kv's work for one block: its G query heads rotated into qs, and (with_new) the new
// position's K row rotated and V row, as f16, into kv_new. Same formulas as rope_kv_kernel.
template <int HD, int DEC_GMAX>
__device__ __forceinline__ void rope_block(const struct cuda_rope_kv_args & r, int h0, int G, int kvh, int64_t pos,
                                           bool with_new, float (&qs)[DEC_GMAX][HD], float * kf,
                                           __half (&kv_new)[2][HD]) {
    int tid = threadIdx.x;
    for (int i = tid; i < G * HD; i += DEC_THREADS) qs[i / HD][i % HD] = r.q[(size_t) h0 * HD + i];
    if (with_new) {
        for (int d = tid; d < HD; d += DEC_THREADS) {
            kf[d] = r.k[(size_t) kvh * HD + d];
            kv_new[1][d] = __float2half_rn(r.v[(size_t) kvh * HD + d]);
        }
    }
    __syncthreads();
    for (int i = tid; i < r.n_rot / 2; i += DEC_THREADS) {
        float2 cs = rope_cos_sin(r, pos, i);
        for (int g = 0; g < G; g++) rope_rotate_pair(qs[g], r, i, cs);
        if (with_new) rope_rotate_pair(kf, r, i, cs);
    }
    __syncthreads();
    if (with_new) {
        for (int d = tid; d < HD; d += DEC_THREADS) kv_new[0][d] = __float2half_rn(kf[d]);
    }
}

template <int HD, int DEC_GMAX>
static __global__ void __launch_bounds__(DEC_THREADS) attention_decode_kernel(struct cuda_attention_args a) {
    using L = dec_layout<HD>;
    constexpr int NCG = L::NCG, PG = L::PG, VPOS = L::VPOS;
    __shared__ __align__(16) float qs[DEC_GMAX][HD];
    __shared__ float sc[DEC_GMAX][DEC_TILE];
    __shared__ float m_s[DEC_GMAX], l_s[DEC_GMAX], corr_s[DEC_GMAX];
    __shared__ __align__(16) float red[PG][HD];
    __shared__ __align__(16) __half kv_new[2][HD];   // the new position's K (rotated) and V rows

    const bool fused = a.rope.k != nullptr;   // n_tokens == 1
    if (fused) {
        pdl_launch_dependents();   // the wait comes after the first tile's older rows are asked for
    } else {
        pdl_begin();
    }
    int group = a.n_head / a.n_head_kv, n_gblk = (group + DEC_GMAX - 1) / DEC_GMAX;
    int kvh = blockIdx.x / n_gblk, g0 = (blockIdx.x % n_gblk) * DEC_GMAX;
    int G = min(DEC_GMAX, group - g0), split = blockIdx.y, tid = threadIdx.x;
    int lane = tid % CKV_WARP, warp = tid / CKV_WARP;
    int64_t t = blockIdx.z, j0, j1;
    int active = split_range(a, t, split, &j0, &j1);   // the position is not written by the previous kernel
    if (split >= active) {
        return;   // past the current length (graph replay): the merge skips this split
    }
    // One split with positions (a short context in a graph captured for n_ctx): the final
    // output directly, and the merge returns at once.
    bool    direct = active == 1;
    int     h0 = kvh * group + g0;
    int64_t now = query_pos(a, t);                         // the query's own position
    bool    with_new = fused && j1 == now + 1;             // this split ends at the new row
    const __half * kbase = a.k_cache + (size_t) kvh * a.n_ctx * HD;
    const __half * vbase = a.v_cache + (size_t) kvh * a.n_ctx * HD;
    uint4 kraw[HD / 16], vraw[VPOS];
    load_tile<HD>(kbase, vbase, j0, (int) min((int64_t) DEC_TILE, j1 - j0), fused ? now : -1, kraw, vraw);

    if (fused) {
        pdl_wait();
        rope_block<HD, DEC_GMAX>(a.rope, h0, G, kvh, now, with_new, qs, red[0], kv_new);
        if (with_new && g0 == 0) {   // one block per KV head stores the row for later steps
            size_t row = ((size_t) kvh * a.n_ctx + now) * HD;
            for (int d = tid; d < HD; d += DEC_THREADS) {
                a.rope.k_cache[row + d] = kv_new[0][d];
                a.rope.v_cache[row + d] = kv_new[1][d];
            }
        }
    } else {
        for (int i = tid; i < G * HD; i += DEC_THREADS) qs[i / HD][i % HD] = a.q[(t * a.n_head + h0) * HD + i];
    }
    if (tid < DEC_GMAX) {
        m_s[tid] = -INFINITY;
        l_s[tid] = 0.0f;
    }
    float acc[DEC_GMAX][8];
    for (int g = 0; g < DEC_GMAX; g++)
        for (int e = 0; e < 8; e++) acc[g][e] = 0.0f;
    int cg = tid % NCG, pg = tid / NCG;
    __syncthreads();   // qs, kv_new (red[0] is free again: the rotation's scratch)

    for (int64_t tile = j0; tile < j1; tile += DEC_TILE) {
        int n_pos = (int) min((int64_t) DEC_TILE, j1 - tile);
        int p = tid >> 1, half = tid & 1;
        if (tile != j0) load_tile<HD>(kbase, vbase, tile, n_pos, fused ? now : -1, kraw, vraw);
        if (with_new && now < tile + n_pos) {   // the last tile: the new row from shared memory
            int r = (int) (now - tile);
#pragma unroll
            for (int i = 0; i < HD / 16; i++) {
                if (p == r) kraw[i] = ((const uint4 *) &kv_new[0][half * (HD / 2)])[i];
            }
#pragma unroll
            for (int k = 0; k < VPOS; k++) {
                if (pg + PG * k == r) vraw[k] = ((const uint4 *) kv_new[1])[cg];
            }
        }
        {   // scores: thread pair (p, half) takes half the dims of position p
            float dot[DEC_GMAX];
            for (int g = 0; g < DEC_GMAX; g++) dot[g] = 0.0f;
#pragma unroll
            for (int i = 0; i < HD / 16; i++) {
                float kf[8];
                half8_to_float(kraw[i], kf);
                int d = half * (HD / 2) + 8 * i;
                for (int g = 0; g < DEC_GMAX; g++) {
                    if (g < G) {
                        float4 qa = *(const float4 *) &qs[g][d], qb = *(const float4 *) &qs[g][d + 4];
                        dot[g] += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] +
                                  qb.x * kf[4] + qb.y * kf[5] + qb.z * kf[6] + qb.w * kf[7];
                    }
                }
            }
            for (int g = 0; g < DEC_GMAX; g++) {
                float s = dot[g] + __shfl_xor_sync(0xffffffffu, dot[g], 1);
                if (half == 0 && g < G) sc[g][p] = p < n_pos ? s * a.scale : -INFINITY;
            }
        }
        __syncthreads();
        for (int g = warp; g < G; g += DEC_THREADS / CKV_WARP) {   // online softmax, warp per head
            float s0 = sc[g][lane], s1 = sc[g][lane + 32];
            float m_old = m_s[g], m_new = fmaxf(m_old, warp_max(fmaxf(s0, s1)));
            float p0 = expf(s0 - m_new), p1 = expf(s1 - m_new), corr = expf(m_old - m_new);
            float sum = warp_sum(p0 + p1);
            sc[g][lane] = p0;
            sc[g][lane + 32] = p1;
            __syncwarp();
            if (lane == 0) {
                l_s[g] = l_s[g] * corr + sum;
                m_s[g] = m_new;
                corr_s[g] = corr;
            }
        }
        __syncthreads();
        for (int g = 0; g < DEC_GMAX; g++) {
            if (g < G) {
                float c = corr_s[g];
                for (int e = 0; e < 8; e++) acc[g][e] *= c;
            }
        }
#pragma unroll
        for (int k = 0; k < VPOS; k++) {
            float vf[8];
            half8_to_float(vraw[k], vf);
            int vp = pg + PG * k;
            for (int g = 0; g < DEC_GMAX; g++) {
                if (g < G) {
                    float w = sc[g][vp];   // 0 past n_pos (exp(-inf)), and v is 0 there
                    for (int e = 0; e < 8; e++) acc[g][e] += w * vf[e];
                }
            }
        }
        __syncthreads();   // sc is rewritten by the next tile
    }

#pragma unroll
    for (int g = 0; g < DEC_GMAX; g++) {   // sum the position groups, one head at a time
        if (g >= G) break;   // G is the same for the whole block
        *(float4 *) &red[pg][8 * cg]     = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
        *(float4 *) &red[pg][8 * cg + 4] = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
        __syncthreads();
        int64_t qh = t * a.n_head + h0 + g;
        for (int d = tid; d < HD; d += DEC_THREADS) {
            float o = 0.0f;
            for (int k = 0; k < PG; k++) o += red[k][d];
            if (direct) {
                a.out[qh * HD + d] = o / l_s[g];
                // A warp's lanes hold the 32 values of chunk d / 32 (HD >= 64, d = tid + 128 k).
                if (a.out_q) quantize_chunk_warp(o / l_s[g], (cq8x *) a.out_q + (qh * HD + d) / 32);
            } else {
                float * slot = a.partial + ((size_t) qh * a.n_split + split) * ckv_cuda_attention_partial_floats(HD);
                slot[d] = o;
                if (d == 0) {
                    slot[HD] = m_s[g];
                    slot[HD + 1] = l_s[g];
                }
            }
        }
        __syncthreads();   // red is rewritten for the next head
    }
}

// Merges the splits that have positions of query (t = blockIdx.y, h = blockIdx.x): the
// splits' weights exp(m - M) go to shared memory once; then warp w sums splits w, w + 8, ...
// with 16-byte loads (lane = 4 output dims), and the warps' sums are added at the end. Eight
// warps: at 32k positions a head has 128 splits to read, one after another per warp.
enum { MERGE_THREADS = 256, MERGE_WARPS = MERGE_THREADS / CKV_WARP };
static __global__ void __launch_bounds__(MERGE_THREADS) merge_kernel(struct cuda_attention_args a) {
    pdl_begin();
    extern __shared__ float merge_w[];   // [n_split]
    __shared__ float red[MERGE_WARPS];
    __shared__ float4 part[MERGE_WARPS][64];   // head_dim <= 256
    int     h = blockIdx.x, hd = a.head_dim, tid = threadIdx.x, lane = tid % CKV_WARP, warp = tid / CKV_WARP;
    int64_t t = blockIdx.y, j0, j1, stride = ckv_cuda_attention_partial_floats(hd);
    int     active = split_range(a, t, 0, &j0, &j1);
    if (active == 1) {
        return;   // the decode kernel wrote the output itself
    }
    const float * p = a.partial + ((size_t) t * a.n_head + h) * a.n_split * stride;
    float M = -INFINITY;
    for (int sp = tid; sp < active; sp += MERGE_THREADS) M = fmaxf(M, p[sp * stride + hd]);
    M = warp_max(M);
    if (lane == 0) red[warp] = M;
    __syncthreads();
    M = red[0];
    for (int w = 1; w < MERGE_WARPS; w++) M = fmaxf(M, red[w]);
    __syncthreads();
    float L = 0.0f;
    for (int sp = tid; sp < active; sp += MERGE_THREADS) {
        float e = expf(p[sp * stride + hd] - M);
        merge_w[sp] = e;
        L += p[sp * stride + hd + 1] * e;
    }
    L = warp_sum(L);
    if (lane == 0) red[warp] = L;
    __syncthreads();
    float inv = 0.0f;
    for (int w = 0; w < MERGE_WARPS; w++) inv += red[w];
    inv = 1.0f / inv;
    int    nc = hd / 4;
    float4 acc[2] = {make_float4(0, 0, 0, 0), make_float4(0, 0, 0, 0)};
    // MERGE_BATCH of a warp's splits per round, every load issued before the first use (a
    // loop with one load per step left ~4 L2 round trips per 16 splits: 11.6 us at 128 splits).
    constexpr int MERGE_BATCH = 8;
    for (int sp0 = warp; sp0 < active; sp0 += MERGE_WARPS * MERGE_BATCH) {
        float4 v[MERGE_BATCH][2];
#pragma unroll
        for (int u = 0; u < MERGE_BATCH; u++) {
            int sp = sp0 + u * MERGE_WARPS;
            const float4 * row = (const float4 *) (p + (size_t) (sp < active ? sp : 0) * stride);
#pragma unroll
            for (int i = 0; i < 2; i++) {
                v[u][i] = sp < active && lane + 32 * i < nc ? row[lane + 32 * i] : make_float4(0, 0, 0, 0);
            }
        }
#pragma unroll
        for (int u = 0; u < MERGE_BATCH; u++) {
            int   sp = sp0 + u * MERGE_WARPS;
            float w = sp < active ? merge_w[sp] : 0.0f;
#pragma unroll
            for (int i = 0; i < 2; i++) {
                acc[i].x += w * v[u][i].x; acc[i].y += w * v[u][i].y;
                acc[i].z += w * v[u][i].z; acc[i].w += w * v[u][i].w;
            }
        }
    }
    for (int i = 0; i < 2; i++) {
        if (lane + 32 * i < nc) part[warp][lane + 32 * i] = acc[i];
    }
    __syncthreads();
    for (int f = tid; f < nc; f += MERGE_THREADS) {
        float4 o = part[0][f];
        for (int w = 1; w < MERGE_WARPS; w++) {
            o.x += part[w][f].x; o.y += part[w][f].y; o.z += part[w][f].z; o.w += part[w][f].w;
        }
        o = make_float4(o.x * inv, o.y * inv, o.z * inv, o.w * inv);
        *(float4 *) (a.out + (t * a.n_head + h) * hd + 4 * f) = o;
        if (a.out_q) part[0][f] = o;   // f < nc: only this thread read part[.][f]
    }
    if (a.out_q) {   // the head's hd / 32 chunks quantised, one warp each
        __syncthreads();
        const float * vals = (const float *) part[0];
        for (int c = warp; c < hd / 32; c += MERGE_WARPS) {
            quantize_chunk_warp(vals[32 * c + lane], (cq8x *) a.out_q + ((t * a.n_head + h) * hd) / 32 + c);
        }
    }
}

// --- prefill: flash attention on tensor cores ------------------------------------------------
//
// One block per (64-query tile, head), 4 warps of 16 queries. K and V tiles of 64 positions stay
// row-major and reach shared memory by cp.async: V_t's copy is in flight during S = Q K_t^T and
// K_(t+1)'s during O += P V_t (one buffer each suffices: a barrier separates every reuse). Each
// warp computes S with mma.sync m16n8k16 (f16 in, f32 accumulate; fragments from ldmatrix, V's
// through .trans), masks it (only tiles crossing the diagonal or the window edge), runs the
// online softmax on its registers, and multiplies P (rounded to f16, the S accumulator layout
// reused as the A operand) by V into f32 output accumulators. Rows padded by 16 bytes keep each
// ldmatrix phase on distinct banks. Fragment layouts are the PTX ISA's for m16n8k16: lane =
// 4 g + t4; A regs (row g | g+8, cols 2t4 | 2t4+8), B regs (k rows 2t4 | 2t4+8, col g), C (row
// g | g+8, cols 2t4, 2t4+1). Against the previous version (K/V loaded synchronously, V
// transposed by scalar shared stores, a mask on every tile): pp32768 6892 -> 14970 tok/s on
// the H200 (2026-11-29_h200_gpu.json).

enum { FA_BM = 64, FA_BN = 64, FA_THREADS = 128 };

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *(uint32_t *) &h;
}

__device__ __forceinline__ void cp_async16(void * smem, const void * gmem, int src_bytes) {
    unsigned s = (unsigned) __cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const __half * p) {
    unsigned s = (unsigned) __cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t r[4], const __half * p) {
    unsigned s = (unsigned) __cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

template <int HD> constexpr size_t flash_smem_bytes() { return sizeof(__half) * 3 * (size_t) FA_BM * (HD + 8); }

template <int HD>
static __global__ void __launch_bounds__(FA_THREADS) flash_prefill_kernel(struct cuda_attention_args a) {
    pdl_begin();
    static_assert(FA_BM == FA_BN, "Q, K and V tiles share one row count");
    constexpr int LD = HD + 8;
    extern __shared__ __align__(16) unsigned char fa_smem[];
    __half * Qs = (__half *) fa_smem;   // [FA_BM][LD]
    __half * Ks = Qs + FA_BM * LD;      // [FA_BN][LD]
    __half * Vs = Ks + FA_BN * LD;      // [FA_BN][LD]

    int     tid = threadIdx.x, warp = tid / CKV_WARP, lane = tid % CKV_WARP, g = lane >> 2, t4 = lane & 3;
    int64_t q0 = (int64_t) (gridDim.x - 1 - blockIdx.x) * FA_BM;   // longest tiles first
    int     h = blockIdx.y, kvh = h / (a.n_head / a.n_head_kv);
    int64_t pos0 = a.pos_dev ? *a.pos_dev : a.pos0;
    int64_t n_q = min((int64_t) FA_BM, a.n_tokens - q0);
    int64_t kv_hi = pos0 + q0 + n_q - 1;   // inclusive
    int64_t kv_lo = a.window > 0 && pos0 + q0 - a.window + 1 > 0 ? pos0 + q0 - a.window + 1 : 0;
    const __half * kbase = a.k_cache + (size_t) kvh * a.n_ctx * HD;
    const __half * vbase = a.v_cache + (size_t) kvh * a.n_ctx * HD;
    // Rows kv0 .. kv0 + FA_BN - 1 of a cache tensor into dst; rows past kv_hi (garbage, maybe
    // NaN) as zeros.
    auto load_tile = [&](__half * dst, const __half * base, int64_t kv0) {
        for (int i = tid; i < FA_BN * HD / 8; i += FA_THREADS) {
            int  r = i / (HD / 8), c = (i % (HD / 8)) * 8;
            bool in = kv0 + r <= kv_hi;
            cp_async16(dst + r * LD + c, base + (in ? kv0 + r : kv0) * HD + c, in ? 16 : 0);
        }
    };
    load_tile(Ks, kbase, kv_lo);
    cp_async_commit();

    for (int i = tid; i < FA_BM * HD / 4; i += FA_THREADS) {   // Q tile as f16 (rows past the end: 0)
        int    r = i / (HD / 4), c = (i % (HD / 4)) * 4;
        float4 v = q0 + r < a.n_tokens ? *(const float4 *) (a.q + ((q0 + r) * a.n_head + h) * HD + c)
                                       : make_float4(0, 0, 0, 0);
        *(__half2 *) (Qs + r * LD + c)     = __floats2half2_rn(v.x, v.y);
        *(__half2 *) (Qs + r * LD + c + 2) = __floats2half2_rn(v.z, v.w);
    }
    int64_t qpos[2] = {pos0 + q0 + warp * 16 + g, pos0 + q0 + warp * 16 + g + 8};
    float o[HD / 8][4];
    for (int d = 0; d < HD / 8; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    // ldmatrix row addresses of this lane: A (Q rows), B of K (two 8-key tiles), B of V (.trans).
    const __half * qa = Qs + (warp * 16 + (lane & 15)) * LD + 8 * (lane >> 4);
    const __half * kb = Ks + ((lane & 7) + 8 * (lane >> 4)) * LD + 8 * ((lane >> 3) & 1);
    const __half * vb = Vs + ((lane & 7) + 8 * ((lane >> 3) & 1)) * LD + 8 * (lane >> 4);

    for (int64_t kv0 = kv_lo; kv0 <= kv_hi; kv0 += FA_BN) {
        cp_async_wait_all();   // K_t
        __syncthreads();       // K_t (and Q) visible; every warp is done with V_(t-1)
        load_tile(Vs, vbase, kv0);
        cp_async_commit();

        float s[FA_BN / 8][4];
        for (int n = 0; n < FA_BN / 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < HD / 16; ks++) {
            uint32_t af[4];
            ldsm_x4(af, qa + ks * 16);
#pragma unroll
            for (int np = 0; np < FA_BN / 16; np++) {
                uint32_t bf[4];
                ldsm_x4(bf, kb + np * 16 * LD + ks * 16);
                mma_16816(s[2 * np], af, bf[0], bf[1]);
                mma_16816(s[2 * np + 1], af, bf[2], bf[3]);
            }
        }
        // Mask (tiles crossing the diagonal or the window edge only), scale, online softmax.
        bool full = kv0 + FA_BN - 1 <= pos0 + q0 && (a.window <= 0 || kv0 > pos0 + q0 + n_q - 1 - a.window);
        float mx[2] = {-INFINITY, -INFINITY};
        for (int n = 0; n < FA_BN / 8; n++)
            for (int e = 0; e < 4; e++) {
                int64_t key = kv0 + n * 8 + 2 * t4 + (e & 1), qp = qpos[e >> 1];
                bool ok = full || (key <= qp && (a.window <= 0 || key > qp - a.window));
                s[n][e] = ok ? s[n][e] * a.scale : -INFINITY;
                mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
            }
        float corr[2], base[2];
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            float m_new = fmaxf(m[r], mx[r]);
            base[r] = m_new == -INFINITY ? 0.0f : m_new;   // a row with nothing visible yet
            corr[r] = expf(m[r] - base[r]);
            m[r] = m_new;
            l[r] *= corr[r];
        }
        for (int n = 0; n < FA_BN / 8; n++)
            for (int e = 0; e < 4; e++) {
                s[n][e] = expf(s[n][e] - base[e >> 1]);
                l[e >> 1] += s[n][e];
            }
        for (int d = 0; d < HD / 8; d++) {
            o[d][0] *= corr[0]; o[d][1] *= corr[0];
            o[d][2] *= corr[1]; o[d][3] *= corr[1];
        }

        cp_async_wait_all();   // V_t
        __syncthreads();       // V_t visible; every warp is done with K_t
        if (kv0 + FA_BN <= kv_hi) load_tile(Ks, kbase, kv0 + FA_BN);
        cp_async_commit();
#pragma unroll
        for (int j = 0; j < FA_BN / 16; j++) {
            uint32_t pf[4] = {pack_half2(s[2 * j][0], s[2 * j][1]), pack_half2(s[2 * j][2], s[2 * j][3]),
                              pack_half2(s[2 * j + 1][0], s[2 * j + 1][1]),
                              pack_half2(s[2 * j + 1][2], s[2 * j + 1][3])};
#pragma unroll
            for (int dp = 0; dp < HD / 16; dp++) {
                uint32_t bf[4];
                ldsm_x4_trans(bf, vb + j * 16 * LD + dp * 16);
                mma_16816(o[2 * dp], pf, bf[0], bf[1]);
                mma_16816(o[2 * dp + 1], pf, bf[2], bf[3]);
            }
        }
    }
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
    for (int r = 0; r < 2; r++) {
        int64_t q = q0 + warp * 16 + g + 8 * r;
        if (q >= a.n_tokens) continue;
        float   inv = 1.0f / l[r];
        float * dst = a.out + (q * a.n_head + h) * HD + 2 * t4;
        for (int d = 0; d < HD / 8; d++) *(float2 *) (dst + d * 8) = make_float2(o[d][2 * r] * inv, o[d][2 * r + 1] * inv);
    }
}

// --- launchers -------------------------------------------------------------------------------

int32_t ckv_cuda_attention_splits(int64_t n_tokens, int32_t n_head, int64_t n_kv, int64_t partial_cap) {
    // At most ATT_MAX_SPLITS: with 8 KV heads that is ~2.5 waves of decode blocks on an H200,
    // enough to fill it, while the merge's serial reads over the splits stay short.
    // CKV_ATT_MAX_SPLITS overrides the cap (A/B runs).
    static int cap = -1;
    if (cap < 0) {
        const char * e = getenv("CKV_ATT_MAX_SPLITS");
        cap = e && atoi(e) >= 1 ? atoi(e) : ATT_MAX_SPLITS;
    }
    int64_t want = (n_kv + ATT_MIN_CHUNK - 1) / ATT_MIN_CHUNK;
    want = want < cap ? want : cap;
    int64_t fit  = partial_cap / (n_tokens * n_head);
    int64_t n    = want < fit ? want : fit;
    return n < 1 ? 1 : (int32_t) n;
}

template <int HD> static cudaError_t launch_flash(const struct cuda_attention_args * a, cudaStream_t s) {
    constexpr size_t smem = flash_smem_bytes<HD>();
    cudaError_t e = cudaFuncSetAttribute(flash_prefill_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int) smem);
    if (e != cudaSuccess) return e;
    dim3 grid((unsigned) ((a->n_tokens + FA_BM - 1) / FA_BM), (unsigned) a->n_head);
    return launch_pdl(flash_prefill_kernel<HD>, grid, FA_THREADS, smem, s, *a);
}

int32_t ckv_cuda_attention_narrow(int32_t n_head, int32_t n_head_kv, int64_t n_kv, int32_t n_sm) {
    if (n_head_kv < 1 || n_head <= n_head_kv) {
        return 0;
    }
    int64_t splits = (n_kv + ATT_MIN_CHUNK - 1) / ATT_MIN_CHUNK;
    return n_head_kv * splits < n_sm ? 1 : 0;
}

template <int HD> static cudaError_t launch_decode(const struct cuda_attention_args * a, cudaStream_t s) {
    // gmax query heads per block: the smallest accumulator size that holds the group, or 1.
    int  group = a->n_head / a->n_head_kv, gmax = a->heads_per_block == 1 ? 1 : group <= 4 ? 4 : 8;
    dim3 grid((unsigned) (a->n_head_kv * ((group + gmax - 1) / gmax)), (unsigned) a->n_split,
              (unsigned) a->n_tokens);
    cudaError_t e = gmax == 1   ? launch_pdl(attention_decode_kernel<HD, 1>, grid, DEC_THREADS, 0, s, *a)
                    : gmax == 4 ? launch_pdl(attention_decode_kernel<HD, 4>, grid, DEC_THREADS, 0, s, *a)
                                : launch_pdl(attention_decode_kernel<HD, 8>, grid, DEC_THREADS, 0, s, *a);
    if (e == cudaSuccess && a->n_split > 1) {
        size_t smem = (size_t) a->n_split * sizeof(float);
        if (smem > 48 * 1024) e = cudaFuncSetAttribute(merge_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem);
        if (e == cudaSuccess) {
            e = launch_pdl(merge_kernel, dim3((unsigned) a->n_head, (unsigned) a->n_tokens), MERGE_THREADS, smem, s, *a);
        }
    }
    return e;
}

int32_t ckv_cuda_attention(const struct cuda_attention_args * a, cudaStream_t s) {
    if (a->n_head_kv < 1 || a->n_head % a->n_head_kv != 0 || a->n_split < 1 || a->n_tokens < 1 ||
        (!a->pos_dev && a->pos0 + a->n_tokens > a->n_ctx) || (a->n_split > 1 && !a->partial) ||
        (a->out_q && (a->n_tokens >= CKV_FLASH_MIN_TOKENS || a->head_dim % 32 != 0)) ||
        a->heads_per_block < 0 || a->heads_per_block > 1) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "cuda attention: bad shape (n_head %d, n_head_kv %d, "
                        "n_split %d, %lld tokens at %lld, n_ctx %d, %d heads per block)", a->n_head,
                        a->n_head_kv, a->n_split, (long long) a->n_tokens, (long long) a->pos0, a->n_ctx,
                        a->heads_per_block);
    }
    const struct cuda_rope_kv_args * r = &a->rope;
    if (r->k) {
        TRY_OK(ckv_cuda_rope_kv_check(r));
        if (a->n_tokens != 1 || r->n_tokens != 1 || r->q != a->q || r->k_cache != a->k_cache ||
            r->v_cache != a->v_cache || r->q_norm || r->k_norm || r->n_head != a->n_head ||
            r->n_head_kv != a->n_head_kv || r->head_dim != a->head_dim || r->n_ctx != a->n_ctx ||
            r->pos_dev != a->pos_dev || (!a->pos_dev && r->pos0 != a->pos0)) {
            return ckv_fail(CKV_ERR_INVALID_ARG, "cuda attention: RoPE inside the decode kernel takes one "
                            "token, no q/k norm, and the attention's q, caches, heads and position");
        }
    }
    bool        flash = a->n_tokens >= CKV_FLASH_MIN_TOKENS;
    cudaError_t err;
    switch (a->head_dim) {
        case 64:  err = flash ? launch_flash<64>(a, s) : launch_decode<64>(a, s); break;
        case 128: err = flash ? launch_flash<128>(a, s) : launch_decode<128>(a, s); break;
        case 256: err = flash ? launch_flash<256>(a, s) : launch_decode<256>(a, s); break;
        default:
            return ckv_fail(CKV_ERR_UNSUPPORTED, "cuda attention: head_dim %d (supported: 64, 128, 256)",
                            a->head_dim);
    }
    CKV_CUDA_CHECK(err);
    return CKV_OK;
}
