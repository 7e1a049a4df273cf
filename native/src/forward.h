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

// One sequence's KV cache (a context holds params.n_seq_max of them).
struct ckv_seq {
    struct kv_cache kv;
    int32_t         n_past;     // positions cached (the next token's position)
    int64_t         last_pos;   // position of the last token evaluated; -1 = none
    int32_t         logits_row; // row of ctx->logits after position n_past - 1 (the last decode
                                // call ended on this sequence), else -1 (state.c saves it)
};

// One sequence's KV-policy state (kvpolicy.h): decode steps in compressed layers attend
// through sel[il].
struct seq_policy {
    struct kv_policy      policy;
    struct kv_selection * sel;            // [n_layer] lists of the last decode step
    int32_t *             sel_n;          // [n_layer][n_head] backing sel[il].n
    int32_t *             sel_pos;        // [n_layer][n_head][sel_cap] backing sel[il].pos
    bool *                last_selected;  // [n_layer] the last step read sel[il] (else dense)
};

// Everything the KV policy owns, built and replaced as one (ckv_context_set_kv_policy).
struct policy_set {
    struct ckv_kv_policy_params params;
    bool *              layer_compressed;  // [n_layer] il >= n_dense_layers, not SWA
    float *             att_weights;       // h2o only: [n_head][n_ctx] one step's softmax weights
    struct seq_policy * seqs;              // [n_seq]
    int32_t             threads;           // n_threads when it was set up (clusterkv's scratch)
};

struct ckv_context {
    const struct ckv_model *  model;
    struct ckv_context_params params;     // resolved values (params.kv_policy: see pol.params)
    int32_t                   n_seq;      // params.n_seq_max
    struct ckv_seq *          seqs;       // [n_seq]
    struct policy_set         pol;
    struct compute            comp;
    struct scratch            s;
    float *                   logits;     // [logits_cap][n_vocab]
    int64_t                   logits_cap; // rows allocated
    int32_t                   n_outputs;  // rows valid after the last decode
    float *                   embd;       // [embd_cap][n_embd] params.embeddings only
    int64_t                   embd_cap;   // rows allocated
    int32_t                   n_embd_rows;  // rows valid after the last decode
    struct ckv_timings        timings;
    // GPU (the model has a device copy; one sequence): the device holds the KV cache and
    // activations; seqs[0].kv then only describes the cache's shape, and s / comp hold nothing
    struct cuda_context *     gpu;
};

// A run of rows of one forward pass that belong to one sequence: tokens at positions pos0 ..
// pos0 + n - 1 of sequence seq. A decode step (one token of a one-token decode call, or of a
// batch) uses the sequence's KV policy in compressed layers; any other run attends densely.
struct fwd_group {
    int32_t seq;
    int64_t pos0;
    int64_t n;
    bool    decode_step;
};

// Runs the tokens of the groups (concatenated in group order, at most n_batch rows in all)
// through every layer, appending each group to its sequence's KV cache, and writes logits rows
// for rows [first_output, rows) to logits and, when embd is not NULL, every row's final-normed
// hidden state to embd. The matmuls take all rows at once; RoPE, the cache and attention go
// group by group.
void forward_groups(struct ckv_context * ctx, const ckv_token * tokens, const struct fwd_group * groups,
                    int32_t n_groups, int64_t first_output, float * logits, float * embd);

// context.c's helpers that state.c shares: a clear error for a sequence out of range; room for
// `rows` logits rows; the last decode call's logits rows are replaced or dropped (every
// sequence's logits_row becomes -1).
int32_t context_check_seq(const struct ckv_context * ctx, int32_t seq);
int32_t context_reserve_logits(struct ckv_context * ctx, int64_t rows);
void    context_forget_logits(struct ckv_context * ctx);

#endif  // CKV_FORWARD_H
