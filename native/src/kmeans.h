// kmeans.h - ClusterKV's two building blocks (internal): cosine k-means over key rows and the
// budgeted selection of clusters by score. kvpolicy-clusterkv.c runs them per (layer, KV head);
// the public ckv_kmeans_cosine / ckv_cluster_select wrap them for tests and tools.
//
// k-means, as implemented (the numpy reference in tests/python/test_kmeans.py is the same):
//   init     centroids = rows init_rows[0..k), or k distinct rows drawn by kmeans_init_rows
//            (or evenly spaced ones, kmeans_strided_rows)
//   assign   label[i] = argmax_j x_i . c_j / |c_j|  (= argmax of the cosine: |x_i| > 0 is the
//            same for every j; ties and all-zero rows go to the lowest j; a zero centroid
//            scores 0)
//   repeat   up to max_iter times:
//              update  c_j = mean of the raw rows labelled j, summed in f64 (empty: c_j kept)
//              assign  again; stop early when no label changed
//   n_iter = number of updates run. On an early stop the centroids are the exact means of the
//   final labels; after max_iter the labels are the final assignment to the last centroids.
// Assignment is a fused dot + running argmax over centroid tiles: no n x k score matrix.
#ifndef CKV_KMEANS_H
#define CKV_KMEANS_H

#include <stdbool.h>
#include <stdint.h>

#include "threadpool.h"

// Centroid tiles are 16 wide (two AVX2 vectors); the transposed table is padded to this.
#define KMEANS_K_TILE 16

// Scratch for one k-means run at a time, sized once (none of it is allocated per run).
struct kmeans_work {
    int32_t   n_max;
    int32_t   k_max;
    int32_t   d;
    int32_t   n_threads;
    double *  sums;      // [k_max][d] f64 per-cluster sums of member rows
    int32_t * counts;    // [k_max]
    float *   cent_n;    // [k_max][d] normalised centroids, row-major (scalar path)
    float *   cent_t;    // [d][k_pad] normalised centroids, transposed, k_pad = k_max rounded
                         // up to KMEANS_K_TILE, padding zero (AVX2 path)
    int64_t * changed;   // [n_threads] labels changed per thread in the last assignment
};

int32_t kmeans_work_init(struct kmeans_work * w, int32_t n_max, int32_t k_max, int32_t d,
                         int32_t n_threads);
void    kmeans_work_free(struct kmeans_work * w);

struct kmeans_args {
    const float *   x;          // [n][d] rows to cluster
    int32_t         n;
    int32_t         d;
    int32_t         k;          // 1 <= k <= n
    int32_t         max_iter;   // >= 1
    uint64_t        seed;       // used when init_rows is NULL
    const int32_t * init_rows;  // [k] rows used as initial centroids, or NULL; may point into
                                // labels (the rows are read before any label is written)
    float *         centroids;  // out [k][d]
    int32_t *       labels;     // out [n]
};

// Runs k-means; returns the number of updates (n_iter). Arguments must be valid (checked by
// the callers); the assignment is split over pool's threads when pool is not NULL (pool must
// have at most w->n_threads threads).
int32_t kmeans_cosine_run(const struct kmeans_args * a, struct kmeans_work * w,
                          struct threadpool * pool);

// The documented seeded init: a splitmix64 stream seeded with seed drives a partial
// Fisher-Yates shuffle of perm = 0..n-1; draw i (0-based) swaps perm[i] with perm[j],
// j = i + ((r >> 32) * (n - i) >> 32) for the next 64-bit output r. Afterwards perm[0..k) are
// k distinct rows. perm is [n].
void kmeans_init_rows(uint64_t seed, int32_t n, int32_t k, int32_t * perm);

// Rows (2i + 1) n / 2k for i < k: k distinct rows (k <= n) evenly spaced over 0..n-1.
void kmeans_strided_rows(int32_t n, int32_t k, int32_t * rows);

uint64_t kmeans_splitmix64(uint64_t * state);

// Budgeted selection (see ckv_cluster_select): walks clusters in descending score (ties:
// lowest index; NaN ranks as -inf) and takes each while the sizes taken so far are below
// budget. chosen [n] receives the order, heap [n] is scratch; returns the number taken.
// Arguments must be valid; O(n + taken * log n).
int32_t cluster_select(const float * scores, const int32_t * sizes, int32_t n, int64_t budget,
                       int32_t * chosen, uint64_t * heap);

// Read-only view of the ClusterKV policy's clusters for (layer il, KV head g), for tests
// (defined in kvpolicy-clusterkv.c). All zero / NULL for dense layers.
struct clusterkv_view {
    int32_t         n_clusters;
    int32_t         end;         // positions [n_sink, end) are clustered
    const float *   centroids;   // [n_clusters][head_dim]
    const int32_t * sizes;       // [n_clusters]
    const int32_t * offsets;     // [n_clusters] start of each cluster in positions
    const int32_t * positions;   // [end - n_sink] grouped by cluster
};
struct kv_policy;
void clusterkv_get_view(const struct kv_policy * p, int32_t il, int32_t g,
                        struct clusterkv_view * out);

// The k-means seed the policy uses for the span starting at `start` of (layer il, KV head g):
// distinct and reproducible per (seed, il, g, start).
uint64_t clusterkv_span_seed(uint32_t seed, int32_t il, int32_t g, int32_t start);

struct ckv_kv_policy_params;
// The initial centroid rows the policy (CPU and GPU alike) gives the k-means of that span of n
// keys, as params.kmeans_init says: rows[0..k) (rows is [n], the seeded draw's scratch).
void clusterkv_span_init_rows(const struct ckv_kv_policy_params * params, int32_t il, int32_t g,
                              int32_t start, int32_t n, int32_t k, int32_t * rows);

#if defined(CKV_HAVE_X86_KERNELS)
// AVX2 + FMA assignment of rows [row0, row1) (kmeans-avx2.c); same contract as the scalar
// assign in kmeans.c. Returns the number of labels that changed.
int64_t kmeans_assign_avx2(const float * x, int32_t d, int64_t row0, int64_t row1,
                           const float * cent_t, int32_t k, int32_t k_pad, int32_t * labels);
#endif

#endif  // CKV_KMEANS_H
