/* A float32 matrix transposed into row-major order: what turns Hugging Face's Conv1D weights,
 * (in, out) in the file, into the (out, in) rows the products read. PyTorch's copy of a
 * transposed tensor runs on one thread at ~1.9 GB/s; here 8 x 8 tiles are turned in registers
 * (AVX2's unpack and shuffle) and the threads take apart runs of output rows. The first touch of
 * freshly allocated memory (the kernel's page faults) costs about as much again, whoever writes. */
#include <immintrin.h>
#include <stdint.h>

/* d[c * ld + r] = s[r * ls + c] for r, c in [0, 8) */
static inline void tile8(const float *s, int64_t ls, float *d, int64_t ld) {
    __m256 r[8], t[8], u[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(s + i * ls);
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);  /* pairs of rows interleaved */
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {  /* then pairs of pairs: each 128-bit half holds 4 x 4 */
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {  /* and the halves joined: rows 0-3 from u[i], rows 4-7 from u[i + 4] */
        _mm256_storeu_ps(d + i * ld, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
        _mm256_storeu_ps(d + (i + 4) * ld, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
    }
}

#define BLOCK 64  /* a 64 x 64 block of the source (16 KiB) is turned at a time, in cache */

/* dst (cols, rows), row-major = src (rows, cols)^T, src's rows `src_stride` floats apart */
void gf_transpose(const float *src, int64_t rows, int64_t cols, int64_t src_stride, float *dst, int threads) {
    const int64_t rows8 = rows / 8 * 8, cols8 = cols / 8 * 8;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c0 = 0; c0 < cols8; c0 += BLOCK) {
        const int64_t c1 = c0 + BLOCK < cols8 ? c0 + BLOCK : cols8;
        for (int64_t r0 = 0; r0 < rows8; r0 += BLOCK) {
            const int64_t r1 = r0 + BLOCK < rows8 ? r0 + BLOCK : rows8;
            for (int64_t r = r0; r < r1; r += 8)
                for (int64_t c = c0; c < c1; c += 8) tile8(src + r * src_stride + c, src_stride, dst + c * rows + r, rows);
        }
    }
    for (int64_t c = 0; c < cols; c++)  /* the edges: rows past rows8 of every column, all rows past cols8 */
        for (int64_t r = c < cols8 ? rows8 : 0; r < rows; r++) dst[c * rows + r] = src[r * src_stride + c];
}
