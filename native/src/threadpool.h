// threadpool.h - a small persistent thread pool for the forward pass (internal).
// Decode runs ~200 parallel regions per token, so workers spin briefly before sleeping: a
// condition-variable wake per region would cost more than the work of a small matmul.
#ifndef CKV_THREADPOOL_H
#define CKV_THREADPOOL_H

#include <stdint.h>

struct threadpool;

// ith in [0, nth): the caller runs as thread 0, workers as 1 .. nth-1.
typedef void (*threadpool_fn)(void * arg, int ith, int nth);

// n_threads >= 1 (1 = no workers; everything runs on the caller).
int32_t threadpool_create(int n_threads, struct threadpool ** out);
void    threadpool_free(struct threadpool * pool);
int     threadpool_n_threads(const struct threadpool * pool);

// Runs fn(arg, ith, nth) on every thread and returns when all have finished.
void threadpool_run(struct threadpool * pool, threadpool_fn fn, void * arg);

// Splits [0, n) into nth near-equal contiguous ranges; writes thread ith's range.
void threadpool_split(int64_t n, int ith, int nth, int64_t * begin, int64_t * end);

#endif  // CKV_THREADPOOL_H
