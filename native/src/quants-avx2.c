// quants-avx2.c - AVX2 + FMA + F16C kernels: dot products of every weight type except
// q2_K/q3_K against their activation types, fp16/bf16/f32 dots, fp16 conversion and axpy,
// and the q8_0/q8_1/q8_K activation quantisers (bit-exact with the scalar reference).
//
// Built with -mavx2 -mfma -mf16c (CMake does this for *-avx2.c) and only called after
// quants.c has seen those features in cpuid. The integer products use the u8 x s8 pair
// multiply (vpmaddubsw): an unsigned weight against a signed activation directly, or, for
// signed x signed, |w| against y carrying w's sign. Pair sums stay below 2^15: |w| <= 128 and
// the quantisers keep activations within [-127, 127].
#include "quants-impl.h"

#if defined(CKV_HAVE_X86_KERNELS)

#include <immintrin.h>
#include <string.h>

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

static inline float h2f(ckv_fp16 h) { return _cvtsh_ss(h); }

// The 32 quants of a 4-bit block as bytes 0..15: elements 0..15 are the low nibbles, 16..31
// the high nibbles, matching the activation order.
static inline __m256i unpack_nibbles(const uint8_t * qs) {
    const __m128i b = _mm_loadu_si128((const __m128i *) qs);
    const __m256i v = _mm256_set_m128i(_mm_srli_epi16(b, 4), b);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

// Byte j = 0xFF where bit j of bits is set, else 0.
static inline __m256i bits_to_bytes(uint32_t bits) {
    const __m256i shuf = _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202,
                                            0x0303030303030303);
    const __m256i mask = _mm256_set1_epi64x((long long) 0x8040201008040201ULL);
    const __m256i v    = _mm256_shuffle_epi8(_mm256_set1_epi32((int) bits), shuf);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, mask), mask);
}

// sum of u[j] * s[j] in groups of four bytes -> 8 x int32 (u unsigned, s signed).
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

// Same for two signed operands: |a| against b with a's sign moved onto it.
static inline __m256i dot_s8s8(__m256i a, __m256i b) {
    return dot_u8s8(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
}

static inline __m256i load256(const void * p) { return _mm256_loadu_si256((const __m256i *) p); }

// Weight rows stream from DRAM once per token and the hardware prefetchers lose track of them
// between short rows (measured: 2.3 GB/s without, 8 GB/s with, on a 64 MiB q4_1 stack), so
// the kernels prefetch this many bytes ahead; past the row end that is the next row.
#define PREFETCH_DIST 1536
#define PREFETCH(p) _mm_prefetch((const char *) (p) + PREFETCH_DIST, _MM_HINT_T0)

static inline uint32_t load_u32(const uint8_t * p) {
    uint32_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

// ---------------------------------------------------------------------------------------------
// 32-element blocks against q8_0 / q8_1
// ---------------------------------------------------------------------------------------------

// The quants of a q4_0 / q5_0 block as signed bytes (also the prefill tile's unpacking).
static inline __m256i q4_0_quants(const block_q4_0 * w) {
    return _mm256_sub_epi8(unpack_nibbles(w->qs), _mm256_set1_epi8(8));
}

static inline __m256i q5_0_quants(const block_q5_0 * w) {
    // nib | 0xF0 reads as nib - 16 in int8: the offset, cancelled where the 5th bit is set.
    const __m256i hi = _mm256_andnot_si256(bits_to_bytes(load_u32(w->qh)), _mm256_set1_epi8((char) 0xF0));
    return _mm256_or_si256(unpack_nibbles(w->qs), hi);
}

static inline __m256i q4_0_block(const block_q4_0 * w, const block_q8_0 * x) {
    return dot_s8s8(q4_0_quants(w), load256(x->qs));
}

static inline __m256i q5_0_block(const block_q5_0 * w, const block_q8_0 * x) {
    return dot_s8s8(q5_0_quants(w), load256(x->qs));
}

static inline __m256i q8_0_block(const block_q8_0 * w, const block_q8_0 * x) {
    return dot_s8s8(load256(w->qs), load256(x->qs));
}

// Blocks with a plain scale: sum_i d_w,i d_x,i sumi_i, two blocks per step to keep two
// independent accumulator chains.
#define DOT_32(name, WT, XT, block_fn)                                                        \
    static float name(int64_t n, const void * w, const void * x) {                          \
        const WT * bw = w;                                                                  \
        const XT * bx = x;                                                                  \
        const int64_t nb = n / 32;                                                          \
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();                      \
        int64_t i = 0;                                                                      \
        for (; i + 1 < nb; i += 2) {                                                        \
            PREFETCH(&bw[i]);                                                               \
            const __m256 d0 = _mm256_set1_ps(h2f(bw[i].d) * h2f(bx[i].d));                 \
            const __m256 d1 = _mm256_set1_ps(h2f(bw[i + 1].d) * h2f(bx[i + 1].d));         \
            acc0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(block_fn(&bw[i], &bx[i])), acc0); \
            acc1 = _mm256_fmadd_ps(d1, _mm256_cvtepi32_ps(block_fn(&bw[i + 1], &bx[i + 1])), acc1); \
        }                                                                                   \
        if (i < nb) {                                                                       \
            const __m256 d0 = _mm256_set1_ps(h2f(bw[i].d) * h2f(bx[i].d));                 \
            acc0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(block_fn(&bw[i], &bx[i])), acc0); \
        }                                                                                   \
        return hsum_ps(_mm256_add_ps(acc0, acc1));                                          \
    }

DOT_32(vec_dot_q4_0_q8_0_avx2, block_q4_0, block_q8_0, q4_0_block)
DOT_32(vec_dot_q5_0_q8_0_avx2, block_q5_0, block_q8_0, q5_0_block)
DOT_32(vec_dot_q8_0_q8_0_avx2, block_q8_0, block_q8_0, q8_0_block)

static inline __m256i q4_1_block(const block_q4_1 * w, const block_q8_1 * x) {
    return dot_u8s8(unpack_nibbles(w->qs), load256(x->qs));
}

static inline __m256i q5_1_block(const block_q5_1 * w, const block_q8_1 * x) {
    const __m256i hi = _mm256_and_si256(bits_to_bytes(load_u32(w->qh)), _mm256_set1_epi8(0x10));
    return dot_u8s8(_mm256_or_si256(unpack_nibbles(w->qs), hi), load256(x->qs));
}

// Blocks with a minimum: the m * s terms (s = d_x sum(x)) add up separately.
#define DOT_32_MIN(name, WT, block_fn)                                                        \
    static float name(int64_t n, const void * w, const void * x) {                          \
        const WT *         bw = w;                                                          \
        const block_q8_1 * bx = x;                                                          \
        const int64_t nb = n / 32;                                                          \
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();                      \
        float  summs = 0.0f;                                                                \
        int64_t i = 0;                                                                      \
        for (; i + 1 < nb; i += 2) {                                                        \
            PREFETCH(&bw[i]);                                                               \
            const __m256 d0 = _mm256_set1_ps(h2f(bw[i].d) * h2f(bx[i].d));                 \
            const __m256 d1 = _mm256_set1_ps(h2f(bw[i + 1].d) * h2f(bx[i + 1].d));         \
            summs += h2f(bw[i].m) * h2f(bx[i].s) + h2f(bw[i + 1].m) * h2f(bx[i + 1].s);    \
            acc0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(block_fn(&bw[i], &bx[i])), acc0); \
            acc1 = _mm256_fmadd_ps(d1, _mm256_cvtepi32_ps(block_fn(&bw[i + 1], &bx[i + 1])), acc1); \
        }                                                                                   \
        if (i < nb) {                                                                       \
            const __m256 d0 = _mm256_set1_ps(h2f(bw[i].d) * h2f(bx[i].d));                 \
            summs += h2f(bw[i].m) * h2f(bx[i].s);                                           \
            acc0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(block_fn(&bw[i], &bx[i])), acc0); \
        }                                                                                   \
        return hsum_ps(_mm256_add_ps(acc0, acc1)) + summs;                                  \
    }

DOT_32_MIN(vec_dot_q4_1_q8_1_avx2, block_q4_1, q4_1_block)
DOT_32_MIN(vec_dot_q5_1_q8_1_avx2, block_q5_1, q5_1_block)

// ---------------------------------------------------------------------------------------------
// K-quants against q8_K
// ---------------------------------------------------------------------------------------------

// The 8 scales (bytes 0..7) and 8 mins (bytes 8..15) of a q4_K/q5_K block, 6 bits each.
static inline void k4_scales_mins(const uint8_t * s, uint8_t out[16]) {
    uint32_t u[4];
    memcpy(u, s, 12);
    const uint32_t m6 = 0x3F3F3F3F, m4 = 0x0F0F0F0F, m2 = 0x03030303;
    u[3] = ((u[2] >> 4) & m4) | (((u[1] >> 6) & m2) << 4);  // mins 4..7
    const uint32_t mins_lo = u[1] & m6;                        // mins 0..3
    u[1] = (u[2] & m4) | (((u[0] >> 6) & m2) << 4);          // scales 4..7
    u[2] = mins_lo;
    u[0] &= m6;                                                // scales 0..3
    memcpy(out, u, 16);
}

// sum_j min_j * (bsums[2j] + bsums[2j+1]) for the 8 sub-blocks of 32.
static inline int k4_min_term(const uint8_t * mins, const int16_t * bsums) {
    const __m256i pair = _mm256_madd_epi16(load256(bsums), _mm256_set1_epi16(1));
    const __m256i m    = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *) mins));
    return hsum_epi32(_mm256_mullo_epi32(pair, m));
}

static inline __m256i k4_scale(const uint8_t * sm, int j) { return _mm256_set1_epi16(sm[j]); }

static float vec_dot_q4_K_q8_K_avx2(int64_t n, const void * w, const void * x) {
    const block_q4_K * bw = w;
    const block_q8_K * bx = x;
    const __m256i      m4 = _mm256_set1_epi8(0x0F);
    __m256             acc = _mm256_setzero_ps();
    float              acc_m = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        uint8_t        sm[16];
        for (size_t o = 0; o < sizeof(bw[i]); o += 64) PREFETCH((const uint8_t *) &bw[i] + o);
        k4_scales_mins(bw[i].scales, sm);
        const float    dy = bx[i].d;
        const int8_t * y  = bx[i].qs;
        acc_m += dy * h2f(bw[i].dmin) * (float) k4_min_term(sm + 8, bx[i].bsums);
        __m256i sumi = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {  // 64 elements: low nibbles then high nibbles of 32 bytes
            const __m256i q  = load256(bw[i].qs + 32 * c);
            const __m256i lo = _mm256_maddubs_epi16(_mm256_and_si256(q, m4), load256(y + 64 * c));
            const __m256i hi = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4),
                                                    load256(y + 64 * c + 32));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(lo, k4_scale(sm, 2 * c)));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(hi, k4_scale(sm, 2 * c + 1)));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dy * h2f(bw[i].d)), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum_ps(acc) - acc_m;
}

static float vec_dot_q5_K_q8_K_avx2(int64_t n, const void * w, const void * x) {
    const block_q5_K * bw = w;
    const block_q8_K * bx = x;
    const __m256i      m4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    __m256             acc = _mm256_setzero_ps();
    float              acc_m = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        uint8_t        sm[16];
        k4_scales_mins(bw[i].scales, sm);
        const float    dy = bx[i].d;
        const int8_t * y  = bx[i].qs;
        const __m256i  qh = load256(bw[i].qh);
        acc_m += dy * h2f(bw[i].dmin) * (float) k4_min_term(sm + 8, bx[i].bsums);
        __m256i sumi = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {  // sub-block j takes its 5th bit from bit j of qh[l]
            const __m256i q   = load256(bw[i].qs + 32 * c);
            const __m256i hlo = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * c), one), 4);
            const __m256i hhi = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * c + 1), one), 4);
            const __m256i qlo = _mm256_or_si256(_mm256_and_si256(q, m4), hlo);
            const __m256i qhi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4), hhi);
            const __m256i lo  = _mm256_maddubs_epi16(qlo, load256(y + 64 * c));
            const __m256i hi  = _mm256_maddubs_epi16(qhi, load256(y + 64 * c + 32));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(lo, k4_scale(sm, 2 * c)));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(hi, k4_scale(sm, 2 * c + 1)));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dy * h2f(bw[i].d)), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum_ps(acc) - acc_m;
}

// int16 [s[2k] x 8 | s[2k+1] x 8]: the scales of the two 16-element groups of vector k.
static inline __m256i q6_K_scale_pair(__m128i scales, int k) {
    const __m128i idx = _mm_set_epi64x(0x0101010101010101LL * (2 * k + 1),
                                       0x0101010101010101LL * (2 * k));
    return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, idx));
}

// The 6-bit quants of half h (128 elements) of a q6_K block, unsigned (q + 32), as 4 x 32
// bytes in activation order: ql[64h..64h+63] gives the low 4 bits, qh[32h..32h+31] the top 2.
static inline void q6_K_unpack_half(const block_q6_K * b, int h, __m256i q[4]) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x30);
    const __m256i ql0 = load256(b->ql + 64 * h), ql1 = load256(b->ql + 64 * h + 32);
    const __m256i qh  = load256(b->qh + 32 * h);
    q[0] = _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m2));
    q[1] = _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m2));
    q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m2));
    q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                           _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2));
}

static float vec_dot_q6_K_q8_K_avx2(int64_t n, const void * w, const void * x) {
    const block_q6_K * bw = w;
    const block_q8_K * bx = x;
    __m256             acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        for (size_t o = 0; o < sizeof(bw[i]); o += 64) PREFETCH((const uint8_t *) &bw[i] + o);
        const __m128i  scales = _mm_loadu_si128((const __m128i *) bw[i].scales);
        const int8_t * y      = bx[i].qs;
        // q - 32 handled as q against y minus 32 * sum(scale * bsum).
        const __m256i  sc16   = _mm256_cvtepi8_epi16(scales);
        const int      offset = 32 * hsum_epi32(_mm256_madd_epi16(sc16, load256(bx[i].bsums)));
        __m256i        sumi   = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {  // 128 elements: ql[64h..64h+63], qh[32h..32h+31]
            __m256i q[4];
            q6_K_unpack_half(&bw[i], h, q);
            for (int k = 0; k < 4; k++) {
                const __m256i p = _mm256_maddubs_epi16(q[k], load256(y + 128 * h + 32 * k));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, q6_K_scale_pair(scales, 4 * h + k)));
            }
        }
        const __m256 d = _mm256_set1_ps(bx[i].d * h2f(bw[i].d));
        sumi = _mm256_sub_epi32(sumi, _mm256_setr_epi32(offset, 0, 0, 0, 0, 0, 0, 0));
        acc  = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum_ps(acc);
}

// ---------------------------------------------------------------------------------------------
// Float rows: f32 / f16 / bf16 weights against f32, fp16 conversion and axpy
// ---------------------------------------------------------------------------------------------

static inline __m256 load_f16x8(const ckv_fp16 * p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) p));
}

static inline __m256 load_bf16x8(const uint16_t * p) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *) p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

// Four accumulators over 32 elements per step, then a scalar tail.
#define DOT_FLOAT(name, WT, load_w, scalar_w)                                                 \
    static float name(int64_t n, const void * w, const void * x) {                          \
        const WT *    a = w;                                                                \
        const float * b = x;                                                                \
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;                         \
        int64_t i = 0;                                                                      \
        for (; i + 32 <= n; i += 32) {                                                      \
            s0 = _mm256_fmadd_ps(load_w(a + i),      _mm256_loadu_ps(b + i),      s0);      \
            s1 = _mm256_fmadd_ps(load_w(a + i + 8),  _mm256_loadu_ps(b + i + 8),  s1);      \
            s2 = _mm256_fmadd_ps(load_w(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);      \
            s3 = _mm256_fmadd_ps(load_w(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);      \
        }                                                                                   \
        for (; i + 8 <= n; i += 8) {                                                        \
            s0 = _mm256_fmadd_ps(load_w(a + i), _mm256_loadu_ps(b + i), s0);                \
        }                                                                                   \
        float sum = hsum_ps(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));   \
        for (; i < n; i++) {                                                                \
            sum += scalar_w(a[i]) * b[i];                                                   \
        }                                                                                   \
        return sum;                                                                         \
    }

static inline float bf16_scalar(uint16_t h) {
    const uint32_t u = (uint32_t) h << 16;
    float          f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

static inline float f32_scalar(float f) { return f; }

DOT_FLOAT(vec_dot_f32_f32_avx2,  float,    _mm256_loadu_ps, f32_scalar)
DOT_FLOAT(vec_dot_f16_f32_avx2,  ckv_fp16, load_f16x8,      h2f)
DOT_FLOAT(vec_dot_bf16_f32_avx2, uint16_t, load_bf16x8,     bf16_scalar)

static float dot_f16_f32_avx2(int64_t n, const ckv_fp16 * a, const float * b) {
    return vec_dot_f16_f32_avx2(n, a, b);
}

static void axpy_f16_f32_avx2(int64_t n, float alpha, const ckv_fp16 * x, float * y) {
    const __m256 va = _mm256_set1_ps(alpha);
    int64_t      i  = 0;
    for (; i + 16 <= n; i += 16) {
        _mm256_storeu_ps(y + i,     _mm256_fmadd_ps(va, load_f16x8(x + i),     _mm256_loadu_ps(y + i)));
        _mm256_storeu_ps(y + i + 8, _mm256_fmadd_ps(va, load_f16x8(x + i + 8), _mm256_loadu_ps(y + i + 8)));
    }
    for (; i < n; i++) {
        y[i] += alpha * h2f(x[i]);
    }
}

static void fp16_to_fp32_row_avx2(const ckv_fp16 * src, float * dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(dst + i, load_f16x8(src + i));
    }
    for (; i < n; i++) {
        dst[i] = h2f(src[i]);
    }
}

static void fp32_to_fp16_row_avx2(const float * src, ckv_fp16 * dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *) (dst + i), h);
    }
    for (; i < n; i++) {
        dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
    }
}

// ---------------------------------------------------------------------------------------------
// Activation quantisers
// ---------------------------------------------------------------------------------------------

static inline float hmax_ps(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

// Four vectors of 8 int32 in [-128, 127] -> 32 int8 in order.
static inline __m256i pack_i32x32(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i ab = _mm256_packs_epi32(a, b);    // lanes: a0 b0 | a1 b1
    const __m256i cd = _mm256_packs_epi32(c, d);
    const __m256i v  = _mm256_packs_epi16(ab, cd);  // a0 b0 c0 d0 | a1 b1 c1 d1
    return _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// One 32-element block as llama.cpp's x86 quantize_row_q8_0/q8_1: scale d = amax / 127, quants
// x * (127 / amax) rounded half to even; returns the quant sum and the unrounded d (q8_1 needs
// it for s).
static inline int quantize_block_q8(const float * src, int8_t * qs, float * d_out) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256       v[4];
    __m256       amax = _mm256_setzero_ps();
    for (int k = 0; k < 4; k++) {
        v[k] = _mm256_loadu_ps(src + 8 * k);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[k]));
    }
    const float max = hmax_ps(amax);
    const float d   = max / 127.0f;
    const float id  = max != 0.0f ? 127.0f / max : 0.0f;
    __m256i     q[4];
    for (int k = 0; k < 4; k++) {
        const __m256 scaled = _mm256_mul_ps(v[k], _mm256_set1_ps(id));
        q[k] = _mm256_cvtps_epi32(_mm256_round_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    _mm256_storeu_si256((__m256i *) qs, pack_i32x32(q[0], q[1], q[2], q[3]));
    *d_out = d;
    return hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
}

static void quantize_row_q8_0_avx2(const float * src, void * dst, int64_t n) {
    block_q8_0 * y = dst;
    for (int64_t i = 0; i < n / QK8_0; i++) {
        float d;
        quantize_block_q8(src + QK8_0 * i, y[i].qs, &d);
        y[i].d = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
    }
}

static void quantize_row_q8_1_avx2(const float * src, void * dst, int64_t n) {
    block_q8_1 * y = dst;
    for (int64_t i = 0; i < n / QK8_1; i++) {
        float     d;
        const int sum = quantize_block_q8(src + QK8_1 * i, y[i].qs, &d);
        y[i].d = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
        y[i].s = _cvtss_sh((float) sum * d, _MM_FROUND_TO_NEAREST_INT);
    }
}

// The first element of largest magnitude in 256 floats (ggml keeps the first on ties).
static inline float q8_K_signed_max(const float * x) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256       amax = _mm256_setzero_ps();
    for (int k = 0; k < QK_K; k += 8) {
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
    }
    const __m256 am = _mm256_set1_ps(hmax_ps(amax));
    for (int k = 0; k < QK_K; k += 8) {
        const __m256 a    = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k));
        const int    mask = _mm256_movemask_ps(_mm256_cmp_ps(a, am, _CMP_EQ_OQ));
        if (mask) {
            return x[k + __builtin_ctz((unsigned) mask)];
        }
    }
    return 0.0f;  // all zero (or NaN)
}

static void quantize_row_q8_K_avx2(const float * src, void * dst, int64_t n) {
    block_q8_K * y = dst;
    for (int64_t i = 0; i < n / QK_K; i++, src += QK_K) {
        const float max = q8_K_signed_max(src);
        memset(&y[i], 0, sizeof(y[i]));
        if (max == 0.0f) {
            continue;
        }
        const float  iscale = -127.0f / max;
        const __m256 vs     = _mm256_set1_ps(iscale);
        for (int k = 0; k < QK_K; k += 32) {  // the rounding mode rounds halves to even
            __m256i q[4];
            for (int v = 0; v < 4; v++) {
                q[v] = _mm256_cvtps_epi32(_mm256_mul_ps(vs, _mm256_loadu_ps(src + k + 8 * v)));
            }
            _mm256_storeu_si256((__m256i *) (y[i].qs + k), pack_i32x32(q[0], q[1], q[2], q[3]));
            y[i].bsums[k / 16]     = (int16_t) hsum_epi32(_mm256_add_epi32(q[0], q[1]));
            y[i].bsums[k / 16 + 1] = (int16_t) hsum_epi32(_mm256_add_epi32(q[2], q[3]));
        }
        y[i].d = 1.0f / iscale;
    }
}

// ---------------------------------------------------------------------------------------------
// Prefill tiles: VEC_DOT_TILE_ROWS weight rows x VEC_DOT_TILE_TOKENS tokens, q8_K activations
// ---------------------------------------------------------------------------------------------
//
// Each (row, token) pair gets exactly its vec_dot's value: the integer sums are exact in any
// order, and the float steps (one fmadd per super-block, q4_K's min term, the final sums) run
// as in vec_dot. A super-block's scales and quants are unpacked once for all the tokens, and
// every activation load serves all the rows.

enum { TR = VEC_DOT_TILE_ROWS, TT = VEC_DOT_TILE_TOKENS };

// DOT_32's two chains (even blocks into acc[0], odd into acc[1]) for every (row, token) of the
// tile; dot_s8s8 split so that |w| is computed once per row. q4_0 / q5_0 only (q8_0 has no
// tile: with nothing to unpack it ran slower than vec_dot, 0.83x in a 896 x 1024 x 64-token
// loop).
static inline void tile32_avx2(uint32_t type, size_t bsz, int64_t n, const uint8_t * w, size_t w_stride,
                               const uint8_t * x, size_t x_stride, float * out, int64_t out_stride) {
    __m256 acc[2][TR][TT];
    for (int c = 0; c < 2; c++)
        for (int r = 0; r < TR; r++)
            for (int t = 0; t < TT; t++) acc[c][r][t] = _mm256_setzero_ps();
    const int64_t nb = n / 32;
    for (int64_t i = 0; i < nb; i++) {
        const int c = (int) (i & 1);
        __m256i   ys[TT];
        float     dx[TT];
        for (int t = 0; t < TT; t++) {
            const block_q8_0 * bx = (const block_q8_0 *) (x + (size_t) t * x_stride) + i;
            ys[t] = load256(bx->qs);
            dx[t] = h2f(bx->d);
        }
        for (int r = 0; r < TR; r++) {
            const uint8_t * blk = w + (size_t) r * w_stride + (size_t) i * bsz;
            PREFETCH(blk);
            const __m256i q   = type == GGML_TYPE_Q4_0 ? q4_0_quants((const block_q4_0 *) blk)
                                                         : q5_0_quants((const block_q5_0 *) blk);
            const __m256i mag = _mm256_sign_epi8(q, q);
            const float   dw  = h2f(*(const ckv_fp16 *) blk);   // d leads every one of these blocks
            for (int t = 0; t < TT; t++) {
                const __m256i sumi = _mm256_madd_epi16(_mm256_maddubs_epi16(mag, _mm256_sign_epi8(ys[t], q)),
                                                       _mm256_set1_epi16(1));
                acc[c][r][t] = _mm256_fmadd_ps(_mm256_set1_ps(dw * dx[t]), _mm256_cvtepi32_ps(sumi), acc[c][r][t]);
            }
        }
    }
    for (int r = 0; r < TR; r++)
        for (int t = 0; t < TT; t++) out[t * out_stride + r] = hsum_ps(_mm256_add_ps(acc[0][r][t], acc[1][r][t]));
}

static void vec_dot_tile_q4_0_avx2(int64_t n, const void * w, size_t ws, const void * x, size_t xs, float * out,
                                   int64_t os) {
    tile32_avx2(GGML_TYPE_Q4_0, sizeof(block_q4_0), n, w, ws, x, xs, out, os);
}
static void vec_dot_tile_q5_0_avx2(int64_t n, const void * w, size_t ws, const void * x, size_t xs, float * out,
                                   int64_t os) {
    tile32_avx2(GGML_TYPE_Q5_0, sizeof(block_q5_0), n, w, ws, x, xs, out, os);
}

// q4_1 against q8_1: DOT_32_MIN's steps for every (row, token) of the tile (two blocks per step
// into two chains, the m * s terms summed pairwise in the same order), each block's nibbles
// and scales unpacked once for the tile's tokens.
static void vec_dot_tile_q4_1_avx2(int64_t n, const void * w, size_t w_stride, const void * x, size_t x_stride,
                                   float * out, int64_t out_stride) {
    __m256        acc0[TR][TT], acc1[TR][TT];
    float         summs[TR][TT];
    const int64_t nb = n / 32;
    for (int r = 0; r < TR; r++)
        for (int t = 0; t < TT; t++) acc0[r][t] = acc1[r][t] = _mm256_setzero_ps(), summs[r][t] = 0.0f;
    for (int64_t i = 0; i < nb; i += 2) {
        const int          pair = i + 1 < nb;
        const block_q8_1 * bx[TT];
        for (int t = 0; t < TT; t++) bx[t] = (const block_q8_1 *) ((const uint8_t *) x + (size_t) t * x_stride) + i;
        for (int r = 0; r < TR; r++) {
            const block_q4_1 * bw = (const block_q4_1 *) ((const uint8_t *) w + (size_t) r * w_stride) + i;
            PREFETCH(bw);
            const __m256i u0 = unpack_nibbles(bw[0].qs), u1 = pair ? unpack_nibbles(bw[1].qs) : u0;
            for (int t = 0; t < TT; t++) {
                const float ms0 = h2f(bw[0].m) * h2f(bx[t][0].s);
                summs[r][t] += pair ? ms0 + h2f(bw[1].m) * h2f(bx[t][1].s) : ms0;
                const __m256 d0 = _mm256_set1_ps(h2f(bw[0].d) * h2f(bx[t][0].d));
                acc0[r][t] = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(dot_u8s8(u0, load256(bx[t][0].qs))), acc0[r][t]);
                if (pair) {
                    const __m256 d1 = _mm256_set1_ps(h2f(bw[1].d) * h2f(bx[t][1].d));
                    acc1[r][t] = _mm256_fmadd_ps(d1, _mm256_cvtepi32_ps(dot_u8s8(u1, load256(bx[t][1].qs))), acc1[r][t]);
                }
            }
        }
    }
    for (int r = 0; r < TR; r++)
        for (int t = 0; t < TT; t++)
            out[t * out_stride + r] = hsum_ps(_mm256_add_ps(acc0[r][t], acc1[r][t])) + summs[r][t];
}

// A K-quant super-block's integer sums into the tile's chains: acc += d_x d_w * sumi, with
// vec_dot's d_x * d_w.
static inline void k_tile_fold(__m256 acc[TR][TT], __m256i sumi[TR][TT], const block_q8_K * const bx[TT],
                               const ckv_fp16 dw[TR]) {
    for (int r = 0; r < TR; r++)
        for (int t = 0; t < TT; t++)
            acc[r][t] = _mm256_fmadd_ps(_mm256_set1_ps(bx[t]->d * h2f(dw[r])), _mm256_cvtepi32_ps(sumi[r][t]), acc[r][t]);
}

static void vec_dot_tile_q4_K_avx2(int64_t n, const void * w, size_t w_stride, const void * x, size_t x_stride,
                                   float * out, int64_t out_stride) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256        acc[TR][TT];
    float         acc_m[TR][TT];
    for (int r = 0; r < TR; r++)
        for (int t = 0; t < TT; t++) acc[r][t] = _mm256_setzero_ps(), acc_m[r][t] = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const block_q4_K * bw[TR];
        const block_q8_K * bx[TT];
        uint8_t            sm[TR][16];
        for (int r = 0; r < TR; r++) {
            bw[r] = (const block_q4_K *) ((const uint8_t *) w + (size_t) r * w_stride) + i;
            for (size_t o = 0; o < sizeof(*bw[r]); o += 64) PREFETCH((const uint8_t *) bw[r] + o);
            k4_scales_mins(bw[r]->scales, sm[r]);
        }
        for (int t = 0; t < TT; t++) bx[t] = (const block_q8_K *) ((const uint8_t *) x + (size_t) t * x_stride) + i;
        for (int r = 0; r < TR; r++)
            for (int t = 0; t < TT; t++)
                acc_m[r][t] += bx[t]->d * h2f(bw[r]->dmin) * (float) k4_min_term(sm[r] + 8, bx[t]->bsums);
        __m256i sumi[TR][TT];
        for (int r = 0; r < TR; r++)
            for (int t = 0; t < TT; t++) sumi[r][t] = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {  // 64 elements: low nibbles then high nibbles of 32 bytes
            __m256i lo[TR], hi[TR];
            for (int r = 0; r < TR; r++) {
                const __m256i q = load256(bw[r]->qs + 32 * c);
                lo[r] = _mm256_and_si256(q, m4);
                hi[r] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            }
            for (int t = 0; t < TT; t++) {
                const __m256i ylo = load256(bx[t]->qs + 64 * c), yhi = load256(bx[t]->qs + 64 * c + 32);
                for (int r = 0; r < TR; r++) {
                    const __m256i a = _mm256_madd_epi16(_mm256_maddubs_epi16(lo[r], ylo), k4_scale(sm[r], 2 * c));
                    const __m256i b = _mm256_madd_epi16(_mm256_maddubs_epi16(hi[r], yhi), k4_scale(sm[r], 2 * c + 1));
                    sumi[r][t] = _mm256_add_epi32(sumi[r][t], _mm256_add_epi32(a, b));
                }
            }
        }
        ckv_fp16 dw[TR];
        for (int r = 0; r < TR; r++) dw[r] = bw[r]->d;
        k_tile_fold(acc, sumi, bx, dw);
    }
    for (int r = 0; r < TR; r++)
        for (int t = 0; t < TT; t++) out[t * out_stride + r] = hsum_ps(acc[r][t]) - acc_m[r][t];
}

static void vec_dot_tile_q6_K_avx2(int64_t n, const void * w, size_t w_stride, const void * x, size_t x_stride,
                                   float * out, int64_t out_stride) {
    __m256        acc[TR][TT];
    for (int r = 0; r < TR; r++)
        for (int t = 0; t < TT; t++) acc[r][t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const block_q6_K * bw[TR];
        const block_q8_K * bx[TT];
        __m128i            scales[TR];
        __m256i            sumi[TR][TT];
        for (int r = 0; r < TR; r++) {
            bw[r] = (const block_q6_K *) ((const uint8_t *) w + (size_t) r * w_stride) + i;
            for (size_t o = 0; o < sizeof(*bw[r]); o += 64) PREFETCH((const uint8_t *) bw[r] + o);
            scales[r] = _mm_loadu_si128((const __m128i *) bw[r]->scales);
        }
        for (int t = 0; t < TT; t++) bx[t] = (const block_q8_K *) ((const uint8_t *) x + (size_t) t * x_stride) + i;
        for (int r = 0; r < TR; r++) {   // q - 32 as q against y minus 32 * sum(scale * bsum)
            const __m256i sc16 = _mm256_cvtepi8_epi16(scales[r]);
            for (int t = 0; t < TT; t++) {
                const int offset = 32 * hsum_epi32(_mm256_madd_epi16(sc16, load256(bx[t]->bsums)));
                sumi[r][t] = _mm256_setr_epi32(-offset, 0, 0, 0, 0, 0, 0, 0);
            }
        }
        for (int h = 0; h < 2; h++) {  // 128 elements: ql[64h..64h+63], qh[32h..32h+31]
            for (int r = 0; r < TR; r++) {
                __m256i q[4];
                q6_K_unpack_half(bw[r], h, q);
                for (int k = 0; k < 4; k++) {
                    const __m256i sc = q6_K_scale_pair(scales[r], 4 * h + k);
                    for (int t = 0; t < TT; t++) {
                        const __m256i p = _mm256_maddubs_epi16(q[k], load256(bx[t]->qs + 128 * h + 32 * k));
                        sumi[r][t] = _mm256_add_epi32(sumi[r][t], _mm256_madd_epi16(p, sc));
                    }
                }
            }
        }
        ckv_fp16 dw[TR];
        for (int r = 0; r < TR; r++) dw[r] = bw[r]->d;
        k_tile_fold(acc, sumi, bx, dw);
    }
    for (int r = 0; r < TR; r++)
        for (int t = 0; t < TT; t++) out[t * out_stride + r] = hsum_ps(acc[r][t]);
}

// ---------------------------------------------------------------------------------------------
// Registration
// ---------------------------------------------------------------------------------------------

void quants_register_avx2(struct quants_kernels * k) {
    k->vec_dot[GGML_TYPE_F32]  = vec_dot_f32_f32_avx2;
    k->vec_dot[GGML_TYPE_F16]  = vec_dot_f16_f32_avx2;
    k->vec_dot[GGML_TYPE_BF16] = vec_dot_bf16_f32_avx2;
    k->vec_dot[GGML_TYPE_Q4_0] = vec_dot_q4_0_q8_0_avx2;
    k->vec_dot[GGML_TYPE_Q4_1] = vec_dot_q4_1_q8_1_avx2;
    k->vec_dot[GGML_TYPE_Q5_0] = vec_dot_q5_0_q8_0_avx2;
    k->vec_dot[GGML_TYPE_Q5_1] = vec_dot_q5_1_q8_1_avx2;
    k->vec_dot[GGML_TYPE_Q8_0] = vec_dot_q8_0_q8_0_avx2;
    k->vec_dot[GGML_TYPE_Q4_K] = vec_dot_q4_K_q8_K_avx2;
    k->vec_dot[GGML_TYPE_Q5_K] = vec_dot_q5_K_q8_K_avx2;
    k->vec_dot[GGML_TYPE_Q6_K] = vec_dot_q6_K_q8_K_avx2;
    k->vec_dot_tile[GGML_TYPE_Q4_0] = vec_dot_tile_q4_0_avx2;
    k->vec_dot_tile[GGML_TYPE_Q5_0] = vec_dot_tile_q5_0_avx2;
    k->vec_dot_tile[GGML_TYPE_Q4_1] = vec_dot_tile_q4_1_avx2;
    k->vec_dot_tile[GGML_TYPE_Q4_K] = vec_dot_tile_q4_K_avx2;
    k->vec_dot_tile[GGML_TYPE_Q6_K] = vec_dot_tile_q6_K_avx2;
    k->quantize_row[GGML_TYPE_Q8_0] = quantize_row_q8_0_avx2;
    k->quantize_row[GGML_TYPE_Q8_1] = quantize_row_q8_1_avx2;
    k->quantize_row[GGML_TYPE_Q8_K] = quantize_row_q8_K_avx2;
    k->dot_f16_f32      = dot_f16_f32_avx2;
    k->axpy_f16_f32     = axpy_f16_f32_avx2;
    k->fp16_to_fp32_row = fp16_to_fp32_row_avx2;
    k->fp32_to_fp16_row = fp32_to_fp16_row_avx2;
}

#endif  // CKV_HAVE_X86_KERNELS
