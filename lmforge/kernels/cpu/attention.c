/* Attention over the paged KV cache, float32 or float16 (read as float32: every product and sum is float32),
 * compiled with kernels.c (lmforge/kernels/cpu/__init__.py builds them into one library); the plain-torch
 * reference is lmforge/backends/cpu/attention.py. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

/* v[i] = exp(v[i] - shift) for i < n, returning their sum */
static inline float exp_shifted(float *v, int64_t n, float shift) {
    int64_t j = 0;
    float sum = 0.f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps(), sh = _mm512_set1_ps(shift);
    for (; j + 16 <= n; j += 16) {
        __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(v + j), sh));
        _mm512_storeu_ps(v + j, e);
        acc = _mm512_add_ps(acc, e);
    }
    sum = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps(), sh = _mm256_set1_ps(shift);
    for (; j + 8 <= n; j += 8) {
        __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(v + j), sh));
        _mm256_storeu_ps(v + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum256(acc);
#endif
    for (; j < n; j++) {
        v[j] = expf(v[j] - shift);
        sum += v[j];
    }
    return sum;
}

static inline float dot(const float *a, const float *b, int64_t n) {
    int64_t j = 0;
    float s = 0.f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; j + 16 <= n; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j), acc);
    s = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    s = _mm_cvtss_f32(h);
#endif
    for (; j < n; j++) s += a[j] * b[j];
    return s;
}

static inline void axpy(float a, const float *x, float *y, int64_t n) {
    for (int64_t j = 0; j < n; j++) y[j] += a * x[j];
}

#if defined(__AVX512F__)
/* 16 channels of a cache row, float32 or float16 (half: a constant once attend64 is inlined) */
static inline __m512 load16(const void *row, int c, int half) {
    return half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + 16 * c)))
                : _mm512_loadu_ps((const float *)row + 16 * c);
}

/* One (token, kv head) item for 64-dim keys and values, its group's query heads 4 at a time: their queries and value
 * sums stay in registers through one pass over the keys and one over the values (no per-key loads and stores of the
 * accumulators), keys and values are prefetched 8 slots ahead (the slots of a paged sequence are not contiguous), and
 * the softmax's 1 / sum scales the output instead of every weight. k and v point at this kv head's channels, ldk and
 * ldv count elements of the cache's type (half: float16, 128 bytes a row, else float32, 256). */
static inline __attribute__((always_inline)) void attend64(const float *qh, int64_t group, const void *k, int64_t ldk,
                                                           const void *v, int64_t ldv, const int64_t *slot_of,
                                                           int64_t len, float scale, float *p, float *out,
                                                           const int half) {
    enum { PF = 8 };
    const int64_t esize = half ? 2 : 4, lines = half ? 2 : 4; /* bytes an element, cache lines a row */
    const char *kb = (const char *)k, *vb = (const char *)v;
    for (int64_t g0 = 0; g0 < group; g0 += 4) {
        const int ng = group - g0 < 4 ? (int)(group - g0) : 4;
        __m512 qv[4][4], acc[4][4];
        float mx[4], inv[4];
        for (int g = 0; g < 4; g++) {
            mx[g] = -INFINITY;
            for (int c = 0; c < 4; c++)
                qv[g][c] = g < ng ? _mm512_mul_ps(_mm512_loadu_ps(qh + (g0 + g) * 64 + 16 * c), _mm512_set1_ps(scale))
                                  : _mm512_setzero_ps();
        }
        for (int64_t j = 0; j < len; j++) {
            const char *kj = kb + slot_of[j] * ldk * esize;
            if (j + PF < len) {
                const char *next = kb + slot_of[j + PF] * ldk * esize;
                for (int c = 0; c < lines; c++) _mm_prefetch(next + 64 * c, _MM_HINT_T0);
            }
            const __m512 k0 = load16(kj, 0, half), k1 = load16(kj, 1, half), k2 = load16(kj, 2, half),
                         k3 = load16(kj, 3, half);
            for (int g = 0; g < 4; g++) {
                if (g >= ng) break;
                __m512 d = _mm512_fmadd_ps(qv[g][1], k1, _mm512_mul_ps(qv[g][0], k0));
                d = _mm512_fmadd_ps(qv[g][3], k3, _mm512_fmadd_ps(qv[g][2], k2, d));
                const float sc = _mm512_reduce_add_ps(d);
                p[(g0 + g) * len + j] = sc;
                mx[g] = sc > mx[g] ? sc : mx[g];
            }
        }
        for (int g = 0; g < ng; g++) inv[g] = 1.f / exp_shifted(p + (g0 + g) * len, len, mx[g]);
        for (int g = 0; g < 4; g++)
            for (int c = 0; c < 4; c++) acc[g][c] = _mm512_setzero_ps();
        for (int64_t j = 0; j < len; j++) {
            const char *vj = vb + slot_of[j] * ldv * esize;
            if (j + PF < len) {
                const char *next = vb + slot_of[j + PF] * ldv * esize;
                for (int c = 0; c < lines; c++) _mm_prefetch(next + 64 * c, _MM_HINT_T0);
            }
            const __m512 v0 = load16(vj, 0, half), v1 = load16(vj, 1, half), v2 = load16(vj, 2, half),
                         v3 = load16(vj, 3, half);
            for (int g = 0; g < 4; g++) {
                if (g >= ng) break;
                const __m512 w = _mm512_set1_ps(p[(g0 + g) * len + j]);
                acc[g][0] = _mm512_fmadd_ps(w, v0, acc[g][0]);
                acc[g][1] = _mm512_fmadd_ps(w, v1, acc[g][1]);
                acc[g][2] = _mm512_fmadd_ps(w, v2, acc[g][2]);
                acc[g][3] = _mm512_fmadd_ps(w, v3, acc[g][3]);
            }
        }
        for (int g = 0; g < ng; g++)
            for (int c = 0; c < 4; c++)
                _mm512_storeu_ps(out + (g0 + g) * 64 + 16 * c, _mm512_mul_ps(acc[g][c], _mm512_set1_ps(inv[g])));
    }
}

/* attend64 compiled once per cache type */
static void attend64_f32(const float *qh, int64_t group, const void *k, int64_t ldk, const void *v, int64_t ldv,
                         const int64_t *slot_of, int64_t len, float scale, float *p, float *out) {
    attend64(qh, group, k, ldk, v, ldv, slot_of, len, scale, p, out, 0);
}

static void attend64_f16(const float *qh, int64_t group, const void *k, int64_t ldk, const void *v, int64_t ldv,
                         const int64_t *slot_of, int64_t len, float scale, float *p, float *out) {
    attend64(qh, group, k, ldk, v, ldv, slot_of, len, scale, p, out, 1);
}
#endif

/* Causal attention of every query token to its sequence's keys in the paged cache (this step's keys already
 * written). q [T, Hq, D] (token stride ldq), out [T, Hq, Dv]; caches [num_blocks, block_size, Hk, D|vhs] of float32,
 * or of float16 given `half` (row strides ldk / ldv between consecutive slots and head strides D / vhs, all in
 * elements; the first Dv <= vhs channels of a value are read, so MLA's one latent cache serves as both);
 * block_tables [S, bt_stride] int32; q_start/q_lens/kv_lens [S] int32. Query token i of sequence s sits at position
 * kv_len - q_len + i and sees keys [max(0, pos - window + 1), pos] (window 0: no window). One work item per (token,
 * kv head). Given `key`, this step's keys and values (float32) are first written to their cache slots (`slots` [T]),
 * as fill_kv_cache does (a float16 cache: rounded to nearest even, clamped to +-F16_MAX). */
void lmf_paged_attention(const float *q, int64_t ldq, void *kc, int64_t ldk, void *vc, int64_t ldv,
                         const int32_t *block_tables, int64_t bt_stride, const int32_t *q_start,
                         const int32_t *q_lens, const int32_t *kv_lens, int64_t S, int64_t T, int64_t hq,
                         int64_t hk, int64_t D, int64_t Dv, int64_t vhs, int64_t block_size, float scale,
                         int64_t window, int64_t max_kv, float *out, const float *key, int64_t ldkn,
                         const float *value, int64_t ldvn, const int64_t *slots, int half, int nt) {
    const int64_t group = hq / hk;
    float *const kf = (float *)kc, *const vf = (float *)vc;
    uint16_t *const kh = (uint16_t *)kc, *const vh = (uint16_t *)vc;
    if (key) /* this step's keys and values into their slots first (key [T, Hk, D], value [T, Hk, Dv]) */
        for (int64_t t = 0; t < T; t++) {
            if (half) f32_to_f16_row(kh + slots[t] * ldk, key + t * ldkn, hk * D);
            else memcpy(kf + slots[t] * ldk, key + t * ldkn, sizeof(float) * (size_t)(hk * D));
            for (int64_t h = 0; h < hk; h++) {
                if (half) f32_to_f16_row(vh + slots[t] * ldv + h * vhs, value + t * ldvn + h * Dv, Dv);
                else memcpy(vf + slots[t] * ldv + h * vhs, value + t * ldvn + h * Dv, sizeof(float) * (size_t)Dv);
            }
        }
    int64_t *tok_seq = (int64_t *)malloc(sizeof(int64_t) * (size_t)(T > 0 ? T : 1));
    for (int64_t s = 0; s < S; s++)
        for (int64_t i = 0; i < q_lens[s]; i++) tok_seq[q_start[s] + i] = s;
#pragma omp parallel num_threads(T * hk > 1 ? nt : 1)
    {
        float *p = (float *)malloc(sizeof(float) * (size_t)(group * (max_kv > 0 ? max_kv : 1)));
        float *acc = (float *)malloc(sizeof(float) * (size_t)(group * Dv));
        int64_t *slot_of = (int64_t *)malloc(sizeof(int64_t) * (size_t)(max_kv > 0 ? max_kv : 1));
        /* a float16 cache's key or value row, widened to float32 once for all the group's query heads */
        float *row = (float *)malloc(sizeof(float) * (size_t)(D > Dv ? D : Dv));
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < T * hk; item++) {
            const int64_t t = item / hk, h = item % hk, s = tok_seq[t];
            const int64_t pos = kv_lens[s] - q_lens[s] + (t - q_start[s]);
            const int64_t lo = window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0;
            const int64_t len = pos + 1 - lo;
            const int32_t *bt = block_tables + s * bt_stride;
            const float *qh = q + t * ldq + h * group * D;
            float mx[64];
            for (int64_t g = 0; g < group; g++) mx[g] = -INFINITY;
            /* the cache slot of every key, without a division per key */
            for (int64_t j = 0, blk = lo / block_size, off = lo % block_size; j < len; j++) {
                slot_of[j] = (int64_t)bt[blk] * block_size + off;
                if (++off == block_size) off = 0, blk++;
            }
#if defined(__AVX512F__)
            if (D == 64 && Dv == 64) {
                float *o = out + (t * hq + h * group) * Dv;
                if (half) attend64_f16(qh, group, kh + h * D, ldk, vh + h * vhs, ldv, slot_of, len, scale, p, o);
                else attend64_f32(qh, group, kf + h * D, ldk, vf + h * vhs, ldv, slot_of, len, scale, p, o);
                continue;
            }
#endif
            for (int64_t j = 0; j < len; j++) {
                const float *key = half ? row : kf + slot_of[j] * ldk + h * D;
                if (half) f16_to_f32_row(row, kh + slot_of[j] * ldk + h * D, D);
                for (int64_t g = 0; g < group; g++) {
                    float sc = dot(qh + g * D, key, D) * scale;
                    p[g * len + j] = sc;
                    if (sc > mx[g]) mx[g] = sc;
                }
            }
            memset(acc, 0, sizeof(float) * (size_t)(group * Dv));
            for (int64_t g = 0; g < group; g++) {
                float inv = 1.f / exp_shifted(p + g * len, len, mx[g]);
                for (int64_t j = 0; j < len; j++) p[g * len + j] *= inv;
            }
            for (int64_t j = 0; j < len; j++) {
                const float *val = half ? row : vf + slot_of[j] * ldv + h * vhs;
                if (half) f16_to_f32_row(row, vh + slot_of[j] * ldv + h * vhs, Dv);
                for (int64_t g = 0; g < group; g++) axpy(p[g * len + j], val, acc + g * Dv, Dv);
            }
            for (int64_t g = 0; g < group; g++)
                memcpy(out + (t * hq + h * group + g) * Dv, acc + g * Dv, sizeof(float) * (size_t)Dv);
        }
        free(p);
        free(acc);
        free(slot_of);
        free(row);
    }
    free(tok_seq);
}
