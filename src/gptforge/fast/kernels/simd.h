/* The vector primitives gptforge's kernels are written in: AVX-512's where the CPU has it (the
 * kernels are compiled with -march=native), else AVX2's. `vec` holds VL floats; `ivec` IB bytes
 * (IB / 4 == VL int32 lanes). */
#ifndef GPTFORGE_SIMD_H
#define GPTFORGE_SIMD_H
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define VL 16 /* floats per vector */
#define IB 64 /* bytes per integer vector: IB / 4 == VL int32 lanes */
typedef __m512 vec;
typedef __m512i ivec;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vset1(float a) { return _mm512_set1_ps(a); }
static inline void vstore(float *p, vec a) { _mm512_storeu_ps(p, a); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
static inline vec vmin(vec a, vec b) { return _mm512_min_ps(a, b); }
static inline vec vround(vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec vscale2(vec a, vec n) { return _mm512_scalef_ps(a, n); }  /* a * 2^n, n integral */
static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
static inline float vmaxall(vec a) { return _mm512_reduce_max_ps(a); }
/* VL sums at once: lane j = the sum of v[j]'s lanes (halves, quarters, pairs of 16 vectors added
 * in a tree of shuffles; the order the tree leaves its lanes in is undone by reading v 4 x 4 transposed) */
static inline vec vsums(const vec v[VL]) {
#define T(j) v[4 * ((j) % 4) + (j) / 4]
    vec w[8], x[4], y[2];
    for (int j = 0; j < 8; j++)
        w[j] = _mm512_shuffle_f32x4(T(2 * j), T(2 * j + 1), 0x44) + _mm512_shuffle_f32x4(T(2 * j), T(2 * j + 1), 0xEE);
#undef T
    for (int i = 0; i < 4; i++)
        x[i] = _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88) + _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD);
    for (int i = 0; i < 2; i++)
        y[i] = _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0x44) + _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0xEE);
    return _mm512_shuffle_ps(y[0], y[1], 0x88) + _mm512_shuffle_ps(y[0], y[1], 0xDD);
}
static inline vec vabs(vec a) { return _mm512_abs_ps(a); }
static inline unsigned vmask_nan(vec a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }  /* bit i: lane i */
static inline unsigned vmask_eq(vec a, vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
static inline void vstore_i8(int8_t *p, vec a) {  /* round to nearest even, to int8 (|a| <= 127) */
    _mm_storeu_si128((__m128i *)p, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(a)));
}
static inline vec vload_half(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline vec vload_bf16(const uint16_t *p) {  /* bfloat16's bits are float32's top half */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline vec vload_i8(const int8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }
static inline void vstore_half(uint16_t *p, vec a) {  /* round to nearest even, as torch's .half() */
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
static inline ivec iload(const void *p) { return _mm512_loadu_si512(p); }
static inline ivec iset1_8(char a) { return _mm512_set1_epi8(a); }
static inline ivec iset1_32(int32_t a) { return _mm512_set1_epi32(a); }
static inline ivec iand(ivec a, ivec b) { return _mm512_and_si512(a, b); }
static inline ivec ixor(ivec a, ivec b) { return _mm512_xor_si512(a, b); }
static inline ivec ishift4(ivec a) { return _mm512_srli_epi16(a, 4); }
static inline ivec iabs8(ivec w) { return _mm512_abs_epi8(w); }
static inline ivec isign8(ivec x, ivec w) {  /* x where w >= 0, -x where w < 0 */
    return _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
}
static inline vec icvt(ivec a) { return _mm512_cvtepi32_ps(a); }
#if defined(__AVX512VNNI__)
#define VNNI 1
static inline ivec idot(ivec acc, ivec u, ivec s) { return _mm512_dpbusd_epi32(acc, u, s); }
static inline ivec idot2_small(ivec acc, ivec u1, ivec s1, ivec u2, ivec s2) {
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, u1, s1), u2, s2);
}
#else
static inline ivec idot(ivec acc, ivec u, ivec s) {  /* acc + per lane: sum of 4 u8 * s8 */
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
}
static inline ivec idot2_small(ivec acc, ivec u1, ivec s1, ivec u2, ivec s2) {  /* see the AVX2 one */
    const ivec pairs = _mm512_add_epi16(_mm512_maddubs_epi16(u1, s1), _mm512_maddubs_epi16(u2, s2));
    return _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
}
#endif
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define VL 8
#define IB 32
typedef __m256 vec;
typedef __m256i ivec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vec vset1(float a) { return _mm256_set1_ps(a); }
static inline void vstore(float *p, vec a) { _mm256_storeu_ps(p, a); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
static inline vec vmin(vec a, vec b) { return _mm256_min_ps(a, b); }
static inline vec vround(vec a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec vscale2(vec a, vec n) {  /* a * 2^n, n integral in [-126, 127] */
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(a, _mm256_castsi256_ps(e));
}
static inline vec vabs(vec a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), a); }
static inline unsigned vmask_nan(vec a) { return _mm256_movemask_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)); }
static inline unsigned vmask_eq(vec a, vec b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_EQ_OQ)); }
static inline void vstore_i8(int8_t *p, vec a) {  /* round to nearest even, to int8 (|a| <= 127) */
    const __m256i i = _mm256_cvtps_epi32(a);
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64((__m128i *)p, _mm_packs_epi16(w, w));
}
static inline vec vload_half(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline vec vload_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline vec vload_i8(const int8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))); }
static inline void vstore_half(uint16_t *p, vec a) {
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
static inline float vmaxall(vec a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
static inline float vsum(vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline vec vsums(const vec v[VL]) {  /* lane j = the sum of v[j]'s lanes */
    const vec a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const vec b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_permute2f128_ps(a, b, 0x20) + _mm256_permute2f128_ps(a, b, 0x31);
}
static inline ivec iload(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline ivec iset1_8(char a) { return _mm256_set1_epi8(a); }
static inline ivec iset1_32(int32_t a) { return _mm256_set1_epi32(a); }
static inline ivec iand(ivec a, ivec b) { return _mm256_and_si256(a, b); }
static inline ivec ixor(ivec a, ivec b) { return _mm256_xor_si256(a, b); }
static inline ivec ishift4(ivec a) { return _mm256_srli_epi16(a, 4); }
static inline ivec iabs8(ivec w) { return _mm256_abs_epi8(w); }
static inline ivec isign8(ivec x, ivec w) { return _mm256_sign_epi8(x, w); }
static inline vec icvt(ivec a) { return _mm256_cvtepi32_ps(a); }
#if defined(__AVXVNNI__)
#define VNNI 1
static inline ivec idot(ivec acc, ivec u, ivec s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
static inline ivec idot2_small(ivec acc, ivec u1, ivec s1, ivec u2, ivec s2) {
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(acc, u1, s1), u2, s2);
}
#else
static inline ivec idot(ivec acc, ivec u, ivec s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
/* idot(idot(acc, u1, s1), u2, s2) where u1 and u2's bytes are at most 15 (4-bit codes): the 16-bit
 * pair sums of both products (each at most 2 * 15 * 128) added before one widening to 32 bits */
static inline ivec idot2_small(ivec acc, ivec u1, ivec s1, ivec u2, ivec s2) {
    const ivec pairs = _mm256_add_epi16(_mm256_maddubs_epi16(u1, s1), _mm256_maddubs_epi16(u2, s2));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#endif
#else
#error "gemv.c needs AVX2, FMA and F16C, or AVX-512 (gptforge uses PyTorch's kernels on other CPUs)"
#endif



/* exp(x) to ~2 ulp (Cephes' expf polynomial after reducing x by multiples of ln 2) */
static inline vec vexp(vec x) {
    x = vmax(vmin(x, vset1(88.3762626647949f)), vset1(-87.3365447504f));
    const vec n = vround(x * vset1(1.44269504088896341f));
    vec r = vfma(n, vset1(-0.693359375f), x);
    r = vfma(n, vset1(2.12194440e-4f), r);
    vec p = vset1(1.9875691500e-4f);
    p = vfma(p, r, vset1(1.3981999507e-3f));
    p = vfma(p, r, vset1(8.3334519073e-3f));
    p = vfma(p, r, vset1(4.1665795894e-2f));
    p = vfma(p, r, vset1(1.6666665459e-1f));
    p = vfma(p, r, vset1(5.0000001201e-1f));
    p = vfma(p, r * r, r + vset1(1.f));
    return vscale2(p, n);
}

/* One block of 32 floats as llama.cpp's Q8_0: returns d = max |x| / 127, and q[j] =
 * round-to-even(x[j] * (1 / d)) (0 where d is 0); *sum, if asked for, the q's sum. gemv.c's
 * activations and block.c's KV cache rows (model.py's q8_0_rows) are both quantized so. */
static inline float q8_0_block(const float *x, int8_t q[32], int32_t *sum) {
    vec top = vzero();
    for (int j = 0; j < 32; j += VL) top = vmax(top, vabs(vload(x + j)));
    const float d = vmaxall(top) / 127.f, id = d > 0.f ? 1.f / d : 0.f;
    vec total = vzero();
    for (int j = 0; j < 32; j += VL) {
        const vec r = vround(vload(x + j) * vset1(id));  /* exact integers: their sum is too */
        vstore_i8(q + j, r);
        total = total + r;
    }
    if (sum) *sum = (int32_t)vsum(total);
    return d;
}
#endif
