// kvpolicy-quest.c - Quest (Tang et al., ICML 2024): positions are grouped into pages of
// page_size consecutive positions; each page keeps the element-wise min and max of its keys per
// (compressed layer, KV head), updated as keys are stored. For a query q the page's upper bound
// on any q.k inside it is
//     bound = sum_i max(q_i * min_i, q_i * max_i)
// and each query head reads the pages of highest bound. Choices (documented for the tests):
//   - the list is: the sinks [0, n_sink), the current page [page start, pos] (it is still
//     filling, so its bound is not used), then whole pages in descending bound (ties: the lower
//     page first) until the budget is full; the last page taken may be cut to its first positions;
//   - pages are aligned at multiples of page_size from position 0; a page overlapping the sinks
//     competes with its non-sink positions only;
//   - bounds are computed from the keys as stored in the cache (f16-rounded for an f16 cache),
//     in f32.
// Selection is per query head (heads of a GQA group share the min/max, not the ranking) and runs
// on the context's thread pool, one head per task.
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "kvpolicy.h"
#include "quants.h"

struct quest_state {
    int32_t   n_pages;   // pages of n_ctx positions
    float **  pmin;      // [n_layer] -> [n_head_kv][n_pages][head_dim]; NULL for dense layers
    float **  pmax;      // same shape
    float *   row;       // [head_dim] one key as f32 (on_store, truncate)
    float *   bounds;    // [n_head][n_pages] scratch of select
    int32_t * heap;      // [n_head][n_pages] scratch of select: candidate pages
};

static float * page_min(const struct kv_policy * p, const struct quest_state * st, int32_t il,
                        int32_t h, int64_t page) {
    return st->pmin[il] + ((size_t) h * st->n_pages + page) * p->head_dim;
}
static float * page_max(const struct kv_policy * p, const struct quest_state * st, int32_t il,
                        int32_t h, int64_t page) {
    return st->pmax[il] + ((size_t) h * st->n_pages + page) * p->head_dim;
}

static void load_key(const struct kv_cache * kv, int32_t il, int32_t h, int64_t pos, float * out) {
    const void * rows = kv_cache_k(kv, il, h);
    if (kv->type == GGML_TYPE_F16) {
        ckv_fp16_to_fp32_row((const ckv_fp16 *) rows + pos * kv->head_dim, out, kv->head_dim);
    } else {
        memcpy(out, (const float *) rows + pos * kv->head_dim, (size_t) kv->head_dim * sizeof(float));
    }
}

// Folds the stored key at pos into its page (the first position of a page starts it afresh).
static void add_key(struct kv_policy * p, struct quest_state * st, int32_t il, int32_t h, int64_t pos) {
    int64_t page = pos / p->params.page_size;
    float * mn = page_min(p, st, il, h, page), * mx = page_max(p, st, il, h, page);
    load_key(p->kv, il, h, pos, st->row);
    bool first = pos % p->params.page_size == 0;
    for (int32_t i = 0; i < p->head_dim; i++) {
        float k = st->row[i];
        mn[i] = first || k < mn[i] ? k : mn[i];
        mx[i] = first || k > mx[i] ? k : mx[i];
    }
}

static void quest_on_store(struct kv_policy * p, int32_t il, int64_t pos0, int64_t n) {
    struct quest_state * st = p->state;
    for (int32_t h = 0; h < p->n_head_kv; h++) {
        for (int64_t j = pos0; j < pos0 + n; j++) {
            add_key(p, st, il, h, j);
        }
    }
}

// The page holding n_keep - 1 lost its later keys: rebuild it from the ones that remain.
static void quest_truncate(struct kv_policy * p, int64_t n_keep) {
    struct quest_state * st = p->state;
    int64_t start = n_keep / p->params.page_size * p->params.page_size;
    for (int32_t il = 0; il < p->n_layer; il++) {
        for (int32_t h = 0; st->pmin[il] && h < p->n_head_kv; h++) {
            for (int64_t j = start; j < n_keep; j++) {
                add_key(p, st, il, h, j);
            }
        }
    }
}

// --- selection -----------------------------------------------------------------------------------

enum { BOUND_LANES = 8 };

// Adds dims [i, d) to their lanes, then sums lane 0..7 in order: the end both kernels share.
static float page_bound_finish(float * lane, const float * q, const float * mn, const float * mx,
                               int32_t i, int32_t d) {
    for (; i < d; i++) {
        float a = q[i] * mn[i], b = q[i] * mx[i];
        lane[i % BOUND_LANES] += a > b ? a : b;
    }
    float sum = 0.0f;
    for (int32_t l = 0; l < BOUND_LANES; l++) {
        sum += lane[l];
    }
    return sum;
}

// Summed in BOUND_LANES interleaved partial sums (lane i % 8), then lane 0..7 in order: a fixed
// order the compiler can vectorise without reassociating (tests/native/test-kvpolicy.c sums the
// same way).
static float page_bound_scalar(const float * q, const float * mn, const float * mx, int32_t d) {
    float lane[BOUND_LANES] = {0};
    int32_t i = 0;
    for (; i + BOUND_LANES <= d; i += BOUND_LANES) {
        for (int32_t l = 0; l < BOUND_LANES; l++) {
            float a = q[i + l] * mn[i + l], b = q[i + l] * mx[i + l];
            lane[l] += a > b ? a : b;
        }
    }
    return page_bound_finish(lane, q, mn, mx, i, d);
}

#if defined(CKV_HAVE_X86_KERNELS) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

// The same sums as page_bound_scalar (one lane per vector element, no fused multiply-add).
__attribute__((target("avx2"))) static float page_bound_avx2(const float * q, const float * mn,
                                                             const float * mx, int32_t d) {
    __m256 acc = _mm256_setzero_ps();
    int32_t i = 0;
    for (; i + BOUND_LANES <= d; i += BOUND_LANES) {
        __m256 qv = _mm256_loadu_ps(q + i);
        __m256 a = _mm256_mul_ps(qv, _mm256_loadu_ps(mn + i)), b = _mm256_mul_ps(qv, _mm256_loadu_ps(mx + i));
        acc = _mm256_add_ps(acc, _mm256_max_ps(a, b));  // max_ps(a, b) = a > b ? a : b
    }
    float lane[BOUND_LANES];
    _mm256_storeu_ps(lane, acc);
    return page_bound_finish(lane, q, mn, mx, i, d);
}
#endif

static float page_bound(const float * q, const float * mn, const float * mx, int32_t d) {
#if defined(CKV_HAVE_X86_KERNELS) && (defined(__GNUC__) || defined(__clang__))
    if (__builtin_cpu_supports("avx2")) {
        return page_bound_avx2(q, mn, mx, d);
    }
#endif
    return page_bound_scalar(q, mn, mx, d);
}

// Page a ranks before page b: higher bound, then lower index.
static bool ranks_before(const float * bounds, int32_t a, int32_t b) {
    return bounds[a] > bounds[b] || (bounds[a] == bounds[b] && a < b);
}

// Min-heap on rank (root = the worst page kept) over heap[0..n).
static void sift_down(int32_t * heap, int32_t n, int32_t i, const float * bounds) {
    for (;;) {
        int32_t worst = i, l = 2 * i + 1, r = l + 1;
        if (l < n && ranks_before(bounds, heap[worst], heap[l])) {
            worst = l;
        }
        if (r < n && ranks_before(bounds, heap[worst], heap[r])) {
            worst = r;
        }
        if (worst == i) {
            return;
        }
        int32_t t = heap[i];
        heap[i] = heap[worst];
        heap[worst] = t;
        i = worst;
    }
}

// heap[0..k) = the k best pages of [first, last), best first.
static int32_t top_pages(const float * bounds, int32_t first, int32_t last, int32_t k, int32_t * heap) {
    int32_t n = 0;
    for (int32_t pg = first; pg < last; pg++) {
        if (n < k) {
            heap[n++] = pg;
            if (n == k) {
                for (int32_t i = k / 2 - 1; i >= 0; i--) {
                    sift_down(heap, n, i, bounds);
                }
            }
        } else if (ranks_before(bounds, pg, heap[0])) {
            heap[0] = pg;
            sift_down(heap, n, 0, bounds);
        }
    }
    if (n < k) {
        for (int32_t i = n / 2 - 1; i >= 0; i--) {
            sift_down(heap, n, i, bounds);
        }
    }
    for (int32_t end = n - 1; end > 0; end--) {  // heap sort: worst to the back
        int32_t t = heap[0];
        heap[0] = heap[end];
        heap[end] = t;
        sift_down(heap, end, 0, bounds);
    }
    return n;
}

struct quest_region {
    struct kv_policy *    p;
    int32_t               il;
    int64_t               pos;
    const float *         q;
    struct kv_selection * out;
};

static void select_head(const struct quest_region * r, int32_t h) {
    const struct kv_policy * p  = r->p;
    struct quest_state *     st = p->state;
    int64_t   ps = p->params.page_size, pos = r->pos;
    int64_t   sinks = pos + 1 < p->params.n_sink ? pos + 1 : p->params.n_sink;
    int64_t   cur = pos / ps, cur_start = cur * ps;
    int32_t * list = r->out->pos + (size_t) h * r->out->cap;
    int32_t   n = 0;
    for (int64_t j = 0; j < sinks; j++) {
        list[n++] = (int32_t) j;
    }
    for (int64_t j = cur_start > sinks ? cur_start : sinks; j <= pos; j++) {  // the current page
        list[n++] = (int32_t) j;
    }
    int64_t room = p->params.budget - n;
    int32_t first = (int32_t) (sinks / ps), kvh = h / (p->n_head / p->n_head_kv);
    float * bounds = st->bounds + (size_t) h * st->n_pages;
    int32_t * heap = st->heap + (size_t) h * st->n_pages;
    for (int32_t pg = first; pg < cur; pg++) {
        bounds[pg] = page_bound(r->q + (size_t) h * p->head_dim, page_min(p, st, r->il, kvh, pg),
                                page_max(p, st, r->il, kvh, pg), p->head_dim);
    }
    // room / ps + 2 pages always cover room (only the first candidate page can be short)
    int32_t k = (int32_t) (room / ps + 2 < cur - first ? room / ps + 2 : cur - first);
    int32_t n_top = room > 0 && k > 0 ? top_pages(bounds, first, (int32_t) cur, k, heap) : 0;
    for (int32_t i = 0; i < n_top && room > 0; i++) {
        int64_t start = heap[i] * ps > sinks ? heap[i] * ps : sinks, end = (heap[i] + 1) * ps;
        for (int64_t j = start; j < end && room > 0; j++, room--) {
            list[n++] = (int32_t) j;
        }
    }
    r->out->n[h] = n;
}

static void select_worker(void * arg, int ith, int nth) {
    const struct quest_region * r = arg;
    for (int32_t h = ith; h < r->p->n_head; h += nth) {
        select_head(r, h);
    }
}

static void quest_select(struct kv_policy * p, int32_t il, int64_t pos, const float * q,
                         struct kv_selection * out) {
    struct quest_region r = {p, il, pos, q, out};
    if (p->pool) {
        threadpool_run(p->pool, select_worker, &r);
    } else {   // a policy made without a pool (tests): one thread
        select_worker(&r, 0, 1);
    }
}

// --- lifetime ------------------------------------------------------------------------------------

static void quest_free(struct kv_policy * p) {
    struct quest_state * st = p->state;
    for (int32_t il = 0; st->pmin && il < p->n_layer; il++) {
        free(st->pmin[il]);
        free(st->pmax[il]);
    }
    free(st->pmin);
    free(st->pmax);
    free(st->row);
    free(st->bounds);
    free(st->heap);
    free(st);
    p->state = NULL;
}

static const struct kv_policy_vtable quest_vtable = {
    .name       = "quest",
    .on_store   = quest_on_store,
    .select     = quest_select,
    .truncate   = quest_truncate,
    .free_state = quest_free,
};

int32_t kv_policy_init_quest(struct kv_policy * p) {
    struct quest_state * st = calloc(1, sizeof(*st));
    if (!st) {
        return ckv_fail(CKV_ERR_OOM, "out of memory for the quest policy");
    }
    p->state    = st;
    p->vt       = &quest_vtable;
    st->n_pages = (int32_t) ((p->kv->n_ctx + p->params.page_size - 1) / p->params.page_size);
    size_t pages = (size_t) p->n_head_kv * st->n_pages * p->head_dim;
    st->pmin   = calloc((size_t) p->n_layer, sizeof(float *));
    st->pmax   = calloc((size_t) p->n_layer, sizeof(float *));
    st->row    = malloc((size_t) p->head_dim * sizeof(float));
    st->bounds = malloc((size_t) p->n_head * st->n_pages * sizeof(float));
    st->heap   = malloc((size_t) p->n_head * st->n_pages * sizeof(int32_t));
    bool ok = st->pmin && st->pmax && st->row && st->bounds && st->heap;
    for (int32_t il = 0; ok && il < p->n_layer; il++) {
        if (p->layer_compressed[il]) {
            st->pmin[il] = malloc(pages * sizeof(float));
            st->pmax[il] = malloc(pages * sizeof(float));
            ok = st->pmin[il] && st->pmax[il];
        }
    }
    if (!ok) {
        return ckv_fail(CKV_ERR_OOM, "out of memory for quest's page bounds (%d pages)", st->n_pages);
    }
    return CKV_OK;
}
