// test-clusterkv.c - the ClusterKV policy driven through its vtable on a synthetic KV cache
// (random key-like rows), independently of the forward pass:
//   - k-means: every ISA level and a 2-thread pool give the scalar single-thread labels;
//   - cluster counts: ceil((L - n_sink) / tokens_per_cluster) after the prompt, + ceil(interval
//     / tokens_per_cluster) per recluster_interval decoded positions, back after truncate;
//   - CSR: positions are a permutation of the clustered span, members lie in their span and sit
//     at their highest-cosine centroid of that span; converged centroids are member means;
//   - every list: ascending, distinct, <= pos, sinks + middle <= budget, the tail (on top of the
//     budget, < recluster_interval + 1) last, sinks first, and the
//     middle equal to a brute-force recomputation (scores in f64 against the policy's
//     centroids, exact descending order, whole clusters, the last one cut);
//   - select_per_kv_head: one list per group, ranked by the summed query;
//   - budget >= context: the list is exactly 0..pos; invalid parameters are refused.
// f32 and f16 caches. Prints "N passed, M failed".
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kmeans.h"
#include "kvpolicy.h"
#include "quants-impl.h"

#include "check.h"

static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;
static int64_t  g_lists, g_near_ties;  // lists checked against brute force; near-tie cuts

static uint64_t rng_u64(void) {  // xorshift64*
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

static float rng_normal(void) {  // sum of uniforms: cheap, roughly normal
    float s = 0.0f;
    for (int i = 0; i < 4; i++) {
        s += (float) (rng_u64() >> 40) / (float) (1 << 24);
    }
    return (s - 2.0f) * 1.7f;
}

// Key-like rows: a shared offset, three outlier channels, noise.
static void fill_keys(float * x, int64_t n, int32_t d, const float * offset) {
    for (int64_t i = 0; i < n; i++) {
        for (int32_t t = 0; t < d; t++) {
            x[i * d + t] = offset[t] + rng_normal() * (t < 3 ? 6.0f : 1.0f);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// k-means across ISA levels and threads
// ---------------------------------------------------------------------------------------------

static void test_kmeans_isa_and_threads(void) {
    enum { N = 2000, D = 64, K = 37 };
    float *   x      = malloc(sizeof(float) * N * D);
    float     offset[D];
    for (int t = 0; t < D; t++) {
        offset[t] = rng_normal();
    }
    fill_keys(x, N, D, offset);
    float *   ref_c  = malloc(sizeof(float) * K * D);
    float *   c      = malloc(sizeof(float) * K * D);
    int32_t * ref_l  = malloc(sizeof(int32_t) * N);
    int32_t * l      = malloc(sizeof(int32_t) * N);
    struct threadpool * pool = NULL;
    CHECK(threadpool_create(2, &pool) == CKV_OK, "threadpool_create");
    struct kmeans_work w;
    CHECK(kmeans_work_init(&w, N, K, D, 2) == CKV_OK, "kmeans_work_init");
    struct kmeans_args a = {.x = x, .n = N, .d = D, .k = K, .max_iter = 20, .seed = 99,
                            .centroids = ref_c, .labels = ref_l};
    quants_set_isa(QUANTS_ISA_SCALAR);
    int32_t ref_it = kmeans_cosine_run(&a, &w, NULL);
    for (int isa = QUANTS_ISA_SCALAR; isa <= quants_isa_best(); isa++) {
        for (int threaded = 0; threaded < 2; threaded++) {
            quants_set_isa(isa);
            a.centroids = c;
            a.labels    = l;
            int32_t it  = kmeans_cosine_run(&a, &w, threaded ? pool : NULL);
            int     n_diff = 0;
            float   max_err = 0.0f;
            for (int i = 0; i < N; i++) {
                n_diff += l[i] != ref_l[i];
            }
            for (int i = 0; i < K * D; i++) {
                max_err = fmaxf(max_err, fabsf(c[i] - ref_c[i]) / (1.0f + fabsf(ref_c[i])));
            }
            CHECK(n_diff == 0 && it == ref_it && max_err < 1e-5f,
                  "isa %d threaded %d: %d labels differ, n_iter %d vs %d, centroid err %g", isa,
                  threaded, n_diff, it, ref_it, max_err);
        }
    }
    quants_set_isa(quants_isa_best());
    kmeans_work_free(&w);
    threadpool_free(pool);
    free(x); free(ref_c); free(c); free(ref_l); free(l);
}

// ---------------------------------------------------------------------------------------------
// The policy on a synthetic cache
// ---------------------------------------------------------------------------------------------

enum { N_LAYER = 3, N_HEAD_KV = 2, N_HEAD = 6, HEAD_DIM = 64, N_CTX = 1024 };
static const bool compressed[N_LAYER] = {false, true, true};

struct fixture {
    struct kv_cache     kv;
    struct kv_policy    p;
    struct threadpool * pool;
    struct kv_selection sel;
    float               offset[N_LAYER][N_HEAD_KV * HEAD_DIM];
    float *             q;   // [N_HEAD][HEAD_DIM]
};

static struct ckv_kv_policy_params base_params(void) {
    struct ckv_kv_policy_params kp;
    memset(&kp, 0, sizeof(kp));
    kp.policy             = CKV_KV_POLICY_CLUSTERKV;
    kp.budget             = 300;
    kp.n_sink             = 16;
    kp.n_dense_layers     = 1;
    kp.recluster_interval = 100;
    kp.tokens_per_cluster = 25;
    kp.kmeans_iters       = 20;
    kp.seed               = 7;
    return kp;
}

static int32_t fixture_init(struct fixture * f, const struct ckv_kv_policy_params * kp,
                            uint32_t kv_type, int n_threads) {
    memset(f, 0, sizeof(*f));
    if (kv_cache_init(&f->kv, N_CTX, N_LAYER, N_HEAD_KV, HEAD_DIM, kv_type) != CKV_OK ||
        threadpool_create(n_threads, &f->pool) != CKV_OK) {
        return CKV_ERR_OOM;
    }
    f->p.params           = *kp;
    f->p.kv               = &f->kv;
    f->p.pool             = f->pool;
    f->p.n_layer          = N_LAYER;
    f->p.n_head           = N_HEAD;
    f->p.n_head_kv        = N_HEAD_KV;
    f->p.head_dim         = HEAD_DIM;
    f->p.layer_compressed = compressed;
    f->sel.n_head         = N_HEAD;
    f->sel.cap            = (int32_t) kv_policy_max_list(kp, N_CTX);
    f->sel.n              = calloc(N_HEAD, sizeof(int32_t));
    f->sel.pos            = calloc((size_t) N_HEAD * f->sel.cap, sizeof(int32_t));
    f->q                  = malloc(sizeof(float) * N_HEAD * HEAD_DIM);
    for (int il = 0; il < N_LAYER; il++) {
        for (int t = 0; t < N_HEAD_KV * HEAD_DIM; t++) {
            f->offset[il][t] = rng_normal();
        }
    }
    return kv_policy_init_clusterkv(&f->p);
}

static void fixture_free(struct fixture * f) {
    if (f->p.vt) {
        f->p.vt->free_state(&f->p);
    }
    kv_cache_free(&f->kv);
    threadpool_free(f->pool);
    free(f->sel.n);
    free(f->sel.pos);
    free(f->q);
}

// Stores random key/value rows at positions [pos0, pos0 + n) in every layer.
static void store_tokens(struct fixture * f, int64_t pos0, int64_t n) {
    const int32_t row = N_HEAD_KV * HEAD_DIM;
    float *       k   = malloc(sizeof(float) * n * row);
    float *       v   = malloc(sizeof(float) * n * row);
    for (int il = 0; il < N_LAYER; il++) {
        for (int64_t i = 0; i < n; i++) {
            fill_keys(k + i * row, 1, row, f->offset[il]);
            fill_keys(v + i * row, 1, row, f->offset[il]);
        }
        kv_cache_store(&f->kv, il, k, v, n, pos0);
    }
    free(k);
    free(v);
}

static void key_row(const struct kv_cache * kv, int32_t il, int32_t g, int32_t pos, float * out) {
    const char * base = (const char *) kv_cache_k(kv, il, g) + (size_t) pos * HEAD_DIM * kv->elt_size;
    if (kv->elt_size == sizeof(float)) {
        memcpy(out, base, sizeof(float) * HEAD_DIM);
    } else {
        ckv_fp16_to_fp32_row((const ckv_fp16 *) base, out, HEAD_DIM);
    }
}

static double cosine(const float * a, const float * b) {
    double ab = 0, aa = 0, bb = 0;
    for (int t = 0; t < HEAD_DIM; t++) {
        ab += (double) a[t] * b[t];
        aa += (double) a[t] * a[t];
        bb += (double) b[t] * b[t];
    }
    return aa > 0 && bb > 0 ? ab / sqrt(aa * bb) : 0.0;
}

// A span the test expects: positions [start, end) in clusters [c0, c0 + k).
struct span {
    int32_t start, end, c0, k;
};

static void check_csr(struct fixture * f, int32_t il, const struct span * spans, int n_spans,
                      bool converged) {
    const int32_t n_sink = f->p.params.n_sink;
    for (int32_t g = 0; g < N_HEAD_KV; g++) {
        struct clusterkv_view v;
        clusterkv_get_view(&f->p, il, g, &v);
        const struct span * last = &spans[n_spans - 1];
        CHECK(v.n_clusters == last->c0 + last->k && v.end == last->end,
              "layer %d head %d: %d clusters ending at %d, expected %d ending at %d", il, g,
              v.n_clusters, v.end, last->c0 + last->k, last->end);
        char *  seen      = calloc((size_t) N_CTX, 1);
        int     bad_place = 0, bad_span = 0, bad_mean = 0, dup = 0, bad_off = 0;
        float   key[HEAD_DIM];
        for (int s = 0; s < n_spans; s++) {
            for (int32_t c = spans[s].c0; c < spans[s].c0 + spans[s].k; c++) {
                bad_off += c > 0 && v.offsets[c] != v.offsets[c - 1] + v.sizes[c - 1];
                double mean[HEAD_DIM] = {0};
                for (int32_t j = 0; j < v.sizes[c]; j++) {
                    int32_t p = v.positions[v.offsets[c] + j];
                    bad_span += p < spans[s].start || p >= spans[s].end;
                    dup += seen[p]++ != 0;
                    key_row(&f->kv, il, g, p, key);
                    for (int t = 0; t < HEAD_DIM; t++) {
                        mean[t] += key[t] / (double) v.sizes[c];
                    }
                    double own = cosine(key, v.centroids + (size_t) c * HEAD_DIM), best = own;
                    for (int32_t o = spans[s].c0; o < spans[s].c0 + spans[s].k; o++) {
                        best = fmax(best, cosine(key, v.centroids + (size_t) o * HEAD_DIM));
                    }
                    bad_place += own < best - 1e-5;
                }
                for (int t = 0; converged && v.sizes[c] > 0 && t < HEAD_DIM; t++) {
                    float mu = v.centroids[(size_t) c * HEAD_DIM + t];
                    bad_mean += fabs(mu - mean[t]) > 1e-4 * (1 + fabs(mean[t]));
                }
            }
        }
        int missing = 0;
        for (int32_t p = n_sink; p < v.end; p++) {
            missing += !seen[p];
        }
        CHECK(!bad_place && !bad_span && !bad_mean && !dup && !missing && !bad_off,
              "layer %d head %d CSR: %d misplaced, %d outside their span, %d centroid channels "
              "off the mean, %d duplicates, %d missing, %d bad offsets", il, g, bad_place,
              bad_span, bad_mean, dup, missing, bad_off);
        free(seen);
    }
}

// The middle of the list recomputed by brute force: f64 scores of q against the policy's
// centroids, exact order (ties: lowest index), whole clusters until room, the last one cut.
// Sets *near_tie when the cut falls between clusters whose f64 scores differ by less than the
// policy's f32 rounding can: either order is then right, and the caller does not compare.
static int32_t expected_middle(const struct clusterkv_view * v, const float * q, int32_t room,
                               int32_t n_sink, char * mark, bool * near_tie) {
    double *  s     = malloc(sizeof(double) * (v->n_clusters + 1));
    int32_t * order = malloc(sizeof(int32_t) * (v->n_clusters + 1));
    for (int32_t c = 0; c < v->n_clusters; c++) {
        s[c] = 0;
        for (int t = 0; t < HEAD_DIM; t++) {
            s[c] += (double) q[t] * v->centroids[(size_t) c * HEAD_DIM + t];
        }
        order[c] = c;
    }
    for (int32_t i = 1; i < v->n_clusters; i++) {  // insertion sort: descending, stable
        for (int32_t j = i; j > 0 && s[order[j]] > s[order[j - 1]]; j--) {
            int32_t tmp = order[j]; order[j] = order[j - 1]; order[j - 1] = tmp;
        }
    }
    int32_t n = 0;
    if (room >= v->end - n_sink) {
        for (int32_t p = n_sink; p < v->end; p++) {
            mark[p] = 1;
            n++;
        }
        room = 0;
    }
    int32_t last = -1;  // order index of the last cluster taken (maybe cut)
    for (int32_t i = 0; i < v->n_clusters && room > n; i++) {
        int32_t c = order[i];
        for (int32_t j = 0; j < v->sizes[c] && n < room; j++) {
            mark[v->positions[v->offsets[c] + j]] = 1;
            n++;
        }
        last = i;
    }
    *near_tie = false;
    for (int32_t i = last - 1; last >= 0 && i <= last; i++) {  // pairs (last-1, last), (last, last+1)
        if (i >= 0 && i + 1 < v->n_clusters) {
            double a = s[order[i]], b = s[order[i + 1]];
            *near_tie |= fabs(a - b) <= 1e-5 * (fabs(a) + fabs(b)) + 1e-6;
        }
    }
    free(s);
    free(order);
    return n;
}

static void check_lists(struct fixture * f, int32_t il, int64_t pos) {
    const struct ckv_kv_policy_params * kp    = &f->p.params;
    const int32_t                       group = N_HEAD / N_HEAD_KV;
    char * mark = malloc(N_CTX);
    for (int32_t h = 0; h < N_HEAD; h++) {
        const int32_t * list = f->sel.pos + (size_t) h * f->sel.cap;
        const int32_t   n    = f->sel.n[h];
        struct clusterkv_view v;
        clusterkv_get_view(&f->p, il, h / group, &v);
        int32_t sinks = pos + 1 < kp->n_sink ? (int32_t) pos + 1 : kp->n_sink;
        int32_t tail  = pos + 1 > v.end ? (int32_t) pos + 1 - v.end : 0;
        int     bad   = n - tail > kp->budget || n < sinks + tail ||
                      tail > kp->recluster_interval;  // the tail comes on top of the budget
        for (int32_t i = 0; !bad && i < n; i++) {
            bad |= list[i] < 0 || list[i] > pos || (i > 0 && list[i] <= list[i - 1]);
            bad |= i < sinks && list[i] != i;
            bad |= i >= n - tail && list[i] != v.end + (i - (n - tail));
        }
        CHECK(!bad, "layer %d head %d pos %lld: list of %d is not sinks + ascending middle + "
              "(budget %d) + tail", il, h, (long long) pos, n, kp->budget);
        float q_eff[HEAD_DIM];
        for (int t = 0; t < HEAD_DIM; t++) {
            q_eff[t] = f->q[h * HEAD_DIM + t];
            if (kp->select_per_kv_head) {
                q_eff[t] = 0;
                for (int32_t o = h / group * group; o < (h / group + 1) * group; o++) {
                    q_eff[t] += f->q[o * HEAD_DIM + t];
                }
            }
        }
        memset(mark, 0, N_CTX);
        int32_t room   = kp->budget - sinks;
        bool    near_tie;
        int32_t n_mid  = expected_middle(&v, q_eff, room, kp->n_sink, mark, &near_tie);
        int     differ = n_mid != n - sinks - tail;
        g_near_ties += near_tie;
        g_lists++;
        for (int32_t i = sinks; !bad && !differ && i < n - tail; i++) {
            differ |= !mark[list[i]];
        }
        CHECK(!differ || near_tie, "layer %d head %d pos %lld: selected clusters differ from brute force "
              "(%d expected, %d got)", il, h, (long long) pos, n_mid, n - sinks - tail);
    }
    free(mark);
}

static void decode_step(struct fixture * f, int64_t pos) {
    store_tokens(f, pos, 1);
    for (int32_t il = 0; il < N_LAYER; il++) {
        if (!compressed[il]) {
            continue;
        }
        for (int i = 0; i < N_HEAD * HEAD_DIM; i++) {
            f->q[i] = rng_normal();
        }
        f->p.vt->select(&f->p, il, pos, f->q, &f->sel);
        check_lists(f, il, pos);
    }
}

static int32_t n_clusters(struct fixture * f, int32_t il) {
    return f->p.vt->n_clusters(&f->p, il, 0);
}

static void run_policy(uint32_t kv_type, int per_kv_head, int n_threads, int iters) {
    struct ckv_kv_policy_params kp = base_params();
    kp.select_per_kv_head          = per_kv_head;
    kp.kmeans_iters                = iters;
    struct fixture f;
    CHECK(fixture_init(&f, &kp, kv_type, n_threads) == CKV_OK, "init: %s", ckv_last_error());
    const int32_t L = 600, tpc = kp.tokens_per_cluster, m = kp.recluster_interval;
    store_tokens(&f, 0, L);
    struct span spans[8];
    int         n_spans = 0;
    for (int64_t pos = L; pos <= 900; pos++) {
        decode_step(&f, pos);
        // the span [end, pos) is clustered once it holds recluster_interval positions
        int32_t end = n_spans ? spans[n_spans - 1].end : kp.n_sink;
        if (pos - end >= m) {
            int32_t c0 = n_spans ? spans[n_spans - 1].c0 + spans[n_spans - 1].k : 0;
            spans[n_spans++] = (struct span) {end, (int32_t) pos, c0, (int32_t) (pos - end + tpc - 1) / tpc};
            for (int32_t il = 1; il < N_LAYER; il++) {
                check_csr(&f, il, spans, n_spans, iters >= 1000);
            }
        }
    }
    CHECK(n_spans == 4 && spans[0].k == 24 && spans[1].k == 4 && spans[3].end == 900,
          "spans: %d, prompt clusters %d", n_spans, spans[0].k);
    CHECK(n_clusters(&f, 1) == 24 + 3 * 4 && n_clusters(&f, 2) == 36 && n_clusters(&f, 0) == 0,
          "cluster counts %d %d %d, expected 0 36 36", n_clusters(&f, 0), n_clusters(&f, 1),
          n_clusters(&f, 2));
    CHECK(f.p.stats.t_cluster_ms > 0 && f.p.stats.t_select_ms > 0, "stats not timed");
    // truncating into the third span keeps the first two; the tail then re-grows to a span
    f.p.vt->truncate(&f.p, 750);
    CHECK(n_clusters(&f, 1) == 28, "after truncate(750): %d clusters, expected 28", n_clusters(&f, 1));
    n_spans = 2;
    for (int64_t pos = 750; pos <= 800; pos++) {
        decode_step(&f, pos);
    }
    spans[n_spans++] = (struct span) {700, 800, 28, 4};
    check_csr(&f, 2, spans, n_spans, iters >= 1000);
    f.p.vt->truncate(&f.p, 0);
    CHECK(n_clusters(&f, 1) == 0, "after truncate(0): %d clusters", n_clusters(&f, 1));
    store_tokens(&f, 0, 10);
    decode_step(&f, 10);   // shorter than the sinks: everything is a sink
    CHECK(f.sel.n[0] == 11, "pos 10: %d positions, expected 11", f.sel.n[0]);
    fixture_free(&f);
}

static void test_budget_covers_context(void) {
    struct ckv_kv_policy_params kp = base_params();
    kp.budget                      = N_CTX;
    struct fixture f;
    CHECK(fixture_init(&f, &kp, GGML_TYPE_F16, 2) == CKV_OK, "init: %s", ckv_last_error());
    store_tokens(&f, 0, 500);
    for (int64_t pos = 500; pos < 700; pos += 1) {
        decode_step(&f, pos);
        int bad = 0;
        for (int32_t h = 0; h < N_HEAD; h++) {
            bad |= f.sel.n[h] != pos + 1;
            for (int32_t i = 0; !bad && i <= pos; i++) {
                bad |= f.sel.pos[(size_t) h * f.sel.cap + i] != i;
            }
        }
        CHECK(!bad, "budget >= context: pos %lld list is not 0..pos", (long long) pos);
    }
    CHECK(n_clusters(&f, 1) > 0, "clusters still built with a large budget");
    fixture_free(&f);
}

// kmeans_init = strided: the prompt span's centroids are k-means run from the keys at
// (2i + 1) n / 2k (written out here, not taken from kmeans.c), and differ from the seeded ones.
static void test_strided_init(void) {
    struct ckv_kv_policy_params kp = base_params();
    kp.kmeans_init                 = CKV_KMEANS_INIT_STRIDED;
    struct fixture f;
    CHECK(fixture_init(&f, &kp, GGML_TYPE_F16, 2) == CKV_OK, "init: %s", ckv_last_error());
    const int32_t L = 600, start = kp.n_sink, n = L - start, k = (n + kp.tokens_per_cluster - 1) / kp.tokens_per_cluster;
    store_tokens(&f, 0, L);
    decode_step(&f, L);   // clusters the prompt
    float *   x    = malloc(sizeof(float) * n * HEAD_DIM);
    float *   c    = malloc(sizeof(float) * k * HEAD_DIM);
    float *   c_rnd = malloc(sizeof(float) * k * HEAD_DIM);
    int32_t * lab  = malloc(sizeof(int32_t) * n);
    int32_t * rows = malloc(sizeof(int32_t) * k);
    for (int32_t i = 0; i < k; i++) rows[i] = (int32_t) ((2 * i + 1) * (int64_t) n / (2 * k));
    struct kmeans_work w;
    CHECK(kmeans_work_init(&w, n, k, HEAD_DIM, 1) == CKV_OK, "kmeans_work_init");
    const int32_t il = 1;
    for (int32_t g = 0; g < N_HEAD_KV; g++) {
        for (int32_t i = 0; i < n; i++) key_row(&f.kv, il, g, start + i, x + (size_t) i * HEAD_DIM);
        struct kmeans_args a = {.x = x, .n = n, .d = HEAD_DIM, .k = k, .max_iter = kp.kmeans_iters,
                                .init_rows = rows, .centroids = c, .labels = lab};
        kmeans_cosine_run(&a, &w, NULL);
        a.init_rows = NULL;
        a.seed      = clusterkv_span_seed(kp.seed, il, g, start);
        a.centroids = c_rnd;
        kmeans_cosine_run(&a, &w, NULL);
        struct clusterkv_view v;
        clusterkv_get_view(&f.p, il, g, &v);
        CHECK(v.n_clusters == k && !memcmp(v.centroids, c, sizeof(float) * k * HEAD_DIM) &&
              memcmp(c, c_rnd, sizeof(float) * k * HEAD_DIM) != 0,
              "strided init, layer %d head %d: %d clusters (expected %d), centroids %s the strided run's, "
              "%s the seeded run's", il, g, v.n_clusters, k,
              memcmp(v.centroids, c, sizeof(float) * k * HEAD_DIM) ? "differ from" : "equal",
              memcmp(c, c_rnd, sizeof(float) * k * HEAD_DIM) ? "unlike" : "equal to");
    }
    kmeans_work_free(&w);
    free(x); free(c); free(c_rnd); free(lab); free(rows);
    fixture_free(&f);
}

static void test_invalid_params(void) {
    const char * fields[] = {"budget (15)", "tokens_per_cluster", "kmeans_iters",
                             "select_per_kv_head", "kmeans_init"};
    for (int i = 0; i < 5; i++) {
        struct ckv_kv_policy_params kp = base_params();
        if (i == 0) kp.budget = 15;               // < n_sink 16 + 1
        if (i == 1) kp.tokens_per_cluster = 0;
        if (i == 2) kp.kmeans_iters = 0;
        if (i == 3) kp.select_per_kv_head = 2;
        if (i == 4) kp.kmeans_init = 2;
        struct fixture f;
        int32_t        st = fixture_init(&f, &kp, GGML_TYPE_F32, 1);
        CHECK(st == CKV_ERR_INVALID_ARG && strstr(ckv_last_error(), fields[i]),
              "invalid %s: status %d, message '%s'", fields[i], st, ckv_last_error());
        fixture_free(&f);
    }
}

int main(void) {
    quants_init();
    test_kmeans_isa_and_threads();
    run_policy(GGML_TYPE_F32, 0, 1, 20);
    run_policy(GGML_TYPE_F16, 0, 2, 20);
    run_policy(GGML_TYPE_F16, 1, 2, 20);
    run_policy(GGML_TYPE_F32, 0, 2, 1000);   // converged: centroids are member means
    test_budget_covers_context();
    test_strided_init();
    test_invalid_params();
    CHECK(g_near_ties * 100 <= g_lists, "near-tie cuts are rare: %lld of %lld lists",
          (long long) g_near_ties, (long long) g_lists);
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail != 0;
}
