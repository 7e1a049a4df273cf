// test-grammar.c - the GBNF engine (grammar.c) through the C API, without a model: every
// path that compiles, refuses or frees a grammar, so a sanitized build (-DCKV_SANITIZE=ON,
// leak checking on) sees each allocation of the error paths released. The acceptance logic
// itself is tested against Python's re and an NFA in tests/python/test_grammar.py.
// Prints "N passed, M failed".
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clusterkv.h"

#include "check.h"

// Whether the whole text is a sentence of the grammar (a fresh state each time).
static bool accepts(ckv_grammar * g, const char * text) {
    bool ok = false;
    CHECK(ckv_grammar_reset(g) == CKV_OK, "reset");
    CHECK(ckv_grammar_accept_text(g, text, (int32_t) strlen(text), &ok) == CKV_OK, "accept_text");
    return ok && ckv_grammar_is_complete(g);
}

static void test_valid(void) {
    ckv_grammar * g = NULL;
    const char *  json_ish =
        "root   ::= object\n"
        "object ::= \"{\" ( pair ( \",\" pair )* )? \"}\"\n"
        "pair   ::= str \":\" value\n"
        "value  ::= object | str | [0-9]+ | \"true\" # a comment\n"
        "str    ::= \"\\\"\" [^\"\\\\]* \"\\\"\"\n";
    CHECK(ckv_grammar_init(NULL, json_ish, NULL, &g) == CKV_OK, "compile: %s", ckv_last_error());
    if (g) {
        CHECK(accepts(g, "{}"), "{}");
        CHECK(accepts(g, "{\"a\":{\"b\":12},\"c\":true}"), "nested");
        CHECK(!accepts(g, "{\"a\":}"), "missing value");
        CHECK(!accepts(g, "{\"a\":1"), "unclosed");
        bool ok = true;
        CHECK(ckv_grammar_reset(g) == CKV_OK && ckv_grammar_accept_text(g, "{\"a\"", 4, &ok) == CKV_OK && ok,
              "a prefix is taken");
        CHECK(ckv_grammar_accept_text(g, "}", 1, &ok) == CKV_OK && !ok, "a wrong continuation is refused");
        CHECK(ckv_grammar_accept_text(g, ":1}", 3, &ok) == CKV_OK && ok && ckv_grammar_is_complete(g),
              "the state was left as it was by the refusal");
        CHECK(ckv_grammar_allows(g, 0, &ok) == CKV_ERR_INVALID_ARG, "token calls need a model");
        float logits[4] = {0};
        CHECK(ckv_grammar_apply(g, logits, 4, NULL) == CKV_ERR_INVALID_ARG, "apply needs a model");
        ckv_grammar_free(g);
    }
    g = NULL;
    CHECK(ckv_grammar_init(NULL, "start ::= \"x\"{2,3}", "start", &g) == CKV_OK, "named start rule");
    if (g) {
        CHECK(!accepts(g, "x") && accepts(g, "xx") && accepts(g, "xxx") && !accepts(g, "xxxx"), "{2,3}");
        ckv_grammar_free(g);
    }
}

static void test_refused(void) {
    const char * bad[] = {
        "root ::= x",                       // undefined rule
        "root ::= root \"a\" | \"b\"",      // left recursion
        "root ::= (\"a\"?)*",               // a repetition of something empty
        "root ::= \"abc",                   // unterminated literal
        "root ::= [b-a]",                   // reversed range
        "root ::= \"a\"{5,2}",              // n < m
        "root ::= ( \"a\" | ( \"b\"",       // unclosed groups (helper rules already made)
        "root ::= \"a\"\nroot ::= \"b\"",   // defined twice
        "",                                  // no rules
        "root ::= \"\\xZZ\"",               // bad escape
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        ckv_grammar * g = (ckv_grammar *) &g;  // must be reset to NULL on failure
        CHECK(ckv_grammar_init(NULL, bad[i], NULL, &g) == CKV_ERR_INVALID_ARG && g == NULL &&
                  strstr(ckv_last_error(), "grammar") != NULL,
              "grammar %zu refused: %s", i, ckv_last_error());
    }
    ckv_grammar * g = NULL;
    CHECK(ckv_grammar_init(NULL, "root ::= \"a\"", "missing", &g) == CKV_ERR_INVALID_ARG && !g, "no such start rule");
    CHECK(ckv_grammar_init(NULL, NULL, NULL, &g) == CKV_ERR_INVALID_ARG, "NULL text");
    CHECK(ckv_grammar_reset(NULL) == CKV_ERR_INVALID_ARG && !ckv_grammar_is_complete(NULL), "NULL grammar");
    ckv_grammar_free(NULL);
}

// Deep nesting is an error, not a stack overflow: groups (the parser recurses) and chains of
// rules (the expansion recurses).
static void test_deep(void) {
    const int n     = 20000;
    char *    text  = malloc((size_t) n * 32 + 64);
    char *    p     = text;
    p += sprintf(p, "root ::= ");
    for (int i = 0; i < n; i++) *p++ = '(';
    p += sprintf(p, "\"a\"");
    for (int i = 0; i < n; i++) *p++ = ')';
    *p = '\0';
    ckv_grammar * g = NULL;
    CHECK(ckv_grammar_init(NULL, text, NULL, &g) == CKV_ERR_INVALID_ARG && strstr(ckv_last_error(), "nested"),
          "deep groups: %s", ckv_last_error());
    p = text + sprintf(text, "root ::= a0\n");
    for (int i = 0; i < n; i++) p += sprintf(p, "a%d ::= a%d\n", i, i + 1);
    sprintf(p, "a%d ::= \"x\"\n", n);
    CHECK(ckv_grammar_init(NULL, text, NULL, &g) == CKV_ERR_INVALID_ARG && strstr(ckv_last_error(), "deeper"),
          "a long chain of rules: %s", ckv_last_error());
    free(text);
}

int main(void) {
    test_valid();
    test_refused();
    test_deep();
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
