/* The column layout of the int4 linear for 5-255 activation rows (AVX-512 builds): built at load from the q4 layout
 * of kernels.c by lmf_q4_cols, multiplied by lmf_q4_linear_cols. One library with kernels.c (its conventions: ctypes
 * entry points, `nt` OpenMP threads); the reference is lmforge/backends/cpu's dequantize + matmul.
 */
#include <stdint.h>
#include <stdlib.h>

#include "q4.h"
#include "simd.h"

#if defined(__AVX512F__)
#define BN 32 /* weight rows of a column tile: two vectors of output columns */
#define BR 12 /* activation rows of its register block: 24 accumulators */

/* The column layout ("cols", built at load by lmf_q4_cols from the q4 one; AVX-512 builds, one plane, N a multiple
 * of BN): per tile of BN weight rows, per k, the BN codes of that column: 4-bit, 16 bytes, byte i holding row i (low
 * nibble) and row 16 + i (high); 8-bit, 32 bytes, one a row. The tile's scales and mins are [nb, BN] (float32 or
 * float16, as the q4 layout's). So a tile dequantizes to wp[k * BN + i] = w[i][k] with contiguous loads: 8 vector
 * ops per k, where gathering 16 rows' codes from the row layout took ~4x as long. */
static void q4_dequant_cols(const uint8_t *cols, int bits, scl_t scales, scl_t mins, int64_t nb, float *wp) {
    const __m512i m4 = _mm512_set1_epi32(15);
    for (int64_t b = 0; b < nb; b++) {
        __m512 sv[2], mv[2];
        for (int h = 0; h < 2; h++) {
            const int64_t i = b * BN + 16 * h;
            sv[h] = scales.h ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales.h + i))) : _mm512_loadu_ps(scales.f + i);
            mv[h] = mins.h ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mins.h + i))) : _mm512_loadu_ps(mins.f + i);
        }
        for (int64_t k = b * 32; k < b * 32 + 32; k++) {
            __m512i c0, c1;
            if (bits == 8) {
                c0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(cols + k * 32)));
                c1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(cols + k * 32 + 16)));
            } else {
                const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(cols + k * 16)));
                c0 = _mm512_and_si512(v, m4);
                c1 = _mm512_srli_epi32(v, 4);
            }
            _mm512_storeu_ps(wp + k * BN, _mm512_fmadd_ps(_mm512_cvtepi32_ps(c0), sv[0], mv[0]));
            _mm512_storeu_ps(wp + k * BN + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(c1), sv[1], mv[1]));
        }
    }
}

/* y[r][0..BN) = x_r . columns (+ bias) for R <= BR rows of x (stride ldx): per k two weight vectors, each row's x[k]
 * broadcast, 2R FMAs into 2R accumulators, no horizontal sums (R is a constant once inlined) */
static inline __attribute__((always_inline)) void q4_bcast_block(const float *x, int64_t ldx, const int R,
                                                                 const float *wp, int64_t K, const float *bias,
                                                                 float *y, int64_t ldy) {
    __m512 acc[BR][2];
    for (int r = 0; r < BR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const __m512 w0 = _mm512_loadu_ps(wp + k * BN), w1 = _mm512_loadu_ps(wp + k * BN + 16);
        for (int r = 0; r < BR; r++)
            if (r < R) {
                const __m512 xb = _mm512_set1_ps(x[r * ldx + k]);
                acc[r][0] = _mm512_fmadd_ps(xb, w0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(xb, w1, acc[r][1]);
            }
    }
    const __m512 b0 = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    const __m512 b1 = bias ? _mm512_loadu_ps(bias + 16) : _mm512_setzero_ps();
    for (int r = 0; r < R; r++) {
        _mm512_storeu_ps(y + r * ldy, _mm512_add_ps(acc[r][0], b0));
        _mm512_storeu_ps(y + r * ldy + 16, _mm512_add_ps(acc[r][1], b1));
    }
}

/* y [M, N] (row stride ldy) = x [M, K] @ W^T (+ bias) from the column layout (above): column tiles of BN weight rows
 * dequantized into wp (K * 128 bytes, in L2), every BR rows of x against each with BN-wide FMAs and no horizontal
 * sums (2-core Xeon, 21-63 rows: the FMA work per row is ~0.6x the row layout's dot4x4 tiles) */
void lmf_q4_linear_cols(const float *x, int64_t M, int64_t K, const uint8_t *cols, int bits, const void *sp,
                        const void *mp, int half, const float *bias, int64_t N, float *y, int64_t ldy, int nt) {
    const scl_t scales = half ? (scl_t){NULL, (const uint16_t *)sp} : (scl_t){(const float *)sp, NULL};
    const scl_t mins = half ? (scl_t){NULL, (const uint16_t *)mp} : (scl_t){(const float *)mp, NULL};
    const int64_t nb = K / 32, tile_bytes = K * BN * bits / 8, tiles = N / BN;
#pragma omp parallel num_threads(nt)
    {
        float *wp = (float *)malloc(sizeof(float) * (size_t)(K * BN));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t n0 = t * BN;
            q4_dequant_cols(cols + t * tile_bytes, bits, scl_off(scales, n0 * nb), scl_off(mins, n0 * nb), nb, wp);
            const float *bt = bias ? bias + n0 : NULL;
            for (int64_t r0 = 0; r0 < M; r0 += BR) {
                const float *xr = x + r0 * K;
                float *yr = y + r0 * ldy + n0;
                switch (M - r0 < BR ? (int)(M - r0) : BR) {
#define BCAST_CASE(R) case R: q4_bcast_block(xr, K, R, wp, K, bt, yr, ldy); break;
                BCAST_CASE(1) BCAST_CASE(2) BCAST_CASE(3) BCAST_CASE(4) BCAST_CASE(5) BCAST_CASE(6)
                BCAST_CASE(7) BCAST_CASE(8) BCAST_CASE(9) BCAST_CASE(10) BCAST_CASE(11) BCAST_CASE(12)
#undef BCAST_CASE
                }
            }
        }
        free(wp);
    }
}
#endif

#if !defined(__AVX512F__)
void lmf_q4_linear_cols(const float *x, int64_t M, int64_t K, const uint8_t *cols, int bits, const void *sp,
                        const void *mp, int half, const float *bias, int64_t N, float *y, int64_t ldy, int nt) {
    (void)x, (void)M, (void)K, (void)cols, (void)bits, (void)sp, (void)mp, (void)half, (void)bias, (void)N, (void)y;
    (void)ldy, (void)nt; /* never called: lmf_q4_cols_available() is 0 */
}
#endif

int lmf_q4_cols_available(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

/* the column layout of lmf_q4_linear_cols from the q4 one (one plane, N % 32 == 0; codes [N, K * bits / 8]) */
void lmf_q4_cols(const uint8_t *codes, int bits, int64_t N, int64_t K, uint8_t *cols, int nt) {
    const int64_t row_bytes = K * bits / 8, tile_bytes = 32 * row_bytes;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t t = 0; t < N / 32; t++)
        for (int64_t k = 0; k < K; k++) {
            const int64_t b = k / 32, j = k % 32;
            uint8_t *o = cols + t * tile_bytes + k * (bits == 8 ? 32 : 16);
            for (int i = 0; i < 32; i++) {
                const uint8_t *c = codes + (t * 32 + i) * row_bytes;
                const int code = block_code(c + b * bits * 4, bits, (int)j);
                if (bits == 8) o[i] = (uint8_t)code;
                else if (i < 16) o[i] = (uint8_t)code;
                else o[i - 16] = (uint8_t)(o[i - 16] | code << 4);
            }
        }
}
