// quants-avx512.c - AVX-512 (F/BW/VL/DQ) + VNNI kernels for the decode hot path: q4_1 x q8_1
// (SmolLM2's matrices), q8_0 x q8_0 (its tied output head and the small models' fallback
// type), q4_0 / q5_0 x q8_0; q4_1 also several rows at once (vec_dot_rows).
//
// Built with the AVX-512 flags (CMake does this for *-avx512.c) and registered by quants.c on
// top of the AVX2 set only when cpuid reports all of them. vpdpbusd multiplies unsigned by
// signed bytes and adds groups of four into int32 lanes: q4_1's nibbles are unsigned already;
// signed weights are offset by 128 (w ^ 0x80) and 128 * sum(y) is taken off again.
//
// Layout tricks: q4_1 and q8_1 blocks are whole numbers of dwords (20 and 36 bytes), so one
// two-source dword permute gathers the quants of four blocks into one register, block k in
// 128-bit lane k, and another gathers their fp16 scales. A group of fewer than four blocks
// (the row tail) uses masked loads, which read nothing past the row, and zero scales.
#include "quants-impl.h"

#if defined(CKV_HAVE_X86_KERNELS)

#include <immintrin.h>
#include <string.h>

#define PREFETCH_DIST 1536  // bytes; see quants-avx2.c
#define PREFETCH(p) _mm_prefetch((const char *) (p) + PREFETCH_DIST, _MM_HINT_T0)

#define ALWAYS_INLINE inline __attribute__((always_inline))

static ALWAYS_INLINE float hsum512(__m512 v) {
    __m256 s = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_movehdup_ps(t));
    return _mm_cvtss_f32(t);
}

static ALWAYS_INLINE float hsum256(__m256 v) {
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_movehdup_ps(t));
    return _mm_cvtss_f32(t);
}

// Which of the 16 dwords of a load starting `skip` dwords into a run lie within its first n.
static ALWAYS_INLINE __mmask16 dword_mask(int n, int skip) {
    const int k = n - skip;
    return k <= 0 ? 0 : k >= 16 ? 0xFFFF : (__mmask16) ((1u << k) - 1);
}

// =============================================================================================
// q4_1 x q8_1
// =============================================================================================

// Four q8_1 blocks rearranged for the q4_1 layout: lo holds quants 0..15 of block k in lane k,
// hi quants 16..31; ds = (d0, s0, d1, s1, d2, s2, d3, s3) as floats.
struct q8_1_group {
    __m512i lo, hi;
    __m256  ds;
};

// Dword k*9 + 1 + j of four q8_1 blocks is quant 4j..4j+3 of block k.
#define Q8_1_QS_IDX _mm512_setr_epi32(1, 2, 3, 4, 10, 11, 12, 13, 19, 20, 21, 22, 28, 29, 30, 31)

static ALWAYS_INLINE struct q8_1_group load_q8_1_group(const block_q8_1 * y, int nblk) {
    const int32_t * p  = (const int32_t *) y;
    const int       nd = 9 * nblk;  // dwords present
    const __m512i   a  = _mm512_maskz_loadu_epi32(dword_mask(nd, 0), p);
    const __m512i   b  = _mm512_maskz_loadu_epi32(dword_mask(nd, 16), p + 16);
    const __m512i   a4 = _mm512_maskz_loadu_epi32(dword_mask(nd, 4), p + 4);
    const __m512i   b4 = _mm512_maskz_loadu_epi32(dword_mask(nd, 20), p + 20);
    const __m512i   ds = _mm512_permutex2var_epi32(a, _mm512_setr_epi32(0, 9, 18, 27, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), b);
    struct q8_1_group g;
    g.lo = _mm512_permutex2var_epi32(a, Q8_1_QS_IDX, b);
    g.hi = _mm512_permutex2var_epi32(a4, Q8_1_QS_IDX, b4);  // the same pattern, 4 dwords later
    g.ds = _mm256_cvtph_ps(_mm512_castsi512_si128(ds));
    return g;
}

// Four q4_1 blocks of one row unpacked: low and high nibbles (quants 0..15 and 16..31 of block
// k in 128-bit lane k, as in q8_1_group) and the (d_k, m_k) pairs as floats.
struct q4_1_group {
    __m512i lo, hi;
    __m256  dm;
};

static ALWAYS_INLINE struct q4_1_group load_q4_1_group(const block_q4_1 * w, int nblk) {
    const int32_t * p  = (const int32_t *) w;
    const int       nd = 5 * nblk;
    const __m512i   a  = _mm512_maskz_loadu_epi32(dword_mask(nd, 0), p);
    const __m512i   b  = _mm512_maskz_loadu_epi32(dword_mask(nd, 16), p + 16);
    const __m512i   qs = _mm512_permutex2var_epi32(
        a, _mm512_setr_epi32(1, 2, 3, 4, 6, 7, 8, 9, 11, 12, 13, 14, 16, 17, 18, 19), b);
    const __m512i dm = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 5, 10, 15, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), a);
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    struct q4_1_group q;
    q.lo = _mm512_and_si512(qs, m4);
    q.hi = _mm512_and_si512(_mm512_srli_epi16(qs, 4), m4);
    q.dm = _mm256_cvtph_ps(_mm512_castsi512_si128(dm));
    return q;
}

// acc += four q4_1 blocks of one row (q) against g; acc_ms collects m * s in its odd lanes.
static ALWAYS_INLINE void q4_1_dot_group(const struct q4_1_group * q, const struct q8_1_group * g, __m512 * acc,
                                         __m256 * acc_ms) {
    __m512i isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q->lo, g->lo);
    isum = _mm512_dpbusd_epi32(isum, q->hi, g->hi);
    // (d_k dy_k, m_k s_k) pairs; block k's d dy spread over lane k's four int32 sums
    const __m256 dd    = _mm256_mul_ps(q->dm, g->ds);
    const __m512 scale = _mm512_permutexvar_ps(
        _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6), _mm512_castps256_ps512(dd));
    *acc    = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *acc);
    *acc_ms = _mm256_add_ps(*acc_ms, dd);
}

static ALWAYS_INLINE void q4_1_group(const block_q4_1 * w, int nblk, const struct q8_1_group * g,
                                     __m512 * acc, __m256 * acc_ms) {
    const struct q4_1_group q = load_q4_1_group(w, nblk);
    q4_1_dot_group(&q, g, acc, acc_ms);
}

static ALWAYS_INLINE float q4_1_finish(__m512 acc, __m256 acc_ms) {
    const __m256 odd = _mm256_castsi256_ps(_mm256_setr_epi32(0, -1, 0, -1, 0, -1, 0, -1));
    return hsum512(acc) + hsum256(_mm256_and_ps(acc_ms, odd));
}

// acc[r] += blocks i .. i+nblk-1 of R rows; nblk is a constant for all but the row tail, so
// the load masks fold away in the main loop.
static ALWAYS_INLINE void q4_1_rows_step(int R, int nblk, const uint8_t * w, size_t stride,
                                         const block_q8_1 * y, int64_t i, __m512 * acc,
                                         __m256 * acc_ms) {
    const struct q8_1_group g = load_q8_1_group(y + i, nblk);
    for (int r = 0; r < R; r++) {
        const block_q4_1 * wr = (const block_q4_1 *) (w + (size_t) r * stride) + i;
        PREFETCH(wr);
        PREFETCH((const uint8_t *) wr + 64);
        q4_1_group(wr, nblk, &g, &acc[r], &acc_ms[r]);
    }
}

// R rows of q4_1 against one q8_1 row; R is a compile-time constant at every call site.
static ALWAYS_INLINE void q4_1_rows_r(int R, int64_t n, const uint8_t * w, size_t stride,
                                      const block_q8_1 * y, float * out) {
    __m512 acc[4];
    __m256 acc_ms[4];
    for (int r = 0; r < R; r++) {
        acc[r]    = _mm512_setzero_ps();
        acc_ms[r] = _mm256_setzero_ps();
    }
    const int64_t nb = n / QK4_1;
    int64_t       i  = 0;
    for (; i + 4 <= nb; i += 4) {
        q4_1_rows_step(R, 4, w, stride, y, i, acc, acc_ms);
    }
    if (i < nb) {
        q4_1_rows_step(R, (int) (nb - i), w, stride, y, i, acc, acc_ms);
    }
    for (int r = 0; r < R; r++) {
        out[r] = q4_1_finish(acc[r], acc_ms[r]);
    }
}

static float vec_dot_q4_1_q8_1_avx512(int64_t n, const void * w, const void * x) {
    float out;
    q4_1_rows_r(1, n, w, 0, x, &out);
    return out;
}

static void vec_dot_rows_q4_1_avx512(int64_t n, int64_t n_rows, const void * w, size_t stride,
                                     const void * x, float * out) {
    const uint8_t * p = w;
    int64_t         r = 0;
    for (; r + 4 <= n_rows; r += 4) {
        q4_1_rows_r(4, n, p + (size_t) r * stride, stride, x, out + r);
    }
    for (; r < n_rows; r++) {
        q4_1_rows_r(1, n, p + (size_t) r * stride, stride, x, out + r);
    }
}

// =============================================================================================
// 32-byte-quant blocks against q8_0: q8_0, q4_0, q5_0
// =============================================================================================

// [h0 x 8 | h1 x 8] as floats: the fp16 scales of a block pair spread over their int32 lanes.
static ALWAYS_INLINE __m512 f16_pair(ckv_fp16 h0, ckv_fp16 h1) {
    const __m256i v = _mm256_mask_set1_epi16(_mm256_set1_epi16((short) h0), 0xFF00, (short) h1);
    return _mm512_cvtph_ps(v);
}

// The 64 activation quants of blocks i and i+1 (zeros for a missing second block).
static ALWAYS_INLINE __m512i q8_0_pair_qs(const block_q8_0 * y, int nblk) {
    const __m256i q0 = _mm256_loadu_si256((const __m256i *) y[0].qs);
    const __m256i q1 = nblk > 1 ? _mm256_loadu_si256((const __m256i *) y[1].qs) : _mm256_setzero_si256();
    return _mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1);
}

static ALWAYS_INLINE __m512 q8_0_pair_d(const block_q8_0 * y, int nblk) {
    return f16_pair(y[0].d, nblk > 1 ? y[1].d : 0);
}

// One activation block pair, prepared once for all rows: quants, 128 * (sum of each four
// quants) negated (the w ^ 0x80 offset), scales.
struct q8_0_pair {
    __m512i y, neg_c;
    __m512  dy;
};

static ALWAYS_INLINE struct q8_0_pair load_q8_0_pair(const block_q8_0 * y, int nblk) {
    struct q8_0_pair p;
    p.y     = q8_0_pair_qs(y, nblk);
    p.neg_c = _mm512_sub_epi32(_mm512_setzero_si512(),
                               _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8((char) 0x80), p.y));
    p.dy    = q8_0_pair_d(y, nblk);
    return p;
}

static ALWAYS_INLINE void q8_0_pair_row(const block_q8_0 * w, int nblk, const struct q8_0_pair * p,
                                        __m512 * acc) {
    const __m512i wq   = _mm512_xor_si512(q8_0_pair_qs(w, nblk), _mm512_set1_epi8((char) 0x80));
    const __m512i isum = _mm512_dpbusd_epi32(p->neg_c, wq, p->y);
    const __m512  d    = _mm512_mul_ps(q8_0_pair_d(w, nblk), p->dy);
    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), d, *acc);
}

static ALWAYS_INLINE void q8_0_rows_step(int R, int nblk, const uint8_t * w, size_t stride,
                                         const block_q8_0 * y, int64_t i, __m512 * acc) {
    const struct q8_0_pair p = load_q8_0_pair(y + i, nblk);
    for (int r = 0; r < R; r++) {
        const block_q8_0 * wr = (const block_q8_0 *) (w + (size_t) r * stride) + i;
        PREFETCH(wr);
        PREFETCH((const uint8_t *) wr + 64);
        q8_0_pair_row(wr, nblk, &p, &acc[r]);
    }
}

static ALWAYS_INLINE void q8_0_rows_r(int R, int64_t n, const uint8_t * w, size_t stride,
                                      const block_q8_0 * y, float * out) {
    __m512 acc[4];
    for (int r = 0; r < R; r++) {
        acc[r] = _mm512_setzero_ps();
    }
    const int64_t nb = n / QK8_0;
    int64_t       i  = 0;
    for (; i + 2 <= nb; i += 2) {
        q8_0_rows_step(R, 2, w, stride, y, i, acc);
    }
    if (i < nb) {
        q8_0_rows_step(R, 1, w, stride, y, i, acc);
    }
    for (int r = 0; r < R; r++) {
        out[r] = hsum512(acc[r]);
    }
}

static float vec_dot_q8_0_q8_0_avx512(int64_t n, const void * w, const void * x) {
    float out;
    q8_0_rows_r(1, n, w, 0, x, &out);
    return out;
}

// The 32 nibbles of two 4-bit blocks as [lo0 hi0 | lo1 hi1] (16 bytes each), matching the
// activation order: each block's 16 bytes go to two 128-bit lanes, the second shifted by 4.
static ALWAYS_INLINE __m512i nibble_pair(const uint8_t * qs0, const uint8_t * qs1, int nblk) {
    const __m128i a = _mm_loadu_si128((const __m128i *) qs0);
    const __m128i b = nblk > 1 ? _mm_loadu_si128((const __m128i *) qs1) : _mm_setzero_si128();
    const __m512i z = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3),
                                               _mm512_castsi256_si512(_mm256_set_m128i(b, a)));
    return _mm512_and_si512(_mm512_mask_srli_epi16(z, 0xFF00FF00, z, 4), _mm512_set1_epi8(0x0F));
}

// ---------------------------------------------------------------------------------------------
// Prefill tiles: VEC_DOT_TILE_ROWS weight rows x VEC_DOT_TILE_TOKENS tokens: q4_0 / q5_0, q4_1
// ---------------------------------------------------------------------------------------------
//
// Every (row, token) pair runs the very instructions of its vec_dot (below for q4_0 / q5_0,
// above for q4_1), so a tile equals vec_dot bit for bit; what the tile saves is the work around:
// a weight block pair (nibble unpacking, 5th bits, scales) is prepared once for all the tokens
// and an activation block pair (quants, offset term, scale) once for all the rows.

enum { TR = VEC_DOT_TILE_ROWS, TT = VEC_DOT_TILE_TOKENS };

// Weight block pair i of a row as its vec_dot sees it: unsigned quants with the offset (q4_0:
// 8, q5_0: 16) and the fp16 scales as floats. (q8_0 has no tile: with nothing to unpack it ran
// slower than vec_dot, 0.93x in a 896 x 1024 x 64-token loop.)
struct wpair {
    __m512i q;
    __m512  d;
};

static ALWAYS_INLINE struct wpair load_wpair(uint32_t type, const uint8_t * row, int64_t i, int nblk) {
    struct wpair p;
    if (type == GGML_TYPE_Q4_0) {
        const block_q4_0 * bw = (const block_q4_0 *) row + i;
        p.q = nibble_pair(bw[0].qs, bw[nblk - 1].qs, nblk);
        p.d = f16_pair(bw[0].d, nblk > 1 ? bw[1].d : 0);
    } else {   // q5_0
        const block_q5_0 * bw = (const block_q5_0 *) row + i;
        uint32_t qh0, qh1 = 0;
        memcpy(&qh0, bw[0].qh, 4);
        if (nblk > 1) {
            memcpy(&qh1, bw[1].qh, 4);
        }
        // bit j of the pair's 64-bit mask is the 5th bit of quant j, in activation order
        const __mmask64 hbits = (__mmask64) qh0 | (__mmask64) qh1 << 32;
        p.q = _mm512_or_si512(nibble_pair(bw[0].qs, bw[nblk - 1].qs, nblk),
                              _mm512_maskz_mov_epi8(hbits, _mm512_set1_epi8(0x10)));
        p.d = f16_pair(bw[0].d, nblk > 1 ? bw[1].d : 0);
    }
    return p;
}

// Activation block pair i of a token: quants, the term the weights' offset adds (offset * sum
// of each four quants, subtracted), scale.
struct xpair {
    __m512i y, c;
    __m512  d;
};

static ALWAYS_INLINE struct xpair load_xpair(uint32_t type, const block_q8_0 * x, int64_t i, int nblk) {
    struct xpair p;
    p.y = q8_0_pair_qs(x + i, nblk);
    p.c = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(type == GGML_TYPE_Q4_0 ? 8 : 16), p.y);
    p.d = q8_0_pair_d(x + i, nblk);
    return p;
}

// acc += one (row, token) block pair: sum u y - offset * sum y, times both scales.
static ALWAYS_INLINE __m512 tile_step(const struct wpair * w, const struct xpair * x, __m512 acc) {
    const __m512  d = _mm512_mul_ps(w->d, x->d);
    const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w->q, x->y);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s, x->c)), d, acc);
}

static ALWAYS_INLINE void tile_pairs(uint32_t type, const uint8_t * w, size_t w_stride, const uint8_t * x,
                                     size_t x_stride, int64_t i, int nblk, __m512 acc[TR][TT]) {
    struct xpair xp[TT];
    for (int t = 0; t < TT; t++) {
        xp[t] = load_xpair(type, (const block_q8_0 *) (x + (size_t) t * x_stride), i, nblk);
    }
    for (int r = 0; r < TR; r++) {
        const struct wpair wp = load_wpair(type, w + (size_t) r * w_stride, i, nblk);
        for (int t = 0; t < TT; t++) {
            acc[r][t] = tile_step(&wp, &xp[t], acc[r][t]);
        }
    }
}

static ALWAYS_INLINE void tile_offset_pairs(uint32_t type, int64_t n, const void * w, size_t w_stride,
                                            const void * x, size_t x_stride, float * out, int64_t out_stride) {
    __m512 acc[TR][TT];
    for (int r = 0; r < TR; r++)
        for (int t = 0; t < TT; t++) acc[r][t] = _mm512_setzero_ps();
    const int64_t nb = n / 32;
    int64_t       i  = 0;
    for (; i + 2 <= nb; i += 2) {
        tile_pairs(type, w, w_stride, x, x_stride, i, 2, acc);
    }
    if (i < nb) {
        tile_pairs(type, w, w_stride, x, x_stride, i, 1, acc);
    }
    for (int r = 0; r < TR; r++)
        for (int t = 0; t < TT; t++) out[t * out_stride + r] = hsum512(acc[r][t]);
}

// q4_0 / q5_0 x q8_0, row by row: block pairs through the tile's (row, token) step, so that
// the tiles above equal these bit for bit. Unsigned quants u = q + offset against y:
// sum q y = sum u y - offset * sum y.
static ALWAYS_INLINE float offset_pairs_dot(uint32_t type, size_t bsz, int64_t n, const void * w, const void * x) {
    const int64_t nb  = n / 32;
    __m512        acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i += 2) {
        const int nblk = nb - i < 2 ? 1 : 2;
        PREFETCH((const uint8_t *) w + (size_t) i * bsz);
        const struct wpair wp = load_wpair(type, w, i, nblk);
        const struct xpair xp = load_xpair(type, x, i, nblk);
        acc = tile_step(&wp, &xp, acc);
    }
    return hsum512(acc);
}

static float vec_dot_q4_0_q8_0_avx512(int64_t n, const void * w, const void * x) {
    return offset_pairs_dot(GGML_TYPE_Q4_0, sizeof(block_q4_0), n, w, x);
}

static float vec_dot_q5_0_q8_0_avx512(int64_t n, const void * w, const void * x) {
    return offset_pairs_dot(GGML_TYPE_Q5_0, sizeof(block_q5_0), n, w, x);
}

static void vec_dot_tile_q4_0_avx512(int64_t n, const void * w, size_t ws, const void * x, size_t xs, float * out,
                                     int64_t os) {
    tile_offset_pairs(GGML_TYPE_Q4_0, n, w, ws, x, xs, out, os);
}
static void vec_dot_tile_q5_0_avx512(int64_t n, const void * w, size_t ws, const void * x, size_t xs, float * out,
                                     int64_t os) {
    tile_offset_pairs(GGML_TYPE_Q5_0, n, w, ws, x, xs, out, os);
}

// q4_1 (SmolLM2's matrices): four blocks per step as q4_1_rows_r, each row's group unpacked
// once for the tile's tokens and each token's q8_1 group once for its rows.
static ALWAYS_INLINE void q4_1_tile_step(int nblk, const uint8_t * w, size_t w_stride, const uint8_t * x,
                                         size_t x_stride, int64_t i, __m512 acc[TR][TT], __m256 acc_ms[TR][TT]) {
    struct q8_1_group g[TT];
    for (int t = 0; t < TT; t++) {
        g[t] = load_q8_1_group((const block_q8_1 *) (x + (size_t) t * x_stride) + i, nblk);
    }
    for (int r = 0; r < TR; r++) {
        const block_q4_1 * wr = (const block_q4_1 *) (w + (size_t) r * w_stride) + i;
        PREFETCH(wr);
        PREFETCH((const uint8_t *) wr + 64);
        const struct q4_1_group q = load_q4_1_group(wr, nblk);
        for (int t = 0; t < TT; t++) {
            q4_1_dot_group(&q, &g[t], &acc[r][t], &acc_ms[r][t]);
        }
    }
}

static void vec_dot_tile_q4_1_avx512(int64_t n, const void * w, size_t w_stride, const void * x, size_t x_stride,
                                     float * out, int64_t out_stride) {
    __m512 acc[TR][TT];
    __m256 acc_ms[TR][TT];
    for (int r = 0; r < TR; r++)
        for (int t = 0; t < TT; t++) acc[r][t] = _mm512_setzero_ps(), acc_ms[r][t] = _mm256_setzero_ps();
    const int64_t nb = n / QK4_1;
    int64_t       i  = 0;
    for (; i + 4 <= nb; i += 4) {
        q4_1_tile_step(4, w, w_stride, x, x_stride, i, acc, acc_ms);
    }
    if (i < nb) {
        q4_1_tile_step((int) (nb - i), w, w_stride, x, x_stride, i, acc, acc_ms);
    }
    for (int r = 0; r < TR; r++)
        for (int t = 0; t < TT; t++) out[t * out_stride + r] = q4_1_finish(acc[r][t], acc_ms[r][t]);
}

// ---------------------------------------------------------------------------------------------
// Registration
// ---------------------------------------------------------------------------------------------

void quants_register_avx512(struct quants_kernels * k) {
    k->vec_dot[GGML_TYPE_Q4_0]      = vec_dot_q4_0_q8_0_avx512;
    k->vec_dot[GGML_TYPE_Q4_1]      = vec_dot_q4_1_q8_1_avx512;
    k->vec_dot[GGML_TYPE_Q5_0]      = vec_dot_q5_0_q8_0_avx512;
    k->vec_dot[GGML_TYPE_Q8_0]      = vec_dot_q8_0_q8_0_avx512;
    k->vec_dot_rows[GGML_TYPE_Q4_1] = vec_dot_rows_q4_1_avx512;
    k->vec_dot_tile[GGML_TYPE_Q4_0] = vec_dot_tile_q4_0_avx512;
    k->vec_dot_tile[GGML_TYPE_Q4_1] = vec_dot_tile_q4_1_avx512;
    k->vec_dot_tile[GGML_TYPE_Q5_0] = vec_dot_tile_q5_0_avx512;
    // No multi-row q8_0 kernel: on the output head (576 x 49152, streamed from DRAM) four
    // interleaved row streams ran at 15 GB/s against 35 GB/s for vec_dot row by row with its
    // prefetch 1536 bytes ahead (tests/native/bench-quants.c, 1 thread, Xeon with AVX-512).
}

#endif  // CKV_HAVE_X86_KERNELS
