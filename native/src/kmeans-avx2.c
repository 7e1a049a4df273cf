// kmeans-avx2.c - the k-means assignment step with AVX2 + FMA: for each row, the index of the
// normalised centroid with the largest dot product (see kmeans.h for the algorithm).
//
// A small register-blocked GEMM fused with a running argmax: 4 rows x 16 centroids of
// accumulators (8 ymm) are filled over the d dimensions from the transposed centroid table
// cent_t[d][k_pad] (two loads and four broadcasts per 8 FMAs; the last tile is 8 wide when at
// most 8 centroids remain), then folded into a per-row best (value, index) pair of vectors. The n x k score matrix never exists. Within a lane the
// candidates arrive in increasing index and replace the best only when strictly larger, and the
// final lane reduction takes the lowest index among equal maxima: ties go to the lowest index,
// as in the scalar path. Built with -mavx2 -mfma (CMake, *-avx2.c) and only called when
// quants.c has selected the AVX2 level.
#include "kmeans.h"

#if defined(CKV_HAVE_X86_KERNELS)

#include <immintrin.h>
#include <math.h>

enum { ROWS = 4 };

// Lane-wise best over 8 candidates (values v, indices i): folds into (best_v, best_i).
static inline void fold_best(__m256 v, __m256i i, __m256 * best_v, __m256i * best_i) {
    __m256 gt = _mm256_cmp_ps(v, *best_v, _CMP_GT_OQ);
    *best_v   = _mm256_blendv_ps(*best_v, v, gt);
    *best_i   = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(*best_i), _mm256_castsi256_ps(i), gt));
}

// Largest lane value; among equal maxima the lowest index.
static inline int32_t reduce_best(__m256 best_v, __m256i best_i) {
    float   v[8];
    int32_t idx[8];
    _mm256_storeu_ps(v, best_v);
    _mm256_storeu_si256((__m256i *) idx, best_i);
    float   bv = v[0];
    int32_t bi = idx[0];
    for (int l = 1; l < 8; l++) {
        if (v[l] > bv || (v[l] == bv && idx[l] < bi)) {
            bv = v[l];
            bi = idx[l];
        }
    }
    return bi;
}

// Scores n_rows rows (<= ROWS) against the n_vec * 8 centroids from j0 and folds them into
// the rows' running best. n_rows and n_vec are compile-time constants after inlining.
static inline __attribute__((always_inline)) void score_tile(
        const float * restrict x, int32_t d, int n_rows, const float * restrict cent_t,
        int32_t j0, int n_vec, int32_t k, int32_t k_pad, __m256 * best_v, __m256i * best_i) {
    __m256 acc[ROWS][2];
    for (int r = 0; r < n_rows; r++) {
        for (int v = 0; v < n_vec; v++) {
            acc[r][v] = _mm256_setzero_ps();
        }
    }
    const float * c = cent_t + j0;
    for (int32_t t = 0; t < d; t++) {
        __m256 cv[2];
        for (int v = 0; v < n_vec; v++) {
            cv[v] = _mm256_loadu_ps(c + (size_t) t * k_pad + 8 * v);
        }
        for (int r = 0; r < n_rows; r++) {
            const __m256 xb = _mm256_broadcast_ss(x + (size_t) r * d + t);
            for (int v = 0; v < n_vec; v++) {
                acc[r][v] = _mm256_fmadd_ps(xb, cv[v], acc[r][v]);
            }
        }
    }
    const __m256i lane   = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256  neginf = _mm256_set1_ps(-INFINITY);
    for (int v = 0; v < n_vec; v++) {
        const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(j0 + 8 * v), lane);
        // Padding lanes (index >= k) score -inf, so they never win.
        const __m256  ok  = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(k), idx));
        for (int r = 0; r < n_rows; r++) {
            fold_best(_mm256_blendv_ps(neginf, acc[r][v], ok), idx, &best_v[r], &best_i[r]);
        }
    }
}

// Labels of n_rows (<= ROWS, a compile-time constant after inlining) rows starting at x:
// 16-wide centroid tiles, and an 8-wide one when at most 8 centroids remain.
static inline __attribute__((always_inline)) void assign_rows(
        const float * restrict x, int32_t d, int n_rows, const float * restrict cent_t,
        int32_t k, int32_t k_pad, int32_t * best_out) {
    __m256  best_v[ROWS];
    __m256i best_i[ROWS];
    for (int r = 0; r < n_rows; r++) {
        best_v[r] = _mm256_set1_ps(-INFINITY);
        best_i[r] = _mm256_setzero_si256();
    }
    int32_t j0 = 0;
    for (; j0 + 8 < k; j0 += KMEANS_K_TILE) {
        score_tile(x, d, n_rows, cent_t, j0, 2, k, k_pad, best_v, best_i);
    }
    if (j0 < k) {
        score_tile(x, d, n_rows, cent_t, j0, 1, k, k_pad, best_v, best_i);
    }
    for (int r = 0; r < n_rows; r++) {
        best_out[r] = reduce_best(best_v[r], best_i[r]);
    }
}

int64_t kmeans_assign_avx2(const float * x, int32_t d, int64_t row0, int64_t row1,
                           const float * cent_t, int32_t k, int32_t k_pad, int32_t * labels) {
    int64_t changed = 0;
    int32_t best[ROWS];
    int64_t i       = row0;
    for (; i + ROWS <= row1; i += ROWS) {
        assign_rows(x + (size_t) i * d, d, ROWS, cent_t, k, k_pad, best);
        for (int r = 0; r < ROWS; r++) {
            changed += labels[i + r] != best[r];
            labels[i + r] = best[r];
        }
    }
    for (; i < row1; i++) {
        assign_rows(x + (size_t) i * d, d, 1, cent_t, k, k_pad, best);
        changed += labels[i] != best[0];
        labels[i] = best[0];
    }
    return changed;
}

#endif  // CKV_HAVE_X86_KERNELS
