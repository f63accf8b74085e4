/* Decode-step matrix products for gptforge: y (M, N) = x (M, K) @ W (N, K)^T + bias, for a few
 * rows M (one decode step of a batch of M sequences), float32 x and y, W row-major (N, K) in one
 * of three formats (gemv.h's gf_lin):
 *
 *   F32  W float32
 *   I8   W int8 with one float32 scale per row: W[n, k] = q[n, k] * scale[n]
 *   Q4   W in 4-bit groups of 32 along a row, llama.cpp's Q4_0 layout: 16 bytes per group, byte j
 *        holding q of weight j (low nibble) and of weight j + 16 (high nibble), one float32
 *        scale d per group (scale[n, k / 32]): W = (q - 8) * d
 *
 * At a few rows the product is memory-bound: the time is that of streaming W from memory once.
 * So every kernel reads each weight once per call whatever M is (a tile of ROWS rows of W, held in
 * registers, meets every row of x), prefetches ahead of what it reads, and splits the rows of W
 * among `threads` OpenMP threads (the same OpenMP runtime as PyTorch's, which is already loaded).
 *
 * The int8 and 4-bit kernels quantize x as llama.cpp does (its Q8_0: per block of 32 values,
 * d = max|x| / 127, xq = round(x / d)) so that the inner products are integer ones: IB byte
 * products per instruction (VNNI's vpdpbusd, or vpmaddubsw + vpmaddwd) instead of converting each
 * weight to float. Lane l of an int32 vector sums 4 byte products; each vector is converted to
 * float once and scaled by its lanes' d.
 *
 * gptforge/kernels/__init__.py compiles this file once per CPU with -march=native: the vectors
 * (simd.h) are AVX-512's where the CPU has it, else AVX2's. K must be a whole number of vectors
 * (F32: VL floats, I8: IB values, Q4: 2 * IB values; the caller checks).
 */
#include <stdlib.h>
#include <string.h>

#include "gemv.h"
#include "simd.h"

/* vpdpbusd multiplies unsigned by signed bytes. With VNNI, int8 weights are read as the unsigned
 * w + 128 (a bit flip), and each lane starts at -128 * (the sum of its 4 x values). Without VNNI
 * (vpmaddubsw saturates at 16 bits, too small for that), |w| times x carrying w's sign. */
#ifdef VNNI
#define I8_OFFSET 128
#else
#define I8_OFFSET 0
#endif

/* Tiles: ROWS rows of W meet XROWS rows of x at a time (further passes read the tile from cache).
 * One row of x (batch 1) meets SINGLE_ROWS rows of W: more streams from memory at once. Batches
 * of more than XROWS rows use narrower, taller tiles (WIDE_ROWS x WIDE_XROWS): as many
 * accumulators, fewer passes. AVX2 has half AVX-512's registers. */
#define ROWS 4
#define XROWS 4
#define WIDE_ROWS 2
#if VL == 16
#define SINGLE_ROWS 8
#define WIDE_XROWS 8
#else
#define SINGLE_ROWS 4
#define WIDE_XROWS 4
#endif
#define MAX_ROWS 8
#define MAX_XROWS 8

/* Calls BLOCK(mb) with mb = min(rows left, XR) as a compile-time constant */
#define FOR_EACH_XBLOCK(M, XR, BLOCK)                                         \
    for (int64_t m0 = 0; m0 < (M); m0 += (XR)) {                              \
        switch ((M) - m0 < (XR) ? (M) - m0 : (XR)) {                          \
        case 1: BLOCK(1); break;                                              \
        case 2: BLOCK(2); break;                                              \
        case 3: BLOCK(3); break;                                              \
        case 4: BLOCK(4); break;                                              \
        case 5: if ((XR) >= 5) BLOCK(5); break;                               \
        case 6: if ((XR) >= 6) BLOCK(6); break;                               \
        case 7: if ((XR) >= 7) BLOCK(7); break;                               \
        default: if ((XR) >= 8) BLOCK(8); break;                              \
        }                                                                     \
    }
#define PREFETCH 16384  /* bytes ahead of the weights being read, prefetched into L2 (more misses in flight than L1) */

/* ---------------------------------------------------------------------------------- float32 */

/* Rows [n0, n0 + R) of W against rows [m0, m0 + MB) of x. R and MB are compile-time constants
 * (the callers pass literals into these always-inlined functions), so the accumulators stay in
 * registers. */
static inline __attribute__((always_inline)) void f32_block(
        const int R, const int MB, const float *x, int64_t m0, int64_t K, const float *W,
        int64_t N, const float *bias, float *y, int64_t n0) {
    vec acc[MAX_XROWS][MAX_ROWS];
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) acc[m][r] = vzero();
    for (int64_t k = 0; k < K; k += VL) {
        vec w[MAX_ROWS];
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

static inline __attribute__((always_inline)) void f32_tile(
        const int R, const int XR, const float *x, int64_t M, int64_t K, const float *W, int64_t N,
        const float *bias, float *y, int64_t n0) {
#define F32_BLOCK(mb) f32_block(R, mb, x, m0, K, W, N, bias, y, n0)
    FOR_EACH_XBLOCK(M, XR, F32_BLOCK)
#undef F32_BLOCK
}

static void f32_linear(const float *x, int64_t M, int64_t K, const float *W, int64_t N,
                       const float *bias, float *y, int threads) {
    const int rows = M == 1 ? SINGLE_ROWS : M <= XROWS ? ROWS : WIDE_ROWS;
    const int64_t tiles = N / rows;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        if (M == 1) f32_tile(SINGLE_ROWS, 1, x, M, K, W, N, bias, y, t * SINGLE_ROWS);
        else if (M <= XROWS) f32_tile(ROWS, XROWS, x, M, K, W, N, bias, y, t * ROWS);
        else f32_tile(WIDE_ROWS, WIDE_XROWS, x, M, K, W, N, bias, y, t * WIDE_ROWS);
    }
    for (int64_t n = tiles * rows; n < N; n++) f32_tile(1, XROWS, x, M, K, W, N, bias, y, n);
}

/* ------------------------------------------------------------------------- int8 and 4-bit */

/* The quantized rows of x. Per row: xq, K int8 values; and per int32 lane of the chunks the
 * kernels read, the x block's scale (xd) and the lane's starting value (x0).
 * int8 weights: chunks of IB values in order; a lane is 4 consecutive values; x0 = -I8_OFFSET *
 * their sum. 4-bit weights: chunks of 2 * IB values (IB / 16 groups of 32), each group's first
 * 16 values in the first half and its last 16 in the second: the order in which the low and the
 * high nibbles of IB packed bytes hold them. Lanes 4g..4g+3 of both halves are group g's;
 * x0 = -8 * (the sum of the lane's 8 values), the weights' zero point. */
typedef struct { int8_t *xq; float *xd; int32_t *x0; int64_t lanes; } qrows;

static qrows quantize_rows(enum format fmt, const float *x, int64_t M, int64_t K) {
    const int64_t lanes = fmt == I8 ? K / 4 : K / 8;  /* per row */
    const qrows q = {malloc(M * K), malloc(M * lanes * sizeof(float)), malloc(M * lanes * sizeof(int32_t)), lanes};
    for (int64_t b = 0; b < M * K / 32; b++) {  /* block b of 32 values */
        const float *xb = x + 32 * b;
        vec top = vzero();
        for (int j = 0; j < 32; j += VL) top = vmax(top, vabs(vload(xb + j)));
        const float d = vmaxall(top) / 127.f, id = d > 0.f ? 1.f / d : 0.f;
        int8_t v[32];
        for (int j = 0; j < 32; j += VL) vstore_i8(v + j, vload(xb + j) * vset1(id));
        if (fmt == I8) {
            memcpy(q.xq + 32 * b, v, 32);
            for (int l = 0; l < 8; l++) {
                q.xd[8 * b + l] = d;
                q.x0[8 * b + l] = -I8_OFFSET * (v[4 * l] + v[4 * l + 1] + v[4 * l + 2] + v[4 * l + 3]);
            }
        } else {
            const int64_t row = b / (K / 32), chunk = b % (K / 32) / (IB / 16), g = b % (IB / 16);
            int8_t *c = q.xq + row * K + chunk * 2 * IB;
            memcpy(c + 16 * g, v, 16);
            memcpy(c + IB + 16 * g, v + 16, 16);
            for (int l = 0; l < 4; l++) {
                const int64_t lane = row * lanes + chunk * (IB / 4) + 4 * g + l;
                q.xd[lane] = d;
                q.x0[lane] = -8 * (v[4 * l] + v[4 * l + 1] + v[4 * l + 2] + v[4 * l + 3]
                                   + v[16 + 4 * l] + v[17 + 4 * l] + v[18 + 4 * l] + v[19 + 4 * l]);
            }
        }
    }
    return q;
}

/* Rows [n0, n0 + R) of W against quantized rows [m0, m0 + MB) of x (compile-time R and MB). */
static inline __attribute__((always_inline)) void int_block(
        enum format fmt, const int R, const int MB, qrows q, int64_t m0, int64_t K,
        const void *W, const float *scale, int64_t N, const float *bias, float *y, int64_t n0) {
    vec acc[MAX_XROWS][MAX_ROWS];
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) acc[m][r] = vzero();
    const int64_t step = fmt == I8 ? IB : 2 * IB;  /* x values per chunk */
    for (int64_t k = 0; k < K; k += step) {
        ivec w[MAX_ROWS], w2[MAX_ROWS];  /* int8: w and its unsigned form; 4-bit: low and high nibbles */
        vec d[MAX_ROWS];             /* 4-bit: each lane's group scale */
        for (int r = 0; r < R; r++) {
            const int64_t n = n0 + r;
            if (fmt == I8) {
                const int8_t *p = (const int8_t *)W + n * K + k;
                __builtin_prefetch(p + PREFETCH, 0, 2);
                w[r] = iload(p);
                w2[r] = I8_OFFSET ? ixor(w[r], iset1_8((char)0x80)) : iabs8(w[r]);
            } else {
                const uint8_t *p = (const uint8_t *)W + n * (K / 2) + k / 2;
                __builtin_prefetch(p + PREFETCH, 0, 2);
                const ivec b = iload(p);
                w[r] = iand(b, iset1_8(15));
                w2[r] = iand(ishift4(b), iset1_8(15));
                d[r] = spread4(scale + n * (K / 32) + k / 32);
            }
        }
        for (int m = 0; m < MB; m++) {
            const int64_t lane = (m0 + m) * q.lanes + k / (step / VL);
            const int8_t *xm = q.xq + (m0 + m) * K + k;
            const ivec xv = iload(xm), x0 = iload(q.x0 + lane);
            const vec xd = vload(q.xd + lane);
            for (int r = 0; r < R; r++) {
                if (fmt == I8)
                    acc[m][r] = vfma(icvt(idot(x0, w2[r], I8_OFFSET ? xv : isign8(xv, w[r]))), xd, acc[m][r]);
                else
                    acc[m][r] = vfma(icvt(idot(idot(x0, w[r], xv), w2[r], iload(xm + IB))), xd * d[r], acc[m][r]);
            }
        }
    }
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) {
            const int64_t n = n0 + r;
            const float v = vsum(acc[m][r]) * (fmt == I8 ? scale[n] : 1.f);
            y[(m0 + m) * N + n] = v + (bias ? bias[n] : 0.f);
        }
}

static inline __attribute__((always_inline)) void int_tile(
        enum format fmt, const int R, const int XR, qrows q, int64_t M, int64_t K, const void *W,
        const float *scale, int64_t N, const float *bias, float *y, int64_t n0) {
#define INT_BLOCK(mb) int_block(fmt, R, mb, q, m0, K, W, scale, N, bias, y, n0)
    FOR_EACH_XBLOCK(M, XR, INT_BLOCK)
#undef INT_BLOCK
}

static inline __attribute__((always_inline)) void int_linear(
        enum format fmt, const float *x, int64_t M, int64_t K, const void *W, const float *scale,
        int64_t N, const float *bias, float *y, int threads) {
    const qrows q = quantize_rows(fmt, x, M, K);
    const int single = M == 1 && fmt == I8;  /* 4-bit tiles of SINGLE_ROWS would not fit in registers */
    const int rows = single ? SINGLE_ROWS : M <= XROWS ? ROWS : WIDE_ROWS;
    const int64_t tiles = N / rows;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        if (single) int_tile(fmt, SINGLE_ROWS, 1, q, M, K, W, scale, N, bias, y, t * SINGLE_ROWS);
        else if (M <= XROWS) int_tile(fmt, ROWS, XROWS, q, M, K, W, scale, N, bias, y, t * ROWS);
        else int_tile(fmt, WIDE_ROWS, WIDE_XROWS, q, M, K, W, scale, N, bias, y, t * WIDE_ROWS);
    }
    for (int64_t n = tiles * rows; n < N; n++) int_tile(fmt, 1, XROWS, q, M, K, W, scale, N, bias, y, n);
    free(q.xq); free(q.xd); free(q.x0);
}

void gf_linear(const gf_lin *L, const float *x, int64_t M, float *y, int threads) {
    if (L->fmt == F32)
        f32_linear(x, M, L->k, L->w, L->n, L->bias, y, threads);
    else if (L->fmt == I8)
        int_linear(I8, x, M, L->k, L->w, L->scale, L->n, L->bias, y, threads);
    else
        int_linear(Q4, x, M, L->k, L->w, L->scale, L->n, L->bias, y, threads);
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

/* The weights of L (int8 or 4-bit) as floats: out (n, k_out) float32, or bfloat16 where `bf16`
 * (k_out <= L->k drops padding columns). What a prefill multiplies with. */
void gf_dequantize(const gf_lin *L, int64_t k_out, void *out, int bf16, int threads) {
    const int64_t k = L->k;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < L->n; n++) {
        float row[k];
        if (L->fmt == I8) {
            const int8_t *q = (const int8_t *)L->w + n * k;
            for (int64_t i = 0; i < k; i++) row[i] = q[i] * L->scale[n];
        } else {
            const uint8_t *q = (const uint8_t *)L->w + n * (k / 2);
            for (int64_t g = 0; g < k / 32; g++) {
                const float d = L->scale[n * (k / 32) + g];
                for (int j = 0; j < 16; j++) {
                    row[32 * g + j] = ((q[16 * g + j] & 15) - 8) * d;
                    row[32 * g + j + 16] = ((q[16 * g + j] >> 4) - 8) * d;
                }
            }
        }
        if (bf16)
            for (int64_t i = 0; i < k_out; i++) ((uint16_t *)out)[n * k_out + i] = to_bf16(row[i]);
        else
            memcpy((float *)out + n * k_out, row, sizeof(float) * k_out);
    }
}
