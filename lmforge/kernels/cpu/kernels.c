/* lmforge's CPU kernels: float32 activations, compiled on the machine that runs them (-O3 -march=native -fopenmp)
 * by lmforge/kernels/cpu/__init__.py and called through ctypes. Each has a plain-torch reference in
 * lmforge/backends/cpu (the tests compare them). Threads: every entry point takes `nt`, the OpenMP team size
 * (torch's intra-op thread count; torch and this library share one libgomp).
 *
 * int4 weights ("q4"): row n of W [N, K] is P planes of K / 32 blocks; a block is 16 bytes, byte j holding
 * code j in its low nibble and code 16 + j in its high one (ggml's order), with one scale s and one min m per
 * block (float32, or float16 where exact: `half`): w = code * s + m. A P-plane row sums its planes
 * (lmforge/weights/gguf_pack.py). With bits = 8 a block is 32 bytes, one code each (two int4 planes whose scales
 * differ by 16 collapse into it).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

int lmf_simd_width(void) {
#if defined(__AVX512F__)
    return 16;
#elif defined(__AVX2__) && defined(__FMA__)
    return 8;
#else
    return 1;
#endif
}

/* ---- int4 linear ---------------------------------------------------------------------------------------- */

#include "q4.h" /* scl_t (a block's float32 or float16 scales), block_code */

#define ROWS 4 /* activation rows per pass over a weight row */
#define Q4_M1_MAX_BLOCKS 1024
/* groups of WR weight rows the AVX-512 batch-1 kernel prefetches ahead into L2 (0: none). A whole model's 121
 * batch-1 linears, 2-core Xeon, best of 15 interleaved: 12.4 ms with none, 10.8 / 10.5 / 10.7 with 4 / 8 / 16 (the
 * hardware prefetcher alone restarts at every matrix and every thread's share of it) */
#ifndef Q4_M1_PF
#define Q4_M1_PF 8
#endif /* blocks of a weight row (planes x K / 32) the batch-1 path keeps scales of on the stack */

#if defined(__AVX512F__)
/* The 32 weights of a block, dequantized. 4 bits: a 16-entry table code -> code * s + m, indexed by the codes */
static inline void q4_dequant_block(const uint8_t *codes, int bits, float s, float m, __m512 *lo, __m512 *hi) {
    if (bits == 8) {
        __m512 vs = _mm512_set1_ps(s), vm = _mm512_set1_ps(m);
        *lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)codes))), vs, vm);
        *hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + 16)))),
                              vs, vm);
        return;
    }
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)codes));
    __m512 table = _mm512_fmadd_ps(iota, _mm512_set1_ps(s), _mm512_set1_ps(m));
    *lo = _mm512_permutexvar_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)), table);
    *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
}
#elif defined(__AVX2__) && defined(__FMA__)
/* the same, as four 8-lane vectors (values 0-7, 8-15, 16-23, 24-31) */
static inline void q4_dequant_block(const uint8_t *codes, int bits, float s, float m, __m256 *w) {
    if (bits == 8) {
        __m256 vs = _mm256_set1_ps(s), vm = _mm256_set1_ps(m);
        for (int i = 0; i < 4; i++) {
            __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + 8 * i)));
            w[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), vs, vm);
        }
        return;
    }
    __m128i raw = _mm_loadu_si128((const __m128i *)codes);
    __m256i b0 = _mm256_cvtepu8_epi32(raw), b1 = _mm256_cvtepu8_epi32(_mm_srli_si128(raw, 8));
    __m256i m15 = _mm256_set1_epi32(15);
    __m256 vs = _mm256_set1_ps(s), vm = _mm256_set1_ps(m);
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b0, m15)), vs, vm);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b1, m15)), vs, vm);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4)), vs, vm);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4)), vs, vm);
}
#endif

/* One weight row (P planes of nb blocks) against nr <= ROWS activation rows (stride ldx): out[r] = x_r . w */
static void q4_row(const uint8_t *codes, int bits, scl_t scales, scl_t mins, int64_t nb, int planes,
                   const float *x, int64_t ldx, int nr, float *out) {
    const int64_t bb = bits * 4; /* bytes per block */
#if defined(__AVX512F__)
    __m512 acc[ROWS][2];
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int p = 0; p < planes; p++)
        for (int64_t b = 0; b < nb; b++) {
            __m512 lo, hi;
            q4_dequant_block(codes + (p * nb + b) * bb, bits, scl_at(scales, p * nb + b), scl_at(mins, p * nb + b), &lo, &hi);
            const float *xb = x + b * 32;
            switch (nr) { /* unrolled so the accumulators stay in registers */
            case 4: acc[3][0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb + 3 * ldx), acc[3][0]);
                    acc[3][1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 3 * ldx + 16), acc[3][1]); /* fall through */
            case 3: acc[2][0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb + 2 * ldx), acc[2][0]);
                    acc[2][1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 2 * ldx + 16), acc[2][1]); /* fall through */
            case 2: acc[1][0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb + ldx), acc[1][0]);
                    acc[1][1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + ldx + 16), acc[1][1]); /* fall through */
            default: acc[0][0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb), acc[0][0]);
                    acc[0][1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 16), acc[0][1]);
            }
        }
    for (int r = 0; r < nr; r++) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc[ROWS][2];
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int p = 0; p < planes; p++)
        for (int64_t b = 0; b < nb; b++) {
            __m256 w[4];
            q4_dequant_block(codes + (p * nb + b) * bb, bits, scl_at(scales, p * nb + b), scl_at(mins, p * nb + b), w);
            for (int r = 0; r < nr; r++) {
                const float *xb = x + r * ldx + b * 32;
                acc[r][0] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xb), acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), acc[r][1]);
                acc[r][0] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + 16), acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), acc[r][1]);
            }
        }
    for (int r = 0; r < nr; r++) out[r] = hsum256(_mm256_add_ps(acc[r][0], acc[r][1]));
#else
    for (int r = 0; r < nr; r++) out[r] = 0.f;
    for (int p = 0; p < planes; p++)
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *c = codes + (p * nb + b) * bb;
            const float s = scl_at(scales, p * nb + b), m = scl_at(mins, p * nb + b);
            for (int r = 0; r < nr; r++) {
                const float *xb = x + r * ldx + b * 32;
                float d = 0.f;
                for (int j = 0; j < 32; j++) d += (block_code(c, bits, j) * s + m) * xb[j];
                out[r] += d;
            }
        }
#endif
}

static void q4_dequant_row(const uint8_t *c, int bits, scl_t s, scl_t m, int64_t nb, int planes, float *o);

/* dot products of 4 rows of x (stride ldx) with w [K]: the weight vector is loaded once for the 4 rows */
static inline void dot4(const float *x, int64_t ldx, int nr, const float *w, int64_t K, float *out) {
    int64_t j = 0;
    float tail[4] = {0};
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; j + 16 <= K; j += 16) {
        __m512 wv = _mm512_loadu_ps(w + j);
        a0 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + j), a0);
        if (nr > 1) a1 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + ldx + j), a1);
        if (nr > 2) a2 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + 2 * ldx + j), a2);
        if (nr > 3) a3 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + 3 * ldx + j), a3);
    }
    tail[0] = _mm512_reduce_add_ps(a0), tail[1] = _mm512_reduce_add_ps(a1);
    tail[2] = _mm512_reduce_add_ps(a2), tail[3] = _mm512_reduce_add_ps(a3);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; j + 8 <= K; j += 8) {
        __m256 wv = _mm256_loadu_ps(w + j);
        a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + j), a0);
        if (nr > 1) a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + ldx + j), a1);
        if (nr > 2) a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + 2 * ldx + j), a2);
        if (nr > 3) a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + 3 * ldx + j), a3);
    }
    tail[0] = hsum256(a0), tail[1] = hsum256(a1), tail[2] = hsum256(a2), tail[3] = hsum256(a3);
#endif
    for (int r = 0; r < nr; r++) {
        float t = tail[r];
        for (int64_t i = j; i < K; i++) t += x[r * ldx + i] * w[i];
        out[r] = t;
    }
}

/* Batch 1: WR weight rows at a time against the one row of x, each x vector loaded once for all of them, and
 * WR independent accumulator chains (one row alone is bound by the FMA latency of its own chain). */
#if defined(__AVX512F__)
#define WR 4
/* the block scales of a row span as float32 (float16 ones converted 16 at a time) */
static inline void scl_row(scl_t s, int64_t n, float *o) {
    if (!s.h) {
        memcpy(o, s.f, sizeof(float) * (size_t)n);
        return;
    }
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(o + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s.h + i))));
    for (; i < n; i++) o[i] = h2f(s.h[i]);
}

/* WR weight rows against the one row of x: per block, codes . x (the codes as floats) times the block's scale
 * into a vector accumulator, and min * sum(x of the block) (xsum) into a scalar one, so no 16-entry table is built
 * per block and row (the shuffle port was the limit); every vector op but one widening runs on either FMA port */
static void q4_rows_m1(const uint8_t *codes, int bits, scl_t scales, scl_t mins, int64_t nb, int planes,
                       int64_t row_bytes, int64_t row_blocks, const float *x, const float *xsum, float *out) {
    const int64_t bb = bits * 4, nblk = (int64_t)planes * nb;
#if Q4_M1_PF > 0
    /* the group Q4_M1_PF groups ahead into L2: its scales and mins now, its codes spread over this group's blocks */
    const int64_t esize = scales.h ? 2 : 4, slines = (WR * row_blocks * esize + 63) / 64;
    const int64_t ahead = Q4_M1_PF * WR * row_blocks; /* prefetches never fault: past the matrix is harmless */
    const char *pf_s = scales.h ? (const char *)(scales.h + ahead) : (const char *)(scales.f + ahead);
    const char *pf_m = mins.h ? (const char *)(mins.h + ahead) : (const char *)(mins.f + ahead);
    for (int64_t l = 0; l < slines; l++) _mm_prefetch(pf_s + 64 * l, _MM_HINT_T1), _mm_prefetch(pf_m + 64 * l, _MM_HINT_T1);
    const char *pf_c = (const char *)codes + Q4_M1_PF * WR * row_bytes;
    const int64_t clines = (WR * row_bytes + 63) / 64;
#endif
    float sbuf[WR][Q4_M1_MAX_BLOCKS], mbuf[WR][Q4_M1_MAX_BLOCKS];
    for (int r = 0; r < WR; r++) {
        scl_row(scl_off(scales, r * row_blocks), nblk, sbuf[r]);
        scl_row(scl_off(mins, r * row_blocks), nblk, mbuf[r]);
    }
    __m512 a[WR];
    float msum[WR];
    for (int r = 0; r < WR; r++) a[r] = _mm512_setzero_ps(), msum[r] = 0.f;
    const __m512i m15 = _mm512_set1_epi32(15);
    for (int p = 0; p < planes; p++)
        for (int64_t b = 0; b < nb; b++) {
            const __m512 xl = _mm512_loadu_ps(x + b * 32), xh = _mm512_loadu_ps(x + b * 32 + 16);
            const int64_t blk = p * nb + b;
#if Q4_M1_PF > 0
            for (int64_t l = blk * clines / nblk; l < (blk + 1) * clines / nblk; l++)
                _mm_prefetch(pf_c + 64 * l, _MM_HINT_T1);
#endif
            for (int r = 0; r < WR; r++) { /* unrolled by the compiler: WR is a constant */
                const uint8_t *c = codes + r * row_bytes + blk * bb;
                __m512 lo, hi;
                if (bits == 8) {
                    lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)c)));
                    hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + 16))));
                } else {
                    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)c));
                    lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, m15));
                    hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
                }
                const __m512 t = _mm512_fmadd_ps(hi, xh, _mm512_mul_ps(lo, xl));
                a[r] = _mm512_fmadd_ps(t, _mm512_set1_ps(sbuf[r][blk]), a[r]);
                msum[r] += mbuf[r][blk] * xsum[b];
            }
        }
    for (int r = 0; r < WR; r++) out[r] = _mm512_reduce_add_ps(a[r]) + msum[r];
}
#elif defined(__AVX2__) && defined(__FMA__)
#define WR 2
static void q4_rows_m1(const uint8_t *codes, int bits, scl_t scales, scl_t mins, int64_t nb,
                       int planes, int64_t row_bytes, int64_t row_blocks, const float *x, const float *xsum,
                       float *out) {
    (void)xsum;
    const int64_t bb = bits * 4;
    __m256 a[WR][2];
    for (int r = 0; r < WR; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
    for (int p = 0; p < planes; p++)
        for (int64_t b = 0; b < nb; b++) {
            const int64_t blk = p * nb + b;
            const float *xb = x + b * 32;
            for (int r = 0; r < WR; r++) {
                __m256 w[4];
                q4_dequant_block(codes + r * row_bytes + blk * bb, bits, scl_at(scales, r * row_blocks + blk),
                                 scl_at(mins, r * row_blocks + blk), w);
                a[r][0] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xb), a[r][0]);
                a[r][1] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), a[r][1]);
                a[r][0] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + 16), a[r][0]);
                a[r][1] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), a[r][1]);
            }
        }
    for (int r = 0; r < WR; r++) out[r] = hsum256(_mm256_add_ps(a[r][0], a[r][1]));
}
#else
#define WR 1
static void q4_rows_m1(const uint8_t *codes, int bits, scl_t scales, scl_t mins, int64_t nb,
                       int planes, int64_t row_bytes, int64_t row_blocks, const float *x, const float *xsum,
                       float *out) {
    (void)row_bytes, (void)row_blocks, (void)xsum;
    q4_row(codes, bits, scales, mins, nb, planes, x, 0, 1, out);
}
#endif

#if defined(__AVX512F__)
/* the 16 horizontal sums of v[0..15] as one vector (element j = the sum of v[j]'s lanes): a tree of unpacks and
 * 128-bit lane shuffles, 45 instructions where 16 separate reductions take ~130 */
static inline __m512 hsum16(const __m512 v[16]) {
    __m512 t[8], u[4];
    for (int p = 0; p < 8; p++) /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of v[2p] = a, v[2p+1] = b */
        t[p] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * p], v[2 * p + 1]), _mm512_unpackhi_ps(v[2 * p], v[2 * p + 1]));
    for (int q = 0; q < 4; q++) { /* per lane: the partial sums of v[4q .. 4q+3] */
        __m512d a = _mm512_castps_pd(t[2 * q]), b = _mm512_castps_pd(t[2 * q + 1]);
        u[q] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    /* lane q of the result: the four lanes of u[q] summed */
    __m512 y01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
    __m512 y23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y01, y23, 0x88), _mm512_shuffle_f32x4(y01, y23, 0xDD));
}

/* out[i][r] = x_i . w_r for 4 rows of x (stride ldx) and 4 dequantized weight rows (stride ldw): 16 accumulators,
 * 8 loads per 16 FMAs (dot4's 5 per 4), the 16 horizontal sums in one tree at the end */
static inline void dot4x4(const float *x, int64_t ldx, const float *w, int64_t ldw, int64_t K, float out[4][4]) {
    __m512 a[4][4];
    for (int i = 0; i < 4; i++)
        for (int r = 0; r < 4; r++) a[i][r] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= K; j += 16) {
        __m512 wv[4], xv[4];
        for (int r = 0; r < 4; r++) wv[r] = _mm512_loadu_ps(w + r * ldw + j);
        for (int i = 0; i < 4; i++) xv[i] = _mm512_loadu_ps(x + i * ldx + j);
        for (int i = 0; i < 4; i++)
            for (int r = 0; r < 4; r++) a[i][r] = _mm512_fmadd_ps(xv[i], wv[r], a[i][r]);
    }
    _mm512_storeu_ps(&out[0][0], hsum16(&a[0][0]));
    for (; j < K; j++) /* a K that is not a multiple of 16 */
        for (int i = 0; i < 4; i++)
            for (int r = 0; r < 4; r++) out[i][r] += x[i * ldx + j] * w[r * ldw + j];
}
#elif defined(__AVX2__) && defined(__FMA__)
/* The AVX2 tile: out[i][r] = x_i . w_r for 4 rows of x and 2 dequantized weight rows, 8 accumulators (13 of the 16
 * registers), 6 loads per 8 FMAs (dot4's 5 per 4), the 8 horizontal sums in one hadd tree at the end */
static inline void dot4x2(const float *x, int64_t ldx, const float *w, int64_t ldw, int64_t K, float out[4][2]) {
    __m256 a[4][2];
    for (int i = 0; i < 4; i++) a[i][0] = a[i][1] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= K; j += 8) {
        const __m256 w0 = _mm256_loadu_ps(w + j), w1 = _mm256_loadu_ps(w + ldw + j);
        for (int i = 0; i < 4; i++) {
            const __m256 xv = _mm256_loadu_ps(x + i * ldx + j);
            a[i][0] = _mm256_fmadd_ps(xv, w0, a[i][0]);
            a[i][1] = _mm256_fmadd_ps(xv, w1, a[i][1]);
        }
    }
    /* hadd pairs, then quads: per 128-bit half the sums of 4 accumulators; the halves added across */
    const __m256 t0 = _mm256_hadd_ps(a[0][0], a[0][1]), t1 = _mm256_hadd_ps(a[1][0], a[1][1]);
    const __m256 t2 = _mm256_hadd_ps(a[2][0], a[2][1]), t3 = _mm256_hadd_ps(a[3][0], a[3][1]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
    _mm256_storeu_ps(&out[0][0], sum); /* [x0.w0, x0.w1, x1.w0, x1.w1, x2.w0, ...] */
    for (; j < K; j++) /* a K that is not a multiple of 8 */
        for (int i = 0; i < 4; i++)
            for (int r = 0; r < 2; r++) out[i][r] += x[i * ldx + j] * w[r * ldw + j];
}
#endif

/* y [M, N] (row stride ldy) = x [M, K] @ W^T (+ bias); K = nb * 32. One row: WR weight rows at a time; up to ROWS
 * rows: dequantized in registers; more: tiles of weight rows dequantized into an L1 buffer (below). */
void lmf_q4_linear(const float *x, int64_t M, int64_t K, const uint8_t *codes, int bits, const void *sp,
                   const void *mp, int half, const float *bias, int64_t N, int planes, float *y, int64_t ldy, int nt) {
    const scl_t scales = half ? (scl_t){NULL, (const uint16_t *)sp} : (scl_t){(const float *)sp, NULL};
    const scl_t mins = half ? (scl_t){NULL, (const uint16_t *)mp} : (scl_t){(const float *)mp, NULL};
    const int64_t nb = K / 32, row_bytes = (int64_t)planes * nb * bits * 4, row_blocks = (int64_t)planes * nb;
    if (M == 1 && row_blocks <= Q4_M1_MAX_BLOCKS) {
        const int64_t groups = N / WR;
        float xsum[Q4_M1_MAX_BLOCKS]; /* per block of x: the sum its min multiplies */
        for (int64_t b = 0; b < nb; b++) {
            float t = 0.f;
            for (int j = 0; j < 32; j++) t += x[b * 32 + j];
            xsum[b] = t;
        }
#pragma omp parallel for schedule(static) num_threads(nt)
        for (int64_t g = 0; g <= groups; g++) {
            float out[WR];
            const int64_t n0 = g * WR, nr = g < groups ? WR : N - n0;
            if (nr == WR)
                q4_rows_m1(codes + n0 * row_bytes, bits, scl_off(scales, n0 * row_blocks),
                           scl_off(mins, n0 * row_blocks), nb, planes, row_bytes, row_blocks, x, xsum, out);
            else
                for (int64_t r = 0; r < nr; r++)
                    q4_row(codes + (n0 + r) * row_bytes, bits, scl_off(scales, (n0 + r) * row_blocks),
                           scl_off(mins, (n0 + r) * row_blocks), nb, planes, x, K, 1, out + r);
            for (int64_t r = 0; r < nr; r++) y[n0 + r] = out[r] + (bias ? bias[n0 + r] : 0.f);
        }
        return;
    }
    if (M <= ROWS) {
#pragma omp parallel for schedule(static) num_threads(nt)
        for (int64_t n = 0; n < N; n++) {
            float out[ROWS];
            q4_row(codes + n * row_bytes, bits, scl_off(scales, n * row_blocks), scl_off(mins, n * row_blocks), nb, planes, x, K,
                   (int)M, out);
            for (int64_t r = 0; r < M; r++) y[r * ldy + n] = out[r] + (bias ? bias[n] : 0.f);
        }
        return;
    }
    /* More rows: a tile of TN weight rows is dequantized into an L1-sized buffer, then every group of ROWS rows of
     * x runs against the whole tile, so that group stays in L1 across the tile's rows */
    enum { TN = 8 };
    const int64_t tiles = (N + TN - 1) / TN;
#pragma omp parallel num_threads(nt)
    {
        float *wbuf = (float *)malloc(sizeof(float) * (size_t)(TN * K));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t n0 = t * TN, tn = N - n0 < TN ? N - n0 : TN;
            for (int64_t r = 0; r < tn; r++)
                q4_dequant_row(codes + (n0 + r) * row_bytes, bits, scl_off(scales, (n0 + r) * row_blocks),
                               scl_off(mins, (n0 + r) * row_blocks), nb, planes, wbuf + r * K);
            for (int64_t r0 = 0; r0 < M; r0 += ROWS) {
                const int nr = (int)(M - r0 < ROWS ? M - r0 : ROWS);
                int64_t r = 0;
#if defined(__AVX512F__)
                if (nr == 4)
                    for (; r + 4 <= tn; r += 4) {
                        float out[4][4];
                        dot4x4(x + r0 * K, K, wbuf + r * K, K, K, out);
                        for (int i = 0; i < 4; i++)
                            for (int c = 0; c < 4; c++)
                                y[(r0 + i) * ldy + n0 + r + c] = out[i][c] + (bias ? bias[n0 + r + c] : 0.f);
                    }
#elif defined(__AVX2__) && defined(__FMA__)
                if (nr == 4)
                    for (; r + 2 <= tn; r += 2) {
                        float out[4][2];
                        dot4x2(x + r0 * K, K, wbuf + r * K, K, K, out);
                        for (int i = 0; i < 4; i++)
                            for (int c = 0; c < 2; c++)
                                y[(r0 + i) * ldy + n0 + r + c] = out[i][c] + (bias ? bias[n0 + r + c] : 0.f);
                    }
#endif
                for (; r < tn; r++) {
                    float out[ROWS];
                    dot4(x + r0 * K, K, nr, wbuf + r * K, K, out);
                    for (int i = 0; i < nr; i++) y[(r0 + i) * ldy + n0 + r] = out[i] + (bias ? bias[n0 + r] : 0.f);
                }
            }
        }
        free(wbuf);
    }
}

/* one weight row, planes summed, into o [nb * 32] */
static void q4_dequant_row(const uint8_t *c0, int bits, scl_t s0, scl_t m0, int64_t nb, int planes,
                           float *o0) {
    const int64_t bb = bits * 4;
    for (int p = 0; p < planes; p++) {
        const uint8_t *c = c0 + p * nb * bb;
        const scl_t s = scl_off(s0, p * nb), m = scl_off(m0, p * nb);
        for (int64_t b = 0; b < nb; b++) {
            float *o = o0 + b * 32;
#if defined(__AVX512F__)
            __m512 lo, hi;
            q4_dequant_block(c + b * bb, bits, scl_at(s, b), scl_at(m, b), &lo, &hi);
            if (p) {
                lo = _mm512_add_ps(lo, _mm512_loadu_ps(o));
                hi = _mm512_add_ps(hi, _mm512_loadu_ps(o + 16));
            }
            _mm512_storeu_ps(o, lo);
            _mm512_storeu_ps(o + 16, hi);
#elif defined(__AVX2__) && defined(__FMA__)
            __m256 v[4];
            q4_dequant_block(c + b * bb, bits, scl_at(s, b), scl_at(m, b), v);
            for (int i = 0; i < 4; i++) {
                if (p) v[i] = _mm256_add_ps(v[i], _mm256_loadu_ps(o + 8 * i));
                _mm256_storeu_ps(o + 8 * i, v[i]);
            }
#else
            for (int j = 0; j < 32; j++) {
                float w = (float)block_code(c + b * bb, bits, j) * scl_at(s, b) + scl_at(m, b);
                o[j] = p ? o[j] + w : w;
            }
#endif
        }
    }
}

/* W [N, K] float32 from the q4 layout (planes summed) */
void lmf_q4_dequantize(const uint8_t *codes, int bits, const void *sp, const void *mp, int half, int64_t N,
                       int64_t K, int planes, float *w, int nt) {
    const scl_t scales = half ? (scl_t){NULL, (const uint16_t *)sp} : (scl_t){(const float *)sp, NULL};
    const scl_t mins = half ? (scl_t){NULL, (const uint16_t *)mp} : (scl_t){(const float *)mp, NULL};
    const int64_t nb = K / 32;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n = 0; n < N; n++)
        q4_dequant_row(codes + n * planes * nb * bits * 4, bits, scl_off(scales, n * planes * nb), scl_off(mins, n * planes * nb), nb,
                       planes, w + n * K);
}

/* ---- load-time repacking ------------------------------------------------------------------------------------ */

/* ggml nibble chunks -> pairs in order: src [C, L] bytes, byte j holding value j (low nibble) and value L + j (high);
 * out [C, L] bytes, byte i holding values 2i (low) and 2i + 1 (high) of the chunk's 2L values (gguf_pack._pairs);
 * chunk c starts at src + c * lds (a slice of GGUF blocks, read in place) */
void lmf_ggml_pairs(const uint8_t *src, int64_t chunks, int64_t L, int64_t lds, uint8_t *out, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t c = 0; c < chunks; c++) {
        const uint8_t *s = src + c * lds;
        uint8_t *o = out + c * L;
        for (int64_t i = 0; i < L / 2; i++) {
            o[i] = (uint8_t)((s[2 * i] & 15) | ((s[2 * i + 1] & 15) << 4));
            o[L / 2 + i] = (uint8_t)((s[2 * i] >> 4) | ((s[2 * i + 1] >> 4) << 4));
        }
    }
}

/* pairs in order [N, P * K / 2] (byte i: codes 2i low, 2i + 1 high) -> the q4 layout (bits 4: per block of 32 codes,
 * byte j = code j | code 16 + j << 4) or, for two planes collapsed (bits 8), one byte lo + 16 * hi per weight */
void lmf_q4_repack(const uint8_t *pairs, int64_t N, int64_t KP, int bits, uint8_t *out, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *p = pairs + n * (KP / 2);
        if (bits == 8) {
            const int64_t k = KP / 2; /* codes per plane */
            uint8_t *o = out + n * k;
            for (int64_t i = 0; i < k; i++) {
                int lo = (p[i / 2] >> (4 * (i & 1))) & 15, hi = (p[k / 2 + i / 2] >> (4 * (i & 1))) & 15;
                o[i] = (uint8_t)(lo + 16 * hi);
            }
        } else {
            uint8_t *o = out + n * (KP / 2);
            for (int64_t b = 0; b < KP / 32; b++)
                for (int j = 0; j < 16; j++) {
                    int a = (p[b * 16 + j / 2] >> (4 * (j & 1))) & 15;
                    int c = (p[b * 16 + 8 + j / 2] >> (4 * (j & 1))) & 15;
                    o[b * 16 + j] = (uint8_t)(a | (c << 4));
                }
        }
    }
}
