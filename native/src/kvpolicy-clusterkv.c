// kvpolicy-clusterkv.c - the ClusterKV policy: cosine k-means clusters of post-RoPE keys per
// (compressed layer, KV head), ranked per query by q . centroid (the centroid is the plain mean
// of its keys, so the score is the mean attention logit of the cluster). The forward pass calls
// select() once per (compressed layer, decode step); this file owns the clustered state and
// fills the position lists that attention reads in place (kvpolicy.h).
//
// Positions of one layer, at a decode step at position pos:
//   [0, n_sink)            sinks: always attended, never clustered
//   [n_sink, end)          clustered, in spans; each span of n positions got ceil(n /
//                          tokens_per_cluster) clusters (the prompt is the first span)
//   [end, pos]             the recent tail: always attended
// select() first clusters [end, pos) as a new span once it holds recluster_interval positions
// or more. The newest position pos stays in the tail, so the current token always attends to
// itself, a prefill of L tokens gets exactly ceil((L - n_sink) / tokens_per_cluster) clusters
// at the first decode step and every recluster_interval decoded tokens add
// ceil(recluster_interval / tokens_per_cluster). Old spans are never re-clustered, and the tail
// holds at most recluster_interval positions.
//
// The budget counts the sinks and the selected clustered positions; the tail is attended on
// top, as in the paper (its accuracy harness: token budget including the 16 sinks, every token
// after the prompt attended; its system: the current 320-token window on top), so a list holds
// at most budget + recluster_interval positions (kv_policy_max_list). Counting the tail inside
// the budget instead would starve the clusters of up to a third of a 1024 budget right before
// each re-clustering, for no gain in the bounded cost (the tail is bounded anyway).
//
// Per query head h (KV head h / group), the clusters are ranked by q_h . c in f32 and taken
// whole into budget - sinks (the last one cut), see cluster_select in kmeans.c. With
// select_per_kv_head the group's summed query ranks once for all its heads (the sum of the
// scores equals the score of the summed query). Every list comes out in ascending position
// order (a bitmap over the clustered span): attention then streams K/V forward, and when
// everything fits the list is exactly 0..pos, so a budget >= context reproduces `full`.
//
// State per (layer, KV head) is CSR: centroids, sizes, offsets into positions grouped by
// cluster (ascending within a cluster). All of it, and every scratch buffer, is allocated in
// kv_policy_init_clusterkv for n_ctx: the decode loop allocates nothing.
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "error.h"
#include "kmeans.h"
#include "kvpolicy.h"
#include "quants.h"

struct ckv_head_state {
    float *   centroids;  // [max_clusters][head_dim] f32, plain means of member keys
    int32_t * sizes;      // [max_clusters]
    int32_t * offsets;    // [max_clusters] start of each cluster in positions
    int32_t * positions;  // [max_pos] clustered positions grouped by cluster
};

struct ckv_layer_state {
    int32_t                 end;            // [n_sink, end) is clustered
    int32_t                 n_clusters;     // per KV head (the same for all of them)
    int32_t                 n_spans;
    int32_t *               span_end;       // [max_spans] end position after each span
    int32_t *               span_clusters;  // [max_spans] n_clusters after each span
    struct ckv_head_state * heads;          // [n_head_kv]; NULL for dense layers
};

// One thread's selection scratch (selection runs on the thread pool, one list per task).
struct select_scratch {
    float *    scores;   // [max_clusters]
    int32_t *  chosen;   // [max_clusters]
    uint64_t * heap;     // [max_clusters] cluster_select scratch
    float *    q_sum;    // [head_dim] the group's summed query
    uint64_t * marked;   // [max_pos / 64 + 1] selected positions, bit (p - n_sink); all zero
                         // between selections
};

struct clusterkv_state {
    int32_t                  max_pos;       // n_ctx - n_sink: positions that can be clustered
    int32_t                  max_spans;
    int32_t                  max_clusters;  // per (layer, KV head)
    struct ckv_layer_state * layers;        // [n_layer]
    struct kmeans_work       work;
    float *                  keys;     // [max_pos][head_dim] f32 one head's span, converted
    int32_t *                labels;   // [max_pos]
    int32_t *                cursor;   // [max_clusters] counting-sort write positions
    int32_t                  n_scratch;  // threads of the pool (1 without one)
    struct select_scratch *  scratch;    // [n_scratch]
};

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

static int32_t ceil_div(int32_t a, int32_t b) {
    return (a + b - 1) / b;
}

// ---------------------------------------------------------------------------------------------
// Clustering a span
// ---------------------------------------------------------------------------------------------

// Keys of positions [start, start + n) of (il, g) as f32 rows.
static void load_keys(const struct kv_cache * kv, int32_t il, int32_t g, int32_t start, int32_t n,
                      float * out) {
    const char * rows = (const char *) kv_cache_k(kv, il, g) + (size_t) start * kv->head_dim *
                                                                  kv->elt_size;
    if (kv->elt_size == sizeof(float)) {
        memcpy(out, rows, (size_t) n * kv->head_dim * sizeof(float));
    } else {
        ckv_fp16_to_fp32_row((const ckv_fp16 *) rows, out, (int64_t) n * kv->head_dim);
    }
}

// A distinct, reproducible k-means seed per (seed, layer, KV head, span start) (kmeans.h).
uint64_t clusterkv_span_seed(uint32_t seed, int32_t il, int32_t g, int32_t start) {
    uint64_t state = seed;
    uint64_t parts[3] = {(uint64_t) il, (uint64_t) g, (uint64_t) start};
    for (int i = 0; i < 3; i++) {
        uint64_t mixed = kmeans_splitmix64(&state);  // advances state: keep the two apart
        state ^= mixed ^ parts[i];
    }
    return kmeans_splitmix64(&state);
}

void clusterkv_span_init_rows(const struct ckv_kv_policy_params * params, int32_t il, int32_t g,
                              int32_t start, int32_t n, int32_t k, int32_t * rows) {
    if (params->kmeans_init == CKV_KMEANS_INIT_STRIDED) {
        kmeans_strided_rows(n, k, rows);
    } else {
        kmeans_init_rows(clusterkv_span_seed(params->seed, il, g, start), n, k, rows);
    }
}

// Appends k clusters (labels[n] over positions start..start+n-1) to the head's CSR: sizes,
// offsets after the existing positions, positions counting-sorted by label (stable, so
// ascending within each cluster).
static void append_clusters(struct ckv_head_state * H, int32_t c0, int32_t k,
                            const int32_t * labels, int32_t n, int32_t start, int32_t pos_base,
                            int32_t * cursor) {
    int32_t * sizes = H->sizes + c0;
    memset(sizes, 0, (size_t) k * sizeof(int32_t));
    for (int32_t i = 0; i < n; i++) {
        sizes[labels[i]]++;
    }
    int32_t off = pos_base;
    for (int32_t j = 0; j < k; j++) {
        H->offsets[c0 + j] = off;
        cursor[j]          = off;
        off += sizes[j];
    }
    for (int32_t i = 0; i < n; i++) {
        H->positions[cursor[labels[i]]++] = start + i;
    }
}

// Clusters positions [start, end) of layer il into ceil((end - start) / tokens_per_cluster)
// new clusters per KV head, the assignment of each head split over the thread pool.
static void cluster_span(struct kv_policy * p, int32_t il, int32_t start, int32_t end) {
    struct clusterkv_state * st = p->state;
    struct ckv_layer_state * L  = &st->layers[il];
    const int32_t            d  = p->head_dim;
    const int32_t            n  = end - start;
    const int32_t            k  = ceil_div(n, p->params.tokens_per_cluster);
    for (int32_t g = 0; g < p->n_head_kv; g++) {
        struct ckv_head_state * H = &L->heads[g];
        load_keys(p->kv, il, g, start, n, st->keys);
        clusterkv_span_init_rows(&p->params, il, g, start, n, k, st->labels);
        struct kmeans_args a = {
            .x = st->keys, .n = n, .d = d, .k = k, .max_iter = p->params.kmeans_iters,
            .init_rows = st->labels, .centroids = H->centroids + (size_t) L->n_clusters * d, .labels = st->labels,
        };
        kmeans_cosine_run(&a, &st->work, p->pool);
        append_clusters(H, L->n_clusters, k, st->labels, n, start, start - p->params.n_sink,
                        st->cursor);
    }
    L->n_clusters += k;
    L->end                       = end;
    L->span_end[L->n_spans]      = end;
    L->span_clusters[L->n_spans] = L->n_clusters;
    L->n_spans++;
}

// ---------------------------------------------------------------------------------------------
// Selection
// ---------------------------------------------------------------------------------------------

// scores[c] = q . centroid c in f32 (the F32 GEMV kernel of quants.c: one row against n).
static void score_clusters(const float * q, const float * centroids, int32_t n, int32_t d,
                           float * scores) {
    vec_dot_rows(GGML_TYPE_F32, d, n, centroids, (size_t) d * sizeof(float), q, scores);
}

// Appends a..b-1 to out at *n.
static void emit_range(int32_t * out, int32_t * n, int32_t a, int32_t b) {
    for (int32_t i = a; i < b; i++) {
        out[(*n)++] = i;
    }
}

// The clustered positions chosen for query q (at most room of them), appended in ascending
// order: the chosen clusters' members are marked in the bitmap, which is read back and cleared.
static void emit_selected(const struct kv_policy * p, struct select_scratch * st,
                          const struct ckv_layer_state * L, const struct ckv_head_state * H,
                          const float * q, int32_t room, int32_t * out, int32_t * n) {
    const int32_t n_sink = p->params.n_sink;
    score_clusters(q, H->centroids, L->n_clusters, p->head_dim, st->scores);
    int32_t n_chosen = cluster_select(st->scores, H->sizes, L->n_clusters, room, st->chosen,
                                      st->heap);
    for (int32_t i = 0; i < n_chosen && room > 0; i++) {
        int32_t         c    = st->chosen[i];
        int32_t         take = H->sizes[c] < room ? H->sizes[c] : room;
        const int32_t * mem  = H->positions + H->offsets[c];
        for (int32_t j = 0; j < take; j++) {
            int32_t bit = mem[j] - n_sink;
            st->marked[bit >> 6] |= 1ull << (bit & 63);
        }
        room -= take;
    }
    int32_t n_words = (L->end - n_sink + 63) / 64;
    for (int32_t w = 0; w < n_words; w++) {
        uint64_t bits = st->marked[w];
        while (bits) {
            out[(*n)++] = n_sink + w * 64 + __builtin_ctzll(bits);
            bits &= bits - 1;
        }
        st->marked[w] = 0;
    }
}

// The list of one query (or KV-head group) at position pos: sinks, chosen clusters, tail.
static int32_t select_list(const struct kv_policy * p, struct select_scratch * st,
                           const struct ckv_layer_state * L, const struct ckv_head_state * H,
                           const float * q, int64_t pos, int32_t * out) {
    const int32_t n_sink    = p->params.n_sink;
    const int32_t n_cached  = (int32_t) pos + 1;
    const int32_t sinks     = n_cached < n_sink ? n_cached : n_sink;
    const int32_t tail      = n_cached > L->end ? n_cached - L->end : 0;
    const int32_t clustered = L->end - n_sink;
    int32_t       room      = p->params.budget - sinks;  // the tail comes on top (file top)
    int32_t       n         = 0;
    room                    = room > 0 ? room : 0;
    emit_range(out, &n, 0, sinks);
    if (room >= clustered) {
        emit_range(out, &n, n_sink, L->end);
    } else {
        emit_selected(p, st, L, H, q, room, out, &n);
    }
    emit_range(out, &n, n_cached - tail, n_cached);
    return n;
}

// The selection of one layer at one step, split over the pool: a task is one query head, or
// with select_per_kv_head one KV head (its list is then copied to the group's other heads).
struct select_region {
    struct kv_policy *             p;
    const struct ckv_layer_state * L;
    const float *                  q;
    int64_t                        pos;
    struct kv_selection *          out;
};

static void select_kv_head(const struct select_region * r, struct select_scratch * st, int32_t g) {
    const struct kv_policy * p     = r->p;
    const int32_t            d     = p->head_dim;
    const int32_t            group = p->n_head / p->n_head_kv;
    memset(st->q_sum, 0, (size_t) d * sizeof(float));
    for (int32_t h = g * group; h < (g + 1) * group; h++) {
        for (int32_t t = 0; t < d; t++) {
            st->q_sum[t] += r->q[(size_t) h * d + t];
        }
    }
    int32_t * first = r->out->pos + (size_t) g * group * r->out->cap;
    int32_t   n     = select_list(p, st, r->L, &r->L->heads[g], st->q_sum, r->pos, first);
    for (int32_t h = g * group; h < (g + 1) * group; h++) {
        if (h != g * group) {
            memcpy(r->out->pos + (size_t) h * r->out->cap, first, (size_t) n * sizeof(int32_t));
        }
        r->out->n[h] = n;
    }
}

static void select_worker(void * arg, int ith, int nth) {
    const struct select_region * r  = arg;
    const struct kv_policy *     p  = r->p;
    struct clusterkv_state *     cs = p->state;
    struct select_scratch *      st = &cs->scratch[ith];
    const int32_t group = p->n_head / p->n_head_kv;
    const bool    per_kv = p->params.select_per_kv_head != 0;
    int64_t       first, last;
    threadpool_split(per_kv ? p->n_head_kv : p->n_head, ith, nth, &first, &last);
    for (int64_t t = first; t < last; t++) {
        if (per_kv) {
            select_kv_head(r, st, (int32_t) t);
        } else {
            int32_t h = (int32_t) t;
            r->out->n[h] = select_list(p, st, r->L, &r->L->heads[h / group],
                                       r->q + (size_t) h * p->head_dim, r->pos,
                                       r->out->pos + (size_t) h * r->out->cap);
        }
    }
}

static void clusterkv_select(struct kv_policy * p, int32_t il, int64_t pos, const float * q,
                             struct kv_selection * out) {
    struct clusterkv_state * st = p->state;
    struct ckv_layer_state * L  = &st->layers[il];
    if (pos - L->end >= p->params.recluster_interval) {
        double t0 = now_ms();
        cluster_span(p, il, L->end, (int32_t) pos);
        p->stats.t_cluster_ms += now_ms() - t0;
    }
    double               t0 = now_ms();
    struct select_region r  = {.p = p, .L = L, .q = q, .pos = pos, .out = out};
    if (p->pool) {
        threadpool_run(p->pool, select_worker, &r);
    } else {
        select_worker(&r, 0, 1);
    }
    p->stats.t_select_ms += now_ms() - t0;
}

// ---------------------------------------------------------------------------------------------
// Truncation, stats, lifetime
// ---------------------------------------------------------------------------------------------

// Drops every span reaching past n_keep (its clusters hold dropped positions); earlier spans
// stay valid as they are, and the next decode step re-clusters what follows them.
static void clusterkv_truncate(struct kv_policy * p, int64_t n_keep) {
    struct clusterkv_state * st = p->state;
    for (int32_t il = 0; il < p->n_layer; il++) {
        struct ckv_layer_state * L = &st->layers[il];
        if (!L->heads) {
            continue;
        }
        while (L->n_spans > 0 && L->span_end[L->n_spans - 1] > n_keep) {
            L->n_spans--;
        }
        L->end        = L->n_spans ? L->span_end[L->n_spans - 1] : p->params.n_sink;
        L->n_clusters = L->n_spans ? L->span_clusters[L->n_spans - 1] : 0;
    }
}

static int32_t clusterkv_n_clusters(const struct kv_policy * p, int32_t il, int32_t kv_head) {
    const struct clusterkv_state * st = p->state;
    (void) kv_head;  // every KV head of a layer has the same number of clusters
    return st->layers[il].heads ? st->layers[il].n_clusters : 0;
}

void clusterkv_get_view(const struct kv_policy * p, int32_t il, int32_t g,
                        struct clusterkv_view * out) {
    const struct clusterkv_state * st = p->state;
    const struct ckv_layer_state * L  = &st->layers[il];
    memset(out, 0, sizeof(*out));
    out->end = L->end;
    if (L->heads) {
        out->n_clusters = L->n_clusters;
        out->centroids  = L->heads[g].centroids;
        out->sizes      = L->heads[g].sizes;
        out->offsets    = L->heads[g].offsets;
        out->positions  = L->heads[g].positions;
    }
}

static void clusterkv_free(struct kv_policy * p) {
    struct clusterkv_state * st = p->state;
    if (!st) {
        return;
    }
    for (int32_t il = 0; st->layers && il < p->n_layer; il++) {
        struct ckv_layer_state * L = &st->layers[il];
        for (int32_t g = 0; L->heads && g < p->n_head_kv; g++) {
            free(L->heads[g].centroids);
            free(L->heads[g].sizes);
            free(L->heads[g].offsets);
            free(L->heads[g].positions);
        }
        free(L->heads);
        free(L->span_end);
        free(L->span_clusters);
    }
    free(st->layers);
    kmeans_work_free(&st->work);
    free(st->keys);
    free(st->labels);
    free(st->cursor);
    for (int32_t i = 0; st->scratch && i < st->n_scratch; i++) {
        free(st->scratch[i].scores);
        free(st->scratch[i].chosen);
        free(st->scratch[i].heap);
        free(st->scratch[i].q_sum);
        free(st->scratch[i].marked);
    }
    free(st->scratch);
    free(st);
    p->state = NULL;
}

static const struct kv_policy_vtable clusterkv_vtable = {
    .name          = "clusterkv",
    .wants_weights = false,
    .emits_ascending = true,  // sinks, then the clustered span read back from a bitmap, then the tail
    .on_store      = NULL,  // nothing to do per stored token: clustering waits for select()
    .select        = clusterkv_select,
    .observe       = NULL,
    .observe_dense = NULL,
    .truncate      = clusterkv_truncate,
    .n_clusters    = clusterkv_n_clusters,
    .free_state    = clusterkv_free,
};

static int32_t check_params(const struct kv_policy * p) {
    const struct ckv_kv_policy_params * kp = &p->params;
    if (kp->tokens_per_cluster < 1) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "clusterkv: tokens_per_cluster must be >= 1, got %d",
                        kp->tokens_per_cluster);
    }
    if (kp->recluster_interval < 1) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "clusterkv: recluster_interval must be >= 1, got %d",
                        kp->recluster_interval);
    }
    if (kp->kmeans_iters < 1 || kp->kmeans_iters > 1000) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "clusterkv: kmeans_iters must be in [1, 1000], got %d",
                        kp->kmeans_iters);
    }
    if (kp->select_per_kv_head != 0 && kp->select_per_kv_head != 1) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "clusterkv: select_per_kv_head must be 0 or 1, got %d",
                        kp->select_per_kv_head);
    }
    if (kp->kmeans_init != CKV_KMEANS_INIT_RANDOM && kp->kmeans_init != CKV_KMEANS_INIT_STRIDED) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "clusterkv: kmeans_init must be random (0) or strided (1), "
                        "got %d", kp->kmeans_init);
    }
    if (kp->n_sink < 0 || (int64_t) kp->budget < (int64_t) kp->n_sink + 1) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "clusterkv: budget (%d) must be at least n_sink (%d) "
                        "+ 1: it holds the sinks and the selected clusters", kp->budget, kp->n_sink);
    }
    if (p->n_head_kv < 1 || p->n_head % p->n_head_kv != 0) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "clusterkv: n_head (%d) must be a multiple of "
                        "n_head_kv (%d)", p->n_head, p->n_head_kv);
    }
    return CKV_OK;
}

static int32_t alloc_layer(struct clusterkv_state * st, struct ckv_layer_state * L,
                           int32_t n_head_kv, int32_t d) {
    L->span_end      = malloc((size_t) st->max_spans * sizeof(int32_t));
    L->span_clusters = malloc((size_t) st->max_spans * sizeof(int32_t));
    L->heads         = calloc((size_t) n_head_kv, sizeof(*L->heads));
    if (!L->span_end || !L->span_clusters || !L->heads) {
        return CKV_ERR_OOM;
    }
    for (int32_t g = 0; g < n_head_kv; g++) {
        struct ckv_head_state * H = &L->heads[g];
        H->centroids = malloc((size_t) st->max_clusters * d * sizeof(float));
        H->sizes     = malloc((size_t) st->max_clusters * sizeof(int32_t));
        H->offsets   = malloc((size_t) st->max_clusters * sizeof(int32_t));
        H->positions = malloc((size_t) (st->max_pos > 0 ? st->max_pos : 1) * sizeof(int32_t));
        if (!H->centroids || !H->sizes || !H->offsets || !H->positions) {
            return CKV_ERR_OOM;
        }
    }
    return CKV_OK;
}

static int32_t alloc_state(struct kv_policy * p, struct clusterkv_state * st) {
    const int32_t d     = p->head_dim;
    const int32_t n_pos = st->max_pos > 0 ? st->max_pos : 1;
    const int32_t k_max = ceil_div(n_pos, p->params.tokens_per_cluster);
    st->layers          = calloc((size_t) p->n_layer, sizeof(*st->layers));
    st->keys            = malloc((size_t) n_pos * d * sizeof(float));
    st->labels          = malloc((size_t) n_pos * sizeof(int32_t));
    st->cursor          = malloc((size_t) st->max_clusters * sizeof(int32_t));
    int32_t n_threads   = p->pool ? threadpool_n_threads(p->pool) : 1;
    st->n_scratch       = n_threads;
    st->scratch         = calloc((size_t) n_threads, sizeof(*st->scratch));
    if (!st->layers || !st->keys || !st->labels || !st->cursor || !st->scratch) {
        return CKV_ERR_OOM;
    }
    for (int32_t i = 0; i < n_threads; i++) {
        struct select_scratch * s = &st->scratch[i];
        s->scores = malloc((size_t) st->max_clusters * sizeof(float));
        s->chosen = malloc((size_t) st->max_clusters * sizeof(int32_t));
        s->heap   = malloc((size_t) st->max_clusters * sizeof(uint64_t));
        s->q_sum  = malloc((size_t) d * sizeof(float));
        s->marked = calloc((size_t) n_pos / 64 + 1, sizeof(uint64_t));
        if (!s->scores || !s->chosen || !s->heap || !s->q_sum || !s->marked) {
            return CKV_ERR_OOM;
        }
    }
    if (kmeans_work_init(&st->work, n_pos, k_max, d, n_threads) != CKV_OK) {
        return CKV_ERR_OOM;
    }
    for (int32_t il = 0; il < p->n_layer; il++) {
        st->layers[il].end = p->params.n_sink;
        if (p->layer_compressed[il] && alloc_layer(st, &st->layers[il], p->n_head_kv, d) != CKV_OK) {
            return CKV_ERR_OOM;
        }
    }
    return CKV_OK;
}

int32_t kv_policy_init_clusterkv(struct kv_policy * p) {
    int32_t status = check_params(p);
    if (status != CKV_OK) {
        return status;
    }
    struct clusterkv_state * st = calloc(1, sizeof(*st));
    if (!st) {
        return ckv_fail(CKV_ERR_OOM, "clusterkv: out of memory for the policy state");
    }
    p->state = st;
    p->vt    = &clusterkv_vtable;
    // Every span holds >= recluster_interval positions, and ceil(n / t) < n / t + 1 per span,
    // so max_pos / tokens_per_cluster + max_spans bounds the clusters of one (layer, KV head).
    st->max_pos      = p->kv->n_ctx > p->params.n_sink ? p->kv->n_ctx - p->params.n_sink : 0;
    st->max_spans    = st->max_pos / p->params.recluster_interval + 1;
    st->max_clusters = ceil_div(st->max_pos, p->params.tokens_per_cluster) + st->max_spans;
    if (alloc_state(p, st) != CKV_OK) {
        clusterkv_free(p);
        return ckv_fail(CKV_ERR_OOM, "clusterkv: out of memory for the cluster state (n_ctx %d)",
                        p->kv->n_ctx);
    }
    return CKV_OK;
}
