// cuda-check.cuh - what the CUDA test programs share: abort on a failed CUDA or library call,
// a device buffer that moves to and from host vectors, and a seeded random stream.
#ifndef CKV_CUDA_CHECK_CUH
#define CKV_CUDA_CHECK_CUH

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <vector>

#include <cuda_runtime.h>

#include "clusterkv.h"

#define CHECK_CUDA(call)                                                                  \
    do {                                                                                  \
        cudaError_t e_ = (call);                                                          \
        if (e_ != cudaSuccess) {                                                          \
            fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)
#define CHECK_OK(call)                                                                            \
    do {                                                                                          \
        int32_t st_ = (call);                                                                     \
        if (st_ != CKV_OK) {                                                                      \
            fprintf(stderr, "%s:%d: status %d: %s\n", __FILE__, __LINE__, st_, ckv_last_error()); \
            exit(1);                                                                              \
        }                                                                                         \
    } while (0)

// xorshift64 stream for test data: each program keeps one, seeded with its own constant, so
// its cases are the same on every run.
struct test_rng {
    uint64_t s;
    uint32_t u32() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        return (uint32_t) (s >> 11);
    }
    float uniform(float lo, float hi) { return lo + (hi - lo) * (float) (u32() / 4294967296.0); }
};

// Device buffer, poisoned with 0xFF bytes (NaN / -1) so unwritten elements show, filled from
// and read back to host vectors.
template <typename T> struct dbuf {
    T *    p = nullptr;
    size_t n = 0;
    explicit dbuf(size_t count) : n(count) {
        CHECK_CUDA(cudaMalloc(&p, count * sizeof(T) + 16));
        CHECK_CUDA(cudaMemset(p, 0xFF, count * sizeof(T)));
    }
    dbuf(const std::vector<T> & h) : dbuf(h.size()) {
        CHECK_CUDA(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    }
    std::vector<T> get() const {
        std::vector<T> h(n);
        CHECK_CUDA(cudaDeviceSynchronize());
        CHECK_CUDA(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
        return h;
    }
    dbuf(const dbuf &)             = delete;
    dbuf & operator=(const dbuf &) = delete;
    ~dbuf() { cudaFree(p); }
};

#endif
