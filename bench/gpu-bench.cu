// gpu-bench.cu - llama-bench's workloads on the CUDA backend, driven through cuda-backend.h
// (issue 5; bench/gpu.py runs it next to llama-bench and compares).
//
//   bench-cuda MODEL [--reps R] [--ubatch U] [--pp N,...] [--tg N] [--depths D,...]
//              [--kv-policy full|streaming|quest|clusterkv] [--kv-budget B] [--per-kv-head 0|1]
//              [--kv-offload 0|1] [--batch N]
//
// As llama-bench: random token ids, f16 KV cache, one untimed warm-up, then R timed
// repetitions; ppN = one N-token prompt from an empty cache (U tokens per forward call, logits
// of the last token only); tgN @ depth D = N single-token decodes (logits of each copied to the
// host, greedy argmax) after D positions were prefilled untimed. A depth prefill of more than
// 4096 positions runs once and is also reported as pp<D> (one sample, no warm-up): the prompt
// of the same length from an empty cache, so a 32k test is not paid twice.
//
// With --kv-policy clusterkv (issue 6) the tg tests decode under ClusterKV at budget B (the
// library's other defaults: 16 sinks, 2 dense layers, 80 tokens per cluster, re-clustering
// every 320 tokens): the first, untimed decode clusters the prompt (its time is reported as
// cluster_prompt_ms, next to the prefill's), and after the timed repetitions one more run of
// recluster_interval + 1 steps crosses a re-clustering and reports its tokens/s with the span's
// clustering time (tg_with_span_ts, cluster_span_ms). --kv-policy streaming or quest decodes
// under that policy at budget B (the same fields; their clustering times are 0). --kv-offload 1
// (clusterkv) keeps the compressed layers' KV in pinned host memory and reports the GPU and host
// KV bytes and the rows fetched from host memory per decode step. --batch N (<= 64) prefills N
// sequences to each depth and decodes them together (ckv_cuda_decode_batch); tg tokens/s are
// then those of all N sequences. --profile-steps N decodes N more steps after the warm-up
// between cudaProfilerStart and Stop (for `ncu --profile-from-start off`), untimed.
//
// Prints one JSON object: the device, the weight bytes one decode step reads (every matrix
// but the embedding table) and the KV bytes per cached position, and per test the samples in
// tokens/s.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_profiler_api.h>

#include "clusterkv.h"
#include "cuda-backend.h"

extern "C" {
#include "kvpolicy.h"
#include "model.h"
}

enum { MAX_LIST = 16, MAX_REPS = 64, MAX_BATCH = 64 };

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

#define CHECK(call)                                                                          \
    do {                                                                                     \
        int32_t st_ = (call);                                                                \
        if (st_ != CKV_OK) {                                                                 \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, ckv_status_name(st_),      \
                    ckv_last_error());                                                       \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

static int parse_list(const char * s, int * out) {
    int n = 0;
    while (s && *s && n < MAX_LIST) {
        out[n++] = atoi(s);
        s = strchr(s, ',');
        s = s ? s + 1 : NULL;
    }
    return n;
}

struct bench {
    const struct cuda_model *   gm;
    int                         n_vocab, ubatch;
    float *                     logits;   // [n_vocab]
    int32_t *                   tokens;   // [ubatch] random ids
    bool                        first_test;
    struct ckv_kv_policy_params kv;       // the tg tests' policy
    bool *                      layer_compressed;
    bool                        offload;  // --kv-offload 1: the compressed layers' KV in host memory
    int                         batch;    // --batch N: tg decodes N sequences together
    int                         profile_steps;   // --profile-steps N: decode steps inside cudaProfilerStart/Stop
};

// Fields after the samples (extra: "" or ", \"key\": value, ...").
static void print_test(struct bench * b, const char * name, int n_prompt, int n_gen, int depth,
                       const double * ts, int n, const char * extra) {
    double mean = 0.0, sd = 0.0;
    for (int i = 0; i < n; i++) mean += ts[i] / n;
    for (int i = 0; i < n; i++) sd += (ts[i] - mean) * (ts[i] - mean) / (n > 1 ? n - 1 : 1);
    printf("%s\n    {\"test\": \"%s\", \"n_prompt\": %d, \"n_gen\": %d, \"n_depth\": %d, \"avg_ts\": %.3f, "
           "\"stddev_ts\": %.3f, \"samples_ts\": [", b->first_test ? "" : ",", name, n_prompt, n_gen,
           depth, mean, sqrt(sd));
    for (int i = 0; i < n; i++) printf("%s%.3f", i ? ", " : "", ts[i]);
    printf("]%s}", extra);
    fflush(stdout);
    b->first_test = false;
}

// Prefills positions [0, n) of sequences [0, n_seq) in ubatch chunks; logits of the last token
// only. Seconds.
static double prefill(struct bench * b, struct cuda_context * gc, int n, int n_seq) {
    double t0 = now_s();
    for (int seq = 0; seq < n_seq; seq++) {
        for (int pos = 0; pos < n; pos += b->ubatch) {
            int chunk = n - pos < b->ubatch ? n - pos : b->ubatch;
            CHECK(ckv_cuda_decode(gc, seq, b->tokens, chunk, pos, pos + chunk < n ? chunk : chunk - 1, b->logits,
                                  false, NULL));
        }
    }
    return now_s() - t0;
}

static int argmax(const float * row, int n) {
    int best = 0;
    for (int v = 1; v < n; v++) best = row[v] > row[best] ? v : best;
    return best;
}

// n_gen greedy decode steps at positions depth, depth + 1, ...: one token of sequence 0 per
// step, or (--batch N) one token of each of N sequences, decoded together. Seconds.
static double generate(struct bench * b, struct cuda_context * gc, int depth, int n_gen) {
    int32_t tok[MAX_BATCH], seqs[MAX_BATCH], pos[MAX_BATCH];
    for (int s = 0; s < b->batch; s++) tok[s] = b->tokens[s];
    double t0 = now_s();
    for (int i = 0; i < n_gen; i++) {
        if (b->batch == 1) {
            CHECK(ckv_cuda_decode(gc, 0, tok, 1, depth + i, 0, b->logits, true, NULL));
        } else {
            for (int s = 0; s < b->batch; s++) seqs[s] = s, pos[s] = depth + i;
            CHECK(ckv_cuda_decode_batch(gc, seqs, tok, pos, b->batch, b->logits));
        }
        for (int s = 0; s < b->batch; s++) tok[s] = argmax(b->logits + (size_t) s * b->n_vocab, b->n_vocab);
    }
    return now_s() - t0;
}

static void bench_pp(struct bench * b, int n_prompt, int reps) {
    struct cuda_context * gc = NULL;
    CHECK(ckv_cuda_context_create(b->gm, n_prompt, b->ubatch, 1, NULL, &gc));
    double ts[MAX_REPS];
    prefill(b, gc, n_prompt, 1);   // warm-up
    for (int r = 0; r < reps; r++) ts[r] = n_prompt / prefill(b, gc, n_prompt, 1);
    char name[32];
    snprintf(name, sizeof(name), "pp%d", n_prompt);
    print_test(b, name, n_prompt, 0, 0, ts, reps, "");
    ckv_cuda_context_free(gc);
}

static double cluster_ms(struct cuda_context * gc) {
    struct ckv_kv_stats st = {};
    CHECK(ckv_cuda_kv_stats(gc, &st));
    return st.t_cluster_ms;
}

static void bench_tg(struct bench * b, int n_gen, int depth, int reps) {
    const bool policy = b->kv.policy != CKV_KV_POLICY_FULL;
    const int  span_run = policy ? b->kv.recluster_interval + 1 : 0;
    struct cuda_context * gc = NULL;
    CHECK(ckv_cuda_context_create(b->gm, depth + (n_gen > span_run ? n_gen : span_run) + 1, b->ubatch, b->batch,
                                  b->offload ? b->layer_compressed : NULL, &gc));
    if (policy) CHECK(ckv_cuda_set_kv_policy(gc, &b->kv, b->layer_compressed, NULL));
    double fill = depth > 0 ? prefill(b, gc, depth, b->batch) : 0.0;
    if (depth > 4096 && !policy && b->batch == 1) {
        double ts = depth / fill;
        char   name[32];
        snprintf(name, sizeof(name), "pp%d", depth);
        print_test(b, name, depth, 0, 0, &ts, 1, "");
    }
    generate(b, gc, depth, 1);   // warm-up (captures the decode graph; clusterkv: clusters the prompt)
    if (b->profile_steps > 0) {  // a profiler started with --profile-from-start off sees these steps only
        cudaProfilerStart();
        generate(b, gc, depth, b->profile_steps);
        cudaProfilerStop();
    }
    double prompt_ms = policy ? cluster_ms(gc) : 0.0;
    double ts[MAX_REPS];
    for (int r = 0; r < reps; r++) ts[r] = (double) n_gen * b->batch / generate(b, gc, depth, n_gen);   // all rows
    char name[48], extra[512] = "";
    snprintf(name, sizeof(name), "tg%d", n_gen);
    if (policy) {
        double span_ts = (double) span_run * b->batch / generate(b, gc, depth, span_run);
        snprintf(extra, sizeof(extra), ", \"kv_policy\": \"%s\", \"kv_budget\": %d, \"per_kv_head\": %d, "
                 "\"prefill_ms\": %.1f, \"cluster_prompt_ms\": %.2f, \"tg_with_span_n\": %d, "
                 "\"tg_with_span_ts\": %.2f, \"cluster_span_ms\": %.3f", kv_policy_name(b->kv.policy),
                 b->kv.budget, b->kv.select_per_kv_head,
                 fill * 1e3, prompt_ms, span_run, span_ts, cluster_ms(gc) - prompt_ms);
        uint64_t dev_kv = 0, host_kv = 0, dev_policy = 0;
        struct ckv_kv_stats st = {};
        CHECK(ckv_cuda_kv_stats(gc, &st));
        ckv_cuda_kv_memory(gc, &dev_kv, &host_kv, &dev_policy);
        size_t len = strlen(extra);
        snprintf(extra + len, sizeof(extra) - len, ", \"kv_offload\": %d, \"device_kv_mib\": %.1f, "
                 "\"host_kv_mib\": %.1f, \"device_policy_mib\": %.1f, \"rows_fetched_per_step\": %.0f",
                 b->offload, dev_kv / 1048576.0, host_kv / 1048576.0, dev_policy / 1048576.0,
                 (double) st.n_fetched / (1 + reps * n_gen + span_run));
    }
    if (b->batch > 1) {   // tokens/s above are of all sequences together
        size_t len = strlen(extra);
        snprintf(extra + len, sizeof(extra) - len, ", \"batch\": %d", b->batch);
    }
    print_test(b, name, 0, n_gen, depth, ts, reps, extra);
    ckv_cuda_context_free(gc);
}

static uint64_t matrix_bytes(const struct weight * w) { return w->data ? (uint64_t) w->ne[1] * w->row_size : 0; }

static int32_t policy_id(const char * name) {
    for (int32_t id = CKV_KV_POLICY_FULL; id <= CKV_KV_POLICY_CLUSTERKV; id++) {
        if (!strcmp(name, kv_policy_name(id))) return id;
    }
    return -1;
}

int main(int argc, char ** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL [--reps R] [--ubatch U] [--pp N,...] [--tg N] [--depths D,...] [--kv-policy full|streaming|quest|clusterkv] [--kv-budget B] [--per-kv-head 0|1] [--kv-offload 0|1] [--batch N] [--profile-steps N]\n", argv[0]);
        return 2;
    }
    bool offload = false;
    int  batch = 1;
    int profile_steps = 0;
    int reps = 3, ubatch = 512, n_tg = 128, pp[MAX_LIST] = {512}, n_pp = 1, depths[MAX_LIST] = {0}, n_depths = 1;
    struct ckv_context_params cp;
    ckv_context_default_params(&cp);
    struct ckv_kv_policy_params kv = cp.kv_policy;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--reps")) reps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--ubatch")) ubatch = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--pp")) n_pp = parse_list(argv[i + 1], pp);
        else if (!strcmp(argv[i], "--tg")) n_tg = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--profile-steps")) profile_steps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--depths")) n_depths = parse_list(argv[i + 1], depths);
        else if (!strcmp(argv[i], "--kv-budget")) kv.budget = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--per-kv-head")) kv.select_per_kv_head = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--kv-offload")) offload = atoi(argv[i + 1]) != 0;
        else if (!strcmp(argv[i], "--batch")) batch = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--kv-policy") && policy_id(argv[i + 1]) >= 0 &&
                 policy_id(argv[i + 1]) != CKV_KV_POLICY_H2O) kv.policy = policy_id(argv[i + 1]);
        else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (reps < 1 || reps > MAX_REPS || ubatch < 1 || batch < 1 || batch > MAX_BATCH || batch > ubatch ||
        (batch > 1 && offload)) {
        fprintf(stderr, "--reps must be in [1, %d], --ubatch >= 1, --batch in [1, min(%d, ubatch)] and 1 with "
                "--kv-offload\n", MAX_REPS, MAX_BATCH);
        return 2;
    }
    if (ckv_cuda_device_count() == 0) {
        fprintf(stderr, "no CUDA device: %s\n", ckv_cuda_device_name());
        return 77;
    }
    struct ckv_model_params mp;
    ckv_model_default_params(&mp);
    ckv_model * model = NULL;
    double t0 = now_s();
    CHECK(ckv_model_load(argv[1], &mp, &model));
    const struct ckv_model * m = (const struct ckv_model *) model;
    struct cuda_model * gm = NULL;
    CHECK(ckv_cuda_model_create(m, &gm));
    double load_s = now_s() - t0;

    uint64_t step_bytes = matrix_bytes(&m->output);
    for (int il = 0; il < m->hp.n_layer; il++) {
        const struct layer_weights * L = &m->layers[il];
        const struct weight * mats[] = {&L->attn_q, &L->attn_k, &L->attn_v, &L->attn_output,
                                        &L->ffn_gate, &L->ffn_up, &L->ffn_down};
        for (const struct weight * w : mats) step_bytes += matrix_bytes(w);
    }
    uint64_t kv_bytes_per_pos = 2ull * m->hp.n_layer * m->hp.n_head_kv * m->hp.head_dim * 2;   // K + V, f16

    // The layers a policy compresses, as context.c chooses them.
    bool * compressed = (bool *) calloc((size_t) m->hp.n_layer, sizeof(bool));
    for (int il = 0; il < m->hp.n_layer; il++) {
        compressed[il] = hparams_is_compressed_layer(&m->hp, kv.n_dense_layers, il);
    }
    struct bench b = {gm, ckv_vocab_n_tokens(model), ubatch, NULL, NULL, true, kv, compressed, offload, batch,
                      profile_steps};
    b.logits = (float *) malloc(sizeof(float) * b.n_vocab * batch);
    b.tokens = (int32_t *) malloc(sizeof(int32_t) * ubatch);
    srand(42);
    for (int i = 0; i < ubatch; i++) b.tokens[i] = rand() % b.n_vocab;

    printf("{\"device\": \"%s\", \"model\": \"%s\", \"kv_policy\": \"%s\", \"load_s\": %.2f, \"gpu_weight_bytes\": %llu,\n"
           " \"decode_weight_bytes\": %llu, \"kv_bytes_per_position\": %llu, \"ubatch\": %d, \"reps\": %d,\n"
           " \"tests\": [", ckv_cuda_device_name(), argv[1],
           kv_policy_name(kv.policy), load_s,
           (unsigned long long) ckv_cuda_model_size(gm), (unsigned long long) step_bytes,
           (unsigned long long) kv_bytes_per_pos, ubatch, reps);
    for (int i = 0; i < n_pp; i++) bench_pp(&b, pp[i], reps);
    for (int i = 0; i < n_depths; i++) bench_tg(&b, n_tg, depths[i], depths[i] > 8192 ? 1 : reps);
    printf("\n]}\n");
    free(b.logits);
    free(b.tokens);
    free(compressed);
    ckv_cuda_model_free(gm);
    ckv_model_free(model);
    return 0;
}
