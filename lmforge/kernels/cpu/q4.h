/* The int4 ("q4") weight layout's shared pieces (kernels.c, q4_cols.c): a block's scales or mins and a block's codes. */
#ifndef LMF_Q4_H
#define LMF_Q4_H

#include <stdint.h>

#include "simd.h"

/* A block's scales or mins: float32, or float16 where those values are exact in it (GGUF's Q4_0/Q4_1/Q8_0 store
 * them so; Q4_1 then holds 0.625 bytes a weight instead of 0.75). Exactly one of the two pointers is set. */
typedef struct {
    const float *f;
    const uint16_t *h;
} scl_t;

static inline float scl_at(scl_t s, int64_t i) { return s.h ? h2f(s.h[i]) : s.f[i]; }

static inline scl_t scl_off(scl_t s, int64_t i) {
    if (s.h) s.h += i;
    else s.f += i;
    return s;
}

/* code j of a block (4 bits: low nibbles hold codes 0-15, high nibbles 16-31; 8 bits: one byte each) */
static inline int block_code(const uint8_t *c, int bits, int j) {
    return bits == 8 ? c[j] : (j < 16 ? c[j] & 15 : c[j - 16] >> 4);
}

#endif
