// backend.cu - the CUDA backend behind cuda-backend.h: weight upload, device context (f16 KV
// cache, activation scratch, stream) and the forward pass, which mirrors native/src/forward.c
// step for step (same op order, same architecture switches) with the ops of cuda-ops.cuh.
// Residual adds are fused into the producing op (matmul accumulate, RMSNorm add).
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.cuh"
#include "cuda-backend.h"
#include "cuda-ops.cuh"
#include "kvpolicy.cuh"

extern "C" {
#include "model.h"
}

// --- device / weights ------------------------------------------------------------------------

struct cuda_layer {
    struct cuda_weight attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down;
    const float *attn_norm, *ffn_norm, *post_attention_norm, *post_ffw_norm;   // [n_embd]
    const float *attn_q_norm, *attn_k_norm;                                    // [head_dim]
    const float *attn_q_bias, *attn_k_bias, *attn_v_bias;                      // [q_dim], [kv_dim]
};

struct cuda_model {
    const struct ckv_model * host;
    struct hparams           hp;
    void *                   arena;      // every tensor below, 256-byte aligned
    uint64_t                 arena_size;
    struct cuda_weight       token_embd, output;
    const float *            output_norm;
    const float *            rope_freqs;  // [n_rot/2] or NULL
    struct cuda_layer *      layers;      // host array [n_layer] of device pointers
};

extern "C" int32_t ckv_cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();   // clear the sticky "no driver" error
        return 0;
    }
    return n;
}

extern "C" const char * ckv_cuda_device_name(void) {
    static char name[256];
    cudaDeviceProp prop;
    int            n = 0;
    cudaError_t    err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess || n == 0) {
        snprintf(name, sizeof(name), "no CUDA device (%s)",
                 err != cudaSuccess ? cudaGetErrorString(err) : "none found");
        cudaGetLastError();
    } else if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) {
        snprintf(name, sizeof(name), "%s, %.1f GiB, sm_%d%d", prop.name,
                 (double) prop.totalGlobalMem / (1 << 30), prop.major, prop.minor);
    }
    return name;
}

static size_t align256(size_t n) { return (n + 255) & ~(size_t) 255; }

static size_t weight_bytes(const struct weight * w) {
    return w->data ? (size_t) w->ne[1] * w->row_size : 0;
}
// Bytes of a vector tensor (norm or bias: F32, ne[1] == 1).
static size_t vector_bytes(const struct weight * w) {
    return w->data ? (size_t) w->ne[0] * w->ne[1] * sizeof(float) : 0;
}

// Walks every tensor of the model, calling visit(host weight, is_matrix, device slot).
template <typename Fn> static void for_each_tensor(struct cuda_model * gm, Fn && visit) {
    const struct ckv_model * m = gm->host;
    visit(&m->token_embd, true, (void *) &gm->token_embd);
    if (m->output.data != m->token_embd.data) {
        visit(&m->output, true, (void *) &gm->output);
    }
    visit(&m->output_norm, false, (void *) &gm->output_norm);
    for (int il = 0; il < m->hp.n_layer; il++) {
        const struct layer_weights * L = &m->layers[il];
        struct cuda_layer *          G = &gm->layers[il];
        const struct weight * mats[] = {&L->attn_q, &L->attn_k, &L->attn_v, &L->attn_output,
                                        &L->ffn_gate, &L->ffn_up, &L->ffn_down};
        struct cuda_weight * gmats[] = {&G->attn_q, &G->attn_k, &G->attn_v, &G->attn_output,
                                        &G->ffn_gate, &G->ffn_up, &G->ffn_down};
        for (int i = 0; i < 7; i++) visit(mats[i], true, (void *) gmats[i]);
        const struct weight * vecs[] = {&L->attn_norm, &L->ffn_norm, &L->post_attention_norm,
                                        &L->post_ffw_norm, &L->attn_q_norm, &L->attn_k_norm,
                                        &L->attn_q_bias, &L->attn_k_bias, &L->attn_v_bias};
        const float ** gvecs[] = {&G->attn_norm, &G->ffn_norm, &G->post_attention_norm,
                                  &G->post_ffw_norm, &G->attn_q_norm, &G->attn_k_norm,
                                  &G->attn_q_bias, &G->attn_k_bias, &G->attn_v_bias};
        for (int i = 0; i < 9; i++) visit(vecs[i], false, (void *) gvecs[i]);
    }
}

static int32_t check_model(const struct ckv_model * m) {
    const struct hparams * hp = &m->hp;
    if (hp->head_dim != 64 && hp->head_dim != 128 && hp->head_dim != 256) {
        return ckv_fail(CKV_ERR_UNSUPPORTED, "CUDA backend: head size %d has no attention kernel "
                        "(64, 128, 256)", hp->head_dim);
    }
    if (hp->n_embd % 32 || hp->n_ff % 32) {
        return ckv_fail(CKV_ERR_UNSUPPORTED, "CUDA backend: n_embd %d and n_ff %d must be multiples "
                        "of 32", hp->n_embd, hp->n_ff);
    }
    return CKV_OK;
}

// Q4_0 matrices of the layers (and an untied output head) to the GPU's regrouped layout, which
// the decode GEMV reads with 16-byte loads (ckv_cuda_weight_repack); the embedding table stays
// as in the file. CKV_REPACK=0 keeps the file layout (for comparison).
static int32_t regroup_weights(struct cuda_model * gm) {
    const char * env = getenv("CKV_REPACK");
    if (env && strcmp(env, "0") == 0) {
        return CKV_OK;
    }
    for (int il = 0; il < gm->hp.n_layer; il++) {
        struct cuda_layer *  G = &gm->layers[il];
        struct cuda_weight * mats[] = {&G->attn_q, &G->attn_k, &G->attn_v, &G->attn_output,
                                       &G->ffn_gate, &G->ffn_up, &G->ffn_down};
        for (struct cuda_weight * w : mats) {
            if (w->data) TRY_OK(ckv_cuda_weight_repack(w, 0));
        }
    }
    if (gm->output.data && gm->output.data != gm->token_embd.data) {
        TRY_OK(ckv_cuda_weight_repack(&gm->output, 0));
    }
    CKV_CUDA_CHECK(cudaDeviceSynchronize());
    return CKV_OK;
}

extern "C" int32_t ckv_cuda_model_create(const struct ckv_model * m, struct cuda_model ** out) {
    *out = NULL;
    if (ckv_cuda_device_count() == 0) {
        return ckv_fail(CKV_ERR_CUDA, "n_gpu_layers != 0 but %s", ckv_cuda_device_name());
    }
    int32_t st = check_model(m);
    if (st != CKV_OK) {
        return st;
    }
    struct cuda_model * gm = (struct cuda_model *) calloc(1, sizeof(*gm));
    struct cuda_layer * layers = (struct cuda_layer *) calloc((size_t) m->hp.n_layer, sizeof(*layers));
    if (!gm || !layers) {
        free(gm);
        free(layers);
        return ckv_fail(CKV_ERR_OOM, "out of host memory for the CUDA model");
    }
    gm->host = m;
    gm->hp = m->hp;
    gm->layers = layers;
    // Pass 1: check types and size the arena; pass 2: copy.
    size_t total = m->rope_freqs ? align256((size_t) m->hp.n_rot / 2 * sizeof(float)) : 0;
    const struct weight * bad = NULL;
    for_each_tensor(gm, [&](const struct weight * w, bool matrix, void *) {
        if (matrix && w->data && !cuda_type_supported(w->type)) bad = w;
        total += align256(matrix ? weight_bytes(w) : vector_bytes(w));
    });
    if (bad) {
        ckv_cuda_model_free(gm);
        return ckv_fail(CKV_ERR_UNSUPPORTED, "CUDA backend: no kernels for weight type %u", bad->type);
    }
    size_t free_b = 0, total_b = 0;
    CKV_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    if (total > free_b || cudaMalloc(&gm->arena, total) != cudaSuccess) {
        cudaGetLastError();
        ckv_cuda_model_free(gm);
        return ckv_fail(CKV_ERR_OOM, "the model needs %.1f MiB of GPU memory, %.1f MiB are free on %s",
                        total / 1048576.0, free_b / 1048576.0, ckv_cuda_device_name());
    }
    gm->arena_size = total;
    char *      cursor = (char *) gm->arena;
    cudaError_t err = cudaSuccess;
    for_each_tensor(gm, [&](const struct weight * w, bool matrix, void * slot) {
        size_t bytes = matrix ? weight_bytes(w) : vector_bytes(w);
        void * dst = bytes ? cursor : NULL;
        if (bytes && err == cudaSuccess) err = cudaMemcpy(dst, w->data, bytes, cudaMemcpyHostToDevice);
        cursor += align256(bytes);
        if (matrix) {
            struct cuda_weight * g = (struct cuda_weight *) slot;
            *g = {dst, w->type, w->ne[0], w->ne[1], w->row_size};
        } else {
            *(const float **) slot = (const float *) dst;
        }
    });
    if (m->output.data == m->token_embd.data) {
        gm->output = gm->token_embd;
    }
    if (m->rope_freqs && err == cudaSuccess) {
        err = cudaMemcpy(cursor, m->rope_freqs, (size_t) m->hp.n_rot / 2 * sizeof(float),
                         cudaMemcpyHostToDevice);
        gm->rope_freqs = (const float *) cursor;
    }
    if (err != cudaSuccess) {
        ckv_cuda_model_free(gm);
        return ckv_fail(CKV_ERR_CUDA, "copying the weights to the GPU failed: %s", cudaGetErrorString(err));
    }
    st = regroup_weights(gm);
    if (st != CKV_OK) {
        ckv_cuda_model_free(gm);
        return st;
    }
    *out = gm;
    return CKV_OK;
}

extern "C" void ckv_cuda_model_free(struct cuda_model * gm) {
    if (!gm) {
        return;
    }
    cudaFree(gm->arena);
    free(gm->layers);
    free(gm);
}

extern "C" uint64_t ckv_cuda_model_size(const struct cuda_model * gm) { return gm->arena_size; }

// --- context ---------------------------------------------------------------------------------

enum { LOGITS_ROWS = 64 };

struct cuda_seq {
    __half *       k_cache;    // [layers on the GPU][n_head_kv][n_ctx][head_dim] f16
    __half *       v_cache;
    __half *       h_k;        // kv_offload: pinned, mapped [layers in host memory][n_head_kv][n_ctx][head_dim]
    __half *       h_v;
    const __half ** k_layers;  // host [n_layer]: each layer's rows, device addresses
    const __half ** v_layers;
    struct cuda_kv_policy * policy;   // the KV policy of decode steps (NULL: full)
};  // output-head rows per chunk: bounds the logits buffer (vocab 262k)

struct cuda_context {
    const struct cuda_model * gm;
    int32_t      n_ctx, n_batch;
    cudaStream_t stream;
    // Sequences (n_seq_max): each its own KV cache and policy; cur is the one a single-sequence
    // forward runs on (ckv_cuda_decode selects it), a batch picks one per token.
    int32_t            n_seq;
    struct cuda_seq *  seqs;
    struct cuda_seq *  cur;
    // kv_offload (one sequence): the K/V of the layers marked in kv_on_host live in pinned host
    // memory, mapped into the device's address space (decode writes a token's row there over
    // PCIe; the policy fetches the selected rows). A prefill chunk copies such a layer's earlier
    // rows to the staging buffer, attends there and copies its new rows back: one layer's K/V
    // on the GPU.
    bool *       kv_on_host;   // host [n_layer]
    __half *     stage_k;      // [n_head_kv][n_ctx][head_dim], NULL without offload
    __half *     stage_v;
    uint64_t     kv_device_bytes, kv_host_bytes;
    int32_t *    tokens;     // [n_batch]
    float *x, *xb, *xb2;     // [n_batch][n_embd]
    float *q, *att;          // [n_batch][n_head * head_dim]
    float *k, *v;            // [n_batch][n_head_kv * head_dim]
    float *hb, *hb2;         // [n_batch][n_ff]
    void *       hq;         // cq8x [n_ff / 32]: one token's hb quantised for the int8 GEMV
    void *       xq;         // cq8x [max(n_embd, q_dim) / 32]: one token's GEMV input, quantised
    float *      logits;     // [LOGITS_ROWS][n_vocab]
    float *      partial;    // [partial_cap][head_dim + 4] flash-decode partial results
    int64_t      partial_cap;
    // One-token decode replays a captured CUDA graph: its kernels read the position from d_pos
    // and the token from d_tokens, both copied in from pinned memory inside the graph, so one
    // capture serves every position (attention uses a fixed split count for n_ctx).
    int32_t *       d_pos;        // device [1]
    int32_t *       h_step;       // pinned [2]: token, position
    float *         h_logits;     // pinned [n_vocab]
    bool            use_graph;    // CKV_CUDA_GRAPH=0 turns graphs off (for comparison)
    struct cuda_gemm_ws blas;     // prefill GEMMs through cuBLAS (handle NULL: WMMA kernel)
    cudaGraphExec_t decode_graph; // NULL until the first one-token decode
    // The graph bakes in one sequence's cache and its policy's cluster layout, so it is
    // re-captured for another sequence or when cuda_kv_policy_layout moves past graph_layout.
    // It also bakes in the decode attention's grid, chosen for the length graph_len (see
    // narrow_attention), and is re-captured when the choice for the current length differs.
    int32_t         graph_seq;
    uint64_t        graph_layout;
    int64_t         graph_len;
    int32_t         graph_narrow;
    // A batch step (n_seq > 1) replays its own graph: tokens and positions come from h_batch
    // through d_batch_pos, logits go to h_batch_logits. It bakes in which sequence each row
    // belongs to and their policies' layouts (batch_key), and is re-captured when those change.
    cudaGraphExec_t batch_graph;
    int32_t         batch_n;
    int32_t *       batch_seqs;      // host [n_seq]: the captured rows' sequences
    uint64_t *      batch_layouts;   // host [n_seq]: their layouts at capture
    int32_t *       h_batch;         // pinned [2 * n_seq]: tokens, then positions
    int32_t *       d_batch_pos;     // device [n_seq]
    float *         h_batch_logits;  // pinned [n_seq][n_vocab]
    // A batch step runs each row's attention (RoPE and KV write, selection, decode) on a stream
    // of its own, forked from `stream` after the QKV projections and joined before the output
    // projection, with its own slice of `partial`: the rows' small launches run side by side.
    cudaStream_t *  row_streams;     // [n_seq]
    cudaEvent_t     rows_fork;
    cudaEvent_t *   rows_join;       // [n_seq]
    bool            decode_step;  // the running forward is a decode step (policy applies)
};

// Where each layer's K/V live: GPU layers in the sequence's k_cache / v_cache, kv_on_host layers
// in its h_k / h_v (pinned and mapped), both in layer order. Allocates both.
static int32_t place_kv(struct cuda_context * gc, struct cuda_seq * sq) {
    const struct hparams * hp = &gc->gm->hp;
    const size_t layer_elems = (size_t) hp->n_head_kv * gc->n_ctx * hp->head_dim;
    sq->k_layers = (const __half **) calloc((size_t) hp->n_layer, sizeof(__half *));
    sq->v_layers = (const __half **) calloc((size_t) hp->n_layer, sizeof(__half *));
    if (!sq->k_layers || !sq->v_layers) {
        return ckv_fail(CKV_ERR_OOM, "out of host memory for the CUDA context");
    }
    size_t n_host = 0;
    for (int il = 0; il < hp->n_layer; il++) n_host += gc->kv_on_host[il];
    const size_t gpu_bytes = (hp->n_layer - n_host) * layer_elems * sizeof(__half);
    if (cudaMalloc(&sq->k_cache, gpu_bytes) != cudaSuccess || cudaMalloc(&sq->v_cache, gpu_bytes) != cudaSuccess) {
        cudaGetLastError();
        return ckv_fail(CKV_ERR_OOM, "the KV cache (n_ctx %d, %d sequences) needs %.1f MiB of GPU memory per "
                        "sequence: out of memory on %s", gc->n_ctx, gc->n_seq, 2.0 * gpu_bytes / 1048576.0,
                        ckv_cuda_device_name());
    }
    gc->kv_device_bytes += 2 * gpu_bytes;
    __half * hk = NULL, * hv = NULL;
    if (n_host > 0) {
        size_t bytes = n_host * layer_elems * sizeof(__half);
        if (cudaHostAlloc(&sq->h_k, bytes, cudaHostAllocMapped) != cudaSuccess ||
            cudaHostAlloc(&sq->h_v, bytes, cudaHostAllocMapped) != cudaSuccess) {
            cudaGetLastError();
            return ckv_fail(CKV_ERR_OOM, "kv_offload: %.1f MiB of pinned host memory for the KV cache of %zu "
                            "layers (n_ctx %d): out of memory", 2.0 * bytes / 1048576.0, n_host, gc->n_ctx);
        }
        gc->kv_host_bytes += 2 * bytes;
        CKV_CUDA_CHECK(cudaHostGetDevicePointer((void **) &hk, sq->h_k, 0));
        CKV_CUDA_CHECK(cudaHostGetDevicePointer((void **) &hv, sq->h_v, 0));
    }
    for (int il = 0, on_gpu = 0, on_host = 0; il < hp->n_layer; il++) {
        if (gc->kv_on_host[il]) {
            sq->k_layers[il] = hk + on_host * layer_elems;
            sq->v_layers[il] = hv + on_host++ * layer_elems;
        } else {
            sq->k_layers[il] = sq->k_cache + on_gpu * layer_elems;
            sq->v_layers[il] = sq->v_cache + on_gpu++ * layer_elems;
        }
    }
    return CKV_OK;
}

static void free_seq(struct cuda_seq * sq) {
    cuda_kv_policy_free(sq->policy);
    cudaFree(sq->k_cache);
    cudaFree(sq->v_cache);
    cudaFreeHost(sq->h_k);
    cudaFreeHost(sq->h_v);
    free((void *) sq->k_layers);
    free((void *) sq->v_layers);
}

extern "C" int32_t ckv_cuda_context_create(const struct cuda_model * gm, int32_t n_ctx, int32_t n_batch,
                                           int32_t n_seq, const bool * offload_layers,
                                           struct cuda_context ** out) {
    *out = NULL;
    if (n_ctx < 1 || n_batch < 1 || n_seq < 1 || (n_seq > 1 && offload_layers)) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "cuda context: n_ctx %d, n_batch %d and n_seq %d must be >= 1 "
                        "(one sequence under kv_offload)", n_ctx, n_batch, n_seq);
    }
    struct cuda_context * gc = (struct cuda_context *) calloc(1, sizeof(*gc));
    if (!gc) {
        return ckv_fail(CKV_ERR_OOM, "out of host memory for the CUDA context");
    }
    const struct hparams * hp = &gm->hp;
    gc->gm = gm;
    gc->n_ctx = n_ctx;
    gc->n_batch = n_batch;
    gc->n_seq = n_seq;
    gc->graph_seq = -1;
    int64_t q_dim = (int64_t) hp->n_head * hp->head_dim, kv_dim = (int64_t) hp->n_head_kv * hp->head_dim;
    int64_t per_split_decode = ((int64_t) n_ctx + 255) / 256;
    gc->partial_cap = (int64_t) hp->n_head * (per_split_decode > 2 * n_batch ? per_split_decode : 2 * n_batch);
    int32_t n_host_layers = 0;
    for (int il = 0; il < hp->n_layer; il++) {
        n_host_layers += offload_layers && offload_layers[il];
    }
    size_t stage_bytes = n_host_layers ? (size_t) kv_dim * n_ctx * sizeof(__half) : 0;
    struct { void ** p; size_t bytes; } bufs[] = {
        {(void **) &gc->stage_k, stage_bytes}, {(void **) &gc->stage_v, stage_bytes},
        {(void **) &gc->tokens, sizeof(int32_t) * n_batch},
        {(void **) &gc->x, sizeof(float) * n_batch * hp->n_embd},
        {(void **) &gc->xb, sizeof(float) * n_batch * hp->n_embd},
        {(void **) &gc->xb2, sizeof(float) * n_batch * hp->n_embd},
        {(void **) &gc->q, sizeof(float) * n_batch * q_dim},
        {(void **) &gc->att, sizeof(float) * n_batch * q_dim},
        {(void **) &gc->k, sizeof(float) * n_batch * kv_dim},
        {(void **) &gc->v, sizeof(float) * n_batch * kv_dim},
        {(void **) &gc->hb, sizeof(float) * n_batch * hp->n_ff},
        {(void **) &gc->hb2, sizeof(float) * n_batch * hp->n_ff},
        {(void **) &gc->hq, sizeof(cq8x) * (hp->n_ff / 32)},
        {(void **) &gc->xq, sizeof(cq8x) * ((q_dim > hp->n_embd ? q_dim : hp->n_embd) / 32)},
        {(void **) &gc->logits, sizeof(float) * LOGITS_ROWS * hp->n_vocab},
        {(void **) &gc->partial, sizeof(float) * gc->partial_cap * ckv_cuda_attention_partial_floats(hp->head_dim)},
    };
    size_t total = 0;
    for (auto & b : bufs) total += b.bytes;
    gc->kv_device_bytes = 2 * stage_bytes;
    gc->seqs = (struct cuda_seq *) calloc((size_t) n_seq, sizeof(struct cuda_seq));
    gc->kv_on_host = (bool *) calloc((size_t) hp->n_layer, sizeof(bool));
    if (!gc->seqs || !gc->kv_on_host) {
        ckv_cuda_context_free(gc);
        return ckv_fail(CKV_ERR_OOM, "out of host memory for the CUDA context");
    }
    gc->cur = &gc->seqs[0];
    for (int il = 0; il < hp->n_layer; il++) gc->kv_on_host[il] = offload_layers && offload_layers[il];
    for (auto & b : bufs) {
        if (b.bytes && cudaMalloc(b.p, b.bytes) != cudaSuccess) {
            cudaGetLastError();
            ckv_cuda_context_free(gc);
            return ckv_fail(CKV_ERR_OOM, "the CUDA context (n_ctx %d, n_batch %d) needs %.1f MiB of GPU "
                            "memory besides the KV cache: out of memory on %s", n_ctx, n_batch,
                            total / 1048576.0, ckv_cuda_device_name());
        }
    }
    for (int32_t i = 0; i < n_seq; i++) {
        int32_t placed = place_kv(gc, &gc->seqs[i]);
        if (placed != CKV_OK) {
            ckv_cuda_context_free(gc);
            return placed;
        }
    }
    cudaError_t err = cudaStreamCreateWithFlags(&gc->stream, cudaStreamNonBlocking);
    if (err == cudaSuccess) err = cudaMalloc(&gc->d_pos, sizeof(int32_t));
    if (err == cudaSuccess) err = cudaMallocHost(&gc->h_step, 2 * sizeof(int32_t));
    if (err == cudaSuccess) err = cudaMallocHost(&gc->h_logits, sizeof(float) * hp->n_vocab);
    if (err == cudaSuccess && n_seq > 1) {   // batch-step graphs
        gc->batch_seqs    = (int32_t *) calloc((size_t) n_seq, sizeof(int32_t));
        gc->batch_layouts = (uint64_t *) calloc((size_t) n_seq, sizeof(uint64_t));
        err = gc->batch_seqs && gc->batch_layouts ? cudaSuccess : cudaErrorMemoryAllocation;
        if (err == cudaSuccess) err = cudaMallocHost(&gc->h_batch, 2 * sizeof(int32_t) * n_seq);
        if (err == cudaSuccess) err = cudaMalloc(&gc->d_batch_pos, sizeof(int32_t) * n_seq);
        if (err == cudaSuccess) err = cudaMallocHost(&gc->h_batch_logits, sizeof(float) * n_seq * hp->n_vocab);
        gc->row_streams = (cudaStream_t *) calloc((size_t) n_seq, sizeof(cudaStream_t));
        gc->rows_join   = (cudaEvent_t *) calloc((size_t) n_seq, sizeof(cudaEvent_t));
        if (err == cudaSuccess && (!gc->row_streams || !gc->rows_join)) err = cudaErrorMemoryAllocation;
        if (err == cudaSuccess) err = cudaEventCreateWithFlags(&gc->rows_fork, cudaEventDisableTiming);
        for (int32_t i = 0; err == cudaSuccess && i < n_seq; i++) {
            err = cudaStreamCreateWithFlags(&gc->row_streams[i], cudaStreamNonBlocking);
            if (err == cudaSuccess) err = cudaEventCreateWithFlags(&gc->rows_join[i], cudaEventDisableTiming);
        }
    }
    const char * env = getenv("CKV_CUDA_GRAPH");
    gc->use_graph = !(env && strcmp(env, "0") == 0);
    // cuBLAS scratch: the chunk's activations in f16 plus 128 MiB of f16 weight rows per slice.
    // Optional: without it (no cuBLAS, CKV_CUBLAS=0, or no room) prefill uses the WMMA kernel.
    // The widest matmul input: n_embd, q_dim (out projection) or n_ff (down projection).
    int64_t widest = hp->n_ff > q_dim ? hp->n_ff : q_dim;
    widest = widest > hp->n_embd ? widest : hp->n_embd;
    const char * blas_env = getenv("CKV_CUBLAS");
    if (err == cudaSuccess && ckv_cuda_have_cublas() && n_batch >= CKV_BLAS_MIN_TOKENS &&
        !(blas_env && strcmp(blas_env, "0") == 0)) {
        size_t bytes = ((size_t) n_batch * widest * sizeof(__half) + 255) / 256 * 256 + ((size_t) 128 << 20);
        if (ckv_cuda_gemm_ws_create(&gc->blas, bytes) != CKV_OK) {
            gc->blas = {};   // not fatal: the WMMA kernel serves
        }
    }
    if (err == cudaSuccess && n_batch > 1) {   // batched decode steps: the multi-token GEMV's inputs
        gc->blas.gemv_xq_bytes = sizeof(cq8x) * (size_t) CKV_GEMV_MAX_TOKENS * (widest / 32);
        err = cudaMalloc(&gc->blas.gemv_xq, gc->blas.gemv_xq_bytes);
    }
    if (err != cudaSuccess) {
        ckv_cuda_context_free(gc);
        return ckv_fail(CKV_ERR_CUDA, "creating the CUDA stream or pinned buffers failed: %s",
                        cudaGetErrorString(err));
    }
    *out = gc;
    return CKV_OK;
}

// The captured graphs attend through the policies' buffers: dropped when a policy is replaced
// (and with the context).
static void drop_graphs(struct cuda_context * gc) {
    if (gc->decode_graph) {
        cudaGraphExecDestroy(gc->decode_graph);
        gc->decode_graph = NULL;
    }
    if (gc->batch_graph) {
        cudaGraphExecDestroy(gc->batch_graph);
        gc->batch_graph = NULL;
    }
}

extern "C" void ckv_cuda_context_free(struct cuda_context * gc) {
    if (!gc) {
        return;
    }
    if (gc->stream) {
        cudaStreamSynchronize(gc->stream);
        cudaStreamDestroy(gc->stream);
    }
    for (int32_t i = 0; gc->row_streams && i < gc->n_seq; i++) {
        if (gc->row_streams[i]) cudaStreamDestroy(gc->row_streams[i]);
        if (gc->rows_join[i]) cudaEventDestroy(gc->rows_join[i]);
    }
    if (gc->rows_fork) cudaEventDestroy(gc->rows_fork);
    free(gc->row_streams);
    free(gc->rows_join);
    drop_graphs(gc);
    free(gc->batch_seqs);
    free(gc->batch_layouts);
    cudaFreeHost(gc->h_batch);
    cudaFreeHost(gc->h_batch_logits);
    cudaFree(gc->d_batch_pos);
    for (int32_t i = 0; gc->seqs && i < gc->n_seq; i++) free_seq(&gc->seqs[i]);
    free(gc->seqs);
    ckv_cuda_gemm_ws_free(&gc->blas);
    void * ptrs[] = {gc->tokens, gc->x, gc->xb, gc->xb2, gc->q, gc->att,
                     gc->k, gc->v, gc->hb, gc->hb2, gc->hq, gc->xq, gc->logits, gc->partial, gc->d_pos,
                     gc->stage_k, gc->stage_v};
    for (void * p : ptrs) cudaFree(p);
    free(gc->kv_on_host);
    cudaFreeHost(gc->h_step);
    cudaFreeHost(gc->h_logits);
    free(gc);
}

// --- forward ---------------------------------------------------------------------------------

static int32_t matmul(struct cuda_context * gc, const struct cuda_weight * w, const float * x,
                      float * y, const float * bias, int64_t n, bool accumulate) {
    struct cuda_matmul_args a = {w, x, y, w->n_out, bias, n, accumulate, NULL, 0.0f, NULL, &gc->blas};
    return ckv_cuda_matmul(&a, gc->stream);
}

// Where one row's (or one chunk's) attention runs: a stream and the split-K scratch it may use.
// A batch step's rows run side by side and fill the GPU together, so their lanes keep the
// default decode grid (one_row false).
struct attn_lane {
    cudaStream_t s;
    float *      partial;
    int64_t      partial_cap;
    bool         one_row;
};

static attn_lane main_lane(const struct cuda_context * gc) { return {gc->stream, gc->partial, gc->partial_cap, true}; }

// Row t of an n-row batch step: its stream and an n-th of the scratch.
static attn_lane row_lane(const struct cuda_context * gc, int64_t t, int64_t n) {
    const int64_t slice = gc->partial_cap / n;
    const size_t  floats = (size_t) ckv_cuda_attention_partial_floats(gc->gm->hp.head_dim);
    return {gc->row_streams[t], gc->partial + (size_t) t * slice * floats, slice, false};
}

// One query head per decode attention block for one token over len positions of a layer with
// this window (0: none), see ckv_cuda_attention_narrow. Off unless CKV_ATT_NARROW=1 until its
// test-cuda-ops cases and the A/B have run on a GPU (written in a session without one; the
// speed-up is pass 17's measurement of one head per block at every depth).
static bool narrow_attention(const struct cuda_context * gc, int64_t len, int32_t window) {
    static int on = -1;
    if (on < 0) {
        const char * e = getenv("CKV_ATT_NARROW");
        on = e && strcmp(e, "1") == 0;
    }
    const struct hparams * hp = &gc->gm->hp;
    int64_t n_kv = window > 0 && len > window ? window : len;
    return on && ckv_cuda_attention_narrow(hp->n_head, hp->n_head_kv, n_kv, ckv_cuda_sm_count());
}

// The decode grids a one-token step at length len uses, one bit per kind of layer (full,
// sliding-window): what a captured graph bakes in.
static int32_t narrow_key(const struct cuda_context * gc, int64_t len) {
    const struct hparams * hp = &gc->gm->hp;
    return (narrow_attention(gc, len, 0) ? 1 : 0) | (hp->n_swa > 0 && narrow_attention(gc, len, hp->n_swa) ? 2 : 0);
}

// Attention of layer il for query rows q (n tokens at pos0..) over every cached position (or
// its window) into out, also quantised into xq when it is not NULL. rope NULL: q is rotated and
// the rows are stored; otherwise (one token) the decode kernel does that work of *rope itself.
static int32_t dense_attention(struct cuda_context * gc, const attn_lane & lane, int il, const float * q, float * out,
                               const __half * k_rows, const __half * v_rows, int64_t n, int64_t pos0,
                               const int32_t * pos_dev, const void * xq, const struct cuda_rope_kv_args * rope) {
    const struct hparams * hp = &gc->gm->hp;
    int32_t window = hparams_is_swa_layer(hp, il) ? hp->n_swa : 0;
    int64_t n_kv = pos_dev ? gc->n_ctx : pos0 + n;  // a graph serves every position up to n_ctx
    if (window > 0 && n_kv > window) {
        n_kv = window;  // no query of the chunk sees more positions than the window
    }
    struct cuda_attention_args at = {q, k_rows, v_rows, out,
                                     lane.partial, n, pos0, gc->n_ctx, hp->n_head, hp->n_head_kv,
                                     hp->head_dim, window,
                                     ckv_cuda_attention_splits(n, hp->n_head, n_kv, lane.partial_cap),
                                     hp->attn_scale, pos_dev, (void *) xq};   // xq: att quantised
    if (rope) {
        at.rope = *rope;
    }
    int64_t len = pos_dev ? gc->graph_len : pos0 + n;   // a graph is captured for one choice
    at.heads_per_block = n == 1 && lane.one_row && narrow_attention(gc, len, window) ? 1 : 0;
    return ckv_cuda_attention(&at, lane.s);
}

// RoPE inside the decode attention kernel, unless CKV_ATT_ROPE=0 (A/B runs).
static bool attention_does_rope(void) {
    static int on = -1;
    if (on < 0) {
        const char * e = getenv("CKV_ATT_ROPE");
        on = !(e && strcmp(e, "0") == 0);
    }
    return on != 0;
}

// Positions [first, first + n) of every KV head of one layer, K and V, between two stores of the
// layer's layout ([n_head_kv][n_ctx][head_dim]: the GPU staging buffer, mapped host memory).
static int32_t copy_kv_rows(struct cuda_context * gc, __half * dst_k, __half * dst_v, const __half * src_k,
                            const __half * src_v, int64_t first, int64_t n) {
    if (n <= 0) {
        return CKV_OK;
    }
    const struct hparams * hp = &gc->gm->hp;
    const size_t row = (size_t) hp->head_dim * sizeof(__half), pitch = row * gc->n_ctx;
    const int64_t off = first * hp->head_dim;
    CKV_CUDA_CHECK(cudaMemcpy2DAsync(dst_k + off, pitch, src_k + off, pitch, row * n, hp->n_head_kv,
                                     cudaMemcpyDefault, gc->stream));
    CKV_CUDA_CHECK(cudaMemcpy2DAsync(dst_v + off, pitch, src_v + off, pitch, row * n, hp->n_head_kv,
                                     cudaMemcpyDefault, gc->stream));
    return CKV_OK;
}

// Tokens [t0, t0 + n) of the chunk, all of sequence sq at positions pos0..: RoPE, their K/V
// rows into the cache, and their attention into gc->att (quantised into xq for one token).
// pos_dev != NULL: the position lives in device memory (graph capture) and pos0 is unused.
static int32_t store_and_attend(struct cuda_context * gc, const attn_lane & lane, int il, struct cuda_seq * sq,
                                int64_t t0, int64_t n, int64_t pos0, const int32_t * pos_dev, const void * xq) {
    const struct hparams *    hp = &gc->gm->hp;
    const struct cuda_layer * L  = &gc->gm->layers[il];
    cudaStream_t              s  = lane.s;
    bool gemma = hp->arch == ARCH_GEMMA3, swa = hparams_is_swa_layer(hp, il);
    const int64_t q_dim = (int64_t) hp->n_head * hp->head_dim, kv_dim = (int64_t) hp->n_head_kv * hp->head_dim;
    float * q = gc->q + t0 * q_dim, * out = gc->att + t0 * q_dim;
    // The rows this forward writes and attends: the layer's own (a decode step of an offloaded
    // layer writes its token straight to host memory), or, for a prefill chunk of an offloaded
    // layer, the staging buffer holding the layer's earlier rows.
    __half * k_rows = (__half *) sq->k_layers[il], * v_rows = (__half *) sq->v_layers[il];
    const bool staged = gc->kv_on_host[il] && !gc->decode_step;
    if (staged) {
        TRY_OK(copy_kv_rows(gc, gc->stage_k, gc->stage_v, k_rows, v_rows, 0, pos0));
        k_rows = gc->stage_k;
        v_rows = gc->stage_v;
    }
    float base = swa ? hp->rope_base_swa : hp->rope_base;
    struct cuda_rope_kv_args rk = {q, gc->k + t0 * kv_dim, gc->v + t0 * kv_dim, k_rows, v_rows,
                                   n, hp->n_head, hp->n_head_kv, hp->head_dim, hp->n_rot, gc->n_ctx, pos0,
                                   powf(base, -2.0f / (float) hp->n_rot), swa ? 1.0f : hp->rope_freq_scale,
                                   gc->gm->rope_freqs, hp->rope_mode == ROPE_NEOX,
                                   gemma ? L->attn_q_norm : NULL, gemma ? L->attn_k_norm : NULL,
                                   hp->rms_eps, pos_dev};
    // One token of a dense layer whose rows need no staging: the decode attention kernel does
    // the RoPE and the row store itself (its older rows were written by earlier forwards).
    const bool sparse = gc->decode_step && sq->policy && cuda_kv_policy_sparse(sq->policy, il);
    const bool rope_in_attention = n == 1 && !sparse && !staged && !rk.q_norm && attention_does_rope();
    if (!rope_in_attention) {
        TRY_OK(ckv_cuda_rope_kv(&rk, s));
    }
    if (sparse) {
        // The KV policy's positions only, att also quantised (xq) for the out-projection's GEMV.
        struct cuda_policy_attend_args pa = {il, q, k_rows, v_rows, (int32_t) pos0, pos_dev, out, (void *) xq,
                                             lane.partial, lane.partial_cap, hp->attn_scale};
        TRY_OK(cuda_kv_policy_attend(sq->policy, &pa, s));
    } else {
        TRY_OK(dense_attention(gc, lane, il, q, out, k_rows, v_rows, n, pos0, pos_dev, xq,
                               rope_in_attention ? &rk : NULL));
    }
    if (staged) {   // the chunk's new rows to host memory
        TRY_OK(copy_kv_rows(gc, (__half *) sq->k_layers[il], (__half *) sq->v_layers[il], gc->stage_k, gc->stage_v,
                            pos0, n));
    }
    return CKV_OK;
}

// Attention block of layer il for n tokens: one sequence (seqs NULL: gc->cur, positions pos0..,
// or *pos_dev in a graph), or a batch step (token t of sequence seqs[t] at position pos[t], or
// pos_dev[t] in a graph).
static int32_t attention_block(struct cuda_context * gc, int il, int64_t n, int64_t pos0, const int32_t * pos_dev,
                               const int32_t * seqs, const int32_t * pos) {
    const struct hparams *    hp = &gc->gm->hp;
    const struct cuda_layer * L  = &gc->gm->layers[il];
    cudaStream_t              s  = gc->stream;
    bool gemma = hp->arch == ARCH_GEMMA3;

    // One token: one launch normalises x into xb and quantises it (xq) for the int8 GEMVs; a
    // chunk normalises into xb for the GEMM.
    const void * xq = n == 1 ? gc->xq : NULL;
    if (xq) {
        TRY_OK(ckv_cuda_rmsnorm_quantize_q8(gc->xb, gc->xq, gc->x, L->attn_norm, hp->n_embd, hp->rms_eps, s));
    } else {
        TRY_OK(ckv_cuda_rmsnorm(gc->xb, gc->x, L->attn_norm, n, hp->n_embd, hp->rms_eps, false, s));
    }
    const float * in = gc->xb;
    struct cuda_matmul_args qkv[3] = {
        {&L->attn_q, in, gc->q, L->attn_q.n_out, L->attn_q_bias, n, false, NULL, 0.0f, xq, &gc->blas},
        {&L->attn_k, in, gc->k, L->attn_k.n_out, L->attn_k_bias, n, false, NULL, 0.0f, xq, &gc->blas},
        {&L->attn_v, in, gc->v, L->attn_v.n_out, L->attn_v_bias, n, false, NULL, 0.0f, xq, &gc->blas},
    };
    TRY_OK(ckv_cuda_matmul_multi(qkv, 3, s));
    if (seqs) {   // pos NULL: a captured batch step, token t's position at pos_dev[t]
        CKV_CUDA_CHECK(cudaEventRecord(gc->rows_fork, s));
        for (int64_t t = 0; t < n; t++) {
            CKV_CUDA_CHECK(cudaStreamWaitEvent(gc->row_streams[t], gc->rows_fork, 0));
            TRY_OK(store_and_attend(gc, row_lane(gc, t, n), il, &gc->seqs[seqs[t]], t, 1, pos ? pos[t] : 0,
                                    pos ? NULL : pos_dev + t, xq));   // xq: n == 1
            CKV_CUDA_CHECK(cudaEventRecord(gc->rows_join[t], gc->row_streams[t]));
            CKV_CUDA_CHECK(cudaStreamWaitEvent(s, gc->rows_join[t], 0));
        }
    } else {
        TRY_OK(store_and_attend(gc, main_lane(gc), il, gc->cur, 0, n, pos0, pos_dev, xq));
    }
    struct cuda_matmul_args o = {&L->attn_output, gc->att, gemma ? gc->xb2 : gc->x, L->attn_output.n_out,
                                 NULL, n, !gemma, NULL, 0.0f, xq, &gc->blas};
    TRY_OK(ckv_cuda_matmul(&o, s));
    if (gemma) {  // x += norm(out(att)): the norm sits between the projection and the residual
        return ckv_cuda_rmsnorm(gc->x, gc->xb2, L->post_attention_norm, n, hp->n_embd, hp->rms_eps, true, s);
    }
    return CKV_OK;
}

static int32_t ffn_block(struct cuda_context * gc, int il, int64_t n) {
    const struct hparams *    hp = &gc->gm->hp;
    const struct cuda_layer * L  = &gc->gm->layers[il];
    cudaStream_t              s  = gc->stream;
    bool gemma = hp->arch == ARCH_GEMMA3;

    // One token: x normalised and quantised in one launch (xq), and the GLU also writes hb
    // quantised (hq), which the down projection reads.
    const void * xq = n == 1 ? gc->xq : NULL;
    void *       hq = n == 1 ? gc->hq : NULL;
    if (xq) {
        TRY_OK(ckv_cuda_rmsnorm_quantize_q8(gc->xb, gc->xq, gc->x, L->ffn_norm, hp->n_embd, hp->rms_eps, s));
    } else {
        TRY_OK(ckv_cuda_rmsnorm(gc->xb, gc->x, L->ffn_norm, n, hp->n_embd, hp->rms_eps, false, s));
    }
    TRY_OK(ckv_cuda_matmul_glu(&L->ffn_gate, &L->ffn_up, gc->xb, gc->hb, gc->hb2, n, gemma, NULL, 0.0f, xq,
                            hq, s, &gc->blas));
    float * out = gemma ? gc->xb2 : gc->x;
    struct cuda_matmul_args down = {&L->ffn_down, gc->hb, out, L->ffn_down.n_out, NULL, n, !gemma, NULL, 0.0f, hq,
                                    &gc->blas};
    TRY_OK(ckv_cuda_matmul(&down, s));
    if (gemma) {
        return ckv_cuda_rmsnorm(gc->x, gc->xb2, L->post_ffw_norm, n, hp->n_embd, hp->rms_eps, true, s);
    }
    return CKV_OK;
}

// Final norm and output head for tokens [first, n), LOGITS_ROWS rows at a time.
static int32_t output_head(struct cuda_context * gc, int64_t first, int64_t n, float * logits_host) {
    const struct hparams * hp = &gc->gm->hp;
    for (int64_t r0 = first; r0 < n; r0 += LOGITS_ROWS) {
        int64_t rows = n - r0 < LOGITS_ROWS ? n - r0 : LOGITS_ROWS;
        const float * xr = gc->x + r0 * hp->n_embd;
        if (rows == 1) {   // the final norm and the quantisation in one launch, then the GEMV
            TRY_OK(ckv_cuda_rmsnorm_quantize_q8(gc->xb, gc->xq, xr, gc->gm->output_norm, hp->n_embd, hp->rms_eps,
                                             gc->stream));
            struct cuda_matmul_args a = {&gc->gm->output, gc->xb, gc->logits, hp->n_vocab, NULL, 1, false,
                                         NULL, 0.0f, gc->xq};
            TRY_OK(ckv_cuda_matmul(&a, gc->stream));
        } else {
            TRY_OK(ckv_cuda_rmsnorm(gc->xb, xr, gc->gm->output_norm, rows, hp->n_embd, hp->rms_eps, false,
                                 gc->stream));
            TRY_OK(matmul(gc, &gc->gm->output, gc->xb, gc->logits, NULL, rows, false));
        }
        CKV_CUDA_CHECK(cudaMemcpyAsync(logits_host + (r0 - first) * hp->n_vocab, gc->logits,
                                       sizeof(float) * rows * hp->n_vocab, cudaMemcpyDeviceToHost,
                                       gc->stream));
    }
    return CKV_OK;
}

// Every row's final-normed hidden state (the embeddings) to embd_host [n][n_embd], before the
// output head reuses xb (the copy is ordered before it on the stream).
static int32_t final_norm_rows(struct cuda_context * gc, int32_t n, float * embd_host) {
    const struct hparams * hp = &gc->gm->hp;
    TRY_OK(ckv_cuda_rmsnorm(gc->xb, gc->x, gc->gm->output_norm, n, hp->n_embd, hp->rms_eps, false, gc->stream));
    CKV_CUDA_CHECK(cudaMemcpyAsync(embd_host, gc->xb, sizeof(float) * (size_t) n * hp->n_embd,
                                   cudaMemcpyDeviceToHost, gc->stream));
    return CKV_OK;
}

static int32_t layers_and_output(struct cuda_context * gc, int32_t n, int32_t pos0, const int32_t * pos_dev,
                                 const int32_t * seqs, const int32_t * pos, int32_t first_output,
                                 float * logits_out, float * embd_out) {
    const struct hparams * hp = &gc->gm->hp;
    TRY_OK(ckv_cuda_embed(&gc->gm->token_embd, gc->tokens, n, hp->embd_scale, gc->x, gc->stream));
    for (int il = 0; il < hp->n_layer; il++) {
        TRY_OK(attention_block(gc, il, n, pos0, pos_dev, seqs, pos));
        TRY_OK(ffn_block(gc, il, n));
    }
    if (embd_out) {
        TRY_OK(final_norm_rows(gc, n, embd_out));
    }
    if (first_output < n) {
        TRY_OK(output_head(gc, first_output, n, logits_out));
    }
    return CKV_OK;
}

// Device work of one chunk: tokens already in gc->tokens, logits rows to `logits_out`, every
// row's embedding to `embd_out` unless it is NULL. seqs != NULL: a batch step, token t of
// sequence seqs[t] at position pos[t] (attention_block), or with pos NULL at pos_dev[t] (a
// captured batch step).
static int32_t forward_device(struct cuda_context * gc, int32_t n, int32_t pos0, const int32_t * pos_dev,
                              const int32_t * seqs, const int32_t * pos, int32_t first_output, float * logits_out,
                              float * embd_out = NULL) {
    int32_t st = layers_and_output(gc, n, pos0, pos_dev, seqs, pos, first_output, logits_out, embd_out);
    // kv_offload (one sequence): the slot fetches overlapped the later layers and the output
    // head; the stream waits for them here, also after an error.
    int32_t joined = seqs ? CKV_OK : cuda_kv_policy_join(gc->cur->policy, gc->stream);
    return st != CKV_OK ? st : joined;
}

// Captures a decode step of n rows as *out: tokens from h_tokens and positions from h_pos (pinned)
// copied in first (positions to d_pos, which the kernels read), seqs as forward_device takes it,
// logits to the pinned logits_host.
static int32_t capture_step(struct cuda_context * gc, int32_t n, const int32_t * h_tokens, const int32_t * h_pos,
                            int32_t * d_pos, const int32_t * seqs, float * logits_host, cudaGraphExec_t * out) {
    cudaGraph_t graph = NULL;
    CKV_CUDA_CHECK(cudaStreamBeginCapture(gc->stream, cudaStreamCaptureModeThreadLocal));
    cudaError_t err = cudaMemcpyAsync(gc->tokens, h_tokens, sizeof(int32_t) * n, cudaMemcpyHostToDevice, gc->stream);
    if (err == cudaSuccess) {
        err = cudaMemcpyAsync(d_pos, h_pos, sizeof(int32_t) * n, cudaMemcpyHostToDevice, gc->stream);
    }
    int32_t st = err == cudaSuccess ? forward_device(gc, n, 0, d_pos, seqs, NULL, 0, logits_host)
                                    : ckv_fail(CKV_ERR_CUDA, "graph capture: %s", cudaGetErrorString(err));
    cudaError_t end = cudaStreamEndCapture(gc->stream, &graph);
    if (st == CKV_OK && end != cudaSuccess) {
        st = ckv_fail(CKV_ERR_CUDA, "graph capture failed: %s", cudaGetErrorString(end));
    }
    if (st == CKV_OK) {
        err = cudaGraphInstantiate(out, graph, 0);
        if (err != cudaSuccess) {
            *out = NULL;
            st = ckv_fail(CKV_ERR_CUDA, "cudaGraphInstantiate failed: %s", cudaGetErrorString(err));
        }
    }
    if (graph) {
        cudaGraphDestroy(graph);
    }
    return st;
}

static int32_t decode_one_graph(struct cuda_context * gc, int32_t token, int32_t pos, float * logits_host) {
    const int32_t seq = (int32_t) (gc->cur - gc->seqs);
    uint64_t layout = gc->cur->policy ? cuda_kv_policy_layout(gc->cur->policy) : 0;
    int32_t  narrow = narrow_key(gc, (int64_t) pos + 1);
    if (gc->decode_graph && (layout != gc->graph_layout || seq != gc->graph_seq ||   // new lists / cache
                             narrow != gc->graph_narrow)) {                          // or grid
        cudaGraphExecDestroy(gc->decode_graph);
        gc->decode_graph = NULL;
    }
    if (!gc->decode_graph) {
        gc->graph_len = (int64_t) pos + 1;
        TRY_OK(capture_step(gc, 1, gc->h_step, gc->h_step + 1, gc->d_pos, NULL, gc->h_logits, &gc->decode_graph));
        gc->graph_layout = layout;
        gc->graph_seq    = seq;
        gc->graph_narrow = narrow;
    }
    gc->h_step[0] = token;
    gc->h_step[1] = pos;
    CKV_CUDA_CHECK(cudaGraphLaunch(gc->decode_graph, gc->stream));
    CKV_CUDA_CHECK(cudaStreamSynchronize(gc->stream));
    memcpy(logits_host, gc->h_logits, sizeof(float) * gc->gm->hp.n_vocab);
    return CKV_OK;
}

// The policy layout a batch graph bakes in for sequence seq (0 without a policy).
static uint64_t seq_layout(const struct cuda_context * gc, int32_t seq) {
    const struct cuda_kv_policy * p = gc->seqs[seq].policy;
    return p ? cuda_kv_policy_layout(p) : 0;
}

// One batch step through the batch graph, re-captured when the rows' sequences or their
// layouts differ from the captured ones.
static int32_t decode_batch_graph(struct cuda_context * gc, const int32_t * seqs, const int32_t * tokens,
                                  const int32_t * pos, int32_t n, float * logits_host) {
    bool same = gc->batch_graph && gc->batch_n == n;
    for (int32_t t = 0; same && t < n; t++) {
        same = gc->batch_seqs[t] == seqs[t] && gc->batch_layouts[t] == seq_layout(gc, seqs[t]);
    }
    if (!same) {
        if (gc->batch_graph) {
            cudaGraphExecDestroy(gc->batch_graph);
            gc->batch_graph = NULL;
        }
        TRY_OK(capture_step(gc, n, gc->h_batch, gc->h_batch + gc->n_seq, gc->d_batch_pos, seqs, gc->h_batch_logits,
                            &gc->batch_graph));
        gc->batch_n = n;
        for (int32_t t = 0; t < n; t++) {
            gc->batch_seqs[t]    = seqs[t];
            gc->batch_layouts[t] = seq_layout(gc, seqs[t]);
        }
    }
    memcpy(gc->h_batch, tokens, sizeof(int32_t) * n);
    memcpy(gc->h_batch + gc->n_seq, pos, sizeof(int32_t) * n);
    CKV_CUDA_CHECK(cudaGraphLaunch(gc->batch_graph, gc->stream));
    CKV_CUDA_CHECK(cudaStreamSynchronize(gc->stream));
    memcpy(logits_host, gc->h_batch_logits, sizeof(float) * n * gc->gm->hp.n_vocab);
    return CKV_OK;
}

static int32_t forward(struct cuda_context * gc, const int32_t * tokens, int32_t n, int32_t pos0,
                       int32_t first_output, float * logits_host, float * embd_host) {
    // The graph is a decode step's (with the policy's lists, no embeddings); a one-token
    // prefill chunk under a policy runs dense, outside it.
    if (n == 1 && first_output == 0 && gc->use_graph && (gc->decode_step || !gc->cur->policy) && !embd_host) {
        return decode_one_graph(gc, tokens[0], pos0, logits_host);
    }
    CKV_CUDA_CHECK(cudaMemcpyAsync(gc->tokens, tokens, sizeof(int32_t) * n, cudaMemcpyHostToDevice,
                                   gc->stream));
    return forward_device(gc, n, pos0, NULL, NULL, NULL, first_output, logits_host, embd_host);
}

static int32_t check_tokens(const struct cuda_context * gc, const int32_t * tokens, int32_t n) {
    for (int32_t i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= gc->gm->hp.n_vocab) {
            return ckv_fail(CKV_ERR_INVALID_ARG, "token %d at index %d is outside the vocabulary [0, %d)",
                            tokens[i], i, gc->gm->hp.n_vocab);
        }
    }
    return CKV_OK;
}

// Waits for the stream (surfacing asynchronous kernel faults) after a forward that returned st.
static int32_t finish(struct cuda_context * gc, int32_t st) {
    cudaError_t err = cudaStreamSynchronize(gc->stream);
    if (st == CKV_OK && err != cudaSuccess) {
        return ckv_fail(CKV_ERR_CUDA, "CUDA forward pass failed: %s", cudaGetErrorString(err));
    }
    return st;
}

extern "C" int32_t ckv_cuda_decode(struct cuda_context * gc, int32_t seq, const int32_t * tokens, int32_t n,
                                   int32_t pos0, int32_t first_output, float * logits_host,
                                   bool decode_step, float * embd_host) {
    if (!tokens || seq < 0 || seq >= gc->n_seq || n < 1 || n > gc->n_batch || pos0 < 0 || first_output < 0 ||
        (first_output < n && !logits_host)) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_cuda_decode: need sequence %d in [0, %d), 1 <= n (%d) <= "
                        "n_batch (%d), pos0 %d >= 0, first_output %d >= 0 and a logits buffer", seq, gc->n_seq,
                        n, gc->n_batch, pos0, first_output);
    }
    if ((int64_t) pos0 + n > gc->n_ctx) {
        return ckv_fail(CKV_ERR_CTX_FULL, "%d tokens at position %d exceed the CUDA context of %d",
                        n, pos0, gc->n_ctx);
    }
    TRY_OK(check_tokens(gc, tokens, n));
    gc->cur = &gc->seqs[seq];
    gc->decode_step = decode_step && n == 1;
    struct cuda_kv_policy * pol = gc->cur->policy;
    const __half * const * k_layers = gc->cur->k_layers;
    int32_t st = pol ? cuda_kv_policy_prepare(pol, k_layers, pos0, gc->decode_step, gc->stream) : CKV_OK;
    if (st == CKV_OK) {
        st = forward(gc, tokens, n, pos0, first_output, logits_host, embd_host);
    }
    if (st == CKV_OK && pol) {
        st = cuda_kv_policy_stored(pol, k_layers, pos0, n, gc->stream);
    }
    st = finish(gc, st);
    if (st == CKV_OK && pol) {
        cuda_kv_policy_count_step(pol, pos0, gc->decode_step);
    }
    return st;
}

extern "C" int32_t ckv_cuda_decode_batch(struct cuda_context * gc, const int32_t * seqs, const int32_t * tokens,
                                         const int32_t * pos, int32_t n, float * logits_host) {
    if (!seqs || !tokens || !pos || !logits_host || n < 1 || n > gc->n_batch || n > gc->n_seq) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_cuda_decode_batch: need 1 <= n (%d) <= min(n_batch %d, "
                        "n_seq %d), sequences, tokens, positions and a logits buffer", n, gc->n_batch, gc->n_seq);
    }
    for (int32_t t = 0; t < n; t++) {
        if (seqs[t] < 0 || seqs[t] >= gc->n_seq || pos[t] < 0 || pos[t] >= gc->n_ctx) {
            return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_cuda_decode_batch: token %d: sequence %d must be in [0, %d) "
                            "and position %d in [0, %d)", t, seqs[t], gc->n_seq, pos[t], gc->n_ctx);
        }
    }
    TRY_OK(check_tokens(gc, tokens, n));
    gc->decode_step = true;
    int32_t st = CKV_OK;
    for (int32_t t = 0; t < n && st == CKV_OK; t++) {   // each sequence's spans, before any row is written
        struct cuda_seq * sq = &gc->seqs[seqs[t]];
        st = sq->policy ? cuda_kv_policy_prepare(sq->policy, sq->k_layers, pos[t], true, gc->stream) : CKV_OK;
    }
    if (st == CKV_OK && gc->use_graph && gc->batch_seqs) {
        st = decode_batch_graph(gc, seqs, tokens, pos, n, logits_host);
    } else if (st == CKV_OK) {
        CKV_CUDA_CHECK(cudaMemcpyAsync(gc->tokens, tokens, sizeof(int32_t) * n, cudaMemcpyHostToDevice, gc->stream));
        st = forward_device(gc, n, 0, NULL, seqs, pos, 0, logits_host);
    }
    for (int32_t t = 0; t < n && st == CKV_OK; t++) {
        struct cuda_seq * sq = &gc->seqs[seqs[t]];
        st = sq->policy ? cuda_kv_policy_stored(sq->policy, sq->k_layers, pos[t], 1, gc->stream) : CKV_OK;
    }
    st = finish(gc, st);
    for (int32_t t = 0; t < n && st == CKV_OK; t++) {
        if (gc->seqs[seqs[t]].policy) cuda_kv_policy_count_step(gc->seqs[seqs[t]].policy, pos[t], true);
    }
    return st;
}

// --- KV policy -------------------------------------------------------------------------------

// A new policy for sequence seq over the n positions its cache holds (*out NULL for full; on
// an error *out may hold a policy to free).
static int32_t policy_over_cache(struct cuda_context * gc, const struct ckv_kv_policy_params * params,
                                 const bool * layer_compressed, int32_t seq, int32_t n, struct cuda_kv_policy ** out) {
    *out = NULL;
    if (params->policy == CKV_KV_POLICY_FULL) {
        return CKV_OK;
    }
    TRY_OK(cuda_kv_policy_create(params, layer_compressed, &gc->gm->hp, gc->n_ctx, gc->stage_k != NULL, out));
    return cuda_kv_policy_stored(*out, gc->seqs[seq].k_layers, 0, n, gc->stream);
}

extern "C" int32_t ckv_cuda_set_kv_policy(struct cuda_context * gc, const struct ckv_kv_policy_params * params,
                                          const bool * layer_compressed, const int32_t * n_past) {
    const struct hparams * hp = &gc->gm->hp;
    const bool offload = gc->stage_k != NULL;
    for (int il = 0; offload && il < hp->n_layer; il++) {
        if (layer_compressed[il] != gc->kv_on_host[il] || params->policy != CKV_KV_POLICY_CLUSTERKV) {
            return ckv_fail(CKV_ERR_INVALID_ARG, "kv_offload: the context keeps the KV of the layers its clusterkv "
                            "policy compressed in host memory; a new policy must be clusterkv with the same "
                            "n_dense_layers");
        }
    }
    // Every sequence's new policy first (each over the cache it takes over), then the swap, so
    // a failure leaves the old ones in force.
    struct cuda_kv_policy ** next = (struct cuda_kv_policy **) calloc((size_t) gc->n_seq, sizeof(*next));
    if (!next) {
        return ckv_fail(CKV_ERR_OOM, "out of host memory for the GPU KV policy");
    }
    int32_t st = CKV_OK;
    for (int32_t i = 0; st == CKV_OK && i < gc->n_seq; i++) {
        st = policy_over_cache(gc, params, layer_compressed, i, n_past ? n_past[i] : 0, &next[i]);
    }
    if (st == CKV_OK && cudaStreamSynchronize(gc->stream) != cudaSuccess) {   // nothing in flight reads the old state
        st = ckv_fail(CKV_ERR_CUDA, "switching the KV policy: %s", cudaGetErrorString(cudaGetLastError()));
    }
    for (int32_t i = 0; i < gc->n_seq; i++) {
        if (st == CKV_OK) {
            cuda_kv_policy_free(gc->seqs[i].policy);
            gc->seqs[i].policy = next[i];
        } else {
            cuda_kv_policy_free(next[i]);
        }
    }
    free(next);
    if (st == CKV_OK) {
        drop_graphs(gc);
    }
    return st;
}

extern "C" bool ckv_cuda_has_kv_policy(const struct cuda_context * gc) { return gc->seqs[0].policy != NULL; }

extern "C" void ckv_cuda_kv_memory(const struct cuda_context * gc, uint64_t * device_kv, uint64_t * host_kv,
                                   uint64_t * device_policy) {
    *device_kv     = gc->kv_device_bytes;
    *host_kv       = gc->kv_host_bytes;
    *device_policy = 0;
    for (int32_t i = 0; i < gc->n_seq; i++) {
        const struct cuda_kv_policy * p = gc->seqs[i].policy;
        const size_t slots = p ? cuda_kv_policy_slot_bytes(p) : 0;
        *device_kv += slots;
        *device_policy += p ? cuda_kv_policy_device_bytes(p) - slots : 0;
    }
}

extern "C" void ckv_cuda_kv_truncate(struct cuda_context * gc, int32_t seq, int32_t n_keep) {
    if (seq >= 0 && seq < gc->n_seq && gc->seqs[seq].policy) {
        cuda_kv_policy_truncate(gc->seqs[seq].policy, n_keep);
    }
}

extern "C" int32_t ckv_cuda_kv_copy_rows(struct cuda_context * gc, int32_t seq, int32_t il, int32_t n, void * k,
                                         void * v, bool to_cache) {
    const struct hparams * hp = &gc->gm->hp;
    if (seq < 0 || seq >= gc->n_seq || il < 0 || il >= hp->n_layer || n < 0 || n > gc->n_ctx) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "kv rows: sequence %d, layer %d, %d rows out of range", seq, il, n);
    }
    if (n == 0) {
        return CKV_OK;
    }
    // The cache's rows of a KV head are n_ctx apart (pitch); the host's are packed.
    const size_t row = (size_t) hp->head_dim * sizeof(__half), cache_pitch = row * gc->n_ctx, host_pitch = row * n;
    __half * ck = (__half *) gc->seqs[seq].k_layers[il], * cv = (__half *) gc->seqs[seq].v_layers[il];
    if (to_cache) {
        CKV_CUDA_CHECK(cudaMemcpy2DAsync(ck, cache_pitch, k, host_pitch, host_pitch, hp->n_head_kv,
                                         cudaMemcpyDefault, gc->stream));
        CKV_CUDA_CHECK(cudaMemcpy2DAsync(cv, cache_pitch, v, host_pitch, host_pitch, hp->n_head_kv,
                                         cudaMemcpyDefault, gc->stream));
    } else {
        CKV_CUDA_CHECK(cudaMemcpy2DAsync(k, host_pitch, ck, cache_pitch, host_pitch, hp->n_head_kv,
                                         cudaMemcpyDefault, gc->stream));
        CKV_CUDA_CHECK(cudaMemcpy2DAsync(v, host_pitch, cv, cache_pitch, host_pitch, hp->n_head_kv,
                                         cudaMemcpyDefault, gc->stream));
    }
    CKV_CUDA_CHECK(cudaStreamSynchronize(gc->stream));
    return CKV_OK;
}

extern "C" int32_t ckv_cuda_kv_reloaded(struct cuda_context * gc, int32_t seq, int32_t n,
                                        const struct ckv_kv_policy_params * params, const bool * layer_compressed) {
    struct cuda_kv_policy * next = NULL;
    int32_t st = policy_over_cache(gc, params, layer_compressed, seq, n, &next);
    if (st == CKV_OK && cudaStreamSynchronize(gc->stream) != cudaSuccess) {
        st = ckv_fail(CKV_ERR_CUDA, "loading a state: %s", cudaGetErrorString(cudaGetLastError()));
    }
    if (st != CKV_OK) {
        cuda_kv_policy_free(next);
        return st;
    }
    cuda_kv_policy_free(gc->seqs[seq].policy);
    gc->seqs[seq].policy = next;
    drop_graphs(gc);
    return CKV_OK;
}

// Summed over the sequences, as the CPU context sums its policies' stats.
extern "C" int32_t ckv_cuda_kv_stats(struct cuda_context * gc, struct ckv_kv_stats * out) {
    if (!gc->seqs[0].policy) {
        return CKV_OK;
    }
    out->n_attended = out->n_cached = out->n_fetched = 0;
    out->t_cluster_ms = out->t_select_ms = 0.0;
    out->n_clusters = 0;
    for (int32_t i = 0; i < gc->n_seq; i++) {
        struct ckv_kv_stats s = *out;
        TRY_OK(cuda_kv_policy_stats(gc->seqs[i].policy, &s, gc->stream));
        out->n_attended += s.n_attended;
        out->n_cached += s.n_cached;
        out->n_fetched += s.n_fetched;
        out->t_cluster_ms += s.t_cluster_ms;
        out->n_clusters += s.n_clusters;
    }
    return CKV_OK;
}

extern "C" int32_t ckv_cuda_kv_reset_stats(struct cuda_context * gc) {
    for (int32_t i = 0; i < gc->n_seq; i++) {
        if (gc->seqs[i].policy) TRY_OK(cuda_kv_policy_reset_stats(gc->seqs[i].policy, gc->stream));
    }
    return CKV_OK;
}

extern "C" int32_t ckv_cuda_kv_n_clusters(const struct cuda_context * gc, int32_t il) {
    return gc->seqs[0].policy ? cuda_kv_policy_n_clusters(gc->seqs[0].policy, il) : 0;
}

extern "C" int32_t ckv_cuda_kv_selection(struct cuda_context * gc, int32_t il, int32_t h, int32_t * buf,
                                         int32_t cap, int32_t * n, bool * sparse) {
    *sparse = false;
    struct cuda_kv_policy * p = gc->seqs[0].policy;
    return p ? cuda_kv_policy_selection(p, il, h, buf, cap, n, sparse, gc->stream) : CKV_OK;
}
