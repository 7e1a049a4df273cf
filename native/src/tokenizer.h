// tokenizer.h - vocabulary and tokenizers built from GGUF metadata (internal): byte-level BPE
// (gpt2 model; pre-tokenizers smollm, gpt2, llama3/llama-bpe, qwen2) and SentencePiece (llama
// model, e.g. Gemma). Produces the same ids as llama.cpp.
#ifndef CKV_TOKENIZER_H
#define CKV_TOKENIZER_H

#include "clusterkv.h"
#include "gguf.h"

struct ckv_vocab;

// Builds the vocabulary from the tokenizer.ggml.* keys of f. The vocab keeps its own copies of
// everything it needs, so f may be closed afterwards. CKV_ERR_UNSUPPORTED names an unknown
// tokenizer model or pre-tokenizer; CKV_ERR_FORMAT a malformed token list.
int32_t vocab_load(const struct gguf_file * f, struct ckv_vocab ** out);
void    vocab_free(struct ckv_vocab * vocab);

int32_t      vocab_n_tokens(const struct ckv_vocab * vocab);
ckv_token    vocab_bos(const struct ckv_vocab * vocab);
ckv_token    vocab_eos(const struct ckv_vocab * vocab);
bool         vocab_add_bos(const struct ckv_vocab * vocab);
bool         vocab_is_eog(const struct ckv_vocab * vocab, ckv_token token);
int32_t      vocab_token_attr(const struct ckv_vocab * vocab, ckv_token token);
const char * vocab_token_text(const struct ckv_vocab * vocab, ckv_token token);

// Semantics as ckv_tokenize / ckv_token_to_piece / ckv_detokenize in clusterkv.h.
int32_t vocab_tokenize(const struct ckv_vocab * vocab, const char * text, int32_t text_len,
                       ckv_token * tokens, int32_t cap, bool add_special, bool parse_special,
                       int32_t * n_needed);
int32_t vocab_token_to_piece(const struct ckv_vocab * vocab, ckv_token token, char * buf,
                             int32_t cap, bool special, int32_t * n_needed);
int32_t vocab_detokenize(const struct ckv_vocab * vocab, const ckv_token * tokens,
                         int32_t n_tokens, char * buf, int32_t cap, bool special,
                         int32_t * n_needed);

#endif  // CKV_TOKENIZER_H
