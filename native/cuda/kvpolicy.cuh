// kvpolicy.cuh - the KV policies on the GPU (issue 6, internal to the CUDA backend): clusterkv,
// quest and streaming. Per decode step a selection + sparse flash-decode replace a compressed
// layer's dense attention; the lists are the CPU policies' (kvpolicy-streaming.c: sinks and the
// recent window; kvpolicy-quest.c: per-page key min/max kept in device memory, updated after
// every forward by cuda_kv_policy_stored, pages ranked by their bound; both need no re-capture
// while pos + 1 > budget, and below that the dense kernel runs, as their list is every position).
// clusterkv keeps the cluster state of every compressed (layer, KV head) in device memory,
// clusters new spans with the batched k-means, and follows kvpolicy-clusterkv.c rule for rule,
// so the positions, spans, seeds and lists are the CPU policy's:
//   [0, n_sink) sinks; [n_sink, end) clustered in spans (the first decode step after a prompt
//   clusters the prompt; every recluster_interval decoded tokens add a span of
//   ceil(n / tokens_per_cluster) clusters, seeded by clusterkv_span_seed); [end, pos] the tail.
// A layer reads every position when the budget holds all clustered ones (the CPU's list is then
// 0..pos), so such a step runs the dense kernel. Clustering happens between steps on the
// context's stream (the host draws the seeded init rows, nothing is read back); the decode graph
// bakes the cluster layout in, so the backend re-captures it when cuda_kv_policy_layout changes.
#ifndef CKV_CUDA_KVPOLICY_CUH
#define CKV_CUDA_KVPOLICY_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

struct ckv_kv_policy_params;
struct ckv_kv_stats;
struct hparams;
struct cuda_kv_policy;

// kv_offload (offload, clusterkv only): the compressed layers' K/V live in host memory and the GPU
// keeps a per-(layer, KV head) cache of slots for the rows the last step selected (a group's
// lists' union: budget + tail rows per query head, or per KV head when selecting per KV head).
// The sparse decode reads a listed row from its slot, or over PCIe when it has none; then
// ckv_cuda_kv_fetch refills the slots with this step's lists, copying only rows not already
// there, on the policy's own stream while later layers compute (cuda_kv_policy_join waits for
// it). The GPU's KV memory is then the slots, not n_ctx.
//
// params must be a validated streaming, quest or clusterkv policy (kv_policy_init_params_only;
// other policies fail with CKV_ERR_UNSUPPORTED); layer_compressed
// [n_layer] as context.c computes it. Allocates every device buffer for n_ctx positions.
int32_t cuda_kv_policy_create(const struct ckv_kv_policy_params * params, const bool * layer_compressed,
                              const struct hparams * hp, int32_t n_ctx, bool offload,
                              struct cuda_kv_policy ** out);
void    cuda_kv_policy_free(struct cuda_kv_policy * p);   // accepts NULL

// Before positions >= pos are (over)written: drops the spans reaching past pos (and their slots
// under offload), and for a decode step at pos clusters [end, pos) once it holds
// recluster_interval positions. k_layers[il]: layer il's f16 keys, [n_head_kv][n_ctx][head_dim]
// (device memory, or mapped host memory under offload).
int32_t  cuda_kv_policy_prepare(struct cuda_kv_policy * p, const __half * const * k_layers, int32_t pos,
                                bool decode_step, cudaStream_t s);
void     cuda_kv_policy_truncate(struct cuda_kv_policy * p, int32_t n_keep);
// After a forward stored positions [pos0, pos0 + n) (or a new policy takes over a cache holding
// [0, n)): quest folds them into its page bounds; the others keep nothing per position.
int32_t  cuda_kv_policy_stored(struct cuda_kv_policy * p, const __half * const * k_layers, int32_t pos0,
                               int32_t n, cudaStream_t s);
uint64_t cuda_kv_policy_layout(const struct cuda_kv_policy * p);   // changes with the clusters

// Whether layer il attends through position lists at a decode step (false: dense).
bool cuda_kv_policy_sparse(const struct cuda_kv_policy * p, int32_t il);

// A decode step's attention of sparse layer il: selection (and under offload the fetch into the
// slots), then the sparse flash-decode of q (post-RoPE, [n_head][head_dim]) over the layer's
// rows (k_layer, v_layer: as k_layers above) into out. pos_dev != NULL (graph):
// the position is read there at run time.
struct cuda_policy_attend_args {
    int32_t         il;
    const float *   q;
    const __half *  k_layer;
    const __half *  v_layer;
    int32_t         pos;
    const int32_t * pos_dev;
    float *         out;
    void *          out_q;         // NULL, or out also quantised (cq8x) for the out-projection
    float *         partial;       // flash-decode splits
    int64_t         partial_cap;   // slots of partial ([head_dim + 4] floats each)
    float           scale;
};
int32_t cuda_kv_policy_attend(struct cuda_kv_policy * p, const struct cuda_policy_attend_args * a,
                              cudaStream_t s);

// kv_offload: makes stream s wait for the slot fetches this step's attention launched (NULL or
// no offload: nothing). Call once per forward, before anything else uses the slots or the
// stream is synchronised; a captured step must call it before its capture ends.
int32_t cuda_kv_policy_join(struct cuda_kv_policy * p, cudaStream_t s);

// Bookkeeping after a forward at pos: for a decode step the positions cached / attended per
// compressed layer; which layers used lists (for cuda_kv_policy_selection; none in prefill).
void    cuda_kv_policy_count_step(struct cuda_kv_policy * p, int32_t pos, bool decode_step);
// n_attended, n_cached, t_cluster_ms and n_clusters (t_select_ms stays 0: selection runs inside
// the decode graph). Waits for the stream.
int32_t cuda_kv_policy_stats(const struct cuda_kv_policy * p, struct ckv_kv_stats * out, cudaStream_t s);
int32_t cuda_kv_policy_reset_stats(struct cuda_kv_policy * p, cudaStream_t s);
size_t  cuda_kv_policy_device_bytes(const struct cuda_kv_policy * p);   // all its GPU buffers
size_t  cuda_kv_policy_slot_bytes(const struct cuda_kv_policy * p);     // the offload slots' K/V rows
int32_t cuda_kv_policy_n_clusters(const struct cuda_kv_policy * p, int32_t il);
// The last decode step's list of query head h in layer il: *sparse = false when that layer
// attended densely (nothing copied); else the length in *n and, when cap >= *n, the list in buf
// (CKV_ERR_BUFFER_TOO_SMALL otherwise). Waits for the stream.
int32_t cuda_kv_policy_selection(const struct cuda_kv_policy * p, int32_t il, int32_t h, int32_t * buf,
                                 int32_t cap, int32_t * n, bool * sparse, cudaStream_t s);

#endif  // CKV_CUDA_KVPOLICY_CUH
