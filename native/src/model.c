// model.c - the public model API: load (GGUF -> tokenizer -> architecture -> optional GPU
// copy), metadata and tensor inspection, and the vocabulary calls, which forward to tokenizer.c.
#include "model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../cuda/cuda-backend.h"  // without CKV_HAVE_CUDA: cuda-none.c (never a device)
#include "error.h"
#include "quants.h"

#ifndef CKV_VERSION_STRING
#    define CKV_VERSION_STRING "0.0.0"
#endif

const char * ckv_version(void) { return CKV_VERSION_STRING; }

int32_t ckv_api_version(void) { return CKV_API_VERSION; }

// "NVIDIA H200, 139.8 GiB, sm_90", "no device" or "not built".
static const char * cuda_summary(void) {
#ifdef CKV_HAVE_CUDA
    return ckv_cuda_device_count() > 0 ? ckv_cuda_device_name() : "no device";
#else
    return "not built";
#endif
}

const char * ckv_system_info(void) {
    static char info[512];
    quants_init();
    snprintf(info, sizeof(info), "CPU: %s | CUDA: %s", quants_cpu_features(), cuda_summary());
    return info;
}

void ckv_model_default_params(struct ckv_model_params * out) {
    memset(out, 0, sizeof(*out));
    out->use_mmap = true;
}

static char * dup_str(const char * s, size_t n) {
    char * copy = malloc(n + 1);
    if (copy) {
        memcpy(copy, s, n);
        copy[n] = '\0';
    }
    return copy;
}

static int32_t read_names(ckv_model * m) {
    struct gguf_str arch = {0}, name = {0};
    if (gguf_get_str(m->file, "general.architecture", &arch) != CKV_OK) {
        return ckv_fail(CKV_ERR_FORMAT, "metadata key 'general.architecture' is missing or not a string");
    }
    gguf_get_str(m->file, "general.name", &name);  // optional
    m->arch_name = dup_str(arch.data, arch.len);
    m->name      = dup_str(name.data ? name.data : "", name.len);
    if (!m->arch_name || !m->name) {
        return ckv_fail(CKV_ERR_OOM, "out of memory");
    }
    if (strlen(m->arch_name) != arch.len || strlen(m->arch_name) > 64) {
        return ckv_fail(CKV_ERR_FORMAT, "general.architecture is not a valid name");
    }
    return CKV_OK;
}

static int32_t load_parts(ckv_model * m, const char * path, const struct ckv_model_params * p) {
    int32_t st = gguf_open(path, p->use_mmap, &m->file);
    if (st == CKV_OK) {
        st = read_names(m);
    }
    if (st != CKV_OK || p->metadata_only) {
        return st;
    }
    st = vocab_load(m->file, &m->vocab);
    if (st != CKV_OK || p->vocab_only) {
        return st;
    }
    st = model_load_arch(m);
    m->can_forward = st == CKV_OK;
    if (st == CKV_OK && p->use_mlock) {
        gguf_lock_image(m->file);
    }
    if (st == CKV_OK && p->rope_freq_base > 0.0f) {
        m->hp.rope_base = p->rope_freq_base;
    }
    if (st == CKV_OK && p->rope_freq_scale > 0.0f) {
        m->hp.rope_freq_scale = p->rope_freq_scale;
    }
    return st;
}

// Whether a GPU can be used at all, checked before the file is read: this build has the CUDA
// backend and a device is usable.
static int32_t check_gpu_request(int32_t n_gpu_layers) {
#ifdef CKV_HAVE_CUDA
    if (ckv_cuda_device_count() == 0) {
        return ckv_fail(CKV_ERR_CUDA, "n_gpu_layers = %d asks for the GPU but no CUDA device is "
                        "usable: %s (use n_gpu_layers = 0 for the CPU)", n_gpu_layers,
                        ckv_cuda_device_name());
    }
    return CKV_OK;
#else
    return ckv_fail(CKV_ERR_UNSUPPORTED,
                    "n_gpu_layers = %d asks for the GPU, but this library was built without "
                    "the CUDA backend (use n_gpu_layers = 0)", n_gpu_layers);
#endif
}

// Uploads the weights once the layer count is known. The backend runs whole models only, so
// a request for some of the layers is refused rather than silently rounded either way.
static int32_t attach_gpu(ckv_model * m, int32_t n_gpu_layers) {
    if (n_gpu_layers > 0 && n_gpu_layers < m->hp.n_layer) {
        return ckv_fail(CKV_ERR_UNSUPPORTED, "n_gpu_layers = %d would put %d of the %d layers on "
                        "the GPU, but partial offload is not supported: use n_gpu_layers = -1 "
                        "(or >= %d) for the whole model on the GPU, or 0 for the CPU",
                        n_gpu_layers, n_gpu_layers, m->hp.n_layer, m->hp.n_layer);
    }
    return ckv_cuda_model_create(m, &m->gpu);
}

int32_t ckv_model_load(const char * path, const struct ckv_model_params * params, ckv_model ** out) {
    ckv_clear_error();
    if (!path || !params || !out) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_model_load: path, params and out must not be NULL");
    }
    *out = NULL;
    if (params->n_gpu_layers < -1) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "n_gpu_layers must be -1 (all), 0 (CPU only) or a "
                        "layer count, got %d", params->n_gpu_layers);
    }
    if (!(params->rope_freq_base >= 0.0f && params->rope_freq_base < INFINITY) ||
        !(params->rope_freq_scale >= 0.0f && params->rope_freq_scale < INFINITY)) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "rope_freq_base (%g) and rope_freq_scale (%g) must be finite "
                        "and >= 0 (0 = the file's)", params->rope_freq_base, params->rope_freq_scale);
    }
    // vocab_only / metadata_only load no weights, so there is nothing to put on a GPU.
    bool    wants_gpu = params->n_gpu_layers != 0 && !params->vocab_only && !params->metadata_only;
    int32_t st = wants_gpu ? check_gpu_request(params->n_gpu_layers) : CKV_OK;
    if (st != CKV_OK) {
        return st;
    }
    quants_init();
    ckv_model * m = calloc(1, sizeof(*m));
    if (!m) {
        return ckv_fail(CKV_ERR_OOM, "out of memory");
    }
    st = load_parts(m, path, params);
    if (st == CKV_OK && wants_gpu) {
        st = attach_gpu(m, params->n_gpu_layers);
    }
    if (st != CKV_OK) {
        ckv_model_free(m);
        return st;
    }
    *out = m;
    return CKV_OK;
}

void ckv_model_free(ckv_model * model) {
    if (!model) {
        return;
    }
    ckv_cuda_model_free(model->gpu);  // before the file: the copy points at the mapped weights
    vocab_free(model->vocab);
    gguf_close(model->file);
    free(model->layers);
    free(model->arch_name);
    free(model->name);
    free(model);
}

void ckv_model_get_info(const ckv_model * m, struct ckv_model_info * out) {
    memset(out, 0, sizeof(*out));
    out->arch        = m->arch_name;
    out->name        = m->name;
    out->n_vocab     = m->vocab ? vocab_n_tokens(m->vocab) : m->hp.n_vocab;
    out->n_ctx_train = m->hp.n_ctx_train;
    out->n_embd      = m->hp.n_embd;
    out->n_layer     = m->hp.n_layer;
    out->n_head      = m->hp.n_head;
    out->n_head_kv   = m->hp.n_head_kv;
    out->head_dim    = m->hp.head_dim;
    out->n_ff        = m->hp.n_ff;
    for (uint64_t i = 0; i < m->file->n_tensors; i++) {
        const struct gguf_tensor * t = &m->file->tensors[i];
        out->n_params += (uint64_t) (t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3]);
        out->size += t->size;
    }
}

// --- metadata and tensors --------------------------------------------------------------------

static int32_t copy_out(const char * s, size_t n, char * buf, size_t cap, size_t * n_needed) {
    if (n_needed) {
        *n_needed = n;
    }
    if (!buf || cap < n + 1) {
        return ckv_fail(CKV_ERR_BUFFER_TOO_SMALL, "buffer of %zu bytes is too small: %zu needed",
                        cap, n + 1);
    }
    memcpy(buf, s, n);
    buf[n] = '\0';
    return CKV_OK;
}

int32_t ckv_model_meta_count(const ckv_model * m) { return (int32_t) m->file->n_kv; }

int32_t ckv_model_meta_key(const ckv_model * m, int32_t i, char * buf, size_t cap, size_t * n_needed) {
    ckv_clear_error();
    if (i < 0 || (uint64_t) i >= m->file->n_kv) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "metadata index %d is out of range [0, %llu)", i,
                        (unsigned long long) m->file->n_kv);
    }
    const char * key = m->file->kv[i].key;
    return copy_out(key, strlen(key), buf, cap, n_needed);
}

int32_t ckv_model_meta_value(const ckv_model * m, const char * key, char * buf, size_t cap,
                             size_t * n_needed) {
    ckv_clear_error();
    const struct gguf_kv * kv = key ? gguf_find_kv(m->file, key) : NULL;
    if (!kv) {
        return ckv_fail(CKV_ERR_NOT_FOUND, "metadata key '%s' not found", key ? key : "(null)");
    }
    return gguf_kv_to_string(kv, buf, cap, n_needed);
}

int32_t ckv_model_n_tensors(const ckv_model * m) { return (int32_t) m->file->n_tensors; }

int32_t ckv_model_tensor_info(const ckv_model * m, int32_t i, struct ckv_tensor_info * out) {
    ckv_clear_error();
    if (i < 0 || (uint64_t) i >= m->file->n_tensors) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "tensor index %d is out of range [0, %llu)", i,
                        (unsigned long long) m->file->n_tensors);
    }
    const struct gguf_tensor * t = &m->file->tensors[i];
    out->name      = t->name;
    out->type      = (int32_t) t->type;
    out->type_name = ggml_type_name(t->type);
    out->n_dims    = (int32_t) t->n_dims;
    memcpy(out->ne, t->ne, sizeof(out->ne));
    out->offset = m->file->data_offset + t->offset;
    out->size   = t->size;
    return CKV_OK;
}

int32_t ckv_model_tensor_dequantize(const ckv_model * m, const char * name, float * out, int64_t n_out) {
    ckv_clear_error();
    const struct gguf_tensor * t = name ? gguf_find_tensor(m->file, name) : NULL;
    if (!t) {
        return ckv_fail(CKV_ERR_NOT_FOUND, "tensor '%s' not found", name ? name : "(null)");
    }
    // GGUF files may hold types we only know the block size of (IQ*, TQ*, MXFP4, I8..F64):
    // those have no dequantize_row kernel.
    const struct ggml_type_traits * tt = ggml_type_traits_get(t->type);
    if (!tt || !tt->is_weight) {
        return ckv_fail(CKV_ERR_UNSUPPORTED, "tensor '%s' has type %s, which cannot be dequantised "
                        "(supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K)",
                        name, ggml_type_name(t->type));
    }
    int64_t rows = t->ne[1] * t->ne[2] * t->ne[3];
    if (!out || n_out < rows * t->ne[0]) {
        return ckv_fail(CKV_ERR_BUFFER_TOO_SMALL, "tensor '%s' has %lld elements, buffer holds %lld",
                        name, (long long) (rows * t->ne[0]), (long long) n_out);
    }
    size_t row_size = ggml_row_size(t->type, t->ne[0]);
    for (int64_t r = 0; r < rows; r++) {
        dequantize_row(t->type, (const uint8_t *) t->data + r * row_size, out + r * t->ne[0], t->ne[0]);
    }
    return CKV_OK;
}

// --- vocabulary: thin forwards to tokenizer.c ------------------------------------------------

static int32_t no_vocab(void) {
    return ckv_fail(CKV_ERR_INVALID_ARG, "the model was loaded with metadata_only: no tokenizer");
}

int32_t   ckv_vocab_n_tokens(const ckv_model * m) { return m->vocab ? vocab_n_tokens(m->vocab) : 0; }
ckv_token ckv_token_bos(const ckv_model * m) { return m->vocab ? vocab_bos(m->vocab) : -1; }
ckv_token ckv_token_eos(const ckv_model * m) { return m->vocab ? vocab_eos(m->vocab) : -1; }
bool      ckv_vocab_add_bos(const ckv_model * m) { return m->vocab && vocab_add_bos(m->vocab); }
bool      ckv_token_is_eog(const ckv_model * m, ckv_token t) { return m->vocab && vocab_is_eog(m->vocab, t); }
int32_t   ckv_token_attr(const ckv_model * m, ckv_token t) { return m->vocab ? vocab_token_attr(m->vocab, t) : 0; }
const char * ckv_token_text(const ckv_model * m, ckv_token t) { return m->vocab ? vocab_token_text(m->vocab, t) : NULL; }

int32_t ckv_tokenize(const ckv_model * m, const char * text, int32_t text_len, ckv_token * tokens,
                     int32_t cap, bool add_special, bool parse_special, int32_t * n_needed) {
    ckv_clear_error();
    if (!m->vocab) {
        return no_vocab();
    }
    return vocab_tokenize(m->vocab, text, text_len, tokens, cap, add_special, parse_special, n_needed);
}

int32_t ckv_token_to_piece(const ckv_model * m, ckv_token token, char * buf, int32_t cap, bool special,
                           int32_t * n_needed) {
    ckv_clear_error();
    if (!m->vocab) {
        return no_vocab();
    }
    return vocab_token_to_piece(m->vocab, token, buf, cap, special, n_needed);
}

int32_t ckv_detokenize(const ckv_model * m, const ckv_token * tokens, int32_t n_tokens, char * buf,
                       int32_t cap, bool special, int32_t * n_needed) {
    ckv_clear_error();
    if (!m->vocab) {
        return no_vocab();
    }
    return vocab_detokenize(m->vocab, tokens, n_tokens, buf, cap, special, n_needed);
}
