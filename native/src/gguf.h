// gguf.h - GGUF v2/v3 reader (internal). First stage of the data flow: file -> key/values and
// tensor descriptors pointing into an mmap (or a heap copy). Every count, length, offset and
// size read from the file is checked against the file size before use.
#ifndef CKV_GGUF_H
#define CKV_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum gguf_value_type {
    GGUF_VALUE_UINT8   = 0,
    GGUF_VALUE_INT8    = 1,
    GGUF_VALUE_UINT16  = 2,
    GGUF_VALUE_INT16   = 3,
    GGUF_VALUE_UINT32  = 4,
    GGUF_VALUE_INT32   = 5,
    GGUF_VALUE_FLOAT32 = 6,
    GGUF_VALUE_BOOL    = 7,
    GGUF_VALUE_STRING  = 8,
    GGUF_VALUE_ARRAY   = 9,
    GGUF_VALUE_UINT64  = 10,
    GGUF_VALUE_INT64   = 11,
    GGUF_VALUE_FLOAT64 = 12,
};

struct gguf_str {
    const char * data;  // points into the file image; NOT NUL-terminated
    uint64_t     len;
};

struct gguf_kv {
    char *          key;       // NUL-terminated heap copy
    uint32_t        type;      // enum gguf_value_type
    uint32_t        arr_type;  // element type when type == GGUF_VALUE_ARRAY
    uint64_t        arr_n;     // element count when type == GGUF_VALUE_ARRAY
    const uint8_t * value;     // the raw value bytes (for arrays: the first element)
    struct gguf_str * strs;    // string arrays only: arr_n strings, decoded once at open
};

struct gguf_tensor {
    char         name[65];  // NUL-terminated
    uint32_t     n_dims;
    int64_t      ne[4];     // ne[0] = row length; unused dims are 1
    uint32_t     type;      // ggml type id
    uint64_t     offset;    // relative to the data section
    uint64_t     size;      // bytes, from the type's block layout
    const void * data;      // start of the tensor bytes in the file image
};

struct gguf_file {
    const uint8_t *      image;       // whole file: mmap or heap copy
    size_t               image_size;
    bool                 mmapped;
    uint32_t             version;
    uint64_t             n_kv;
    struct gguf_kv *     kv;
    uint64_t             n_tensors;
    struct gguf_tensor * tensors;
    uint64_t             alignment;   // general.alignment or 32
    uint64_t             data_offset; // start of the tensor data section in the file
};

// Opens and parses path; on failure returns a ckv_status with ckv_last_error() naming the problem
// (CKV_ERR_IO, CKV_ERR_FORMAT: truncated / bad magic / unsupported version / tensor out of
// bounds / overflow, CKV_ERR_UNSUPPORTED: unknown tensor type).
int32_t gguf_open(const char * path, bool use_mmap, struct gguf_file ** out);
// Same, over a caller-owned memory image (used by tests and fuzzing); image must outlive the file.
int32_t gguf_open_memory(const void * image, size_t size, struct gguf_file ** out);
void    gguf_close(struct gguf_file * f);
// Locks the file's image in RAM (mlock), so the OS does not page weights out. Best effort, as
// llama.cpp's use_mlock: false, with a warning logged, when the system refuses (RLIMIT_MEMLOCK)
// or has no mlock.
bool    gguf_lock_image(const struct gguf_file * f);

const struct gguf_kv *     gguf_find_kv(const struct gguf_file * f, const char * key);
const struct gguf_tensor * gguf_find_tensor(const struct gguf_file * f, const char * name);

// Typed scalar getters. Integer getters accept any integer type whose value fits (u32 or u64
// counts, as llama.cpp does). Return CKV_ERR_NOT_FOUND if absent (out untouched), CKV_ERR_FORMAT
// if the type does not fit.
int32_t gguf_get_u32(const struct gguf_file * f, const char * key, uint32_t * out);
int32_t gguf_get_i32(const struct gguf_file * f, const char * key, int32_t * out);
int32_t gguf_get_f32(const struct gguf_file * f, const char * key, float * out);
int32_t gguf_get_bool(const struct gguf_file * f, const char * key, bool * out);
int32_t gguf_get_str(const struct gguf_file * f, const char * key, struct gguf_str * out);
// Arrays: element type must match exactly (for strings use kv->strs).
int32_t gguf_get_arr(const struct gguf_file * f, const char * key, uint32_t elem_type,
                     const void ** data, uint64_t * n);

// Renders a value as text for metadata display ("[N x type]" for long arrays).
int32_t gguf_kv_to_string(const struct gguf_kv * kv, char * buf, size_t cap, size_t * n_needed);

const char * gguf_value_type_name(uint32_t type);

#endif  // CKV_GGUF_H
