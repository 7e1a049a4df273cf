// tokenizer-bpe.c - byte-level BPE (tokenizer.ggml.model = gpt2: SmolLM2, Qwen2.5, Llama 3):
// the pre-tokenizer cuts text into words, each word is spelled in GPT-2's byte alphabet, and
// adjacent symbols are merged in merge-rank order. Called by tokenizer.c for each piece of text
// between special tokens.
//
// The pre-tokenizer regexes are hand-written scanners that reproduce llama.cpp's unicode.cpp
// exactly (its custom gpt2/llama3/qwen2 splitters and, for the class-run regexes, its std::regex
// on "collapsed" text), including its edge cases: each pass only looks inside the words of the
// previous pass, so "(?!\S)" and "[\r\n]*" never see past a word's end. Invalid UTF-8 becomes
// U+FFFD, as llama.cpp rebuilds the words from decoded code points.
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "tokenizer-impl.h"
#include "unicode.h"

#define OUT_OF_RANGE 0xFFFFFFFFu

struct lens {
    uint32_t * v;  // word lengths in code points
    size_t     n;
    size_t     cap;
};

struct bpe_session {
    const struct ckv_vocab * v;
    uint32_t *               cpt;    // [n_cpt] the text's code points
    uint16_t *               flags;  // [n_cpt] their UNICODE_* flags
    size_t                   n_cpt;
    struct lens              words, next;
    char *                   word;   // one word in the byte alphabet
    size_t                   word_cap;
    struct symbol *          sym;
    size_t                   sym_cap;
    struct bigram_heap       heap;
};

static int32_t lens_push(struct lens * l, size_t len) {
    if (len == 0) {
        return CKV_OK;
    }
    if (l->n == l->cap) {
        const size_t cap = l->cap ? 2 * l->cap : 64;
        uint32_t *   v   = realloc(l->v, cap * sizeof(uint32_t));
        if (!v) {
            return ckv_fail(CKV_ERR_OOM, "out of memory for %zu words", cap);
        }
        l->v   = v;
        l->cap = cap;
    }
    l->v[l->n++] = (uint32_t) len;
    return CKV_OK;
}

// =============================================================================================
// Pre-tokenizer passes. Each reads s->words and writes s->next, cutting every word further.
// =============================================================================================

// A scanner's view of one word [ini, end): code points and flags, 0 / OUT_OF_RANGE outside.
struct span {
    const struct bpe_session * s;
    size_t                     ini, end;
};

static uint32_t cpt_at(const struct span * w, size_t pos) {
    return pos >= w->ini && pos < w->end ? w->s->cpt[pos] : OUT_OF_RANGE;
}

static uint16_t flags_at(const struct span * w, size_t pos) {
    return pos >= w->ini && pos < w->end ? w->s->flags[pos] : 0;
}

enum class_pass {
    CLASS_RUNS,     // maximal runs of the class, e.g. \p{N}+
    CLASS_SINGLES,  // each member alone, e.g. \p{N}
    CLASS_TRIPLES,  // exactly three members, e.g. [0-9][0-9][0-9]
};

enum char_class {
    CC_NUMBER,       // \p{N}
    CC_ASCII_DIGIT,  // [0-9]
    CC_PUNCT,        // [\p{P}\$\+<=>\^~\|]
};

static bool in_class(enum char_class c, uint32_t cpt, uint16_t flags) {
    switch (c) {
        case CC_NUMBER:      return (flags & UNICODE_NUMBER) != 0;
        case CC_ASCII_DIGIT: return cpt >= '0' && cpt <= '9';
        case CC_PUNCT:
            // llama.cpp runs this through std::regex: ASCII by its own list (which is ASCII \p{P}
            // plus $+<=>^~|), other code points by category
            return (flags & UNICODE_PUNCTUATION) || (cpt != 0 && cpt < 0x80 && strchr("$+<=>^~|", (int) cpt));
    }
    return false;
}

static size_t class_match(const struct span * w, size_t pos, enum char_class c, enum class_pass mode) {
    const struct bpe_session * s = w->s;
    size_t                     q = pos;
    const size_t limit = mode == CLASS_RUNS ? w->end : (mode == CLASS_SINGLES ? pos + 1 : pos + 3);
    while (q < w->end && q < limit && in_class(c, s->cpt[q], s->flags[q])) {
        ++q;
    }
    return (mode == CLASS_TRIPLES && q - pos < 3) ? 0 : q - pos;
}

// Isolates the matches of a class regex (llama.cpp's std::regex path: matched text and the
// text between matches each become a word).
static int32_t split_class(struct bpe_session * s, enum char_class c, enum class_pass mode) {
    int32_t st    = CKV_OK;
    size_t  start = 0;
    s->next.n     = 0;
    for (size_t i = 0; i < s->words.n && st == CKV_OK; ++i) {
        const struct span w    = {s, start, start + s->words.v[i]};
        size_t            prev = w.ini;
        for (size_t pos = w.ini; pos < w.end && st == CKV_OK;) {
            const size_t len = class_match(&w, pos, c, mode);
            if (len == 0) {
                ++pos;
                continue;
            }
            st = lens_push(&s->next, pos - prev);
            if (st == CKV_OK) {
                st = lens_push(&s->next, len);
            }
            prev = pos = pos + len;
        }
        if (st == CKV_OK) {
            st = lens_push(&s->next, w.end - prev);
        }
        start = w.end;
    }
    return st;
}

#define IS_WS(f)     (((f) & UNICODE_WHITESPACE) != 0)
#define IS_LETTER(f) (((f) & UNICODE_LETTER) != 0)
#define IS_NUMBER(f) (((f) & UNICODE_NUMBER) != 0)
#define IS_OTHER(f)  (!((f) & (UNICODE_WHITESPACE | UNICODE_LETTER | UNICODE_NUMBER)) && (f) != 0)

// Length of a contraction at pos ('s 't 'm 'd 're 've 'll), 0 if none; case-insensitive for
// llama3/qwen2, lowercase only for GPT-2.
static size_t contraction_len(const struct span * w, size_t pos, bool any_case) {
    if (cpt_at(w, pos) != '\'' || pos + 1 >= w->end) {
        return 0;
    }
    const uint32_t c1 = any_case ? unicode_tolower(cpt_at(w, pos + 1)) : cpt_at(w, pos + 1);
    if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
        return 2;
    }
    if (pos + 2 >= w->end) {
        return 0;
    }
    const uint32_t c2 = any_case ? unicode_tolower(cpt_at(w, pos + 2)) : cpt_at(w, pos + 2);
    return ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) ? 3 : 0;
}

// \s+(?!\S) or \s+ at pos: a whitespace run keeps its last space for the next word when a
// non-space follows inside the word. 0 if pos is not whitespace.
static size_t whitespace_len(const struct span * w, size_t pos) {
    size_t n = 0;
    while (IS_WS(flags_at(w, pos + n))) {
        ++n;
    }
    return (n > 1 && cpt_at(w, pos + n) != OUT_OF_RANGE) ? n - 1 : n;
}

// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
static size_t gpt2_match(const struct span * w, size_t pos) {
    size_t n = contraction_len(w, pos, false);
    if (n) {
        return n;
    }
    const uint32_t c  = cpt_at(w, pos);
    size_t         q  = pos + (c == ' ');
    uint16_t       f2 = flags_at(w, q);
    if (IS_LETTER(f2)) {
        while (IS_LETTER(flags_at(w, q))) {
            ++q;
        }
        return q - pos;
    }
    if (IS_NUMBER(f2)) {
        while (IS_NUMBER(flags_at(w, q))) {
            ++q;
        }
        return q - pos;
    }
    if (IS_OTHER(f2)) {
        while (IS_OTHER(flags_at(w, q))) {
            ++q;
        }
        return q - pos;
    }
    n = whitespace_len(w, pos);
    return n ? n : 1;
}

// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
// \s*[\r\n]+|\s+(?!\S)|\s+      (qwen2: \p{N} instead of \p{N}{1,3}; max_digits is 3 or 1)
static size_t llama3_match(const struct span * w, size_t pos, size_t max_digits) {
    size_t n = contraction_len(w, pos, true);
    if (n) {
        return n;
    }
    const uint32_t c = cpt_at(w, pos);
    const uint16_t f = flags_at(w, pos);
    if (c != '\r' && c != '\n' && !IS_NUMBER(f) && (IS_LETTER(f) || IS_LETTER(flags_at(w, pos + 1)))) {
        size_t q = pos + 1;
        while (IS_LETTER(flags_at(w, q))) {
            ++q;
        }
        return q - pos;
    }
    if (IS_NUMBER(f)) {
        size_t q = pos;
        while (q - pos < max_digits && IS_NUMBER(flags_at(w, q))) {
            ++q;
        }
        return q - pos;
    }
    const uint16_t f2 = c == ' ' ? flags_at(w, pos + 1) : f;
    if (!(f2 & (UNICODE_WHITESPACE | UNICODE_LETTER | UNICODE_NUMBER)) && f != 0) {
        size_t q = pos + (c == ' ');
        while (IS_OTHER(flags_at(w, q))) {
            ++q;
        }
        while (cpt_at(w, q) == '\r' || cpt_at(w, q) == '\n') {
            ++q;
        }
        return q - pos;
    }
    size_t last_newline_end = 0;  // \s*[\r\n]+ : up to the last \r or \n of the space run
    for (size_t q = pos; IS_WS(flags_at(w, q)); ++q) {
        if (cpt_at(w, q) == '\r' || cpt_at(w, q) == '\n') {
            last_newline_end = q + 1;
        }
    }
    if (last_newline_end) {
        return last_newline_end - pos;
    }
    n = whitespace_len(w, pos);
    return n ? n : 1;
}

static int32_t split_regex(struct bpe_session * s, size_t max_digits /* 0: GPT-2 regex */) {
    int32_t st    = CKV_OK;
    size_t  start = 0;
    s->next.n     = 0;
    for (size_t i = 0; i < s->words.n && st == CKV_OK; ++i) {
        const struct span w = {s, start, start + s->words.v[i]};
        for (size_t pos = w.ini; pos < w.end && st == CKV_OK;) {
            const size_t len = max_digits ? llama3_match(&w, pos, max_digits) : gpt2_match(&w, pos);
            st               = lens_push(&s->next, len);
            pos += len;
        }
        start = w.end;
    }
    return st;
}

// Runs one pass and makes its output the current word list.
static int32_t run_pass(struct bpe_session * s, int32_t st) {
    if (st == CKV_OK) {
        const struct lens tmp = s->words;
        s->words              = s->next;
        s->next               = tmp;
    }
    return st;
}

static int32_t pre_tokenize(struct bpe_session * s) {
    int32_t st = lens_push(&s->words, s->n_cpt);
    switch (s->v->pre) {
        case PRE_DEFAULT:
            st = run_pass(s, st == CKV_OK ? split_class(s, CC_PUNCT, CLASS_RUNS) : st);
            st = run_pass(s, st == CKV_OK ? split_regex(s, 0) : st);
            st = run_pass(s, st == CKV_OK ? split_class(s, CC_NUMBER, CLASS_RUNS) : st);
            st = run_pass(s, st == CKV_OK ? split_class(s, CC_ASCII_DIGIT, CLASS_TRIPLES) : st);
            break;
        case PRE_GPT2:
            st = run_pass(s, st == CKV_OK ? split_regex(s, 0) : st);
            break;
        case PRE_SMOLLM:
            st = run_pass(s, st == CKV_OK ? split_class(s, CC_NUMBER, CLASS_SINGLES) : st);
            st = run_pass(s, st == CKV_OK ? split_regex(s, 0) : st);
            break;
        case PRE_LLAMA3:
            st = run_pass(s, st == CKV_OK ? split_regex(s, 3) : st);
            break;
        case PRE_QWEN2:
            st = run_pass(s, st == CKV_OK ? split_regex(s, 1) : st);
            break;
    }
    return st;
}

// =============================================================================================
// Merging one word
// =============================================================================================

static int32_t add_bigram(struct bpe_session * s, int32_t left, int32_t right) {
    if (left < 0 || right < 0) {
        return CKV_OK;
    }
    const struct symbol * l    = &s->sym[left];
    const struct symbol * r    = &s->sym[right];
    const int32_t         rank = vocab_merge_rank(s->v, s->word + l->off, l->n, s->word + r->off, r->n);
    if (rank < 0) {
        return CKV_OK;
    }
    return bigram_push(&s->heap, (struct bigram){-(float) rank, left, right, l->n + r->n});
}

static int32_t merge_word(struct bpe_session * s, size_t n_sym) {
    int32_t st = CKV_OK;
    s->heap.n  = 0;
    for (size_t i = 1; i < n_sym && st == CKV_OK; ++i) {
        st = add_bigram(s, (int32_t) i - 1, (int32_t) i);
    }
    while (st == CKV_OK && s->heap.n > 0) {
        const struct bigram b = bigram_pop(&s->heap);
        struct symbol *     l = &s->sym[b.left];
        struct symbol *     r = &s->sym[b.right];
        if (l->n == 0 || r->n == 0 || l->n + r->n != b.size) {
            continue;  // outdated: one side has merged since
        }
        l->n += r->n;
        r->n    = 0;
        l->next = r->next;
        if (r->next >= 0) {
            s->sym[r->next].prev = b.left;
        }
        st = add_bigram(s, l->prev, b.left);
        if (st == CKV_OK) {
            st = add_bigram(s, b.left, l->next);
        }
    }
    return st;
}

// Spells code points [ini, end) in the byte alphabet into s->word; returns its length.
static int32_t spell_word(struct bpe_session * s, size_t ini, size_t end, size_t * len) {
    const size_t need = (end - ini) * 8;
    if (need > s->word_cap) {
        char * w = realloc(s->word, need);
        if (!w) {
            return ckv_fail(CKV_ERR_OOM, "out of memory for a %zu-character word", end - ini);
        }
        s->word     = w;
        s->word_cap = need;
    }
    size_t n = 0;
    for (size_t i = ini; i < end; ++i) {
        char         utf8[4];
        const size_t k = unicode_utf8_encode(s->cpt[i], utf8);
        for (size_t j = 0; j < k; ++j) {
            const uint8_t b = (uint8_t) utf8[j];
            memcpy(s->word + n, s->v->byte_utf8[b], s->v->byte_utf8_len[b]);
            n += s->v->byte_utf8_len[b];
        }
    }
    *len = n;
    return CKV_OK;
}

// Emits the merged symbols; one the vocabulary lacks goes out byte by byte, each byte only if
// it is a token by itself (llama.cpp drops the rest).
static int32_t emit_word(struct bpe_session * s, size_t n_sym, struct tok_buf * out) {
    int32_t st = CKV_OK;
    for (size_t i = 0; i < n_sym && st == CKV_OK; ++i) {
        const struct symbol * sym = &s->sym[i];
        if (sym->n == 0) {
            continue;
        }
        const ckv_token id = vocab_find(s->v, s->word + sym->off, sym->n);
        if (id >= 0) {
            st = tok_buf_push(out, id);
            continue;
        }
        for (uint32_t j = 0; j < sym->n && st == CKV_OK; ++j) {
            const ckv_token b = vocab_find(s->v, s->word + sym->off + j, 1);
            st                = b >= 0 ? tok_buf_push(out, b) : CKV_OK;
        }
    }
    return st;
}

static int32_t tokenize_word(struct bpe_session * s, size_t ini, size_t end, struct tok_buf * out) {
    size_t  n  = 0;
    int32_t st = spell_word(s, ini, end, &n);
    if (st != CKV_OK) {
        return st;
    }
    if (s->v->ignore_merges) {
        const ckv_token id = vocab_find(s->v, s->word, n);
        if (id >= 0) {
            return tok_buf_push(out, id);
        }
    }
    if (n > s->sym_cap) {
        struct symbol * sym = realloc(s->sym, n * sizeof(struct symbol));
        if (!sym) {
            return ckv_fail(CKV_ERR_OOM, "out of memory for %zu symbols", n);
        }
        s->sym     = sym;
        s->sym_cap = n;
    }
    size_t n_sym = 0;
    for (size_t off = 0; off < n;) {
        size_t len = unicode_utf8_len((uint8_t) s->word[off]);
        len        = len < n - off ? len : n - off;
        const int32_t i = (int32_t) n_sym++;
        s->sym[i] = (struct symbol){i - 1, off + len == n ? -1 : i + 1, (uint32_t) off, (uint32_t) len};
        off += len;
    }
    st = merge_word(s, n_sym);
    return st == CKV_OK ? emit_word(s, n_sym, out) : st;
}

static int32_t decode_text(struct bpe_session * s, const char * text, size_t n) {
    s->cpt   = malloc((n + 1) * sizeof(uint32_t));
    s->flags = malloc((n + 1) * sizeof(uint16_t));
    if (!s->cpt || !s->flags) {
        return ckv_fail(CKV_ERR_OOM, "out of memory for %zu bytes of text", n);
    }
    for (size_t off = 0; off < n;) {
        const uint32_t c       = unicode_utf8_decode(text, n, &off);
        s->flags[s->n_cpt]     = unicode_cpt_flags(c);
        s->cpt[s->n_cpt++]     = c;
    }
    return CKV_OK;
}

int32_t bpe_tokenize(const struct ckv_vocab * v, const char * text, size_t n, struct tok_buf * out) {
    struct bpe_session s  = {.v = v};
    int32_t            st = decode_text(&s, text, n);
    if (st == CKV_OK) {
        st = pre_tokenize(&s);
    }
    size_t start = 0;
    for (size_t i = 0; i < s.words.n && st == CKV_OK; ++i) {
        st = tokenize_word(&s, start, start + s.words.v[i], out);
        start += s.words.v[i];
    }
    free(s.cpt);
    free(s.flags);
    free(s.words.v);
    free(s.next.v);
    free(s.word);
    free(s.sym);
    free(s.heap.items);
    return st;
}
