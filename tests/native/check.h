// check.h - the one assertion macro of the native tests: CHECK(cond, printf-style message)
// counts a pass or prints the failure with its file and line and counts a fail; tests that
// skip a part (a model file is missing) count it in n_skip.
#ifndef CKV_TEST_CHECK_H
#define CKV_TEST_CHECK_H

#include <stdio.h>

static int n_pass, n_fail, n_skip;

#define CHECK(cond, ...)                                \
    do {                                                \
        if (cond) {                                     \
            n_pass++;                                   \
        } else {                                        \
            n_fail++;                                   \
            printf("FAIL %s:%d: ", __FILE__, __LINE__); \
            printf(__VA_ARGS__);                        \
            printf("\n");                               \
        }                                               \
    } while (0)

// Not every test skips; this keeps n_skip "used" for -Wunused-variable.
static inline int check_n_skipped(void) { return n_skip; }

#endif  // CKV_TEST_CHECK_H
