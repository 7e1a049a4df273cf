// clusterkv.cu - ClusterKV's GPU building blocks (issue 6): batched cosine k-means with the CSR
// cluster index, exact budgeted cluster selection, sparse flash-decode over position lists.
// Contracts and CPU twins are in clusterkv-ops.cuh; the why of each kernel is next to it.
#include <float.h>
#include <math.h>

#include "clusterkv-ops.cuh"
#include "common.cuh"

static __host__ __device__ int32_t ceil_div(int64_t a, int64_t b) {
    return (int32_t) ((a + b - 1) / b);
}

__device__ __forceinline__ float load_elt(const void * x, bool f16, int64_t i) {
    return f16 ? __half2float(((const __half *) x)[i]) : ((const float *) x)[i];
}

// =============================================================================================
// k-means
// =============================================================================================
//
// One iteration is a fixed launch sequence over all problems: counting sort of the rows by label
// (per-chunk histograms, a per-problem scan, a stable warp-serial scatter), the update as a
// segmented reduction over each cluster's rows in ascending row order (f64, the CPU's order, so
// the centroids are bit-identical for identical labels), the normalised centroid table, and the
// fused assignment (dot products with a running argmax; no n x k matrix: on the tensor cores
// for f16 keys, register-tiled f32 FMAs otherwise). A
// problem whose last assignment changed nothing is marked inactive on the device and every
// later kernel returns at once for it, so the host launches max_iter iterations without waiting.

enum {
    KM_CHUNK      = 1024,  // rows per counting-sort chunk
    KM_BM         = 64,    // assignment: rows per block
    KM_XS         = KM_BM + 4,  // assignment: padded shared row (keeps float4 alignment)
    KM_BN         = 64,    // assignment: centroids per tile
    KM_BK         = 32,    // assignment: dims per centroid tile load
    KM_THREADS    = 256,
    KM_SCAN_THREADS = 1024,
};

// Scratch carved out of cuda_kmeans_args.scratch.
struct km_scratch {
    float *   cn;          // [P][d][k_pad] normalised centroids, transposed (columns >= k zero);
                           // for f16 keys the same bytes hold them split in two f16 tables
                           // [P][hi | lo][k_pad][d] (km_split_centroid)
    int32_t * chunk_base;  // [P][n_chunks][k] per-chunk histogram, then write cursors
    int32_t * sizes;       // [P][k] this sort's cluster sizes
    int32_t * offsets;     // [P][k]
    int32_t * order;       // [P][n] rows grouped by label, ascending inside a label
    int32_t * changed;     // [P] labels changed by the last assignment
    int32_t * active;      // [P] 1 while the problem iterates
    int32_t * iters;       // [P] updates run
};

static size_t align256(size_t x) {
    return (x + 255) & ~(size_t) 255;
}

static size_t km_layout(int32_t P, int32_t n, int32_t k, int32_t d, char * base, km_scratch * s) {
    int64_t k_pad = (int64_t) ceil_div(k, KM_BN) * KM_BN, n_chunks = ceil_div(n, KM_CHUNK);
    size_t  sizes[8] = {
        (size_t) P * k_pad * d * sizeof(float), (size_t) P * n_chunks * k * sizeof(int32_t),
        (size_t) P * k * sizeof(int32_t),       (size_t) P * k * sizeof(int32_t),
        (size_t) P * n * sizeof(int32_t),       (size_t) P * sizeof(int32_t),
        (size_t) P * sizeof(int32_t),           (size_t) P * sizeof(int32_t)};
    void ** ptrs[8] = {(void **) &s->cn, (void **) &s->chunk_base, (void **) &s->sizes,
                       (void **) &s->offsets, (void **) &s->order, (void **) &s->changed,
                       (void **) &s->active, (void **) &s->iters};
    size_t off = 0;
    for (int i = 0; i < 8; i++) {
        if (base) *ptrs[i] = base + off;
        off += align256(sizes[i]);
    }
    return off;
}

size_t ckv_cuda_kmeans_scratch_bytes(int32_t n_problems, int32_t n, int32_t k, int32_t d) {
    km_scratch s;
    return km_layout(n_problems, n, k, d, nullptr, &s);
}

// Centroids from the init rows; labels -1; every problem active.
static __global__ void km_init_kernel(cuda_kmeans_args a, km_scratch s) {
    int p = blockIdx.y;
    for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < (int64_t) a.k * a.d;
         i += (int64_t) gridDim.x * blockDim.x) {
        int j = (int) (i / a.d), t = (int) (i % a.d);
        int64_t row = a.init_rows[(int64_t) p * a.k + j];
        a.centroids[p * a.cent_stride + i] = load_elt(a.x, a.x_f16, p * a.x_stride + row * a.d + t);
    }
    for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < a.n;
         i += (int64_t) gridDim.x * blockDim.x) {
        a.labels[(int64_t) p * a.n + i] = -1;
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        s.changed[p] = 0;
        s.active[p]  = 1;
        s.iters[p]   = 0;
    }
}

// A normalised centroid value as hi + lo / KM_LO_SCALE, both f16: the tensor cores multiply f16
// keys by each part exactly and accumulate in f32, so the score keeps ~22 bits of the centroid
// (a lone f16 would keep 11 and flip near ties the CPU's f32 decides).
#define KM_LO_SCALE 2048.0f
__device__ __forceinline__ void km_split_centroid(float v, __half * hi, __half * lo) {
    *hi = __float2half_rn(v);
    *lo = __float2half_rn((v - __half2float(*hi)) * KM_LO_SCALE);
}

// cn_j = c_j * (float) (1 / sqrt(sum c_j[t]^2 in f64)), a zero centroid staying zero: the CPU's
// normalise_centroids operation for operation (one thread per centroid, the same summation
// order), so both assignments see the same table. Stored transposed, [d][k_pad], so the
// assignment's tile loads are coalesced (the CPU's AVX2 path uses the same layout); for f16
// keys (split) as hi / lo rows [k_pad][d] for the tensor-core assignment.
static __global__ void km_normalise_kernel(cuda_kmeans_args a, km_scratch s, bool only_active, bool split) {
    int p = blockIdx.y, k_pad = ceil_div(a.k, KM_BN) * KM_BN;
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if ((only_active && !s.active[p]) || j >= k_pad) return;
    float *  cn = s.cn + (int64_t) p * a.d * k_pad + j;
    __half * hi = (__half *) (s.cn + (int64_t) p * a.d * k_pad) + (int64_t) j * a.d, * lo = hi + (int64_t) k_pad * a.d;
    const float * c = a.centroids + p * a.cent_stride + (int64_t) j * a.d;
    float inv = 0.0f;
    if (j < a.k) {
        double ss = 0.0;
        for (int t = 0; t < a.d; t++) ss += (double) c[t] * c[t];
        inv = ss > 0.0 ? (float) (1.0 / sqrt(ss)) : 0.0f;
    }
    for (int t = 0; t < a.d; t++) {
        float v = j < a.k ? c[t] * inv : 0.0f;
        if (split) km_split_centroid(v, &hi[t], &lo[t]);
        else cn[(int64_t) t * k_pad] = v;
    }
}

// Running argmax merge: the higher score, and on equal scores the lower centroid index.
__device__ __forceinline__ void argmax_merge(float & best, int & bj, float ob, int oj) {
    if (ob > best || (ob == best && oj < bj)) {
        best = ob;
        bj   = oj;
    }
}

// Fused assignment: block = KM_BM rows of problem blockIdx.y, all of whose d values sit in
// shared memory (transposed, f32, rows padded to KM_XS floats); centroid tiles of KM_BN x KM_BK stream through. Thread (ty,
// tx) of a 16 x 16 grid owns rows 4 ty .. 4 ty + 3 and centroids 4 tx .. 4 tx + 3 of each tile,
// keeps a running argmax per row over its centroids (ascending j, strict >, as the CPU), and the
// 16 threads of a row group merge theirs with shuffles at the end.
template <bool F16>
static __global__ void __launch_bounds__(KM_THREADS) km_assign_kernel(cuda_kmeans_args a, km_scratch s,
                                                                      bool only_active) {
    int p = blockIdx.y;
    if (only_active && !s.active[p]) return;
    extern __shared__ __align__(16) float km_smem[];
    float * xs = km_smem;                          // [d][KM_XS]
    float * cs = km_smem + (int64_t) a.d * KM_XS;  // [KM_BK][KM_BN]
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16, d = a.d;
    const int64_t row0 = (int64_t) blockIdx.x * KM_BM;
    const int k_pad = ceil_div(a.k, KM_BN) * KM_BN;
    for (int i = tid; i < KM_BM * d; i += KM_THREADS) {
        int r = i / d, t = i % d;
        int64_t row = row0 + r;
        xs[t * KM_XS + r] = row < a.n ? load_elt(a.x, F16, p * a.x_stride + row * d + t) : 0.0f;
    }
    float best[4];
    int   bj[4];
    for (int r = 0; r < 4; r++) {
        best[r] = -INFINITY;
        bj[r]   = 0;
    }
    const float * cn = s.cn + (int64_t) p * d * k_pad;
    for (int j0 = 0; j0 < a.k; j0 += KM_BN) {
        float acc[4][4] = {};
        for (int t0 = 0; t0 < d; t0 += KM_BK) {
            __syncthreads();   // cs (and, first time, xs) ready / free
            for (int i = tid; i < KM_BK * KM_BN; i += KM_THREADS) {
                int tt = i / KM_BN, jj = i % KM_BN;
                cs[tt * KM_BN + jj] = cn[(int64_t) (t0 + tt) * k_pad + j0 + jj];
            }
            __syncthreads();
#pragma unroll 8
            for (int tt = 0; tt < KM_BK; tt++) {
                float4 xv = *(const float4 *) &xs[(t0 + tt) * KM_XS + 4 * ty];
                float4 cv = *(const float4 *) &cs[tt * KM_BN + 4 * tx];
                float xr[4] = {xv.x, xv.y, xv.z, xv.w}, cr[4] = {cv.x, cv.y, cv.z, cv.w};
#pragma unroll
                for (int r = 0; r < 4; r++)
#pragma unroll
                    for (int c = 0; c < 4; c++) acc[r][c] = fmaf(xr[r], cr[c], acc[r][c]);
            }
        }
#pragma unroll
        for (int c = 0; c < 4; c++) {
            int j = j0 + 4 * tx + c;
            if (j < a.k) {
#pragma unroll
                for (int r = 0; r < 4; r++) {
                    if (acc[r][c] > best[r]) {
                        best[r] = acc[r][c];
                        bj[r]   = j;
                    }
                }
            }
        }
    }
    int changed = 0;
#pragma unroll
    for (int r = 0; r < 4; r++) {
        for (int o = 8; o > 0; o >>= 1) {   // the 16 lanes of this row group
            float ob = __shfl_xor_sync(0xffffffffu, best[r], o);
            int   oj = __shfl_xor_sync(0xffffffffu, bj[r], o);
            argmax_merge(best[r], bj[r], ob, oj);
        }
        int64_t row = row0 + 4 * ty + r;
        if (tx == 0 && row < a.n) {
            int32_t * lab = a.labels + (int64_t) p * a.n + row;
            changed += *lab != bj[r];
            *lab = bj[r];
        }
    }
    changed = __reduce_add_sync(0xffffffffu, changed);
    if ((tid % CKV_WARP) == 0 && changed) atomicAdd(&s.changed[p], changed);
}

// Fused assignment on the tensor cores (f16 keys): block = KT_BM rows of problem blockIdx.y,
// f16 in shared memory as they are in the cache (no normalisation needed: a row's norm scales
// all its scores alike); centroid tiles of KM_BN rows stream through, hi and lo parts. Warp
// (wm, wn) of 4 x 2 computes rows 32 wm .. + 31 against centroids 32 wn .. + 31 of each tile
// with mma m16n8k16 (score = hi + lo / KM_LO_SCALE, f32), keeps a running argmax per row over
// its columns in ascending j (strict >), and the lanes of a quad, then the two column warps,
// merge (equal scores: the lower index, as the CPU). Rows padded by 16 bytes keep the fragment
// loads on distinct banks.
enum { KT_BM = 128, KT_THREADS = 256, KT_PAD = 8 };

__device__ __forceinline__ uint32_t ld_h2(const __half * p) { return *(const uint32_t *) p; }

static size_t km_assign_tc_smem(int d) { return sizeof(__half) * (size_t) (KT_BM + 2 * KM_BN) * (d + KT_PAD); }

static __global__ void __launch_bounds__(KT_THREADS) km_assign_tc_kernel(cuda_kmeans_args a, km_scratch s,
                                                                         bool only_active) {
    const int p = blockIdx.y;
    if (only_active && !s.active[p]) return;
    extern __shared__ __align__(16) unsigned char kt_smem[];
    __shared__ float best_s[2][KT_BM];
    __shared__ int   bj_s[2][KT_BM];
    const int d = a.d, ld = d + KT_PAD, vec = d / 8;   // halves per shared row, 16-byte chunks per row
    __half * xs = (__half *) kt_smem;   // [KT_BM][ld]
    __half * ch = xs + KT_BM * ld;      // [KM_BN][ld] centroid tile, hi
    __half * cl = ch + KM_BN * ld;      // [KM_BN][ld] lo
    const int tid = threadIdx.x, lane = tid % CKV_WARP, warp = tid / CKV_WARP;
    const int wm = warp % 4, wn = warp / 4, g = lane / 4, t4 = lane % 4;
    const int64_t row0 = (int64_t) blockIdx.x * KT_BM;
    const int k_pad = ceil_div(a.k, KM_BN) * KM_BN;
    const __half * x = (const __half *) a.x + p * a.x_stride;
    for (int i = tid; i < KT_BM * vec; i += KT_THREADS) {
        const int r = i / vec, c = i % vec;
        const int64_t row = row0 + r;
        *(uint4 *) &xs[r * ld + 8 * c] = row < a.n ? ((const uint4 *) (x + row * d))[c] : make_uint4(0, 0, 0, 0);
    }
    const __half * c_hi = (const __half *) (s.cn + (int64_t) p * d * k_pad), * c_lo = c_hi + (int64_t) k_pad * d;
    float best[2][2];   // [m tile][row g | g + 8]
    int   bj[2][2];
    for (int m = 0; m < 4; m++) {
        best[m / 2][m % 2] = -INFINITY;
        bj[m / 2][m % 2]   = 0;
    }
    for (int j0 = 0; j0 < a.k; j0 += KM_BN) {
        __syncthreads();   // the previous tile is consumed (first time: xs is written)
        for (int i = tid; i < KM_BN * vec; i += KT_THREADS) {
            const int r = i / vec, c = i % vec;
            *(uint4 *) &ch[r * ld + 8 * c] = ((const uint4 *) (c_hi + (int64_t) (j0 + r) * d))[c];
            *(uint4 *) &cl[r * ld + 8 * c] = ((const uint4 *) (c_lo + (int64_t) (j0 + r) * d))[c];
        }
        __syncthreads();
        float hi[2][4][4] = {}, lo[2][4][4] = {};   // [m tile][n tile][C regs]
        for (int k0 = 0; k0 < d; k0 += 16) {
            uint32_t af[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                const __half * r = xs + (32 * wm + 16 * mt + g) * ld + k0 + 2 * t4;
                af[mt][0] = ld_h2(r);
                af[mt][1] = ld_h2(r + 8 * ld);
                af[mt][2] = ld_h2(r + 8);
                af[mt][3] = ld_h2(r + 8 * ld + 8);
            }
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                const int off = (32 * wn + 8 * nt + g) * ld + k0 + 2 * t4;
                const uint32_t h0 = ld_h2(ch + off), h1 = ld_h2(ch + off + 8);
                const uint32_t l0 = ld_h2(cl + off), l1 = ld_h2(cl + off + 8);
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    mma_16816(hi[mt][nt], af[mt], h0, h1);
                    mma_16816(lo[mt][nt], af[mt], l0, l1);
                }
            }
        }
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
            for (int nt = 0; nt < 4; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {   // C reg e: row g + 8 (e / 2), column 2 t4 + e % 2
                    const int   j  = j0 + 32 * wn + 8 * nt + 2 * t4 + e % 2;
                    const float sc = hi[mt][nt][e] + lo[mt][nt][e] * (1.0f / KM_LO_SCALE);
                    if (j < a.k && sc > best[mt][e / 2]) {
                        best[mt][e / 2] = sc;
                        bj[mt][e / 2]   = j;
                    }
                }
    }
#pragma unroll
    for (int m = 0; m < 4; m++) {
        float & b = best[m / 2][m % 2];
        int &   j = bj[m / 2][m % 2];
        for (int o = 1; o < 4; o <<= 1) {   // the quad's columns
            float ob = __shfl_xor_sync(0xffffffffu, b, o);
            int   oj = __shfl_xor_sync(0xffffffffu, j, o);
            argmax_merge(b, j, ob, oj);
        }
        if (t4 == 0) {
            const int r = 32 * wm + 16 * (m / 2) + g + 8 * (m % 2);
            best_s[wn][r] = b;
            bj_s[wn][r]   = j;
        }
    }
    __syncthreads();
    if (tid < KT_BM) {   // warps 0-3, whole
        float b = best_s[0][tid];
        int   j = bj_s[0][tid];
        argmax_merge(b, j, best_s[1][tid], bj_s[1][tid]);
        const int64_t row = row0 + tid;
        int changed = 0;
        if (row < a.n) {
            int32_t * lab = a.labels + (int64_t) p * a.n + row;
            changed = *lab != j;
            *lab = j;
        }
        changed = __reduce_add_sync(0xffffffffu, changed);
        if (lane == 0 && changed) atomicAdd(&s.changed[p], changed);
    }
}

// Counting sort, pass 1: the histogram of labels over each chunk of KM_CHUNK rows.
static __global__ void km_chunk_hist_kernel(cuda_kmeans_args a, km_scratch s, bool only_active) {
    int p = blockIdx.y, ch = blockIdx.x, n_chunks = gridDim.x;
    if (only_active && !s.active[p]) return;
    extern __shared__ int32_t hist[];   // [k]
    for (int c = threadIdx.x; c < a.k; c += blockDim.x) hist[c] = 0;
    __syncthreads();
    int64_t r0 = (int64_t) ch * KM_CHUNK, r1 = min((int64_t) a.n, r0 + KM_CHUNK);
    for (int64_t r = r0 + threadIdx.x; r < r1; r += blockDim.x) atomicAdd(&hist[a.labels[(int64_t) p * a.n + r]], 1);
    __syncthreads();
    int32_t * out = s.chunk_base + ((int64_t) p * n_chunks + ch) * a.k;
    for (int c = threadIdx.x; c < a.k; c += blockDim.x) out[c] = hist[c];
}

// Exclusive scan of v over the block (blockDim a multiple of 32): returns this thread's
// prefix and sets *total to the sum of all v.
__device__ int32_t block_exclusive_scan(int32_t v, int32_t * total) {
    __shared__ int32_t warp_pre[CKV_WARP + 1];
    int lane = threadIdx.x % CKV_WARP, warp = threadIdx.x / CKV_WARP, n_warps = blockDim.x / CKV_WARP;
    int32_t incl = v;
    for (int o = 1; o < CKV_WARP; o <<= 1) {
        int32_t y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
    }
    if (lane == CKV_WARP - 1) warp_pre[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        int32_t w = lane < n_warps ? warp_pre[lane] : 0, wi = w;
        for (int o = 1; o < CKV_WARP; o <<= 1) {
            int32_t y = __shfl_up_sync(0xffffffffu, wi, o);
            if (lane >= o) wi += y;
        }
        warp_pre[lane] = wi - w;
        if (lane == CKV_WARP - 1) warp_pre[CKV_WARP] = wi;
    }
    __syncthreads();
    int32_t prefix = warp_pre[warp] + incl - v;
    *total = warp_pre[CKV_WARP];
    __syncthreads();   // warp_pre is free for the next call
    return prefix;
}

// Counting sort, pass 2 (one block per problem): sizes, cluster offsets (exclusive scan of the
// sizes) and each chunk's write cursor per cluster (offset + the counts of earlier chunks).
static __global__ void __launch_bounds__(KM_SCAN_THREADS) km_scan_kernel(cuda_kmeans_args a, km_scratch s,
                                                                         int n_chunks, bool only_active) {
    int p = blockIdx.x;
    if (only_active && !s.active[p]) return;
    int32_t * base  = s.chunk_base + (int64_t) p * n_chunks * a.k;
    int32_t * sizes = s.sizes + (int64_t) p * a.k, * offs = s.offsets + (int64_t) p * a.k;
    // Thread t owns clusters [c0, c1): a contiguous range, so one block scan orders them all.
    int per = ceil_div(a.k, blockDim.x), c0 = min(a.k, (int) threadIdx.x * per), c1 = min(a.k, c0 + per);
    int32_t mine = 0;
    for (int c = c0; c < c1; c++) {
        int32_t run = 0;
        for (int ch = 0; ch < n_chunks; ch++) {
            int32_t v = base[(int64_t) ch * a.k + c];
            base[(int64_t) ch * a.k + c] = run;
            run += v;
        }
        sizes[c] = run;
        mine += run;
    }
    int32_t total, pre = block_exclusive_scan(mine, &total);
    for (int c = c0; c < c1; c++) {
        offs[c] = pre;
        for (int ch = 0; ch < n_chunks; ch++) base[(int64_t) ch * a.k + c] += pre;
        pre += sizes[c];
    }
}

// Counting sort, pass 3: one warp per chunk walks its rows in order, 32 at a time; lanes with
// the same label (__match_any_sync) take consecutive slots in lane order, so the sort is stable.
static __global__ void km_scatter_kernel(cuda_kmeans_args a, km_scratch s, int n_chunks, bool only_active) {
    int p = blockIdx.y, ch = blockIdx.x * (blockDim.x / CKV_WARP) + threadIdx.x / CKV_WARP;
    int lane = threadIdx.x % CKV_WARP;
    if ((only_active && !s.active[p]) || ch >= n_chunks) return;
    int32_t * cursor = s.chunk_base + ((int64_t) p * n_chunks + ch) * a.k;
    int32_t * order  = s.order + (int64_t) p * a.n;
    const int32_t * labels = a.labels + (int64_t) p * a.n;
    int64_t r0 = (int64_t) ch * KM_CHUNK, r1 = min((int64_t) a.n, r0 + KM_CHUNK);
    for (int64_t g = r0; g < r1; g += CKV_WARP) {
        int64_t  r     = g + lane;
        bool     valid = r < r1;
        int      lab   = valid ? labels[r] : -1 - lane;   // distinct dummies past the end
        unsigned peers = __match_any_sync(0xffffffffu, lab);
        int      rank  = __popc(peers & ((1u << lane) - 1));
        int32_t  at    = valid ? cursor[lab] : 0;
        __syncwarp();
        if (valid) {
            order[at + rank] = (int32_t) r;
            if (lane == 31 - __clz(peers)) cursor[lab] = at + __popc(peers);   // highest peer
        }
        __syncwarp();
    }
}

// Update: one warp per cluster sums its member rows in ascending row order in f64 (lane l holds
// dims l, l + 32, ..., ND of them), then c = (float) (sum / size); an empty cluster keeps its
// centroid. The rows are scattered, so the warp keeps many in flight: the next 32 members' row
// indices come in one coalesced load (shuffled out), then R rows' loads at a time (~32 values a
// lane) before their adds, which stay in row order.
template <int ND, bool F16>
static __global__ void km_update_kernel(cuda_kmeans_args a, km_scratch s) {
    constexpr int R = 32 / ND > 16 ? 16 : (32 / ND < 4 ? 4 : 32 / ND);
    int p = blockIdx.y, j = blockIdx.x * (blockDim.x / CKV_WARP) + threadIdx.x / CKV_WARP;
    int lane = threadIdx.x % CKV_WARP;
    if (!s.active[p] || j >= a.k) return;
    int32_t size = s.sizes[(int64_t) p * a.k + j];
    if (size == 0) return;
    const int32_t * mem = s.order + (int64_t) p * a.n + s.offsets[(int64_t) p * a.k + j];
    double acc[ND] = {};
    const int64_t xb = p * a.x_stride;
    for (int32_t m0 = 0; m0 < size; m0 += CKV_WARP) {
        const int     cnt  = min(CKV_WARP, size - m0);
        const int32_t mine = lane < cnt ? mem[m0 + lane] : 0;
        for (int u0 = 0; u0 < cnt; u0 += R) {
            float v[R][ND];
#pragma unroll
            for (int u = 0; u < R; u++) {
                const int64_t row = __shfl_sync(0xffffffffu, mine, (u0 + u) % CKV_WARP);
#pragma unroll
                for (int i = 0; i < ND; i++)
                    v[u][i] = u0 + u < cnt ? load_elt(a.x, F16, xb + row * a.d + lane + 32 * i) : 0.0f;
            }
#pragma unroll
            for (int u = 0; u < R; u++)
                if (u0 + u < cnt)
#pragma unroll
                    for (int i = 0; i < ND; i++) acc[i] += (double) v[u][i];
        }
    }
    float * c = a.centroids + p * a.cent_stride + (int64_t) j * a.d;
#pragma unroll
    for (int i = 0; i < ND; i++) c[lane + 32 * i] = (float) (acc[i] / size);
}

// km_update_kernel for d = 32 nd (nd in 1..8, as ckv_cuda_kmeans checks).
template <bool F16> static void (*km_update_for(int nd))(cuda_kmeans_args, km_scratch) {
    switch (nd) {
        case 1: return km_update_kernel<1, F16>;
        case 2: return km_update_kernel<2, F16>;
        case 3: return km_update_kernel<3, F16>;
        case 4: return km_update_kernel<4, F16>;
        case 5: return km_update_kernel<5, F16>;
        case 6: return km_update_kernel<6, F16>;
        case 7: return km_update_kernel<7, F16>;
        default: return km_update_kernel<8, F16>;
    }
}

// After iteration `it`'s assignment (it < 0: the initial one, whose changes do not count):
// a problem whose labels did not change stops; the counter is reset for the next assignment.
static __global__ void km_step_kernel(km_scratch s, int P, int it) {
    int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= P) return;
    if (it >= 0 && s.active[p]) {
        s.iters[p] = it + 1;
        if (s.changed[p] == 0) s.active[p] = 0;
    }
    s.changed[p] = 0;
}

// The final sort's CSR into the caller's arrays (offsets + pos_base, positions + start).
static __global__ void km_finish_kernel(cuda_kmeans_args a, km_scratch s) {
    int p = blockIdx.y;
    for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < a.n; i += (int64_t) gridDim.x * blockDim.x)
        a.positions[p * a.pos_stride + i] = a.start + s.order[(int64_t) p * a.n + i];
    for (int64_t c = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; c < a.k; c += (int64_t) gridDim.x * blockDim.x) {
        a.sizes[p * a.csr_stride + c]   = s.sizes[(int64_t) p * a.k + c];
        a.offsets[p * a.csr_stride + c] = a.pos_base + s.offsets[(int64_t) p * a.k + c];
    }
    if (blockIdx.x == 0 && threadIdx.x == 0 && a.n_iter) a.n_iter[p] = s.iters[p];
}

int32_t ckv_cuda_kmeans(const struct cuda_kmeans_args * ap, cudaStream_t st) {
    const cuda_kmeans_args & a = *ap;
    if (a.n_problems < 1 || a.n < 1 || a.d < 32 || a.d > 256 || a.d % 32 != 0 || a.k < 1 ||
        a.k > a.n || a.max_iter < 1 || !a.x || !a.init_rows || !a.centroids || !a.sizes ||
        !a.offsets || !a.positions || !a.labels || !a.scratch) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "cuda kmeans: bad arguments (P %d, n %d, d %d, k %d, "
                        "max_iter %d; d must be a multiple of 32 in [32, 256], 1 <= k <= n)",
                        a.n_problems, a.n, a.d, a.k, a.max_iter);
    }
    size_t hist_smem = (size_t) a.k * sizeof(int32_t);
    size_t asg_smem  = ((size_t) a.d * KM_XS + KM_BK * KM_BN) * sizeof(float);
    if (hist_smem > 200 * 1024) {
        return ckv_fail(CKV_ERR_UNSUPPORTED, "cuda kmeans: k = %d clusters per span (at most %d)",
                        a.k, 200 * 1024 / 4);
    }
    km_scratch s;
    km_layout(a.n_problems, a.n, a.k, a.d, (char *) a.scratch, &s);
    CKV_CUDA_CHECK(cudaFuncSetAttribute(km_chunk_hist_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) hist_smem));
    auto update = a.x_f16 ? km_update_for<true>(a.d / 32) : km_update_for<false>(a.d / 32);
    // f16 keys whose rows start on 16 bytes (the cache's) take the tensor-core assignment
    const bool tc = a.x_f16 && (uintptr_t) a.x % 16 == 0 && a.x_stride % 8 == 0;
    auto simt = a.x_f16 ? km_assign_kernel<true> : km_assign_kernel<false>;
    const size_t tc_smem = km_assign_tc_smem(a.d);
    CKV_CUDA_CHECK(cudaFuncSetAttribute(simt, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) asg_smem));
    CKV_CUDA_CHECK(cudaFuncSetAttribute(km_assign_tc_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int) tc_smem));
    int  k_pad = ceil_div(a.k, KM_BN) * KM_BN, P = a.n_problems;
    dim3 g_norm(ceil_div(k_pad, 128), P), g_upd(ceil_div(a.k, 8), P);
    auto assign = [&](bool only_active) {
        if (tc) km_assign_tc_kernel<<<dim3(ceil_div(a.n, KT_BM), P), KT_THREADS, tc_smem, st>>>(a, s, only_active);
        else simt<<<dim3(ceil_div(a.n, KM_BM), P), KM_THREADS, asg_smem, st>>>(a, s, only_active);
    };
    int  n_chunks = ceil_div(a.n, KM_CHUNK);
    int64_t init_items = (int64_t) a.k * a.d > a.n ? (int64_t) a.k * a.d : a.n;
    km_init_kernel<<<dim3(min(ceil_div(init_items, 256), 1024), P), 256, 0, st>>>(a, s);
    km_normalise_kernel<<<g_norm, 128, 0, st>>>(a, s, false, tc);
    assign(false);
    km_step_kernel<<<ceil_div(P, 128), 128, 0, st>>>(s, P, -1);
    for (int it = 0; it < a.max_iter; it++) {
        km_chunk_hist_kernel<<<dim3(n_chunks, P), 256, hist_smem, st>>>(a, s, true);
        km_scan_kernel<<<P, KM_SCAN_THREADS, 0, st>>>(a, s, n_chunks, true);
        km_scatter_kernel<<<dim3(ceil_div(n_chunks, 4), P), 4 * CKV_WARP, 0, st>>>(a, s, n_chunks, true);
        update<<<g_upd, 8 * CKV_WARP, 0, st>>>(a, s);
        km_normalise_kernel<<<g_norm, 128, 0, st>>>(a, s, true, tc);
        assign(true);
        km_step_kernel<<<ceil_div(P, 128), 128, 0, st>>>(s, P, it);
    }
    km_chunk_hist_kernel<<<dim3(n_chunks, P), 256, hist_smem, st>>>(a, s, false);
    km_scan_kernel<<<P, KM_SCAN_THREADS, 0, st>>>(a, s, n_chunks, false);
    km_scatter_kernel<<<dim3(ceil_div(n_chunks, 4), P), 4 * CKV_WARP, 0, st>>>(a, s, n_chunks, false);
    km_finish_kernel<<<dim3(ceil_div(a.n, 256), P), 256, 0, st>>>(a, s);
    CKV_CUDA_CHECK(cudaGetLastError());
    return CKV_OK;
}

// =============================================================================================
// Selection
// =============================================================================================
//
// Clusters: score_kernel computes every list's rank keys (many blocks, each centroid row read
// once for all the lists of its KV head; few clusters select_kernel scores itself), then
// select_kernel, one block per list (a query head, or a KV head with per_kv_head), ranks
// them. Pages (quest) score inside select_kernel, whose
// bound must follow the CPU's lane order. The clusters cluster_select would take are
// exactly those whose rank key is >= T, where T is the largest key whose clusters of key >= T
// hold at least `room` positions (the walk stops right after taking T): T is found by a radix
// select over the 64-bit keys, 8 bits at a time, with histograms weighted by cluster size. The
// members of every taken cluster (the first `room - taken before T` of T's) are marked in a
// bitmap over the clustered span, and each is written at its rank in the bitmap: ascending
// order, the CPU's list.

enum { SEL_THREADS = 512 };

// The CPU's rank_key (kmeans.c): monotone score bits above the inverted index, so a higher key
// is a higher score and, among equal scores, a lower index; NaN ranks as -inf, -0 as +0.
__device__ __forceinline__ uint64_t sel_rank_key(float score, int32_t c) {
    float s = isnan(score) ? -INFINITY : (score == 0.0f ? 0.0f : score);
    uint32_t u = __float_as_uint(s);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((uint64_t) u << 32) | (uint32_t) (UINT32_MAX - (uint32_t) c);
}

struct sel_plan {   // what the radix select decided for one list
    uint64_t threshold;   // clusters with key >= threshold are taken
    int32_t  cut;         // positions taken from the threshold cluster (all of them if >= size)
};

// Largest key T with (sum of sizes of keys >= T) >= room, by MSB-first radix select; with
// room > total every cluster is taken. Called by the whole block. Each pass histograms the next
// 8 bits of the keys under the prefix fixed so far (weighted by size, and counted); warp 0 finds
// the digit where the weight from the top reaches `need` with a suffix scan over its lanes (8
// digits each). Once that digit holds a single cluster, its key is T and the passes stop: with
// distinct scores this happens after two or three of the eight.
__device__ sel_plan sel_threshold(const uint64_t * keys, const int32_t * sizes, int32_t n, int32_t room,
                                  int32_t total) {
    __shared__ int32_t hist[256], count[256];
    __shared__ uint64_t prefix_s;
    __shared__ int32_t  need_s, unique_s;
    if (room > total) return {0, INT32_MAX};
    uint64_t prefix = 0;
    int32_t  need   = room;
    for (int shift = 56; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = count[i] = 0;
        __syncthreads();
        const uint64_t hi_mask = shift == 56 ? 0 : ~0ull << (shift + 8);
        for (int c = threadIdx.x; c < n; c += blockDim.x) {
            uint64_t key = keys[c];
            if ((key & hi_mask) == prefix && sizes[c] > 0) {
                atomicAdd(&hist[(key >> shift) & 255], sizes[c]);
                atomicAdd(&count[(key >> shift) & 255], 1);
            }
        }
        __syncthreads();
        if (threadIdx.x < CKV_WARP) {   // highest digit whose cumulative weight from the top reaches need
            const int lane = threadIdx.x;
            int32_t h[8], mine = 0;
#pragma unroll
            for (int j = 0; j < 8; j++) mine += h[j] = hist[lane * 8 + j];
            int32_t above_incl = mine;   // weight of this lane's digits and every higher lane's
#pragma unroll
            for (int o = 1; o < CKV_WARP; o <<= 1) {
                int32_t v = __shfl_down_sync(0xffffffffu, above_incl, o);
                if (lane + o < CKV_WARP) above_incl += v;
            }
            // The weight under the prefix is >= need, so lane 0 always qualifies.
            unsigned reach = __ballot_sync(0xffffffffu, above_incl >= need);
            if (lane == 31 - __clz(reach)) {
                int32_t acc = above_incl - mine, digit = lane * 8;
                for (int j = 7; j >= 0; j--) {
                    if (acc + h[j] >= need) {
                        digit = lane * 8 + j;
                        break;
                    }
                    acc += h[j];
                }
                prefix_s = prefix | ((uint64_t) digit << shift);
                need_s   = need - acc;
                unique_s = count[digit] == 1;
            }
        }
        __syncthreads();
        prefix = prefix_s;
        need   = need_s;
        if (unique_s) {   // the one cluster under the new prefix: its whole key is T
            __syncthreads();   // every thread has read prefix_s before it is overwritten
            const uint64_t mask = ~0ull << shift;
            for (int c = threadIdx.x; c < n; c += blockDim.x) {
                if ((keys[c] & mask) == prefix && sizes[c] > 0) prefix_s = keys[c];
            }
            __syncthreads();
            prefix = prefix_s;
            break;
        }
        __syncthreads();
    }
    return {prefix, need};
}

// Dim t of the query list `list` ranks with: its query head's, or with per_kv_head (list = KV
// head) the group's queries summed in head order (the CPU's q_sum).
__device__ __forceinline__ float sel_list_query(const cuda_select_args & a, int list, int t) {
    if (!a.per_kv_head) return a.q[(int64_t) list * a.d + t];
    const int group = a.n_head / a.n_head_kv;
    float     v     = 0.0f;
    for (int h = 0; h < group; h++) v += a.q[(int64_t) (list * group + h) * a.d + t];
    return v;
}

// Cluster scores q . centroid: block (KV head g, SC_ROWS consecutive clusters), SC_ROWS_PER_WARP
// rows per warp with lanes over the dims, every row's loads issued before any product, so a
// block waits for memory once. (One block per list walking all rows a few at a time queued one
// memory latency per few rows: most of a step's selection time.) Each row serves every list of
// its KV head: the group's query heads, or with per_kv_head their sum in head order (the CPU's
// q_sum), kept in shared memory [lists][d]. PER = dims per lane, ceil(d / 32).
enum { SC_WARPS = 4, SC_ROWS_PER_WARP = 4, SC_ROWS = SC_WARPS * SC_ROWS_PER_WARP, SC_MAX_SMEM = 48 * 1024 };

template <int PER>
static __global__ void __launch_bounds__(SC_WARPS * CKV_WARP) score_kernel(cuda_select_args a) {
    pdl_begin();
    extern __shared__ float sc_q[];   // [lists of g][d]
    const int d = a.d, n = a.n_clusters, group = a.n_head / a.n_head_kv, g = blockIdx.x;
    const int n_lists = a.per_kv_head ? 1 : group, list0 = a.per_kv_head ? g : g * group;
    for (int i = threadIdx.x; i < n_lists * d; i += blockDim.x) sc_q[i] = sel_list_query(a, list0 + i / d, i % d);
    const int lane = threadIdx.x % CKV_WARP, c0 = blockIdx.y * SC_ROWS + threadIdx.x / CKV_WARP * SC_ROWS_PER_WARP;
    const float * cent = a.centroids + g * a.cent_stride;
    float row[SC_ROWS_PER_WARP][PER];
#pragma unroll
    for (int r = 0; r < SC_ROWS_PER_WARP; r++) {   // rows past n read the last row, not written
        const float * src = cent + (int64_t) min(c0 + r, n - 1) * d;
#pragma unroll
        for (int i = 0; i < PER; i++) row[r][i] = lane + CKV_WARP * i < d ? src[lane + CKV_WARP * i] : 0.0f;
    }
    __syncthreads();
    for (int l = 0; l < n_lists; l++) {
        const float * qv = sc_q + l * d;
        float qr[PER];
#pragma unroll
        for (int i = 0; i < PER; i++) qr[i] = lane + CKV_WARP * i < d ? qv[lane + CKV_WARP * i] : 0.0f;
#pragma unroll
        for (int r = 0; r < SC_ROWS_PER_WARP; r++) {
            float s = 0.0f;
#pragma unroll
            for (int i = 0; i < PER; i++) s = fmaf(qr[i], row[r][i], s);
            s = warp_sum(s);
            const int c = c0 + r;
            if (lane == 0 && c < n) {
                const int64_t at = (int64_t) (list0 + l) * n + c;
                a.keys[at] = sel_rank_key(s, c);
                if (a.scores) a.scores[at] = s;
            }
        }
    }
}

// The rank keys of a list with few clusters, inside select_kernel (a launch of score_kernel
// costs more than the work: SmolLM2 at 8000 has ~110 clusters of 64 dims): warp w scores rows
// w, w + n_warps, ..., 32 / PER of them (PER dims per lane) with their loads in flight together,
// each product as score_kernel forms it (the same lane-strided fmaf chain, then warp_sum), so
// the keys are the same. qs holds the list's query (or its KV head's summed queries).
// Scored here only when every warp has at most one round of rows: n_clusters x PER <=
// SEL_THREADS (SmolLM2: ~110 x 2); more rounds lose to score_kernel's wide grid (8B at 32k,
// ~410 x 4: -2% per query head, more with 8 per-KV-head lists).
enum { SEL_SCORE_HERE_MAX = SEL_THREADS };
template <int PER>
__device__ void sel_score_here(const cuda_select_args & a, const float * qs, int g, int list, int n,
                               uint64_t * keys) {
    constexpr int ROUND = 32 / PER;
    const int lane = threadIdx.x % CKV_WARP, warp = threadIdx.x / CKV_WARP, n_warps = blockDim.x / CKV_WARP;
    const int d = a.d;
    const float * cent = a.centroids + g * a.cent_stride;
    float qr[PER];
#pragma unroll
    for (int i = 0; i < PER; i++) qr[i] = lane + CKV_WARP * i < d ? qs[lane + CKV_WARP * i] : 0.0f;
    for (int c0 = warp; c0 < n; c0 += ROUND * n_warps) {
        float row[ROUND][PER];
#pragma unroll
        for (int r = 0; r < ROUND; r++) {
            const int c = c0 + r * n_warps;
            const float * src = cent + (int64_t) (c < n ? c : 0) * d;
#pragma unroll
            for (int i = 0; i < PER; i++) {
                row[r][i] = c < n && lane + CKV_WARP * i < d ? src[lane + CKV_WARP * i] : 0.0f;
            }
        }
#pragma unroll
        for (int r = 0; r < ROUND; r++) {
            const int c = c0 + r * n_warps;
            float sum = 0.0f;
#pragma unroll
            for (int i = 0; i < PER; i++) sum = fmaf(qr[i], row[r][i], sum);
            sum = warp_sum(sum);
            if (lane == 0 && c < n) {
                keys[c] = sel_rank_key(sum, c);
                if (a.scores) a.scores[(int64_t) list * n + c] = sum;
            }
        }
    }
}

// One list's layout at run time: the clusters' from the arguments; the pages' and the window's
// from the position (kept in device memory by decode graphs).
struct sel_layout {
    int32_t n_cached, sinks, end, tail;
    int32_t n;            // clusters (or pages) to rank
    int32_t room;         // positions to take from them
    int32_t first_page;   // pages: the page of ranked index 0
};

__device__ sel_layout sel_layout_of(const cuda_select_args & a) {
    sel_layout l;
    l.n_cached   = (a.pos_dev ? *a.pos_dev : a.pos) + 1;
    l.sinks      = min(l.n_cached, a.n_sink);
    l.first_page = 0;
    if (a.mode == CKV_SELECT_CLUSTERS) {
        l.end  = a.end;
        l.n    = a.n_clusters;
        l.room = a.room;
    } else if (a.mode == CKV_SELECT_WINDOW) {
        l.end  = max(l.n_cached - (a.budget - l.sinks), l.sinks);
        l.n    = 0;
        l.room = 0;
    } else {
        const int32_t cur = (l.n_cached - 1) / a.page_size;
        l.end        = max(cur * a.page_size, l.sinks);
        l.first_page = l.sinks / a.page_size;
        l.n          = max(cur - l.first_page, 0);
        l.room       = a.budget - l.sinks - (l.n_cached - l.end);
    }
    l.tail = l.n_cached > l.end ? l.n_cached - l.end : 0;
    return l;
}

// Quest's page bound by one group of 8 lanes: lane `sub` sums dims sub, sub + 8, ... and the
// 8 partial sums are added in lane order, page_bound_scalar's order, without contraction.
__device__ __forceinline__ float sel_page_bound(const float * qs, const __half * mn, const __half * mx, int d,
                                                int sub) {
    float s = 0.0f;
    for (int t = sub; t < d; t += 8) {
        const float x = __fmul_rn(qs[t], __half2float(mn[t])), y = __fmul_rn(qs[t], __half2float(mx[t]));
        s = __fadd_rn(s, x > y ? x : y);
    }
    const int first_lane = (threadIdx.x % CKV_WARP) & ~7;
    float sum = 0.0f;
#pragma unroll
    for (int l = 0; l < 8; l++) sum = __fadd_rn(sum, __shfl_sync(0xffffffffu, s, first_lane + l));
    return sum;
}

// n_cap, words_cap: the key and bitmap slots shared memory was sized for.
// score_here: the cluster scores are computed here (sel_score_here), not read from a.keys.
static __global__ void __launch_bounds__(SEL_THREADS) select_kernel(cuda_select_args a, int32_t n_cap,
                                                                    int32_t words_cap, bool score_here) {
    pdl_begin();
    extern __shared__ __align__(16) unsigned char sel_smem[];
    const int d = a.d, group = a.n_head / a.n_head_kv, list = blockIdx.x;
    const int g = a.per_kv_head ? list : list / group;
    const int h_first = a.per_kv_head ? g * group : list, n_out = a.per_kv_head ? group : 1;
    const int lane = threadIdx.x % CKV_WARP, warp = threadIdx.x / CKV_WARP;
    const bool pages = a.mode == CKV_SELECT_PAGES;
    const sel_layout lay = sel_layout_of(a);
    const int n = lay.n, sinks = lay.sinks;
    // positions that may be marked: the window mode marks none
    const int32_t clustered = a.mode == CKV_SELECT_WINDOW ? 0 : lay.end - sinks;
    const int32_t n_words = ceil_div(clustered > 0 ? clustered : 0, 32);
    // Shared memory (ckv_cuda_select_smem_bytes): words_cap counts 32-bit bitmap words.
    float *    qs      = (float *) sel_smem;                       // [d]
    uint64_t * keys    = (uint64_t *) (sel_smem + 4 * 256);        // [n_cap]
    uint32_t * marked  = (uint32_t *) (keys + n_cap);              // [words_cap], bit j: position sinks + j
    int32_t *  w_base  = (int32_t *) (marked + words_cap);         // [words_cap] marked bits before word w
    int32_t *  sizes   = w_base + words_cap;                       // [n_cap] sizes
    int32_t *  poffs   = sizes + n_cap;                            // [n_cap] clusters: CSR offsets
    int32_t *  t_clust = poffs + n_cap;                            // [n_cap] taken clusters (any order)
    int32_t *  t_end   = t_clust + n_cap;                          // [n_cap] their members' running count
    __shared__ int32_t total_s, n_taken_s;

    // The list's query, for pages (quest ranks per query head: per_kv_head is refused for it)
    // or for clusters scored here.
    for (int t = threadIdx.x; (pages || score_here) && t < d; t += blockDim.x) qs[t] = sel_list_query(a, list, t);
    if (threadIdx.x == 0) total_s = n_taken_s = 0;
    for (int w = threadIdx.x; w < n_words; w += blockDim.x) marked[w] = 0;
    __syncthreads();

    const int32_t * mem   = a.positions + g * a.pos_stride;
    const __half *  pmin  = pages ? a.page_min + g * a.page_stride + (int64_t) lay.first_page * d : NULL;
    const __half *  pmax  = pages ? a.page_max + g * a.page_stride + (int64_t) lay.first_page * d : NULL;
    int32_t my_total = 0;
    if (pages) {
        // Page bounds: 8 lanes per page, two pages per group in flight. The loop bound is the
        // same for every lane of a warp (the shuffles need all 32).
        constexpr int GL = 8;
        const int grp = threadIdx.x / GL, sub = threadIdx.x % GL, n_grp = blockDim.x / GL;
        for (int base = 0; base < n; base += 2 * n_grp) {
            const int c0 = base + grp, c1 = c0 + n_grp;
            const int64_t o0 = (int64_t) (c0 < n ? c0 : 0) * d, o1 = (int64_t) (c1 < n ? c1 : 0) * d;
            const float s0 = sel_page_bound(qs, pmin + o0, pmax + o0, d, sub);
            const float s1 = sel_page_bound(qs, pmin + o1, pmax + o1, d, sub);
            // a page overlapping the sinks counts its non-sink positions only
            const int32_t p0 = (lay.first_page + c0) * a.page_size, p1 = (lay.first_page + c1) * a.page_size;
            if (sub == 0 && c0 < n) {
                keys[c0]   = sel_rank_key(s0, c0);
                sizes[c0]  = p0 + a.page_size - max(p0, sinks);
                my_total   += sizes[c0];
                if (a.scores) a.scores[(int64_t) list * n + c0] = s0;
            }
            if (sub == 0 && c1 < n) {
                keys[c1]   = sel_rank_key(s1, c1);
                sizes[c1]  = p1 + a.page_size - max(p1, sinks);
                my_total   += sizes[c1];
                if (a.scores) a.scores[(int64_t) list * n + c1] = s1;
            }
        }
    } else {   // clusters: their keys (score_kernel's, or scored here); sizes and offsets beside them
        if (score_here) {
            if (d <= 64) sel_score_here<2>(a, qs, g, list, n, keys);
            else if (d <= 128) sel_score_here<4>(a, qs, g, list, n, keys);
            else sel_score_here<8>(a, qs, g, list, n, keys);
        }
        const int32_t * gsizes = a.sizes + g * a.csr_stride, * goffs = a.offsets + g * a.csr_stride;
        for (int c = threadIdx.x; c < n; c += blockDim.x) {
            if (!score_here) keys[c] = a.keys[(int64_t) list * n + c];
            sizes[c]  = gsizes[c];
            poffs[c]  = goffs[c];
            my_total += sizes[c];
        }
    }
    my_total = (int32_t) __reduce_add_sync(0xffffffffu, (unsigned) my_total);
    if (lane == 0 && my_total) atomicAdd(&total_s, my_total);
    __syncthreads();

    const int32_t tail = lay.tail, room = lay.room;
    sel_plan plan = room > 0 ? sel_threshold(keys, sizes, n, room, total_s) : sel_plan{UINT64_MAX, 0};
    const bool none = room == 0 || n == 0;

    // Mark the taken clusters' members in the bitmap. The taken clusters are compacted with
    // their member counts and a running count (warp 0), so that every thread takes members
    // f = tid, tid + blockDim, ... of their concatenation and all member loads are in flight at
    // once (a warp per cluster waited for one cluster's loads after another's).
    for (int c = threadIdx.x; c < n && !none; c += blockDim.x) {
        if (keys[c] < plan.threshold) continue;
        const int32_t take = keys[c] == plan.threshold ? min(sizes[c], plan.cut) : sizes[c];
        if (take > 0) {
            const int32_t k = atomicAdd(&n_taken_s, 1);
            t_clust[k] = c;
            t_end[k]   = take;   // made a running count below
        }
    }
    __syncthreads();
    const int32_t n_taken = n_taken_s;
    if (warp == 0) {
        int32_t run = 0;
        for (int base = 0; base < n_taken; base += CKV_WARP) {
            int32_t v = base + lane < n_taken ? t_end[base + lane] : 0;
#pragma unroll
            for (int o = 1; o < CKV_WARP; o <<= 1) {
                const int32_t y = __shfl_up_sync(0xffffffffu, v, o);
                if (lane >= o) v += y;
            }
            if (base + lane < n_taken) t_end[base + lane] = run + v;
            run += __shfl_sync(0xffffffffu, v, CKV_WARP - 1);
        }
    }
    __syncthreads();
    const int32_t n_members = n_taken ? t_end[n_taken - 1] : 0;
    // Member f of the concatenation: its taken cluster by binary search over the running counts.
    auto member = [&](int32_t f) -> int32_t {
        int lo = 0, hi = n_taken - 1;   // the first taken cluster whose running count exceeds f
        while (lo < hi) {
            const int mid = (lo + hi) >> 1;
            if (t_end[mid] > f) hi = mid; else lo = mid + 1;
        }
        const int32_t c = t_clust[lo], m = f - (lo ? t_end[lo - 1] : 0);
        // a page's members are consecutive positions from its first non-sink one
        return pages ? max((lay.first_page + c) * a.page_size, sinks) + m : mem[poffs[c] + m];
    };
    // use(position) for every member, each thread MU members with their loads in flight together
    auto for_each_member = [&](auto && use) {
        constexpr int MU = 4;
        for (int32_t f0 = threadIdx.x; f0 < n_members; f0 += MU * blockDim.x) {
            int32_t p[MU];
#pragma unroll
            for (int u = 0; u < MU; u++) p[u] = f0 + u * blockDim.x < n_members ? member(f0 + u * blockDim.x) : -1;
#pragma unroll
            for (int u = 0; u < MU; u++) {
                if (p[u] >= 0) use(p[u]);
            }
        }
    };
    for_each_member([&](int32_t p) { atomicOr(&marked[(p - sinks) >> 5], 1u << ((p - sinks) & 31)); });
    __syncthreads();

    // Emit sinks, the marked positions in ascending order, then the tail, to every head served.
    // Each thread counts a run of bitmap words and one block scan gives every word its base;
    // then each member is written at its rank, base + the marked bits below it in its word
    // (members again: the work follows the budget, not the bitmap's length).
    const int per = ceil_div(n_words, blockDim.x), w0 = min(n_words, (int) threadIdx.x * per);
    const int w1 = min(n_words, w0 + per);
    int32_t mine = 0;
    for (int w = w0; w < w1; w++) mine += __popc(marked[w]);
    int32_t n_sel, at = block_exclusive_scan(mine, &n_sel);
    for (int w = w0; w < w1; w++) {
        w_base[w] = at;
        at += __popc(marked[w]);
    }
    __syncthreads();
    for_each_member([&](int32_t p) {
        const int32_t bit = p - sinks, w = bit >> 5;
        const int32_t rank = w_base[w] + __popc(marked[w] & ((1u << (bit & 31)) - 1u));
        for (int o = 0; o < n_out; o++) a.list_pos[(int64_t) (h_first + o) * a.list_stride + sinks + rank] = p;
    });
    for (int o = 0; o < n_out; o++) {
        int32_t * out = a.list_pos + (int64_t) (h_first + o) * a.list_stride;
        for (int i = threadIdx.x; i < sinks; i += blockDim.x) out[i] = i;
        for (int i = threadIdx.x; i < tail; i += blockDim.x) out[sinks + n_sel + i] = lay.n_cached - tail + i;
        if (threadIdx.x == 0) a.list_n[h_first + o] = sinks + n_sel + tail;
    }
    if (threadIdx.x == 0 && a.n_attended) atomicAdd(a.n_attended, (unsigned long long) n_out * (sinks + n_sel + tail));

    // cluster_select's order (tests): taken cluster i goes to slot #{taken j with a higher key}.
    if (a.chosen) {
        int32_t * chosen = a.chosen + (int64_t) list * n;
        int32_t n_taken = 0;
        for (int c = threadIdx.x; c < n && !none; c += blockDim.x) {
            if (keys[c] < plan.threshold) continue;
            int32_t rank = 0;
            for (int j = 0; j < n; j++) rank += keys[j] >= plan.threshold && keys[j] > keys[c];
            chosen[rank] = c;
            n_taken++;
        }
        for (int o = 16; o > 0; o >>= 1) n_taken += __shfl_xor_sync(0xffffffffu, n_taken, o);
        __syncthreads();
        if (threadIdx.x == 0) total_s = 0;
        __syncthreads();
        if (lane == 0 && n_taken) atomicAdd(&total_s, n_taken);
        __syncthreads();
        if (threadIdx.x == 0) a.n_chosen[list] = total_s;
    }
}

// The key and bitmap slots of the largest layout the launch may see (a.pos is that bound).
static void select_caps(const cuda_select_args & a, int32_t * n_cap, int32_t * words_cap) {
    const int64_t n_cached = (int64_t) a.pos + 1;
    if (a.mode == CKV_SELECT_PAGES) {
        *n_cap     = (int32_t) ceil_div(n_cached, (int64_t) a.page_size);
        *words_cap = (int32_t) ceil_div(n_cached, (int64_t) 32);
    } else if (a.mode == CKV_SELECT_WINDOW) {
        *n_cap = *words_cap = 0;
    } else {
        *n_cap     = a.n_clusters;
        *words_cap = (int32_t) ceil_div((int64_t) (a.end - a.n_sink > 0 ? a.end - a.n_sink : 0), (int64_t) 32);
    }
}

size_t ckv_cuda_select_smem_bytes(const struct cuda_select_args * a) {
    int32_t n_cap, words_cap;
    select_caps(*a, &n_cap, &words_cap);
    // qs; keys; bitmap words and their bases; sizes, offsets, taken clusters and running counts
    return 4 * 256 + 8 * (size_t) n_cap + 8 * (size_t) words_cap + 16 * (size_t) n_cap;
}

static bool select_args_ok(const cuda_select_args & a) {
    if (a.n_head_kv < 1 || a.n_head % a.n_head_kv != 0 || a.d < 1 || a.d > 256 || a.n_sink < 0 || a.pos < 0 ||
        !a.q || !a.list_pos || !a.list_n || (a.chosen && !a.n_chosen)) {
        return false;
    }
    if (a.mode == CKV_SELECT_CLUSTERS) {
        int64_t longest = (int64_t) min(a.pos + 1, a.n_sink) + min(a.room, a.end - a.n_sink) + (a.pos + 1 - a.end);
        const int lists_per_kv = a.per_kv_head ? 1 : a.n_head / a.n_head_kv;
        return a.n_clusters >= 0 && a.end >= a.n_sink && a.pos >= a.end && a.room >= 0 && a.list_stride >= longest &&
               (a.n_clusters == 0 || (a.centroids && a.sizes && a.offsets && a.positions && a.keys)) &&
               (size_t) lists_per_kv * a.d * sizeof(float) <= SC_MAX_SMEM;
    }
    const int64_t longest = min((int64_t) a.budget, (int64_t) a.pos + 1);
    if (a.mode == CKV_SELECT_WINDOW) {
        return a.budget >= a.n_sink + 1 && a.list_stride >= longest;
    }
    return a.mode == CKV_SELECT_PAGES && a.page_size >= 1 && a.budget >= a.n_sink + a.page_size &&
           a.list_stride >= longest && a.page_min && a.page_max && !a.per_kv_head;
}

int32_t ckv_cuda_select(const struct cuda_select_args * ap, cudaStream_t st) {
    const cuda_select_args & a = *ap;
    if (!select_args_ok(a)) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "cuda select: bad arguments (mode %d, n_head %d, n_head_kv %d, d %d, "
                        "%d clusters, sinks %d, end %d, pos %d, room %d, budget %d, page_size %d, list_stride %lld)",
                        a.mode, a.n_head, a.n_head_kv, a.d, a.n_clusters, a.n_sink, a.end, a.pos, a.room, a.budget,
                        a.page_size, (long long) a.list_stride);
    }
    size_t smem = ckv_cuda_select_smem_bytes(&a);
    if (smem > CKV_SELECT_MAX_SMEM) {
        return ckv_fail(CKV_ERR_UNSUPPORTED, "cuda select: %d clusters/pages over %d positions need %zu bytes "
                        "of shared memory (at most %d)", a.mode == CKV_SELECT_CLUSTERS ? a.n_clusters : 0,
                        a.pos + 1, smem, CKV_SELECT_MAX_SMEM);
    }
    int32_t n_cap, words_cap;
    select_caps(a, &n_cap, &words_cap);
    CKV_CUDA_CHECK(cudaFuncSetAttribute(select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem));
    // Few clusters are scored inside the selection; many by score_kernel's wide grid first.
    const int  per        = a.d <= 64 ? 2 : a.d <= 128 ? 4 : 8;   // sel_score_here's PER
    const bool score_here = a.mode == CKV_SELECT_CLUSTERS && (int64_t) a.n_clusters * per <= SEL_SCORE_HERE_MAX;
    if (a.mode == CKV_SELECT_CLUSTERS && a.n_clusters > 0 && !score_here) {
        const dim3   grid((unsigned) a.n_head_kv, (unsigned) ceil_div(a.n_clusters, SC_ROWS));
        const size_t q_bytes = (size_t) (a.per_kv_head ? 1 : a.n_head / a.n_head_kv) * a.d * sizeof(float);
        const dim3   block(SC_WARPS * CKV_WARP);
        cudaError_t  e = a.d <= 64 ? launch_pdl(score_kernel<2>, grid, block, q_bytes, st, a)
                       : a.d <= 128 ? launch_pdl(score_kernel<4>, grid, block, q_bytes, st, a)
                                    : launch_pdl(score_kernel<8>, grid, block, q_bytes, st, a);
        CKV_CUDA_CHECK(e);
    }
    int n_lists = a.per_kv_head ? a.n_head_kv : a.n_head;
    CKV_CUDA_CHECK(launch_pdl(select_kernel, dim3(n_lists), dim3(SEL_THREADS), smem, st, a, n_cap, words_cap,
                              score_here));
    return CKV_OK;
}

// =============================================================================================
// Quest page bounds
// =============================================================================================
//
// Block (touched page, problem), threads over the dims: each walks the page's keys in order.

static __global__ void quest_pages_kernel(cuda_quest_pages_args a) {
    const int32_t page = a.pos0 / a.page_size + blockIdx.x;
    const int32_t j0 = page * a.page_size, j1 = min(j0 + a.page_size, a.pos0 + a.n);
    const __half * k = a.k + blockIdx.y * a.k_stride;
    const int64_t  out = blockIdx.y * a.page_stride + (int64_t) page * a.d;
    for (int e = threadIdx.x; e < a.d; e += blockDim.x) {
        __half mn = k[(int64_t) j0 * a.d + e], mx = mn;
        for (int32_t j = j0 + 1; j < j1; j++) {
            const __half v = k[(int64_t) j * a.d + e];
            mn = __hlt(v, mn) ? v : mn;
            mx = __hgt(v, mx) ? v : mx;
        }
        a.page_min[out + e] = mn;
        a.page_max[out + e] = mx;
    }
}

int32_t ckv_cuda_quest_pages(const struct cuda_quest_pages_args * ap, cudaStream_t st) {
    const cuda_quest_pages_args & a = *ap;
    if (!a.k || !a.page_min || !a.page_max || a.n_problems < 0 || a.n_problems > 65535 || a.d < 1 || a.d > 256 ||
        a.page_size < 1 || a.pos0 < 0 || a.n < 0) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "cuda quest pages: bad arguments (%d problems, d %d, page_size %d, "
                        "pos0 %d, n %d)", a.n_problems, a.d, a.page_size, a.pos0, a.n);
    }
    if (a.n == 0 || a.n_problems == 0) return CKV_OK;
    const int32_t n_pages = (a.pos0 + a.n - 1) / a.page_size - a.pos0 / a.page_size + 1;
    quest_pages_kernel<<<dim3(n_pages, a.n_problems), a.d, 0, st>>>(a);
    CKV_CUDA_CHECK(cudaGetLastError());
    return CKV_OK;
}

// =============================================================================================
// Host offload: fetching the selected rows into the GPU's slots
// =============================================================================================
//
// One block per KV head: (1) hits stamp their slot with this fetch's epoch, each missing
// position is claimed once (slot_of -2) and queued; (2) a block scan finds the first free slots
// (stamp != epoch) in slot order; (3) miss i takes free slot i, evicting its old position, and a
// warp copies its K and V rows in 16-byte loads.

enum { FETCH_THREADS = 1024 };

static __global__ void __launch_bounds__(FETCH_THREADS) kv_fetch_kernel(cuda_kv_fetch_args a) {
    const int g = blockIdx.x, group = a.n_head / a.n_head_kv, d = a.head_dim;
    const int lane = threadIdx.x % CKV_WARP, warp = threadIdx.x / CKV_WARP, n_warps = blockDim.x / CKV_WARP;
    int32_t *  slot_of = a.slot_of + (int64_t) g * a.n_ctx;
    int32_t *  owner   = a.owner + (int64_t) g * a.n_slots;
    uint32_t * stamp   = a.stamp + (int64_t) g * a.n_slots;
    int32_t *  misses  = a.scratch + (int64_t) g * 2 * a.n_slots, * free_slots = misses + a.n_slots;
    __shared__ uint32_t now_s;
    __shared__ int32_t  n_miss_s;
    if (threadIdx.x == 0) {
        now_s    = ++a.epoch[g];
        n_miss_s = 0;
    }
    __syncthreads();
    const uint32_t now = now_s;
    for (int o = 0; o < group; o++) {   // (1)
        const int32_t * list = a.list_pos + (int64_t) (g * group + o) * a.list_stride;
        const int32_t   n    = a.list_n[g * group + o];
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const int32_t p = list[i], sl = slot_of[p];
            if (sl >= 0) {
                stamp[sl] = now;
            } else if (sl == -1 && atomicCAS(&slot_of[p], -1, -2) == -1) {
                misses[atomicAdd(&n_miss_s, 1)] = p;
            }
        }
    }
    __syncthreads();
    const int32_t n_miss = n_miss_s;
    if (n_miss > 0) {   // (2), block-uniform
        const int32_t per = ceil_div(a.n_slots, blockDim.x);
        const int32_t s0 = min(a.n_slots, (int32_t) threadIdx.x * per), s1 = min(a.n_slots, s0 + per);
        int32_t mine = 0;
        for (int32_t sl = s0; sl < s1; sl++) mine += stamp[sl] != now;
        int32_t total, at = block_exclusive_scan(mine, &total);
        for (int32_t sl = s0; sl < s1 && at < n_miss; sl++) {
            if (stamp[sl] != now) free_slots[at++] = sl;
        }
    }
    __syncthreads();
    const int chunks = d / 8;   // 16-byte chunks per row
    for (int i = warp; i < n_miss; i += n_warps) {   // (3)
        const int32_t p = misses[i], sl = free_slots[i];
        if (lane == 0) {
            const int32_t old = owner[sl];
            if (old >= 0) slot_of[old] = -1;
            owner[sl]   = p;
            stamp[sl]   = now;
            slot_of[p]  = sl;
        }
        const uint4 * sk = (const uint4 *) (a.src_k + ((int64_t) g * a.n_ctx + p) * d);
        const uint4 * sv = (const uint4 *) (a.src_v + ((int64_t) g * a.n_ctx + p) * d);
        uint4 * dk = (uint4 *) (a.slot_k + ((int64_t) g * a.n_slots + sl) * d);
        uint4 * dv = (uint4 *) (a.slot_v + ((int64_t) g * a.n_slots + sl) * d);
        for (int c = lane; c < 2 * chunks; c += CKV_WARP) {
            if (c < chunks) dk[c] = sk[c];
            else dv[c - chunks] = sv[c - chunks];
        }
    }
    if (threadIdx.x == 0 && a.n_copied && n_miss) atomicAdd(a.n_copied, (unsigned long long) n_miss);
}

int32_t ckv_cuda_kv_fetch(const struct cuda_kv_fetch_args * ap, cudaStream_t st) {
    const cuda_kv_fetch_args & a = *ap;
    if (!a.list_pos || !a.list_n || !a.src_k || !a.src_v || !a.slot_k || !a.slot_v || !a.slot_of ||
        !a.owner || !a.stamp || !a.epoch || !a.scratch || a.n_head_kv < 1 || a.n_head % a.n_head_kv != 0 ||
        a.head_dim % 8 != 0 || a.head_dim < 8 || a.n_ctx < 1 || a.n_slots < 1) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "cuda kv fetch: bad arguments (n_head %d, n_head_kv %d, head_dim %d, "
                        "n_ctx %d, n_slots %d)", a.n_head, a.n_head_kv, a.head_dim, a.n_ctx, a.n_slots);
    }
    kv_fetch_kernel<<<a.n_head_kv, FETCH_THREADS, 0, st>>>(a);
    CKV_CUDA_CHECK(cudaGetLastError());
    return CKV_OK;
}

static __global__ void kv_fetch_forget_kernel(int32_t * slot_of, int32_t * owner, int32_t n_ctx, int32_t n_slots,
                                              int32_t from, int32_t to) {
    const int32_t p = from + blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= to) return;
    int32_t * map = slot_of + (int64_t) blockIdx.y * n_ctx;
    const int32_t sl = map[p];
    if (sl >= 0) owner[(int64_t) blockIdx.y * n_slots + sl] = -1;
    map[p] = -1;
}

int32_t ckv_cuda_kv_fetch_forget(int32_t * slot_of, int32_t * owner, int32_t n_problems, int32_t n_ctx,
                                 int32_t n_slots, int32_t from, int32_t to, cudaStream_t st) {
    if (!slot_of || !owner || n_problems < 0 || n_problems > 65535 || from < 0 || to > n_ctx) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "cuda kv fetch forget: bad arguments (%d problems, [%d, %d) of %d)",
                        n_problems, from, to, n_ctx);
    }
    if (to <= from || n_problems == 0) return CKV_OK;
    kv_fetch_forget_kernel<<<dim3(ceil_div(to - from, 256), n_problems), 256, 0, st>>>(slot_of, owner, n_ctx,
                                                                                        n_slots, from, to);
    CKV_CUDA_CHECK(cudaGetLastError());
    return CKV_OK;
}

// =============================================================================================
// Sparse flash-decode
// =============================================================================================
//
// Block (query head h, split) walks its chunk of list h in tiles of SP_TILE positions. All loads
// of a tile are issued first as 16-byte loads through the position list (two threads per K
// row, HD / 8 threads per V row), then the pairs' dot products give the scores, warp 0 updates
// the running max / sum, and every thread accumulates p * V for its positions and 8 dims; the
// position groups are summed through shared memory at the end. Splits write (acc, m, l) and a
// second kernel merges them (the online-softmax rule), as the dense decode path does. (The last
// split block merging instead, behind an arrival counter, measured the same for SmolLM2 at
// 8000, within 1%, and 2-3% slower for the 8B shape per query head at 32k.)

enum { SP_THREADS = 128, SP_TILE = 64, SP_MAX_SPLITS = 64 };

__device__ __forceinline__ void sp_half8(uint4 raw, float f[8]) {
    const __half2 * h = (const __half2 *) &raw;
#pragma unroll
    for (int e = 0; e < 4; e++) {
        float2 v = __half22float2(h[e]);
        f[2 * e] = v.x;
        f[2 * e + 1] = v.y;
    }
}

__device__ __forceinline__ void sp_chunk(const cuda_sparse_attention_args & a, int split, int32_t n_list,
                                         int32_t * j0, int32_t * j1) {
    int32_t chunk = ceil_div(ceil_div(a.max_list, a.n_split), SP_TILE) * SP_TILE;
    *j0 = min(n_list, split * chunk);
    *j1 = min(n_list, *j0 + chunk);
}

// The row a listed position p is read from: p itself (a row of the cache), or under kv_offload
// its slot (>= 0) when it has one and ~p (< 0: the cache in host memory) when it has none.
__device__ __forceinline__ int32_t sp_row(const cuda_sparse_attention_args & a, int kvh, int32_t p) {
    if (!a.slot_of) return p;
    const int32_t sl = a.slot_of[(int64_t) kvh * a.n_ctx + p];
    return sl >= 0 ? sl : ~p;
}

// Row r of sp_row: rows_pos (the cache, or the slots under kv_offload) for r >= 0, the cache for r < 0.
template <int HD>
__device__ __forceinline__ const __half * sp_addr(const __half * cache, const __half * rows_pos, int32_t r) {
    return r >= 0 ? rows_pos + (size_t) r * HD : cache + (size_t) ~r * HD;
}

// KV head kvh's rows: the cache, and those sp_row's r >= 0 address (the cache, or the slots).
struct sp_rows {
    const __half * k, * v, * k_pos, * v_pos;
};
template <int HD> __device__ __forceinline__ sp_rows sp_rows_of(const cuda_sparse_attention_args & a, int kvh) {
    sp_rows r;
    r.k     = a.k_cache + (size_t) kvh * a.n_ctx * HD;
    r.v     = a.v_cache + (size_t) kvh * a.n_ctx * HD;
    r.k_pos = a.slot_of ? a.slot_k + (size_t) kvh * a.n_slots * HD : r.k;
    r.v_pos = a.slot_of ? a.slot_v + (size_t) kvh * a.n_slots * HD : r.v;
    return r;
}

// One tile's loads, all in flight before any use: the rows of list[tile .. tile + n_pos) into
// ps (shared), then thread pair p / 2 loads half of K row p each, and thread (pg, cg) V chunk
// cg of rows pg, pg + PG, ...; rows past n_pos load zeros. Every thread of the block calls it.
template <int HD, int VPOS>
__device__ __forceinline__ void sp_load_tile(const cuda_sparse_attention_args & a, int kvh, const sp_rows & rows,
                                             const int32_t * list, int32_t tile, int n_pos, int32_t * ps,
                                             uint4 kraw[HD / 16], uint4 vraw[VPOS]) {
    constexpr int NCG = HD / 8, PG = SP_THREADS / NCG;
    const int tid = threadIdx.x, cg = tid % NCG, pg = tid / NCG;
    __syncthreads();   // ps / sc of the previous tile are consumed (first time: qs ready)
    if (tid < SP_TILE) ps[tid] = tid < n_pos ? sp_row(a, kvh, list[tile + tid]) : 0;
    __syncthreads();
    const int p = tid >> 1, half = tid & 1;
    const uint4 * kr = (const uint4 *) (sp_addr<HD>(rows.k, rows.k_pos, ps[p]) + half * (HD / 2));
#pragma unroll
    for (int i = 0; i < HD / 16; i++) kraw[i] = p < n_pos ? kr[i] : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int k = 0; k < VPOS; k++) {
        int vp = pg + PG * k;
        vraw[k] = vp < n_pos ? ((const uint4 *) sp_addr<HD>(rows.v, rows.v_pos, ps[vp]))[cg] : make_uint4(0, 0, 0, 0);
    }
}

// The online softmax over one tile's SP_TILE scores (sc, shared), by one warp: sc becomes the
// weights e^(s - m_new), the running max *m and sum *l move on, *corr rescales the accumulators.
__device__ __forceinline__ void sp_softmax_tile(float * sc, float * m, float * l, float * corr_out) {
    const int lane = threadIdx.x % CKV_WARP;
    float s0 = sc[lane], s1 = sc[lane + 32];
    float m_old = *m, m_new = fmaxf(m_old, warp_max(fmaxf(s0, s1)));
    float p0 = 0.0f, p1 = 0.0f, corr = 1.0f;
    if (m_new != -INFINITY) {
        p0 = expf(s0 - m_new);
        p1 = expf(s1 - m_new);
        corr = expf(m_old - m_new);
    }
    float sum = warp_sum(p0 + p1);
    sc[lane] = p0;
    sc[lane + 32] = p1;
    __syncwarp();
    if (lane == 0) {
        *l = *l * corr + sum;
        *m = m_new;
        *corr_out = corr;
    }
}

// Head h's output from every thread's acc (its position group pg and 8 dims): the groups summed
// through red, then out (one split: / l, also quantised when asked) or the split's partial
// (acc, m, l). m and l point to shared memory, read after the barriers. Every thread calls it.
template <int HD>
__device__ __forceinline__ void sp_finish_head(const cuda_sparse_attention_args & a, float (*red)[HD],
                                               const float acc[8], int h, int split, const float * m,
                                               const float * l) {
    constexpr int NCG = HD / 8, PG = SP_THREADS / NCG;
    const int tid = threadIdx.x, cg = tid % NCG, pg = tid / NCG;
    __syncthreads();
    *(float4 *) &red[pg][8 * cg]     = make_float4(acc[0], acc[1], acc[2], acc[3]);
    *(float4 *) &red[pg][8 * cg + 4] = make_float4(acc[4], acc[5], acc[6], acc[7]);
    __syncthreads();
    for (int dd = tid; dd < HD; dd += SP_THREADS) {
        float o = 0.0f;
        for (int k = 0; k < PG; k++) o += red[k][dd];
        if (a.n_split == 1) {
            const float val = *l > 0.0f ? o / *l : 0.0f;
            a.out[(int64_t) h * HD + dd] = val;
            if (a.out_q) quantize_chunk_warp(val, (cq8x *) a.out_q + ((int64_t) h * HD + dd) / 32);
        } else {
            float * slot = a.partial + ((int64_t) h * a.n_split + split) * (HD + 4);
            slot[dd] = o;
            if (dd == 0) {
                slot[HD]     = *m;
                slot[HD + 1] = *l;
            }
        }
    }
}

// out[h] = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s over the splits that saw positions
// (m_s > -inf); block = head h. Lane j of every warp holds the (m, l) of splits j and j + 32;
// warp w sums splits w, w + 4, ... of dims j, j + 32, ..., MERGE_U of them per round with their
// loads in flight together (the naive loop over splits, one load after another, took 6.4 us for
// SmolLM2's 21 splits), and warp 0 adds the four sums in warp order.
template <int HD>
static __global__ void __launch_bounds__(SP_THREADS) sparse_merge_kernel(cuda_sparse_attention_args a) {
    pdl_begin();
    constexpr int PER = HD / CKV_WARP, MERGE_U = 8, NW = SP_THREADS / CKV_WARP;
    static_assert(SP_MAX_SPLITS <= 2 * CKV_WARP, "two splits' (m, l) per lane");
    __shared__ __align__(16) float warp_acc[NW][HD];
    const int lane = threadIdx.x % CKV_WARP, warp = threadIdx.x / CKV_WARP, n = a.n_split, h = blockIdx.x;
    const float * part = a.partial + (int64_t) h * n * (HD + 4);
    float m[2], l[2], w[2];
#pragma unroll
    for (int j = 0; j < 2; j++) {
        const int sp = lane + CKV_WARP * j;
        m[j] = sp < n ? part[(int64_t) sp * (HD + 4) + HD] : -INFINITY;
        l[j] = sp < n ? part[(int64_t) sp * (HD + 4) + HD + 1] : 0.0f;
    }
    const float M = warp_max(fmaxf(m[0], m[1]));
#pragma unroll
    for (int j = 0; j < 2; j++) w[j] = m[j] != -INFINITY ? expf(m[j] - M) : 0.0f;
    const float L = warp_sum(l[0] * w[0] + l[1] * w[1]);
    float acc[PER] = {};
    for (int sp0 = warp; sp0 < n; sp0 += MERGE_U * NW) {
        float v[MERGE_U][PER];
#pragma unroll
        for (int u = 0; u < MERGE_U; u++) {
            const int     sp  = sp0 + u * NW;
            const float * row = part + (int64_t) (sp < n ? sp : 0) * (HD + 4);
#pragma unroll
            for (int i = 0; i < PER; i++) v[u][i] = sp < n ? row[lane + CKV_WARP * i] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < MERGE_U; u++) {
            const int   sp = sp0 + u * NW;   // the same in every lane; past n its v is 0
            const float ww = __shfl_sync(0xffffffffu, (sp / CKV_WARP) % 2 ? w[1] : w[0], sp % CKV_WARP);
#pragma unroll
            for (int i = 0; i < PER; i++) acc[i] = fmaf(ww, v[u][i], acc[i]);
        }
    }
#pragma unroll
    for (int i = 0; i < PER; i++) warp_acc[warp][lane + CKV_WARP * i] = acc[i];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int i = 0; i < PER; i++) {   // dims 32 i .. 32 i + 31: one q8 chunk across the lanes
        float o = warp_acc[0][lane + CKV_WARP * i];
        for (int k = 1; k < NW; k++) o += warp_acc[k][lane + CKV_WARP * i];
        const float val = L > 0.0f ? o / L : 0.0f;
        a.out[(int64_t) h * HD + lane + CKV_WARP * i] = val;
        if (a.out_q) quantize_chunk_warp(val, (cq8x *) a.out_q + ((int64_t) h * HD) / 32 + i);
    }
}

template <int HD>
static __global__ void __launch_bounds__(SP_THREADS) sparse_decode_kernel(cuda_sparse_attention_args a) {
    pdl_begin();
    constexpr int NCG = HD / 8, PG = SP_THREADS / NCG, VPOS = SP_TILE / PG;
    static_assert(SP_THREADS == 2 * SP_TILE && SP_THREADS % NCG == 0 && SP_TILE % PG == 0, "layout");
    __shared__ __align__(16) float qs[HD];
    __shared__ float sc[SP_TILE];
    __shared__ int32_t ps[SP_TILE];
    __shared__ float m_s, l_s, corr_s;
    __shared__ __align__(16) float red[PG][HD];
    const int h = blockIdx.x, split = blockIdx.y, tid = threadIdx.x;
    const int kvh = h / (a.n_head / a.n_head_kv);
    const int32_t n_list = a.list_n[h];
    int32_t j0, j1;
    sp_chunk(a, split, n_list, &j0, &j1);
    const int32_t * list = a.list_pos + (int64_t) h * a.list_stride;
    const sp_rows rows = sp_rows_of<HD>(a, kvh);
    for (int i = tid; i < HD; i += SP_THREADS) qs[i] = a.q[(int64_t) h * HD + i];
    if (tid == 0) {
        m_s = -INFINITY;
        l_s = 0.0f;
    }
    float acc[8] = {};
    const int pg = tid / NCG;
    for (int32_t tile = j0; tile < j1; tile += SP_TILE) {
        const int n_pos = min(SP_TILE, j1 - tile);
        uint4 kraw[HD / 16], vraw[VPOS];
        sp_load_tile<HD, VPOS>(a, kvh, rows, list, tile, n_pos, ps, kraw, vraw);
        const int p = tid >> 1, half = tid & 1;
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < HD / 16; i++) {
            float kf[8];
            sp_half8(kraw[i], kf);
            const float * qq = &qs[half * (HD / 2) + 8 * i];
#pragma unroll
            for (int e = 0; e < 8; e++) dot = fmaf(qq[e], kf[e], dot);
        }
        dot += __shfl_xor_sync(0xffffffffu, dot, 1);
        if (half == 0) sc[p] = p < n_pos ? dot * a.scale : -INFINITY;
        __syncthreads();
        if (tid < CKV_WARP) sp_softmax_tile(sc, &m_s, &l_s, &corr_s);
        __syncthreads();
        const float corr = corr_s;
#pragma unroll
        for (int e = 0; e < 8; e++) acc[e] *= corr;
#pragma unroll
        for (int k = 0; k < VPOS; k++) {
            float vf[8];
            sp_half8(vraw[k], vf);
            const float w = sc[pg + PG * k];   // 0 past n_pos, where v is 0 too
#pragma unroll
            for (int e = 0; e < 8; e++) acc[e] = fmaf(w, vf[e], acc[e]);
        }
    }
    sp_finish_head<HD>(a, red, acc, h, split, &m_s, &l_s);
}

// shared_lists (per-KV-head selection: every head of a KV group has the same list): block (KV
// head, split) reads each listed K/V row once for all GMAX >= group heads, in the layout of
// sparse_decode_kernel, with per-head scores, running max/sum and accumulators. Each head's
// arithmetic is sparse_decode_kernel's, in the same order.
template <int HD, int GMAX>
static __global__ void __launch_bounds__(SP_THREADS) sparse_group_kernel(cuda_sparse_attention_args a) {
    pdl_begin();
    constexpr int NCG = HD / 8, PG = SP_THREADS / NCG, VPOS = SP_TILE / PG;
    __shared__ __align__(16) float qs[GMAX][HD];
    __shared__ float sc[GMAX][SP_TILE];
    __shared__ int32_t ps[SP_TILE];
    __shared__ float m_s[GMAX], l_s[GMAX], corr_s[GMAX];
    __shared__ __align__(16) float red[PG][HD];
    const int kvh = blockIdx.x, split = blockIdx.y, tid = threadIdx.x;
    const int group = a.n_head / a.n_head_kv, h0 = kvh * group, warp = tid / CKV_WARP;
    const int32_t n_list = a.list_n[h0];
    int32_t j0, j1;
    sp_chunk(a, split, n_list, &j0, &j1);
    const int32_t * list = a.list_pos + (int64_t) h0 * a.list_stride;
    const sp_rows rows = sp_rows_of<HD>(a, kvh);
    for (int i = tid; i < group * HD; i += SP_THREADS) qs[i / HD][i % HD] = a.q[(int64_t) h0 * HD + i];
    if (tid < GMAX) {
        m_s[tid] = -INFINITY;
        l_s[tid] = 0.0f;
    }
    float acc[GMAX][8] = {};
    const int pg = tid / NCG;
    for (int32_t tile = j0; tile < j1; tile += SP_TILE) {
        const int n_pos = min(SP_TILE, j1 - tile);
        uint4 kraw[HD / 16], vraw[VPOS];
        sp_load_tile<HD, VPOS>(a, kvh, rows, list, tile, n_pos, ps, kraw, vraw);
        const int p = tid >> 1, half = tid & 1;
#pragma unroll
        for (int h = 0; h < GMAX; h++) {
            if (h >= group) break;
            float dot = 0.0f;
#pragma unroll
            for (int i = 0; i < HD / 16; i++) {
                float kf[8];
                sp_half8(kraw[i], kf);
                const float * qq = &qs[h][half * (HD / 2) + 8 * i];
#pragma unroll
                for (int e = 0; e < 8; e++) dot = fmaf(qq[e], kf[e], dot);
            }
            dot += __shfl_xor_sync(0xffffffffu, dot, 1);
            if (half == 0) sc[h][p] = p < n_pos ? dot * a.scale : -INFINITY;
        }
        __syncthreads();
        for (int h = warp; h < group; h += SP_THREADS / CKV_WARP) {   // a warp per head
            sp_softmax_tile(sc[h], &m_s[h], &l_s[h], &corr_s[h]);
        }
        __syncthreads();
#pragma unroll
        for (int h = 0; h < GMAX; h++) {
            if (h >= group) break;
            const float corr = corr_s[h];
#pragma unroll
            for (int e = 0; e < 8; e++) acc[h][e] *= corr;
#pragma unroll
            for (int k = 0; k < VPOS; k++) {
                float vf[8];
                sp_half8(vraw[k], vf);
                const float w = sc[h][pg + PG * k];   // 0 past n_pos, where v is 0 too
#pragma unroll
                for (int e = 0; e < 8; e++) acc[h][e] = fmaf(w, vf[e], acc[h][e]);
            }
        }
    }
#pragma unroll
    for (int hh = 0; hh < GMAX; hh++) {   // each head's position groups summed, as sparse_decode_kernel
        if (hh >= group) break;
        sp_finish_head<HD>(a, red, acc[hh], h0 + hh, split, &m_s[hh], &l_s[hh]);
    }
}

int32_t ckv_cuda_sparse_attention_splits(int32_t n_head, int32_t max_list) {
    // About two blocks per multiprocessor of an H100/H200 (132), chunks of whole tiles.
    int32_t want = ceil_div(264, n_head > 0 ? n_head : 1);
    int32_t tiles = ceil_div(max_list > 0 ? max_list : 1, SP_TILE);
    want = want < tiles ? want : tiles;
    want = want < SP_MAX_SPLITS ? want : SP_MAX_SPLITS;
    return want < 1 ? 1 : want;
}

template <int HD> static cudaError_t launch_sparse(const cuda_sparse_attention_args & a, cudaStream_t st) {
    const int  group = a.n_head / a.n_head_kv;
    const dim3 per_group(a.n_head_kv, a.n_split);
    cudaError_t e;
    if (a.shared_lists && group <= 4) {
        e = launch_pdl(sparse_group_kernel<HD, 4>, per_group, dim3(SP_THREADS), 0, st, a);
    } else if (HD <= 128 && a.shared_lists && group <= 8) {   // 8 heads x 256 dims would spill
        e = launch_pdl(sparse_group_kernel<HD <= 128 ? HD : 128, 8>, per_group, dim3(SP_THREADS), 0, st, a);
    } else {
        e = launch_pdl(sparse_decode_kernel<HD>, dim3(a.n_head, a.n_split), dim3(SP_THREADS), 0, st, a);
    }
    if (e == cudaSuccess && a.n_split > 1) {
        e = launch_pdl(sparse_merge_kernel<HD>, dim3(a.n_head), dim3(SP_THREADS), 0, st, a);
    }
    return e;
}

int32_t ckv_cuda_sparse_attention(const struct cuda_sparse_attention_args * ap, cudaStream_t st) {
    const cuda_sparse_attention_args & a = *ap;
    if (a.n_head_kv < 1 || a.n_head % a.n_head_kv != 0 || a.n_split < 1 || a.n_split > SP_MAX_SPLITS ||
        a.max_list < 0 || a.list_stride < a.max_list || (a.n_split > 1 && !a.partial) || !a.q || !a.out ||
        !a.list_pos || !a.list_n || (a.slot_of && (!a.slot_k || !a.slot_v || a.n_slots < 1))) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "cuda sparse attention: bad shape (n_head %d, n_head_kv %d, "
                        "n_split %d, max_list %d)", a.n_head, a.n_head_kv, a.n_split, a.max_list);
    }
    cudaError_t err;
    switch (a.head_dim) {
        case 64:  err = launch_sparse<64>(a, st); break;
        case 128: err = launch_sparse<128>(a, st); break;
        case 256: err = launch_sparse<256>(a, st); break;
        default:
            return ckv_fail(CKV_ERR_UNSUPPORTED, "cuda sparse attention: head_dim %d (supported: 64, 128, 256)",
                            a.head_dim);
    }
    CKV_CUDA_CHECK(err);
    return CKV_OK;
}
