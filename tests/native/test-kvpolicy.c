// test-kvpolicy.c - attention and the quest policy against brute force on synthetic caches.
//   attention: ops_attention (prefill chunks with and without a window, decode steps) and
//              ops_attention_selected (random position lists, softmax weights) against a
//              double-precision softmax(q.K * scale).V, for GQA ratios 1, 3 and 4, f32 and f16
//              caches, head sizes 16 and 64;
//   quest:     the selected lists equal the lists built from page min/max bounds recomputed here
//              from the stored keys (sinks, the current page, pages by descending bound with the
//              last one cut), also after a truncate in the middle of a page.
// Prints "N passed, M failed".
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvpolicy.h"
#include "ops.h"
#include "quants.h"

#include "check.h"

static uint32_t rng_state = 12345;
static float frand(void) {  // uniform in [-1, 1)
    rng_state = rng_state * 1664525u + 1013904223u;
    return (float) (rng_state >> 8) / (float) (1u << 23) - 1.0f;
}

static float key_at(const struct kv_cache * kv, const void * rows, int64_t j, int32_t i) {
    if (kv->type == GGML_TYPE_F16) {
        return ckv_fp16_to_fp32(((const ckv_fp16 *) rows)[j * kv->head_dim + i]);
    }
    return ((const float *) rows)[j * kv->head_dim + i];
}

// Fills positions [pos0, pos0 + n) of layer il with random keys and values.
static void store_random(struct kv_cache * kv, int32_t il, int64_t pos0, int64_t n) {
    int64_t w = (int64_t) kv->n_head_kv * kv->head_dim;
    float * k = malloc(sizeof(float) * n * w), * v = malloc(sizeof(float) * n * w);
    for (int64_t i = 0; i < n * w; i++) {
        k[i] = 2.0f * frand();
        v[i] = frand();
    }
    kv_cache_store(kv, il, k, v, n, pos0);
    free(k);
    free(v);
}

// --- attention ---------------------------------------------------------------------------------

struct bench {
    struct kv_cache kv;
    struct compute  c;
    int32_t         n_head;
};

static void bench_init(struct bench * b, int32_t n_ctx, int32_t n_head, int32_t n_head_kv,
                       int32_t d, uint32_t type, int threads) {
    memset(b, 0, sizeof(*b));
    kv_cache_init(&b->kv, n_ctx, 2, n_head_kv, d, type);
    threadpool_create(threads, &b->c.pool);
    b->c.att_stride   = ops_attention_thread_floats(d, n_ctx);
    b->c.att_scores   = calloc((size_t) b->c.att_stride * threads, sizeof(float));
    b->c.att_partials = calloc((size_t) ops_attention_partial_floats(n_head, d), sizeof(float));
    b->n_head         = n_head;
}

static void bench_free(struct bench * b) {
    kv_cache_free(&b->kv);
    threadpool_free(b->c.pool);
    free(b->c.att_scores);
    free(b->c.att_partials);
}

// out[0..d) = softmax(scale q.K[list]) V[list] in double; w (may be NULL) gets the weights.
static void reference(const struct kv_cache * kv, int32_t il, int32_t kvh, const float * q,
                      const int32_t * list, int32_t n, float scale, double * out, double * w) {
    int32_t      d = kv->head_dim;
    const void * K = kv_cache_k(kv, il, kvh), * V = kv_cache_v(kv, il, kvh);
    double *     s = malloc(sizeof(double) * n), max = -INFINITY, sum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        s[i] = 0.0;
        for (int32_t j = 0; j < d; j++) {
            s[i] += (double) q[j] * key_at(kv, K, list[i], j);
        }
        s[i] *= scale;
        max = s[i] > max ? s[i] : max;
    }
    for (int32_t i = 0; i < n; i++) {
        s[i] = exp(s[i] - max);
        sum += s[i];
    }
    memset(out, 0, sizeof(double) * d);
    for (int32_t i = 0; i < n; i++) {
        for (int32_t j = 0; j < d; j++) {
            out[j] += s[i] / sum * key_at(kv, V, list[i], j);
        }
        if (w) {
            w[i] = s[i] / sum;
        }
    }
    free(s);
}

static double max_err(const float * got, const double * want, int32_t n) {
    double e = 0.0;
    for (int32_t i = 0; i < n; i++) {
        double di = fabs(got[i] - want[i]);
        e = di > e ? di : e;
    }
    return e;
}

static void test_dense(int32_t n_head, int32_t n_head_kv, int32_t d, uint32_t type, int32_t window,
                       int64_t pos0, int64_t n_tokens) {
    struct bench b;
    bench_init(&b, 1200, n_head, n_head_kv, d, type, 3);
    store_random(&b.kv, 1, 0, pos0 + n_tokens);
    int64_t q_dim = (int64_t) n_head * d;
    float * q = malloc(sizeof(float) * n_tokens * q_dim), * out = malloc(sizeof(float) * n_tokens * q_dim);
    for (int64_t i = 0; i < n_tokens * q_dim; i++) {
        q[i] = frand();
    }
    struct attention_params p = {1, n_head, n_head_kv, d, window, 1.0f / sqrtf((float) d)};
    ops_attention(&b.c, &b.kv, &p, q, out, n_tokens, pos0);
    int32_t * list = malloc(sizeof(int32_t) * (pos0 + n_tokens));
    double *  want = malloc(sizeof(double) * d), worst = 0.0;
    for (int64_t t = 0; t < n_tokens; t++) {
        int64_t hi = pos0 + t, lo = window > 0 && hi - window + 1 > 0 ? hi - window + 1 : 0;
        for (int64_t j = lo; j <= hi; j++) {
            list[j - lo] = (int32_t) j;
        }
        for (int32_t h = 0; h < n_head; h++) {
            reference(&b.kv, 1, h / (n_head / n_head_kv), q + (t * n_head + h) * d, list,
                      (int32_t) (hi - lo + 1), p.scale, want, NULL);
            double e = max_err(out + (t * n_head + h) * d, want, d);
            worst = e > worst ? e : worst;
        }
    }
    CHECK(worst < 2e-5, "dense attention heads %d/%d d %d type %u window %d pos0 %lld n %lld: "
          "max error %g", n_head, n_head_kv, d, type, window, (long long) pos0, (long long) n_tokens,
          worst);
    free(q);
    free(out);
    free(list);
    free(want);
    bench_free(&b);
}

// Random ascending lists (always holding pos) per head, with weights, against the reference; and
// the list of every position against the dense decode path, bit for bit.
static void test_selected(int32_t n_head, int32_t n_head_kv, int32_t d, uint32_t type, int64_t pos,
                          bool shared) {
    struct bench b;
    bench_init(&b, (int32_t) pos + 1, n_head, n_head_kv, d, type, 2);
    store_random(&b.kv, 0, 0, pos + 1);
    int64_t   stride = pos + 1;
    int32_t * n      = malloc(sizeof(int32_t) * n_head);
    int32_t * lists  = malloc(sizeof(int32_t) * n_head * stride);
    float *   q = malloc(sizeof(float) * n_head * d), * out = malloc(sizeof(float) * n_head * d);
    float *   w = malloc(sizeof(float) * n_head * stride), * dense = malloc(sizeof(float) * n_head * d);
    double *  want = malloc(sizeof(double) * d), * want_w = malloc(sizeof(double) * stride);
    for (int32_t i = 0; i < n_head * d; i++) {
        q[i] = frand();
    }
    int32_t g = n_head / n_head_kv;
    for (int32_t h = 0; h < n_head; h++) {
        if (shared && h % g) {  // the group's lists are equal: one task reads for all of them
            n[h] = n[h - h % g];
            memcpy(lists + h * stride, lists + (h - h % g) * stride, sizeof(int32_t) * n[h]);
            continue;
        }
        n[h] = 0;
        for (int64_t j = 0; j <= pos; j++) {
            if (j == pos || frand() > 0.2f * (float) (h % 4)) {
                lists[h * stride + n[h]++] = (int32_t) j;
            }
        }
    }
    struct attention_params p = {0, n_head, n_head_kv, d, 0, 1.0f / sqrtf((float) d)};
    ops_attention_selected(&b.c, &b.kv, &p, q, out, pos, n, lists, stride, w);
    double worst = 0.0, worst_w = 0.0;
    for (int32_t h = 0; h < n_head; h++) {
        reference(&b.kv, 0, h / (n_head / n_head_kv), q + h * d, lists + h * stride, n[h], p.scale,
                  want, want_w);
        double e = max_err(out + h * d, want, d), ew = max_err(w + h * stride, want_w, n[h]);
        worst   = e > worst ? e : worst;
        worst_w = ew > worst_w ? ew : worst_w;
    }
    CHECK(worst < 2e-5 && worst_w < 1e-6, "selected attention heads %d/%d d %d pos %lld: error %g, "
          "weights %g", n_head, n_head_kv, d, (long long) pos, worst, worst_w);
    for (int32_t h = 0; h < n_head; h++) {
        n[h] = (int32_t) pos + 1;
        for (int64_t j = 0; j <= pos; j++) {
            lists[h * stride + j] = (int32_t) j;
        }
    }
    ops_attention_selected(&b.c, &b.kv, &p, q, out, pos, n, lists, stride, NULL);
    ops_attention(&b.c, &b.kv, &p, q, dense, 1, pos);
    CHECK(memcmp(out, dense, sizeof(float) * n_head * d) == 0,
          "every position listed must equal dense attention bit for bit (pos %lld)", (long long) pos);
    free(n);
    free(lists);
    free(q);
    free(out);
    free(w);
    free(dense);
    free(want);
    free(want_w);
    bench_free(&b);
}

// --- quest ---------------------------------------------------------------------------------------

static const float * cmp_bounds;
static int by_bound(const void * a, const void * b) {  // descending bound, then lower page
    int32_t x = *(const int32_t *) a, y = *(const int32_t *) b;
    if (cmp_bounds[x] != cmp_bounds[y]) {
        return cmp_bounds[x] > cmp_bounds[y] ? -1 : 1;
    }
    return x < y ? -1 : 1;
}

static int by_pos(const void * a, const void * b) {
    return *(const int32_t *) a - *(const int32_t *) b;
}

// The list quest must produce for query q at pos, built from the cache's keys directly.
static int32_t quest_expected(const struct kv_cache * kv, int32_t il, int32_t kvh, const float * q,
                              int64_t pos, const struct ckv_kv_policy_params * kp, int32_t * out) {
    int32_t d = kv->head_dim, ps = kp->page_size, n = 0;
    int64_t sinks = pos + 1 < kp->n_sink ? pos + 1 : kp->n_sink, cur_start = pos / ps * ps;
    const void * K = kv_cache_k(kv, il, kvh);
    for (int64_t j = 0; j <= pos; j++) {
        if (j < sinks || j >= cur_start) {
            out[n++] = (int32_t) j;
        }
    }
    int32_t n_pages = (int32_t) (pos / ps), first = (int32_t) (sinks / ps), n_cand = 0;
    float *   bounds = calloc((size_t) n_pages + 1, sizeof(float));
    int32_t * order  = malloc(sizeof(int32_t) * ((size_t) n_pages + 1));
    for (int32_t pg = first; pg < n_pages; pg++) {
        float lane[8] = {0};  // quest's summation order: 8 interleaved partial sums
        for (int32_t i = 0; i < d; i++) {
            float mn = INFINITY, mx = -INFINITY;
            for (int64_t j = (int64_t) pg * ps; j < (int64_t) (pg + 1) * ps; j++) {
                float k = key_at(kv, K, j, i);
                mn = k < mn ? k : mn;
                mx = k > mx ? k : mx;
            }
            lane[i % 8] += q[i] * mn > q[i] * mx ? q[i] * mn : q[i] * mx;
        }
        for (int32_t l = 0; l < 8; l++) {
            bounds[pg] += lane[l];
        }
        order[n_cand++] = pg;
    }
    cmp_bounds = bounds;
    qsort(order, (size_t) n_cand, sizeof(int32_t), by_bound);
    int64_t room = kp->budget - n;
    for (int32_t i = 0; i < n_cand && room > 0; i++) {
        for (int64_t j = (int64_t) order[i] * ps; j < (int64_t) (order[i] + 1) * ps && room > 0; j++) {
            if (j >= sinks) {
                out[n++] = (int32_t) j;
                room--;
            }
        }
    }
    qsort(out, (size_t) n, sizeof(int32_t), by_pos);
    free(bounds);
    free(order);
    return n;
}

static void check_quest(struct kv_policy * p, struct kv_cache * kv, int64_t pos, const char * when) {
    int32_t n_head = p->n_head, cap = (int32_t) kv_policy_max_list(&p->params, p->kv->n_ctx);
    int32_t * n = malloc(sizeof(int32_t) * n_head), * lists = malloc(sizeof(int32_t) * n_head * cap);
    int32_t * want = malloc(sizeof(int32_t) * (pos + 1));
    float *   q = malloc(sizeof(float) * n_head * kv->head_dim);
    for (int trial = 0; trial < 4; trial++) {
        for (int32_t i = 0; i < n_head * kv->head_dim; i++) {
            q[i] = frand();
        }
        struct kv_selection sel = {n_head, cap, n, lists};
        kv_policy_select(p, 1, pos, q, &sel);
        for (int32_t h = 0; h < n_head; h++) {
            int32_t m = quest_expected(kv, 1, h / (n_head / p->n_head_kv), q + h * kv->head_dim, pos,
                                       &p->params, want);
            CHECK(m == n[h] && memcmp(want, lists + h * cap, sizeof(int32_t) * m) == 0,
                  "quest %s: head %d budget %d sink %d page %d pos %lld: %d positions, expected %d",
                  when, h, p->params.budget, p->params.n_sink, p->params.page_size, (long long) pos,
                  n[h], m);
        }
    }
    free(n);
    free(lists);
    free(want);
    free(q);
}

static void test_quest(uint32_t type, int32_t budget, int32_t n_sink, int32_t page_size) {
    struct kv_cache kv;
    struct threadpool * pool;
    kv_cache_init(&kv, 400, 2, 2, 16, type);
    threadpool_create(2, &pool);
    bool compressed[2] = {false, true};
    struct ckv_kv_policy_params kp;
    kv_policy_default_params(&kp);
    kp.policy    = CKV_KV_POLICY_QUEST;
    kp.budget    = budget;
    kp.n_sink    = n_sink;
    kp.page_size = page_size;
    struct kv_policy p;
    CHECK(kv_policy_init(&p, &kp, &kv, pool, 8, compressed) == CKV_OK, "quest init");
    store_random(&kv, 1, 0, 137);  // two chunks; the first ends inside a page
    kv_policy_on_store(&p, 1, 0, 137);
    store_random(&kv, 1, 137, 163);
    kv_policy_on_store(&p, 1, 137, 163);
    check_quest(&p, &kv, 299, "after prefill");
    kv_policy_truncate(&p, 250);
    for (int64_t j = 250; j < 300; j++) {  // decode-like: one position at a time
        store_random(&kv, 1, j, 1);
        kv_policy_on_store(&p, 1, j, 1);
    }
    check_quest(&p, &kv, 299, "after truncate");
    kv_policy_free(&p);
    threadpool_free(pool);
    kv_cache_free(&kv);
}

int main(void) {
    quants_init();
    for (int t = 0; t < 2; t++) {
        uint32_t type = t ? GGML_TYPE_F16 : GGML_TYPE_F32;
        test_dense(4, 4, 16, type, 0, 0, 37);       // prefill from 0, GQA 1
        test_dense(9, 3, 64, type, 0, 300, 70);     // prefill at depth, GQA 3
        test_dense(8, 2, 64, type, 50, 120, 33);    // sliding window, GQA 4
        test_dense(9, 3, 64, type, 0, 1000, 1);     // decode step, split over chunks
        test_dense(8, 2, 16, type, 100, 700, 1);    // decode step in a window
        test_selected(9, 3, 64, type, 900, false);
        test_selected(9, 3, 64, type, 900, true);
        test_selected(4, 1, 16, type, 40, false);
        test_selected(8, 2, 16, type, 300, true);
        test_quest(type, 100, 16, 16);
        test_quest(type, 64, 5, 16);                // sinks end inside a page; the last page cut
        test_quest(type, 41, 3, 7);
    }
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
