/* Greedy decoding's last step: the index of the largest logit of each row, as torch.argmax
 * (the first of equal maxima; a NaN counts as the largest, the first NaN wins). PyTorch's CPU
 * argmax over a batch of GPT-2's 50,257 logits took ~30 us a row, ~5% of an 8-row int8 step. */
#include <math.h>
#include <stdint.h>

#include "simd.h"

/* The first j in [0, n) where row[j] is NaN (`nan`), else where it equals `best`; n if none */
static int64_t first(const float *row, int64_t n, int nan, float best) {
    int64_t j = 0;
    for (; j + VL <= n; j += VL) {
        const vec v = vload(row + j);
        const unsigned hits = nan ? vmask_nan(v) : vmask_eq(v, vset1(best));
        if (hits) return j + __builtin_ctz(hits);
    }
    for (; j < n; j++)
        if (nan ? row[j] != row[j] : row[j] == best) return j;
    return n;
}

/* x (rows, n) float32, row r at x + r * stride; out (rows,) */
void gf_argmax(const float *x, int64_t rows, int64_t n, int64_t stride, int64_t *out, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * stride;
        vec top = vset1(-INFINITY);
        unsigned nan = 0;
        int64_t i = 0;
        for (; i + VL <= n; i += VL) {  /* the maximum, and whether there is a NaN */
            const vec v = vload(row + i);
            top = vmax(top, v);
            nan |= vmask_nan(v);
        }
        float best = vmaxall(top);
        for (; i < n; i++) {
            if (row[i] != row[i]) nan = 1;
            else if (row[i] > best) best = row[i];
        }
        const int64_t at = first(row, n, nan != 0, best);
        out[r] = at < n ? at : 0;
    }
}

/* gf_argmax over the tokens a grammar allows: bit j of mask word w (int32, little-endian bit order,
 * llguidance's and xgrammar's layout) allows index 32 w + j. Whole words of allowed tokens are read
 * a vector at a time, the others bit by bit. 0 where nothing is allowed. */
static int64_t masked_argmax(const float *row, int64_t n, const int32_t *mask) {
    int64_t at = -1;
    float best = -INFINITY;
    for (int64_t base = 0; base < n; base += 32) {
        uint32_t bits = (uint32_t)mask[base / 32];
        if (n - base < 32) bits &= (1u << (n - base)) - 1;
        if (bits == 0xFFFFFFFFu) {  /* 32 allowed (32 is a whole number of vectors): the block's maximum first */
            vec top = vset1(-INFINITY);
            unsigned nan = 0;
            for (int k = 0; k < 32; k += VL) {
                const vec v = vload(row + base + k);
                top = vmax(top, v);
                nan |= vmask_nan(v);
            }
            if (nan) return base + first(row + base, 32, 1, 0.0f);
            const float m = vmaxall(top);
            if (at < 0 || m > best) {
                best = m;
                at = base + first(row + base, 32, 0, m);
            }
            continue;
        }
        while (bits) {
            const int64_t j = base + __builtin_ctz(bits);
            bits &= bits - 1;
            if (row[j] != row[j]) return j;  /* a NaN counts as the largest, as in gf_argmax */
            if (at < 0 || row[j] > best) {
                best = row[j];
                at = j;
            }
        }
    }
    return at < 0 ? 0 : at;
}

/* x (rows, n) float32, row r at x + r * stride; mask (rows, ceil(n / 32)) int32, row r at
 * mask + r * mask_stride; out (rows,) */
void gf_argmax_masked(const float *x, int64_t rows, int64_t n, int64_t stride, const int32_t *mask,
                      int64_t mask_stride, int64_t *out, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; r++)
        out[r] = masked_argmax(x + r * stride, n, mask + r * mask_stride);
}
