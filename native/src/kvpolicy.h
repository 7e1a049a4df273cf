// kvpolicy.h - KV policies (internal): which cached positions each query head reads at a decode
// step. The forward pass asks the context's policy once per (compressed layer, decode step) for
// one position list per query head and attends through those lists in place (no K/V copies).
//
// Life of a policy, driven by forward.c / context.c:
//   on_store(il, pos0, n)   after layer il wrote positions [pos0, pos0 + n) to the KV cache
//                           (a prefill chunk or one decode token); cheap bookkeeping only
//                           (quest page bounds, h2o score slots)
//   select(il, pos, q, out) decode step at position pos (already stored): fill out->n[h] and
//                           out->pos[h] for every query head h; may first do deferred work
//                           (clusterkv clusters the unclustered span here, timed as clustering)
//   observe(il, out, w)     attention's softmax weights over out's lists (only when
//                           wants_weights; h2o accumulates them and evicts)
//   observe_dense(...)      the same for a dense prefill chunk: weights[h][j] summed over the
//                           chunk's queries, for positions [0, n_pos)
//   truncate(n_keep)        positions >= n_keep were dropped from the cache
//
// Changes after the first draft (policy helper):
//   - select == NULL marks the dense `full` policy: forward.c then runs dense attention;
//   - vtable entries other than select may be NULL (nothing to do);
//   - struct kv_policy gained sort_bits (scratch of kv_policy_select);
//   - the kv_policy_* wrappers below are what forward.c / context.c call: they skip dense
//     layers, put every list in ascending position order unless the policy declares
//     emits_ascending (attention streams K/V forward and all-positions lists reproduce `full`
//     bit for bit) and keep n_attended/n_cached (context.c counts n_steps);
//   - timing: a policy may add to stats.t_cluster_ms / t_select_ms itself; kv_policy_select
//     adds the rest of the call's wall time to t_select_ms.
//
// Invariants every policy keeps (tests check them through ckv_context_kv_selection):
//   - every list holds distinct positions <= pos, at most kv_policy_max_list of them (the
//     budget; clusterkv attends its recent tail on top);
//   - the n_sink first positions and the current position are always in it (h2o: until evicted
//     sinks are never evicted either);
//   - positions are never written, only chosen.
#ifndef CKV_KVPOLICY_H
#define CKV_KVPOLICY_H

#include <stdbool.h>
#include <stdint.h>

#include "clusterkv.h"
#include "kv.h"
#include "threadpool.h"

// One layer's selection: per query head a list of positions (capacity cap each).
struct kv_selection {
    int32_t   n_head;
    int32_t   cap;        // = kv_policy_max_list
    int32_t * n;          // [n_head] positions in each list
    int32_t * pos;        // [n_head][cap]
};

struct kv_policy;

struct kv_policy_vtable {
    const char * name;
    bool         wants_weights;
    bool         emits_ascending;  // select() writes ascending, distinct lists (no sort pass)
    void (*on_store)(struct kv_policy * p, int32_t il, int64_t pos0, int64_t n);
    void (*select)(struct kv_policy * p, int32_t il, int64_t pos, const float * q,
                   struct kv_selection * out);
    void (*observe)(struct kv_policy * p, int32_t il, const struct kv_selection * sel,
                    const float * weights /* [n_head][cap] */);
    void (*observe_dense)(struct kv_policy * p, int32_t il, int64_t n_pos,
                          const float * weights /* [n_head][n_pos] */);
    void (*truncate)(struct kv_policy * p, int64_t n_keep);
    int32_t (*n_clusters)(const struct kv_policy * p, int32_t il, int32_t kv_head);
    void (*free_state)(struct kv_policy * p);
};

// Shared by all policies; each policy keeps its own state behind `state`.
struct kv_policy {
    const struct kv_policy_vtable * vt;
    struct ckv_kv_policy_params     params;      // validated
    const struct kv_cache *         kv;          // the dense cache the lists index into
    struct threadpool *             pool;        // the context's workers (for per-head work)
    int32_t                         n_layer;
    int32_t                         n_head;
    int32_t                         n_head_kv;
    int32_t                         head_dim;
    const bool *                    layer_compressed;  // [n_layer]: policy applies here
    struct ckv_kv_stats             stats;       // n_steps .. t_select_ms; n_clusters on demand
    void *                          state;
    uint64_t *                      sort_bits;   // [ceil(n_ctx / 64)] zero between calls
};

// Fills ckv_kv_policy_params defaults (policy full, budget 1024, ...).
void kv_policy_default_params(struct ckv_kv_policy_params * out);

// Validates params against the model shape and n_ctx (clear CKV_ERR_INVALID_ARG messages naming
// the parameter and its valid range), allocates the policy's state up front.
int32_t kv_policy_init(struct kv_policy * p, const struct ckv_kv_policy_params * params,
                       const struct kv_cache * kv, struct threadpool * pool, int32_t n_head,
                       const bool * layer_compressed);
void    kv_policy_free(struct kv_policy * p);
// The same validation, but the policy runs elsewhere (the GPU backend): p keeps the params and
// the step statistics and behaves as `full` (no state, select == NULL).
int32_t kv_policy_init_params_only(struct kv_policy * p, const struct ckv_kv_policy_params * params,
                                   const struct kv_cache * kv, int32_t n_head,
                                   const bool * layer_compressed);

// What forward.c and context.c call (see the list of changes at the top).
const char * kv_policy_name(int32_t policy);   // "full" .. "clusterkv", "unknown"

// The longest list the policy can emit per query head in a context of n_ctx positions: the
// budget, plus for clusterkv its unclustered recent tail (up to recluster_interval positions).
int64_t kv_policy_max_list(const struct ckv_kv_policy_params * params, int64_t n_ctx);
void    kv_policy_on_store(struct kv_policy * p, int32_t il, int64_t pos0, int64_t n);
void    kv_policy_select(struct kv_policy * p, int32_t il, int64_t pos, const float * q,
                         struct kv_selection * out);
void    kv_policy_count_dense_step(struct kv_policy * p, int64_t pos);  // full: stats only
void    kv_policy_observe(struct kv_policy * p, int32_t il, const struct kv_selection * sel,
                          const float * weights);
void    kv_policy_observe_dense(struct kv_policy * p, int32_t il, int64_t n_pos,
                                const float * weights);
void    kv_policy_truncate(struct kv_policy * p, int64_t n_keep);
// A fresh policy taking over a cache that holds n_past positions (ckv_context_set_kv_policy):
// replays them as one stored prefill chunk. Quest rebuilds its page bounds; streaming and
// clusterkv keep nothing per stored position (clusterkv clusters at the next decode step);
// h2o cannot be rebuilt this way (it needs the prefill's attention weights) and is refused
// by the caller when n_past > 0.
void    kv_policy_rebuild(struct kv_policy * p, int64_t n_past);
int32_t kv_policy_n_clusters(const struct kv_policy * p, int32_t il, int32_t kv_head);
void    kv_policy_get_stats(const struct kv_policy * p, struct ckv_kv_stats * out);
void    kv_policy_reset_stats(struct kv_policy * p);

// Per-policy constructors (kvpolicy-*.c): set p->vt and allocate p->state.
int32_t kv_policy_init_streaming(struct kv_policy * p);
int32_t kv_policy_init_quest(struct kv_policy * p);
int32_t kv_policy_init_h2o(struct kv_policy * p);
int32_t kv_policy_init_clusterkv(struct kv_policy * p);

#endif  // CKV_KVPOLICY_H
