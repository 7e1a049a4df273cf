// state.c - one sequence's cache saved to a byte buffer and loaded back (ckv_context_state_*):
// the K/V rows of every layer, the last logits row, and a fingerprint of the model, so that a
// state loads only where it means the same thing. Loading rebuilds the KV policy's bookkeeping
// from the rows, as switching policies does, so the sequence is as if just prefilled.
#include <stdlib.h>
#include <string.h>

#include "../cuda/cuda-backend.h"
#include "error.h"
#include "forward.h"
#include "quants.h"

enum { STATE_VERSION = 1, FINGERPRINT_BYTES = 1 << 16 };
static const char STATE_MAGIC[8] = {'C', 'K', 'V', 'S', 'T', 'A', 'T', 'E'};

// The start of a state, in host byte order. The rows follow (for each layer: K as
// [n_head_kv][n_past][head_dim], then V), then n_logits rows of n_vocab floats.
struct state_header {
    char     magic[8];
    uint32_t version;
    uint32_t kv_type;       // CKV_KV_F16 or CKV_KV_F32: the rows' type
    uint64_t fingerprint;   // model_fingerprint
    uint32_t n_layer, n_head_kv, head_dim, n_vocab;
    uint32_t n_past;        // rows [0, n_past) of every layer and KV head
    uint32_t n_logits;      // 0, or 1: the logits after position n_past - 1
};

static uint64_t fnv1a(uint64_t h, const void * data, size_t n) {
    const uint8_t * p = data;
    for (size_t i = 0; i < n; i++) {
        h = (h ^ p[i]) * 0x100000001b3ULL;
    }
    return h;
}

// The shapes, the RoPE settings and the first bytes of layer 0's K projection and the output
// norm: fine-tunes of one base model differ there, and hashing 64 KiB costs well under a
// millisecond.
static uint64_t model_fingerprint(const struct ckv_model * m) {
    const struct hparams * hp = &m->hp;
    int32_t shape[] = {(int32_t) hp->arch, hp->n_vocab, hp->n_embd, hp->n_layer, hp->n_head, hp->n_head_kv,
                       hp->head_dim, hp->n_ff, hp->n_rot};
    uint64_t h = fnv1a(0xcbf29ce484222325ULL, shape, sizeof(shape));
    float    rope[] = {hp->rope_base, hp->rope_freq_scale};   // the cached keys are rotated by them
    h = fnv1a(h, rope, sizeof(rope));
    const struct weight * ws[] = {&m->layers[0].attn_k, &m->output_norm};
    for (size_t i = 0; i < sizeof(ws) / sizeof(ws[0]); i++) {
        size_t bytes = ws[i]->row_size * (size_t) ws[i]->ne[1];
        h = fnv1a(h, ws[i]->data, bytes < FINGERPRINT_BYTES ? bytes : FINGERPRINT_BYTES);
    }
    return h;
}

static size_t elt_size(uint32_t kv_type) { return kv_type == CKV_KV_F16 ? sizeof(ckv_fp16) : sizeof(float); }

// Bytes of one layer's K (or V) rows of n positions.
static uint64_t layer_half_bytes(const struct hparams * hp, uint32_t kv_type, uint64_t n) {
    return (uint64_t) hp->n_head_kv * n * (uint64_t) hp->head_dim * elt_size(kv_type);
}

static uint64_t state_bytes(const struct hparams * hp, uint32_t kv_type, uint64_t n_past, uint32_t n_logits) {
    return sizeof(struct state_header) + 2 * (uint64_t) hp->n_layer * layer_half_bytes(hp, kv_type, n_past) +
           (uint64_t) n_logits * (uint64_t) hp->n_vocab * sizeof(float);
}

// The header of sequence seq's state, but its fingerprint (only a save needs it).
static struct state_header header_of(const ckv_context * ctx, int32_t seq) {
    const struct ckv_seq * sq = &ctx->seqs[seq];
    const struct hparams * hp = &ctx->model->hp;
    struct state_header h;
    memset(&h, 0, sizeof(h));
    memcpy(h.magic, STATE_MAGIC, sizeof(h.magic));
    h.version     = STATE_VERSION;
    h.kv_type     = sq->kv.type == GGML_TYPE_F16 ? CKV_KV_F16 : CKV_KV_F32;
    h.n_layer     = (uint32_t) hp->n_layer;
    h.n_head_kv   = (uint32_t) hp->n_head_kv;
    h.head_dim    = (uint32_t) hp->head_dim;
    h.n_vocab     = (uint32_t) hp->n_vocab;
    h.n_past      = (uint32_t) sq->n_past;
    h.n_logits    = sq->logits_row >= 0 && sq->logits_row < ctx->n_outputs ? 1 : 0;
    return h;
}

int32_t ckv_context_state_size(const ckv_context * ctx, int32_t seq, uint64_t * size) {
    ckv_clear_error();
    TRY(context_check_seq(ctx, seq));
    if (!size) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_context_state_size: size must not be NULL");
    }
    struct state_header h = header_of(ctx, seq);
    *size = state_bytes(&ctx->model->hp, h.kv_type, h.n_past, h.n_logits);
    return CKV_OK;
}

int32_t ckv_context_state_save(ckv_context * ctx, int32_t seq, void * dst, uint64_t cap, uint64_t * written) {
    ckv_clear_error();
    TRY(context_check_seq(ctx, seq));
    const struct hparams * hp = &ctx->model->hp;
    const struct ckv_seq * sq = &ctx->seqs[seq];
    struct state_header    h  = header_of(ctx, seq);
    uint64_t size = state_bytes(hp, h.kv_type, h.n_past, h.n_logits);
    if (written) {
        *written = size;
    }
    if (!dst) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_context_state_save: dst must not be NULL");
    }
    if (cap < size) {
        return ckv_fail(CKV_ERR_BUFFER_TOO_SMALL, "a buffer of %llu bytes is too small for the state: %llu "
                        "needed", (unsigned long long) cap, (unsigned long long) size);
    }
    h.fingerprint = model_fingerprint(ctx->model);
    memcpy(dst, &h, sizeof(h));
    char * out = (char *) dst + sizeof(h);
    const uint64_t half = layer_half_bytes(hp, h.kv_type, h.n_past);
    const size_t   head = (size_t) h.n_past * hp->head_dim * sq->kv.elt_size;
    for (int32_t il = 0; il < hp->n_layer; il++, out += 2 * half) {
        if (ctx->gpu) {
            TRY(ckv_cuda_kv_copy_rows(ctx->gpu, seq, il, (int32_t) h.n_past, out, out + half, false));
            continue;
        }
        for (int32_t kh = 0; kh < hp->n_head_kv; kh++) {
            memcpy(out + kh * head, kv_cache_k(&sq->kv, il, kh), head);
            memcpy(out + half + kh * head, kv_cache_v(&sq->kv, il, kh), head);
        }
    }
    if (h.n_logits) {
        memcpy(out, ctx->logits + (size_t) sq->logits_row * hp->n_vocab, sizeof(float) * (size_t) hp->n_vocab);
    }
    return CKV_OK;
}

// Everything about a state that can be wrong, checked before anything changes.
static int32_t check_state(const ckv_context * ctx, const void * src, uint64_t size, struct state_header * h) {
    const struct hparams * hp = &ctx->model->hp;
    if (!src || size < sizeof(*h)) {
        return ckv_fail(CKV_ERR_FORMAT, "not a clusterkv state: %llu bytes", (unsigned long long) size);
    }
    memcpy(h, src, sizeof(*h));
    if (memcmp(h->magic, STATE_MAGIC, sizeof(h->magic)) != 0) {
        return ckv_fail(CKV_ERR_FORMAT, "not a clusterkv state (bad magic)");
    }
    if (h->version != STATE_VERSION) {
        return ckv_fail(CKV_ERR_FORMAT, "state format version %u; this library reads version %d", h->version,
                        STATE_VERSION);
    }
    if ((h->kv_type != CKV_KV_F16 && h->kv_type != CKV_KV_F32) || h->n_logits > 1) {
        return ckv_fail(CKV_ERR_FORMAT, "malformed state header (kv type %u, %u logits rows)", h->kv_type,
                        h->n_logits);
    }
    if (h->fingerprint != model_fingerprint(ctx->model) || h->n_layer != (uint32_t) hp->n_layer ||
        h->n_head_kv != (uint32_t) hp->n_head_kv || h->head_dim != (uint32_t) hp->head_dim ||
        h->n_vocab != (uint32_t) hp->n_vocab) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "the state belongs to another model (%u layers, %u KV heads of "
                        "%u, vocabulary %u, or other weights)", h->n_layer, h->n_head_kv, h->head_dim,
                        h->n_vocab);
    }
    if (h->n_past > ctx->params.n_ctx) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "the state holds %u positions; the context holds %u", h->n_past,
                        ctx->params.n_ctx);
    }
    uint64_t want = state_bytes(hp, h->kv_type, h->n_past, h->n_logits);
    if (size != want) {
        return ckv_fail(CKV_ERR_FORMAT, "state of %u positions: %llu bytes, expected %llu", h->n_past,
                        (unsigned long long) size, (unsigned long long) want);
    }
    if (ctx->pol.params.policy == CKV_KV_POLICY_H2O && h->n_past > 0) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "cannot load %u positions under h2o: it scores positions by the "
                        "prefill's attention weights, which a state does not hold", h->n_past);
    }
    return CKV_OK;
}

// n values of type `from` at src as type `to` at dst.
static void convert_values(const void * src, uint32_t from, void * dst, uint32_t to, size_t n) {
    if (from == to) {
        memcpy(dst, src, n * elt_size(from));
    } else if (from == CKV_KV_F16) {
        ckv_fp16_to_fp32_row(src, dst, (int64_t) n);
    } else {
        ckv_fp32_to_fp16_row(src, dst, (int64_t) n);
    }
}

// Layer il's rows (K at k, V at v, n positions of type `type`) into the sequence's cache.
// The GPU takes f16 only: other rows go through `tmp` (room for both halves as f16).
static int32_t write_layer(ckv_context * ctx, int32_t seq, int32_t il, const char * k, const char * v, uint32_t type,
                           int32_t n, ckv_fp16 * tmp) {
    const struct hparams * hp   = &ctx->model->hp;
    struct ckv_seq *       sq   = &ctx->seqs[seq];
    const size_t           vals = (size_t) n * hp->head_dim;   // one KV head's
    if (ctx->gpu) {
        if (type == CKV_KV_F16) {
            return ckv_cuda_kv_copy_rows(ctx->gpu, seq, il, n, (void *) k, (void *) v, true);
        }
        size_t all = vals * hp->n_head_kv;
        convert_values(k, type, tmp, CKV_KV_F16, all);
        convert_values(v, type, tmp + all, CKV_KV_F16, all);
        return ckv_cuda_kv_copy_rows(ctx->gpu, seq, il, n, tmp, tmp + all, true);
    }
    uint32_t to   = sq->kv.type == GGML_TYPE_F16 ? CKV_KV_F16 : CKV_KV_F32;
    size_t   head = vals * elt_size(type);
    for (int32_t kh = 0; kh < hp->n_head_kv; kh++) {
        convert_values(k + kh * head, type, (void *) kv_cache_k(&sq->kv, il, kh), to, vals);
        convert_values(v + kh * head, type, (void *) kv_cache_v(&sq->kv, il, kh), to, vals);
    }
    return CKV_OK;
}

// The rows of every layer, then the policy rebuilt over them.
static int32_t load_rows(ckv_context * ctx, int32_t seq, const struct state_header * h, const char * rows) {
    const struct hparams * hp   = &ctx->model->hp;
    const uint64_t         half = layer_half_bytes(hp, h->kv_type, h->n_past);
    ckv_fp16 * tmp = NULL;
    if (ctx->gpu && h->kv_type != CKV_KV_F16 && h->n_past > 0) {
        tmp = malloc(2 * (size_t) layer_half_bytes(hp, CKV_KV_F16, h->n_past));
        if (!tmp) {
            return ckv_fail(CKV_ERR_OOM, "out of memory converting a state's rows to f16");
        }
    }
    int32_t st = CKV_OK;
    for (int32_t il = 0; st == CKV_OK && h->n_past > 0 && il < hp->n_layer; il++, rows += 2 * half) {
        st = write_layer(ctx, seq, il, rows, rows + half, h->kv_type, (int32_t) h->n_past, tmp);
    }
    free(tmp);
    if (st != CKV_OK) {
        return st;
    }
    struct kv_policy * p = &ctx->pol.seqs[seq].policy;
    kv_policy_truncate(p, 0);
    kv_policy_rebuild(p, h->n_past);
    return ctx->gpu ? ckv_cuda_kv_reloaded(ctx->gpu, seq, (int32_t) h->n_past, &ctx->pol.params,
                                           ctx->pol.layer_compressed)
                    : CKV_OK;
}

int32_t ckv_context_state_load(ckv_context * ctx, int32_t seq, const void * src, uint64_t size) {
    ckv_clear_error();
    TRY(context_check_seq(ctx, seq));
    struct state_header h;
    TRY(check_state(ctx, src, size, &h));
    const struct hparams * hp = &ctx->model->hp;
    TRY(context_reserve_logits(ctx, h.n_logits));
    // From here on the sequence's old contents are gone: a failure leaves it empty.
    struct ckv_seq * sq = &ctx->seqs[seq];
    context_forget_logits(ctx);
    ctx->n_outputs   = 0;
    ctx->n_embd_rows = 0;
    sq->last_pos     = -1;   // no decode step's lists yet
    const char * rows = (const char *) src + sizeof(h);
    int32_t st = load_rows(ctx, seq, &h, rows);
    if (st != CKV_OK) {
        sq->n_past = 0;
        kv_policy_truncate(&ctx->pol.seqs[seq].policy, 0);
        if (ctx->gpu) {
            ckv_cuda_kv_truncate(ctx->gpu, seq, 0);
        }
        return st;
    }
    sq->n_past = (int32_t) h.n_past;
    if (h.n_logits) {
        const char * logits = rows + 2 * (uint64_t) hp->n_layer * layer_half_bytes(hp, h.kv_type, h.n_past);
        memcpy(ctx->logits, logits, sizeof(float) * (size_t) hp->n_vocab);
        ctx->n_outputs = 1;
        sq->logits_row = 0;
    }
    return CKV_OK;
}
