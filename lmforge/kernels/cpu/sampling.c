/* Sampling on the CPU, compiled with kernels.c (lmforge/kernels/cpu/__init__.py builds them into one library); the
 * plain-torch reference is lmforge/engine/sampler.py's draw (tests/kernels/test_cpu_sampling.py compares them). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

#define SAMPLE_BLOCK 256        /* values a partial sum covers */
#define SAMPLE_MAX_BLOCKS 4096  /* a vocabulary of up to 1M entries */

/* e[i] = exp(l[i] / t - mx) for i < n <= 16, 0 where l[i] / t is -inf (a masked entry); l / t is divided as torch's
 * logits / temperature is, so the maximum mx matches */
static inline void sample_exp16(const float *l, int n, float t, float mx, float *e) {
#if defined(__AVX512F__)
    const __mmask16 m = (__mmask16)((1u << n) - 1);
    const __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(m, l), _mm512_set1_ps(t));
    const __m512 x = exp_ps(_mm512_sub_ps(v, _mm512_set1_ps(mx)));
    const __mmask16 masked = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ);
    _mm512_mask_storeu_ps(e, m, _mm512_maskz_mov_ps((__mmask16)~masked, x));
#elif defined(__AVX2__) && defined(__FMA__)
    float buf[16];
    for (int i = 0; i < 16; i++) buf[i] = i < n ? l[i] : 0.f;
    for (int h = 0; h < 2; h++) {
        const __m256 v = _mm256_div_ps(_mm256_loadu_ps(buf + 8 * h), _mm256_set1_ps(t));
        const __m256 x = exp_ps(_mm256_sub_ps(v, _mm256_set1_ps(mx)));
        const __m256 keep = _mm256_cmp_ps(v, _mm256_set1_ps(-INFINITY), _CMP_NEQ_UQ);
        _mm256_storeu_ps(buf + 8 * h, _mm256_and_ps(x, keep));
    }
    memcpy(e, buf, sizeof(float) * (size_t)n);
#else
    for (int i = 0; i < n; i++) {
        const float v = l[i] / t;
        e[i] = v == -INFINITY ? 0.f : expf(v - mx);
    }
#endif
}

/* out[r] = a token drawn from softmax(logits[r] / temps[r]) by inverse CDF at u[r] in [0, 1): the first index whose
 * cumulative sum of exp(l / t - max) (float64) reaches (1 - u) * total, so only entries of positive probability are
 * drawn (what the sampler's torch draw computes, in two passes over the row and without its [rows, vocab] temporaries).
 * -1 for a row the caller must draw itself: a NaN or +inf in it, no finite entry, or a vocabulary over 1M. */
void lmf_sample_temperature(const float *logits, int64_t rows, int64_t vocab, int64_t ld, const float *temps,
                            const double *u, int64_t *out, int nt) {
#pragma omp parallel for schedule(static) num_threads(rows > 1 ? nt : 1)
    for (int64_t r = 0; r < rows; r++) {
        const float *l = logits + r * ld;
        const float t = temps[r];
        const int64_t nblk = (vocab + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK;
        out[r] = -1;
        if (nblk > SAMPLE_MAX_BLOCKS || !(t > 0.f)) continue;
        float mx = -INFINITY;
        int bad = 0;
        int64_t j = 0;
#if defined(__AVX512F__)
        __m512 vmx = _mm512_set1_ps(-INFINITY);
        const __m512 vt = _mm512_set1_ps(t), inf = _mm512_set1_ps(INFINITY);
        for (; j + 16 <= vocab; j += 16) {
            const __m512 v = _mm512_div_ps(_mm512_loadu_ps(l + j), vt);
            bad |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v, inf, _CMP_EQ_OQ);
            vmx = _mm512_max_ps(vmx, v);
        }
        mx = _mm512_reduce_max_ps(vmx);
#endif
        for (; j < vocab; j++) {
            const float v = l[j] / t;
            bad |= v != v || v == INFINITY;
            mx = v > mx ? v : mx;
        }
        if (bad || mx == -INFINITY) continue;
        double sums[SAMPLE_MAX_BLOCKS], total = 0.0;
        float e[16];
        for (int64_t b = 0; b < nblk; b++) {
            double acc = 0.0;
#if defined(__AVX512F__)
            __m512d a0 = _mm512_setzero_pd(), a1 = a0; /* float64 lanes: the sum's order, not its precision, differs */
            for (int64_t j = b * SAMPLE_BLOCK; j < vocab && j < (b + 1) * SAMPLE_BLOCK; j += 16) {
                const int n = vocab - j < 16 ? (int)(vocab - j) : 16;
                for (int i = n; i < 16; i++) e[i] = 0.f;
                sample_exp16(l + j, n, t, mx, e);
                a0 = _mm512_add_pd(a0, _mm512_cvtps_pd(_mm256_loadu_ps(e)));
                a1 = _mm512_add_pd(a1, _mm512_cvtps_pd(_mm256_loadu_ps(e + 8)));
            }
            acc = _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
#else
            for (int64_t j = b * SAMPLE_BLOCK; j < vocab && j < (b + 1) * SAMPLE_BLOCK; j += 16) {
                const int n = vocab - j < 16 ? (int)(vocab - j) : 16;
                sample_exp16(l + j, n, t, mx, e);
                for (int i = 0; i < n; i++) acc += e[i];
            }
#endif
            sums[b] = acc;
            total += acc;
        }
        const double target = (1.0 - u[r]) * total; /* in (0, total]: the maximum's entry alone is exp(0) = 1 */
        double c = 0.0;
        int64_t b = 0;
        while (b < nblk - 1 && c + sums[b] < target) c += sums[b++];
        int64_t pick = -1;
        for (int64_t j = b * SAMPLE_BLOCK; j < vocab && j < (b + 1) * SAMPLE_BLOCK && out[r] < 0; j += 16) {
            const int n = vocab - j < 16 ? (int)(vocab - j) : 16;
            sample_exp16(l + j, n, t, mx, e);
            for (int i = 0; i < n; i++) {
                if (e[i] > 0.f) pick = j + i;
                c += e[i];
                if (c >= target && e[i] > 0.f) {
                    out[r] = j + i;
                    break;
                }
            }
        }
        /* the block's sum and its scan round differently: a target at its very end takes its last positive entry */
        if (out[r] < 0) out[r] = pick;
    }
}
