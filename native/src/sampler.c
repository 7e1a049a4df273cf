// sampler.c - picks the next token from a row of logits: the last step of the data flow
// (gguf -> model -> kv -> attention -> logits -> sampler -> Python session).
//
// The chain is llama.cpp's common sampler as llama-cpp-python's `generate` builds it:
//   penalties -> (temperature <= 0: arg-max)
//             | (mirostat: temperature -> Mirostat 1 or 2 -> draw)
//             | top_k -> typical -> top_p -> min_p -> temperature -> draw
// with min_keep = 1 everywhere:
//   penalties  over the last penalty_last_n accepted tokens, for a token seen `count` times:
//              logit > 0 ? logit / repeat : logit * repeat, then
//              logit -= count * frequency + (count > 0) * presence
//   top_k      the k largest logits (ties: lower id first)
//   typical    softmax over the candidates, entropy H; candidates in increasing |-log p - H|
//              (how far each one's surprise is from the expected one) until their cumulative
//              probability exceeds typical_p
//   top_p      softmax over the candidates; the smallest prefix (by probability, descending)
//              whose cumulative probability reaches p
//   min_p      drops candidates with p < min_p * p_max, i.e. logit < max_logit + log(min_p)
//   temperature divides the logits; the draw is from their softmax with the sampler's own
//              xoshiro256** generator (seeded through splitmix64), so a seed gives the same
//              tokens on every platform.
//   mirostat   (Basu et al. 2020) steers the surprise -log2 p of drawn tokens to tau bits with
//              a running threshold mu (starts at 2 tau; after each token mu -= eta (surprise -
//              tau)). Version 1 estimates the Zipf exponent s from the top 100 probabilities
//              and keeps the top k = (e 2^mu / (1 - N^-e))^(1/s) tokens, e = s - 1; version 2
//              keeps the tokens whose surprise is at most mu. mu moves when the drawn token is
//              accepted (ckv_sampler_accept), so a draw that is thrown away (a grammar refused
//              it) does not move it.
// Buffers are sized for n_vocab at init: sampling allocates nothing. top_k is a heap
// selection (O(n log k)); top_p without top_k is a quickselect on the rank where the
// cumulative probability crosses p (O(n) expected): a 150k vocabulary is never fully sorted.
#include "error.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int32_t id;
    float   logit;
} candidate;

struct ckv_sampler {
    struct ckv_sampler_params params;
    int32_t n_vocab;

    int32_t *   history;    // [penalty_last_n] ring of accepted tokens
    int32_t     n_history;  // entries used (<= penalty_last_n)
    int32_t     head;       // next slot to write
    int32_t *   counts;     // [n_vocab] occurrences of each token in the ring
    uint8_t *   seen;       // [n_vocab] scratch: token already penalised in this call
    float *     logits;     // [n_vocab] penalised copy of the input row
    candidate * cand;       // [n_vocab] current candidates (c[0..n) after each step)
    candidate * scratch;    // [n_vocab] every token, the input of the top_k selection
    candidate * reorder;    // [n_vocab] typical's and Mirostat's working copy (NULL if unused)
    uint64_t    rng[4];     // xoshiro256** state

    float     mu;          // Mirostat's surprise threshold (bits)
    float     next_mu;     // mu once the last drawn token is accepted
    ckv_token drawn;       // the last token Mirostat drew, -1 after accept / reset
};

// =============================================================================================
// RNG: xoshiro256** seeded by splitmix64 (both public domain, Blackman & Vigna)
// =============================================================================================

static uint64_t splitmix64(uint64_t * x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z          = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z          = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t xoshiro_next(uint64_t s[4]) {
    const uint64_t result = rotl(s[1] * 5, 7) * 9;
    const uint64_t t      = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

static void rng_seed(uint64_t s[4], uint64_t seed) {
    for (int i = 0; i < 4; i++) {
        s[i] = splitmix64(&seed);
    }
}

// Uniform double in [0, 1) with 53 random bits.
static double rng_uniform(uint64_t s[4]) { return (double) (xoshiro_next(s) >> 11) * 0x1.0p-53; }

// =============================================================================================
// Candidate ordering and selection
// =============================================================================================

// a ranks before b: larger logit first, then lower id (a total order, so results never depend
// on the selection algorithm).
static int before(const candidate * a, const candidate * b) {
    return a->logit > b->logit || (a->logit == b->logit && a->id < b->id);
}

static int compare_desc(const void * pa, const void * pb) {
    const candidate * a = pa;
    const candidate * b = pb;
    return before(a, b) ? -1 : (before(b, a) ? 1 : 0);
}

// Restores the min-heap (worst candidate at the root) below node i.
static void sift_down(candidate * heap, int32_t n, int32_t i) {
    for (;;) {
        int32_t worst = i;
        int32_t l = 2 * i + 1, r = 2 * i + 2;
        if (l < n && before(&heap[worst], &heap[l])) {
            worst = l;
        }
        if (r < n && before(&heap[worst], &heap[r])) {
            worst = r;
        }
        if (worst == i) {
            return;
        }
        candidate t = heap[i];
        heap[i]     = heap[worst];
        heap[worst] = t;
        i           = worst;
    }
}

// Writes the k best of src[0..n) to dst in descending order; O(n log k).
static void select_top(const candidate * src, int32_t n, int32_t k, candidate * dst) {
    for (int32_t i = 0; i < k; i++) {
        dst[i] = src[i];
    }
    for (int32_t i = k / 2 - 1; i >= 0; i--) {
        sift_down(dst, k, i);
    }
    for (int32_t i = k; i < n; i++) {
        if (before(&src[i], &dst[0])) {
            dst[0] = src[i];
            sift_down(dst, k, 0);
        }
    }
    qsort(dst, (size_t) k, sizeof(candidate), compare_desc);
}

// =============================================================================================
// The chain
// =============================================================================================

static void apply_penalties(ckv_sampler * s) {
    const struct ckv_sampler_params * p = &s->params;
    if (p->repeat_penalty == 1.0f && p->frequency_penalty == 0.0f && p->presence_penalty == 0.0f) {
        return;
    }
    for (int32_t i = 0; i < s->n_history; i++) {
        const int32_t t = s->history[i];
        if (s->seen[t]) {
            continue;
        }
        s->seen[t]          = 1;
        const int32_t count = s->counts[t];
        float         l     = s->logits[t];
        l                   = l <= 0.0f ? l * p->repeat_penalty : l / p->repeat_penalty;
        s->logits[t] = l - ((float) count * p->frequency_penalty + (float) (count > 0) * p->presence_penalty);
    }
    for (int32_t i = 0; i < s->n_history; i++) {
        s->seen[s->history[i]] = 0;
    }
}

// Arg-max of the penalised row; ties go to the lowest id.
static ckv_token argmax(const float * logits, int32_t n) {
    int32_t best = 0;
    float   max  = logits[0];
    for (int32_t i = 1; i < n; i++) {
        if (logits[i] > max) {
            max  = logits[i];
            best = i;
        }
    }
    return best;
}

static float max_logit(const candidate * c, int32_t n) {
    float m = c[0].logit;
    for (int32_t i = 1; i < n; i++) {
        m = c[i].logit > m ? c[i].logit : m;
    }
    return m;
}

static void swap(candidate * a, candidate * b) {
    candidate t = *a;
    *a          = *b;
    *b          = t;
}

// Partitions c[lo..hi) around a median-of-three pivot: better candidates first, then the
// pivot (its final index is returned), then worse ones.
static int32_t partition(candidate * c, int32_t lo, int32_t hi) {
    const int32_t mid = lo + (hi - lo) / 2, last = hi - 1;
    if (before(&c[mid], &c[lo])) {
        swap(&c[mid], &c[lo]);
    }
    if (before(&c[last], &c[lo])) {
        swap(&c[last], &c[lo]);
    }
    if (before(&c[last], &c[mid])) {
        swap(&c[last], &c[mid]);
    }
    swap(&c[mid], &c[last]);  // the median of the three is the pivot, parked at the end
    int32_t store = lo;
    for (int32_t i = lo; i < last; i++) {
        if (before(&c[i], &c[last])) {
            swap(&c[i], &c[store++]);
        }
    }
    swap(&c[store], &c[last]);
    return store;
}

// Keeps the smallest set of best candidates whose probability reaches p (the set a sorted
// cumulative sum would cut). Sorted input: one scan. Otherwise a quickselect on the rank where
// the mass crosses p, O(n) expected, so a 150k vocabulary is never sorted. Returns the count;
// the kept candidates are c[0..count), in order only if they were sorted before.
static int32_t top_p(candidate * c, int32_t n, bool sorted, float p) {
    const float m   = sorted ? c[0].logit : max_logit(c, n);
    float       sum = 0.0f;
    for (int32_t i = 0; i < n; i++) {
        sum += expf(c[i].logit - m);
    }
    const float target = p * sum;  // compare unnormalised masses
    float       acc    = 0.0f;     // mass of c[0..lo), all known to be kept
    int32_t     lo = 0, hi = n;    // the cut lies in (lo, hi]
    if (sorted) {
        for (int32_t i = 0; i < n; i++) {
            acc += expf(c[i].logit - m);
            if (acc >= target) {
                return i + 1;
            }
        }
        return n;
    }
    while (hi - lo > 1) {
        const int32_t k      = partition(c, lo, hi);
        float         better = 0.0f;
        for (int32_t i = lo; i < k; i++) {
            better += expf(c[i].logit - m);
        }
        const float with_pivot = acc + better + expf(c[k].logit - m);
        if (acc + better >= target && k > lo) {
            hi = k;  // the cut is among the better ones
        } else if (with_pivot >= target) {
            return k + 1;
        } else {
            acc = with_pivot;
            lo  = k + 1;
        }
    }
    return hi;
}

// Keeps candidates whose logit is at least max + log(min_p) (p_i >= min_p * p_max), in order.
static int32_t min_p(candidate * c, int32_t n, float min_p_value) {
    const float threshold = max_logit(c, n) + logf(min_p_value);
    int32_t     kept      = 0;
    for (int32_t i = 0; i < n; i++) {
        if (c[i].logit >= threshold) {
            c[kept++] = c[i];
        }
    }
    return kept;
}

// Draws from the softmax of the (temperature-scaled) candidates; returns the index in c and,
// if p is not NULL, its probability.
static int32_t draw_index(ckv_sampler * s, const candidate * c, int32_t n, double * p) {
    const float m   = max_logit(c, n);
    double      sum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        sum += expf(c[i].logit - m);
    }
    const double target = sum * rng_uniform(s->rng);
    double       run    = 0.0;
    int32_t      pick   = n - 1;  // if rounding left target a hair above the total
    for (int32_t i = 0; i < n; i++) {
        run += expf(c[i].logit - m);
        if (run >= target) {
            pick = i;
            break;
        }
    }
    if (p) {
        *p = expf(c[pick].logit - m) / sum;
    }
    return pick;
}

static ckv_token draw(ckv_sampler * s, const candidate * c, int32_t n) {
    return c[draw_index(s, c, n, NULL)].id;
}

// log of the softmax normaliser of c[0..n) relative to max m: log sum exp(l - m).
static double log_mass(const candidate * c, int32_t n, float m) {
    double sum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        sum += exp((double) c[i].logit - m);
    }
    return log(sum);
}

static int compare_score_asc(const void * pa, const void * pb) {
    const candidate * a = pa;
    const candidate * b = pb;
    if (a->logit != b->logit) {
        return a->logit < b->logit ? -1 : 1;
    }
    return a->id < b->id ? -1 : (a->id > b->id);
}

// Locally typical sampling: keeps the candidates whose surprise is closest to the entropy until
// their mass exceeds p (at least one). The kept ones end up in that order in c.
static int32_t typical(ckv_sampler * s, candidate * c, int32_t n, float p) {
    const float  m    = max_logit(c, n);
    const double logz = log_mass(c, n, m);
    double       entropy = 0.0;
    for (int32_t i = 0; i < n; i++) {
        const double logp = c[i].logit - m - logz;
        entropy -= exp(logp) * logp;
    }
    candidate * by_score = s->scratch;  // (index into c, distance from the entropy)
    for (int32_t i = 0; i < n; i++) {
        by_score[i] = (candidate) {i, (float) fabs(-(c[i].logit - m - logz) - entropy)};
    }
    qsort(by_score, (size_t) n, sizeof(candidate), compare_score_asc);
    int32_t kept = n;
    double  mass = 0.0;
    for (int32_t i = 0; i < n; i++) {
        mass += exp(c[by_score[i].id].logit - m - logz);
        if (mass > p) {
            kept = i + 1;
            break;
        }
    }
    for (int32_t i = 0; i < kept; i++) {
        s->reorder[i] = c[by_score[i].id];
    }
    memcpy(c, s->reorder, (size_t) kept * sizeof(candidate));
    return kept;
}

// Mirostat 1: the top k tokens, k from the estimated Zipf exponent and mu; they end up in
// c[0..k), best first.
static int32_t mirostat_v1_keep(ckv_sampler * s, candidate * c, int32_t n) {
    enum { M = 100 };  // probabilities the exponent is estimated from (the paper's m)
    const int32_t top = n < M ? n : M;
    select_top(c, n, top, s->reorder);
    double sum_tb = 0.0, sum_tt = 0.0;
    for (int32_t i = 0; i + 1 < top; i++) {
        const double t = log((double) (i + 2) / (double) (i + 1));
        const double b = (double) s->reorder[i].logit - s->reorder[i + 1].logit;  // log p_i/p_i+1
        sum_tb += t * b;
        sum_tt += t * t;
    }
    const double s_hat = sum_tt > 0.0 ? sum_tb / sum_tt : 0.0;
    const double e     = s_hat - 1.0;
    const double k     = pow(e * pow(2.0, s->mu) / (1.0 - pow((double) s->n_vocab, -e)), 1.0 / s_hat);
    const int32_t kept = k >= 1.0 ? (k < (double) n ? (int32_t) k : n) : 1;  // NaN, k < 1: one
    if (kept > top) {  // else the top `top`, already sorted, hold them
        select_top(c, n, kept, s->reorder);
    }
    memcpy(c, s->reorder, (size_t) kept * sizeof(candidate));
    return kept;
}

// Mirostat 2: the tokens whose surprise -log2 p is at most mu (at least the best one).
static int32_t mirostat_v2_keep(ckv_sampler * s, candidate * c, int32_t n) {
    const float  m         = max_logit(c, n);
    const double threshold = m + log_mass(c, n, m) - s->mu * 0.69314718055994531;  // log p >= -mu ln 2
    int32_t      kept      = 0;
    for (int32_t i = 0; i < n; i++) {
        if (c[i].logit >= threshold) {
            c[kept++] = c[i];
        }
    }
    if (kept == 0) {  // nothing was moved: keep the best of c as it is
        int32_t best = 0;
        for (int32_t i = 1; i < n; i++) {
            best = before(&c[i], &c[best]) ? i : best;
        }
        c[0] = c[best];
        kept = 1;
    }
    qsort(c, (size_t) kept, sizeof(candidate), compare_desc);  // drawn best first, as version 1
    return kept;
}

static ckv_token mirostat(ckv_sampler * s, int32_t n) {
    const int32_t kept = s->params.mirostat == 1 ? mirostat_v1_keep(s, s->cand, n)
                                                 : mirostat_v2_keep(s, s->cand, n);
    double        p;
    const int32_t pick = draw_index(s, s->cand, kept, &p);
    s->drawn           = s->cand[pick].id;
    s->next_mu = s->mu - s->params.mirostat_eta * (float) (-log2(p) - s->params.mirostat_tau);
    return s->drawn;
}

// =============================================================================================
// Public API
// =============================================================================================

void ckv_sampler_default_params(struct ckv_sampler_params * out) {
    if (!out) {
        return;
    }
    memset(out, 0, sizeof(*out));
    out->temperature       = 0.8f;
    out->top_k             = 40;
    out->top_p             = 0.95f;
    out->min_p             = 0.05f;
    out->repeat_penalty    = 1.0f;
    out->frequency_penalty = 0.0f;
    out->presence_penalty  = 0.0f;
    out->penalty_last_n    = 64;
    out->typical_p         = 1.0f;
    out->mirostat          = 0;
    out->mirostat_tau      = 5.0f;
    out->mirostat_eta      = 0.1f;
    out->seed              = 0;
}

static int32_t check_params(const struct ckv_sampler_params * p) {
    // NaN fails every comparison below, so each test is written to reject it.
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f)) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "sampler: top_p = %g, must be in (0, 1]", p->top_p);
    }
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f)) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "sampler: min_p = %g, must be in [0, 1]", p->min_p);
    }
    if (p->penalty_last_n < 0) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "sampler: penalty_last_n = %d, must be >= 0",
                        p->penalty_last_n);
    }
    if (!(p->repeat_penalty > 0.0f && isfinite(p->repeat_penalty))) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "sampler: repeat_penalty = %g, must be > 0",
                        p->repeat_penalty);
    }
    if (!isfinite(p->frequency_penalty) || !isfinite(p->presence_penalty)) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "sampler: frequency_penalty = %g and "
                        "presence_penalty = %g must be finite", p->frequency_penalty,
                        p->presence_penalty);
    }
    if (!(p->typical_p > 0.0f && p->typical_p <= 1.0f)) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "sampler: typical_p = %g, must be in (0, 1]",
                        p->typical_p);
    }
    if (p->mirostat < 0 || p->mirostat > 2) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "sampler: mirostat = %d, must be 0, 1 or 2",
                        p->mirostat);
    }
    if (!(p->mirostat_tau > 0.0f && isfinite(p->mirostat_tau)) ||
        !(p->mirostat_eta >= 0.0f && isfinite(p->mirostat_eta))) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "sampler: mirostat_tau = %g must be > 0 and "
                        "mirostat_eta = %g >= 0, both finite", p->mirostat_tau, p->mirostat_eta);
    }
    if (isinf(p->temperature) && p->temperature > 0.0f) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "sampler: temperature is +inf");
    }
    return CKV_OK;
}

int32_t ckv_sampler_init(const ckv_model * model, const struct ckv_sampler_params * params,
                         ckv_sampler ** out) {
    ckv_clear_error();
    if (!model || !params || !out) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_sampler_init: model, params and out must not be NULL");
    }
    *out = NULL;
    const int32_t status = check_params(params);
    if (status != CKV_OK) {
        return status;
    }
    const int32_t n_vocab = ckv_vocab_n_tokens(model);
    if (n_vocab <= 0) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_sampler_init: the model has no vocabulary");
    }
    ckv_sampler * s = calloc(1, sizeof(*s));
    if (!s) {
        return ckv_fail(CKV_ERR_OOM, "ckv_sampler_init: out of memory");
    }
    s->params  = *params;
    s->n_vocab = n_vocab;
    s->history = malloc((size_t) (params->penalty_last_n > 0 ? params->penalty_last_n : 1) * sizeof(int32_t));
    s->counts  = calloc((size_t) n_vocab, sizeof(int32_t));
    s->seen    = calloc((size_t) n_vocab, sizeof(uint8_t));
    s->logits  = malloc((size_t) n_vocab * sizeof(float));
    s->cand    = malloc((size_t) n_vocab * sizeof(candidate));
    s->scratch = malloc((size_t) n_vocab * sizeof(candidate));
    s->reorder = malloc((size_t) n_vocab * sizeof(candidate));
    if (!s->history || !s->counts || !s->seen || !s->logits || !s->cand || !s->scratch ||
        !s->reorder) {
        ckv_sampler_free(s);
        return ckv_fail(CKV_ERR_OOM, "ckv_sampler_init: out of memory for %d tokens", n_vocab);
    }
    ckv_sampler_reset(s, params->seed);
    *out = s;
    return CKV_OK;
}

void ckv_sampler_free(ckv_sampler * sampler) {
    if (!sampler) {
        return;
    }
    free(sampler->history);
    free(sampler->counts);
    free(sampler->seen);
    free(sampler->logits);
    free(sampler->cand);
    free(sampler->scratch);
    free(sampler->reorder);
    free(sampler);
}

int32_t ckv_sampler_sample(ckv_sampler * s, const float * logits, int32_t n_vocab, ckv_token * out) {
    ckv_clear_error();
    if (!s || !logits || !out) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_sampler_sample: sampler, logits and out must not be NULL");
    }
    if (n_vocab != s->n_vocab) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "ckv_sampler_sample: n_vocab = %d, the model has %d",
                        n_vocab, s->n_vocab);
    }
    const struct ckv_sampler_params * p = &s->params;
    memcpy(s->logits, logits, (size_t) n_vocab * sizeof(float));
    apply_penalties(s);
    if (!(p->temperature > 0.0f)) {  // also NaN: greedy
        *out = argmax(s->logits, n_vocab);
        return CKV_OK;
    }

    int32_t n      = n_vocab;
    bool    sorted = false;
    if (p->mirostat) {
        for (int32_t i = 0; i < n_vocab; i++) {
            s->cand[i] = (candidate) {i, s->logits[i] / p->temperature};
        }
        *out = mirostat(s, n_vocab);
        return CKV_OK;
    }
    if (p->top_k > 0 && p->top_k < n_vocab) {
        for (int32_t i = 0; i < n_vocab; i++) {
            s->scratch[i] = (candidate) {i, s->logits[i]};
        }
        n = p->top_k;
        select_top(s->scratch, n_vocab, n, s->cand);
        sorted = true;
    } else {
        for (int32_t i = 0; i < n_vocab; i++) {
            s->cand[i] = (candidate) {i, s->logits[i]};
        }
    }
    if (p->typical_p < 1.0f) {
        n      = typical(s, s->cand, n, p->typical_p);
        sorted = false;  // now in typicality order
    }
    if (p->top_p < 1.0f) {
        n = top_p(s->cand, n, sorted, p->top_p);
    }
    if (p->min_p > 0.0f) {
        n = min_p(s->cand, n, p->min_p);
    }
    for (int32_t i = 0; i < n; i++) {
        s->cand[i].logit /= p->temperature;
    }
    *out = draw(s, s->cand, n);
    return CKV_OK;
}

void ckv_sampler_accept(ckv_sampler * s, ckv_token token) {
    if (!s) {
        return;
    }
    if (s->drawn >= 0 && token == s->drawn) {
        s->mu = s->next_mu;
    }
    s->drawn = -1;
    if (token < 0 || token >= s->n_vocab || s->params.penalty_last_n == 0) {
        return;  // out-of-range ids cannot be penalised; nothing to record
    }
    if (s->n_history == s->params.penalty_last_n) {
        s->counts[s->history[s->head]]--;  // the oldest entry leaves the window
    } else {
        s->n_history++;
    }
    s->history[s->head] = token;
    s->counts[token]++;
    s->head = (s->head + 1) % s->params.penalty_last_n;
}

void ckv_sampler_reset(ckv_sampler * s, uint64_t seed) {
    if (!s) {
        return;
    }
    for (int32_t i = 0; i < s->n_history; i++) {
        s->counts[s->history[i]] = 0;
    }
    s->n_history = 0;
    s->head      = 0;
    s->mu        = 2.0f * s->params.mirostat_tau;
    s->drawn     = -1;
    rng_seed(s->rng, seed);
}
