// test-header.c - the public header compiles alone as strict C11 (-Wall -Werror -pedantic).
#include "clusterkv.h"

int ckv_header_compiles(void) { return CKV_OK; }
