// quants.c - ggml tensor types: the traits table, fp16/bf16 conversion, scalar reference
// dequantisation (bit-exact with ggml's dequantize_row_*), the activation quantisers (exactly
// llama.cpp's x86 quantize_row_q8_{0,1,K}), scalar dot products with ggml's weight/activation
// pairing, and run-time kernel selection.
//
// Data flow: gguf.c sizes tensors with ggml_row_size(); the model's matmuls quantise an
// activation row to the weight type's vec_dot_type once and then call vec_dot / vec_dot_rows
// per weight row. The scalar kernels here define the semantics; quants-avx2.c and
// quants-avx512.c register faster versions of the hot ones (see quants-impl.h).
#include "quants-impl.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

// Dequantisation must round exactly like ggml's (and gguf-py's) separate multiply and add, so
// the compiler may not fuse them into FMAs, which it would where FMA is baseline (aarch64,
// -march=native); plain x86-64 has no FMA, so nothing changes there.
#if defined(__clang__)
#    pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__) && defined(__FP_FAST_FMAF)
#    pragma GCC optimize("fp-contract=off")
#endif

// =============================================================================================
// fp16 / bf16
// =============================================================================================

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    return u;
}

static inline float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

#if defined(__F16C__)
#    include <immintrin.h>
#endif

// With F16C in the baseline (-march=native and the like) one instruction does each conversion;
// the bit-level versions below give the same results (NaN payloads aside).
float ckv_fp16_to_fp32(ckv_fp16 h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#endif
    const uint32_t sign = (uint32_t) (h & 0x8000) << 16;
    const uint32_t exp  = (h >> 10) & 0x1F;
    const uint32_t mant = h & 0x3FF;
    if (exp == 0x1F) {  // inf / NaN keep their payload
        return f32_from_bits(sign | 0x7F800000 | (mant << 13));
    }
    if (exp == 0) {     // zero and subnormals: mant * 2^-24 is exact in fp32
        return f32_from_bits(sign | f32_bits((float) mant * 0x1p-24f));
    }
    return f32_from_bits(sign | ((exp + 112) << 23) | (mant << 13));
}

ckv_fp16 ckv_fp32_to_fp16(float f) {
#if defined(__F16C__)
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#endif
    const uint32_t x    = f32_bits(f);
    const uint32_t sign = (x >> 16) & 0x8000;
    uint32_t       ax   = x & 0x7FFFFFFF;
    if (ax > 0x7F800000) {  // NaN: quiet it, keep the top payload bits (as F16C does)
        return (ckv_fp16) (sign | 0x7E00 | ((ax >> 13) & 0x3FF));
    }
    if (ax >= 0x477FF000) {  // >= 65520 rounds to infinity
        return (ckv_fp16) (sign | 0x7C00);
    }
    if (ax < 0x38800000) {
        // Below 2^-14 the result is subnormal: adding 0.5 makes the FPU round |f| to a multiple
        // of 2^-24 (nearest even), which then sits in the low mantissa bits.
        const float r = f32_from_bits(ax) + 0.5f;
        return (ckv_fp16) (sign | (f32_bits(r) - f32_bits(0.5f)));
    }
    ax += 0xFFF + ((ax >> 13) & 1);  // round to nearest even on the 13 dropped bits
    return (ckv_fp16) (sign | ((ax - (112u << 23)) >> 13));
}

static inline float bf16_to_fp32(uint16_t h) { return f32_from_bits((uint32_t) h << 16); }

static void fp16_to_fp32_row_ref(const ckv_fp16 * src, float * dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        dst[i] = ckv_fp16_to_fp32(src[i]);
    }
}

static void fp32_to_fp16_row_ref(const float * src, ckv_fp16 * dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        dst[i] = ckv_fp32_to_fp16(src[i]);
    }
}

static float dot_f16_f32_ref(int64_t n, const ckv_fp16 * a, const float * b) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        sum += ckv_fp16_to_fp32(a[i]) * b[i];
    }
    return sum;
}

static void axpy_f16_f32_ref(int64_t n, float alpha, const ckv_fp16 * x, float * y) {
    for (int64_t i = 0; i < n; i++) {
        y[i] += alpha * ckv_fp16_to_fp32(x[i]);
    }
}

#define FP16(h) ckv_fp16_to_fp32(h)

// =============================================================================================
// Dequantisation (same arithmetic, in the same order, as ggml-quants.c)
// =============================================================================================

static void dequantize_row_f32(const void * src, float * dst, int64_t n) {
    memcpy(dst, src, (size_t) n * sizeof(float));
}

static void dequantize_row_f16(const void * src, float * dst, int64_t n) {
    fp16_to_fp32_row_ref((const ckv_fp16 *) src, dst, n);
}

static void dequantize_row_bf16(const void * src, float * dst, int64_t n) {
    const uint16_t * s = src;
    for (int64_t i = 0; i < n; i++) {
        dst[i] = bf16_to_fp32(s[i]);
    }
}

static void dequantize_row_q4_0(const void * src, float * y, int64_t n) {
    const block_q4_0 * x = src;
    for (int64_t i = 0; i < n / QK4_0; i++, y += QK4_0) {
        const float d = FP16(x[i].d);
        for (int j = 0; j < QK4_0 / 2; j++) {
            y[j]           = ((x[i].qs[j] & 0x0F) - 8) * d;
            y[j + QK4_0/2] = ((x[i].qs[j] >> 4) - 8) * d;
        }
    }
}

static void dequantize_row_q4_1(const void * src, float * y, int64_t n) {
    const block_q4_1 * x = src;
    for (int64_t i = 0; i < n / QK4_1; i++, y += QK4_1) {
        const float d = FP16(x[i].d);
        const float m = FP16(x[i].m);
        for (int j = 0; j < QK4_1 / 2; j++) {
            y[j]           = (x[i].qs[j] & 0x0F) * d + m;
            y[j + QK4_1/2] = (x[i].qs[j] >> 4) * d + m;
        }
    }
}

static inline uint32_t load_u32le(const uint8_t * p) {
    return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24;
}

static void dequantize_row_q5_0(const void * src, float * y, int64_t n) {
    const block_q5_0 * x = src;
    for (int64_t i = 0; i < n / QK5_0; i++, y += QK5_0) {
        const float    d  = FP16(x[i].d);
        const uint32_t qh = load_u32le(x[i].qh);
        for (int j = 0; j < QK5_0 / 2; j++) {
            const int x0 = ((x[i].qs[j] & 0x0F) | (((qh >> j) & 1) << 4)) - 16;
            const int x1 = ((x[i].qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16;
            y[j]           = x0 * d;
            y[j + QK5_0/2] = x1 * d;
        }
    }
}

static void dequantize_row_q5_1(const void * src, float * y, int64_t n) {
    const block_q5_1 * x = src;
    for (int64_t i = 0; i < n / QK5_1; i++, y += QK5_1) {
        const float    d  = FP16(x[i].d);
        const float    m  = FP16(x[i].m);
        const uint32_t qh = load_u32le(x[i].qh);
        for (int j = 0; j < QK5_1 / 2; j++) {
            const int x0 = (x[i].qs[j] & 0x0F) | (((qh >> j) & 1) << 4);
            const int x1 = (x[i].qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
            y[j]           = x0 * d + m;
            y[j + QK5_1/2] = x1 * d + m;
        }
    }
}

static void dequantize_row_q8_0(const void * src, float * y, int64_t n) {
    const block_q8_0 * x = src;
    for (int64_t i = 0; i < n / QK8_0; i++, y += QK8_0) {
        const float d = FP16(x[i].d);
        for (int j = 0; j < QK8_0; j++) {
            y[j] = x[i].qs[j] * d;
        }
    }
}

static void dequantize_row_q2_K(const void * src, float * y, int64_t n) {
    const block_q2_K * x = src;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float     d   = FP16(x[i].d);
        const float     min = FP16(x[i].dmin);
        const uint8_t * q   = x[i].qs;
        int             is  = 0;
        for (int half = 0; half < 2; half++, q += 32) {
            for (int shift = 0; shift < 8; shift += 2) {
                for (int k = 0; k < 2; k++) {  // two 16-element groups with their own scale
                    const uint8_t sc = x[i].scales[is++];
                    const float   dl = d * (sc & 0xF);
                    const float   ml = min * (sc >> 4);
                    for (int l = 0; l < 16; l++) {
                        *y++ = dl * ((q[l + 16*k] >> shift) & 3) - ml;
                    }
                }
            }
        }
    }
}

// The 16 signed 6-bit scales of a q3_K block, unpacked from their 12 bytes.
static void q3_K_scales(const uint8_t * packed, int8_t out[16]) {
    for (int j = 0; j < 16; j++) {
        const int lo = j < 8 ? packed[j] & 0xF : packed[j - 8] >> 4;
        const int hi = (packed[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
        out[j] = (int8_t) ((lo | hi << 4) - 32);
    }
}

// The 256 quants of a q3_K block in element order, each (2 low bits) - (high bit ? 0 : 4).
static void q3_K_values(const block_q3_K * x, int8_t out[QK_K]) {
    for (int half = 0; half < 2; half++) {
        for (int j = 0; j < 4; j++) {  // bit pair j of qs, bit 4*half + j of hmask
            const uint8_t * q = x->qs + 32 * half;
            const int       m = 1 << (4 * half + j);
            for (int l = 0; l < 32; l++) {
                const int lo = (q[l] >> (2 * j)) & 3;
                out[128 * half + 32 * j + l] = (int8_t) (lo - ((x->hmask[l] & m) ? 0 : 4));
            }
        }
    }
}

static void dequantize_row_q3_K(const void * src, float * y, int64_t n) {
    const block_q3_K * x = src;
    for (int64_t i = 0; i < n / QK_K; i++, y += QK_K) {
        const float d_all = FP16(x[i].d);
        int8_t      scales[16], q[QK_K];
        q3_K_scales(x[i].scales, scales);
        q3_K_values(&x[i], q);
        for (int e = 0; e < QK_K; e++) {
            y[e] = d_all * scales[e / 16] * q[e];
        }
    }
}

static void dequantize_row_q4_K(const void * src, float * y, int64_t n) {
    const block_q4_K * x = src;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const uint8_t * q   = x[i].qs;
        const float     d   = FP16(x[i].d);
        const float     min = FP16(x[i].dmin);
        for (int is = 0; is < 8; is += 2, q += 32) {
            uint8_t sc, m;
            get_scale_min_k4(is, x[i].scales, &sc, &m);
            const float d1 = d * sc, m1 = min * m;
            get_scale_min_k4(is + 1, x[i].scales, &sc, &m);
            const float d2 = d * sc, m2 = min * m;
            for (int l = 0; l < 32; l++) *y++ = d1 * (q[l] & 0xF) - m1;
            for (int l = 0; l < 32; l++) *y++ = d2 * (q[l] >> 4) - m2;
        }
    }
}

static void dequantize_row_q5_K(const void * src, float * y, int64_t n) {
    const block_q5_K * x = src;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const uint8_t * ql  = x[i].qs;
        const uint8_t * qh  = x[i].qh;
        const float     d   = FP16(x[i].d);
        const float     min = FP16(x[i].dmin);
        for (int is = 0; is < 8; is += 2, ql += 32) {
            uint8_t sc, m;
            get_scale_min_k4(is, x[i].scales, &sc, &m);
            const float d1 = d * sc, m1 = min * m;
            get_scale_min_k4(is + 1, x[i].scales, &sc, &m);
            const float d2 = d * sc, m2 = min * m;
            const uint8_t u1 = (uint8_t) (1u << is), u2 = (uint8_t) (2u << is);
            for (int l = 0; l < 32; l++) *y++ = d1 * ((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
            for (int l = 0; l < 32; l++) *y++ = d2 * ((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
        }
    }
}

static void dequantize_row_q6_K(const void * src, float * y, int64_t n) {
    const block_q6_K * x = src;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float     d  = FP16(x[i].d);
        const uint8_t * ql = x[i].ql;
        const uint8_t * qh = x[i].qh;
        const int8_t *  sc = x[i].scales;
        for (int half = 0; half < 2; half++, y += 128, ql += 64, qh += 32, sc += 8) {
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q1 = ((ql[l] & 0xF)      | ((qh[l] >> 0) & 3) << 4) - 32;
                const int q2 = ((ql[l + 32] & 0xF) | ((qh[l] >> 2) & 3) << 4) - 32;
                const int q3 = ((ql[l] >> 4)       | ((qh[l] >> 4) & 3) << 4) - 32;
                const int q4 = ((ql[l + 32] >> 4)  | ((qh[l] >> 6) & 3) << 4) - 32;
                y[l]      = d * sc[is + 0] * q1;
                y[l + 32] = d * sc[is + 2] * q2;
                y[l + 64] = d * sc[is + 4] * q3;
                y[l + 96] = d * sc[is + 6] * q4;
            }
        }
    }
}

// =============================================================================================
// Activation quantisers: exactly what llama.cpp runs on x86, the platform its fidelity fixtures
// come from. q8_0 and q8_1 follow ggml-cpu/arch/x86/quants.c (id = 127 / amax, halves to even),
// not ggml's scalar quantize_row_q8_{0,1}_ref (id = 1 / d, roundf), which gives a different
// quant for about 1 element in 300; q8_K is quantize_row_q8_K_ref, which x86 uses as is.
// =============================================================================================

static void quantize_row_f32_copy(const float * src, void * dst, int64_t n) {
    memcpy(dst, src, (size_t) n * sizeof(float));
}

// ggml's nearest_int: round half to even through the float adder (|f| < 2^22), as
// _mm256_round_ps(_MM_ROUND_NEAREST) does in llama.cpp's x86 quantisers.
static inline int nearest_int(float f) {
    const float v = f + 12582912.0f;
    return (int) (f32_bits(v) & 0x007FFFFF) - 0x00400000;
}

void quantize_row_q8_0_ref(const float * src, void * dst, int64_t n) {
    block_q8_0 * y = dst;
    for (int64_t i = 0; i < n / QK8_0; i++, src += QK8_0) {
        float amax = 0.0f;
        for (int j = 0; j < QK8_0; j++) {
            amax = fmaxf(amax, fabsf(src[j]));
        }
        const float d  = amax / 127.0f;
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        y[i].d = ckv_fp32_to_fp16(d);
        for (int j = 0; j < QK8_0; j++) {
            y[i].qs[j] = (int8_t) nearest_int(src[j] * id);
        }
    }
}

void quantize_row_q8_1_ref(const float * src, void * dst, int64_t n) {
    block_q8_1 * y = dst;
    for (int64_t i = 0; i < n / QK8_1; i++, src += QK8_1) {
        float amax = 0.0f;
        for (int j = 0; j < QK8_1; j++) {
            amax = fmaxf(amax, fabsf(src[j]));
        }
        const float d   = amax / 127.0f;
        const float id  = amax != 0.0f ? 127.0f / amax : 0.0f;
        int         sum = 0;
        y[i].d = ckv_fp32_to_fp16(d);
        for (int j = 0; j < QK8_1; j++) {
            y[i].qs[j] = (int8_t) nearest_int(src[j] * id);
            sum += y[i].qs[j];
        }
        y[i].s = ckv_fp32_to_fp16((float) sum * d);
    }
}

void quantize_row_q8_K_ref(const float * src, void * dst, int64_t n) {
    block_q8_K * y = dst;
    for (int64_t i = 0; i < n / QK_K; i++, src += QK_K) {
        float max = 0.0f, amax = 0.0f;  // the first element of largest magnitude, and |it|
        for (int j = 0; j < QK_K; j++) {
            if (fabsf(src[j]) > amax) {
                amax = fabsf(src[j]);
                max  = src[j];
            }
        }
        memset(&y[i], 0, sizeof(y[i]));
        if (amax == 0.0f) {
            continue;
        }
        const float iscale = -127.0f / max;
        for (int j = 0; j < QK_K; j++) {
            const int v = nearest_int(iscale * src[j]);
            y[i].qs[j] = (int8_t) (v < 127 ? v : 127);
        }
        for (int j = 0; j < QK_K / 16; j++) {
            int sum = 0;
            for (int l = 0; l < 16; l++) {
                sum += y[i].qs[16*j + l];
            }
            y[i].bsums[j] = (int16_t) sum;
        }
        y[i].d = 1.0f / iscale;
    }
}

// =============================================================================================
// Scalar dot products (weight row x activation row already in the vec_dot_type)
// =============================================================================================

float vec_dot_f32_f32_ref(int64_t n, const void * w, const void * x) {
    const float * a = w;
    const float * b = x;
    float         sum = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        sum += a[i] * b[i];
    }
    return sum;
}

float vec_dot_f16_f32_ref(int64_t n, const void * w, const void * x) {
    return dot_f16_f32_ref(n, (const ckv_fp16 *) w, (const float *) x);
}

float vec_dot_bf16_f32_ref(int64_t n, const void * w, const void * x) {
    const uint16_t * a = w;
    const float *    b = x;
    float            sum = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        sum += bf16_to_fp32(a[i]) * b[i];
    }
    return sum;
}

float vec_dot_q4_0_q8_0_ref(int64_t n, const void * w, const void * x) {
    const block_q4_0 * bw = w;
    const block_q8_0 * bx = x;
    float              sum = 0.0f;
    for (int64_t i = 0; i < n / QK8_0; i++) {
        int sumi = 0;
        for (int j = 0; j < QK4_0 / 2; j++) {
            sumi += ((bw[i].qs[j] & 0x0F) - 8) * bx[i].qs[j];
            sumi += ((bw[i].qs[j] >> 4) - 8) * bx[i].qs[j + QK4_0/2];
        }
        sum += sumi * (FP16(bw[i].d) * FP16(bx[i].d));
    }
    return sum;
}

float vec_dot_q4_1_q8_1_ref(int64_t n, const void * w, const void * x) {
    const block_q4_1 * bw = w;
    const block_q8_1 * bx = x;
    float              sum = 0.0f;
    for (int64_t i = 0; i < n / QK8_1; i++) {
        int sumi = 0;
        for (int j = 0; j < QK4_1 / 2; j++) {
            sumi += (bw[i].qs[j] & 0x0F) * bx[i].qs[j];
            sumi += (bw[i].qs[j] >> 4) * bx[i].qs[j + QK4_1/2];
        }
        // sum_j (d q_j + m) dy y_j = d dy sum_j q_j y_j + m s, with s = dy sum_j y_j
        sum += (FP16(bw[i].d) * FP16(bx[i].d)) * sumi + FP16(bw[i].m) * FP16(bx[i].s);
    }
    return sum;
}

float vec_dot_q5_0_q8_0_ref(int64_t n, const void * w, const void * x) {
    const block_q5_0 * bw = w;
    const block_q8_0 * bx = x;
    float              sum = 0.0f;
    for (int64_t i = 0; i < n / QK8_0; i++) {
        const uint32_t qh   = load_u32le(bw[i].qh);
        int            sumi = 0;
        for (int j = 0; j < QK5_0 / 2; j++) {
            const int x0 = ((bw[i].qs[j] & 0x0F) | (((qh >> j) & 1) << 4)) - 16;
            const int x1 = ((bw[i].qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16;
            sumi += x0 * bx[i].qs[j] + x1 * bx[i].qs[j + QK5_0/2];
        }
        sum += sumi * (FP16(bw[i].d) * FP16(bx[i].d));
    }
    return sum;
}

float vec_dot_q5_1_q8_1_ref(int64_t n, const void * w, const void * x) {
    const block_q5_1 * bw = w;
    const block_q8_1 * bx = x;
    float              sum = 0.0f;
    for (int64_t i = 0; i < n / QK8_1; i++) {
        const uint32_t qh   = load_u32le(bw[i].qh);
        int            sumi = 0;
        for (int j = 0; j < QK5_1 / 2; j++) {
            const int x0 = (bw[i].qs[j] & 0x0F) | (((qh >> j) & 1) << 4);
            const int x1 = (bw[i].qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
            sumi += x0 * bx[i].qs[j] + x1 * bx[i].qs[j + QK5_1/2];
        }
        sum += (FP16(bw[i].d) * FP16(bx[i].d)) * sumi + FP16(bw[i].m) * FP16(bx[i].s);
    }
    return sum;
}

float vec_dot_q8_0_q8_0_ref(int64_t n, const void * w, const void * x) {
    const block_q8_0 * bw = w;
    const block_q8_0 * bx = x;
    float              sum = 0.0f;
    for (int64_t i = 0; i < n / QK8_0; i++) {
        int sumi = 0;
        for (int j = 0; j < QK8_0; j++) {
            sumi += bw[i].qs[j] * bx[i].qs[j];
        }
        sum += sumi * (FP16(bw[i].d) * FP16(bx[i].d));
    }
    return sum;
}

float vec_dot_q2_K_q8_K_ref(int64_t n, const void * w, const void * x) {
    const block_q2_K * bw = w;
    const block_q8_K * bx = x;
    float              sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const int8_t * y = bx[i].qs;
        int            sumi = 0, summ = 0;  // scaled quant products; scaled minimum terms
        for (int g = 0; g < 16; g++) {      // 16-element group g: half g/8, shift 2*((g/2)%4)
            const uint8_t * q     = bw[i].qs + 32 * (g / 8) + 16 * (g % 2);
            const int       shift = 2 * ((g / 2) % 4);
            int             s     = 0;
            for (int l = 0; l < 16; l++) {
                s += ((q[l] >> shift) & 3) * y[16*g + l];
            }
            sumi += (bw[i].scales[g] & 0xF) * s;
            summ += (bw[i].scales[g] >> 4) * bx[i].bsums[g];
        }
        sum += bx[i].d * (FP16(bw[i].d) * sumi - FP16(bw[i].dmin) * summ);
    }
    return sum;
}

float vec_dot_q3_K_q8_K_ref(int64_t n, const void * w, const void * x) {
    const block_q3_K * bw = w;
    const block_q8_K * bx = x;
    float              sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        int8_t scales[16], q[QK_K];
        q3_K_scales(bw[i].scales, scales);
        q3_K_values(&bw[i], q);
        int sumi = 0;
        for (int g = 0; g < 16; g++) {
            int s = 0;
            for (int l = 16 * g; l < 16 * g + 16; l++) {
                s += q[l] * bx[i].qs[l];
            }
            sumi += scales[g] * s;
        }
        sum += bx[i].d * FP16(bw[i].d) * sumi;
    }
    return sum;
}

float vec_dot_q4_K_q8_K_ref(int64_t n, const void * w, const void * x) {
    const block_q4_K * bw = w;
    const block_q8_K * bx = x;
    float              sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const int8_t * y    = bx[i].qs;
        int            sumi = 0, summ = 0;
        for (int j = 0; j < 8; j++) {  // sub-block j: nibble half j%2 of the 32 bytes at 32*(j/2)
            uint8_t sc, m;
            get_scale_min_k4(j, bw[i].scales, &sc, &m);
            const uint8_t * q     = bw[i].qs + 32 * (j / 2);
            const int       shift = 4 * (j % 2);
            int             s     = 0;
            for (int l = 0; l < 32; l++) {
                s += ((q[l] >> shift) & 0xF) * y[32*j + l];
            }
            sumi += sc * s;
            summ += m * (bx[i].bsums[2*j] + bx[i].bsums[2*j + 1]);
        }
        sum += bx[i].d * (FP16(bw[i].d) * sumi - FP16(bw[i].dmin) * summ);
    }
    return sum;
}

float vec_dot_q5_K_q8_K_ref(int64_t n, const void * w, const void * x) {
    const block_q5_K * bw = w;
    const block_q8_K * bx = x;
    float              sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const int8_t * y    = bx[i].qs;
        int            sumi = 0, summ = 0;
        for (int j = 0; j < 8; j++) {  // as q4_K; the 5th bit of sub-block j is bit j of qh[l]
            uint8_t sc, m;
            get_scale_min_k4(j, bw[i].scales, &sc, &m);
            const uint8_t * q     = bw[i].qs + 32 * (j / 2);
            const int       shift = 4 * (j % 2);
            int             s     = 0;
            for (int l = 0; l < 32; l++) {
                const int v = ((q[l] >> shift) & 0xF) | (((bw[i].qh[l] >> j) & 1) << 4);
                s += v * y[32*j + l];
            }
            sumi += sc * s;
            summ += m * (bx[i].bsums[2*j] + bx[i].bsums[2*j + 1]);
        }
        sum += bx[i].d * (FP16(bw[i].d) * sumi - FP16(bw[i].dmin) * summ);
    }
    return sum;
}

float vec_dot_q6_K_q8_K_ref(int64_t n, const void * w, const void * x) {
    const block_q6_K * bw = w;
    const block_q8_K * bx = x;
    float              sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        int sumi = 0;
        for (int e = 0; e < QK_K; e += 16) {  // 16-element group e/16 has scale sc[e/16]
            const int half = e / 128, r = e % 128;   // r: 0..127 within the half
            const int l0   = r % 32, quarter = r / 32;  // element = 32*quarter + l
            const uint8_t * ql = bw[i].ql + 64 * half + 32 * (quarter & 1);
            const uint8_t * qh = bw[i].qh + 32 * half;
            int             s  = 0;
            for (int l = l0; l < l0 + 16; l++) {
                const int lo = (quarter < 2) ? (ql[l] & 0xF) : (ql[l] >> 4);
                const int q  = (lo | ((qh[l] >> (2 * quarter)) & 3) << 4) - 32;
                s += q * bx[i].qs[e + l - l0];
            }
            sumi += bw[i].scales[e / 16] * s;
        }
        sum += bx[i].d * FP16(bw[i].d) * sumi;
    }
    return sum;
}

// =============================================================================================
// Traits table and kernel selection
// =============================================================================================

#define WEIGHT(T, nm, bs, ts, vdt) \
    [GGML_TYPE_##T] = { .name = #nm, .block_size = bs, .type_size = ts, .is_weight = true, \
                        .vec_dot_type = GGML_TYPE_##vdt, .dequantize_row = dequantize_row_##nm }
#define SIZE_ONLY(id, nm, bs, ts) [id] = { .name = nm, .block_size = bs, .type_size = ts }

// vec_dot, vec_dot_rows and quantize_row are filled in by apply_kernels().
static struct ggml_type_traits type_traits[GGML_TYPE_COUNT_MAX] = {
    WEIGHT(F32,  f32,  1,     4,                  F32),
    WEIGHT(F16,  f16,  1,     2,                  F32),
    WEIGHT(BF16, bf16, 1,     2,                  F32),
    WEIGHT(Q4_0, q4_0, QK4_0, sizeof(block_q4_0), Q8_0),
    WEIGHT(Q4_1, q4_1, QK4_1, sizeof(block_q4_1), Q8_1),
    WEIGHT(Q5_0, q5_0, QK5_0, sizeof(block_q5_0), Q8_0),
    WEIGHT(Q5_1, q5_1, QK5_1, sizeof(block_q5_1), Q8_1),
    WEIGHT(Q8_0, q8_0, QK8_0, sizeof(block_q8_0), Q8_0),
    WEIGHT(Q2_K, q2_K, QK_K,  sizeof(block_q2_K), Q8_K),
    WEIGHT(Q3_K, q3_K, QK_K,  sizeof(block_q3_K), Q8_K),
    WEIGHT(Q4_K, q4_K, QK_K,  sizeof(block_q4_K), Q8_K),
    WEIGHT(Q5_K, q5_K, QK_K,  sizeof(block_q5_K), Q8_K),
    WEIGHT(Q6_K, q6_K, QK_K,  sizeof(block_q6_K), Q8_K),
    [GGML_TYPE_Q8_1] = { .name = "q8_1", .block_size = QK8_1, .type_size = sizeof(block_q8_1),
                         .vec_dot_type = GGML_TYPE_Q8_1 },
    [GGML_TYPE_Q8_K] = { .name = "q8_K", .block_size = QK_K, .type_size = sizeof(block_q8_K),
                         .vec_dot_type = GGML_TYPE_Q8_K },
    // Known to ggml, sized here so such files parse, without kernels (ggml-common.h sizes).
    SIZE_ONLY(16, "iq2_xxs", QK_K, 66),  SIZE_ONLY(17, "iq2_xs", QK_K, 74),
    SIZE_ONLY(18, "iq3_xxs", QK_K, 98),  SIZE_ONLY(19, "iq1_s",  QK_K, 50),
    SIZE_ONLY(20, "iq4_nl",  32,   18),  SIZE_ONLY(21, "iq3_s",  QK_K, 110),
    SIZE_ONLY(22, "iq2_s",   QK_K, 82),  SIZE_ONLY(23, "iq4_xs", QK_K, 136),
    SIZE_ONLY(24, "i8",      1,    1),   SIZE_ONLY(25, "i16",    1,    2),
    SIZE_ONLY(26, "i32",     1,    4),   SIZE_ONLY(27, "i64",    1,    8),
    SIZE_ONLY(28, "f64",     1,    8),   SIZE_ONLY(29, "iq1_m",  QK_K, 56),
    SIZE_ONLY(34, "tq1_0",   QK_K, 54),  SIZE_ONLY(35, "tq2_0",  QK_K, 66),
    SIZE_ONLY(39, "mxfp4",   32,   17),
};

// vec_dot_rows for types without a multi-row kernel: one vec_dot per row.
#define DEFINE_ROWS_LOOP(T)                                                                  \
    static void rows_loop_##T(int64_t n, int64_t n_rows, const void * w, size_t w_stride,    \
                              const void * x, float * out) {                                \
        const ggml_vec_dot_fn dot = type_traits[GGML_TYPE_##T].vec_dot;                      \
        for (int64_t r = 0; r < n_rows; r++) {                                               \
            out[r] = dot(n, (const uint8_t *) w + (size_t) r * w_stride, x);                 \
        }                                                                                    \
    }
DEFINE_ROWS_LOOP(F32)  DEFINE_ROWS_LOOP(F16)  DEFINE_ROWS_LOOP(BF16)
DEFINE_ROWS_LOOP(Q4_0) DEFINE_ROWS_LOOP(Q4_1) DEFINE_ROWS_LOOP(Q5_0) DEFINE_ROWS_LOOP(Q5_1)
DEFINE_ROWS_LOOP(Q8_0) DEFINE_ROWS_LOOP(Q2_K) DEFINE_ROWS_LOOP(Q3_K) DEFINE_ROWS_LOOP(Q4_K)
DEFINE_ROWS_LOOP(Q5_K) DEFINE_ROWS_LOOP(Q6_K)

static const ggml_vec_dot_rows_fn rows_loops[GGML_TYPE_COUNT_MAX] = {
    [GGML_TYPE_F32] = rows_loop_F32,   [GGML_TYPE_F16] = rows_loop_F16,
    [GGML_TYPE_BF16] = rows_loop_BF16, [GGML_TYPE_Q4_0] = rows_loop_Q4_0,
    [GGML_TYPE_Q4_1] = rows_loop_Q4_1, [GGML_TYPE_Q5_0] = rows_loop_Q5_0,
    [GGML_TYPE_Q5_1] = rows_loop_Q5_1, [GGML_TYPE_Q8_0] = rows_loop_Q8_0,
    [GGML_TYPE_Q2_K] = rows_loop_Q2_K, [GGML_TYPE_Q3_K] = rows_loop_Q3_K,
    [GGML_TYPE_Q4_K] = rows_loop_Q4_K, [GGML_TYPE_Q5_K] = rows_loop_Q5_K,
    [GGML_TYPE_Q6_K] = rows_loop_Q6_K,
};

// The kernels in force; starts as the scalar set so the table is never half empty.
static struct quants_kernels kernels;
static int                   isa_best;
static int                   isa_current;
static char                  cpu_features[128];
static pthread_once_t        init_once = PTHREAD_ONCE_INIT;
static atomic_int            init_done;

static void scalar_kernels(struct quants_kernels * k) {
    memset(k, 0, sizeof(*k));
    k->vec_dot[GGML_TYPE_F32]  = vec_dot_f32_f32_ref;
    k->vec_dot[GGML_TYPE_F16]  = vec_dot_f16_f32_ref;
    k->vec_dot[GGML_TYPE_BF16] = vec_dot_bf16_f32_ref;
    k->vec_dot[GGML_TYPE_Q4_0] = vec_dot_q4_0_q8_0_ref;
    k->vec_dot[GGML_TYPE_Q4_1] = vec_dot_q4_1_q8_1_ref;
    k->vec_dot[GGML_TYPE_Q5_0] = vec_dot_q5_0_q8_0_ref;
    k->vec_dot[GGML_TYPE_Q5_1] = vec_dot_q5_1_q8_1_ref;
    k->vec_dot[GGML_TYPE_Q8_0] = vec_dot_q8_0_q8_0_ref;
    k->vec_dot[GGML_TYPE_Q2_K] = vec_dot_q2_K_q8_K_ref;
    k->vec_dot[GGML_TYPE_Q3_K] = vec_dot_q3_K_q8_K_ref;
    k->vec_dot[GGML_TYPE_Q4_K] = vec_dot_q4_K_q8_K_ref;
    k->vec_dot[GGML_TYPE_Q5_K] = vec_dot_q5_K_q8_K_ref;
    k->vec_dot[GGML_TYPE_Q6_K] = vec_dot_q6_K_q8_K_ref;
    k->quantize_row[GGML_TYPE_F32]  = quantize_row_f32_copy;
    k->quantize_row[GGML_TYPE_Q8_0] = quantize_row_q8_0_ref;
    k->quantize_row[GGML_TYPE_Q8_1] = quantize_row_q8_1_ref;
    k->quantize_row[GGML_TYPE_Q8_K] = quantize_row_q8_K_ref;
    k->dot_f16_f32      = dot_f16_f32_ref;
    k->axpy_f16_f32     = axpy_f16_f32_ref;
    k->fp16_to_fp32_row = fp16_to_fp32_row_ref;
    k->fp32_to_fp16_row = fp32_to_fp16_row_ref;
}

static void build_kernels(int isa, struct quants_kernels * k) {
    scalar_kernels(k);
#if defined(CKV_HAVE_X86_KERNELS)
    if (isa >= QUANTS_ISA_AVX2) {
        quants_register_avx2(k);
    }
    if (isa >= QUANTS_ISA_AVX512) {
        quants_register_avx512(k);
    }
#else
    (void) isa;
#endif
}

static void apply_kernels(int isa) {
    build_kernels(isa, &kernels);
    for (int t = 0; t < GGML_TYPE_COUNT_MAX; t++) {
        struct ggml_type_traits * tt = &type_traits[t];
        tt->vec_dot      = kernels.vec_dot[t];
        tt->quantize_row = kernels.quantize_row[t];
        tt->vec_dot_rows = kernels.vec_dot_rows[t] ? kernels.vec_dot_rows[t] : rows_loops[t];
        tt->vec_dot_tile = kernels.vec_dot_tile[t];
    }
    isa_current = isa;
}

// Which ISA level this CPU runs (the compiler's cpuid helper also checks that the OS saves
// the AVX / AVX-512 register state).
static int detect_isa(void) {
    int isa = QUANTS_ISA_SCALAR;
#if defined(CKV_HAVE_X86_KERNELS) && defined(__GNUC__)
    __builtin_cpu_init();
    const bool avx2   = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c");
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512vnni");
    snprintf(cpu_features, sizeof(cpu_features),
             "AVX2=%d FMA=%d F16C=%d AVX512=%d AVX512_VNNI=%d",
             __builtin_cpu_supports("avx2") ? 1 : 0, __builtin_cpu_supports("fma") ? 1 : 0,
             __builtin_cpu_supports("f16c") ? 1 : 0, __builtin_cpu_supports("avx512f") ? 1 : 0,
             __builtin_cpu_supports("avx512vnni") ? 1 : 0);
    if (avx2) {
        isa = avx512 ? QUANTS_ISA_AVX512 : QUANTS_ISA_AVX2;
    }
#else
    snprintf(cpu_features, sizeof(cpu_features), "AVX2=0 FMA=0 F16C=0 AVX512=0 AVX512_VNNI=0");
#endif
    return isa;
}

static void init_once_fn(void) {
    isa_best = detect_isa();
    apply_kernels(isa_best);
    atomic_store_explicit(&init_done, 1, memory_order_release);
}

void quants_init(void) { pthread_once(&init_once, init_once_fn); }

static inline void ensure_init(void) {
    if (!atomic_load_explicit(&init_done, memory_order_acquire)) {
        quants_init();
    }
}

int quants_isa_best(void) {
    ensure_init();
    return isa_best;
}

int quants_set_isa(int isa) {
    ensure_init();
    if (isa < QUANTS_ISA_SCALAR) {
        isa = QUANTS_ISA_SCALAR;
    }
    apply_kernels(isa < isa_best ? isa : isa_best);
    return isa_current;
}

int quants_isa_current(void) {
    ensure_init();
    return isa_current;
}

void quants_set_force_scalar(bool force) {
    quants_set_isa(force ? QUANTS_ISA_SCALAR : QUANTS_ISA_AVX512);
}

const char * quants_cpu_features(void) {
    ensure_init();
    return cpu_features;
}

// =============================================================================================
// Lookups and convenience wrappers
// =============================================================================================

const struct ggml_type_traits * ggml_type_traits_get(uint32_t type) {
    ensure_init();
    if (type >= GGML_TYPE_COUNT_MAX || type_traits[type].name == NULL) {
        return NULL;
    }
    return &type_traits[type];
}

const char * ggml_type_name(uint32_t type) {
    const struct ggml_type_traits * t = ggml_type_traits_get(type);
    return t ? t->name : "unknown";
}

size_t ggml_row_size(uint32_t type, int64_t n) {
    const struct ggml_type_traits * t = ggml_type_traits_get(type);
    if (t == NULL || n < 0 || n % t->block_size != 0) {
        return 0;
    }
    const uint64_t n_blocks = (uint64_t) (n / t->block_size);
    if (n_blocks > SIZE_MAX / t->type_size) {
        return 0;
    }
    return (size_t) n_blocks * t->type_size;
}

void dequantize_row(uint32_t type, const void * src, float * dst, int64_t n) {
    ggml_type_traits_get(type)->dequantize_row(src, dst, n);
}

void quantize_row_act(uint32_t vec_dot_type, const float * src, void * dst, int64_t n) {
    ggml_type_traits_get(vec_dot_type)->quantize_row(src, dst, n);
}

float vec_dot(uint32_t type, int64_t n, const void * w_row, const void * x_row) {
    return ggml_type_traits_get(type)->vec_dot(n, w_row, x_row);
}

void vec_dot_rows(uint32_t type, int64_t n, int64_t n_rows, const void * w, size_t w_stride,
                  const void * x_row, float * out) {
    ggml_type_traits_get(type)->vec_dot_rows(n, n_rows, w, w_stride, x_row, out);
}

void ckv_fp32_to_fp16_row(const float * src, ckv_fp16 * dst, int64_t n) {
    ensure_init();
    kernels.fp32_to_fp16_row(src, dst, n);
}

void ckv_fp16_to_fp32_row(const ckv_fp16 * src, float * dst, int64_t n) {
    ensure_init();
    kernels.fp16_to_fp32_row(src, dst, n);
}

float ckv_dot_f16_f32(int64_t n, const ckv_fp16 * a, const float * b) {
    ensure_init();
    return kernels.dot_f16_f32(n, a, b);
}

void ckv_axpy_f16_f32(int64_t n, float alpha, const ckv_fp16 * x, float * y) {
    ensure_init();
    kernels.axpy_f16_f32(n, alpha, x, y);
}
