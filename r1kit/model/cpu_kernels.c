/* Small-batch matrix products for decoding on an x86 CPU with AVX2 + FMA: y = x @ W + b for the few
 * rows (2-64) a decode step multiplies by each weight matrix. Plain C over float32, built by
 * cpu_kernels.py with the system compiler on first use; nothing here is required: without a compiler
 * or AVX2 the model runs torch's products.
 *
 * Why our own: a BLAS sgemm packs W into panels on every call, because it cannot know W is reused.
 * With a handful of rows that packing costs as much as the product. Here W is packed once (and again
 * only when the weights change), into panels of NR = 24 columns, each panel K x NR contiguous, so a
 * step streams every weight exactly once, front to back. A 4 x 24 tile of y lives in 12 AVX2
 * registers while k runs over the panel; the panel (48-144 KB) stays in L2 for the next 4 rows.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define NR 24 /* columns per panel: three 8-float AVX2 registers */

/* Pack W (K x N; element [k][n] at w[k * sk + n * sn]) into ceil(N / NR) panels of K x NR floats,
 * the last one zero-padded. */
void r1_pack(const float *w, int64_t K, int64_t N, int64_t sk, int64_t sn, float *out, int nt) {
    int64_t panels = (N + NR - 1) / NR, full = N / NR;
    if (sn == 1) { /* rows of W are contiguous: read each row once, scatter its NR-column pieces */
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
        for (int64_t k = 0; k < K; k++) {
            const float *src = w + k * sk;
            float *dst = out + k * NR;
            for (int64_t p = 0; p < full; p++)
                memcpy(dst + p * K * NR, src + p * NR, NR * sizeof(float));
            if (full < panels) {
                int64_t nn = N - full * NR;
                memcpy(dst + full * K * NR, src + full * NR, nn * sizeof(float));
                memset(dst + full * K * NR + nn, 0, (NR - nn) * sizeof(float));
            }
        }
        return;
    }
    /* any other layout (e.g. torch's (out, in) weight seen as W = weight.t()): element by element */
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        float *panel = out + p * K * NR;
        for (int64_t j = 0; j < NR; j++) {
            int64_t n = p * NR + j;
            for (int64_t k = 0; k < K; k++)
                panel[k * NR + j] = n < N ? w[k * sk + n * sn] : 0.0f;
        }
    }
}

/* Write one row of a tile: its first nn columns (nn < NR in the last panel), plus the bias. */
static inline void store_row(float *y, __m256 a0, __m256 a1, __m256 a2, int64_t nn, const float *bias) {
    if (nn == NR && !bias) {
        _mm256_storeu_ps(y, a0);
        _mm256_storeu_ps(y + 8, a1);
        _mm256_storeu_ps(y + 16, a2);
        return;
    }
    float tmp[NR];
    _mm256_storeu_ps(tmp, a0);
    _mm256_storeu_ps(tmp + 8, a1);
    _mm256_storeu_ps(tmp + 16, a2);
    for (int64_t j = 0; j < nn; j++)
        y[j] = bias ? tmp[j] + bias[j] : tmp[j];
}

/* y[0..MR) x [0..nn) = x[0..MR) @ panel (+ bias), for MR = 1..4 rows: the accumulators are named
 * registers (an array would be kept in memory), rows past MR are never touched. */
#define TILE(MR)                                                                                      \
    static void tile##MR(const float *x, int64_t ldx, const float *panel, int64_t K, const float *bias, \
                         float *y, int64_t ldy, int64_t nn) {                                         \
        __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00;      \
        __m256 c20 = c00, c21 = c00, c22 = c00, c30 = c00, c31 = c00, c32 = c00;                      \
        const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;                     \
        for (int64_t k = 0; k < K; k++) {                                                             \
            const float *wk = panel + k * NR;                                                         \
            __m256 w0 = _mm256_loadu_ps(wk), w1 = _mm256_loadu_ps(wk + 8), w2 = _mm256_loadu_ps(wk + 16), b; \
            b = _mm256_broadcast_ss(x0 + k);                                                          \
            c00 = _mm256_fmadd_ps(b, w0, c00); c01 = _mm256_fmadd_ps(b, w1, c01); c02 = _mm256_fmadd_ps(b, w2, c02); \
            if (MR > 1) {                                                                             \
                b = _mm256_broadcast_ss(x1 + k);                                                      \
                c10 = _mm256_fmadd_ps(b, w0, c10); c11 = _mm256_fmadd_ps(b, w1, c11); c12 = _mm256_fmadd_ps(b, w2, c12); \
            }                                                                                         \
            if (MR > 2) {                                                                             \
                b = _mm256_broadcast_ss(x2 + k);                                                      \
                c20 = _mm256_fmadd_ps(b, w0, c20); c21 = _mm256_fmadd_ps(b, w1, c21); c22 = _mm256_fmadd_ps(b, w2, c22); \
            }                                                                                         \
            if (MR > 3) {                                                                             \
                b = _mm256_broadcast_ss(x3 + k);                                                      \
                c30 = _mm256_fmadd_ps(b, w0, c30); c31 = _mm256_fmadd_ps(b, w1, c31); c32 = _mm256_fmadd_ps(b, w2, c32); \
            }                                                                                         \
        }                                                                                             \
        store_row(y, c00, c01, c02, nn, bias);                                                        \
        if (MR > 1) store_row(y + ldy, c10, c11, c12, nn, bias);                                      \
        if (MR > 2) store_row(y + 2 * ldy, c20, c21, c22, nn, bias);                                  \
        if (MR > 3) store_row(y + 3 * ldy, c30, c31, c32, nn, bias);                                  \
    }
TILE(1)
TILE(2)
TILE(3)
TILE(4)

/* y (M x N, row stride ldy) = x (M x K, row stride ldx) @ W + bias (may be NULL), W packed by r1_pack.
 * Threads split the panels: each thread streams its share of W once. */
void r1_gemm(const float *x, int64_t M, int64_t K, int64_t ldx, const float *packed, int64_t N,
             const float *bias, float *y, int64_t ldy, int nt) {
    int64_t panels = (N + NR - 1) / NR;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        int64_t n0 = p * NR, nn = N - n0 < NR ? N - n0 : NR;
        const float *panel = packed + p * K * NR, *b = bias ? bias + n0 : 0;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)
            tile4(x + m * ldx, ldx, panel, K, b, y + m * ldy + n0, ldy, nn);
        switch (M - m) {
        case 3: tile3(x + m * ldx, ldx, panel, K, b, y + m * ldy + n0, ldy, nn); break;
        case 2: tile2(x + m * ldx, ldx, panel, K, b, y + m * ldy + n0, ldy, nn); break;
        case 1: tile1(x + m * ldx, ldx, panel, K, b, y + m * ldy + n0, ldy, nn); break;
        }
    }
}

