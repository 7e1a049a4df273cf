// fuzz_load.c - the target of tools/fuzz_gguf.py: loads one (mutated) GGUF through the public
// API and uses it the way an application would: tokenize with special tokens, detokenize, render
// every token's piece, decode the tokens. A clean error at any step is a pass; only a crash or a
// sanitizer report fails (the script builds this against an ASan + UBSan library).
#include <stdio.h>
#include <string.h>

#include "clusterkv.h"

enum { MAX_TOKENS = 256, N_DECODE = 32 };

static int fail(const char * step) {
    printf("%s: %s\n", step, ckv_last_error());
    return 0;
}

static int use_model(const ckv_model * model) {
    const char * text = "Hello w\xc3\xb6rld <|end_of_text|> 123 \xf0\x9f\x98\x80";
    ckv_token    tokens[MAX_TOKENS];
    int32_t      n = 0;
    if (ckv_tokenize(model, text, (int32_t) strlen(text), tokens, MAX_TOKENS, true, true, &n) != 0) {
        return fail("tokenize");
    }
    n = n < MAX_TOKENS ? n : MAX_TOKENS;
    char    buf[4096];
    int32_t needed;
    if (ckv_detokenize(model, tokens, n, buf, sizeof(buf), true, &needed) != 0) {
        return fail("detokenize");
    }
    for (int32_t i = 0; i < n; i++) {
        if (ckv_token_to_piece(model, tokens[i], buf, sizeof(buf), true, &needed) != 0) {
            return fail("token_to_piece");
        }
    }
    struct ckv_context_params cp;
    ckv_context_default_params(&cp);
    cp.n_ctx     = 64;
    cp.n_threads = 1;
    ckv_context * ctx = NULL;
    if (ckv_context_init(model, &cp, &ctx) != 0) {
        return fail("context");
    }
    int32_t st = n > 0 ? ckv_decode(ctx, tokens, n < N_DECODE ? n : N_DECODE, false) : 0;
    if (st == 0) {
        printf("ok: %d tokens\n", n);
    } else {
        fail("decode");
    }
    ckv_context_free(ctx);
    return 0;
}

int main(int argc, char ** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s FILE.gguf\n", argv[0]);
        return 2;
    }
    struct ckv_model_params mp;
    ckv_model_default_params(&mp);
    ckv_model * model = NULL;
    if (ckv_model_load(argv[1], &mp, &model) != 0) {
        return fail("load");
    }
    int rc = use_model(model);
    ckv_model_free(model);
    return rc;
}
