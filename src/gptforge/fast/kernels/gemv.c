/* Matrix products for gptforge: y (M, N) = x (M, K) @ W (N, K)^T + bias, for a few rows M (one
 * decode step of a batch of M sequences) or many (a prefill, LINEAR_ROWS at a time), float32 x
 * and y, W in one of four formats (gemv.h's gf_lin):
 *
 *   F32  W float32, (N, K) row-major: `w`; and, where the caller made it, `wp`, the same in panels;
 *        or no `w` and `wp` W^T as a Hugging Face Conv1D weight stores it: the first N columns of
 *        a (K, ld) row-major matrix (ld > 0), read in place (f32_cols_product)
 *   I8   W int8 with one float32 scale per row, W[n, k] = q[n, k] * scale[n]: q in panels
 *   Q4   W in 4-bit groups of 32 along a row, llama.cpp's Q4_0: W = (q - 8) * d, q in [0, 15],
 *        one float32 d per group: q and d in panels
 *   BF16 W bfloat16, in panels (float32's panels, half the bytes): x and the sums stay float32
 *
 * Panels: W's rows (the outputs) in runs of VL (one vector of outputs), each run stored along K
 * in the order the kernels read it (kernels/__init__.py's `pack` makes them; the last run is
 * padded with zeros):
 *   F32  panel p: for each k, VL floats W[p VL + c, k], c = 0..VL-1 (BF16: VL bfloat16s)
 *   I8   panel p: for each 4 k (k = 4 s + j), IB = 4 VL bytes, byte 4 c + j = q[p VL + c, 4 s + j]
 *   Q4   panel p: for each group g of 32 and each quarter t of it, IB bytes, byte 4 c + j holding
 *        q[p VL + c, 32 g + 8 t + j] (low nibble) and q[..., 32 g + 8 t + 4 + j] (high nibble);
 *        the scales: for each g, VL floats d[p VL + c, g]
 * So a vector of accumulators holds VL outputs, each x value is broadcast against VL weights at
 * once, and no sums across a vector are needed. At one row (batch 1) a product is memory-bound:
 * its time is that of streaming W once, with prefetching, so the tiles read several panels at
 * once; at 8 rows it is compute-bound, and a tile is one panel meeting 8 rows of x: 8 (AVX2: 4)
 * multiply-adds per weight loaded. float32 reads the row-major `w` unless given `wp`: at one row
 * at the same speed; at several, each few rows of W meet a block of rows of x (sums along k in
 * vectors, added across them at the end), 1.2-1.4x slower than the panels but without their
 * second copy of the weights, which only a batch's decode steps ask for.
 *
 * int8 and 4-bit: x is quantized as llama.cpp's Q8_0 (per block of 32 values d = max|x| / 127,
 * xq = round(x / d)) so that the inner products are integer ones: 4 byte products per int32 lane
 * per instruction (VNNI's vpdpbusd, else vpmaddubsw + vpmaddwd; 4-bit codes are small enough for
 * two vpmaddubsw to be added in 16 bits before one vpmaddwd: 8-row products 20% faster). A block's
 * sums are converted to float once and scaled by d (and, 4-bit, the group's weight scale).
 *
 * The threads (OpenMP, the same runtime as PyTorch's) split the panels among them.
 * gptforge/kernels/__init__.py compiles this file once per CPU with -march=native: the vectors
 * (simd.h) are AVX-512's where the CPU has it, else AVX2's. K must be a whole number of vectors
 * for F32 (VL floats) and of Q8_0 blocks (32) for I8 and Q4, and so must N for F32 read in place
 * (the caller checks).
 */
#include <stdlib.h>
#include <string.h>

#include "gemv.h"
#include "simd.h"

/* vpdpbusd multiplies unsigned by signed bytes. With VNNI, int8 weights are read as the unsigned
 * w + 128 (a bit flip), and each block's sum starts at -128 * (the sum of its x values). Without
 * VNNI (vpmaddubsw saturates at 16 bits, too small for that), |w| times x carrying w's sign.
 * 4-bit weights are the unsigned q, and a group's sum starts at -8 * (the sum of its x values). */
#ifdef VNNI
#define I8_OFFSET 128
#else
#define I8_OFFSET 0
#endif

/* Tiles. float32 at one row: SINGLE_ROWS rows of `w` at once (more streams from memory). Panels:
 * at one row PANELS panels at once; at more, one panel meets F32_XROWS or INT_XROWS rows of x at
 * a time (their accumulators, twice that for int8/4-bit, must fit in registers: AVX2 has half
 * AVX-512's). */
#define F32_XROWS 8
#if VL == 16
#define SINGLE_ROWS 8
#define INT_XROWS 8
#else
#define SINGLE_ROWS 4
#define INT_XROWS 4
#endif
#define PANELS 4
#define F32_CHUNK 64  /* float32 panels: k values summed apart before joining an output's sum */
#define PREFETCH 16384  /* bytes ahead of the weights being read, prefetched into L2 (more misses in flight than L1) */

static inline int64_t panel_count(int64_t n) { return (n + VL - 1) / VL; }

/* Calls BLOCK(mb) with mb = min(rows left, XROWS) as a compile-time constant */
#define FOR_EACH_XBLOCK(M, XROWS, BLOCK)                                      \
    for (int64_t m0 = 0; m0 < (M); m0 += XROWS) {                            \
        switch ((M) - m0 < XROWS ? (M) - m0 : XROWS) {                        \
        case 1: BLOCK(1); break;                                              \
        case 2: BLOCK(2); break;                                              \
        case 3: BLOCK(3); break;                                              \
        case 4: BLOCK(4); break;                                              \
        case 5: if (XROWS >= 5) BLOCK(5); break;                              \
        case 6: if (XROWS >= 6) BLOCK(6); break;                              \
        case 7: if (XROWS >= 7) BLOCK(7); break;                              \
        default: if (XROWS >= 8) BLOCK(8); break;                             \
        }                                                                     \
    }

/* Runs TILE(MB, NP, p0) over all panels of an N-output product, split among the threads: at one
 * row, PANELS panels per tile; else one panel per tile, XROWS rows of x at a time. */
#define FOR_EACH_TILE(M, N, XROWS, TILE)                                                                 \
    do {                                                                                          \
        const int64_t P = panel_count(N), np = (M) == 1 ? PANELS : 1, tiles = P / np;            \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                         \
        for (int64_t t = 0; t < tiles; t++) {                                                     \
            if ((M) == 1) {                                                                       \
                const int64_t m0 = 0;                                                             \
                TILE(1, PANELS, t * PANELS);                                                      \
            } else {                                                                              \
                FOR_EACH_XBLOCK(M, XROWS, ONE_PANEL)                                                     \
            }                                                                                     \
        }                                                                                         \
        for (int64_t p = tiles * np; p < P; p++)                                                  \
            for (int64_t m = 0; m < (M); m++) TILE_ROW(m, p);                                     \
    } while (0)

/* Row m of y, outputs [n0, n0 + VL) (those < N): acc * scale (if any) + bias (if any) */
static inline void store_outputs(vec acc, float *y, int64_t n0, int64_t N, const float *scale,
                                 const float *bias) {
    if (n0 + VL <= N) {
        if (scale) acc = acc * vload(scale + n0);
        if (bias) acc = acc + vload(bias + n0);
        vstore(y + n0, acc);
    } else {
        float t[VL];
        vstore(t, acc);
        for (int64_t c = 0; n0 + c < N; c++) y[n0 + c] = t[c] * (scale ? scale[n0 + c] : 1.f) + (bias ? bias[n0 + c] : 0.f);
    }
}

/* ----------------------------------------------------------------------- float32, one row */

/* Rows [n0, n0 + R) of the row-major W against one row of x (R a compile-time constant) */
static inline __attribute__((always_inline)) void f32_rows(
        const int R, const float *x, int64_t K, const float *W, const float *bias, float *y, int64_t n0) {
    vec acc[SINGLE_ROWS];
    for (int r = 0; r < R; r++) acc[r] = vzero();
    for (int64_t k = 0; k < K; k += VL) {
        const vec xv = vload(x + k);
        for (int r = 0; r < R; r++) {
            const float *p = W + (n0 + r) * K + k;
            __builtin_prefetch(p + PREFETCH / 4, 0, 2);
            acc[r] = vfma(vload(p), xv, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) y[n0 + r] = vsum(acc[r]) + (bias ? bias[n0 + r] : 0.f);
}

static void f32_row_product(const float *x, int64_t K, const float *W, int64_t N, const float *bias,
                            float *y, int threads) {
    const int64_t tiles = N / SINGLE_ROWS;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) f32_rows(SINGLE_ROWS, x, K, W, bias, y, t * SINGLE_ROWS);
    for (int64_t n = tiles * SINGLE_ROWS; n < N; n++) f32_rows(1, x, K, W, bias, y, n);
}

/* ------------------------------------------------------------- float32, several rows, row-major */

/* Rows [n0, n0 + R) of the row-major W against rows [m0, m0 + MB) of x (compile-time MB and R):
 * each R rows of W are read once for MB rows of x, their sums kept along k in vectors */
#if VL == 16
#define NT_XROWS 8
#else
#define NT_XROWS 4
#endif
#define NT_ROWS 3
static inline __attribute__((always_inline)) void f32_rows_x(
        const int MB, const int R, const float *x, int64_t m0, int64_t K, const float *W, const float *bias,
        float *y, int64_t N, int64_t n0) {
    vec acc[NT_XROWS][NT_ROWS];
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) acc[m][r] = vzero();
    for (int64_t k = 0; k < K; k += VL) {
        vec w[NT_ROWS];
        for (int r = 0; r < R; r++) {
            const float *p = W + (n0 + r) * K + k;
            __builtin_prefetch(p + PREFETCH / 4, 0, 2);
            w[r] = vload(p);
        }
        for (int m = 0; m < MB; m++) {
            const vec xv = vload(x + (m0 + m) * K + k);
            for (int r = 0; r < R; r++) acc[m][r] = vfma(w[r], xv, acc[m][r]);
        }
    }
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) y[(m0 + m) * N + n0 + r] = vsum(acc[m][r]) + (bias ? bias[n0 + r] : 0.f);
}

static void f32_rows_product(const float *x, int64_t M, int64_t K, const float *W, int64_t N, const float *bias,
                             float *y, int threads) {
    const int64_t tiles = N / NT_ROWS;
#define NT_BLOCK(mb) f32_rows_x(mb, NT_ROWS, x, m0, K, W, bias, y, N, n0)
#define NT_LAST(mb) f32_rows_x(mb, 1, x, m0, K, W, bias, y, N, n0)
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n0 = t * NT_ROWS;
        FOR_EACH_XBLOCK(M, NT_XROWS, NT_BLOCK)
    }
    for (int64_t n0 = tiles * NT_ROWS; n0 < N; n0++) {
        FOR_EACH_XBLOCK(M, NT_XROWS, NT_LAST)
    }
#undef NT_BLOCK
#undef NT_LAST
}

/* ------------------------------------------------------ float32, W^T in place (ld > 0, no `w`) */

#define COLS_ROWS 8  /* rows of x at a time */
#define COLS_CHUNK 32  /* rows of Wt summed apart before joining the sums (float32 digits; L2) */
#define COLS_BLOCK 256  /* columns of Wt at a time, at several rows of x */

/* out (M, N) += x[:, k0:k1] @ Wt[k0:k1, :N] (M <= COLS_ROWS, k1 - k0 a multiple of 4): each 4 rows
 * of Wt read once, COLS_BLOCK columns at a time, which stay in L1 for every row of x */
static inline void f32_cols_rows(const float *x, int64_t M, int64_t K, const float *Wt, int64_t ld, int64_t N,
                                 int64_t k0, int64_t k1, float *out) {
    for (int64_t k = k0; k < k1; k += 4) {
        const float *w0 = Wt + k * ld, *w1 = w0 + ld, *w2 = w1 + ld, *w3 = w2 + ld;
        for (int64_t j0 = 0; j0 < N; j0 += COLS_BLOCK) {
            const int64_t j1 = j0 + COLS_BLOCK < N ? j0 + COLS_BLOCK : N;
            for (int64_t m = 0; m < M; m++) {
                const float *xm = x + m * K + k;
                const vec x0 = vset1(xm[0]), x1 = vset1(xm[1]), x2 = vset1(xm[2]), x3 = vset1(xm[3]);
                float *o = out + m * N;
                for (int64_t j = j0; j < j1; j += VL) {
                    if (m == 0) {  /* the next 4 rows */
                        __builtin_prefetch(w0 + j + 4 * ld, 0, 2);
                        __builtin_prefetch(w1 + j + 4 * ld, 0, 2);
                        __builtin_prefetch(w2 + j + 4 * ld, 0, 2);
                        __builtin_prefetch(w3 + j + 4 * ld, 0, 2);
                    }
                    vec acc = vload(o + j);
                    acc = vfma(vload(w0 + j), x0, acc);
                    acc = vfma(vload(w1 + j), x1, acc);
                    acc = vfma(vload(w2 + j), x2, acc);
                    acc = vfma(vload(w3 + j), x3, acc);
                    vstore(o + j, acc);
                }
            }
        }
    }
}

/* y (M, N) = x (M, K) @ Wt[:, :N] + bias for Wt (K, ld) row-major: the threads split K, each
 * streaming its rows of Wt from start to end (one sequential read, as the row-major kernel's),
 * and add x's values times them into partial sums, COLS_CHUNK rows of Wt at a time (a long run
 * of float32 additions into one sum loses digits), which are then added up. (Reading the (K, ld)
 * matrix as panels, a few columns at a time, is a strided read that the prefetchers follow
 * badly: 2.3x slower at one row.) K is a whole number of vectors, so every part's rows are a
 * multiple of 4. */
static void f32_cols_product(const float *x, int64_t M, int64_t K, const float *Wt, int64_t ld, int64_t N,
                             const float *bias, float *y, int threads) {
    const int64_t parts = threads > 1 ? threads : 1, size = M * N;
    /* each part's sum (the first's in y) and its chunk's */
    float *extra = malloc((2 * parts - 1) * size * sizeof(float));
    if (!extra) {
        gf_fail();
        return;
    }
    const int64_t step = (K / parts + 3) / 4 * 4;  /* each part's rows of Wt, a multiple of 4 */
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < parts; t++) {
        float *out = t == 0 ? y : extra + (t - 1) * size, *chunk = extra + (parts - 1 + t) * size;
        memset(out, 0, size * sizeof(float));
        const int64_t k0 = t * step < K ? t * step : K, k1 = (t + 1) * step < K ? (t + 1) * step : K;
        for (int64_t c = k0; c < k1; c += COLS_CHUNK) {
            memset(chunk, 0, size * sizeof(float));
            for (int64_t m0 = 0; m0 < M; m0 += COLS_ROWS)  /* the chunk's rows of Wt stay in L2 meanwhile */
                f32_cols_rows(x + m0 * K, M - m0 < COLS_ROWS ? M - m0 : COLS_ROWS, K, Wt, ld, N, c,
                              c + COLS_CHUNK < k1 ? c + COLS_CHUNK : k1, chunk + m0 * N);
            for (int64_t i = 0; i < size; i += VL) vstore(out + i, vload(out + i) + vload(chunk + i));
        }
    }
    const int64_t vectors = size / VL;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < vectors; i++) {
        vec acc = vload(y + i * VL);
        for (int64_t t = 1; t < parts; t++) acc = acc + vload(extra + (t - 1) * size + i * VL);
        if (bias) acc = acc + vload(bias + i * VL % N);
        vstore(y + i * VL, acc);
    }
    free(extra);
}

/* ------------------------------------------------------------------------ float32, panels */

/* x (M, K) with its rows in blocks of XROWS (the last: those left), each block's rows interleaved:
 * x[m0 + m, k] at m0 K + k MB + m (MB the block's rows), so that a tile of several rows reads x as
 * one sequential stream, not MB of them (at 8 rows 5-15% faster). NULL where memory ran out. */
static float *interleave_rows(const float *x, int64_t M, int64_t K, int64_t XROWS) {
    float *out = malloc(M * K * sizeof(float));
    if (!out) {
        gf_fail();
        return NULL;
    }
    for (int64_t m0 = 0; m0 < M; m0 += XROWS) {
        const int64_t mb = M - m0 < XROWS ? M - m0 : XROWS;
        for (int64_t m = 0; m < mb; m++)
            for (int64_t k = 0; k < K; k++) out[m0 * K + k * mb + m] = x[(m0 + m) * K + k];
    }
    return out;
}

/* Panels [p0, p0 + NP) against rows [m0, m0 + MB) of x, x interleaved as interleave_rows lays it
 * out in blocks of MB rows (the same as x itself where MB = 1) (compile-time MB and NP, so the
 * accumulators stay in registers); the weights float32, or bfloat16 where `bf16` (a compile-time
 * constant too: each weight widened to float32 as it is loaded). */
static inline __attribute__((always_inline)) void f32_panels(
        const int bf16, const int MB, const int NP, const float *x, int64_t m0, int64_t K, const void *Wp, int64_t N,
        const float *bias, float *y, int64_t p0) {
    const int64_t size = bf16 ? 2 : 4;
    vec acc[F32_XROWS][PANELS];  /* each output's sum, added to once per CHUNK values of k: a long */
    for (int m = 0; m < MB; m++)  /* run of float32 additions into one sum loses digits */
        for (int p = 0; p < NP; p++) acc[m][p] = vzero();
    for (int64_t k0 = 0; k0 < K; k0 += F32_CHUNK) {
        vec part[F32_XROWS][PANELS];
        for (int m = 0; m < MB; m++)
            for (int p = 0; p < NP; p++) part[m][p] = vzero();
        for (int64_t k = k0; k < k0 + F32_CHUNK && k < K; k++) {
            vec w[PANELS];
            for (int p = 0; p < NP; p++) {
                const char *ptr = (const char *)Wp + ((p0 + p) * K + k) * VL * size;
                __builtin_prefetch(ptr + PREFETCH, 0, 2);
                w[p] = bf16 ? vload_bf16((const uint16_t *)ptr) : vload((const float *)ptr);
            }
            for (int m = 0; m < MB; m++) {
                const vec xv = vset1(x[m0 * K + k * MB + m]);
                for (int p = 0; p < NP; p++) part[m][p] = vfma(w[p], xv, part[m][p]);
            }
        }
        for (int m = 0; m < MB; m++)
            for (int p = 0; p < NP; p++) acc[m][p] = acc[m][p] + part[m][p];
    }
    for (int m = 0; m < MB; m++)
        for (int p = 0; p < NP; p++) store_outputs(acc[m][p], y + (m0 + m) * N, (p0 + p) * VL, N, NULL, bias);
}

static void f32_linear(const gf_lin *L, const float *x, int64_t M, float *y, int threads) {
    const int64_t K = L->k, N = L->n;
    const float *Wp = L->wp;
    if (M == 1 && L->w) {  /* the row-major weights */
        f32_row_product(x, K, L->w, N, L->bias, y, threads);
        return;
    }
    if (!Wp) {
        f32_rows_product(x, M, K, L->w, N, L->bias, y, threads);
        return;
    }
    if (L->ld) {
        f32_cols_product(x, M, K, Wp, L->ld, N, L->bias, y, threads);
        return;
    }
    float *xt = M == 1 ? (float *)x : interleave_rows(x, M, K, F32_XROWS);
    if (!xt) return;
#define TILE(MB, NP, p0) f32_panels(0, MB, NP, xt, m0, K, Wp, N, L->bias, y, p0)
#define ONE_PANEL(mb) TILE(mb, 1, t)
#define TILE_ROW(m, p) f32_panels(0, 1, 1, x, m, K, Wp, N, L->bias, y, p)
    FOR_EACH_TILE(M, N, F32_XROWS, TILE);
    if (xt != x) free(xt);
#undef TILE
#undef ONE_PANEL
#undef TILE_ROW
}

/* bfloat16 panels, at one row as at several: the float32 panels' tiles, half the bytes to stream */
static void bf16_linear(const gf_lin *L, const float *x, int64_t M, float *y, int threads) {
    const int64_t K = L->k, N = L->n;
    const void *Wp = L->w;
    float *xt = M == 1 ? (float *)x : interleave_rows(x, M, K, F32_XROWS);
    if (!xt) return;
#define TILE(MB, NP, p0) f32_panels(1, MB, NP, xt, m0, K, Wp, N, L->bias, y, p0)
#define ONE_PANEL(mb) TILE(mb, 1, t)
#define TILE_ROW(m, p) f32_panels(1, 1, 1, x, m, K, Wp, N, L->bias, y, p)
    FOR_EACH_TILE(M, N, F32_XROWS, TILE);
    if (xt != x) free(xt);
#undef TILE
#undef ONE_PANEL
#undef TILE_ROW
}

/* ------------------------------------------------------------------------- int8 and 4-bit */

/* x (M, K) quantized as Q8_0, the M rows interleaved (so that a tile reaches every row's values
 * through one pointer): xq, for each 4 values of k (k = 4 g + j), M rows of 4 bytes, byte
 * 4 (g M + m) + j the quantized x[m, k]; for each block b of 32 values and each row m, at b M + m,
 * its scale xd and the sum's starting value xs = -offset * (the sum of its 32 xq) (see I8_OFFSET). */
typedef struct { int8_t *xq; float *xd; int32_t *xs; int64_t M; } qrows;

static qrows quantize_rows(const float *x, int64_t M, int64_t K, int offset, int threads) {
    const int64_t blocks = M * K / 32;
    qrows q = {malloc(M * K), malloc(blocks * sizeof(float)), malloc(blocks * sizeof(int32_t)), M};
    if (!q.xq || !q.xd || !q.xs) {
        free(q.xq); free(q.xd); free(q.xs);
        q.xq = NULL;
        gf_fail();
        return q;
    }
    #pragma omp parallel for num_threads(threads) schedule(static) if (blocks >= 256)
    for (int64_t i = 0; i < blocks; i++) {
        const int64_t b = i / M, m = i % M;  /* in xq's order: the threads write apart */
        int8_t bytes[32];
        int32_t sum;
        q.xd[b * M + m] = q8_0_block(x + m * K + 32 * b, bytes, &sum);
        for (int g = 0; g < 8; g++) memcpy(q.xq + 4 * ((8 * b + g) * M + m), bytes + 4 * g, 4);
        q.xs[b * M + m] = -offset * sum;
    }
    return q;
}

static inline ivec ibroadcast4(const int8_t *p) {  /* 4 bytes into every int32 lane */
    int32_t v;
    memcpy(&v, p, 4);
    return iset1_32(v);
}

/* Panels [p0, p0 + NP) against quantized rows [m0, m0 + MB) of x (compile-time MB and NP) */
static inline __attribute__((always_inline)) void int_panels(
        enum format fmt, const int MB, const int NP, qrows q, int64_t m0, int64_t K, const void *W,
        const float *scale, int64_t N, const float *bias, float *y, int64_t p0) {
    vec acc[INT_XROWS][PANELS];
    for (int m = 0; m < MB; m++)
        for (int p = 0; p < NP; p++) acc[m][p] = vzero();
    for (int64_t b = 0; b < K / 32; b++) {  /* block of 32 values of x (4-bit: a weight group) */
        ivec sum[INT_XROWS][PANELS];
        for (int m = 0; m < MB; m++)
            for (int p = 0; p < NP; p++) sum[m][p] = iset1_32(q.xs[b * q.M + m0 + m]);
        for (int t = 0; t < (fmt == I8 ? 8 : 4); t++) {  /* int8: 4 values a step; 4-bit: 8 */
            ivec u[PANELS], s[PANELS];  /* int8: w unsigned and w; 4-bit: low and high nibbles */
            for (int p = 0; p < NP; p++) {
                const int8_t *ptr = (const int8_t *)W + (p0 + p) * VL * K / (fmt == I8 ? 1 : 2) + (b * (fmt == I8 ? 8 : 4) + t) * IB;
                __builtin_prefetch(ptr + PREFETCH, 0, 2);
                const ivec w = iload(ptr);
                if (fmt == I8) {
                    u[p] = I8_OFFSET ? ixor(w, iset1_8((char)0x80)) : iabs8(w);
                    s[p] = w;
                } else {
                    u[p] = iand(w, iset1_8(15));
                    s[p] = iand(ishift4(w), iset1_8(15));
                }
            }
            for (int m = 0; m < MB; m++) {
                const int64_t g = 8 * b + (fmt == I8 ? 1 : 2) * t;  /* x's values 4 g .. 4 g + 3 */
                const ivec x1 = ibroadcast4(q.xq + 4 * (g * q.M + m0 + m));
                if (fmt == I8) {
                    for (int p = 0; p < NP; p++) sum[m][p] = idot(sum[m][p], u[p], I8_OFFSET ? x1 : isign8(x1, s[p]));
                } else {
                    const ivec x2 = ibroadcast4(q.xq + 4 * ((g + 1) * q.M + m0 + m));
                    for (int p = 0; p < NP; p++) sum[m][p] = idot2_small(sum[m][p], u[p], x1, s[p], x2);
                }
            }
        }
        for (int p = 0; p < NP; p++) {
            if (fmt == Q4)  /* the scales' own stream, as far ahead in time as the codes' (a quarter of the bytes) */
                __builtin_prefetch(scale + ((p0 + p) * (K / 32) + b) * VL + PREFETCH / 16, 0, 2);
            const vec dw = fmt == I8 ? vset1(1.f) : vload(scale + ((p0 + p) * (K / 32) + b) * VL);
            for (int m = 0; m < MB; m++) {
                vec d = vset1(q.xd[b * q.M + m0 + m]);
                if (fmt == Q4) d = d * dw;  /* int8's per-row scale is applied once, at the end */
                acc[m][p] = vfma(icvt(sum[m][p]), d, acc[m][p]);
            }
        }
    }
    for (int m = 0; m < MB; m++)
        for (int p = 0; p < NP; p++)
            store_outputs(acc[m][p], y + (m0 + m) * N, (p0 + p) * VL, N, fmt == I8 ? scale : NULL, bias);
}

/* FMT a literal (I8 or Q4), not a variable: OpenMP moves the loop into a function of its own, and
 * the format must stay a compile-time constant inside it for the tiles to be specialized. */
#define INT_LINEAR(FMT)                                                                           \
    const int64_t K = L->k, N = L->n;                                                             \
    const qrows q = quantize_rows(x, M, K, FMT == I8 ? I8_OFFSET : 8, threads);                            \
    if (!q.xq) return;                                                                            \
    FOR_EACH_TILE(M, N, INT_XROWS, INT_TILE_##FMT);                                                          \
    free(q.xq); free(q.xd); free(q.xs);
#define INT_TILE_I8(MB, NP, p0) int_panels(I8, MB, NP, q, m0, K, L->w, L->scale, N, L->bias, y, p0)
#define INT_TILE_Q4(MB, NP, p0) int_panels(Q4, MB, NP, q, m0, K, L->w, L->scale, N, L->bias, y, p0)

static void i8_linear(const gf_lin *L, const float *x, int64_t M, float *y, int threads) {
#define ONE_PANEL(mb) INT_TILE_I8(mb, 1, t)
#define TILE_ROW(m, p) int_panels(I8, 1, 1, q, m, K, L->w, L->scale, N, L->bias, y, p)
    INT_LINEAR(I8)
#undef ONE_PANEL
#undef TILE_ROW
}

static void q4_linear(const gf_lin *L, const float *x, int64_t M, float *y, int threads) {
#define ONE_PANEL(mb) INT_TILE_Q4(mb, 1, t)
#define TILE_ROW(m, p) int_panels(Q4, 1, 1, q, m, K, L->w, L->scale, N, L->bias, y, p)
    INT_LINEAR(Q4)
#undef ONE_PANEL
#undef TILE_ROW
}

/* Rows at a time in a product of many (a prefill): their quantized values (64 x 3072 bytes at
 * the most for GPT-2 124M) stay in L2 while every panel of weights passes them. */
#define LINEAR_ROWS 64

void gf_linear(const gf_lin *L, const float *x, int64_t M, float *y, int threads) {
    for (int64_t m0 = 0; m0 < M; m0 += LINEAR_ROWS) {
        const int64_t rows = M - m0 < LINEAR_ROWS ? M - m0 : LINEAR_ROWS;
        const float *xm = x + m0 * L->k;
        float *ym = y + m0 * L->n;
        if (L->fmt == F32)
            f32_linear(L, xm, rows, ym, threads);
        else if (L->fmt == I8)
            i8_linear(L, xm, rows, ym, threads);
        else if (L->fmt == BF16)
            bf16_linear(L, xm, rows, ym, threads);
        else
            q4_linear(L, xm, rows, ym, threads);
    }
}

static int failed;  /* set by any thread, read and cleared by the caller's thread after a call */

void gf_fail(void) { __atomic_store_n(&failed, 1, __ATOMIC_RELAXED); }

int gf_failed(void) { return __atomic_exchange_n(&failed, 0, __ATOMIC_RELAXED); }

/* Whether the kernels were built with OpenMP (else every loop runs on the calling thread). */
int gf_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* The vector width compiled for, in bits (512 or 256), and whether the integer products are VNNI's. */
int gf_vector_bits(void) { return VL * 32; }
#ifdef VNNI
int gf_vnni(void) { return 1; }
#else
int gf_vnni(void) { return 0; }
#endif

/* ------------------------------------------------------------------------------- dequantize */

static inline uint16_t to_bf16(float f) {  /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t b;
    memcpy(&b, &f, 4);
    return (uint16_t)((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
}

/* The weights of L (int8, 4-bit or bfloat16, in panels) as floats: out (n, k_out) float32, or
 * bfloat16 where `bf16` (k_out <= L->k drops padding columns). What a prefill multiplies with. */
void gf_dequantize(const gf_lin *L, int64_t k_out, void *out, int bf16, int threads) {
    const int64_t K = L->k, N = L->n;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < panel_count(N); p++) {
        if (L->fmt == BF16 && bf16) {  /* the same bits, out of the panel's order */
            const uint16_t *q = (const uint16_t *)L->w + p * VL * K;
            for (int64_t c = 0; c < VL && p * VL + c < N; c++)
                for (int64_t i = 0; i < k_out; i++) ((uint16_t *)out)[(p * VL + c) * k_out + i] = q[i * VL + c];
            continue;
        }
        float *rows = malloc(sizeof(float) * VL * K);  /* the panel's VL rows of W */
        if (!rows) {
            gf_fail();
            continue;
        }
        if (L->fmt == BF16) {
            const uint16_t *q = (const uint16_t *)L->w + p * VL * K;
            for (int64_t k = 0; k < K; k++)
                for (int c = 0; c < VL; c++) {
                    const uint32_t bits = (uint32_t)q[k * VL + c] << 16;
                    memcpy(rows + c * K + k, &bits, 4);
                }
        } else if (L->fmt == I8) {
            const int8_t *q = (const int8_t *)L->w + p * VL * K;
            for (int64_t s = 0; s < K / 4; s++)
                for (int c = 0; c < VL; c++)
                    for (int j = 0; j < 4; j++) rows[c * K + 4 * s + j] = q[s * IB + 4 * c + j];
        } else {
            const uint8_t *q = (const uint8_t *)L->w + p * VL * K / 2;
            const float *d = L->scale + p * VL * (K / 32);
            for (int64_t g = 0; g < K / 32; g++)
                for (int t = 0; t < 4; t++)
                    for (int c = 0; c < VL; c++)
                        for (int j = 0; j < 4; j++) {
                            const uint8_t byte = q[(4 * g + t) * IB + 4 * c + j];
                            float *r = rows + c * K + 32 * g + 8 * t + j;
                            r[0] = ((byte & 15) - 8) * d[g * VL + c];
                            r[4] = ((byte >> 4) - 8) * d[g * VL + c];
                        }
        }
        for (int64_t c = 0; c < VL && p * VL + c < N; c++) {
            const int64_t n = p * VL + c;
            const float sc = L->fmt == I8 ? L->scale[n] : 1.f;
            if (bf16)
                for (int64_t i = 0; i < k_out; i++) ((uint16_t *)out)[n * k_out + i] = to_bf16(rows[c * K + i] * sc);
            else
                for (int64_t i = 0; i < k_out; i++) ((float *)out)[n * k_out + i] = rows[c * K + i] * sc;
        }
        free(rows);
    }
}

/* --------------------------------------------------------------------------------- quantize */

/* v * inverse + 8.5 as PyTorch computes it, two roundings: kept from becoming one fused
 * multiply-add (GCC contracts them at -O3 where the CPU has FMA), which could move a code by one */
static inline float times_plus(float v, float inverse, float plus) {
    float product = v * inverse;
    __asm__("" : "+x"(product));
    return product + plus;
}

/* W (n, k) float32 (W[n, i] at W + n * rs + i * cs: row-major, or a transposed view, whose
 * panels of VL rows still read whole cache lines) quantized as quant.py's PyTorch quantizers do
 * it (the same bytes), its inputs zero-padded to k_padded, straight into the panels `kernels.pack`
 * lays out: I8 per row
 * scale = max(max |w|, 1e-12) / 127 (scale (n,)), q = round-to-even(w / scale); Q4 per group of 32
 * d = (its first value of largest magnitude) / -8 (scale in panels), q = floor(w / d + 8.5) in
 * [0, 15], rows past n the code 8 (0) with d = 0; BF16 each w rounded to bfloat16 (to nearest even,
 * as torch's .to(bfloat16)), rows past n zero (scale unused). What made an int8 or 4-bit model
 * took ~1.2 s of PyTorch operators for GPT-2 124M. */
void gf_quantize(int64_t fmt, const float *W, int64_t rs, int64_t cs, int64_t N, int64_t k, int64_t K, void *out,
                 float *scale, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < panel_count(N); p++) {
        float *rows = malloc(sizeof(float) * VL * K);  /* the panel's rows, zero-padded */
        if (!rows) {
            gf_fail();
            continue;
        }
        const int64_t n0 = p * VL, live = N - n0 < VL ? N - n0 : VL;
        for (int64_t i = 0; i < VL * K; i++) rows[i] = 0.f;
        if (cs <= rs)  /* along each row, or (a transposed view) across the rows: the order of memory */
            for (int64_t c = 0; c < live; c++)
                for (int64_t i = 0; i < k; i++) rows[c * K + i] = W[(n0 + c) * rs + i * cs];
        else
            for (int64_t i = 0; i < k; i++)
                for (int64_t c = 0; c < live; c++) rows[c * K + i] = W[(n0 + c) * rs + i * cs];
        if (fmt == BF16) {
            uint16_t *q = (uint16_t *)out + p * VL * K;
            for (int64_t i = 0; i < K; i++)
                for (int c = 0; c < VL; c++) q[i * VL + c] = to_bf16(rows[c * K + i]);
            free(rows);
            continue;
        }
        for (int c = 0; c < VL; c++) {
            const int64_t n = n0 + c;
            const float *row = rows + c * K;
            if (fmt == I8) {
                int8_t *q = (int8_t *)out + p * VL * K;
                float top = 0.f;
                for (int64_t i = 0; i < K; i++) top = fabsf(row[i]) > top ? fabsf(row[i]) : top;
                const float s = (top > 1e-12f ? top : 1e-12f) / 127.f;
                if (n < N) scale[n] = s;
                for (int64_t i = 0; i < K; i++) {
                    const float r = n < N ? rintf(row[i] / s) : 0.f;
                    q[(i / 4) * IB + 4 * c + i % 4] = (int8_t)(r > 127.f ? 127.f : r < -127.f ? -127.f : r);
                }
                continue;
            }
            uint8_t *q = (uint8_t *)out + p * VL * K / 2;
            for (int64_t g = 0; g < K / 32; g++) {
                const float *v = row + 32 * g;
                float top = 0.f, most = 0.f;  /* the first value of largest magnitude */
                for (int j = 0; j < 32; j++)
                    if (fabsf(v[j]) > top) top = fabsf(v[j]), most = v[j];
                const float d = n < N ? most / -8.f : 0.f, inverse = d == 0.f ? 0.f : 1.f / d;
                scale[(p * (K / 32) + g) * VL + c] = d;
                uint8_t codes[32];
                for (int j = 0; j < 32; j++) {
                    const float r = n < N ? floorf(times_plus(v[j], inverse, 8.5f)) : 8.f;
                    codes[j] = (uint8_t)(r > 15.f ? 15.f : r < 0.f ? 0.f : r);
                }
                for (int t = 0; t < 4; t++)
                    for (int j = 0; j < 4; j++) q[(4 * g + t) * IB + 4 * c + j] = codes[8 * t + j] | codes[8 * t + 4 + j] << 4;
            }
        }
        free(rows);
    }
}
