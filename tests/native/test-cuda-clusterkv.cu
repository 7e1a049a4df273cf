// test-cuda-clusterkv.cu - the ClusterKV GPU kernels (clusterkv-ops.cuh) against their CPU twins
// (issue 6). Exit 0 = all pass, 1 = a mismatch, 77 = skipped (no CUDA device).
// `test-cuda-clusterkv --bench` also times the kernels at the 8B shape (32k keys, 8 KV heads).
//
// What is compared, and the bounds:
//   k-means, separated data      labels, n_iter and the CSR identical to ckv_kmeans_cosine +
//                                a stable counting sort; centroids rel 1e-6 (the update sums in
//                                f64 in the CPU's order, so identical labels give identical
//                                means: the bound only absorbs an FMA contraction)
//   k-means, structured keys     >= 99.9% identical labels (the assignment's f32 dot products
//                                sum in another order: a row whose two best cosines are within
//                                an ulp may flip, and a flip moves two means), centroids rel 1e-4
//   policy twin                  the CPU ClusterKV policy (kv_policy_select on an f16 cache) vs
//                                GPU k-means + GPU selection from the same seeds: CSR identical,
//                                position lists identical (given the room the CPU's budget rule
//                                leaves), both selection modes
//   selection, exact scores      integer centroids and queries make every dot product exact, so
//                                scores tie often and must tie identically: lists, chosen order
//                                and counts identical to cluster_select + the policy's emission,
//                                for 1, 2, 257, 1000 and 5000 clusters
//   selection, float scores      scores rel 1e-5 vs f64 (f32 sums of d products); chosen identical to cluster_select run
//                                on the GPU's own scores
//   quest / streaming twins      the CPU policies (on_store + kv_policy_select on an f16 cache)
//                                vs GPU page bounds + selection with the position in device
//                                memory: lists identical (quest's bounds sum in the CPU's order)
//   kv fetch (offload)           rows in the slots identical to the host rows listed, copies
//                                = listed positions without a slot, maps consistent, forget
//   sparse attention, offload    some rows from slots, the rest from mapped host memory: bit-
//                                equal to reading the cache (both kernels)
//   sparse attention vs f64      rel 1e-4 (f32 online softmax), lists of 1 .. 4000 positions,
//                                tile remainders, split-K, GQA 1/4/7, head_dim 64/128/256
//   all positions listed         equal to ckv_cuda_attention (dense decode) within rel 1e-5
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "clusterkv-ops.cuh"
#include "cuda-backend.h"
#include "cuda-ops.cuh"
#include "cuda-check.cuh"
#include "cuda-ops.cuh"

extern "C" {
#include "kmeans.h"
#include "kv.h"
#include "kvpolicy.h"
#include "quants.h"
}

static int g_failures = 0;
static bool g_quick = false;   // --quick: small cases only (for compute-sanitizer runs)
static test_rng g_rng = {0x243F6A8885A308D3ull};

static uint32_t rnd_u32(void) { return g_rng.u32(); }
static float rnd_uniform(float lo, float hi) { return g_rng.uniform(lo, hi); }
static int rnd_int(int lo, int hi) { return lo + (int) (rnd_u32() % (uint32_t) (hi - lo + 1)); }   // [lo, hi]
static float rnd_normal(void) {
    float u = rnd_uniform(1e-7f, 1.0f), v = rnd_uniform(0.0f, 1.0f);
    return sqrtf(-2.0f * logf(u)) * cosf(6.2831853f * v);
}

static void expect(bool ok, const char * fmt, ...) __attribute__((format(printf, 2, 3)));
static void expect(bool ok, const char * fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf(" %s\n", ok ? "ok" : "FAIL");
    if (!ok) g_failures++;
}

static double rel_diff(const float * got, const float * ref, size_t n) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) return INFINITY;
        double d = (double) got[i] - ref[i];
        num += d * d;
        den += (double) ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

// --- data ---------------------------------------------------------------------------------------

// Rows shaped like post-RoPE keys: a few outlier channels with a large shared offset, each row
// a scaled copy of one of n_dirs random directions plus noise. noise 0.01 with few directions
// gives well-separated clusters; noise ~0.5 gives overlapping ones.
static std::vector<float> make_keys(int n, int d, int n_dirs, float noise, std::vector<int> * truth = nullptr) {
    std::vector<float> dirs((size_t) n_dirs * d), bias(d, 0.0f), x((size_t) n * d);
    for (auto & v : dirs) v = rnd_normal();
    for (int o = 0; o < 3; o++) bias[rnd_int(0, d - 1)] = rnd_uniform(2.0f, 6.0f);
    if (truth) truth->resize(n);
    for (int i = 0; i < n; i++) {
        int c = i < n_dirs ? i : rnd_int(0, n_dirs - 1);   // every direction has a row
        if (truth) (*truth)[i] = c;
        float scale = rnd_uniform(0.5f, 1.5f);
        for (int t = 0; t < d; t++)
            x[(size_t) i * d + t] = (noise < 0.1f ? 0.0f : bias[t]) + scale * dirs[(size_t) c * d + t] + noise * rnd_normal();
    }
    return x;
}

// Positions start + i grouped by label, ascending inside a label (append_clusters' order).
static void csr_from_labels(const int32_t * labels, int n, int k, int32_t start, std::vector<int32_t> & sizes,
                            std::vector<int32_t> & offsets, std::vector<int32_t> & positions) {
    sizes.assign(k, 0);
    offsets.assign(k, 0);
    positions.assign(n, 0);
    for (int i = 0; i < n; i++) sizes[labels[i]]++;
    for (int j = 1; j < k; j++) offsets[j] = offsets[j - 1] + sizes[j - 1];
    std::vector<int32_t> cur = offsets;
    for (int i = 0; i < n; i++) positions[cur[labels[i]]++] = start + i;
}

// --- k-means --------------------------------------------------------------------------------------

// A CSR the host can index safely: sizes >= 0 summing to n, offsets their exclusive scan plus
// base, positions a permutation of [start, start + n).

static bool csr_valid(const int32_t * sizes, const int32_t * offsets, const int32_t * positions, int k, int n,
                      int32_t start, int32_t base) {
    int64_t total = 0;
    for (int j = 0; j < k; j++) {
        if (sizes[j] < 0 || offsets[j] != base + total) return false;
        total += sizes[j];
    }
    if (total != n) return false;
    std::vector<char> seen(n, 0);
    for (int i = 0; i < n; i++) {
        int64_t r = (int64_t) positions[i] - start;
        if (r < 0 || r >= n || seen[r]) return false;
        seen[r] = 1;
    }
    return true;
}

struct km_result {
    std::vector<float>   cent;
    std::vector<int32_t> labels, sizes, offsets, positions, n_iter;
};

// The init rows the CPU policy with params kp gives problem p = (layer il0 + p / G, KV head
// p % G), span start n_sink (clusterkv_span_init_rows), for P problems at once.
static std::vector<int32_t> policy_init_rows(const ckv_kv_policy_params & kp, int il0, int G, int P, int n, int k,
                                             int n_sink) {
    std::vector<int32_t> init((size_t) P * k), rows(n);
    for (int p = 0; p < P; p++) {
        clusterkv_span_init_rows(&kp, il0 + p / G, p % G, n_sink, n, k, rows.data());
        std::copy(rows.begin(), rows.begin() + k, init.begin() + (size_t) p * k);
    }
    return init;
}

// One batched GPU k-means over P problems of n rows, f16 or f32 (problem p at x + p * x_stride
// elements), with compact outputs (problem p's clusters at p * k, its positions at p * n,
// `start` added to positions); `a` points at them.
struct gpu_kmeans_run {
    dbuf<int32_t>    init, sizes, offsets, positions, labels, n_iter;
    dbuf<float>      centroids;
    dbuf<char>       scratch;
    cuda_kmeans_args a = {};
    gpu_kmeans_run(const void * x, bool x_f16, int64_t x_stride, int P, int n, int d, int k,
                   int start, int max_iter, const std::vector<int32_t> & init_rows)
        : init(init_rows), sizes((size_t) P * k), offsets((size_t) P * k), positions((size_t) P * n),
          labels((size_t) P * n), n_iter(P), centroids((size_t) P * k * d),
          scratch(ckv_cuda_kmeans_scratch_bytes(P, n, k, d)) {
        a.x           = x;
        a.x_f16       = x_f16;
        a.x_stride    = x_stride;
        a.n_problems  = P;
        a.n           = n;
        a.d           = d;
        a.k           = k;
        a.max_iter    = max_iter;
        a.init_rows   = init.p;
        a.centroids   = centroids.p;
        a.cent_stride = (int64_t) k * d;
        a.sizes       = sizes.p;
        a.offsets     = offsets.p;
        a.csr_stride  = k;
        a.positions   = positions.p;
        a.pos_stride  = n;
        a.start       = start;
        a.pos_base    = 0;
        a.labels      = labels.p;
        a.n_iter      = n_iter.p;
        a.scratch     = scratch.p;
    }
};

// GPU k-means over P problems stored either contiguously (f32) or in f16 with a stride.
static km_result gpu_kmeans(const std::vector<float> & x, bool f16, int P, int n, int d, int k, int max_iter,
                            const std::vector<int32_t> & init_rows, int64_t x_stride, float * ms = nullptr) {
    dbuf<float> dxf(f16 ? 1 : x.size());
    dbuf<__half> dxh(f16 ? x.size() : 1);
    if (f16) {
        std::vector<__half> h(x.size());
        for (size_t i = 0; i < x.size(); i++) h[i] = __float2half_rn(x[i]);
        CHECK_CUDA(cudaMemcpy(dxh.p, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
    } else {
        CHECK_CUDA(cudaMemcpy(dxf.p, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
    }
    gpu_kmeans_run km(f16 ? (const void *) dxh.p : (const void *) dxf.p, f16, x_stride, P, n, d, k, 0,
                      max_iter, init_rows);
    cudaEvent_t e0, e1;
    CHECK_CUDA(cudaEventCreate(&e0));
    CHECK_CUDA(cudaEventCreate(&e1));
    CHECK_CUDA(cudaEventRecord(e0));
    CHECK_OK(ckv_cuda_kmeans(&km.a, 0));
    CHECK_CUDA(cudaEventRecord(e1));
    CHECK_CUDA(cudaEventSynchronize(e1));
    CHECK_CUDA(cudaGetLastError());
    if (ms) CHECK_CUDA(cudaEventElapsedTime(ms, e0, e1));
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    return {km.centroids.get(), km.labels.get(), km.sizes.get(), km.offsets.get(), km.positions.get(),
            km.n_iter.get()};
}

// One k-means case: P problems of rows from make_keys, CPU (ckv_kmeans_cosine on the rows as the
// GPU sees them) vs GPU. explicit_init: one init row per true direction (well-separated test);
// otherwise kmeans_init_rows per problem.
static void test_kmeans_case(const char * what, int P, int n, int d, int k, int n_dirs, float noise, bool f16,
                             bool explicit_init, int max_iter, double min_agree, double cent_bound) {
    // f16 problems sit in a cache-like buffer: problem p at p * stride, stride > n * d.
    int64_t stride = f16 ? (int64_t) (n + 37) * d : (int64_t) n * d;
    std::vector<float> x((size_t) P * stride, 0.0f);
    std::vector<int32_t> init((size_t) P * k), perm(n);
    for (int p = 0; p < P; p++) {
        std::vector<int> truth;
        std::vector<float> rows = make_keys(n, d, n_dirs, noise, &truth);
        for (size_t i = 0; i < rows.size(); i++) {
            float v = f16 ? __half2float(__float2half_rn(rows[i])) : rows[i];   // what the GPU reads
            x[p * stride + i] = v;
        }
        if (explicit_init) {
            for (int j = 0; j < k; j++) init[(size_t) p * k + j] = j;   // rows 0..k-1: one per direction
        } else {
            kmeans_init_rows(1000 + p, n, k, perm.data());
            std::copy(perm.begin(), perm.begin() + k, init.begin() + (size_t) p * k);
        }
    }
    km_result g = gpu_kmeans(x, f16, P, n, d, k, max_iter, init, stride);
    int64_t same = 0, iters_same = 0, csr_same = 0, clusters_same = 0;
    double cent_rel = 0.0, cent_rel_same = 0.0;   // all clusters; clusters with the CPU's members
    for (int p = 0; p < P; p++) {
        std::vector<float> cent((size_t) k * d);
        std::vector<int32_t> lab(n);
        int32_t it = 0;
        CHECK_OK(ckv_kmeans_cosine(&x[p * stride], n, d, k, max_iter, 0, &init[(size_t) p * k], cent.data(),
                                   lab.data(), &it));
        int first_bad = -1;
        for (int i = 0; i < n; i++) {
            bool eq = lab[i] == g.labels[(size_t) p * n + i];
            same += eq;
            if (!eq && first_bad < 0) first_bad = i;
        }
        if (first_bad >= 0 && min_agree >= 1.0)
            printf("  problem %d: first label difference at row %d: %d (CPU %d); n_iter %d (CPU %d)\n", p, first_bad,
                   g.labels[(size_t) p * n + first_bad], lab[first_bad], g.n_iter[p], it);
        iters_same += it == g.n_iter[p];
        cent_rel = fmax(cent_rel, rel_diff(&g.cent[(size_t) p * k * d], cent.data(), (size_t) k * d));
        bool labels_valid = true;
        for (int i = 0; i < n; i++) labels_valid &= g.labels[(size_t) p * n + i] >= 0 && g.labels[(size_t) p * n + i] < k;
        if (!labels_valid) {
            printf("  problem %d: GPU labels out of [0, k)\n", p);
            continue;
        }
        std::vector<int32_t> sz, of, ps, csz, cof, cps;
        csr_from_labels(&g.labels[(size_t) p * n], n, k, 0, sz, of, ps);   // the GPU's CSR of its labels
        csr_from_labels(lab.data(), n, k, 0, csz, cof, cps);
        for (int j = 0; j < k; j++) {
            if (sz[j] != csz[j] || !std::equal(ps.data() + of[j], ps.data() + of[j] + sz[j], cps.data() + cof[j])) continue;
            clusters_same++;
            cent_rel_same = fmax(cent_rel_same, rel_diff(&g.cent[((size_t) p * k + j) * d], &cent[(size_t) j * d], d));
        }
        csr_same += std::equal(sz.begin(), sz.end(), g.sizes.begin() + (size_t) p * k) &&
                    std::equal(of.begin(), of.end(), g.offsets.begin() + (size_t) p * k) &&
                    std::equal(ps.begin(), ps.end(), g.positions.begin() + (size_t) p * n);
    }
    // Exact cases: everything identical. Otherwise a flipped row moves its two clusters' means
    // by ~1/size of a row, so the centroid bound applies to the clusters whose members agree;
    // the rel error over all centroids is reported.
    double agree = (double) same / ((double) P * n);
    bool exact = min_agree >= 1.0;
    bool ok = agree >= min_agree && csr_same == P &&
              (exact ? iters_same == P && cent_rel <= cent_bound : cent_rel_same <= cent_bound);
    expect(ok, "kmeans %-26s P=%d n=%d d=%d k=%d %s: labels %.5f (min %.4f), n_iter same %lld/%d, clusters same "
           "%.4f, centroids rel %.1e (same clusters %.1e, bound %.0e), GPU CSR ok %lld/%d", what, P, n, d, k,
           f16 ? "f16" : "f32", agree, min_agree, (long long) iters_same, P, (double) clusters_same / ((double) P * k),
           cent_rel, cent_rel_same, cent_bound, (long long) csr_same, P);
}

static void test_kmeans(void) {
    test_kmeans_case("separated", 3, 1000, 64, 20, 20, 0.01f, false, true, 20, 1.0, 1e-6);
    test_kmeans_case("separated, cache layout", 4, 3000, 128, 37, 37, 0.01f, true, true, 20, 1.0, 1e-6);
    test_kmeans_case("separated, d=256", 2, 777, 256, 9, 9, 0.01f, true, true, 20, 1.0, 1e-6);
    test_kmeans_case("separated, d=32, 300 clusters", 2, 2500, 32, 300, 300, 0.001f, false, true, 20, 1.0, 1e-6);
    test_kmeans_case("k=1", 2, 500, 64, 1, 4, 0.3f, true, false, 20, 1.0, 1e-6);
    test_kmeans_case("k=n", 1, 200, 64, 200, 200, 0.3f, false, false, 20, 1.0, 1e-6);
    test_kmeans_case("max_iter=1", 2, 1500, 128, 30, 40, 0.5f, true, false, 1, 0.999, 1e-4);
    if (!g_quick) test_kmeans_case("structured keys", 6, 4000, 128, 50, 120, 0.5f, true, false, 20, 0.999, 1e-4);
    if (!g_quick) test_kmeans_case("structured keys, 600 clusters", 2, 12000, 64, 600, 900, 0.4f, true, false, 10, 0.999, 1e-4);
}

// --- selection: host model ------------------------------------------------------------------------

// The list clusterkv_select builds for one query (select_list + emit_selected), from scores,
// with `room` positions for the clusters.
static std::vector<int32_t> host_list(const std::vector<float> & scores, const int32_t * sizes,
                                      const int32_t * offsets, const int32_t * positions, int n_clusters,
                                      int n_sink, int end, int pos, int room, std::vector<int32_t> * chosen_out,
                                      int32_t * n_chosen_out) {
    int n_cached = pos + 1, sinks = std::min(n_cached, n_sink), tail = n_cached > end ? n_cached - end : 0;
    std::vector<int32_t> out, chosen(std::max(1, n_clusters));
    std::vector<uint64_t> heap(std::max(1, n_clusters));
    for (int i = 0; i < sinks; i++) out.push_back(i);
    int32_t n_ch = cluster_select(scores.data(), sizes, n_clusters, room, chosen.data(), heap.data());
    std::vector<char> mark(std::max(0, end - n_sink), 0);
    int left = room;
    for (int i = 0; i < n_ch && left > 0; i++) {
        int c = chosen[i], take = std::min(sizes[c], left);
        for (int j = 0; j < take; j++) mark[positions[offsets[c] + j] - n_sink] = 1;
        left -= take;
    }
    for (int i = 0; i < (int) mark.size(); i++)
        if (mark[i]) out.push_back(n_sink + i);
    for (int i = n_cached - tail; i < n_cached; i++) out.push_back(i);
    if (chosen_out) chosen_out->assign(chosen.begin(), chosen.begin() + n_ch);
    if (n_chosen_out) *n_chosen_out = n_ch;
    return out;
}

// Random CSR over [n_sink, n_sink + sum(sizes)): sizes in [0, max_size] (some zero), positions a
// random permutation cut into clusters, ascending inside each.
// keep_sizes: shuffle the given sizes instead (another KV head of the same span: same total).
static void random_csr(int n_clusters, int max_size, int n_sink, std::vector<int32_t> & sizes,
                       std::vector<int32_t> & offsets, std::vector<int32_t> & positions, bool keep_sizes) {
    sizes.resize(n_clusters);
    offsets.resize(n_clusters);
    if (keep_sizes) {
        for (int c = n_clusters - 1; c > 0; c--) std::swap(sizes[c], sizes[rnd_u32() % (uint32_t) (c + 1)]);
    }
    int total = 0;
    for (int c = 0; c < n_clusters; c++) {
        if (!keep_sizes) sizes[c] = rnd_u32() % 7 == 0 ? 0 : rnd_int(1, max_size);
        offsets[c] = total;
        total += sizes[c];
    }
    positions.resize(std::max(total, 1));
    for (int i = 0; i < total; i++) positions[i] = n_sink + i;
    for (int i = total - 1; i > 0; i--) std::swap(positions[i], positions[rnd_u32() % (uint32_t) (i + 1)]);
    for (int c = 0; c < n_clusters; c++) std::sort(positions.begin() + offsets[c], positions.begin() + offsets[c] + sizes[c]);
}

struct sel_case {
    int n_head, n_head_kv, d, n_clusters, max_size, n_sink, tail, budget;
    bool per_kv_head, integer_scores;
};

static void test_select_case(const sel_case & sc) {
    const int H = sc.n_head, G = sc.n_head_kv, d = sc.d, n = sc.n_clusters, group = H / G;
    // per KV head: CSR and centroids, laid out with strides like a preallocated state
    int64_t cent_stride = (int64_t) n * d + 5, csr_stride = n + 3;
    std::vector<std::vector<int32_t>> sizes(G), offs(G), pos(G);
    for (int g = 0; g < G; g++) {   // every KV head clusters the same span, its own way
        if (g > 0) sizes[g] = sizes[0];
        random_csr(n, sc.max_size, sc.n_sink, sizes[g], offs[g], pos[g], g > 0);
    }
    int end = sc.n_sink;
    for (int c = 0; c < n; c++) end += sizes[0][c];
    int64_t pos_stride = std::max(1, end - sc.n_sink) + 7;
    int cur = end + sc.tail - 1;   // the current position; the tail [end, cur] has sc.tail positions
    std::vector<float> cent((size_t) G * cent_stride, 0.0f), q((size_t) H * d);
    std::vector<int32_t> sz_all((size_t) G * csr_stride), of_all((size_t) G * csr_stride), ps_all((size_t) G * pos_stride);
    for (int g = 0; g < G; g++) {
        for (int64_t i = 0; i < (int64_t) n * d; i++)
            cent[g * cent_stride + i] = sc.integer_scores ? (float) rnd_int(-3, 3) : rnd_normal();
        std::copy(sizes[g].begin(), sizes[g].end(), sz_all.begin() + g * csr_stride);
        std::copy(offs[g].begin(), offs[g].end(), of_all.begin() + g * csr_stride);
        std::copy(pos[g].begin(), pos[g].begin() + std::max(0, end - sc.n_sink), ps_all.begin() + g * pos_stride);
    }
    for (auto & v : q) v = sc.integer_scores ? (float) rnd_int(-2, 2) : rnd_normal();

    int n_lists = sc.per_kv_head ? G : H;
    int64_t list_stride = sc.budget + 3;
    dbuf<float> dq(q), dcent(cent), dscores((size_t) n_lists * std::max(n, 1));
    dbuf<int32_t> dsz(sz_all), dof(of_all), dps(ps_all), dlist((size_t) H * list_stride), dn(H),
        dchosen((size_t) n_lists * std::max(n, 1)), dnch(n_lists);
    dbuf<uint64_t> dkeys((size_t) n_lists * std::max(n, 1));
    cuda_select_args a = {};
    a.keys = dkeys.p;
    a.q = dq.p;
    a.centroids = dcent.p;
    a.cent_stride = cent_stride;
    a.sizes = dsz.p;
    a.offsets = dof.p;
    a.csr_stride = csr_stride;
    a.positions = dps.p;
    a.pos_stride = pos_stride;
    a.n_head = H;
    a.n_head_kv = G;
    a.d = d;
    a.n_clusters = n;
    a.n_sink = sc.n_sink;
    a.end = end;
    a.pos = cur;
    // the budget rule with the tail inside the budget (any rule only changes room)
    const int room = std::max(0, sc.budget - std::min(cur + 1, sc.n_sink) - sc.tail);
    a.room = room;
    a.per_kv_head = sc.per_kv_head;
    a.list_pos = dlist.p;
    a.list_n = dn.p;
    a.list_stride = list_stride;
    a.scores = dscores.p;
    a.chosen = dchosen.p;
    a.n_chosen = dnch.p;
    CHECK_OK(ckv_cuda_select(&a, 0));
    CHECK_CUDA(cudaGetLastError());
    std::vector<float> gs = dscores.get();
    std::vector<int32_t> gl = dlist.get(), gn = dn.get(), gch = dchosen.get(), gnch = dnch.get();

    int lists_ok = 0, chosen_ok = 0;
    double score_rel = 0.0;
    for (int l = 0; l < n_lists; l++) {
        int g = sc.per_kv_head ? l : l / group;
        std::vector<float> qq(d, 0.0f);   // the group's sum in head order, as the CPU sums it
        for (int i = 0; i < (sc.per_kv_head ? group : 1); i++)
            for (int t = 0; t < d; t++) qq[t] += q[(size_t) ((sc.per_kv_head ? g * group : l) + i) * d + t];
        std::vector<float> ref(n), got(gs.begin() + (size_t) l * n, gs.begin() + (size_t) l * n + n);
        for (int c = 0; c < n; c++) {
            double s = 0.0;
            for (int t = 0; t < d; t++) s += (double) qq[t] * cent[g * cent_stride + (int64_t) c * d + t];
            ref[c] = (float) s;
        }
        score_rel = fmax(score_rel, n ? rel_diff(got.data(), ref.data(), n) : 0.0);
        // integer data: the exact scores; float data: the GPU's own scores (ranking logic only)
        const std::vector<float> & use = sc.integer_scores ? ref : got;
        std::vector<int32_t> chosen;
        int32_t n_ch = 0;
        std::vector<int32_t> want = host_list(use, &sz_all[g * csr_stride], &of_all[g * csr_stride],
                                              &ps_all[g * pos_stride], n, sc.n_sink, end, cur, room, &chosen, &n_ch);
        chosen_ok += gnch[l] == n_ch && std::equal(chosen.begin(), chosen.end(), gch.begin() + (size_t) l * n);
        int heads_ok = 0, n_heads = sc.per_kv_head ? group : 1;
        for (int o = 0; o < n_heads; o++) {
            int h = sc.per_kv_head ? g * group + o : l;
            bool same = gn[h] == (int) want.size() &&
                        std::equal(want.begin(), want.end(), gl.begin() + (size_t) h * list_stride);
            heads_ok += same;
            if (!same && lists_ok == l) {   // the first bad list: where it departs
                size_t i = 0;
                while (i < want.size() && i < (size_t) gn[h] && want[i] == gl[(size_t) h * list_stride + i]) i++;
                printf("  head %d: n %d (want %zu), first difference at %zu: %d (want %d); n_chosen %d (want %d)\n", h,
                       gn[h], want.size(), i, i < (size_t) gn[h] ? gl[(size_t) h * list_stride + i] : -1,
                       i < want.size() ? want[i] : -1, gnch[l], n_ch);
            }
        }
        lists_ok += heads_ok == n_heads;
    }
    bool ok = lists_ok == n_lists && chosen_ok == n_lists && score_rel <= (sc.integer_scores ? 0.0 : 1e-5);
    expect(ok, "select %-7s %s clusters=%-4d d=%d gqa=%d end=%d pos=%d budget=%d: lists %d/%d, chosen %d/%d, "
           "scores rel %.1e", sc.per_kv_head ? "per-kv" : "per-q", sc.integer_scores ? "exact" : "float",
           n, d, group, end, cur, sc.budget, lists_ok, n_lists, chosen_ok, n_lists, score_rel);
}

static void test_select(void) {
    const int counts[] = {1, 2, 257, 1000, 5000};
    for (int n : counts) {
        if (g_quick && n > 257) continue;
        for (int per_kv = 0; per_kv < 2; per_kv++) {
            int max_size = n >= 1000 ? 12 : 40;
            int approx_total = n * max_size / 2;
            // budgets: only sinks + tail, a few clusters, about half, everything
            int budgets[] = {16 + 20, 16 + 20 + 100, 16 + 20 + approx_total / 2, 16 + 20 + approx_total * 2 + 64};
            for (int b : budgets) {
                test_select_case({8, 2, 128, n, max_size, 16, 20, b, per_kv == 1, true});
            }
            test_select_case({8, 2, 64, n, max_size, 16, 20, 16 + 20 + approx_total / 3, per_kv == 1, false});
        }
    }
    test_select_case({7, 7, 64, 300, 30, 0, 1, 500, false, true});    // no sinks, GQA 1, tail of 1
    test_select_case({4, 1, 256, 50, 30, 4, 300, 400, true, true});   // head_dim 256, long tail
    test_select_case({4, 1, 32, 0, 1, 4, 10, 64, false, true});       // nothing clustered yet
    // The most clusters select_kernel still scores itself (n x ceil(d / 32) = 512), and one more.
    test_select_case({9, 3, 64, 256, 40, 16, 20, 2000, false, false});
    test_select_case({9, 3, 64, 257, 40, 16, 20, 2000, false, false});
    test_select_case({8, 2, 128, 128, 40, 16, 20, 1500, true, true});
}

// --- the CPU policy as the twin -------------------------------------------------------------------

// Runs selection s into lists of stride cap (dlist, dn) and compares head h's list with the CPU's
// (cpu_n[h] positions at cpu_pos + h * cap) for every head with compare(h); returns the equal ones.
template <typename F>
static int select_lists_equal(cuda_select_args s, dbuf<int32_t> & dlist, dbuf<int32_t> & dn, int cap, int H,
                              const int32_t * cpu_n, const int32_t * cpu_pos, F && compare) {
    s.list_pos = dlist.p;
    s.list_n = dn.p;
    s.list_stride = cap;
    CHECK_OK(ckv_cuda_select(&s, 0));
    std::vector<int32_t> gl = dlist.get(), gn = dn.get();
    int same = 0;
    for (int h = 0; h < H; h++) {
        if (!compare(h)) continue;
        const int32_t * want = cpu_pos + (size_t) h * cap;
        same += gn[h] == cpu_n[h] && std::equal(want, want + gn[h], gl.begin() + (size_t) h * cap);
    }
    return same;
}

// A small model's cache (f16), the ClusterKV policy on the CPU selecting at position L, and the
// same with the GPU kernels: k-means of every compressed (layer, KV head) in one batched call,
// then the selection per layer.
static void test_policy_twin(bool per_kv_head) {
    const int n_layer = 4, G = 2, H = 8, d = 128, n_ctx = 2048, L = 1700;
    struct kv_cache kv;
    CHECK_OK(kv_cache_init(&kv, n_ctx, n_layer, G, d, GGML_TYPE_F16));
    std::vector<float> k((size_t) (L + 1) * G * d), v((size_t) (L + 1) * G * d);
    for (int il = 0; il < n_layer; il++) {
        for (int g = 0; g < G; g++) {   // each head's keys from its own directions
            std::vector<float> rows = make_keys(L + 1, d, 60, 0.5f);
            for (int t = 0; t <= L; t++)
                for (int e = 0; e < d; e++) k[((size_t) t * G + g) * d + e] = rows[(size_t) t * d + e];
        }
        for (auto & e : v) e = rnd_uniform(-1, 1);
        kv_cache_store(&kv, il, k.data(), v.data(), L + 1, 0);
    }
    struct ckv_kv_policy_params kp;
    kv_policy_default_params(&kp);
    kp.policy = CKV_KV_POLICY_CLUSTERKV;
    kp.budget = 256;
    kp.n_sink = 16;
    kp.n_dense_layers = 2;
    kp.recluster_interval = 64;
    kp.tokens_per_cluster = 20;
    kp.kmeans_iters = 20;
    kp.seed = 1234;
    kp.select_per_kv_head = per_kv_head;
    bool compressed[n_layer] = {false, false, true, true};
    struct kv_policy pol;
    CHECK_OK(kv_policy_init(&pol, &kp, &kv, NULL, H, compressed));
    std::vector<float> q((size_t) n_layer * H * d);
    for (auto & e : q) e = rnd_normal();
    // Lists get room for the tail on top of the budget too (whichever budget rule the policy has).
    const int cap = (int) kv_policy_max_list(&kp, n_ctx);
    std::vector<int32_t> cpu_n((size_t) n_layer * H), cpu_pos((size_t) n_layer * H * cap);
    for (int il = 2; il < n_layer; il++) {
        struct kv_selection sel = {H, cap, &cpu_n[(size_t) il * H], &cpu_pos[(size_t) il * H * cap]};
        kv_policy_select(&pol, il, L, &q[(size_t) il * H * d], &sel);
    }

    // GPU: the cache as the CUDA backend stores it, k-means over layers 2..3 x 2 heads at once
    const int n_sink = kp.n_sink, n = L - n_sink, kc = (n + kp.tokens_per_cluster - 1) / kp.tokens_per_cluster;
    const int P = (n_layer - 2) * G;
    dbuf<__half> dk((size_t) n_layer * G * n_ctx * d);
    CHECK_CUDA(cudaMemcpy(dk.p, kv.k, (size_t) n_layer * G * n_ctx * d * 2, cudaMemcpyHostToDevice));
    gpu_kmeans_run km(dk.p + ((size_t) 2 * G * n_ctx + n_sink) * d, true, (int64_t) n_ctx * d, P, n, d, kc,
                      n_sink, kp.kmeans_iters, policy_init_rows(kp, 2, G, P, n, kc, n_sink));
    CHECK_OK(ckv_cuda_kmeans(&km.a, 0));
    std::vector<float> gcent = km.centroids.get();
    std::vector<int32_t> gsz = km.sizes.get(), gof = km.offsets.get(), gps = km.positions.get();
    // Identical CSR is the expected outcome; a row whose two best cosines are within an ulp may
    // flip (f32 sums in another order), so positions are compared by cluster too (>= 99.9%), and
    // lists only where the KV head's clusters are identical.
    int csr_same = 0;
    int64_t pos_same = 0;
    double cent_rel = 0.0;
    std::vector<char> head_same(P);
    for (int p = 0; p < P; p++) {
        struct clusterkv_view view;
        clusterkv_get_view(&pol, 2 + p / G, p % G, &view);
        if (view.n_clusters != kc || view.end != L) continue;
        if (!csr_valid(&gsz[(size_t) p * kc], &gof[(size_t) p * kc], &gps[(size_t) p * n], kc, n, n_sink, 0)) {
            printf("  problem %d: the GPU's CSR is not a valid index\n", p);
            continue;
        }
        bool same = std::equal(view.sizes, view.sizes + kc, gsz.begin() + (size_t) p * kc) &&
                    std::equal(view.offsets, view.offsets + kc, gof.begin() + (size_t) p * kc) &&
                    std::equal(view.positions, view.positions + n, gps.begin() + (size_t) p * n);
        head_same[p] = same;
        csr_same += same;
        std::vector<int32_t> lab_cpu(L, -1), lab_gpu(L, -2);
        for (int c = 0; c < kc; c++) {
            for (int m = 0; m < view.sizes[c]; m++) lab_cpu[view.positions[view.offsets[c] + m]] = c;
            for (int m = 0; m < gsz[(size_t) p * kc + c]; m++) lab_gpu[gps[(size_t) p * n + gof[(size_t) p * kc + c] + m]] = c;
        }
        for (int t = n_sink; t < L; t++) pos_same += lab_cpu[t] == lab_gpu[t];
        if (same) cent_rel = fmax(cent_rel, rel_diff(&gcent[(size_t) p * kc * d], view.centroids, (size_t) kc * d));
    }
    // GPU selection per compressed layer on the GPU's clusters
    int lists_same = 0, lists = 0, lists_skipped = 0;
    dbuf<float> dq(q);
    dbuf<int32_t> dlist((size_t) H * cap), dn(H);
    // The policy's budget rule decides how many clustered positions a list gets; this test pins
    // the selection, not that rule: the GPU gets the room the CPU's lists show (every list is
    // sinks + room + tail here, since the clustered span is longer than the budget).
    const int room = cpu_n[2 * H] - n_sink - (L + 1 - L);
    dbuf<uint64_t> dkeys((size_t) H * kc);
    for (int il = 2; il < n_layer; il++) {
        int p0 = (il - 2) * G;
        cuda_select_args s = {};
        s.keys = dkeys.p;
        s.q = dq.p + (size_t) il * H * d;
        s.centroids = km.centroids.p + (size_t) p0 * kc * d;
        s.cent_stride = (int64_t) kc * d;
        s.sizes = km.sizes.p + (size_t) p0 * kc;
        s.offsets = km.offsets.p + (size_t) p0 * kc;
        s.csr_stride = kc;
        s.positions = km.positions.p + (size_t) p0 * n;
        s.pos_stride = n;
        s.n_head = H;
        s.n_head_kv = G;
        s.d = d;
        s.n_clusters = kc;
        s.n_sink = n_sink;
        s.end = L;
        s.pos = L;
        s.room = room;
        s.per_kv_head = per_kv_head;
        // heads whose KV head's clusters differ from the CPU's are not compared (counted apart)
        auto clusters_same = [&](int h) { return head_same[p0 + h / (H / G)]; };
        for (int h = 0; h < H; h++) (clusters_same(h) ? lists : lists_skipped)++;
        lists_same += select_lists_equal(s, dlist, dn, cap, H, &cpu_n[(size_t) il * H], &cpu_pos[(size_t) il * H * cap],
                                         clusters_same);
    }
    double agree = (double) pos_same / ((double) P * n);
    expect(agree >= 0.999 && csr_same > 0 && cent_rel <= 1e-6 && lists_same == lists,
           "policy twin %-7s (%d compressed layers x %d KV heads, L=%d, %d clusters): CSR same %d/%d, positions in the "
           "same cluster %.5f, centroids rel %.1e, lists same %d/%d (%d skipped: clusters differ)",
           per_kv_head ? "per-kv" : "per-q", n_layer - 2, G, L, kc, csr_same, P, agree, cent_rel, lists_same, lists,
           lists_skipped);
    kv_policy_free(&pol);
    kv_cache_free(&kv);
}

// --- quest and streaming: the CPU policies as the twins ------------------------------------------

// A small model's f16 cache; the CPU policy (quest or streaming) selects at several positions,
// the GPU builds quest's page bounds with ckv_cuda_quest_pages (in two calls, the second
// starting inside a page) and selects with the position in device memory, as a decode graph
// does. Quest's bounds are summed in the CPU's order, so every list must be the CPU's.
static void test_window_policy_twin(int policy, int page_size) {
    const int n_layer = 4, G = 2, H = 8, d = 128, n_ctx = 2048, L = 1700, n_sink = 16, budget = 300;
    struct kv_cache kv;
    CHECK_OK(kv_cache_init(&kv, n_ctx, n_layer, G, d, GGML_TYPE_F16));
    std::vector<float> k((size_t) (L + 1) * G * d), v(k.size());
    for (int il = 0; il < n_layer; il++) {
        std::vector<float> rows = make_keys((L + 1) * G, d, 40, 0.5f);
        for (size_t i = 0; i < k.size(); i++) k[i] = rows[i];
        for (auto & e : v) e = rnd_uniform(-1, 1);
        kv_cache_store(&kv, il, k.data(), v.data(), L + 1, 0);
    }
    struct ckv_kv_policy_params kp;
    kv_policy_default_params(&kp);
    kp.policy = policy;
    kp.budget = budget;
    kp.n_sink = n_sink;
    kp.page_size = page_size;
    bool compressed[n_layer] = {false, false, true, true};
    struct kv_policy pol;
    CHECK_OK(kv_policy_init(&pol, &kp, &kv, NULL, H, compressed));
    kv_policy_rebuild(&pol, L + 1);

    const int P = (n_layer - 2) * G, n_pages = (n_ctx + page_size - 1) / page_size;
    dbuf<__half> dk((size_t) n_layer * G * n_ctx * d), pmin((size_t) P * n_pages * d), pmax(pmin.n);
    CHECK_CUDA(cudaMemcpy(dk.p, kv.k, (size_t) n_layer * G * n_ctx * d * 2, cudaMemcpyHostToDevice));
    const int split = 1000 + page_size / 2;   // the second call starts inside a page
    for (int part = 0; part < 2; part++) {
        cuda_quest_pages_args qa = {};
        qa.k = dk.p + (size_t) 2 * G * n_ctx * d;
        qa.k_stride = (int64_t) n_ctx * d;
        qa.n_problems = P;
        qa.d = d;
        qa.page_size = page_size;
        qa.pos0 = part ? split : 0;
        qa.n = part ? L + 1 - split : split;
        qa.page_min = pmin.p;
        qa.page_max = pmax.p;
        qa.page_stride = (int64_t) n_pages * d;
        CHECK_OK(ckv_cuda_quest_pages(&qa, 0));
    }
    std::vector<float> q((size_t) n_layer * H * d);
    for (auto & e : q) e = rnd_normal();
    dbuf<float> dq(q);
    const int cap = (int) kv_policy_max_list(&kp, n_ctx);
    dbuf<int32_t> dlist((size_t) H * cap), dn(H), dpos(1);
    std::vector<int32_t> cpu_n(H), cpu_pos((size_t) H * cap);
    int lists = 0, same = 0;
    for (int pos : {L, L - 7, 16 * 90, 16 * 90 - 1, budget, budget - 1, n_sink + 3}) {
        CHECK_CUDA(cudaMemcpy(dpos.p, &pos, sizeof(int32_t), cudaMemcpyHostToDevice));
        for (int il = 2; il < n_layer; il++) {
            struct kv_selection sel = {H, cap, cpu_n.data(), cpu_pos.data()};
            kv_policy_select(&pol, il, pos, &q[(size_t) il * H * d], &sel);
            cuda_select_args s = {};
            s.mode = policy == CKV_KV_POLICY_QUEST ? CKV_SELECT_PAGES : CKV_SELECT_WINDOW;
            s.q = dq.p + (size_t) il * H * d;
            s.n_head = H;
            s.n_head_kv = G;
            s.d = d;
            s.n_sink = n_sink;
            s.pos = n_ctx - 1;   // the bound a graph is captured with
            s.pos_dev = dpos.p;
            s.budget = budget;
            s.page_size = page_size;
            s.page_stride = (int64_t) n_pages * d;
            s.page_min = pmin.p + (size_t) (il - 2) * G * s.page_stride;
            s.page_max = pmax.p + (size_t) (il - 2) * G * s.page_stride;
            same += select_lists_equal(s, dlist, dn, cap, H, cpu_n.data(), cpu_pos.data(), [](int) { return true; });
            lists += H;
        }
    }
    expect(same == lists, "policy twin %-9s page_size=%-2d (L=%d, budget %d, 7 positions): lists same %d/%d",
           policy == CKV_KV_POLICY_QUEST ? "quest" : "streaming", page_size, L, budget, same, lists);
    kv_policy_free(&pol);
    kv_cache_free(&kv);
}

// --- host offload: the fetch into the GPU's slots ----------------------------------------------------

// Six steps of random position lists over rows in mapped host memory: after each fetch every
// listed position must have a slot holding its K and V rows, exactly the listed positions that
// had no slot are copied (a repeated step copies nothing), slot_of / owner stay each other's
// inverse, and a forget drops the positions from a point on.
static void test_kv_fetch(void) {
    const int G = 2, H = 8, group = H / G, d = 128, n_ctx = 3000, stride = 300, n_slots = group * stride;
    const size_t rows = (size_t) G * n_ctx * d;
    __half * hk = NULL, * hv = NULL;
    CHECK_CUDA(cudaHostAlloc(&hk, rows * 2, cudaHostAllocMapped));
    CHECK_CUDA(cudaHostAlloc(&hv, rows * 2, cudaHostAllocMapped));
    for (size_t i = 0; i < rows; i++) {
        hk[i] = __float2half_rn(rnd_uniform(-1, 1));
        hv[i] = __float2half_rn(rnd_uniform(-1, 1));
    }
    dbuf<__half> sk((size_t) G * n_slots * d), sv(sk.n);
    dbuf<int32_t> slot_of((size_t) G * n_ctx), owner((size_t) G * n_slots), scratch((size_t) G * 2 * n_slots);
    dbuf<uint32_t> stamp((size_t) G * n_slots), epoch(G);
    dbuf<int32_t> lpos((size_t) H * stride), ln(H);
    dbuf<unsigned long long> copied(1);
    CHECK_CUDA(cudaMemset(slot_of.p, 0xFF, slot_of.n * 4));
    CHECK_CUDA(cudaMemset(owner.p, 0xFF, owner.n * 4));
    CHECK_CUDA(cudaMemset(stamp.p, 0, stamp.n * 4));
    CHECK_CUDA(cudaMemset(epoch.p, 0, epoch.n * 4));
    CHECK_CUDA(cudaMemset(copied.p, 0, 8));
    cuda_kv_fetch_args a = {lpos.p, ln.p, stride, H, G, d, hk, hv, n_ctx, sk.p, sv.p, n_slots,
                            slot_of.p, owner.p, stamp.p, epoch.p, scratch.p, copied.p};
    std::vector<int32_t> lists((size_t) H * stride), n(H);
    int bad_rows = 0, bad_counts = 0, bad_maps = 0;
    unsigned long long copied_before = 0;
    for (int step = 0; step < 6; step++) {
        if (step != 2) {   // step 2 repeats step 1's lists
            for (int h = 0; h < H; h++) {   // sorted distinct positions, windows that overlap the last step's
                int lo = rnd_int(0, 400) + step * 150, len = rnd_int(1, stride);
                std::vector<int32_t> pick;
                for (int p = lo; p < n_ctx && (int) pick.size() < len; p += rnd_int(1, 3)) pick.push_back(p);
                n[h] = (int32_t) pick.size();
                std::copy(pick.begin(), pick.end(), lists.begin() + (size_t) h * stride);
            }
            CHECK_CUDA(cudaMemcpy(lpos.p, lists.data(), lists.size() * 4, cudaMemcpyHostToDevice));
            CHECK_CUDA(cudaMemcpy(ln.p, n.data(), n.size() * 4, cudaMemcpyHostToDevice));
        }
        std::vector<int32_t> map_before = slot_of.get();
        unsigned long long expect_copies = 0;
        for (int g = 0; g < G; g++) {
            std::vector<char> seen(n_ctx, 0);
            for (int o = 0; o < group; o++)
                for (int i = 0; i < n[g * group + o]; i++) {
                    int32_t p = lists[(size_t) (g * group + o) * stride + i];
                    if (!seen[p] && map_before[(size_t) g * n_ctx + p] < 0) expect_copies++;
                    seen[p] = 1;
                }
        }
        CHECK_OK(ckv_cuda_kv_fetch(&a, 0));
        std::vector<int32_t> map = slot_of.get(), own = owner.get();
        std::vector<__half> gk = sk.get(), gv = sv.get();
        unsigned long long total = copied.get()[0];
        bad_counts += total - copied_before != expect_copies;
        copied_before = total;
        for (int h = 0; h < H; h++) {
            const int g = h / group;
            for (int i = 0; i < n[h]; i++) {
                int32_t p = lists[(size_t) h * stride + i], slot = map[(size_t) g * n_ctx + p];
                bool ok = slot >= 0 && slot < n_slots;
                ok = ok && !memcmp(&gk[((size_t) g * n_slots + slot) * d], &hk[((size_t) g * n_ctx + p) * d], d * 2) &&
                     !memcmp(&gv[((size_t) g * n_slots + slot) * d], &hv[((size_t) g * n_ctx + p) * d], d * 2);
                bad_rows += !ok;
            }
        }
        for (int g = 0; g < G; g++)
            for (int p = 0; p < n_ctx; p++) {
                int32_t slot = map[(size_t) g * n_ctx + p];
                bad_maps += slot < -1 || (slot >= 0 && own[(size_t) g * n_slots + slot] != p);
            }
    }
    CHECK_OK(ckv_cuda_kv_fetch_forget(slot_of.p, owner.p, G, n_ctx, n_slots, 1000, n_ctx, 0));
    std::vector<int32_t> map = slot_of.get(), own = owner.get();
    int stale = 0;
    for (int g = 0; g < G; g++) {
        for (int p = 1000; p < n_ctx; p++) stale += map[(size_t) g * n_ctx + p] != -1;
        for (int slot = 0; slot < n_slots; slot++) stale += own[(size_t) g * n_slots + slot] >= 1000;
    }
    expect(bad_rows == 0 && bad_counts == 0 && bad_maps == 0 && stale == 0,
           "kv fetch G=%d gqa=%d d=%d, 6 steps (one repeated): wrong rows %d, wrong copy counts %d, broken maps %d, "
           "stale after forget %d", G, group, d, bad_rows, bad_counts, bad_maps, stale);
    cudaFreeHost(hk);
    cudaFreeHost(hv);
}

// --- sparse attention -------------------------------------------------------------------------------

struct att_cache {
    int n_ctx, n_head_kv, hd;
    std::vector<__half> k, v;   // [n_head_kv][n_ctx][hd]; rows >= n_filled hold NaN
    dbuf<__half> dk, dv;
    att_cache(int n_ctx_, int n_head_kv_, int hd_, int n_filled)
        : n_ctx(n_ctx_), n_head_kv(n_head_kv_), hd(hd_), k((size_t) n_head_kv_ * n_ctx_ * hd_, __ushort_as_half(0x7E00)),
          v(k), dk(k.size()), dv(k.size()) {
        for (int g = 0; g < n_head_kv; g++)
            for (int t = 0; t < n_filled; t++)
                for (int e = 0; e < hd; e++) {
                    size_t i = ((size_t) g * n_ctx + t) * hd + e;
                    k[i] = __float2half_rn(rnd_uniform(-1, 1));
                    v[i] = __float2half_rn(rnd_uniform(-1, 1));
                }
        CHECK_CUDA(cudaMemcpy(dk.p, k.data(), k.size() * 2, cudaMemcpyHostToDevice));
        CHECK_CUDA(cudaMemcpy(dv.p, v.data(), v.size() * 2, cudaMemcpyHostToDevice));
    }
};

// f64 softmax attention of q over the listed rows of KV head g.
static void attend_list_ref(const att_cache & c, int g, const float * q, const int32_t * list, int n, float scale,
                            double * out) {
    std::vector<double> s(n);
    double mx = -INFINITY, sum = 0.0;
    for (int i = 0; i < n; i++) {
        double dot = 0.0;
        for (int e = 0; e < c.hd; e++) dot += (double) q[e] * __half2float(c.k[((size_t) g * c.n_ctx + list[i]) * c.hd + e]);
        s[i] = dot * scale;
        mx = fmax(mx, s[i]);
    }
    for (auto & e : s) {
        e = exp(e - mx);
        sum += e;
    }
    for (int e = 0; e < c.hd; e++) {
        double o = 0.0;
        for (int i = 0; i < n; i++) o += s[i] * __half2float(c.v[((size_t) g * c.n_ctx + list[i]) * c.hd + e]);
        out[e] = n ? o / sum : 0.0;
    }
}

// kv_offload's view of an att_cache: the rows in mapped host memory, a random part of them also
// in slots (slot_of says which), so a sparse decode reads some rows from slots, the rest over PCIe.
struct offload_rows {
    __half * hk = NULL, * hv = NULL;
    int n_slots;
    dbuf<int32_t> slot_of;
    dbuf<__half> sk, sv;
    offload_rows(const att_cache & c, double resident)
        : n_slots(c.n_ctx), slot_of((size_t) c.n_head_kv * c.n_ctx), sk(c.k.size()), sv(c.k.size()) {
        CHECK_CUDA(cudaHostAlloc(&hk, c.k.size() * 2, cudaHostAllocMapped));
        CHECK_CUDA(cudaHostAlloc(&hv, c.k.size() * 2, cudaHostAllocMapped));
        memcpy(hk, c.k.data(), c.k.size() * 2);
        memcpy(hv, c.v.data(), c.v.size() * 2);
        std::vector<int32_t> map((size_t) c.n_head_kv * c.n_ctx, -1), perm(n_slots);
        std::vector<__half> k(c.k.size()), v(c.k.size());
        for (int g = 0; g < c.n_head_kv; g++) {
            for (int i = 0; i < n_slots; i++) perm[i] = i;
            for (int i = n_slots - 1; i > 0; i--) std::swap(perm[i], perm[rnd_u32() % (uint32_t) (i + 1)]);
            for (int p = 0; p < c.n_ctx; p++) {
                if (rnd_uniform(0, 1) >= resident) continue;
                const int32_t sl = perm[p];   // a slot per position, in scrambled order
                map[(size_t) g * c.n_ctx + p] = sl;
                memcpy(&k[((size_t) g * n_slots + sl) * c.hd], &c.k[((size_t) g * c.n_ctx + p) * c.hd], c.hd * 2);
                memcpy(&v[((size_t) g * n_slots + sl) * c.hd], &c.v[((size_t) g * c.n_ctx + p) * c.hd], c.hd * 2);
            }
        }
        CHECK_CUDA(cudaMemcpy(slot_of.p, map.data(), map.size() * 4, cudaMemcpyHostToDevice));
        CHECK_CUDA(cudaMemcpy(sk.p, k.data(), k.size() * 2, cudaMemcpyHostToDevice));
        CHECK_CUDA(cudaMemcpy(sv.p, v.data(), v.size() * 2, cudaMemcpyHostToDevice));
    }
    ~offload_rows() {
        cudaFreeHost(hk);
        cudaFreeHost(hv);
    }
};

static std::vector<float> run_sparse(const att_cache & c, const std::vector<float> & q, int H,
                                     const std::vector<int32_t> & lists, const std::vector<int32_t> & ns,
                                     int64_t stride, int n_split, float scale, bool shared = false,
                                     const offload_rows * off = NULL) {
    int max_list = 0;
    for (int x : ns) max_list = std::max(max_list, x);
    dbuf<float> dq(q), dout((size_t) H * c.hd), dpart((size_t) H * n_split * (c.hd + 4));
    dbuf<int32_t> dl(lists), dn(ns);
    // The output is also asked quantised: it must be ckv_cuda_quantize_q8 of out, byte for byte.
    const size_t q_bytes = (size_t) H * c.hd / 32 * 40;   // cq8x blocks of 32 values
    dbuf<char> dout_q(q_bytes), dref_q(q_bytes);
    cuda_sparse_attention_args a = {dq.p, c.dk.p, c.dv.p, c.n_ctx, dl.p, dn.p, stride, max_list, dout.p, dpart.p,
                                    H, c.n_head_kv, c.hd, n_split, scale, dout_q.p, shared};
    if (off) {
        a.k_cache = off->hk;
        a.v_cache = off->hv;
        a.slot_of = off->slot_of.p;
        a.slot_k  = off->sk.p;
        a.slot_v  = off->sv.p;
        a.n_slots = off->n_slots;
    }
    CHECK_OK(ckv_cuda_sparse_attention(&a, 0));
    CHECK_OK(ckv_cuda_quantize_q8(dout.p, dref_q.p, (int64_t) H * c.hd, 0));
    CHECK_CUDA(cudaDeviceSynchronize());
    expect(dout_q.get() == dref_q.get(), "sparse attention hd=%d H=%d splits=%d: quantised output == "
           "quantize_q8(out)", c.hd, H, n_split);
    return dout.get();
}

// Lists per head: random ascending subsets of [0, pos] of the given lengths (the current
// position always in), in a buffer of stride pos + 1.
static void test_sparse_case(int hd, int H, int G, int pos, std::vector<int> lens, int n_split_wanted) {
    att_cache c(pos + 9, G, hd, pos + 1);
    int64_t stride = pos + 1;
    std::vector<int32_t> lists((size_t) H * stride, -1), ns(H);
    std::vector<int32_t> all(pos);
    for (int h = 0; h < H; h++) {
        int len = std::min(lens[h % lens.size()], pos + 1);
        for (int i = 0; i < pos; i++) all[i] = i;
        for (int i = 0; i < len - 1; i++) std::swap(all[i], all[i + rnd_u32() % (uint32_t) (pos - i)]);
        std::vector<int32_t> l(all.begin(), all.begin() + (len - 1));
        l.push_back(pos);
        std::sort(l.begin(), l.end());
        std::copy(l.begin(), l.end(), lists.begin() + (size_t) h * stride);
        ns[h] = len;
    }
    std::vector<float> q((size_t) H * hd);
    for (auto & e : q) e = rnd_uniform(-2, 2);
    float scale = 1.0f / sqrtf((float) hd);
    std::vector<double> ref((size_t) H * hd);
    for (int h = 0; h < H; h++)
        attend_list_ref(c, h / (H / G), &q[(size_t) h * hd], &lists[(size_t) h * stride], ns[h], scale, &ref[(size_t) h * hd]);
    int max_list = *std::max_element(ns.begin(), ns.end());
    int n_split = n_split_wanted > 0 ? n_split_wanted : ckv_cuda_sparse_attention_splits(H, max_list);
    std::vector<float> got = run_sparse(c, q, H, lists, ns, stride, n_split, scale);
    std::vector<float> reff(ref.begin(), ref.end());
    double err = rel_diff(got.data(), reff.data(), got.size());
    char lens_s[64] = "";
    for (size_t i = 0; i < lens.size() && i < 4; i++) snprintf(lens_s + strlen(lens_s), 64 - strlen(lens_s), "%s%d", i ? "," : "", lens[i]);
    expect(err <= 1e-4, "sparse attention hd=%d gqa=%d pos=%d lens=%s%s splits=%d: rel %.2e vs f64 (bound 1e-4)",
           hd, H / G, pos, lens_s, lens.size() > 4 ? ",..." : "", n_split, err);
}

// One decode query at pos over the whole cache, for ckv_cuda_attention.
static cuda_attention_args dense_args(const float * q, const __half * k, const __half * v, float * out, float * part,
                                      int pos, int n_ctx, int H, int G, int hd, int n_split, float scale) {
    cuda_attention_args a = {};
    a.q = q;
    a.k_cache = k;
    a.v_cache = v;
    a.out = out;
    a.partial = part;
    a.n_tokens = 1;
    a.pos0 = pos;
    a.n_ctx = n_ctx;
    a.n_head = H;
    a.n_head_kv = G;
    a.head_dim = hd;
    a.window = 0;
    a.n_split = n_split;
    a.scale = scale;
    return a;
}

// Every position listed: the dense decode kernel's result within rounding.
static void test_sparse_vs_dense(int hd, int H, int G, int pos) {
    att_cache c(pos + 5, G, hd, pos + 1);
    int64_t stride = pos + 1;
    std::vector<int32_t> lists((size_t) H * stride), ns(H, pos + 1);
    for (int h = 0; h < H; h++)
        for (int i = 0; i <= pos; i++) lists[(size_t) h * stride + i] = i;
    std::vector<float> q((size_t) H * hd);
    for (auto & e : q) e = rnd_uniform(-2, 2);
    float scale = 1.0f / sqrtf((float) hd);
    std::vector<float> got = run_sparse(c, q, H, lists, ns, stride, ckv_cuda_sparse_attention_splits(H, pos + 1), scale);
    int64_t cap = (int64_t) H * 128;
    int32_t n_split = ckv_cuda_attention_splits(1, H, pos + 1, cap);
    dbuf<float> dq(q), dout((size_t) H * hd), dpart((size_t) cap * ckv_cuda_attention_partial_floats(hd));
    cuda_attention_args da = dense_args(dq.p, c.dk.p, c.dv.p, dout.p, dpart.p, pos, c.n_ctx, H, G, hd, n_split, scale);
    CHECK_OK(ckv_cuda_attention(&da, 0));
    std::vector<float> dense = dout.get();
    double err = rel_diff(got.data(), dense.data(), got.size());
    expect(err <= 1e-5, "sparse attention, all %d positions, hd=%d gqa=%d: rel %.2e vs dense decode (bound 1e-5)",
           pos + 1, hd, H / G, err);
}

// Per-KV-head lists (every head of a group has the group's list): the group kernel, which reads
// each row once for the group, gives the per-head kernel's results bit for bit.
static void test_sparse_shared(int hd, int H, int G, int pos, int len, int n_split_wanted) {
    att_cache c(pos + 9, G, hd, pos + 1);
    int64_t stride = pos + 1;
    std::vector<int32_t> lists((size_t) H * stride, -1), ns(H), all(pos);
    const int group = H / G;
    len = std::min(len, pos + 1);
    for (int g = 0; g < G; g++) {
        for (int i = 0; i < pos; i++) all[i] = i;
        for (int i = 0; i < len - 1; i++) std::swap(all[i], all[i + rnd_u32() % (uint32_t) (pos - i)]);
        std::vector<int32_t> l(all.begin(), all.begin() + (len - 1));
        l.push_back(pos);
        std::sort(l.begin(), l.end());
        for (int h = g * group; h < (g + 1) * group; h++) {
            std::copy(l.begin(), l.end(), lists.begin() + (size_t) h * stride);
            ns[h] = len;
        }
    }
    std::vector<float> q((size_t) H * hd);
    for (auto & e : q) e = rnd_uniform(-2, 2);
    float scale = 1.0f / sqrtf((float) hd);
    int n_split = n_split_wanted > 0 ? n_split_wanted : ckv_cuda_sparse_attention_splits(H, len);
    std::vector<float> per_head = run_sparse(c, q, H, lists, ns, stride, n_split, scale, false);
    std::vector<float> grouped = run_sparse(c, q, H, lists, ns, stride, n_split, scale, true);
    expect(per_head == grouped, "sparse attention, shared lists hd=%d gqa=%d len=%d splits=%d: group kernel == "
           "per-head kernel, bit for bit", hd, group, len, n_split);
    // kv_offload: 70% of the rows in slots, the rest read from host memory; same bits
    offload_rows off(c, 0.7);
    std::vector<float> per_head_off = run_sparse(c, q, H, lists, ns, stride, n_split, scale, false, &off);
    std::vector<float> grouped_off  = run_sparse(c, q, H, lists, ns, stride, n_split, scale, true, &off);
    expect(per_head_off == per_head && grouped_off == grouped, "sparse attention through slots (kv_offload) hd=%d "
           "gqa=%d len=%d: per-head and group kernels == reading the cache, bit for bit", hd, group, len);
}

static void test_sparse(void) {
    test_sparse_shared(128, 32, 8, 3000, 2100, 0);   // 8B shape
    test_sparse_shared(128, 32, 8, 3000, 777, 1);    // one split: the group kernel writes out itself
    test_sparse_shared(64, 9, 3, 1500, 1024, 0);     // SmolLM2
    test_sparse_shared(64, 14, 2, 2000, 999, 0);     // GQA 7 (group kernel with 8 slots)
    test_sparse_shared(256, 4, 1, 900, 400, 0);      // head_dim 256, group 4
    test_sparse_case(128, 32, 8, 3000, {1, 2, 63, 64, 65, 127, 129, 1000, 2048, 2999, 3001}, 0);
    test_sparse_case(128, 32, 8, 3000, {1, 64, 65, 777, 2048}, 1);   // one split: long serial walk
    if (!g_quick) test_sparse_case(128, 32, 8, 5000, {4000, 10, 1}, 64);   // more splits than a short list needs
    test_sparse_case(64, 9, 3, 1500, {17, 300, 1024}, 0);            // SmolLM2 shape
    test_sparse_case(64, 14, 2, 2000, {1, 500, 1999}, 0);            // GQA 7
    test_sparse_case(256, 4, 1, 900, {33, 901, 400, 1}, 0);          // head_dim 256
    test_sparse_case(128, 8, 8, 700, {1, 700}, 3);                   // GQA 1
    test_sparse_vs_dense(128, 32, 8, 4095);
    test_sparse_vs_dense(64, 9, 3, 1000);
    test_sparse_vs_dense(256, 4, 1, 333);
    test_sparse_vs_dense(128, 8, 8, 0);
}

// --- timing ---------------------------------------------------------------------------------------

static float median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

template <typename F> static float time_ms(F && f, int reps) {
    cudaEvent_t e0, e1;
    CHECK_CUDA(cudaEventCreate(&e0));
    CHECK_CUDA(cudaEventCreate(&e1));
    f();
    CHECK_CUDA(cudaDeviceSynchronize());
    std::vector<float> t;
    for (int r = 0; r < reps; r++) {
        CHECK_CUDA(cudaEventRecord(e0));
        f();
        CHECK_CUDA(cudaEventRecord(e1));
        CHECK_CUDA(cudaEventSynchronize(e1));
        float ms;
        CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
        t.push_back(ms);
    }
    CHECK_CUDA(cudaGetLastError());
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    return median(t);
}

// One 8B-shape layer at depth 32k: 8 KV heads x 32752 clustered keys (32768 - 16 sinks) of 128,
// 410 clusters (L/80); 32 query heads select B = 2048 and attend over them.
static void bench(void) {
    const int G = 8, H = 32, d = 128, n_ctx = 32768 + 512, n_sink = 16, L = 32768, n = L - n_sink;
    const int k = (n + 79) / 80, budget = 2048;
    printf("\nbench on %s: one layer, %d KV heads x %d keys x %d dims, %d clusters, budget %d\n",
           ckv_cuda_device_name(), G, n, d, k, budget);
    // keys: structured (converges early) and plain uniform noise (runs every iteration)
    std::vector<__half> kh((size_t) G * n_ctx * d, __float2half_rn(0.0f));
    for (int g = 0; g < G; g++) {
        std::vector<float> rows = make_keys(L, d, 600, 0.5f);
        for (size_t i = 0; i < rows.size(); i++) kh[(size_t) g * n_ctx * d + i] = __float2half_rn(rows[i]);
    }
    dbuf<__half> dk(kh), dv(kh);
    struct ckv_kv_policy_params kp;
    kv_policy_default_params(&kp);   // seed 0, random init
    const std::vector<int32_t> init = policy_init_rows(kp, 2, G, G, n, k, n_sink);
    gpu_kmeans_run km(dk.p + (size_t) n_sink * d, true, (int64_t) n_ctx * d, G, n, d, k, n_sink, 20, init);
    cuda_kmeans_args & a = km.a;
    for (int max_iter : {1, 20}) {
        a.max_iter = max_iter;
        float ms = time_ms([&] { CHECK_OK(ckv_cuda_kmeans(&a, 0)); }, 5);
        std::vector<int32_t> it = km.n_iter.get();
        double mean_it = 0;
        for (int x : it) mean_it += x / (double) G;
        printf("  kmeans  max_iter=%2d  structured keys: %8.3f ms  (mean n_iter %.1f)\n", max_iter, ms, mean_it);
    }
    {   // 8 layers in one call (64 problems, the layer's keys copied 8 times): the batching at scale
        const int P8 = 64;
        dbuf<__half> dk8((size_t) P8 * n_ctx * d);
        for (int r = 0; r < P8 / G; r++)
            CHECK_CUDA(cudaMemcpy(dk8.p + (size_t) r * G * n_ctx * d, dk.p, kh.size() * 2, cudaMemcpyDeviceToDevice));
        std::vector<int32_t> init8((size_t) P8 * k);
        for (int r = 0; r < P8 / G; r++) std::copy(init.begin(), init.end(), init8.begin() + (size_t) r * G * k);
        gpu_kmeans_run km8(dk8.p + (size_t) n_sink * d, true, (int64_t) n_ctx * d, P8, n, d, k, n_sink,
                           20, init8);
        float ms = time_ms([&] { CHECK_OK(ckv_cuda_kmeans(&km8.a, 0)); }, 3);
        printf("  kmeans  max_iter=20  64 problems (8 layers) in one call: %8.3f ms\n", ms);
    }
    {   // unstructured keys: every iteration runs
        std::vector<__half> noise((size_t) G * n_ctx * d);
        for (auto & e : noise) e = __float2half_rn(rnd_uniform(-1, 1));
        dbuf<__half> dn(noise);
        a.x = dn.p + (size_t) n_sink * d;
        a.max_iter = 20;
        float ms = time_ms([&] { CHECK_OK(ckv_cuda_kmeans(&a, 0)); }, 3);
        std::vector<int32_t> it = km.n_iter.get();
        printf("  kmeans  max_iter=20  uniform noise:   %8.3f ms  (n_iter of head 0: %d)\n", ms, it[0]);
        a.x = dk.p + (size_t) n_sink * d;
        a.max_iter = 20;
        CHECK_OK(ckv_cuda_kmeans(&a, 0));   // the structured clusters for the selection below
        CHECK_CUDA(cudaDeviceSynchronize());
    }
    std::vector<float> q((size_t) H * d);
    for (auto & e : q) e = rnd_normal();
    dbuf<float> dq(q);
    const int pos = L + 100;
    const int list_cap = budget + (pos + 1 - L);   // the tail comes on top of the budget
    dbuf<int32_t> dlist((size_t) H * list_cap), dn(H);
    dbuf<uint64_t> dkeys((size_t) H * k);
    for (int per_kv = 0; per_kv < 2; per_kv++) {
        cuda_select_args s = {};
        s.keys = dkeys.p;
        s.q = dq.p;
        s.centroids = km.centroids.p;
        s.cent_stride = (int64_t) k * d;
        s.sizes = km.sizes.p;
        s.offsets = km.offsets.p;
        s.csr_stride = k;
        s.positions = km.positions.p;
        s.pos_stride = n;
        s.n_head = H;
        s.n_head_kv = G;
        s.d = d;
        s.n_clusters = k;
        s.n_sink = n_sink;
        s.end = L;
        s.pos = pos;
        s.room = budget - n_sink;   // kvpolicy-clusterkv.c's rule: B = sinks + clusters
        s.per_kv_head = per_kv;
        s.list_pos = dlist.p;
        s.list_n = dn.p;
        s.list_stride = list_cap;
        // 20 launches per sample: the GPU time of back-to-back launches, not one launch's host cost
        float ms = time_ms([&] { for (int r = 0; r < 20; r++) CHECK_OK(ckv_cuda_select(&s, 0)); }, 20) / 20;
        printf("  select  %-7s 32 heads, %d clusters:        %8.4f ms\n", per_kv ? "per-kv" : "per-q", k, ms);
    }
    // sparse decode over the per-query lists just selected vs dense decode at the same depth
    std::vector<int32_t> ns = dn.get();
    int max_list = *std::max_element(ns.begin(), ns.end());
    float scale = 1.0f / sqrtf((float) d);
    int n_split = ckv_cuda_sparse_attention_splits(H, max_list);
    dbuf<float> dout((size_t) H * d), dpart((size_t) H * 128 * (d + 4));
    cuda_sparse_attention_args sa = {dq.p, dk.p, dv.p, n_ctx, dlist.p, dn.p, list_cap, max_list, dout.p, dpart.p,
                                     H, G, d, n_split, scale};
    float ms_sparse = time_ms([&] { for (int r = 0; r < 20; r++) CHECK_OK(ckv_cuda_sparse_attention(&sa, 0)); }, 20) / 20;
    int64_t cap = (int64_t) H * 128;
    int32_t dsplit = ckv_cuda_attention_splits(1, H, pos + 1, cap);
    cuda_attention_args da = dense_args(dq.p, dk.p, dv.p, dout.p, dpart.p, pos, n_ctx, H, G, d, dsplit, scale);
    float ms_dense = time_ms([&] { for (int r = 0; r < 20; r++) CHECK_OK(ckv_cuda_attention(&da, 0)); }, 20) / 20;
    printf("  sparse decode, lists of %d (%d splits):      %8.4f ms\n", max_list, n_split, ms_sparse);
    printf("  dense decode over %d positions (%d splits):  %8.4f ms\n", pos + 1, dsplit, ms_dense);
}

int main(int argc, char ** argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);   // line by line, so a log cut short by a timeout keeps its end
    if (ckv_cuda_device_count() == 0) {
        printf("test-cuda-clusterkv: skipped: %s\n", ckv_cuda_device_name());
        return 77;
    }
    printf("test-cuda-clusterkv on %s\n", ckv_cuda_device_name());
    quants_init();
    g_quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
    test_kmeans();
    test_select();
    if (!g_quick) {
        test_policy_twin(false);
        test_policy_twin(true);
        test_window_policy_twin(CKV_KV_POLICY_QUEST, 16);
        test_window_policy_twin(CKV_KV_POLICY_QUEST, 5);
        test_window_policy_twin(CKV_KV_POLICY_STREAMING, 16);
    }
    test_sparse();
    test_kv_fetch();
    if (argc > 1 && strcmp(argv[1], "--bench") == 0) bench();
    printf("test-cuda-clusterkv: %d failure(s)\n", g_failures);
    return g_failures ? 1 : 0;
}
