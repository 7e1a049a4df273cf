// test-threadpool.c - stress test of the forward pass's thread pool (threadpool.c).
//
// A pool runs ~200 parallel regions per decoded token, back to back, so a publication race
// (a worker running the previous region's fn or arg, a late worker counting itself into the
// next region, the caller returning before a worker finished) shows up as a wrong value
// written by a worker, not as a rare crash. Checked here:
//   - many tiny regions back to back per thread count (1..16, more threads than cores too),
//     alternating two functions and two argument blocks: every thread must run every region
//     exactly once, with that region's fn and arg, and be done when threadpool_run returns;
//   - pool create/free cycles with a few regions each (workers that never got to sleep, ones
//     that did, and free right after the last region);
//   - context init/free cycles with n_threads 1..4 on the default model when it is found
//     ($CLUSTERKV_MODELS_DIR or ~/.cache/clusterkv_local/models): logits must
//     be bit-identical for every thread count, because work is split by output row.
// Also meant for -fsanitize=thread (clean on 2026-11-28 with the whole library instrumented):
//   cmake -S . -B build-tsan -DCKV_BUILD_TESTS=ON -DCMAKE_C_FLAGS=-fsanitize=thread \
//         -DCMAKE_EXE_LINKER_FLAGS=-fsanitize=thread -DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=thread
//   cmake --build build-tsan --target test-threadpool && build-tsan/test-threadpool
// Prints "N passed, M failed".
#include "threadpool.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clusterkv.h"

#include "check.h"

enum { MAX_THREADS = 16 };

// One region's argument: every thread writes its stamp into its own slot.
struct region_arg {
    unsigned region;                 // id of the region this argument belongs to
    int      tag;                    // which of the two argument blocks (0 or 1)
    int      nth_expected;
    unsigned stamp[MAX_THREADS];     // region id * 2 + which function ran, per thread
    int      bad_ith;                // set when a thread got an ith/nth it should not have
};

static void region_fn_a(void * p, int ith, int nth) {
    struct region_arg * a = p;
    if (ith < 0 || ith >= nth || nth != a->nth_expected) {
        a->bad_ith = 1;
        return;
    }
    a->stamp[ith] = a->region * 2u;
}

static void region_fn_b(void * p, int ith, int nth) {
    struct region_arg * a = p;
    if (ith < 0 || ith >= nth || nth != a->nth_expected) {
        a->bad_ith = 1;
        return;
    }
    a->stamp[ith] = a->region * 2u + 1u;
}

// Runs n_regions regions; returns the number of regions where some thread did not leave the
// expected stamp by the time threadpool_run returned.
static int run_regions(struct threadpool * pool, int nth, unsigned n_regions, unsigned first) {
    static struct region_arg args[2];
    int                      bad = 0;
    for (unsigned r = first; r < first + n_regions; r++) {
        struct region_arg * a   = &args[r & 1];
        const bool          odd = (r / 2) & 1;  // function alternates at another period than arg
        a->region       = r;
        a->tag          = (int) (r & 1);
        a->nth_expected = nth;
        a->bad_ith      = 0;
        for (int i = 0; i < MAX_THREADS; i++) {
            a->stamp[i] = 0xFFFFFFFFu;
        }
        threadpool_run(pool, odd ? region_fn_b : region_fn_a, a);
        const unsigned want = r * 2u + (odd ? 1u : 0u);
        int            ok   = !a->bad_ith;
        for (int i = 0; i < nth; i++) {
            ok &= a->stamp[i] == want;
        }
        for (int i = nth; i < MAX_THREADS; i++) {
            ok &= a->stamp[i] == 0xFFFFFFFFu;
        }
        bad += !ok;
    }
    return bad;
}

// More threads than cores make every region wait for the OS to schedule each worker (the pool
// assumes a core per thread), so the oversubscribed counts run fewer regions.
static void test_back_to_back_regions(unsigned n_regions) {
    const int counts[] = {1, 2, 3, 4, 5, 8, 16};
    for (size_t c = 0; c < sizeof(counts) / sizeof(counts[0]); c++) {
        const unsigned n = counts[c] <= 2 ? n_regions : n_regions / (unsigned) (4 * counts[c]);
        struct threadpool * pool = NULL;
        CHECK(threadpool_create(counts[c], &pool) == CKV_OK && pool, "create %d threads", counts[c]);
        if (!pool) {
            continue;
        }
        CHECK(threadpool_n_threads(pool) == counts[c], "n_threads");
        const int bad = run_regions(pool, counts[c], n, 1);
        CHECK(bad == 0, "%d threads: %d of %u regions saw a stale or missing worker", counts[c],
              bad, n);
        threadpool_free(pool);
    }
}

static void sleep_ms(int ms) {
    struct timespec t = {0, (long) ms * 1000000L};
    nanosleep(&t, NULL);
}

static void test_create_free_cycles(int n_cycles) {
    int bad = 0, failed = 0;
    for (int i = 0; i < n_cycles; i++) {
        const int           nth  = 1 + (i * 7) % 4;
        struct threadpool * pool = NULL;
        if (threadpool_create(nth, &pool) != CKV_OK) {
            failed++;
            continue;
        }
        bad += run_regions(pool, nth, (unsigned) (i % 5), 1);
        if (i % 16 == 7) {
            sleep_ms(30);  // long enough for the workers to stop spinning and sleep
            bad += run_regions(pool, nth, 3, 100);
        }
        threadpool_free(pool);
    }
    CHECK(failed == 0 && bad == 0, "create/free cycles: %d failed creates, %d bad regions", failed, bad);
    struct threadpool * pool = (struct threadpool *) 1;
    CHECK(threadpool_create(0, &pool) == CKV_ERR_INVALID_ARG && pool == NULL, "0 threads refused");
    threadpool_free(NULL);  // accepts NULL
}

static const char * find_default_model(char * buf, size_t cap) {
    const char * file = "SmolLM2-135M-Instruct.Q4_1.gguf";
    const char * home = getenv("HOME");
    char         cache[1024];
    snprintf(cache, sizeof(cache), "%s/.cache/clusterkv_local/models", home ? home : "");
    const char * dirs[] = {getenv("CLUSTERKV_MODELS_DIR"), home ? cache : NULL};
    for (size_t i = 0; i < sizeof(dirs) / sizeof(dirs[0]); i++) {
        if (!dirs[i]) {
            continue;
        }
        snprintf(buf, cap, "%s/%s", dirs[i], file);
        FILE * f = fopen(buf, "rb");
        if (f) {
            fclose(f);
            return buf;
        }
    }
    return NULL;
}

// Context init/free cycles with different thread counts: the same tokens must give the same
// logits bit for bit every time.
static void test_context_cycles(int n_cycles) {
    char         path[1200];
    const char * model_path = find_default_model(path, sizeof(path));
    if (!model_path) {
        printf("skip context cycles: SmolLM2-135M-Instruct.Q4_1.gguf not found\n");
        return;
    }
    struct ckv_model_params mp;
    ckv_model_default_params(&mp);
    ckv_model * model = NULL;
    if (ckv_model_load(model_path, &mp, &model) != CKV_OK) {
        CHECK(false, "load %s: %s", model_path, ckv_last_error());
        return;
    }
    const ckv_token tokens[5] = {1, 504, 3458, 282, 4649};
    const int32_t   n_vocab   = ckv_vocab_n_tokens(model);
    float *         first     = malloc((size_t) n_vocab * 2 * sizeof(float));
    int             mismatches = 0, failures = 0;
    for (int i = 0; i < n_cycles && first; i++) {
        struct ckv_context_params cp;
        ckv_context_default_params(&cp);
        cp.n_ctx     = 64;
        cp.n_threads = 1 + i % 4;
        ckv_context * ctx = NULL;
        if (ckv_context_init(model, &cp, &ctx) != CKV_OK ||
            ckv_decode(ctx, tokens, 4, false) != CKV_OK ||    // prefill chunk
            ckv_decode(ctx, tokens + 4, 1, false) != CKV_OK) {  // one decode step
            failures++;
            ckv_context_free(ctx);
            continue;
        }
        const float * row = ckv_get_logits(ctx, -1);
        if (i == 0) {
            memcpy(first, row, (size_t) n_vocab * sizeof(float));
        } else {
            mismatches += memcmp(first, row, (size_t) n_vocab * sizeof(float)) != 0;
        }
        ckv_context_free(ctx);
    }
    CHECK(first && failures == 0, "context cycles: %d failed (%s)", failures, ckv_last_error());
    CHECK(mismatches == 0, "context cycles: logits differ between thread counts in %d of %d", mismatches,
          n_cycles - 1);
    free(first);
    ckv_model_free(model);
}

int main(int argc, char ** argv) {
    // argv[1]: a scale factor for the run length (the default keeps the test around a second;
    // use a larger one, or a sanitizer build, when hunting a race)
    const int scale = argc > 1 ? atoi(argv[1]) : 1;
    test_back_to_back_regions(2000u * (unsigned) (scale > 0 ? scale : 1));
    test_create_free_cycles(60 * (scale > 0 ? scale : 1));
    test_context_cycles(6 * (scale > 0 ? scale : 1));
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
