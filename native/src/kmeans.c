// kmeans.c - cosine k-means of key rows and budgeted cluster selection, the two building
// blocks of the ClusterKV policy (kvpolicy-clusterkv.c), plus their public wrappers
// ckv_kmeans_cosine / ckv_cluster_select. The algorithm is spelt out in kmeans.h; the
// assignment step runs the AVX2 kernel of kmeans-avx2.c when quants.c has selected that level,
// else the scalar loop below, and is split over the thread pool by rows.
#include "kmeans.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "quants-impl.h"

// Below this many row x centroid pairs one thread is faster than waking the pool.
enum { PARALLEL_MIN_PAIRS = 1 << 14 };

static int32_t round_up(int32_t x, int32_t m) {
    return (x + m - 1) / m * m;
}

// ---------------------------------------------------------------------------------------------
// Deterministic init
// ---------------------------------------------------------------------------------------------

uint64_t kmeans_splitmix64(uint64_t * state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z          = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z          = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void kmeans_init_rows(uint64_t seed, int32_t n, int32_t k, int32_t * perm) {
    for (int32_t i = 0; i < n; i++) {
        perm[i] = i;
    }
    uint64_t state = seed;
    for (int32_t i = 0; i < k; i++) {
        uint64_t r   = kmeans_splitmix64(&state);
        int32_t  j   = i + (int32_t) (((r >> 32) * (uint64_t) (n - i)) >> 32);
        int32_t  tmp = perm[i];
        perm[i]      = perm[j];
        perm[j]      = tmp;
    }
}

void kmeans_strided_rows(int32_t n, int32_t k, int32_t * rows) {
    for (int32_t i = 0; i < k; i++) {
        rows[i] = (int32_t) (((int64_t) 2 * i + 1) * n / (2 * (int64_t) k));
    }
}

// ---------------------------------------------------------------------------------------------
// Scratch
// ---------------------------------------------------------------------------------------------

int32_t kmeans_work_init(struct kmeans_work * w, int32_t n_max, int32_t k_max, int32_t d,
                         int32_t n_threads) {
    memset(w, 0, sizeof(*w));
    w->n_max     = n_max;
    w->k_max     = k_max;
    w->d         = d;
    w->n_threads = n_threads;
    size_t k_pad = (size_t) round_up(k_max, KMEANS_K_TILE);
    w->sums      = malloc((size_t) k_max * d * sizeof(double));
    w->counts    = malloc((size_t) k_max * sizeof(int32_t));
    w->cent_n    = malloc((size_t) k_max * d * sizeof(float));
    w->cent_t    = calloc(k_pad * d, sizeof(float));
    w->changed   = calloc((size_t) n_threads, sizeof(int64_t));
    if (!w->sums || !w->counts || !w->cent_n || !w->cent_t || !w->changed) {
        kmeans_work_free(w);
        return ckv_fail(CKV_ERR_OOM, "out of memory for k-means scratch (k %d, d %d)", k_max, d);
    }
    return CKV_OK;
}

void kmeans_work_free(struct kmeans_work * w) {
    free(w->sums);
    free(w->counts);
    free(w->cent_n);
    free(w->cent_t);
    free(w->changed);
    memset(w, 0, sizeof(*w));
}

// ---------------------------------------------------------------------------------------------
// Assignment
// ---------------------------------------------------------------------------------------------

static bool use_avx2(void) {
#if defined(CKV_HAVE_X86_KERNELS)
    return quants_isa_current() >= QUANTS_ISA_AVX2;
#else
    return false;
#endif
}

// c_j / |c_j| (a zero centroid stays zero) into the layout the assignment kernel reads.
static void normalise_centroids(const float * cent, int32_t k, int32_t d, bool transposed,
                                struct kmeans_work * w) {
    int32_t k_pad = round_up(k, KMEANS_K_TILE);
    for (int32_t j = 0; j < k; j++) {
        const float * c  = cent + (size_t) j * d;
        double        ss = 0.0;
        for (int32_t t = 0; t < d; t++) {
            ss += (double) c[t] * c[t];
        }
        float inv = ss > 0.0 ? (float) (1.0 / sqrt(ss)) : 0.0f;
        for (int32_t t = 0; t < d; t++) {
            if (transposed) {
                w->cent_t[(size_t) t * k_pad + j] = c[t] * inv;
            } else {
                w->cent_n[(size_t) j * d + t] = c[t] * inv;
            }
        }
    }
    if (transposed) {
        for (int32_t t = 0; t < d; t++) {
            memset(w->cent_t + (size_t) t * k_pad + k, 0, (size_t) (k_pad - k) * sizeof(float));
        }
    }
}

static int64_t assign_scalar(const float * x, int32_t d, int64_t row0, int64_t row1,
                             const float * cent_n, int32_t k, int32_t * labels) {
    int64_t changed = 0;
    for (int64_t i = row0; i < row1; i++) {
        const float * xi   = x + (size_t) i * d;
        float         best = -INFINITY;
        int32_t       bj   = 0;
        for (int32_t j = 0; j < k; j++) {
            const float * c = cent_n + (size_t) j * d;
            float         s = 0.0f;
            for (int32_t t = 0; t < d; t++) {
                s += xi[t] * c[t];
            }
            if (s > best) {
                best = s;
                bj   = j;
            }
        }
        changed += labels[i] != bj;
        labels[i] = bj;
    }
    return changed;
}

struct assign_task {
    const struct kmeans_args * a;
    struct kmeans_work *       w;
    bool                       avx2;
};

static void assign_worker(void * arg, int ith, int nth) {
    const struct assign_task * task = arg;
    const struct kmeans_args * a    = task->a;
    int64_t                    row0, row1;
    threadpool_split(a->n, ith, nth, &row0, &row1);
    int64_t changed = 0;
#if defined(CKV_HAVE_X86_KERNELS)
    if (task->avx2) {
        changed = kmeans_assign_avx2(a->x, a->d, row0, row1, task->w->cent_t, a->k,
                                     round_up(a->k, KMEANS_K_TILE), a->labels);
    } else
#endif
    {
        changed = assign_scalar(a->x, a->d, row0, row1, task->w->cent_n, a->k, a->labels);
    }
    task->w->changed[ith] = changed;
}

// Labels every row with its nearest centroid (cosine); returns how many labels changed.
static int64_t assign(const struct kmeans_args * a, struct kmeans_work * w,
                      struct threadpool * pool) {
    struct assign_task task = {.a = a, .w = w, .avx2 = use_avx2()};
    normalise_centroids(a->centroids, a->k, a->d, task.avx2, w);
    int nth = 1;
    if (pool && (int64_t) a->n * a->k >= PARALLEL_MIN_PAIRS) {
        nth = threadpool_n_threads(pool);
        threadpool_run(pool, assign_worker, &task);
    } else {
        assign_worker(&task, 0, 1);
    }
    int64_t changed = 0;
    for (int i = 0; i < nth; i++) {
        changed += w->changed[i];
    }
    return changed;
}

// ---------------------------------------------------------------------------------------------
// Update and the loop
// ---------------------------------------------------------------------------------------------

// c_j = mean of the raw rows labelled j (f64 sums); an empty cluster keeps its centroid.
static void update(const struct kmeans_args * a, struct kmeans_work * w) {
    const int32_t d = a->d;
    memset(w->sums, 0, (size_t) a->k * d * sizeof(double));
    memset(w->counts, 0, (size_t) a->k * sizeof(int32_t));
    for (int32_t i = 0; i < a->n; i++) {
        const float * xi = a->x + (size_t) i * d;
        double *      s  = w->sums + (size_t) a->labels[i] * d;
        for (int32_t t = 0; t < d; t++) {
            s[t] += xi[t];
        }
        w->counts[a->labels[i]]++;
    }
    for (int32_t j = 0; j < a->k; j++) {
        if (w->counts[j] == 0) {
            continue;
        }
        const double * s = w->sums + (size_t) j * d;
        float *        c = a->centroids + (size_t) j * d;
        for (int32_t t = 0; t < d; t++) {
            c[t] = (float) (s[t] / w->counts[j]);
        }
    }
}

int32_t kmeans_cosine_run(const struct kmeans_args * a, struct kmeans_work * w,
                          struct threadpool * pool) {
    // The labels buffer doubles as the shuffle scratch before the first assignment.
    const int32_t * rows = a->init_rows;
    if (!rows) {
        kmeans_init_rows(a->seed, a->n, a->k, a->labels);
        rows = a->labels;
    }
    for (int32_t j = 0; j < a->k; j++) {
        memcpy(a->centroids + (size_t) j * a->d, a->x + (size_t) rows[j] * a->d,
               (size_t) a->d * sizeof(float));
    }
    for (int32_t i = 0; i < a->n; i++) {
        a->labels[i] = -1;
    }
    assign(a, w, pool);
    int32_t n_iter = 0;
    while (n_iter < a->max_iter) {
        update(a, w);
        n_iter++;
        if (assign(a, w, pool) == 0) {
            break;
        }
    }
    return n_iter;
}

// ---------------------------------------------------------------------------------------------
// Budgeted selection: a binary max-heap of rank keys, popped until the budget is full
// ---------------------------------------------------------------------------------------------

// One integer that orders clusters as the selection must: the score's bits made monotonic
// (sign flipped for >= 0, all bits inverted for < 0; NaN as -inf, -0 as +0) above the inverted
// index, so a higher key is a higher score and, among equal scores, a lower index.
static inline uint64_t rank_key(float score, int32_t c) {
    float s = isnan(score) ? -INFINITY : (score == 0.0f ? 0.0f : score);
    uint32_t u;
    memcpy(&u, &s, sizeof(u));
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((uint64_t) u << 32) | (uint32_t) (UINT32_MAX - (uint32_t) c);
}

static void sift_down(uint64_t * heap, int32_t n, int32_t i) {
    uint64_t key = heap[i];
    for (;;) {
        int32_t child = 2 * i + 1;
        if (child >= n) {
            break;
        }
        if (child + 1 < n && heap[child + 1] > heap[child]) {
            child++;
        }
        if (heap[child] <= key) {
            break;
        }
        heap[i] = heap[child];
        i       = child;
    }
    heap[i] = key;
}

int32_t cluster_select(const float * scores, const int32_t * sizes, int32_t n, int64_t budget,
                       int32_t * chosen, uint64_t * heap) {
    if (n <= 0 || budget <= 0) {
        return 0;
    }
    for (int32_t c = 0; c < n; c++) {
        heap[c] = rank_key(scores[c], c);
    }
    for (int32_t i = n / 2 - 1; i >= 0; i--) {
        sift_down(heap, n, i);
    }
    int32_t heap_n  = n;
    int32_t n_taken = 0;
    int64_t total   = 0;
    while (heap_n > 0 && total < budget) {
        int32_t best      = (int32_t) (UINT32_MAX - (uint32_t) heap[0]);
        chosen[n_taken++] = best;
        total += sizes[best];
        heap[0] = heap[--heap_n];
        sift_down(heap, heap_n, 0);
    }
    return n_taken;
}

// ---------------------------------------------------------------------------------------------
// Public wrappers (argument checks, one-shot scratch)
// ---------------------------------------------------------------------------------------------

CKV_API int32_t ckv_kmeans_cosine(const float * x, int32_t n, int32_t d, int32_t k,
                                  int32_t max_iter, uint32_t seed, const int32_t * init_rows,
                                  float * centroids, int32_t * labels, int32_t * n_iter) {
    ckv_clear_error();
    if (!x || !centroids || !labels) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_kmeans_cosine: x, centroids and labels must "
                        "not be NULL");
    }
    if (n < 1 || d < 1) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_kmeans_cosine: n (%d) and d (%d) must be >= 1",
                        n, d);
    }
    if (k < 1 || k > n) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_kmeans_cosine: k must be in [1, n = %d], got %d",
                        n, k);
    }
    if (max_iter < 1) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_kmeans_cosine: max_iter must be >= 1, got %d",
                        max_iter);
    }
    for (int32_t j = 0; init_rows && j < k; j++) {
        if (init_rows[j] < 0 || init_rows[j] >= n) {
            return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_kmeans_cosine: init_rows[%d] = %d is not a "
                            "row in [0, %d)", j, init_rows[j], n);
        }
    }
    struct kmeans_work w;
    int32_t            st = kmeans_work_init(&w, n, k, d, 1);
    if (st != CKV_OK) {
        return st;
    }
    struct kmeans_args a = {
        .x = x, .n = n, .d = d, .k = k, .max_iter = max_iter, .seed = seed,
        .init_rows = init_rows, .centroids = centroids, .labels = labels,
    };
    int32_t it = kmeans_cosine_run(&a, &w, NULL);
    kmeans_work_free(&w);
    if (n_iter) {
        *n_iter = it;
    }
    return CKV_OK;
}

CKV_API int32_t ckv_cluster_select(const float * scores, const int32_t * sizes, int32_t n_clusters,
                                   int32_t budget, int32_t * chosen, int32_t * n_chosen) {
    ckv_clear_error();
    if (!n_chosen || (n_clusters > 0 && (!scores || !sizes || !chosen))) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_cluster_select: scores, sizes, chosen and "
                        "n_chosen must not be NULL");
    }
    if (n_clusters < 0 || budget < 0) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_cluster_select: n_clusters (%d) and budget (%d) "
                        "must be >= 0", n_clusters, budget);
    }
    for (int32_t c = 0; c < n_clusters; c++) {
        if (sizes[c] < 0) {
            return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_cluster_select: sizes[%d] = %d is negative",
                            c, sizes[c]);
        }
    }
    uint64_t * heap = malloc((size_t) (n_clusters > 0 ? n_clusters : 1) * sizeof(uint64_t));
    if (!heap) {
        return ckv_fail(CKV_ERR_OOM, "ckv_cluster_select: out of memory for %d clusters",
                        n_clusters);
    }
    *n_chosen = cluster_select(scores, sizes, n_clusters, budget, chosen, heap);
    free(heap);
    return CKV_OK;
}
