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

// Where one group's attention reads and writes: its sequence and its rows of q and att.
struct group_io {
    struct ckv_seq *    sq;
    struct seq_policy * sp;
    float *             q;     // [n][n_head * head_dim]
    float *             att;   // [n][n_head * head_dim]
};

// Decode step in a compressed layer: the policy picks each head's positions, attention reads
// them in place, and a policy that learns from attention (h2o) sees the softmax weights.
static void attend_selected(struct ckv_context * ctx, const struct group_io * io, int il,
                            const struct attention_params * ap, int64_t pos) {
    struct kv_selection * sel = &io->sp->sel[il];
    kv_policy_select(&io->sp->policy, il, pos, io->q, sel);
    float * weights = io->sp->policy.vt->wants_weights ? ctx->pol.att_weights : NULL;
    ops_attention_selected(&ctx->comp, &io->sq->kv, ap, io->q, io->att, pos, sel->n, sel->pos,
                           sel->cap, weights);
    if (weights) {
        kv_policy_observe(&io->sp->policy, il, sel, weights);
    }
}

// Dense attention of a run; in a compressed layer the policy still sees the run's softmax
// weights (h2o) and a full-policy decode step is counted.
static void attend_dense(struct ckv_context * ctx, const struct group_io * io, int il,
                         const struct attention_params * ap, int64_t n, int64_t pos0, bool decode_step) {
    ops_attention(&ctx->comp, &io->sq->kv, ap, io->q, io->att, n, pos0);
    if (!ctx->pol.layer_compressed[il]) {
        return;
    }
    struct kv_policy * policy = &io->sp->policy;
    if (policy->vt->wants_weights) {
        int64_t n_pos = pos0 + n;
        memset(ctx->pol.att_weights, 0, sizeof(float) * (size_t) (ap->n_head * n_pos));
        ops_attention_weight_sums(&ctx->comp, &io->sq->kv, ap, io->q, n, pos0, ctx->pol.att_weights, n_pos);
        kv_policy_observe_dense(policy, il, n_pos, ctx->pol.att_weights);
    }
    if (decode_step) {
        kv_policy_count_dense_step(policy, pos0);
    }
}

// One group's part of layer il: RoPE at its positions, its cache rows, its attention.
static void attend_group(struct ckv_context * ctx, int il, const struct fwd_group * g, int64_t row0) {
    const struct ckv_model * m  = ctx->model;
    const struct hparams *   hp = &m->hp;
    struct scratch *         s  = &ctx->s;
    int64_t q_dim = (int64_t) hp->n_head * hp->head_dim, kv_dim = (int64_t) hp->n_head_kv * hp->head_dim;
    struct group_io io = {&ctx->seqs[g->seq], &ctx->pol.seqs[g->seq], s->q + row0 * q_dim,
                          s->att + row0 * q_dim};
    float * k = s->k + row0 * kv_dim, * v = s->v + row0 * kv_dim;

    bool swa = hparams_is_swa_layer(hp, il);
    struct rope_params rope = {hp->n_rot, hp->head_dim, swa ? hp->rope_base_swa : hp->rope_base,
                               swa ? 1.0f : hp->rope_freq_scale, m->rope_freqs, hp->rope_mode};
    ops_rope(&rope, io.q, g->n, hp->n_head, g->pos0);
    ops_rope(&rope, k, g->n, hp->n_head_kv, g->pos0);
    kv_cache_store(&io.sq->kv, il, k, v, g->n, g->pos0);
    kv_policy_on_store(&io.sp->policy, il, g->pos0, g->n);

    struct attention_params ap = {il, hp->n_head, hp->n_head_kv, hp->head_dim,
                                  swa ? hp->n_swa : 0, hp->attn_scale};
    bool selected = g->decode_step && g->n == 1 && ctx->pol.layer_compressed[il] &&
                    io.sp->policy.vt->select;
    if (selected) {
        attend_selected(ctx, &io, il, &ap, g->pos0);
    } else {
        attend_dense(ctx, &io, il, &ap, g->n, g->pos0, g->decode_step && g->n == 1);
    }
    io.sp->last_selected[il] = selected;
}

// x += attention(norm(x)) for layer il over all rows (n of them, in groups).
static void attention_block(struct ckv_context * ctx, int il, const struct fwd_group * groups,
                            int32_t n_groups, int64_t n) {
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
    for (int32_t i = 0, row0 = 0; i < n_groups; row0 += (int32_t) groups[i].n, i++) {
        attend_group(ctx, il, &groups[i], row0);
    }
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

void forward_groups(struct ckv_context * ctx, const ckv_token * tokens, const struct fwd_group * groups,
                    int32_t n_groups, int64_t first_output, float * logits, float * embd) {
    int64_t n = 0;
    for (int32_t i = 0; i < n_groups; i++) {
        n += groups[i].n;
    }
    embed_tokens(ctx->model, tokens, n, ctx->s.x);
    for (int il = 0; il < ctx->model->hp.n_layer; il++) {
        attention_block(ctx, il, groups, n_groups, n);
        ffn_block(ctx, il, n);
    }
    for (int32_t i = 0; i < n_groups; i++) {
        ctx->seqs[groups[i].seq].last_pos = groups[i].pos0 + groups[i].n - 1;
    }
    if (embd) {
        const struct hparams * hp = &ctx->model->hp;
        ops_rmsnorm(embd, ctx->s.x, ctx->model->output_norm.data, n, hp->n_embd, hp->rms_eps);
    }
    if (first_output < n) {
        output_head(ctx, first_output, n, logits);
    }
}
