// forward.h - the context (KV cache + scratch) and the forward pass over a chunk (internal).
#ifndef CKV_FORWARD_H
#define CKV_FORWARD_H

#include "kv.h"
#include "kvpolicy.h"
#include "model.h"
#include "ops.h"

struct cuda_context;  // cuda-backend.h

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
    // KV policy (kvpolicy.h): decode steps in compressed layers attend through sel[il]
    struct kv_policy          policy;
    bool *                    layer_compressed;  // [n_layer] il >= n_dense_layers, not SWA
    struct kv_selection *     sel;          // [n_layer] lists of the last decode step
    int32_t *                 sel_n;        // [n_layer][n_head] backing sel[il].n
    int32_t *                 sel_pos;      // [n_layer][n_head][sel_cap] backing sel[il].pos
    float *                   att_weights;  // h2o only: [n_head][n_ctx] softmax weights
    bool *                    last_selected;// [n_layer] the last step read sel[il] (else dense)
    int64_t                   last_pos;     // position of the last token evaluated; -1 = none
    int32_t                   policy_threads;  // n_threads when the policy was set up
    // GPU (the model has a device copy): the device holds the KV cache and activations; kv
    // then only describes the cache's shape, and s / comp hold nothing
    struct cuda_context *     gpu;
};

// Runs tokens [0, n) at positions pos0 .. through every layer, appending to the KV cache, and
// writes logits rows for tokens [first_output, n) to logits (n - first_output rows). A decode
// step (one token from a one-token ckv_decode) uses the KV policy in compressed layers; any
// other chunk attends densely.
void forward_chunk(struct ckv_context * ctx, const ckv_token * tokens, int64_t n, int64_t pos0,
                   int64_t first_output, bool decode_step, float * logits);

#endif  // CKV_FORWARD_H
