// context.c - ckv_context: creation (KV caches and every scratch buffer up front), ckv_decode
// and its per-sequence and batched forms (validation, chunking into n_batch rows, logits rows),
// truncation and timings. A context holds n_seq_max sequences, each with its own KV cache and
// KV-policy state; the scratch, the thread pool and the logits are shared. A context of a model
// with a GPU copy (one sequence) runs each chunk through the CUDA backend instead of forward.c.
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../cuda/cuda-backend.h"
#include "error.h"
#include "forward.h"
#include "quants.h"

enum { MAX_N_CTX = 1 << 22, MAX_HEAD_DIM = 512, DEFAULT_N_BATCH = 512, MAX_N_SEQ = 256,
       MAX_N_THREADS = 512 };  // ggml's cap too: each thread owns attention scratch


void ckv_context_default_params(struct ckv_context_params * out) {
    memset(out, 0, sizeof(*out));
    out->n_ctx     = 0;
    out->n_batch   = DEFAULT_N_BATCH;
    out->n_threads = 0;
    out->kv_type   = CKV_KV_F16;
    kv_policy_default_params(&out->kv_policy);
    out->n_seq_max = 1;
}

static int default_threads(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (int) n;
}

// n_threads as init and set_n_threads take it (0 = all cores).
static int32_t check_n_threads(int32_t n_threads) {
    if (n_threads < 0 || n_threads > MAX_N_THREADS) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "n_threads must be in [0, %d] (0 = all cores), got %d",
                        MAX_N_THREADS, n_threads);
    }
    return CKV_OK;
}

static int32_t resolve_params(const struct ckv_model * m, const struct ckv_context_params * in,
                              struct ckv_context_params * out) {
    *out = *in;
    if (out->n_ctx == 0) {
        out->n_ctx = (uint32_t) m->hp.n_ctx_train;
    }
    if (out->n_ctx > MAX_N_CTX) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "n_ctx %u is larger than the maximum %d", out->n_ctx,
                        MAX_N_CTX);
    }
    if (out->n_batch == 0) {
        out->n_batch = DEFAULT_N_BATCH;
    }
    if (out->n_batch > out->n_ctx) {
        out->n_batch = out->n_ctx;
    }
    TRY(check_n_threads(out->n_threads));
    if (out->n_threads == 0) {
        out->n_threads = default_threads();
    }
    if (out->f32_activations != 0 && out->f32_activations != 1) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "f32_activations must be 0 or 1, got %d",
                        out->f32_activations);
    }
    if (out->kv_offload != 0 && out->kv_offload != 1) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "kv_offload must be 0 or 1, got %d", out->kv_offload);
    }
    if (out->embeddings != 0 && out->embeddings != 1) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "embeddings must be 0 or 1, got %d", out->embeddings);
    }
    if (out->n_seq_max == 0) {
        out->n_seq_max = 1;
    }
    if (out->n_seq_max > MAX_N_SEQ) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "n_seq_max must be in [1, %d] (0 = 1), got %u", MAX_N_SEQ,
                        out->n_seq_max);
    }
    if (out->kv_type != CKV_KV_F16 && out->kv_type != CKV_KV_F32) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "kv_type must be CKV_KV_F16 (1) or CKV_KV_F32 (0), got %d",
                        out->kv_type);
    }
    return CKV_OK;
}

static int32_t alloc_scratch(struct ckv_context * ctx) {
    const struct hparams * hp = &ctx->model->hp;
    int64_t nb = ctx->params.n_batch, q_dim = (int64_t) hp->n_head * hp->head_dim;
    int64_t kv_dim = (int64_t) hp->n_head_kv * hp->head_dim;
    struct scratch * s = &ctx->s;
    float ** bufs[]  = {&s->x, &s->xb, &s->xb2, &s->q, &s->k, &s->v, &s->att, &s->hb, &s->hb2};
    int64_t  sizes[] = {hp->n_embd, hp->n_embd, hp->n_embd, q_dim, kv_dim, kv_dim, q_dim, hp->n_ff, hp->n_ff};
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        *bufs[i] = calloc((size_t) (nb * sizes[i]), sizeof(float));
        if (!*bufs[i]) {
            return ckv_fail(CKV_ERR_OOM, "out of memory for scratch buffers (n_batch %lld)", (long long) nb);
        }
    }
    int64_t max_in = hp->n_embd > hp->n_ff ? hp->n_embd : hp->n_ff;
    max_in = max_in > q_dim ? max_in : q_dim;
    struct compute * c = &ctx->comp;
    c->max_tokens = nb;
    c->act_q_row  = (size_t) max_in * sizeof(float) + 64;  // f32 is the widest activation type
    c->att_stride = ops_attention_thread_floats(hp->head_dim, ctx->params.n_ctx);
    for (int i = 0; i < 2; i++) {
        c->act_q[i] = malloc(c->act_q_row * (size_t) nb);
    }
    c->att_scores   = calloc((size_t) c->att_stride * (size_t) ctx->params.n_threads, sizeof(float));
    c->f32_activations = ctx->params.f32_activations != 0;
    if (c->f32_activations) {
        c->w_rows_stride = ops_matmul_thread_floats(max_in);
        c->w_rows = malloc((size_t) c->w_rows_stride * (size_t) ctx->params.n_threads * sizeof(float));
        if (!c->w_rows) {
            return ckv_fail(CKV_ERR_OOM, "out of memory for f32_activations weight rows");
        }
    }
    c->att_partials = calloc((size_t) ops_attention_partial_floats(hp->n_head, hp->head_dim),
                             sizeof(float));
    if (!c->act_q[0] || !c->act_q[1] || !c->att_scores || !c->att_partials) {
        return ckv_fail(CKV_ERR_OOM, "out of memory for activation buffers");
    }
    return CKV_OK;
}

// --- KV policy -------------------------------------------------------------------------------

// Frees what init_seq_policy allocated (safe on a zeroed or partly built one).
static void free_seq_policy(struct seq_policy * sp) {
    kv_policy_free(&sp->policy);
    free(sp->sel);
    free(sp->sel_n);
    free(sp->sel_pos);
    free(sp->last_selected);
    memset(sp, 0, sizeof(*sp));
}

static void free_policy_set(struct policy_set * ps, int32_t n_seq) {
    for (int32_t i = 0; ps->seqs && i < n_seq; i++) {
        free_seq_policy(&ps->seqs[i]);
    }
    free(ps->seqs);
    free(ps->layer_compressed);
    free(ps->att_weights);
    memset(ps, 0, sizeof(*ps));
}

// One sequence's policy over its cache, and the lists of its last decode step.
static int32_t init_seq_policy(const struct ckv_context * ctx, const struct policy_set * ps,
                               struct ckv_seq * sq, struct seq_policy * sp) {
    const struct hparams * hp = &ctx->model->hp;
    const struct ckv_kv_policy_params * kp = &ps->params;
    sp->last_selected = calloc((size_t) hp->n_layer, sizeof(bool));
    if (!sp->last_selected) {
        return ckv_fail(CKV_ERR_OOM, "out of memory for the KV policy");
    }
    if (ctx->gpu) {  // the backend runs the policy; the host keeps its params and n_steps
        return kv_policy_init_params_only(&sp->policy, kp, &sq->kv, hp->n_head, ps->layer_compressed);
    }
    int32_t st = kv_policy_init(&sp->policy, kp, &sq->kv, ctx->comp.pool, hp->n_head,
                                ps->layer_compressed);
    if (st != CKV_OK || !sp->policy.vt->select) {
        return st;
    }
    int64_t cap = kv_policy_max_list(kp, ctx->params.n_ctx);
    sp->sel     = calloc((size_t) hp->n_layer, sizeof(*sp->sel));
    sp->sel_n   = calloc((size_t) hp->n_layer * hp->n_head, sizeof(int32_t));
    sp->sel_pos = malloc(sizeof(int32_t) * (size_t) hp->n_layer * hp->n_head * (size_t) cap);
    if (!sp->sel || !sp->sel_n || !sp->sel_pos) {
        return ckv_fail(CKV_ERR_OOM, "out of memory for the KV policy's lists (budget %d)", kp->budget);
    }
    for (int32_t il = 0; il < hp->n_layer; il++) {
        sp->sel[il] = (struct kv_selection) {hp->n_head, (int32_t) cap, sp->sel_n + (size_t) il * hp->n_head,
                                             sp->sel_pos + (size_t) il * hp->n_head * cap};
    }
    return CKV_OK;
}

// The KV policy kp for every sequence: which layers it compresses, each sequence's state.
// On a GPU context the backend gets the policy last, so a failure leaves its old one in force.
static int32_t init_policy_set(const struct ckv_context * ctx, const struct ckv_kv_policy_params * kp,
                               struct policy_set * ps) {
    const struct hparams * hp = &ctx->model->hp;
    memset(ps, 0, sizeof(*ps));
    ps->params           = *kp;
    ps->threads          = ctx->params.n_threads;
    ps->layer_compressed = calloc((size_t) hp->n_layer, sizeof(bool));
    ps->seqs             = calloc((size_t) ctx->n_seq, sizeof(*ps->seqs));
    if (!ps->layer_compressed || !ps->seqs) {
        return ckv_fail(CKV_ERR_OOM, "out of memory for the KV policy");
    }
    for (int32_t il = 0; il < hp->n_layer; il++) {
        ps->layer_compressed[il] = hparams_is_compressed_layer(hp, kp->n_dense_layers, il);
    }
    for (int32_t i = 0; i < ctx->n_seq; i++) {
        TRY(init_seq_policy(ctx, ps, &ctx->seqs[i], &ps->seqs[i]));
    }
    if (ps->seqs[0].policy.vt->wants_weights) {
        ps->att_weights = malloc(sizeof(float) * (size_t) hp->n_head * ctx->params.n_ctx);
        if (!ps->att_weights) {
            return ckv_fail(CKV_ERR_OOM, "out of memory for the KV policy's attention weights");
        }
    }
    if (!ctx->gpu) {
        return CKV_OK;
    }
    int32_t n_past[MAX_N_SEQ];
    for (int32_t i = 0; i < ctx->n_seq; i++) {
        n_past[i] = ctx->seqs[i].n_past;
    }
    return ckv_cuda_set_kv_policy(ctx->gpu, kp, ps->layer_compressed, n_past);
}

// The GPU runs every policy but h2o (its eviction follows attention weights, which the GPU's
// flash-decode does not write out); ids out of range are left to kv_policy_init's message.
static int32_t check_gpu_policy(const struct ckv_context * ctx, int32_t policy) {
    if (ctx->model->gpu && policy == CKV_KV_POLICY_H2O) {
        return ckv_fail(CKV_ERR_UNSUPPORTED, "kv_policy h2o runs on the CPU path only (the GPU runs "
                        "full, streaming, quest and clusterkv); use n_gpu_layers=0");
    }
    return CKV_OK;
}

// A GPU context: the device holds the f16 KV cache, the activations and the stream. The CPU
// cache struct only describes the shape (the KV policy's bookkeeping reads it) and owns no
// storage, and no CPU scratch or thread pool is made: nothing on the CPU reads them.
static int32_t init_gpu(struct ckv_context * ctx) {
    const struct hparams * hp = &ctx->model->hp;
    int32_t st = check_gpu_policy(ctx, ctx->params.kv_policy.policy);
    if (st == CKV_OK && ctx->params.f32_activations) {
        st = ckv_fail(CKV_ERR_UNSUPPORTED, "f32_activations runs on the CPU path only "
                      "(use n_gpu_layers=0)");
    }
    if (st == CKV_OK && ctx->params.kv_type != CKV_KV_F16) {
        st = ckv_fail(CKV_ERR_UNSUPPORTED, "kv_type f32 runs on the CPU path only: the GPU keeps "
                      "an f16 KV cache (use kv_type f16, or n_gpu_layers=0)");
    }
    if (st == CKV_OK && ctx->n_seq > 1 && ctx->params.kv_offload) {
        st = ckv_fail(CKV_ERR_UNSUPPORTED, "kv_offload holds one sequence (n_seq_max %d)", ctx->n_seq);
    }
    if (st == CKV_OK && ctx->params.kv_offload && ctx->params.kv_policy.policy != CKV_KV_POLICY_CLUSTERKV) {
        st = ckv_fail(CKV_ERR_INVALID_ARG, "kv_offload needs kv_policy clusterkv (got %s): the GPU then keeps "
                      "only the positions each step selects", kv_policy_name(ctx->params.kv_policy.policy));
    }
    if (st != CKV_OK) {
        return st;
    }
    // kv_offload: the layers the policy compresses keep their K/V in host memory.
    bool * offload = NULL;
    if (ctx->params.kv_offload) {
        offload = calloc((size_t) hp->n_layer, sizeof(bool));
        if (!offload) {
            return ckv_fail(CKV_ERR_OOM, "out of memory for the context");
        }
        for (int32_t il = 0; il < hp->n_layer; il++) {
            offload[il] = hparams_is_compressed_layer(hp, ctx->params.kv_policy.n_dense_layers, il);
        }
    }
    for (int32_t i = 0; i < ctx->n_seq; i++) {
        ctx->seqs[i].kv = (struct kv_cache) {.n_ctx = (int32_t) ctx->params.n_ctx, .n_layer = hp->n_layer,
                                             .n_head_kv = hp->n_head_kv, .head_dim = hp->head_dim,
                                             .type = GGML_TYPE_F16, .elt_size = sizeof(ckv_fp16)};
    }
    st = ckv_cuda_context_create(ctx->model->gpu, (int32_t) ctx->params.n_ctx, (int32_t) ctx->params.n_batch,
                                 ctx->n_seq, offload, &ctx->gpu);
    free(offload);
    return st;
}

static int32_t init_cpu(struct ckv_context * ctx) {
    const struct hparams * hp = &ctx->model->hp;
    for (int32_t i = 0; i < ctx->n_seq; i++) {
        TRY(kv_cache_init(&ctx->seqs[i].kv, (int32_t) ctx->params.n_ctx, hp->n_layer, hp->n_head_kv,
                          hp->head_dim, (uint32_t) ctx->params.kv_type));
    }
    TRY(threadpool_create(ctx->params.n_threads, &ctx->comp.pool));
    return alloc_scratch(ctx);
}

int32_t ckv_context_init(const ckv_model * model, const struct ckv_context_params * params,
                         ckv_context ** out) {
    ckv_clear_error();
    if (!out || !model || !params) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_context_init: model, params and out must not be NULL");
    }
    *out = NULL;
    if (!model->can_forward) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "the model was loaded with vocab_only or metadata_only");
    }
    // Limits of the CPU attention; a GPU copy was already checked against the kernels' own.
    if (!model->gpu && model->hp.head_dim > MAX_HEAD_DIM) {
        return ckv_fail(CKV_ERR_UNSUPPORTED, "head size %d is larger than %d", model->hp.head_dim,
                        MAX_HEAD_DIM);
    }
    if (!model->gpu && model->hp.n_head / model->hp.n_head_kv > OPS_ATTENTION_MAX_GROUP) {
        return ckv_fail(CKV_ERR_UNSUPPORTED, "%d query heads per KV head is more than the %d the CPU "
                        "attention supports", model->hp.n_head / model->hp.n_head_kv,
                        OPS_ATTENTION_MAX_GROUP);
    }
    ckv_context * ctx = calloc(1, sizeof(*ctx));
    if (!ctx) {
        return ckv_fail(CKV_ERR_OOM, "out of memory for the context");
    }
    ctx->model = model;
    int32_t st = resolve_params(model, params, &ctx->params);
    if (st == CKV_OK && ctx->params.kv_offload && !model->gpu) {
        st = ckv_fail(CKV_ERR_UNSUPPORTED, "kv_offload moves a GPU context's KV cache to host memory; this "
                      "model runs on the CPU, whose cache is in host memory already (use n_gpu_layers=-1)");
    }
    if (st == CKV_OK) {
        ctx->n_seq = (int32_t) ctx->params.n_seq_max;
        ctx->seqs  = calloc((size_t) ctx->n_seq, sizeof(*ctx->seqs));
        st = ctx->seqs ? CKV_OK : ckv_fail(CKV_ERR_OOM, "out of memory for the context");
    }
    for (int32_t i = 0; st == CKV_OK && i < ctx->n_seq; i++) {
        ctx->seqs[i].last_pos = -1;
        ctx->seqs[i].logits_row = -1;
    }
    if (st == CKV_OK) {
        st = model->gpu ? init_gpu(ctx) : init_cpu(ctx);
    }
    if (st == CKV_OK) {
        st = init_policy_set(ctx, &ctx->params.kv_policy, &ctx->pol);
    }
    if (st != CKV_OK) {
        ckv_context_free(ctx);
        return st;
    }
    *out = ctx;
    return CKV_OK;
}

void ckv_context_free(ckv_context * ctx) {
    if (!ctx) {
        return;
    }
    free_policy_set(&ctx->pol, ctx->n_seq);
    ckv_cuda_context_free(ctx->gpu);
    for (int32_t i = 0; ctx->seqs && i < ctx->n_seq; i++) {
        kv_cache_free(&ctx->seqs[i].kv);
    }
    free(ctx->seqs);
    threadpool_free(ctx->comp.pool);
    float * bufs[] = {ctx->s.x, ctx->s.xb, ctx->s.xb2, ctx->s.q, ctx->s.k, ctx->s.v, ctx->s.att,
                      ctx->s.hb, ctx->s.hb2, ctx->comp.att_scores, ctx->comp.att_partials,
                      ctx->logits, ctx->embd};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) {
        free(bufs[i]);
    }
    free(ctx->comp.act_q[0]);
    free(ctx->comp.act_q[1]);
    free(ctx->comp.w_rows);
    free(ctx);
}

uint32_t ckv_context_n_ctx(const ckv_context * ctx) { return ctx->params.n_ctx; }
uint32_t ckv_context_n_batch(const ckv_context * ctx) { return ctx->params.n_batch; }
int32_t  ckv_context_n_threads(const ckv_context * ctx) { return ctx->params.n_threads; }
int32_t  ckv_context_n_seq_max(const ckv_context * ctx) { return ctx->n_seq; }
int32_t  ckv_context_n_past(const ckv_context * ctx) { return ctx->seqs[0].n_past; }

int32_t context_check_seq(const ckv_context * ctx, int32_t seq) {
    if (seq < 0 || seq >= ctx->n_seq) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "sequence %d is out of range [0, n_seq_max = %d)", seq,
                        ctx->n_seq);
    }
    return CKV_OK;
}

int32_t ckv_context_n_past_seq(const ckv_context * ctx, int32_t seq) {
    ckv_clear_error();
    return context_check_seq(ctx, seq) == CKV_OK ? ctx->seqs[seq].n_past : -1;
}

int32_t ckv_context_set_n_threads(ckv_context * ctx, int32_t n_threads) {
    ckv_clear_error();
    TRY(check_n_threads(n_threads));
    int32_t n = n_threads == 0 ? default_threads() : n_threads;
    if (n == ctx->params.n_threads || ctx->gpu) {
        ctx->params.n_threads = n;  // a GPU context has no CPU workers to resize
        return CKV_OK;
    }
    if (ctx->pol.params.policy == CKV_KV_POLICY_CLUSTERKV && n > ctx->pol.threads) {
        // its k-means scratch is sized per thread when the context is created
        return ckv_fail(CKV_ERR_UNSUPPORTED, "the clusterkv policy was set up for %d threads; "
                        "create the context with n_threads = %d instead", ctx->pol.threads, n);
    }
    float * scores = malloc(sizeof(float) * (size_t) ctx->comp.att_stride * (size_t) n);
    struct threadpool * pool = NULL;
    int32_t st = scores ? threadpool_create(n, &pool) : ckv_fail(CKV_ERR_OOM, "out of memory");
    if (st != CKV_OK) {
        free(scores);
        return st;
    }
    threadpool_free(ctx->comp.pool);
    free(ctx->comp.att_scores);
    ctx->comp.pool       = pool;
    ctx->comp.att_scores = scores;
    for (int32_t i = 0; i < ctx->n_seq; i++) {
        ctx->pol.seqs[i].policy.pool = pool;
    }
    ctx->params.n_threads = n;
    return CKV_OK;
}

int32_t ckv_context_truncate_seq(ckv_context * ctx, int32_t seq, int32_t n_keep) {
    ckv_clear_error();
    TRY(context_check_seq(ctx, seq));
    struct ckv_seq * sq = &ctx->seqs[seq];
    if (n_keep < 0 || n_keep > sq->n_past) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "n_keep %d must be in [0, n_past = %d]", n_keep, sq->n_past);
    }
    sq->n_past     = n_keep;  // positions >= n_keep are overwritten by the next decode
    sq->last_pos   = -1;      // the last step's lists may name dropped positions
    context_forget_logits(ctx);
    ctx->n_outputs   = 0;
    ctx->n_embd_rows = 0;
    kv_policy_truncate(&ctx->pol.seqs[seq].policy, n_keep);
    if (ctx->gpu) {
        ckv_cuda_kv_truncate(ctx->gpu, seq, n_keep);
    }
    return CKV_OK;
}

int32_t ckv_context_truncate(ckv_context * ctx, int32_t n_keep) {
    return ckv_context_truncate_seq(ctx, 0, n_keep);
}

// --- decode ----------------------------------------------------------------------------------

// The logits rows of the last decode call are about to be replaced (or were dropped).
void context_forget_logits(ckv_context * ctx) {
    for (int32_t i = 0; i < ctx->n_seq; i++) {
        ctx->seqs[i].logits_row = -1;
    }
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int32_t check_token_ids(const ckv_context * ctx, const ckv_token * tokens, int32_t n) {
    for (int32_t i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= ctx->model->hp.n_vocab) {
            return ckv_fail(CKV_ERR_INVALID_ARG, "token %d at index %d is outside the vocabulary [0, %d)",
                            tokens[i], i, ctx->model->hp.n_vocab);
        }
    }
    return CKV_OK;
}

static int32_t check_tokens(const ckv_context * ctx, const struct ckv_seq * sq, const ckv_token * tokens,
                            int32_t n) {
    if (!tokens || n <= 0) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_decode needs at least one token (got %d)", n);
    }
    if ((int64_t) sq->n_past + n > ctx->params.n_ctx) {
        return ckv_fail(CKV_ERR_CTX_FULL, "%d tokens at position %d exceed the context window of %u",
                        n, sq->n_past, ctx->params.n_ctx);
    }
    return check_token_ids(ctx, tokens, n);
}

// Grows *buf to hold `rows` rows of `width` floats (never shrinks: decoding reuses it).
static int32_t reserve_rows(float ** buf, int64_t * cap, int64_t rows, int64_t width, const char * what) {
    if (rows <= *cap) {
        return CKV_OK;
    }
    float * grown = realloc(*buf, sizeof(float) * (size_t) rows * (size_t) width);
    if (!grown) {
        return ckv_fail(CKV_ERR_OOM, "out of memory for %lld rows of %s", (long long) rows, what);
    }
    *buf = grown;
    *cap = rows;
    return CKV_OK;
}

int32_t context_reserve_logits(ckv_context * ctx, int64_t rows) {
    return reserve_rows(&ctx->logits, &ctx->logits_cap, rows, ctx->model->hp.n_vocab, "logits");
}

// Room for the embedding rows of a decode of `rows` tokens (params.embeddings only). The rows
// of the previous decode are invalid from here on.
static int32_t reserve_embd(ckv_context * ctx, int64_t rows) {
    ctx->n_embd_rows = 0;
    if (!ctx->params.embeddings) {
        return CKV_OK;
    }
    return reserve_rows(&ctx->embd, &ctx->embd_cap, rows, ctx->model->hp.n_embd, "embeddings");
}

// Where forward_groups writes the embeddings of the chunk starting at first_row (NULL: none).
static float * embd_rows(ckv_context * ctx, int64_t first_row) {
    return ctx->params.embeddings ? ctx->embd + first_row * ctx->model->hp.n_embd : NULL;
}

// The bookkeeping of a GPU step of sequence seq at pos (a GPU policy counts its own steps;
// under full they are counted per compressed layer as attend_dense counts them).
static void gpu_count_step(ckv_context * ctx, int32_t seq, int32_t pos, bool decode_step) {
    ctx->seqs[seq].last_pos = pos;
    bool counted = ckv_cuda_has_kv_policy(ctx->gpu);
    for (int32_t il = 0; decode_step && !counted && il < ctx->model->hp.n_layer; il++) {
        if (ctx->pol.layer_compressed[il]) {
            kv_policy_count_dense_step(&ctx->pol.seqs[seq].policy, pos);
        }
    }
}

// forward_groups' twin on the GPU for one sequence: the same logits rows and bookkeeping.
static int32_t gpu_chunk(ckv_context * ctx, int32_t seq, const ckv_token * tokens, int32_t n, int32_t pos0,
                         int32_t first_output, bool decode_step, float * logits, float * embd) {
    int32_t st = ckv_cuda_decode(ctx->gpu, seq, tokens, n, pos0, first_output, logits, decode_step, embd);
    if (st == CKV_OK) {
        gpu_count_step(ctx, seq, pos0 + n - 1, decode_step);
    }
    return st;
}

static void add_timing(ckv_context * ctx, double t0, int32_t n_tokens, bool decode) {
    double dt = now_ms() - t0;
    if (decode) {
        ctx->timings.t_decode_ms += dt;
        ctx->timings.n_decode += n_tokens;
    } else {
        ctx->timings.t_prefill_ms += dt;
        ctx->timings.n_prefill += n_tokens;
    }
}

int32_t ckv_decode_seq(ckv_context * ctx, int32_t seq, const ckv_token * tokens, int32_t n_tokens,
                       bool all_logits) {
    ckv_clear_error();
    TRY(context_check_seq(ctx, seq));
    struct ckv_seq * sq = &ctx->seqs[seq];
    TRY(check_tokens(ctx, sq, tokens, n_tokens));
    TRY(context_reserve_logits(ctx, all_logits ? n_tokens : 1));
    TRY(reserve_embd(ctx, n_tokens));
    double  t0      = now_ms();
    int64_t n_vocab = ctx->model->hp.n_vocab;
    int32_t n_past0 = sq->n_past;
    bool    decode  = n_tokens == 1;
    context_forget_logits(ctx);
    for (int32_t done = 0; done < n_tokens;) {
        int32_t n    = n_tokens - done < (int32_t) ctx->params.n_batch ? n_tokens - done
                                                                     : (int32_t) ctx->params.n_batch;
        bool    last = done + n == n_tokens;
        int64_t first_output = all_logits ? 0 : (last ? n - 1 : n);
        float * rows = ctx->logits + (all_logits ? (int64_t) done * n_vocab : 0);
        if (ctx->gpu) {
            int32_t st = gpu_chunk(ctx, seq, tokens + done, n, sq->n_past, (int32_t) first_output, decode, rows,
                                   embd_rows(ctx, done));
            if (st != CKV_OK) {  // only the GPU can fail here: forget the chunks already run
                sq->n_past     = n_past0;
                sq->last_pos   = -1;
                ctx->n_outputs = 0;
                return st;
            }
        } else {
            struct fwd_group g = {seq, sq->n_past, n, decode};
            forward_groups(ctx, tokens + done, &g, 1, first_output, rows, embd_rows(ctx, done));
        }
        sq->n_past += n;
        done += n;
    }
    ctx->n_outputs   = all_logits ? n_tokens : 1;
    ctx->n_embd_rows = ctx->params.embeddings ? n_tokens : 0;
    sq->logits_row   = ctx->n_outputs - 1;
    add_timing(ctx, t0, n_tokens, decode);
    if (decode) {
        ctx->pol.seqs[seq].policy.stats.n_steps += 1;
    }
    return CKV_OK;
}

int32_t ckv_decode(ckv_context * ctx, const ckv_token * tokens, int32_t n_tokens, bool all_logits) {
    return ckv_decode_seq(ctx, 0, tokens, n_tokens, all_logits);
}

int32_t ckv_decode_batch(ckv_context * ctx, const ckv_token * tokens, const int32_t * seqs, int32_t n) {
    ckv_clear_error();
    if (!tokens || !seqs || n < 1 || n > (int32_t) ctx->params.n_batch) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_decode_batch needs 1 <= n (%d) <= n_batch (%u) "
                        "tokens and sequence ids", n, ctx->params.n_batch);
    }
    for (int32_t i = 0; i < n; i++) {
        TRY(context_check_seq(ctx, seqs[i]));
        for (int32_t j = 0; j < i; j++) {
            if (seqs[j] == seqs[i]) {
                return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_decode_batch: sequence %d appears twice "
                                "(one token per sequence and step)", seqs[i]);
            }
        }
        TRY(check_tokens(ctx, &ctx->seqs[seqs[i]], tokens + i, 1));
    }
    if (ctx->gpu && ctx->params.embeddings) {
        return ckv_fail(CKV_ERR_UNSUPPORTED, "ckv_decode_batch on the GPU gives no embeddings: decode "
                        "each sequence with ckv_decode_seq, or use the CPU path");
    }
    TRY(context_reserve_logits(ctx, n));
    TRY(reserve_embd(ctx, n));
    double t0 = now_ms();
    context_forget_logits(ctx);
    if (ctx->gpu) {
        int32_t pos[MAX_N_SEQ];
        for (int32_t i = 0; i < n; i++) {
            pos[i] = ctx->seqs[seqs[i]].n_past;
        }
        int32_t st = ckv_cuda_decode_batch(ctx->gpu, seqs, tokens, pos, n, ctx->logits);
        if (st != CKV_OK) {
            ctx->n_outputs = 0;
            return st;
        }
        for (int32_t i = 0; i < n; i++) {
            gpu_count_step(ctx, seqs[i], pos[i], true);
        }
    } else {
        struct fwd_group groups[MAX_N_SEQ];
        for (int32_t i = 0; i < n; i++) {
            groups[i] = (struct fwd_group) {seqs[i], ctx->seqs[seqs[i]].n_past, 1, true};
        }
        forward_groups(ctx, tokens, groups, n, 0, ctx->logits, embd_rows(ctx, 0));
    }
    for (int32_t i = 0; i < n; i++) {
        ctx->seqs[seqs[i]].n_past += 1;
        ctx->seqs[seqs[i]].logits_row = i;
        ctx->pol.seqs[seqs[i]].policy.stats.n_steps += 1;
    }
    ctx->n_outputs   = n;
    ctx->n_embd_rows = ctx->params.embeddings ? n : 0;
    add_timing(ctx, t0, n, true);
    return CKV_OK;
}

int32_t ckv_get_n_outputs(const ckv_context * ctx) { return ctx->n_outputs; }

int32_t ckv_get_n_embeddings(const ckv_context * ctx) { return ctx->n_embd_rows; }

// Row i (i < 0 counts from the end) of n_rows rows of `width` floats at base; NULL out of range.
static const float * row_at(const float * base, int32_t n_rows, int64_t width, int32_t i) {
    if (i < 0) {
        i += n_rows;
    }
    if (i < 0 || i >= n_rows) {
        return NULL;
    }
    return base + (size_t) i * (size_t) width;
}

const float * ckv_get_embeddings(const ckv_context * ctx, int32_t i) {
    return row_at(ctx->embd, ctx->n_embd_rows, ctx->model->hp.n_embd, i);
}

const float * ckv_get_logits(const ckv_context * ctx, int32_t i) {
    return row_at(ctx->logits, ctx->n_outputs, ctx->model->hp.n_vocab, i);
}

void ckv_context_get_timings(const ckv_context * ctx, struct ckv_timings * out) { *out = ctx->timings; }

void ckv_context_reset_timings(ckv_context * ctx) { memset(&ctx->timings, 0, sizeof(ctx->timings)); }

// --- KV policy -------------------------------------------------------------------------------

void ckv_context_get_kv_stats(const ckv_context * ctx, struct ckv_kv_stats * out) {
    kv_policy_get_stats(&ctx->pol.seqs[0].policy, out);
    for (int32_t i = 1; i < ctx->n_seq; i++) {  // summed over the sequences
        struct ckv_kv_stats s;
        kv_policy_get_stats(&ctx->pol.seqs[i].policy, &s);
        out->n_steps += s.n_steps;
        out->n_attended += s.n_attended;
        out->n_cached += s.n_cached;
        out->t_cluster_ms += s.t_cluster_ms;
        out->t_select_ms += s.t_select_ms;
        out->n_clusters += s.n_clusters;
    }
    if (ctx->gpu) {  // a device fault here surfaces at the next decode
        ckv_cuda_kv_stats(ctx->gpu, out);
    }
}

int32_t ckv_context_kv_memory(const ckv_context * ctx, struct ckv_kv_memory * out) {
    ckv_clear_error();
    if (!ctx || !out) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_context_kv_memory: ctx and out must not be NULL");
    }
    memset(out, 0, sizeof(*out));
    if (ctx->gpu) {
        ckv_cuda_kv_memory(ctx->gpu, &out->device_kv, &out->host_kv, &out->device_policy);
        return CKV_OK;
    }
    for (int32_t i = 0; i < ctx->n_seq; i++) {
        const struct kv_cache * kv = &ctx->seqs[i].kv;
        out->host_kv += 2ull * kv->n_layer * kv->n_head_kv * kv->n_ctx * kv->head_dim * kv->elt_size;
    }
    return CKV_OK;
}

void ckv_context_reset_kv_stats(ckv_context * ctx) {
    for (int32_t i = 0; i < ctx->n_seq; i++) {
        kv_policy_reset_stats(&ctx->pol.seqs[i].policy);
    }
    if (ctx->gpu) {
        ckv_cuda_kv_reset_stats(ctx->gpu);
    }
}

static int32_t check_layer_head(const ckv_context * ctx, int32_t il, int32_t h, int32_t n_heads,
                                const char * what) {
    if (il < 0 || il >= ctx->model->hp.n_layer) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "layer %d is out of range [0, %d)", il,
                        ctx->model->hp.n_layer);
    }
    if (h < 0 || h >= n_heads) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "%s %d is out of range [0, %d)", what, h, n_heads);
    }
    return CKV_OK;
}

int32_t ckv_context_kv_n_clusters(const ckv_context * ctx, int32_t il, int32_t h, int32_t * out) {
    ckv_clear_error();
    int32_t st = check_layer_head(ctx, il, h, ctx->model->hp.n_head_kv, "KV head");
    if (st == CKV_OK && !out) {
        st = ckv_fail(CKV_ERR_INVALID_ARG, "ckv_context_kv_n_clusters: out must not be NULL");
    }
    if (st == CKV_OK) {
        *out = ctx->gpu ? ckv_cuda_kv_n_clusters(ctx->gpu, il)
                        : kv_policy_n_clusters(&ctx->pol.seqs[0].policy, il, h);
    }
    return st;
}

int32_t ckv_context_kv_selection(const ckv_context * ctx, int32_t il, int32_t h, int32_t * buf,
                                 int32_t cap, int32_t * n_needed) {
    ckv_clear_error();
    int32_t st = check_layer_head(ctx, il, h, ctx->model->hp.n_head, "query head");
    if (st != CKV_OK) {
        return st;
    }
    const struct ckv_seq *    sq = &ctx->seqs[0];
    const struct seq_policy * sp = &ctx->pol.seqs[0];
    if (sq->last_pos < 0) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "no decode has run since the context was created or "
                        "truncated");
    }
    if (ctx->gpu) {
        bool    sparse = false;
        int32_t n_gpu  = 0;
        st = ckv_cuda_kv_selection(ctx->gpu, il, h, buf, cap, &n_gpu, &sparse);
        if (sparse || st != CKV_OK) {
            if (n_needed && sparse) {
                *n_needed = n_gpu;
            }
            return st;
        }
    }
    const int32_t * list = NULL;
    int64_t first = 0, n = sq->last_pos + 1;  // dense: every causal position (or the window)
    if (sp->last_selected[il]) {
        list = sp->sel[il].pos + (size_t) h * sp->sel[il].cap;
        n    = sp->sel[il].n[h];
    } else if (hparams_is_swa_layer(&ctx->model->hp, il) && n > ctx->model->hp.n_swa) {
        first = n - ctx->model->hp.n_swa;
        n     = ctx->model->hp.n_swa;
    }
    if (n_needed) {
        *n_needed = (int32_t) n;
    }
    if (!buf || cap < n) {
        return ckv_fail(CKV_ERR_BUFFER_TOO_SMALL, "buffer of %d positions is too small: %lld needed",
                        cap, (long long) n);
    }
    for (int64_t i = 0; i < n; i++) {
        buf[i] = list ? list[i] : (int32_t) (first + i);
    }
    return CKV_OK;
}

// --- switching the KV policy -----------------------------------------------------------------

int32_t ckv_context_set_kv_policy(ckv_context * ctx, const struct ckv_kv_policy_params * params) {
    ckv_clear_error();
    if (!ctx || !params) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_context_set_kv_policy: ctx and params must not be NULL");
    }
    if (check_gpu_policy(ctx, params->policy) != CKV_OK) {
        return CKV_ERR_UNSUPPORTED;
    }
    for (int32_t i = 0; params->policy == CKV_KV_POLICY_H2O && i < ctx->n_seq; i++) {
        if (ctx->seqs[i].n_past > 0) {
            return ckv_fail(CKV_ERR_INVALID_ARG, "cannot switch to h2o with %d positions cached: h2o "
                            "scores positions by the prefill's attention weights, which are not kept; "
                            "create the context with kv_policy h2o (or truncate to 0 first)",
                            ctx->seqs[i].n_past);
        }
    }
    // Build the new policy beside the old one, which stays in force until it works.
    struct policy_set next;
    int32_t st = init_policy_set(ctx, params, &next);
    if (st != CKV_OK) {
        free_policy_set(&next, ctx->n_seq);
        return st;
    }
    free_policy_set(&ctx->pol, ctx->n_seq);
    ctx->pol = next;
    ctx->params.kv_policy = *params;
    for (int32_t i = 0; i < ctx->n_seq; i++) {
        ctx->seqs[i].last_pos = -1;  // the last step's lists belonged to the old policy
        kv_policy_rebuild(&ctx->pol.seqs[i].policy, ctx->seqs[i].n_past);
    }
    return CKV_OK;
}
