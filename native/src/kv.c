// kv.c - dense KV cache storage: allocation and per-position writes (f16 or f32).
#include "kv.h"

#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "quants.h"

int32_t kv_cache_init(struct kv_cache * kv, int32_t n_ctx, int32_t n_layer, int32_t n_head_kv,
                      int32_t head_dim, uint32_t type) {
    memset(kv, 0, sizeof(*kv));
    if (type != GGML_TYPE_F16 && type != GGML_TYPE_F32) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "kv_type must be CKV_KV_F16 (1) or CKV_KV_F32 (0), got %u",
                        type);
    }
    kv->n_ctx     = n_ctx;
    kv->n_layer   = n_layer;
    kv->n_head_kv = n_head_kv;
    kv->head_dim  = head_dim;
    kv->type      = type;
    kv->elt_size  = type == GGML_TYPE_F16 ? sizeof(ckv_fp16) : sizeof(float);
    size_t bytes  = (size_t) n_layer * n_head_kv * n_ctx * head_dim * kv->elt_size;
    kv->k         = malloc(bytes);
    kv->v         = malloc(bytes);
    if (!kv->k || !kv->v) {
        kv_cache_free(kv);
        return ckv_fail(CKV_ERR_OOM, "out of memory for the KV cache (2 x %zu bytes for n_ctx %d)",
                        bytes, n_ctx);
    }
    return CKV_OK;
}

void kv_cache_free(struct kv_cache * kv) {
    free(kv->k);
    free(kv->v);
    kv->k = kv->v = NULL;
}

static void store_row(const struct kv_cache * kv, void * base, const float * src) {
    if (kv->type == GGML_TYPE_F16) {
        ckv_fp32_to_fp16_row(src, base, kv->head_dim);
    } else {
        memcpy(base, src, (size_t) kv->head_dim * sizeof(float));
    }
}

void kv_cache_store(struct kv_cache * kv, int32_t il, const float * k, const float * v,
                    int64_t n_tokens, int64_t pos0) {
    size_t row_bytes = (size_t) kv->head_dim * kv->elt_size;
    for (int32_t h = 0; h < kv->n_head_kv; h++) {
        char * k_rows = (char *) kv_cache_k(kv, il, h);
        char * v_rows = (char *) kv_cache_v(kv, il, h);
        for (int64_t t = 0; t < n_tokens; t++) {
            size_t src = (size_t) t * kv->n_head_kv * kv->head_dim + (size_t) h * kv->head_dim;
            store_row(kv, k_rows + (pos0 + t) * row_bytes, k + src);
            store_row(kv, v_rows + (pos0 + t) * row_bytes, v + src);
        }
    }
}
