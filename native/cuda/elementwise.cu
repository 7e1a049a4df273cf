// elementwise.cu - the small per-row ops of the forward pass: RMSNorm (optionally fused with
// the residual add), RoPE (normal and NEOX) fused with the per-head q/k norm and the f16 KV
// cache write, SwiGLU / GeGLU and the embedding lookup. Each follows its CPU twin in ops.c /
// forward.c / kv.c formula for formula (the RoPE angle by the same repeated float
// multiplication), so they agree to float rounding.
#include "common.cuh"
#include "cuda-ops.cuh"
#include "rope.cuh"

// --- RMSNorm: one block per row -------------------------------------------------------------

enum { NORM_THREADS = 256 };

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float part[32];
    v = warp_sum(v);
    int lane = threadIdx.x % CKV_WARP, warp = threadIdx.x / CKV_WARP;
    __syncthreads();   // `part` may still be read from a previous call
    if (lane == 0) part[warp] = v;
    __syncthreads();
    float s = lane < (int) (blockDim.x / CKV_WARP) ? part[lane] : 0.0f;
    return warp_sum(s);
}

// All of a row's loads are issued before the one reduction; float4 when n % 4 == 0.
static __global__ void __launch_bounds__(NORM_THREADS)
rmsnorm_kernel(float * y, const float * x, const float * w, int64_t n, float eps, bool add) {
    pdl_begin();
    const float * xr = x + blockIdx.x * n;
    float *       yr = y + blockIdx.x * n;
    float         sum = 0.0f;
    bool          vec = n % 4 == 0;
    if (vec) {
        for (int64_t i = threadIdx.x; i < n / 4; i += blockDim.x) {
            float4 v = ((const float4 *) xr)[i];
            sum += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    } else {
        for (int64_t i = threadIdx.x; i < n; i += blockDim.x) sum += xr[i] * xr[i];
    }
    float scale = 1.0f / sqrtf(block_sum(sum) / (float) n + eps);
    if (vec) {
        for (int64_t i = threadIdx.x; i < n / 4; i += blockDim.x) {
            float4 v = ((const float4 *) xr)[i], g = ((const float4 *) w)[i];
            float4 o = make_float4(v.x * scale * g.x, v.y * scale * g.y, v.z * scale * g.z, v.w * scale * g.w);
            if (add) {
                float4 b = ((const float4 *) yr)[i];
                o.x += b.x; o.y += b.y; o.z += b.z; o.w += b.w;
            }
            ((float4 *) yr)[i] = o;
        }
    } else {
        for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
            float v = xr[i] * scale * w[i];
            yr[i] = add ? yr[i] + v : v;
        }
    }
}

int32_t ckv_cuda_rmsnorm(float * y, const float * x, const float * w, int64_t n_rows, int64_t n,
                         float eps, bool add, cudaStream_t s) {
    if (n_rows < 1 || n < 1 || n_rows > INT32_MAX) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "cuda rmsnorm: bad shape (%lld x %lld)",
                        (long long) n_rows, (long long) n);
    }
    // Short rows (per-head norms) get fewer threads, so no warp idles on the reduction alone.
    int threads = n >= 4 * NORM_THREADS ? NORM_THREADS : (int) ((n / 4 + 31) / 32 * 32);
    threads = threads < 32 ? 32 : threads;
    CKV_CUDA_CHECK(launch_pdl(rmsnorm_kernel, (unsigned) n_rows, threads, 0, s, y, x, w, n, eps, add));
    return CKV_OK;
}

// --- RoPE + KV store: one block per (token, head) --------------------------------------------

// Blocks [0, n_head) rotate a query head in place; [n_head, n_head + n_head_kv) rotate a key
// head and write it to the cache as f16; the last n_head_kv blocks copy a value head to the
// cache. The optional per-head RMSNorm (Gemma-3's q/k norm) comes first, as in forward.c.
// The head goes through shared memory so each thread may rotate any pair of it.
static __global__ void rope_kv_kernel(struct cuda_rope_kv_args a) {
    pdl_begin();
    extern __shared__ float head[];   // [head_dim]
    int     hd = a.head_dim, hb = blockIdx.x;
    int64_t t = blockIdx.y;
    int64_t pos0 = a.pos_dev ? *a.pos_dev : a.pos0;
    bool    is_q = hb < a.n_head, is_k = !is_q && hb < a.n_head + a.n_head_kv;
    int     h = is_q ? hb : is_k ? hb - a.n_head : hb - a.n_head - a.n_head_kv;
    const float * src = is_q ? a.q + (t * a.n_head + h) * hd
                      : (is_k ? a.k : a.v) + (t * a.n_head_kv + h) * hd;
    const float * norm = is_q ? a.q_norm : is_k ? a.k_norm : nullptr;

    float sum = 0.0f;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        head[d] = src[d];
        sum += head[d] * head[d];
    }
    if (norm) {   // block-uniform branch: the reduction's barriers are reached by all threads
        float scale = 1.0f / sqrtf(block_sum(sum) / (float) hd + a.eps);
        for (int d = threadIdx.x; d < hd; d += blockDim.x) head[d] = head[d] * scale * norm[d];
    }
    __syncthreads();
    if (is_q || is_k) {
        for (int i = threadIdx.x; i < a.n_rot / 2; i += blockDim.x) {
            rope_rotate_pair(head, a, i, rope_cos_sin(a, pos0 + t, i));
        }
        __syncthreads();
    }
    if (is_q) {
        float * q = a.q + (t * a.n_head + h) * hd;
        for (int d = threadIdx.x; d < hd; d += blockDim.x) q[d] = head[d];
        return;
    }
    __half * dst = (is_k ? a.k_cache : a.v_cache) + ((size_t) h * a.n_ctx + (size_t) (pos0 + t)) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) dst[d] = __float2half_rn(head[d]);
}

int32_t ckv_cuda_rope_kv_check(const struct cuda_rope_kv_args * a) {
    if (a->n_rot < 2 || a->n_rot % 2 || a->n_rot > a->head_dim || a->n_tokens < 1 ||
        a->n_head < 1 || a->n_head_kv < 1) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "cuda rope_kv: n_rot %d must be even and in [2, %d], "
                        "%lld tokens, %d / %d heads", a->n_rot, a->head_dim, (long long) a->n_tokens,
                        a->n_head, a->n_head_kv);
    }
    if (!a->pos_dev && (a->pos0 < 0 || a->pos0 + a->n_tokens > a->n_ctx)) {
        return ckv_fail(CKV_ERR_CTX_FULL, "cuda rope_kv: positions %lld..%lld exceed n_ctx %d",
                        (long long) a->pos0, (long long) (a->pos0 + a->n_tokens), a->n_ctx);
    }
    return CKV_OK;
}

int32_t ckv_cuda_rope_kv(const struct cuda_rope_kv_args * a, cudaStream_t s) {
    TRY_OK(ckv_cuda_rope_kv_check(a));
    dim3 grid((unsigned) (a->n_head + 2 * a->n_head_kv), (unsigned) a->n_tokens);
    int  threads = a->head_dim / 2 < 32 ? 32 : (a->head_dim / 2 + 31) / 32 * 32;
    CKV_CUDA_CHECK(launch_pdl(rope_kv_kernel, grid, threads, a->head_dim * sizeof(float), s, *a));
    return CKV_OK;
}

// --- gated activations -----------------------------------------------------------------------

static __global__ void glu_kernel(float * gate, const float * up, int64_t n, bool gelu) {
    pdl_begin();
    int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) {
        return;
    }
    float g = gate[i];
    if (gelu) {
        const float sqrt_2_over_pi = 0.79788456080286535588f;
        gate[i] = 0.5f * g * (1.0f + tanhf(sqrt_2_over_pi * g * (1.0f + 0.044715f * g * g))) * up[i];
    } else {
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

int32_t ckv_cuda_glu(float * gate, const float * up, int64_t n, bool gelu, cudaStream_t s) {
    CKV_CUDA_CHECK(launch_pdl(glu_kernel, (unsigned) ((n + 255) / 256), 256, 0, s, gate, up, n, gelu));
    return CKV_OK;
}

// --- embedding lookup: one block per token, one thread per 8 values --------------------------

template <int T>
static __global__ void embed_kernel(const uint8_t * table, size_t row_size, int64_t n_embd,
                                    const int32_t * tokens, float scale, float * x) {
    pdl_begin();
    int64_t t = blockIdx.y;
    const uint8_t * row = table + (int64_t) tokens[t] * row_size;
    for (int64_t item = (int64_t) blockIdx.x * blockDim.x + threadIdx.x; item < n_embd / 8;
         item += (int64_t) gridDim.x * blockDim.x) {
        int64_t c = item >> 2;
        int     s = (int) (item & 3);
        float   v[8];
        dequant8<T>(row, c, s, v);
        float * dst = x + t * n_embd + c * 32;
        for (int i = 0; i < 4; i++) {
            // the CPU scales only when scale != 1; x * 1.0f is exact, so always scaling agrees
            dst[chunk_off0<T>(s) + i] = v[i] * scale;
            dst[chunk_off1<T>(s) + i] = v[4 + i] * scale;
        }
    }
}

int32_t ckv_cuda_embed(const struct cuda_weight * table, const int32_t * tokens, int64_t n_tokens,
                       float scale, float * x, cudaStream_t s) {
    if (table->n_in % 32 != 0 || n_tokens < 1) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "cuda embed: n_embd %lld not a multiple of 32",
                        (long long) table->n_in);
    }
    int64_t items = table->n_in / 8;
    dim3    grid((unsigned) ((items + 127) / 128), (unsigned) n_tokens);
    bool known = dispatch_type(table->type, [&]<int T>() {
        embed_kernel<T><<<grid, 128, 0, s>>>((const uint8_t *) table->data, table->row_size,
                                             table->n_in, tokens, scale, x);
    });
    if (!known) {
        return ckv_fail(CKV_ERR_UNSUPPORTED, "cuda embed: no kernel for ggml type %u", table->type);
    }
    CKV_CUDA_CHECK(cudaGetLastError());
    return CKV_OK;
}
