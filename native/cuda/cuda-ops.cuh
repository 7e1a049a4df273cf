// cuda-ops.cuh - host launchers of the CUDA forward-pass ops (internal). Each mirrors a CPU op
// of native/src/ops.c (its "CPU twin", named per launcher) on device pointers; tests/native/
// test-cuda-ops.cu compares every pair. Launchers check shapes, size the grid, launch on the
// given stream and return a ckv_status (CKV_ERR_CUDA / CKV_ERR_UNSUPPORTED via ckv_fail); they
// never synchronise or allocate.
#ifndef CKV_CUDA_OPS_CUH
#define CKV_CUDA_OPS_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

// One weight matrix on the device: n_out rows of n_in values in ggml type `type`.
struct cuda_weight {
    const void * data;      // [n_out][row_size bytes]
    uint32_t     type;      // ggml type id
    int64_t      n_in;      // ne[0]
    int64_t      n_out;     // ne[1]
    size_t       row_size;  // bytes per row
};

// Regroups a Q4_0 or Q6_K matrix in place into the GPU's CT_Q4_0_X8 / CT_Q6_K_X8 layout
// (common.cuh: 16-byte quant loads for the GEMV) when it applies (n_in % 256 == 0 for q4_0,
// % 2048 for q6_K; 16-byte aligned data) and sets w->type; other matrices are left as they are. Every op reads either layout; the op tests
// compare the regrouped matrix with the CPU twin on the original q4_0 bytes.
int32_t ckv_cuda_weight_repack(struct cuda_weight * w, cudaStream_t s);

// cuBLAS workspace of a context for the prefill GEMM. In builds with cuBLAS (CKV_HAVE_CUBLAS)
// a matmul of CKV_BLAS_MIN_TOKENS or more tokens given one dequantises its weight matrix to
// f16 in slices of rows that fit `bytes` (next to the f16 activations) and multiplies each
// slice with cublasGemmEx (f32 accumulation); without cuBLAS, or handle NULL, the WMMA kernel
// runs. Create before use (allocates), free with the context.
enum { CKV_BLAS_MIN_TOKENS = 32 };
// Up to this many tokens (a batched decode step, a short chunk) a matmul runs as GEMV: on
// regrouped q4_0 / q6_K weights with gemv_xq given, one launch over all the tokens, each weight
// load shared by them; otherwise the one-token GEMV per token. The tile kernel made for chunks
// runs far below bandwidth at this size (8B Q4_0, 4 tokens: ~80 ms a step).
enum { CKV_GEMV_MAX_TOKENS = 8 };
struct cuda_gemm_ws {
    void * handle;    // cublasHandle_t, or NULL
    void * scratch;   // device, `bytes`
    size_t bytes;
    void * gemv_xq;   // device, or NULL: the quantised inputs (cq8x) of a multi-token GEMV, at
    size_t gemv_xq_bytes;   // least CKV_GEMV_MAX_TOKENS rows of the widest input; set by the
                            // owner after create, freed by ckv_cuda_gemm_ws_free
};
bool    ckv_cuda_have_cublas(void);
// No cuBLAS in the build: ws zeroed and CKV_OK (callers then simply get the WMMA path).
int32_t ckv_cuda_gemm_ws_create(struct cuda_gemm_ws * ws, size_t bytes);
void    ckv_cuda_gemm_ws_free(struct cuda_gemm_ws * ws);

// y[t][r] (=|+=) dot(W row r, x[t]) + bias[r] for t < n_tokens. Twin: ops_matmul (+ ops_add).
struct cuda_matmul_args {
    const struct cuda_weight * w;
    const float * x;          // [n_tokens][w->n_in]
    float *       y;          // [n_tokens][ldy]
    int64_t       ldy;
    const float * bias;       // [n_out] or NULL
    int64_t       n_tokens;
    bool          accumulate; // y += instead of y =, fusing the residual add
    const float * norm_w;     // [n_in] or NULL: x is RMS-normalised (times norm_w) on the fly;
    float         norm_eps;   // n_tokens == 1 only (twin: ops_rmsnorm before ops_matmul)
    const void *  xq;         // NULL, or x already quantised (cq8x [n_in / 32], ckv_cuda_quantize_q8;
                              // n_tokens == 1): the int8 GEMV reads it instead of quantising x
    const struct cuda_gemm_ws * ws;  // NULL, or the cuBLAS workspace for n_tokens > 1 (see above)
};
// n_tokens == 1: GEMV with the dequantisation fused; otherwise tensor-core GEMM on f16 tiles
// (or cuBLAS, see cuda_gemm_ws).
int32_t ckv_cuda_matmul(const struct cuda_matmul_args * a, cudaStream_t s);
// The cuBLAS path of ckv_cuda_matmul (blas.cu; a->ws->handle set, n_tokens > 1).
int32_t ckv_cuda_gemm_blas(const struct cuda_matmul_args * a, cudaStream_t s);

// Several matmuls over the same input (q, k, v): one launch for a single token when the weights
// share type and n_in (no accumulate), else one ckv_cuda_matmul each. Twin: ops_matmul.
// The jobs' norm_w (all equal) is honoured as in ckv_cuda_matmul.
int32_t ckv_cuda_matmul_multi(const struct cuda_matmul_args * jobs, int n_jobs, cudaStream_t s);

// y = act(x . gate^T) * (x . up^T) [n_tokens][n_ff]: one fused launch for a single token when
// gate and up share type and shape; otherwise two matmuls (up into up_out) and ckv_cuda_glu.
// norm_w (or NULL) normalises x first as in cuda_matmul_args; n_tokens == 1 only. yq (or NULL;
// n_tokens == 1, n_out % 32 == 0) also receives y quantised as ckv_cuda_quantize_q8 would, the
// down projection's xq. Twin: ops_matmul + ops_silu_mul / ops_gelu_mul.
int32_t ckv_cuda_matmul_glu(const struct cuda_weight * gate, const struct cuda_weight * up,
                            const float * x, float * y, float * up_out, int64_t n_tokens, bool gelu,
                            const float * norm_w, float norm_eps, const void * xq, void * yq,
                            cudaStream_t s, const struct cuda_gemm_ws * ws = NULL);
// (xq: as in cuda_matmul_args, the quantised x, norm_w then NULL; ws: the prefill matmuls'.)

// y = x / rms(x) * w (y may be NULL; w NULL: y = x) and yq = y quantised as ckv_cuda_quantize_q8,
// one row of n (% 32 == 0) values, one launch: the decode step's input of the int8 GEMVs.
// y must not alias x (blocks read all of x while others write y). Twins: ops_rmsnorm,
// quantize_row_q8_1_ref.
int32_t ckv_cuda_rmsnorm_quantize_q8(float * y, void * yq, const float * x, const float * w, int64_t n,
                                     float eps, cudaStream_t s);

// xq = x [n] (n % 32 == 0) quantised to cq8x blocks (common.cuh): per 32 values d = amax / 127,
// qs = round-half-even(x * 127 / amax), s = d * sum(qs). Twin: quantize_row_q8_1_ref (the same
// qs; d and s kept as f32 instead of f16).
int32_t ckv_cuda_quantize_q8(const float * x, void * xq, int64_t n, cudaStream_t s);

// y[t] (=|+=) x[t] / rms(x[t]) * w. Twin: ops_rmsnorm (+ ops_add). y may alias x when !add.
int32_t ckv_cuda_rmsnorm(float * y, const float * x, const float * w, int64_t n_rows, int64_t n,
                         float eps, bool add, cudaStream_t s);

// The attention block's position step, one launch: optional per-head RMSNorm of q and k (weights
// q_norm / k_norm [head_dim], Gemma-3), RoPE of q in place and of k, and the f16 store of k and
// v to one layer of the cache ([n_head_kv][n_ctx][head_dim]) at positions pos0 + t.
// Twins: ops_rmsnorm per head, ops_rope, kv_cache_store.
struct cuda_rope_kv_args {
    float *         q;          // [n_tokens][n_head][head_dim], rotated in place
    const float *   k;          // [n_tokens][n_head_kv][head_dim]
    const float *   v;
    __half *        k_cache;    // one layer
    __half *        v_cache;
    int64_t         n_tokens;
    int32_t         n_head, n_head_kv, head_dim, n_rot, n_ctx;
    int64_t         pos0;
    float           theta_scale;   // powf(base, -2 / n_rot), computed on the host like the CPU
    float           freq_scale;
    const float *   freq_factors;  // device [n_rot/2] or NULL
    bool            neox;
    const float *   q_norm;        // device [head_dim] or NULL
    const float *   k_norm;
    float           eps;
    const int32_t * pos_dev;       // device copy of pos0 that overrides it when set (graph replay)
};
int32_t ckv_cuda_rope_kv(const struct cuda_rope_kv_args * a, cudaStream_t s);
int32_t ckv_cuda_rope_kv_check(const struct cuda_rope_kv_args * a);   // the shape and position checks

// gate = act(gate) * up over n values, act = silu or gelu(tanh). Twins: ops_silu_mul, ops_gelu_mul.
int32_t ckv_cuda_glu(float * gate, const float * up, int64_t n, bool gelu, cudaStream_t s);

// x[t] = dequant(embedding row tokens[t]) * scale. Twin: embed_tokens in forward.c.
int32_t ckv_cuda_embed(const struct cuda_weight * table, const int32_t * tokens, int64_t n_tokens,
                       float scale, float * x, cudaStream_t s);

// Causal attention of q [n_tokens][n_head][head_dim] (positions pos0 + t) over one layer of the
// f16 cache, which holds positions [0, pos0 + n_tokens). Below CKV_FLASH_MIN_TOKENS queries,
// each query's positions are split into up to n_split ranges processed by separate blocks
// (flash-decode) and merged by a second kernel; from CKV_FLASH_MIN_TOKENS on, a tensor-core
// flash-attention kernel (f16 q and probabilities, f32 accumulation) ignores n_split.
// Twin: ops_attention.
enum { CKV_FLASH_MIN_TOKENS = 16 };
struct cuda_attention_args {
    const float *  q;
    const __half * k_cache;   // [n_head_kv][n_ctx][head_dim]
    const __half * v_cache;
    float *        out;       // [n_tokens][n_head][head_dim]
    float *        partial;   // [n_tokens][n_head][n_split][partial_floats] scratch (n_split > 1)
    int64_t        n_tokens;
    int64_t        pos0;
    int32_t        n_ctx;
    int32_t        n_head;
    int32_t        n_head_kv;
    int32_t        head_dim;  // 64, 128 or 256
    int32_t        window;    // > 0: each query sees its last `window` positions
    int32_t        n_split;   // >= 1
    float          scale;
    const int32_t * pos_dev;  // device copy of pos0 that overrides it when set (graph replay)
    void *         out_q;     // NULL, or out also quantised (cq8x [n_tokens][n_head * head_dim / 32],
                              // as ckv_cuda_quantize_q8): the out-projection's int8 GEMV input,
                              // without a launch of its own. Decode kernel only (n_tokens <
                              // CKV_FLASH_MIN_TOKENS). Twin: quantize_row_q8_1_ref.
    struct cuda_rope_kv_args rope;   // rope.k NULL, or one decode token (n_tokens 1, no q/k norm):
                              // the decode kernel does ckv_cuda_rope_kv(&rope)'s work itself, one
                              // launch fewer. q (== rope.q) is then the unrotated query, the
                              // new position's K/V row comes from rope.k / rope.v and is stored
                              // by the kernel, and the loads of the older rows start before the
                              // PDL wait: they must have been written by an earlier forward,
                              // which ended with a stream synchronisation.
    int32_t        heads_per_block;   // decode kernel: 0 = a block serves its KV head's whole
                              // group of query heads (up to 8), reading each K/V row once for
                              // all; 1 = one query head per block (see ckv_cuda_attention_narrow)
};
int32_t ckv_cuda_attention(const struct cuda_attention_args * a, cudaStream_t s);

// Whether one decode token over n_kv positions should run one query head per block: while the
// default grid (a block per KV head and 64-position split) leaves some of the n_sm SMs idle,
// more blocks with a quarter of the serial per-head work each finish sooner; once the grid
// fills the GPU, re-reading each K/V row per head costs more (H100, NOTES pass 17: +4% 8B at
// depth ~600, +12% SmolLM2 at 2048, -6% 8B at 2048). Never for group size 1 (no change).
int32_t ckv_cuda_attention_narrow(int32_t n_head, int32_t n_head_kv, int64_t n_kv, int32_t n_sm);

// Streaming multiprocessors of the current device (132 if it cannot be read).
int32_t ckv_cuda_sm_count(void);

// Floats per split's partial result: head_dim outputs, the running max and sum, padding that
// keeps every slot 16-byte aligned.
static inline __host__ __device__ int64_t ckv_cuda_attention_partial_floats(int64_t head_dim) {
    return head_dim + 4;
}

// Splits the attention of n_tokens queries whose longest range is n_kv positions so that the
// partial buffer of `partial_cap` slots (ckv_cuda_attention_partial_floats each) suffices.
int32_t ckv_cuda_attention_splits(int64_t n_tokens, int32_t n_head, int64_t n_kv, int64_t partial_cap);

#endif  // CKV_CUDA_OPS_CUH
