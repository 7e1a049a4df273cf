// ops.c - CPU compute blocks of the forward pass. Matmuls run on the quantised weight blocks
// with activations quantised to 8 bits (as llama.cpp does), split by output rows over the
// thread pool; attention is split by (token, head) pairs.
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
    const struct matmul_job * jobs;
    int                       n_jobs;
    int64_t                   n_rows;    // rows of all jobs together
    int64_t                   n_tokens;
    const uint8_t *           act[4];    // per job: quantised activations (or f32 input)
    size_t                    act_row;   // bytes between token rows in act
};

enum { ROW_BLOCK = 16 };  // weight rows kept hot in L1 while every token row streams past

static void matmul_rows(const struct matmul_region * r, const struct matmul_job * job,
                        const uint8_t * act, int64_t r0, int64_t r1) {
    const struct weight *           w   = job->w;
    const struct ggml_type_traits * tt  = ggml_type_traits_get(w->type);
    int64_t                         n   = w->ne[0];
    for (int64_t rb = r0; rb < r1; rb += ROW_BLOCK) {
        int64_t re = rb + ROW_BLOCK < r1 ? rb + ROW_BLOCK : r1;
        for (int64_t t = 0; t < r->n_tokens; t++) {
            const uint8_t * xt = act + t * r->act_row;
            float *         yt = job->y + t * job->ldy;
            for (int64_t row = rb; row < re; row++) {
                const uint8_t * wrow = (const uint8_t *) w->data + row * w->row_size;
                float           v    = tt->vec_dot(n, wrow, xt);
                yt[row] = job->bias ? v + job->bias[row] : v;
            }
        }
    }
}

static void matmul_worker(void * arg, int ith, int nth) {
    const struct matmul_region * r = arg;
    int64_t begin, end;
    threadpool_split(r->n_rows, ith, nth, &begin, &end);
    int64_t offset = 0;  // first global row of job j
    for (int j = 0; j < r->n_jobs && begin < end; j++) {
        int64_t rows = r->jobs[j].w->ne[1];
        int64_t lo = begin > offset ? begin : offset;
        int64_t hi = end < offset + rows ? end : offset + rows;
        if (lo < hi) {
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
        uint32_t type = ggml_type_traits_get(r->jobs[j].w->type)->vec_dot_type;
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
    struct matmul_region r = {.jobs = jobs, .n_jobs = n_jobs, .n_tokens = n_tokens};
    for (int j = 0; j < n_jobs; j++) {
        r.n_rows += jobs[j].w->ne[1];
    }
    quantise_inputs(c, &r, x);
    threadpool_run(c->pool, matmul_worker, &r);
}

// --- attention -------------------------------------------------------------------------------

struct attention_region {
    struct compute *                c;
    const struct kv_cache *         kv;
    const struct attention_params * p;
    const float *                   q;
    float *                         out;
    int64_t                         n_tokens;
    int64_t                         pos0;
};

static float dot_row(const struct kv_cache * kv, const void * rows, int64_t j, const float * q) {
    if (kv->type == GGML_TYPE_F16) {
        return ckv_dot_f16_f32(kv->head_dim, (const ckv_fp16 *) rows + j * kv->head_dim, q);
    }
    const float * k = (const float *) rows + j * kv->head_dim;
    float         s = 0.0f;
    for (int32_t d = 0; d < kv->head_dim; d++) {
        s += k[d] * q[d];
    }
    return s;
}

static void axpy_row(const struct kv_cache * kv, const void * rows, int64_t j, float a, float * y) {
    if (kv->type == GGML_TYPE_F16) {
        ckv_axpy_f16_f32(kv->head_dim, a, (const ckv_fp16 *) rows + j * kv->head_dim, y);
        return;
    }
    const float * v = (const float *) rows + j * kv->head_dim;
    for (int32_t d = 0; d < kv->head_dim; d++) {
        y[d] += a * v[d];
    }
}

// softmax(scale * q.K[lo..hi]) . V[lo..hi] for one query head.
static void attend_one(const struct attention_region * r, float * scores, int64_t t, int32_t h) {
    const struct attention_params * p   = r->p;
    int32_t                         kvh = h / (p->n_head / p->n_head_kv);
    int64_t                         hi  = r->pos0 + t;  // inclusive
    int64_t                         lo  = p->window > 0 && hi - p->window + 1 > 0 ? hi - p->window + 1 : 0;
    const float * q    = r->q + (t * p->n_head + h) * p->head_dim;
    float *       out  = r->out + (t * p->n_head + h) * p->head_dim;
    const void *  keys = kv_cache_k(r->kv, p->il, kvh);
    const void *  vals = kv_cache_v(r->kv, p->il, kvh);
    float         max  = -INFINITY;
    for (int64_t j = lo; j <= hi; j++) {
        float s = dot_row(r->kv, keys, j, q) * p->scale;
        scores[j - lo] = s;
        max = s > max ? s : max;
    }
    float sum = 0.0f;
    for (int64_t j = lo; j <= hi; j++) {
        float e = expf(scores[j - lo] - max);
        scores[j - lo] = e;
        sum += e;
    }
    memset(out, 0, (size_t) p->head_dim * sizeof(float));
    for (int64_t j = lo; j <= hi; j++) {
        axpy_row(r->kv, vals, j, scores[j - lo] / sum, out);
    }
}

static void attention_worker(void * arg, int ith, int nth) {
    const struct attention_region * r = arg;
    float * scores = r->c->att_scores + ith * r->c->att_stride;
    int64_t begin, end;
    threadpool_split(r->n_tokens * r->p->n_head, ith, nth, &begin, &end);
    for (int64_t task = begin; task < end; task++) {
        attend_one(r, scores, task / r->p->n_head, (int32_t) (task % r->p->n_head));
    }
}

void ops_attention(struct compute * c, const struct kv_cache * kv, const struct attention_params * p,
                   const float * q, float * out, int64_t n_tokens, int64_t pos0) {
    struct attention_region r = {c, kv, p, q, out, n_tokens, pos0};
    threadpool_run(c->pool, attention_worker, &r);
}
