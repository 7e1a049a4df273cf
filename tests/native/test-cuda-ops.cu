// test-cuda-ops.cu - every CUDA op against its CPU twin on fresh random data (issue 5).
// Exit 0 = all pass, 1 = a mismatch, 77 = skipped (no CUDA device).
//
// Error measure: rel = ||gpu - ref|| / ||ref|| over the whole output (and every output element
// is poisoned with NaN first, so an unwritten element fails). Bounds and why:
//   dequantisation (embedding)   1e-6  same formula; only an FMA contraction can differ (1 ulp)
//   f32-weight GEMV vs f64       1e-5  f32 accumulation of n_in <= 3072 products
//   int8 GEMV vs f64 on q8(x)    1e-5  the same, against the f64 dot with x quantised exactly as
//                                      the GPU does (the CPU's quantize_row_q8_1_ref qs, d =
//                                      amax / 127): integer sums are exact, so only the f32
//                                      scale products and the lane sums round
//   ... with a fused rmsnorm     1e-4  the GPU's norm scale may differ from ops_rmsnorm's by an
//                                      ulp, which can move a value across a rounding boundary
//                                      of the 8-bit grid (one step of one of 32 values)
//   int8 GEMV vs f64 on f32 x    1e-2  8-bit activations: error <= amax / 254 per value,
//                                      ~0.3% of the dot for uniform inputs
//   quantize_q8 vs the CPU's     0     same formula; qs bit for bit with quantize_row_q8_1_ref
//   rmsnorm_quantize_q8          1e-5 (y, as rmsnorm), 1e-4 (dequantised yq vs the CPU's
//                                      ops_rmsnorm + quantiser: the ulp flips above)
//   GEMM vs f64 reference        2e-3  operands rounded to f16 (2^-11 relative each); the same
//                                      for the cuBLAS path (f16 operands, f32 accumulation)
// q4_0 and q6_K also run regrouped to the GPU's q4_0x8 / q6_Kx8 layouts (ckv_cuda_weight_
// repack), against the same references of the file's bytes.
//   matmul vs CPU vec_dot        3e-2  the CPU rounds activations to 8 bits (q8_0/q8_1/q8_K)
//   GEMV with fused rmsnorm      1e-5  as the GEMV, against the CPU's ops_rmsnorm output
//   rmsnorm, rope_kv, glu        1e-5  same formulas; expf/tanhf/cosf differ by an ulp or two
//   kv store (inside rope_kv)    0     v: both round to nearest even; k: one f16 step (the
//                                      rotation's f32 result may differ by an ulp)
//   attention vs f64 reference   1e-4  decode kernel: f32 online softmax over <= 4096 positions
//   attention with RoPE inside   0     vs rope_kv + attention: the same formulas on the same
//                                      values (output, out_q and both caches bit for bit)
//   flash prefill vs f64         2e-3  q and the probabilities rounded to f16 for the mma
// Unwritten KV cache rows hold NaN, so a kernel that reads past the visible range fails.
// Shapes include rows that are not a multiple of any tile (67), one token and token counts
// that are not a tile multiple (5, 70), GQA ratios 1, 3, 4 and 8, windows and split-K.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>

#include "cuda-backend.h"
#include "cuda-check.cuh"
#include "cuda-ops.cuh"

extern "C" {
#include "ops.h"
#include "quants.h"
// quants-impl.h is C11 only (_Static_assert); the one reference quantiser used here:
void quantize_row_q8_1_ref(const float * src, void * dst, int64_t n);
}
#include "common.cuh"   // cq8x

static int g_failures = 0;
static test_rng g_rng = {0x9E3779B97F4A7C15ull};

static uint32_t rnd_u32(void) { return g_rng.u32(); }
static float rnd_uniform(float lo, float hi) { return g_rng.uniform(lo, hi); }
static std::vector<float> rnd_vec(size_t n, float lo = -1.0f, float hi = 1.0f) {
    std::vector<float> v(n);
    for (auto & x : v) x = rnd_uniform(lo, hi);
    return v;
}

static double rel_err(const std::vector<float> & got, const std::vector<double> & ref) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < ref.size(); i++) {
        double d = (double) got[i] - ref[i];
        if (!isfinite(got[i])) return INFINITY;
        num += d * d;
        den += ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}
static std::vector<double> to_double(const std::vector<float> & v) { return std::vector<double>(v.begin(), v.end()); }

static void expect(const char * what, double err, double bound) {
    bool ok = err <= bound;
    printf("%-44s rel %.2e (bound %.0e) %s\n", what, err, bound, ok ? "ok" : "FAIL");
    if (!ok) g_failures++;
}

// --- random weights --------------------------------------------------------------------------

// Random bytes are valid blocks for every quantised type once the fp16 scale fields hold sane
// values; byte offsets of those fields per block (see quants-impl.h).
static void fix_scales(uint32_t type, uint8_t * block) {
    auto put = [&](int off, float v) { ckv_fp16 h = ckv_fp32_to_fp16(v); memcpy(block + off, &h, 2); };
    switch (type) {
        case GGML_TYPE_Q4_0: case GGML_TYPE_Q5_0: case GGML_TYPE_Q8_0:
            put(0, rnd_uniform(0.001f, 0.02f)); break;
        case GGML_TYPE_Q4_1: case GGML_TYPE_Q5_1:
            put(0, rnd_uniform(0.001f, 0.02f)); put(2, rnd_uniform(-0.1f, 0.1f)); break;
        case GGML_TYPE_Q4_K: case GGML_TYPE_Q5_K:
            put(0, rnd_uniform(0.0005f, 0.003f)); put(2, rnd_uniform(0.0005f, 0.003f)); break;
        case GGML_TYPE_Q6_K: put(208, rnd_uniform(0.0005f, 0.003f)); break;
        default: break;
    }
}

static std::vector<uint8_t> random_weights(uint32_t type, int64_t n_in, int64_t n_out, size_t * row_size) {
    const struct ggml_type_traits * tt = ggml_type_traits_get(type);
    *row_size = ggml_row_size(type, n_in);
    std::vector<uint8_t> w(*row_size * n_out);
    if (type == GGML_TYPE_F32 || type == GGML_TYPE_F16 || type == GGML_TYPE_BF16) {
        for (int64_t i = 0; i < n_in * n_out; i++) {
            float v = rnd_uniform(-0.1f, 0.1f);
            if (type == GGML_TYPE_F32) memcpy(&w[4 * i], &v, 4);
            else if (type == GGML_TYPE_F16) { ckv_fp16 h = ckv_fp32_to_fp16(v); memcpy(&w[2 * i], &h, 2); }
            else { uint32_t u; memcpy(&u, &v, 4); uint16_t b = (uint16_t) (u >> 16); memcpy(&w[2 * i], &b, 2); }
        }
        return w;
    }
    for (auto & b : w) b = (uint8_t) rnd_u32();
    for (size_t off = 0; off < w.size(); off += tt->type_size) fix_scales(type, &w[off]);
    return w;
}

// --- matmul and embedding --------------------------------------------------------------------

static bool has_int8_gemv(uint32_t type) {
    return type != GGML_TYPE_F32 && type != GGML_TYPE_F16 && type != GGML_TYPE_BF16;
}

// x [n] quantised as the GPU's int8 GEMV does: qs from the CPU's quantize_row_q8_1_ref, d and
// d * sum(qs) in f32 (cq8x blocks), and the values qs * d those blocks stand for.
struct q8_ref { std::vector<cq8x> blocks; std::vector<float> values; };
static q8_ref quantize_q8_ref(const float * x, int64_t n) {
    struct { uint16_t d, s; int8_t qs[32]; } b;   // block_q8_1
    static_assert(sizeof(b) == 36, "block_q8_1");
    q8_ref r;
    for (int64_t c = 0; c < n / 32; c++) {
        quantize_row_q8_1_ref(x + 32 * c, &b, 32);
        float amax = 0.0f;
        int   sum = 0;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(x[32 * c + i]));
        cq8x q;
        float d = amax / 127.0f;
        for (int i = 0; i < 32; i++) {
            q.qs[i] = b.qs[i];
            sum += b.qs[i];
            r.values.push_back((float) b.qs[i] * d);
        }
        q.ds = make_float2(d, (float) sum * d);
        r.blocks.push_back(q);
    }
    return r;
}
static double q8_mismatch(const std::vector<cq8x> & got, const std::vector<cq8x> & ref) {
    size_t bad = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        bad += memcmp(got[i].qs, ref[i].qs, 32) != 0 || got[i].ds.x != ref[i].ds.x || got[i].ds.y != ref[i].ds.y;
    }
    return (double) bad / (double) ref.size();
}

static void test_quantize_q8(void) {
    for (int64_t n : {32, 4096 + 96}) {
        std::vector<float> x = rnd_vec(n, -3.0f, 3.0f);
        for (int i = 0; i < 32; i++) x[i] = 0.0f;   // an all-zero block: d = 0, qs = 0
        if (n > 64) {   // amax 127 makes the scale 1: exact halves, rounded half to even
            x[32] = 127.0f; x[33] = 2.5f; x[34] = -3.5f; x[35] = 0.5f;
        }
        dbuf<float> dx(x);
        dbuf<cq8x> dq(n / 32);
        CHECK_OK(ckv_cuda_quantize_q8(dx.p, dq.p, n, 0));
        char name[64];
        snprintf(name, sizeof(name), "quantize_q8 n=%lld (bad blocks)", (long long) n);
        expect(name, q8_mismatch(dq.get(), quantize_q8_ref(x.data(), n).blocks), 0.0);
    }
    // The norm + quantiser over several blocks of 8 chunks, the last one partial: y against
    // ops_rmsnorm, yq bit for bit the CPU quantiser's blocks of the GPU's own y.
    const int64_t n = 4096 + 96;
    std::vector<float> x = rnd_vec(n, -3.0f, 3.0f), nw = rnd_vec(n, 0.5f, 1.5f), yref(n);
    ops_rmsnorm(yref.data(), x.data(), nw.data(), 1, n, 1e-5f);
    dbuf<float> dx(x), dnw(nw), dy(n);
    dbuf<cq8x> dq(n / 32);
    CHECK_OK(ckv_cuda_rmsnorm_quantize_q8(dy.p, dq.p, dx.p, dnw.p, n, 1e-5f, 0));
    std::vector<float> y = dy.get();
    expect("rmsnorm_quantize_q8 n=4192 y", rel_err(y, to_double(yref)), 1e-5);
    expect("rmsnorm_quantize_q8 n=4192 yq (bad blocks)", q8_mismatch(dq.get(), quantize_q8_ref(y.data(), n).blocks), 0.0);
}

// The GPU-only weight layout of a q4_0 matrix (ckv_cuda_weight_repack) under test: the CPU
// references below stay those of the file's q4_0 bytes.
static void regroup(struct cuda_weight * cw) {
    uint32_t before = cw->type;
    CHECK_OK(ckv_cuda_weight_repack(cw, 0));
    if (cw->type == before) {
        printf("FAIL  %s matrix (n_in %lld) was not regrouped\n", ggml_type_name(before), (long long) cw->n_in);
        g_failures++;
    }
}
static const char * type_label(uint32_t type, bool regrouped) {
    return !regrouped ? ggml_type_name(type) : type == GGML_TYPE_Q4_0 ? "q4_0x8" : "q6_Kx8";
}

// n_in: 768 (3 x 256, a q4_0x8 row of 3 groups); regrouped q6_K needs a multiple of 2048.
static void test_matmul_type(uint32_t type, bool regrouped = false, int64_t n_in = 768) {
    const int64_t n_out = 67;
    size_t row_size;
    std::vector<uint8_t> w = random_weights(type, n_in, n_out, &row_size);
    std::vector<float> deq(n_in * n_out);
    for (int64_t r = 0; r < n_out; r++) dequantize_row(type, &w[r * row_size], &deq[r * n_in], n_in);
    dbuf<uint8_t> dw(w);
    struct cuda_weight cw = {dw.p, type, n_in, n_out, row_size};
    if (regrouped) regroup(&cw);
    const char * tname = type_label(type, regrouped);
    std::vector<float> bias = rnd_vec(n_out);
    dbuf<float> dbias(bias);
    char name[64];

    for (int64_t n_tok : {1, 3, 5, 8, 70}) {
        std::vector<float> x = rnd_vec(n_tok * n_in), y0 = rnd_vec(n_tok * n_out);
        // The int8 GEMV (one token, or each of up to CKV_GEMV_MAX_TOKENS) computes with each
        // token's x quantised: its exact reference uses those values.
        bool gemv = n_tok <= CKV_GEMV_MAX_TOKENS, int8 = gemv && has_int8_gemv(type);
        q8_ref xq8 = quantize_q8_ref(x.data(), n_in);
        std::vector<float> xr(x);
        for (int64_t t = 0; int8 && t < n_tok; t++) {
            q8_ref row = quantize_q8_ref(&x[t * n_in], n_in);
            std::copy(row.values.begin(), row.values.begin() + n_in, xr.begin() + t * n_in);
        }
        std::vector<double> ref(n_tok * n_out), ref_acc(n_tok * n_out), ref_f32(n_tok * n_out);
        std::vector<float> cpu(n_tok * n_out);
        uint32_t vdt = ggml_type_traits_get(type)->vec_dot_type;
        std::vector<uint8_t> xq(ggml_row_size(vdt, n_in) + 64);
        for (int64_t t = 0; t < n_tok; t++) {
            quantize_row_act(vdt, &x[t * n_in], xq.data(), n_in);
            for (int64_t r = 0; r < n_out; r++) {
                double s = 0.0, s32 = 0.0;
                for (int64_t k = 0; k < n_in; k++) {
                    s += (double) deq[r * n_in + k] * xr[t * n_in + k];
                    s32 += (double) deq[r * n_in + k] * x[t * n_in + k];
                }
                ref[t * n_out + r] = s + bias[r];
                ref_f32[t * n_out + r] = s32 + bias[r];
                ref_acc[t * n_out + r] = s + y0[t * n_out + r];
                cpu[t * n_out + r] = vec_dot(type, n_in, &w[r * row_size], xq.data()) + bias[r];
            }
        }
        dbuf<float> dx(x), dy(n_tok * n_out), dacc(y0);
        struct cuda_matmul_args a = {&cw, dx.p, dy.p, n_out, dbias.p, n_tok, false};
        CHECK_OK(ckv_cuda_matmul(&a, 0));
        struct cuda_matmul_args b = {&cw, dx.p, dacc.p, n_out, NULL, n_tok, true};
        CHECK_OK(ckv_cuda_matmul(&b, 0));
        std::vector<float> got = dy.get();
        double bound = gemv ? 1e-5 : 2e-3;
        snprintf(name, sizeof(name), "matmul %-5s n=%-3lld vs f64%s", tname, (long long) n_tok,
                 int8 ? " on q8(x)" : "");
        expect(name, rel_err(got, ref), bound);
        if (int8 && n_tok == 1) {
            snprintf(name, sizeof(name), "matmul %-5s n=1   vs f64 on f32 x", tname);
            expect(name, rel_err(got, ref_f32), 1e-2);
            // The same product from a pre-quantised input (the down projection's path).
            dbuf<cq8x> dxq(xq8.blocks);
            dbuf<float> dy2(n_out);
            struct cuda_matmul_args c = {&cw, dx.p, dy2.p, n_out, dbias.p, 1, false, NULL, 0.0f, dxq.p};
            CHECK_OK(ckv_cuda_matmul(&c, 0));
            snprintf(name, sizeof(name), "matmul %-5s n=1   from q8 input", tname);
            expect(name, rel_err(dy2.get(), ref), 1e-5);
        }
        snprintf(name, sizeof(name), "matmul %-5s n=%-3lld accumulate", tname, (long long) n_tok);
        expect(name, rel_err(dacc.get(), ref_acc), bound);
        // The plain and the accumulating product through workspace ws, against the f64 references.
        auto expect_through = [&](const struct cuda_gemm_ws * ws, const char * path, double bnd) {
            dbuf<float> dyw(n_tok * n_out), daccw(y0);
            struct cuda_matmul_args aw = {&cw, dx.p, dyw.p, n_out, dbias.p, n_tok, false, NULL, 0.0f, NULL, ws};
            CHECK_OK(ckv_cuda_matmul(&aw, 0));
            struct cuda_matmul_args bw = {&cw, dx.p, daccw.p, n_out, NULL, n_tok, true, NULL, 0.0f, NULL, ws};
            CHECK_OK(ckv_cuda_matmul(&bw, 0));
            snprintf(name, sizeof(name), "matmul %-5s n=%-3lld %s vs f64", tname, (long long) n_tok, path);
            expect(name, rel_err(dyw.get(), ref), bnd);
            snprintf(name, sizeof(name), "matmul %-5s n=%-3lld %s accumulate", tname, (long long) n_tok, path);
            expect(name, rel_err(daccw.get(), ref_acc), bnd);
        };
        if (gemv && n_tok > 1 && regrouped) {   // one launch for all the tokens (the batch step's path)
            struct cuda_gemm_ws ws = {};
            dbuf<cq8x> dq((size_t) CKV_GEMV_MAX_TOKENS * n_in / 32);
            ws.gemv_xq = dq.p;
            ws.gemv_xq_bytes = dq.n * sizeof(cq8x);
            expect_through(&ws, "all tokens in one launch", bound);
        }
        if (n_tok >= CKV_BLAS_MIN_TOKENS && ckv_cuda_have_cublas()) {
            // cuBLAS path with a scratch of 32 weight rows: 3 slices, the last one partial.
            struct cuda_gemm_ws ws;
            size_t x_bytes = ((size_t) (n_tok * n_in) * 2 + 255) / 256 * 256;
            CHECK_OK(ckv_cuda_gemm_ws_create(&ws, x_bytes + 32 * n_in * 2));
            expect_through(&ws, "cuBLAS", 2e-3);
            ckv_cuda_gemm_ws_free(&ws);
        }
        snprintf(name, sizeof(name), "matmul %-5s n=%-3lld vs CPU vec_dot", tname, (long long) n_tok);
        expect(name, rel_err(got, to_double(cpu)), 3e-2);
    }

    // Embedding lookup = dequantised rows (scaled), compared with the CPU's dequantize_row.
    std::vector<int32_t> tokens = {3, 0, 66, 3, 17};
    dbuf<int32_t> dtok(tokens);
    dbuf<float> dx(tokens.size() * n_in);
    CHECK_OK(ckv_cuda_embed(&cw, dtok.p, (int64_t) tokens.size(), 0.5f, dx.p, 0));
    std::vector<double> ref;
    for (int32_t t : tokens)
        for (int64_t k = 0; k < n_in; k++) ref.push_back(0.5 * deq[t * n_in + k]);
    snprintf(name, sizeof(name), "embed  %-5s", tname);
    expect(name, rel_err(dx.get(), ref), 1e-6);
}

// The fused one-token paths against the f64 reference of separate matmuls (+ activation).
static void test_fused_matmuls(uint32_t type, bool regrouped = false, int64_t n_in = 512) {
    const char * tname = type_label(type, regrouped);
    const int64_t n_out[3] = {67, 35, 35};
    std::vector<std::vector<uint8_t>> w(3);
    std::vector<std::vector<float>> deq(3);
    std::vector<dbuf<uint8_t> *> dw;
    struct cuda_weight cw[3];
    for (int i = 0; i < 3; i++) {
        size_t rs;
        w[i] = random_weights(type, n_in, n_out[i], &rs);
        deq[i].resize(n_in * n_out[i]);
        for (int64_t r = 0; r < n_out[i]; r++) dequantize_row(type, &w[i][r * rs], &deq[i][r * n_in], n_in);
        dw.push_back(new dbuf<uint8_t>(w[i]));
        cw[i] = {dw[i]->p, type, n_in, n_out[i], rs};
        if (regrouped) regroup(&cw[i]);
    }
    std::vector<float> x = rnd_vec(n_in), bias = rnd_vec(67);
    std::vector<float> xv = quantize_q8_ref(x.data(), n_in).values;   // what the int8 GEMV multiplies
    auto dot = [&](int i, int64_t r) {
        double s = 0.0;
        for (int64_t k = 0; k < n_in; k++) s += (double) deq[i][r * n_in + k] * xv[k];
        return s;
    };
    dbuf<float> dx(x), dbias(bias), y0(67), y1(35), y2(35), up(35);
    struct cuda_matmul_args jobs[3] = {{&cw[0], dx.p, y0.p, 67, dbias.p, 1, false},
                                       {&cw[1], dx.p, y1.p, 35, NULL, 1, false},
                                       {&cw[2], dx.p, y2.p, 35, NULL, 1, false}};
    CHECK_OK(ckv_cuda_matmul_multi(jobs, 3, 0));
    std::vector<double> r0, r1, r2;
    for (int64_t r = 0; r < 67; r++) r0.push_back(dot(0, r) + bias[r]);
    for (int64_t r = 0; r < 35; r++) { r1.push_back(dot(1, r)); r2.push_back(dot(2, r)); }
    char name[64];
    snprintf(name, sizeof(name), "matmul_multi %-5s (q, k, v)", tname);
    double e = fmax(rel_err(y0.get(), r0), fmax(rel_err(y1.get(), r1), rel_err(y2.get(), r2)));
    expect(name, e, 1e-5);
    for (bool gelu : {false, true}) {
        std::vector<float> gate(35), upv(35);
        for (int64_t r = 0; r < 35; r++) { gate[r] = (float) dot(1, r); upv[r] = (float) dot(2, r); }
        if (gelu) ops_gelu_mul(gate.data(), upv.data(), 35);
        else ops_silu_mul(gate.data(), upv.data(), 35);
        dbuf<float> y(35);
        CHECK_OK(ckv_cuda_matmul_glu(&cw[1], &cw[2], dx.p, y.p, up.p, 1, gelu, NULL, 0.0f, NULL, NULL, 0));
        snprintf(name, sizeof(name), "matmul_glu %-5s %s", tname, gelu ? "gelu" : "silu");
        expect(name, rel_err(y.get(), to_double(gate)), 1e-5);
    }

    if (regrouped) {   // a batch step's q, k and v: 5 tokens, one quantisation and one launch
        const int64_t nt = 5;
        std::vector<float> xs = rnd_vec(nt * n_in), xsq(xs);
        for (int64_t t = 0; t < nt; t++) {
            q8_ref row = quantize_q8_ref(&xs[t * n_in], n_in);
            std::copy(row.values.begin(), row.values.begin() + n_in, xsq.begin() + t * n_in);
        }
        dbuf<float> dxs(xs), t0(nt * 67), t1(nt * 35), t2(nt * 35);
        dbuf<cq8x>  dq((size_t) CKV_GEMV_MAX_TOKENS * n_in / 32);
        struct cuda_gemm_ws ws = {};
        ws.gemv_xq       = dq.p;
        ws.gemv_xq_bytes = dq.n * sizeof(cq8x);
        struct cuda_matmul_args tj[3] = {{&cw[0], dxs.p, t0.p, 67, dbias.p, nt, false, NULL, 0.0f, NULL, &ws},
                                         {&cw[1], dxs.p, t1.p, 35, NULL, nt, false, NULL, 0.0f, NULL, &ws},
                                         {&cw[2], dxs.p, t2.p, 35, NULL, nt, false, NULL, 0.0f, NULL, &ws}};
        CHECK_OK(ckv_cuda_matmul_multi(tj, 3, 0));
        dbuf<float> * outs[3] = {&t0, &t1, &t2};
        double err = 0.0;
        for (int i = 0; i < 3; i++) {
            std::vector<double> ref;
            for (int64_t t = 0; t < nt; t++)
                for (int64_t r = 0; r < n_out[i]; r++) {
                    double sum = i == 0 ? bias[r] : 0.0;
                    for (int64_t k = 0; k < n_in; k++) sum += (double) deq[i][r * n_in + k] * xsq[t * n_in + k];
                    ref.push_back(sum);
                }
            err = fmax(err, rel_err(outs[i]->get(), ref));
        }
        snprintf(name, sizeof(name), "matmul_multi %-5s 5 tokens (q, k, v)", tname);
        expect(name, err, 1e-5);
    }

    // The same with the RMSNorm of x fused in (norm weights nw): reference = f64 dot with the
    // CPU's ops_rmsnorm output.
    std::vector<float> nw = rnd_vec(n_in, 0.5f, 1.5f), xn32(n_in);
    ops_rmsnorm(xn32.data(), x.data(), nw.data(), 1, n_in, 1e-6f);
    std::vector<float> xn = quantize_q8_ref(xn32.data(), n_in).values;
    auto dotn = [&](int i, int64_t r) {
        double s = 0.0;
        for (int64_t k = 0; k < n_in; k++) s += (double) deq[i][r * n_in + k] * xn[k];
        return s;
    };
    dbuf<float> dnw(nw), z0(67), z1(35), z2(35), zacc(y0.get());
    struct cuda_matmul_args njobs[3] = {{&cw[0], dx.p, z0.p, 67, dbias.p, 1, false, dnw.p, 1e-6f},
                                        {&cw[1], dx.p, z1.p, 35, NULL, 1, false, dnw.p, 1e-6f},
                                        {&cw[2], dx.p, z2.p, 35, NULL, 1, false, dnw.p, 1e-6f}};
    CHECK_OK(ckv_cuda_matmul_multi(njobs, 3, 0));
    std::vector<double> n0, n1, n2, nacc;
    std::vector<float> y0_host = zacc.get();
    for (int64_t r = 0; r < 67; r++) n0.push_back(dotn(0, r) + bias[r]);
    for (int64_t r = 0; r < 35; r++) { n1.push_back(dotn(1, r)); n2.push_back(dotn(2, r)); }
    snprintf(name, sizeof(name), "matmul_multi %-5s + fused rmsnorm", tname);
    e = fmax(rel_err(z0.get(), n0), fmax(rel_err(z1.get(), n1), rel_err(z2.get(), n2)));
    expect(name, e, 1e-4);
    struct cuda_matmul_args acc1 = {&cw[0], dx.p, zacc.p, 67, NULL, 1, true, dnw.p, 1e-6f};
    CHECK_OK(ckv_cuda_matmul(&acc1, 0));
    for (int64_t r = 0; r < 67; r++) nacc.push_back(y0_host[r] + dotn(0, r));
    snprintf(name, sizeof(name), "matmul %-5s + fused rmsnorm, accumulate", tname);
    expect(name, rel_err(zacc.get(), nacc), 1e-4);
    {
        std::vector<float> gate(35), upv(35);
        for (int64_t r = 0; r < 35; r++) { gate[r] = (float) dotn(1, r); upv[r] = (float) dotn(2, r); }
        ops_silu_mul(gate.data(), upv.data(), 35);
        dbuf<float> y(35);
        CHECK_OK(ckv_cuda_matmul_glu(&cw[1], &cw[2], dx.p, y.p, up.p, 1, false, dnw.p, 1e-6f, NULL, NULL, 0));
        snprintf(name, sizeof(name), "matmul_glu %-5s silu + fused rmsnorm", tname);
        expect(name, rel_err(y.get(), to_double(gate)), 1e-4);
    }
    
    // The GLU's quantised output (n_out % 32 == 0): y as before, yq bit for bit the CPU
    // quantiser's blocks of the GPU's own y, and the down projection reading yq.
    {
        const int64_t n_ff = 96;
        size_t rs;
        std::vector<uint8_t> wg = random_weights(type, n_in, n_ff, &rs), wu = random_weights(type, n_in, n_ff, &rs);
        std::vector<float> dg(n_in * n_ff), du(n_in * n_ff);
        for (int64_t r = 0; r < n_ff; r++) {
            dequantize_row(type, &wg[r * rs], &dg[r * n_in], n_in);
            dequantize_row(type, &wu[r * rs], &du[r * n_in], n_in);
        }
        dbuf<uint8_t> dwg(wg), dwu(wu);
        struct cuda_weight cg = {dwg.p, type, n_in, n_ff, rs}, cu = {dwu.p, type, n_in, n_ff, rs};
        if (regrouped) {
            regroup(&cg);
            regroup(&cu);
        }
        dbuf<float> y(n_ff), upb(n_ff);
        dbuf<cq8x> yq(n_ff / 32);
        CHECK_OK(ckv_cuda_matmul_glu(&cg, &cu, dx.p, y.p, upb.p, 1, false, dnw.p, 1e-6f, NULL, yq.p, 0));
        std::vector<float> gate(n_ff), upv(n_ff);
        for (int64_t r = 0; r < n_ff; r++) {
            double sg = 0.0, su = 0.0;
            for (int64_t k = 0; k < n_in; k++) {
                sg += (double) dg[r * n_in + k] * xn[k];
                su += (double) du[r * n_in + k] * xn[k];
            }
            gate[r] = (float) sg;
            upv[r] = (float) su;
        }
        ops_silu_mul(gate.data(), upv.data(), n_ff);
        std::vector<float> ygpu = y.get();
        snprintf(name, sizeof(name), "matmul_glu %-5s n_ff=96 + quantised out", tname);
        expect(name, rel_err(ygpu, to_double(gate)), 1e-4);
        snprintf(name, sizeof(name), "matmul_glu %-5s yq vs CPU quantiser", tname);
        expect(name, q8_mismatch(yq.get(), quantize_q8_ref(ygpu.data(), n_ff).blocks), 0.0);
        // The decode path: norm + quantisation in one launch, then the GLU on that input.
        dbuf<float> xb(n_in), y2(n_ff);
        dbuf<cq8x> xq(n_in / 32), yq2(n_ff / 32);
        CHECK_OK(ckv_cuda_rmsnorm_quantize_q8(xb.p, xq.p, dx.p, dnw.p, n_in, 1e-6f, 0));
        snprintf(name, sizeof(name), "rmsnorm_quantize_q8 n=%lld y", (long long) n_in);
        expect(name, rel_err(xb.get(), to_double(xn32)), 1e-5);
        snprintf(name, sizeof(name), "rmsnorm_quantize_q8 n=%lld yq values", (long long) n_in);
        std::vector<cq8x> gq = xq.get();
        std::vector<float> gv;
        for (auto & b : gq)
            for (int i = 0; i < 32; i++) gv.push_back((float) b.qs[i] * b.ds.x);
        expect(name, rel_err(gv, to_double(xn)), 1e-4);
        CHECK_OK(ckv_cuda_matmul_glu(&cg, &cu, xb.p, y2.p, upb.p, 1, false, NULL, 0.0f, xq.p, yq2.p, 0));
        snprintf(name, sizeof(name), "matmul_glu %-5s from q8 input", tname);
        expect(name, rel_err(y2.get(), to_double(gate)), 1e-4);
        std::vector<float> y2h = y2.get();
        snprintf(name, sizeof(name), "matmul_glu %-5s from q8 input, yq", tname);
        expect(name, q8_mismatch(yq2.get(), quantize_q8_ref(y2h.data(), n_ff).blocks), 0.0);
    }
for (auto * p : dw) delete p;
}

// --- element-wise ----------------------------------------------------------------------------

static void test_rmsnorm(void) {
    const int64_t rows = 7, n = 576;
    std::vector<float> x = rnd_vec(rows * n, -3, 3), w = rnd_vec(n), base = rnd_vec(rows * n);
    std::vector<float> cpu(rows * n);
    ops_rmsnorm(cpu.data(), x.data(), w.data(), rows, n, 1e-5f);
    dbuf<float> dx(x), dw(w), dy(rows * n), dadd(base);
    CHECK_OK(ckv_cuda_rmsnorm(dy.p, dx.p, dw.p, rows, n, 1e-5f, false, 0));
    CHECK_OK(ckv_cuda_rmsnorm(dadd.p, dx.p, dw.p, rows, n, 1e-5f, true, 0));
    expect("rmsnorm", rel_err(dy.get(), to_double(cpu)), 1e-5);
    std::vector<double> ref_add(rows * n);
    for (int64_t i = 0; i < rows * n; i++) ref_add[i] = (double) base[i] + cpu[i];
    expect("rmsnorm + residual add", rel_err(dadd.get(), ref_add), 1e-5);
    CHECK_OK(ckv_cuda_rmsnorm(dx.p, dx.p, dw.p, rows, n, 1e-5f, false, 0));   // in place
    expect("rmsnorm in place", rel_err(dx.get(), to_double(cpu)), 1e-5);
}

// The fused position step against its CPU twins: per-head ops_rmsnorm (optional), ops_rope of
// q and k, and the f16 cache store (bit for bit: both round to nearest even).
static void test_rope_kv(void) {
    struct { int head_dim, n_rot; bool neox, factors, qk_norm, dev_pos; int64_t pos0; } cases[] = {
        {64, 64, false, false, false, false, 0}, {64, 64, true, false, false, true, 5000},
        {128, 64, true, true, false, false, 31}, {256, 256, false, true, true, true, 30000},
        {256, 256, true, false, true, false, 7},
    };
    for (auto & c : cases) {
        const int64_t n_tok = 5;
        const int32_t n_head = 6, n_kv = 2, hd = c.head_dim, n_ctx = (int32_t) c.pos0 + 9;
        std::vector<float> q = rnd_vec(n_tok * n_head * hd), k = rnd_vec(n_tok * n_kv * hd);
        std::vector<float> v = rnd_vec(n_tok * n_kv * hd), ff = rnd_vec(c.n_rot / 2, 1.0f, 8.0f);
        std::vector<float> qn = rnd_vec(hd, 0.5f, 1.5f), kn = rnd_vec(hd, 0.5f, 1.5f);
        std::vector<float> cq = q, ck = k;
        if (c.qk_norm) {
            ops_rmsnorm(cq.data(), q.data(), qn.data(), n_tok * n_head, hd, 1e-6f);
            ops_rmsnorm(ck.data(), k.data(), kn.data(), n_tok * n_kv, hd, 1e-6f);
        }
        struct rope_params p = {c.n_rot, hd, 10000.0f, 0.5f, c.factors ? ff.data() : NULL,
                                c.neox ? ROPE_NEOX : ROPE_NORM};
        ops_rope(&p, cq.data(), n_tok, n_head, c.pos0);
        ops_rope(&p, ck.data(), n_tok, n_kv, c.pos0);
        std::vector<int32_t> pos_host = {(int32_t) c.pos0};
        dbuf<int32_t> dpos(pos_host);
        dbuf<float> dq(q), dk(k), dv(v), dff(ff), dqn(qn), dkn(kn);
        size_t cache_n = (size_t) n_kv * n_ctx * hd;
        dbuf<__half> dkc(cache_n), dvc(cache_n);
        struct cuda_rope_kv_args a = {dq.p, dk.p, dv.p, dkc.p, dvc.p, n_tok, n_head, n_kv, hd, c.n_rot, n_ctx,
                                      c.dev_pos ? -7 : c.pos0,   // -7 must be ignored
                                      powf(10000.0f, -2.0f / (float) c.n_rot), 0.5f,
                                      c.factors ? dff.p : NULL, c.neox, c.qk_norm ? dqn.p : NULL,
                                      c.qk_norm ? dkn.p : NULL, 1e-6f, c.dev_pos ? dpos.p : NULL};
        CHECK_OK(ckv_cuda_rope_kv(&a, 0));
        char name[96];
        snprintf(name, sizeof(name), "rope_kv %s hd=%d rot=%d pos0=%lld%s%s%s q", c.neox ? "neox" : "norm",
                 hd, c.n_rot, (long long) c.pos0, c.factors ? " factors" : "", c.qk_norm ? " qk-norm" : "",
                 c.dev_pos ? " (dev pos)" : "");
        expect(name, rel_err(dq.get(), to_double(cq)), 1e-5);
        // The cache rows pos0 .. pos0 + n_tok must hold f16(v) bit for bit and f16(k rotated)
        // within one f16 step: the GPU's rotated k may differ from the CPU's by an f32 ulp
        // (cosf / sinf), which can move it across an f16 rounding boundary.
        std::vector<__half> gk = dkc.get(), gv = dvc.get();
        bool same = true;
        for (int64_t t = 0; t < n_tok; t++)
            for (int h = 0; h < n_kv; h++)
                for (int d = 0; d < hd; d++) {
                    size_t dst = ((size_t) h * n_ctx + c.pos0 + t) * hd + d, src = (t * n_kv + h) * hd + d;
                    ckv_fp16 ek = ckv_fp32_to_fp16(ck[src]), ev = ckv_fp32_to_fp16(v[src]), gkb;
                    memcpy(&gkb, &gk[dst], 2);
                    int step = abs((int) gkb - (int) ek);   // same sign: adjacent f16 values differ by 1
                    same &= (step <= 1 && ((gkb ^ ek) & 0x8000) == 0) && memcmp(&gv[dst], &ev, 2) == 0;
                }
        name[strlen(name) - 1] = 0;
        strncat(name, "kv store", sizeof(name) - strlen(name) - 1);
        expect(name, same ? 0.0 : 1.0, 0.0);
    }
}

static void test_glu(void) {
    const int64_t n = 3 * 1536 + 7;
    for (bool gelu : {false, true}) {
        std::vector<float> g = rnd_vec(n, -6, 6), u = rnd_vec(n, -2, 2), cpu = g;
        if (gelu) ops_gelu_mul(cpu.data(), u.data(), n);
        else ops_silu_mul(cpu.data(), u.data(), n);
        dbuf<float> dg(g), du(u);
        CHECK_OK(ckv_cuda_glu(dg.p, du.p, n, gelu, 0));
        expect(gelu ? "geglu (tanh)" : "swiglu", rel_err(dg.get(), to_double(cpu)), 1e-5);
    }
}

// --- KV cache and attention ------------------------------------------------------------------

// f64 softmax attention of one query over cache rows [lo, hi] (the formula of ops_attention).
static void attend_ref(const std::vector<ckv_fp16> & kc, const std::vector<ckv_fp16> & vc, int n_ctx,
                       int hd, int kvh, const float * q, int64_t lo, int64_t hi, float scale, double * out) {
    std::vector<double> s(hi - lo + 1);
    double mx = -INFINITY, sum = 0.0;
    for (int64_t j = lo; j <= hi; j++) {
        double d = 0.0;
        for (int k = 0; k < hd; k++) d += (double) q[k] * ckv_fp16_to_fp32(kc[((size_t) kvh * n_ctx + j) * hd + k]);
        s[j - lo] = d * scale;
        mx = fmax(mx, s[j - lo]);
    }
    for (auto & e : s) { e = exp(e - mx); sum += e; }
    for (int k = 0; k < hd; k++) {
        double o = 0.0;
        for (int64_t j = lo; j <= hi; j++) o += s[j - lo] * ckv_fp16_to_fp32(vc[((size_t) kvh * n_ctx + j) * hd + k]);
        out[k] = o / sum;
    }
}

// dev_pos: pos0 read from device memory and n_split fixed (the CUDA-graph decode path), so
// splits may be empty. hpb: the decode kernel's heads_per_block (0: the whole group).
static void test_attention_case(int hd, int n_head, int n_head_kv, int64_t pos0, int64_t n_tok,
                                int window, int n_split_wanted, bool dev_pos = false, int hpb = 0) {
    const int n_ctx = (int) (pos0 + n_tok + 3);
    const int kv_dim = n_head_kv * hd;
    // Cache rows [0, pos0 + n_tok) hold f16(k), f16(v); the rows after them hold NaN.
    std::vector<float> k = rnd_vec((pos0 + n_tok) * kv_dim), v = rnd_vec((pos0 + n_tok) * kv_dim);
    std::vector<ckv_fp16> kc((size_t) n_head_kv * n_ctx * hd, 0x7E00), vc = kc;   // 0x7E00: NaN
    for (int64_t t = 0; t < pos0 + n_tok; t++)
        for (int h = 0; h < n_head_kv; h++)
            for (int d = 0; d < hd; d++) {
                size_t dst = ((size_t) h * n_ctx + t) * hd + d, src = t * kv_dim + h * hd + d;
                kc[dst] = ckv_fp32_to_fp16(k[src]);
                vc[dst] = ckv_fp32_to_fp16(v[src]);
            }
    dbuf<__half> dkc(kc.size()), dvc(vc.size());
    CHECK_CUDA(cudaMemcpy(dkc.p, kc.data(), kc.size() * 2, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(dvc.p, vc.data(), vc.size() * 2, cudaMemcpyHostToDevice));
    char name[96];

    std::vector<float> q = rnd_vec(n_tok * n_head * hd, -2, 2);
    std::vector<double> ref(n_tok * n_head * hd);
    float scale = 1.0f / sqrtf((float) hd);
    for (int64_t t = 0; t < n_tok; t++)
        for (int h = 0; h < n_head; h++) {
            int64_t hi = pos0 + t, lo = window > 0 && hi - window + 1 > 0 ? hi - window + 1 : 0;
            attend_ref(kc, vc, n_ctx, hd, h / (n_head / n_head_kv), &q[(t * n_head + h) * hd], lo, hi,
                       scale, &ref[(t * n_head + h) * hd]);
        }
    int64_t cap = (int64_t) n_tok * n_head * n_split_wanted;
    int64_t n_kv = window > 0 && pos0 + n_tok > window ? window : pos0 + n_tok;
    int32_t n_split = n_split_wanted > 1 ? ckv_cuda_attention_splits(n_tok, n_head, n_kv, cap) : 1;
    if (dev_pos) n_split = n_split_wanted;
    std::vector<int32_t> pos_host = {(int32_t) pos0};
    dbuf<int32_t> dpos(pos_host);
    dbuf<float> dq(q), dout(ref.size()), dpart((size_t) cap * ckv_cuda_attention_partial_floats(hd));
    // The decode kernel also writes its output quantised (out_q), checked bit for bit against
    // the CPU quantiser of the GPU's own output.
    bool decode = n_tok < CKV_FLASH_MIN_TOKENS;
    dbuf<cq8x> dq8(decode ? n_tok * n_head * hd / 32 : 1);
    struct cuda_attention_args a = {dq.p, dkc.p, dvc.p, dout.p, dpart.p, n_tok, dev_pos ? -1 : pos0,
                                    n_ctx, n_head, n_head_kv, hd, window, n_split, scale,
                                    dev_pos ? dpos.p : NULL, decode ? dq8.p : NULL};
    a.heads_per_block = hpb;
    CHECK_OK(ckv_cuda_attention(&a, 0));
    snprintf(name, sizeof(name), "attention%s hd=%d gqa=%d n=%lld pos0=%lld%s w=%d splits=%d%s",
             n_tok >= CKV_FLASH_MIN_TOKENS ? "(flash)" : "", hd,
             n_head / n_head_kv, (long long) n_tok, (long long) pos0, dev_pos ? "(dev)" : "", window,
             n_split, hpb == 1 ? " narrow" : "");
    std::vector<float> got = dout.get();
    expect(name, rel_err(got, ref), n_tok >= CKV_FLASH_MIN_TOKENS ? 2e-3 : 1e-4);
    if (decode) {
        snprintf(name, sizeof(name), "attention hd=%d n=%lld splits=%d out_q (bad blocks)", hd, (long long) n_tok,
                 n_split);
        expect(name, q8_mismatch(dq8.get(), quantize_q8_ref(got.data(), (int64_t) got.size()).blocks), 0.0);
    }
}

// One decode token with RoPE inside the decode kernel (cuda_attention_args.rope) against
// rope_kv followed by the plain decode kernel (both with hpb heads per block): the same
// formulas on the same values, so the output, its quantisation and both caches (the new row
// stored, nothing else touched) must be equal bit for bit. Rows before pos0 are random, the
// rest NaN until a kernel stores them.
static void test_attention_rope_case(int hd, int n_head, int n_head_kv, int64_t pos0, int window,
                                     int n_split_wanted, bool dev_pos, int n_rot, bool neox, int hpb = 0) {
    const int n_ctx = (int) (pos0 + 4), kv_dim = n_head_kv * hd;
    std::vector<ckv_fp16> kc((size_t) n_head_kv * n_ctx * hd, 0x7E00), vc = kc;
    for (int64_t t = 0; t < pos0; t++)
        for (int h = 0; h < n_head_kv; h++)
            for (int d = 0; d < hd; d++) {
                size_t i = ((size_t) h * n_ctx + t) * hd + d;
                kc[i] = ckv_fp32_to_fp16(rnd_uniform(-1, 1));
                vc[i] = ckv_fp32_to_fp16(rnd_uniform(-1, 1));
            }
    std::vector<float> q = rnd_vec(n_head * hd, -2, 2), k = rnd_vec(kv_dim), v = rnd_vec(kv_dim);
    std::vector<float> ff = rnd_vec(n_rot / 2, 1.0f, 4.0f);
    std::vector<int32_t> pos_host = {(int32_t) pos0};
    dbuf<int32_t> dpos(pos_host);
    dbuf<float> dk(k), dv(v), dff(ff);
    int64_t n_kv = window > 0 && pos0 + 1 > window ? window : pos0 + 1;
    int64_t cap = (int64_t) n_head * n_split_wanted;
    int32_t n_split = dev_pos ? n_split_wanted : ckv_cuda_attention_splits(1, n_head, n_kv, cap);
    float   scale = 1.0f / sqrtf((float) hd);

    struct run { std::vector<float> out; std::vector<cq8x> out_q; std::vector<__half> kc, vc; } runs[2];
    for (int fused = 0; fused < 2; fused++) {
        dbuf<float>  dq(q), dout((size_t) n_head * hd), dpart((size_t) cap * ckv_cuda_attention_partial_floats(hd));
        dbuf<cq8x>   dq8((size_t) n_head * hd / 32);
        dbuf<__half> dkc(kc.size()), dvc(vc.size());
        CHECK_CUDA(cudaMemcpy(dkc.p, kc.data(), kc.size() * 2, cudaMemcpyHostToDevice));
        CHECK_CUDA(cudaMemcpy(dvc.p, vc.data(), vc.size() * 2, cudaMemcpyHostToDevice));
        struct cuda_rope_kv_args r = {dq.p, dk.p, dv.p, dkc.p, dvc.p, 1, n_head, n_head_kv, hd, n_rot, n_ctx,
                                      dev_pos ? -7 : pos0, powf(10000.0f, -2.0f / (float) n_rot), 0.5f, dff.p,
                                      neox, NULL, NULL, 1e-6f, dev_pos ? dpos.p : NULL};
        struct cuda_attention_args a = {dq.p, dkc.p, dvc.p, dout.p, dpart.p, 1, dev_pos ? -1 : pos0, n_ctx,
                                        n_head, n_head_kv, hd, window, n_split, scale,
                                        dev_pos ? dpos.p : NULL, dq8.p};
        a.heads_per_block = hpb;
        if (fused) {
            a.rope = r;
        } else {
            CHECK_OK(ckv_cuda_rope_kv(&r, 0));
        }
        CHECK_OK(ckv_cuda_attention(&a, 0));
        runs[fused] = {dout.get(), dq8.get(), dkc.get(), dvc.get()};
    }
    char name[128];
    snprintf(name, sizeof(name), "attention with rope hd=%d heads=%d/%d pos0=%lld w=%d splits=%d rot=%d%s%s%s",
             hd, n_head, n_head_kv, (long long) pos0, window, n_split, n_rot, neox ? " neox" : "",
             dev_pos ? " (dev)" : "", hpb == 1 ? " narrow" : "");
    bool same = memcmp(runs[0].out.data(), runs[1].out.data(), runs[0].out.size() * sizeof(float)) == 0 &&
                memcmp(runs[0].out_q.data(), runs[1].out_q.data(), runs[0].out_q.size() * sizeof(cq8x)) == 0 &&
                memcmp(runs[0].kc.data(), runs[1].kc.data(), kc.size() * 2) == 0 &&
                memcmp(runs[0].vc.data(), runs[1].vc.data(), vc.size() * 2) == 0;
    expect(name, same ? 0.0 : 1.0, 0.0);
}

static void test_attention(void) {
    test_attention_case(64, 9, 3, 0, 1, 0, 1);          // first token
    test_attention_case(64, 9, 3, 1000, 1, 0, 8);       // SmolLM2 decode, split-K
    test_attention_case(64, 14, 2, 4000, 1, 0, 64);     // qwen2 shape, many splits
    test_attention_case(128, 32, 8, 2500, 1, 0, 16);    // Llama-3 shape
    test_attention_case(128, 8, 8, 300, 1, 0, 4);       // GQA 1
    test_attention_case(256, 4, 1, 700, 1, 512, 4);     // gemma3 sliding window, decode
    test_attention_case(64, 9, 3, 0, 70, 0, 1);         // prefill from empty
    test_attention_case(256, 4, 1, 600, 37, 512, 1);    // gemma3 window, prefill chunk
    test_attention_case(64, 9, 3, 600, 33, 0, 2);       // prefill chunk with splits
    test_attention_case(64, 9, 3, 100, 5, 0, 4);        // a few queries: decode kernel, per token
    test_attention_case(64, 9, 3, 0, 200, 0, 1);        // flash: several tiles, partial last tile
    test_attention_case(128, 32, 8, 100, 300, 0, 1);    // flash, Llama-3 shape, chunk after a prefix
    test_attention_case(128, 8, 8, 0, 16, 0, 1);        // flash at its smallest chunk
    test_attention_case(64, 14, 2, 50, 150, 64, 1);     // flash, window shorter than the chunk
    test_attention_case(256, 4, 1, 1000, 130, 512, 1);  // flash, gemma3 window after a long prefix
    test_attention_case(128, 32, 8, 20000, 1, 0, 400);  // split count capped: several tiles per split
    test_attention_case(64, 9, 3, 5000, 1, 0, 128, true);  // graph decode, 79 of 128 splits active
    test_attention_case(64, 9, 3, 3, 1, 0, 8, true);    // graph decode: empty splits
    test_attention_case(256, 4, 1, 900, 1, 512, 16, true);  // graph decode, window
    test_attention_rope_case(64, 9, 3, 0, 0, 1, false, 64, false);      // first token: only the new row
    test_attention_rope_case(64, 9, 3, 1000, 0, 8, false, 64, true);    // SmolLM2 decode, split-K
    test_attention_rope_case(64, 9, 3, 128, 0, 1, false, 64, false);    // new row alone in its tile
    test_attention_rope_case(64, 32, 2, 300, 0, 4, false, 32, true);    // group 16: two blocks per KV head
    test_attention_rope_case(128, 32, 8, 20000, 0, 400, false, 128, true);  // several tiles per split
    test_attention_rope_case(64, 9, 3, 5000, 0, 128, true, 64, false);  // graph decode, empty splits
    test_attention_rope_case(256, 4, 1, 900, 512, 16, true, 256, true); // window, hd 256
    // One query head per block (ckv_cuda_attention_narrow's choice at short depth).
    test_attention_case(64, 9, 3, 0, 1, 0, 1, false, 1);          // first token
    test_attention_case(64, 9, 3, 1000, 1, 0, 8, false, 1);       // SmolLM2, split-K
    test_attention_case(128, 32, 8, 600, 1, 0, 16, false, 1);     // Llama-3 shape at ~600
    test_attention_case(128, 32, 8, 20000, 1, 0, 400, false, 1);  // several tiles per split
    test_attention_case(64, 9, 3, 5000, 1, 0, 128, true, 1);      // graph decode, empty splits
    test_attention_case(256, 4, 1, 900, 1, 512, 16, true, 1);     // graph decode, window
    test_attention_case(64, 9, 3, 100, 5, 0, 4, false, 1);        // a few queries, per token
    test_attention_rope_case(64, 9, 3, 1000, 0, 8, false, 64, true, 1);    // SmolLM2 decode
    test_attention_rope_case(64, 32, 2, 300, 0, 4, false, 32, true, 1);    // group 16
    test_attention_rope_case(128, 32, 8, 600, 0, 16, true, 128, false, 1); // 8B shape, graph decode
    test_attention_rope_case(64, 9, 3, 0, 0, 1, false, 64, false, 1);      // first token: only the new row
}

// ckv_cuda_attention_narrow's threshold: one head per block while the default grid (KV heads x
// 64-position splits) has fewer blocks than SMs, never for group size 1. A host function:
// checked also where no GPU is present.
static void test_attention_narrow_rule(void) {
    struct { int32_t n_head, n_head_kv; int64_t n_kv; int32_t n_sm, want; } cases[] = {
        {32, 8, 576, 132, 1},     // 8B after pp512: 8 x 9 = 72 blocks
        {32, 8, 2100, 132, 0},    // 8B at 2048: 8 x 33 = 264
        {32, 8, 1056, 132, 0},    // 8 x 17 = 136: the grid fills the GPU
        {32, 8, 1024, 132, 1},    // 8 x 16 = 128
        {9, 3, 2100, 132, 1},     // SmolLM2 at 2048: 3 x 33 = 99
        {9, 3, 8000, 132, 0},     // 3 x 125
        {9, 3, 2752, 132, 1},     // 3 x 43 = 129: the longest narrow length
        {9, 3, 2753, 132, 0},     // 3 x 44 = 132: not fewer than the SMs
        {8, 8, 100, 132, 0},      // no GQA
        {4, 1, 1, 132, 1},        // Gemma-3-270M, first token
        {32, 8, 576, 16, 0},      // a small GPU is filled by the default grid
    };
    for (auto & c : cases) {
        char name[96];
        snprintf(name, sizeof(name), "attention narrow rule %d/%d heads n_kv=%lld sms=%d", c.n_head, c.n_head_kv,
                 (long long) c.n_kv, c.n_sm);
        expect(name, ckv_cuda_attention_narrow(c.n_head, c.n_head_kv, c.n_kv, c.n_sm) == c.want ? 0.0 : 1.0, 0.0);
    }
}

int main(void) {
    test_attention_narrow_rule();
    if (ckv_cuda_device_count() == 0) {
        printf("test-cuda-ops: skipped: %s\n", ckv_cuda_device_name());
        return g_failures ? 1 : 77;
    }
    printf("test-cuda-ops on %s\n", ckv_cuda_device_name());
    quants_init();
    const uint32_t types[] = {GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q4_0,
                              GGML_TYPE_Q4_1, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1, GGML_TYPE_Q8_0,
                              GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K};
    printf("cuBLAS GEMM path: %s\n", ckv_cuda_have_cublas() ? "built" : "not in this build");
    for (uint32_t t : types) test_matmul_type(t);
    test_matmul_type(GGML_TYPE_Q4_0, true);
    test_matmul_type(GGML_TYPE_Q6_K, true, 2048);
    test_matmul_type(GGML_TYPE_Q4_K, false, 4352);   // 68 sub-block pairs: lanes with 2 and 3 steps
    test_matmul_type(GGML_TYPE_Q5_K, false, 4352);
    test_quantize_q8();
    for (uint32_t t : {GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q8_0, GGML_TYPE_Q4_K, GGML_TYPE_Q6_K})
        test_fused_matmuls(t);
    test_fused_matmuls(GGML_TYPE_Q4_0, true);
    test_fused_matmuls(GGML_TYPE_Q6_K, true, 2048);
    test_rmsnorm();
    test_rope_kv();
    test_glu();
    test_attention();
    printf("test-cuda-ops: %d failure(s)\n", g_failures);
    return g_failures ? 1 : 0;
}
