// forward.c - the transformer forward pass on a chunk of tokens (llama, qwen2, gemma3).
// The three architectures share one layer; where they differ the code says so:
//   qwen2  - q/k/v biases, NEOX RoPE
//   gemma3 - embeddings x sqrt(n_embd), per-head q/k RMSNorm, norms after attention and FFN,
//            GELU(tanh) FFN, sliding-window layers with their own RoPE base
#include "forward.h"

#include <string.h>

#include "quants.h"

static void embed_tokens(const struct ckv_model * m, const ckv_token * tokens, int64_t n, float * x) {
    const struct weight * e = &m->token_embd;
    for (int64_t t = 0; t < n; t++) {
        const uint8_t * row = (const uint8_t *) e->data + (size_t) tokens[t] * e->row_size;
        dequantize_row(e->type, row, x + t * e->ne[0], e->ne[0]);
        if (m->hp.embd_scale != 1.0f) {
            ops_scale(x + t * e->ne[0], m->hp.embd_scale, e->ne[0]);
        }
    }
}

static void head_norm(const struct hparams * hp, float * x, int64_t n_rows, const struct weight * w) {
    ops_rmsnorm(x, x, w->data, n_rows, hp->head_dim, hp->rms_eps);
}

// Decode step in a compressed layer: the policy picks each head's positions, attention reads
// them in place, and a policy that learns from attention (h2o) sees the softmax weights.
static void attend_selected(struct ckv_context * ctx, int il, const struct attention_params * ap,
                            int64_t pos) {
    struct kv_selection * sel = &ctx->sel[il];
    kv_policy_select(&ctx->policy, il, pos, ctx->s.q, sel);
    float * weights = ctx->policy.vt->wants_weights ? ctx->att_weights : NULL;
    ops_attention_selected(&ctx->comp, &ctx->kv, ap, ctx->s.q, ctx->s.att, pos, sel->n, sel->pos,
                           sel->cap, weights);
    if (weights) {
        kv_policy_observe(&ctx->policy, il, sel, weights);
    }
}

// Dense attention of a chunk; in a compressed layer the policy still sees the chunk's softmax
// weights (h2o) and a full-policy decode step is counted.
static void attend_dense(struct ckv_context * ctx, int il, const struct attention_params * ap,
                         int64_t n, int64_t pos0, bool decode_step) {
    ops_attention(&ctx->comp, &ctx->kv, ap, ctx->s.q, ctx->s.att, n, pos0);
    if (!ctx->layer_compressed[il]) {
        return;
    }
    if (ctx->policy.vt->wants_weights) {
        int64_t n_pos = pos0 + n;
        memset(ctx->att_weights, 0, sizeof(float) * (size_t) (ap->n_head * n_pos));
        ops_attention_weight_sums(&ctx->comp, &ctx->kv, ap, ctx->s.q, n, pos0, ctx->att_weights, n_pos);
        kv_policy_observe_dense(&ctx->policy, il, n_pos, ctx->att_weights);
    }
    if (decode_step) {
        kv_policy_count_dense_step(&ctx->policy, pos0);
    }
}

// x += attention(norm(x)) for layer il over tokens at positions pos0 ..
static void attention_block(struct ckv_context * ctx, int il, int64_t n, int64_t pos0, bool decode_step) {
    const struct ckv_model *     m  = ctx->model;
    const struct hparams *       hp = &m->hp;
    const struct layer_weights * L  = &m->layers[il];
    struct scratch *             s  = &ctx->s;
    int64_t q_dim = (int64_t) hp->n_head * hp->head_dim, kv_dim = (int64_t) hp->n_head_kv * hp->head_dim;

    ops_rmsnorm(s->xb, s->x, L->attn_norm.data, n, hp->n_embd, hp->rms_eps);
    struct matmul_job qkv[3] = {
        {&L->attn_q, s->q, q_dim, L->attn_q_bias.data},
        {&L->attn_k, s->k, kv_dim, L->attn_k_bias.data},
        {&L->attn_v, s->v, kv_dim, L->attn_v_bias.data},
    };
    ops_matmul(&ctx->comp, qkv, 3, s->xb, n);
    if (hp->arch == ARCH_GEMMA3) {
        head_norm(hp, s->q, n * hp->n_head, &L->attn_q_norm);
        head_norm(hp, s->k, n * hp->n_head_kv, &L->attn_k_norm);
    }
    bool swa = hparams_is_swa_layer(hp, il);
    struct rope_params rope = {hp->n_rot, hp->head_dim, swa ? hp->rope_base_swa : hp->rope_base,
                               swa ? 1.0f : hp->rope_freq_scale, m->rope_freqs, hp->rope_mode};
    ops_rope(&rope, s->q, n, hp->n_head, pos0);
    ops_rope(&rope, s->k, n, hp->n_head_kv, pos0);
    kv_cache_store(&ctx->kv, il, s->k, s->v, n, pos0);
    kv_policy_on_store(&ctx->policy, il, pos0, n);

    struct attention_params ap = {il, hp->n_head, hp->n_head_kv, hp->head_dim,
                                  swa ? hp->n_swa : 0, hp->attn_scale};
    bool selected = decode_step && ctx->layer_compressed[il] && ctx->policy.vt->select;
    if (selected) {
        attend_selected(ctx, il, &ap, pos0);
    } else {
        attend_dense(ctx, il, &ap, n, pos0, decode_step);
    }
    ctx->last_selected[il] = selected;
    struct matmul_job out = {&L->attn_output, s->xb2, hp->n_embd, NULL};
    ops_matmul(&ctx->comp, &out, 1, s->att, n);
    if (hp->arch == ARCH_GEMMA3) {
        ops_rmsnorm(s->xb2, s->xb2, L->post_attention_norm.data, n, hp->n_embd, hp->rms_eps);
    }
    ops_add(s->x, s->xb2, n * hp->n_embd);
}

// x += ffn(norm(x)): down(act(gate(x)) * up(x)).
static void ffn_block(struct ckv_context * ctx, int il, int64_t n) {
    const struct hparams *       hp = &ctx->model->hp;
    const struct layer_weights * L  = &ctx->model->layers[il];
    struct scratch *             s  = &ctx->s;

    ops_rmsnorm(s->xb, s->x, L->ffn_norm.data, n, hp->n_embd, hp->rms_eps);
    struct matmul_job gate_up[2] = {
        {&L->ffn_gate, s->hb, hp->n_ff, NULL},
        {&L->ffn_up, s->hb2, hp->n_ff, NULL},
    };
    ops_matmul(&ctx->comp, gate_up, 2, s->xb, n);
    if (hp->arch == ARCH_GEMMA3) {
        ops_gelu_mul(s->hb, s->hb2, n * hp->n_ff);
    } else {
        ops_silu_mul(s->hb, s->hb2, n * hp->n_ff);
    }
    struct matmul_job down = {&L->ffn_down, s->xb2, hp->n_embd, NULL};
    ops_matmul(&ctx->comp, &down, 1, s->hb, n);
    if (hp->arch == ARCH_GEMMA3) {
        ops_rmsnorm(s->xb2, s->xb2, L->post_ffw_norm.data, n, hp->n_embd, hp->rms_eps);
    }
    ops_add(s->x, s->xb2, n * hp->n_embd);
}

// logits for tokens [first, n) of the chunk: final norm, then the output head.
static void output_head(struct ckv_context * ctx, int64_t first, int64_t n, float * logits) {
    const struct ckv_model * m  = ctx->model;
    const struct hparams *   hp = &m->hp;
    struct scratch *         s  = &ctx->s;
    int64_t                  rows = n - first;
    ops_rmsnorm(s->xb, s->x + first * hp->n_embd, m->output_norm.data, rows, hp->n_embd, hp->rms_eps);
    struct matmul_job head = {&m->output, logits, hp->n_vocab, NULL};
    ops_matmul(&ctx->comp, &head, 1, s->xb, rows);
}

void forward_chunk(struct ckv_context * ctx, const ckv_token * tokens, int64_t n, int64_t pos0,
                   int64_t first_output, bool decode_step, float * logits) {
    embed_tokens(ctx->model, tokens, n, ctx->s.x);
    for (int il = 0; il < ctx->model->hp.n_layer; il++) {
        attention_block(ctx, il, n, pos0, decode_step && n == 1);
        ffn_block(ctx, il, n);
    }
    ctx->last_pos = pos0 + n - 1;
    if (first_output < n) {
        output_head(ctx, first_output, n, logits);
    }
}
