// kvpolicy.cu - the KV policies on the GPU: state, span clustering (clusterkv), page bounds
// (quest), per-step attention and bookkeeping (kvpolicy.cuh). The kernels are clusterkv.cu's;
// this file decides when and on what they run, mirroring kvpolicy-clusterkv.c,
// kvpolicy-quest.c and kvpolicy-streaming.c.
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clusterkv-ops.cuh"
#include "common.cuh"
#include "kvpolicy.cuh"

extern "C" {
#include "kmeans.h"
#include "kvpolicy.h"
#include "model.h"
}

struct cuda_kv_policy {
    struct ckv_kv_policy_params params;
    int32_t mode;              // cuda_select_mode of the policy
    int32_t n_layer, n_head, n_head_kv, head_dim, n_ctx;
    int32_t n_comp;            // compressed layers
    int32_t * comp_of;         // host [n_layer]: index among the compressed layers, or -1
    bool *    last_sparse;     // host [n_layer]: the last decode step attended through lists
    int32_t max_pos;           // n_ctx - n_sink: positions that can be clustered
    int32_t max_spans, max_clusters, list_stride;
    // The clustered layout, the same for every compressed (layer, KV head): they all cluster
    // the same spans at the same steps.
    int32_t   end, n_clusters, n_spans;
    int32_t * span_end;        // host [max_spans]
    int32_t * span_clusters;   // host [max_spans]
    uint64_t  layout;          // bumped whenever the three above (or window_sparse) change
    // streaming and quest: whether the current decode step reads lists (pos + 1 > budget;
    // below that their list is every position, which the dense kernel reads).
    bool      window_sparse;
    int32_t   n_pages;         // quest: pages of n_ctx positions
    __half *  page_min;        // quest: [P][n_pages][head_dim]
    __half *  page_max;
    // kv_offload (clusterkv): the compressed layers' K/V are in host memory; the GPU keeps
    // n_slots rows per problem for the positions the last step selected. The sparse decode reads
    // a position's slot when it has one (else host memory); the fetch that refills the slots with
    // this step's lists runs on fetch_stream while later layers compute, and the stream rejoins
    // the context's at the end of the step (cuda_kv_policy_join). Positions < cached_hi may be in
    // the slots.
    bool       offload;
    cudaStream_t fetch_stream;
    cudaEvent_t  attended_ev, fetched_ev;   // a layer's attention done; the step's fetches done
    bool         fetch_pending;             // fetches launched since the last join
    int32_t    n_slots, cached_hi;
    __half *   slot_k;         // [P][n_slots][head_dim]
    __half *   slot_v;
    int32_t *  slot_of;        // [P][n_ctx]
    int32_t *  slot_owner;     // [P][n_slots]
    uint32_t * slot_stamp;     // [P][n_slots]
    uint32_t * slot_epoch;     // [P]
    int32_t *  slot_scratch;   // [P][2][n_slots]
    unsigned long long * fetched;   // rows copied from host memory (stats)
    size_t     device_bytes;   // everything allocated above
    // Device state, problem p = compressed layer * n_head_kv + KV head.
    float *   centroids;       // [P][max_clusters][head_dim]
    int32_t * sizes;           // [P][max_clusters]
    int32_t * offsets;         // [P][max_clusters]
    int32_t * positions;       // [P][max_pos]
    int32_t * labels;          // [P][max_pos] k-means scratch
    int32_t * init_rows;       // [P][k of the span]
    int32_t * list_pos;        // [n_layer][n_head][list_stride] the last step's lists
    int32_t * list_n;          // [n_layer][n_head]
    uint64_t * sel_keys;       // [n_head][max_clusters] ranking keys, scoring to selection
    unsigned long long * attended;   // positions attended through lists (stats)
    void *    scratch;         // k-means scratch, grown on demand
    size_t    scratch_bytes;
    int32_t * h_init;          // host [P][max k]
    int32_t * perm;            // host [max_pos]
    // Stats kept on the host.
    int64_t n_attended_dense, n_cached;
    double  t_cluster_ms;
};

static int32_t ceil_div32(int32_t a, int32_t b) { return (a + b - 1) / b; }

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

static int32_t n_problems(const struct cuda_kv_policy * p) { return p->n_comp * p->n_head_kv; }

void cuda_kv_policy_free(struct cuda_kv_policy * p) {
    if (!p) {
        return;
    }
    void * dev[] = {p->centroids, p->sizes, p->offsets, p->positions, p->labels, p->init_rows,
                    p->list_pos, p->list_n, p->attended, p->scratch, p->page_min, p->page_max,
                    p->slot_k, p->slot_v, p->slot_of, p->slot_owner, p->slot_stamp, p->slot_epoch,
                    p->slot_scratch, p->fetched, p->sel_keys};
    for (void * d : dev) cudaFree(d);
    if (p->fetch_stream) {
        cudaStreamSynchronize(p->fetch_stream);
        cudaStreamDestroy(p->fetch_stream);
    }
    if (p->attended_ev) cudaEventDestroy(p->attended_ev);
    if (p->fetched_ev) cudaEventDestroy(p->fetched_ev);
    void * host[] = {p->comp_of, p->last_sparse, p->span_end, p->span_clusters, p->h_init, p->perm};
    for (void * h : host) free(h);
    free(p);
}

int32_t cuda_kv_policy_create(const struct ckv_kv_policy_params * params, const bool * layer_compressed,
                              const struct hparams * hp, int32_t n_ctx, bool offload,
                              struct cuda_kv_policy ** out) {
    *out = NULL;
    if (offload && params->policy != CKV_KV_POLICY_CLUSTERKV) {
        return ckv_fail(CKV_ERR_UNSUPPORTED, "kv_offload needs kv_policy clusterkv (got %s): the GPU keeps "
                        "only the positions it selects", kv_policy_name(params->policy));
    }
    const int32_t mode = params->policy == CKV_KV_POLICY_CLUSTERKV ? CKV_SELECT_CLUSTERS
                       : params->policy == CKV_KV_POLICY_QUEST     ? CKV_SELECT_PAGES
                       : params->policy == CKV_KV_POLICY_STREAMING ? CKV_SELECT_WINDOW : -1;
    if (mode < 0) {
        return ckv_fail(CKV_ERR_UNSUPPORTED, "kv_policy %s does not run on the GPU (full, streaming, "
                        "quest and clusterkv do); use n_gpu_layers=0", kv_policy_name(params->policy));
    }
    if (mode == CKV_SELECT_PAGES) {   // the selection ranks every page in shared memory
        struct cuda_select_args probe = {};
        probe.mode = CKV_SELECT_PAGES;
        probe.pos = n_ctx - 1;
        probe.page_size = params->page_size;
        size_t smem = ckv_cuda_select_smem_bytes(&probe);
        if (smem > CKV_SELECT_MAX_SMEM) {
            return ckv_fail(CKV_ERR_UNSUPPORTED, "quest on the GPU: %d pages of %d positions (n_ctx %d) "
                            "need %zu bytes of shared memory to rank, at most %d fit: use a larger page_size",
                            ceil_div32(n_ctx, params->page_size), params->page_size, n_ctx, smem,
                            (int) CKV_SELECT_MAX_SMEM);
        }
    }
    struct cuda_kv_policy * p = (struct cuda_kv_policy *) calloc(1, sizeof(*p));
    if (!p) {
        return ckv_fail(CKV_ERR_OOM, "out of host memory for the GPU KV policy");
    }
    p->params    = *params;
    p->mode      = mode;
    p->n_layer   = hp->n_layer;
    p->n_head    = hp->n_head;
    p->n_head_kv = hp->n_head_kv;
    p->head_dim  = hp->head_dim;
    p->n_ctx     = n_ctx;
    p->end       = params->n_sink;
    // The CPU policy's bounds (kv_policy_init_clusterkv): every span holds >= recluster_interval
    // positions and ceil(n / t) < n / t + 1 clusters.
    p->max_pos      = n_ctx > params->n_sink ? n_ctx - params->n_sink : 0;
    p->max_spans    = p->max_pos / params->recluster_interval + 1;
    p->max_clusters = ceil_div32(p->max_pos, params->tokens_per_cluster) + p->max_spans;
    p->list_stride  = (int32_t) kv_policy_max_list(params, n_ctx);
    p->offload      = offload;
    // Slots for the union of a group's lists (one list per KV head when selecting per KV head).
    const int64_t union_max = (int64_t) p->list_stride * (params->select_per_kv_head ? 1 : hp->n_head / hp->n_head_kv);
    p->n_slots      = offload ? (int32_t) (union_max < n_ctx ? union_max : n_ctx) : 0;
    for (int32_t il = 0; il < hp->n_layer; il++) {
        p->n_comp += layer_compressed[il];
    }
    const size_t P = (size_t) n_problems(p), d = (size_t) p->head_dim, pos = p->max_pos > 0 ? p->max_pos : 1;
    const size_t k_span = (size_t) ceil_div32((int32_t) pos, params->tokens_per_cluster);
    const bool   ckv = mode == CKV_SELECT_CLUSTERS, quest = mode == CKV_SELECT_PAGES;
    p->n_pages = quest ? ceil_div32(n_ctx, params->page_size) : 0;
    p->comp_of       = (int32_t *) malloc(sizeof(int32_t) * hp->n_layer);
    p->last_sparse   = (bool *) calloc((size_t) hp->n_layer, sizeof(bool));
    p->span_end      = (int32_t *) malloc(sizeof(int32_t) * p->max_spans);
    p->span_clusters = (int32_t *) malloc(sizeof(int32_t) * p->max_spans);
    p->perm          = (int32_t *) malloc(sizeof(int32_t) * pos);
    p->h_init        = (int32_t *) malloc(sizeof(int32_t) * (P > 0 ? P : 1) * k_span);
    if (!p->comp_of || !p->last_sparse || !p->span_end || !p->span_clusters || !p->perm || !p->h_init) {
        cuda_kv_policy_free(p);
        return ckv_fail(CKV_ERR_OOM, "out of host memory for the GPU KV policy");
    }
    for (int32_t il = 0, c = 0; il < hp->n_layer; il++) {
        p->comp_of[il] = layer_compressed[il] ? c++ : -1;
    }
    struct { void ** ptr; size_t bytes; } bufs[] = {
        {(void **) &p->centroids, ckv ? sizeof(float) * P * p->max_clusters * d : 0},
        {(void **) &p->sizes, ckv ? sizeof(int32_t) * P * p->max_clusters : 0},
        {(void **) &p->offsets, ckv ? sizeof(int32_t) * P * p->max_clusters : 0},
        {(void **) &p->positions, ckv ? sizeof(int32_t) * P * pos : 0},
        {(void **) &p->labels, ckv ? sizeof(int32_t) * P * pos : 0},
        {(void **) &p->init_rows, ckv ? sizeof(int32_t) * P * k_span : 0},
        {(void **) &p->page_min, sizeof(__half) * P * p->n_pages * d},
        {(void **) &p->page_max, sizeof(__half) * P * p->n_pages * d},
        {(void **) &p->slot_k, sizeof(__half) * P * p->n_slots * d},
        {(void **) &p->slot_v, sizeof(__half) * P * p->n_slots * d},
        {(void **) &p->slot_of, offload ? sizeof(int32_t) * P * n_ctx : 0},
        {(void **) &p->slot_owner, sizeof(int32_t) * P * p->n_slots},
        {(void **) &p->slot_stamp, sizeof(uint32_t) * P * p->n_slots},
        {(void **) &p->slot_epoch, offload ? sizeof(uint32_t) * P : 0},
        {(void **) &p->slot_scratch, sizeof(int32_t) * P * 2 * p->n_slots},
        {(void **) &p->fetched, sizeof(unsigned long long)},
        {(void **) &p->list_pos, sizeof(int32_t) * hp->n_layer * hp->n_head * (size_t) p->list_stride},
        {(void **) &p->list_n, sizeof(int32_t) * hp->n_layer * hp->n_head},
        {(void **) &p->sel_keys, ckv ? sizeof(uint64_t) * hp->n_head * p->max_clusters : 0},
        {(void **) &p->attended, sizeof(unsigned long long)},
    };
    size_t total = 0;
    for (auto & b : bufs) total += b.bytes;
    for (auto & b : bufs) {
        if (b.bytes && cudaMalloc(b.ptr, b.bytes) != cudaSuccess) {
            cudaGetLastError();
            cuda_kv_policy_free(p);
            return ckv_fail(CKV_ERR_OOM, "the %s state for n_ctx %d needs %.1f MiB of GPU memory: "
                            "out of memory", kv_policy_name(params->policy), n_ctx, total / 1048576.0);
        }
    }
    p->device_bytes = total;
    CKV_CUDA_CHECK(cudaMemset(p->attended, 0, sizeof(unsigned long long)));
    CKV_CUDA_CHECK(cudaMemset(p->fetched, 0, sizeof(unsigned long long)));
    if (offload) {   // no position resident, every slot empty and never stamped
        if (cudaStreamCreateWithFlags(&p->fetch_stream, cudaStreamNonBlocking) != cudaSuccess ||
            cudaEventCreateWithFlags(&p->attended_ev, cudaEventDisableTiming) != cudaSuccess ||
            cudaEventCreateWithFlags(&p->fetched_ev, cudaEventDisableTiming) != cudaSuccess) {
            cudaError_t err = cudaGetLastError();
            cuda_kv_policy_free(p);
            return ckv_fail(CKV_ERR_CUDA, "kv_offload: creating the fetch stream failed: %s", cudaGetErrorString(err));
        }
        CKV_CUDA_CHECK(cudaMemset(p->slot_of, 0xFF, sizeof(int32_t) * P * n_ctx));
        CKV_CUDA_CHECK(cudaMemset(p->slot_owner, 0xFF, sizeof(int32_t) * P * p->n_slots));
        CKV_CUDA_CHECK(cudaMemset(p->slot_stamp, 0, sizeof(uint32_t) * P * p->n_slots));
        CKV_CUDA_CHECK(cudaMemset(p->slot_epoch, 0, sizeof(uint32_t) * P));
    }
    *out = p;
    return CKV_OK;
}

uint64_t cuda_kv_policy_layout(const struct cuda_kv_policy * p) { return p->layout; }

void cuda_kv_policy_truncate(struct cuda_kv_policy * p, int32_t n_keep) {
    int32_t n_spans = p->n_spans;
    while (n_spans > 0 && p->span_end[n_spans - 1] > n_keep) {
        n_spans--;
    }
    if (n_spans != p->n_spans) {
        p->n_spans    = n_spans;
        p->end        = n_spans ? p->span_end[n_spans - 1] : p->params.n_sink;
        p->n_clusters = n_spans ? p->span_clusters[n_spans - 1] : 0;
        p->layout++;
    }
}

// Grows the k-means scratch to `bytes` (between steps only: never inside a graph).
static int32_t reserve_scratch(struct cuda_kv_policy * p, size_t bytes, cudaStream_t s) {
    if (bytes <= p->scratch_bytes) {
        return CKV_OK;
    }
    CKV_CUDA_CHECK(cudaStreamSynchronize(s));   // the old scratch may still be in use
    cudaFree(p->scratch);
    p->scratch_bytes = 0;
    if (cudaMalloc(&p->scratch, bytes) != cudaSuccess) {
        cudaGetLastError();
        p->scratch = NULL;
        return ckv_fail(CKV_ERR_OOM, "clusterkv: %.1f MiB of GPU k-means scratch: out of memory",
                        bytes / 1048576.0);
    }
    p->scratch_bytes = bytes;
    return CKV_OK;
}

// Calls fn(first, last) for every run [first, last) of consecutive compressed layers whose keys
// follow each other in memory (k_layers[il + 1] = k_layers[il] + n_head_kv * n_ctx * head_dim):
// their problems are consecutive, and their keys n_ctx * head_dim apart.
template <typename Fn>
static int32_t for_each_compressed_run(const struct cuda_kv_policy * p, const __half * const * k_layers, Fn && fn) {
    const size_t layer_elems = (size_t) p->n_head_kv * p->n_ctx * p->head_dim;
    for (int32_t first = 0; first < p->n_layer;) {
        if (p->comp_of[first] < 0) {
            first++;
            continue;
        }
        int32_t last = first + 1;
        while (last < p->n_layer && p->comp_of[last] >= 0 && k_layers[last] == k_layers[last - 1] + layer_elems) last++;
        TRY_OK(fn(first, last));
        first = last;
    }
    return CKV_OK;
}

// Clusters positions [start, stop) of every compressed (layer, KV head) into ceil(n /
// tokens_per_cluster) new clusters each, appended after the existing ones (append_clusters'
// layout). Problems of consecutive compressed layers share one batched k-means (their keys are
// n_ctx * head_dim apart in the cache).
static int32_t cluster_span(struct cuda_kv_policy * p, const __half * const * k_layers, int32_t start,
                            int32_t stop, cudaStream_t s) {
    const int32_t n = stop - start, k = ceil_div32(n, p->params.tokens_per_cluster), G = p->n_head_kv;
    const int32_t d = p->head_dim, n_sink = p->params.n_sink;
    for (int32_t il = 0; il < p->n_layer; il++) {   // the CPU policy's init rows
        for (int32_t g = 0; p->comp_of[il] >= 0 && g < G; g++) {
            clusterkv_span_init_rows(&p->params, il, g, start, n, k, p->perm);
            memcpy(p->h_init + ((size_t) p->comp_of[il] * G + g) * k, p->perm, sizeof(int32_t) * k);
        }
    }
    CKV_CUDA_CHECK(cudaMemcpyAsync(p->init_rows, p->h_init, sizeof(int32_t) * n_problems(p) * k,
                                   cudaMemcpyHostToDevice, s));
    TRY_OK(for_each_compressed_run(p, k_layers, [&](int32_t first, int32_t last) -> int32_t {
        const int32_t P = (last - first) * G, p0 = p->comp_of[first] * G;
        TRY_OK(reserve_scratch(p, ckv_cuda_kmeans_scratch_bytes(P, n, k, d), s));
        struct cuda_kmeans_args a = {};
        a.x           = k_layers[first] + (size_t) start * d;   // host memory under kv_offload
        a.x_f16       = true;
        a.x_stride    = (int64_t) p->n_ctx * d;
        a.n_problems  = P;
        a.n           = n;
        a.d           = d;
        a.k           = k;
        a.max_iter    = p->params.kmeans_iters;
        a.init_rows   = p->init_rows + (size_t) p0 * k;
        a.cent_stride = (int64_t) p->max_clusters * d;
        a.centroids   = p->centroids + p0 * a.cent_stride + (int64_t) p->n_clusters * d;
        a.csr_stride  = p->max_clusters;
        a.sizes       = p->sizes + p0 * a.csr_stride + p->n_clusters;
        a.offsets     = p->offsets + p0 * a.csr_stride + p->n_clusters;
        a.pos_stride  = p->max_pos;
        a.positions   = p->positions + p0 * a.pos_stride + (start - n_sink);
        a.start       = start;
        a.pos_base    = start - n_sink;
        a.labels      = p->labels;
        a.scratch     = p->scratch;
        return ckv_cuda_kmeans(&a, s);
    }));
    p->n_clusters += k;
    p->end = stop;
    p->span_end[p->n_spans]      = stop;
    p->span_clusters[p->n_spans] = p->n_clusters;
    p->n_spans++;
    p->layout++;
    return CKV_OK;
}

int32_t cuda_kv_policy_prepare(struct cuda_kv_policy * p, const __half * const * k_layers, int32_t pos,
                               bool decode_step, cudaStream_t s) {
    cuda_kv_policy_truncate(p, pos);
    if (p->offload && pos < p->cached_hi) {   // positions >= pos get new rows: drop their slots
        TRY_OK(ckv_cuda_kv_fetch_forget(p->slot_of, p->slot_owner, n_problems(p), p->n_ctx, p->n_slots, pos,
                                        p->cached_hi, s));
        p->cached_hi = pos;
    }
    if (p->offload && decode_step) {
        p->cached_hi = pos + 1;
    }
    if (p->mode != CKV_SELECT_CLUSTERS) {
        bool sparse = decode_step ? pos + 1 > p->params.budget : p->window_sparse;
        if (sparse != p->window_sparse) {   // the decode graph switches kernels
            p->window_sparse = sparse;
            p->layout++;
        }
        return CKV_OK;
    }
    if (!decode_step || p->n_comp == 0 || pos - p->end < p->params.recluster_interval) {
        return CKV_OK;
    }
    double t0 = now_ms();
    TRY_OK(cluster_span(p, k_layers, p->end, pos, s));
    CKV_CUDA_CHECK(cudaStreamSynchronize(s));   // once per span: the time goes to the stats
    p->t_cluster_ms += now_ms() - t0;
    return CKV_OK;
}

int32_t cuda_kv_policy_stored(struct cuda_kv_policy * p, const __half * const * k_layers, int32_t pos0,
                              int32_t n, cudaStream_t s) {
    if (p->mode != CKV_SELECT_PAGES || n <= 0) {
        return CKV_OK;
    }
    const int32_t G = p->n_head_kv, d = p->head_dim;
    return for_each_compressed_run(p, k_layers, [&](int32_t first, int32_t last) -> int32_t {
        const int64_t p0 = (int64_t) p->comp_of[first] * G, page_stride = (int64_t) p->n_pages * d;
        struct cuda_quest_pages_args a = {};
        a.k           = k_layers[first];
        a.k_stride    = (int64_t) p->n_ctx * d;
        a.n_problems  = (last - first) * G;
        a.d           = d;
        a.page_size   = p->params.page_size;
        a.pos0        = pos0;
        a.n           = n;
        a.page_min    = p->page_min + p0 * page_stride;
        a.page_max    = p->page_max + p0 * page_stride;
        a.page_stride = page_stride;
        return ckv_cuda_quest_pages(&a, s);
    });
}

bool cuda_kv_policy_sparse(const struct cuda_kv_policy * p, int32_t il) {
    if (p->comp_of[il] < 0) {
        return false;
    }
    if (p->mode != CKV_SELECT_CLUSTERS) {
        return p->window_sparse;
    }
    // room = budget - sinks < clustered = end - n_sink (with clusters, pos >= end > n_sink)
    return p->n_clusters > 0 && p->params.budget < p->end;
}

// kv_offload, after layer il's sparse decode: the slots take this step's lists (the rows the
// next step will most likely list again), on fetch_stream so later layers need not wait.
static int32_t fetch_after_attention(struct cuda_kv_policy * p, const struct cuda_select_args * sa,
                                     const struct cuda_policy_attend_args * at, int64_t p0, cudaStream_t s) {
    const int32_t d = p->head_dim;
    struct cuda_kv_fetch_args fa = {};
    fa.list_pos    = sa->list_pos;
    fa.list_n      = sa->list_n;
    fa.list_stride = p->list_stride;
    fa.n_head      = p->n_head;
    fa.n_head_kv   = p->n_head_kv;
    fa.head_dim    = d;
    fa.src_k       = at->k_layer;
    fa.src_v       = at->v_layer;
    fa.n_ctx       = p->n_ctx;
    fa.n_slots     = p->n_slots;
    fa.slot_k      = p->slot_k + p0 * p->n_slots * d;
    fa.slot_v      = p->slot_v + p0 * p->n_slots * d;
    fa.slot_of     = p->slot_of + p0 * p->n_ctx;
    fa.owner       = p->slot_owner + p0 * p->n_slots;
    fa.stamp       = p->slot_stamp + p0 * p->n_slots;
    fa.epoch       = p->slot_epoch + p0;
    fa.scratch     = p->slot_scratch + p0 * 2 * p->n_slots;
    fa.n_copied    = p->fetched;
    CKV_CUDA_CHECK(cudaEventRecord(p->attended_ev, s));
    CKV_CUDA_CHECK(cudaStreamWaitEvent(p->fetch_stream, p->attended_ev, 0));
    TRY_OK(ckv_cuda_kv_fetch(&fa, p->fetch_stream));
    p->fetch_pending = true;
    return CKV_OK;
}

int32_t cuda_kv_policy_attend(struct cuda_kv_policy * p, const struct cuda_policy_attend_args * at,
                              cudaStream_t s) {
    const int32_t il = at->il, G = p->n_head_kv, d = p->head_dim, n_sink = p->params.n_sink;
    const int64_t p0 = (int64_t) p->comp_of[il] * G;
    // A clusterkv graph serves every position until the next span, pos < end +
    // recluster_interval; a streaming or quest graph every position.
    int32_t pos_max = at->pos;
    if (at->pos_dev) {
        int64_t bound = p->mode == CKV_SELECT_CLUSTERS ? (int64_t) p->end + p->params.recluster_interval - 1
                                                       : p->n_ctx - 1;
        pos_max = (int32_t) (bound < p->n_ctx - 1 ? bound : p->n_ctx - 1);
    }
    const int32_t room = p->params.budget - n_sink;
    struct cuda_select_args sa = {};
    sa.q           = at->q;
    sa.cent_stride = (int64_t) p->max_clusters * d;
    sa.centroids   = p->centroids + p0 * sa.cent_stride;
    sa.csr_stride  = p->max_clusters;
    sa.sizes       = p->sizes + p0 * sa.csr_stride;
    sa.offsets     = p->offsets + p0 * sa.csr_stride;
    sa.pos_stride  = p->max_pos;
    sa.positions   = p->positions + p0 * sa.pos_stride;
    sa.n_head      = p->n_head;
    sa.n_head_kv   = G;
    sa.d           = d;
    sa.n_clusters  = p->n_clusters;
    sa.n_sink      = n_sink;
    sa.end         = p->end;
    sa.pos         = pos_max;
    sa.room        = room;
    sa.per_kv_head = p->params.select_per_kv_head != 0;
    sa.keys        = p->sel_keys;
    sa.list_stride = p->list_stride;
    sa.list_pos    = p->list_pos + (int64_t) il * p->n_head * p->list_stride;
    sa.list_n      = p->list_n + (int64_t) il * p->n_head;
    sa.pos_dev     = at->pos_dev;
    sa.n_attended  = p->attended;
    sa.mode        = p->mode;
    sa.budget      = p->params.budget;
    sa.page_size   = p->params.page_size;
    if (p->mode == CKV_SELECT_PAGES) {
        sa.page_stride = (int64_t) p->n_pages * d;
        sa.page_min    = p->page_min + p0 * sa.page_stride;
        sa.page_max    = p->page_max + p0 * sa.page_stride;
        sa.per_kv_head = false;   // quest ranks per query head (as on the CPU)
    }
    TRY_OK(ckv_cuda_select(&sa, s));

    int32_t max_list;
    if (p->mode == CKV_SELECT_CLUSTERS) {
        int32_t clustered_taken = room < p->end - n_sink ? room : p->end - n_sink;
        max_list = n_sink + clustered_taken + (pos_max + 1 - p->end);
    } else {
        max_list = p->params.budget < pos_max + 1 ? p->params.budget : pos_max + 1;
    }
    int32_t n_split = ckv_cuda_sparse_attention_splits(p->n_head, max_list);
    int64_t fit = at->partial_cap / p->n_head;
    n_split = n_split < fit ? n_split : (int32_t) (fit > 1 ? fit : 1);
    struct cuda_sparse_attention_args aa = {at->q, at->k_layer, at->v_layer, p->n_ctx, sa.list_pos, sa.list_n,
                                            p->list_stride, max_list, at->out, at->partial, p->n_head, G, d,
                                            n_split, at->scale, at->out_q,
                                            p->mode == CKV_SELECT_CLUSTERS && p->params.select_per_kv_head != 0};
    if (p->offload) {   // resident rows from the slots, the others over PCIe
        aa.slot_of = p->slot_of + p0 * p->n_ctx;
        aa.slot_k  = p->slot_k + p0 * p->n_slots * d;
        aa.slot_v  = p->slot_v + p0 * p->n_slots * d;
        aa.n_slots = p->n_slots;
    }
    TRY_OK(ckv_cuda_sparse_attention(&aa, s));
    return p->offload ? fetch_after_attention(p, &sa, at, p0, s) : CKV_OK;
}

int32_t cuda_kv_policy_join(struct cuda_kv_policy * p, cudaStream_t s) {
    if (!p || !p->fetch_pending) {
        return CKV_OK;
    }
    CKV_CUDA_CHECK(cudaEventRecord(p->fetched_ev, p->fetch_stream));
    CKV_CUDA_CHECK(cudaStreamWaitEvent(s, p->fetched_ev, 0));
    p->fetch_pending = false;
    return CKV_OK;
}

void cuda_kv_policy_count_step(struct cuda_kv_policy * p, int32_t pos, bool decode_step) {
    for (int32_t il = 0; il < p->n_layer; il++) {
        p->last_sparse[il] = decode_step && cuda_kv_policy_sparse(p, il);
        if (p->comp_of[il] < 0 || !decode_step) {
            continue;
        }
        p->n_cached += (int64_t) p->n_head * (pos + 1);
        if (!p->last_sparse[il]) {
            p->n_attended_dense += (int64_t) p->n_head * (pos + 1);
        }
    }
}

int32_t cuda_kv_policy_stats(const struct cuda_kv_policy * p, struct ckv_kv_stats * out, cudaStream_t s) {
    unsigned long long sparse = 0, fetched = 0;
    CKV_CUDA_CHECK(cudaMemcpyAsync(&sparse, p->attended, sizeof(sparse), cudaMemcpyDeviceToHost, s));
    CKV_CUDA_CHECK(cudaMemcpyAsync(&fetched, p->fetched, sizeof(fetched), cudaMemcpyDeviceToHost, s));
    CKV_CUDA_CHECK(cudaStreamSynchronize(s));
    out->n_fetched    = (int64_t) fetched;
    out->n_attended   = p->n_attended_dense + (int64_t) sparse;
    out->n_cached     = p->n_cached;
    out->t_cluster_ms = p->t_cluster_ms;
    out->t_select_ms  = 0.0;
    out->n_clusters   = p->n_clusters * n_problems(p);
    return CKV_OK;
}

int32_t cuda_kv_policy_reset_stats(struct cuda_kv_policy * p, cudaStream_t s) {
    p->n_attended_dense = p->n_cached = 0;
    p->t_cluster_ms = 0.0;
    CKV_CUDA_CHECK(cudaMemsetAsync(p->attended, 0, sizeof(unsigned long long), s));
    CKV_CUDA_CHECK(cudaMemsetAsync(p->fetched, 0, sizeof(unsigned long long), s));
    return CKV_OK;
}

size_t cuda_kv_policy_device_bytes(const struct cuda_kv_policy * p) { return p->device_bytes; }

size_t cuda_kv_policy_slot_bytes(const struct cuda_kv_policy * p) {
    return 2 * sizeof(__half) * (size_t) n_problems(p) * p->n_slots * p->head_dim;
}

int32_t cuda_kv_policy_n_clusters(const struct cuda_kv_policy * p, int32_t il) {
    return p->comp_of[il] >= 0 ? p->n_clusters : 0;
}

int32_t cuda_kv_policy_selection(const struct cuda_kv_policy * p, int32_t il, int32_t h, int32_t * buf,
                                 int32_t cap, int32_t * n, bool * sparse, cudaStream_t s) {
    *sparse = p->last_sparse[il];
    if (!*sparse) {
        return CKV_OK;
    }
    const int64_t row = (int64_t) il * p->n_head + h;
    CKV_CUDA_CHECK(cudaMemcpyAsync(n, p->list_n + row, sizeof(int32_t), cudaMemcpyDeviceToHost, s));
    CKV_CUDA_CHECK(cudaStreamSynchronize(s));
    if (!buf || cap < *n) {
        return ckv_fail(CKV_ERR_BUFFER_TOO_SMALL, "buffer of %d positions is too small: %d needed", cap, *n);
    }
    CKV_CUDA_CHECK(cudaMemcpyAsync(buf, p->list_pos + row * p->list_stride, sizeof(int32_t) * *n,
                                   cudaMemcpyDeviceToHost, s));
    CKV_CUDA_CHECK(cudaStreamSynchronize(s));
    return CKV_OK;
}
