// grammar.c - constrained sampling: which tokens may come next under a GBNF grammar (the format
// of llama.cpp's grammars/README). Sits beside the sampler at the end of the data flow
// (logits -> grammar mask -> sampler -> token -> grammar accept).
//
// Compilation. The text parses into rules; each rule is one run of elements in `elems`:
// alternatives separated by ALT, the rule closed by END. A terminal is a character class: a
// CHAR / CHAR_NOT element, then CHAR_ALT elements for more members, each member optionally
// followed by RNG_UPPER (its range's last code point); a string literal is one CHAR per code
// point; `.` is CHAR_ANY. Groups become helper rules and repetitions are rewritten as rules:
//   x*  ->  r ::= x r |        x{m,n}  ->  x ... x (m times) then n-m nested optionals
// so the matcher only knows sequences, alternatives and rule references. A rule that can reach
// itself without reading a character (left recursion) is refused at compile time: expanding
// it would never end.
//
// Matching. The parse state is a set of stacks. A stack lists element positions, the top being
// the terminal to match next and the rest the positions to resume at when the inner rules end
// (an empty stack: the text can end here). Reading a code point keeps the stacks whose top
// class contains it, moves their top past the class, and expands until every top is a terminal
// again: a rule reference becomes one stack per alternative; the end of an alternative pops.
// A continuation that would resume at the end of an alternative is not pushed, so right
// recursion (`r ::= x r`) does not grow the stacks.
//
// Tokens. Bytes are decoded as UTF-8 on the way in; a token may end inside a code point, which
// the state carries over. To mask a logits row, the vocabulary's pieces are walked in sorted
// order, keeping the state after each prefix, so tokens that share a prefix share its work and
// a prefix the grammar refuses refuses every token under it at once.
#include "error.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum elem_type {
    E_END,        // end of a rule
    E_ALT,        // start of the next alternative
    E_RULE_REF,   // value: rule id
    E_CHAR,       // first member of a class (a literal's code point is a one-member class)
    E_CHAR_NOT,   // first member of a negated class
    E_CHAR_ALT,   // another member of the class
    E_RNG_UPPER,  // the previous member is the range [previous, value]
    E_CHAR_ANY,   // any code point
};

typedef struct {
    uint32_t type;
    uint32_t value;
} elem;

static int is_alt_end(uint32_t type) { return type == E_END || type == E_ALT; }

// The position where the alternative after the one starting at alt starts; -1 after the last.
static int32_t next_alt(const elem * e, int32_t alt) {
    while (!is_alt_end(e[alt].type)) {
        alt++;
    }
    return e[alt].type == E_END ? -1 : alt + 1;
}

// Growing arrays of int32 (element positions, stacks) and of elements.
typedef struct {
    int32_t * v;
    int32_t   n, cap;
} ivec;

typedef struct {
    elem *  v;
    int32_t n, cap;
} evec;

// A set of stacks: stack i is items.v[start.v[i] .. start.v[i + 1]) (start has n + 1 entries).
typedef struct {
    ivec items;
    ivec start;
} stack_set;

// Where the text read so far stands: the stacks, plus a code point still missing bytes.
typedef struct {
    stack_set stacks;
    uint32_t  cp;       // bits of the unfinished code point
    int32_t   pending;  // its continuation bytes still to come (0: none)
    int32_t   min_cp;   // smallest code point its length may encode (rejects overlong forms)
} parse_state;

// Limits that keep a hostile or mistaken grammar from exhausting memory.
enum {
    MAX_ELEMS       = 1 << 22,
    MAX_REPEAT      = 1 << 12,
    MAX_STACKS      = 1 << 14,
    MAX_STACK_DEPTH = 1 << 12,
    MAX_NESTING     = 1 << 9,  // parenthesised groups inside each other (the parser recurses)
};

struct ckv_grammar {
    evec    elems;       // every rule's elements, rule after rule
    ivec    rule_start;  // [n_rules] position of each rule's first element
    int32_t root;

    parse_state state;     // where the accepted text stands
    parse_state trial[2];  // scratch for ckv_grammar_allows / accept_text

    // Vocabulary (NULL without a model): pieces sorted by their bytes, for the mask.
    const ckv_model * model;
    int32_t           n_vocab;
    char *            piece_bytes;  // every piece, back to back
    int32_t *         piece_start;  // [n_vocab + 1] token t's bytes start at piece_start[t]
    uint8_t *         is_eog;       // [n_vocab]
    int32_t *         sorted;       // [n_sorted] tokens with a non-empty piece, by piece bytes
    int32_t *         lcp;          // [n_sorted] common prefix length with the previous one
    int32_t           n_sorted;
    int32_t           max_piece;
    parse_state *     depth;        // [max_piece + 1] state after each prefix of the walk
    uint8_t *         allowed;      // [n_vocab] the mask's result
};

// =============================================================================================
// Growing arrays
// =============================================================================================

static int32_t grow(void ** v, int32_t * cap, int32_t need, size_t size) {
    if (need <= *cap) {
        return CKV_OK;
    }
    int32_t new_cap = *cap ? *cap : 16;
    while (new_cap < need) {
        if (new_cap > INT32_MAX / 2) {
            return ckv_fail(CKV_ERR_OOM, "grammar: state too large");
        }
        new_cap *= 2;
    }
    void * p = realloc(*v, (size_t) new_cap * size);
    if (!p) {
        return ckv_fail(CKV_ERR_OOM, "grammar: out of memory");
    }
    *v   = p;
    *cap = new_cap;
    return CKV_OK;
}

static int32_t ivec_push(ivec * a, int32_t x) {
    TRY(grow((void **) &a->v, &a->cap, a->n + 1, sizeof(int32_t)));
    a->v[a->n++] = x;
    return CKV_OK;
}

static int32_t evec_push(evec * a, uint32_t type, uint32_t value) {
    if (a->n >= MAX_ELEMS) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "grammar: more than %d elements after expanding "
                        "repetitions", MAX_ELEMS);
    }
    TRY(grow((void **) &a->v, &a->cap, a->n + 1, sizeof(elem)));
    a->v[a->n++] = (elem) { type, value };
    return CKV_OK;
}

static void stack_set_clear(stack_set * s) {
    s->items.n = 0;
    s->start.n = 0;
}

static void stack_set_free(stack_set * s) {
    free(s->items.v);
    free(s->start.v);
    memset(s, 0, sizeof(*s));
}

static int32_t stack_count(const stack_set * s) { return s->start.n > 0 ? s->start.n - 1 : 0; }

// memcpy with a NULL pointer is undefined even for 0 bytes; empty arrays here have NULL data.
static void copy_ints(int32_t * dst, const int32_t * src, int32_t n) {
    if (n > 0) {
        memcpy(dst, src, (size_t) n * sizeof(int32_t));
    }
}

static int32_t stack_set_copy(stack_set * dst, const stack_set * src) {
    TRY(grow((void **) &dst->items.v, &dst->items.cap, src->items.n, sizeof(int32_t)));
    TRY(grow((void **) &dst->start.v, &dst->start.cap, src->start.n, sizeof(int32_t)));
    copy_ints(dst->items.v, src->items.v, src->items.n);
    copy_ints(dst->start.v, src->start.v, src->start.n);
    dst->items.n = src->items.n;
    dst->start.n = src->start.n;
    return CKV_OK;
}

// Adds stack[0..n) unless the set already holds it (equal stacks would only duplicate work).
static int32_t stack_set_add(stack_set * s, const int32_t * stack, int32_t n) {
    const int32_t count = stack_count(s);
    for (int32_t i = 0; i < count; i++) {
        const int32_t * other = s->items.v + s->start.v[i];
        if (s->start.v[i + 1] - s->start.v[i] == n &&
            (n == 0 || memcmp(other, stack, (size_t) n * sizeof(int32_t)) == 0)) {
            return CKV_OK;
        }
    }
    if (count >= MAX_STACKS) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "grammar: more than %d parse stacks at once (the "
                        "grammar is too ambiguous)", MAX_STACKS);
    }
    if (s->start.n == 0) {
        TRY(ivec_push(&s->start, 0));
    }
    TRY(grow((void **) &s->items.v, &s->items.cap, s->items.n + n, sizeof(int32_t)));
    copy_ints(s->items.v + s->items.n, stack, n);
    s->items.n += n;
    return ivec_push(&s->start, s->items.n);
}

static void parse_state_free(parse_state * p) { stack_set_free(&p->stacks); }

static int32_t parse_state_copy(parse_state * dst, const parse_state * src) {
    TRY(stack_set_copy(&dst->stacks, &src->stacks));
    dst->cp      = src->cp;
    dst->pending = src->pending;
    dst->min_cp  = src->min_cp;
    return CKV_OK;
}

// =============================================================================================
// Parsing GBNF
// =============================================================================================

typedef struct {
    const char * text;
    const char * p;
    // rule names, NUL-separated, and whether each was defined (not only referenced)
    ivec   name_start;  // [n_rules] offset into names
    char * names;
    int32_t names_len, names_cap;
    ivec    defined;  // [n_rules] 1 when a `name ::=` line defined it
    evec ** rules;    // [n_rules] each rule's elements while parsing (stable addresses: nested
                      // groups add rules while an outer rule is being filled)
    int32_t n_rules, rules_cap;
    int32_t * by_name;   // [name_slots] open-addressing table of rule ids by name hash, -1 empty
    int32_t   name_slots;
    int32_t   nesting;   // groups open at ps->p
} parser;

static int32_t parse_error(const parser * ps, const char * at, const char * what) {
    int32_t line = 1, col = 1;
    for (const char * q = ps->text; q < at && *q; q++) {
        if (*q == '\n') {
            line++;
            col = 1;
        } else {
            col++;
        }
    }
    return ckv_fail(CKV_ERR_INVALID_ARG, "grammar: line %d, column %d: %s", line, col, what);
}

static int is_name_char(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_';
}

// Skips blanks and comments; newlines too when newline_ok (inside parentheses, after | or ::=).
static const char * skip_space(const char * p, int newline_ok) {
    for (;;) {
        if (*p == ' ' || *p == '\t' || (newline_ok && (*p == '\n' || *p == '\r'))) {
            p++;
        } else if (*p == '#') {
            while (*p && *p != '\n') {
                p++;
            }
        } else {
            return p;
        }
    }
}

static const char * name_end(const char * p) {
    while (is_name_char(*p)) {
        p++;
    }
    return p;
}

static const char * rule_name(const parser * ps, int32_t id) { return ps->names + ps->name_start.v[id]; }

static uint32_t name_hash(const char * name, int32_t len) {
    uint32_t h = 2166136261u;  // FNV-1a
    for (int32_t i = 0; i < len; i++) {
        h = (h ^ (uint8_t) name[i]) * 16777619u;
    }
    return h;
}

// The slot of `name` in ps->by_name: the one holding it, or the empty one where it would go.
static int32_t name_slot(const parser * ps, const char * name, int32_t len) {
    const uint32_t mask = (uint32_t) ps->name_slots - 1;
    for (uint32_t i = name_hash(name, len) & mask;; i = (i + 1) & mask) {
        const int32_t id = ps->by_name[i];
        if (id < 0) {
            return (int32_t) i;
        }
        const char * other = ps->names + ps->name_start.v[id];
        if ((int32_t) strlen(other) == len && memcmp(other, name, (size_t) len) == 0) {
            return (int32_t) i;
        }
    }
}

// Keeps the name table at most half full (rehashing every rule when it doubles).
static int32_t reserve_names(parser * ps) {
    if (2 * (ps->n_rules + 1) <= ps->name_slots) {
        return CKV_OK;
    }
    const int32_t slots = ps->name_slots ? 2 * ps->name_slots : 64;
    int32_t *     table = malloc((size_t) slots * sizeof(int32_t));
    if (!table) {
        return ckv_fail(CKV_ERR_OOM, "grammar: out of memory");
    }
    free(ps->by_name);
    ps->by_name    = table;
    ps->name_slots = slots;
    memset(table, 0xFF, (size_t) slots * sizeof(int32_t));
    for (int32_t id = 0; id < ps->n_rules; id++) {
        const char * name = ps->names + ps->name_start.v[id];
        table[name_slot(ps, name, (int32_t) strlen(name))] = id;
    }
    return CKV_OK;
}

static int32_t new_rule(parser * ps, const char * name, int32_t len, int32_t * id) {
    TRY(reserve_names(ps));
    TRY(grow((void **) &ps->rules, &ps->rules_cap, ps->n_rules + 1, sizeof(evec *)));
    TRY(grow((void **) &ps->names, &ps->names_cap, ps->names_len + len + 1, 1));
    TRY(ivec_push(&ps->name_start, ps->names_len));
    TRY(ivec_push(&ps->defined, 0));
    memcpy(ps->names + ps->names_len, name, (size_t) len);
    ps->names[ps->names_len + len] = '\0';
    ps->names_len += len + 1;
    ps->rules[ps->n_rules] = calloc(1, sizeof(evec));
    if (!ps->rules[ps->n_rules]) {
        return ckv_fail(CKV_ERR_OOM, "grammar: out of memory");
    }
    *id = ps->n_rules++;
    ps->by_name[name_slot(ps, name, len)] = *id;
    return CKV_OK;
}

// The id of a rule name, creating an empty rule for a name not seen before.
static int32_t rule_id(parser * ps, const char * name, int32_t len, int32_t * id) {
    if (ps->name_slots > 0) {
        const int32_t found = ps->by_name[name_slot(ps, name, len)];
        if (found >= 0) {
            *id = found;
            return CKV_OK;
        }
    }
    return new_rule(ps, name, len, id);
}

// A fresh helper rule for a group or a repetition. Its name, "parent/N", cannot clash with a
// grammar's own names ('/' is not a name character); error messages show it.
static int32_t helper_rule(parser * ps, int32_t parent, int32_t * id) {
    char      name[96];
    const int len = snprintf(name, sizeof(name), "%.60s/%d", rule_name(ps, parent), ps->n_rules);
    TRY(new_rule(ps, name, len, id));
    ps->defined.v[*id] = 1;
    return CKV_OK;
}

static int hex_value(char c) {
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

// Reads one UTF-8 code point of the grammar text; 0 bytes consumed means malformed.
static int utf8_read(const char * p, uint32_t * cp) {
    const uint8_t b = (uint8_t) p[0];
    const int     n = b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 0;
    if (n == 0) {
        return 0;
    }
    uint32_t v = n == 1 ? b : (uint32_t) (b & (0x7F >> n));
    for (int i = 1; i < n; i++) {
        if (((uint8_t) p[i] & 0xC0) != 0x80) {
            return 0;
        }
        v = (v << 6) | ((uint8_t) p[i] & 0x3F);
    }
    *cp = v;
    return n;
}

// One character of a literal or class at ps->p, escapes included; advances ps->p.
static int32_t parse_char(parser * ps, uint32_t * cp) {
    const char * p = ps->p;
    if (*p != '\\') {
        const int n = utf8_read(p, cp);
        if (n == 0) {
            return parse_error(ps, p, "invalid UTF-8 in the grammar text");
        }
        ps->p = p + n;
        return CKV_OK;
    }
    const char e      = p[1];
    int        digits = e == 'x' ? 2 : e == 'u' ? 4 : e == 'U' ? 8 : 0;
    if (digits) {
        uint32_t v = 0;
        for (int i = 0; i < digits; i++) {
            const int h = hex_value(p[2 + i]);
            if (h < 0) {
                return parse_error(ps, p, "expected hex digits after \\x, \\u or \\U");
            }
            v = v * 16 + (uint32_t) h;
        }
        if (v > 0x10FFFF) {
            return parse_error(ps, p, "escaped code point above U+10FFFF");
        }
        *cp   = v;
        ps->p = p + 2 + digits;
        return CKV_OK;
    }
    switch (e) {
    case 'n': *cp = '\n'; break;
    case 'r': *cp = '\r'; break;
    case 't': *cp = '\t'; break;
    case '0': *cp = 0; break;
    case '\\': case '"': case '[': case ']': case '-': case '^': case '\'': *cp = (uint8_t) e; break;
    default: return parse_error(ps, p, "unknown escape sequence");
    }
    ps->p = p + 2;
    return CKV_OK;
}

static int32_t parse_alternates(parser * ps, int32_t rule, evec * out, int nested);

// Rewrites the symbol out[sym..n) as min..max repetitions (max < 0: unbounded).
static int32_t repeat_symbol(parser * ps, int32_t rule, evec * out, int32_t sym, int32_t min,
                             int32_t max) {
    const int32_t len = out->n - sym;
    if (len == 0) {
        return CKV_OK;  // an empty literal repeated is still empty
    }
    elem * s = malloc((size_t) len * sizeof(elem));
    if (!s) {
        return ckv_fail(CKV_ERR_OOM, "grammar: out of memory");
    }
    memcpy(s, out->v + sym, (size_t) len * sizeof(elem));
    out->n        = sym;
    int32_t st    = CKV_OK;
    for (int32_t i = 0; i < min && st == CKV_OK; i++) {
        for (int32_t j = 0; j < len && st == CKV_OK; j++) {
            st = evec_push(out, s[j].type, s[j].value);
        }
    }
    // The optional tail: r ::= s r | (unbounded), or r_k ::= s r_(k-1) | ... r_1 ::= s |
    int32_t tail = -1;
    const int32_t n_opt = max < 0 ? 1 : max - min;
    for (int32_t k = 0; k < n_opt && st == CKV_OK; k++) {
        int32_t r;
        st = helper_rule(ps, rule, &r);
        evec * body = ps->rules[r];
        for (int32_t j = 0; j < len && st == CKV_OK; j++) {
            st = evec_push(body, s[j].type, s[j].value);
        }
        const int32_t next = max < 0 ? r : tail;
        if (st == CKV_OK && next >= 0) {
            st = evec_push(body, E_RULE_REF, (uint32_t) next);
        }
        if (st == CKV_OK) {
            st = evec_push(body, E_ALT, 0);
        }
        if (st == CKV_OK) {
            st = evec_push(body, E_END, 0);
        }
        tail = r;
    }
    if (st == CKV_OK && tail >= 0) {
        st = evec_push(out, E_RULE_REF, (uint32_t) tail);
    }
    free(s);
    return st;
}

// The decimal number at p into *v, clamped just above MAX_REPEAT (so a huge count is reported,
// not wrapped); returns the position after it.
static const char * read_count(const char * p, int64_t * v) {
    for (*v = 0; *p >= '0' && *p <= '9'; p++) {
        *v = *v > MAX_REPEAT ? *v : *v * 10 + (*p - '0');
    }
    return p;
}

// {m}, {m,}, {m,n} at ps->p (just past '{').
static int32_t parse_braces(parser * ps, int32_t * min, int32_t * max) {
    const char * at = ps->p - 1;
    const char * p  = skip_space(ps->p, 0);
    int64_t      m = 0, n = -1;
    if (!(*p >= '0' && *p <= '9')) {
        return parse_error(ps, at, "expected a number after '{'");
    }
    p = skip_space(read_count(p, &m), 0);
    if (*p == ',') {
        p = skip_space(p + 1, 0);
        if (*p >= '0' && *p <= '9') {
            p = skip_space(read_count(p, &n), 0);
        }
    } else {
        n = m;
    }
    if (*p != '}') {
        return parse_error(ps, at, "expected '}' to close a repetition");
    }
    if (m > MAX_REPEAT || n > MAX_REPEAT) {
        return parse_error(ps, at, "repetition count too large");
    }
    if (n >= 0 && n < m) {
        return parse_error(ps, at, "repetition {m,n} with n < m");
    }
    ps->p = p + 1;
    *min  = (int32_t) m;
    *max  = (int32_t) n;
    return CKV_OK;
}

static int32_t parse_literal(parser * ps, evec * out) {
    const char * at = ps->p++;
    while (*ps->p != '"') {
        if (*ps->p == '\0' || *ps->p == '\n') {
            return parse_error(ps, at, "unterminated string literal");
        }
        uint32_t cp;
        TRY(parse_char(ps, &cp));
        TRY(evec_push(out, E_CHAR, cp));
    }
    ps->p++;
    return CKV_OK;
}

static int32_t parse_class(parser * ps, evec * out) {
    const char * at    = ps->p++;
    uint32_t     first = E_CHAR;
    if (*ps->p == '^') {
        first = E_CHAR_NOT;
        ps->p++;
    }
    const int32_t start = out->n;
    while (*ps->p != ']') {
        if (*ps->p == '\0' || *ps->p == '\n') {
            return parse_error(ps, at, "unterminated character class");
        }
        uint32_t lo;
        TRY(parse_char(ps, &lo));
        TRY(evec_push(out, out->n == start ? first : E_CHAR_ALT, lo));
        if (ps->p[0] == '-' && ps->p[1] != ']' && ps->p[1] != '\0') {
            ps->p++;
            uint32_t hi;
            TRY(parse_char(ps, &hi));
            if (hi < lo) {
                return parse_error(ps, at, "character range with its end before its start");
            }
            TRY(evec_push(out, E_RNG_UPPER, hi));
        }
    }
    if (out->n == start) {
        return parse_error(ps, at, "empty character class");
    }
    ps->p++;
    return CKV_OK;
}

static int32_t parse_sequence(parser * ps, int32_t rule, evec * out, int nested) {
    int32_t sym = -1;  // where the last symbol's elements start (what a repetition repeats)
    for (;;) {
        const char * at = ps->p;
        const char   c  = *at;
        if (c == '"') {
            sym = out->n;
            TRY(parse_literal(ps, out));
        } else if (c == '[') {
            sym = out->n;
            TRY(parse_class(ps, out));
        } else if (c == '.') {
            sym = out->n;
            TRY(evec_push(out, E_CHAR_ANY, 0));
            ps->p++;
        } else if (is_name_char(c)) {
            const char * end = name_end(at);
            int32_t      ref;
            TRY(rule_id(ps, at, (int32_t) (end - at), &ref));
            sym = out->n;
            TRY(evec_push(out, E_RULE_REF, (uint32_t) ref));
            ps->p = end;
        } else if (c == '(') {
            if (ps->nesting >= MAX_NESTING) {
                return parse_error(ps, at, "groups nested too deeply");
            }
            int32_t sub;
            TRY(helper_rule(ps, rule, &sub));
            ps->p = skip_space(at + 1, 1);
            ps->nesting++;
            TRY(parse_alternates(ps, sub, ps->rules[sub], 1));
            ps->nesting--;
            if (*ps->p != ')') {
                return parse_error(ps, at, "expected ')' to close this group");
            }
            ps->p++;
            sym = out->n;
            TRY(evec_push(out, E_RULE_REF, (uint32_t) sub));
        } else if (c == '*' || c == '+' || c == '?' || c == '{') {
            if (sym < 0) {
                return parse_error(ps, at, "a repetition must follow a symbol");
            }
            int32_t min = c == '+' ? 1 : 0, max = c == '?' ? 1 : -1;
            ps->p++;
            if (c == '{') {
                TRY(parse_braces(ps, &min, &max));
            }
            TRY(repeat_symbol(ps, rule, out, sym, min, max));
            sym = -1;  // x** is an error, as in llama.cpp
        } else if (c == '<' || c == '!') {
            return parse_error(ps, at, "token references (<[id]>, !<...>) are not supported");
        } else {
            return CKV_OK;
        }
        ps->p = skip_space(ps->p, nested);
    }
}

static int32_t parse_alternates(parser * ps, int32_t rule, evec * out, int nested) {
    TRY(parse_sequence(ps, rule, out, nested));
    while (*ps->p == '|') {
        TRY(evec_push(out, E_ALT, 0));
        ps->p = skip_space(ps->p + 1, 1);
        TRY(parse_sequence(ps, rule, out, nested));
    }
    return evec_push(out, E_END, 0);
}

static int32_t parse_rule(parser * ps) {
    const char * at  = ps->p;
    const char * end = name_end(at);
    if (end == at) {
        return parse_error(ps, at, "expected a rule name");
    }
    int32_t rule;
    TRY(rule_id(ps, at, (int32_t) (end - at), &rule));
    if (ps->defined.v[rule]) {
        return parse_error(ps, at, "rule defined twice");
    }
    ps->defined.v[rule] = 1;
    const char * p      = skip_space(end, 0);
    if (strncmp(p, "::=", 3) != 0) {
        return parse_error(ps, p, "expected '::='");
    }
    ps->p = skip_space(p + 3, 1);
    TRY(parse_alternates(ps, rule, ps->rules[rule], 0));
    if (*ps->p == '\r') {
        ps->p++;
    }
    if (*ps->p != '\n' && *ps->p != '\0') {
        return parse_error(ps, ps->p, "unexpected character");
    }
    return CKV_OK;
}

static void parser_free(parser * ps) {
    for (int32_t i = 0; i < ps->n_rules; i++) {
        free(ps->rules[i]->v);
        free(ps->rules[i]);
    }
    free(ps->rules);
    free(ps->by_name);
    free(ps->names);
    free(ps->name_start.v);
    free(ps->defined.v);
}

// =============================================================================================
// Checks after parsing
// =============================================================================================

// can_be_empty[r]: rule r matches the empty string. A worklist over alternatives: an
// alternative without terminals is empty once all the rules it references are, so each rule
// found empty settles the alternatives that reference it (linear in the grammar's size).
static int32_t nullable_rules(const ckv_grammar * g, int32_t n_rules, uint8_t * can_be_empty) {
    const elem *  e       = g->elems.v;
    const int32_t n_elems = g->elems.n;
    int32_t n_alts = 0, n_refs = 0;
    for (int32_t i = 0; i < n_elems; i++) {
        n_alts += is_alt_end(e[i].type);
        n_refs += e[i].type == E_RULE_REF;
    }
    int32_t * alt_rule  = malloc((size_t) n_alts * sizeof(int32_t));
    int32_t * pending   = calloc((size_t) n_alts, sizeof(int32_t));  // -1: has a terminal
    int32_t * use_start = calloc((size_t) n_rules + 1, sizeof(int32_t));
    int32_t * uses      = malloc(((size_t) n_refs + 1) * sizeof(int32_t));  // alternatives by rule used
    int32_t * queue     = malloc(((size_t) n_rules + 1) * sizeof(int32_t));
    int32_t   st        = CKV_OK;
    if (!alt_rule || !pending || !use_start || !uses || !queue) {
        st = ckv_fail(CKV_ERR_OOM, "grammar: out of memory");
    }
    memset(can_be_empty, 0, (size_t) n_rules);
    int32_t n_queued = 0;
    for (int pass = 0; pass < 2 && st == CKV_OK; pass++) {  // pass 0 counts uses, pass 1 fills them
        for (int32_t r = 0, a = 0; r < n_rules; r++) {
            for (int32_t i = g->rule_start.v[r];; i++) {
                if (is_alt_end(e[i].type)) {
                    alt_rule[a++] = r;
                    if (e[i].type == E_END) {
                        break;
                    }
                } else if (e[i].type == E_RULE_REF) {
                    if (pass == 0) {
                        use_start[e[i].value + 1]++;
                        pending[a] += pending[a] >= 0;
                    } else {
                        uses[use_start[e[i].value]++] = a;
                    }
                } else if (pass == 0 && e[i].type != E_RNG_UPPER && e[i].type != E_CHAR_ALT) {
                    pending[a] = -1;
                }
            }
        }
        for (int32_t r = 0; pass == 0 && r < n_rules; r++) {
            use_start[r + 1] += use_start[r];  // prefix sums: rule r's uses at [start[r], start[r+1])
        }
    }
    for (int32_t r = n_rules; st == CKV_OK && r > 0; r--) {
        use_start[r] = use_start[r - 1];  // pass 1 advanced each start to the next rule's
    }
    if (st == CKV_OK) {
        use_start[0] = 0;
        for (int32_t a = 0; a < n_alts; a++) {
            if (pending[a] == 0 && !can_be_empty[alt_rule[a]]) {
                can_be_empty[alt_rule[a]] = 1;
                queue[n_queued++]         = alt_rule[a];
            }
        }
    }
    for (int32_t q = 0; st == CKV_OK && q < n_queued; q++) {
        const int32_t r = queue[q];
        for (int32_t u = use_start[r]; u < use_start[r + 1]; u++) {
            const int32_t a = uses[u];
            if (pending[a] > 0 && --pending[a] == 0 && !can_be_empty[alt_rule[a]]) {
                can_be_empty[alt_rule[a]] = 1;
                queue[n_queued++]         = alt_rule[a];
            }
        }
    }
    free(alt_rule);
    free(pending);
    free(use_start);
    free(uses);
    free(queue);
    return st;
}

// Depth-first search over "r can start with s" edges (s referenced after only elements that
// can be empty), with an explicit stack: a chain of rules may be as long as the grammar.
// color: 0 unseen, 1 on the current path, 2 done.
static int32_t find_left_cycles(const ckv_grammar * g, const uint8_t * can_be_empty, int32_t n_rules,
                                const parser * ps) {
    typedef struct {
        int32_t rule, pos, at_start;
    } frame;
    uint8_t * color = calloc((size_t) n_rules, 1);
    frame *   path  = malloc((size_t) n_rules * sizeof(frame));  // a rule is on the path once
    int32_t   st    = color && path ? CKV_OK : ckv_fail(CKV_ERR_OOM, "grammar: out of memory");
    for (int32_t root = 0; root < n_rules && st == CKV_OK; root++) {
        if (color[root]) {
            continue;
        }
        int32_t top = 0;
        path[0]     = (frame) {root, g->rule_start.v[root], 1};
        color[root] = 1;
        while (top >= 0 && st == CKV_OK) {
            frame *    f = &path[top];
            const elem e = g->elems.v[f->pos];
            if (e.type == E_END) {  // rule done: back in the caller, past its reference
                color[f->rule] = 2;
                if (--top >= 0) {
                    path[top].at_start &= can_be_empty[f->rule];
                    path[top].pos++;
                }
                continue;
            }
            if (e.type == E_ALT) {
                f->at_start = 1;
            } else if (f->at_start && e.type == E_RULE_REF) {
                const int32_t s = (int32_t) e.value;
                if (color[s] == 1) {
                    st = ckv_fail(CKV_ERR_INVALID_ARG, "grammar: rule '%s' can reach itself without "
                                  "reading a character (left recursion, or a repetition of something "
                                  "that can be empty)", rule_name(ps, s));
                    break;
                }
                if (color[s] == 0) {
                    color[s]    = 1;
                    path[++top] = (frame) {s, g->rule_start.v[s], 1};
                    continue;  // its END moves this frame past the reference
                }
                f->at_start = can_be_empty[s];
            } else if (e.type != E_RNG_UPPER && e.type != E_CHAR_ALT && e.type != E_RULE_REF) {
                f->at_start = 0;  // a terminal
            }
            f->pos++;
        }
    }
    free(color);
    free(path);
    return st;
}

static int32_t check_rules(const ckv_grammar * g, const parser * ps) {
    for (int32_t r = 0; r < ps->n_rules; r++) {
        if (!ps->defined.v[r]) {
            return ckv_fail(CKV_ERR_INVALID_ARG, "grammar: rule '%s' is used but not defined",
                            rule_name(ps, r));
        }
    }
    uint8_t * can_be_empty = malloc((size_t) ps->n_rules);
    int32_t   st = can_be_empty ? nullable_rules(g, ps->n_rules, can_be_empty)
                                : ckv_fail(CKV_ERR_OOM, "grammar: out of memory");
    if (st == CKV_OK) {
        st = find_left_cycles(g, can_be_empty, ps->n_rules, ps);
    }
    free(can_be_empty);
    return st;
}

// Parses the text and lays the rules out in g->elems.
static int32_t compile(ckv_grammar * g, const char * text, const char * root) {
    parser ps = { .text = text, .p = text };
    int32_t st = CKV_OK;
    ps.p       = skip_space(ps.p, 1);
    while (*ps.p && st == CKV_OK) {
        st   = parse_rule(&ps);
        ps.p = skip_space(ps.p, 1);
    }
    if (st == CKV_OK && ps.n_rules == 0) {
        st = ckv_fail(CKV_ERR_INVALID_ARG, "grammar: no rules");
    }
    for (int32_t r = 0; r < ps.n_rules && st == CKV_OK; r++) {
        st = ivec_push(&g->rule_start, g->elems.n);
        for (int32_t i = 0; i < ps.rules[r]->n && st == CKV_OK; i++) {
            st = evec_push(&g->elems, ps.rules[r]->v[i].type, ps.rules[r]->v[i].value);
        }
    }
    if (st == CKV_OK) {
        st = check_rules(g, &ps);
    }
    g->root = -1;
    for (int32_t r = 0; r < ps.n_rules && st == CKV_OK; r++) {
        if (strcmp(rule_name(&ps, r), root) == 0) {
            g->root = r;
        }
    }
    if (st == CKV_OK && g->root < 0) {
        st = ckv_fail(CKV_ERR_INVALID_ARG, "grammar: no rule named '%s' (the start rule)", root);
    }
    parser_free(&ps);
    return st;
}

// =============================================================================================
// Matching code points
// =============================================================================================

// Adds to out every stack that stack[0..n) becomes once its top is a terminal. tmp holds the
// stacks being built (by index: pushes may move it).
static int32_t expand(const ckv_grammar * g, ivec * tmp, int32_t base, int32_t n, stack_set * out,
                      int32_t depth) {
    // n bounds the nesting of the text; depth the recursion here (a chain of rules that each
    // just name the next one recurses without growing the stack).
    if (n > MAX_STACK_DEPTH || depth > MAX_STACK_DEPTH) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "grammar: nesting deeper than %d", MAX_STACK_DEPTH);
    }
    if (n == 0) {
        return stack_set_add(out, tmp->v + base, 0);
    }
    const int32_t pos = tmp->v[base + n - 1];
    const elem    e   = g->elems.v[pos];
    if (is_alt_end(e.type)) {  // this alternative is done: resume the rule below
        return expand(g, tmp, base, n - 1, out, depth + 1);
    }
    if (e.type != E_RULE_REF) {
        return stack_set_add(out, tmp->v + base, n);
    }
    // Resume after the reference, unless the alternative ends there (no stack growth).
    const int32_t keep = is_alt_end(g->elems.v[pos + 1].type) ? n - 1 : n;
    for (int32_t alt = g->rule_start.v[e.value]; alt >= 0; alt = next_alt(g->elems.v, alt)) {
        const int32_t child = tmp->n;
        for (int32_t i = 0; i < keep; i++) {
            TRY(ivec_push(tmp, tmp->v[base + i]));
        }
        if (keep == n) {
            tmp->v[child + n - 1] = pos + 1;
        }
        TRY(ivec_push(tmp, alt));
        TRY(expand(g, tmp, child, keep + 1, out, depth + 1));
        tmp->n = child;
    }
    return CKV_OK;
}

// Whether the class at pos contains a code point in [lo, hi] (all of it for a negated class
// means none excluded covers the whole range); *after = the position past the class.
static int class_overlaps(const ckv_grammar * g, int32_t pos, uint32_t lo, uint32_t hi, int32_t * after) {
    const elem * e = g->elems.v;
    if (e[pos].type == E_CHAR_ANY) {
        *after = pos + 1;
        return 1;
    }
    const int negated = e[pos].type == E_CHAR_NOT;
    int       hit     = 0;
    do {
        uint32_t a = e[pos].value, b = a;
        if (e[pos + 1].type == E_RNG_UPPER) {
            b = e[++pos].value;
        }
        hit |= negated ? (a <= lo && hi <= b) : (a <= hi && lo <= b);
        pos++;
    } while (e[pos].type == E_CHAR_ALT);
    *after = pos;
    return negated ? !hit : hit;
}

// The stacks after reading code point cp from `from`, into `to` (cleared first).
static int32_t advance(const ckv_grammar * g, const stack_set * from, uint32_t cp, stack_set * to,
                       ivec * tmp) {
    stack_set_clear(to);
    const int32_t count = stack_count(from);
    for (int32_t i = 0; i < count; i++) {
        const int32_t s = from->start.v[i], n = from->start.v[i + 1] - s;
        int32_t       after;
        if (n == 0 || !class_overlaps(g, from->items.v[s + n - 1], cp, cp, &after)) {
            continue;
        }
        tmp->n = 0;
        for (int32_t k = 0; k < n; k++) {
            TRY(ivec_push(tmp, from->items.v[s + k]));
        }
        tmp->v[n - 1] = after;
        TRY(expand(g, tmp, 0, n, to, 0));
    }
    return CKV_OK;
}

// Whether some stack could take a code point in [lo, hi] (an unfinished code point's range).
static int any_overlaps(const ckv_grammar * g, const stack_set * set, uint32_t lo, uint32_t hi) {
    const int32_t count = stack_count(set);
    for (int32_t i = 0; i < count; i++) {
        const int32_t s = set->start.v[i], n = set->start.v[i + 1] - s;
        int32_t       after;
        if (n > 0 && class_overlaps(g, set->items.v[s + n - 1], lo, hi, &after)) {
            return 1;
        }
    }
    return 0;
}

static int has_empty_stack(const stack_set * set) {
    const int32_t count = stack_count(set);
    for (int32_t i = 0; i < count; i++) {
        if (set->start.v[i + 1] == set->start.v[i]) {
            return 1;
        }
    }
    return 0;
}

// The range of code points an unfinished UTF-8 sequence can still become.
static void pending_range(const parse_state * s, uint32_t * lo, uint32_t * hi) {
    const int shift = 6 * s->pending;
    *lo             = s->cp << shift;
    *hi             = *lo | ((1u << shift) - 1);
    if (*lo < (uint32_t) s->min_cp) {
        *lo = (uint32_t) s->min_cp;
    }
    if (*hi > 0x10FFFF) {
        *hi = 0x10FFFF;
    }
}

// Reads one byte: `to` = `from` after it. *alive = 1 when the text can still go on, 0 when the
// grammar (or UTF-8) refuses it (`to` is then unspecified).
static int32_t step_byte(const ckv_grammar * g, const parse_state * from, uint8_t b, parse_state * to,
                         ivec * tmp, int * alive) {
    *alive = 0;
    if (from->pending == 0) {
        if (b < 0x80) {
            to->cp = to->pending = to->min_cp = 0;
            TRY(advance(g, &from->stacks, b, &to->stacks, tmp));
            *alive = stack_count(&to->stacks) > 0;
            return CKV_OK;
        }
        const int n = (b >> 5) == 6 ? 1 : (b >> 4) == 14 ? 2 : (b >> 3) == 30 ? 3 : 0;
        if (n == 0) {
            return CKV_OK;  // a continuation byte or 0xF8+ cannot start a code point
        }
        to->cp      = b & (0x3F >> n);
        to->pending = n;
        to->min_cp  = n == 1 ? 0x80 : n == 2 ? 0x800 : 0x10000;
    } else {
        if ((b & 0xC0) != 0x80) {
            return CKV_OK;
        }
        to->cp      = (from->cp << 6) | (b & 0x3F);
        to->pending = from->pending - 1;
        to->min_cp  = from->min_cp;
    }
    uint32_t lo, hi;
    pending_range(to, &lo, &hi);
    if (lo > hi || (lo >= 0xD800 && hi <= 0xDFFF)) {
        return CKV_OK;  // overlong, above U+10FFFF or a surrogate
    }
    if (to->pending > 0) {  // keep the stacks; go on only if some class can still take it
        TRY(stack_set_copy(&to->stacks, &from->stacks));
        *alive = any_overlaps(g, &to->stacks, lo, hi);
        return CKV_OK;
    }
    TRY(advance(g, &from->stacks, to->cp, &to->stacks, tmp));
    *alive = stack_count(&to->stacks) > 0;
    return CKV_OK;
}

static int32_t start_state(ckv_grammar * g, parse_state * s) {
    stack_set_clear(&s->stacks);
    s->cp = 0;
    s->pending = 0;
    s->min_cp  = 0;
    ivec tmp   = { 0 };
    int32_t st = CKV_OK;
    for (int32_t alt = g->rule_start.v[g->root]; alt >= 0 && st == CKV_OK;
         alt = next_alt(g->elems.v, alt)) {
        tmp.n = 0;
        st    = ivec_push(&tmp, alt);
        if (st == CKV_OK) {
            st = expand(g, &tmp, 0, 1, &s->stacks, 0);
        }
    }
    free(tmp.v);
    return st;
}

// Runs bytes from `from`; *alive says whether all of them were taken. Uses g->trial.
static int32_t run_bytes(ckv_grammar * g, const parse_state * from, const char * bytes, int32_t n,
                         ivec * tmp, int * alive, parse_state ** end) {
    const parse_state * cur = from;
    *alive                  = 1;
    for (int32_t i = 0; i < n && *alive; i++) {
        parse_state * next = &g->trial[i & 1];
        TRY(step_byte(g, cur, (uint8_t) bytes[i], next, tmp, alive));
        cur = next;
    }
    *end = (parse_state *) cur;
    return CKV_OK;
}

// =============================================================================================
// Vocabulary
// =============================================================================================

static const char * piece(const ckv_grammar * g, ckv_token t, int32_t * len) {
    *len = g->piece_start[t + 1] - g->piece_start[t];
    return g->piece_bytes + g->piece_start[t];
}

// qsort takes no context argument; thread-local so grammars can be made on several threads.
static _Thread_local const ckv_grammar * sort_grammar;

static int compare_pieces(const void * pa, const void * pb) {
    const int32_t a = *(const int32_t *) pa, b = *(const int32_t *) pb;
    int32_t       la, lb;
    const char *  xa = piece(sort_grammar, a, &la), * xb = piece(sort_grammar, b, &lb);
    const int     c  = memcmp(xa, xb, (size_t) (la < lb ? la : lb));
    return c ? c : la != lb ? (la < lb ? -1 : 1) : (a < b ? -1 : 1);
}

static int32_t load_vocab(ckv_grammar * g, const ckv_model * model) {
    const int32_t n = ckv_vocab_n_tokens(model);
    if (n <= 0) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_grammar_init: the model has no vocabulary");
    }
    g->model       = model;
    g->n_vocab     = n;
    g->piece_start = malloc(((size_t) n + 1) * sizeof(int32_t));
    g->is_eog      = calloc((size_t) n, 1);
    g->sorted      = malloc((size_t) n * sizeof(int32_t));
    g->lcp         = malloc((size_t) n * sizeof(int32_t));
    g->allowed     = calloc((size_t) n, 1);
    if (!g->piece_start || !g->is_eog || !g->sorted || !g->lcp || !g->allowed) {
        return ckv_fail(CKV_ERR_OOM, "ckv_grammar_init: out of memory");
    }
    int32_t cap = 0, used = 0;
    for (int32_t t = 0; t < n; t++) {
        g->piece_start[t] = used;
        g->is_eog[t]      = ckv_token_is_eog(model, t);
        // special = false: control tokens render empty, so the grammar never takes them.
        int32_t need = 0;
        TRY(grow((void **) &g->piece_bytes, &cap, used + 64, 1));
        int32_t st = ckv_token_to_piece(model, t, g->piece_bytes + used, cap - used, false, &need);
        if (st == CKV_ERR_BUFFER_TOO_SMALL) {
            TRY(grow((void **) &g->piece_bytes, &cap, used + need, 1));
            st = ckv_token_to_piece(model, t, g->piece_bytes + used, cap - used, false, &need);
        }
        TRY(st);
        used += need;
        if (need > g->max_piece) {
            g->max_piece = need;
        }
        if (need > 0 && !g->is_eog[t]) {
            g->sorted[g->n_sorted++] = t;
        }
    }
    g->piece_start[n] = used;
    sort_grammar      = g;
    qsort(g->sorted, (size_t) g->n_sorted, sizeof(int32_t), compare_pieces);
    for (int32_t i = 0; i < g->n_sorted; i++) {
        int32_t l = 0;
        if (i > 0) {
            int32_t      la, lb;
            const char * pa = piece(g, g->sorted[i - 1], &la), * pb = piece(g, g->sorted[i], &lb);
            while (l < la && l < lb && pa[l] == pb[l]) {
                l++;
            }
        }
        g->lcp[i] = l;
    }
    g->depth = calloc((size_t) g->max_piece + 1, sizeof(parse_state));
    return g->depth ? CKV_OK : ckv_fail(CKV_ERR_OOM, "ckv_grammar_init: out of memory");
}

// Whether a walk that ended in state s leaves a token allowed: some stack can take the next
// character (or the unfinished one).
static int ends_alive(const ckv_grammar * g, const parse_state * s) {
    if (s->pending == 0) {
        return stack_count(&s->stacks) > 0;
    }
    uint32_t lo, hi;
    pending_range(s, &lo, &hi);
    return any_overlaps(g, &s->stacks, lo, hi);
}

// Fills g->allowed for the current state: the sorted walk described at the top. depth[k] is the
// state after the first k bytes of the last walked token; the next token reuses the states of
// the prefix they share.
static int32_t compute_mask(ckv_grammar * g, const float * logits, int32_t * n_allowed) {
    memset(g->allowed, 0, (size_t) g->n_vocab);
    ivec    tmp    = { 0 };
    int32_t st     = parse_state_copy(&g->depth[0], &g->state);
    int32_t dead   = INT32_MAX;  // the last walked token was refused after this many bytes
    int32_t shared = 0;          // common prefix with the last walked token
    int32_t count  = 0;
    for (int32_t i = 0; i < g->n_sorted && st == CKV_OK; i++) {
        shared = g->lcp[i] < shared ? g->lcp[i] : shared;
        const ckv_token t = g->sorted[i];
        if (logits && logits[t] == -INFINITY) {
            continue;  // masked already: no need to walk it
        }
        if (dead <= shared) {
            continue;  // it starts with a prefix the grammar refused
        }
        int32_t      len;
        const char * bytes = piece(g, t, &len);
        int32_t      d     = shared;  // depth[0..shared] are this token's prefix states
        int          alive = 1;
        while (d < len && alive && st == CKV_OK) {
            st = step_byte(g, &g->depth[d], (uint8_t) bytes[d], &g->depth[d + 1], &tmp, &alive);
            d++;
        }
        dead   = alive ? INT32_MAX : d;
        shared = len;
        if (alive && st == CKV_OK && ends_alive(g, &g->depth[len])) {
            g->allowed[t] = 1;
            count++;
        }
    }
    // End-of-generation tokens: allowed exactly when the text may end here.
    const bool can_end = ckv_grammar_is_complete(g);
    for (int32_t t = 0; t < g->n_vocab && can_end; t++) {
        if (g->is_eog[t] && !(logits && logits[t] == -INFINITY)) {
            g->allowed[t] = 1;
            count++;
        }
    }
    free(tmp.v);
    *n_allowed = count;
    return st;
}

// =============================================================================================
// Public API
// =============================================================================================

void ckv_grammar_free(ckv_grammar * g) {
    if (!g) {
        return;
    }
    free(g->elems.v);
    free(g->rule_start.v);
    parse_state_free(&g->state);
    parse_state_free(&g->trial[0]);
    parse_state_free(&g->trial[1]);
    for (int32_t d = 0; g->depth && d <= g->max_piece; d++) {
        parse_state_free(&g->depth[d]);
    }
    free(g->depth);
    free(g->piece_bytes);
    free(g->piece_start);
    free(g->is_eog);
    free(g->sorted);
    free(g->lcp);
    free(g->allowed);
    free(g);
}

int32_t ckv_grammar_init(const ckv_model * model, const char * gbnf, const char * root,
                         ckv_grammar ** out) {
    ckv_clear_error();
    if (!gbnf || !out) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_grammar_init: gbnf and out must not be NULL");
    }
    *out           = NULL;
    ckv_grammar * g = calloc(1, sizeof(*g));
    if (!g) {
        return ckv_fail(CKV_ERR_OOM, "ckv_grammar_init: out of memory");
    }
    int32_t st = compile(g, gbnf, root ? root : "root");
    if (st == CKV_OK) {
        st = start_state(g, &g->state);
    }
    if (st == CKV_OK && model) {
        st = load_vocab(g, model);
    }
    if (st != CKV_OK) {
        ckv_grammar_free(g);
        return st;
    }
    *out = g;
    return CKV_OK;
}

int32_t ckv_grammar_reset(ckv_grammar * g) {
    ckv_clear_error();
    if (!g) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_grammar_reset: grammar is NULL");
    }
    return start_state(g, &g->state);
}

bool ckv_grammar_is_complete(const ckv_grammar * g) {
    return g && g->state.pending == 0 && has_empty_stack(&g->state.stacks);
}

int32_t ckv_grammar_accept_text(ckv_grammar * g, const char * text, int32_t len, bool * accepted) {
    ckv_clear_error();
    if (!g || (!text && len > 0) || len < 0 || !accepted) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_grammar_accept_text: bad arguments");
    }
    ivec          tmp = { 0 };
    int           alive;
    parse_state * end;
    int32_t       st = run_bytes(g, &g->state, text, len, &tmp, &alive, &end);
    free(tmp.v);
    *accepted = st == CKV_OK && alive;
    if (*accepted && end != &g->state) {
        st = parse_state_copy(&g->state, end);
    }
    return st;
}

static int32_t check_token(const ckv_grammar * g, ckv_token token, const char * fn) {
    if (!g || !g->model) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "%s: the grammar was made without a model", fn);
    }
    if (token < 0 || token >= g->n_vocab) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "%s: token %d is outside the vocabulary (%d)", fn,
                        token, g->n_vocab);
    }
    return CKV_OK;
}

// Runs a token from the current state; *end is where it leaves the text (a trial state).
static int32_t try_token(ckv_grammar * g, ckv_token token, bool * allowed, parse_state ** end) {
    *end = &g->state;
    if (g->is_eog[token]) {
        *allowed = ckv_grammar_is_complete(g);
        return CKV_OK;
    }
    int32_t      len;
    const char * bytes = piece(g, token, &len);
    if (len == 0) {
        *allowed = false;
        return CKV_OK;
    }
    ivec    tmp = { 0 };
    int     alive;
    int32_t st = run_bytes(g, &g->state, bytes, len, &tmp, &alive, end);
    free(tmp.v);
    *allowed = st == CKV_OK && alive && ends_alive(g, *end);
    return st;
}

int32_t ckv_grammar_allows(ckv_grammar * g, ckv_token token, bool * allowed) {
    ckv_clear_error();
    TRY(check_token(g, token, "ckv_grammar_allows"));
    if (!allowed) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_grammar_allows: allowed is NULL");
    }
    parse_state * end;
    return try_token(g, token, allowed, &end);
}

int32_t ckv_grammar_accept_token(ckv_grammar * g, ckv_token token) {
    ckv_clear_error();
    TRY(check_token(g, token, "ckv_grammar_accept_token"));
    bool          allowed;
    parse_state * end;
    TRY(try_token(g, token, &allowed, &end));
    if (!allowed) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_grammar_accept_token: the grammar does not "
                        "allow token %d here", token);
    }
    if (g->is_eog[token]) {  // the text is complete: nothing may follow
        stack_set_clear(&g->state.stacks);
        return stack_set_add(&g->state.stacks, NULL, 0);
    }
    return parse_state_copy(&g->state, end);
}

int32_t ckv_grammar_apply(ckv_grammar * g, float * logits, int32_t n_vocab, int32_t * n_allowed) {
    ckv_clear_error();
    if (!g || !g->model || !logits) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_grammar_apply: needs a grammar made with a "
                        "model and a logits row");
    }
    if (n_vocab != g->n_vocab) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_grammar_apply: n_vocab %d, the model has %d",
                        n_vocab, g->n_vocab);
    }
    int32_t count = 0;
    TRY(compute_mask(g, logits, &count));
    for (int32_t t = 0; t < n_vocab; t++) {
        if (!g->allowed[t]) {
            logits[t] = -INFINITY;
        }
    }
    if (n_allowed) {
        *n_allowed = count;
    }
    if (count == 0) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_grammar_apply: no token can continue the "
                        "text under the grammar");
    }
    return CKV_OK;
}
