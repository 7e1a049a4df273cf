// test-tokenizer.c - the tokenizer's building blocks in C: lenient UTF-8 decoding (the
// llama.cpp rules: overlong forms and surrogates decode, a bad byte is one U+FFFD), encoding,
// code point flags of the generated Unicode 15.1 tables, lowercase, the GPT-2 byte alphabet;
// then, for each model found in the registry cache ($CLUSTERKV_MODELS_DIR or ~/.cache/clusterkv_local/models), a few ids recorded
// from llama.cpp and a byte-exact round trip. The full comparison with llama.cpp is
// tests/python/test_tokenizer.py. Missing models are skipped. Prints "N passed, M failed".
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clusterkv.h"
#include "gguf.h"
#include "tokenizer.h"
#include "unicode.h"

#include "check.h"

static void check_decode(const char * s, size_t n, uint32_t want_cpt, size_t want_len) {
    size_t         off = 0;
    const uint32_t cpt = unicode_utf8_decode(s, n, &off);
    CHECK(cpt == want_cpt && off == want_len, "decode %02x..: got U+%04X/%zu, want U+%04X/%zu",
          (uint8_t) s[0], cpt, off, want_cpt, want_len);
}

static void test_utf8(void) {
    check_decode("a", 1, 'a', 1);
    check_decode("\xC3\xA9", 2, 0xE9, 2);
    check_decode("\xE2\x82\xAC", 3, 0x20AC, 3);
    check_decode("\xF0\x9F\x98\x80", 4, 0x1F600, 4);
    check_decode("\xC0\x80", 2, 0, 2);               // overlong NUL decodes, as llama.cpp
    check_decode("\xED\xA0\x80", 3, 0xD800, 3);      // so does a surrogate
    check_decode("\x80", 1, UNICODE_REPLACEMENT, 1); // stray continuation byte
    check_decode("\xE2\x82", 2, UNICODE_REPLACEMENT, 1);
    check_decode("\xC3(", 2, UNICODE_REPLACEMENT, 1);
    check_decode("\xF5\x80\x80\x80", 4, UNICODE_REPLACEMENT, 1);  // above U+10FFFF
    check_decode("\xF8\x88\x80\x80", 4, UNICODE_REPLACEMENT, 1);
    const uint32_t cpts[] = {0, 0x7F, 0x80, 0x7FF, 0x800, 0xFFFF, 0x10000, 0x10FFFF};
    for (size_t i = 0; i < sizeof(cpts) / sizeof(cpts[0]); ++i) {
        char   buf[4];
        size_t off = 0;
        size_t n   = unicode_utf8_encode(cpts[i], buf);
        CHECK(n > 0 && unicode_utf8_decode(buf, n, &off) == cpts[i] && off == n, "round trip U+%X", cpts[i]);
        CHECK(unicode_utf8_len((uint8_t) buf[0]) == n, "length of U+%X", cpts[i]);
    }
    char buf[4];
    CHECK(unicode_utf8_encode(0x110000, buf) == 0, "U+110000 is not encodable");
}

static void test_flags(void) {
    const struct {
        uint32_t cpt;
        uint16_t flags;
    } cases[] = {
        {'a', UNICODE_LETTER},
        {'5', UNICODE_NUMBER},
        {' ', UNICODE_SEPARATOR | UNICODE_WHITESPACE},
        {'\n', UNICODE_CONTROL | UNICODE_WHITESPACE},
        {0x1C, UNICODE_CONTROL},  // not White_Space, unlike Python's str.isspace
        {0xA0, UNICODE_SEPARATOR | UNICODE_WHITESPACE},
        {0x85, UNICODE_CONTROL | UNICODE_WHITESPACE},
        {'!', UNICODE_PUNCTUATION},
        {'$', UNICODE_SYMBOL},
        {'`', UNICODE_SYMBOL},
        {0x300, UNICODE_MARK},
        {0xB2, UNICODE_NUMBER},
        {0x4E2D, UNICODE_LETTER},
        {0x1F600, UNICODE_SYMBOL},
        {0xFFFD, UNICODE_SYMBOL},
        {0xE000, UNICODE_CONTROL},
        {0x378, UNICODE_UNDEFINED},
        {0x2FFC, UNICODE_SYMBOL},   // new in Unicode 15.1
        {0x31350, UNICODE_LETTER},  // new in Unicode 15.0
        {0x10FFFF, UNICODE_UNDEFINED},
        {0x110000, UNICODE_UNDEFINED},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); ++i) {
        const uint16_t got = unicode_cpt_flags(cases[i].cpt);
        CHECK(got == cases[i].flags, "flags of U+%04X: got 0x%03X, want 0x%03X", cases[i].cpt, got,
              cases[i].flags);
    }
    CHECK(unicode_tolower('A') == 'a' && unicode_tolower('a') == 'a' && unicode_tolower('L') == 'l',
          "ASCII lowercase");
    CHECK(unicode_tolower(0x130) == 'i' && unicode_tolower(0x391) == 0x3B1, "non-ASCII lowercase");
    CHECK(unicode_byte_to_cpt(' ') == 0x120 && unicode_byte_to_cpt('\n') == 0x10A &&
              unicode_byte_to_cpt('a') == 'a' && unicode_byte_to_cpt(0xAD) == 0x143,
          "GPT-2 byte alphabet");
    int ok = 1;
    for (int b = 0; b < 256; ++b) {
        ok &= unicode_cpt_to_byte(unicode_byte_to_cpt((uint8_t) b)) == b;
    }
    CHECK(ok && unicode_cpt_to_byte(0x144) == -1 && unicode_cpt_to_byte(0x20) == -1, "byte alphabet inverse");
}

// "Hello world, 2024!" with add_special and parse_special, as recorded from llama.cpp.
struct model_case {
    const char *    file;
    const ckv_token ids[12];
    int32_t         n_ids;
    ckv_token       eog;  // one end-of-generation token
};

static const struct model_case MODELS[] = {
    {"SmolLM2-135M-Instruct.Q4_1.gguf", {19556, 905, 28, 216, 34, 32, 34, 36, 17}, 9, 2},
    {"qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", {9707, 1879, 11, 220, 17, 15, 17, 19, 0}, 9, 151645},
    {"gemma-3-270m-q4_k_m.gguf", {2, 9259, 1902, 236764, 236743, 236778, 236771, 236778, 236812, 236888}, 10, 106},
};

static void test_model(const char * dir, const struct model_case * mc) {
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s", dir, mc->file);
    struct gguf_file * f = NULL;
    if (gguf_open(path, true, &f) != CKV_OK) {
        printf("skip %s (not found)\n", path);
        n_skip++;
        return;
    }
    struct ckv_vocab * v  = NULL;
    int32_t            st = vocab_load(f, &v);
    gguf_close(f);
    CHECK(st == CKV_OK, "vocab_load %s: %s", mc->file, ckv_last_error());
    if (st != CKV_OK) {
        return;
    }
    const char text[] = "Hello world, 2024!";
    ckv_token  ids[64];
    int32_t    n = 0;
    st = vocab_tokenize(v, text, (int32_t) strlen(text), ids, 64, true, true, &n);
    CHECK(st == CKV_OK && n == mc->n_ids && memcmp(ids, mc->ids, sizeof(ckv_token) * (size_t) n) == 0,
          "%s: ids of '%s' (n %d)", mc->file, text, n);
    CHECK(vocab_is_eog(v, mc->eog), "%s: %d is end-of-generation", mc->file, mc->eog);

    const char code[] = "def f(x):\n\treturn x ** 2  # \xF0\x9F\x98\x80 caf\xC3\xA9\r\n";
    char       back[256];
    int32_t    n_back = 0;
    st = vocab_tokenize(v, code, (int32_t) strlen(code), ids, 64, false, false, &n);
    CHECK(st == CKV_OK, "%s: tokenize code", mc->file);
    st = vocab_detokenize(v, ids, n, back, sizeof(back), false, &n_back);
    CHECK(st == CKV_OK && n_back == (int32_t) strlen(code) && memcmp(back, code, strlen(code)) == 0,
          "%s: round trip of code", mc->file);
    st = vocab_tokenize(v, code, (int32_t) strlen(code), ids, 2, false, false, &n);
    CHECK(st == CKV_ERR_BUFFER_TOO_SMALL && n > 2, "%s: too small a buffer reports the size", mc->file);
    vocab_free(v);
}

int main(void) {
    test_utf8();
    test_flags();
    // The registry cache: $CLUSTERKV_MODELS_DIR, else ~/.cache/clusterkv_local/models.
    const char * home = getenv("HOME");
    char         cache[1024];
    snprintf(cache, sizeof(cache), "%s/.cache/clusterkv_local/models", home ? home : ".");
    const char * dir = getenv("CLUSTERKV_MODELS_DIR") ? getenv("CLUSTERKV_MODELS_DIR") : cache;
    for (size_t m = 0; m < sizeof(MODELS) / sizeof(MODELS[0]); ++m) {
        test_model(dir, &MODELS[m]);
    }
    printf("%d passed, %d failed, %d skipped\n", n_pass, n_fail, n_skip);
    return n_fail ? 1 : 0;
}
