// kvpolicy.c - the KV policy layer: default parameters, validation (every parameter, with the
// name and valid range in the message), the per-policy constructors' dispatch, the `full`
// policy, and the wrappers forward.c calls (they time the policy, put each list in ascending
// position order and keep the step statistics). The policies themselves live in
// kvpolicy-<name>.c.
#include "kvpolicy.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "error.h"

void kv_policy_default_params(struct ckv_kv_policy_params * out) {
    memset(out, 0, sizeof(*out));
    out->policy             = CKV_KV_POLICY_FULL;
    out->budget             = 1024;
    out->n_sink             = 16;
    out->n_dense_layers     = 2;
    out->page_size          = 16;
    out->recluster_interval = 320;
    out->tokens_per_cluster = 80;
    out->kmeans_iters       = 8;   // the paper runs 20; 8 measured as good at 40% of the time
                                   // (bench/results/2026-11-29_cpu_kv-eval-kmeans-iters-*)
    out->seed               = 0;
    out->select_per_kv_head = 0;
    out->recent_ratio       = 0.5f;
    out->kmeans_init        = CKV_KMEANS_INIT_RANDOM;
}

static const char * const policy_names[] = {"full", "streaming", "quest", "h2o", "clusterkv"};

// --- validation --------------------------------------------------------------------------------

// Ranges every field must be in, whatever the policy (n_dense_layers's upper bound aside).
static int32_t check_ranges(const struct ckv_kv_policy_params * k, int32_t n_layer) {
    if (k->policy < CKV_KV_POLICY_FULL || k->policy > CKV_KV_POLICY_CLUSTERKV) {
        return ckv_fail(CKV_ERR_INVALID_ARG,
                        "kv_policy.policy must be full (0), streaming (1), quest (2), h2o (3) or "
                        "clusterkv (4), got %d", k->policy);
    }
    if (k->budget < 1) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "kv_policy.budget must be >= 1, got %d", k->budget);
    }
    if (k->n_sink < 0) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "kv_policy.n_sink must be >= 0, got %d", k->n_sink);
    }
    // The full policy never reads n_dense_layers, so its default (2) must not refuse a
    // one-layer model that runs without a KV policy.
    if (k->n_dense_layers < 0 || (k->policy != CKV_KV_POLICY_FULL && k->n_dense_layers > n_layer)) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "kv_policy.n_dense_layers must be in [0, %d] (the "
                        "model's layers), got %d", n_layer, k->n_dense_layers);
    }
    if (k->page_size < 1) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "kv_policy.page_size must be >= 1, got %d", k->page_size);
    }
    if (k->recluster_interval < 1) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "kv_policy.recluster_interval must be >= 1, got %d",
                        k->recluster_interval);
    }
    if (k->tokens_per_cluster < 1) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "kv_policy.tokens_per_cluster must be >= 1, got %d",
                        k->tokens_per_cluster);
    }
    if (k->kmeans_iters < 1 || k->kmeans_iters > 1000) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "kv_policy.kmeans_iters must be in [1, 1000], got %d",
                        k->kmeans_iters);
    }
    if (k->select_per_kv_head != 0 && k->select_per_kv_head != 1) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "kv_policy.select_per_kv_head must be 0 or 1, got %d",
                        k->select_per_kv_head);
    }
    if (k->kmeans_init != CKV_KMEANS_INIT_RANDOM && k->kmeans_init != CKV_KMEANS_INIT_STRIDED) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "kv_policy.kmeans_init must be random (0) or strided (1), "
                        "got %d", k->kmeans_init);
    }
    if (!(k->recent_ratio >= 0.0f && k->recent_ratio <= 1.0f)) {  // NaN fails too
        return ckv_fail(CKV_ERR_INVALID_ARG, "kv_policy.recent_ratio must be in [0, 1], got %g",
                        (double) k->recent_ratio);
    }
    return CKV_OK;
}

// What the budget must hold for the chosen policy (clusterkv checks its own tail in its init).
static int32_t check_budget(const struct ckv_kv_policy_params * k) {
    const char * name = policy_names[k->policy];
    if (k->policy != CKV_KV_POLICY_FULL && (int64_t) k->budget < (int64_t) k->n_sink + 1) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "%s: kv_policy.budget (%d) must be >= n_sink + 1 (%d): "
                        "the sinks and the current position", name, k->budget, k->n_sink + 1);
    }
    if (k->policy == CKV_KV_POLICY_QUEST && (int64_t) k->budget < (int64_t) k->n_sink + k->page_size) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "quest: kv_policy.budget (%d) must be >= n_sink + "
                        "page_size (%d): the sinks and the current page", k->budget,
                        k->n_sink + k->page_size);
    }
    return CKV_OK;
}

// --- the full policy: every position, attended by the dense path (select is NULL) ----------------

static const struct kv_policy_vtable full_vtable = {.name = "full"};

// --- lifetime ------------------------------------------------------------------------------------

// Validates params and fills p as the `full` policy of this shape (no state yet).
static int32_t init_common(struct kv_policy * p, const struct ckv_kv_policy_params * params,
                           const struct kv_cache * kv, int32_t n_head, const bool * layer_compressed) {
    memset(p, 0, sizeof(*p));
    int32_t st = check_ranges(params, kv->n_layer);
    if (st == CKV_OK) {
        st = check_budget(params);
    }
    if (st != CKV_OK) {
        return st;
    }
    p->vt               = &full_vtable;
    p->params           = *params;
    p->kv               = kv;
    p->n_layer          = kv->n_layer;
    p->n_head           = n_head;
    p->n_head_kv        = kv->n_head_kv;
    p->head_dim         = kv->head_dim;
    p->layer_compressed = layer_compressed;
    return CKV_OK;
}

int32_t kv_policy_init(struct kv_policy * p, const struct ckv_kv_policy_params * params,
                       const struct kv_cache * kv, struct threadpool * pool, int32_t n_head,
                       const bool * layer_compressed) {
    int32_t st = init_common(p, params, kv, n_head, layer_compressed);
    if (st != CKV_OK) {
        return st;
    }
    p->pool      = pool;
    p->sort_bits = calloc(((size_t) kv->n_ctx + 63) / 64, sizeof(uint64_t));
    if (!p->sort_bits) {
        return ckv_fail(CKV_ERR_OOM, "out of memory for the KV policy");
    }
    switch (params->policy) {
    case CKV_KV_POLICY_STREAMING: st = kv_policy_init_streaming(p); break;
    case CKV_KV_POLICY_QUEST:     st = kv_policy_init_quest(p); break;
    case CKV_KV_POLICY_H2O:       st = kv_policy_init_h2o(p); break;
    case CKV_KV_POLICY_CLUSTERKV: st = kv_policy_init_clusterkv(p); break;
    default:                      st = CKV_OK; break;
    }
    if (st != CKV_OK) {
        kv_policy_free(p);
    }
    return st;
}

int32_t kv_policy_init_params_only(struct kv_policy * p, const struct ckv_kv_policy_params * params,
                                   const struct kv_cache * kv, int32_t n_head,
                                   const bool * layer_compressed) {
    int32_t st = init_common(p, params, kv, n_head, layer_compressed);
    if (st == CKV_OK && (kv->n_head_kv < 1 || n_head % kv->n_head_kv != 0)) {
        st = ckv_fail(CKV_ERR_INVALID_ARG, "%s: n_head (%d) must be a multiple of n_head_kv (%d)",
                      policy_names[params->policy], n_head, kv->n_head_kv);
    }
    return st;
}

void kv_policy_free(struct kv_policy * p) {
    if (p->vt && p->vt->free_state && p->state) {
        p->vt->free_state(p);
    }
    free(p->sort_bits);
    p->sort_bits = NULL;
    p->state     = NULL;
}

int64_t kv_policy_max_list(const struct ckv_kv_policy_params * params, int64_t n_ctx) {
    int64_t n = params->budget;
    if (params->policy == CKV_KV_POLICY_CLUSTERKV) {
        n += params->recluster_interval;
    }
    return n < n_ctx ? n : n_ctx;
}

const char * kv_policy_name(int32_t policy) {
    return policy >= 0 && policy <= CKV_KV_POLICY_CLUSTERKV ? policy_names[policy] : "unknown";
}

// --- wrappers ------------------------------------------------------------------------------------

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

void kv_policy_on_store(struct kv_policy * p, int32_t il, int64_t pos0, int64_t n) {
    if (p->vt->on_store && p->layer_compressed[il]) {
        p->vt->on_store(p, il, pos0, n);
    }
}

// Puts list[0..n) in ascending order (and drops repeats) through a bitmap of positions: O(n +
// pos / 64), cheaper than a comparison sort at these sizes. Lists already ascending are left.
static int32_t sort_list(uint64_t * bits, int32_t * list, int32_t n, int64_t pos) {
    int32_t i = 1;
    while (i < n && list[i] > list[i - 1]) {
        i++;
    }
    if (i >= n) {
        return n;
    }
    for (i = 0; i < n; i++) {
        bits[list[i] >> 6] |= 1ull << (list[i] & 63);
    }
    int32_t m = 0;
    for (int64_t w = 0; w <= pos >> 6; w++) {
        for (uint64_t b = bits[w]; b; b &= b - 1) {
            list[m++] = (int32_t) (w * 64 + __builtin_ctzll(b));
        }
        bits[w] = 0;
    }
    return m;
}

void kv_policy_select(struct kv_policy * p, int32_t il, int64_t pos, const float * q,
                      struct kv_selection * out) {
    double t0 = now_ms(), own0 = p->stats.t_cluster_ms + p->stats.t_select_ms;
    p->vt->select(p, il, pos, q, out);
    for (int32_t h = 0; h < out->n_head; h++) {
        if (!p->vt->emits_ascending) {
            out->n[h] = sort_list(p->sort_bits, out->pos + (size_t) h * out->cap, out->n[h], pos);
        }
        p->stats.n_attended += out->n[h];
    }
    p->stats.n_cached += (int64_t) out->n_head * (pos + 1);
    // the policy may time itself (clustering, selection); the rest of the call is selection
    double own = p->stats.t_cluster_ms + p->stats.t_select_ms - own0;
    p->stats.t_select_ms += now_ms() - t0 - own;
}

void kv_policy_count_dense_step(struct kv_policy * p, int64_t pos) {
    p->stats.n_attended += (int64_t) p->n_head * (pos + 1);
    p->stats.n_cached += (int64_t) p->n_head * (pos + 1);
}

void kv_policy_observe(struct kv_policy * p, int32_t il, const struct kv_selection * sel,
                       const float * weights) {
    if (p->vt->observe) {
        p->vt->observe(p, il, sel, weights);
    }
}

void kv_policy_observe_dense(struct kv_policy * p, int32_t il, int64_t n_pos, const float * weights) {
    if (p->vt->observe_dense) {
        p->vt->observe_dense(p, il, n_pos, weights);
    }
}

void kv_policy_truncate(struct kv_policy * p, int64_t n_keep) {
    if (p->vt->truncate) {
        p->vt->truncate(p, n_keep);
    }
}

void kv_policy_rebuild(struct kv_policy * p, int64_t n_past) {
    for (int32_t il = 0; n_past > 0 && il < p->n_layer; il++) {
        kv_policy_on_store(p, il, 0, n_past);
    }
}

int32_t kv_policy_n_clusters(const struct kv_policy * p, int32_t il, int32_t kv_head) {
    return p->vt->n_clusters && p->layer_compressed[il] ? p->vt->n_clusters(p, il, kv_head) : 0;
}

void kv_policy_get_stats(const struct kv_policy * p, struct ckv_kv_stats * out) {
    *out            = p->stats;
    out->n_clusters = 0;
    for (int32_t il = 0; il < p->n_layer; il++) {
        for (int32_t h = 0; h < p->n_head_kv; h++) {
            out->n_clusters += kv_policy_n_clusters(p, il, h);
        }
    }
}

void kv_policy_reset_stats(struct kv_policy * p) { memset(&p->stats, 0, sizeof(p->stats)); }
