// gguf.c - GGUF v2/v3 reader: the first stage of the data flow (file -> key/values and tensor
// descriptors pointing into the image). model.c reads hyper-parameters, the tokenizer and the
// weights through it.
//
// The whole file is one image (an mmap, or a heap copy when use_mmap is false) and every count,
// length, offset and size read from it is checked against the bytes that remain before it is
// used, with overflow-safe arithmetic, so a truncated or hostile file gives CKV_ERR_FORMAT
// (CKV_ERR_UNSUPPORTED for a valid file we cannot handle) with a message naming the key or
// tensor, the offset and the file size. Nothing here aborts or prints.
#include "gguf.h"

#include "error.h"
#include "quants.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if !defined(_WIN32)
#    include <errno.h>
#    include <fcntl.h>
#    include <sys/mman.h>
#    include <sys/stat.h>
#    include <unistd.h>
#    define HAVE_MMAP 1
#endif

#define GGUF_MAGIC             "GGUF"
#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MAX_KEY_LEN       65535   // the spec's limit for keys
#define GGUF_MAX_NAME_LEN      64      // tensor names (ggml's GGML_MAX_NAME)
#define GGUF_MAX_ARRAY_DEPTH   8       // arrays of arrays: allowed by the spec, bounded here

// =============================================================================================
// Bounds-checked reading
// =============================================================================================

struct parser {
    const uint8_t * data;
    size_t          size;
    size_t          pos;
    char            what[192];  // what is being read, for messages: "key #3 'general.name'"
};

static void set_what(struct parser * p, const char * fmt, ...) CKV_PRINTF(2, 3);
static void set_what(struct parser * p, const char * fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(p->what, sizeof(p->what), fmt, args);
    va_end(args);
}

// Fails unless n more bytes are available at the current position.
static int32_t need(const struct parser * p, uint64_t n) {
    if (n > p->size - p->pos) {
        return ckv_fail(CKV_ERR_FORMAT,
                        "truncated: %s needs %" PRIu64 " bytes at offset %zu but the file has %zu",
                        p->what, n, p->pos, p->size);
    }
    return CKV_OK;
}

// Fails unless count elements of at least elem_size bytes each can still fit.
static int32_t need_elems(const struct parser * p, uint64_t count, uint64_t elem_size) {
    if (count > (p->size - p->pos) / elem_size) {
        return ckv_fail(CKV_ERR_FORMAT,
                        "truncated: %s: %" PRIu64 " entries of at least %" PRIu64
                        " bytes each do not fit in the %zu bytes after offset %zu (file size %zu)",
                        p->what, count, elem_size, p->size - p->pos, p->pos, p->size);
    }
    return CKV_OK;
}

static int32_t read_bytes(struct parser * p, void * out, size_t n) {
    const int32_t st = need(p, n);
    if (st == CKV_OK) {
        memcpy(out, p->data + p->pos, n);
        p->pos += n;
    }
    return st;
}

static int32_t read_u32(struct parser * p, uint32_t * v) { return read_bytes(p, v, sizeof(*v)); }
static int32_t read_u64(struct parser * p, uint64_t * v) { return read_bytes(p, v, sizeof(*v)); }

static int32_t read_str(struct parser * p, struct gguf_str * s) {
    int32_t st = read_u64(p, &s->len);
    if (st == CKV_OK && (st = need(p, s->len)) == CKV_OK) {
        s->data = (const char *) p->data + p->pos;
        p->pos += (size_t) s->len;
    }
    return st;
}

// Bytes of one scalar value, 0 for strings, arrays and unknown types.
static size_t scalar_size(uint32_t type) {
    switch (type) {
        case GGUF_VALUE_UINT8: case GGUF_VALUE_INT8: case GGUF_VALUE_BOOL:  return 1;
        case GGUF_VALUE_UINT16: case GGUF_VALUE_INT16:                      return 2;
        case GGUF_VALUE_UINT32: case GGUF_VALUE_INT32: case GGUF_VALUE_FLOAT32: return 4;
        case GGUF_VALUE_UINT64: case GGUF_VALUE_INT64: case GGUF_VALUE_FLOAT64: return 8;
        default: return 0;
    }
}

static int32_t skip_value(struct parser * p, uint32_t type, int depth);

// Skips the elements of an array whose header (element type, count) has been read.
static int32_t skip_elements(struct parser * p, uint32_t elem_type, uint64_t n, int depth) {
    const size_t esize = scalar_size(elem_type);
    if (esize > 0) {
        int32_t st = need_elems(p, n, esize);
        if (st == CKV_OK) {
            p->pos += (size_t) (n * esize);
        }
        return st;
    }
    if (elem_type != GGUF_VALUE_STRING && elem_type != GGUF_VALUE_ARRAY) {
        return ckv_fail(CKV_ERR_FORMAT, "%s: array element type %u is not a GGUF value type",
                        p->what, elem_type);
    }
    // every string takes at least its 8-byte length, every array its 12-byte header
    int32_t st = need_elems(p, n, elem_type == GGUF_VALUE_STRING ? 8 : 12);
    for (uint64_t i = 0; i < n && st == CKV_OK; i++) {
        st = skip_value(p, elem_type, depth);
    }
    return st;
}

static int32_t skip_value(struct parser * p, uint32_t type, int depth) {
    if (type == GGUF_VALUE_STRING) {
        struct gguf_str s;
        return read_str(p, &s);
    }
    if (type == GGUF_VALUE_ARRAY) {
        if (depth >= GGUF_MAX_ARRAY_DEPTH) {
            return ckv_fail(CKV_ERR_FORMAT, "%s: arrays nested more than %d deep at offset %zu",
                            p->what, GGUF_MAX_ARRAY_DEPTH, p->pos);
        }
        uint32_t elem_type;
        uint64_t n;
        int32_t  st = read_u32(p, &elem_type);
        if (st == CKV_OK && (st = read_u64(p, &n)) == CKV_OK) {
            st = skip_elements(p, elem_type, n, depth + 1);
        }
        return st;
    }
    const size_t size = scalar_size(type);
    if (size == 0) {
        return ckv_fail(CKV_ERR_FORMAT, "%s: value type %u is not a GGUF value type", p->what, type);
    }
    const int32_t st = need(p, size);
    if (st == CKV_OK) {
        p->pos += size;
    }
    return st;
}

// =============================================================================================
// Duplicate detection: an open-addressing set of names (FNV-1a), linear in the file size
// =============================================================================================

struct name_set {
    const char ** slots;  // [cap] NUL-terminated names, NULL = empty
    size_t        cap;    // power of two, at least twice the number of names
};

static uint64_t fnv1a(const char * s) {
    uint64_t h = 0xCBF29CE484222325ULL;
    for (; *s; s++) {
        h = (h ^ (uint8_t) *s) * 0x100000001B3ULL;
    }
    return h;
}

static int32_t name_set_init(struct name_set * set, uint64_t n) {
    set->cap = 16;
    while (set->cap < 2 * n) {
        set->cap *= 2;
    }
    set->slots = calloc(set->cap, sizeof(*set->slots));
    return set->slots ? CKV_OK : ckv_fail(CKV_ERR_OOM, "out of memory for %" PRIu64 " names", n);
}

// Adds name; false if it was already there.
static bool name_set_add(struct name_set * set, const char * name) {
    size_t i = (size_t) fnv1a(name) & (set->cap - 1);
    while (set->slots[i]) {
        if (strcmp(set->slots[i], name) == 0) {
            return false;
        }
        i = (i + 1) & (set->cap - 1);
    }
    set->slots[i] = name;
    return true;
}

// =============================================================================================
// Header and key/value pairs
// =============================================================================================

static int32_t parse_header(struct parser * p, struct gguf_file * f) {
    uint8_t magic[4];
    set_what(p, "the header");
    int32_t st = read_bytes(p, magic, 4);
    if (st != CKV_OK) {
        return st;
    }
    if (memcmp(magic, GGUF_MAGIC, 4) != 0) {
        return ckv_fail(CKV_ERR_FORMAT,
                        "bad magic: expected 'GGUF' (47 47 55 46), found %02x %02x %02x %02x",
                        magic[0], magic[1], magic[2], magic[3]);
    }
    if ((st = read_u32(p, &f->version)) != CKV_OK) {
        return st;
    }
    if (f->version == 1) {
        return ckv_fail(CKV_ERR_UNSUPPORTED, "GGUF version 1 is not supported");
    }
    if (f->version != 2 && f->version != 3) {
        const bool swapped = (f->version & 0xFFFF) == 0 && (f->version >> 24) <= 3;
        return ckv_fail(CKV_ERR_UNSUPPORTED, "GGUF version %" PRIu32 " is not supported%s",
                        f->version, swapped ? " (a big-endian file?)" : " (only 2 and 3 are)");
    }
    if ((st = read_u64(p, &f->n_tensors)) != CKV_OK || (st = read_u64(p, &f->n_kv)) != CKV_OK) {
        return st;
    }
    // Smallest possible entries: a key/value is a length, one key byte, a type and one value
    // byte (14 bytes); a tensor info a length, a name byte, n_dims, one dim, type, offset (33).
    // Checking the counts now bounds the allocations below by the file size.
    set_what(p, "the header's key/value count");
    if ((st = need_elems(p, f->n_kv, 14)) != CKV_OK) {
        return st;
    }
    set_what(p, "the header's tensor count");
    return need_elems(p, f->n_tensors, 33);
}

static int32_t parse_key(struct parser * p, uint64_t i, struct gguf_kv * kv) {
    struct gguf_str key;
    set_what(p, "key #%" PRIu64, i);
    int32_t st = read_str(p, &key);
    if (st != CKV_OK) {
        return st;
    }
    if (key.len == 0 || key.len > GGUF_MAX_KEY_LEN || memchr(key.data, 0, (size_t) key.len)) {
        return ckv_fail(CKV_ERR_FORMAT, "key #%" PRIu64 " at offset %zu is %s", i,
                        p->pos - (size_t) key.len,
                        key.len == 0 ? "empty" : key.len > GGUF_MAX_KEY_LEN ? "longer than 65535 bytes"
                                                                           : "not text (contains a NUL byte)");
    }
    kv->key = malloc((size_t) key.len + 1);
    if (!kv->key) {
        return ckv_fail(CKV_ERR_OOM, "out of memory for key #%" PRIu64, i);
    }
    memcpy(kv->key, key.data, (size_t) key.len);
    kv->key[key.len] = '\0';
    set_what(p, "key #%" PRIu64 " '%.120s'", i, kv->key);
    return CKV_OK;
}

// Decodes the n strings of a string array into kv->strs (pointers into the image).
static int32_t parse_string_array(struct parser * p, struct gguf_kv * kv) {
    int32_t st = need_elems(p, kv->arr_n, 8);
    if (st != CKV_OK) {
        return st;
    }
    kv->strs = malloc((size_t) (kv->arr_n ? kv->arr_n : 1) * sizeof(*kv->strs));
    if (!kv->strs) {
        return ckv_fail(CKV_ERR_OOM, "out of memory for %s (%" PRIu64 " strings)", p->what, kv->arr_n);
    }
    for (uint64_t j = 0; j < kv->arr_n && st == CKV_OK; j++) {
        st = read_str(p, &kv->strs[j]);
    }
    return st;
}

static int32_t parse_kv(struct parser * p, uint64_t i, struct gguf_kv * kv) {
    int32_t st = parse_key(p, i, kv);
    if (st != CKV_OK || (st = read_u32(p, &kv->type)) != CKV_OK) {
        return st;
    }
    if (kv->type != GGUF_VALUE_ARRAY) {
        kv->value = p->data + p->pos;
        return skip_value(p, kv->type, 0);
    }
    if ((st = read_u32(p, &kv->arr_type)) != CKV_OK || (st = read_u64(p, &kv->arr_n)) != CKV_OK) {
        return st;
    }
    kv->value = p->data + p->pos;
    if (kv->arr_type == GGUF_VALUE_STRING) {
        return parse_string_array(p, kv);
    }
    return skip_elements(p, kv->arr_type, kv->arr_n, 1);
}

static int32_t parse_kvs(struct parser * p, struct gguf_file * f) {
    struct name_set set = {0};
    f->kv = calloc((size_t) (f->n_kv ? f->n_kv : 1), sizeof(*f->kv));
    int32_t st = f->kv ? name_set_init(&set, f->n_kv)
                       : ckv_fail(CKV_ERR_OOM, "out of memory for %" PRIu64 " keys", f->n_kv);
    if (st != CKV_OK) {
        return st;
    }
    for (uint64_t i = 0; i < f->n_kv && st == CKV_OK; i++) {
        st = parse_kv(p, i, &f->kv[i]);
        if (st == CKV_OK && !name_set_add(&set, f->kv[i].key)) {
            st = ckv_fail(CKV_ERR_FORMAT, "duplicate key '%.120s' (key #%" PRIu64 ")", f->kv[i].key, i);
        }
    }
    free(set.slots);
    return st;
}

static int32_t read_alignment(struct gguf_file * f) {
    uint32_t      a  = GGUF_DEFAULT_ALIGNMENT;
    const int32_t st = gguf_get_u32(f, "general.alignment", &a);
    if (st != CKV_OK && st != CKV_ERR_NOT_FOUND) {
        return st;
    }
    if (a == 0 || (a & (a - 1)) != 0) {
        return ckv_fail(CKV_ERR_FORMAT, "general.alignment must be a power of two, not %" PRIu32, a);
    }
    f->alignment = a;
    return CKV_OK;
}

// =============================================================================================
// Tensor infos
// =============================================================================================

static int32_t parse_tensor_name(struct parser * p, uint64_t i, struct gguf_tensor * t) {
    struct gguf_str name;
    set_what(p, "tensor #%" PRIu64, i);
    int32_t st = read_str(p, &name);
    if (st != CKV_OK) {
        return st;
    }
    if (name.len == 0 || name.len > GGUF_MAX_NAME_LEN || memchr(name.data, 0, (size_t) name.len)) {
        return ckv_fail(CKV_ERR_FORMAT, "tensor #%" PRIu64 " name at offset %zu is %s", i,
                        p->pos - (size_t) name.len,
                        name.len == 0 ? "empty" : name.len > GGUF_MAX_NAME_LEN ? "longer than 64 bytes"
                                                                              : "not text (contains a NUL byte)");
    }
    memcpy(t->name, name.data, (size_t) name.len);
    t->name[name.len] = '\0';
    set_what(p, "tensor #%" PRIu64 " '%s'", i, t->name);
    return CKV_OK;
}

// n_dims and ne[], each > 0, with an element count that fits in int64.
static int32_t parse_tensor_shape(struct parser * p, struct gguf_tensor * t, int64_t * n_elements) {
    int32_t st = read_u32(p, &t->n_dims);
    if (st != CKV_OK) {
        return st;
    }
    if (t->n_dims < 1 || t->n_dims > 4) {
        return ckv_fail(CKV_ERR_FORMAT, "tensor '%s' has %" PRIu32 " dimensions (must be 1 to 4)",
                        t->name, t->n_dims);
    }
    *n_elements = 1;
    for (uint32_t j = 0; j < 4; j++) {
        t->ne[j] = 1;
        if (j < t->n_dims && (st = read_bytes(p, &t->ne[j], sizeof(t->ne[j]))) != CKV_OK) {
            return st;
        }
        if (t->ne[j] <= 0) {
            return ckv_fail(CKV_ERR_FORMAT, "tensor '%s' dimension %" PRIu32 " is %" PRId64 " (must be > 0)",
                            t->name, j, t->ne[j]);
        }
        if (*n_elements > INT64_MAX / t->ne[j]) {
            return ckv_fail(CKV_ERR_FORMAT, "overflow: tensor '%s' has more than 2^63 elements "
                            "(dimension %" PRIu32 " is %" PRId64 ")", t->name, j, t->ne[j]);
        }
        *n_elements *= t->ne[j];
    }
    return CKV_OK;
}

// Type id, byte size from the block layout, and the (aligned) offset.
static int32_t parse_tensor_layout(struct parser * p, const struct gguf_file * f,
                                   struct gguf_tensor * t, int64_t n_elements) {
    int32_t st = read_u32(p, &t->type);
    if (st != CKV_OK) {
        return st;
    }
    const struct ggml_type_traits * tt = ggml_type_traits_get(t->type);
    if (!tt) {
        return ckv_fail(CKV_ERR_UNSUPPORTED, "tensor '%s' has unknown ggml type id %" PRIu32,
                        t->name, t->type);
    }
    if (t->ne[0] % tt->block_size != 0) {
        return ckv_fail(CKV_ERR_FORMAT, "tensor '%s' row length %" PRId64
                        " is not a multiple of the %s block size %" PRId64,
                        t->name, t->ne[0], tt->name, tt->block_size);
    }
    const uint64_t n_blocks = (uint64_t) (n_elements / tt->block_size);
    if (n_blocks > UINT64_MAX / tt->type_size || n_blocks * tt->type_size > SIZE_MAX) {
        return ckv_fail(CKV_ERR_FORMAT, "overflow: tensor '%s' (%" PRId64 " elements of %s) is too large",
                        t->name, n_elements, tt->name);
    }
    t->size = n_blocks * tt->type_size;
    if ((st = read_u64(p, &t->offset)) != CKV_OK) {
        return st;
    }
    if (t->offset % f->alignment != 0) {
        return ckv_fail(CKV_ERR_FORMAT, "tensor '%s' offset %" PRIu64 " is not a multiple of the alignment %" PRIu64,
                        t->name, t->offset, f->alignment);
    }
    return CKV_OK;
}

static int32_t parse_tensor_infos(struct parser * p, struct gguf_file * f) {
    struct name_set set = {0};
    f->tensors = calloc((size_t) (f->n_tensors ? f->n_tensors : 1), sizeof(*f->tensors));
    int32_t st = f->tensors ? name_set_init(&set, f->n_tensors)
                            : ckv_fail(CKV_ERR_OOM, "out of memory for %" PRIu64 " tensors", f->n_tensors);
    if (st != CKV_OK) {
        return st;
    }
    for (uint64_t i = 0; i < f->n_tensors && st == CKV_OK; i++) {
        struct gguf_tensor * t = &f->tensors[i];
        int64_t              n_elements = 0;
        if ((st = parse_tensor_name(p, i, t)) != CKV_OK) {
            break;
        }
        if (!name_set_add(&set, t->name)) {
            st = ckv_fail(CKV_ERR_FORMAT, "duplicate tensor name '%s' (tensor #%" PRIu64 ")", t->name, i);
        } else if ((st = parse_tensor_shape(p, t, &n_elements)) == CKV_OK) {
            st = parse_tensor_layout(p, f, t, n_elements);
        }
    }
    free(set.slots);
    return st;
}

// The data section starts at the end of the infos rounded up to the alignment; every tensor's
// [offset, offset + size) must lie inside the file.
static int32_t place_tensors(struct parser * p, struct gguf_file * f) {
    const uint64_t pad = (f->alignment - p->pos % f->alignment) % f->alignment;
    f->data_offset = p->pos + pad;  // pos <= size and alignment <= 2^32: no overflow
    if (f->n_tensors > 0 && f->data_offset > p->size) {
        return ckv_fail(CKV_ERR_FORMAT, "truncated: the tensor data section starts at offset %" PRIu64
                        " but the file has %zu bytes", f->data_offset, p->size);
    }
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        struct gguf_tensor * t    = &f->tensors[i];
        const uint64_t       room = p->size - f->data_offset;  // bytes of data section
        if (t->offset <= room && t->size <= room - t->offset) {
            t->data = p->data + f->data_offset + t->offset;
            continue;
        }
        if (t->offset > UINT64_MAX - f->data_offset ||
            t->size > UINT64_MAX - f->data_offset - t->offset) {
            return ckv_fail(CKV_ERR_FORMAT, "overflow: tensor '%s' offset %" PRIu64 " + size %" PRIu64
                            " is past 2^64", t->name, t->offset, t->size);
        }
        const uint64_t start = f->data_offset + t->offset;
        return ckv_fail(CKV_ERR_FORMAT, "tensor '%s' data [%" PRIu64 ", %" PRIu64
                        ") is outside the file (size %zu)", t->name, start, start + t->size, p->size);
    }
    return CKV_OK;
}

// =============================================================================================
// Opening and closing
// =============================================================================================

static int32_t parse_image(struct gguf_file * f) {
    struct parser p = {.data = f->image, .size = f->image_size, .pos = 0};
    int32_t       st = parse_header(&p, f);
    if (st == CKV_OK) st = parse_kvs(&p, f);
    if (st == CKV_OK) st = read_alignment(f);
    if (st == CKV_OK) st = parse_tensor_infos(&p, f);
    if (st == CKV_OK) st = place_tensors(&p, f);
    return st;
}

static void release_image(const void * image, size_t size, bool mmapped, bool owned) {
    if (!owned) {
        return;
    }
#if defined(HAVE_MMAP)
    if (mmapped) {
        munmap((void *) image, size);
        return;
    }
#endif
    (void) size;
    (void) mmapped;
    free((void *) image);
}

// What gguf_close needs beyond the public struct: whether the image is ours to release.
struct gguf_file_owned {
    struct gguf_file pub;  // first: a struct gguf_file * points here
    bool             owns_image;
};

// Takes over the image when owned (also on failure).
static int32_t open_image(const void * image, size_t size, bool mmapped, bool owned,
                          struct gguf_file ** out) {
    struct gguf_file_owned * fo = calloc(1, sizeof(*fo));
    if (!fo) {
        release_image(image, size, mmapped, owned);
        return ckv_fail(CKV_ERR_OOM, "out of memory for a GGUF file");
    }
    struct gguf_file * f = &fo->pub;
    f->image       = image;
    f->image_size  = size;
    f->mmapped     = mmapped;
    f->alignment   = GGUF_DEFAULT_ALIGNMENT;
    fo->owns_image = owned;
    const int32_t st = parse_image(f);
    if (st != CKV_OK) {
        gguf_close(f);
        return st;
    }
    *out = f;
    return CKV_OK;
}

int32_t gguf_open_memory(const void * image, size_t size, struct gguf_file ** out) {
    if (!out || (!image && size > 0)) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "gguf_open_memory: NULL argument");
    }
    *out = NULL;
    return open_image(image ? image : "", size, false, false, out);
}

void gguf_close(struct gguf_file * f) {
    if (!f) {
        return;
    }
    for (uint64_t i = 0; f->kv && i < f->n_kv; i++) {
        free(f->kv[i].key);
        free(f->kv[i].strs);
    }
    free(f->kv);
    free(f->tensors);
    const struct gguf_file_owned * fo = (const struct gguf_file_owned *) f;
    release_image(f->image, f->image_size, f->mmapped, fo->owns_image);
    free((void *) fo);
}

// Reads the whole file into the heap (use_mmap false, or mmap unavailable or failed).
static int32_t read_whole_file(FILE * fp, const char * path, size_t size, void ** image) {
    uint8_t * buf = malloc(size ? size : 1);
    if (!buf) {
        return ckv_fail(CKV_ERR_OOM, "out of memory reading '%s' (%zu bytes)", path, size);
    }
    size_t got = 0;
    while (got < size) {
        const size_t n = fread(buf + got, 1, size - got, fp);
        if (n == 0) {
            free(buf);
            return ckv_fail(CKV_ERR_IO, "cannot read '%s': got %zu of %zu bytes", path, got, size);
        }
        got += n;
    }
    *image = buf;
    return CKV_OK;
}

static int32_t file_size(FILE * fp, const char * path, size_t * size) {
#if defined(HAVE_MMAP)
    struct stat sb;
    if (fstat(fileno(fp), &sb) != 0 || !S_ISREG(sb.st_mode)) {
        return ckv_fail(CKV_ERR_IO, "cannot open '%s': not a regular file", path);
    }
    if ((uint64_t) sb.st_size > SIZE_MAX) {
        return ckv_fail(CKV_ERR_IO, "'%s' is too large to map (%lld bytes)", path, (long long) sb.st_size);
    }
    *size = (size_t) sb.st_size;
    return CKV_OK;
#else
    long end = -1;
    if (fseek(fp, 0, SEEK_END) == 0) {
        end = ftell(fp);
    }
    if (end < 0 || fseek(fp, 0, SEEK_SET) != 0) {
        return ckv_fail(CKV_ERR_IO, "cannot determine the size of '%s'", path);
    }
    *size = (size_t) end;
    return CKV_OK;
#endif
}

// The file as one read-only image: mapped when asked and possible, else copied to the heap.
static int32_t load_file(const char * path, bool use_mmap, void ** image, size_t * size, bool * mapped) {
    FILE * fp = fopen(path, "rb");
    if (!fp) {
        return ckv_fail(CKV_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
    }
    int32_t st = file_size(fp, path, size);
    *mapped = false;
#if defined(HAVE_MMAP)
    if (st == CKV_OK && use_mmap && *size > 0) {
        void * m = mmap(NULL, *size, PROT_READ, MAP_PRIVATE, fileno(fp), 0);
        if (m != MAP_FAILED) {
            *image  = m;
            *mapped = true;
        } else {
            ckv_log(CKV_LOG_WARN, "mmap of '%s' failed (%s); reading it into memory", path, strerror(errno));
        }
    }
#else
    (void) use_mmap;
#endif
    if (st == CKV_OK && !*mapped) {
        st = read_whole_file(fp, path, *size, image);
    }
    fclose(fp);
    return st;
}

bool gguf_lock_image(const struct gguf_file * f) {
#if defined(HAVE_MMAP)
    if (mlock(f->image, f->image_size) == 0) {
        return true;
    }
    ckv_log(CKV_LOG_WARN, "use_mlock: locking %.1f MiB of weights in RAM failed (%s); they stay "
            "pageable (raise the limit: ulimit -l)", f->image_size / 1048576.0, strerror(errno));
#else
    ckv_log(CKV_LOG_WARN, "use_mlock: not available on this platform; the weights stay pageable");
#endif
    return false;
}

int32_t gguf_open(const char * path, bool use_mmap, struct gguf_file ** out) {
    if (!path || !out) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "gguf_open: NULL argument");
    }
    *out = NULL;
    void *  image  = NULL;
    size_t  size   = 0;
    bool    mapped = false;
    int32_t st     = load_file(path, use_mmap, &image, &size, &mapped);
    if (st != CKV_OK) {
        return st;
    }
    st = open_image(image, size, mapped, true, out);
    if (st != CKV_OK && ckv_last_error()[0] != '\0') {
        // name the file in front of the parser's message
        char msg[1024];
        snprintf(msg, sizeof(msg), "%s", ckv_last_error());
        ckv_fail(st, "%s: %s", path, msg);
    }
    return st;
}

// =============================================================================================
// Lookups and typed getters
// =============================================================================================

const struct gguf_kv * gguf_find_kv(const struct gguf_file * f, const char * key) {
    for (uint64_t i = 0; f && key && i < f->n_kv; i++) {
        if (strcmp(f->kv[i].key, key) == 0) {
            return &f->kv[i];
        }
    }
    return NULL;
}

const struct gguf_tensor * gguf_find_tensor(const struct gguf_file * f, const char * name) {
    for (uint64_t i = 0; f && name && i < f->n_tensors; i++) {
        if (strcmp(f->tensors[i].name, name) == 0) {
            return &f->tensors[i];
        }
    }
    return NULL;
}

// An integer-typed value widened to int64 (u64 values above INT64_MAX flagged by *big).
static bool kv_integer(const struct gguf_kv * kv, int64_t * v, bool * big) {
    const uint8_t * p = kv->value;
    *big = false;
    switch (kv->type) {
        case GGUF_VALUE_UINT8:  { uint8_t x;  memcpy(&x, p, 1); *v = x; return true; }
        case GGUF_VALUE_INT8:   { int8_t x;   memcpy(&x, p, 1); *v = x; return true; }
        case GGUF_VALUE_UINT16: { uint16_t x; memcpy(&x, p, 2); *v = x; return true; }
        case GGUF_VALUE_INT16:  { int16_t x;  memcpy(&x, p, 2); *v = x; return true; }
        case GGUF_VALUE_UINT32: { uint32_t x; memcpy(&x, p, 4); *v = x; return true; }
        case GGUF_VALUE_INT32:  { int32_t x;  memcpy(&x, p, 4); *v = x; return true; }
        case GGUF_VALUE_INT64:  { memcpy(v, p, 8); return true; }
        case GGUF_VALUE_UINT64: {
            uint64_t x;
            memcpy(&x, p, 8);
            *big = x > (uint64_t) INT64_MAX;
            *v   = *big ? INT64_MAX : (int64_t) x;
            return true;
        }
        default: return false;
    }
}

static int32_t get_integer(const struct gguf_file * f, const char * key, int64_t lo, int64_t hi,
                           const char * want, int64_t * out) {
    const struct gguf_kv * kv = gguf_find_kv(f, key);
    if (!kv) {
        return ckv_fail(CKV_ERR_NOT_FOUND, "key '%s' not found", key);
    }
    int64_t v;
    bool    big;
    if (!kv_integer(kv, &v, &big)) {
        return ckv_fail(CKV_ERR_FORMAT, "key '%s' is %s, expected an integer", key,
                        gguf_value_type_name(kv->type));
    }
    if (big || v < lo || v > hi) {
        return ckv_fail(CKV_ERR_FORMAT, "key '%s' value %s%" PRId64 " does not fit in %s", key,
                        big ? "> " : "", v, want);
    }
    *out = v;
    return CKV_OK;
}

int32_t gguf_get_u32(const struct gguf_file * f, const char * key, uint32_t * out) {
    int64_t       v;
    const int32_t st = get_integer(f, key, 0, UINT32_MAX, "u32", &v);
    if (st == CKV_OK) {
        *out = (uint32_t) v;
    }
    return st;
}

int32_t gguf_get_i32(const struct gguf_file * f, const char * key, int32_t * out) {
    int64_t       v;
    const int32_t st = get_integer(f, key, INT32_MIN, INT32_MAX, "i32", &v);
    if (st == CKV_OK) {
        *out = (int32_t) v;
    }
    return st;
}

int32_t gguf_get_f32(const struct gguf_file * f, const char * key, float * out) {
    const struct gguf_kv * kv = gguf_find_kv(f, key);
    if (!kv) {
        return ckv_fail(CKV_ERR_NOT_FOUND, "key '%s' not found", key);
    }
    int64_t v;
    bool    big;
    if (kv->type == GGUF_VALUE_FLOAT32) {
        memcpy(out, kv->value, 4);
    } else if (kv->type == GGUF_VALUE_FLOAT64) {
        double d;
        memcpy(&d, kv->value, 8);
        *out = (float) d;
    } else if (kv_integer(kv, &v, &big)) {  // some converters write whole numbers as integers
        *out = (float) v;
    } else {
        return ckv_fail(CKV_ERR_FORMAT, "key '%s' is %s, expected a number", key,
                        gguf_value_type_name(kv->type));
    }
    return CKV_OK;
}

int32_t gguf_get_bool(const struct gguf_file * f, const char * key, bool * out) {
    const struct gguf_kv * kv = gguf_find_kv(f, key);
    if (!kv) {
        return ckv_fail(CKV_ERR_NOT_FOUND, "key '%s' not found", key);
    }
    if (kv->type != GGUF_VALUE_BOOL) {
        return ckv_fail(CKV_ERR_FORMAT, "key '%s' is %s, expected bool", key, gguf_value_type_name(kv->type));
    }
    *out = *kv->value != 0;
    return CKV_OK;
}

int32_t gguf_get_str(const struct gguf_file * f, const char * key, struct gguf_str * out) {
    const struct gguf_kv * kv = gguf_find_kv(f, key);
    if (!kv) {
        return ckv_fail(CKV_ERR_NOT_FOUND, "key '%s' not found", key);
    }
    if (kv->type != GGUF_VALUE_STRING) {
        return ckv_fail(CKV_ERR_FORMAT, "key '%s' is %s, expected string", key, gguf_value_type_name(kv->type));
    }
    memcpy(&out->len, kv->value, 8);  // checked at open: the bytes follow
    out->data = (const char *) kv->value + 8;
    return CKV_OK;
}

int32_t gguf_get_arr(const struct gguf_file * f, const char * key, uint32_t elem_type,
                     const void ** data, uint64_t * n) {
    const struct gguf_kv * kv = gguf_find_kv(f, key);
    if (!kv) {
        return ckv_fail(CKV_ERR_NOT_FOUND, "key '%s' not found", key);
    }
    if (kv->type != GGUF_VALUE_ARRAY || kv->arr_type != elem_type) {
        return ckv_fail(CKV_ERR_FORMAT, "key '%s' is %s%s%s, expected an array of %s", key,
                        gguf_value_type_name(kv->type), kv->type == GGUF_VALUE_ARRAY ? " of " : "",
                        kv->type == GGUF_VALUE_ARRAY ? gguf_value_type_name(kv->arr_type) : "",
                        gguf_value_type_name(elem_type));
    }
    *data = kv->value;
    *n    = kv->arr_n;
    return CKV_OK;
}

// =============================================================================================
// Rendering values as text
// =============================================================================================

const char * gguf_value_type_name(uint32_t type) {
    static const char * const names[] = {"u8",  "i8",     "u16",   "i16", "u32", "i32", "f32",
                                         "bool", "string", "array", "u64", "i64", "f64"};
    return type < sizeof(names) / sizeof(names[0]) ? names[type] : "unknown";
}

// Appends to buf while it has room and always counts, so the caller learns the full length.
struct text_sink {
    char * buf;
    size_t cap;
    size_t len;
};

static void sink_put(struct text_sink * s, const char * data, size_t n) {
    if (s->len < s->cap) {
        const size_t room = s->cap - s->len;
        memcpy(s->buf + s->len, data, n < room ? n : room);
    }
    s->len += n;
}

static void sink_printf(struct text_sink * s, const char * fmt, ...) CKV_PRINTF(2, 3);
static void sink_printf(struct text_sink * s, const char * fmt, ...) {
    char    tmp[64];
    va_list args;
    va_start(args, fmt);
    const int n = vsnprintf(tmp, sizeof(tmp), fmt, args);
    va_end(args);
    sink_put(s, tmp, n < 0 ? 0 : (size_t) n < sizeof(tmp) ? (size_t) n : sizeof(tmp) - 1);
}

// One scalar at p (checked at open to lie in the image).
static void put_scalar(struct text_sink * s, uint32_t type, const uint8_t * p) {
    union { uint8_t u8; int8_t i8; uint16_t u16; int16_t i16; uint32_t u32; int32_t i32;
            float f32; uint64_t u64; int64_t i64; double f64; } v;
    memcpy(&v, p, scalar_size(type));
    switch (type) {
        case GGUF_VALUE_UINT8:   sink_printf(s, "%" PRIu8, v.u8); break;
        case GGUF_VALUE_INT8:    sink_printf(s, "%" PRId8, v.i8); break;
        case GGUF_VALUE_UINT16:  sink_printf(s, "%" PRIu16, v.u16); break;
        case GGUF_VALUE_INT16:   sink_printf(s, "%" PRId16, v.i16); break;
        case GGUF_VALUE_UINT32:  sink_printf(s, "%" PRIu32, v.u32); break;
        case GGUF_VALUE_INT32:   sink_printf(s, "%" PRId32, v.i32); break;
        case GGUF_VALUE_UINT64:  sink_printf(s, "%" PRIu64, v.u64); break;
        case GGUF_VALUE_INT64:   sink_printf(s, "%" PRId64, v.i64); break;
        case GGUF_VALUE_FLOAT32: sink_printf(s, "%.7g", (double) v.f32); break;
        case GGUF_VALUE_FLOAT64: sink_printf(s, "%.15g", v.f64); break;
        case GGUF_VALUE_BOOL:    sink_printf(s, "%s", v.u8 ? "true" : "false"); break;
        default: break;
    }
}

int32_t gguf_kv_to_string(const struct gguf_kv * kv, char * buf, size_t cap, size_t * n_needed) {
    if (!kv || (!buf && cap > 0)) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "gguf_kv_to_string: NULL argument");
    }
    struct text_sink s = {.buf = buf, .cap = cap, .len = 0};
    if (kv->type == GGUF_VALUE_STRING) {
        uint64_t len;
        memcpy(&len, kv->value, 8);
        sink_put(&s, (const char *) kv->value + 8, (size_t) len);
    } else if (kv->type != GGUF_VALUE_ARRAY) {
        put_scalar(&s, kv->type, kv->value);
    } else if (scalar_size(kv->arr_type) == 0 || kv->arr_n > 16) {  // strings, arrays, long
        sink_printf(&s, "[%" PRIu64 " x %s]", kv->arr_n, gguf_value_type_name(kv->arr_type));
    } else {
        sink_put(&s, "[", 1);
        for (uint64_t i = 0; i < kv->arr_n; i++) {
            sink_put(&s, ", ", i ? 2 : 0);
            put_scalar(&s, kv->arr_type, kv->value + i * scalar_size(kv->arr_type));
        }
        sink_put(&s, "]", 1);
    }
    if (n_needed) {
        *n_needed = s.len + 1;  // with the terminating NUL
    }
    if (s.len + 1 > cap) {
        if (cap > 0) {
            buf[cap - 1] = '\0';
        }
        return ckv_fail(CKV_ERR_BUFFER_TOO_SMALL, "value of '%s' needs %zu bytes, the buffer has %zu",
                        kv->key, s.len + 1, cap);
    }
    buf[s.len] = '\0';
    return CKV_OK;
}
