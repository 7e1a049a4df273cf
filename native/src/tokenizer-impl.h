// tokenizer-impl.h - what tokenizer.c (vocabulary, special tokens, pieces), tokenizer-bpe.c
// (byte-level BPE and its pre-splitters) and tokenizer-spm.c (SentencePiece) share (private).
// Behaviour follows llama.cpp's src/llama-vocab.cpp and src/unicode.cpp (sdist 0.3.36,
// llama.cpp 0c1e570) so that the same text gives the same ids.
#ifndef CKV_TOKENIZER_IMPL_H
#define CKV_TOKENIZER_IMPL_H

#include <stddef.h>
#include <stdint.h>

#include "tokenizer.h"

enum vocab_type {
    VOCAB_SPM,  // tokenizer.ggml.model = llama
    VOCAB_BPE,  // tokenizer.ggml.model = gpt2
};

// The pre-tokenizer (tokenizer.ggml.pre) decides how BPE text is cut into words.
enum pre_split {
    PRE_DEFAULT,  // punctuation runs, GPT-2 regex, number runs, ASCII digit triples
    PRE_GPT2,     // GPT-2 regex
    PRE_SMOLLM,   // every \p{N} alone, then the GPT-2 regex
    PRE_LLAMA3,   // llama3 regex: case-insensitive contractions, digit runs of 1..3
    PRE_QWEN2,    // the llama3 regex with single digits
};

// Token attribute bits, as llama.cpp's llama_token_attr (an UNDEFINED token has none).
enum {
    ATTR_UNKNOWN      = 1 << 0,
    ATTR_UNUSED       = 1 << 1,
    ATTR_NORMAL       = 1 << 2,
    ATTR_CONTROL      = 1 << 3,
    ATTR_USER_DEFINED = 1 << 4,
    ATTR_BYTE         = 1 << 5,
    ATTR_LSTRIP       = 1 << 7,
    ATTR_RSTRIP       = 1 << 8,
};

struct vocab_token {
    uint32_t text_off;  // into ckv_vocab.text (NUL-terminated there)
    uint32_t text_len;
    float    score;     // SentencePiece score; 0 for BPE
    uint32_t attr;      // ATTR_* bits
};

// Open-addressing hash set of ids; the key of id i is found through a callback-free accessor
// in the .c files (token text, or merge string).
struct id_table {
    int32_t * slots;  // [mask + 1] id or -1
    uint32_t  mask;
};

struct merge {
    uint32_t off;       // into ckv_vocab.merge_text: "left right"
    uint32_t left_len;  // bytes of "left"
    uint32_t len;       // bytes of the whole string
};

struct trie_node {
    int32_t first_child;
    int32_t next_sibling;
    int32_t terminal;  // 1 when a special token's text ends here
    uint8_t byte;
};

struct ckv_vocab {
    enum vocab_type type;
    enum pre_split  pre;

    int32_t              n_tokens;
    struct vocab_token * tokens;      // [n_tokens]
    char *               text;        // all token texts, each NUL-terminated
    struct id_table      token_ids;   // text -> id (the last of equal texts wins, as llama.cpp)

    int32_t         n_merges;
    struct merge *  merges;           // [n_merges], rank = index
    char *          merge_text;
    struct id_table merge_ids;        // (left, right) -> rank (the first of equal pairs wins)

    // special ids, -1 = none
    ckv_token bos, eos, eot, eom, unk, sep, pad, mask;
    ckv_token fim_pre, fim_suf, fim_mid, fim_pad, fim_rep, fim_sep;

    bool add_space_prefix;
    bool add_bos;
    bool add_eos;
    bool ignore_merges;  // BPE: a word that is itself a token is not merged
    bool clean_spaces;   // detokenize: drop spaces before punctuation / contractions

    ckv_token * eog;            // [n_eog] sorted end-of-generation ids
    int32_t     n_eog;

    ckv_token *        specials;   // [n_specials] control/user-defined/unknown, longest first
    int32_t            n_specials;
    int32_t *          special_node;  // [n_specials] trie node where each text ends
    struct trie_node * trie;          // [n_trie] over special texts; node 0 is the root
    int32_t            n_trie;

    char    byte_utf8[256][2];      // GPT-2 alphabet: byte -> UTF-8 of its stand-in code point
    uint8_t byte_utf8_len[256];
    int16_t cpt_byte[0x144];        // code point (< 0x144) -> byte, -1 if not in the alphabet
    ckv_token spm_byte_token[256];  // SPM byte fallback: byte -> <0xNN> token (or -1)
};

// Growable array of ids (the tokenizer's output).
struct tok_buf {
    ckv_token * ids;
    size_t      n;
    size_t      cap;
};

int32_t tok_buf_push(struct tok_buf * b, ckv_token id);

// Id of the token whose text is exactly s[0..n), or -1.
ckv_token vocab_find(const struct ckv_vocab * v, const char * s, size_t n);

// Rank of merging a[0..na) with b[0..nb), or -1.
int32_t vocab_merge_rank(const struct ckv_vocab * v, const char * a, size_t na, const char * b,
                         size_t nb);

// Tokenizes one piece of raw text that holds no special token (tokenizer-bpe.c / -spm.c) and
// appends the ids. SPM: space_prefix puts a space in front first (add_space_prefix models).
int32_t bpe_tokenize(const struct ckv_vocab * v, const char * text, size_t n, struct tok_buf * out);
int32_t spm_tokenize(const struct ckv_vocab * v, const char * text, size_t n, bool space_prefix,
                     struct tok_buf * out);

// Bigram queue shared by both merge loops: the best (highest score; then the leftmost) first.
struct bigram {
    float    score;  // SPM: token score; BPE: -rank
    int32_t  left;   // symbol indices
    int32_t  right;
    uint32_t size;   // bytes of left + right when queued; a stale entry no longer matches
};

struct bigram_heap {
    struct bigram * items;
    size_t          n;
    size_t          cap;
};

int32_t bigram_push(struct bigram_heap * h, struct bigram b);
struct bigram bigram_pop(struct bigram_heap * h);

// A symbol of the merge loops: a byte range of the text, linked to its neighbours.
struct symbol {
    int32_t  prev;
    int32_t  next;
    uint32_t off;
    uint32_t n;  // 0 once merged into its left neighbour
};

#endif  // CKV_TOKENIZER_IMPL_H
