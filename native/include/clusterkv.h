// clusterkv.h - the one public header of the clusterkv_local runtime.
//
// Data flow: a GGUF file is loaded into a ckv_model (weights mmapped, tokenizer, metadata);
// a ckv_context holds the KV caches of n_seq_max sequences (one by default) and scratch buffers
// and turns tokens into logits with ckv_decode (ckv_decode_batch: one step of several
// sequences at once); a ckv_sampler picks the next token from a row of logits.
//
// Conventions
//   - Every fallible call returns int32_t from enum ckv_status (CKV_OK = 0, errors < 0);
//     ckv_last_error() then holds a thread-local message naming the problem.
//   - Objects come back through out-pointers; every *_free accepts NULL.
//   - Params structs are filled by *_default_params(out) and passed by const pointer.
//   - Buffer-filling calls take (buf, cap, &n_needed): when cap is too small they return
//     CKV_ERR_BUFFER_TOO_SMALL and set n_needed, so the caller can retry once.
//   - The library never prints, exits or aborts on bad input.
//   - Threads: a model may be shared by several contexts; one context is used by one thread
//     at a time.
#ifndef CLUSTERKV_H
#define CLUSTERKV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(CKV_BUILD)
#    define CKV_API __declspec(dllexport)
#elif defined(__GNUC__) && defined(CKV_BUILD)
#    define CKV_API __attribute__((visibility("default")))
#else
#    define CKV_API
#endif

// Bumped whenever a public struct's layout or a function's signature changes: a binding built
// for one version must not drive a library of another (ckv_api_version says which it is).
#define CKV_API_VERSION 5

// ---------------------------------------------------------------------------------------------
// Status codes and errors
// ---------------------------------------------------------------------------------------------

enum ckv_status {
    CKV_OK                   =  0,
    CKV_ERR_INVALID_ARG      = -1,  // a parameter is out of range or NULL
    CKV_ERR_FORMAT           = -2,  // the file is malformed (truncated, bad magic, out of bounds)
    CKV_ERR_UNSUPPORTED      = -3,  // valid input this build cannot handle (arch, quant type)
    CKV_ERR_OOM              = -4,  // an allocation failed
    CKV_ERR_CTX_FULL         = -5,  // the tokens do not fit in the context window
    CKV_ERR_IO               = -6,  // the file could not be opened, mapped or read
    CKV_ERR_CUDA             = -7,  // a CUDA call failed
    CKV_ERR_NOT_FOUND        = -8,  // a named key or tensor does not exist
    CKV_ERR_BUFFER_TOO_SMALL = -9,  // see n_needed
};

// The message of the last failed call on this thread ("" if none). Valid until the next call.
CKV_API const char * ckv_last_error(void);

// A short constant name for a status code, e.g. "CKV_ERR_FORMAT".
CKV_API const char * ckv_status_name(int32_t status);

// Library version string, e.g. "0.1.0".
CKV_API const char * ckv_version(void);

// CKV_API_VERSION of the header this library was built from.
CKV_API int32_t ckv_api_version(void);

// What this build and this machine can do, e.g.
// "CPU: AVX2=1 FMA=1 F16C=1 AVX512=0 AVX512_VNNI=0 | CUDA: not built"; the CUDA part is
// "not built", "no device" or device 0 as "NVIDIA H200, 139.8 GiB, sm_90".
CKV_API const char * ckv_system_info(void);

enum ckv_log_level {
    CKV_LOG_DEBUG = 0,
    CKV_LOG_INFO  = 1,
    CKV_LOG_WARN  = 2,
    CKV_LOG_ERROR = 3,
};

// Log lines go to this callback (none by default: the library is silent). NULL removes it.
// The callback is process-wide; it may be called from any thread.
typedef void (*ckv_log_callback)(int32_t level, const char * text, void * user_data);
CKV_API void ckv_log_set(ckv_log_callback callback, void * user_data);

typedef int32_t ckv_token;

typedef struct ckv_model   ckv_model;
typedef struct ckv_context ckv_context;
typedef struct ckv_sampler ckv_sampler;
typedef struct ckv_grammar ckv_grammar;

// ---------------------------------------------------------------------------------------------
// Model: load, metadata, tensors
// ---------------------------------------------------------------------------------------------

struct ckv_model_params {
    int32_t n_gpu_layers;  // layers to put on the GPU: 0 = CPU only (default); -1 or >= n_layer
                           // = the whole model, and its contexts then run on the GPU (CUDA
                           // builds). 0 < n < n_layer is CKV_ERR_UNSUPPORTED (no partial
                           // offload); no usable device is CKV_ERR_CUDA; a build without CUDA
                           // is CKV_ERR_UNSUPPORTED. Ignored with vocab_only / metadata_only.
    bool    use_mmap;      // map the file instead of reading it into memory (default true)
    bool    use_mlock;     // lock the weights in RAM so they are never paged out (default
                           // false); best effort: a refusal (ulimit -l) is logged as a warning
    bool    vocab_only;    // load metadata and tokenizer only: no forward pass possible
    bool    metadata_only; // parse metadata and the tensor table only, for any architecture
                           // (inspection tools); no tokenizer, no forward pass
    float   rope_freq_base;   // > 0: RoPE base of the global-attention layers instead of the
                              // file's (NTK-style context extension); 0 = the file's (default)
    float   rope_freq_scale;  // > 0: position scale of those layers instead of the file's
                              // (linear RoPE scaling: 0.5 doubles the usable context); 0 = the
                              // file's (default). Negative or non-finite: CKV_ERR_INVALID_ARG
};

CKV_API void ckv_model_default_params(struct ckv_model_params * out);

// Loads a GGUF file. On success *out owns the model; free it with ckv_model_free.
// Returns CKV_ERR_IO (cannot open), CKV_ERR_FORMAT (malformed file), CKV_ERR_UNSUPPORTED
// (architecture, tokenizer or tensor type not supported, on the GPU too), CKV_ERR_INVALID_ARG,
// CKV_ERR_CUDA (n_gpu_layers != 0 without a usable device, or a failed copy) or CKV_ERR_OOM
// (the weights do not fit in the GPU's free memory).
CKV_API int32_t ckv_model_load(const char * path, const struct ckv_model_params * params,
                               ckv_model ** out);
CKV_API void    ckv_model_free(ckv_model * model);

struct ckv_model_info {
    const char * arch;        // "llama", "qwen2", "gemma3"; owned by the model
    const char * name;        // general.name or ""; owned by the model
    int32_t      n_vocab;
    int32_t      n_ctx_train; // trained context length
    int32_t      n_embd;
    int32_t      n_layer;
    int32_t      n_head;
    int32_t      n_head_kv;
    int32_t      head_dim;
    int32_t      n_ff;
    uint64_t     n_params;    // number of weights in all tensors
    uint64_t     size;        // bytes of tensor data
};

CKV_API void ckv_model_get_info(const ckv_model * model, struct ckv_model_info * out);

// Metadata (GGUF key/value pairs). Values are rendered as text: numbers in decimal,
// strings as they are, arrays as "[N x type]" unless short (<= 16 numbers).
CKV_API int32_t ckv_model_meta_count(const ckv_model * model);
CKV_API int32_t ckv_model_meta_key(const ckv_model * model, int32_t i, char * buf, size_t cap,
                                   size_t * n_needed);
CKV_API int32_t ckv_model_meta_value(const ckv_model * model, const char * key, char * buf,
                                     size_t cap, size_t * n_needed);

struct ckv_tensor_info {
    const char * name;       // owned by the model
    int32_t      type;       // ggml type id (0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 8 Q8_0, 12 Q4_K, ...)
    const char * type_name;  // "q4_K"; static
    int32_t      n_dims;
    int64_t      ne[4];      // ne[0] is the row length; unused dims are 1
    uint64_t     offset;     // byte offset in the file
    uint64_t     size;       // bytes
};

CKV_API int32_t ckv_model_n_tensors(const ckv_model * model);
CKV_API int32_t ckv_model_tensor_info(const ckv_model * model, int32_t i,
                                      struct ckv_tensor_info * out);

// Dequantises a whole tensor into out (n_out floats, must be >= the tensor's element count),
// in GGUF order (ne[0] fastest). Works for every supported type; used by tests and tools.
CKV_API int32_t ckv_model_tensor_dequantize(const ckv_model * model, const char * name,
                                            float * out, int64_t n_out);

// ---------------------------------------------------------------------------------------------
// Vocabulary and tokenizer
// ---------------------------------------------------------------------------------------------

enum ckv_token_attr {
    CKV_TOKEN_NORMAL       = 1,
    CKV_TOKEN_UNKNOWN      = 2,
    CKV_TOKEN_CONTROL      = 3,
    CKV_TOKEN_USER_DEFINED = 4,
    CKV_TOKEN_UNUSED       = 5,
    CKV_TOKEN_BYTE         = 6,
};

CKV_API int32_t   ckv_vocab_n_tokens(const ckv_model * model);
CKV_API ckv_token ckv_token_bos(const ckv_model * model);  // -1 if none
CKV_API ckv_token ckv_token_eos(const ckv_model * model);  // -1 if none
CKV_API bool      ckv_vocab_add_bos(const ckv_model * model);
// True for every end-of-generation token (eos, eot, eom, <|im_end|>, <end_of_turn>, ...).
CKV_API bool      ckv_token_is_eog(const ckv_model * model, ckv_token token);
CKV_API int32_t   ckv_token_attr(const ckv_model * model, ckv_token token);  // enum ckv_token_attr
// The raw vocabulary string of a token (GGUF form, e.g. "Ġthe" or "▁the"); NULL if out of range.
CKV_API const char * ckv_token_text(const ckv_model * model, ckv_token token);

// Text (UTF-8, text_len bytes, need not be NUL-terminated) to token ids, as llama.cpp does.
// add_special: prepend BOS (and append EOS) where the model asks for it.
// parse_special: recognise control/user-defined token texts such as "<|im_start|>".
// Writes at most cap ids; *n_needed = ids the full result has (also on success).
CKV_API int32_t ckv_tokenize(const ckv_model * model, const char * text, int32_t text_len,
                             ckv_token * tokens, int32_t cap, bool add_special,
                             bool parse_special, int32_t * n_needed);

// Bytes of one token (special tokens render only when special is true). Not NUL-terminated.
CKV_API int32_t ckv_token_to_piece(const ckv_model * model, ckv_token token, char * buf,
                                   int32_t cap, bool special, int32_t * n_needed);

// Bytes of a token sequence; like concatenating pieces, plus the tokenizer's rules for the
// first token (e.g. SentencePiece's leading space when the model adds a space prefix).
CKV_API int32_t ckv_detokenize(const ckv_model * model, const ckv_token * tokens,
                               int32_t n_tokens, char * buf, int32_t cap, bool special,
                               int32_t * n_needed);

// ---------------------------------------------------------------------------------------------
// Context: KV cache and evaluation
// ---------------------------------------------------------------------------------------------

enum ckv_kv_type {
    CKV_KV_F32 = 0,  // ggml type ids
    CKV_KV_F16 = 1,
};

// KV policies decide which cached positions each query head attends to at a decode step.
// Prefill chunks (ckv_decode with more than one token) always attend densely (causal); a
// single-token ckv_decode is a decode step and uses the policy in every compressed layer:
// layers >= n_dense_layers that are not sliding-window layers (Gemma-3's local layers stay
// windowed). Positions are never dropped from the cache: a policy only chooses what to read,
// except h2o, whose evicted positions are never attended again.
enum ckv_kv_policy {
    CKV_KV_POLICY_FULL      = 0,  // every cached position (exact attention)
    CKV_KV_POLICY_STREAMING = 1,  // StreamingLLM: the n_sink first positions + the most recent
    CKV_KV_POLICY_QUEST     = 2,  // Quest: pages of page_size keys ranked by a min/max bound
    CKV_KV_POLICY_H2O       = 3,  // H2O: heavy hitters by accumulated attention + recent; evicts
    CKV_KV_POLICY_CLUSTERKV = 4,  // ClusterKV: cosine k-means clusters of keys ranked by q.centroid
};

// How clusterkv picks a span's k initial centroids among its n keys (kv_policy_params.kmeans_init).
enum ckv_kmeans_init {
    CKV_KMEANS_INIT_RANDOM  = 0,  // k distinct keys drawn with the seed (kv_policy_params.seed)
    CKV_KMEANS_INIT_STRIDED = 1,  // keys (2i + 1) n / 2k, i < k: evenly spaced over the span,
                                  // which is in position order (no seed)
};

struct ckv_kv_policy_params {
    int32_t  policy;              // enum ckv_kv_policy; default CKV_KV_POLICY_FULL
    int32_t  budget;              // max positions one query head attends to per step in a
                                  // compressed layer, sinks and recent positions included
                                  // (clusterkv: sinks + selected clusters; its unclustered
                                  // recent tail, < recluster_interval positions, comes on top,
                                  // as in the paper); default 1024
    int32_t  n_sink;              // first positions always attended, never clustered; default 16
    int32_t  n_dense_layers;      // first layers kept dense; default 2
    int32_t  page_size;           // quest: positions per page; default 16
    int32_t  recluster_interval;  // clusterkv: the unclustered recent positions (always attended)
                                  // are clustered once there are this many; default 320
    int32_t  tokens_per_cluster;  // clusterkv: a span of n positions gets ceil(n / this)
                                  // clusters (L/80 at prefill, 4 per 320 decoded); default 80
    int32_t  kmeans_iters;        // clusterkv: max k-means iterations (stops early once no
                                  // assignment changes); default 8 (the paper runs 20:
                                  // measured no better, at 2.5x the clustering time)
    uint32_t seed;                // clusterkv: seeds the k-means initialisation; default 0
    int32_t  select_per_kv_head;  // clusterkv: 1 = one selection per KV head, shared by its query
                                  // heads (clusters ranked by the group's summed scores);
                                  // default 0 = one selection per query head
    float    recent_ratio;        // h2o: share of the budget kept for the most recent positions;
                                  // default 0.5
    int32_t  kmeans_init;         // clusterkv: a span's initial centroids (enum ckv_kmeans_init);
                                  // default CKV_KMEANS_INIT_RANDOM
};

struct ckv_context_params {
    uint32_t n_ctx;       // tokens the KV cache holds; 0 = the model's trained length
    uint32_t n_batch;     // max tokens evaluated as one matrix during prefill; 0 = 512
    int32_t  n_threads;   // worker threads; 0 = number of physical cores (at least 1)
    int32_t  kv_type;     // enum ckv_kv_type; default CKV_KV_F16
    struct ckv_kv_policy_params kv_policy;  // default: full
    int32_t  f32_activations;  // 1: matmuls multiply f32 activations by dequantised weights
                               // instead of quantising activations to 8 bits as llama.cpp does.
                               // Slower, but free of the 8-bit rounding that turns any tiny
                               // change (KV precision, a KV policy) into noise in the logits:
                               // a low-noise reference for fidelity measurements. CPU only.
    uint32_t n_seq_max;   // independent sequences the context holds, each with its own KV cache
                          // (n_ctx positions) and KV-policy state; 0 = 1 (default), at most 256.
                          // ckv_decode and the calls without _seq use sequence 0. On the GPU
                          // ckv_decode_batch reads the weights once per step for all rows (chunk
                          // matmuls, no CUDA graph), so its rows differ from one-token decodes by
                          // rounding; kv_offload holds one sequence.
    int32_t  kv_offload;  // 1: a GPU context keeps the K/V of the layers its clusterkv policy
                          // compresses in pinned host memory, and on the GPU only a cache of
                          // the rows recent decode steps selected (budget + recent tail per
                          // query head), copying just the rows a step adds. GPU KV memory is
                          // then bounded by the budget (plus the dense layers and one layer's
                          // staging for prefill), so the context length is bounded by host RAM.
                          // Needs n_gpu_layers -1 and kv_policy clusterkv, whose n_dense_layers
                          // then stays fixed. Default 0.
    int32_t  embeddings;  // 1: every decode call also keeps, for each token it evaluates, the
                          // hidden state after the final norm (the output head's input, llama.cpp's
                          // result_norm): ckv_get_embeddings. On the GPU, ckv_decode_batch
                          // then fails (CKV_ERR_UNSUPPORTED). Default 0.
};

CKV_API void ckv_context_default_params(struct ckv_context_params * out);

// Creates a context for n_seq_max sequences (default 1). Allocates the KV caches and every
// scratch buffer now, so decoding allocates nothing. Fails with CKV_ERR_INVALID_ARG or
// CKV_ERR_OOM.
CKV_API int32_t ckv_context_init(const ckv_model * model, const struct ckv_context_params * params,
                                 ckv_context ** out);
CKV_API void    ckv_context_free(ckv_context * ctx);

// The values in force (a request may be adjusted, e.g. n_ctx = 0).
CKV_API uint32_t ckv_context_n_ctx(const ckv_context * ctx);
CKV_API uint32_t ckv_context_n_batch(const ckv_context * ctx);
CKV_API int32_t  ckv_context_n_threads(const ckv_context * ctx);
CKV_API int32_t  ckv_context_set_n_threads(ckv_context * ctx, int32_t n_threads);

CKV_API int32_t  ckv_context_n_seq_max(const ckv_context * ctx);

// Tokens currently in the KV cache of sequence 0 / of sequence seq (-1 and an error for a
// sequence out of range); the next token gets this position.
CKV_API int32_t ckv_context_n_past(const ckv_context * ctx);
CKV_API int32_t ckv_context_n_past_seq(const ckv_context * ctx, int32_t seq);

// Drops cached positions >= n_keep (0 clears everything) of sequence 0 / of sequence seq.
// n_keep > n_past is an error.
CKV_API int32_t ckv_context_truncate(ckv_context * ctx, int32_t n_keep);
CKV_API int32_t ckv_context_truncate_seq(ckv_context * ctx, int32_t seq, int32_t n_keep);

// Evaluates n_tokens tokens at positions n_past .. n_past + n_tokens - 1, in chunks of n_batch,
// and appends them to the KV cache. Logits are kept for every token when all_logits is true,
// otherwise for the last token only.
//   CKV_ERR_CTX_FULL    - n_past + n_tokens > n_ctx; nothing was evaluated
//   CKV_ERR_INVALID_ARG - a token id is out of range, or n_tokens <= 0; nothing was evaluated
CKV_API int32_t ckv_decode(ckv_context * ctx, const ckv_token * tokens, int32_t n_tokens,
                           bool all_logits);
// The same for sequence seq (ckv_decode is sequence 0). CKV_ERR_INVALID_ARG for a sequence out
// of range.
CKV_API int32_t ckv_decode_seq(ckv_context * ctx, int32_t seq, const ckv_token * tokens,
                               int32_t n_tokens, bool all_logits);
// One decode step of n distinct sequences together: tokens[i] is appended to sequence seqs[i]
// and logits row i is its next-token distribution (ckv_get_logits(ctx, i)). The weights are
// read once for all n rows, so n sequences cost little more than one on a memory-bound
// machine; each row attends to its own sequence under its own KV policy, exactly as a
// one-token ckv_decode_seq would (a decode step). Nothing is evaluated on an error:
//   CKV_ERR_INVALID_ARG - n < 1 or n > n_batch, a sequence out of range or listed twice, a token
//                         out of range
//   CKV_ERR_CTX_FULL    - a sequence is full
CKV_API int32_t ckv_decode_batch(ckv_context * ctx, const ckv_token * tokens, const int32_t * seqs,
                                 int32_t n);

// Rows of logits from the last ckv_decode: ckv_get_n_outputs rows of n_vocab floats, row i
// belonging to the i-th kept token. i = -1 is the last row. NULL when out of range. The
// pointer is valid until the next ckv_decode or ckv_context_free.
CKV_API int32_t       ckv_get_n_outputs(const ckv_context * ctx);
CKV_API const float * ckv_get_logits(const ckv_context * ctx, int32_t i);

// Rows of embeddings from the last decode call of a context made with params.embeddings = 1:
// ckv_get_n_embeddings rows of n_embd floats, row i the final-normed hidden state of the i-th
// token that call evaluated (ckv_decode_batch: of row i). i = -1 is the last row. NULL when out
// of range (0 rows without params.embeddings). Valid until the next decode or ckv_context_free.
CKV_API int32_t       ckv_get_n_embeddings(const ckv_context * ctx);
CKV_API const float * ckv_get_embeddings(const ckv_context * ctx, int32_t i);

// --- Saving and restoring a sequence (llama.cpp's llama_state_seq_get_data / set_data) ---
//
// A state is one sequence's cached positions: the K and V rows of every layer (in the cache's
// type: f16, or f32 for a CPU context made with CKV_KV_F32) and, when the last decode call
// ended on this sequence, its last logits row. It is a plain byte buffer (host byte order,
// little-endian on every supported platform) that also names the model by a fingerprint
// (shapes plus a hash of some weights), so it loads only into a context of the same model.
//
// Loading a state into a context of that model - CPU or GPU, any n_ctx that holds it, any KV
// type (rows converted; bit-exact when the types match), any KV policy but h2o - replaces the
// sequence's cache and makes it as if its positions had just been prefilled: the KV policy's
// bookkeeping is rebuilt from the rows (as ckv_context_set_kv_policy does), and its logits row,
// if the state has one, becomes ckv_get_logits(ctx, 0) (n_outputs 1; the other sequences'
// logits rows of the last decode are gone, as after a decode). So decoding from a loaded state
// gives the same logits as decoding after the prefill that made it.

// Bytes ckv_context_state_save writes for sequence seq now.
CKV_API int32_t ckv_context_state_size(const ckv_context * ctx, int32_t seq, uint64_t * size);

// Writes the state of sequence seq to dst (cap bytes); *written gets its size.
//   CKV_ERR_BUFFER_TOO_SMALL - cap is less than the state's size (*written says how much)
//   CKV_ERR_INVALID_ARG      - seq out of range, dst NULL
//   CKV_ERR_CUDA             - a copy from the GPU failed
CKV_API int32_t ckv_context_state_save(ckv_context * ctx, int32_t seq, void * dst, uint64_t cap,
                                       uint64_t * written);

// Replaces sequence seq's cache by the state in src (size bytes).
//   CKV_ERR_FORMAT      - src is not a whole state of this format (bad magic, version, size)
//   CKV_ERR_INVALID_ARG - seq out of range, a state of another model, more positions than n_ctx,
//                         or an h2o policy (it scores positions by the prefill's attention
//                         weights, which a state does not hold)
//   CKV_ERR_OOM, CKV_ERR_CUDA
// Nothing changes on the first two; after a failure of the last two the sequence is empty.
CKV_API int32_t ckv_context_state_load(ckv_context * ctx, int32_t seq, const void * src,
                                       uint64_t size);

struct ckv_timings {
    double  t_prefill_ms;   // time in ckv_decode calls with more than one token
    double  t_decode_ms;    // time in ckv_decode calls with one token
    int64_t n_prefill;      // tokens evaluated in those calls
    int64_t n_decode;
};

CKV_API void ckv_context_get_timings(const ckv_context * ctx, struct ckv_timings * out);
CKV_API void ckv_context_reset_timings(ckv_context * ctx);

// What the KV policy did since the context was created or its stats were reset.
struct ckv_kv_stats {
    int64_t n_steps;        // decode steps that used the policy
    int64_t n_attended;     // positions attended, summed over steps, compressed layers, query heads
    int64_t n_cached;       // positions cached at those same (step, layer, head): the dense cost
    double  t_cluster_ms;   // clustering (k-means and index building)
    double  t_select_ms;    // scoring and selection (clusters, pages, heavy hitters)
    int32_t n_clusters;     // clusters held now, summed over layers and KV heads
    int64_t n_fetched;      // kv_offload: K/V rows copied from host memory into the GPU's cache
                            // of selected rows (one row = one position of one KV head)
};

CKV_API void ckv_context_get_kv_stats(const ckv_context * ctx, struct ckv_kv_stats * out);

// Where a context's KV cache lives, in bytes.
struct ckv_kv_memory {
    uint64_t device_kv;       // K/V rows in GPU memory: the cache of the layers kept there, and
                              // under kv_offload one layer's prefill staging and the cache of
                              // selected rows
    uint64_t host_kv;         // K/V rows in host memory: a CPU context's whole cache, or the
                              // offloaded layers' (pinned)
    uint64_t device_policy;   // the KV policy's other GPU state (centroids, cluster indexes,
                              // position lists, the row cache's maps)
};
CKV_API int32_t ckv_context_kv_memory(const ckv_context * ctx, struct ckv_kv_memory * out);
CKV_API void ckv_context_reset_kv_stats(ckv_context * ctx);

// Switches the KV policy of a context that may already hold a prompt (n_past > 0). Because
// prefill is always dense, the result is the same as if the cached positions had been
// evaluated under the new policy: its bookkeeping is rebuilt from the cache (quest's page
// bounds now; clusterkv clusters lazily at the next decode step, as after a prefill). The new
// policy's stats start at zero. Lets one prefill serve several policies (the eval harness).
// params is validated as in ckv_context_init (n_dense_layers, budget, ...).
//   CKV_OK
//   CKV_ERR_INVALID_ARG - bad params, or h2o with n_past > 0 (h2o needs the prefill's attention
//                         weights, which are gone: create the context with h2o instead)
//   CKV_ERR_OOM         - out of memory
//   CKV_ERR_UNSUPPORTED - h2o on a GPU context (the GPU runs full, streaming, quest and
//                         clusterkv)
// On any error the old policy stays in force, unchanged.
CKV_API int32_t ckv_context_set_kv_policy(ckv_context * ctx,
                                          const struct ckv_kv_policy_params * params);

// Clusters held now by (layer il, KV head h): 0 for dense layers and other policies.
// CKV_ERR_INVALID_ARG when il or h is out of range.
CKV_API int32_t ckv_context_kv_n_clusters(const ckv_context * ctx, int32_t il, int32_t h,
                                          int32_t * out);

// The positions query head h of layer il attended to at the last decode step, in the order
// attention read them (buffer-filling convention). For dense layers, steps of the full policy
// and prefill chunks this is every causal position. CKV_ERR_INVALID_ARG when il or h is out of
// range or no step has run yet.
CKV_API int32_t ckv_context_kv_selection(const ckv_context * ctx, int32_t il, int32_t h,
                                         int32_t * buf, int32_t cap, int32_t * n_needed);

// ---------------------------------------------------------------------------------------------
// ClusterKV building blocks, exposed for tests and tools
// ---------------------------------------------------------------------------------------------

// Cosine k-means of n rows x[n][d]: each row goes to the centroid of highest cosine similarity
// (ties: lowest index), each centroid becomes the plain mean of its members (an empty cluster
// keeps its centroid), for at most max_iter iterations, stopping when no assignment changes.
// The initial centroids are the rows init_rows[0..k) (NULL: k distinct rows drawn with seed).
// Writes centroids[k][d], labels[n] and, when n_iter is not NULL, the iterations run.
// CKV_ERR_INVALID_ARG for k < 1, k > n, d < 1, max_iter < 1 or an init row out of range.
CKV_API int32_t ckv_kmeans_cosine(const float * x, int32_t n, int32_t d, int32_t k, int32_t max_iter,
                                  uint32_t seed, const int32_t * init_rows, float * centroids,
                                  int32_t * labels, int32_t * n_iter);

// Budgeted selection: clusters in descending score (ties: lowest index first) are taken whole
// until their sizes reach budget; the last one taken may be cut. Writes the chosen cluster ids
// in that order to chosen (capacity n_clusters) and their count to n_chosen; the positions they
// contribute total min(budget, sum of sizes).
CKV_API int32_t ckv_cluster_select(const float * scores, const int32_t * sizes, int32_t n_clusters,
                                   int32_t budget, int32_t * chosen, int32_t * n_chosen);

// ---------------------------------------------------------------------------------------------
// Sampler
// ---------------------------------------------------------------------------------------------

// The chain is llama.cpp's: penalties -> top_k -> typical -> top_p -> min_p -> temperature ->
// draw; with mirostat: penalties -> temperature -> Mirostat (1 or 2) -> draw. temperature <= 0
// means greedy (arg-max after penalties). ckv_sampler_init returns CKV_ERR_INVALID_ARG for a
// value outside the ranges below.
struct ckv_sampler_params {
    float    temperature;        // <= 0 = greedy; +inf is refused; default 0.8
    int32_t  top_k;              // <= 0 or >= n_vocab = off; default 40
    float    top_p;              // in (0, 1]; 1 = off; default 0.95
    float    min_p;              // in [0, 1]; 0 = off; default 0.05
    float    typical_p;          // in (0, 1]; 1 = off (default): locally typical sampling
    float    repeat_penalty;     // > 0; 1 = off; default 1.0
    float    frequency_penalty;  // finite; 0 = off (default)
    float    presence_penalty;   // finite; 0 = off (default)
    int32_t  penalty_last_n;     // >= 0 tokens of history the penalties look at; 0 = off;
                                 // default 64
    int32_t  mirostat;           // 0 = off (default), 1 = Mirostat, 2 = Mirostat 2.0; replaces
                                 // top_k / typical / top_p / min_p
    float    mirostat_tau;       // target surprise in bits, > 0; default 5
    float    mirostat_eta;       // learning rate, >= 0; default 0.1
    uint64_t seed;               // same seed and inputs -> same tokens
};

CKV_API void    ckv_sampler_default_params(struct ckv_sampler_params * out);
CKV_API int32_t ckv_sampler_init(const ckv_model * model, const struct ckv_sampler_params * params,
                                 ckv_sampler ** out);
CKV_API void    ckv_sampler_free(ckv_sampler * sampler);

// Picks a token from one row of n_vocab logits (not modified). Does not record it: call
// ckv_sampler_accept with the token that is actually used.
CKV_API int32_t ckv_sampler_sample(ckv_sampler * sampler, const float * logits, int32_t n_vocab,
                                   ckv_token * out);
// Adds a token to the penalty history (prompt tokens too, as llama.cpp does). For Mirostat,
// accepting the token the last sample drew also moves its target (mu) by that token's surprise.
CKV_API void    ckv_sampler_accept(ckv_sampler * sampler, ckv_token token);
// Clears the penalty history, resets Mirostat's mu to 2 tau and reseeds the RNG.
CKV_API void    ckv_sampler_reset(ckv_sampler * sampler, uint64_t seed);

// ---------------------------------------------------------------------------------------------
// Grammar-constrained sampling
// ---------------------------------------------------------------------------------------------

// A grammar in llama.cpp's GBNF format (rules `name ::= ...`; "literals", [classes], `.`,
// groups, |, *, +, ?, {m}, {m,}, {m,n}; # comments) and the state of the text generated under
// it. Use: mask a logits row with ckv_grammar_apply (or check one sampled token with
// ckv_grammar_allows), sample, then ckv_grammar_accept_token with the token used.
// End-of-generation tokens are allowed exactly when the text so far is a complete sentence;
// control tokens never are.
//
// ckv_grammar_init compiles gbnf (NUL-terminated) starting at rule root (NULL: "root").
// model may be NULL: the grammar then works on text only (accept_text, is_complete).
// CKV_ERR_INVALID_ARG names the problem, with line and column for a syntax error; undefined
// rules, a missing root and left recursion are refused.
CKV_API int32_t ckv_grammar_init(const ckv_model * model, const char * gbnf, const char * root,
                                 ckv_grammar ** out);
CKV_API void    ckv_grammar_free(ckv_grammar * grammar);
// Back to the start of the text.
CKV_API int32_t ckv_grammar_reset(ckv_grammar * grammar);
// Sets every logit the grammar forbids next to -INFINITY; *n_allowed (may be NULL) counts the
// tokens left. Entries already -INFINITY stay so. CKV_ERR_INVALID_ARG when no token is left.
CKV_API int32_t ckv_grammar_apply(ckv_grammar * grammar, float * logits, int32_t n_vocab,
                                  int32_t * n_allowed);
// *allowed = whether token may come next (the state does not change).
CKV_API int32_t ckv_grammar_allows(ckv_grammar * grammar, ckv_token token, bool * allowed);
// Moves past token; CKV_ERR_INVALID_ARG (state unchanged) if the grammar forbids it.
CKV_API int32_t ckv_grammar_accept_token(ckv_grammar * grammar, ckv_token token);
// Moves past len bytes of text when the grammar allows all of them (*accepted = true);
// otherwise *accepted = false and the state does not change. A text may end inside a UTF-8
// sequence: the rest is expected next.
CKV_API int32_t ckv_grammar_accept_text(ckv_grammar * grammar, const char * text, int32_t len,
                                        bool * accepted);
// True when the text so far is a complete sentence of the grammar.
CKV_API bool    ckv_grammar_is_complete(const ckv_grammar * grammar);

#ifdef __cplusplus
}
#endif

#endif  // CLUSTERKV_H
