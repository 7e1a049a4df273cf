// tokenizer.c - the vocabulary built from GGUF tokenizer.ggml.* metadata, and everything both
// tokenizers share: special-token partitioning, BOS/EOS, the end-of-generation set, token
// pieces and detokenization. Data flow: gguf -> ckv_vocab (here) -> ids, cut into words and
// merged by tokenizer-bpe.c (gpt2 model) or tokenizer-spm.c (llama model), for model.c's
// ckv_tokenize and friends.
//
// The reference is llama.cpp's src/llama-vocab.cpp (llama-cpp-python sdist 0.3.36, llama.cpp
// 0c1e570); tests/fixtures/tokenizer_*.json hold ids recorded from it. Where llama.cpp's choice
// depends on hash-map iteration order or on an unstable sort (which of several candidate texts
// becomes the EOT/FIM token; the order of equally long special tokens) we take the lowest id;
// none of the supported models has such a tie.
//
// ckv_token_attr (vocab_token_attr) reports one class per token, picked from llama.cpp's
// attribute bits in the order control, user-defined, unknown, byte, unused, normal (llama.cpp
// may turn a token into control, e.g. every end-of-generation text, or mark control tokens
// named "unused...").
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "tokenizer-impl.h"
#include "unicode.h"

// =============================================================================================
// Hash tables: token text -> id, merge pair -> rank
// =============================================================================================

#define FNV_OFFSET 0xcbf29ce484222325ull
#define FNV_PRIME  0x100000001b3ull

static uint64_t fnv1a(uint64_t h, const char * s, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        h = (h ^ (uint8_t) s[i]) * FNV_PRIME;
    }
    return h;
}

static int32_t table_init(struct id_table * t, size_t n_keys) {
    size_t cap = 16;
    while (cap < 2 * n_keys) {
        cap *= 2;
    }
    t->slots = malloc(cap * sizeof(int32_t));
    if (!t->slots) {
        return ckv_fail(CKV_ERR_OOM, "out of memory for a %zu-entry tokenizer table", cap);
    }
    memset(t->slots, 0xFF, cap * sizeof(int32_t));  // all -1
    t->mask = (uint32_t) (cap - 1);
    return CKV_OK;
}

static const char * token_text(const struct ckv_vocab * v, ckv_token id) {
    return v->text + v->tokens[id].text_off;
}

ckv_token vocab_find(const struct ckv_vocab * v, const char * s, size_t n) {
    uint32_t i = (uint32_t) fnv1a(FNV_OFFSET, s, n) & v->token_ids.mask;
    for (;; i = (i + 1) & v->token_ids.mask) {
        const int32_t id = v->token_ids.slots[i];
        if (id < 0) {
            return -1;
        }
        if (v->tokens[id].text_len == n && memcmp(token_text(v, id), s, n) == 0) {
            return id;
        }
    }
}

// Later ids replace earlier ones with the same text (llama.cpp: token_to_id[text] = id).
static void token_insert(struct ckv_vocab * v, ckv_token id) {
    const char * s = token_text(v, id);
    const size_t n = v->tokens[id].text_len;
    uint32_t     i = (uint32_t) fnv1a(FNV_OFFSET, s, n) & v->token_ids.mask;
    for (;; i = (i + 1) & v->token_ids.mask) {
        const int32_t other = v->token_ids.slots[i];
        if (other < 0 || (v->tokens[other].text_len == n && memcmp(token_text(v, other), s, n) == 0)) {
            v->token_ids.slots[i] = id;
            return;
        }
    }
}

static uint64_t pair_hash(const char * a, size_t na, const char * b, size_t nb) {
    return fnv1a(fnv1a(fnv1a(FNV_OFFSET, a, na), " ", 1), b, nb);
}

static bool merge_is(const struct ckv_vocab * v, int32_t r, const char * a, size_t na,
                     const char * b, size_t nb) {
    const struct merge * m = &v->merges[r];
    const char *         s = v->merge_text + m->off;
    return m->left_len == na && m->len == na + 1 + nb && memcmp(s, a, na) == 0 &&
           memcmp(s + na + 1, b, nb) == 0;
}

int32_t vocab_merge_rank(const struct ckv_vocab * v, const char * a, size_t na, const char * b,
                         size_t nb) {
    uint32_t i = (uint32_t) pair_hash(a, na, b, nb) & v->merge_ids.mask;
    for (;; i = (i + 1) & v->merge_ids.mask) {
        const int32_t r = v->merge_ids.slots[i];
        if (r < 0) {
            return -1;
        }
        if (merge_is(v, r, a, na, b, nb)) {
            return r;
        }
    }
}

// The first rank of a repeated pair wins (llama.cpp: bpe_ranks.emplace).
static void merge_insert(struct ckv_vocab * v, int32_t r) {
    const struct merge * m = &v->merges[r];
    const char *         a = v->merge_text + m->off;
    const char *         b = a + m->left_len + 1;
    const size_t         nb = m->len - m->left_len - 1;
    uint32_t             i = (uint32_t) pair_hash(a, m->left_len, b, nb) & v->merge_ids.mask;
    for (;; i = (i + 1) & v->merge_ids.mask) {
        const int32_t other = v->merge_ids.slots[i];
        if (other < 0) {
            v->merge_ids.slots[i] = r;
            return;
        }
        if (merge_is(v, other, a, m->left_len, b, nb)) {
            return;
        }
    }
}

// =============================================================================================
// Small shared helpers: id buffer, bigram heap
// =============================================================================================

int32_t tok_buf_push(struct tok_buf * b, ckv_token id) {
    if (b->n == b->cap) {
        const size_t cap = b->cap ? 2 * b->cap : 64;
        ckv_token *  ids = realloc(b->ids, cap * sizeof(ckv_token));
        if (!ids) {
            return ckv_fail(CKV_ERR_OOM, "out of memory for %zu token ids", cap);
        }
        b->ids = ids;
        b->cap = cap;
    }
    b->ids[b->n++] = id;
    return CKV_OK;
}

static bool bigram_better(const struct bigram * a, const struct bigram * b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

int32_t bigram_push(struct bigram_heap * h, struct bigram b) {
    if (h->n == h->cap) {
        const size_t    cap   = h->cap ? 2 * h->cap : 64;
        struct bigram * items = realloc(h->items, cap * sizeof(struct bigram));
        if (!items) {
            return ckv_fail(CKV_ERR_OOM, "out of memory for %zu bigrams", cap);
        }
        h->items = items;
        h->cap   = cap;
    }
    size_t i = h->n++;
    while (i > 0 && bigram_better(&b, &h->items[(i - 1) / 2])) {
        h->items[i] = h->items[(i - 1) / 2];
        i           = (i - 1) / 2;
    }
    h->items[i] = b;
    return CKV_OK;
}

struct bigram bigram_pop(struct bigram_heap * h) {
    const struct bigram top  = h->items[0];
    const struct bigram last = h->items[--h->n];
    size_t              i    = 0;
    for (;;) {
        size_t best = i;
        const struct bigram * cur = &last;
        for (size_t c = 2 * i + 1; c <= 2 * i + 2 && c < h->n; ++c) {
            if (bigram_better(&h->items[c], cur)) {
                best = c;
                cur  = &h->items[c];
            }
        }
        if (best == i) {
            break;
        }
        h->items[i] = h->items[best];
        i           = best;
    }
    if (h->n > 0) {
        h->items[i] = last;
    }
    return top;
}

// =============================================================================================
// Loading: model and pre-tokenizer names, token list, merges
// =============================================================================================

struct pre_name {
    const char *   name;
    enum pre_split pre;
    bool           clean_spaces;
    bool           ignore_merges;
    bool           add_bos;
};

// The names llama.cpp maps onto the five splitters we implement, with the flags it sets.
static const struct pre_name PRE_NAMES[] = {
    {"default", PRE_DEFAULT, true, false, false},
    {"llama3", PRE_LLAMA3, true, true, true},
    {"llama-v3", PRE_LLAMA3, true, true, true},
    {"llama-bpe", PRE_LLAMA3, true, true, true},
    {"falcon3", PRE_LLAMA3, true, true, true},
    {"pixtral", PRE_LLAMA3, true, true, true},
    {"dbrx", PRE_LLAMA3, true, false, false},
    {"smaug-bpe", PRE_LLAMA3, true, false, false},
    {"gpt-2", PRE_GPT2, true, false, false},
    {"phi-2", PRE_GPT2, true, false, false},
    {"mpt", PRE_GPT2, true, false, false},
    {"olmo", PRE_GPT2, true, false, false},
    {"jais", PRE_GPT2, true, false, false},
    {"exaone4", PRE_GPT2, true, false, false},
    {"trillion", PRE_GPT2, false, false, false},
    {"smollm", PRE_SMOLLM, false, false, false},
    {"starcoder", PRE_SMOLLM, true, false, false},
    {"refact", PRE_SMOLLM, true, false, false},
    {"codeshell", PRE_SMOLLM, true, false, false},
    {"command-r", PRE_SMOLLM, false, false, false},
    {"qwen2", PRE_QWEN2, false, false, false},
    {"deepseek-r1-qwen", PRE_QWEN2, false, false, false},
    {"megrez", PRE_QWEN2, true, false, false},
    {"stablelm2", PRE_QWEN2, true, false, false},
};

static bool str_eq(struct gguf_str s, const char * c) {
    return s.len == strlen(c) && (s.len == 0 || memcmp(s.data, c, s.len) == 0);
}

static int32_t read_model_type(const struct gguf_file * f, struct ckv_vocab * v) {
    struct gguf_str model = {0}, pre = {0};
    if (gguf_get_str(f, "tokenizer.ggml.model", &model) != CKV_OK) {
        return ckv_fail(CKV_ERR_FORMAT, "metadata key 'tokenizer.ggml.model' is missing or not a string");
    }
    const bool has_pre = gguf_get_str(f, "tokenizer.ggml.pre", &pre) == CKV_OK;
    if (str_eq(model, "llama")) {
        v->type             = VOCAB_SPM;
        v->pre              = PRE_DEFAULT;
        v->add_space_prefix = true;
        v->add_bos          = true;
        v->bos = 1, v->eos = 2, v->unk = 0;
    } else if (str_eq(model, "gpt2")) {
        v->type         = VOCAB_BPE;
        v->pre          = PRE_DEFAULT;  // also when the key is missing, as llama.cpp (it warns)
        v->clean_spaces = true;
        v->bos = 11, v->eos = 11;
        size_t i = 0;
        while (has_pre && i < sizeof(PRE_NAMES) / sizeof(PRE_NAMES[0]) && !str_eq(pre, PRE_NAMES[i].name)) {
            ++i;
        }
        if (has_pre && i == sizeof(PRE_NAMES) / sizeof(PRE_NAMES[0])) {
            return ckv_fail(CKV_ERR_UNSUPPORTED, "unsupported pre-tokenizer tokenizer.ggml.pre = '%.*s'",
                            (int) pre.len, pre.data);
        }
        if (has_pre) {
            v->pre           = PRE_NAMES[i].pre;
            v->clean_spaces  = PRE_NAMES[i].clean_spaces;
            v->ignore_merges = PRE_NAMES[i].ignore_merges;
            v->add_bos       = PRE_NAMES[i].add_bos;
        }
    } else {
        return ckv_fail(CKV_ERR_UNSUPPORTED, "unsupported tokenizer model tokenizer.ggml.model = '%.*s'",
                        (int) model.len, model.data);
    }
    bool flag;
    if (gguf_get_bool(f, "tokenizer.ggml.add_space_prefix", &flag) == CKV_OK) {
        v->add_space_prefix = flag;
    }
    return CKV_OK;
}

// A string array's kv, or NULL (with the error recorded) when absent or of another type.
static const struct gguf_kv * string_array(const struct gguf_file * f, const char * key,
                                           int32_t * status) {
    const struct gguf_kv * kv = gguf_find_kv(f, key);
    if (!kv) {
        *status = ckv_fail(CKV_ERR_FORMAT, "metadata key '%s' is missing", key);
        return NULL;
    }
    if (kv->type != GGUF_VALUE_ARRAY || kv->arr_type != GGUF_VALUE_STRING || !kv->strs) {
        *status = ckv_fail(CKV_ERR_FORMAT, "metadata key '%s' is not an array of strings", key);
        return NULL;
    }
    *status = CKV_OK;
    return kv;
}

// Copies the texts ("[EMPTY_<i>]" for an empty one, as llama.cpp) into one NUL-separated blob.
static int32_t read_token_texts(const struct gguf_kv * kv, struct ckv_vocab * v) {
    if (kv->arr_n == 0 || kv->arr_n > INT32_MAX / 2) {
        return ckv_fail(CKV_ERR_FORMAT, "tokenizer.ggml.tokens has %llu entries",
                        (unsigned long long) kv->arr_n);
    }
    v->n_tokens = (int32_t) kv->arr_n;
    size_t size = 0;
    for (int32_t i = 0; i < v->n_tokens; ++i) {
        size += (kv->strs[i].len ? kv->strs[i].len : 24) + 1;
    }
    if (size > UINT32_MAX) {
        return ckv_fail(CKV_ERR_FORMAT, "tokenizer.ggml.tokens holds %zu bytes of text", size);
    }
    v->tokens = calloc((size_t) v->n_tokens, sizeof(struct vocab_token));
    v->text   = malloc(size);
    if (!v->tokens || !v->text) {
        return ckv_fail(CKV_ERR_OOM, "out of memory for %d tokens", v->n_tokens);
    }
    size_t off = 0;
    for (int32_t i = 0; i < v->n_tokens; ++i) {
        struct vocab_token * t = &v->tokens[i];
        t->text_off            = (uint32_t) off;
        if (kv->strs[i].len) {
            memcpy(v->text + off, kv->strs[i].data, kv->strs[i].len);
            t->text_len = (uint32_t) kv->strs[i].len;
        } else {
            t->text_len = (uint32_t) snprintf(v->text + off, 24, "[EMPTY_%d]", i);
        }
        v->text[off + t->text_len] = '\0';
        off += t->text_len + 1;
        t->attr = ATTR_NORMAL;
    }
    return CKV_OK;
}

// Scores (f32 or i32) and token types are optional; when present they must cover every token.
static int32_t read_scores_and_types(const struct gguf_file * f, struct ckv_vocab * v) {
    const struct gguf_kv * kv = gguf_find_kv(f, "tokenizer.ggml.scores");
    if (kv) {
        if (kv->type != GGUF_VALUE_ARRAY ||
            (kv->arr_type != GGUF_VALUE_FLOAT32 && kv->arr_type != GGUF_VALUE_INT32)) {
            return ckv_fail(CKV_ERR_FORMAT, "tokenizer.ggml.scores is not an f32 or i32 array");
        }
        const void * data;
        uint64_t     n;
        if (gguf_get_arr(f, "tokenizer.ggml.scores", kv->arr_type, &data, &n) != CKV_OK ||
            n < (uint64_t) v->n_tokens) {
            return ckv_fail(CKV_ERR_FORMAT, "tokenizer.ggml.scores has %llu entries for %d tokens",
                            (unsigned long long) kv->arr_n, v->n_tokens);
        }
        for (int32_t i = 0; i < v->n_tokens; ++i) {
            const char * p = (const char *) data + 4 * (size_t) i;  // may be unaligned
            if (kv->arr_type == GGUF_VALUE_FLOAT32) {
                memcpy(&v->tokens[i].score, p, 4);
            } else {
                int32_t iv;
                memcpy(&iv, p, 4);
                v->tokens[i].score = (float) iv;
            }
        }
    }
    kv = gguf_find_kv(f, "tokenizer.ggml.token_type");
    if (kv) {
        const void * data;
        uint64_t     n;
        if (gguf_get_arr(f, "tokenizer.ggml.token_type", GGUF_VALUE_INT32, &data, &n) != CKV_OK ||
            n < (uint64_t) v->n_tokens) {
            return ckv_fail(CKV_ERR_FORMAT, "tokenizer.ggml.token_type is not an i32 array of %d entries",
                            v->n_tokens);
        }
        static const uint32_t type_attr[7] = {0, ATTR_NORMAL, ATTR_UNKNOWN, ATTR_CONTROL,
                                              ATTR_USER_DEFINED, ATTR_UNUSED, ATTR_BYTE};
        for (int32_t i = 0; i < v->n_tokens; ++i) {
            int32_t type;
            memcpy(&type, (const char *) data + 4 * (size_t) i, 4);
            v->tokens[i].attr = type >= 0 && type < 7 ? type_attr[type] : 0;
        }
    }
    return CKV_OK;
}

static int32_t read_tokens(const struct gguf_file * f, struct ckv_vocab * v) {
    int32_t                st;
    const struct gguf_kv * kv = string_array(f, "tokenizer.ggml.tokens", &st);
    if (!kv) {
        return st;
    }
    if ((st = read_token_texts(kv, v)) != CKV_OK || (st = read_scores_and_types(f, v)) != CKV_OK ||
        (st = table_init(&v->token_ids, (size_t) v->n_tokens)) != CKV_OK) {
        return st;
    }
    for (int32_t i = 0; i < v->n_tokens; ++i) {
        token_insert(v, i);
    }
    return CKV_OK;
}

// Merges "left right": split at the first space after the first byte (llama.cpp find(' ', 1)).
static int32_t read_merges(const struct gguf_file * f, struct ckv_vocab * v) {
    int32_t                st;
    const struct gguf_kv * kv = string_array(f, "tokenizer.ggml.merges", &st);
    if (!kv) {
        return st;
    }
    if (kv->arr_n > INT32_MAX / 2) {
        return ckv_fail(CKV_ERR_FORMAT, "tokenizer.ggml.merges has too many entries");
    }
    size_t size = 0;
    for (uint64_t i = 0; i < kv->arr_n; ++i) {
        size += kv->strs[i].len;
    }
    if (size > UINT32_MAX) {
        return ckv_fail(CKV_ERR_FORMAT, "tokenizer.ggml.merges holds %zu bytes of text", size);
    }
    v->merges     = calloc(kv->arr_n + 1, sizeof(struct merge));
    v->merge_text = malloc(size + 1);
    if (!v->merges || !v->merge_text || (st = table_init(&v->merge_ids, kv->arr_n)) != CKV_OK) {
        return v->merges && v->merge_text ? st : ckv_fail(CKV_ERR_OOM, "out of memory for merges");
    }
    size_t off = 0;
    for (uint64_t i = 0; i < kv->arr_n; ++i) {
        const struct gguf_str s     = kv->strs[i];
        const char *          space = s.len > 1 ? memchr(s.data + 1, ' ', s.len - 1) : NULL;
        struct merge *        m     = &v->merges[v->n_merges];
        memcpy(v->merge_text + off, s.data, s.len);
        *m = (struct merge){(uint32_t) off, space ? (uint32_t) (space - s.data) : 0, (uint32_t) s.len};
        off += s.len;
        // ranks are positions in the list, so an unsplittable entry still uses up its rank
        v->n_merges++;
        if (space) {
            merge_insert(v, v->n_merges - 1);
        }
    }
    return CKV_OK;
}

// =============================================================================================
// Loading: special token ids, end-of-generation set, special-token cache
// =============================================================================================

static void read_special_ids(const struct gguf_file * f, struct ckv_vocab * v) {
    const struct {
        const char * key;
        ckv_token *  id;
    } keys[] = {
        {"tokenizer.ggml.bos_token_id", &v->bos},         {"tokenizer.ggml.eos_token_id", &v->eos},
        {"tokenizer.ggml.eot_token_id", &v->eot},         {"tokenizer.ggml.eom_token_id", &v->eom},
        {"tokenizer.ggml.unknown_token_id", &v->unk},     {"tokenizer.ggml.seperator_token_id", &v->sep},
        {"tokenizer.ggml.padding_token_id", &v->pad},     {"tokenizer.ggml.mask_token_id", &v->mask},
        {"tokenizer.ggml.fim_pre_token_id", &v->fim_pre}, {"tokenizer.ggml.fim_suf_token_id", &v->fim_suf},
        {"tokenizer.ggml.fim_mid_token_id", &v->fim_mid}, {"tokenizer.ggml.fim_pad_token_id", &v->fim_pad},
        {"tokenizer.ggml.fim_rep_token_id", &v->fim_rep}, {"tokenizer.ggml.fim_sep_token_id", &v->fim_sep},
        {"tokenizer.ggml.prefix_token_id", &v->fim_pre},  {"tokenizer.ggml.suffix_token_id", &v->fim_suf},
        {"tokenizer.ggml.middle_token_id", &v->fim_mid},
    };
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); ++i) {
        if (*keys[i].id >= v->n_tokens) {
            *keys[i].id = -1;  // a default outside the vocabulary is disabled
        }
        uint32_t id;
        if (gguf_get_u32(f, keys[i].key, &id) == CKV_OK) {
            if (id < (uint32_t) v->n_tokens) {
                *keys[i].id = (ckv_token) id;
            } else {
                ckv_log(CKV_LOG_WARN, "tokenizer: %s = %u is outside the vocabulary, ignored", keys[i].key, id);
            }
        }
    }
    bool flag;
    if (gguf_get_bool(f, "tokenizer.ggml.add_bos_token", &flag) == CKV_OK) {
        v->add_bos = flag;
    }
    if (gguf_get_bool(f, "tokenizer.ggml.add_eos_token", &flag) == CKV_OK) {
        v->add_eos = flag;
    }
}

// Texts that llama.cpp recognises by name (llama-vocab.cpp, "auto-detect special tokens").
#define FW_BAR "\xEF\xBD\x9C"  // U+FF5C FULLWIDTH VERTICAL LINE
#define SPM_SP "\xE2\x96\x81"  // U+2581 LOWER ONE EIGHTH BLOCK
static const char * const EOT_TEXTS[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<" FW_BAR "end" SPM_SP "of" SPM_SP "sentence" FW_BAR ">",
    "<end_of_utterance>", NULL};
static const char * const EOM_TEXTS[] = {"<|eom_id|>", NULL};
static const char * const FIM_PRE_TEXTS[] = {
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<" FW_BAR "fim" SPM_SP "begin" FW_BAR ">",
    "<PRE>", SPM_SP "<PRE>", "<|code_prefix|>", "<|prefix|>", NULL};
static const char * const FIM_SUF_TEXTS[] = {
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<" FW_BAR "fim" SPM_SP "hole" FW_BAR ">",
    "<SUF>", SPM_SP "<SUF>", "<|code_suffix|>", "<|suffix|>", NULL};
static const char * const FIM_MID_TEXTS[] = {
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<" FW_BAR "fim" SPM_SP "end" FW_BAR ">",
    "<MID>", SPM_SP "<MID>", "<|code_middle|>", "<|middle|>", NULL};
static const char * const FIM_PAD_TEXTS[] = {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]", NULL};
static const char * const FIM_REP_TEXTS[] = {
    "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", NULL};
static const char * const FIM_SEP_TEXTS[] = {"<|file_sep|>", NULL};
static const char * const EOG_TEXTS[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<" FW_BAR "end" SPM_SP "of" SPM_SP "sentence" FW_BAR ">", "[e~[", NULL};

static ckv_token find_cstr(const struct ckv_vocab * v, const char * s) {
    return vocab_find(v, s, strlen(s));
}

// When *id is unset, the lowest id whose text is in the list becomes it and turns control.
static void detect_role(struct ckv_vocab * v, const char * const * texts, ckv_token * id) {
    if (*id >= 0) {
        return;
    }
    for (size_t i = 0; texts[i]; ++i) {
        const ckv_token t = find_cstr(v, texts[i]);
        if (t >= 0 && (*id < 0 || t < *id)) {
            *id = t;
        }
    }
    if (*id >= 0) {
        v->tokens[*id].attr |= ATTR_CONTROL;
    }
}

static bool eog_has(const struct ckv_vocab * v, ckv_token id) {
    for (int32_t i = 0; i < v->n_eog; ++i) {
        if (v->eog[i] == id) {
            return true;
        }
    }
    return false;
}

static void eog_add(struct ckv_vocab * v, ckv_token id) {
    if (id >= 0 && !eog_has(v, id)) {
        v->eog[v->n_eog++] = id;
    }
}

static void eog_remove(struct ckv_vocab * v, ckv_token id) {
    for (int32_t i = 0; i < v->n_eog; ++i) {
        if (v->eog[i] == id) {
            v->eog[i] = v->eog[--v->n_eog];
            return;
        }
    }
}

static bool eog_has_text(const struct ckv_vocab * v, const char * s) {
    const ckv_token id = find_cstr(v, s);
    return id >= 0 && eog_has(v, id);
}

static int cmp_token(const void * a, const void * b) {
    const ckv_token x = *(const ckv_token *) a, y = *(const ckv_token *) b;
    return (x > y) - (x < y);
}

// llama.cpp's fix-ups: harmony/solar-open "<|end|>" is not EOG; a "</s>" next to gemma4/plamo
// markers is a normal token.
static void eog_fixups(struct ckv_vocab * v) {
    const ckv_token end = find_cstr(v, "<|end|>");
    if (end >= 0 && eog_has(v, end) &&
        ((eog_has_text(v, "<|return|>") && (eog_has_text(v, "<|call|>") || eog_has_text(v, "<|calls|>"))) ||
         ((eog_has_text(v, "<|call|>") || eog_has_text(v, "<|calls|>")) && eog_has_text(v, "<|flush|>")))) {
        eog_remove(v, end);
        v->tokens[end].attr = ATTR_USER_DEFINED;
    }
    const ckv_token s = find_cstr(v, "</s>");
    if (s >= 0 && eog_has(v, s) && (eog_has_text(v, "<|tool_response>") || eog_has_text(v, "<|plamo:eos|>"))) {
        eog_remove(v, s);
        v->tokens[s].attr = ATTR_NORMAL;
    }
}

static int32_t build_eog(struct ckv_vocab * v) {
    detect_role(v, EOT_TEXTS, &v->eot);
    detect_role(v, EOM_TEXTS, &v->eom);
    detect_role(v, FIM_PRE_TEXTS, &v->fim_pre);
    detect_role(v, FIM_SUF_TEXTS, &v->fim_suf);
    detect_role(v, FIM_MID_TEXTS, &v->fim_mid);
    detect_role(v, FIM_PAD_TEXTS, &v->fim_pad);
    detect_role(v, FIM_REP_TEXTS, &v->fim_rep);
    detect_role(v, FIM_SEP_TEXTS, &v->fim_sep);
    // control tokens named "...unused..." are unused (only ids that own their text, as
    // llama.cpp walks its text -> id map)
    for (ckv_token id = 0; id < v->n_tokens; ++id) {
        struct vocab_token * t = &v->tokens[id];
        if ((t->attr & ATTR_CONTROL) && strstr(token_text(v, id), "unused") &&
            vocab_find(v, token_text(v, id), t->text_len) == id) {
            t->attr |= ATTR_UNUSED;
        }
    }
    v->eog = malloc((sizeof(EOG_TEXTS) / sizeof(EOG_TEXTS[0]) + 6) * sizeof(ckv_token));
    if (!v->eog) {
        return ckv_fail(CKV_ERR_OOM, "out of memory");
    }
    eog_add(v, v->fim_pad);
    eog_add(v, v->fim_rep);
    eog_add(v, v->fim_sep);
    for (size_t i = 0; EOG_TEXTS[i]; ++i) {
        const ckv_token id = find_cstr(v, EOG_TEXTS[i]);
        if (id >= 0) {
            eog_add(v, id);
            v->tokens[id].attr |= ATTR_CONTROL;
        }
    }
    static const char * const always_rendered[] = {"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"};
    for (size_t i = 0; i < 4; ++i) {
        const ckv_token id = find_cstr(v, always_rendered[i]);
        if (id >= 0) {
            v->tokens[id].attr = ATTR_USER_DEFINED;
        }
    }
    eog_add(v, v->eos);
    eog_add(v, v->eot);
    eog_add(v, v->eom);
    eog_fixups(v);
    qsort(v->eog, (size_t) v->n_eog, sizeof(ckv_token), cmp_token);
    return CKV_OK;
}

// --- special-token cache and its trie ---------------------------------------------------------

struct special_key {
    uint32_t  len;
    ckv_token id;
};

// Longest text first; equal lengths by id (llama.cpp's std::sort leaves their order open).
static int cmp_special(const void * a, const void * b) {
    const struct special_key * x = a, * y = b;
    if (x->len != y->len) {
        return x->len > y->len ? -1 : 1;
    }
    return (x->id > y->id) - (x->id < y->id);
}

static int32_t trie_child(const struct ckv_vocab * v, int32_t node, uint8_t byte) {
    for (int32_t c = v->trie[node].first_child; c >= 0; c = v->trie[c].next_sibling) {
        if (v->trie[c].byte == byte) {
            return c;
        }
    }
    return -1;
}

static int32_t trie_insert(struct ckv_vocab * v, const char * s, size_t n) {
    int32_t node = 0;
    for (size_t i = 0; i < n; ++i) {
        int32_t c = trie_child(v, node, (uint8_t) s[i]);
        if (c < 0) {
            c          = v->n_trie++;
            v->trie[c] = (struct trie_node){-1, v->trie[node].first_child, 0, (uint8_t) s[i]};
            v->trie[node].first_child = c;
        }
        node = c;
    }
    v->trie[node].terminal = 1;
    return node;
}

// phi-3 models strip spaces after their special tokens (llama.cpp sets RSTRIP by model name).
static void apply_name_rules(const struct gguf_file * f, struct ckv_vocab * v) {
    struct gguf_str name = {0};
    if (gguf_get_str(f, "general.name", &name) != CKV_OK) {
        return;
    }
    char lower[256];
    size_t n = name.len < sizeof(lower) - 1 ? name.len : sizeof(lower) - 1;
    for (size_t i = 0; i < n; ++i) {
        const char c = name.data[i];
        lower[i]     = (c >= 'A' && c <= 'Z') ? (char) (c - 'A' + 'a') : c;
    }
    lower[n] = '\0';
    if (!strstr(lower, "phi-3") && !strstr(lower, "phi3")) {
        return;
    }
    for (int32_t i = 0; i < v->n_specials; ++i) {
        v->tokens[v->specials[i]].attr |= ATTR_RSTRIP;
    }
    ckv_token id = find_cstr(v, "</s>");
    if (id >= 0) {
        v->tokens[id].attr |= ATTR_RSTRIP;
    }
    static const char * const keep[] = {"<unk>", "<s>", "<|endoftext|>"};
    for (size_t i = 0; i < 3; ++i) {
        if ((id = find_cstr(v, keep[i])) >= 0) {
            v->tokens[id].attr &= ~(uint32_t) ATTR_RSTRIP;
        }
    }
}

static int32_t build_specials(struct ckv_vocab * v) {
    size_t               trie_size = 1;
    struct special_key * keys      = malloc((size_t) v->n_tokens * sizeof(*keys));
    if (!keys) {
        return ckv_fail(CKV_ERR_OOM, "out of memory");
    }
    for (ckv_token id = 0; id < v->n_tokens; ++id) {
        if (v->tokens[id].attr & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)) {
            keys[v->n_specials++] = (struct special_key){v->tokens[id].text_len, id};
            trie_size += v->tokens[id].text_len;
        }
    }
    qsort(keys, (size_t) v->n_specials, sizeof(*keys), cmp_special);
    v->specials     = malloc(((size_t) v->n_specials + 1) * sizeof(ckv_token));
    v->special_node = malloc(((size_t) v->n_specials + 1) * sizeof(int32_t));
    v->trie         = malloc(trie_size * sizeof(struct trie_node));
    if (!v->specials || !v->special_node || !v->trie) {
        free(keys);
        return ckv_fail(CKV_ERR_OOM, "out of memory for the special-token trie");
    }
    v->trie[0] = (struct trie_node){-1, -1, 0, 0};
    v->n_trie  = 1;
    for (int32_t i = 0; i < v->n_specials; ++i) {
        const ckv_token id = keys[i].id;
        v->specials[i]     = id;
        v->special_node[i] = trie_insert(v, token_text(v, id), v->tokens[id].text_len);
    }
    free(keys);
    return CKV_OK;
}

// Byte tables: GPT-2 alphabet for BPE, <0xNN> fallback tokens for SentencePiece.
static void build_byte_tables(struct ckv_vocab * v) {
    memset(v->cpt_byte, 0xFF, sizeof(v->cpt_byte));
    for (int b = 0; b < 256; ++b) {
        const uint32_t cpt = unicode_byte_to_cpt((uint8_t) b);
        char           utf8[4];
        v->byte_utf8_len[b] = (uint8_t) unicode_utf8_encode(cpt, utf8);
        memcpy(v->byte_utf8[b], utf8, v->byte_utf8_len[b]);
        v->cpt_byte[cpt] = (int16_t) b;
        char hex[8];
        snprintf(hex, sizeof(hex), "<0x%02X>", b);
        v->spm_byte_token[b] = find_cstr(v, hex);
        if (v->spm_byte_token[b] < 0) {
            const char c = (char) b;
            v->spm_byte_token[b] = vocab_find(v, &c, 1);
        }
    }
}

int32_t vocab_load(const struct gguf_file * f, struct ckv_vocab ** out) {
    if (!f || !out) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "vocab_load: f and out must not be NULL");
    }
    *out                 = NULL;
    struct ckv_vocab * v = calloc(1, sizeof(*v));
    if (!v) {
        return ckv_fail(CKV_ERR_OOM, "out of memory");
    }
    v->bos = v->eos = v->eot = v->eom = v->unk = v->sep = v->pad = v->mask = -1;
    v->fim_pre = v->fim_suf = v->fim_mid = v->fim_pad = v->fim_rep = v->fim_sep = -1;
    int32_t st = read_model_type(f, v);
    if (st == CKV_OK) {
        st = read_tokens(f, v);
    }
    if (st == CKV_OK && v->type == VOCAB_BPE) {
        st = read_merges(f, v);
    }
    if (st == CKV_OK) {
        read_special_ids(f, v);
        st = build_eog(v);
    }
    if (st == CKV_OK) {
        st = build_specials(v);
    }
    if (st != CKV_OK) {
        vocab_free(v);
        return st;
    }
    apply_name_rules(f, v);
    build_byte_tables(v);
    *out = v;
    return CKV_OK;
}

void vocab_free(struct ckv_vocab * v) {
    if (!v) {
        return;
    }
    free(v->tokens);
    free(v->text);
    free(v->token_ids.slots);
    free(v->merges);
    free(v->merge_text);
    free(v->merge_ids.slots);
    free(v->eog);
    free(v->specials);
    free(v->special_node);
    free(v->trie);
    free(v);
}

// =============================================================================================
// Accessors
// =============================================================================================

int32_t   vocab_n_tokens(const struct ckv_vocab * v) { return v->n_tokens; }
ckv_token vocab_bos(const struct ckv_vocab * v) { return v->bos; }
ckv_token vocab_eos(const struct ckv_vocab * v) { return v->eos; }
bool      vocab_add_bos(const struct ckv_vocab * v) { return v->add_bos; }

bool vocab_is_eog(const struct ckv_vocab * v, ckv_token token) {
    return token >= 0 && bsearch(&token, v->eog, (size_t) v->n_eog, sizeof(ckv_token), cmp_token) != NULL;
}

int32_t vocab_token_attr(const struct ckv_vocab * v, ckv_token token) {
    if (token < 0 || token >= v->n_tokens) {
        return 0;
    }
    const uint32_t a = v->tokens[token].attr;
    if (a & ATTR_CONTROL) {
        return CKV_TOKEN_CONTROL;
    }
    if (a & ATTR_USER_DEFINED) {
        return CKV_TOKEN_USER_DEFINED;
    }
    if (a & ATTR_UNKNOWN) {
        return CKV_TOKEN_UNKNOWN;
    }
    if (a & ATTR_BYTE) {
        return CKV_TOKEN_BYTE;
    }
    if (a & ATTR_UNUSED) {
        return CKV_TOKEN_UNUSED;
    }
    return (a & ATTR_NORMAL) ? CKV_TOKEN_NORMAL : 0;
}

const char * vocab_token_text(const struct ckv_vocab * v, ckv_token token) {
    return token >= 0 && token < v->n_tokens ? token_text(v, token) : NULL;
}

// =============================================================================================
// Tokenize: special-token partition, then the model's tokenizer on each piece of raw text
// =============================================================================================

struct frag {
    ckv_token token;  // -1: raw text
    uint32_t  off;    // raw text: byte range of the input
    uint32_t  len;
};

struct frag_list {
    struct frag * items;
    size_t        n;
    size_t        cap;
};

static int32_t frag_push(struct frag_list * l, struct frag fr) {
    if (l->n == l->cap) {
        const size_t  cap   = l->cap ? 2 * l->cap : 16;
        struct frag * items = realloc(l->items, cap * sizeof(struct frag));
        if (!items) {
            return ckv_fail(CKV_ERR_OOM, "out of memory");
        }
        l->items = items;
        l->cap   = cap;
    }
    l->items[l->n++] = fr;
    return CKV_OK;
}

static bool is_c_space(char c) {
    return c == ' ' || (c >= '\t' && c <= '\r');
}

// First occurrence of needle in text[from, to), or -1.
static int64_t find_bytes(const char * text, size_t from, size_t to, const char * needle, size_t n) {
    while (from + n <= to) {
        const char * p = memchr(text + from, needle[0], to - from - n + 1);
        if (!p) {
            return -1;
        }
        if (memcmp(p, needle, n) == 0) {
            return p - text;
        }
        from = (size_t) (p - text) + 1;
    }
    return -1;
}

// Splits every raw-text fragment of in at each occurrence of special token id (llama.cpp's
// tokenizer_st_partition step for one token, with its lstrip/rstrip rules).
static int32_t split_on(const struct ckv_vocab * v, const char * text, ckv_token id,
                        const struct frag_list * in, struct frag_list * out) {
    const char *   tok  = token_text(v, id);
    const size_t   tlen = v->tokens[id].text_len;
    const uint32_t attr = v->tokens[id].attr;
    int32_t        st   = CKV_OK;
    out->n              = 0;
    for (size_t i = 0; i < in->n && st == CKV_OK; ++i) {
        if (in->items[i].token >= 0) {
            st = frag_push(out, in->items[i]);
            continue;
        }
        size_t       off = in->items[i].off;
        const size_t end = off + in->items[i].len;
        for (int64_t m; st == CKV_OK; off = (size_t) m + tlen) {
            m = find_bytes(text, off, end, tok, tlen);
            if (m < 0) {
                st = end > off ? frag_push(out, (struct frag){-1, (uint32_t) off, (uint32_t) (end - off)}) : CKV_OK;
                break;
            }
            size_t left = (size_t) m - off;
            while ((attr & ATTR_LSTRIP) && left > 0 && is_c_space(text[off + left - 1])) {
                --left;
            }
            if (left > 0) {
                st = frag_push(out, (struct frag){-1, (uint32_t) off, (uint32_t) left});
            }
            if (st == CKV_OK) {
                st = frag_push(out, (struct frag){id, 0, 0});
            }
            while ((attr & ATTR_RSTRIP) && (size_t) m + tlen < end && is_c_space(text[m + tlen])) {
                ++m;  // the next search starts after the stripped spaces
            }
        }
    }
    return st;
}

// Marks the trie nodes of every special text that occurs anywhere in text: tokens that do not
// occur cannot split any fragment, so only these are tried (6k+ control tokens in Gemma).
static int32_t mark_present(const struct ckv_vocab * v, const char * text, size_t n, uint8_t ** out) {
    uint8_t * seen = calloc((size_t) v->n_trie, 1);
    if (!seen) {
        return ckv_fail(CKV_ERR_OOM, "out of memory");
    }
    for (size_t i = 0; i < n; ++i) {
        int32_t node = 0;
        for (size_t j = i; j < n && (node = trie_child(v, node, (uint8_t) text[j])) >= 0; ++j) {
            seen[node] |= (uint8_t) v->trie[node].terminal;
        }
    }
    *out = seen;
    return CKV_OK;
}

static int32_t partition(const struct ckv_vocab * v, const char * text, size_t n, bool parse_special,
                         struct frag_list * frags) {
    frags->n = 0;
    if (n == 0) {
        return CKV_OK;
    }
    int32_t st = frag_push(frags, (struct frag){-1, 0, (uint32_t) n});
    if (st != CKV_OK || v->n_specials == 0) {
        return st;
    }
    uint8_t * seen = NULL;
    if ((st = mark_present(v, text, n, &seen)) != CKV_OK) {
        return st;
    }
    struct frag_list tmp = {0};
    for (int32_t i = 0; i < v->n_specials && st == CKV_OK; ++i) {
        const ckv_token id = v->specials[i];
        // without parse_special only user-defined tokens are split off
        if (!seen[v->special_node[i]] ||
            (!parse_special && (v->tokens[id].attr & (ATTR_CONTROL | ATTR_UNKNOWN)))) {
            continue;
        }
        st = split_on(v, text, id, frags, &tmp);
        const struct frag_list swap = *frags;
        *frags                      = tmp;
        tmp                         = swap;
    }
    free(tmp.items);
    free(seen);
    return st;
}

static int32_t tokenize_fragments(const struct ckv_vocab * v, const char * text,
                                  const struct frag_list * frags, struct tok_buf * out) {
    bool prev_special = true;  // SPM: a space prefix before the first text and after specials
    for (size_t i = 0; i < frags->n; ++i) {
        const struct frag * fr = &frags->items[i];
        int32_t             st;
        if (fr->token >= 0) {
            st           = tok_buf_push(out, fr->token);
            prev_special = true;
        } else if (v->type == VOCAB_SPM) {
            st           = spm_tokenize(v, text + fr->off, fr->len, v->add_space_prefix && prev_special, out);
            prev_special = false;
        } else {
            st = bpe_tokenize(v, text + fr->off, fr->len, out);
        }
        if (st != CKV_OK) {
            return st;
        }
    }
    return CKV_OK;
}

static int32_t tokenize_all(const struct ckv_vocab * v, const char * text, size_t n,
                            bool add_special, bool parse_special, struct tok_buf * out) {
    struct frag_list frags = {0};
    int32_t          st    = partition(v, text, n, parse_special, &frags);
    if (st == CKV_OK && add_special && v->add_bos) {
        st = v->bos >= 0 ? tok_buf_push(out, v->bos)
                         : ckv_fail(CKV_ERR_FORMAT, "the tokenizer adds BOS but has no BOS token");
    }
    if (st == CKV_OK) {
        st = tokenize_fragments(v, text, &frags, out);
    }
    if (st == CKV_OK && add_special && v->add_eos) {
        st = v->eos >= 0 ? tok_buf_push(out, v->eos)
                         : ckv_fail(CKV_ERR_FORMAT, "the tokenizer adds EOS but has no EOS token");
    }
    free(frags.items);
    return st;
}

int32_t vocab_tokenize(const struct ckv_vocab * v, const char * text, int32_t text_len,
                       ckv_token * tokens, int32_t cap, bool add_special, bool parse_special,
                       int32_t * n_needed) {
    if (!v || text_len < 0 || (!text && text_len > 0) || cap < 0 || (!tokens && cap > 0)) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "tokenize: bad text (len %d) or token buffer (cap %d)",
                        text_len, cap);
    }
    struct tok_buf out = {0};
    int32_t        st  = tokenize_all(v, text, (size_t) text_len, add_special, parse_special, &out);
    if (st == CKV_OK) {
        if (out.n > INT32_MAX) {
            st = ckv_fail(CKV_ERR_INVALID_ARG, "tokenize: more than INT32_MAX tokens");
        } else {
            if (n_needed) {
                *n_needed = (int32_t) out.n;
            }
            const size_t n_copy = out.n < (size_t) cap ? out.n : (size_t) cap;
            if (n_copy) {
                memcpy(tokens, out.ids, n_copy * sizeof(ckv_token));
            }
            if (out.n > (size_t) cap) {
                st = ckv_fail(CKV_ERR_BUFFER_TOO_SMALL, "tokenize: %zu tokens do not fit in %d",
                              out.n, cap);
            }
        }
    }
    free(out.ids);
    return st;
}

// =============================================================================================
// Pieces and detokenize
// =============================================================================================

struct byte_buf {
    char * data;
    size_t n;
    size_t cap;
};

static int32_t bytes_append(struct byte_buf * b, const void * s, size_t n) {
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->n + n) {
            cap *= 2;
        }
        char * data = realloc(b->data, cap);
        if (!data) {
            return ckv_fail(CKV_ERR_OOM, "out of memory for %zu bytes", cap);
        }
        b->data = data;
        b->cap  = cap;
    }
    if (n) {
        memcpy(b->data + b->n, s, n);
    }
    b->n += n;
    return CKV_OK;
}

// GPT-2 byte-level text back to bytes; a code point outside the alphabet becomes
// "[UNK_BYTE_0x<hex>" + the whole token text + "]", as llama.cpp's llama_decode_text.
static int32_t append_bpe_text(const struct ckv_vocab * v, const char * s, size_t n, struct byte_buf * b) {
    int32_t st = CKV_OK;
    for (size_t off = 0; off < n && st == CKV_OK;) {
        const uint32_t cpt = unicode_utf8_decode(s, n, &off);
        if (cpt < 0x144 && v->cpt_byte[cpt] >= 0) {
            const char byte = (char) v->cpt_byte[cpt];
            st              = bytes_append(b, &byte, 1);
            continue;
        }
        char   utf8[4], hex[16];
        size_t len = unicode_utf8_encode(cpt, utf8);
        st         = bytes_append(b, "[UNK_BYTE_0x", 12);
        for (size_t i = 0; i < len && st == CKV_OK; ++i) {
            snprintf(hex, sizeof(hex), "%02x", (uint8_t) utf8[i]);
            st = bytes_append(b, hex, 2);
        }
        if (st == CKV_OK) {
            st = bytes_append(b, s, n);
        }
        if (st == CKV_OK) {
            st = bytes_append(b, "]", 1);
        }
    }
    return st;
}

// SentencePiece text: U+2581 back to a space.
static int32_t append_spm_text(const char * s, size_t n, struct byte_buf * b) {
    int32_t st = CKV_OK;
    for (size_t i = 0; i < n && st == CKV_OK;) {
        if (i + 3 <= n && memcmp(s + i, SPM_SP, 3) == 0) {
            st = bytes_append(b, " ", 1);
            i += 3;
        } else {
            st = bytes_append(b, s + i, 1);
            i += 1;
        }
    }
    return st;
}

// Appends the bytes of one token (llama.cpp's token_to_piece with lstrip = 0).
static int32_t append_piece(const struct ckv_vocab * v, ckv_token id, bool special, struct byte_buf * b) {
    const uint32_t attr = v->tokens[id].attr;
    const char *   s    = token_text(v, id);
    const size_t   n    = v->tokens[id].text_len;
    if (attr & (ATTR_UNKNOWN | ATTR_CONTROL)) {
        return special ? bytes_append(b, s, n) : CKV_OK;
    }
    if (attr & ATTR_USER_DEFINED) {
        return bytes_append(b, s, n);
    }
    if (attr & ATTR_NORMAL) {
        return v->type == VOCAB_BPE ? append_bpe_text(v, s, n, b) : append_spm_text(s, n, b);
    }
    if (attr & ATTR_BYTE) {
        // "<0xNN>": the two hex digits after "<0x"
        char hex[3] = {n > 3 ? s[3] : 0, n > 4 ? s[4] : 0, 0};
        const char byte = (char) strtol(hex, NULL, 16);
        return bytes_append(b, &byte, 1);
    }
    return CKV_OK;  // unused / undefined tokens have no text
}

static int32_t copy_out(const struct byte_buf * b, char * buf, int32_t cap, int32_t * n_needed,
                        const char * what) {
    if (b->n > INT32_MAX) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "%s: result longer than INT32_MAX bytes", what);
    }
    if (n_needed) {
        *n_needed = (int32_t) b->n;
    }
    if (b->n > (size_t) cap) {
        return ckv_fail(CKV_ERR_BUFFER_TOO_SMALL, "%s: %zu bytes do not fit in %d", what, b->n, cap);
    }
    if (b->n) {
        memcpy(buf, b->data, b->n);
    }
    return CKV_OK;
}

int32_t vocab_token_to_piece(const struct ckv_vocab * v, ckv_token token, char * buf, int32_t cap,
                             bool special, int32_t * n_needed) {
    if (!v || cap < 0 || (!buf && cap > 0)) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "token_to_piece: bad buffer (cap %d)", cap);
    }
    if (token < 0 || token >= v->n_tokens) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "token_to_piece: token %d is outside the vocabulary [0, %d)",
                        token, v->n_tokens);
    }
    struct byte_buf b  = {0};
    int32_t         st = append_piece(v, token, special, &b);
    if (st == CKV_OK) {
        st = copy_out(&b, buf, cap, n_needed, "token_to_piece");
    }
    free(b.data);
    return st;
}

// llama.cpp's clean_up_tokenization_spaces, in place and byte for byte as llama_detokenize
// does it (each pass compares with the unfiltered previous byte). Returns the new length.
static size_t clean_spaces(char * t, size_t total) {
    // " ?", " !", " .", " ,": drop the space
    size_t n = total, out = total ? 1 : 0;
    for (size_t i = 1; i < n; ++i) {
        const char x = t[i];
        if (t[i - 1] == ' ' && (x == '?' || x == '!' || x == '.' || x == ',')) {
            --out;
        }
        t[out++] = x;
    }
    // " ' ": drop both spaces around a lone apostrophe
    n = out, out = n ? 1 : 0;
    for (size_t i = 1; i < n; ++i) {
        const char x = t[i];
        if (x == '\'' && i + 1 < n && t[i - 1] == ' ' && t[i + 1] == ' ') {
            --out;
            t[++i] = '\0';
        }
        t[out++] = x;
    }
    // " 's", " 'm", " 're", " 've": drop the space (not before 't, 'd, 'll)
    n = out, out = n ? 1 : 0;
    for (size_t i = 1; i < n; ++i) {
        const char x = t[i];
        if (t[i - 1] == ' ' && x == '\'' && i + 1 < n) {
            const char x1 = t[i + 1];
            if (x1 == 's' || x1 == 'm') {
                --out;
            } else if (x1 != 't' && x1 != 'd' && i + 2 < n) {
                const char x2 = t[i + 2];
                if ((x1 == 'r' && x2 == 'e') || (x1 == 'v' && x2 == 'e')) {
                    --out;
                }
            }
        }
        t[out++] = x;
    }
    return out;
}

int32_t vocab_detokenize(const struct ckv_vocab * v, const ckv_token * tokens, int32_t n_tokens,
                         char * buf, int32_t cap, bool special, int32_t * n_needed) {
    if (!v || n_tokens < 0 || (!tokens && n_tokens > 0) || cap < 0 || (!buf && cap > 0)) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "detokenize: bad tokens (n %d) or buffer (cap %d)",
                        n_tokens, cap);
    }
    struct byte_buf b  = {0};
    int32_t         st = CKV_OK;
    for (int32_t i = 0; i < n_tokens && st == CKV_OK; ++i) {
        if (tokens[i] < 0 || tokens[i] >= v->n_tokens) {
            st = ckv_fail(CKV_ERR_INVALID_ARG, "detokenize: token %d at index %d is outside the vocabulary",
                          tokens[i], i);
            break;
        }
        const size_t start = b.n;
        st                 = append_piece(v, tokens[i], special, &b);
        // the space a SentencePiece model put in front of the text is not part of it
        if (st == CKV_OK && i == 0 && v->add_space_prefix && b.n > start && b.data[start] == ' ') {
            memmove(b.data + start, b.data + start + 1, b.n - start - 1);
            --b.n;
        }
    }
    if (st == CKV_OK && v->clean_spaces) {
        b.n = clean_spaces(b.data, b.n);
    }
    if (st == CKV_OK) {
        st = copy_out(&b, buf, cap, n_needed, "detokenize");
    }
    free(b.data);
    return st;
}
