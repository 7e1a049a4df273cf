// cuda-none.c - the CUDA backend's entry points (native/cuda/cuda-backend.h) in a build without
// it: there is never a device, so model.c refuses n_gpu_layers != 0 before anything here could
// create a GPU copy, and context.c never sees one. Keeps model.c and context.c free of #ifdefs.
#include "../cuda/cuda-backend.h"
#include "error.h"

#ifndef CKV_HAVE_CUDA

int32_t ckv_cuda_device_count(void) { return 0; }

const char * ckv_cuda_device_name(void) {
    return "no CUDA device (this library was built without the CUDA backend)";
}

int32_t ckv_cuda_model_create(const struct ckv_model * m, struct cuda_model ** out) {
    (void) m;
    *out = NULL;
    return ckv_fail(CKV_ERR_UNSUPPORTED, "this library was built without the CUDA backend");
}

void     ckv_cuda_model_free(struct cuda_model * gm) { (void) gm; }
uint64_t ckv_cuda_model_size(const struct cuda_model * gm) { (void) gm; return 0; }

int32_t ckv_cuda_context_create(const struct cuda_model * gm, int32_t n_ctx, int32_t n_batch, int32_t n_seq,
                                const bool * offload_layers, struct cuda_context ** out) {
    (void) gm, (void) n_ctx, (void) n_batch, (void) n_seq, (void) offload_layers;
    *out = NULL;
    return ckv_fail(CKV_ERR_UNSUPPORTED, "this library was built without the CUDA backend");
}

void ckv_cuda_context_free(struct cuda_context * gc) { (void) gc; }

int32_t ckv_cuda_decode(struct cuda_context * gc, int32_t seq, const int32_t * tokens, int32_t n, int32_t pos0,
                        int32_t first_output, float * logits_host, bool decode_step, float * embd_host) {
    (void) gc, (void) seq, (void) tokens, (void) n, (void) pos0, (void) first_output, (void) logits_host;
    (void) decode_step, (void) embd_host;
    return ckv_fail(CKV_ERR_UNSUPPORTED, "this library was built without the CUDA backend");
}

int32_t ckv_cuda_decode_batch(struct cuda_context * gc, const int32_t * seqs, const int32_t * tokens,
                              const int32_t * pos, int32_t n, float * logits_host) {
    (void) gc, (void) seqs, (void) tokens, (void) pos, (void) n, (void) logits_host;
    return ckv_fail(CKV_ERR_UNSUPPORTED, "this library was built without the CUDA backend");
}

// No GPU context can exist in this build, so nothing below is ever reached with one.
int32_t ckv_cuda_set_kv_policy(struct cuda_context * gc, const struct ckv_kv_policy_params * params,
                               const bool * layer_compressed, const int32_t * n_past) {
    (void) gc, (void) params, (void) layer_compressed, (void) n_past;
    return ckv_fail(CKV_ERR_UNSUPPORTED, "this library was built without the CUDA backend");
}

bool    ckv_cuda_has_kv_policy(const struct cuda_context * gc) { (void) gc; return false; }
void    ckv_cuda_kv_memory(const struct cuda_context * gc, uint64_t * device_kv, uint64_t * host_kv,
                           uint64_t * device_policy) {
    (void) gc;
    *device_kv = *host_kv = *device_policy = 0;
}
void    ckv_cuda_kv_truncate(struct cuda_context * gc, int32_t seq, int32_t n_keep) {
    (void) gc, (void) seq, (void) n_keep;
}
int32_t ckv_cuda_kv_copy_rows(struct cuda_context * gc, int32_t seq, int32_t il, int32_t n, void * k, void * v,
                              bool to_cache) {
    (void) gc, (void) seq, (void) il, (void) n, (void) k, (void) v, (void) to_cache;
    return ckv_fail(CKV_ERR_UNSUPPORTED, "this library was built without the CUDA backend");
}
int32_t ckv_cuda_kv_reloaded(struct cuda_context * gc, int32_t seq, int32_t n,
                             const struct ckv_kv_policy_params * params, const bool * layer_compressed) {
    (void) gc, (void) seq, (void) n, (void) params, (void) layer_compressed;
    return ckv_fail(CKV_ERR_UNSUPPORTED, "this library was built without the CUDA backend");
}
int32_t ckv_cuda_kv_stats(struct cuda_context * gc, struct ckv_kv_stats * out) {
    (void) gc, (void) out;
    return CKV_OK;
}
int32_t ckv_cuda_kv_reset_stats(struct cuda_context * gc) { (void) gc; return CKV_OK; }
int32_t ckv_cuda_kv_n_clusters(const struct cuda_context * gc, int32_t il) { (void) gc, (void) il; return 0; }
int32_t ckv_cuda_kv_selection(struct cuda_context * gc, int32_t il, int32_t h, int32_t * buf, int32_t cap,
                              int32_t * n, bool * sparse) {
    (void) gc, (void) il, (void) h, (void) buf, (void) cap, (void) n;
    *sparse = false;
    return CKV_OK;
}

#endif  // CKV_HAVE_CUDA
