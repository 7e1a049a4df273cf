// cuda-backend.h - the CUDA backend as context.c sees it (internal, plain C, no CUDA types).
// A cuda_model is a device copy of a loaded ckv_model's weights; a cuda_context holds the f16
// KV cache, the activation scratch and a stream on the device, and runs the whole forward pass
// (every layer, prefill and decode) there. Errors are recorded with ckv_fail and returned as
// ckv_status codes (CKV_ERR_CUDA, CKV_ERR_UNSUPPORTED, CKV_ERR_OOM, CKV_ERR_INVALID_ARG).
//
// The library links the CUDA runtime statically, so it loads on machines without a GPU or
// driver: ckv_cuda_device_count() then reports 0 and nothing else here should be called.
#ifndef CKV_CUDA_BACKEND_H
#define CKV_CUDA_BACKEND_H

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct ckv_model;
struct ckv_kv_policy_params;
struct ckv_kv_stats;
struct cuda_model;
struct cuda_context;

// Number of usable CUDA devices; 0 (never an error) without a driver or a device.
int32_t ckv_cuda_device_count(void);

// "NVIDIA H200, 139.8 GiB, sm_90" for device 0, or the reason there is none. Never NULL.
const char * ckv_cuda_device_name(void);

// Uploads every weight of m (which must outlive the copy) to device 0. CKV_ERR_CUDA when there
// is no device, CKV_ERR_UNSUPPORTED for a tensor type or head size without kernels, CKV_ERR_OOM
// when the weights do not fit in device memory.
int32_t ckv_cuda_model_create(const struct ckv_model * m, struct cuda_model ** out);
void    ckv_cuda_model_free(struct cuda_model * gm);   // accepts NULL

// Device bytes the weights occupy.
uint64_t ckv_cuda_model_size(const struct cuda_model * gm);

// A context for n_seq sequences of up to n_ctx positions each (its own KV cache and policy),
// n_batch tokens per ckv_cuda_decode call. offload_layers (NULL: none; one sequence only) marks
// the layers whose K/V live in pinned host memory (kv_offload: the layers a clusterkv policy
// compresses; its policy must then be clusterkv over exactly those layers).
int32_t ckv_cuda_context_create(const struct cuda_model * gm, int32_t n_ctx, int32_t n_batch, int32_t n_seq,
                                const bool * offload_layers, struct cuda_context ** out);
void    ckv_cuda_context_free(struct cuda_context * gc);   // accepts NULL

// Runs tokens [0, n) at positions pos0 .. pos0 + n - 1 through the model, writing their keys and
// values to the cache (positions >= pos0 are overwritten, so truncation is just a smaller pos0),
// and copies the logits of tokens [first_output, n) to logits_host ((n - first_output) rows of
// n_vocab floats; nothing when first_output >= n). Returns when the logits are on the host.
// decode_step (with n == 1): the KV policy applies, as ckv_decode's one-token calls on the CPU;
// everything else (prefill) attends densely. embd_host != NULL also gets every token's
// final-normed hidden state (n rows of n_embd floats; such a step runs outside the graph).
// CKV_ERR_INVALID_ARG for n < 1 or n > n_batch or a token outside the vocabulary,
// CKV_ERR_CTX_FULL for pos0 + n > n_ctx, CKV_ERR_CUDA if a kernel or copy fails.
int32_t ckv_cuda_decode(struct cuda_context * gc, int32_t seq, const int32_t * tokens, int32_t n, int32_t pos0,
                        int32_t first_output, float * logits_host, bool decode_step, float * embd_host);
// One decode step of n distinct sequences together: token t goes to sequence seqs[t] at position
// pos[t] (its KV policy applies), logits_host gets n rows. The weights are read once for all
// rows (the chunk matmul kernels); attention runs per token over its sequence. No graph.
int32_t ckv_cuda_decode_batch(struct cuda_context * gc, const int32_t * seqs, const int32_t * tokens,
                              const int32_t * pos, int32_t n, float * logits_host);

// The KV policy of decode steps for every sequence: full (the default), streaming, quest or
// clusterkv, params validated by the caller (kv_policy_init_params_only), layer_compressed
// [n_layer] as context.c computes it, n_past[seq] (NULL: 0) the positions each cache already
// holds (quest builds their page bounds;
// clusters are built lazily, at the next decode step, as the CPU policy does after a prefill).
// CKV_ERR_UNSUPPORTED for h2o, CKV_ERR_OOM; on error the old policy stays.
int32_t ckv_cuda_set_kv_policy(struct cuda_context * gc, const struct ckv_kv_policy_params * params,
                               const bool * layer_compressed, const int32_t * n_past);
bool    ckv_cuda_has_kv_policy(const struct cuda_context * gc);   // a policy other than full
// Bytes of K/V rows on the GPU (the GPU layers' cache, the offload staging buffer and slots),
// in host memory (offloaded layers), and of the policy's other GPU state (centroids, indexes).
void    ckv_cuda_kv_memory(const struct cuda_context * gc, uint64_t * device_kv, uint64_t * host_kv,
                           uint64_t * device_policy);
void    ckv_cuda_kv_truncate(struct cuda_context * gc, int32_t seq, int32_t n_keep);  // positions >= n_keep dropped
// Rows [0, n) of layer il of sequence seq, K and V, copied between its cache and host buffers
// laid out [n_head_kv][n][head_dim] f16 (to_cache: from k / v into the cache). Returns when done.
int32_t ckv_cuda_kv_copy_rows(struct cuda_context * gc, int32_t seq, int32_t il, int32_t n, void * k, void * v,
                              bool to_cache);
// Sequence seq's cache now holds n positions written by ckv_cuda_kv_copy_rows (a loaded
// state): its KV policy is made afresh over them, as ckv_cuda_set_kv_policy makes one over a
// cache, and the graphs that bake the old one are dropped. CKV_ERR_OOM / CKV_ERR_CUDA.
int32_t ckv_cuda_kv_reloaded(struct cuda_context * gc, int32_t seq, int32_t n,
                             const struct ckv_kv_policy_params * params, const bool * layer_compressed);
// With a policy: n_attended, n_cached, n_fetched, t_cluster_ms and n_clusters of out are the
// GPU's, summed over the sequences (the caller keeps n_steps); t_select_ms is 0 (selection runs
// inside the decode graph). Without one, out is left as it is. n_clusters and the selection
// below are sequence 0's.
int32_t ckv_cuda_kv_stats(struct cuda_context * gc, struct ckv_kv_stats * out);
int32_t ckv_cuda_kv_reset_stats(struct cuda_context * gc);
int32_t ckv_cuda_kv_n_clusters(const struct cuda_context * gc, int32_t il);   // per KV head
// The last decode step's positions for (layer il, query head h): *sparse false when that layer
// attended densely; else *n positions into buf (CKV_ERR_BUFFER_TOO_SMALL when cap < *n).
int32_t ckv_cuda_kv_selection(struct cuda_context * gc, int32_t il, int32_t h, int32_t * buf, int32_t cap,
                              int32_t * n, bool * sparse);

#ifdef __cplusplus
}
#endif

#endif  // CKV_CUDA_BACKEND_H
