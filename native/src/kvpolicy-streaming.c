// kvpolicy-streaming.c - StreamingLLM (Xiao et al., ICLR 2024): every query head attends to the
// n_sink first positions ("attention sinks") and the most recent budget - n_sink positions, the
// current one included. Nothing is scored, so the list is the same for every head and layer;
// positions that slide out of the window are not read again while they stay out of it.
#include <string.h>

#include "kvpolicy.h"

static void streaming_select(struct kv_policy * p, int32_t il, int64_t pos, const float * q,
                             struct kv_selection * out) {
    int64_t n_pos  = pos + 1;
    int64_t sinks  = n_pos < p->params.n_sink ? n_pos : p->params.n_sink;
    int64_t recent = p->params.budget - sinks;  // >= 1: budget >= n_sink + 1 is checked at init
    int64_t first  = n_pos - recent > sinks ? n_pos - recent : sinks;
    int32_t * list = out->pos;
    int32_t   n    = 0;
    for (int64_t j = 0; j < sinks; j++) {
        list[n++] = (int32_t) j;
    }
    for (int64_t j = first; j <= pos; j++) {
        list[n++] = (int32_t) j;
    }
    out->n[0] = n;
    for (int32_t h = 1; h < out->n_head; h++) {
        memcpy(out->pos + (size_t) h * out->cap, list, (size_t) n * sizeof(int32_t));
        out->n[h] = n;
    }
}

static const struct kv_policy_vtable streaming_vtable = {
    .name   = "streaming",
    .select = streaming_select,
};

int32_t kv_policy_init_streaming(struct kv_policy * p) {
    p->vt = &streaming_vtable;
    return CKV_OK;
}
