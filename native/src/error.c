// error.c - thread-local last-error message, status names and the log callback.
#include "error.h"

#include <stdarg.h>
#include <stdio.h>

#if defined(_MSC_VER)
#    define THREAD_LOCAL __declspec(thread)
#else
#    define THREAD_LOCAL _Thread_local
#endif

static THREAD_LOCAL char last_error[1024];

static ckv_log_callback log_callback;
static void *           log_user_data;

int32_t ckv_fail(int32_t status, const char * fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(last_error, sizeof(last_error), fmt, args);
    va_end(args);
    return status;
}

void ckv_clear_error(void) { last_error[0] = '\0'; }

const char * ckv_last_error(void) { return last_error; }

const char * ckv_status_name(int32_t status) {
    switch (status) {
        case CKV_OK:                   return "CKV_OK";
        case CKV_ERR_INVALID_ARG:      return "CKV_ERR_INVALID_ARG";
        case CKV_ERR_FORMAT:           return "CKV_ERR_FORMAT";
        case CKV_ERR_UNSUPPORTED:      return "CKV_ERR_UNSUPPORTED";
        case CKV_ERR_OOM:              return "CKV_ERR_OOM";
        case CKV_ERR_CTX_FULL:         return "CKV_ERR_CTX_FULL";
        case CKV_ERR_IO:               return "CKV_ERR_IO";
        case CKV_ERR_CUDA:             return "CKV_ERR_CUDA";
        case CKV_ERR_NOT_FOUND:        return "CKV_ERR_NOT_FOUND";
        case CKV_ERR_BUFFER_TOO_SMALL: return "CKV_ERR_BUFFER_TOO_SMALL";
        default:                       return "CKV_ERR_UNKNOWN";
    }
}

void ckv_log_set(ckv_log_callback callback, void * user_data) {
    log_callback  = callback;
    log_user_data = user_data;
}

void ckv_log(int32_t level, const char * fmt, ...) {
    if (!log_callback) {
        return;
    }
    char    line[1024];
    va_list args;
    va_start(args, fmt);
    vsnprintf(line, sizeof(line), fmt, args);
    va_end(args);
    log_callback(level, line, log_user_data);
}
