// bench-quants.c - GEMV throughput of the quantised dot kernels against memory bandwidth.
//
// Not a test (no asserts; not picked up by CMake's test-*.c glob). Build by hand, e.g.
//   gcc -O2 -std=c11 -D_GNU_SOURCE -DCKV_HAVE_X86_KERNELS -Inative/include -Inative/src
//       tests/native/bench-quants.c native/src/quants*.c native/src/error.c -lm -lpthread
// (with the ISA flags on the *-avx2.c / *-avx512.c objects, as CMake does), then run
//   ./a.out [threads]
// Workloads are SmolLM2-135M's: the 576 x 49152 q8_0 output head, one 576 x 1536 q4_1 matrix
// (hot in cache), and a 64 MiB stack of q4_1 576 x 1536 matrices (streams from DRAM, as a
// decode step does). Each line gives ms per GEMV and weight bytes per second, per ISA level,
// for vec_dot row by row and for vec_dot_rows; a plain read of the same bytes sets the ceiling.
#include "quants-impl.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct gemv;
static void gemv_pass(struct gemv * g);

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double) t.tv_sec + 1e-9 * (double) t.tv_nsec;
}

struct gemv {
    uint32_t        type;
    int64_t         n;        // row length
    int64_t         n_rows;   // rows per matrix
    int64_t         n_mats;   // matrices, back to back
    const uint8_t * w;
    const void *    xq;
    float *         out;
    bool            use_rows; // vec_dot_rows instead of vec_dot per row
    int             n_inner;  // passes per timed run, so thread start-up stays negligible
    int             ith, nth; // this thread's share of the rows
    double          sink;
};

static void * gemv_worker(void * arg) {
    struct gemv * g = arg;
    for (int k = 0; k < g->n_inner; k++) {
        gemv_pass(g);
    }
    return NULL;
}

static void gemv_pass(struct gemv * g) {
    const struct ggml_type_traits * t  = ggml_type_traits_get(g->type);
    const size_t                    rs = ggml_row_size(g->type, g->n);
    const int64_t                   total = g->n_rows * g->n_mats;
    const int64_t                   r0 = total * g->ith / g->nth, r1 = total * (g->ith + 1) / g->nth;
    if (g->use_rows) {
        for (int64_t r = r0; r < r1; r += 16) {
            const int64_t nr = r1 - r < 16 ? r1 - r : 16;
            t->vec_dot_rows(g->n, nr, g->w + (size_t) r * rs, rs, g->xq, g->out + r % g->n_rows);
        }
    } else {
        for (int64_t r = r0; r < r1; r++) {
            g->out[r % g->n_rows] = t->vec_dot(g->n, g->w + (size_t) r * rs, g->xq);
        }
    }
}

static void * read_worker(void * arg) {  // sums the weight bytes: the bandwidth ceiling
    struct gemv *    g  = arg;
    uint64_t         s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    const size_t     sz = ggml_row_size(g->type, g->n) * (size_t) (g->n_rows * g->n_mats);
    const uint64_t * p  = (const uint64_t *) g->w;
    const size_t     a  = sz / 8 * (size_t) g->ith / (size_t) g->nth;
    const size_t     b  = sz / 8 * (size_t) (g->ith + 1) / (size_t) g->nth;
    for (int k = 0; k < g->n_inner; k++) {
        for (size_t i = a; i + 4 <= b; i += 4) {
            s0 += p[i]; s1 += p[i + 1]; s2 += p[i + 2]; s3 += p[i + 3];
        }
    }
    g->sink = (double) (s0 + s1 + s2 + s3);
    return NULL;
}

// Best of reps runs, in seconds per GEMV pass over all matrices.
static double run(struct gemv * proto, int nth, void * (*fn)(void *), int reps) {
    double best = 1e30;
    for (int rep = 0; rep < reps; rep++) {
        pthread_t   th[16];
        struct gemv g[16];
        const double t0 = now_s();
        for (int i = 0; i < nth; i++) {
            g[i] = *proto;
            g[i].ith = i;
            g[i].nth = nth;
            pthread_create(&th[i], NULL, fn, &g[i]);
        }
        for (int i = 0; i < nth; i++) {
            pthread_join(th[i], NULL);
        }
        const double dt = (now_s() - t0) / proto->n_inner;
        best = dt < best ? dt : best;
    }
    return best;
}

static void bench(const char * label, uint32_t type, int64_t n, int64_t n_rows, int64_t n_mats,
                  int nth) {
    const struct ggml_type_traits * t     = ggml_type_traits_get(type);
    const size_t                    bytes = ggml_row_size(type, n) * (size_t) (n_rows * n_mats);
    uint8_t *                       w     = aligned_alloc(64, (bytes + 63) / 64 * 64);
    float *                         x     = malloc((size_t) n * sizeof(float));
    void *                          xq    = malloc(ggml_row_size(t->vec_dot_type, n));
    float *                         out   = malloc((size_t) n_rows * sizeof(float));
    for (size_t i = 0; i < bytes; i++) w[i] = (uint8_t) (i * 2654435761u >> 13);
    const size_t bs = t->type_size;  // make every block's fp16 scales small and finite
    for (size_t b = 0; b < bytes / bs; b++) memset(w + b * bs, 0x11, 4);
    for (int64_t i = 0; i < n; i++) x[i] = (float) ((i * 7) % 13) - 6.0f;
    quantize_row_act(t->vec_dot_type, x, xq, n);

    struct gemv g = {.type = type, .n = n, .n_rows = n_rows, .n_mats = n_mats, .w = w, .xq = xq,
                     .out = out, .n_inner = bytes < (8u << 20) ? (int) ((8u << 20) / bytes) : 1};
    const int    reps = n_mats > 1 ? 5 : 50;
    const double t_rd = run(&g, nth, read_worker, reps);
    printf("%-34s %2d thr  %7.1f MB  read %6.1f GB/s\n", label, nth, bytes / 1e6, bytes / t_rd / 1e9);
    for (int isa = QUANTS_ISA_SCALAR; isa <= quants_isa_best(); isa++) {
        quants_set_isa(isa);
        for (int rows = 0; rows < 2; rows++) {
            g.use_rows = rows;
            const double dt = run(&g, nth, gemv_worker, isa == 0 ? 2 : reps);
            printf("    isa %d %-9s  %8.3f ms/pass  %6.1f GB/s  (%.0f%% of read)\n", isa,
                   rows ? "rows" : "vec_dot", dt * 1e3, bytes / dt / 1e9, 100.0 * t_rd / dt);
        }
    }
    free(w); free(x); free(xq); free(out);
}

int main(int argc, char ** argv) {
    const int nth = argc > 1 ? atoi(argv[1]) : 1;
    quants_init();
    printf("cpu: %s\n", quants_cpu_features());
    bench("q8_0 576 x 49152 (output head)", GGML_TYPE_Q8_0, 576, 49152, 1, nth);
    bench("q4_1 576 x 1536 (hot)", GGML_TYPE_Q4_1, 576, 1536, 1, nth);
    bench("q4_1 576 x 1536 x 116 (64 MiB)", GGML_TYPE_Q4_1, 576, 1536, 116, nth);
    bench("q4_1 1536 x 576 (ffn_down, hot)", GGML_TYPE_Q4_1, 1536, 576, 1, nth);
    bench("q4_K 2048 x 2048 (hot)", GGML_TYPE_Q4_K, 2048, 2048, 1, nth);
    bench("q6_K 1024 x 8192", GGML_TYPE_Q6_K, 1024, 8192, 1, nth);
    bench("q5_0 896 x 4864", GGML_TYPE_Q5_0, 896, 4864, 1, nth);
    return 0;
}
