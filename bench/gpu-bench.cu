// gpu-bench.cu - llama-bench's workloads on the CUDA backend, driven through cuda-backend.h
// (issue 5; bench/gpu.py runs it next to llama-bench and compares).
//
//   bench-cuda MODEL [--reps R] [--ubatch U] [--pp N,...] [--tg N] [--depths D,...]
//
// As llama-bench: random token ids, f16 KV cache, one untimed warm-up, then R timed
// repetitions; ppN = one N-token prompt from an empty cache (U tokens per forward call, logits
// of the last token only); tgN @ depth D = N single-token decodes (logits of each copied to the
// host, greedy argmax) after D positions were prefilled untimed. A depth prefill of more than
// 4096 positions runs once and is also reported as pp<D> (one sample, no warm-up): the prompt
// of the same length from an empty cache, so a 32k test is not paid twice.
//
// Prints one JSON object: the device, the weight bytes one decode step reads (every matrix
// but the embedding table) and the KV bytes per cached position, and per test the samples in
// tokens/s.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clusterkv.h"
#include "cuda-backend.h"

extern "C" {
#include "model.h"
}

enum { MAX_LIST = 16, MAX_REPS = 64 };

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
    const struct cuda_model * gm;
    int                       n_vocab, ubatch;
    float *                   logits;   // [n_vocab]
    int32_t *                 tokens;   // [ubatch] random ids
    bool                      first_test;
};

static void print_test(struct bench * b, const char * name, int n_prompt, int n_gen, int depth,
                       const double * ts, int n) {
    double mean = 0.0, sd = 0.0;
    for (int i = 0; i < n; i++) mean += ts[i] / n;
    for (int i = 0; i < n; i++) sd += (ts[i] - mean) * (ts[i] - mean) / (n > 1 ? n - 1 : 1);
    printf("%s\n    {\"test\": \"%s\", \"n_prompt\": %d, \"n_gen\": %d, \"n_depth\": %d, \"avg_ts\": %.3f, "
           "\"stddev_ts\": %.3f, \"samples_ts\": [", b->first_test ? "" : ",", name, n_prompt, n_gen,
           depth, mean, sqrt(sd));
    for (int i = 0; i < n; i++) printf("%s%.3f", i ? ", " : "", ts[i]);
    printf("]}");
    fflush(stdout);
    b->first_test = false;
}

// Prefills positions [0, n) of gc in ubatch chunks; logits of the last token only. Seconds.
static double prefill(struct bench * b, struct cuda_context * gc, int n) {
    double t0 = now_s();
    for (int pos = 0; pos < n; pos += b->ubatch) {
        int chunk = n - pos < b->ubatch ? n - pos : b->ubatch;
        CHECK(ckv_cuda_decode(gc, b->tokens, chunk, pos, pos + chunk < n ? chunk : chunk - 1, b->logits));
    }
    return now_s() - t0;
}

// n_gen greedy single-token decodes at positions depth, depth + 1, ... Seconds.
static double generate(struct bench * b, struct cuda_context * gc, int depth, int n_gen) {
    int32_t tok = b->tokens[0];
    double  t0 = now_s();
    for (int i = 0; i < n_gen; i++) {
        CHECK(ckv_cuda_decode(gc, &tok, 1, depth + i, 0, b->logits));
        int best = 0;
        for (int v = 1; v < b->n_vocab; v++) best = b->logits[v] > b->logits[best] ? v : best;
        tok = best;
    }
    return now_s() - t0;
}

static void bench_pp(struct bench * b, int n_prompt, int reps) {
    struct cuda_context * gc = NULL;
    CHECK(ckv_cuda_context_create(b->gm, n_prompt, b->ubatch, &gc));
    double ts[MAX_REPS];
    prefill(b, gc, n_prompt);   // warm-up
    for (int r = 0; r < reps; r++) ts[r] = n_prompt / prefill(b, gc, n_prompt);
    char name[32];
    snprintf(name, sizeof(name), "pp%d", n_prompt);
    print_test(b, name, n_prompt, 0, 0, ts, reps);
    ckv_cuda_context_free(gc);
}

static void bench_tg(struct bench * b, int n_gen, int depth, int reps) {
    struct cuda_context * gc = NULL;
    CHECK(ckv_cuda_context_create(b->gm, depth + n_gen + 1, b->ubatch, &gc));
    double fill = depth > 0 ? prefill(b, gc, depth) : 0.0;
    if (depth > 4096) {
        double ts = depth / fill;
        char   name[32];
        snprintf(name, sizeof(name), "pp%d", depth);
        print_test(b, name, depth, 0, 0, &ts, 1);
    }
    generate(b, gc, depth, 1);   // warm-up (captures the decode graph)
    double ts[MAX_REPS];
    for (int r = 0; r < reps; r++) ts[r] = n_gen / generate(b, gc, depth, n_gen);
    char name[48];
    snprintf(name, sizeof(name), "tg%d", n_gen);
    print_test(b, name, 0, n_gen, depth, ts, reps);
    ckv_cuda_context_free(gc);
}

static uint64_t matrix_bytes(const struct weight * w) { return w->data ? (uint64_t) w->ne[1] * w->row_size : 0; }

int main(int argc, char ** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL [--reps R] [--ubatch U] [--pp N,...] [--tg N] [--depths D,...]\n", argv[0]);
        return 2;
    }
    int reps = 3, ubatch = 512, n_tg = 128, pp[MAX_LIST] = {512}, n_pp = 1, depths[MAX_LIST] = {0}, n_depths = 1;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--reps")) reps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--ubatch")) ubatch = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--pp")) n_pp = parse_list(argv[i + 1], pp);
        else if (!strcmp(argv[i], "--tg")) n_tg = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--depths")) n_depths = parse_list(argv[i + 1], depths);
        else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (reps < 1 || reps > MAX_REPS || ubatch < 1) {
        fprintf(stderr, "--reps must be in [1, %d] and --ubatch >= 1\n", MAX_REPS);
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

    struct bench b = {gm, ckv_vocab_n_tokens(model), ubatch, NULL, NULL, true};
    b.logits = (float *) malloc(sizeof(float) * b.n_vocab);
    b.tokens = (int32_t *) malloc(sizeof(int32_t) * ubatch);
    srand(42);
    for (int i = 0; i < ubatch; i++) b.tokens[i] = rand() % b.n_vocab;

    printf("{\"device\": \"%s\", \"model\": \"%s\", \"load_s\": %.2f, \"gpu_weight_bytes\": %llu,\n"
           " \"decode_weight_bytes\": %llu, \"kv_bytes_per_position\": %llu, \"ubatch\": %d, \"reps\": %d,\n"
           " \"tests\": [", ckv_cuda_device_name(), argv[1], load_s,
           (unsigned long long) ckv_cuda_model_size(gm), (unsigned long long) step_bytes,
           (unsigned long long) kv_bytes_per_pos, ubatch, reps);
    for (int i = 0; i < n_pp; i++) bench_pp(&b, pp[i], reps);
    for (int i = 0; i < n_depths; i++) bench_tg(&b, n_tg, depths[i], depths[i] > 8192 ? 1 : reps);
    printf("\n]}\n");
    free(b.logits);
    free(b.tokens);
    ckv_cuda_model_free(gm);
    ckv_model_free(model);
    return 0;
}
