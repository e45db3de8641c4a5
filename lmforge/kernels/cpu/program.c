/* A recorded decode step (lmforge/kernels/cpu/recording.py, engine/cpu_graph.py) replayed from C: one ctypes call runs
 * every kernel call of the step in order, where a Python loop paid ~2.7 us of ctypes per call (a batch-1 step of the
 * embedded model makes ~270). Each call is an opcode and LMF_PROGRAM_ARGS 64-bit argument slots: pointers and
 * integers as they are, floats as their 32-bit patterns; the thread count is the replay's. */
#include <stdint.h>
#include <string.h>

#define LMF_PROGRAM_ARGS 32

void lmf_q4_linear(const float *, int64_t, int64_t, const uint8_t *, int, const void *, const void *, int, const float *,
                   int64_t, int, float *, int64_t, int);
void lmf_q4_linear_q8(const float *, int64_t, int64_t, const uint8_t *, int, const void *, const void *, int,
                      const float *, int64_t, float *, int64_t, int);
void lmf_q4_linear_cols(const float *, int64_t, int64_t, const uint8_t *, int, const void *, const void *, int,
                        const float *, int64_t, float *, int64_t, int);
void lmf_rms_norm(const float *, const float *, const float *, float *, float *, int64_t, int64_t, int64_t, int64_t,
                  float, float, int);
void lmf_rope(const float *, int64_t, int64_t, const float *, int64_t, int64_t, int64_t, int64_t, int64_t,
              const float *, const float *, float *, float *, int);
void lmf_silu_and_mul(const float *, int64_t, int64_t, int64_t, float *, int);
void lmf_embedding(const float *, int64_t, const int64_t *, int64_t, int64_t, float *, int);
void lmf_cos_sin(const int64_t *, const float *, int64_t, int64_t, float, float, float *, float *, int);
void lmf_paged_attention(const float *, int64_t, void *, int64_t, void *, int64_t, const int32_t *, int64_t,
                         const int32_t *, const int32_t *, const int32_t *, int64_t, int64_t, int64_t, int64_t, int64_t,
                         int64_t, int64_t, int64_t, float, int64_t, int64_t, float *, const float *, int64_t,
                         const float *, int64_t, const int64_t *, int, int);

/* opcodes: the order of recording.PROGRAM_OPS */
enum { OP_Q4_LINEAR, OP_Q4_LINEAR_Q8, OP_Q4_LINEAR_COLS, OP_RMS_NORM, OP_ROPE, OP_SILU_AND_MUL, OP_EMBEDDING, OP_COS_SIN,
       OP_PAGED_ATTENTION };

static inline float F(uint64_t v) {
    const uint32_t u = (uint32_t)v;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#define P(i) ((void *)(uintptr_t)a[i])
#define I(i) ((int64_t)a[i])
#define C(i) ((int)(int64_t)a[i])

/* 0, or the index + 1 of the first call with an unknown opcode (none is run from there on) */
int64_t lmf_run_program(const int32_t *ops, const uint64_t *args, int64_t n, int nt) {
    for (int64_t c = 0; c < n; c++) {
        const uint64_t *a = args + c * LMF_PROGRAM_ARGS;
        switch (ops[c]) {
        case OP_Q4_LINEAR:
            lmf_q4_linear(P(0), I(1), I(2), P(3), C(4), P(5), P(6), C(7), P(8), I(9), C(10), P(11), I(12), nt);
            break;
        case OP_Q4_LINEAR_Q8:
            lmf_q4_linear_q8(P(0), I(1), I(2), P(3), C(4), P(5), P(6), C(7), P(8), I(9), P(10), I(11), nt);
            break;
        case OP_Q4_LINEAR_COLS:
            lmf_q4_linear_cols(P(0), I(1), I(2), P(3), C(4), P(5), P(6), C(7), P(8), I(9), P(10), I(11), nt);
            break;
        case OP_RMS_NORM:
            lmf_rms_norm(P(0), P(1), P(2), P(3), P(4), I(5), I(6), I(7), I(8), F(a[9]), F(a[10]), nt);
            break;
        case OP_ROPE:
            lmf_rope(P(0), I(1), I(2), P(3), I(4), I(5), I(6), I(7), I(8), P(9), P(10), P(11), P(12), nt);
            break;
        case OP_SILU_AND_MUL: lmf_silu_and_mul(P(0), I(1), I(2), I(3), P(4), nt); break;
        case OP_EMBEDDING: lmf_embedding(P(0), I(1), P(2), I(3), I(4), P(5), nt); break;
        case OP_COS_SIN: lmf_cos_sin(P(0), P(1), I(2), I(3), F(a[4]), F(a[5]), P(6), P(7), nt); break;
        case OP_PAGED_ATTENTION:
            lmf_paged_attention(P(0), I(1), P(2), I(3), P(4), I(5), P(6), I(7), P(8), P(9), P(10), I(11), I(12), I(13),
                                I(14), I(15), I(16), I(17), I(18), F(a[19]), I(20), I(21), P(22), P(23), I(24), P(25),
                                I(26), P(27), C(28), nt);
            break;
        default: return c + 1;
        }
    }
    return 0;
}
