// forward.h - the context (KV cache + scratch) and the forward pass over a chunk (internal).
#ifndef CKV_FORWARD_H
#define CKV_FORWARD_H

#include "kv.h"
#include "model.h"
#include "ops.h"

// Activations for up to n_batch tokens; allocated once per context.
struct scratch {
    float * x;    // [n_batch][n_embd] residual stream
    float * xb;   // [n_batch][n_embd] normed input of a block
    float * xb2;  // [n_batch][n_embd] block output
    float * q;    // [n_batch][n_head * head_dim]
    float * k;    // [n_batch][n_head_kv * head_dim]
    float * v;    // [n_batch][n_head_kv * head_dim]
    float * att;  // [n_batch][n_head * head_dim] attention output
    float * hb;   // [n_batch][n_ff] gate
    float * hb2;  // [n_batch][n_ff] up
};

struct ckv_context {
    const struct ckv_model *  model;
    struct ckv_context_params params;    // resolved values
    struct kv_cache           kv;
    struct compute            comp;
    struct scratch            s;
    int32_t                   n_past;
    float *                   logits;     // [logits_cap][n_vocab]
    int64_t                   logits_cap; // rows allocated
    int32_t                   n_outputs;  // rows valid after the last decode
    struct ckv_timings        timings;
};

// Runs tokens [0, n) at positions pos0 .. through every layer, appending to the KV cache, and
// writes logits rows for tokens [first_output, n) to logits (n - first_output rows).
void forward_chunk(struct ckv_context * ctx, const ckv_token * tokens, int64_t n, int64_t pos0,
                   int64_t first_output, float * logits);

#endif  // CKV_FORWARD_H
