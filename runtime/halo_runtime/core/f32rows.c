/* fp32 matrix products for a few rows at once, each output element summed in one fixed order.
 *
 * Why: ggml's fp32 product of a few rows computes one dot product per (weight row, input row), so
 * a weight row streams from memory once per input row: a pass of 8 rows costs 2-3x one row, which
 * is what caps continuous batching on an fp32 plan. llamafile's tiled kernel shares the loads but
 * sums in another order than the 1-row dot product, so a row's bits would depend on its pass.
 * Here every element is the same sequence of operations whatever the pass's rows or threads:
 * LANES partial sums, lane l taking k = l, l + LANES, ... with a fused multiply-add, then a fixed
 * pairwise tree over the lanes. A weight chunk is loaded once for up to RBLK input rows; weight
 * rows are taken NBLK at a time, so that with more rows (prefill) a block is read again from cache,
 * not memory; and the weights ahead are prefetched (without it an 8-row product waits on memory:
 * 27 against 15 ms a pass here).
 *
 * Built by core/f32rows.py with the machine's compiler (-O3 -march=native -ffp-contract=off: a
 * fused multiply-add only where the source has one, so the vector and tail paths round alike).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "ggml.h"

#define LANES 16
#define NBLK 16
#ifndef PREFETCH
#define PREFETCH 1024 /* floats ahead of the weight chunk being read (4 KB: the rows after it) */
#endif

/* LANES partial sums as VN vectors of VW lanes, in registers (intrinsics: a lane array would be
 * kept on the stack); every variant takes lane l's products in the same order. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define RBLK 8 /* input rows a weight chunk meets while in a register: accumulators RBLK x VN */
#define VN 1
typedef __m512 vec;
#define VW 16
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
static inline __m256 half8(const vec *a) {
    return _mm256_add_ps(_mm512_castps512_ps256(a[0]),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[0]), 1)));
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define RBLK 4
#define VN 2
typedef __m256 vec;
#define VW 8
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VSTORE(p, v) _mm256_storeu_ps(p, v)
static inline __m256 half8(const vec *a) { return _mm256_add_ps(a[0], a[1]); }
#elif defined(__ARM_NEON) && defined(__ARM_FEATURE_FMA)
#include <arm_neon.h>
#define RBLK 4
#define VN 4
typedef float32x4_t vec;
#define VW 4
#define VZERO() vdupq_n_f32(0.0f)
#define VLOAD(p) vld1q_f32(p)
#define VFMA(a, b, c) vfmaq_f32(c, a, b)
#define VSTORE(p, v) vst1q_f32(p, v)
static inline float vsum(const vec *a) {  /* tree16's order: l + l+8, then l + l+4, then pairs */
    float32x4_t s4 = vaddq_f32(vaddq_f32(a[0], a[2]), vaddq_f32(a[1], a[3]));
    float32x2_t t = vadd_f32(vget_low_f32(s4), vget_high_f32(s4));
    return vget_lane_f32(t, 0) + vget_lane_f32(t, 1);
}
#else
#define RBLK 4
#define VN 16
typedef float vec;
#define VW 1
#define VZERO() 0.0f
#define VLOAD(p) (*(p))
#define VFMA(a, b, c) fmaf(a, b, c)
#define VSTORE(p, v) (*(p) = (v))
#endif

static inline float tree16(const float *a) {
    float s8[8], s4[4];
    for (int l = 0; l < 8; l++) s8[l] = a[l] + a[l + 8];
    for (int l = 0; l < 4; l++) s4[l] = s8[l] + s8[l + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

#if VW == 16 || VW == 8
static inline float vsum(const vec *a) {  /* tree16's order, in registers */
    __m256 s8 = half8(a);
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 t = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
#elif VW == 1
static inline float vsum(const vec *a) { return tree16(a); }
#endif

/* out[r * os] = w . x[r * xs] for r < R (one function per row count: constant trip counts). */
#define DOTS(R)                                                                              \
    static void dots##R(const float *restrict w, const float *restrict x, size_t xs,        \
                        int64_t K, float *restrict out, size_t os) {                        \
        vec acc[R][VN];                                                                      \
        for (int r = 0; r < R; r++)                                                          \
            for (int v = 0; v < VN; v++) acc[r][v] = VZERO();                                \
        int64_t k = 0;                                                                       \
        for (; k + LANES <= K; k += LANES) {                                                 \
            __builtin_prefetch(w + PREFETCH + k);                                            \
            for (int v = 0; v < VN; v++) {                                                   \
                vec wv = VLOAD(w + k + v * VW);                                              \
                for (int r = 0; r < R; r++)                                                  \
                    acc[r][v] = VFMA(wv, VLOAD(x + r * xs + k + v * VW), acc[r][v]);         \
            }                                                                                \
        }                                                                                    \
        if (k == K) {                                                                        \
            for (int r = 0; r < R; r++) out[r * os] = vsum(acc[r]);                         \
            return;                                                                          \
        }                                                                                    \
        for (int r = 0; r < R; r++) {                                                        \
            float a[LANES];                                                                  \
            for (int v = 0; v < VN; v++) VSTORE(a + v * VW, acc[r][v]);                      \
            for (int l = 0; k + l < K; l++) a[l] = fmaf(w[k + l], x[r * xs + k + l], a[l]);  \
            out[r * os] = tree16(a);                                                         \
        }                                                                                    \
    }
DOTS(1)
DOTS(2)
DOTS(3)
DOTS(4)
#if RBLK == 8
DOTS(5)
DOTS(6)
DOTS(7)
DOTS(8)
#endif

/* Lanes per vector of the build (1: no vector fused multiply-add; then ggml's products are faster). */
int halo_f32_rows_width(void) { return VW; }

/* out[r, n] = sum_k w[n, k] x[r, k] for weight rows n in [n0, n1) and every input row r. */
void halo_f32_rows(const float *w, size_t ws, const float *x, size_t xs, float *out, size_t os,
                   int64_t K, int64_t n0, int64_t n1, int64_t R) {
    for (int64_t nb = n0; nb < n1; nb += NBLK) {
        int64_t ne = nb + NBLK < n1 ? nb + NBLK : n1;
        for (int64_t r = 0; r < R; r += RBLK) {
            int64_t left = R - r;
            const float *xr = x + r * xs;
            float *o = out + r * os;
            for (int64_t n = nb; n < ne; n++) {
                const float *wn = w + n * ws;
                switch (left >= RBLK ? RBLK : left) {
#if RBLK == 8
                    case 8: dots8(wn, xr, xs, K, o + n, os); break;
                    case 7: dots7(wn, xr, xs, K, o + n, os); break;
                    case 6: dots6(wn, xr, xs, K, o + n, os); break;
                    case 5: dots5(wn, xr, xs, K, o + n, os); break;
#endif
                    case 4: dots4(wn, xr, xs, K, o + n, os); break;
                    case 3: dots3(wn, xr, xs, K, o + n, os); break;
                    case 2: dots2(wn, xr, xs, K, o + n, os); break;
                    default: dots1(wn, xr, xs, K, o + n, os); break;
                }
            }
        }
    }
}

/* ggml custom op (ggml_custom_4d, args: weight [K, N] fp32, input [K, R] fp32 with contiguous
 * rows): dst [N, R] fp32; thread ith of nth takes its share of the weight rows. */
void halo_f32_rows_op(struct ggml_tensor *dst, int ith, int nth, void *userdata) {
    (void)userdata;
    const struct ggml_tensor *w = dst->src[0], *x = dst->src[1];
    int64_t K = w->ne[0], N = w->ne[1], R = x->ne[1];
    /* whole blocks of weight rows per thread, so that no thread's share splits a block */
    int64_t blocks = (N + NBLK - 1) / NBLK;
    int64_t n0 = blocks * ith / nth * NBLK, n1 = blocks * (ith + 1) / nth * NBLK;
    if (n1 > N) n1 = N;
    if (n0 >= n1) return;
    halo_f32_rows((const float *)w->data, w->nb[1] / sizeof(float), (const float *)x->data,
                  x->nb[1] / sizeof(float), (float *)dst->data, dst->nb[1] / sizeof(float), K, n0, n1, R);
}
