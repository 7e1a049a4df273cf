// threadpool.c - persistent workers woken by a generation counter: they spin for a short
// while (the next parallel region usually follows within microseconds during a forward pass)
// and then sleep on a condition variable, so an idle context costs no CPU.
//
// Memory ordering, one region (the caller is thread 0):
//   caller: fn, arg, n_finished = 0 (plain / relaxed), then generation++ (release)
//   worker: generation read (acquire) -> sees fn, arg and the zeroed n_finished;
//           runs fn; n_finished++ (release)
//   caller: waits until n_finished == n_threads - 1 (acquire) -> sees every worker's writes.
// The caller returns only after every worker has counted itself, and a worker touches fn, arg
// and n_finished only between seeing a new generation and counting itself, so the next
// region's writes can never meet a late worker of the previous one.
#include "threadpool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>

#include "error.h"

#if defined(__x86_64__) || defined(__i386__)
#    include <immintrin.h>
#    define cpu_relax() _mm_pause()
#else
#    define cpu_relax() ((void) 0)
#endif

enum {
    SPIN_ITERATIONS  = 200000,  // ~a few ms of spinning before a worker sleeps
    YIELD_AFTER_SPIN = 4096,    // the caller's wait: then yield, so a worker that the OS
                                // preempted (more threads than free cores) gets to run
};

struct worker {
    struct threadpool * pool;
    int                 ith;
    pthread_t           thread;
};

struct threadpool {
    int             n_threads;
    struct worker * workers;      // [n_threads - 1]
    pthread_mutex_t mutex;
    pthread_cond_t  wake;
    atomic_uint     generation;   // bumped once per parallel region (publishes fn and arg)
    atomic_int      n_finished;   // workers done with the current region
    atomic_bool     stop;
    threadpool_fn   fn;           // the current region; written only while no worker runs
    void *          arg;
};

static unsigned wait_for_generation(struct threadpool * pool, unsigned seen) {
    for (int i = 0; i < SPIN_ITERATIONS; i++) {
        unsigned now = atomic_load_explicit(&pool->generation, memory_order_acquire);
        if (now != seen || atomic_load(&pool->stop)) {
            return now;
        }
        cpu_relax();
    }
    pthread_mutex_lock(&pool->mutex);
    unsigned now;
    while ((now = atomic_load(&pool->generation)) == seen && !atomic_load(&pool->stop)) {
        pthread_cond_wait(&pool->wake, &pool->mutex);
    }
    pthread_mutex_unlock(&pool->mutex);
    return now;
}

static void * worker_main(void * p) {
    struct worker *     w    = p;
    struct threadpool * pool = w->pool;
    unsigned            seen = 0;
    for (;;) {
        seen = wait_for_generation(pool, seen);
        if (atomic_load(&pool->stop)) {
            return NULL;
        }
        pool->fn(pool->arg, w->ith, pool->n_threads);
        // release: the caller's acquire of the count sees everything fn wrote
        atomic_fetch_add_explicit(&pool->n_finished, 1, memory_order_release);
    }
}

int32_t threadpool_create(int n_threads, struct threadpool ** out) {
    *out = NULL;
    if (n_threads < 1) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "n_threads must be >= 1, got %d", n_threads);
    }
    struct threadpool * pool = calloc(1, sizeof(*pool));
    if (!pool) {
        return ckv_fail(CKV_ERR_OOM, "out of memory for the thread pool");
    }
    pool->n_threads = n_threads;
    pthread_mutex_init(&pool->mutex, NULL);
    pthread_cond_init(&pool->wake, NULL);
    pool->workers = calloc((size_t) n_threads, sizeof(struct worker));
    if (!pool->workers) {
        threadpool_free(pool);
        return ckv_fail(CKV_ERR_OOM, "out of memory for the thread pool");
    }
    for (int i = 1; i < n_threads; i++) {
        struct worker * w = &pool->workers[i - 1];
        w->pool = pool;
        w->ith  = i;
        if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
            pool->n_threads = i;  // only join what was started
            threadpool_free(pool);
            return ckv_fail(CKV_ERR_OOM, "could not start worker thread %d", i);
        }
    }
    *out = pool;
    return CKV_OK;
}

void threadpool_free(struct threadpool * pool) {
    if (!pool) {
        return;
    }
    pthread_mutex_lock(&pool->mutex);
    atomic_store(&pool->stop, true);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mutex);
    for (int i = 1; i < pool->n_threads; i++) {
        pthread_join(pool->workers[i - 1].thread, NULL);
    }
    pthread_mutex_destroy(&pool->mutex);
    pthread_cond_destroy(&pool->wake);
    free(pool->workers);
    free(pool);
}

int threadpool_n_threads(const struct threadpool * pool) { return pool->n_threads; }

void threadpool_run(struct threadpool * pool, threadpool_fn fn, void * arg) {
    if (pool->n_threads == 1) {
        fn(arg, 0, 1);
        return;
    }
    // No worker reads these now: each one counted itself at the end of the previous region.
    pool->fn  = fn;
    pool->arg = arg;
    atomic_store_explicit(&pool->n_finished, 0, memory_order_relaxed);
    pthread_mutex_lock(&pool->mutex);  // a sleeping worker checks the generation under it
    atomic_fetch_add_explicit(&pool->generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mutex);
    fn(arg, 0, pool->n_threads);
    for (int spins = 0;
         atomic_load_explicit(&pool->n_finished, memory_order_acquire) < pool->n_threads - 1; spins++) {
        if (spins < YIELD_AFTER_SPIN) {
            cpu_relax();
        } else {
            sched_yield();
        }
    }
}

void threadpool_split(int64_t n, int ith, int nth, int64_t * begin, int64_t * end) {
    int64_t per = n / nth, rest = n % nth;
    *begin = ith * per + (ith < rest ? ith : rest);
    *end   = *begin + per + (ith < rest ? 1 : 0);
}
