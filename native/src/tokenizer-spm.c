// tokenizer-spm.c - SentencePiece (tokenizer.ggml.model = llama, e.g. Gemma 3) as llama.cpp's
// llm_tokenizer_spm does it: spaces become U+2581, the text starts as one symbol per UTF-8
// sequence, and the adjacent pair whose concatenation is the highest-scoring token is merged
// until no pair is a token. A symbol left that is not a token goes out as <0xNN> byte tokens.
// Called by tokenizer.c for each piece of text between special tokens.
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "tokenizer-impl.h"
#include "unicode.h"

struct spm_session {
    const struct ckv_vocab * v;
    char *                   text;  // escaped text
    size_t                   n;
    struct symbol *          sym;
    size_t                   n_sym;
    struct bigram_heap       heap;
};

// Escapes ' ' as U+2581 (E2 96 81), after an optional leading space.
static int32_t escape_text(struct spm_session * s, const char * text, size_t n, bool space_prefix) {
    size_t spaces = space_prefix;
    for (size_t i = 0; i < n; ++i) {
        spaces += text[i] == ' ';
    }
    s->text = malloc(n + 2 * spaces + 3);
    if (!s->text) {
        return ckv_fail(CKV_ERR_OOM, "out of memory for %zu bytes of text", n);
    }
    size_t o = 0;
    if (space_prefix) {
        memcpy(s->text, "\xE2\x96\x81", 3);
        o = 3;
    }
    for (size_t i = 0; i < n; ++i) {
        if (text[i] == ' ') {
            memcpy(s->text + o, "\xE2\x96\x81", 3);
            o += 3;
        } else {
            s->text[o++] = text[i];
        }
    }
    s->n = o;
    return CKV_OK;
}

// One symbol per UTF-8 sequence, sized from its lead byte (cut short at the end of the text).
static int32_t split_symbols(struct spm_session * s) {
    s->sym = malloc((s->n + 1) * sizeof(struct symbol));
    if (!s->sym) {
        return ckv_fail(CKV_ERR_OOM, "out of memory for %zu symbols", s->n);
    }
    for (size_t off = 0; off < s->n;) {
        size_t len = unicode_utf8_len((uint8_t) s->text[off]);
        if (len > s->n - off) {
            len = s->n - off;
        }
        const int32_t i = (int32_t) s->n_sym++;
        s->sym[i]       = (struct symbol){i - 1, off + len == s->n ? -1 : i + 1, (uint32_t) off, (uint32_t) len};
        off += len;
    }
    return CKV_OK;
}

static int32_t try_add_bigram(struct spm_session * s, int32_t left, int32_t right) {
    if (left < 0 || right < 0) {
        return CKV_OK;
    }
    const uint32_t  size = s->sym[left].n + s->sym[right].n;
    const ckv_token id   = vocab_find(s->v, s->text + s->sym[left].off, size);
    if (id < 0) {
        return CKV_OK;
    }
    return bigram_push(&s->heap, (struct bigram){s->v->tokens[id].score, left, right, size});
}

static int32_t merge_symbols(struct spm_session * s) {
    int32_t st = CKV_OK;
    for (size_t i = 1; i < s->n_sym && st == CKV_OK; ++i) {
        st = try_add_bigram(s, (int32_t) i - 1, (int32_t) i);
    }
    while (st == CKV_OK && s->heap.n > 0) {
        const struct bigram b = bigram_pop(&s->heap);
        struct symbol *     l = &s->sym[b.left];
        struct symbol *     r = &s->sym[b.right];
        // skip pairs whose symbols changed since they were queued
        if (l->n == 0 || r->n == 0 || l->n + r->n != b.size) {
            continue;
        }
        l->n += r->n;
        r->n    = 0;
        l->next = r->next;
        if (r->next >= 0) {
            s->sym[r->next].prev = b.left;
        }
        st = try_add_bigram(s, l->prev, b.left);
        if (st == CKV_OK) {
            st = try_add_bigram(s, b.left, l->next);
        }
    }
    return st;
}

// A final symbol is a token, or (a single character the vocabulary lacks) its bytes.
static int32_t emit_symbols(const struct spm_session * s, struct tok_buf * out) {
    int32_t st = CKV_OK;
    for (int32_t i = 0; s->n_sym > 0 && i != -1 && st == CKV_OK; i = s->sym[i].next) {
        const struct symbol * sym = &s->sym[i];
        const ckv_token       id  = vocab_find(s->v, s->text + sym->off, sym->n);
        if (id >= 0) {
            st = tok_buf_push(out, id);
            continue;
        }
        for (uint32_t j = 0; j < sym->n && st == CKV_OK; ++j) {
            const uint8_t   byte = (uint8_t) s->text[sym->off + j];
            const ckv_token bt   = s->v->spm_byte_token[byte];
            st = bt >= 0 ? tok_buf_push(out, bt)
                         : ckv_fail(CKV_ERR_UNSUPPORTED, "SentencePiece vocabulary has no byte token <0x%02X>", byte);
        }
    }
    return st;
}

int32_t spm_tokenize(const struct ckv_vocab * v, const char * text, size_t n, bool space_prefix,
                     struct tok_buf * out) {
    struct spm_session s  = {.v = v};
    int32_t            st = escape_text(&s, text, n, space_prefix);
    if (st == CKV_OK) {
        st = split_symbols(&s);
    }
    if (st == CKV_OK) {
        st = merge_symbols(&s);
    }
    if (st == CKV_OK) {
        st = emit_symbols(&s, out);
    }
    free(s.text);
    free(s.sym);
    free(s.heap.items);
    return st;
}
