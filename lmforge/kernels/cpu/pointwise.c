/* lmforge's CPU kernels for the pointwise and lookup ops of a step (float32): RMSNorm with the residual add, rotary
 * embedding, SiLU-and-mul, token embedding rows, rotary cos/sin. Built into one library with kernels.c (see there
 * for the conventions: ctypes entry points, `nt` OpenMP threads); each has a plain-torch reference in
 * lmforge/backends/cpu.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

/* ---- RMSNorm, with an optional residual add --------------------------------------------------------------- */

/* h = x (+ residual; then written to res_out); out = h * rsqrt(mean(h^2) + eps) * (w + offset) */
void lmf_rms_norm(const float *x, const float *residual, const float *w, float *out, float *res_out, int64_t rows,
                  int64_t dim, int64_t ldx, int64_t ldr, float eps, float offset, int nt) {
#pragma omp parallel for schedule(static) num_threads(rows > 8 ? nt : 1)
    for (int64_t i = 0; i < rows; i++) {
        const float *xi = x + i * ldx;
        float *oi = out + i * dim;
        const float *h = xi;
        if (residual) {
            const float *ri = residual + i * ldr;
            float *hi = res_out + i * dim;
            for (int64_t j = 0; j < dim; j++) hi[j] = xi[j] + ri[j];
            h = hi;
        }
        float ss = 0.f;
        for (int64_t j = 0; j < dim; j++) ss += h[j] * h[j];
        float inv = 1.f / sqrtf(ss / (float)dim + eps);
        for (int64_t j = 0; j < dim; j++) oi[j] = h[j] * inv * (w[j] + offset);
    }
}

/* ---- rotary embedding (HF's rotate-half layout), on q and k at once ---------------------------------------- */

/* src [T, H, D] with token stride lds and head stride D -> dst [T, H, D] contiguous; the first rot dims of each
 * head rotate by cos/sin [T, rot] (both halves of cos/sin hold the same angle), the rest is copied */
static void rope_one(const float *src, int64_t lds, float *dst, int64_t t, int64_t heads, int64_t dim, int64_t rot,
                     const float *cos, const float *sin) {
    const int64_t half = rot / 2;
    const float *c = cos + t * rot, *s = sin + t * rot;
    for (int64_t h = 0; h < heads; h++) {
        const float *x = src + t * lds + h * dim;
        float *o = dst + (t * heads + h) * dim;
        for (int64_t j = 0; j < half; j++) {
            o[j] = x[j] * c[j] - x[j + half] * s[j];
            o[j + half] = x[j + half] * c[j + half] + x[j] * s[j + half];
        }
        for (int64_t j = rot; j < dim; j++) o[j] = x[j];
    }
}

void lmf_rope(const float *q, int64_t ldq, int64_t hq, const float *k, int64_t ldk, int64_t hk, int64_t T,
              int64_t dim, int64_t rot, const float *cos, const float *sin, float *q_out, float *k_out, int nt) {
#pragma omp parallel for schedule(static) num_threads(T > 8 ? nt : 1)
    for (int64_t t = 0; t < T; t++) {
        rope_one(q, ldq, q_out, t, hq, dim, rot, cos, sin);
        rope_one(k, ldk, k_out, t, hk, dim, rot, cos, sin);
    }
}


/* ---- SiLU(gate) * up: x [rows, 2d] (row stride ldx) -> out [rows, d] --------------------------------------- */

void lmf_silu_and_mul(const float *x, int64_t rows, int64_t d, int64_t ldx, float *out, int nt) {
#pragma omp parallel for schedule(static) num_threads(rows * d >= 65536 ? nt : 1)
    for (int64_t i = 0; i < rows; i++) {
        const float *g = x + i * ldx, *u = g + d;
        float *o = out + i * d;
        int64_t j = 0;
#if defined(__AVX512F__)
        const __m512 one = _mm512_set1_ps(1.f);
        for (; j + 16 <= d; j += 16) {
            __m512 gv = _mm512_loadu_ps(g + j);
            __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            _mm512_storeu_ps(o + j, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + j)));
        }
#elif defined(__AVX2__) && defined(__FMA__)
        const __m256 one = _mm256_set1_ps(1.f);
        for (; j + 8 <= d; j += 8) {
            __m256 gv = _mm256_loadu_ps(g + j);
            __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + j)));
        }
#endif
        for (; j < d; j++) o[j] = g[j] / (1.f + expf(-g[j])) * u[j];
    }
}


/* ---- table lookups: token embedding rows, rotary cos/sin ------------------------------------------------------ */

/* out[i] = table[ids[i]] (rows of dim floats; table rows ld apart): the embedding of a step's tokens */
void lmf_embedding(const float *table, int64_t ld, const int64_t *ids, int64_t n, int64_t dim, float *out, int nt) {
#pragma omp parallel for schedule(static) num_threads(n * dim >= 65536 ? nt : 1)
    for (int64_t i = 0; i < n; i++) memcpy(out + i * dim, table + ids[i] * ld, sizeof(float) * (size_t)dim);
}

/* cos, sin [T, 2 * half]: angle = (float)pos * inv_freq[j] (/ pscale), both halves alike, times ascale */
void lmf_cos_sin(const int64_t *pos, const float *inv_freq, int64_t T, int64_t half, float pscale, float ascale,
                 float *cos_out, float *sin_out, int nt) {
#pragma omp parallel for schedule(static) num_threads(T * half >= 65536 ? nt : 1)
    for (int64_t t = 0; t < T; t++) {
        const float p = (float)pos[t];
        float *c = cos_out + t * 2 * half, *s = sin_out + t * 2 * half;
        for (int64_t j = 0; j < half; j++) {
            float a = p * inv_freq[j];
            if (pscale != 1.f) a = a / pscale;
            float cv = cosf(a), sv = sinf(a);
            if (ascale != 1.f) {
                cv *= ascale;
                sv *= ascale;
            }
            c[j] = c[half + j] = cv;
            s[j] = s[half + j] = sv;
        }
    }
}
