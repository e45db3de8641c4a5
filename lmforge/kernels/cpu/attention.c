/* Attention over the paged float32 KV cache, compiled with kernels.c (lmforge/kernels/cpu/__init__.py builds them
 * into one library); the plain-torch reference is lmforge/backends/cpu/attention.py. */
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
/* One (token, kv head) item for 64-dim keys and values, its group's query heads 4 at a time: their queries and value
 * sums stay in registers through one pass over the keys and one over the values (no per-key loads and stores of the
 * accumulators), keys and values are prefetched 8 slots ahead (the slots of a paged sequence are not contiguous), and
 * the softmax's 1 / sum scales the output instead of every weight. k and v point at this kv head's channels. */
static void attend64(const float *qh, int64_t group, const float *k, int64_t ldk, const float *v, int64_t ldv,
                     const int64_t *slot_of, int64_t len, float scale, float *p, float *out) {
    enum { PF = 8 };
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
            const float *kj = k + slot_of[j] * ldk;
            if (j + PF < len) {
                const char *next = (const char *)(k + slot_of[j + PF] * ldk);
                for (int c = 0; c < 4; c++) _mm_prefetch(next + 64 * c, _MM_HINT_T0);
            }
            const __m512 k0 = _mm512_loadu_ps(kj), k1 = _mm512_loadu_ps(kj + 16), k2 = _mm512_loadu_ps(kj + 32),
                         k3 = _mm512_loadu_ps(kj + 48);
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
            const float *vj = v + slot_of[j] * ldv;
            if (j + PF < len) {
                const char *next = (const char *)(v + slot_of[j + PF] * ldv);
                for (int c = 0; c < 4; c++) _mm_prefetch(next + 64 * c, _MM_HINT_T0);
            }
            const __m512 v0 = _mm512_loadu_ps(vj), v1 = _mm512_loadu_ps(vj + 16), v2 = _mm512_loadu_ps(vj + 32),
                         v3 = _mm512_loadu_ps(vj + 48);
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
#endif

/* Causal attention of every query token to its sequence's keys in the paged cache (this step's keys already
 * written). q [T, Hq, D] (token stride ldq), out [T, Hq, Dv]; caches [num_blocks, block_size, Hk, D|vhs] (row
 * strides ldk / ldv between consecutive slots, head strides D / vhs; the first Dv <= vhs channels of a value are
 * read, so MLA's one latent cache serves as both); block_tables [S, bt_stride] int32;
 * q_start/q_lens/kv_lens [S] int32. Query token i of sequence s sits at position kv_len - q_len + i and sees keys
 * [max(0, pos - window + 1), pos] (window 0: no window). One work item per (token, kv head). Given `key`, this
 * step's keys and values are first written to their cache slots (`slots` [T]), as fill_kv_cache does. */
void lmf_paged_attention(const float *q, int64_t ldq, const float *kc, int64_t ldk, const float *vc, int64_t ldv,
                         const int32_t *block_tables, int64_t bt_stride, const int32_t *q_start,
                         const int32_t *q_lens, const int32_t *kv_lens, int64_t S, int64_t T, int64_t hq,
                         int64_t hk, int64_t D, int64_t Dv, int64_t vhs, int64_t block_size, float scale,
                         int64_t window, int64_t max_kv, float *out, const float *key, int64_t ldkn,
                         const float *value, int64_t ldvn, const int64_t *slots, int nt) {
    const int64_t group = hq / hk;
    if (key) /* this step's keys and values into their slots first (key [T, Hk, D], value [T, Hk, Dv]) */
        for (int64_t t = 0; t < T; t++) {
            memcpy((float *)kc + slots[t] * ldk, key + t * ldkn, sizeof(float) * (size_t)(hk * D));
            for (int64_t h = 0; h < hk; h++)
                memcpy((float *)vc + slots[t] * ldv + h * vhs, value + t * ldvn + h * Dv, sizeof(float) * (size_t)Dv);
        }
    int64_t *tok_seq = (int64_t *)malloc(sizeof(int64_t) * (size_t)(T > 0 ? T : 1));
    for (int64_t s = 0; s < S; s++)
        for (int64_t i = 0; i < q_lens[s]; i++) tok_seq[q_start[s] + i] = s;
#pragma omp parallel num_threads(T * hk > 1 ? nt : 1)
    {
        float *p = (float *)malloc(sizeof(float) * (size_t)(group * (max_kv > 0 ? max_kv : 1)));
        float *acc = (float *)malloc(sizeof(float) * (size_t)(group * Dv));
        int64_t *slot_of = (int64_t *)malloc(sizeof(int64_t) * (size_t)(max_kv > 0 ? max_kv : 1));
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
                attend64(qh, group, kc + h * D, ldk, vc + h * vhs, ldv, slot_of, len, scale, p,
                         out + (t * hq + h * group) * Dv);
                continue;
            }
#endif
            for (int64_t j = 0; j < len; j++) {
                const float *key = kc + slot_of[j] * ldk + h * D;
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
                const float *val = vc + slot_of[j] * ldv + h * vhs;
                for (int64_t g = 0; g < group; g++) axpy(p[g * len + j], val, acc + g * Dv, Dv);
            }
            for (int64_t g = 0; g < group; g++)
                memcpy(out + (t * hq + h * group + g) * Dv, acc + g * Dv, sizeof(float) * (size_t)Dv);
        }
        free(p);
        free(acc);
        free(slot_of);
    }
    free(tok_seq);
}
