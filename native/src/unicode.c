// unicode.c - UTF-8 decoding/encoding, code point flags and the GPT-2 byte alphabet for the
// tokenizer. Decoding follows llama.cpp's unicode_cpt_from_utf8 (lenient, U+FFFD per bad byte)
// because the byte-level BPE pre-splitter rebuilds its words from the decoded code points.
#include "unicode.h"

size_t unicode_utf8_len(uint8_t b) {
    static const uint8_t len_by_high_nibble[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    return len_by_high_nibble[b >> 4];
}

static int is_cont(const char * s, size_t n, size_t i) {
    return i < n && ((uint8_t) s[i] & 0xC0) == 0x80;
}

uint32_t unicode_utf8_decode(const char * s, size_t n, size_t * offset) {
    const size_t  i  = *offset;
    const uint8_t b0 = (uint8_t) s[i];
    uint32_t      cpt;
    size_t        len;
    if (b0 < 0x80) {
        *offset = i + 1;
        return b0;
    }
    if ((b0 & 0xE0) == 0xC0 && is_cont(s, n, i + 1)) {
        cpt = ((uint32_t) (b0 & 0x1F) << 6) | ((uint8_t) s[i + 1] & 0x3F);
        len = 2;
    } else if ((b0 & 0xF0) == 0xE0 && is_cont(s, n, i + 1) && is_cont(s, n, i + 2)) {
        cpt = ((uint32_t) (b0 & 0x0F) << 12) | ((uint32_t) ((uint8_t) s[i + 1] & 0x3F) << 6) |
              ((uint8_t) s[i + 2] & 0x3F);
        len = 3;
    } else if ((b0 & 0xF8) == 0xF0 && is_cont(s, n, i + 1) && is_cont(s, n, i + 2) &&
               is_cont(s, n, i + 3)) {
        cpt = ((uint32_t) (b0 & 0x07) << 18) | ((uint32_t) ((uint8_t) s[i + 1] & 0x3F) << 12) |
              ((uint32_t) ((uint8_t) s[i + 2] & 0x3F) << 6) | ((uint8_t) s[i + 3] & 0x3F);
        len = 4;
        // F5..F7 leads reach past U+10FFFF; llama.cpp aborts on these, we treat them as invalid.
        if (cpt > UNICODE_MAX_CPT) {
            *offset = i + 1;
            return UNICODE_REPLACEMENT;
        }
    } else {
        *offset = i + 1;
        return UNICODE_REPLACEMENT;
    }
    *offset = i + len;
    return cpt;
}

size_t unicode_utf8_encode(uint32_t cpt, char out[4]) {
    if (cpt <= 0x7F) {
        out[0] = (char) cpt;
        return 1;
    }
    if (cpt <= 0x7FF) {
        out[0] = (char) (0xC0 | (cpt >> 6));
        out[1] = (char) (0x80 | (cpt & 0x3F));
        return 2;
    }
    if (cpt <= 0xFFFF) {
        out[0] = (char) (0xE0 | (cpt >> 12));
        out[1] = (char) (0x80 | ((cpt >> 6) & 0x3F));
        out[2] = (char) (0x80 | (cpt & 0x3F));
        return 3;
    }
    if (cpt <= UNICODE_MAX_CPT) {
        out[0] = (char) (0xF0 | (cpt >> 18));
        out[1] = (char) (0x80 | ((cpt >> 12) & 0x3F));
        out[2] = (char) (0x80 | ((cpt >> 6) & 0x3F));
        out[3] = (char) (0x80 | (cpt & 0x3F));
        return 4;
    }
    return 0;
}

uint16_t unicode_cpt_flags(uint32_t cpt) {
    if (cpt > UNICODE_MAX_CPT) {
        return UNICODE_UNDEFINED;
    }
    // last range whose start is <= cpt
    size_t lo = 0, hi = unicode_n_flag_ranges;
    while (hi - lo > 1) {
        const size_t mid = (lo + hi) / 2;
        if (unicode_flag_range_start[mid] <= cpt) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return unicode_flag_range_flags[lo];
}

uint32_t unicode_tolower(uint32_t cpt) {
    size_t lo = 0, hi = unicode_n_lower;
    while (lo < hi) {
        const size_t mid = (lo + hi) / 2;
        if (unicode_lower[mid][0] < cpt) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo < unicode_n_lower && unicode_lower[lo][0] == cpt ? unicode_lower[lo][1] : cpt;
}

// Bytes '!'..'~', 0xA1..0xAC and 0xAE..0xFF stand for themselves; the other 68 bytes, in order,
// become U+0100.. (GPT-2's bytes_to_unicode).
static int byte_is_printable(uint32_t b) {
    return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

uint32_t unicode_byte_to_cpt(uint8_t b) {
    if (byte_is_printable(b)) {
        return b;
    }
    uint32_t n = 0;  // non-printable bytes below b
    for (uint32_t c = 0; c < b; ++c) {
        n += !byte_is_printable(c);
    }
    return 0x100 + n;
}

int32_t unicode_cpt_to_byte(uint32_t cpt) {
    if (cpt < 0x100) {
        return byte_is_printable(cpt) ? (int32_t) cpt : -1;
    }
    uint32_t n = 0;
    for (uint32_t c = 0; c < 0x100; ++c) {
        if (!byte_is_printable(c)) {
            if (0x100 + n == cpt) {
                return (int32_t) c;
            }
            ++n;
        }
    }
    return -1;
}
