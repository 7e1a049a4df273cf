// test-gguf.c - the GGUF reader on images built in memory: valid v3 and v2 files with every
// value type, arrays (nested too) and custom alignment, read back through every getter and
// rendered as text; then hostile variants, each of which must fail with the right status and a
// message, never crash: every truncation of a valid file, bad magic, versions 1 and 99, huge
// counts and lengths, bad shapes and types, misaligned or out-of-file tensors, overflowing
// sizes, duplicates. Run under ASan/UBSan too. Prints "N passed, M failed".
#include "gguf.h"

#include "clusterkv.h"
#include "quants.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

// ---------------------------------------------------------------------------------------------
// Building images
// ---------------------------------------------------------------------------------------------

struct image {
    uint8_t * data;
    size_t    len, cap;
    // where fields were written, for the hostile variants to patch
    size_t    pos_version, pos_n_tensors, pos_n_kv;
    size_t    pos_key_len[32], pos_kv_type[32], pos_arr_n[32];
    size_t    pos_name_len[8], pos_n_dims[8], pos_ne[8][4], pos_type[8], pos_offset[8];
    int       n_keys, n_tensors;
};

static void put(struct image * im, const void * p, size_t n) {
    if (im->len + n > im->cap) {
        im->cap  = (im->len + n) * 2;
        im->data = realloc(im->data, im->cap);
    }
    memcpy(im->data + im->len, p, n);
    im->len += n;
}

static void put_u8(struct image * im, uint8_t v) { put(im, &v, 1); }
static void put_u32(struct image * im, uint32_t v) { put(im, &v, 4); }
static void put_u64(struct image * im, uint64_t v) { put(im, &v, 8); }

static void put_str(struct image * im, const char * s) {
    put_u64(im, strlen(s));
    put(im, s, strlen(s));
}

static void patch_u32(struct image * im, size_t pos, uint32_t v) { memcpy(im->data + pos, &v, 4); }
static void patch_u64(struct image * im, size_t pos, uint64_t v) { memcpy(im->data + pos, &v, 8); }

static void begin_kv(struct image * im, const char * key, uint32_t type) {
    im->pos_key_len[im->n_keys] = im->len;
    put_str(im, key);
    im->pos_kv_type[im->n_keys] = im->len;
    put_u32(im, type);
    im->n_keys++;
}

static void begin_arr(struct image * im, const char * key, uint32_t elem_type, uint64_t n) {
    begin_kv(im, key, GGUF_VALUE_ARRAY);
    put_u32(im, elem_type);
    im->pos_arr_n[im->n_keys - 1] = im->len;
    put_u64(im, n);
}

struct tensor_spec {
    const char * name;
    uint32_t     type;
    uint32_t     n_dims;
    int64_t      ne[4];
};

// The tensors of the valid file: one per shape/type flavour, with known sizes.
static const struct tensor_spec valid_tensors[] = {
    {"token_embd.weight", GGML_TYPE_F32,  2, {4, 3, 1, 1}},   // 48 bytes
    {"blk.0.attn_q.weight", GGML_TYPE_Q4_0, 2, {64, 2, 1, 1}},  // 4 blocks: 72 bytes
    {"blk.0.ffn_up.weight", GGML_TYPE_Q8_0, 1, {32, 1, 1, 1}},  // 34 bytes
    {"output_norm.weight", GGML_TYPE_F16, 3, {3, 1, 2, 1}},    // 12 bytes
    {"blk.0.ffn_down.weight", GGML_TYPE_Q6_K, 4, {256, 1, 1, 2}},  // 420 bytes
};
#define N_VALID_TENSORS 5

static const uint64_t valid_sizes[N_VALID_TENSORS] = {48, 72, 34, 12, 420};

// Every value type once, arrays of several kinds, nested arrays.
static void put_kvs(struct image * im, uint32_t alignment) {
    begin_kv(im, "general.architecture", GGUF_VALUE_STRING); put_str(im, "llama");
    begin_kv(im, "general.alignment", GGUF_VALUE_UINT32);    put_u32(im, alignment);
    begin_kv(im, "t.u8", GGUF_VALUE_UINT8);    put_u8(im, 200);
    begin_kv(im, "t.i8", GGUF_VALUE_INT8);     put_u8(im, (uint8_t) -5);
    begin_kv(im, "t.u16", GGUF_VALUE_UINT16);  { uint16_t v = 60000; put(im, &v, 2); }
    begin_kv(im, "t.i16", GGUF_VALUE_INT16);   { int16_t v = -300; put(im, &v, 2); }
    begin_kv(im, "t.u32", GGUF_VALUE_UINT32);  put_u32(im, 4000000000u);
    begin_kv(im, "t.i32", GGUF_VALUE_INT32);   put_u32(im, (uint32_t) -7);
    begin_kv(im, "t.f32", GGUF_VALUE_FLOAT32); { float v = 1e-5f; put(im, &v, 4); }
    begin_kv(im, "t.bool", GGUF_VALUE_BOOL);   put_u8(im, 1);
    begin_kv(im, "t.u64", GGUF_VALUE_UINT64);  put_u64(im, 1ULL << 40);
    begin_kv(im, "t.i64", GGUF_VALUE_INT64);   put_u64(im, (uint64_t) -2);
    begin_kv(im, "t.f64", GGUF_VALUE_FLOAT64); { double v = 0.25; put(im, &v, 8); }
    begin_kv(im, "t.small_u32", GGUF_VALUE_UINT64); put_u64(im, 576);
    begin_arr(im, "t.arr_u8", GGUF_VALUE_UINT8, 3);      put_u8(im, 1); put_u8(im, 2); put_u8(im, 3);
    begin_arr(im, "t.arr_i32", GGUF_VALUE_INT32, 20);    for (int i = 0; i < 20; i++) put_u32(im, (uint32_t) i);
    begin_arr(im, "t.arr_f32", GGUF_VALUE_FLOAT32, 2);   { float v[2] = {0.5f, -1.5f}; put(im, v, 8); }
    begin_arr(im, "tokenizer.ggml.tokens", GGUF_VALUE_STRING, 3);
    put_str(im, "<s>"); put_str(im, ""); put_str(im, "hello");
    begin_arr(im, "t.nested", GGUF_VALUE_ARRAY, 2);      // [[1, 2], ["x"]]
    put_u32(im, GGUF_VALUE_UINT8); put_u64(im, 2); put_u8(im, 1); put_u8(im, 2);
    put_u32(im, GGUF_VALUE_STRING); put_u64(im, 1); put_str(im, "x");
    begin_arr(im, "t.empty", GGUF_VALUE_INT64, 0);
}

static void pad_to(struct image * im, uint64_t alignment) {
    while (im->len % alignment) {
        put_u8(im, 0);
    }
}

// A valid image: version, alignment, and the tensors' bytes filled with a pattern.
static struct image build(uint32_t version, uint32_t alignment) {
    struct image im = {0};
    put(&im, "GGUF", 4);
    im.pos_version = im.len;
    put_u32(&im, version);
    im.pos_n_tensors = im.len;
    put_u64(&im, N_VALID_TENSORS);
    im.pos_n_kv = im.len;
    put_u64(&im, 0);  // patched below
    put_kvs(&im, alignment);
    patch_u64(&im, im.pos_n_kv, (uint64_t) im.n_keys);
    uint64_t offset = 0;
    for (int i = 0; i < N_VALID_TENSORS; i++) {
        const struct tensor_spec * t = &valid_tensors[i];
        im.pos_name_len[i] = im.len;
        put_str(&im, t->name);
        im.pos_n_dims[i] = im.len;
        put_u32(&im, t->n_dims);
        for (uint32_t j = 0; j < t->n_dims; j++) {
            im.pos_ne[i][j] = im.len;
            put_u64(&im, (uint64_t) t->ne[j]);
        }
        im.pos_type[i] = im.len;
        put_u32(&im, t->type);
        im.pos_offset[i] = im.len;
        put_u64(&im, offset);
        offset += (valid_sizes[i] + alignment - 1) / alignment * alignment;
        im.n_tensors++;
    }
    pad_to(&im, alignment);
    for (int i = 0; i < N_VALID_TENSORS; i++) {
        for (uint64_t b = 0; b < valid_sizes[i]; b++) {
            put_u8(&im, (uint8_t) (i * 16 + b));
        }
        if (i + 1 < N_VALID_TENSORS) {
            pad_to(&im, alignment);  // no padding after the last tensor: the file ends there
        }
    }
    return im;
}

// Opens a private copy of exactly len bytes, so ASan sees any read past the end.
static int32_t open_copy(const struct image * im, size_t len, struct gguf_file ** f) {
    uint8_t * copy = malloc(len ? len : 1);
    memcpy(copy, im->data, len);
    *f = NULL;
    const int32_t st = gguf_open_memory(copy, len, f);
    if (st == CKV_OK) {
        gguf_close(*f);  // the tests below reopen the original when they want to read values
    }
    free(copy);
    return st;
}

// ---------------------------------------------------------------------------------------------
// Valid files
// ---------------------------------------------------------------------------------------------

static void expect_text(const struct gguf_file * f, const char * key, const char * want) {
    const struct gguf_kv * kv = gguf_find_kv(f, key);
    char                   buf[256];
    size_t                 n = 0;
    const int32_t          st = kv ? gguf_kv_to_string(kv, buf, sizeof(buf), &n) : CKV_ERR_NOT_FOUND;
    CHECK(st == CKV_OK && strcmp(buf, want) == 0 && n == strlen(want) + 1,
          "render %s: got '%s' (status %d), want '%s'", key, st == CKV_OK ? buf : "", st, want);
}

static void check_values(const struct gguf_file * f) {
    uint32_t        u;
    int32_t         i;
    float           x;
    bool            b;
    struct gguf_str s;
    CHECK(gguf_get_u32(f, "t.u8", &u) == CKV_OK && u == 200, "u8 as u32");
    CHECK(gguf_get_u32(f, "t.u32", &u) == CKV_OK && u == 4000000000u, "u32");
    CHECK(gguf_get_u32(f, "t.small_u32", &u) == CKV_OK && u == 576, "u64 count as u32");
    CHECK(gguf_get_u32(f, "t.u64", &u) == CKV_ERR_FORMAT, "2^40 does not fit u32");
    CHECK(gguf_get_u32(f, "t.i8", &u) == CKV_ERR_FORMAT, "-5 does not fit u32");
    CHECK(gguf_get_i32(f, "t.i8", &i) == CKV_OK && i == -5, "i8 as i32");
    CHECK(gguf_get_i32(f, "t.i16", &i) == CKV_OK && i == -300, "i16 as i32");
    CHECK(gguf_get_i32(f, "t.i64", &i) == CKV_OK && i == -2, "i64 as i32");
    CHECK(gguf_get_i32(f, "t.u32", &i) == CKV_ERR_FORMAT, "4e9 does not fit i32");
    CHECK(gguf_get_i32(f, "t.f32", &i) == CKV_ERR_FORMAT && strlen(ckv_last_error()) > 0, "f32 is no integer");
    CHECK(gguf_get_f32(f, "t.f32", &x) == CKV_OK && x == 1e-5f, "f32");
    CHECK(gguf_get_f32(f, "t.f64", &x) == CKV_OK && x == 0.25f, "f64 as f32");
    CHECK(gguf_get_bool(f, "t.bool", &b) == CKV_OK && b, "bool");
    CHECK(gguf_get_bool(f, "t.u8", &b) == CKV_ERR_FORMAT, "u8 is no bool");
    CHECK(gguf_get_str(f, "general.architecture", &s) == CKV_OK && s.len == 5 && memcmp(s.data, "llama", 5) == 0,
          "string");
    u = 12345;
    CHECK(gguf_get_u32(f, "missing.key", &u) == CKV_ERR_NOT_FOUND && u == 12345, "missing key, out untouched");
    const void * data;
    uint64_t     n;
    CHECK(gguf_get_arr(f, "t.arr_i32", GGUF_VALUE_INT32, &data, &n) == CKV_OK && n == 20 &&
          memcmp((const uint8_t *) data + 4 * 19, &(int32_t){19}, 4) == 0, "i32 array");
    CHECK(gguf_get_arr(f, "t.arr_i32", GGUF_VALUE_UINT32, &data, &n) == CKV_ERR_FORMAT, "array type must match");
    CHECK(gguf_get_arr(f, "t.u8", GGUF_VALUE_UINT8, &data, &n) == CKV_ERR_FORMAT, "scalar is no array");
    const struct gguf_kv * tok = gguf_find_kv(f, "tokenizer.ggml.tokens");
    CHECK(tok && tok->strs && tok->arr_n == 3 && tok->strs[0].len == 3 && memcmp(tok->strs[0].data, "<s>", 3) == 0 &&
          tok->strs[1].len == 0 && tok->strs[2].len == 5 && memcmp(tok->strs[2].data, "hello", 5) == 0,
          "string array decoded once");
    const struct gguf_kv * nested = gguf_find_kv(f, "t.nested");
    CHECK(nested && nested->arr_type == GGUF_VALUE_ARRAY && nested->arr_n == 2 && !nested->strs, "nested array kept raw");
}

static void check_rendering(const struct gguf_file * f) {
    expect_text(f, "general.architecture", "llama");
    expect_text(f, "t.u8", "200");
    expect_text(f, "t.i8", "-5");
    expect_text(f, "t.u16", "60000");
    expect_text(f, "t.i16", "-300");
    expect_text(f, "t.u32", "4000000000");
    expect_text(f, "t.i64", "-2");
    expect_text(f, "t.u64", "1099511627776");
    expect_text(f, "t.f32", "1e-05");
    expect_text(f, "t.f64", "0.25");
    expect_text(f, "t.bool", "true");
    expect_text(f, "t.arr_u8", "[1, 2, 3]");
    expect_text(f, "t.arr_f32", "[0.5, -1.5]");
    expect_text(f, "t.arr_i32", "[20 x i32]");
    expect_text(f, "tokenizer.ggml.tokens", "[3 x string]");
    expect_text(f, "t.nested", "[2 x array]");
    expect_text(f, "t.empty", "[]");
    // buffer too small: the needed size comes back, the retry works
    const struct gguf_kv * kv = gguf_find_kv(f, "t.arr_u8");
    char                   small[4], big[16];
    size_t                 n = 0;
    CHECK(gguf_kv_to_string(kv, small, sizeof(small), &n) == CKV_ERR_BUFFER_TOO_SMALL && n == 10 &&
          small[3] == '\0', "render into a small buffer: n_needed %zu", n);
    CHECK(gguf_kv_to_string(kv, big, n, &n) == CKV_OK && strcmp(big, "[1, 2, 3]") == 0, "render retry");
    CHECK(gguf_kv_to_string(kv, NULL, 0, &n) == CKV_ERR_BUFFER_TOO_SMALL && n == 10, "size query");
}

static void check_tensors(const struct gguf_file * f, uint32_t alignment) {
    CHECK(f->n_tensors == N_VALID_TENSORS && f->alignment == alignment && f->data_offset % alignment == 0,
          "tensor count, alignment %llu, data offset %llu", (unsigned long long) f->alignment,
          (unsigned long long) f->data_offset);
    for (int i = 0; i < N_VALID_TENSORS; i++) {
        const struct gguf_tensor * t = gguf_find_tensor(f, valid_tensors[i].name);
        CHECK(t && t->size == valid_sizes[i] && t->type == valid_tensors[i].type &&
              t->n_dims == valid_tensors[i].n_dims && t->offset % alignment == 0 &&
              t->ne[3] == valid_tensors[i].ne[3] && t->data &&
              ((const uint8_t *) t->data)[0] == (uint8_t) (i * 16) &&
              (const uint8_t *) t->data + t->size <= f->image + f->image_size,
              "tensor %s", valid_tensors[i].name);
    }
    CHECK(gguf_find_tensor(f, "nope") == NULL && gguf_find_kv(f, "nope") == NULL, "missing names");
}

static void test_valid(uint32_t version, uint32_t alignment) {
    struct image       im = build(version, alignment);
    struct gguf_file * f  = NULL;
    const int32_t      st = gguf_open_memory(im.data, im.len, &f);
    CHECK(st == CKV_OK, "v%u alignment %u opens: %s", version, alignment, ckv_last_error());
    if (st == CKV_OK) {
        CHECK(f->version == version && f->n_kv == (uint64_t) im.n_keys && !f->mmapped, "header fields");
        check_values(f);
        check_rendering(f);
        check_tensors(f, alignment);
    }
    gguf_close(f);
    free(im.data);
}

// The same bytes through a file, mapped and read.
static void test_file(void) {
    struct image im = build(3, 32);
    char         path[] = "/tmp/ckv-test-gguf-XXXXXX";
    FILE *       fp = NULL;
#if !defined(_WIN32)
    const int fd = mkstemp(path);
    fp = fd >= 0 ? fdopen(fd, "wb") : NULL;
#endif
    if (!fp) {
        printf("skip: no temporary file\n");
        free(im.data);
        return;
    }
    fwrite(im.data, 1, im.len, fp);
    fclose(fp);
    for (int use_mmap = 0; use_mmap < 2; use_mmap++) {
        struct gguf_file * f  = NULL;
        const int32_t      st = gguf_open(path, use_mmap, &f);
        CHECK(st == CKV_OK && f->image_size == im.len && memcmp(f->image, im.data, im.len) == 0 &&
              f->mmapped == (bool) use_mmap, "gguf_open(use_mmap=%d): %s", use_mmap, ckv_last_error());
        if (st == CKV_OK) {
            check_values(f);
            check_tensors(f, 32);
        }
        gguf_close(f);
    }
    remove(path);
    struct gguf_file * f = (struct gguf_file *) 1;
    CHECK(gguf_open("/nonexistent/dir/model.gguf", true, &f) == CKV_ERR_IO && f == NULL &&
          strstr(ckv_last_error(), "/nonexistent/dir/model.gguf"), "missing file: %s", ckv_last_error());
    CHECK(gguf_open("/tmp", true, &f) == CKV_ERR_IO, "a directory is no model");
    gguf_close(NULL);
    free(im.data);
}

// ---------------------------------------------------------------------------------------------
// Hostile files
// ---------------------------------------------------------------------------------------------

// Opens im and expects status st with a message containing want (if given).
static void expect_fail(const struct image * im, int32_t want_st, const char * want, const char * what) {
    struct gguf_file * f  = NULL;
    const int32_t      st = open_copy(im, im->len, &f);
    const char *       msg = ckv_last_error();
    if (getenv("CKV_TEST_VERBOSE")) {
        printf("  %-40s %-20s %s\n", what, ckv_status_name(st), msg);
    }
    CHECK(st == want_st && strlen(msg) > 0 && (!want || strstr(msg, want)),
          "%s: status %s, message '%s' (want %s, '%s')", what, ckv_status_name(st), msg,
          ckv_status_name(want_st), want ? want : "");
}

static void test_truncations(void) {
    struct image im = build(3, 32);
    int          bad = 0, no_msg = 0;
    for (size_t len = 0; len < im.len; len++) {
        struct gguf_file * f  = NULL;
        const int32_t      st = open_copy(&im, len, &f);
        bad    += st != CKV_ERR_FORMAT;
        no_msg += strlen(ckv_last_error()) == 0;
        if (st != CKV_ERR_FORMAT && bad < 5) {
            printf("  truncated to %zu of %zu bytes: %s\n", len, im.len, ckv_status_name(st));
        }
    }
    CHECK(bad == 0 && no_msg == 0, "every truncation (%zu) is CKV_ERR_FORMAT with a message: %d wrong, %d silent",
          im.len, bad, no_msg);
    struct gguf_file * f = NULL;
    CHECK(open_copy(&im, im.len, &f) == CKV_OK, "the untruncated file opens");
    CHECK(gguf_open_memory(im.data, 10, &f) == CKV_ERR_FORMAT && strstr(ckv_last_error(), "truncated") &&
          strstr(ckv_last_error(), "offset 8"), "truncation message: %s", ckv_last_error());
    free(im.data);
}

static void test_header(void) {
    struct image im = build(3, 32);
    im.data[0] = 'X';
    expect_fail(&im, CKV_ERR_FORMAT, "bad magic", "bad magic");
    im.data[0] = 'G';
    patch_u32(&im, im.pos_version, 1);
    expect_fail(&im, CKV_ERR_UNSUPPORTED, "GGUF version 1 is not supported", "version 1");
    patch_u32(&im, im.pos_version, 99);
    expect_fail(&im, CKV_ERR_UNSUPPORTED, "version 99", "version 99");
    patch_u32(&im, im.pos_version, 0x03000000);
    expect_fail(&im, CKV_ERR_UNSUPPORTED, "big-endian", "byte-swapped version");
    patch_u32(&im, im.pos_version, 3);
    patch_u64(&im, im.pos_n_tensors, 1ULL << 63);
    expect_fail(&im, CKV_ERR_FORMAT, "tensor count", "n_tensors 2^63");
    patch_u64(&im, im.pos_n_tensors, N_VALID_TENSORS + 1);
    expect_fail(&im, CKV_ERR_FORMAT, NULL, "one tensor too many");
    patch_u64(&im, im.pos_n_tensors, N_VALID_TENSORS);
    patch_u64(&im, im.pos_n_kv, 1ULL << 63);
    expect_fail(&im, CKV_ERR_FORMAT, "key/value count", "n_kv 2^63");
    patch_u64(&im, im.pos_n_kv, UINT64_MAX);
    expect_fail(&im, CKV_ERR_FORMAT, NULL, "n_kv 2^64-1");
    free(im.data);
}

// The index of the key in the valid file's order (see put_kvs).
enum { KEY_ARCH = 0, KEY_ALIGN = 1, KEY_U8 = 2, KEY_ARR_U8 = 14, KEY_TOKENS = 17, KEY_NESTED = 18 };

static void test_kv_corruptions(void) {
    struct image im = build(3, 32);
    struct image orig = im;
    orig.data = malloc(im.len);
    memcpy(orig.data, im.data, im.len);
#define RESET() memcpy(im.data, orig.data, im.len)
    patch_u64(&im, im.pos_key_len[KEY_U8], 1ULL << 63);
    expect_fail(&im, CKV_ERR_FORMAT, "key #2 needs 9223372036854775808 bytes", "key length 2^63");
    RESET();
    patch_u64(&im, im.pos_key_len[KEY_ARCH] + 8 + strlen("general.architecture") + 4, 1ULL << 63);
    expect_fail(&im, CKV_ERR_FORMAT, "'general.architecture' needs", "string value length 2^63");
    RESET();
    patch_u64(&im, im.pos_arr_n[KEY_ARR_U8], 1ULL << 63);
    expect_fail(&im, CKV_ERR_FORMAT, "'t.arr_u8': 9223372036854775808 entries", "u8 array count 2^63");
    RESET();
    patch_u64(&im, im.pos_arr_n[KEY_TOKENS], 1ULL << 63);
    expect_fail(&im, CKV_ERR_FORMAT, "tokenizer.ggml.tokens", "string array count 2^63");
    RESET();
    patch_u64(&im, im.pos_arr_n[KEY_TOKENS] + 8, 1ULL << 62);  // first string's length
    expect_fail(&im, CKV_ERR_FORMAT, "truncated", "token string length 2^62");
    RESET();
    patch_u32(&im, im.pos_arr_n[KEY_NESTED] + 8, 13);  // inner array element type
    expect_fail(&im, CKV_ERR_FORMAT, "element type 13", "nested array of an unknown type");
    RESET();
    patch_u64(&im, im.pos_arr_n[KEY_NESTED] + 8 + 4, 1ULL << 60);  // inner array count
    expect_fail(&im, CKV_ERR_FORMAT, "truncated", "nested array count 2^60");
    RESET();
    patch_u32(&im, im.pos_kv_type[KEY_U8], 13);
    expect_fail(&im, CKV_ERR_FORMAT, "value type 13", "unknown value type");
    RESET();
    memcpy(im.data + im.pos_key_len[KEY_U8] + 8, "t.i8", 4);  // "t.u8" -> a second "t.i8"
    expect_fail(&im, CKV_ERR_FORMAT, "duplicate key 't.i8'", "duplicate key");
    RESET();
    im.data[im.pos_key_len[KEY_U8] + 9] = '\0';
    expect_fail(&im, CKV_ERR_FORMAT, "NUL", "key with a NUL byte");
    RESET();
    patch_u32(&im, im.pos_kv_type[KEY_ALIGN] + 4, 48);
    expect_fail(&im, CKV_ERR_FORMAT, "power of two", "alignment 48");
    patch_u32(&im, im.pos_kv_type[KEY_ALIGN] + 4, 0);
    expect_fail(&im, CKV_ERR_FORMAT, "power of two", "alignment 0");
    RESET();
    patch_u32(&im, im.pos_kv_type[KEY_ALIGN], GGUF_VALUE_FLOAT32);
    expect_fail(&im, CKV_ERR_FORMAT, "general.alignment", "alignment as f32");
#undef RESET
    free(orig.data);
    free(im.data);
}

// A file whose only key/value is an array nested `depth` deep.
static void test_nesting(int depth, int32_t want) {
    struct image im = {0};
    put(&im, "GGUF", 4);
    put_u32(&im, 3);
    put_u64(&im, 0);
    put_u64(&im, 1);
    put_str(&im, "deep");
    put_u32(&im, GGUF_VALUE_ARRAY);
    for (int d = 1; d < depth; d++) {
        put_u32(&im, GGUF_VALUE_ARRAY);
        put_u64(&im, 1);
    }
    put_u32(&im, GGUF_VALUE_UINT8);
    put_u64(&im, 1);
    put_u8(&im, 7);
    struct gguf_file * f  = NULL;
    const int32_t      st = open_copy(&im, im.len, &f);
    CHECK(st == want, "arrays nested %d deep: %s (%s)", depth, ckv_status_name(st), ckv_last_error());
    free(im.data);
}

static void test_tensor_corruptions(void) {
    struct image im = build(3, 32);
    struct image orig = im;
    orig.data = malloc(im.len);
    memcpy(orig.data, im.data, im.len);
#define RESET() memcpy(im.data, orig.data, im.len)
    patch_u32(&im, im.pos_n_dims[0], 0);
    expect_fail(&im, CKV_ERR_FORMAT, "'token_embd.weight' has 0 dimensions", "n_dims 0");
    patch_u32(&im, im.pos_n_dims[0], 5);
    expect_fail(&im, CKV_ERR_FORMAT, "5 dimensions", "n_dims 5");
    RESET();
    patch_u64(&im, im.pos_ne[0][1], 0);
    expect_fail(&im, CKV_ERR_FORMAT, "dimension 1 is 0", "ne 0");
    patch_u64(&im, im.pos_ne[0][1], (uint64_t) -3);
    expect_fail(&im, CKV_ERR_FORMAT, "dimension 1 is -3", "ne negative");
    RESET();
    patch_u64(&im, im.pos_ne[1][0], 33);
    expect_fail(&im, CKV_ERR_FORMAT, "not a multiple of the q4_0 block size 32", "ne[0] not a block multiple");
    RESET();
    patch_u32(&im, im.pos_type[2], 99);
    expect_fail(&im, CKV_ERR_UNSUPPORTED, "'blk.0.ffn_up.weight' has unknown ggml type id 99", "unknown type id");
    patch_u32(&im, im.pos_type[2], 4);  // Q4_2, removed from ggml
    expect_fail(&im, CKV_ERR_UNSUPPORTED, "type id 4", "removed type id");
    RESET();
    patch_u64(&im, im.pos_offset[1], 64 + 16);
    expect_fail(&im, CKV_ERR_FORMAT, "not a multiple of the alignment 32", "misaligned offset");
    patch_u64(&im, im.pos_offset[1], 1 << 20);
    expect_fail(&im, CKV_ERR_FORMAT, "'blk.0.attn_q.weight' data [", "tensor past EOF");
    patch_u64(&im, im.pos_offset[1], UINT64_MAX - 31);
    expect_fail(&im, CKV_ERR_FORMAT, "overflow", "offset + size wraps");
    RESET();
    patch_u64(&im, im.pos_ne[0][0], 1ULL << 31);  // f32 [2^31, 2^31]: 2^62 elements, 2^64 bytes
    patch_u64(&im, im.pos_ne[0][1], 1ULL << 31);
    expect_fail(&im, CKV_ERR_FORMAT, "overflow", "byte size overflow");
    patch_u64(&im, im.pos_ne[0][0], 1ULL << 32);  // 2^64 elements
    patch_u64(&im, im.pos_ne[0][1], 1ULL << 32);
    expect_fail(&im, CKV_ERR_FORMAT, "overflow", "element count overflow");
    RESET();
    memcpy(im.data + im.pos_name_len[2] + 8, "blk.0.attn_q.weight", 19);  // same length as the name it replaces
    expect_fail(&im, CKV_ERR_FORMAT, "duplicate tensor name 'blk.0.attn_q.weight'", "duplicate tensor name");
    RESET();
    patch_u64(&im, im.pos_name_len[0], 65);
    expect_fail(&im, CKV_ERR_FORMAT, NULL, "65-byte tensor name");
    patch_u64(&im, im.pos_name_len[0], 0);
    expect_fail(&im, CKV_ERR_FORMAT, NULL, "empty tensor name");
    RESET();
    im.len -= 1;
    expect_fail(&im, CKV_ERR_FORMAT, "'blk.0.ffn_down.weight' data [", "last tensor one byte short");
#undef RESET
    free(orig.data);
    free(im.data);
}

// A 64-byte name fits; a tensor-less file may end without padding.
static void test_edges(void) {
    struct image im = {0};
    const char   name64[] = "0123456789012345678901234567890123456789012345678901234567890123";
    put(&im, "GGUF", 4);
    put_u32(&im, 3);
    put_u64(&im, 1);
    put_u64(&im, 0);
    put_str(&im, name64);
    put_u32(&im, 1);
    put_u64(&im, 32);
    put_u32(&im, GGML_TYPE_Q8_0);
    put_u64(&im, 0);
    pad_to(&im, 32);
    for (int i = 0; i < 34; i++) put_u8(&im, 0);
    struct gguf_file * f = NULL;
    CHECK(gguf_open_memory(im.data, im.len, &f) == CKV_OK && strcmp(f->tensors[0].name, name64) == 0,
          "64-byte tensor name: %s", ckv_last_error());
    gguf_close(f);
    free(im.data);

    struct image empty = {0};
    put(&empty, "GGUF", 4);
    put_u32(&empty, 2);
    put_u64(&empty, 0);
    put_u64(&empty, 0);
    CHECK(gguf_open_memory(empty.data, empty.len, &f) == CKV_OK && f->n_kv == 0 && f->n_tensors == 0,
          "empty v2 file: %s", ckv_last_error());
    gguf_close(f);
    free(empty.data);
    CHECK(gguf_open_memory(NULL, 0, &f) == CKV_ERR_FORMAT, "zero bytes");
    CHECK(gguf_open_memory(NULL, 5, &f) == CKV_ERR_INVALID_ARG, "NULL image");
}

int main(void) {
    quants_init();
    test_valid(3, 32);
    test_valid(2, 32);
    test_valid(3, 64);
    test_valid(3, 1);
    test_file();
    test_truncations();
    test_header();
    test_kv_corruptions();
    test_nesting(8, CKV_OK);
    test_nesting(9, CKV_ERR_FORMAT);
    test_nesting(100000, CKV_ERR_FORMAT);
    test_tensor_corruptions();
    test_edges();
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail != 0;
}
