/* Small-batch matrix products for decoding on an x86 CPU with AVX2 + FMA (or AVX-512): y = x @ W + b
 * for the few rows (2-64) a decode step multiplies by each weight matrix; and, built on them, whole
 * decoder blocks for one new token per row (second half of this file). Plain C over float32, built by
 * cpu_kernels.py with the system compiler on first use; nothing here is required: without a compiler
 * or AVX2 the model runs torch's products.
 *
 * Why our own: a BLAS sgemm packs W into panels on every call, because it cannot know W is reused.
 * With a handful of rows that packing costs as much as the product. Here W is packed once (and again
 * only when the weights change), into panels of NR columns (three vector registers: 24 with AVX2, 48
 * with AVX-512), each panel K x NR contiguous, so a step streams every weight exactly once, front to
 * back. A tile of y (4 x 24 in 12 AVX2 registers, 8 x 48 in 24 AVX-512 ones) stays in registers while
 * k runs over the panel; the panel (48-288 KB) stays in L2 for the next rows.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The products' vector width: AVX-512 where the library was built for it (cpu_kernels.py builds an
 * AVX-512 variant on CPUs that have it), else AVX2. A panel is three vectors wide either way. */
#if defined(__AVX512F__)
typedef __m512 vec;
#define VW 16
#define MR_MAX 8 /* rows per tile: 8 x 3 accumulators + 3 weight vectors + 1 broadcast of 32 registers */
#define vzero() _mm512_setzero_ps()
#define vload(p) _mm512_loadu_ps(p)
#define vstore(p, v) _mm512_storeu_ps(p, v)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vset1(x) _mm512_set1_ps(x)
/* While a panel's first rows compute, prefetch the next panel into L2: on a 2-core AVX-512 Xeon a
 * panel's first pass was bound by streaming it in (25M model's products at 8 / 32 / 64 rows, one
 * thread: 1.35x / 1.2x / 1.15x faster with it). Off in the AVX2 build: an earlier prefetch did not pay
 * on the AMD Zen 3 this project ran on before, and this one was measured there only on this Xeon. */
#define PREFETCH 1
#else
typedef __m256 vec;
#define VW 8
#define MR_MAX 4 /* 4 x 3 accumulators + 3 weight vectors + 1 broadcast of 16 registers */
#define vzero() _mm256_setzero_ps()
#define vload(p) _mm256_loadu_ps(p)
#define vstore(p, v) _mm256_storeu_ps(p, v)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vset1(x) _mm256_broadcast_ss(&(x))
#define PREFETCH 0
#endif
#define NR (3 * VW) /* columns per panel: 48 (AVX-512) or 24 (AVX2) */

#if defined(__AVX512F__)
/* the first n of a vector's 16 lanes (none for n <= 0, all for n >= 16) */
static inline __mmask16 lanes(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }
#endif

/* y[0..n) = x[0..n): the short row copies of attention's packing (32-128 numbers), inline where a
 * memcpy call costs as much as the copy */
static inline void copy_floats(float *restrict y, const float *restrict x, int64_t n) {
#if defined(__AVX512F__)
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) _mm512_storeu_ps(y + j, _mm512_loadu_ps(x + j));
    if (j < n)
        _mm512_mask_storeu_ps(y + j, lanes(n - j), _mm512_maskz_loadu_ps(lanes(n - j), x + j));
#else
    memcpy(y, x, (size_t)n * sizeof(float));
#endif
}

/* ------------------------------------------------------------------------------------------------
 * bf16 products on AMX (Intel Xeon since Sapphire Rapids), in the build for it (cpu_kernels.py's
 * "amx"): off until r1_set_bf16(1); then r1_pack packs bf16 tiles and r1_gemm multiplies them, for
 * every caller below alike (the decode blocks too). x is rounded to bf16 on the way in; products
 * accumulate in float32 and y is float32, as torch's bf16 products on AMX do.
 *
 * Why: a decode step streams every weight once per step at a few rows, and AMX multiplies a 16 x 32
 * bf16 tile by a 32 x 16 one in one instruction. Half the bytes of float32 and several times the
 * arithmetic per cycle of AVX-512.
 *
 * Layout: panels of NRB = 32 columns; a panel is Kp / 32 blocks (K padded to Kp, a multiple of 32,
 * with zeros), a block two B tiles (columns 0-15, 16-31) of 16 rows x 64 bytes, row r holding
 * W[k0 + 2r][n], W[k0 + 2r + 1][n] for each of the tile's 16 columns n (the pairs AMX's dot product
 * takes). x is copied into bf16 A tiles of 16 rows x 32 columns (K padded to Kp, rows to a multiple of
 * 16), each tile one contiguous kilobyte (a_index).
 * ------------------------------------------------------------------------------------------------ */
static int bf16_mode = 0;
#define NRB 32

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define AMX 1
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Linux hands out AMX's tile state only to a process that asks for it (once; every thread). */
int r1_amx_init(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch's .to(torch.bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static void amx_configure(void) { /* tmm0-1: A (16 x 32 bf16), tmm2-3: B, tmm4-7: C (16 x 16 float) */
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) {
        c.colsb[i] = 64;
        c.rows[i] = 16;
    }
    _tile_loadconfig(&c);
}

/* y rows [m0, m0 + 16) x columns [n0, n0 + 16) from a C tile stored in t, within M x N, plus bias. */
static inline void store_tile(const float *t, float *y, int64_t ldy, int64_t m0, int64_t M, int64_t n0, int64_t N,
                              const float *bias) {
    int64_t rows = M - m0 < 16 ? M - m0 : 16, cols = N - n0 < 16 ? N - n0 : 16;
    __mmask16 mask = (__mmask16)((1u << cols) - 1);
    __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; r++)
        _mm512_mask_storeu_ps(y + (m0 + r) * ldy + n0, mask, _mm512_add_ps(_mm512_loadu_ps(t + 16 * r), b));
}

/* A's layout for amx_tiles: bf16 tiles of 16 rows x 32 columns, each 1 KB contiguous, a row of tiles
 * (16 rows x Kp) after another; element [m][k] at ((m / 16) * Kp / 32 + k / 32) * 512 + m % 16 * 32 + k % 32.
 * A tile then loads from one contiguous kilobyte (rows 64 bytes apart), not from 16 scattered rows. */
static inline int64_t a_index(int64_t m, int64_t k, int64_t Kp) {
    return (m / 16 * (Kp / 32) + k / 32) * 512 + m % 16 * 32 + k % 32;
}

/* x (M x K, rows ldx apart) in A's layout, Kp (a multiple of 32) wide, zero past row M (to M16) and column K. */
static void rows_to_bf16(const float *x, int64_t M, int64_t K, int64_t ldx, uint16_t *out, int64_t Kp, int64_t M16) {
    for (int64_t m = 0; m < M16; m++) {
        const float *src = x + m * ldx;
        for (int64_t k = 0; k < Kp; k += 16) {
            int64_t cols = K - k < 16 ? (K - k > 0 ? K - k : 0) : 16;
            __m512 v = m < M ? _mm512_maskz_loadu_ps((__mmask16)((1u << cols) - 1), src + k) : _mm512_setzero_ps();
            _mm256_storeu_si256((__m256i *)(out + a_index(m, k, Kp)), (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}

/* 16 x 16 floats transposed in registers: r[c] then holds what was column c (unpacks within 128-bit
 * lanes, then lane shuffles: 64 shuffles for 256 numbers). */
static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
}

/* The transpose of x (M x K, rows ldx apart) in A's layout, Mp (a multiple of 32) wide: A[k][m] = x[m][k]
 * for k < K16, zero past row K and column M. 16 x 16 blocks: 16 rows of x loaded, transposed in
 * registers, each column rounded to bf16 and stored as A's row (its 16 values are contiguous there).
 * (Element by element through a buffer, this took over a third of a weight gradient's time.) */
static void cols_to_bf16(const float *x, int64_t M, int64_t K, int64_t ldx, uint16_t *out, int64_t Mp, int64_t K16) {
    for (int64_t m0 = 0; m0 < Mp; m0 += 16)
        for (int64_t k0 = 0; k0 < K16; k0 += 16) {
            int64_t cols = K - k0 < 16 ? (K - k0 > 0 ? K - k0 : 0) : 16;
            __mmask16 mask = (__mmask16)((1u << cols) - 1);
            __m512 r[16];
            for (int64_t i = 0; i < 16; i++)
                r[i] = m0 + i < M ? _mm512_maskz_loadu_ps(mask, x + (m0 + i) * ldx + k0) : _mm512_setzero_ps();
            transpose16(r);
            for (int64_t c = 0; c < 16; c++)
                _mm256_storeu_si256((__m256i *)(out + a_index(k0 + c, m0, Mp)), (__m256i)_mm512_cvtneps_pbh(r[c]));
        }
}

/* y (M x N) = a @ W (+ bias): a in A's layout (M padded to M16, K to Kp), W packed by pack_bf16. Rows
 * go in chunks whose bf16 copy fits in L2 (each panel of W is read once per chunk); threads split a
 * chunk's panels. Each step multiplies two 16-row tiles of a by two 16-column tiles of W. */
static void amx_tiles(const uint16_t *a, int64_t M, int64_t Kp, const uint16_t *packed, int64_t N,
                      const float *bias, float *y, int64_t ldy, int nt) {
    int64_t M16 = (M + 15) / 16 * 16, panels = (N + NRB - 1) / NRB;
    int64_t chunk = (768 * 1024 / (Kp * 2)) / 32 * 32;
    if (chunk < 32)
        chunk = 32;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        amx_configure();
        float t[256] __attribute__((aligned(64)));
        for (int64_t c0 = 0; c0 < M16; c0 += chunk) {
            int64_t c1 = c0 + chunk < M16 ? c0 + chunk : M16;
#pragma omp for schedule(static)
            for (int64_t p = 0; p < panels; p++) {
                const uint16_t *panel = packed + p * Kp * NRB;
                int64_t n0 = p * NRB;
                for (int64_t m0 = c0; m0 < c1; m0 += 32) {
                    int two = m0 + 16 < c1;
                    _tile_zero(4);
                    _tile_zero(5);
                    _tile_zero(6);
                    _tile_zero(7);
                    for (int64_t k0 = 0; k0 < Kp; k0 += 32) {
                        const uint16_t *blk = panel + k0 * NRB;
                        _tile_loadd(2, blk, 64);
                        _tile_loadd(3, blk + 512, 64);
                        _tile_loadd(0, a + a_index(m0, k0, Kp), 64);
                        _tile_dpbf16ps(4, 0, 2);
                        _tile_dpbf16ps(5, 0, 3);
                        if (two) {
                            _tile_loadd(1, a + a_index(m0 + 16, k0, Kp), 64);
                            _tile_dpbf16ps(6, 1, 2);
                            _tile_dpbf16ps(7, 1, 3);
                        }
                    }
                    /* whole tiles without a bias go straight to y; the rest through t */
                    int direct = !bias && n0 + 32 <= N && m0 + (two ? 32 : 16) <= M;
                    if (direct) {
                        _tile_stored(4, y + m0 * ldy + n0, ldy * 4);
                        _tile_stored(5, y + m0 * ldy + n0 + 16, ldy * 4);
                        if (two) {
                            _tile_stored(6, y + (m0 + 16) * ldy + n0, ldy * 4);
                            _tile_stored(7, y + (m0 + 16) * ldy + n0 + 16, ldy * 4);
                        }
                        continue;
                    }
                    _tile_stored(4, t, 64);
                    store_tile(t, y, ldy, m0, M, n0, N, bias);
                    if (n0 + 16 < N) {
                        _tile_stored(5, t, 64);
                        store_tile(t, y, ldy, m0, M, n0 + 16, N, bias);
                    }
                    if (two) {
                        _tile_stored(6, t, 64);
                        store_tile(t, y, ldy, m0 + 16, M, n0, N, bias);
                        if (n0 + 16 < N) {
                            _tile_stored(7, t, 64);
                            store_tile(t, y, ldy, m0 + 16, M, n0 + 16, N, bias);
                        }
                    }
                }
            }
        }
        _tile_release();
    }
}

static void gemm_amx(const float *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *packed, int64_t N,
                     const float *bias, float *y, int64_t ldy, int nt) {
    int64_t Kp = (K + 31) / 32 * 32, M16 = (M + 15) / 16 * 16;
    uint16_t *xb = aligned_alloc(64, (size_t)(M16 * Kp * 2 + 63) / 64 * 64);
    rows_to_bf16(x, M, K, ldx, xb, Kp, M16);
    amx_tiles(xb, M, Kp, packed, N, bias, y, ldy, nt);
    free(xb);
}

/* Pack W (K x N; element [k][n] at w[k * sk + n * sn]) in bf16 tiles (layout above). Two layouts go
 * by vector instructions: rows of W contiguous (sn == 1: two rows' 16 columns converted and
 * interleaved into a tile row) and columns contiguous (sk == 1: a column's 32 k converted, then its
 * 16 pairs spread down the tile's rows); any other element by element. */
static void pack_bf16(const float *w, int64_t K, int64_t N, int64_t sk, int64_t sn, uint16_t *out, int nt) {
    int64_t Kp = (K + 31) / 32 * 32, panels = (N + NRB - 1) / NRB;
    __m512i inter = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                     23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t p = 0; p < panels; p++)
        for (int64_t k0 = 0; k0 < Kp; k0 += 32)
            for (int64_t j = 0; j < 2; j++) {
                int64_t n0 = p * NRB + 16 * j;
                uint16_t *dst = out + p * Kp * NRB + k0 * NRB + j * 512;
                int64_t cols = N - n0 < 16 ? (N - n0 > 0 ? N - n0 : 0) : 16;
                int64_t rows = K - k0 < 32 ? K - k0 : 32;
                if (sn == 1) {
                    __mmask16 mask = (__mmask16)((1u << cols) - 1);
                    for (int64_t r = 0; r < 16; r++) {
                        int64_t k = k0 + 2 * r;
                        __m512 lo = k < K ? _mm512_maskz_loadu_ps(mask, w + k * sk + n0) : _mm512_setzero_ps();
                        __m512 hi = k + 1 < K ? _mm512_maskz_loadu_ps(mask, w + (k + 1) * sk + n0) : _mm512_setzero_ps();
                        __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo); /* lo's 16 values, then hi's */
                        _mm512_storeu_si512(dst + r * 32, _mm512_permutexvar_epi16(inter, both));
                    }
                } else if (sk == 1) {
                    uint32_t col[16][16]; /* col[c][r]: column c's pair (k0 + 2r, k0 + 2r + 1) */
                    __mmask16 m0 = (__mmask16)(rows >= 16 ? 0xffff : (1u << rows) - 1);
                    __mmask16 m1 = (__mmask16)(rows >= 32 ? 0xffff : rows > 16 ? (1u << (rows - 16)) - 1 : 0);
                    for (int64_t c = 0; c < 16; c++) {
                        if (c < cols) {
                            const float *src = w + (n0 + c) * sn + k0;
                            __m512 lo = _mm512_maskz_loadu_ps(m0, src), hi = _mm512_maskz_loadu_ps(m1, src + 16);
                            _mm512_storeu_si512(col[c], (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
                        } else {
                            memset(col[c], 0, sizeof col[c]);
                        }
                    }
                    uint32_t *d32 = (uint32_t *)dst;
                    for (int64_t r = 0; r < 16; r++)
                        for (int64_t c = 0; c < 16; c++)
                            d32[r * 16 + c] = col[c][r];
                } else {
                    for (int64_t r = 0; r < 16; r++)
                        for (int64_t c = 0; c < 16; c++)
                            for (int64_t e = 0; e < 2; e++) {
                                int64_t k = k0 + 2 * r + e, n = n0 + c;
                                dst[r * 32 + c * 2 + e] = k < K && n < N ? to_bf16(w[k * sk + n * sn]) : 0;
                            }
                }
            }
}

/* ------------------------------------------------------------------------------------------------
 * Training's products in bf16 (precision.py, within bf16_matmuls on an AMX CPU), whatever the mode:
 * y = x W^T from W^T packed once per optimizer step (r1_bf16_pack), dx = dy W from W packed, and
 * dW = dy^T x (r1_bf16_gemm_tn), each from float32 inputs rounded to bf16 on the way in and giving
 * float32, unrounded: one call per product, no float32 <-> bf16 copies around it.
 * ------------------------------------------------------------------------------------------------ */
int64_t r1_bf16_packed_elems(int64_t K, int64_t N) { return (N + NRB - 1) / NRB * ((K + 31) / 32 * 32) * NRB; }

void r1_bf16_pack(const float *w, int64_t K, int64_t N, int64_t sk, int64_t sn, uint16_t *out, int nt) {
    pack_bf16(w, K, N, sk, sn, out, nt);
}

/* y (M x N, rows ldy apart) = x (M x K, rows ldx apart) @ W + bias (may be NULL), W by r1_bf16_pack. */
void r1_bf16_gemm(const float *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *packed, int64_t N,
                  const float *bias, float *y, int64_t ldy, int nt) {
    gemm_amx(x, M, K, ldx, packed, N, bias, y, ldy, nt);
}

/* y (O x I, rows ldy apart) = a^T @ b, for a (R x O, rows lda apart) and b (R x I, rows ldb apart): a
 * weight's gradient, dy^T x, summed over R rows. */
void r1_bf16_gemm_tn(const float *a, int64_t R, int64_t O, int64_t lda, const float *b, int64_t I, int64_t ldb,
                     float *y, int64_t ldy, int nt) {
    int64_t Rp = (R + 31) / 32 * 32, O16 = (O + 15) / 16 * 16;
    uint16_t *at = aligned_alloc(64, (size_t)(O16 * Rp * 2 + 63) / 64 * 64);
    uint16_t *bp = aligned_alloc(64, (size_t)(r1_bf16_packed_elems(R, I) * 2 + 63) / 64 * 64);
    cols_to_bf16(a, R, O, lda, at, Rp, O16);
    pack_bf16(b, R, I, ldb, 1, bp, nt);
    amx_tiles(at, O, Rp, bp, I, NULL, y, ldy, nt);
    free(at);
    free(bp);
}

/* MoE experts (precision.grouped_linear): rows offs[e] .. offs[e + 1] of x (sorted by expert) times
 * expert e's matrix, packed one after another, `per` elements apart (r1_bf16_pack each). */
void r1_bf16_gemm_grouped(const float *x, const int64_t *offs, int64_t E, int64_t K, int64_t ldx,
                          const uint16_t *packed, int64_t per, int64_t N, float *y, int64_t ldy, int nt) {
    for (int64_t e = 0; e < E; e++)
        if (offs[e + 1] > offs[e])
            gemm_amx(x + offs[e] * ldx, offs[e + 1] - offs[e], K, ldx, packed + e * per, N, NULL, y + offs[e] * ldy,
                     ldy, nt);
}

/* Every expert's weight gradient: y[e] (O x I, contiguous, E of them) = a[rows of e]^T @ b[rows of e]. */
void r1_bf16_gemm_tn_grouped(const float *a, const int64_t *offs, int64_t E, int64_t O, int64_t lda, const float *b,
                             int64_t I, int64_t ldb, float *y, int nt) {
    for (int64_t e = 0; e < E; e++) {
        float *ye = y + e * O * I;
        if (offs[e + 1] > offs[e])
            r1_bf16_gemm_tn(a + offs[e] * lda, offs[e + 1] - offs[e], O, lda, b + offs[e] * ldb, I, ldb, ye, I, nt);
        else
            memset(ye, 0, (size_t)(O * I) * sizeof(float));
    }
}
#else
#define AMX 0
int r1_amx_init(void) { return 0; }
static void gemm_amx(const float *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *packed, int64_t N,
                     const float *bias, float *y, int64_t ldy, int nt) { abort(); }
static void pack_bf16(const float *w, int64_t K, int64_t N, int64_t sk, int64_t sn, uint16_t *out, int nt) { abort(); }
int64_t r1_bf16_packed_elems(int64_t K, int64_t N) { return 0; }
void r1_bf16_pack(const float *w, int64_t K, int64_t N, int64_t sk, int64_t sn, uint16_t *out, int nt) { abort(); }
void r1_bf16_gemm(const float *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *packed, int64_t N,
                  const float *bias, float *y, int64_t ldy, int nt) { abort(); }
void r1_bf16_gemm_tn(const float *a, int64_t R, int64_t O, int64_t lda, const float *b, int64_t I, int64_t ldb,
                     float *y, int64_t ldy, int nt) { abort(); }
void r1_bf16_gemm_grouped(const float *x, const int64_t *offs, int64_t E, int64_t K, int64_t ldx,
                          const uint16_t *packed, int64_t per, int64_t N, float *y, int64_t ldy, int nt) { abort(); }
void r1_bf16_gemm_tn_grouped(const float *a, const int64_t *offs, int64_t E, int64_t O, int64_t lda, const float *b,
                             int64_t I, int64_t ldb, float *y, int nt) { abort(); }
#endif

/* 1: products in bf16 on AMX from now on (packs made before must be made again); 0: float32. Returns
 * the mode now in force (always 0 in a build without AMX). */
int r1_set_bf16(int on) {
    bf16_mode = AMX && on;
    return bf16_mode;
}

/* The panel width this build packs with: cpu_kernels.py sizes its buffers by it. */
int64_t r1_nr(void) { return NR; }

/* Floats (4-byte units) of the packed copy of a K x N matrix in the mode in force. */
int64_t r1_packed_floats(int64_t K, int64_t N) {
    if (bf16_mode)
        return (N + NRB - 1) / NRB * ((K + 31) / 32 * 32) * NRB / 2;
    return (N + NR - 1) / NR * NR * K;
}

/* Pack W (K x N; element [k][n] at w[k * sk + n * sn]) into ceil(N / NR) panels of K x NR floats,
 * the last one zero-padded (in bf16 mode: AMX's tiles, above). */
void r1_pack(const float *w, int64_t K, int64_t N, int64_t sk, int64_t sn, float *out, int nt) {
    if (bf16_mode) {
        pack_bf16(w, K, N, sk, sn, (uint16_t *)out, nt);
        return;
    }
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
static inline void store_row(float *y, vec a0, vec a1, vec a2, int64_t nn, const float *bias) {
    if (nn == NR && !bias) {
        vstore(y, a0);
        vstore(y + VW, a1);
        vstore(y + 2 * VW, a2);
        return;
    }
#if defined(__AVX512F__) /* masked stores: a narrow panel (attention's 32-wide heads) without a bounce */
    __mmask16 m0 = lanes(nn), m1 = lanes(nn - VW), m2 = lanes(nn - 2 * VW);
    if (bias) {
        a0 = _mm512_add_ps(a0, _mm512_maskz_loadu_ps(m0, bias));
        a1 = _mm512_add_ps(a1, _mm512_maskz_loadu_ps(m1, bias + VW));
        a2 = _mm512_add_ps(a2, _mm512_maskz_loadu_ps(m2, bias + 2 * VW));
    }
    _mm512_mask_storeu_ps(y, m0, a0);
    _mm512_mask_storeu_ps(y + VW, m1, a1);
    _mm512_mask_storeu_ps(y + 2 * VW, m2, a2);
    return;
#endif
    float tmp[NR];
    vstore(tmp, a0);
    vstore(tmp + VW, a1);
    vstore(tmp + 2 * VW, a2);
    for (int64_t j = 0; j < nn; j++)
        y[j] = bias ? tmp[j] + bias[j] : tmp[j];
}

/* y[0..MR) x [0..nn) = x[0..MR) @ panel (+ bias), for MR = 1..MR_MAX rows: the accumulators are
 * named registers (an array would be kept in memory), rows past MR are never touched. V (1-3): the
 * panel's vectors multiplied, nn <= V VW; attention's narrow products (heads of 32, the causal edge of
 * a score row) skip the vectors they do not need. */
#define ROW_FMA(i)                                                                                  \
    if (MR > i) {                                                                                   \
        b = vset1(XAT(i));                                                                          \
        c##i##0 = vfma(b, w0, c##i##0);                                                             \
        if (V > 1) c##i##1 = vfma(b, w1, c##i##1);                                                  \
        if (V > 2) c##i##2 = vfma(b, w2, c##i##2);                                                  \
    }
#define ROW_STORE(i) \
    if (MR > i) store_row(y + i * ldy, c##i##0, c##i##1, c##i##2, nn, bias);
#define TILE_V(FN, R, NV)                                                                               \
    static void FN(const float *x, int64_t ldx, const float *panel, int64_t K, const float *bias,      \
                   float *y, int64_t ldy, int64_t nn, const char *pf) {                               \
        const int64_t MR = R, V = NV; /* constants: the compiler drops the rows and vectors past them */ \
        vec c00 = vzero(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00, c20 = c00, c21 = c00; \
        vec c22 = c00, c30 = c00, c31 = c00, c32 = c00, c40 = c00, c41 = c00, c42 = c00, c50 = c00;   \
        vec c51 = c00, c52 = c00, c60 = c00, c61 = c00, c62 = c00, c70 = c00, c71 = c00, c72 = c00;   \
        for (int64_t k = 0; k < K; k++) {                                                             \
            const float *wk = panel + k * NR;                                                         \
            vec w0 = vload(wk), w1 = w0, w2 = w0, b;                                                  \
            if (V > 1) w1 = vload(wk + VW);                                                           \
            if (V > 2) w2 = vload(wk + 2 * VW);                                                       \
            if (pf) { /* the next panel's row k (48 floats: 3 lines), into L2, while this one runs */  \
                _mm_prefetch(pf + 4 * k * NR, _MM_HINT_T1);                                          \
                _mm_prefetch(pf + 4 * k * NR + 64, _MM_HINT_T1);                                     \
                _mm_prefetch(pf + 4 * k * NR + 128, _MM_HINT_T1);                                    \
            }                                                                                         \
            ROW_FMA(0) ROW_FMA(1) ROW_FMA(2) ROW_FMA(3) ROW_FMA(4) ROW_FMA(5) ROW_FMA(6) ROW_FMA(7)   \
        }                                                                                             \
        ROW_STORE(0) ROW_STORE(1) ROW_STORE(2) ROW_STORE(3) ROW_STORE(4) ROW_STORE(5) ROW_STORE(6)    \
        ROW_STORE(7)                                                                                  \
    }
/* a tile's three widths: NAME##R (whole panels, what the decode products use), NAME##R##_2, _1 */
#define TILE(NAME, R) TILE_V(NAME##R, R, 3) TILE_V(NAME##R##_2, R, 2) TILE_V(NAME##R##_1, R, 1)
#define XAT(i) x[(i) * ldx + k] /* row i of the tile, element k of it */
TILE(tile, 1)
TILE(tile, 2)
TILE(tile, 3)
TILE(tile, 4)
#if MR_MAX > 4
TILE(tile, 5)
TILE(tile, 6)
TILE(tile, 7)
TILE(tile, 8)
#endif
/* The same with x read transposed: y[r][n] = sum_k x[k * ldx + r] * panel[k][n] (attention's backward
 * multiplies by the transposes of its score matrices without forming them) */
#undef XAT
#define XAT(i) x[k * ldx + (i)]
TILE(tilet, 1)
TILE(tilet, 2)
TILE(tilet, 3)
TILE(tilet, 4)
#if MR_MAX > 4
TILE(tilet, 5)
TILE(tilet, 6)
TILE(tilet, 7)
TILE(tilet, 8)
#endif
#undef XAT
typedef void (*tile_fn)(const float *, int64_t, const float *, int64_t, const float *, float *, int64_t, int64_t,
                        const char *);
/* [vectors][rows]: TILES[mr] is TILES_V[3][mr] */
#if MR_MAX > 4
#define TILE_ROWS(NAME, S) {0, NAME##1##S, NAME##2##S, NAME##3##S, NAME##4##S, NAME##5##S, NAME##6##S, NAME##7##S, NAME##8##S}
#else
#define TILE_ROWS(NAME, S) {0, NAME##1##S, NAME##2##S, NAME##3##S, NAME##4##S}
#endif
static const tile_fn TILES_V[4][MR_MAX + 1] = {{0}, TILE_ROWS(tile, _1), TILE_ROWS(tile, _2), TILE_ROWS(tile, )};
static const tile_fn TILEST_V[4][MR_MAX + 1] = {{0}, TILE_ROWS(tilet, _1), TILE_ROWS(tilet, _2), TILE_ROWS(tilet, )};
#define TILES TILES_V[3]

/* the vectors of a panel that cover its first n columns (n >= 1) */
static inline int64_t vectors(int64_t n) { return n >= NR ? 3 : (n + VW - 1) / VW; }

static void gemm_amx(const float *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *packed, int64_t N,
                     const float *bias, float *y, int64_t ldy, int nt);

/* The float32 product of r1_gemm, whatever the mode: W packed by r1_pack in float32 mode. */
static void gemm_f32(const float *x, int64_t M, int64_t K, int64_t ldx, const float *packed, int64_t N,
                     const float *bias, float *y, int64_t ldy, int nt) {
    int64_t panels = (N + NR - 1) / NR;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        int64_t n0 = p * NR, nn = N - n0 < NR ? N - n0 : NR;
        const float *panel = packed + p * K * NR, *b = bias ? bias + n0 : 0;
        const char *next = PREFETCH && p + 1 < panels ? (const char *)(panel + K * NR) : 0;
        int64_t m = 0;
        for (; m + MR_MAX <= M; m += MR_MAX, next = 0)
            TILES[MR_MAX](x + m * ldx, ldx, panel, K, b, y + m * ldy + n0, ldy, nn, next);
        if (m < M)
            TILES[M - m](x + m * ldx, ldx, panel, K, b, y + m * ldy + n0, ldy, nn, next);
    }
}

/* y (M x N, row stride ldy) = x (M x K, row stride ldx) @ W + bias (may be NULL), W packed by r1_pack.
 * Threads split the panels: each thread streams its share of W once. */
void r1_gemm(const float *x, int64_t M, int64_t K, int64_t ldx, const float *packed, int64_t N,
             const float *bias, float *y, int64_t ldy, int nt) {
    if (bf16_mode)
        gemm_amx(x, M, K, ldx, (const uint16_t *)packed, N, bias, y, ldy, nt);
    else
        gemm_f32(x, M, K, ldx, packed, N, bias, y, ldy, nt);
}

/* ------------------------------------------------------------------------------------------------
 * Decoder blocks for one new token per row: a dense block (Qwen2, Llama) in one call
 * (r1_dense_decode_layer); a DeepSeek block in two, its MLA half (r1_mla_decode_attention) and its
 * dense MLP or MoE half (r1_swiglu_block, r1_moe_block; the MoE's routing is done by the caller).
 *
 * Why: at the sizes r1kit trains on a CPU (hidden 128-512, 4-8 layers) a batched decode step
 * spends as long in torch's dispatch of its many small ops per layer (norms, rotary, cache writes,
 * attention over a short cache, SiLU, residuals) as in its matrix products. Here a block is the
 * products above (r1_gemm on packed weights) and plain loops between them: the same arithmetic as
 * the model's torch code (model/layers.py, attention.py, moe.py), in the same order.
 * ------------------------------------------------------------------------------------------------ */

/* Cephes' expf polynomial once for both widths (P: the intrinsics' prefix, _mm256 or _mm512): x - fx ln 2
 * in two parts, then the polynomial y of the remainder; the caller scales y by 2^fx. */
#define EXP_POLY(P, x, fx, y)                                                             \
    x = P##_fnmadd_ps(fx, P##_set1_ps(0.693359375f), x);                                  \
    x = P##_fnmadd_ps(fx, P##_set1_ps(-2.12194440e-4f), x);                               \
    y = P##_fmadd_ps(P##_set1_ps(1.9875691500E-4f), x, P##_set1_ps(1.3981999507E-3f));    \
    y = P##_fmadd_ps(y, x, P##_set1_ps(8.3334519073E-3f));                                \
    y = P##_fmadd_ps(y, x, P##_set1_ps(4.1665795894E-2f));                                \
    y = P##_fmadd_ps(y, x, P##_set1_ps(1.6666665459E-1f));                                \
    y = P##_fmadd_ps(y, x, P##_set1_ps(5.0000001201E-1f));                                \
    y = P##_fmadd_ps(y, P##_mul_ps(x, x), P##_add_ps(x, P##_set1_ps(1.0f)))

/* exp of 8 floats, for x <= 0 (softmax after subtracting the max, SiLU's exp(-|x|)): Cephes'
 * expf polynomial; below -87.3 (exp underflows float) the result is exactly 0. */
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f);
    __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ), y;
    x = _mm256_max_ps(x, lo);
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    EXP_POLY(_mm256, x, fx, y);
    __m256i n = _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127));
    return _mm256_and_ps(keep, _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(n, 23))));
}

/* Training's elementwise passes (SwiGLU, RMSNorm, softmax, cross-entropy) run on `vec`, the products'
 * vector: 16 lanes in the AVX-512 builds, where 8-lane code left half of every register idle and these
 * passes are bound by their arithmetic (exp and a division per element), else AVX2's 8. Lane for lane
 * the same operations as exp8 and sigmoid8, so a number comes out the same at either width. */
#if defined(__AVX512F__)
static inline __m512 vexp(__m512 x) { /* exp8 on 16 lanes */
    const __m512 lo = _mm512_set1_ps(-87.3f);
    __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
    x = _mm512_max_ps(x, lo);
    __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), y;
    EXP_POLY(_mm512, x, fx, y);
    __m512i n = _mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127));
    return _mm512_maskz_mul_ps(keep, y, _mm512_castsi512_ps(_mm512_slli_epi32(n, 23)));
}
static inline __m512 vsigmoid(__m512 g) { /* sigmoid8 on 16 lanes */
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 e = vexp(_mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(g), _mm512_set1_epi32((int)0x80000000u))));
    __m512 num = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ), one, e);
    return _mm512_div_ps(num, _mm512_add_ps(one, e));
}
#define vmul(a, b) _mm512_mul_ps(a, b)
#define vadd(a, b) _mm512_add_ps(a, b)
#define vsub(a, b) _mm512_sub_ps(a, b)
#define vmax(a, b) _mm512_max_ps(a, b)
#define vfmsub(a, b, c) _mm512_fmsub_ps(a, b, c)
#define vconst(x) _mm512_set1_ps(x)
#define vhsum(v) _mm512_reduce_add_ps(v)
#define vhmax(v) _mm512_reduce_max_ps(v)
#else
#define vexp(x) exp8(x)
#define vsigmoid(x) sigmoid8(x)
#define vmul(a, b) _mm256_mul_ps(a, b)
#define vadd(a, b) _mm256_add_ps(a, b)
#define vsub(a, b) _mm256_sub_ps(a, b)
#define vmax(a, b) _mm256_max_ps(a, b)
#define vfmsub(a, b, c) _mm256_fmsub_ps(a, b, c)
#define vconst(x) _mm256_set1_ps(x)
#define vhsum(v) hsum(v)
#define vhmax(v) hmax8(v)
#endif

/* n floats, 32-byte aligned (rounded up to whole AVX2 vectors, as aligned_alloc wants) */
static inline float *falloc(int64_t n) {
    return (float *)aligned_alloc(32, (size_t)((n + 7) / 8 * 8) * sizeof(float));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax8(__m256 v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

/* sum of a[d] * b[d] over d < n, n a multiple of 8 */
static inline float dot(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < n; d += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
    return hsum(acc);
}

/* y (M x N) = x * rsqrt(mean(x^2) + eps) * w, as F.rms_norm. N is a multiple of 8. */
static void rms_norm_rows(const float *x, int64_t M, int64_t N, const float *w, float eps, float *y) {
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * N;
        float *yr = y + m * N;
        __m256 a = _mm256_setzero_ps();
        for (int64_t n = 0; n < N; n += 8) {
            __m256 t = _mm256_loadu_ps(xr + n);
            a = _mm256_fmadd_ps(t, t, a);
        }
        __m256 r = _mm256_set1_ps(1.0f / sqrtf(hsum(a) / (float)N + eps));
        for (int64_t n = 0; n < N; n += 8)
            _mm256_storeu_ps(yr + n, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + n), r), _mm256_loadu_ps(w + n)));
    }
}

/* y (M x N) = silu(g) * u, where each row of x (M x 2N) is g | u. N is a multiple of 8. */
static void silu_mul_rows(const float *x, int64_t M, int64_t N, float *y) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
    for (int64_t m = 0; m < M; m++) {
        const float *g = x + m * 2 * N, *u = g + N;
        float *yr = y + m * N;
        for (int64_t n = 0; n < N; n += 8) {
            __m256 gv = _mm256_loadu_ps(g + n);
            __m256 e = exp8(_mm256_or_ps(gv, sign)); /* exp(-|g|): never overflows */
            /* sigmoid(g) = 1 / (1 + e) for g >= 0, e / (1 + e) for g < 0 */
            __m256 num = _mm256_blendv_ps(one, e, _mm256_cmp_ps(gv, zero, _CMP_LT_OQ));
            __m256 sig = _mm256_div_ps(num, _mm256_add_ps(one, e));
            _mm256_storeu_ps(yr + n, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + n)));
        }
    }
}

/* sigmoid of 8 floats, without overflow: 1 / (1 + e) for g >= 0, e / (1 + e) for g < 0, e = exp(-|g|) */
static inline __m256 sigmoid8(__m256 g) {
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 e = exp8(_mm256_or_ps(g, _mm256_set1_ps(-0.0f)));
    __m256 num = _mm256_blendv_ps(one, e, _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ));
    return _mm256_div_ps(num, _mm256_add_ps(one, e));
}

static inline float sigmoid1(float g) {
    float e = expf(-fabsf(g));
    return (g < 0 ? e : 1.0f) / (1.0f + e);
}

/* Training's SwiGLU (cpu_kernels.swiglu): h = silu(g) * u for M rows of N, each operand's rows its own
 * stride apart (g and u: the two halves of one gate|up product, or two tensors). One pass over memory
 * where torch makes two (silu, then the product) forward and four backward. */
void r1_swiglu_forward(const float *g, int64_t ldg, const float *u, int64_t ldu, int64_t M, int64_t N,
                       float *h, int64_t ldh, int nt) {
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float *gr = g + m * ldg, *ur = u + m * ldu;
        float *hr = h + m * ldh;
        int64_t n = 0;
        for (; n + VW <= N; n += VW) {
            vec gv = vload(gr + n);
            vstore(hr + n, vmul(vmul(gv, vsigmoid(gv)), vload(ur + n)));
        }
        for (; n < N; n++)
            hr[n] = gr[n] * sigmoid1(gr[n]) * ur[n];
    }
}

/* Its gradient: with s = sigmoid(g), dg = dh u s (1 + g (1 - s)) and du = dh g s (torch's silu_backward). */
void r1_swiglu_backward(const float *g, int64_t ldg, const float *u, int64_t ldu, const float *dh, int64_t lddh,
                        int64_t M, int64_t N, float *dg, int64_t lddg, float *du, int64_t lddu, int nt) {
    const vec one = vconst(1.0f);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float *gr = g + m * ldg, *ur = u + m * ldu, *dhr = dh + m * lddh;
        float *dgr = dg + m * lddg, *dur = du + m * lddu;
        int64_t n = 0;
        for (; n + VW <= N; n += VW) {
            vec gv = vload(gr + n), d = vload(dhr + n);
            vec sg = vsigmoid(gv);
            vec slope = vmul(sg, vfma(gv, vsub(one, sg), one));
            vstore(dgr + n, vmul(vmul(d, vload(ur + n)), slope));
            vstore(dur + n, vmul(d, vmul(gv, sg)));
        }
        for (; n < N; n++) {
            float sg = sigmoid1(gr[n]);
            dgr[n] = dhr[n] * ur[n] * sg * (1.0f + gr[n] * (1.0f - sg));
            dur[n] = dhr[n] * gr[n] * sg;
        }
    }
}

/* Training's RMSNorm (cpu_kernels.rms_norm): y = x r w with r = 1 / sqrt(mean(x^2) + eps) per row, as
 * F.rms_norm; r is kept for the backward. One pass where torch's CPU rms_norm makes five. */
void r1_rms_norm_forward(const float *x, int64_t ldx, int64_t M, int64_t N, const float *w, float eps, float *y,
                         int64_t ldy, float *rstd, int nt) {
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * ldx;
        float *yr = y + m * ldy;
        vec a = vzero();
        int64_t n = 0;
        for (; n + VW <= N; n += VW) {
            vec t = vload(xr + n);
            a = vfma(t, t, a);
        }
        float ss = vhsum(a);
        for (; n < N; n++)
            ss += xr[n] * xr[n];
        float r = 1.0f / sqrtf(ss / (float)N + eps);
        rstd[m] = r;
        vec rv = vconst(r);
        for (n = 0; n + VW <= N; n += VW)
            vstore(yr + n, vmul(vmul(vload(xr + n), rv), vload(w + n)));
        for (; n < N; n++)
            yr[n] = xr[n] * r * w[n];
    }
}

/* Its gradient: with xh = x r, dx = r (w dy - xh mean(xh w dy)) per row, and dw = the sum over rows
 * of dy xh (written, not accumulated; each thread sums its rows, then the threads' sums are added). */
void r1_rms_norm_backward(const float *x, int64_t ldx, const float *dy, int64_t lddy, int64_t M, int64_t N,
                          const float *w, const float *rstd, float *dx, int64_t lddx, float *dw, int nt) {
    memset(dw, 0, (size_t)N * sizeof(float));
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        float *part = calloc((size_t)N, sizeof(float));
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            const float *xr = x + m * ldx, *dr = dy + m * lddy;
            float *dxr = dx + m * lddx, r = rstd[m];
            vec rv = vconst(r), a = vzero();
            int64_t n = 0;
            for (; n + VW <= N; n += VW) {
                vec xh = vmul(vload(xr + n), rv), d = vload(dr + n);
                a = vfma(vmul(xh, vload(w + n)), d, a);
                vstore(part + n, vfma(d, xh, vload(part + n)));
            }
            float dot_ = vhsum(a);
            for (; n < N; n++) {
                float xh = xr[n] * r;
                dot_ += xh * w[n] * dr[n];
                part[n] += dr[n] * xh;
            }
            float c = dot_ / (float)N;
            vec cv = vconst(c);
            for (n = 0; n + VW <= N; n += VW) {
                vec xh = vmul(vload(xr + n), rv);
                vec g = vfmsub(vload(w + n), vload(dr + n), vmul(xh, cv));
                vstore(dxr + n, vmul(g, rv));
            }
            for (; n < N; n++)
                dxr[n] = r * (w[n] * dr[n] - xr[n] * r * c);
        }
#pragma omp critical
        for (int64_t n = 0; n < N; n++)
            dw[n] += part[n];
        free(part);
    }
}

/* Training's rotary embedding (cpu_kernels.rope, layers.Rotary.apply): R rows of H heads of D numbers
 * (head h of row r at x + r ldr + h ldh), each row's D / 2 angles' cos and sin at cos + r ldc, sin + r ldc,
 * shared by its heads. y (R x H x D, contiguous) holds x1 cos - x2 sin | x2 cos + x1 sin, where x1, x2
 * are the halves of a head (interleave 0) or its even and odd numbers (DeepSeek's layout). backward = 1:
 * the gradient instead (x is dy, contiguous; the rotation by -angle, written back to x's layout). */
void r1_rope(const float *x, int64_t R, int64_t H, int64_t D, int64_t ldr, int64_t ldh, const float *cos,
             const float *sin, int64_t ldc, int interleave, int backward, float *y, int nt) {
    int64_t half = D / 2;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t r = 0; r < R; r++) {
        const float *c = cos + r * ldc, *s = sin + r * ldc;
        for (int64_t h = 0; h < H; h++) {
            const float *xr = x + r * ldr + h * ldh;
            float *yr = y + (r * H + h) * D;
            if (!backward) {
                for (int64_t i = 0; i < half; i++) {
                    float x1 = interleave ? xr[2 * i] : xr[i], x2 = interleave ? xr[2 * i + 1] : xr[i + half];
                    yr[i] = x1 * c[i] - x2 * s[i];
                    yr[i + half] = x2 * c[i] + x1 * s[i];
                }
            } else { /* xr: dy (halves), yr: dx in x's layout */
                for (int64_t i = 0; i < half; i++) {
                    float d1 = xr[i], d2 = xr[i + half];
                    float g1 = d1 * c[i] + d2 * s[i], g2 = d2 * c[i] - d1 * s[i];
                    if (interleave) {
                        yr[2 * i] = g1;
                        yr[2 * i + 1] = g2;
                    } else {
                        yr[i] = g1;
                        yr[i + half] = g2;
                    }
                }
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------
 * Causal self-attention for training, float32 (r1_attn_forward / r1_attn_backward; cpu_attention.py
 * is its autograd function): T queries over the same T positions, query t seeing keys 0..t.
 *
 * Why: at the lengths r1kit trains on a CPU (T of 50-500, heads of 32-128 numbers) torch's flash
 * kernel for the CPU spends most of its time outside arithmetic, and MLA needs a concatenation of
 * each head's two query parts and of its two key parts, and values padded to the query's width, on
 * top (each with its own backward). Here one head's products are the packed tiles of the products
 * above (r1_gemm): S = Q K^T over the causal panels only, a row softmax, O = P V; backward recomputes
 * P from the saved log-sum-exp (or reads forward's, psave) and forms dP = dO V^T, dS = P (dP - rowsum(dO O)), dQ = dS K,
 * dK = dS^T Q and dV = P^T dO, the last two by tiles that read dS and P transposed.
 *
 * Operands are given as parts, each (B, T, heads, d) with unit stride along d: `parts` holds, per
 * part, {pointer, d, stride of b, stride of t, stride of a head} for q1, q2, k1, k2, v in that order
 * (q2 and k2 may be empty, d = 0: a plain head). Query head h reads key/value head h / rep of a part;
 * a head stride of 0 means one head shared by all query heads (MLA's rope key). A query head is
 * q1 | q2 and its key k1 | k2, of the same size, split anywhere (MLA: q whole, k = nope | rope). out
 * (B, T, H, dv) and lse (B, H, T) are contiguous; backward writes dq (B, T, H, d1 + d2), contiguous, and
 * dk1, dk2, dv (B, T, heads of the part, d) at the strides it is given (ostr).
 * The heads that share a key or value head (all heads, where a part is shared) run in one thread, so
 * their gradients add up without atomics, in a fixed order.
 * ------------------------------------------------------------------------------------------------ */
typedef struct { const float *p; int64_t d, sb, st, sh; } part_t;

static inline part_t part_at(const int64_t *parts, int i) {
    const int64_t *a = parts + 5 * i;
    part_t r = {(const float *)(intptr_t)a[0], a[1], a[2], a[3], a[4]};
    return r;
}

/* the row of head h (query head index; key/value parts take h / rep) at position t of row b */
static inline const float *part_row(part_t a, int64_t b, int64_t t, int64_t h, int64_t rep) {
    return a.p + b * a.sb + t * a.st + (h / rep) * a.sh;
}

/* The rotary embedding applied inside attention (R = 0: none): the last R numbers of every query and
 * key head are rotated by their position's angles, cos/sin (R / 2 each) at cos + b sb + t st; pairs
 * (2i, 2i + 1) when interleaved (DeepSeek's layout), else (i, i + R / 2). Rotated in place, in their
 * layout: q and k get the same layout, so their dot products are those of layers.Rotary (which also
 * de-interleaves). inverse: the rotation by minus the angle (gradients back to the unrotated inputs). */
typedef struct { const float *cos, *sin; int64_t sb, st, R; int interleave; } rope_t;

static inline void rotate_row(float *restrict x, const rope_t *r, int64_t b, int64_t t, int inverse) {
    if (!r->R)
        return;
    const float *restrict c = r->cos + b * r->sb + t * r->st, *restrict s = r->sin + b * r->sb + t * r->st;
    int64_t half = r->R / 2;
    float sg = inverse ? -1.0f : 1.0f;
    if (r->interleave) { /* loops without branches inside: the compiler vectorizes them */
        for (int64_t i = 0; i < half; i++) {
            float x1 = x[2 * i], x2 = x[2 * i + 1], sn = sg * s[i];
            x[2 * i] = x1 * c[i] - x2 * sn;
            x[2 * i + 1] = x2 * c[i] + x1 * sn;
        }
    } else {
        float *restrict x2p = x + half;
        for (int64_t i = 0; i < half; i++) {
            float x1 = x[i], x2 = x2p[i], sn = sg * s[i];
            x[i] = x1 * c[i] - x2 * sn;
            x2p[i] = x2 * c[i] + x1 * sn;
        }
    }
}

/* per-thread scratch, kept between calls (a fresh buffer per call cost page faults on every step) */
static __thread float *attn_scratch = 0;
static __thread int64_t attn_scratch_n = 0;

static float *scratch(int64_t n) {
    if (n > attn_scratch_n) {
        free(attn_scratch);
        attn_scratch = falloc(n + 64);
        attn_scratch_n = attn_scratch ? n : 0;
    }
    return attn_scratch;
}

/* the T x d rows of one head of two parts side by side (a | b, d = da + db), times `mul`, packed into
 * panels of NR columns: panel p holds columns p NR .. p NR + NR - 1 (zeros past d), T rows of NR */
static void pack_rows(part_t a, part_t b, int64_t bi, int64_t h, int64_t rep, int64_t T, float mul,
                      const rope_t *rope, float *out) {
    int64_t d = a.d + b.d, panels = (d + NR - 1) / NR;
    for (int64_t t = 0; t < T; t++) {
        float row[NR * 8]; /* d <= 8 NR: checked by the caller */
        const float *ra = part_row(a, bi, t, h, rep), *rb = b.d ? part_row(b, bi, t, h, rep) : 0;
        for (int64_t j = 0; j < a.d; j++) row[j] = ra[j] * mul;
        for (int64_t j = 0; j < b.d; j++) row[a.d + j] = rb[j] * mul;
        for (int64_t j = d; j < panels * NR; j++) row[j] = 0.0f;
        if (rope)
            rotate_row(row + d - rope->R, rope, bi, t, 0);
        for (int64_t p = 0; p < panels; p++) copy_floats(out + (p * T + t) * NR, row + p * NR, NR);
    }
}

/* the same rows transposed (d x T: the product's columns are the T positions), packed into panels of
 * NR positions: panel p, row j holds element j of positions p NR .. p NR + NR - 1 (zeros past T) */
static void pack_cols(part_t a, part_t b, int64_t bi, int64_t h, int64_t rep, int64_t T, const rope_t *rope,
                      float *out) {
    int64_t d = a.d + b.d, panels = (T + NR - 1) / NR;
    memset(out + (panels - 1) * d * NR, 0, (size_t)(d * NR) * sizeof(float));
    for (int64_t t = 0; t < T; t++) {
        float row[NR * 8];
        const float *ra = part_row(a, bi, t, h, rep), *rb = b.d ? part_row(b, bi, t, h, rep) : 0;
        copy_floats(row, ra, a.d);
        if (b.d)
            copy_floats(row + a.d, rb, b.d);
        if (rope)
            rotate_row(row + d - rope->R, rope, bi, t, 0);
        float *col = out + (t / NR) * d * NR + t % NR;
        for (int64_t j = 0; j < d; j++) col[j * NR] = row[j];
    }
}

/* T rows of d numbers (row stride ldx) packed into panels of NR columns, as pack_rows does */
static void pack_panels(const float *x, int64_t ldx, int64_t T, int64_t d, float *out) {
    for (int64_t p = 0; p * NR < d; p++)
        for (int64_t t = 0; t < T; t++) {
            int64_t n = d - p * NR < NR ? d - p * NR : NR;
            copy_floats(out + (p * T + t) * NR, x + t * ldx + p * NR, n);
            for (int64_t j = n; j < NR; j++) out[(p * T + t) * NR + j] = 0.0f;
        }
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* S = Qs K^T over the panels a tile of rows needs (columns 0 .. last row), then the softmax of each
 * row over its keys 0..t: P in place, zeros past the diagonal up to the tile's end. lse[t] saved. With
 * lse_in (backward): P = exp(S - lse_in) instead. With inv (forward, P not kept): the rows are left
 * unnormalized, exp(S - max), and inv[t] = 1 / their sum, for the caller to scale O's rows by (a pass
 * over T x dv numbers instead of over the T x T scores). */
static void scores(const float *qs, int64_t D, const float *kt, int64_t T, int64_t Tp, float *s, float *lse,
                   const float *lse_in, float *inv) {
    for (int64_t m = 0; m < T; m += MR_MAX) {
        int64_t mr = min64(MR_MAX, T - m), last = m + mr - 1;
        for (int64_t p = 0; p * NR <= last; p++) { /* columns past the tile's last row are not needed */
            int64_t v = vectors(last + 1 - p * NR);
            TILES_V[v][mr](qs + m * D, D, kt + p * D * NR, D, 0, s + m * Tp + p * NR, Tp, min64(v * VW, T - p * NR), 0);
        }
        for (int64_t t = m; t <= last; t++) {
            float *r = s + t * Tp;
            /* n: the row's keys; nv: rounded up to whole vectors (within Tp, a multiple of NR); the
             * lanes past n read as -inf (exp: 0) */
            int64_t n = t + 1, nv = (n + VW - 1) / VW * VW, kend = m + mr;
#if defined(__AVX512F__)
#define ROW_AT(j) _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), lanes(n - (j)), r + (j))
#else
            for (int64_t j = n; j < nv; j++) r[j] = -INFINITY;
#define ROW_AT(j) vload(r + (j))
#endif
            float mx;
            if (lse_in) {
                mx = lse_in[t];
            } else { /* the row's max, a vector at a time, two chains */
                vec v0 = vconst(-INFINITY), v1 = v0;
                int64_t j = 0;
                for (; j + 2 * VW <= nv; j += 2 * VW) {
                    v0 = vmax(v0, ROW_AT(j));
                    v1 = vmax(v1, ROW_AT(j + VW));
                }
                if (j < nv)
                    v0 = vmax(v0, ROW_AT(j));
                mx = vhmax(vmax(v0, v1));
            }
            vec vm = vconst(mx), tot = vzero();
            for (int64_t j = 0; j < nv; j += VW) {
                vec e = vexp(vsub(ROW_AT(j), vm));
                vstore(r + j, e);
                tot = vadd(tot, e);
            }
#undef ROW_AT
            if (!lse_in) {
                float sum = vhsum(tot);
                lse[t] = mx + logf(sum);
                if (inv) {
                    inv[t] = 1.0f / sum;
                } else {
                    vec vi = vconst(1.0f / sum);
                    for (int64_t j = 0; j < nv; j += VW) vstore(r + j, vmul(vload(r + j), vi));
                }
            }
            for (int64_t j = nv; j < kend; j++) r[j] = 0.0f;
        }
    }
}

/* y rows (ld ldy) = P (T x T, ld Tp, zero past the diagonal) @ packed rows (T x n in panels of NR):
 * row tile m sums over positions 0 .. m + mr - 1 */
static void causal_nn(const float *p, int64_t T, int64_t Tp, const float *packed, int64_t n, float *y, int64_t ldy) {
    int64_t panels = (n + NR - 1) / NR;
    for (int64_t m = 0; m < T; m += MR_MAX) {
        int64_t mr = min64(MR_MAX, T - m);
        for (int64_t q = 0; q < panels; q++) {
            int64_t nn = min64(NR, n - q * NR);
            TILES_V[vectors(nn)][mr](p + m * Tp, Tp, packed + q * T * NR, m + mr, 0, y + m * ldy + q * NR, ldy, nn, 0);
        }
    }
}

/* y rows (T x n, ld ldy) = P^T @ packed rows: row j sums over positions j0 .. T - 1 of its tile j0
 * (P[i][j] is zero for i < j) */
static void causal_tn(const float *p, int64_t T, int64_t Tp, const float *packed, int64_t n, float *y, int64_t ldy) {
    int64_t panels = (n + NR - 1) / NR;
    for (int64_t m = 0; m < T; m += MR_MAX) {
        int64_t mr = min64(MR_MAX, T - m);
        for (int64_t q = 0; q < panels; q++) {
            int64_t nn = min64(NR, n - q * NR);
            TILEST_V[vectors(nn)][mr](p + m * Tp + m, Tp, packed + (q * T + m) * NR, T - m, 0, y + m * ldy + q * NR,
                                      ldy, nn, 0);
        }
    }
}

/* heads per work unit: the heads sharing a key/value head; all of them where a part is shared */
static int64_t unit_heads(part_t k1, part_t k2, part_t v, int64_t H, int64_t rep) {
    int shared = (k1.sh == 0) || (k2.d && k2.sh == 0) || (v.sh == 0);
    return shared ? H : rep;
}

/* Qs = scale q, one head's T x D rows (q1 | q2), row stride D */
static void scaled_q(part_t q1, part_t q2, int64_t b, int64_t h, int64_t T, float scale, const rope_t *rope,
                     float *qs) {
    int64_t D = q1.d + q2.d;
    for (int64_t t = 0; t < T; t++) {
        const float *a = part_row(q1, b, t, h, 1), *c = q2.d ? part_row(q2, b, t, h, 1) : 0;
        float *r = qs + t * D;
        for (int64_t j = 0; j < q1.d; j++) r[j] = a[j] * scale;
        for (int64_t j = 0; j < q2.d; j++) r[q1.d + j] = c[j] * scale;
        rotate_row(r + D - rope->R, rope, b, t, 0);
    }
}

/* A call's operands (q1, q2, k1, k2, v) and rotary part (R = 0: none) from its arguments; 1 when they do
 * not fit the kernel (heads over 8 NR numbers, query and key heads of different sizes, H not a multiple
 * of rep, a rotary part wider than a head or odd). */
static int attn_args(const int64_t *parts, const float *cos, const float *sin, const int64_t *rs, int64_t H,
                     int64_t rep, part_t p[5], rope_t *rope) {
    for (int i = 0; i < 5; i++) p[i] = part_at(parts, i);
    rope_t r = {cos, sin, rs[0], rs[1], rs[2], (int)rs[3]};
    *rope = r;
    int64_t D = p[0].d + p[1].d;
    return D > 8 * NR || p[4].d > 8 * NR || p[2].d + p[3].d != D || H % rep || r.R > D || r.R % 2;
}

/* psave (nullable): where each head's P goes, (B, H, T, Tp) with Tp = T rounded up to NR, so that
 * backward reads it instead of recomputing it (cpu_attention.py decides by its size) */
int r1_attn_forward(const int64_t *parts, int64_t B, int64_t T, int64_t H, int64_t rep, float scale,
                    const float *cos, const float *sin, const int64_t *rs, float *out, float *lse, float *psave,
                    int nt) {
    part_t p[5];
    rope_t rope;
    if (attn_args(parts, cos, sin, rs, H, rep, p, &rope))
        return 1;
    part_t q1 = p[0], q2 = p[1], k1 = p[2], k2 = p[3], v = p[4];
    int64_t D = q1.d + q2.d, Dv = v.d;
    int64_t U = unit_heads(k1, k2, v, H, rep), units = B * (H / U);
    int64_t Tp = (T + NR - 1) / NR * NR, pV = (Dv + NR - 1) / NR * NR;
    int64_t need = T * D + Tp * D + Tp * Tp + T * pV + T;
#pragma omp parallel num_threads(nt) if (nt > 1 && units > 1)
    {
        float *qs = scratch(need), *kt = qs + T * D, *vp = kt + Tp * D, *s0 = vp + T * pV, *inv = s0 + Tp * Tp;
        part_t none = {0, 0, 0, 0, 0};
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < units; u++) {
            int64_t b = u / (H / U), h0 = (u % (H / U)) * U;
            for (int64_t h = h0; h < h0 + U; h++) {
                float *s = psave ? psave + (b * H + h) * T * Tp : s0;
                int kv_new = h == h0 || h % rep == 0; /* the query heads of one KV head reuse its packs */
                scaled_q(q1, q2, b, h, T, scale, &rope, qs);
                if (kv_new)
                    pack_cols(k1, k2, b, h, rep, T, &rope, kt);
                scores(qs, D, kt, T, Tp, s, lse + (b * H + h) * T, 0, psave ? 0 : inv);
                if (kv_new)
                    pack_rows(v, none, b, h, rep, T, 1.0f, 0, vp);
                float *oh = out + (b * T * H + h) * Dv;
                causal_nn(s, T, Tp, vp, Dv, oh, H * Dv);
                for (int64_t t = 0; !psave && t < T; t++) { /* P's normalization, on O's rows */
                    float *o = oh + t * H * Dv;
                    vec vi = vconst(inv[t]);
                    int64_t j = 0;
                    for (; j + VW <= Dv; j += VW) vstore(o + j, vmul(vload(o + j), vi));
                    for (; j < Dv; j++) o[j] *= inv[t];
                }
            }
        }
    }
    return 0;
}

/* rows t of head g of a gradient output (element [b][t][g][j] at base + (b T + t) ldt + g ldh + j) = or +=
 * tmp's rows (T x d, ld ldt_tmp) */
static void put_rows(float *base, int64_t d, int64_t ldt, int64_t ldh, int64_t b, int64_t T, int64_t g,
                     const float *tmp, int64_t ld_tmp, int add) {
    for (int64_t t = 0; t < T; t++) {
        float *dst = base + (b * T + t) * ldt + g * ldh;
        const float *src = tmp + t * ld_tmp;
        if (add)
            for (int64_t j = 0; j < d; j++) dst[j] += src[j];
        else
            copy_floats(dst, src, d);
    }
}

/* psave: forward's P where it kept it, else NULL (P is recomputed from q, k and lse) */
/* ostr: the (t, head) strides of dk1, dk2 and dv, in that order (they may be views of one buffer, as
 * MLA's k_nope | v gradient) */
int r1_attn_backward(const int64_t *parts, int64_t B, int64_t T, int64_t H, int64_t rep, float scale,
                     const float *cos, const float *sin, const int64_t *rs, const float *out, const float *lse,
                     const float *psave, const float *dout, float *dq, float *dk1, float *dk2, float *dv,
                     const int64_t *ostr, int nt) {
    part_t p[5];
    rope_t rope;
    if (attn_args(parts, cos, sin, rs, H, rep, p, &rope))
        return 1;
    part_t q1 = p[0], q2 = p[1], k1 = p[2], k2 = p[3], v = p[4];
    int64_t D = q1.d + q2.d, Dv = v.d;
    int64_t U = unit_heads(k1, k2, v, H, rep), units = B * (H / U);
    int64_t Tp = (T + NR - 1) / NR * NR, pD = (D + NR - 1) / NR * NR, pV = (Dv + NR - 1) / NR * NR;
    int64_t W = D > Dv ? D : Dv;
    /* qs (T x D) | kt (D x Tp) | s, ds (Tp x Tp each) | kp, qp (T x pD each) | vt (Dv x Tp) | dop (T x pV)
     * | tmp (T x W) | delta (T) */
    int64_t need = T * D + Tp * D + 2 * Tp * Tp + 2 * T * pD + Tp * Dv + T * pV + T * W + T;
#pragma omp parallel num_threads(nt) if (nt > 1 && units > 1)
    {
        float *qs = scratch(need), *kt = qs + T * D, *s0 = kt + Tp * D, *ds = s0 + Tp * Tp, *kp = ds + Tp * Tp;
        float *qp = kp + T * pD, *vt = qp + T * pD, *dop = vt + Tp * Dv, *tmp = dop + T * pV, *delta = tmp + T * W;
        part_t none = {0, 0, 0, 0, 0};
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < units; u++) {
            int64_t b = u / (H / U), h0 = (u % (H / U)) * U;
            for (int64_t h = h0; h < h0 + U; h++) {
                const float *o = out + (b * T * H + h) * Dv, *dO = dout + (b * T * H + h) * Dv, *s = s0;
                int64_t ldo = H * Dv;
                int kv_new = h == h0 || h % rep == 0; /* the query heads of one KV head reuse its packs */
                if (psave) {
                    s = psave + (b * H + h) * T * Tp;
                } else { /* P again, from the saved log-sum-exp */
                    scaled_q(q1, q2, b, h, T, scale, &rope, qs);
                    if (kv_new)
                        pack_cols(k1, k2, b, h, rep, T, &rope, kt);
                    scores(qs, D, kt, T, Tp, s0, 0, lse + (b * H + h) * T, 0);
                }
                for (int64_t t = 0; t < T; t++) { /* delta = rowsum(dO O) */
                    const float *a = dO + t * ldo, *c = o + t * ldo;
                    vec acc = vzero();
                    int64_t j = 0;
                    for (; j + VW <= Dv; j += VW)
                        acc = vfma(vload(a + j), vload(c + j), acc);
                    float rest = 0.0f;
                    for (; j < Dv; j++) rest += a[j] * c[j];
                    delta[t] = vhsum(acc) + rest;
                }
                if (kv_new)
                    pack_cols(v, none, b, h, rep, T, 0, vt);
                for (int64_t m = 0; m < T; m += MR_MAX) { /* dP = dO V^T, then dS = P (dP - delta) */
                    int64_t mr = min64(MR_MAX, T - m), last = m + mr - 1;
                    for (int64_t p = 0; p * NR <= last; p++) {
                        int64_t v = vectors(last + 1 - p * NR);
                        TILES_V[v][mr](dO + m * ldo, ldo, vt + p * Dv * NR, Dv, 0, ds + m * Tp + p * NR, Tp,
                                       min64(v * VW, T - p * NR), 0);
                    }
                    for (int64_t t = m; t <= last; t++) {
                        float *r = ds + t * Tp;
                        const float *pr = s + t * Tp;
                        float dl = delta[t];
                        vec dv = vconst(dl);
                        int64_t j = 0;
                        for (; j + VW <= last + 1; j += VW) vstore(r + j, vmul(vload(pr + j), vsub(vload(r + j), dv)));
                        for (; j <= last; j++) r[j] = pr[j] * (r[j] - dl);
                    }
                }
                /* dq = scale dS K: K (rotated) packed by rows, times scale; then back through the rotation */
                if (kv_new)
                    pack_rows(k1, k2, b, h, rep, T, scale, &rope, kp);
                float *dqh = dq + (b * T * H + h) * D;
                causal_nn(ds, T, Tp, kp, D, dqh, H * D);
                for (int64_t t = 0; rope.R && t < T; t++) rotate_row(dqh + t * H * D + D - rope.R, &rope, b, t, 1);
                /* dK = dS^T (scale q, rotated), back through the rotation */
                if (psave) {
                    pack_rows(q1, q2, b, h, 1, T, scale, &rope, qp);
                } else { /* qs: q scaled and rotated already */
                    pack_panels(qs, D, T, D, qp);
                }
                causal_tn(ds, T, Tp, qp, D, tmp, W);
                for (int64_t t = 0; rope.R && t < T; t++) rotate_row(tmp + t * W + D - rope.R, &rope, b, t, 1);
                int first1 = k1.sh ? h % rep == 0 : h == h0, first2 = k2.sh ? h % rep == 0 : h == h0;
                put_rows(dk1, k1.d, ostr[0], ostr[1], b, T, k1.sh ? h / rep : 0, tmp, W, !first1);
                if (k2.d)
                    put_rows(dk2, k2.d, ostr[2], ostr[3], b, T, k2.sh ? h / rep : 0, tmp + k1.d, W, !first2);
                /* dV = P^T dO */
                pack_panels(dO, ldo, T, Dv, dop);
                causal_tn(s, T, Tp, dop, Dv, tmp, W);
                int firstv = v.sh ? h % rep == 0 : h == h0;
                put_rows(dv, Dv, ostr[4], ostr[5], b, T, v.sh ? h / rep : 0, tmp, W, !firstv);
            }
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * MoE dispatch and combine for training (moe.py's _PermuteRows and the gated sum of each token's k
 * expert outputs), float32 rows of H numbers: gathers by a permutation of the (token, expert) pairs,
 * fused with what follows them. torch ran each as an index_select plus a view, a product with the gates
 * and a sum (forward), and as many backward, each a pass over the k-fold rows.
 * ------------------------------------------------------------------------------------------------ */
/* y[p] = x[idx[p] / div], P rows (dispatch: pair p is token order[p] / k) */
void r1_rows_gather(const float *x, const int64_t *idx, int64_t div, int64_t P, int64_t H, float *y, int nt) {
#pragma omp parallel for num_threads(nt) if (nt > 1 && P * H >= (1 << 14)) schedule(static)
    for (int64_t p = 0; p < P; p++)
        copy_floats(y + p * H, x + (idx[p] / div) * H, H);
}

/* out[t] = sum_j g[t k + j] y[idx[t k + j]] over the k pairs of token t (g NULL: weights of 1): the
 * combine (idx = inverse: where each pair went), and the dispatch's backward (g NULL) */
void r1_rows_combine(const float *y, const int64_t *idx, const float *g, int64_t N, int64_t k, int64_t H,
                     float *out, int nt) {
#pragma omp parallel for num_threads(nt) if (nt > 1 && N * k * H >= (1 << 14)) schedule(static)
    for (int64_t t = 0; t < N; t++) {
        float *o = out + t * H;
        for (int64_t j = 0; j < k; j++) {
            const float *r = y + idx[t * k + j] * H;
            float w = g ? g[t * k + j] : 1.0f;
            if (j == 0)
                for (int64_t c = 0; c < H; c++) o[c] = w * r[c];
            else
                for (int64_t c = 0; c < H; c++) o[c] += w * r[c];
        }
    }
}

/* the combine's backward: dy_pairs[idx[t k + j]] = g[t k + j] dout[t], dg[t k + j] = dout[t] . y[idx[t k + j]] */
void r1_rows_combine_backward(const float *y, const int64_t *idx, const float *g, const float *dout, int64_t N,
                              int64_t k, int64_t H, float *dy, float *dg, int nt) {
#pragma omp parallel for num_threads(nt) if (nt > 1 && N * k * H >= (1 << 14)) schedule(static)
    for (int64_t t = 0; t < N; t++) {
        const float *d = dout + t * H;
        for (int64_t j = 0; j < k; j++) {
            int64_t p = idx[t * k + j];
            const float *r = y + p * H;
            float *o = dy + p * H, w = g[t * k + j];
            __m256 acc = _mm256_setzero_ps();
            int64_t c = 0;
            for (; c + 8 <= H; c += 8) {
                __m256 dv = _mm256_loadu_ps(d + c);
                _mm256_storeu_ps(o + c, _mm256_mul_ps(dv, _mm256_set1_ps(w)));
                acc = _mm256_fmadd_ps(dv, _mm256_loadu_ps(r + c), acc);
            }
            float rest = 0.0f;
            for (; c < H; c++) {
                o[c] = w * d[c];
                rest += d[c] * r[c];
            }
            dg[t * k + j] = hsum(acc) + rest;
        }
    }
}

/* ------------------------------------------------------------------------------------------------
 * Cross-entropy per row for training (cpu_kernels.cross_entropy): loss[r] = logsumexp(x[r]) - x[r][t[r]]
 * in one pass over the logits forward, and dx[r] = dl[r] (softmax(x[r]) - onehot(t[r])) in one pass
 * backward, from the saved log-sum-exp. torch runs log_softmax, nll_loss and, backward, a zero fill of
 * the logits' size, a scatter and log_softmax's backward: four passes over (N, V) floats.
 * Returns 1 (writing nothing) when a target lies outside 0..V-1.
 * ------------------------------------------------------------------------------------------------ */
int r1_xent_forward(const float *x, int64_t N, int64_t V, const int64_t *t, float *loss, float *lse, int nt) {
    for (int64_t r = 0; r < N; r++)
        if (t[r] < 0 || t[r] >= V)
            return 1;
#pragma omp parallel for num_threads(nt) if (nt > 1 && N * V >= (1 << 15)) schedule(static)
    for (int64_t r = 0; r < N; r++) {
        const float *xr = x + r * V;
        vec vm = vconst(-INFINITY);
        int64_t j = 0;
        for (; j + VW <= V; j += VW) vm = vmax(vm, vload(xr + j));
        float mx = vhmax(vm);
        for (int64_t i = j; i < V; i++) mx = xr[i] > mx ? xr[i] : mx;
        vec m8 = vconst(mx), acc = vzero();
        for (j = 0; j + VW <= V; j += VW) acc = vadd(acc, vexp(vsub(vload(xr + j), m8)));
        float sum = vhsum(acc);
        for (; j < V; j++) sum += expf(xr[j] - mx);
        lse[r] = mx + logf(sum);
        loss[r] = lse[r] - xr[t[r]];
    }
    return 0;
}

void r1_xent_backward(const float *x, int64_t N, int64_t V, const int64_t *t, const float *lse, const float *dl,
                      float *dx, int nt) {
#pragma omp parallel for num_threads(nt) if (nt > 1 && N * V >= (1 << 15)) schedule(static)
    for (int64_t r = 0; r < N; r++) {
        const float *xr = x + r * V;
        float *dr = dx + r * V, g = dl[r];
        vec l8 = vconst(lse[r]), g8 = vconst(g);
        int64_t j = 0;
        for (; j + VW <= V; j += VW)
            vstore(dr + j, vmul(g8, vexp(vsub(vload(xr + j), l8))));
        for (; j < V; j++) dr[j] = g * expf(xr[j] - lse[r]);
        dr[t[r]] -= g;
    }
}

/* ------------------------------------------------------------------------------------------------
 * The routed experts of a MoE layer for training, float32 (moe.py's _ExpertsFFN): each expert's SwiGLU
 * FFN over its run of the dispatched rows, y = (silu(x W1g^T) * x W1u^T) W2^T, forward and backward,
 * one expert at a time per thread.
 *
 * Why: torch ran them as a grouped product, a SwiGLU and another grouped product (four grouped products
 * and the SwiGLU's backward), each splitting every expert's small product (~200 rows here) between the
 * threads. Here a thread takes whole experts, largest first, and runs an expert's chain of products and
 * its SwiGLU back to back on the rows it just wrote (still in its cache); the products are the BLAS's
 * own sgemm (torch's MKL: cpu_kernels.py hands over its address, single-threaded inside our threads).
 * Standalone, alternating with torch's grouped_mm at the tiny DeepSeek-V3's shapes: each product
 * 1.2-1.4x faster.
 * ------------------------------------------------------------------------------------------------ */
typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *, const int *);
typedef int (*threads_fn)(int);
static sgemm_fn blas_sgemm = 0;         /* Fortran sgemm_: column-major, arguments by address, 32-bit ints */
static threads_fn blas_local_threads = 0; /* MKL_Set_Num_Threads_Local (MKL's C call), when the BLAS is MKL */

/* C (M x N, row-major, row stride ldc) = op(A) op(B): the column-major BLAS computes C^T = op(B)^T op(A)^T */
static void blas_rows(int ta, int tb, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B,
                      int64_t ldb, float *C, int64_t ldc) {
    int m = (int)N, n = (int)M, k = (int)K, la = (int)lda, lb = (int)ldb, lc = (int)ldc;
    float one = 1.0f, zero = 0.0f;
    char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
    blas_sgemm(&cb, &ca, &m, &n, &k, &one, B, &lb, A, &la, &zero, C, &lc);
}

/* Install the BLAS (both may be NULL: none) and check it: 1 when a small product comes out right, with
 * row-major strides in each transposition the experts use. */
int r1_set_blas(void *sgemm, void *local_threads) {
    blas_sgemm = (sgemm_fn)sgemm;
    blas_local_threads = (threads_fn)local_threads;
    if (!blas_sgemm)
        return 0;
    float a[6] = {1, 2, 3, 4, 5, 6}, b[6] = {1, -1, 2, 0.5f, -2, 3}, c[4] = {0}, d[9] = {0};
    blas_rows(0, 1, 2, 2, 3, a, 3, b, 3, c, 2); /* a (2 x 3) b^T: b as 2 x 3 */
    int ok = c[0] == 1 - 2 + 6 && c[1] == 0.5f - 4 + 9 && c[2] == 4 - 5 + 12 && c[3] == 2 - 10 + 18;
    blas_rows(1, 0, 3, 3, 2, a, 3, b, 3, d, 3); /* a^T (3 x 2) b (2 x 3) */
    ok = ok && d[0] == 1 * 1 + 4 * 0.5f && d[4] == 2 * -1 + 5 * -2 && d[8] == 3 * 2 + 6 * 3;
    if (!ok)
        blas_sgemm = 0;
    return ok;
}

/* the experts' first rows and a schedule: experts by count, largest first (each thread takes the next) */
static void expert_plan(const int64_t *counts, int64_t E, int64_t *start, int64_t *order) {
    for (int64_t e = 0, s = 0; e < E; e++) {
        start[e] = s;
        s += counts[e];
        order[e] = e;
    }
    for (int64_t i = 1; i < E; i++) /* insertion sort: E is small */
        for (int64_t j = i; j > 0 && counts[order[j]] > counts[order[j - 1]]; j--) {
            int64_t t = order[j];
            order[j] = order[j - 1];
            order[j - 1] = t;
        }
}

/* The experts' operands: x (P x H), the rows sorted by expert; w1 (E x 2I x H), each expert's gate | up
 * rows; w2 (E x H x I); gu (P x 2I: x W1^T) and h (P x I: silu(g) u), written forward, read backward;
 * y (P x H) forward; backward: dy (P x H) in, dx (P x H), dw1, dw2 (as w1, w2) out, dh (P x I) and
 * dgu (P x 2I) scratch. */
typedef struct {
    const float *x, *w1, *w2, *dy;
    float *gu, *h, *y, *dh, *dgu, *dx, *dw1, *dw2;
    int64_t H, I;
} experts_t;

/* expert e over its m rows, from row s */
static void expert_forward(const experts_t *a, int64_t e, int64_t m, int64_t s) {
    int64_t H = a->H, I = a->I;
    if (!m)
        return;
    blas_rows(0, 1, m, 2 * I, H, a->x + s * H, H, a->w1 + e * 2 * I * H, H, a->gu + s * 2 * I, 2 * I);
    r1_swiglu_forward(a->gu + s * 2 * I, 2 * I, a->gu + s * 2 * I + I, 2 * I, m, I, a->h + s * I, I, 1);
    blas_rows(0, 1, m, H, I, a->h + s * I, I, a->w2 + e * H * I, I, a->y + s * H, H);
}

static void expert_backward(const experts_t *a, int64_t e, int64_t m, int64_t s) {
    int64_t H = a->H, I = a->I;
    float *dw1 = a->dw1 + e * 2 * I * H, *dw2 = a->dw2 + e * H * I;
    if (!m) { /* no rows: zero gradients */
        memset(dw1, 0, (size_t)(2 * I * H) * sizeof(float));
        memset(dw2, 0, (size_t)(H * I) * sizeof(float));
        return;
    }
    const float *dy = a->dy + s * H, *gu = a->gu + s * 2 * I;
    float *dh = a->dh + s * I, *dgu = a->dgu + s * 2 * I;
    blas_rows(0, 0, m, I, H, dy, H, a->w2 + e * H * I, I, dh, I);   /* dh = dy W2 */
    blas_rows(1, 0, H, I, m, dy, H, a->h + s * I, I, dw2, I);       /* dW2 = dy^T h */
    r1_swiglu_backward(gu, 2 * I, gu + I, 2 * I, dh, I, m, I, dgu, 2 * I, dgu + I, 2 * I, 1);
    blas_rows(0, 0, m, H, 2 * I, dgu, 2 * I, a->w1 + e * 2 * I * H, H, a->dx + s * H, H); /* dx = dgu W1 */
    blas_rows(1, 0, 2 * I, H, m, dgu, 2 * I, a->x + s * H, H, dw1, H);                     /* dW1 = dgu^T x */
}

/* each expert once, a thread per expert, largest first; the BLAS single-threaded inside */
static void experts_run(const experts_t *a, const int64_t *counts, int64_t E,
                        void (*one)(const experts_t *, int64_t, int64_t, int64_t), int nt) {
    int64_t *start = malloc(2 * (size_t)E * sizeof(int64_t)), *order = start + E;
    expert_plan(counts, E, start, order);
    int threaded = nt > 1 && E > 1;
#pragma omp parallel num_threads(nt) if (threaded)
    {
        /* one thread of ours, one of MKL's (MKL would see the region anyway; this is to be sure) */
        int local = threaded && blas_local_threads, before = local ? blas_local_threads(1) : 0;
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < E; i++)
            one(a, order[i], counts[order[i]], start[order[i]]);
        if (local)
            blas_local_threads(before);
    }
    free(start);
}

void r1_experts_forward(const float *x, const int64_t *counts, int64_t E, int64_t H, int64_t I, const float *w1,
                        const float *w2, float *gu, float *h, float *y, int nt) {
    experts_t a = {x, w1, w2, 0, gu, h, y, 0, 0, 0, 0, 0, H, I};
    experts_run(&a, counts, E, expert_forward, nt);
}

void r1_experts_backward(const float *x, const int64_t *counts, int64_t E, int64_t H, int64_t I, const float *w1,
                         const float *w2, const float *gu, const float *h, const float *dy, float *dh, float *dgu,
                         float *dx, float *dw1, float *dw2, int nt) {
    experts_t a = {x, w1, w2, dy, (float *)gu, (float *)h, 0, dh, dgu, dx, dw1, dw2, H, I};
    experts_run(&a, counts, E, expert_backward, nt);
}

/* MoE dispatch plan: the P (token, expert) pairs' expert ids -> counts (E), order (P: the pairs
 * sorted by expert, stably) and inverse (P: where each pair went), by one counting pass instead of
 * two sorts. Returns 1 (nothing useful written) when an id lies outside 0..E-1. */
int r1_moe_plan(const int64_t *ids, int64_t P, int64_t E, int64_t *counts, int64_t *order, int64_t *inverse) {
    int64_t *next = calloc((size_t)E + 1, sizeof(int64_t));
    memset(counts, 0, (size_t)E * sizeof(int64_t));
    for (int64_t p = 0; p < P; p++) {
        if (ids[p] < 0 || ids[p] >= E) {
            free(next);
            return 1;
        }
        counts[ids[p]]++;
    }
    for (int64_t e = 0; e < E; e++) next[e + 1] = next[e] + counts[e];
    for (int64_t p = 0; p < P; p++) {
        int64_t at = next[ids[p]]++;
        order[at] = p;
        inverse[p] = at;
    }
    free(next);
    return 0;
}

/* Rotate one head's D rotary numbers by its row's angles (layers.Rotary.apply). Non-interleaved: the
 * halves x1 | x2 become x1 cos - x2 sin | x2 cos + x1 sin. Interleaved (DeepSeek's layout): the
 * pairs (x0, x1), (x2, x3), ... are x1, x2, and the result is written de-interleaved, evens then odds. */
static inline void rotate(float *x, const float *cos, const float *sin, int64_t D, int interleave) {
    int64_t half = D / 2;
    if (!interleave) {
        for (int64_t i = 0; i < half; i++) {
            float x1 = x[i], x2 = x[i + half];
            x[i] = x1 * cos[i] - x2 * sin[i];
            x[i + half] = x2 * cos[i] + x1 * sin[i];
        }
        return;
    }
    float tmp[512]; /* D <= 512: checked by the caller */
    memcpy(tmp, x, (size_t)D * sizeof(float));
    for (int64_t i = 0; i < half; i++) {
        float x1 = tmp[2 * i], x2 = tmp[2 * i + 1];
        x[i] = x1 * cos[i] - x2 * sin[i];
        x[i + half] = x2 * cos[i] + x1 * sin[i];
    }
}

#define KB 64 /* keys per block: a block of K or V stays in L1 while all query heads of its KV head use it */

/* Attention of one query token per row over that row's cache slots 0..len[m]-1. q (M, H*D), the
 * rows' query heads; k/v caches (M, S, Hkv, D) contiguous; out (M, H*D). Query head h reads KV
 * head h / (H / Hkv); each KV head's keys and values are read once for all its query heads. */
static void decode_attention(const float *q, const int64_t ldq, const float *kc, const float *vc, int64_t S,
                             const int64_t *len, int64_t M, int64_t H, int64_t Hkv, int64_t D, float scale,
                             float *out, int nt) {
    int64_t rep = H / Hkv, longest = 0;
    for (int64_t m = 0; m < M; m++) longest = len[m] > longest ? len[m] : longest;
    int64_t L8 = (longest + 7) / 8 * 8;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        float *sc = falloc(rep * L8 + 8);
        float *acc = falloc(rep * D + 8);
#pragma omp for schedule(static)
        for (int64_t mg = 0; mg < M * Hkv; mg++) {
            int64_t m = mg / Hkv, g = mg % Hkv, n = len[m], n8 = (n + 7) / 8 * 8;
            const float *kb = kc + (m * S * Hkv + g) * D, *vb = vc + (m * S * Hkv + g) * D;
            int64_t ks = Hkv * D; /* from one slot to the next */
            for (int64_t j0 = 0; j0 < n; j0 += KB) {
                int64_t j1 = j0 + KB < n ? j0 + KB : n;
                for (int64_t r = 0; r < rep; r++) {
                    const float *qp = q + m * ldq + (g * rep + r) * D;
                    float *s = sc + r * L8;
                    int64_t j = j0;
                    for (; j + 4 <= j1; j += 4) { /* four keys at once: four independent FMA chains */
                        const float *k0 = kb + j * ks, *k1 = k0 + ks, *k2 = k1 + ks, *k3 = k2 + ks;
                        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                        for (int64_t d = 0; d < D; d += 8) {
                            __m256 qd = _mm256_loadu_ps(qp + d);
                            a0 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k0 + d), a0);
                            a1 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k1 + d), a1);
                            a2 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k2 + d), a2);
                            a3 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k3 + d), a3);
                        }
                        s[j] = hsum(a0) * scale;
                        s[j + 1] = hsum(a1) * scale;
                        s[j + 2] = hsum(a2) * scale;
                        s[j + 3] = hsum(a3) * scale;
                    }
                    for (; j < j1; j++)
                        s[j] = dot(qp, kb + j * ks, D) * scale;
                }
            }
            for (int64_t r = 0; r < rep; r++) { /* softmax of each query head's scores */
                float *s = sc + r * L8, mx = -INFINITY;
                for (int64_t j = 0; j < n; j++) mx = s[j] > mx ? s[j] : mx;
                for (int64_t j = n; j < n8; j++) s[j] = -INFINITY;
                __m256 vm = _mm256_set1_ps(mx), tot = _mm256_setzero_ps();
                for (int64_t j = 0; j < n8; j += 8) {
                    __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(s + j), vm));
                    _mm256_store_ps(s + j, e);
                    tot = _mm256_add_ps(tot, e);
                }
                float inv = 1.0f / hsum(tot);
                for (int64_t j = 0; j < n; j++) s[j] *= inv;
            }
            memset(acc, 0, (size_t)(rep * D) * sizeof(float));
            for (int64_t j0 = 0; j0 < n; j0 += KB) { /* out = P V, 8 accumulators (64 numbers) at a time */
                int64_t j1 = j0 + KB < n ? j0 + KB : n;
                for (int64_t r = 0; r < rep; r++) {
                    const float *s = sc + r * L8;
                    for (int64_t d0 = 0; d0 < D; d0 += 64) {
                        int nd = D - d0 < 64 ? (int)((D - d0) / 8) : 8;
                        float *ap = acc + r * D + d0;
                        __m256 a[8];
                        for (int c = 0; c < nd; c++) a[c] = _mm256_loadu_ps(ap + 8 * c);
                        for (int64_t j = j0; j < j1; j++) {
                            __m256 p = _mm256_set1_ps(s[j]);
                            const float *vp = vb + j * ks + d0;
                            for (int c = 0; c < nd; c++) a[c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vp + 8 * c), a[c]);
                        }
                        for (int c = 0; c < nd; c++) _mm256_storeu_ps(ap + 8 * c, a[c]);
                    }
                }
            }
            memcpy(out + m * H * D + g * rep * D, acc, (size_t)(rep * D) * sizeof(float));
        }
        free(sc);
        free(acc);
    }
}

/* Each row's slot lies inside its row of a cache of S slots; len[m] = slots attended (<= kv_len).
 * Returns 0, or 1 when a slot is out of bounds (the caller writes nothing then). */
static int row_lengths(const int64_t *slots, int64_t M, int64_t S, int64_t kv_len, int64_t *len) {
    for (int64_t m = 0; m < M; m++) {
        int64_t pos = slots[m] - m * S;
        if (pos < 0 || pos >= S)
            return 1;
        len[m] = pos + 1 < kv_len ? pos + 1 : kv_len;
    }
    return 0;
}

/* The feed-forward half of a block, in place: h += down(silu(gate) * up), gate|up = gate_up(rms_norm(h) * ln). */
void r1_swiglu_block(float *h, int64_t M, int64_t Hd, const float *ln, float eps, const float *gu_w,
                     const float *down_w, int64_t I, int nt) {
    float *xn = falloc(M * Hd);
    float *gu = falloc(M * 2 * I);
    float *act = falloc(M * I);
    rms_norm_rows(h, M, Hd, ln, eps, xn);
    r1_gemm(xn, M, Hd, Hd, gu_w, 2 * I, NULL, gu, 2 * I, nt);
    silu_mul_rows(gu, M, I, act);
    r1_gemm(act, M, I, I, down_w, Hd, NULL, xn, Hd, nt);
    for (int64_t i = 0; i < M * Hd; i++) h[i] += xn[i];
    free(xn);
    free(gu);
    free(act);
}

/* h (M x Hd), the residual stream of M rows with one new token each, becomes the layer's output:
 *   x = h + o(attention(rope(q), cache + rope(k), cache + v)),   q|k|v = qkv(rms_norm(h) * ln1)
 *   h = x + down(silu(gate) * up),                                gate|up = gate_up(rms_norm(x) * ln2)
 * Row m's new key and value go to cache slot slots[m] (flat: m * S + position) and it attends to
 * slots 0..min(position + 1, kv_len) - 1 of its row. cos/sin (M x D/2): the rows' rotary angles.
 * Packed weights and biases (NULL: none) as r1_gemm takes them. Returns 0, or 1 (nothing written)
 * when a slot lies outside its row. Hd, D and I are multiples of 8 (checked by the caller). */
int r1_dense_decode_layer(float *h, int64_t M, int64_t Hd, const float *ln1, const float *ln2, float eps,
                          const float *qkv_w, const float *qkv_b, const float *o_w, const float *o_b,
                          const float *gu_w, const float *down_w, int64_t I,
                          int64_t H, int64_t Hkv, int64_t D, const float *cos, const float *sin,
                          float *k_cache, float *v_cache, int64_t S, const int64_t *slots, int64_t kv_len,
                          float scale, int nt) {
    int64_t Nq = H * D, Nkv = Hkv * D, Nqkv = Nq + 2 * Nkv, half = D / 2;
    int64_t *len = (int64_t *)malloc((size_t)M * sizeof(int64_t));
    if (row_lengths(slots, M, S, kv_len, len)) {
        free(len);
        return 1;
    }
    float *xn = falloc(M * Hd);
    float *qkv = falloc(M * Nqkv);
    float *att = falloc(M * Nq);
    rms_norm_rows(h, M, Hd, ln1, eps, xn);
    r1_gemm(xn, M, Hd, Hd, qkv_w, Nqkv, qkv_b, qkv, Nqkv, nt);
    for (int64_t m = 0; m < M; m++) {
        float *row = qkv + m * Nqkv;
        const float *c = cos + m * half, *s = sin + m * half;
        for (int64_t hh = 0; hh < H + Hkv; hh++) /* q heads, then k heads */
            rotate(row + hh * D, c, s, D, 0);
        memcpy(k_cache + slots[m] * Nkv, row + Nq, (size_t)Nkv * sizeof(float));
        memcpy(v_cache + slots[m] * Nkv, row + Nq + Nkv, (size_t)Nkv * sizeof(float));
    }
    decode_attention(qkv, Nqkv, k_cache, v_cache, S, len, M, H, Hkv, D, scale, att, nt);
    r1_gemm(att, M, Nq, Nq, o_w, Hd, o_b, xn, Hd, nt);
    for (int64_t i = 0; i < M * Hd; i++) h[i] += xn[i];
    free(xn);
    free(qkv);
    free(att);
    free(len);
    r1_swiglu_block(h, M, Hd, ln2, eps, gu_w, down_w, I, nt);
    return 0;
}

/* Every block of a dense model, in order, for one new token per row: r1_dense_decode_layer for
 * layers 0..L-1 in one call, so a decode step crosses from Python into C once, not once per layer.
 * ptrs (L x 10): each layer's ln1, ln2, qkv_w, qkv_b, o_w, o_b, gu_w, down_w, k_cache, v_cache (as
 * r1_dense_decode_layer takes them; 0 for no bias). Every layer has the same shapes and eps. Returns
 * 0, or 1 (nothing written) when a slot lies outside its row: every layer's cache has S slots per
 * row, so layer 0's check is every layer's. */
int r1_dense_decode_stack(float *h, int64_t M, int64_t Hd, int64_t L, const int64_t *ptrs, float eps, int64_t I,
                          int64_t H, int64_t Hkv, int64_t D, const float *cos, const float *sin, int64_t S,
                          const int64_t *slots, int64_t kv_len, float scale, int nt) {
    for (int64_t l = 0; l < L; l++) {
        const int64_t *p = ptrs + l * 10;
        int bad = r1_dense_decode_layer(h, M, Hd, (const float *)p[0], (const float *)p[1], eps,
                                        (const float *)p[2], (const float *)p[3], (const float *)p[4],
                                        (const float *)p[5], (const float *)p[6], (const float *)p[7], I, H, Hkv,
                                        D, cos, sin, (float *)p[8], (float *)p[9], S, slots, kv_len, scale, nt);
        if (bad)
            return bad;
    }
    return 0;
}

/* The attention half of a DeepSeek block (Multi-head Latent Attention, absorbed), in place:
 *   h += o(mla(rms_norm(h) * ln))
 * as attention.MLAttention with a cache: q = q_b(rms_norm(q_a(x)) * q_ln) (or q(x) when q_b_w is
 * NULL), [c_kv | k_rope] = kv_a(x) with c_kv normed and k_rope rotated, both cached (C + R per slot);
 * each head's query against the latent is [W_uk^T q_nope | rope(q_rope)], its output W_uv (P latent).
 * fused_w: q_a|kv_a (or q|kv_a) packed, Nfq = q_a's (or q's) outputs. kvb: kv_b_proj's weight
 * (H*(nope+V) x C) stored transposed: element [r][c] at kvb[c * ldk + r]. Dims: see the caller. */
int r1_mla_decode_attention(float *h, int64_t M, int64_t Hd, const float *ln, float eps,
                            const float *fused_w, const float *fused_b, int64_t Nfq,
                            const float *q_ln, const float *q_b_w, const float *kv_ln,
                            const float *kvb, int64_t ldk, const float *o_w, const float *o_b,
                            int64_t H, int64_t NOPE, int64_t R, int64_t V, int64_t C, int interleave,
                            const float *cos, const float *sin, float *cache, int64_t S,
                            const int64_t *slots, int64_t kv_len, float scale, int nt) {
    int64_t QK = NOPE + R, Nf = Nfq + C + R, L = C + R, half = R / 2;
    int64_t *len = (int64_t *)malloc((size_t)M * sizeof(int64_t));
    if (row_lengths(slots, M, S, kv_len, len)) {
        free(len);
        return 1;
    }
    float *xn = falloc(M * (Hd > Nfq ? Hd : Nfq));
    float *f = falloc(M * Nf);
    float *q = falloc(M * H * QK);
    float *ql = falloc(M * H * L);   /* queries against the latent */
    float *ol = falloc(M * H * L);   /* outputs in the latent */
    float *ov = falloc(M * H * V);
    rms_norm_rows(h, M, Hd, ln, eps, xn);
    r1_gemm(xn, M, Hd, Hd, fused_w, Nf, fused_b, f, Nf, nt);
    const float *qsrc = f; /* q (no q_lora) or q_a, row stride Nf */
    int64_t ldq = Nf;
    if (q_b_w) {
        float *qa = xn; /* (M x Nfq): the normed q_a */
        for (int64_t m = 0; m < M; m++)
            rms_norm_rows(f + m * Nf, 1, Nfq, q_ln, eps, qa + m * Nfq);
        r1_gemm(qa, M, Nfq, Nfq, q_b_w, H * QK, NULL, q, H * QK, nt);
        qsrc = q;
        ldq = H * QK;
    }
    for (int64_t m = 0; m < M; m++) {
        const float *c = cos + m * half, *s = sin + m * half;
        const float *qr = qsrc + m * ldq;
        float *kv = f + m * Nf + Nfq;            /* c_kv | k_rope of this row's new token */
        float *slot = cache + slots[m] * L;
        rms_norm_rows(kv, 1, C, kv_ln, eps, slot);
        memcpy(slot + C, kv + C, (size_t)R * sizeof(float));
        rotate(slot + C, c, s, R, interleave);
        for (int64_t hh = 0; hh < H; hh++) {
            const float *qn = qr + hh * QK;        /* q_nope | q_rope of head hh */
            float *dst = ql + (m * H + hh) * L;
            /* W_uk^T q_nope: dst[c] = sum_d qn[d] * kvb[c * ldk + hh * (NOPE + V) + d] */
            const float *wk = kvb + hh * (NOPE + V);
            for (int64_t cc = 0; cc < C; cc++)
                dst[cc] = dot(qn, wk + cc * ldk, NOPE);
            memcpy(dst + C, qn + NOPE, (size_t)R * sizeof(float));
            rotate(dst + C, c, s, R, interleave);
        }
    }
    /* every head of a row attends over the same latent slots: one KV "head" of width C + R */
    decode_attention(ql, H * L, cache, cache, S, len, M, H, 1, L, scale, ol, nt);
    memset(ov, 0, (size_t)(M * H * V) * sizeof(float));
    for (int64_t m = 0; m < M; m++)
        for (int64_t hh = 0; hh < H; hh++) { /* W_uv (P latent): ov[v] += sum_c ol[c] * kvb[c * ldk + hh * (NOPE + V) + NOPE + v] */
            const float *o = ol + (m * H + hh) * L;
            float *dst = ov + (m * H + hh) * V;
            const float *wv = kvb + hh * (NOPE + V) + NOPE;
            for (int64_t cc = 0; cc < C; cc++) {
                __m256 oc = _mm256_set1_ps(o[cc]);
                const float *w = wv + cc * ldk;
                for (int64_t v = 0; v < V; v += 8)
                    _mm256_storeu_ps(dst + v, _mm256_fmadd_ps(oc, _mm256_loadu_ps(w + v), _mm256_loadu_ps(dst + v)));
            }
        }
    r1_gemm(ov, M, H * V, H * V, o_w, Hd, o_b, xn, Hd, nt);
    for (int64_t i = 0; i < M * Hd; i++) h[i] += xn[i];
    free(xn);
    free(f);
    free(q);
    free(ql);
    free(ol);
    free(ov);
    free(len);
    return 0;
}

/* The MoE half of a DeepSeek block for decoding, in place, routing done by the caller (torch):
 *   h += sum_j gates[m][j] * expert_{ids[m][j]}(xn[m]) + shared(xn[m])
 * xn (M x Hd): the normed input. Expert e's gate|up and down, packed by r1_pack, start at
 * gu_w + e * gu_stride and down_w + e * down_stride. Each expert runs once, on the rows routed to
 * it (gathered), and the pairs combine in torch's order (moe.Experts). sgu_w/sdown_w: the shared
 * experts' gate|up and down (NULL: none), Is their intermediate size. */
void r1_moe_block(float *h, const float *xn, int64_t M, int64_t Hd, const int64_t *ids, const float *gates,
                  int64_t k, const float *gu_w, int64_t gu_stride, const float *down_w, int64_t down_stride,
                  int64_t I, int64_t E, const float *sgu_w, const float *sdown_w, int64_t Is, int nt) {
    int64_t P = M * k, Iw = I > Is ? I : Is;
    float *ys = falloc(P * Hd), *xe = falloc(P * Hd), *ye = falloc((P > M ? P : M) * Hd);
    float *gu = falloc((P > M ? P : M) * 2 * Iw), *act = falloc((P > M ? P : M) * Iw);
    int64_t *pairs = (int64_t *)malloc((size_t)P * sizeof(int64_t));
    memset(ys, 0, (size_t)(P * Hd) * sizeof(float));
    for (int64_t e = 0; e < E; e++) {
        int64_t n = 0;
        for (int64_t p = 0; p < P; p++)
            if (ids[p] == e) pairs[n++] = p;
        if (!n) continue;
        for (int64_t j = 0; j < n; j++)
            memcpy(xe + j * Hd, xn + (pairs[j] / k) * Hd, (size_t)Hd * sizeof(float));
        r1_gemm(xe, n, Hd, Hd, gu_w + e * gu_stride, 2 * I, NULL, gu, 2 * I, nt);
        silu_mul_rows(gu, n, I, act);
        r1_gemm(act, n, I, I, down_w + e * down_stride, Hd, NULL, ye, Hd, nt);
        for (int64_t j = 0; j < n; j++)
            memcpy(ys + pairs[j] * Hd, ye + j * Hd, (size_t)Hd * sizeof(float));
    }
    float *y = xe; /* (M x Hd): the routed experts' weighted sum per token */
    for (int64_t m = 0; m < M; m++)
        for (int64_t d = 0; d < Hd; d++) {
            float acc = 0.0f;
            for (int64_t j = 0; j < k; j++)
                acc += gates[m * k + j] * ys[(m * k + j) * Hd + d];
            y[m * Hd + d] = acc;
        }
    if (sgu_w) {
        r1_gemm(xn, M, Hd, Hd, sgu_w, 2 * Is, NULL, gu, 2 * Is, nt);
        silu_mul_rows(gu, M, Is, act);
        r1_gemm(act, M, Is, Is, sdown_w, Hd, NULL, ye, Hd, nt);
        for (int64_t i = 0; i < M * Hd; i++) y[i] += ye[i];
    }
    for (int64_t i = 0; i < M * Hd; i++) h[i] += y[i];
    free(ys);
    free(xe);
    free(ye);
    free(gu);
    free(act);
    free(pairs);
}

/* DeepSeekMoE routing of M rows, as moe.Router: affinities s = sigmoid (or softmax) of xn @ W^T
 * (W: E x Hd, row-major); the choice adds the balancing bias (NULL: none); with n_group > 1 and
 * topk_group < n_group only the topk_group groups of highest score compete (a group's score: the
 * sum of its two best choices with the bias, its best without); the k experts of highest choice, in
 * descending order, as torch.topk returns them (ties to the lower index); gates = their affinities,
 * normalised to sum 1 if norm (and k > 1), times scaling. ids (M x k), gates (M x k). */
static void route(const float *xn, int64_t M, int64_t Hd, const float *W, const float *bias, int64_t E,
                  int64_t k, int64_t n_group, int64_t topk_group, int softmax, int norm, float scaling,
                  int64_t *ids, float *gates) {
    float *sc = falloc(E), *ch = falloc(E), gs[64];
    int64_t per = E / (n_group > 0 ? n_group : 1);
    for (int64_t m = 0; m < M; m++) {
        const float *x = xn + m * Hd;
        for (int64_t e = 0; e < E; e++)
            sc[e] = dot(x, W + e * Hd, Hd);
        if (softmax) {
            float mx = -INFINITY, tot = 0.0f;
            for (int64_t e = 0; e < E; e++) mx = sc[e] > mx ? sc[e] : mx;
            for (int64_t e = 0; e < E; e++) tot += (sc[e] = expf(sc[e] - mx));
            for (int64_t e = 0; e < E; e++) sc[e] /= tot;
        } else {
            for (int64_t e = 0; e < E; e++) sc[e] = 1.0f / (1.0f + expf(-sc[e]));
        }
        for (int64_t e = 0; e < E; e++) ch[e] = bias ? sc[e] + bias[e] : sc[e];
        if (n_group > 1 && topk_group < n_group) {
            for (int64_t g = 0; g < n_group; g++) {
                float b1 = -INFINITY, b2 = -INFINITY;
                for (int64_t e = g * per; e < (g + 1) * per; e++) {
                    if (ch[e] > b1) { b2 = b1; b1 = ch[e]; }
                    else if (ch[e] > b2) b2 = ch[e];
                }
                gs[g] = bias ? b1 + b2 : b1;
            }
            for (int64_t t = 0; t < n_group - topk_group; t++) { /* drop the weakest groups, one at a time */
                int64_t worst = -1;
                for (int64_t g = n_group - 1; g >= 0; g--) /* among equals, the highest index goes first */
                    if (gs[g] != INFINITY && (worst < 0 || gs[g] < gs[worst])) worst = g;
                gs[worst] = INFINITY; /* marked: dropped */
                for (int64_t e = worst * per; e < (worst + 1) * per; e++) ch[e] = -INFINITY;
            }
        }
        float tot = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++)
                if (ch[e] != INFINITY && (best < 0 || ch[e] > ch[best])) best = e;
            ids[m * k + j] = best;
            gates[m * k + j] = sc[best];
            tot += sc[best];
            ch[best] = INFINITY; /* taken */
        }
        for (int64_t j = 0; j < k; j++) {
            float g = gates[m * k + j];
            if (norm && k > 1) g = g / (tot + 1e-20f);
            gates[m * k + j] = g * scaling;
        }
    }
    free(sc);
    free(ch);
}

/* Every block of a DeepSeek model, in order, for one new token per row, in one call: each layer's
 * MLA half (r1_mla_decode_attention), then its dense MLP (r1_swiglu_block) or its MoE: the routing
 * above, then r1_moe_block. ptrs (L x 24) per layer:
 *   0 ln1, 1 fused_w, 2 fused_b, 3 q_ln, 4 q_b_w, 5 kv_ln, 6 kvb, 7 ldk, 8 o_w, 9 o_b, 10 cache, 11 ln2,
 *   12 moe (0: dense MLP), 13 gu_w, 14 down_w, 15 I, 16 gu_stride, 17 down_stride, 18 router_w,
 *   19 router_bias, 20 sgu_w, 21 sdown_w, 22 Is, 23 unused
 * (pointers as int64; 0 for none). dims: Nfq, H, NOPE, R, V, C, interleave, E, k, n_group, topk_group,
 * softmax, norm. Returns 0, or 1 (nothing written) when a slot lies outside its row. */
int r1_mla_decode_stack(float *h, int64_t M, int64_t Hd, int64_t L, const int64_t *ptrs, const int64_t *dims,
                        float eps, float scale, float scaling, const float *cos, const float *sin, int64_t S,
                        const int64_t *slots, int64_t kv_len, int nt) {
    int64_t Nfq = dims[0], H = dims[1], NOPE = dims[2], R = dims[3], V = dims[4], C = dims[5];
    int interleave = (int)dims[6];
    int64_t E = dims[7], k = dims[8], n_group = dims[9], topk_group = dims[10];
    int softmax = (int)dims[11], norm = (int)dims[12];
    float *xn = falloc(M * Hd), *gates = falloc(M * (k > 0 ? k : 1));
    int64_t *ids = (int64_t *)malloc((size_t)(M * (k > 0 ? k : 1)) * sizeof(int64_t));
    int bad = 0;
    for (int64_t l = 0; l < L && !bad; l++) {
        const int64_t *p = ptrs + l * 24;
#define F(i) ((const float *)p[i])
        bad = r1_mla_decode_attention(h, M, Hd, F(0), eps, F(1), F(2), Nfq, F(3), F(4), F(5), F(6), p[7], F(8),
                                      F(9), H, NOPE, R, V, C, interleave, cos, sin, (float *)p[10], S, slots,
                                      kv_len, scale, nt);
        if (bad)
            break;
        if (!p[12]) {
            r1_swiglu_block(h, M, Hd, F(11), eps, F(13), F(14), p[15], nt);
            continue;
        }
        rms_norm_rows(h, M, Hd, F(11), eps, xn);
        route(xn, M, Hd, F(18), F(19), E, k, n_group, topk_group, softmax, norm, scaling, ids, gates);
        r1_moe_block(h, xn, M, Hd, ids, gates, k, F(13), p[16], F(14), p[17], p[15], E, F(20), F(21), p[22], nt);
#undef F
    }
    free(xn);
    free(gates);
    free(ids);
    return bad;
}

/* ------------------------------------------------------------------------------------------------
 * One decode step of a whole model in one call (cpu_kernels.decode_step): the new tokens'
 * embeddings, their rotary cos/sin (rows of the model's table) and cache slots, every block
 * (r1_dense_decode_stack or r1_mla_decode_stack), the final norm, the output head in float32, and
 * optionally the next token of every row, drawn as engine.sample draws it.
 *
 * Why: a decode step's blocks stream the model's weights through the core's caches, and the Python
 * and torch code that ran around them (embedding, rotary rows, slots, norm, head, sampling: a dozen
 * small ops) then ran with cold caches, at two to four times its warm cost: 0.4 ms of a 1.5 ms step
 * of the 3M-parameter GRPO bench model at 32 rows, more than the head and sampling compute.
 * ------------------------------------------------------------------------------------------------ */

typedef struct { /* cpu_kernels._StepIO: the same fields in the same order */
    const int64_t *ids, *positions; /* M new tokens, and the slot (= rope position) of each */
    int64_t M;
    const float *embed; /* vocab x Hd, rows lde apart */
    int64_t lde, vocab;
    const float *rope; /* the rotary table: row p = cos (half) | sin (half), rows ldr apart */
    int64_t ldr, rope_rows, half;
    int64_t S;                     /* slots per cache row */
    float *h, *cos, *sin;          /* M x Hd, M x half, M x half: filled here, for the blocks */
    int64_t *slots;                /* M: row * S + position */
    const float *final_ln;         /* Hd */
    double eps;
    int64_t Hd;
    const float *head; /* the output head packed by r1_pack in float32 mode: N outputs */
    int64_t N;
    float *logits; /* M x N */
    int64_t sample; /* 0: logits only; 1: draw with temperature and u; 2: greedy (argmax) */
    double temperature;
    const float *u; /* M uniform numbers in [0, 1) */
    int64_t *tokens;
    float *logprobs;
} r1_step_io;

/* Fills h, cos, sin and slots. 2: a token id outside the vocabulary; 3: a position outside the
 * rotary table or a cache row (nothing else is written in either case). */
static int step_begin(const r1_step_io *io) {
    for (int64_t m = 0; m < io->M; m++) {
        if (io->ids[m] < 0 || io->ids[m] >= io->vocab)
            return 2;
        if (io->positions[m] < 0 || io->positions[m] >= io->rope_rows || io->positions[m] >= io->S)
            return 3;
    }
    for (int64_t m = 0; m < io->M; m++) {
        int64_t p = io->positions[m];
        memcpy(io->h + m * io->Hd, io->embed + io->ids[m] * io->lde, (size_t)io->Hd * sizeof(float));
        memcpy(io->cos + m * io->half, io->rope + p * io->ldr, (size_t)io->half * sizeof(float));
        memcpy(io->sin + m * io->half, io->rope + p * io->ldr + io->half, (size_t)io->half * sizeof(float));
        io->slots[m] = m * io->S + p;
    }
    return 0;
}

/* engine.sample for one row of logits, temperature only: the token of the first running sum of
 * exp(s - max) (s = logits / temperature) above u times their total (the inverse CDF, as _draw),
 * and its log_softmax(s); greedy: the first largest logit, and its log_softmax(logits). e: N floats. */
static void sample_row(const float *l, int64_t N, int greedy, float t, float u, float *e, int64_t *token,
                       float *logprob) {
    float mx = -INFINITY;
    int64_t arg = 0;
    for (int64_t v = 0; v < N; v++) {
        float s = greedy ? l[v] : l[v] / t;
        e[v] = s;
        if (s > mx) { /* strictly: the first of equal maxima, as torch's argmax */
            mx = s;
            arg = v;
        }
    }
    __m256 acc = _mm256_setzero_ps(), m8 = _mm256_set1_ps(mx);
    int64_t v = 0;
    for (; v + 8 <= N; v += 8) {
        __m256 x = exp8(_mm256_sub_ps(_mm256_loadu_ps(e + v), m8));
        _mm256_storeu_ps(e + v, x);
        acc = _mm256_add_ps(acc, x);
    }
    float sum = hsum(acc);
    for (; v < N; v++) {
        e[v] = expf(e[v] - mx);
        sum += e[v];
    }
    float lse = mx + logf(sum);
    if (!greedy) {
        float target = u * sum, run = 0.0f;
        int64_t last = arg; /* the last token of positive weight: where rounding leaves the sum short */
        arg = -1;
        for (v = 0; v < N; v++) {
            if (e[v] > 0.0f)
                last = v;
            run += e[v];
            if (run > target) {
                arg = v;
                break;
            }
        }
        if (arg < 0)
            arg = last;
    }
    *token = arg;
    *logprob = (greedy ? l[arg] : l[arg] / t) - lse;
}

/* The final norm, the head, and the draw if asked. */
static void step_end(const r1_step_io *io, int nt) {
    int64_t M = io->M, N = io->N;
    float *xn = falloc(M * io->Hd);
    rms_norm_rows(io->h, M, io->Hd, io->final_ln, (float)io->eps, xn);
    gemm_f32(xn, M, io->Hd, io->Hd, io->head, N, NULL, io->logits, N, nt);
    free(xn);
    if (!io->sample)
        return;
#pragma omp parallel num_threads(nt) if (nt > 1 && M * N >= (1 << 16))
    {
        float *e = falloc(N);
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++)
            sample_row(io->logits + m * N, N, io->sample == 2, (float)io->temperature, io->u ? io->u[m] : 0.0f, e,
                       io->tokens + m, io->logprobs + m);
        free(e);
    }
}

/* r1_dense_decode_stack between step_begin and step_end; its other arguments as it takes them.
 * Returns 0, or r1_dense_decode_stack's or step_begin's code (then no logits were written). */
int r1_dense_decode_step(const r1_step_io *io, int64_t L, const int64_t *ptrs, float eps, int64_t I, int64_t H,
                         int64_t Hkv, int64_t D, int64_t kv_len, float scale, int nt) {
    int bad = step_begin(io);
    if (!bad)
        bad = r1_dense_decode_stack(io->h, io->M, io->Hd, L, ptrs, eps, I, H, Hkv, D, io->cos, io->sin, io->S,
                                    io->slots, kv_len, scale, nt);
    if (!bad)
        step_end(io, nt);
    return bad;
}

/* The same around r1_mla_decode_stack. */
int r1_mla_decode_step(const r1_step_io *io, int64_t L, const int64_t *ptrs, const int64_t *dims, float eps,
                       float scale, float scaling, int64_t kv_len, int nt) {
    int bad = step_begin(io);
    if (!bad)
        bad = r1_mla_decode_stack(io->h, io->M, io->Hd, L, ptrs, dims, eps, scale, scaling, io->cos, io->sin, io->S,
                                  io->slots, kv_len, nt);
    if (!bad)
        step_end(io, nt);
    return bad;
}
