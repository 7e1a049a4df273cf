// model-load.c - reads an architecture's hyper-parameters from GGUF metadata and binds its
// weight tensors, checking every shape and type, so the forward pass can trust them.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "model.h"
#include "quants.h"

static const char * arch_names[] = {"llama", "qwen2", "gemma3"};

static int32_t arch_from_name(const char * name, enum model_arch * out) {
    for (int i = 0; i < (int) (sizeof(arch_names) / sizeof(arch_names[0])); i++) {
        if (strcmp(name, arch_names[i]) == 0) {
            *out = (enum model_arch) i;
            return CKV_OK;
        }
    }
    return ckv_fail(CKV_ERR_UNSUPPORTED,
                    "unsupported architecture '%s' (supported: llama, qwen2, gemma3)", name);
}

// --- metadata helpers: "<arch>.<key>" lookups with defaults ----------------------------------

static int32_t arch_u32(const struct ckv_model * m, const char * key, bool required,
                        uint32_t fallback, int32_t * out) {
    char full[128];
    snprintf(full, sizeof(full), "%s.%s", m->arch_name, key);
    uint32_t value = fallback;
    int32_t  st    = gguf_get_u32(m->file, full, &value);
    if (st == CKV_ERR_NOT_FOUND && !required) {
        value = fallback;
    } else if (st == CKV_ERR_NOT_FOUND) {
        return ckv_fail(CKV_ERR_FORMAT, "required metadata key '%s' is missing", full);
    } else if (st != CKV_OK) {
        return st;
    }
    if (value > INT32_MAX) {
        return ckv_fail(CKV_ERR_FORMAT, "metadata '%s' = %u is out of range", full, value);
    }
    *out = (int32_t) value;
    return CKV_OK;
}

static bool arch_has(const struct ckv_model * m, const char * key) {
    char full[128];
    snprintf(full, sizeof(full), "%s.%s", m->arch_name, key);
    return gguf_find_kv(m->file, full) != NULL;
}

// A float hyper-parameter (fallback when absent) that must be finite and > 0, or >= 0 with
// zero_ok: NaN, infinity or a wrong sign would load and then turn every logit into NaN.
static int32_t arch_f32(const struct ckv_model * m, const char * key, float fallback, bool zero_ok,
                        float * out) {
    char full[128];
    snprintf(full, sizeof(full), "%s.%s", m->arch_name, key);
    *out       = fallback;
    int32_t st = gguf_get_f32(m->file, full, out);
    if (st != CKV_OK && st != CKV_ERR_NOT_FOUND) {
        return st;
    }
    if (!isfinite(*out) || *out < 0.0f || (*out == 0.0f && !zero_ok)) {
        return ckv_fail(CKV_ERR_FORMAT, "metadata '%s' = %g must be finite and %s 0", full, (double) *out,
                        zero_ok ? ">=" : ">");
    }
    return CKV_OK;
}

// --- hyper-parameters ------------------------------------------------------------------------

static int32_t load_rope_scaling(struct ckv_model * m, struct hparams * hp) {
    char  key[128];
    float factor = 1.0f;
    struct gguf_str type = {0};
    snprintf(key, sizeof(key), "%s.rope.scaling.type", m->arch_name);
    bool has_type = gguf_get_str(m->file, key, &type) == CKV_OK;
    TRY(arch_f32(m, "rope.scaling.factor", 1.0f, true, &factor));   // 0: no scaling
    hp->rope_freq_scale = 1.0f;
    if (!has_type || (type.len == 4 && memcmp(type.data, "none", 4) == 0) || factor == 0.0f) {
        return CKV_OK;
    }
    if (type.len == 6 && memcmp(type.data, "linear", 6) == 0) {
        hp->rope_freq_scale = 1.0f / factor;
        return CKV_OK;
    }
    return ckv_fail(CKV_ERR_UNSUPPORTED, "RoPE scaling type '%.*s' is not supported (only linear)",
                    (int) type.len, type.data);
}

static int32_t load_hparams(struct ckv_model * m) {
    struct hparams * hp = &m->hp;
    TRY(arch_from_name(m->arch_name, &hp->arch));
    TRY(arch_u32(m, "context_length", true, 0, &hp->n_ctx_train));
    TRY(arch_u32(m, "embedding_length", true, 0, &hp->n_embd));
    TRY(arch_u32(m, "block_count", true, 0, &hp->n_layer));
    TRY(arch_u32(m, "feed_forward_length", true, 0, &hp->n_ff));
    TRY(arch_u32(m, "attention.head_count", true, 0, &hp->n_head));
    TRY(arch_u32(m, "attention.head_count_kv", false, (uint32_t) hp->n_head, &hp->n_head_kv));
    if (hp->n_embd <= 0 || hp->n_layer <= 0 || hp->n_head <= 0 || hp->n_head_kv <= 0 ||
        hp->n_ff <= 0 || hp->n_head % hp->n_head_kv != 0) {
        return ckv_fail(CKV_ERR_FORMAT,
                        "bad shape: n_embd %d, n_layer %d, n_head %d, n_head_kv %d, n_ff %d",
                        hp->n_embd, hp->n_layer, hp->n_head, hp->n_head_kv, hp->n_ff);
    }
    int32_t value_length = 0;
    if (arch_has(m, "attention.key_length")) {
        TRY(arch_u32(m, "attention.key_length", true, 0, &hp->head_dim));
    } else {   // the embedding split evenly over the heads
        if (hp->n_embd % hp->n_head != 0) {
            return ckv_fail(CKV_ERR_FORMAT, "embedding_length %d is not a multiple of head_count %d, and "
                            "the file gives no attention.key_length", hp->n_embd, hp->n_head);
        }
        hp->head_dim = hp->n_embd / hp->n_head;
    }
    TRY(arch_u32(m, "attention.value_length", false, (uint32_t) hp->head_dim, &value_length));
    if (value_length != hp->head_dim || hp->head_dim <= 0 || hp->head_dim % 2 != 0) {
        return ckv_fail(CKV_ERR_UNSUPPORTED, "key length %d and value length %d must be equal and even",
                        hp->head_dim, value_length);
    }
    TRY(arch_u32(m, "rope.dimension_count", false, (uint32_t) hp->head_dim, &hp->n_rot));
    if (hp->n_rot <= 0 || hp->n_rot > hp->head_dim || hp->n_rot % 2 != 0) {
        return ckv_fail(CKV_ERR_FORMAT, "rope.dimension_count %d does not fit head size %d",
                        hp->n_rot, hp->head_dim);
    }
    TRY(arch_f32(m, "attention.layer_norm_rms_epsilon", 1e-5f, true, &hp->rms_eps));
    TRY(arch_f32(m, "rope.freq_base", 10000.0f, false, &hp->rope_base));
    TRY(load_rope_scaling(m, hp));
    hp->rope_base_swa = hp->rope_base;
    hp->rope_mode     = hp->arch == ARCH_LLAMA ? ROPE_NORM : ROPE_NEOX;
    hp->attn_scale    = 1.0f / sqrtf((float) hp->head_dim);
    hp->embd_scale    = 1.0f;
    if (hp->arch == ARCH_GEMMA3) {
        // Architecture constants with llama.cpp's defaults when the file does not store them:
        // every 6th layer is global, the sliding-window layers use RoPE base 10000.
        hp->embd_scale = sqrtf((float) hp->n_embd);
        TRY(arch_u32(m, "attention.sliding_window", false, 0, &hp->n_swa));
        TRY(arch_u32(m, "attention.sliding_window_pattern", false, 6, &hp->swa_period));
        TRY(arch_f32(m, "rope.freq_base_swa", 10000.0f, false, &hp->rope_base_swa));
    }
    return CKV_OK;
}

// --- weights ---------------------------------------------------------------------------------

// Binds tensor `name` and checks it is [ne0] (ne1 == 0) or [ne0, ne1] of a supported type.
static int32_t bind(struct ckv_model * m, const char * name, int64_t ne0, int64_t ne1,
                    bool required, struct weight * w) {
    memset(w, 0, sizeof(*w));
    const struct gguf_tensor * t = gguf_find_tensor(m->file, name);
    if (!t) {
        return required ? ckv_fail(CKV_ERR_FORMAT, "tensor '%s' is missing", name) : CKV_OK;
    }
    int64_t want1 = ne1 == 0 ? 1 : ne1;
    if (t->ne[0] != ne0 || t->ne[1] != want1 || t->ne[2] != 1 || t->ne[3] != 1) {
        return ckv_fail(CKV_ERR_FORMAT,
                        "tensor '%s' has shape [%lld, %lld, %lld, %lld], expected [%lld, %lld]", name,
                        (long long) t->ne[0], (long long) t->ne[1], (long long) t->ne[2],
                        (long long) t->ne[3], (long long) ne0, (long long) want1);
    }
    const struct ggml_type_traits * tt = ggml_type_traits_get(t->type);
    if (!tt || !tt->is_weight) {
        return ckv_fail(CKV_ERR_UNSUPPORTED, "tensor '%s' has unsupported type %s (%u)", name,
                        ggml_type_name(t->type), t->type);
    }
    if (ne1 == 0 && t->type != GGML_TYPE_F32) {
        return ckv_fail(CKV_ERR_UNSUPPORTED, "vector '%s' must be f32, not %s", name,
                        ggml_type_name(t->type));
    }
    m->bound[t - m->file->tensors] = true;
    w->data     = t->data;
    w->type     = t->type;
    w->ne[0]    = t->ne[0];
    w->ne[1]    = want1;
    w->row_size = ggml_row_size(t->type, t->ne[0]);
    return CKV_OK;
}

static int32_t bind_layer(struct ckv_model * m, int il) {
    const struct hparams * hp = &m->hp;
    struct layer_weights * L  = &m->layers[il];
    int64_t                q_dim = (int64_t) hp->n_head * hp->head_dim;
    int64_t                kv_dim = (int64_t) hp->n_head_kv * hp->head_dim;
    bool                   gemma = hp->arch == ARCH_GEMMA3;
    char                   n[96];
#define NAME(suffix) (snprintf(n, sizeof(n), "blk.%d." suffix, il), n)
    TRY(bind(m, NAME("attn_norm.weight"), hp->n_embd, 0, true, &L->attn_norm));
    TRY(bind(m, NAME("attn_q.weight"), hp->n_embd, q_dim, true, &L->attn_q));
    TRY(bind(m, NAME("attn_k.weight"), hp->n_embd, kv_dim, true, &L->attn_k));
    TRY(bind(m, NAME("attn_v.weight"), hp->n_embd, kv_dim, true, &L->attn_v));
    TRY(bind(m, NAME("attn_output.weight"), q_dim, hp->n_embd, true, &L->attn_output));
    bool qwen = hp->arch == ARCH_QWEN2;
    TRY(bind(m, NAME("attn_q.bias"), q_dim, 0, qwen, &L->attn_q_bias));
    TRY(bind(m, NAME("attn_k.bias"), kv_dim, 0, qwen, &L->attn_k_bias));
    TRY(bind(m, NAME("attn_v.bias"), kv_dim, 0, qwen, &L->attn_v_bias));
    TRY(bind(m, NAME("attn_q_norm.weight"), hp->head_dim, 0, gemma, &L->attn_q_norm));
    TRY(bind(m, NAME("attn_k_norm.weight"), hp->head_dim, 0, gemma, &L->attn_k_norm));
    TRY(bind(m, NAME("post_attention_norm.weight"), hp->n_embd, 0, gemma, &L->post_attention_norm));
    TRY(bind(m, NAME("post_ffw_norm.weight"), hp->n_embd, 0, gemma, &L->post_ffw_norm));
    TRY(bind(m, NAME("ffn_norm.weight"), hp->n_embd, 0, true, &L->ffn_norm));
    TRY(bind(m, NAME("ffn_gate.weight"), hp->n_embd, hp->n_ff, true, &L->ffn_gate));
    TRY(bind(m, NAME("ffn_up.weight"), hp->n_embd, hp->n_ff, true, &L->ffn_up));
    TRY(bind(m, NAME("ffn_down.weight"), hp->n_ff, hp->n_embd, true, &L->ffn_down));
#undef NAME
    return CKV_OK;
}

static int32_t bind_globals(struct ckv_model * m) {
    struct hparams * hp = &m->hp;
    const struct gguf_tensor * embd = gguf_find_tensor(m->file, "token_embd.weight");
    if (!embd) {
        return ckv_fail(CKV_ERR_FORMAT, "tensor 'token_embd.weight' is missing");
    }
    hp->n_vocab = (int32_t) embd->ne[1];
    if (m->vocab && vocab_n_tokens(m->vocab) > hp->n_vocab) {
        return ckv_fail(CKV_ERR_FORMAT, "the tokenizer has %d tokens but token_embd only %d rows",
                        vocab_n_tokens(m->vocab), hp->n_vocab);
    }
    TRY(bind(m, "token_embd.weight", hp->n_embd, hp->n_vocab, true, &m->token_embd));
    TRY(bind(m, "output_norm.weight", hp->n_embd, 0, true, &m->output_norm));
    TRY(bind(m, "output.weight", hp->n_embd, hp->n_vocab, false, &m->output));
    if (!m->output.data) {
        m->output = m->token_embd;  // tied embeddings
    }
    struct weight freqs;
    TRY(bind(m, "rope_freqs.weight", hp->n_rot / 2, 0, false, &freqs));
    m->rope_freqs = freqs.data;
    return CKV_OK;
}

// A tensor no weight uses would be silently ignored: a variant of the architecture (extra
// biases, norms, experts) this build does not implement. Refused, as llama.cpp refuses a file
// whose tensor count differs from what it created.
static int32_t check_all_bound(const struct ckv_model * m) {
    for (uint64_t i = 0; i < m->file->n_tensors; i++) {
        if (m->bound[i]) {
            continue;
        }
        const char * name = m->file->tensors[i].name;
        int          layer;
        if (sscanf(name, "blk.%d.", &layer) == 1 && layer >= m->hp.n_layer) {
            return ckv_fail(CKV_ERR_FORMAT, "tensor '%s' is for layer %d but block_count is %d",
                            name, layer, m->hp.n_layer);
        }
        return ckv_fail(CKV_ERR_UNSUPPORTED, "tensor '%s' is not used by this build's %s "
                        "architecture (a variant it does not implement?): refusing to run "
                        "without it", name, m->arch_name);
    }
    return CKV_OK;
}

static int32_t bind_all(struct ckv_model * model) {
    TRY(bind_globals(model));
    // Every layer has several tensors of its own: a block_count past the tensor count is wrong,
    // and refusing it here saves allocating its layer table (up to INT32_MAX entries).
    if ((uint64_t) model->hp.n_layer > model->file->n_tensors) {
        return ckv_fail(CKV_ERR_FORMAT, "block_count %d is more than the file's %llu tensors",
                        model->hp.n_layer, (unsigned long long) model->file->n_tensors);
    }
    model->layers = calloc((size_t) model->hp.n_layer, sizeof(struct layer_weights));
    if (!model->layers) {
        return ckv_fail(CKV_ERR_OOM, "out of memory for %d layers", model->hp.n_layer);
    }
    for (int il = 0; il < model->hp.n_layer; il++) {
        TRY(bind_layer(model, il));
    }
    return check_all_bound(model);
}

int32_t model_load_arch(struct ckv_model * model) {
    TRY(load_hparams(model));
    model->bound = calloc(model->file->n_tensors ? model->file->n_tensors : 1, sizeof(bool));
    if (!model->bound) {
        return ckv_fail(CKV_ERR_OOM, "out of memory for %llu tensor flags",
                        (unsigned long long) model->file->n_tensors);
    }
    int32_t status = bind_all(model);
    free(model->bound);
    model->bound = NULL;
    return status;
}
