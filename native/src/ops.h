// ops.h - the CPU compute blocks of the forward pass (internal): norms, RoPE, activations,
// quantised matmuls and causal attention over the KV cache. Every op works on a chunk of
// n_tokens rows; matmuls and attention run on the context's thread pool.
#ifndef CKV_OPS_H
#define CKV_OPS_H

#include <stdint.h>

#include "kv.h"
#include "model.h"
#include "threadpool.h"

// Scratch shared by the ops of one context (allocated once in ckv_context_init).
struct compute {
    struct threadpool * pool;
    int64_t             max_tokens;   // rows the scratch holds (n_batch)
    uint8_t *           act_q[2];     // [max_tokens][max row bytes] activations quantised
    uint32_t            act_q_type[2];// vec_dot type held in act_q[i] (GGML_TYPE_COUNT_MAX = none)
    size_t              act_q_row;    // bytes per row in act_q
    float *             att_scores;   // [n_threads][att_stride] attention scratch per thread
    int64_t             att_stride;   // = ops_attention_thread_floats(head_dim, n_ctx)
    float *             att_partials; // [ops_attention_partial_floats] decode split-K states
    bool                f32_activations; // matmuls on dequantised weight rows and f32 inputs
    float *             w_rows;       // [n_threads][w_rows_stride] dequantised rows (if so)
    int64_t             w_rows_stride;
};

// y[t][i] = x[t][i] / rms(x[t]) * w[i]; y may alias x.
void ops_rmsnorm(float * y, const float * x, const float * w, int64_t n_tokens, int64_t n, float eps);

// One matrix of a batched matmul: y[t][r] = dot(W row r, x[t]) (+ bias[r]), y row stride ldy.
struct matmul_job {
    const struct weight * w;
    float *               y;
    int64_t               ldy;
    const float *         bias;   // NULL = none
};

// Runs every job over the same input x [n_tokens][n_in] in one parallel region. All jobs must
// take n_in inputs. The input is quantised once per activation type the weights need (or, with
// c->f32_activations, kept in f32 while each thread dequantises blocks of weight rows).
// Floats of w_rows one thread needs for f32_activations matmuls of up to max_in inputs.
int64_t ops_matmul_thread_floats(int64_t max_in);

void ops_matmul(struct compute * c, const struct matmul_job * jobs, int n_jobs, const float * x,
                int64_t n_tokens);

// Rotates n_heads heads of x [n_tokens][n_heads * head_dim] in place for positions pos0 + t.
struct rope_params {
    int32_t        n_rot;
    int32_t        head_dim;
    float          base;
    float          freq_scale;
    const float *  freq_factors;   // NULL or [n_rot/2] divisors
    enum rope_mode mode;
};
void ops_rope(const struct rope_params * p, float * x, int64_t n_tokens, int32_t n_heads, int64_t pos0);

void ops_silu_mul(float * gate, const float * up, int64_t n);   // gate = silu(gate) * up
void ops_gelu_mul(float * gate, const float * up, int64_t n);   // gate = gelu_tanh(gate) * up
void ops_add(float * y, const float * x, int64_t n);            // y += x
void ops_scale(float * y, float s, int64_t n);                  // y *= s

// --- attention ---
// Causal attention of q [n_tokens][n_head * head_dim] (positions pos0 + t) over layer il of
// the KV cache, which already holds positions [0, pos0 + n_tokens). window > 0 limits each query
// to the last `window` positions (itself included). out has q's shape. f32 accumulation; one
// token (a decode step) is split over positions, a chunk over (KV head, block of tokens).
struct attention_params {
    int32_t il;
    int32_t n_head;
    int32_t n_head_kv;
    int32_t head_dim;
    int32_t window;
    float   scale;
};
void ops_attention(struct compute * c, const struct kv_cache * kv, const struct attention_params * p,
                   const float * q, float * out, int64_t n_tokens, int64_t pos0);

// Decode attention of one token q [n_head][head_dim] at position pos, where query head h
// attends only to the list_n[h] positions list_pos[h * list_stride ..] (ascending, distinct,
// <= pos), read in place from the cache. weights: NULL, or [n_head][list_stride] receiving each
// listed position's softmax weight. With every position listed, out is bit-identical to
// ops_attention's.
void ops_attention_selected(struct compute * c, const struct kv_cache * kv,
                            const struct attention_params * p, const float * q, float * out,
                            int64_t pos, const int32_t * list_n, const int32_t * list_pos,
                            int64_t list_stride, float * weights);

// sums[h][j] += the softmax weight query head h of token t gives position j, summed over the
// chunk's tokens (positions pos0 + t, causal, windowed); sums is [n_head][stride].
void ops_attention_weight_sums(struct compute * c, const struct kv_cache * kv,
                               const struct attention_params * p, const float * q, int64_t n_tokens,
                               int64_t pos0, float * sums, int64_t stride);

// Query heads per KV head the attention tasks hold at once (context creation checks models).
enum { OPS_ATTENTION_MAX_GROUP = 32 };

// Scratch sizes in floats: per thread (compute.att_stride) and the shared split-K partials.
int64_t ops_attention_thread_floats(int32_t head_dim, int64_t n_ctx);
int64_t ops_attention_partial_floats(int32_t n_head, int32_t head_dim);

#endif  // CKV_OPS_H
