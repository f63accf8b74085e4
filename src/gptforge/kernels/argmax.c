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
