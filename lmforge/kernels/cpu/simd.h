/* Vector helpers shared by kernels.c and attention.c (included by both; static inline). */
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* exp(x) lane-wise: Cephes' single-precision exp (range reduction by ln 2, degree-5 polynomial, ~1 ulp), 16 or 8
 * lanes at a time; arguments below -87 give ~1e-38, not 0. */
#if defined(__AVX512F__)
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.37626f)), _mm512_set1_ps(-87.33654f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(y, n);
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline __m256 exp_ps(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.37626f)), _mm256_set1_ps(-87.33654f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
    /* 2^n: n + 127 in the exponent field (n is in [-127, 128] after the clamp) */
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
static inline float hsum256(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}
#endif

/* ---- float16 (IEEE binary16) <-> float32: GGUF's scales, the float16 KV cache ---------------------------- */

/* the largest finite float16; the float16 KV cache clamps to it (a larger value would be stored as inf) */
#define F16_MAX 65504.f

static inline float h2f(uint16_t h) {
#if defined(__F16C__) && (defined(__AVX512F__) || defined(__AVX2__)) /* immintrin.h is included for those */
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023;
    uint32_t bits;
    if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (man) { /* subnormal: normalize */
        int e = -1;
        uint32_t m = man;
        do { m <<= 1; e++; } while (!(m & 1024));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((m & 1023) << 13);
    } else bits = sign;
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* x rounded to the nearest float16, ties to even (what F16C's conversions and torch's .half() do); NaN stays NaN,
 * what rounds past F16_MAX becomes inf */
static inline uint16_t f2h(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00 | (uint16_t)((a >> 13) & 0x3ff); /* NaN, quiet */
    if (a >= 0x477ff000u) return sign | 0x7c00;                               /* >= 65520 (or inf): inf */
    if (a >= 0x38800000u) /* a normal float16 (>= 2^-14): round the 13 dropped mantissa bits, rebias 127 -> 15 */
        return sign | (uint16_t)((a + 0xfffu + ((a >> 13) & 1) - 0x38000000u) >> 13);
    /* a subnormal one (units of 2^-24) or 0: adding 0.5 (whose ulp is 2^-24) lets the FPU round the value to a
     * multiple of 2^-24, ties to even, and leaves that multiple in the low mantissa bits */
    float f;
    memcpy(&f, &a, 4);
    f += 0.5f;
    memcpy(&u, &f, 4);
    return sign | (uint16_t)(u - 0x3f000000u);
}

/* dst[i] = float(src[i]) for i < n */
static inline void f16_to_f32_row(float *dst, const uint16_t *src, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
    for (; i < n; i++) dst[i] = h2f(src[i]);
}

/* dst[i] = float16(src[i]) clamped to +-F16_MAX (NaN kept) for i < n: the float16 KV cache's write */
static inline void f32_to_f16_row(uint16_t *dst, const float *src, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    /* min(max, x) / max(-max, x) return x when x is NaN (the second operand) */
    const __m512 hi = _mm512_set1_ps(F16_MAX), lo = _mm512_set1_ps(-F16_MAX);
    for (; i + 16 <= n; i += 16) {
        const __m512 x = _mm512_max_ps(lo, _mm512_min_ps(hi, _mm512_loadu_ps(src + i)));
        _mm256_storeu_si256((__m256i *)(dst + i), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    const __m256 hi = _mm256_set1_ps(F16_MAX), lo = _mm256_set1_ps(-F16_MAX);
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_max_ps(lo, _mm256_min_ps(hi, _mm256_loadu_ps(src + i)));
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
#endif
    for (; i < n; i++) {
        const float x = src[i];
        dst[i] = f2h(x > F16_MAX ? F16_MAX : x < -F16_MAX ? -F16_MAX : x);
    }
}
