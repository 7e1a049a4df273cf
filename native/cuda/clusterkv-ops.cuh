// clusterkv-ops.cuh - the ClusterKV building blocks on the GPU (issue 6, internal): batched
// cosine k-means with the CSR cluster index, budgeted cluster selection, and the sparse
// flash-decode that reads K/V through per-head position lists. Each launcher mirrors a CPU twin
// (named per launcher) on device pointers; tests/native/test-cuda-clusterkv.cu compares every
// pair. As in cuda-ops.cuh, launchers check shapes, launch on the given stream and return a
// ckv_status; they never synchronise. Scratch is passed in, sized by the *_scratch_bytes
// helpers, so nothing is allocated per call.
#ifndef CKV_CLUSTERKV_OPS_CUH
#define CKV_CLUSTERKV_OPS_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

// --- batched cosine k-means -------------------------------------------------------------------
//
// n_problems independent problems of the same shape (every (layer, KV head) of one span): rows
// x[p][i] (i < n, d values) are clustered into k clusters exactly as kmeans_cosine_run does
// (kmeans.h): centroids start as rows init_rows[p][0..k); assign = argmax_j x . c_j / |c_j|
// (lowest j on ties; the normalised table is built like the CPU's, f64 norm); then up to
// max_iter times: update (c_j = mean of the raw member rows, summed in f64 in ascending row
// order, so identical to the CPU's for identical labels; an empty cluster keeps c_j), assign,
// and stop once no label changed. Each problem stops on its own (a device flag per problem),
// and the launch sequence never waits for the host. f16 rows aligned to 16 bytes (the KV
// cache) are assigned on the tensor cores against centroids split in two f16 parts (~22 bits,
// f32 accumulation): labels then match the CPU's f32 ones except where two cosines tie to
// within rounding (the tests bound that at 0.1% of rows).
//
// Outputs per problem, as append_clusters (kvpolicy-clusterkv.c) writes them: centroids [k][d],
// sizes [k], offsets [k] (= pos_base + start of the cluster in positions), positions [n] (= start
// + row, grouped by cluster, ascending inside a cluster), labels [n], n_iter (updates run).
// Twin: kmeans_cosine_run + append_clusters.
struct cuda_kmeans_args {
    const void *    x;              // rows of problem p at x + p * x_stride (elements), f16 or f32
    bool            x_f16;
    int64_t         x_stride;       // elements between problems (KV cache: n_ctx * head_dim)
    int32_t         n_problems;
    int32_t         n;              // rows per problem, >= 1
    int32_t         d;              // values per row, 32 .. 256, a multiple of 32
    int32_t         k;              // clusters per problem, 1 <= k <= n
    int32_t         max_iter;       // >= 1
    const int32_t * init_rows;      // device [n_problems][k] (kmeans_init_rows or kmeans_strided_rows,
                                    // host-computed)
    float *         centroids;      // out, problem p at centroids + p * cent_stride, [k][d]
    int64_t         cent_stride;    // floats
    int32_t *       sizes;          // out, problem p at sizes + p * csr_stride, [k]
    int32_t *       offsets;        // out, likewise
    int64_t         csr_stride;     // int32s
    int32_t *       positions;      // out, problem p at positions + p * pos_stride, [n]
    int64_t         pos_stride;     // int32s
    int32_t         start;          // position of row 0 (added to positions)
    int32_t         pos_base;       // added to offsets
    int32_t *       labels;         // out [n_problems][n] (also the working labels)
    int32_t *       n_iter;         // out [n_problems], or NULL
    void *          scratch;        // ckv_cuda_kmeans_scratch_bytes(n_problems, n, k, d)
};
size_t  ckv_cuda_kmeans_scratch_bytes(int32_t n_problems, int32_t n, int32_t k, int32_t d);
int32_t ckv_cuda_kmeans(const struct cuda_kmeans_args * a, cudaStream_t s);

// --- cluster selection --------------------------------------------------------------------------
//
// One decode step of one compressed layer, as clusterkv_select / select_list do it once the
// layer is clustered (kvpolicy-clusterkv.c): for query head h (KV head g = h / group) the list
// is the sinks [0, min(n_sink, pos + 1)), then the clustered positions [n_sink, end) chosen by
// cluster_select (kmeans.c) on scores q_h . centroid (f32) with budget `room` (clusters whole
// in descending score, ties to the lower index, NaN as -inf, the last one cut to its first
// members), in ascending order, then the tail [end, pos]. The caller derives room from its
// budget rule (select_list's), so that rule lives in one place. With per_kv_head the group's
// summed query (summed in head order, f32) ranks once and all its heads get that list.
// The order is found by a weighted radix select on the 64-bit rank key (score bits, index):
// exact for any number of clusters. Twin: clusterkv_select (+ cluster_select).
//
// The same kernel serves the two other GPU policies, whose lists have the same shape (sinks,
// chosen positions ascending, tail) but whose layout follows the position read at run time:
//   CKV_SELECT_PAGES (quest, twin quest_select): the "clusters" are the pages [first, cur) of
//     page_size positions (first = the page holding the first non-sink position, cur = the page
//     of pos, a page overlapping the sinks counting only its non-sink positions), scored by
//     sum_i max(q_i * min_i, q_i * max_i) summed as page_bound_scalar does (so the bounds are
//     the CPU's bit for bit); the tail is the current page, room = budget - sinks - tail;
//   CKV_SELECT_WINDOW (streaming, twin streaming_select): nothing is scored; the tail is the
//     budget - sinks most recent positions.
// In these modes end, room and n_clusters are derived from the position (fields ignored).
enum cuda_select_mode { CKV_SELECT_CLUSTERS = 0, CKV_SELECT_PAGES = 1, CKV_SELECT_WINDOW = 2 };
struct cuda_select_args {
    const float *   q;              // device [n_head][d]
    const float *   centroids;      // KV head g at centroids + g * cent_stride, [n_clusters][d]
    int64_t         cent_stride;
    const int32_t * sizes;          // KV head g at sizes + g * csr_stride
    const int32_t * offsets;
    int64_t         csr_stride;
    const int32_t * positions;      // KV head g at positions + g * pos_stride
    int64_t         pos_stride;
    int32_t         n_head, n_head_kv, d;
    int32_t         n_clusters;     // per KV head (>= 0)
    int32_t         n_sink;
    int32_t         end;            // [n_sink, end) is clustered
    int32_t         pos;            // the current position (end <= pos)
    int32_t         room;           // positions to take from the clusters, >= 0
    bool            per_kv_head;
    int32_t *       list_pos;       // out [n_head][list_stride]
    int32_t *       list_n;         // out [n_head]
    int64_t         list_stride;    // >= sinks + min(room, end - n_sink) + tail
    float *         scores;         // out [n_lists][n_clusters] or NULL (n_lists = n_head, or
                                    // n_head_kv with per_kv_head)
    uint64_t *      keys;           // clusters: device scratch [n_lists][n_clusters], the ranking
                                    // keys the scoring launch hands to the selection
    int32_t *       chosen;         // out [n_lists][n_clusters] cluster_select's order, or NULL
    int32_t *       n_chosen;       // out [n_lists], with chosen
    // Decode graphs: the position is read from *pos_dev at run time, and `pos` above is then only
    // the largest position the launch may see (it sizes the argument check). NULL: use pos.
    const int32_t * pos_dev;
    unsigned long long * n_attended;  // += every list's length (stats), or NULL
    int32_t         mode;           // cuda_select_mode (0: clusters, as above)
    int32_t         budget;         // pages, window: the longest list
    int32_t         page_size;      // pages
    const __half *  page_min;       // pages: KV head g at page_min + g * page_stride, [page][d]
    const __half *  page_max;
    int64_t         page_stride;
};
int32_t ckv_cuda_select(const struct cuda_select_args * a, cudaStream_t s);
// Shared memory one launch needs (keys, page sizes and a bitmap for the largest layout up to
// a->pos); launches needing more than CKV_SELECT_MAX_SMEM fail with CKV_ERR_UNSUPPORTED.
enum { CKV_SELECT_MAX_SMEM = 200 * 1024 };
size_t  ckv_cuda_select_smem_bytes(const struct cuda_select_args * a);

// --- quest page bounds ---------------------------------------------------------------------------
//
// After positions [pos0, pos0 + n) were stored: every page they touch gets the element-wise min
// and max of its keys [page start, min(page end, pos0 + n)), read back from the f16 cache (the
// page's earlier keys are there too, so a truncated cache needs no undo). f16 min/max of f16
// keys are exact: the same values quest_on_store keeps in f32. Twin: quest_on_store.
struct cuda_quest_pages_args {
    const __half * k;               // problem p's keys at k + p * k_stride, [n_ctx][d]
    int64_t        k_stride;
    int32_t        n_problems;
    int32_t        d;               // <= 256
    int32_t        page_size;
    int32_t        pos0, n;
    __half *       page_min;        // problem p's pages at page_min + p * page_stride, [page][d]
    __half *       page_max;
    int64_t        page_stride;
};
int32_t ckv_cuda_quest_pages(const struct cuda_quest_pages_args * a, cudaStream_t s);

// --- host offload: the GPU's cache of selected rows ----------------------------------------------
//
// With kv_offload the K/V of a compressed layer live in host memory (pinned, mapped: the GPU
// reads them over PCIe) and the GPU keeps n_slots rows per (layer, KV head) for the positions
// the last step selected. A step's sparse decode reads a listed position from its slot when it
// has one and from host memory otherwise (cuda_sparse_attention_args.slot_of); afterwards, off
// the critical path (a side stream, while later layers compute), the fetch brings the step's
// lists into the slots: a resident position keeps its slot and is not copied again; a missing
// one takes a slot that no list of this step references (its old position is evicted) and its K
// and V rows are copied from host memory. n_slots >= the size of the union of a group's lists
// leaves a free slot for every miss. One block per KV head; nothing is read back by the host.
struct cuda_kv_fetch_args {
    const int32_t * list_pos;       // [n_head][list_stride] positions (the selection)
    const int32_t * list_n;         // [n_head]
    int64_t         list_stride;
    int32_t         n_head, n_head_kv, head_dim;
    const __half *  src_k;          // KV head g's rows at src_k + g * n_ctx * head_dim (host memory)
    const __half *  src_v;
    int32_t         n_ctx;
    __half *        slot_k;         // KV head g's slots at slot_k + g * n_slots * head_dim
    __half *        slot_v;
    int32_t         n_slots;
    int32_t *       slot_of;        // [n_head_kv][n_ctx]: the slot holding a position, -1: none
    int32_t *       owner;          // [n_head_kv][n_slots]: the position a slot holds, -1: none
    uint32_t *      stamp;          // [n_head_kv][n_slots]: the last fetch that used the slot
    uint32_t *      epoch;          // [n_head_kv]: fetches run so far
    int32_t *       scratch;        // [n_head_kv][2][n_slots]: misses, free slots
    unsigned long long * n_copied;  // += rows copied from host memory (stats), or NULL
};
int32_t ckv_cuda_kv_fetch(const struct cuda_kv_fetch_args * a, cudaStream_t s);
// Forgets positions [from, to) of n_problems (layer, KV head) slot maps (slot_of [n_ctx] and
// owner [n_slots] per problem), before those positions are overwritten.
int32_t ckv_cuda_kv_fetch_forget(int32_t * slot_of, int32_t * owner, int32_t n_problems, int32_t n_ctx,
                                 int32_t n_slots, int32_t from, int32_t to, cudaStream_t s);

// --- sparse flash-decode ------------------------------------------------------------------------
//
// out[h] = softmax_j(scale q[h] . K[g][j]) . V[g][j] over the positions j of list h (g = h /
// group), read in place from one layer of the f16 cache ([n_head_kv][n_ctx][head_dim]), f32
// accumulation. Each list is cut into n_split <= 64 contiguous chunks (blocks) merged with the
// online softmax rule; an empty list gives zeros. Twin: ops_attention_selected.
struct cuda_sparse_attention_args {
    const float *   q;              // [n_head][head_dim]
    const __half *  k_cache;        // one layer
    const __half *  v_cache;
    int32_t         n_ctx;
    const int32_t * list_pos;       // [n_head][list_stride], positions < n_ctx
    const int32_t * list_n;         // [n_head] (device)
    int64_t         list_stride;
    int32_t         max_list;       // >= every list_n: sizes the chunks
    float *         out;            // [n_head][head_dim]
    float *         partial;        // [n_head][n_split][head_dim + 4] (n_split > 1)
    int32_t         n_head, n_head_kv, head_dim;   // head_dim 64, 128 or 256
    int32_t         n_split;        // >= 1
    float           scale;
    void *          out_q;          // NULL, or out also quantised (cq8x [n_head * head_dim / 32],
                                    // as ckv_cuda_quantize_q8 writes it) for the next GEMV
    bool            shared_lists;   // every head of a KV group has its first head's list (per-KV-
                                    // head selection): each row is read once for the group
    // kv_offload (NULL otherwise): k_cache / v_cache are in host memory and position p of KV head
    // g is read from slot slot_of[g * n_ctx + p] of slot_k / slot_v ([n_head_kv][n_slots][head_dim])
    // when that is >= 0 (the row is on the GPU), else from the cache over PCIe.
    const int32_t * slot_of;
    const __half *  slot_k;
    const __half *  slot_v;
    int32_t         n_slots;
};
// A split count that fills the GPU for lists of up to max_list positions.
int32_t ckv_cuda_sparse_attention_splits(int32_t n_head, int32_t max_list);
int32_t ckv_cuda_sparse_attention(const struct cuda_sparse_attention_args * a, cudaStream_t s);

#endif  // CKV_CLUSTERKV_OPS_CUH
