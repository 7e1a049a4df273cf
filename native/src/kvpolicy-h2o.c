// kvpolicy-h2o.c - H2O, heavy-hitter oracle (Zhang et al., NeurIPS 2023): per (compressed
// layer, query head) a kept set of at most budget positions. Every position enters the set when
// it is stored; its score is the attention weight it has received so far, summed over every
// query of the prefill (observe_dense) and every decode step (observe). At a decode step, while
// the set is over budget, the kept position of lowest score is evicted (ties: the oldest), except
// the n_sink first positions and the n_recent most recent ones,
//     n_recent = max(1, floor(recent_ratio * budget)), at most budget - n_sink,
// so the list is sinks + recent window + heavy hitters. An evicted position is never attended by
// a decode step again (a later prefill chunk, which is dense, still sees it).
// The kept sets stay in ascending position order (appends at the end, evictions compact).
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "kvpolicy.h"

struct victim {
    float   score;
    int32_t pos;
};

struct h2o_head {
    float *   score;   // [n_ctx] accumulated attention weight per position
    int32_t * kept;    // [n_ctx] kept positions, ascending
    int32_t   n_kept;
};

struct h2o_state {
    struct h2o_head ** heads;   // [n_layer] -> [n_head]; NULL for dense layers
    struct victim *    victims; // [n_ctx] scratch: evictable kept positions
};

static int32_t n_recent(const struct kv_policy * p, int64_t sinks) {
    int64_t r = (int64_t) floorf(p->params.recent_ratio * (float) p->params.budget);
    r = r < 1 ? 1 : r;
    return (int32_t) (r > p->params.budget - sinks ? p->params.budget - sinks : r);
}

static void h2o_on_store(struct kv_policy * p, int32_t il, int64_t pos0, int64_t n) {
    struct h2o_state * st = p->state;
    for (int32_t h = 0; h < p->n_head; h++) {
        struct h2o_head * H = &st->heads[il][h];
        while (H->n_kept > 0 && H->kept[H->n_kept - 1] >= pos0) {
            H->n_kept--;  // overwritten positions (after a truncate that the policy did not see)
        }
        for (int64_t j = pos0; j < pos0 + n; j++) {
            H->kept[H->n_kept++] = (int32_t) j;
            H->score[j] = 0.0f;
        }
    }
}

// ---- eviction -----------------------------------------------------------------------------------

// Eviction order: lower score first, then the older position.
static int evict_order(const void * a, const void * b) {
    const struct victim * x = a, * y = b;
    if (x->score != y->score) {
        return x->score < y->score ? -1 : 1;
    }
    return x->pos < y->pos ? -1 : 1;
}

// Evicts n_evict kept positions outside [0, sinks) and [recent_start, pos].
static void evict(struct h2o_head * H, struct victim * victims, int64_t n_evict, int64_t sinks,
                  int64_t recent_start) {
    int32_t n_victims = 0;
    for (int32_t i = 0; i < H->n_kept; i++) {
        int32_t j = H->kept[i];
        if (j >= sinks && j < recent_start) {
            victims[n_victims++] = (struct victim) {H->score[j], j};
        }
    }
    if (n_evict == 1) {  // the usual decode step: one new position, one linear scan
        int32_t worst = 0;
        for (int32_t i = 1; i < n_victims; i++) {
            worst = victims[i].score < victims[worst].score ? i : worst;  // ties: the older stays worst
        }
        victims[0] = victims[worst];
    } else {
        qsort(victims, (size_t) n_victims, sizeof(*victims), evict_order);
    }
    for (int64_t i = 0; i < n_evict; i++) {
        H->score[victims[i].pos] = -INFINITY;  // evicted for good: compaction drops it below
    }
    int32_t n = 0;
    for (int32_t i = 0; i < H->n_kept; i++) {
        if (H->score[H->kept[i]] != -INFINITY) {
            H->kept[n++] = H->kept[i];
        }
    }
    H->n_kept = n;
}

static void h2o_select(struct kv_policy * p, int32_t il, int64_t pos, const float * q,
                       struct kv_selection * out) {
    struct h2o_state * st = p->state;
    int64_t sinks = pos + 1 < p->params.n_sink ? pos + 1 : p->params.n_sink;
    int64_t recent_start = pos + 1 - n_recent(p, sinks);
    for (int32_t h = 0; h < p->n_head; h++) {
        struct h2o_head * H = &st->heads[il][h];
        if (H->n_kept > p->params.budget) {
            evict(H, st->victims, H->n_kept - p->params.budget, sinks, recent_start);
        }
        memcpy(out->pos + (size_t) h * out->cap, H->kept, (size_t) H->n_kept * sizeof(int32_t));
        out->n[h] = H->n_kept;
    }
}

static void h2o_observe(struct kv_policy * p, int32_t il, const struct kv_selection * sel,
                        const float * weights) {
    struct h2o_state * st = p->state;
    for (int32_t h = 0; h < p->n_head; h++) {
        float *         score = st->heads[il][h].score;
        const int32_t * list  = sel->pos + (size_t) h * sel->cap;
        const float *   w     = weights + (size_t) h * sel->cap;
        for (int32_t i = 0; i < sel->n[h]; i++) {
            score[list[i]] += w[i];
        }
    }
}

static void h2o_observe_dense(struct kv_policy * p, int32_t il, int64_t n_pos, const float * weights) {
    struct h2o_state * st = p->state;
    for (int32_t h = 0; h < p->n_head; h++) {
        float * score = st->heads[il][h].score;
        for (int64_t j = 0; j < n_pos; j++) {
            score[j] += weights[(size_t) h * n_pos + j];
        }
    }
}

static void h2o_truncate(struct kv_policy * p, int64_t n_keep) {
    struct h2o_state * st = p->state;
    for (int32_t il = 0; il < p->n_layer; il++) {
        for (int32_t h = 0; st->heads[il] && h < p->n_head; h++) {
            struct h2o_head * H = &st->heads[il][h];
            while (H->n_kept > 0 && H->kept[H->n_kept - 1] >= n_keep) {
                H->n_kept--;
            }
        }
    }
}

// ---- lifetime -----------------------------------------------------------------------------------

static void h2o_free(struct kv_policy * p) {
    struct h2o_state * st = p->state;
    for (int32_t il = 0; st->heads && il < p->n_layer; il++) {
        for (int32_t h = 0; st->heads[il] && h < p->n_head; h++) {
            free(st->heads[il][h].score);
            free(st->heads[il][h].kept);
        }
        free(st->heads[il]);
    }
    free(st->heads);
    free(st->victims);
    free(st);
    p->state = NULL;
}

static const struct kv_policy_vtable h2o_vtable = {
    .name          = "h2o",
    .wants_weights = true,
    .on_store      = h2o_on_store,
    .select        = h2o_select,
    .observe       = h2o_observe,
    .observe_dense = h2o_observe_dense,
    .truncate      = h2o_truncate,
    .free_state    = h2o_free,
};

int32_t kv_policy_init_h2o(struct kv_policy * p) {
    struct h2o_state * st = calloc(1, sizeof(*st));
    if (!st) {
        return ckv_fail(CKV_ERR_OOM, "out of memory for the h2o policy");
    }
    p->state = st;
    p->vt    = &h2o_vtable;
    size_t n_ctx = (size_t) p->kv->n_ctx;
    st->heads   = calloc((size_t) p->n_layer, sizeof(*st->heads));
    st->victims = malloc(n_ctx * sizeof(struct victim));
    bool ok = st->heads && st->victims;
    for (int32_t il = 0; ok && il < p->n_layer; il++) {
        if (!p->layer_compressed[il]) {
            continue;
        }
        st->heads[il] = calloc((size_t) p->n_head, sizeof(struct h2o_head));
        ok = st->heads[il] != NULL;
        for (int32_t h = 0; ok && h < p->n_head; h++) {
            st->heads[il][h].score = calloc(n_ctx, sizeof(float));
            st->heads[il][h].kept  = malloc(n_ctx * sizeof(int32_t));
            ok = st->heads[il][h].score && st->heads[il][h].kept;
        }
    }
    if (!ok) {
        return ckv_fail(CKV_ERR_OOM, "out of memory for h2o's scores (n_ctx %zu)", n_ctx);
    }
    return CKV_OK;
}
