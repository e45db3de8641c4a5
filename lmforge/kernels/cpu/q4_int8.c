/* The int4 linear for a batch of activation rows ("q8": int8 activations), compiled with kernels.c (see its header
 * for the q4 weight layout) and called from lmforge/kernels/cpu/__init__.py for M >= Q8_MIN_ROWS rows.
 *
 * Each activation row is quantized per 32-value block to int8 with its own scale d = max|x| / 127, the weight codes
 * stay unsigned, and a block's dot product is an integer one (AVX-512 VNNI vpdpbusd; AVX-512BW or AVX2: vpmaddubsw
 * + vpmaddwd), scaled by s_w * d_x, plus the min term m_w * d_x * sum(q). So y = round8(x) . w_dequantized: its
 * error is sum |w| * d / 2 at most (tests/kernels/test_q4_int8.py). (The float32 sum(x) in the min term instead
 * would weigh the rounding by |code * s| rather than |w|: twice the error for a block centred on zero.)
 *
 * Layout in the kernel's order (activations and an L1 tile of unpacked weight rows alike), 64-byte vectors: 16 blocks
 * at a time are a "group" of 8 vectors in which lane l (4 bytes) of vector k holds values 4k..4k+3 of the group's
 * block l, so a group's integer sums finish in its own lanes (no horizontal sums) and one float scale vector
 * serves 512 products; the blocks after the last full group go two at a time into one vector each ("pair"): bytes
 * 0-15 values 0-15 of the first block, 16-31 those of the second, 32-47 values 16-31 of the first, 48-63 those of
 * the second. K must be a multiple of 64 (an even block count).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__F16C__) && (defined(__AVX512BW__) || (defined(__AVX2__) && defined(__FMA__)))
#include <immintrin.h>
#define Q8_SIMD 1
#endif

#define Q8_MAX_BLOCKS 1024 /* blocks of a row (K / 32) kept on the stack while unpacking */

int lmf_q8_available(void) {
#if defined(Q8_SIMD)
    return 1;
#else
    return 0;
#endif
}

#if defined(Q8_SIMD)

#if defined(__AVX512BW__)
#define Q8_R 4 /* activation rows and weight rows of a register tile: 12 int32 + 12 float accumulators */
#else
#define Q8_R 2 /* AVX2: half-vectors, 16 registers */
#endif
#define Q8_C 3
#define Q8_TN 12 /* weight rows unpacked into the L1 tile at a time (a multiple of Q8_C) */
/* Without VNNI, vpmaddubsw adds two u8 x s8 products into a saturating int16: 8-bit codes (up to 255) are stored as
 * code - 128 and multiplied as |code - 128| * (x * sign) (at most 2 * 128 * 127); 128 * sum(x's int8 values) of the
 * block is added back to the integer sum, so every build computes the same integer dot products */
#if defined(__AVX512VNNI__)
#define Q8_FLIP8 0
#else
#define Q8_FLIP8 1
#endif

typedef struct {
    int64_t nb, nfull, npair, nseg, nvec, nbp; /* blocks; full groups; pairs; segments; 64-byte vectors; nb rounded to 16 */
} q8_shape;

static q8_shape q8_shape_of(int64_t K) {
    q8_shape s;
    s.nb = K / 32;
    s.nfull = s.nb / 16;
    s.npair = (s.nb % 16) / 2;
    s.nseg = s.nfull + s.npair;
    s.nvec = s.nb / 2;
    s.nbp = (s.nb + 15) / 16 * 16;
    return s;
}

/* where value j of block b goes in the kernel's order (a byte offset), and the scale lanes of its segment */
static inline int64_t q8_offset(const q8_shape *sh, int64_t b, int j) {
    if (b < 16 * sh->nfull) return ((b / 16) * 8 + j / 4) * 64 + (b % 16) * 4 + j % 4;
    const int64_t p = (b - 16 * sh->nfull) / 2, e = (b - 16 * sh->nfull) % 2;
    return (8 * sh->nfull + p) * 64 + (j >= 16) * 32 + e * 16 + j % 16;
}

/* d [nseg * 16]: every block's value at the lanes that hold it (a full group: lane l = block l; a pair: lanes 0-3
 * and 8-11 the first block, 4-7 and 12-15 the second) */
static void q8_spread(const q8_shape *sh, const float *v, float *d) {
    for (int64_t b = 0; b < 16 * sh->nfull; b++) d[b] = v[b];
    for (int64_t p = 0; p < sh->npair; p++)
        for (int l = 0; l < 16; l++) d[(sh->nfull + p) * 16 + l] = v[16 * sh->nfull + 2 * p + ((l >> 2) & 1)];
}

static inline float q8_h2f(uint16_t h) { return _cvtsh_ss(h); }

static void q8_floats(const void *p, int half, int64_t off, int64_t n, float *o) {
    if (!half) {
        memcpy(o, (const float *)p + off, sizeof(float) * (size_t)n);
        return;
    }
    const uint16_t *h = (const uint16_t *)p + off;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    for (; i < n; i++) o[i] = q8_h2f(h[i]);
}

/* one activation row x [K] -> int8 values xq [nvec * 64] in the kernel's order, their scales d [nseg * 16], the
 * block sums of the rounded values d * sum(q) xs [nbp] (zero past nb) and, given xc, 128 * the int8 values' block sums [nseg * 16] at one
 * lane of their block (the 8-bit codes' correction without VNNI) */
static void q8_quantize_row(const q8_shape *sh, const float *x, int8_t *xq, float *d, float *xs, int32_t *xc) {
    float dv[Q8_MAX_BLOCKS];
    if (xc) memset(xc, 0, sizeof(int32_t) * (size_t)(sh->nseg * 16));
    for (int64_t b = 0; b < sh->nb; b++) {
        const float *xb = x + b * 32;
        int8_t q[32];
#if defined(__AVX512BW__)
        const __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        const __m512 id = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(lo, id))));
        _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(hi, id))));
#else
        float amax = 0.f;
        for (int j = 0; j < 32; j++) {
            const float a = xb[j] < 0.f ? -xb[j] : xb[j];
            amax = a > amax ? a : amax;
        }
        const __m256 id = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        for (int i = 0; i < 4; i++) { /* round to nearest even, as vcvtps2dq does; |x| * id <= 127 */
            const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 8 * i), id));
            int32_t t[8];
            _mm256_storeu_si256((__m256i *)t, v);
            for (int j = 0; j < 8; j++) q[8 * i + j] = (int8_t)(t[j] > 127 ? 127 : t[j] < -127 ? -127 : t[j]);
        }
#endif
        dv[b] = amax / 127.f;
        int32_t t = 0;
        for (int j = 0; j < 32; j++) t += q[j];
        xs[b] = dv[b] * (float)t;
        if (xc) {
            const int64_t p = (b - 16 * sh->nfull) / 2, e = (b - 16 * sh->nfull) % 2;
            xc[b < 16 * sh->nfull ? b : (sh->nfull + p) * 16 + 4 * e] = 128 * t;
        }
        if (b < 16 * sh->nfull)
            for (int k = 0; k < 8; k++) memcpy(xq + q8_offset(sh, b, 4 * k), q + 4 * k, 4);
        else {
            memcpy(xq + q8_offset(sh, b, 0), q, 16);
            memcpy(xq + q8_offset(sh, b, 16), q + 16, 16);
        }
    }
    for (int64_t b = sh->nb; b < sh->nbp; b++) xs[b] = 0.f;
    q8_spread(sh, dv, d);
}

/* one weight row (q4 layout, one plane) -> codes wq [nvec * 64] in the kernel's order, scales wd [nseg * 16] and
 * mins wm [nbp] (zero past nb) */
static void q8_unpack_row(const q8_shape *sh, const uint8_t *c, int bits, const void *sp, const void *mp, int half,
                          int64_t row, uint8_t *wq, float *wd, float *wm) {
    float s[Q8_MAX_BLOCKS];
    q8_floats(sp, half, row * sh->nb, sh->nb, s);
    q8_floats(mp, half, row * sh->nb, sh->nb, wm);
    for (int64_t b = sh->nb; b < sh->nbp; b++) wm[b] = 0.f;
    const int64_t bb = bits * 4; /* bytes per block */
#if defined(__AVX512BW__)
    const __m512i m4 = _mm512_set1_epi8(15);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t g = 0; g < sh->nfull; g++) { /* vector k, lane l <- dword k of block l (bits 8) or its nibbles */
        const uint8_t *base = c + g * 16 * bb;
        uint8_t *o = wq + g * 8 * 64;
        if (bits == 8)
            for (int k = 0; k < 8; k++) {
                __m512i v = _mm512_i32gather_epi32(_mm512_add_epi32(_mm512_slli_epi32(lane, 5), _mm512_set1_epi32(4 * k)),
                                                   base, 1);
                if (Q8_FLIP8) v = _mm512_xor_si512(v, _mm512_set1_epi8((char)0x80));
                _mm512_storeu_si512(o + k * 64, v);
            }
        else
            for (int k = 0; k < 4; k++) {
                const __m512i v = _mm512_i32gather_epi32(
                    _mm512_add_epi32(_mm512_slli_epi32(lane, 4), _mm512_set1_epi32(4 * k)), base, 1);
                _mm512_storeu_si512(o + k * 64, _mm512_and_si512(v, m4));
                _mm512_storeu_si512(o + (k + 4) * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), m4));
            }
    }
#else
    const __m256i m4 = _mm256_set1_epi8(15);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t g = 0; g < sh->nfull; g++)
        for (int h = 0; h < 2; h++) { /* lanes 8h..8h+7 */
            const uint8_t *base = c + (g * 16 + 8 * h) * bb;
            uint8_t *o = wq + g * 8 * 64 + 32 * h;
            if (bits == 8)
                for (int k = 0; k < 8; k++) {
                    __m256i v = _mm256_i32gather_epi32(
                        (const int *)base, _mm256_add_epi32(_mm256_slli_epi32(lane, 5), _mm256_set1_epi32(4 * k)), 1);
                    if (Q8_FLIP8) v = _mm256_xor_si256(v, _mm256_set1_epi8((char)0x80));
                    _mm256_storeu_si256((__m256i *)(o + k * 64), v);
                }
            else
                for (int k = 0; k < 4; k++) {
                    const __m256i v = _mm256_i32gather_epi32(
                        (const int *)base, _mm256_add_epi32(_mm256_slli_epi32(lane, 4), _mm256_set1_epi32(4 * k)), 1);
                    _mm256_storeu_si256((__m256i *)(o + k * 64), _mm256_and_si256(v, m4));
                    _mm256_storeu_si256((__m256i *)(o + (k + 4) * 64), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
                }
        }
#endif
    for (int64_t p = 0; p < sh->npair; p++) {
        const int64_t b0 = 16 * sh->nfull + 2 * p;
        uint8_t *o = wq + (8 * sh->nfull + p) * 64;
        if (bits == 8) {
            for (int e = 0; e < 2; e++) {
                memcpy(o + e * 16, c + (b0 + e) * 32, 16);
                memcpy(o + 32 + e * 16, c + (b0 + e) * 32 + 16, 16);
            }
            if (Q8_FLIP8)
                for (int j = 0; j < 64; j++) o[j] ^= 0x80;
        } else {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(c + b0 * 16)); /* the two blocks' 32 bytes */
            _mm256_storeu_si256((__m256i *)o, _mm256_and_si256(v, _mm256_set1_epi8(15)));
            _mm256_storeu_si256((__m256i *)(o + 32), _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(15)));
        }
    }
    q8_spread(sh, s, wd);
}

/* out[r][c] = x_r . w_c for Q8_R activation rows and Q8_C unpacked weight rows (pointers into the buffers) */
#if defined(__AVX512BW__)
static inline __m512i q8_dot(__m512i acc, __m512i w, __m512i x) {
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(acc, w, x);
#else
    if (Q8_FLIP8) { /* w holds code - 128 for 8-bit codes (and plain codes < 16 for 4-bit ones: then a no-op) */
        x = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
        w = _mm512_abs_epi8(w);
    }
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1)));
#endif
}

static void q8_tile(const q8_shape *sh, const int8_t *const xq[Q8_R], const float *const xd[Q8_R],
                    const float *const xs[Q8_R], const int32_t *const xc[Q8_R], const uint8_t *const wq[Q8_C],
                    const float *const wd[Q8_C], const float *const wm[Q8_C], float out[Q8_R][Q8_C]) {
    __m512 f[Q8_R][Q8_C];
    for (int r = 0; r < Q8_R; r++)
        for (int c = 0; c < Q8_C; c++) f[r][c] = _mm512_setzero_ps();
    for (int64_t seg = 0; seg < sh->nseg; seg++) {
        /* a group's 8 vectors, fully unrolled (a loop of variable length had gcc copy every accumulator twice an
         * iteration), or a pair's one */
        const int64_t v = seg < sh->nfull ? seg * 8 : 8 * sh->nfull + (seg - sh->nfull);
        __m512i a[Q8_R][Q8_C];
        for (int r = 0; r < Q8_R; r++)
            for (int c = 0; c < Q8_C; c++) a[r][c] = _mm512_setzero_si512();
        if (seg < sh->nfull) {
#pragma GCC unroll 8
            for (int k = 0; k < 8; k++) {
                __m512i w[Q8_C];
                for (int c = 0; c < Q8_C; c++) w[c] = _mm512_loadu_si512(wq[c] + (v + k) * 64);
                for (int r = 0; r < Q8_R; r++) {
                    const __m512i x = _mm512_loadu_si512(xq[r] + (v + k) * 64);
                    for (int c = 0; c < Q8_C; c++) a[r][c] = q8_dot(a[r][c], w[c], x);
                }
            }
        } else {
            __m512i w[Q8_C];
            for (int c = 0; c < Q8_C; c++) w[c] = _mm512_loadu_si512(wq[c] + v * 64);
            for (int r = 0; r < Q8_R; r++) {
                const __m512i x = _mm512_loadu_si512(xq[r] + v * 64);
                for (int c = 0; c < Q8_C; c++) a[r][c] = q8_dot(a[r][c], w[c], x);
            }
        }
        if (xc[0])
            for (int r = 0; r < Q8_R; r++)
                for (int c = 0; c < Q8_C; c++) a[r][c] = _mm512_add_epi32(a[r][c], _mm512_loadu_si512(xc[r] + seg * 16));
        for (int r = 0; r < Q8_R; r++) {
            const __m512 dx = _mm512_loadu_ps(xd[r] + seg * 16);
            for (int c = 0; c < Q8_C; c++)
                f[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r][c]), _mm512_mul_ps(dx, _mm512_loadu_ps(wd[c] + seg * 16)),
                                          f[r][c]);
        }
    }
    for (int64_t b = 0; b < sh->nbp; b += 16)
        for (int r = 0; r < Q8_R; r++) {
            const __m512 s = _mm512_loadu_ps(xs[r] + b);
            for (int c = 0; c < Q8_C; c++) f[r][c] = _mm512_fmadd_ps(_mm512_loadu_ps(wm[c] + b), s, f[r][c]);
        }
    for (int r = 0; r < Q8_R; r++)
        for (int c = 0; c < Q8_C; c++) out[r][c] = _mm512_reduce_add_ps(f[r][c]);
}
#else
static inline __m256i q8_dot(__m256i acc, __m256i w, __m256i x) {
    if (Q8_FLIP8) {
        x = _mm256_sign_epi8(x, w);
        w = _mm256_abs_epi8(w);
    }
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}

static inline float q8_hsum(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* AVX2: the two 32-byte halves of every vector in turn (lanes 0-7, then 8-15), each with its own accumulators */
static void q8_tile(const q8_shape *sh, const int8_t *const xq[Q8_R], const float *const xd[Q8_R],
                    const float *const xs[Q8_R], const int32_t *const xc[Q8_R], const uint8_t *const wq[Q8_C],
                    const float *const wd[Q8_C], const float *const wm[Q8_C], float out[Q8_R][Q8_C]) {
    for (int r = 0; r < Q8_R; r++)
        for (int c = 0; c < Q8_C; c++) out[r][c] = 0.f;
    for (int h = 0; h < 2; h++) {
        __m256 f[Q8_R][Q8_C];
        for (int r = 0; r < Q8_R; r++)
            for (int c = 0; c < Q8_C; c++) f[r][c] = _mm256_setzero_ps();
        int64_t v = 0;
        for (int64_t seg = 0; seg < sh->nseg; seg++) {
            const int nv = seg < sh->nfull ? 8 : 1;
            __m256i a[Q8_R][Q8_C];
            for (int r = 0; r < Q8_R; r++)
                for (int c = 0; c < Q8_C; c++) a[r][c] = _mm256_setzero_si256();
            for (int k = 0; k < nv; k++, v++) {
                __m256i w[Q8_C];
                for (int c = 0; c < Q8_C; c++) w[c] = _mm256_loadu_si256((const __m256i *)(wq[c] + v * 64 + 32 * h));
                for (int r = 0; r < Q8_R; r++) {
                    const __m256i x = _mm256_loadu_si256((const __m256i *)(xq[r] + v * 64 + 32 * h));
                    for (int c = 0; c < Q8_C; c++) a[r][c] = q8_dot(a[r][c], w[c], x);
                }
            }
            if (xc[0])
                for (int r = 0; r < Q8_R; r++)
                    for (int c = 0; c < Q8_C; c++)
                        a[r][c] = _mm256_add_epi32(a[r][c], _mm256_loadu_si256((const __m256i *)(xc[r] + seg * 16 + 8 * h)));
            for (int r = 0; r < Q8_R; r++) {
                const __m256 dx = _mm256_loadu_ps(xd[r] + seg * 16 + 8 * h);
                for (int c = 0; c < Q8_C; c++)
                    f[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r][c]),
                                              _mm256_mul_ps(dx, _mm256_loadu_ps(wd[c] + seg * 16 + 8 * h)), f[r][c]);
            }
        }
        for (int64_t b = 8 * h; b < sh->nbp; b += 16)
            for (int r = 0; r < Q8_R; r++) {
                const __m256 s = _mm256_loadu_ps(xs[r] + b);
                for (int c = 0; c < Q8_C; c++) f[r][c] = _mm256_fmadd_ps(_mm256_loadu_ps(wm[c] + b), s, f[r][c]);
            }
        for (int r = 0; r < Q8_R; r++)
            for (int c = 0; c < Q8_C; c++) out[r][c] += q8_hsum(f[r][c]);
    }
}
#endif

/* y [M, N] (row stride ldy) = x [M, K] @ W^T (+ bias) for a one-plane q4 weight (kernels.c's layout), K % 64 == 0
 * and K / 32 <= Q8_MAX_BLOCKS (the caller checks both): x quantized to int8 per block first, then tiles of Q8_TN
 * weight rows are unpacked into an L1 buffer that every group of Q8_R rows of x runs against. */
void lmf_q4_linear_q8(const float *x, int64_t M, int64_t K, const uint8_t *codes, int bits, const void *sp,
                      const void *mp, int half, const float *bias, int64_t N, float *y, int64_t ldy, int nt) {
    const q8_shape sh = q8_shape_of(K);
    const int64_t row_bytes = sh.nb * bits * 4, xrow = sh.nvec * 64, drow = sh.nseg * 16;
    int8_t *xq = (int8_t *)malloc((size_t)(M * xrow));
    float *xd = (float *)malloc(sizeof(float) * (size_t)(M * drow)), *xs = (float *)malloc(sizeof(float) * (size_t)(M * sh.nbp));
    int32_t *xc = bits == 8 && Q8_FLIP8 ? (int32_t *)malloc(sizeof(int32_t) * (size_t)(M * drow)) : NULL;
    const int64_t tiles = (N + Q8_TN - 1) / Q8_TN;
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < M; r++)
            q8_quantize_row(&sh, x + r * K, xq + r * xrow, xd + r * drow, xs + r * sh.nbp, xc ? xc + r * drow : NULL);
        uint8_t *wq = (uint8_t *)malloc((size_t)(Q8_TN * xrow));
        float *wd = (float *)malloc(sizeof(float) * (size_t)(Q8_TN * drow));
        float *wm = (float *)malloc(sizeof(float) * (size_t)(Q8_TN * sh.nbp));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t n0 = t * Q8_TN, tn = N - n0 < Q8_TN ? N - n0 : Q8_TN;
            for (int64_t i = 0; i < tn; i++)
                q8_unpack_row(&sh, codes + (n0 + i) * row_bytes, bits, sp, mp, half, n0 + i, wq + i * xrow,
                              wd + i * drow, wm + i * sh.nbp);
            for (int64_t r0 = 0; r0 < M; r0 += Q8_R)
                for (int64_t c0 = 0; c0 < tn; c0 += Q8_C) {
                    const int8_t *xqp[Q8_R];
                    const float *xdp[Q8_R], *xsp[Q8_R], *wdp[Q8_C], *wmp[Q8_C];
                    const int32_t *xcp[Q8_R];
                    const uint8_t *wqp[Q8_C];
                    for (int r = 0; r < Q8_R; r++) { /* rows past M (and weight rows past the tile) repeat the first */
                        const int64_t i = r0 + r < M ? r0 + r : r0;
                        xqp[r] = xq + i * xrow, xdp[r] = xd + i * drow, xsp[r] = xs + i * sh.nbp;
                        xcp[r] = xc ? xc + i * drow : NULL;
                    }
                    for (int c = 0; c < Q8_C; c++) {
                        const int64_t i = c0 + c < tn ? c0 + c : c0;
                        wqp[c] = wq + i * xrow, wdp[c] = wd + i * drow, wmp[c] = wm + i * sh.nbp;
                    }
                    float out[Q8_R][Q8_C];
                    q8_tile(&sh, xqp, xdp, xsp, xcp, wqp, wdp, wmp, out);
                    for (int r = 0; r < Q8_R && r0 + r < M; r++)
                        for (int c = 0; c < Q8_C && c0 + c < tn; c++)
                            y[(r0 + r) * ldy + n0 + c0 + c] = out[r][c] + (bias ? bias[n0 + c0 + c] : 0.f);
                }
        }
        free(wq);
        free(wd);
        free(wm);
    }
    free(xq);
    free(xd);
    free(xs);
    free(xc);
}

#else /* no vector extension: never called (lmf_q8_available() is 0) */
void lmf_q4_linear_q8(const float *x, int64_t M, int64_t K, const uint8_t *codes, int bits, const void *sp,
                      const void *mp, int half, const float *bias, int64_t N, float *y, int64_t ldy, int nt) {
    (void)x, (void)M, (void)K, (void)codes, (void)bits, (void)sp, (void)mp, (void)half, (void)bias, (void)N, (void)y;
    (void)ldy, (void)nt;
}
#endif
