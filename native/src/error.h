// error.h - thread-local last-error message and the log callback (internal).
// Every fallible internal function returns a ckv_status and records why with ckv_fail().
#ifndef CKV_ERROR_H
#define CKV_ERROR_H

#include "clusterkv.h"

#if defined(__GNUC__)
#    define CKV_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#    define CKV_PRINTF(a, b)
#endif

// Records a formatted message for ckv_last_error() and returns status, so callers can write
// `return ckv_fail(CKV_ERR_FORMAT, "tensor '%s' ends past the file", name);`
int32_t ckv_fail(int32_t status, const char * fmt, ...) CKV_PRINTF(2, 3);

// Returns a failed status (already recorded by ckv_fail) from the enclosing function:
// `TRY(kv_cache_init(...));`
#define TRY(expr)                  \
    do {                           \
        int32_t st_ = (expr);      \
        if (st_ != CKV_OK) {       \
            return st_;            \
        }                          \
    } while (0)

// Clears the message (called on entry to public functions that can fail).
void ckv_clear_error(void);

// Sends a formatted line to the user's log callback, if one is set.
void ckv_log(int32_t level, const char * fmt, ...) CKV_PRINTF(2, 3);

#endif  // CKV_ERROR_H
