// model.h - a loaded model: hyper-parameters, weight tensors bound to the GGUF image, the
// vocabulary (internal). Second stage of the data flow: gguf -> model -> context (forward).
#ifndef CKV_MODEL_H
#define CKV_MODEL_H

#include <stdbool.h>
#include <stdint.h>

#include "clusterkv.h"
#include "gguf.h"
#include "tokenizer.h"

enum model_arch {
    ARCH_LLAMA,   // SmolLM2, Llama 2/3, Mistral
    ARCH_QWEN2,   // Qwen2 / Qwen2.5: llama + q/k/v biases, NEOX RoPE
    ARCH_GEMMA3,  // Gemma 3: embedding scale, q/k norms, post-norms, GELU, sliding window
};

enum rope_mode {
    ROPE_NORM,  // rotate adjacent pairs (x[2i], x[2i+1]): llama GGUFs (Wq/Wk pre-permuted)
    ROPE_NEOX,  // rotate halves (x[i], x[i + n_rot/2])
};

// A weight matrix or vector: points into the GGUF image, never copied.
struct weight {
    const void * data;
    uint32_t     type;    // ggml type id
    int64_t      ne[2];   // ne[0] = row length (inputs), ne[1] = rows (outputs)
    size_t       row_size;
};

struct layer_weights {
    struct weight attn_norm, attn_q, attn_k, attn_v, attn_output;
    struct weight attn_q_bias, attn_k_bias, attn_v_bias;       // qwen2 (data NULL when absent)
    struct weight attn_q_norm, attn_k_norm;                    // gemma3: per-head RMSNorm [head_dim]
    struct weight post_attention_norm, post_ffw_norm;          // gemma3
    struct weight ffn_norm, ffn_gate, ffn_up, ffn_down;
};

struct hparams {
    enum model_arch arch;
    int32_t n_vocab;
    int32_t n_ctx_train;
    int32_t n_embd;
    int32_t n_layer;
    int32_t n_head;
    int32_t n_head_kv;
    int32_t head_dim;      // key/value head size
    int32_t n_ff;
    int32_t n_rot;         // rotated dims per head (<= head_dim)
    float   rms_eps;
    float   rope_base;     // global layers
    float   rope_base_swa; // sliding-window layers (gemma3: 10000)
    float   rope_freq_scale;  // 1 / linear scaling factor
    enum rope_mode rope_mode;
    float   attn_scale;    // multiplies q.k
    float   embd_scale;    // multiplies the token embedding (gemma: sqrt(n_embd)), else 1
    int32_t n_swa;         // sliding window in tokens (0 = none)
    int32_t swa_period;    // layer il is global when (il + 1) % swa_period == 0 (gemma3: 6)
};

struct cuda_model;  // cuda-backend.h

struct ckv_model {
    struct gguf_file *     file;
    struct ckv_vocab *     vocab;       // NULL with metadata_only
    struct hparams         hp;
    bool                   can_forward; // false for vocab_only / metadata_only
    char *                 arch_name;
    char *                 name;
    struct weight          token_embd;  // [n_vocab][n_embd]
    struct weight          output_norm;
    struct weight          output;      // token_embd when tied
    const float *          rope_freqs;  // optional [n_rot/2] frequency divisors (Llama 3.1)
    struct layer_weights * layers;      // [n_layer]
    bool *                 bound;       // [file->n_tensors] while loading: tensors a weight uses
    struct cuda_model *    gpu;         // device copy of every weight (n_gpu_layers != 0), else
                                        // NULL; contexts of the model then run on the GPU
};

// True if layer il uses the sliding window (and its own RoPE base).
static inline bool hparams_is_swa_layer(const struct hparams * hp, int il) {
    return hp->n_swa > 0 && hp->swa_period > 0 && (il + 1) % hp->swa_period != 0;
}

// True if a KV policy compresses layer il: past the first n_dense_layers, and not a
// sliding-window layer (those stay windowed).
static inline bool hparams_is_compressed_layer(const struct hparams * hp, int32_t n_dense_layers, int il) {
    return il >= n_dense_layers && !hparams_is_swa_layer(hp, il);
}

// Loads hyper-parameters and binds weight tensors for the file's architecture.
int32_t model_load_arch(struct ckv_model * model);

#endif  // CKV_MODEL_H
