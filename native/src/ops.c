// ops.c - CPU compute blocks of the forward pass. Matmuls run on the quantised weight blocks
// with activations quantised to 8 bits (as llama.cpp does), split by output rows over the
// thread pool; attention reads K/V in tiles shared by a GQA group and a block of queries (see
// the attention section).
#include "ops.h"

#include <math.h>
#include <string.h>

#include "quants.h"

// --- element-wise ----------------------------------------------------------------------------

void ops_rmsnorm(float * y, const float * x, const float * w, int64_t n_tokens, int64_t n, float eps) {
    for (int64_t t = 0; t < n_tokens; t++) {
        const float * xt  = x + t * n;
        float *       yt  = y + t * n;
        double        sum = 0.0;  // llama.cpp accumulates the mean square in double too
        for (int64_t i = 0; i < n; i++) {
            sum += (double) xt[i] * xt[i];
        }
        float scale = 1.0f / sqrtf((float) (sum / (double) n) + eps);
        for (int64_t i = 0; i < n; i++) {
            yt[i] = xt[i] * scale * w[i];
        }
    }
}

void ops_silu_mul(float * gate, const float * up, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

void ops_gelu_mul(float * gate, const float * up, int64_t n) {
    const float sqrt_2_over_pi = 0.79788456080286535588f;
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        gate[i] = 0.5f * g * (1.0f + tanhf(sqrt_2_over_pi * g * (1.0f + 0.044715f * g * g))) * up[i];
    }
}

void ops_add(float * y, const float * x, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        y[i] += x[i];
    }
}

void ops_scale(float * y, float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        y[i] *= s;
    }
}

// --- RoPE ------------------------------------------------------------------------------------

// cos/sin for one position, computed the way ggml does (float theta, repeated multiplication),
// so long positions round the same way as the reference.
static void rope_cache(const struct rope_params * p, int64_t pos, float * cos_sin) {
    float theta_scale = powf(p->base, -2.0f / (float) p->n_rot);
    float theta       = (float) pos;
    for (int32_t i = 0; i < p->n_rot / 2; i++) {
        float ff  = p->freq_factors ? p->freq_factors[i] : 1.0f;
        float ang = p->freq_scale * (theta / ff);
        cos_sin[2 * i]     = cosf(ang);
        cos_sin[2 * i + 1] = sinf(ang);
        theta *= theta_scale;
    }
}

static void rope_head(const struct rope_params * p, float * x, const float * cs) {
    int32_t half = p->n_rot / 2;
    for (int32_t i = 0; i < half; i++) {
        int32_t a = p->mode == ROPE_NORM ? 2 * i : i;
        int32_t b = p->mode == ROPE_NORM ? 2 * i + 1 : i + half;
        float   x0 = x[a], x1 = x[b], c = cs[2 * i], s = cs[2 * i + 1];
        x[a] = x0 * c - x1 * s;
        x[b] = x0 * s + x1 * c;
    }
}

void ops_rope(const struct rope_params * p, float * x, int64_t n_tokens, int32_t n_heads, int64_t pos0) {
    float cos_sin[1024];  // n_rot <= head_dim <= 512 is checked at context creation
    for (int64_t t = 0; t < n_tokens; t++) {
        rope_cache(p, pos0 + t, cos_sin);
        for (int32_t h = 0; h < n_heads; h++) {
            rope_head(p, x + (t * n_heads + h) * p->head_dim, cos_sin);
        }
    }
}

// --- matmul ----------------------------------------------------------------------------------

struct matmul_region {
    const struct compute *    c;
    const struct matmul_job * jobs;
    int                       n_jobs;
    int64_t                   n_rows;    // rows of all jobs together
    int64_t                   n_tokens;
    const uint8_t *           act[4];    // per job: quantised activations (or f32 input)
    size_t                    act_row;   // bytes between token rows in act
};

enum { ROW_BLOCK = 16 };  // weight rows kept hot in L1 while every token row streams past

// Rows [rb, re) of job for tokens [t0, t1), one vec_dot each.
static void dot_each(const struct matmul_region * r, const struct matmul_job * job, const uint8_t * act,
                     int64_t rb, int64_t re, int64_t t0, int64_t t1) {
    const struct weight * w  = job->w;
    ggml_vec_dot_fn       dot = ggml_type_traits_get(w->type)->vec_dot;
    for (int64_t t = t0; t < t1; t++) {
        const uint8_t * xt = act + t * r->act_row;
        float *         yt = job->y + t * job->ldy;
        for (int64_t row = rb; row < re; row++) {
            yt[row] = dot(w->ne[0], (const uint8_t *) w->data + row * w->row_size, xt);
        }
    }
}

// y = W x (+ bias) for rows [r0, r1), a block of rows at a time. With a tile kernel (prefill of
// types that have one) whole tiles of rows x tokens go through it, bit for bit the vec_dots.
static void matmul_rows(const struct matmul_region * r, const struct matmul_job * job,
                        const uint8_t * act, int64_t r0, int64_t r1) {
    const struct weight * w    = job->w;
    ggml_vec_dot_tile_fn  tile = ggml_type_traits_get(w->type)->vec_dot_tile;
    for (int64_t rb = r0; rb < r1; rb += ROW_BLOCK) {
        int64_t re = rb + ROW_BLOCK < r1 ? rb + ROW_BLOCK : r1;
        int64_t t  = 0;
        for (; tile && t + VEC_DOT_TILE_TOKENS <= r->n_tokens; t += VEC_DOT_TILE_TOKENS) {
            int64_t row = rb;
            for (; row + VEC_DOT_TILE_ROWS <= re; row += VEC_DOT_TILE_ROWS) {
                tile(w->ne[0], (const uint8_t *) w->data + row * w->row_size, w->row_size,
                     act + t * r->act_row, r->act_row, job->y + t * job->ldy + row, job->ldy);
            }
            dot_each(r, job, act, row, re, t, t + VEC_DOT_TILE_TOKENS);
        }
        dot_each(r, job, act, rb, re, t, r->n_tokens);
        for (int64_t tk = 0; job->bias && tk < r->n_tokens; tk++) {
            float * yt = job->y + tk * job->ldy;
            for (int64_t row = rb; row < re; row++) yt[row] += job->bias[row];
        }
    }
}

int64_t ops_matmul_thread_floats(int64_t max_in) { return ROW_BLOCK * max_in; }

// The f32_activations variant: a block of weight rows dequantised once into the thread's
// w_rows, then every (f32) token row dotted with them in f32.
static void matmul_rows_f32(const struct matmul_region * r, const struct matmul_job * job,
                            const uint8_t * act, int64_t r0, int64_t r1, float * w_rows) {
    const struct weight *           w      = job->w;
    const struct ggml_type_traits * tt     = ggml_type_traits_get(w->type);
    ggml_vec_dot_fn                 dot_f32 = ggml_type_traits_get(GGML_TYPE_F32)->vec_dot;
    int64_t                         n      = w->ne[0];
    for (int64_t rb = r0; rb < r1; rb += ROW_BLOCK) {
        int64_t re = rb + ROW_BLOCK < r1 ? rb + ROW_BLOCK : r1;
        for (int64_t row = rb; row < re; row++) {
            tt->dequantize_row((const uint8_t *) w->data + row * w->row_size,
                               w_rows + (row - rb) * n, n);
        }
        for (int64_t t = 0; t < r->n_tokens; t++) {
            const uint8_t * xt = act + t * r->act_row;
            float *         yt = job->y + t * job->ldy;
            for (int64_t row = rb; row < re; row++) {
                float v = dot_f32(n, w_rows + (row - rb) * n, xt);
                yt[row] = job->bias ? v + job->bias[row] : v;
            }
        }
    }
}

static void matmul_worker(void * arg, int ith, int nth) {
    const struct matmul_region * r = arg;
    float * w_rows = r->c->f32_activations ? r->c->w_rows + (int64_t) ith * r->c->w_rows_stride
                                           : NULL;
    int64_t begin, end;
    threadpool_split(r->n_rows, ith, nth, &begin, &end);
    int64_t offset = 0;  // first global row of job j
    for (int j = 0; j < r->n_jobs && begin < end; j++) {
        int64_t rows = r->jobs[j].w->ne[1];
        int64_t lo = begin > offset ? begin : offset;
        int64_t hi = end < offset + rows ? end : offset + rows;
        if (lo < hi && w_rows) {
            matmul_rows_f32(r, &r->jobs[j], r->act[j], lo - offset, hi - offset, w_rows);
        } else if (lo < hi) {
            matmul_rows(r, &r->jobs[j], r->act[j], lo - offset, hi - offset);
        }
        offset += rows;
    }
}

// Quantises x once per activation type the jobs need; returns the buffer for each job.
static void quantise_inputs(struct compute * c, struct matmul_region * r, const float * x) {
    int64_t n_in = r->jobs[0].w->ne[0];
    c->act_q_type[0] = c->act_q_type[1] = GGML_TYPE_COUNT_MAX;
    for (int j = 0; j < r->n_jobs; j++) {
        uint32_t type = c->f32_activations ? GGML_TYPE_F32
                                           : ggml_type_traits_get(r->jobs[j].w->type)->vec_dot_type;
        int slot = c->act_q_type[0] == type ? 0 : c->act_q_type[1] == type ? 1 : -1;
        if (slot < 0) {
            slot = c->act_q_type[0] == GGML_TYPE_COUNT_MAX ? 0 : 1;
            c->act_q_type[slot] = type;
            for (int64_t t = 0; t < r->n_tokens; t++) {
                quantize_row_act(type, x + t * n_in, c->act_q[slot] + t * c->act_q_row, n_in);
            }
        }
        r->act[j] = c->act_q[slot];
    }
    r->act_row = c->act_q_row;
}

void ops_matmul(struct compute * c, const struct matmul_job * jobs, int n_jobs, const float * x,
                int64_t n_tokens) {
    struct matmul_region r = {.c = c, .jobs = jobs, .n_jobs = n_jobs, .n_tokens = n_tokens};
    for (int j = 0; j < n_jobs; j++) {
        r.n_rows += jobs[j].w->ne[1];
    }
    quantise_inputs(c, &r, x);
    threadpool_run(c->pool, matmul_worker, &r);
}

// --- attention -------------------------------------------------------------------------------
//
// Flash-attention style on the CPU: key rows are read in tiles of ATT_TILE positions, converted
// to f32 once per tile and shared by every query row of the task (a GQA group times a block of
// tokens), with an online softmax per row: m = running max, l = running sum of exp(s - m),
// acc = running sum of exp(s - m) * v, all f32. Tasks:
//   prefill chunk  (KV head, block of tokens)   rows = tokens x group, one span of positions
//   decode, dense  (KV head, chunk of positions) rows = the group's heads; split-K partials
//   decode, lists  (query head, chunk of list)   rows = 1, or the whole group when its heads
//                                                share one list; positions read through it
// Split-K partials (m, l, acc per chunk) are merged in chunk order after the parallel region.
// Chunk boundaries depend only on the number of positions, never on the thread count, so a
// list holding every position gives bit-identical output to the dense path.

enum {
    ATT_TILE       = 32,   // key rows converted and scored together (multiple of 8)
    ATT_MAX_ROWS   = OPS_ATTENTION_MAX_GROUP,  // query rows of one task (>= one GQA group)
    ATT_CHUNK_MIN  = 256,  // decode: fewest positions per split-K task
    ATT_MAX_CHUNKS = 64,   // decode: most split-K tasks per query head
    ATT_CACHE_FLOATS = 32768,  // decode over lists: f32 K+V rows cached per thread (x2), i.e.
                               // 512 rows of head_dim 64, 256 KiB with the values: L2-resident
};

// llama.cpp converts Q to f16 before its K dot products; we keep Q in f32 (never less
// accurate). Set to true to round Q the way llama.cpp does.
static const bool att_q_as_f16 = false;

// The inner loops, scalar or AVX2/FMA/F16C (picked at run time).
struct att_kernels {
    // dst[i][0..d) = f16 rows base[pos[i]] as f32, for i < n
    void (*load_f16)(const ckv_fp16 * base, const int64_t * pos, int32_t n, int32_t d, float * dst);
    // s[i] = q . k[i] for i < n (n a multiple of 4; k[i] points at row i: a tile or cached rows)
    void (*scores)(const float * q, const float * const * k, int32_t n, int32_t d, float * s);
    // s[i] = exp(s[i] - m) for i < n; returns their sum (exp(-inf) = 0)
    float (*exp_sum)(float * s, int32_t n, float m);
    // acc[0..d) += sum_i p[i] * v[i][0..d) for i < n, in order of i
    void (*accumulate)(float * acc, const float * p, const float * const * v, int32_t n, int32_t d);
};

static void load_f16_scalar(const ckv_fp16 * base, const int64_t * pos, int32_t n, int32_t d,
                            float * dst) {
    for (int32_t i = 0; i < n; i++) {
        ckv_fp16_to_fp32_row(base + pos[i] * d, dst + (int64_t) i * d, d);
    }
}

static void scores_scalar(const float * q, const float * const * k, int32_t n, int32_t d,
                          float * s) {
    for (int32_t i = 0; i < n; i++) {
        const float * ki  = k[i];
        float         sum = 0.0f;
        for (int32_t j = 0; j < d; j++) {
            sum += q[j] * ki[j];
        }
        s[i] = sum;
    }
}

static float exp_sum_scalar(float * s, int32_t n, float m) {
    float sum = 0.0f;
    for (int32_t i = 0; i < n; i++) {
        s[i] = expf(s[i] - m);
        sum += s[i];
    }
    return sum;
}

static void accumulate_scalar(float * acc, const float * p, const float * const * v, int32_t n,
                              int32_t d) {
    for (int32_t i = 0; i < n; i++) {
        const float * vi = v[i];
        for (int32_t j = 0; j < d; j++) {
            acc[j] += p[i] * vi[j];
        }
    }
}

#if defined(CKV_HAVE_X86_KERNELS) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define ATT_AVX2 __attribute__((target("avx2,fma,f16c")))

ATT_AVX2 static void load_f16_avx2(const ckv_fp16 * base, const int64_t * pos, int32_t n, int32_t d,
                                   float * dst) {
    for (int32_t i = 0; i < n; i++) {
        const ckv_fp16 * src = base + pos[i] * d;
        float *          out = dst + (int64_t) i * d;
        for (int32_t j = 0; j < d; j += 8) {
            _mm256_storeu_ps(out + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (src + j))));
        }
    }
}

ATT_AVX2 static void scores_avx2(const float * q, const float * const * k, int32_t n, int32_t d,
                                 float * s) {
    for (int32_t i = 0; i < n; i += 4) {
        const float *k0 = k[i], *k1 = k[i + 1], *k2 = k[i + 2], *k3 = k[i + 3];
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int32_t j = 0; j < d; j += 8) {
            __m256 qv = _mm256_loadu_ps(q + j);
            a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + j), a0);
            a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + j), a1);
            a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + j), a2);
            a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + j), a3);
        }
        // one reduction tree for all four, so a score never depends on its neighbours
        __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        _mm_storeu_ps(s + i, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
    }
}

// exp(x) for x <= 0 (Cephes expf: x = n ln2 + r, degree-6 polynomial in r, about 1 ulp);
// below -87.3 the result is 0, as expf's would be a denormal at most.
ATT_AVX2 static __m256 exp_avx2(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3365f);
    __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

ATT_AVX2 static float exp_sum_avx2(float * s, int32_t n, float m) {
    __m256  mv  = _mm256_set1_ps(m);
    __m256  acc = _mm256_setzero_ps();
    int32_t i   = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + i), mv));
        _mm256_storeu_ps(s + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float sum = _mm_cvtss_f32(h);
    for (; i < n; i++) {
        s[i] = expf(s[i] - m);
        sum += s[i];
    }
    return sum;
}

ATT_AVX2 static void accumulate_avx2(float * acc, const float * p, const float * const * v,
                                     int32_t n, int32_t d) {
    int32_t j = 0;
    for (; j + 32 <= d; j += 32) {  // 4 accumulators stay in registers over the whole tile
        __m256 a0 = _mm256_loadu_ps(acc + j), a1 = _mm256_loadu_ps(acc + j + 8);
        __m256 a2 = _mm256_loadu_ps(acc + j + 16), a3 = _mm256_loadu_ps(acc + j + 24);
        for (int32_t i = 0; i < n; i++) {
            const float * vi = v[i] + j;
            __m256        pi = _mm256_set1_ps(p[i]);
            a0 = _mm256_fmadd_ps(pi, _mm256_loadu_ps(vi), a0);
            a1 = _mm256_fmadd_ps(pi, _mm256_loadu_ps(vi + 8), a1);
            a2 = _mm256_fmadd_ps(pi, _mm256_loadu_ps(vi + 16), a2);
            a3 = _mm256_fmadd_ps(pi, _mm256_loadu_ps(vi + 24), a3);
        }
        _mm256_storeu_ps(acc + j, a0);
        _mm256_storeu_ps(acc + j + 8, a1);
        _mm256_storeu_ps(acc + j + 16, a2);
        _mm256_storeu_ps(acc + j + 24, a3);
    }
    for (; j < d; j += 8) {
        __m256 a = _mm256_loadu_ps(acc + j);
        for (int32_t i = 0; i < n; i++) {
            a = _mm256_fmadd_ps(_mm256_set1_ps(p[i]), _mm256_loadu_ps(v[i] + j), a);
        }
        _mm256_storeu_ps(acc + j, a);
    }
}
#endif

static const struct att_kernels * att_kernels_for(int32_t head_dim) {
    static const struct att_kernels scalar = {load_f16_scalar, scores_scalar, exp_sum_scalar,
                                              accumulate_scalar};
#if defined(ATT_AVX2)
    static const struct att_kernels avx2 = {load_f16_avx2, scores_avx2, exp_sum_avx2, accumulate_avx2};
    if (head_dim % 8 == 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
        return &avx2;
    }
#endif
    return &scalar;
}

// Per-thread scratch, carved from compute.att_scores (ops_attention_thread_floats floats).
struct att_scratch {
    float * q;       // [ATT_MAX_ROWS][d] query rows as the dot products read them
    float * k;       // [ATT_TILE][d] key tile, f32
    float * v;       // [ATT_TILE][d] value tile, f32
    float * s;       // [ATT_TILE] scores, then probabilities, of one row
    float * state;   // [ATT_MAX_ROWS][d + 2] acc, m, l of prefill rows
    float * scores;  // [n_ctx] one row's scores (weight sums)
    // Rows converted to f32 once and shared by the query heads of a GQA group that read
    // different lists (see selected_group_task): direct-mapped by position, slot = pos mod
    // cache_rows; tags are valid for one task only.
    int32_t   cache_rows;  // a power of two >= 2 * ATT_TILE
    int32_t * cache_tag;   // [cache_rows] position held by each slot, -1 = empty
    float *   cache_k;     // [cache_rows][d]
    float *   cache_v;     // [cache_rows][d]
};

static int32_t cache_rows_for(int32_t head_dim) {
    int32_t n = 2 * ATT_TILE;
    while (2 * n * head_dim <= ATT_CACHE_FLOATS) {
        n *= 2;
    }
    return n;
}

int64_t ops_attention_thread_floats(int32_t head_dim, int64_t n_ctx) {
    int64_t cache = (int64_t) cache_rows_for(head_dim) * (2 * head_dim + 1);  // rows + tags
    return (int64_t) ATT_MAX_ROWS * head_dim + 2 * (int64_t) ATT_TILE * head_dim + ATT_TILE +
           (int64_t) ATT_MAX_ROWS * (head_dim + 2) + n_ctx + cache;
}

int64_t ops_attention_partial_floats(int32_t n_head, int32_t head_dim) {
    return (int64_t) n_head * ATT_MAX_CHUNKS * (head_dim + 2);
}

static struct att_scratch att_scratch_of(const struct compute * c, int ith, int32_t d) {
    float *            base = c->att_scores + (int64_t) ith * c->att_stride;
    struct att_scratch w;
    w.q      = base;
    w.k      = w.q + (int64_t) ATT_MAX_ROWS * d;
    w.v      = w.k + (int64_t) ATT_TILE * d;
    w.s      = w.v + (int64_t) ATT_TILE * d;
    w.state  = w.s + ATT_TILE;
    w.cache_rows = cache_rows_for(d);
    w.cache_k    = w.state + (int64_t) ATT_MAX_ROWS * (d + 2);
    w.cache_v    = w.cache_k + (int64_t) w.cache_rows * d;
    w.cache_tag  = (int32_t *) (w.cache_v + (int64_t) w.cache_rows * d);  // floats' size and
                                                                          // alignment
    w.scores     = (float *) (w.cache_tag + w.cache_rows);
    return w;
}

// The query row as the dot products read it (f32, or rounded to f16 like llama.cpp).
static void prepare_q(const float * q, float * dst, int32_t d) {
    for (int32_t j = 0; j < d; j++) {
        dst[j] = att_q_as_f16 ? ckv_fp16_to_fp32(ckv_fp32_to_fp16(q[j])) : q[j];
    }
}

static void state_reset(float * state, int32_t d) {
    memset(state, 0, (size_t) d * sizeof(float));
    state[d]     = -INFINITY;  // m
    state[d + 1] = 0.0f;       // l
}

// Query rows of one task; row r sees positions [lo[r], hi[r]] and owns state[r] (acc, m, l).
struct att_rows {
    int32_t       n;
    const float * q[ATT_MAX_ROWS];
    float *       state[ATT_MAX_ROWS];
    int64_t       lo[ATT_MAX_ROWS];
    int64_t       hi[ATT_MAX_ROWS];
    float *       scores_out[ATT_MAX_ROWS];  // NULL, or [span n]: the row's scaled scores
};

// Key positions of one task: list[first .. first + n), or first .. first + n when list is NULL.
// Positions ascend (lists are sorted by the policy layer).
struct att_span {
    const void *    keys;   // rows of one (layer, KV head)
    const void *    vals;
    const int32_t * list;
    int64_t         first;
    int64_t         n;
};

static void load_tile(const struct att_kernels * K, const struct kv_cache * kv, const void * rows,
                      const int64_t * pos, int32_t n, float * dst) {
    if (kv->type == GGML_TYPE_F16) {
        K->load_f16((const ckv_fp16 *) rows, pos, n, kv->head_dim, dst);
        return;
    }
    for (int32_t i = 0; i < n; i++) {
        memcpy(dst + (int64_t) i * kv->head_dim, (const float *) rows + pos[i] * kv->head_dim,
               (size_t) kv->head_dim * sizeof(float));
    }
}

// rows[i] = base + i * d for the ATT_TILE rows of a converted tile (the kernels take row
// pointers so that cached rows can be read in place, see selected_group_task).
static void tile_rows(const float * base, int32_t d, const float ** rows) {
    for (int32_t i = 0; i < ATT_TILE; i++) {
        rows[i] = base + (int64_t) i * d;
    }
}

// Online-softmax update of one row with the tile's probabilities: the scores in w->s become
// exp(s - m_new); acc and l are rescaled by exp(m_old - m_new) first.
static void row_update(const struct att_kernels * K, float * state, float * s,
                       const float * const * v, int32_t nt, int32_t d, float tile_max) {
    float m_old = state[d], m_new = tile_max > m_old ? tile_max : m_old;
    float corr  = expf(m_old - m_new);  // 0 on the first tile (m_old = -inf)
    float sum   = K->exp_sum(s, ATT_TILE, m_new);
    if (corr != 1.0f) {
        for (int32_t j = 0; j < d; j++) {
            state[j] *= corr;
        }
    }
    state[d]     = m_new;
    state[d + 1] = state[d + 1] * corr + sum;
    K->accumulate(state, s, v, nt, d);
}

// Scores one row against the tile: s[i] = scale * q.k[i] for visible positions, else -inf.
// Returns the tile's max score (-inf when nothing is visible). keys has ATT_TILE valid rows
// (those past nt are read by the 4-row kernel, then masked).
static float row_scores(const struct att_kernels * K, const struct att_rows * rows, int32_t r,
                        const int64_t * pos, int32_t nt, const float * const * keys, int32_t d,
                        float scale, float * s) {
    K->scores(rows->q[r], keys, (nt + 3) & ~3, d, s);
    float max = -INFINITY;
    for (int32_t i = 0; i < ATT_TILE; i++) {
        bool visible = i < nt && pos[i] >= rows->lo[r] && pos[i] <= rows->hi[r];
        s[i] = visible ? s[i] * scale : -INFINITY;
        max  = s[i] > max ? s[i] : max;
    }
    return max;
}

// Asks for the K and V rows of list[first .. first + n) to be brought into the cache: rows
// read through a list are scattered, so the hardware prefetcher cannot guess them, and a
// tile of 32 cold rows otherwise waits on memory row by row (profiled: the loads of a
// ClusterKV step cost as much as a dense step's, for a quarter of the rows).
static void prefetch_rows(const struct kv_cache * kv, const void * keys, const void * vals,
                          const int32_t * list, int64_t first, int64_t end) {
    size_t row_bytes = (size_t) kv->head_dim * kv->elt_size;
    for (int64_t i = first; i < end; i++) {
        size_t off = (size_t) list[i] * row_bytes;
        for (size_t b = 0; b < row_bytes; b += 64) {  // 64-byte cache lines
            __builtin_prefetch((const char *) keys + off + b);
            __builtin_prefetch((const char *) vals + off + b);
        }
    }
}

static void attend_span(const struct att_kernels * K, const struct kv_cache * kv,
                        const struct att_span * sp, const struct att_rows * rows, float scale,
                        struct att_scratch * w) {
    int32_t       d = kv->head_dim;
    int64_t       pos[ATT_TILE];
    const float * krows[ATT_TILE], * vrows[ATT_TILE];
    tile_rows(w->k, d, krows);
    tile_rows(w->v, d, vrows);
    for (int64_t t0 = 0; t0 < sp->n; t0 += ATT_TILE) {
        int32_t nt = sp->n - t0 < ATT_TILE ? (int32_t) (sp->n - t0) : ATT_TILE;
        for (int32_t i = 0; i < nt; i++) {
            pos[i] = sp->list ? sp->list[sp->first + t0 + i] : sp->first + t0 + i;
        }
        if (sp->list && t0 + nt < sp->n) {  // scattered rows: the next tile's loads in flight
            // (two tiles ahead measured no better)
            int64_t next = sp->first + t0 + nt, end = sp->first + sp->n;
            prefetch_rows(kv, sp->keys, sp->vals, sp->list, next, next + ATT_TILE < end ? next + ATT_TILE : end);
        }
        load_tile(K, kv, sp->keys, pos, nt, w->k);
        bool have_v = false;
        for (int32_t r = 0; r < rows->n; r++) {
            if (pos[0] > rows->hi[r] || pos[nt - 1] < rows->lo[r]) {
                continue;  // the whole tile is outside this row's causal window
            }
            float max = row_scores(K, rows, r, pos, nt, krows, d, scale, w->s);
            if (rows->scores_out[r]) {
                memcpy(rows->scores_out[r] + t0, w->s, (size_t) nt * sizeof(float));
            }
            if (max == -INFINITY) {
                continue;
            }
            if (!have_v) {
                load_tile(K, kv, sp->vals, pos, nt, w->v);
                have_v = true;
            }
            row_update(K, rows->state[r], w->s, vrows, nt, d, max);
        }
    }
}

// --- attention: prefill chunks -----------------------------------------------------------------

struct attention_region {
    struct compute *                c;
    const struct att_kernels *      K;
    const struct kv_cache *         kv;
    const struct attention_params * p;
    const float *                   q;
    float *                         out;
    int64_t                         n_tokens;
    int64_t                         pos0;
    int64_t                         block;      // prefill: tokens per task
    const int32_t *                 list_n;     // selected: [n_head] list lengths
    const int32_t *                 list_pos;   // selected: [n_head][list_stride]
    int64_t                         list_stride;
    float *                         weights;    // selected: NULL or [n_head][list_stride]
};

static int32_t group_size(const struct attention_params * p) { return p->n_head / p->n_head_kv; }

static int64_t window_lo(const struct attention_params * p, int64_t hi) {
    return p->window > 0 && hi - p->window + 1 > 0 ? hi - p->window + 1 : 0;
}

// Task (KV head kvh, tokens [t0, t1)): every row of the group over the block's causal span.
static void prefill_task(const struct attention_region * r, struct att_scratch * w, int32_t kvh,
                         int64_t t0, int64_t t1) {
    const struct attention_params * p = r->p;
    int32_t d = p->head_dim, g = group_size(p);
    struct att_rows rows = {.n = 0};
    for (int64_t t = t0; t < t1; t++) {
        for (int32_t i = 0; i < g; i++, rows.n++) {
            float * q = w->q + (int64_t) rows.n * d;
            prepare_q(r->q + (t * p->n_head + kvh * g + i) * d, q, d);
            rows.q[rows.n]     = q;
            rows.state[rows.n] = w->state + (int64_t) rows.n * (d + 2);
            rows.hi[rows.n]    = r->pos0 + t;
            rows.lo[rows.n]    = window_lo(p, r->pos0 + t);
            state_reset(rows.state[rows.n], d);
        }
    }
    int64_t lo = rows.lo[0], hi = rows.hi[rows.n - 1];
    struct att_span span = {kv_cache_k(r->kv, p->il, kvh), kv_cache_v(r->kv, p->il, kvh), NULL, lo,
                            hi - lo + 1};
    attend_span(r->K, r->kv, &span, &rows, p->scale, w);
    for (int32_t i = 0; i < rows.n; i++) {
        int64_t t = t0 + i / g;
        float * o = r->out + (t * p->n_head + kvh * g + i % g) * d;
        float   inv = 1.0f / rows.state[i][d + 1];
        for (int32_t j = 0; j < d; j++) {
            o[j] = rows.state[i][j] * inv;
        }
    }
}

static void prefill_worker(void * arg, int ith, int nth) {
    const struct attention_region * r = arg;
    struct att_scratch w = att_scratch_of(r->c, ith, r->p->head_dim);
    int64_t n_blocks = (r->n_tokens + r->block - 1) / r->block;
    int64_t n_tasks  = n_blocks * r->p->n_head_kv;
    for (int64_t task = ith; task < n_tasks; task += nth) {  // interleaved: causal work grows
        int64_t b  = task / r->p->n_head_kv, t0 = b * r->block;
        int64_t t1 = t0 + r->block < r->n_tokens ? t0 + r->block : r->n_tokens;
        prefill_task(r, &w, (int32_t) (task % r->p->n_head_kv), t0, t1);
    }
}

// --- attention: decode steps (split-K) ---------------------------------------------------------

// Positions per split-K chunk for a span of n: a function of n only (see the section comment).
static int64_t chunk_size(int64_t n) {
    int64_t c = (n + ATT_MAX_CHUNKS - 1) / ATT_MAX_CHUNKS;
    c = c < ATT_CHUNK_MIN ? ATT_CHUNK_MIN : c;
    return (c + ATT_TILE - 1) / ATT_TILE * ATT_TILE;
}

static float * partial_of(const struct compute * c, const struct attention_params * p, int32_t h,
                          int64_t chunk) {
    return c->att_partials + ((int64_t) h * ATT_MAX_CHUNKS + chunk) * (p->head_dim + 2);
}

// Task (KV head kvh, chunk ci of [lo, pos]): the group's heads, one partial state each.
static void decode_dense_task(const struct attention_region * r, struct att_scratch * w,
                              int32_t kvh, int64_t ci) {
    const struct attention_params * p = r->p;
    int32_t d = p->head_dim, g = group_size(p);
    int64_t hi = r->pos0, lo = window_lo(p, hi), cs = chunk_size(hi - lo + 1);
    int64_t first = lo + ci * cs, n = hi + 1 - first < cs ? hi + 1 - first : cs;
    struct att_rows rows = {.n = g};
    for (int32_t i = 0; i < g; i++) {
        float * q = w->q + (int64_t) i * d;
        prepare_q(r->q + (int64_t) (kvh * g + i) * d, q, d);
        rows.q[i]     = q;
        rows.state[i] = partial_of(r->c, p, kvh * g + i, ci);
        rows.lo[i]    = lo;
        rows.hi[i]    = hi;
        state_reset(rows.state[i], d);
    }
    struct att_span span = {kv_cache_k(r->kv, p->il, kvh), kv_cache_v(r->kv, p->il, kvh), NULL,
                            first, n};
    attend_span(r->K, r->kv, &span, &rows, p->scale, w);
}

static void decode_dense_worker(void * arg, int ith, int nth) {
    const struct attention_region * r = arg;
    struct att_scratch w  = att_scratch_of(r->c, ith, r->p->head_dim);
    int64_t            hi = r->pos0, lo = window_lo(r->p, hi), cs = chunk_size(hi - lo + 1);
    int64_t            nc = (hi - lo + 1 + cs - 1) / cs;
    for (int64_t task = ith; task < nc * r->p->n_head_kv; task += nth) {
        decode_dense_task(r, &w, (int32_t) (task / nc), task % nc);
    }
}

// out = the merged attention of head h's nc partial states; returns the merged m and l.
static void merge_partials(const struct compute * c, const struct attention_params * p, int32_t h,
                           int64_t nc, float * out, float * m_out, float * l_out) {
    int32_t d = p->head_dim;
    float   m = -INFINITY, l = 0.0f;
    for (int64_t ci = 0; ci < nc; ci++) {
        float mc = partial_of(c, p, h, ci)[d];
        m = mc > m ? mc : m;
    }
    for (int64_t ci = 0; ci < nc; ci++) {
        const float * st = partial_of(c, p, h, ci);
        l += st[d] == -INFINITY ? 0.0f : st[d + 1] * expf(st[d] - m);
    }
    memset(out, 0, (size_t) d * sizeof(float));
    for (int64_t ci = 0; ci < nc; ci++) {
        const float * st = partial_of(c, p, h, ci);
        if (st[d] == -INFINITY) {
            continue;
        }
        float a = expf(st[d] - m) / l;
        for (int32_t j = 0; j < d; j++) {
            out[j] += a * st[j];
        }
    }
    *m_out = m;
    *l_out = l;
}

void ops_attention(struct compute * c, const struct kv_cache * kv, const struct attention_params * p,
                   const float * q, float * out, int64_t n_tokens, int64_t pos0) {
    struct attention_region r = {.c = c, .K = att_kernels_for(p->head_dim), .kv = kv, .p = p, .q = q,
                                 .out = out, .n_tokens = n_tokens, .pos0 = pos0};
    if (n_tokens > 1) {
        int64_t rows_per_token = group_size(p);
        r.block = rows_per_token >= ATT_MAX_ROWS ? 1 : ATT_MAX_ROWS / rows_per_token;
        threadpool_run(c->pool, prefill_worker, &r);
        return;
    }
    threadpool_run(c->pool, decode_dense_worker, &r);
    int64_t hi = pos0, lo = window_lo(p, hi), cs = chunk_size(hi - lo + 1);
    float   m, l;
    for (int32_t h = 0; h < p->n_head; h++) {
        merge_partials(c, p, h, (hi - lo + 1 + cs - 1) / cs, out + (int64_t) h * p->head_dim, &m, &l);
    }
}

// --- attention: decode steps over position lists ------------------------------------------------

// True when every query head of KV head kvh's group reads the same list (streaming, or
// clusterkv's per-KV-head selection): the group then shares each K/V tile, as dense decode does.
static bool group_shares_list(const struct attention_region * r, int32_t kvh) {
    int32_t g = group_size(r->p), h0 = kvh * g;
    for (int32_t h = h0 + 1; h < h0 + g; h++) {
        if (r->list_n[h] != r->list_n[h0] ||
            memcmp(r->list_pos + h * r->list_stride, r->list_pos + h0 * r->list_stride,
                   sizeof(int32_t) * (size_t) r->list_n[h0]) != 0) {
            return false;
        }
    }
    return true;
}

// Task (query heads [h0, h0 + n_rows) reading head h0's list, chunk ci of that list).
static void selected_task(const struct attention_region * r, struct att_scratch * w, int32_t h0,
                          int32_t n_rows, int64_t ci) {
    const struct attention_params * p = r->p;
    int32_t d = p->head_dim, kvh = h0 / group_size(p);
    int64_t n = r->list_n[h0], cs = chunk_size(n), first = ci * cs;
    struct att_rows rows = {.n = n_rows};
    for (int32_t i = 0; i < n_rows; i++) {
        float * q = w->q + (int64_t) i * d;
        prepare_q(r->q + (int64_t) (h0 + i) * d, q, d);
        rows.q[i]          = q;
        rows.state[i]      = partial_of(r->c, p, h0 + i, ci);
        rows.lo[i]         = 0;
        rows.hi[i]         = r->pos0;
        rows.scores_out[i] = r->weights ? r->weights + (h0 + i) * r->list_stride + first : NULL;
        state_reset(rows.state[i], d);
    }
    struct att_span span = {kv_cache_k(r->kv, p->il, kvh), kv_cache_v(r->kv, p->il, kvh),
                            r->list_pos + h0 * r->list_stride, first, n - first < cs ? n - first : cs};
    attend_span(r->K, r->kv, &span, &rows, p->scale, w);
}

// Points krows/vrows at the f32 K and V rows of positions pos[0..nt) in the thread's row
// cache, converting only the rows not there yet (the walk prefetched them). Returns false
// when two positions of the tile map to the same slot: the caller then converts the tile.
static bool cached_tile(const struct att_kernels * K, const struct kv_cache * kv,
                        const void * keys, const void * vals, const int64_t * pos, int32_t nt,
                        struct att_scratch * w, const float ** krows, const float ** vrows) {
    int32_t d = kv->head_dim, mask = w->cache_rows - 1;
    int64_t miss[ATT_TILE];
    int32_t n_miss = 0;
    for (int32_t i = 0; i < nt; i++) {
        int32_t slot = (int32_t) (pos[i] & mask);
        if (w->cache_tag[slot] != pos[i]) {
            w->cache_tag[slot] = (int32_t) pos[i];
            miss[n_miss++]     = pos[i];
        }
        krows[i] = w->cache_k + (int64_t) slot * d;
        vrows[i] = w->cache_v + (int64_t) slot * d;
    }
    for (int32_t i = 0; i < nt; i++) {  // a later row of the tile took an earlier row's slot
        if (w->cache_tag[pos[i] & mask] != pos[i]) {
            for (int32_t j = 0; j < nt; j++) {
                w->cache_tag[pos[j] & mask] = -1;
            }
            return false;
        }
    }
    for (int32_t i = 0; i < n_miss; i++) {  // one row at a time: misses are not contiguous
        float * kd = w->cache_k + (miss[i] & mask) * d;
        float * vd = w->cache_v + (miss[i] & mask) * d;
        load_tile(K, kv, keys, &miss[i], 1, kd);
        load_tile(K, kv, vals, &miss[i], 1, vd);
    }
    for (int32_t i = nt; i < ATT_TILE; i++) {  // rows the 4-row kernel reads past nt: masked
        krows[i] = krows[0];
        vrows[i] = vrows[0];
    }
    return true;
}

// One query head's walk over its chunk of its own list inside a group task.
struct head_walk {
    const int32_t * list;
    int64_t         first;   // chunk start in the list
    int64_t         next;    // next entry to read
    int64_t         end;
    struct att_rows rows;    // one row: this head
};

// Task (KV head kvh, chunk ci of each query head's own list) when the heads of a GQA group read
// different lists (clusterkv per query head, quest, h2o). Each head runs exactly the tiles
// selected_task would (tiles of its own list from its chunk start, so the same floating-point
// operations and a bit-identical result), but the lists overlap heavily, so a K/V row is
// converted to f32 once, into the thread's row cache, and read in place by every head whose
// list holds it. The head whose next tile starts lowest goes first: the heads then walk the
// positions together and find each other's rows still cached.
static void selected_group_task(const struct attention_region * r, struct att_scratch * w,
                                int32_t kvh, int64_t ci) {
    const struct attention_params * p = r->p;
    int32_t          d = p->head_dim, g = group_size(p);
    const void *     keys = kv_cache_k(r->kv, p->il, kvh), * vals = kv_cache_v(r->kv, p->il, kvh);
    struct head_walk walk[ATT_MAX_ROWS];
    for (int32_t i = 0; i < g; i++) {
        int32_t           h  = kvh * g + i;
        int64_t           n  = r->list_n[h], cs = chunk_size(n);
        struct head_walk * hw = &walk[i];
        hw->list  = r->list_pos + h * r->list_stride;
        hw->first = hw->next = ci * cs;
        hw->end   = hw->first < n ? (n - hw->first < cs ? n : hw->first + cs) : hw->first;
        hw->rows  = (struct att_rows){.n = 1, .lo = {0}, .hi = {r->pos0}};
        if (hw->next < hw->end) {
            float * q = w->q + (int64_t) i * d;
            prepare_q(r->q + (int64_t) h * d, q, d);
            hw->rows.q[0]          = q;
            hw->rows.state[0]      = partial_of(r->c, p, h, ci);
            hw->rows.scores_out[0] = r->weights ? r->weights + h * r->list_stride + hw->first : NULL;
            state_reset(hw->rows.state[0], d);
        }
        int64_t t1 = hw->next + ATT_TILE < hw->end ? hw->next + ATT_TILE : hw->end;
        prefetch_rows(r->kv, keys, vals, hw->list, hw->next, t1);
    }
    memset(w->cache_tag, 0xff, (size_t) w->cache_rows * sizeof(int32_t));  // -1: empty
    const float * krows[ATT_TILE], * vrows[ATT_TILE];
    int64_t       pos[ATT_TILE];
    for (;;) {
        struct head_walk * hw = NULL;
        for (int32_t i = 0; i < g; i++) {
            if (walk[i].next < walk[i].end &&
                (!hw || walk[i].list[walk[i].next] < hw->list[hw->next])) {
                hw = &walk[i];
            }
        }
        if (!hw) {
            break;
        }
        int32_t nt = hw->end - hw->next < ATT_TILE ? (int32_t) (hw->end - hw->next) : ATT_TILE;
        for (int32_t i = 0; i < nt; i++) {
            pos[i] = hw->list[hw->next + i];
        }
        if (!cached_tile(r->K, r->kv, keys, vals, pos, nt, w, krows, vrows)) {
            load_tile(r->K, r->kv, keys, pos, nt, w->k);
            load_tile(r->K, r->kv, vals, pos, nt, w->v);
            tile_rows(w->k, d, krows);
            tile_rows(w->v, d, vrows);
        }
        float max = row_scores(r->K, &hw->rows, 0, pos, nt, krows, d, p->scale, w->s);
        if (hw->rows.scores_out[0]) {
            memcpy(hw->rows.scores_out[0] + (hw->next - hw->first), w->s, (size_t) nt * sizeof(float));
        }
        if (max != -INFINITY) {
            row_update(r->K, hw->rows.state[0], w->s, vrows, nt, d, max);
        }
        hw->next += nt;
        // this head's next tile comes after the other heads' current ones: time to arrive
        int64_t t1 = hw->next + ATT_TILE < hw->end ? hw->next + ATT_TILE : hw->end;
        prefetch_rows(r->kv, keys, vals, hw->list, hw->next, t1);
    }
}

static void selected_worker(void * arg, int ith, int nth) {
    const struct attention_region * r = arg;
    struct att_scratch w = att_scratch_of(r->c, ith, r->p->head_dim);
    int32_t g    = group_size(r->p);
    int64_t task = 0;  // (rows, chunk) pairs in order, dealt round-robin
    for (int32_t kvh = 0; kvh < r->p->n_head_kv; kvh++) {
        bool    shared = group_shares_list(r, kvh);
        int64_t nc_max = 0;  // chunks of the group's longest list
        for (int32_t h = kvh * g; h < (kvh + 1) * g; h += shared ? g : 1) {
            int64_t n = r->list_n[h], nc = (n + chunk_size(n) - 1) / chunk_size(n);
            nc_max = nc > nc_max ? nc : nc_max;
        }
        for (int64_t ci = 0; ci < nc_max; ci++, task++) {
            if (task % nth != ith) {
                continue;
            }
            if (shared) {
                selected_task(r, &w, kvh * g, g, ci);
            } else {
                selected_group_task(r, &w, kvh, ci);
            }
        }
    }
}

void ops_attention_selected(struct compute * c, const struct kv_cache * kv,
                            const struct attention_params * p, const float * q, float * out,
                            int64_t pos, const int32_t * list_n, const int32_t * list_pos,
                            int64_t list_stride, float * weights) {
    struct attention_region r = {.c = c, .K = att_kernels_for(p->head_dim), .kv = kv, .p = p, .q = q,
                                 .out = out, .n_tokens = 1, .pos0 = pos, .list_n = list_n,
                                 .list_pos = list_pos, .list_stride = list_stride, .weights = weights};
    threadpool_run(c->pool, selected_worker, &r);
    for (int32_t h = 0; h < p->n_head; h++) {
        int64_t n = list_n[h], cs = chunk_size(n);
        float   m, l;
        merge_partials(c, p, h, (n + cs - 1) / cs, out + (int64_t) h * p->head_dim, &m, &l);
        if (weights) {  // scaled scores -> softmax weights
            float * wh = weights + h * list_stride;
            r.K->exp_sum(wh, (int32_t) n, m);
            for (int64_t i = 0; i < n; i++) {
                wh[i] /= l;
            }
        }
    }
}

// --- attention: softmax weights summed over a chunk's queries (h2o) -----------------------------

struct weight_sum_region {
    struct compute *                c;
    const struct att_kernels *      K;
    const struct kv_cache *         kv;
    const struct attention_params * p;
    const float *                   q;
    int64_t                         n_tokens;
    int64_t                         pos0;
    float *                         sums;    // [n_head][stride]
    int64_t                         stride;
};

// sums[h][j] += softmax weight of position j for every query of the chunk (one head per task).
static void weight_sum_head(const struct weight_sum_region * r, struct att_scratch * w, int32_t h) {
    const struct attention_params * p = r->p;
    int32_t      d    = p->head_dim;
    const void * keys = kv_cache_k(r->kv, p->il, h / group_size(p));
    float *      sums = r->sums + h * r->stride;
    int64_t      pos[ATT_TILE];
    const float * krows[ATT_TILE];
    tile_rows(w->k, d, krows);
    for (int64_t t = 0; t < r->n_tokens; t++) {
        int64_t hi = r->pos0 + t, lo = window_lo(p, hi);
        prepare_q(r->q + (t * p->n_head + h) * d, w->q, d);
        float max = -INFINITY;
        for (int64_t t0 = lo; t0 <= hi; t0 += ATT_TILE) {
            int32_t nt = hi + 1 - t0 < ATT_TILE ? (int32_t) (hi + 1 - t0) : ATT_TILE;
            for (int32_t i = 0; i < nt; i++) {
                pos[i] = t0 + i;
            }
            load_tile(r->K, r->kv, keys, pos, nt, w->k);
            r->K->scores(w->q, krows, (nt + 3) & ~3, d, w->s);
            for (int32_t i = 0; i < nt; i++) {
                float s = w->s[i] * p->scale;
                w->scores[t0 - lo + i] = s;
                max = s > max ? s : max;
            }
        }
        float inv = 1.0f / r->K->exp_sum(w->scores, (int32_t) (hi - lo + 1), max);
        for (int64_t j = lo; j <= hi; j++) {
            sums[j] += w->scores[j - lo] * inv;
        }
    }
}

static void weight_sum_worker(void * arg, int ith, int nth) {
    const struct weight_sum_region * r = arg;
    struct att_scratch w = att_scratch_of(r->c, ith, r->p->head_dim);
    for (int32_t h = ith; h < r->p->n_head; h += nth) {
        weight_sum_head(r, &w, h);
    }
}

void ops_attention_weight_sums(struct compute * c, const struct kv_cache * kv,
                               const struct attention_params * p, const float * q, int64_t n_tokens,
                               int64_t pos0, float * sums, int64_t stride) {
    struct weight_sum_region r = {c, att_kernels_for(p->head_dim), kv, p, q, n_tokens, pos0, sums,
                                  stride};
    threadpool_run(c->pool, weight_sum_worker, &r);
}
