// rope.cuh - RoPE's angle and rotation, shared by rope_kv_kernel (elementwise.cu) and the decode
// attention kernel that does rope_kv's work itself (attention.cu), so the two give the same
// bits. The angle is the CPU's (ops_rope): theta = pos * theta_scale^i by repeated float
// multiplication. The rotation keeps the form rope_kv had before this file (nvcc contracts it
// into FMAs).
#pragma once

#include "cuda-ops.cuh"

// cos and sin of pair i's angle at position pos.
__device__ __forceinline__ float2 rope_cos_sin(const struct cuda_rope_kv_args & a, int64_t pos, int i) {
    float theta = (float) pos;
    for (int k = 0; k < i; k++) theta *= a.theta_scale;
    float ff  = a.freq_factors ? a.freq_factors[i] : 1.0f;
    float ang = a.freq_scale * (theta / ff);
    return make_float2(cosf(ang), sinf(ang));
}

// Rotates pair i of one head (in shared memory): values i, i + n_rot / 2 (NEOX) or 2i, 2i + 1.
__device__ __forceinline__ void rope_rotate_pair(float * head, const struct cuda_rope_kv_args & a, int i,
                                                 float2 cs) {
    int   p = a.neox ? i : 2 * i, q = a.neox ? i + a.n_rot / 2 : 2 * i + 1;
    float x0 = head[p], x1 = head[q];
    head[p] = x0 * cs.x - x1 * cs.y;
    head[q] = x0 * cs.y + x1 * cs.x;
}
