// kv.h - the dense KV cache (internal): post-RoPE keys and values of every cached position,
// stored per (layer, KV head) as contiguous rows so attention (and, later, clustering) streams
// one head's positions in order.
#ifndef CKV_KV_H
#define CKV_KV_H

#include <stddef.h>
#include <stdint.h>

struct kv_cache {
    int32_t  n_ctx;
    int32_t  n_layer;
    int32_t  n_head_kv;
    int32_t  head_dim;
    uint32_t type;       // GGML_TYPE_F16 or GGML_TYPE_F32
    size_t   elt_size;   // bytes per value
    void *   k;          // [n_layer][n_head_kv][n_ctx][head_dim]
    void *   v;          // [n_layer][n_head_kv][n_ctx][head_dim]
};

int32_t kv_cache_init(struct kv_cache * kv, int32_t n_ctx, int32_t n_layer, int32_t n_head_kv,
                      int32_t head_dim, uint32_t type);
void    kv_cache_free(struct kv_cache * kv);

// Stores n_tokens rows of k and v ([n_tokens][n_head_kv * head_dim] f32) at positions pos0 + t.
void kv_cache_store(struct kv_cache * kv, int32_t il, const float * k, const float * v,
                    int64_t n_tokens, int64_t pos0);

// Start of the rows of (layer il, KV head h): n_ctx rows of head_dim values.
static inline const void * kv_cache_k(const struct kv_cache * kv, int32_t il, int32_t h) {
    size_t row = ((size_t) il * kv->n_head_kv + h) * kv->n_ctx;
    return (const char *) kv->k + row * kv->head_dim * kv->elt_size;
}
static inline const void * kv_cache_v(const struct kv_cache * kv, int32_t il, int32_t h) {
    size_t row = ((size_t) il * kv->n_head_kv + h) * kv->n_ctx;
    return (const char *) kv->v + row * kv->head_dim * kv->elt_size;
}

#endif  // CKV_KV_H
