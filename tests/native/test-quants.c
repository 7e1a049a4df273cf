// test-quants.c - the quantised-type kernels against their references.
//
// For every weight type, on random valid blocks (finite fp16 scales):
//   - scalar dot == dequantised weights . dequantised activations (float rounding only);
//   - scalar dot ~= dequantised weights . unquantised activations (8-bit activation error);
//   - every ISA level this CPU has (scalar, AVX2, AVX-512) agrees with the scalar dot, for
//     vec_dot and vec_dot_rows;
// plus bit-exact activation quantisers per ISA, fp16 conversion (exhaustive round trip,
// rounding cases), the fp16 dot/axpy helpers and the traits table. Prints "N passed, M failed".
#include "quants-impl.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

enum { GGML_TYPE_IQ4_XS_FOR_TEST = 23 };  // sized by the traits table, no kernels


// ---------------------------------------------------------------------------------------------
// Random data
// ---------------------------------------------------------------------------------------------

static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;

static uint64_t rng_u64(void) {  // xorshift64*
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

static float rng_uniform(void) { return (float) (rng_u64() >> 40) / (float) (1 << 24); }  // [0, 1)

static float rng_normal(void) {  // sum of uniforms: cheap, bounded, roughly normal
    float s = 0.0f;
    for (int i = 0; i < 4; i++) {
        s += rng_uniform();
    }
    return (s - 2.0f) * 1.7f;
}

static void put_f16(uint8_t * p, float v) {
    const ckv_fp16 h = ckv_fp32_to_fp16(v);
    memcpy(p, &h, 2);
}

// Finite scale of either sign, magnitudes 2^-12 .. 2^-2, as models have.
static float rng_scale(void) {
    const float mag = ldexpf(1.0f + rng_uniform(), -2 - (int) (rng_u64() % 11));
    return (rng_u64() & 1) ? -mag : mag;
}

// Byte offsets of the fp16 scale fields inside one block of each quantised weight type.
static int scale_offsets(uint32_t type, int off[2]) {
    switch (type) {
        case GGML_TYPE_Q4_0: case GGML_TYPE_Q5_0: case GGML_TYPE_Q8_0:
            off[0] = 0; return 1;
        case GGML_TYPE_Q4_1: case GGML_TYPE_Q5_1: case GGML_TYPE_Q4_K: case GGML_TYPE_Q5_K:
            off[0] = 0; off[1] = 2; return 2;
        case GGML_TYPE_Q2_K: off[0] = 80; off[1] = 82; return 2;
        case GGML_TYPE_Q3_K: off[0] = 108; return 1;
        case GGML_TYPE_Q6_K: off[0] = 208; return 1;
        default: return 0;
    }
}

// n elements of a weight type: random bits, with every scale made finite.
static void random_weights(uint32_t type, void * dst, int64_t n) {
    const struct ggml_type_traits * t = ggml_type_traits_get(type);
    const int64_t                   nb = n / t->block_size;
    uint8_t *                       p  = dst;
    if (type == GGML_TYPE_F32 || type == GGML_TYPE_F16 || type == GGML_TYPE_BF16) {
        for (int64_t i = 0; i < n; i++) {
            const float v = rng_normal();
            if (type == GGML_TYPE_F32) {
                memcpy(p + 4 * i, &v, 4);
            } else if (type == GGML_TYPE_F16) {
                put_f16(p + 2 * i, v);
            } else {
                uint32_t u;
                memcpy(&u, &v, 4);
                const uint16_t h = (uint16_t) (u >> 16);
                memcpy(p + 2 * i, &h, 2);
            }
        }
        return;
    }
    for (size_t i = 0; i < (size_t) nb * t->type_size; i++) {
        p[i] = (uint8_t) rng_u64();
    }
    int off[2];
    const int n_off = scale_offsets(type, off);
    for (int64_t b = 0; b < nb; b++) {
        for (int k = 0; k < n_off; k++) {
            put_f16(p + b * t->type_size + off[k], rng_scale());
        }
    }
}

static void random_floats(float * x, int64_t n, float scale) {
    for (int64_t i = 0; i < n; i++) {
        x[i] = scale * rng_normal();
    }
}

// ---------------------------------------------------------------------------------------------
// fp16
// ---------------------------------------------------------------------------------------------

static uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static void test_fp16_round_trip(void) {
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        const float    f    = ckv_fp16_to_fp32((ckv_fp16) h);
        const ckv_fp16 back = ckv_fp32_to_fp16(f);
        const bool     nan  = ((h >> 10) & 0x1F) == 0x1F && (h & 0x3FF);
        if (nan ? !(isnan(f) && ((back >> 10) & 0x1F) == 0x1F && (back & 0x3FF)) : back != h) {
            if (bad++ < 5) {
                printf("  fp16 0x%04x -> %g -> 0x%04x\n", h, f, back);
            }
        }
    }
    CHECK(bad == 0, "fp16 -> fp32 -> fp16 round trip: %d mismatches", bad);
    CHECK(ckv_fp16_to_fp32(0x3C00) == 1.0f && ckv_fp16_to_fp32(0xC000) == -2.0f &&
          ckv_fp16_to_fp32(0x0001) == 0x1p-24f && ckv_fp16_to_fp32(0x7BFF) == 65504.0f,
          "fp16 known values");
}

// Nearest-even rounding: halfway cases, overflow to inf, subnormals, underflow to zero.
static void test_fp32_to_fp16_rounding(void) {
    struct { float f; ckv_fp16 h; } cases[] = {
        {1.0f, 0x3C00}, {-1.0f, 0xBC00}, {65504.0f, 0x7BFF}, {65519.99f, 0x7BFF},
        {65520.0f, 0x7C00}, {1e10f, 0x7C00}, {-1e10f, 0xFC00}, {0x1p-24f, 0x0001},
        {0x1p-25f, 0x0000}, {0x1.8p-25f, 0x0001}, {0x1.8p-24f, 0x0002},  // ties go to even
        {0x1p-14f, 0x0400}, {1.0f + 0x1p-11f, 0x3C00}, {1.0f + 0x3p-11f, 0x3C02},
        {-0.0f, 0x8000}, {INFINITY, 0x7C00},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const ckv_fp16 h = ckv_fp32_to_fp16(cases[i].f);
        CHECK(h == cases[i].h, "fp32 %a -> fp16 0x%04x, want 0x%04x", cases[i].f, h, cases[i].h);
    }
    // Every fp16 value and the midpoints to its neighbours, against the exact rule.
    int bad = 0;
    for (uint32_t h = 0; h < 0x7BFF; h++) {  // 0x7BFF -> inf is covered by the cases above
        const float lo = ckv_fp16_to_fp32((ckv_fp16) h), hi = ckv_fp16_to_fp32((ckv_fp16) (h + 1));
        const float mid = lo + (hi - lo) * 0.5f;  // exact: fp16 values have 11 significant bits
        const ckv_fp16 want = (h & 1) ? (ckv_fp16) (h + 1) : (ckv_fp16) h;
        if (ckv_fp32_to_fp16(mid) != want || ckv_fp32_to_fp16(nextafterf(mid, 0.0f)) != h ||
            ckv_fp32_to_fp16(nextafterf(mid, INFINITY)) != (ckv_fp16) (h + 1)) {
            if (bad++ < 5) {
                printf("  fp16 0x%04x: midpoint %a -> 0x%04x\n", h, mid, ckv_fp32_to_fp16(mid));
            }
        }
    }
    CHECK(bad == 0, "fp32 -> fp16 midpoints: %d mismatches", bad);
}

// The ISA row helpers against the scalar conversions, element by element.
static void test_fp16_rows(int isa) {
    enum { N = 1027 };
    float    src[N], back[N];
    ckv_fp16 h[N];
    random_floats(src, N, 100.0f);
    src[0] = 65520.0f;
    src[1] = 0x1.8p-25f;
    src[2] = -0.0f;
    ckv_fp32_to_fp16_row(src, h, N);
    ckv_fp16_to_fp32_row(h, back, N);
    int bad = 0;
    for (int i = 0; i < N; i++) {
        bad += h[i] != ckv_fp32_to_fp16(src[i]) || bits_of(back[i]) != bits_of(ckv_fp16_to_fp32(h[i]));
    }
    CHECK(bad == 0, "isa %d: fp16 row conversion: %d mismatches", isa, bad);
    random_floats(src, N, 1.0f);  // finite values for the dot and axpy checks
    ckv_fp32_to_fp16_row(src, h, N);

    float  y[N], y_ref[N];
    double dot_ref = 0.0;
    random_floats(y, N, 1.0f);
    memcpy(y_ref, y, sizeof(y));
    for (int i = 0; i < N; i++) {
        dot_ref += (double) ckv_fp16_to_fp32(h[i]) * y[i];
        y_ref[i] += 0.37f * ckv_fp16_to_fp32(h[i]);
    }
    double mag = 0.0;
    for (int i = 0; i < N; i++) {
        mag += fabs((double) ckv_fp16_to_fp32(h[i]) * y[i]);
    }
    const float dot = ckv_dot_f16_f32(N, h, y);
    CHECK(fabs(dot - dot_ref) <= 1e-5 * mag, "isa %d: ckv_dot_f16_f32 %g vs %g", isa, dot, dot_ref);
    ckv_axpy_f16_f32(N, 0.37f, h, y);
    bad = 0;
    for (int i = 0; i < N; i++) {
        bad += fabsf(y[i] - y_ref[i]) > 1e-6f * (fabsf(y_ref[i]) + 1.0f);
    }
    CHECK(bad == 0, "isa %d: ckv_axpy_f16_f32: %d mismatches", isa, bad);
}

// ---------------------------------------------------------------------------------------------
// Activation quantisers: every ISA bit-exact with the reference
// ---------------------------------------------------------------------------------------------

static void test_quantizers(int isa) {
    const uint32_t types[] = {GGML_TYPE_Q8_0, GGML_TYPE_Q8_1, GGML_TYPE_Q8_K};
    void (*refs[])(const float *, void *, int64_t) = {quantize_row_q8_0_ref, quantize_row_q8_1_ref,
                                                      quantize_row_q8_K_ref};
    enum { N = 4 * 256 };
    static float   x[N];
    static uint8_t a[N * 2], b[N * 2];
    for (int round = 0; round < 4; round++) {
        random_floats(x, N, round == 3 ? 1e-3f : 3.0f);
        if (round == 1) {  // halfway cases: x / d lands on k + 0.5 in the first block
            for (int j = 0; j < 32; j++) x[j] = (j == 0) ? 127.0f : (float) (j - 16) + 0.5f;
            for (int j = 32; j < 64; j++) x[j] = 0.0f;                // all-zero block
            x[300] = -x[301] - 1000.0f;                               // q8_K: a clear max...
            x[302] = -x[300];                                         // ...tied by its negation
        }
        if (round == 2) {
            for (int j = 256; j < 512; j++) x[j] = 0.0f;              // all-zero q8_K block
        }
        for (int t = 0; t < 3; t++) {
            const size_t size = ggml_row_size(types[t], N);
            memset(a, 0xAA, size);
            memset(b, 0x55, size);
            refs[t](x, a, N);
            quantize_row_act(types[t], x, b, N);
            CHECK(memcmp(a, b, size) == 0, "isa %d: %s quantiser differs from the reference (round %d)",
                  isa, ggml_type_name(types[t]), round);
        }
    }
}

// Reference values for the quantiser semantics themselves (llama.cpp's x86 rules).
static void test_quantizer_values(void) {
    float      x[QK_K];
    block_q8_0 q0;
    block_q8_1 q1;
    for (int j = 0; j < 32; j++) x[j] = (float) (j - 16) * 0.5f;  // amax 8 at j = 0
    quantize_row_q8_0_ref(x, &q0, 32);
    CHECK(ckv_fp16_to_fp32(q0.d) == ckv_fp16_to_fp32(ckv_fp32_to_fp16(8.0f / 127.0f)) &&
          q0.qs[0] == -127 && q0.qs[16] == 0 && q0.qs[31] == 119,  // 7.5 * 127 / 8 = 119.06
          "q8_0 reference values");
    // Halves go to even (x86 _mm256_round_ps), not away from zero (roundf in ggml's _ref).
    const float halves[8] = {127.0f, 0.5f, 1.5f, 2.5f, -0.5f, -2.5f, 126.5f, -3.5f};
    const int   expect[8] = {127, 0, 2, 2, 0, -2, 126, -4};
    for (int j = 0; j < 32; j++) x[j] = j < 8 ? halves[j] : 0.0f;  // amax 127: x * 127 / amax = x
    quantize_row_q8_0_ref(x, &q0, 32);
    quantize_row_q8_1_ref(x, &q1, 32);
    for (int j = 0; j < 8; j++) {
        CHECK(q0.qs[j] == expect[j] && q1.qs[j] == expect[j], "q8_0/q8_1 of %g: %d/%d, want %d",
              halves[j], q0.qs[j], q1.qs[j], expect[j]);
    }
    // id = 127 / amax, not 1 / (amax / 127): for amax 40.66538, 2.0812988 * id is 6.4999995
    // (quant 6) with 127 / amax = 3.1230497, but 6.5000005 (quant 7) with 1 / d = 3.12305.
    for (int j = 0; j < 32; j++) x[j] = 0.0f;
    x[0] = 40.66538f;
    x[1] = 2.0812988f;
    quantize_row_q8_0_ref(x, &q0, 32);
    CHECK(q0.qs[0] == 127 && q0.qs[1] == 6, "q8_0 scales by 127 / amax (got %d)", q0.qs[1]);
    for (int j = 0; j < 32; j++) x[j] = (float) (j - 16) * 0.5f;
    quantize_row_q8_1_ref(x, &q1, 32);
    int sum = 0;
    for (int j = 0; j < 32; j++) sum += q1.qs[j];
    CHECK(q1.s == ckv_fp32_to_fp16((float) sum * (8.0f / 127.0f)), "q8_1 s = d * sum");
    block_q8_K qk;
    for (int j = 0; j < QK_K; j++) x[j] = (j == 5) ? -2.0f : (float) (j % 7) * 0.25f;
    quantize_row_q8_K_ref(x, &qk, QK_K);
    int bs = 0;
    for (int j = 0; j < 16; j++) bs += qk.qs[j];
    CHECK(qk.qs[5] == -127 && fabsf(qk.d - 2.0f / 127.0f) < 1e-8f && qk.bsums[0] == bs,
          "q8_K reference values (d %g, q[5] %d)", qk.d, qk.qs[5]);
}

// ---------------------------------------------------------------------------------------------
// Dot products
// ---------------------------------------------------------------------------------------------

static const uint32_t weight_types[] = {
    GGML_TYPE_F32,  GGML_TYPE_F16,  GGML_TYPE_BF16, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1,
    GGML_TYPE_Q5_0, GGML_TYPE_Q5_1, GGML_TYPE_Q8_0, GGML_TYPE_Q2_K, GGML_TYPE_Q3_K,
    GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K,
};
#define N_WEIGHT_TYPES (sizeof(weight_types) / sizeof(weight_types[0]))

enum { MAX_N = 4096, MAX_ROWS = 7 };

struct dot_case {
    uint32_t type;
    int64_t  n;
    int      n_rows;
    uint8_t  w[MAX_ROWS][MAX_N * 4];
    uint8_t  xq[MAX_N * 4];
    float    x[MAX_N], xd[MAX_N], wd[MAX_ROWS][MAX_N];
    float    scalar[MAX_ROWS];
};

// The activation row as the kernels see it: d * q per element (x itself for f32).
static void dequantize_act(uint32_t act_type, const uint8_t * q, const float * x, float * out, int64_t n) {
    if (act_type == GGML_TYPE_F32) {
        memcpy(out, x, (size_t) n * sizeof(float));
    } else if (act_type == GGML_TYPE_Q8_K) {
        const block_q8_K * b = (const block_q8_K *) q;
        for (int64_t i = 0; i < n; i++) out[i] = b[i / QK_K].d * b[i / QK_K].qs[i % QK_K];
    } else if (act_type == GGML_TYPE_Q8_0) {
        const block_q8_0 * b = (const block_q8_0 *) q;
        for (int64_t i = 0; i < n; i++) out[i] = ckv_fp16_to_fp32(b[i / 32].d) * b[i / 32].qs[i % 32];
    } else {
        const block_q8_1 * b = (const block_q8_1 *) q;
        for (int64_t i = 0; i < n; i++) out[i] = ckv_fp16_to_fp32(b[i / 32].d) * b[i / 32].qs[i % 32];
    }
}

static void make_case(struct dot_case * c, uint32_t type, int64_t n, int n_rows) {
    const struct ggml_type_traits * t = ggml_type_traits_get(type);
    c->type   = type;
    c->n      = n;
    c->n_rows = n_rows;
    for (int r = 0; r < n_rows; r++) {
        random_weights(type, c->w[r], n);
        t->dequantize_row(c->w[r], c->wd[r], n);
    }
    random_floats(c->x, n, 1.0f);
    ggml_type_traits_get(t->vec_dot_type)->quantize_row(c->x, c->xq, n);
    dequantize_act(t->vec_dot_type, c->xq, c->x, c->xd, n);
}

// Half a step of the 8-bit grid (amax / 127 per activation block), padded for the fp16
// rounding of the scale: how far d * q may sit from x.
static double act_half_step(uint32_t act_type, const float * x, int64_t i) {
    if (act_type == GGML_TYPE_F32) {
        return 0.0;
    }
    const int64_t bs = act_type == GGML_TYPE_Q8_K ? QK_K : 32;
    double        amax = 0.0;
    for (int64_t j = i - i % bs; j < i - i % bs + bs; j++) amax = fmax(amax, fabs(x[j]));
    return 0.5 * amax / 127.0 + fabs(x[i]) * 0x1p-10;
}

// q4_1/q5_1 fold their minimum in through q8_1's s = fp16(d * sum(q)), which differs from
// the exact sum(d * q) by the fp16 roundings of s and d: allow for them.
static double q8_1_s_slack(const struct dot_case * c, int r) {
    if (ggml_type_traits_get(c->type)->vec_dot_type != GGML_TYPE_Q8_1) {
        return 0.0;
    }
    const size_t bsz   = ggml_type_traits_get(c->type)->type_size;
    double       slack = 0.0;
    for (int64_t b = 0; b < c->n / 32; b++) {
        ckv_fp16 m;  // the minimum sits at byte 2 of q4_1 and q5_1 blocks
        memcpy(&m, c->w[r] + b * bsz + 2, 2);
        double s = 0.0;
        for (int64_t i = 32 * b; i < 32 * b + 32; i++) s += c->xd[i];
        slack += fabs(ckv_fp16_to_fp32(m) * s) * 0x1p-10;
    }
    return slack;
}

// Scalar kernel vs exact float maths on the dequantised operands, and vs the unquantised x.
static void check_scalar(struct dot_case * c) {
    const char *   name = ggml_type_name(c->type);
    const uint32_t act  = ggml_type_traits_get(c->type)->vec_dot_type;
    for (int r = 0; r < c->n_rows; r++) {
        double exact = 0.0, mag = 0.0, vs_x = 0.0, bound = 0.0;
        for (int64_t i = 0; i < c->n; i++) {
            exact += (double) c->wd[r][i] * c->xd[i];
            mag   += fabs((double) c->wd[r][i] * c->xd[i]);
            vs_x  += (double) c->wd[r][i] * c->x[i];
            bound += fabs((double) c->wd[r][i]) * act_half_step(act, c->x, i);
        }
        const double slack = q8_1_s_slack(c, r);
        c->scalar[r] = vec_dot(c->type, c->n, c->w[r], c->xq);
        CHECK(fabs(c->scalar[r] - exact) <= 2e-6 * mag + slack + 1e-30,
              "%s n=%lld: scalar dot %.9g vs dequantised dot %.9g (mag %g)", name, (long long) c->n,
              c->scalar[r], exact, mag);
        CHECK(fabs(c->scalar[r] - vs_x) <= bound + 2e-6 * mag + slack,
              "%s n=%lld: scalar dot %.9g vs float activations %.9g (bound %g)", name,
              (long long) c->n, c->scalar[r], vs_x, bound);
    }
}

// The kernels of the current ISA vs the scalar results (summation order only).
static void check_isa(const struct dot_case * c, int isa) {
    const char * name = ggml_type_name(c->type);
    float        rows[MAX_ROWS];
    const size_t stride = sizeof(c->w[0]);
    vec_dot_rows(c->type, c->n, c->n_rows, c->w, stride, c->xq, rows);
    for (int r = 0; r < c->n_rows; r++) {
        double mag = 0.0;
        for (int64_t i = 0; i < c->n; i++) {
            mag += fabs((double) c->wd[r][i] * c->xd[i]);
        }
        const float v = vec_dot(c->type, c->n, c->w[r], c->xq);
        CHECK(fabs(v - c->scalar[r]) <= 2e-6 * mag + 1e-30,
              "isa %d %s n=%lld row %d: vec_dot %.9g vs scalar %.9g", isa, name, (long long) c->n, r,
              v, c->scalar[r]);
        CHECK(fabs(rows[r] - c->scalar[r]) <= 2e-6 * mag + 1e-30,
              "isa %d %s n=%lld row %d/%d: vec_dot_rows %.9g vs scalar %.9g", isa, name,
              (long long) c->n, r, c->n_rows, rows[r], c->scalar[r]);
    }
}

static void test_dots(void) {
    static struct dot_case c;
    const int best = quants_isa_best();
    for (size_t ti = 0; ti < N_WEIGHT_TYPES; ti++) {
        const uint32_t type = weight_types[ti];
        const int64_t  bs   = ggml_type_traits_get(type)->block_size;
        const int64_t  blocks_32[] = {1, 2, 3, 7, 18, 48, 96};  // 18: n_embd 576
        const int64_t  blocks_k[]  = {1, 2, 3, 5, 16};
        const bool     k   = bs == QK_K;
        const int      nsz = k ? 5 : 7;
        for (int s = 0; s < nsz; s++) {
            const int64_t n = bs == 1 ? 32 * blocks_32[s] + (s % 3) : (k ? blocks_k[s] : blocks_32[s]) * (k ? QK_K : 32);
            for (int n_rows = 1; n_rows <= MAX_ROWS; n_rows += 3) {
                quants_set_isa(QUANTS_ISA_SCALAR);
                make_case(&c, type, n, n_rows);
                check_scalar(&c);
                for (int isa = QUANTS_ISA_SCALAR; isa <= best; isa++) {
                    CHECK(quants_set_isa(isa) == isa, "cannot select isa %d", isa);
                    check_isa(&c, isa);
                }
            }
        }
    }
    quants_set_isa(best);
}

// The prefill tile kernels (types that have one at an ISA level) against vec_dot at the same
// level: bit for bit, for VEC_DOT_TILE_ROWS rows x VEC_DOT_TILE_TOKENS tokens in exact-size heap
// buffers (odd block counts take the single-block tail), written at a row stride of 7.
static void test_tiles(void) {
    const int best = quants_isa_best();
    int       tested = 0;
    for (int isa = QUANTS_ISA_SCALAR; isa <= best; isa++) {
        quants_set_isa(isa);
        for (size_t ti = 0; ti < N_WEIGHT_TYPES; ti++) {
            const uint32_t                  type = weight_types[ti];
            const struct ggml_type_traits * t    = ggml_type_traits_get(type);
            if (!t->vec_dot_tile) continue;
            const int64_t blocks[] = {1, 2, 3, 7, 18, 28};   // 28: Qwen2.5-0.5B's n_embd 896
            for (size_t b = 0; b < sizeof(blocks) / sizeof(blocks[0]); b++) {
                const int64_t n   = blocks[b] * t->block_size;
                const size_t  wsz = ggml_row_size(type, n), xsz = ggml_row_size(t->vec_dot_type, n);
                uint8_t *     w   = malloc(VEC_DOT_TILE_ROWS * wsz);
                uint8_t *     xq  = malloc(VEC_DOT_TILE_TOKENS * xsz);
                float *       x   = malloc((size_t) n * sizeof(float));
                for (int r = 0; r < VEC_DOT_TILE_ROWS; r++) random_weights(type, w + r * wsz, n);
                for (int k = 0; k < VEC_DOT_TILE_TOKENS; k++) {
                    random_floats(x, n, 1.0f);
                    quantize_row_act(t->vec_dot_type, x, xq + k * xsz, n);
                }
                enum { OUT_STRIDE = 7 };
                float got[VEC_DOT_TILE_TOKENS * OUT_STRIDE], want[VEC_DOT_TILE_TOKENS * OUT_STRIDE];
                t->vec_dot_tile(n, w, wsz, xq, xsz, got, OUT_STRIDE);
                int bad = 0;
                for (int k = 0; k < VEC_DOT_TILE_TOKENS; k++)
                    for (int r = 0; r < VEC_DOT_TILE_ROWS; r++) {
                        want[k * OUT_STRIDE + r] = vec_dot(type, n, w + r * wsz, xq + k * xsz);
                        bad += memcmp(&got[k * OUT_STRIDE + r], &want[k * OUT_STRIDE + r], sizeof(float)) != 0;
                    }
                CHECK(bad == 0, "isa %d %s n=%lld: %d tile results differ from vec_dot", isa, t->name,
                      (long long) n, bad);
                tested++;
                free(w); free(xq); free(x);
            }
        }
    }
    quants_set_isa(best);
    printf("tile kernels: %d cases\n", tested);
}

// Rows in heap buffers of exactly their size, short rows included, so ASan flags any kernel
// that reads past a row (the row tail paths use masked or partial loads).
static void test_exact_buffers(void) {
    const int best = quants_isa_best();
    for (size_t ti = 0; ti < N_WEIGHT_TYPES; ti++) {
        const uint32_t                  type = weight_types[ti];
        const struct ggml_type_traits * t    = ggml_type_traits_get(type);
        for (int64_t k = 1; k <= 5; k++) {
            const int64_t n   = t->block_size == 1 ? 8 * k + 3 : k * t->block_size;
            const size_t  wsz = ggml_row_size(type, n), xsz = ggml_row_size(t->vec_dot_type, n);
            uint8_t *     w   = malloc(3 * wsz);
            uint8_t *     xq  = malloc(xsz);
            float *       x   = malloc((size_t) n * sizeof(float));
            random_floats(x, n, 1.0f);
            for (int r = 0; r < 3; r++) random_weights(type, w + r * wsz, n);
            quants_set_isa(QUANTS_ISA_SCALAR);
            quantize_row_act(t->vec_dot_type, x, xq, n);
            float ref[3], got[3];
            for (int r = 0; r < 3; r++) ref[r] = vec_dot(type, n, w + r * wsz, xq);
            for (int isa = QUANTS_ISA_SCALAR; isa <= best; isa++) {
                quants_set_isa(isa);
                vec_dot_rows(type, n, 3, w, wsz, xq, got);
                bool ok = true;
                for (int r = 0; r < 3; r++) {
                    const float v = vec_dot(type, n, w + r * wsz, xq);
                    ok = ok && fabsf(v - ref[r]) <= 1e-4f * (fabsf(ref[r]) + 1.0f) &&
                         fabsf(got[r] - ref[r]) <= 1e-4f * (fabsf(ref[r]) + 1.0f);
                }
                CHECK(ok, "isa %d %s n=%lld: exact-size rows", isa, t->name, (long long) n);
            }
            free(w); free(xq); free(x);
        }
    }
    quants_set_isa(best);
}

// ---------------------------------------------------------------------------------------------
// Traits
// ---------------------------------------------------------------------------------------------

static void test_traits(void) {
    CHECK(ggml_type_traits_get(4) == NULL && ggml_type_traits_get(99) == NULL &&
          ggml_type_traits_get(GGML_TYPE_COUNT_MAX) == NULL, "unknown ids have no traits");
    CHECK(strcmp(ggml_type_name(99), "unknown") == 0 && strcmp(ggml_type_name(12), "q4_K") == 0,
          "type names");
    CHECK(ggml_row_size(GGML_TYPE_Q4_1, 576) == 18 * 20 && ggml_row_size(GGML_TYPE_Q4_1, 577) == 0 &&
          ggml_row_size(GGML_TYPE_Q6_K, 512) == 420 && ggml_row_size(GGML_TYPE_F16, 3) == 6 &&
          ggml_row_size(99, 32) == 0 && ggml_row_size(GGML_TYPE_IQ4_XS_FOR_TEST, 256) == 136,
          "ggml_row_size");
    for (size_t i = 0; i < N_WEIGHT_TYPES; i++) {
        const struct ggml_type_traits * t = ggml_type_traits_get(weight_types[i]);
        CHECK(t && t->is_weight && t->vec_dot && t->vec_dot_rows && t->dequantize_row &&
              ggml_type_traits_get(t->vec_dot_type)->quantize_row, "traits of %s complete",
              t ? t->name : "?");
    }
    const struct ggml_type_traits * iq = ggml_type_traits_get(GGML_TYPE_IQ4_XS_FOR_TEST);
    CHECK(iq && !iq->is_weight && !iq->vec_dot && !iq->dequantize_row, "iq4_xs: sizes only");
    CHECK(strlen(quants_cpu_features()) > 0, "cpu features string");
}

int main(void) {
    quants_init();
    printf("cpu: %s, best isa %d\n", quants_cpu_features(), quants_isa_best());
    test_traits();
    test_fp16_round_trip();
    test_fp32_to_fp16_rounding();
    test_quantizer_values();
    for (int isa = QUANTS_ISA_SCALAR; isa <= quants_isa_best(); isa++) {
        quants_set_isa(isa);
        test_fp16_rows(isa);
        test_quantizers(isa);
    }
    test_dots();
    test_exact_buffers();
    test_tiles();
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail != 0;
}
