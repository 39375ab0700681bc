/* Fermi's CPU kernels for decode steps: fp16-weight products and one-token attention.
 *
 * Built at first use by fermi/native/__init__.py with the machine's C compiler
 * (-O3 -march=native -fopenmp) and called through ctypes. A decode step on CPU reads every
 * weight once for a handful of rows, so it is bound by memory bandwidth; what torch adds
 * around its kernels (dispatch, allocation, one op per norm, rope, add and cast) costs as
 * much as the products themselves at SmolLM2's size (perf/LOG.md runs 67 and 70).
 *
 * Weights are in panels of 16 output rows, a panel past n zero-padded. A product streams
 * each panel from its first byte to its last, widening the weights of 16 rows into one
 * vector and multiplying it by every input row's features, broadcast: the sums of 16
 * outputs build up in one register per input row, with no horizontal sums, and a weight
 * vector widened once serves a tile of input rows. Three formats (fermi_weight):
 *
 * - fp16: the values, [ceil(n/16)][k][16]: input feature j of the 16 rows side by side.
 * - int8: codes q in -127..127, [ceil(n/16)][ceil(k/2)][16][2]: features 2j, 2j + 1 of
 *   row r at bytes 2r, 2r + 1 of step j (a zero feature past an odd k); one float32 scale
 *   per output row (w = q * scale), applied on the way out.
 * - int4: codes 0..15 two to a byte, [ceil(n/16)][k/8][2][16][2]: in half h of step j,
 *   byte 2r + t holds feature 8j + 4h + t of row r in its low nibble and feature
 *   8j + 4h + 2 + t in its high one. Each group of `group` features (a multiple of 16)
 *   has an fp16 scale and minimum per output row, [ceil(n/16)][k/group][16] each
 *   (w = q * scale + min).
 *
 * The quantized formats multiply integers: each block of an input row (int4: a group;
 * int8: INT8_BLOCK features) is rounded to int16 steps of its largest magnitude
 * (a = round(u / s), s = max |u| / 32767: at most 1/65534 of that magnitude off, where
 * int8 steps cost 12x the KL divergence of int4 itself: perf/LOG.md run 72), so that the
 * codes widened to int16 and the inputs' pairs give exact int32 sums of q * a in one
 * instruction per pair of features (vpdpwssd, or vpmaddwd and an add). A block's sum is
 * then scaled by s (and int4's by its scale, plus min times the block's float sum of u):
 * the weights are never formed.
 *
 * Inputs of a product are float32 rows that the kernel prepares itself first ("u"): as
 * given, RMS-normalised with a weight (the layer's norm rides inside the product), or
 * silu(gate) * up of a [gate | up] row. Results are float32; a bias and a residual row are
 * added on the way out. Float accumulation is in 16 lanes summed at the end.
 */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define FERMI_SIMD 512
typedef __m512 v16;
static inline v16 v_zero(void) { return _mm512_setzero_ps(); }
static inline v16 v_load(const float *p) { return _mm512_loadu_ps(p); }
static inline v16 v_half(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
static inline v16 v_fma(v16 a, v16 b, v16 c) { return _mm512_fmadd_ps(a, b, c); }
static inline float v_sum(v16 a) { return _mm512_reduce_add_ps(a); }
/* 16 lanes of int32, one per output row of a panel; or 32 int16, two per row. */
typedef __m512i i16;
static inline i16 i_zero(void) { return _mm512_setzero_si512(); }
static inline i16 i_add(i16 a, i16 b) { return _mm512_add_epi32(a, b); }
static inline v16 i_float(i16 a) { return _mm512_cvtepi32_ps(a); }
/* 32 bytes of int4 codes (bytes 2r, 2r + 1 for row r) as int16: the low nibbles into lo,
 * the high ones into hi. */
static inline void i_nibbles(const uint8_t *p, i16 *lo, i16 *hi) {
    __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
    *lo = _mm512_and_si512(w, _mm512_set1_epi16(15));
    *hi = _mm512_srli_epi16(w, 4);
}
/* 32 int8 codes (bytes 2r, 2r + 1 for row r) as int16. */
static inline i16 i_widen(const int8_t *p) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p));
}
/* acc + each row's two int16 codes times a[0], a[1]. */
static inline i16 i_dot2(i16 acc, i16 w, const int16_t *a) {
    int32_t pair;
    memcpy(&pair, a, 4);
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, w, _mm512_set1_epi32(pair));
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(w, _mm512_set1_epi32(pair)));
#endif
}
#define TILE 8 /* input rows per pass over a panel: 8 accumulators of 32 registers */
#define TILE_Q 8 /* the same for products of int8 inputs (int8 and int4 weights) */
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define FERMI_SIMD 256
typedef struct {
    __m256 lo, hi;
} v16;
static inline v16 v_zero(void) {
    v16 r = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    return r;
}
static inline v16 v_load(const float *p) {
    v16 r = {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
    return r;
}
static inline v16 v_half(const uint16_t *p) {
    v16 r = {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)),
             _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)))};
    return r;
}
static inline v16 v_fma(v16 a, v16 b, v16 c) {
    v16 r = {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
    return r;
}
static inline float v_sum(v16 a) {
    __m256 s = _mm256_add_ps(a.lo, a.hi);
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
}
typedef struct {
    __m256i lo, hi; /* rows 0-7, rows 8-15 */
} i16;
static inline i16 i_zero(void) {
    i16 r = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    return r;
}
static inline i16 i_add(i16 a, i16 b) {
    i16 r = {_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi)};
    return r;
}
static inline v16 i_float(i16 a) {
    v16 r = {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)};
    return r;
}
static inline void i_nibbles(const uint8_t *p, i16 *lo, i16 *hi) {
    __m256i a = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(p + 16)));
    __m256i m = _mm256_set1_epi16(15);
    lo->lo = _mm256_and_si256(a, m);
    lo->hi = _mm256_and_si256(b, m);
    hi->lo = _mm256_srli_epi16(a, 4);
    hi->hi = _mm256_srli_epi16(b, 4);
}
static inline i16 i_widen(const int8_t *p) {
    i16 r = {_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p)),
             _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 16)))};
    return r;
}
static inline __m256i dot2_half(__m256i acc, __m256i w, __m256i a) {
#if defined(__AVXVNNI__)
    return _mm256_dpwssd_avx_epi32(acc, w, a);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(w, a));
#endif
}
static inline i16 i_dot2(i16 acc, i16 w, const int16_t *a) {
    int32_t pair;
    memcpy(&pair, a, 4);
    __m256i b = _mm256_set1_epi32(pair);
    i16 r = {dot2_half(acc.lo, w.lo, b), dot2_half(acc.hi, w.hi, b)};
    return r;
}
#define TILE 6 /* 16 registers: 6 accumulator pairs */
#define TILE_Q 3 /* a row's total and integer sum, 2 registers each */
#else
#error "fermi's CPU kernels need AVX2 with F16C and FMA, or AVX-512"
#endif

#define PANEL 16 /* output rows per panel */

enum { FORMAT_F16 = 0, FORMAT_INT8 = 1, FORMAT_INT4 = 2 };

/* A weight [n, k] as the kernels read it (see the top of this file). */
typedef struct {
    const void *codes;  /* uint16 (fp16), int8 or uint8 (int4 pairs) panels */
    const void *scales; /* int8: float [ceil(n/16) * 16]; int4: fp16 panels of groups */
    const void *mins;   /* int4: fp16, as scales */
    long group;         /* int4: features per group (a multiple of 2) */
    long format;
} fermi_weight;

int fermi_simd(void) { return FERMI_SIMD; }

int fermi_layout(void) { return PANEL; }

static inline v16 v_bcast(float x) {
#if FERMI_SIMD == 512
    return _mm512_set1_ps(x);
#else
    v16 r = {_mm256_set1_ps(x), _mm256_set1_ps(x)};
    return r;
#endif
}

static inline v16 v_add(v16 a, v16 b) {
#if FERMI_SIMD == 512
    return _mm512_add_ps(a, b);
#else
    v16 r = {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)};
    return r;
#endif
}

static inline void v_store(float *p, v16 a) {
#if FERMI_SIMD == 512
    _mm512_storeu_ps(p, a);
#else
    _mm256_storeu_ps(p, a.lo);
    _mm256_storeu_ps(p + 8, a.hi);
#endif
}

/* Lane by lane, the larger of m and |a|. */
static inline v16 v_absmax(v16 m, v16 a) {
#if FERMI_SIMD == 512
    return _mm512_max_ps(m, _mm512_abs_ps(a));
#else
    __m256 sign = _mm256_set1_ps(-0.0f);
    v16 r = {_mm256_max_ps(m.lo, _mm256_andnot_ps(sign, a.lo)),
             _mm256_max_ps(m.hi, _mm256_andnot_ps(sign, a.hi))};
    return r;
#endif
}

/* The largest of a's lanes. */
static inline float v_hmax(v16 a) {
#if FERMI_SIMD == 512
    return _mm512_reduce_max_ps(a);
#else
    __m256 v = _mm256_max_ps(a.lo, a.hi);
    __m128 q = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    q = _mm_max_ps(q, _mm_movehl_ps(q, q));
    q = _mm_max_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
#endif
}

/* a's lanes rounded to the nearest integer (ties to even, the default rounding mode, as
 * lrintf) into 16 int16 (the values are within +-32767). */
static inline void v_round16(v16 a, int16_t *out) {
#if FERMI_SIMD == 512
    _mm256_storeu_si256((__m256i *)out, _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(a)));
#else
    __m256i w = _mm256_packs_epi32(_mm256_cvtps_epi32(a.lo), _mm256_cvtps_epi32(a.hi));
    _mm256_storeu_si256((__m256i *)out, _mm256_permute4x64_epi64(w, 0xD8));
#endif
}

/* One panel (16 outputs, k inputs) against R prepared input rows u (ldu apart); the 16
 * sums of row r go to out + r * PANEL. One or two rows keep several partial sums over the
 * inputs (a single chain of dependent multiply-adds would wait on each one's latency).
 * (LOAD widens 16 stored values to floats.) */
#define DEFINE_TILES(NAME, T, LOAD)                                                          \
    static inline void NAME##_1(const T *w, const float *u, long ldu, long k, float *out) {  \
        (void)ldu;                                                                          \
        v16 a0 = v_zero(), a1 = v_zero(), a2 = v_zero(), a3 = v_zero();                     \
        long j = 0;                                                                         \
        for (; j + 4 <= k; j += 4, w += 4 * PANEL) {                                        \
            a0 = v_fma(LOAD(w), v_bcast(u[j]), a0);                                         \
            a1 = v_fma(LOAD(w + PANEL), v_bcast(u[j + 1]), a1);                             \
            a2 = v_fma(LOAD(w + 2 * PANEL), v_bcast(u[j + 2]), a2);                         \
            a3 = v_fma(LOAD(w + 3 * PANEL), v_bcast(u[j + 3]), a3);                         \
        }                                                                                   \
        for (; j < k; j++, w += PANEL) a0 = v_fma(LOAD(w), v_bcast(u[j]), a0);              \
        v_store(out, v_add(v_add(a0, a1), v_add(a2, a3)));                                  \
    }                                                                                       \
    static inline void NAME##_2(const T *w, const float *u, long ldu, long k, float *out) {  \
        v16 a0 = v_zero(), a1 = v_zero(), b0 = v_zero(), b1 = v_zero();                     \
        const float *v = u + ldu;                                                           \
        long j = 0;                                                                         \
        for (; j + 2 <= k; j += 2, w += 2 * PANEL) {                                        \
            v16 w0 = LOAD(w), w1 = LOAD(w + PANEL);                                         \
            a0 = v_fma(w0, v_bcast(u[j]), a0);                                              \
            b0 = v_fma(w0, v_bcast(v[j]), b0);                                              \
            a1 = v_fma(w1, v_bcast(u[j + 1]), a1);                                          \
            b1 = v_fma(w1, v_bcast(v[j + 1]), b1);                                          \
        }                                                                                   \
        for (; j < k; j++, w += PANEL) {                                                    \
            v16 w0 = LOAD(w);                                                               \
            a0 = v_fma(w0, v_bcast(u[j]), a0);                                              \
            b0 = v_fma(w0, v_bcast(v[j]), b0);                                              \
        }                                                                                   \
        v_store(out, v_add(a0, a1));                                                        \
        v_store(out + PANEL, v_add(b0, b1));                                                \
    }                                                                                       \
    static inline void NAME##_n(const T *w, const float *u, long ldu, long k, int R,         \
                                float *out) {                                               \
        v16 acc[TILE];                                                                      \
        for (int r = 0; r < R; r++) acc[r] = v_zero();                                      \
        for (long j = 0; j < k; j++, w += PANEL) {                                          \
            v16 wv = LOAD(w);                                                               \
            for (int r = 0; r < R; r++) acc[r] = v_fma(wv, v_bcast(u[r * ldu + j]), acc[r]); \
        }                                                                                   \
        for (int r = 0; r < R; r++) v_store(out + r * PANEL, acc[r]);                       \
    }                                                                                       \
    static inline void NAME(const T *w, const float *u, long ldu, long k, int rows,          \
                            float *out) {                                                   \
        switch (rows) {                                                                     \
        case 1: NAME##_1(w, u, ldu, k, out); break;                                         \
        case 2: NAME##_2(w, u, ldu, k, out); break;                                         \
        case 3: NAME##_n(w, u, ldu, k, 3, out); break;                                      \
        case 4: NAME##_n(w, u, ldu, k, 4, out); break;                                      \
        case 5: NAME##_n(w, u, ldu, k, 5, out); break;                                      \
        case 6: NAME##_n(w, u, ldu, k, 6, out); break;                                      \
        TILE_8_CASES(NAME)                                                                  \
        }                                                                                   \
    }
#if TILE >= 8
#define TILE_8_CASES(NAME)                                                                  \
    case 7: NAME##_n(w, u, ldu, k, 7, out); break;                                          \
    case 8: NAME##_n(w, u, ldu, k, 8, out); break;
#else
#define TILE_8_CASES(NAME)
#endif
DEFINE_TILES(tile_f16, uint16_t, v_half)

static inline v16 v_mul(v16 a, v16 b) {
#if FERMI_SIMD == 512
    return _mm512_mul_ps(a, b);
#else
    v16 r = {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)};
    return r;
#endif
}

/* A product's inputs as the int8 and int4 formats take them (quantize_inputs): m rows of
 * int16 values (kq = k rounded up to 2 apart, zero past k), and for each block of a row
 * (int4: a group; int8: INT8_BLOCK features, the last one shorter) its scale, and (int4)
 * its float sum. */
typedef struct {
    int16_t *a;   /* [m][kq] */
    float *scale; /* [m][blocks] */
    float *sum;   /* [m][blocks] */
    long kq, blocks;
} q_inputs;

#define INT8_BLOCK 32

/* The int4 panel (codes, its groups' scales and minimums) against R rows of inputs. A
 * group's integer sums build up per row (one or two rows: two sums each, one per half of
 * a step, so that a row's dot products do not all wait on each other); then each is
 * scaled into the row's float total. */
static inline void tile_int4_n(const uint8_t *w, const uint16_t *sc, const uint16_t *mn,
                               long group, const int16_t *a, long lda, const float *ascale,
                               const float *usum, long k, int R, float *out) {
    v16 acc[TILE_Q];
    i16 part[TILE_Q], odd[TILE_Q];
    int two = R <= 2;
    long groups = k / group;
    for (int r = 0; r < R; r++) acc[r] = v_zero();
    for (long g = 0; g < groups; g++, sc += PANEL, mn += PANEL) {
        for (int r = 0; r < R; r++) part[r] = odd[r] = i_zero();
        const int16_t *ag = a + g * group;
        for (long j = 0; j < group; j += 8, w += 4 * PANEL) {
            i16 lo, hi;
            i_nibbles(w, &lo, &hi); /* features j, j + 1 (lo) and j + 2, j + 3 (hi) */
            for (int r = 0; r < R; r++) {
                part[r] = i_dot2(part[r], lo, ag + r * lda + j);
                part[r] = i_dot2(part[r], hi, ag + r * lda + j + 2);
            }
            i_nibbles(w + 2 * PANEL, &lo, &hi); /* features j + 4 .. j + 7 */
            for (int r = 0; r < R; r++) {
                i16 *sum = two ? &odd[r] : &part[r];
                *sum = i_dot2(*sum, lo, ag + r * lda + j + 4);
                *sum = i_dot2(*sum, hi, ag + r * lda + j + 6);
            }
        }
        v16 scale = v_half(sc), low = v_half(mn);
        for (int r = 0; r < R; r++) {
            i16 total = two ? i_add(part[r], odd[r]) : part[r];
            v16 step = v_mul(scale, v_bcast(ascale[r * groups + g]));
            acc[r] = v_fma(i_float(total), step, acc[r]);
            acc[r] = v_fma(low, v_bcast(usum[r * groups + g]), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) v_store(out + r * PANEL, acc[r]);
}

static inline void tile_int4(const uint8_t *w, const uint16_t *sc, const uint16_t *mn,
                             long group, const q_inputs *in, long k, long i0, int rows,
                             float *out) {
    long groups = k / group;
    const int16_t *a = in->a + i0 * in->kq;
    const float *as = in->scale + i0 * groups, *us = in->sum + i0 * groups;
    switch (rows) { /* constant row counts, so each loop over rows unrolls */
    case 1: tile_int4_n(w, sc, mn, group, a, k, as, us, k, 1, out); break;
    case 2: tile_int4_n(w, sc, mn, group, a, k, as, us, k, 2, out); break;
    case 3: tile_int4_n(w, sc, mn, group, a, k, as, us, k, 3, out); break;
#if TILE_Q >= 8
    case 4: tile_int4_n(w, sc, mn, group, a, k, as, us, k, 4, out); break;
    case 5: tile_int4_n(w, sc, mn, group, a, k, as, us, k, 5, out); break;
    case 6: tile_int4_n(w, sc, mn, group, a, k, as, us, k, 6, out); break;
    case 7: tile_int4_n(w, sc, mn, group, a, k, as, us, k, 7, out); break;
    case 8: tile_int4_n(w, sc, mn, group, a, k, as, us, k, 8, out); break;
#endif
    }
}

/* The int8 panel against R rows of inputs (the row scales are applied by the caller):
 * per block of INT8_BLOCK features, each row's integer sum of codes times inputs, then
 * scaled by the block's input scale into the row's float total. */
static inline void tile_int8_n(const int8_t *w, const int16_t *a, long lda, const float *ascale,
                               long kq, long blocks, int R, float *out) {
    v16 acc[TILE_Q];
    i16 part[TILE_Q], odd[TILE_Q];
    int two = R <= 2;
    for (int r = 0; r < R; r++) acc[r] = v_zero();
    for (long b = 0; b < blocks; b++) {
        long j = b * INT8_BLOCK, end = j + INT8_BLOCK < kq ? j + INT8_BLOCK : kq;
        for (int r = 0; r < R; r++) part[r] = odd[r] = i_zero();
        for (; two && j + 4 <= end; j += 4, w += 4 * PANEL) {
            i16 c0 = i_widen(w), c1 = i_widen(w + 2 * PANEL);
            for (int r = 0; r < R; r++) {
                part[r] = i_dot2(part[r], c0, a + r * lda + j);
                odd[r] = i_dot2(odd[r], c1, a + r * lda + j + 2);
            }
        }
        for (; j < end; j += 2, w += 2 * PANEL) {
            i16 c = i_widen(w);
            for (int r = 0; r < R; r++) part[r] = i_dot2(part[r], c, a + r * lda + j);
        }
        for (int r = 0; r < R; r++) {
            i16 total = two ? i_add(part[r], odd[r]) : part[r];
            acc[r] = v_fma(i_float(total), v_bcast(ascale[r * blocks + b]), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) v_store(out + r * PANEL, acc[r]);
}

static inline void tile_int8(const int8_t *w, const q_inputs *in, long i0, int rows,
                             float *out) {
    const int16_t *a = in->a + i0 * in->kq;
    const float *as = in->scale + i0 * in->blocks;
    long kq = in->kq, nb = in->blocks;
    switch (rows) {
    case 1: tile_int8_n(w, a, kq, as, kq, nb, 1, out); break;
    case 2: tile_int8_n(w, a, kq, as, kq, nb, 2, out); break;
    case 3: tile_int8_n(w, a, kq, as, kq, nb, 3, out); break;
#if TILE_Q >= 8
    case 4: tile_int8_n(w, a, kq, as, kq, nb, 4, out); break;
    case 5: tile_int8_n(w, a, kq, as, kq, nb, 5, out); break;
    case 6: tile_int8_n(w, a, kq, as, kq, nb, 6, out); break;
    case 7: tile_int8_n(w, a, kq, as, kq, nb, 7, out); break;
    case 8: tile_int8_n(w, a, kq, as, kq, nb, 8, out); break;
#endif
    }
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* e^x lane by lane, within 2 ulp of expf for x in [-87.3, 88.7] (clamped there; a NaN
 * stays NaN): x = n ln 2 + r with |r| <= ln 2 / 2, e^r by its degree-7 Taylor-like
 * polynomial (minimax coefficients), times 2^n. libm's expf, one lane at a time, was a
 * third of a 4-row step's attention and silu (perf/LOG.md run 72). */
static inline v16 v_exp(v16 x) {
#if FERMI_SIMD == 512
    /* (min and max give their second operand where either is NaN: x last, a NaN stays) */
    x = _mm512_max_ps(_mm512_set1_ps(-87.3f), _mm512_min_ps(_mm512_set1_ps(88.7f), x));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
#else
    __m256 n2[2], r2[2];
    const __m256 *parts[2] = {&x.lo, &x.hi};
    for (int i = 0; i < 2; i++) {
        __m256 v = _mm256_max_ps(_mm256_set1_ps(-87.3f),
                                 _mm256_min_ps(_mm256_set1_ps(88.7f), *parts[i]));
        n2[i] = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r2[i] = _mm256_fnmadd_ps(n2[i], _mm256_set1_ps(0.693359375f), v);
        r2[i] = _mm256_fnmadd_ps(n2[i], _mm256_set1_ps(-2.12194440e-4f), r2[i]);
    }
    v16 r = {r2[0], r2[1]};
#endif
    v16 p = v_bcast(1.9875691500e-4f);
    p = v_fma(p, r, v_bcast(1.3981999507e-3f));
    p = v_fma(p, r, v_bcast(8.3334519073e-3f));
    p = v_fma(p, r, v_bcast(4.1665795894e-2f));
    p = v_fma(p, r, v_bcast(1.6666665459e-1f));
    p = v_fma(p, r, v_bcast(5.0000001201e-1f));
    p = v_fma(v_mul(p, r), r, v_add(r, v_bcast(1.0f)));
#if FERMI_SIMD == 512
    return _mm512_scalef_ps(p, n);
#else
    __m256i e0 = _mm256_slli_epi32(_mm256_cvtps_epi32(n2[0]), 23);
    __m256i e1 = _mm256_slli_epi32(_mm256_cvtps_epi32(n2[1]), 23);
    v16 out = {_mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p.lo), e0)),
               _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p.hi), e1))};
    return out;
#endif
}

static inline v16 v_div(v16 a, v16 b) {
#if FERMI_SIMD == 512
    return _mm512_div_ps(a, b);
#else
    v16 r = {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)};
    return r;
#endif
}

static inline v16 v_neg(v16 a) { return v_mul(a, v_bcast(-1.0f)); }

/* Row i of the prepared input: x's row as is, RMS-normalised with norm_w, or
 * silu(gate) * up of a [gate | up] row of 2k values. */
static void prepare(const float *x, long k, const float *norm_w, float eps, int act, float *u) {
    if (act == 1) {
        long j = 0;
        for (; j + PANEL <= k; j += PANEL) {
            v16 g = v_load(x + j);
            v16 s = v_div(g, v_add(v_bcast(1.0f), v_exp(v_neg(g))));
            v_store(u + j, v_mul(s, v_load(x + k + j)));
        }
        for (; j < k; j++) u[j] = silu(x[j]) * x[k + j];
    } else if (norm_w != NULL) {
        double ss = 0.0;
        for (long j = 0; j < k; j++) ss += (double)x[j] * x[j];
        float r = 1.0f / sqrtf((float)(ss / (double)k) + eps);
        for (long j = 0; j < k; j++) u[j] = x[j] * r * norm_w[j];
    } else {
        memcpy(u, x, (size_t)k * sizeof(float));
    }
}

/* Rounds n values u to int16 steps of their largest magnitude / 32767 (to nearest, ties
 * to even, as the SIMD conversions round) into a; returns the step, and their float sum
 * through *total. A block below 2^-64 is scaled up by 2^64 first (exactly: a power of
 * two), so that 32767 / top stays finite (it overflowed below ~1e-34, and the inputs
 * rounded to nonsense). A NaN or an infinity among the inputs (their sum NaN, or top
 * infinite) has no int16 step: the step is NaN, and so are the block's products. */
static float round_block(const float *u, long n, int16_t *a, float *total) {
    long whole = n / PANEL * PANEL, j;
    v16 sums = v_zero(), tops = v_zero();
    for (j = 0; j < whole; j += PANEL) {
        v16 v = v_load(u + j);
        tops = v_absmax(tops, v);
        sums = v_add(sums, v);
    }
    float top = v_hmax(tops), sum = 0.0f; /* (a NaN is caught by the sum below) */
    for (; j < n; j++) {
        float v = fabsf(u[j]);
        top = v > top ? v : top;
        sum += u[j];
    }
    *total = sum + v_sum(sums);
    if (!(top <= FLT_MAX) || *total != *total) {
        memset(a, 0, (size_t)n * sizeof *a);
        return NAN;
    }
    float up = top < 0x1p-64f ? 0x1p64f : 1.0f;
    float inv = top > 0.0f ? 32767.0f / (top * up) : 0.0f;
    v16 scale = v_bcast(inv), lift = v_bcast(up);
    for (j = 0; j < whole; j += PANEL)
        v_round16(v_mul(v_mul(v_load(u + j), lift), scale), a + j);
    for (; j < n; j++) a[j] = (int16_t)lrintf(u[j] * up * inv);
    return top / 32767.0f;
}

/* The int8 and int4 formats' inputs of m prepared rows u (k apart) into `in`: each block
 * of each row rounded by round_block. Nothing for fp16. */
static void quantize_inputs(const fermi_weight *w, const float *u, long k, long m,
                            q_inputs *in) {
    if (w->format == FORMAT_F16) return;
    long block = w->format == FORMAT_INT4 ? w->group : INT8_BLOCK;
    in->kq = (k + 1) / 2 * 2;
    in->blocks = (k + block - 1) / block;
    for (long i = 0; i < m; i++) {
        int16_t *a = in->a + i * in->kq;
        for (long b = 0; b < in->blocks; b++) {
            long j = b * block, n = j + block < k ? block : k - j, at = i * in->blocks + b;
            in->scale[at] = round_block(u + i * k + j, n, a + j, &in->sum[at]);
        }
        for (long j = k; j < in->kq; j++) a[j] = 0;
    }
}

/* Scratch for q_inputs of m rows of up to k features, in floats (blocks of 16 or more). */
static long q_floats(long m, long k) { return (m * (k + 1) + 1) / 2 + 2 * m * (k / 16 + 1); }

static q_inputs q_scratch(float *floats, long m, long k) {
    long halves = (m * (k + 1) + 1) / 2, blocks = m * (k / 16 + 1);
    q_inputs in = {(int16_t *)floats, floats + halves, floats + halves + blocks, 0, 0};
    return in;
}

/* Panels [p0, p1) of y = u . W^T (+ bias) (+ residual) for m prepared rows u (k apart);
 * in: quantize_inputs of u for int8 and int4. */
static void panels(const fermi_weight *w, const float *bias, long n, long k, const float *u,
                   const q_inputs *in, long m, const float *residual, long ldr, float *y,
                   long ldy, long p0, long p1) {
    float sums[TILE * PANEL];
    long tile_rows = w->format == FORMAT_F16 ? TILE : TILE_Q;
    long groups = w->format == FORMAT_INT4 ? k / w->group : 0;
    const float *row_scale = w->format == FORMAT_INT8 ? (const float *)w->scales : NULL;
    for (long p = p0; p < p1; p++) {
        long o0 = p * PANEL, width = n - o0 < PANEL ? n - o0 : PANEL;
        for (long i0 = 0; i0 < m; i0 += tile_rows) {
            int rows = (int)(m - i0 < tile_rows ? m - i0 : tile_rows);
            const float *ui = u + i0 * k;
            if (w->format == FORMAT_F16)
                tile_f16((const uint16_t *)w->codes + p * k * PANEL, ui, k, k, rows, sums);
            else if (w->format == FORMAT_INT8)
                tile_int8((const int8_t *)w->codes + p * ((k + 1) / 2 * 2) * PANEL, in, i0, rows,
                          sums);
            else
                tile_int4((const uint8_t *)w->codes + p * (k / 2) * PANEL,
                          (const uint16_t *)w->scales + p * groups * PANEL,
                          (const uint16_t *)w->mins + p * groups * PANEL, w->group, in, k, i0,
                          rows, sums);
            for (int r = 0; r < rows; r++) {
                long i = i0 + r;
                for (long q = 0; q < width; q++) {
                    float v = sums[r * PANEL + q];
                    if (row_scale != NULL) v *= row_scale[o0 + q];
                    if (bias != NULL) v += bias[o0 + q];
                    if (residual != NULL) v += residual[i * ldr + o0 + q];
                    y[i * ldy + o0 + q] = v;
                }
            }
        }
    }
}

/* Whether the kernels take this weight: a known format, and int4 groups of a multiple of
 * 16 features that divide k. */
static int weight_ok(const fermi_weight *w, long k) {
    if (w->format == FORMAT_F16 || w->format == FORMAT_INT8) return 1;
    return w->format == FORMAT_INT4 && w->group >= 16 && w->group % 16 == 0 && k % w->group == 0;
}

/* y[i, :n] = u_i . W^T (+ bias) (+ residual[i, :n]) for the m rows of x.
 *
 * x: m rows of ldx floats (the product's k inputs, or 2k for act == 1); y: m rows of ldy;
 * residual: m rows of ldr, or NULL (it may be y itself: each output is read, then written).
 * The panels are shared among `threads` OpenMP threads; each takes its panels through all
 * the rows, a tile of rows at a time. Returns 0, -1 when scratch memory is refused, -2 for
 * a weight the kernels do not take. */
int fermi_linear(const fermi_weight *w, const float *bias, long n, long k, const float *x,
                 long ldx, long m, const float *norm_w, float eps, int act,
                 const float *residual, long ldr, float *y, long ldy, int threads) {
    if (!weight_ok(w, k)) return -2;
    long scratch = w->format == FORMAT_F16 ? 0 : q_floats(m, k);
    float *u = malloc((size_t)(m * k + scratch) * sizeof(float));
    if (u == NULL) return -1;
    q_inputs in = q_scratch(u + m * k, m, k);
    for (long i = 0; i < m; i++) prepare(x + i * ldx, k, norm_w, eps, act, u + i * k);
    quantize_inputs(w, u, k, m, &in);
    long count = (n + PANEL - 1) / PANEL;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (long p = 0; p < count; p++)
        panels(w, bias, n, k, u, &in, m, residual, ldr, y, ldy, p, p + 1);
    free(u);
    return 0;
}

static void rms_norm_head(float *x, int d, const float *w, float eps) {
    double ss = 0.0;
    for (int j = 0; j < d; j++) ss += (double)x[j] * x[j];
    float r = 1.0f / sqrtf((float)(ss / d) + eps);
    for (int j = 0; j < d; j++) x[j] = x[j] * r * w[j];
}

/* Rotate-half rope on the first `rot` features; sin carries the sign (fermi.models.rope). */
static void rope_head(float *x, int rot, const float *cos, const float *sin) {
    float tmp[rot];
    int half = rot / 2;
    for (int j = 0; j < rot; j++) tmp[j] = x[j] * cos[j] + x[(j + half) % rot] * sin[j];
    memcpy(x, tmp, (size_t)rot * sizeof(float));
}

/* A KV cache holds float32 or (half) fp16 values; these read element i of one into a
 * float, 16 at a time or alone, and write n floats into one (rounded to the nearest fp16,
 * ties to even, as torch's conversion rounds). */
static inline v16 kv_vec(const void *base, long i, int half) {
    return half ? v_half((const uint16_t *)base + i) : v_load((const float *)base + i);
}
static inline float kv_one(const void *base, long i, int half) {
    return half ? _cvtsh_ss(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}
static inline void *kv_at(void *base, long i, int half) {
    return (char *)base + i * (half ? 2 : 4);
}
static void kv_write(void *base, long i, const float *x, int n, int half) {
    if (!half) {
        memcpy((float *)base + i, x, (size_t)n * sizeof(float));
        return;
    }
    uint16_t *out = (uint16_t *)base + i;
    int j = 0;
    for (; j + 8 <= n; j += 8)
        _mm_storeu_si128((__m128i *)(out + j),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + j), _MM_FROUND_TO_NEAREST_INT));
    for (; j < n; j++) out[j] = _cvtss_sh(x[j], _MM_FROUND_TO_NEAREST_INT);
}

/* This token's q/k norms (q_norm/k_norm non-NULL) and rope (rot > 0) on qkv ([h + 2 kv] * d
 * floats, q then k then v, in place), and its keys and values written at `pos` of the
 * slot's cache (k_cache/v_cache: [kv_heads][max_seq][d] float32, or fp16 where half). */
static void attend_prepare(float *qkv, int h, int kv, int d, const float *q_norm,
                           const float *k_norm, float eps, int rot, const float *cos,
                           const float *sin, void *k_cache, void *v_cache, long max_seq,
                           long pos, int half) {
    float *k = qkv + (long)h * d, *v = qkv + (long)(h + kv) * d;
    for (int i = 0; i < h + kv; i++) {
        float *head = qkv + (long)i * d;
        const float *nw = i < h ? q_norm : k_norm;
        if (nw != NULL) rms_norm_head(head, d, nw, eps);
        if (rot > 0) rope_head(head, rot, cos, sin);
    }
    for (int g = 0; g < kv; g++) {
        kv_write(k_cache, ((long)g * max_seq + pos) * d, k + (long)g * d, d, half);
        kv_write(v_cache, ((long)g * max_seq + pos) * d, v + (long)g * d, d, half);
    }
}

/* Lane i of the result: the sum of acc[i]'s lanes (16 horizontal sums at once, a
 * transposed reduction: each level halves the vectors and adds pairs of their halves). */
static inline v16 v_sums16(const v16 *acc) {
#if FERMI_SIMD == 512
    /* Level 1: z = [x.lo256 + x.hi256 | y.lo256 + y.hi256] of inputs taken in the order
     * 4(i % 4) + i / 4, which the last level's 4 x 4 transposition puts back in order. */
    __m512 z[8], w[4], v[2];
    for (int i = 0; i < 8; i++) {
        int a = 2 * i, b = a + 1;
        __m512 x = acc[(a % 4) * 4 + a / 4], y = acc[(b % 4) * 4 + b / 4];
        z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
    }
    /* Level 2: 128-bit lanes [z0 0+1, z0 2+3, z1 0+1, z1 2+3]: one input's 4 partials each */
    for (int i = 0; i < 4; i++)
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(z[2 * i], z[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(z[2 * i], z[2 * i + 1], 0xDD));
    /* Level 3: within each 128-bit lane, two inputs' 2 partials each */
    for (int i = 0; i < 2; i++)
        v[i] = _mm512_add_ps(_mm512_unpacklo_ps(w[2 * i], w[2 * i + 1]),
                             _mm512_unpackhi_ps(w[2 * i], w[2 * i + 1]));
    /* Level 4: four inputs' sums per 128-bit lane */
    __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(v[0]), _mm512_castps_pd(v[1]));
    __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(v[0]), _mm512_castps_pd(v[1]));
    return _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
#else
    __m256 half[2];
    for (int part = 0; part < 2; part++) {
        __m256 s[8], h[4];
        for (int i = 0; i < 8; i++) s[i] = _mm256_add_ps(acc[8 * part + i].lo, acc[8 * part + i].hi);
        for (int i = 0; i < 4; i++) h[i] = _mm256_hadd_ps(s[2 * i], s[2 * i + 1]);
        __m256 a = _mm256_hadd_ps(h[0], h[1]), b = _mm256_hadd_ps(h[2], h[3]);
        half[part] = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20),
                                   _mm256_permute2f128_ps(a, b, 0x31));
    }
    v16 r = {half[0], half[1]};
    return r;
#endif
}

#if FERMI_SIMD == 512
#define HEAD_CHUNK 4 /* vectors of a head's features weighted in registers at once */
#else
#define HEAD_CHUNK 1 /* (v16 is two registers here: 4 heads x 1 x 2 of the 16) */
#endif
#define PV_HEADS 4 /* query heads weighted together, one load of each value vector */

/* Into o (GH heads, d apart; CH vectors of features from feature c): each head's sum over
 * t of p[g * ldp + t] times the values' row t. One load of a value vector serves the GH
 * heads. (Constant GH, CH and half from the switch below: the accumulators stay in
 * registers.) */
static inline __attribute__((always_inline)) void weigh(const float *p, long ldp, long len,
                                                       const void *values, long c, long d,
                                                       int GH, int CH, int half, float *o) {
    v16 acc[PV_HEADS][HEAD_CHUNK];
    for (int g = 0; g < GH; g++)
        for (int i = 0; i < CH; i++) acc[g][i] = v_zero();
    for (long t = 0; t < len; t++) {
        v16 v[HEAD_CHUNK];
        for (int i = 0; i < CH; i++) v[i] = kv_vec(values, t * d + c + i * PANEL, half);
        for (int g = 0; g < GH; g++) {
            v16 w = v_bcast(p[g * ldp + t]);
            for (int i = 0; i < CH; i++) acc[g][i] = v_fma(w, v[i], acc[g][i]);
        }
    }
    for (int g = 0; g < GH; g++)
        for (int i = 0; i < CH; i++) v_store(o + g * d + i * PANEL, acc[g][i]);
}

#define WEIGH(G, C, H)                                                                      \
    case G * 8 + C: weigh(p, ldp, len, values, c, d, G, C, H, o); break;
#if HEAD_CHUNK == 4
#define WEIGH_HEADS(G, H) WEIGH(G, 1, H) WEIGH(G, 2, H) WEIGH(G, 3, H) WEIGH(G, 4, H)
#else
#define WEIGH_HEADS(G, H) WEIGH(G, 1, H)
#endif
static void weigh_any(const float *p, long ldp, long len, const void *values, long c, long d,
                      int GH, int CH, int half, float *o) {
    if (half) {
        switch (GH * 8 + CH) { WEIGH_HEADS(1, 1) WEIGH_HEADS(2, 1) WEIGH_HEADS(3, 1) WEIGH_HEADS(4, 1) }
    } else {
        switch (GH * 8 + CH) { WEIGH_HEADS(1, 0) WEIGH_HEADS(2, 0) WEIGH_HEADS(3, 0) WEIGH_HEADS(4, 0) }
    }
}

/* Part of one token's attention: the G query heads q (G * d floats) that share a KV head,
 * over `len` of its keys and values (d floats each, in a row). Per head g: the largest
 * score m[g], the exponentials' sum l[g] = sum e^(score - m[g]), and the values weighted by
 * those exponentials, not yet divided by l[g], in o + g * d (attend_merge finishes a
 * head from its parts). s: G * len floats of scratch. Each key and value is read once for
 * the G heads (3 to 8 in the models here): read once per head, a long context's cache
 * came from memory up to G times (perf/LOG.md run 73). Where d is a multiple of 16 (every
 * head size the models have): 16 keys at a time, each key's products with a head's q
 * adding up lane by lane in its own register, v_sums16 finishing the 16 dot products (one
 * horizontal sum per key cost more than its products); values weighed by weigh(). */
static inline __attribute__((always_inline)) void
attend_part_kv(const float *q, int G, const void *keys, const void *values, long len, int d,
               float scale, float *s, float *m, float *l, float *o, int half) {
    int vec = d % PANEL == 0;
    for (int g = 0; g < G; g++) m[g] = -INFINITY;
    long t = 0;
    if (vec) {
        for (; t + PANEL <= len; t += PANEL) {
            for (int g = 0; g < G; g++) {
                const float *qg = q + (long)g * d;
                v16 acc[PANEL];
                for (int i = 0; i < PANEL; i++) acc[i] = v_zero();
                for (int c = 0; c < d; c += PANEL) {
                    v16 qc = v_load(qg + c);
                    for (int i = 0; i < PANEL; i++)
                        acc[i] = v_fma(qc, kv_vec(keys, (t + i) * d + c, half), acc[i]);
                }
                v16 sc = v_mul(v_sums16(acc), v_bcast(scale));
                v_store(s + g * len + t, sc);
                /* (a NaN score is passed over here, as below: its exponential makes the
                 * sum and the output NaN) */
                float top = v_hmax(sc);
                if (top > m[g]) m[g] = top;
            }
        }
    }
    for (int g = 0; g < G; g++) {
        const float *qg = q + (long)g * d;
        for (long u = t; u < len; u++) {
            float dot = 0.0f;
            for (int j = 0; j < d; j++) dot += qg[j] * kv_one(keys, u * d + j, half);
            s[g * len + u] = dot * scale;
            if (s[g * len + u] > m[g]) m[g] = s[g * len + u];
        }
    }
    for (int g = 0; g < G; g++) {
        float *sg = s + g * len, total = 0.0f;
        /* A part whose scores are all -inf (or NaN) has m = -inf: its exponentials are
         * taken from 0 instead (-inf's tiny or 0, a NaN's NaN), and the part weighs
         * e^(-inf - top) = 0 in attend_merge. (From m itself, e^(-inf + inf) made them NaN:
         * a key of -inf score alone in a part, which the whole row's softmax passes over,
         * made the head NaN.) */
        float top = m[g] == -INFINITY ? 0.0f : m[g];
        long u = 0;
        v16 totals = v_zero();
        for (; u + PANEL <= len; u += PANEL) {
            v16 e = v_exp(v_add(v_load(sg + u), v_bcast(-top)));
            v_store(sg + u, e);
            totals = v_add(totals, e);
        }
        for (; u < len; u++) {
            sg[u] = expf(sg[u] - top);
            total += sg[u];
        }
        l[g] = total + v_sum(totals);
    }
    if (vec) {
        for (int g0 = 0; g0 < G; g0 += PV_HEADS) {
            int gh = G - g0 < PV_HEADS ? G - g0 : PV_HEADS;
            for (int c = 0; c < d; c += HEAD_CHUNK * PANEL) {
                int n = (d - c) / PANEL < HEAD_CHUNK ? (d - c) / PANEL : HEAD_CHUNK;
                weigh_any(s + g0 * len, len, len, values, c, d, gh, n, half,
                          o + (long)g0 * d + c);
            }
        }
        return;
    }
    for (int g = 0; g < G; g++) {
        float *og = o + (long)g * d;
        for (int j = 0; j < d; j++) og[j] = 0.0f;
        for (long u = 0; u < len; u++) {
            float p = s[g * len + u];
            for (int j = 0; j < d; j++) og[j] += p * kv_one(values, u * d + j, half);
        }
    }
}

/* attend_part_kv over a float32 (half 0) or fp16 (half 1) cache, each compiled apart. */
static void attend_part(const float *q, int G, const void *keys, const void *values, long len,
                        int d, float scale, float *s, float *m, float *l, float *o, int half) {
    if (half)
        attend_part_kv(q, G, keys, values, len, d, scale, s, m, l, o, 1);
    else
        attend_part_kv(q, G, keys, values, len, d, scale, s, m, l, o, 0);
}

/* Floats attend_part leaves for one part of G heads: m, l, then o. */
static inline long part_floats(int G, int d) { return (long)G * (d + 2); }

/* One head group's output (G * d floats into out) from its `parts` parts (attend_part's
 * m, l, o, part_floats apart): softmax over all the parts' keys, each part's sums rescaled
 * to the largest score of all. A part with no keys (m = -inf, l = 0) adds nothing. */
static void attend_merge(const float *part, int parts, int G, int d, float *out) {
    long stride = part_floats(G, d);
    for (int g = 0; g < G; g++) {
        float top = -INFINITY, total = 0.0f;
        for (int p = 0; p < parts; p++)
            if (part[p * stride + g] > top) top = part[p * stride + g];
        float *og = out + (long)g * d;
        for (int j = 0; j < d; j++) og[j] = 0.0f;
        for (int p = 0; p < parts; p++) {
            const float *pp = part + p * stride;
            if (pp[G + g] == 0.0f) continue; /* no keys (m = -inf): e^(-inf - top) * 0 */
            /* (1 for the part of the largest score; NaN where every score is -inf or NaN:
             * top = -inf, as softmax's output is then NaN) */
            float w = expf(pp[g] - top);
            total += w * pp[G + g];
            const float *o = pp + 2 * G + (long)g * d;
#pragma omp simd
            for (int j = 0; j < d; j++) og[j] += w * o[j];
        }
        float inv = 1.0f / total;
#pragma omp simd
        for (int j = 0; j < d; j++) og[j] *= inv;
    }
}

/* One token's attention for one sequence, as fermi.models.decoder.Attention computes it:
 * attend_prepare, then each query head over keys first..pos of its KV head. out: h * d
 * floats. Returns 0, or -1 when scratch memory is refused. */
int fermi_attend_row(float *qkv, int h, int kv, int d, const float *q_norm,
                     const float *k_norm, float eps, int rot, const float *cos,
                     const float *sin, void *k_cache, void *v_cache, long max_seq, long pos,
                     long first, float scale, float *out, int threads, int half) {
    (void)threads;
    attend_prepare(qkv, h, kv, d, q_norm, k_norm, eps, rot, cos, sin, k_cache, v_cache, max_seq,
                   pos, half);
    long len = pos + 1 - first;
    int group = h / kv;
    float *scores = malloc(((size_t)group * len + part_floats(group, d)) * sizeof(float));
    if (scores == NULL) return -1;
    float *part = scores + group * len;
    for (int g = 0; g < kv; g++) {
        long base = ((long)g * max_seq + first) * d;
        attend_part(qkv + (long)g * group * d, group, kv_at(k_cache, base, half),
                    kv_at(v_cache, base, half), len, d, scale, scores, part, part + group,
                    part + 2 * group, half);
        attend_merge(part, 1, group, d, out + (long)g * group * d);
    }
    free(scores);
    return 0;
}

/* The layers of a pre-norm decoder (Llama, Qwen2/3, SmolLM2's shape), for one token of one
 * sequence: what fermi.models.decoder.DecoderLayer._one_row does, in one call per step. */
typedef struct {
    fermi_weight w[4];            /* qkv_proj, o_proj, gate_up_proj, down_proj */
    const float *bias[4];         /* or NULL */
    const float *norm1, *norm2;   /* input_layernorm, post_attention_layernorm */
    const float *q_norm, *k_norm; /* or NULL */
    void *k_cache, *v_cache;      /* [slots][kv_heads][max_seq][head_dim], as kv_half says */
    long window;                  /* 0: none */
    long rope;                    /* 0: none, 1: the step's first table, 2: its second */
} fermi_layer;

typedef struct {
    long layers, hidden, heads, kv_heads, head_dim, inter, rot, max_seq;
    long kv_half; /* the caches hold fp16 (1) or float32 (0) */
    float eps, scale;
    const fermi_layer *layer;
} fermi_stack;

int fermi_stack_size(void) {
    return ((int)sizeof(fermi_stack) * 1000 + (int)sizeof(fermi_layer)) * 1000 +
           (int)sizeof(fermi_weight);
}

/* A barrier for the threads of one decode step. Between the phases of a step (a few tens
 * of microseconds each) a waiting thread spins, then yields its core: OpenMP's own barrier
 * under OMP_WAIT_POLICY=PASSIVE (fermi's default, for torch's ops between steps) sleeps in
 * the kernel and is woken at every phase, which costs more than a second thread gains. */
typedef struct {
    atomic_int arrived;
    atomic_int phase;
} team_barrier;

#define SPINS 20000

static void team_wait(team_barrier *b, int n, int *phase) {
    int next = *phase + 1;
    *phase = next;
    if (n == 1) return;
    if (atomic_fetch_add_explicit(&b->arrived, 1, memory_order_acq_rel) == n - 1) {
        atomic_store_explicit(&b->arrived, 0, memory_order_relaxed);
        atomic_store_explicit(&b->phase, next, memory_order_release);
        return;
    }
    for (long spins = 0; atomic_load_explicit(&b->phase, memory_order_acquire) != next; spins++) {
        if (spins < SPINS)
            _mm_pause();
        else
            sched_yield();
    }
}

/* This thread's share [*p0, *p1) of `count` items. */
static void share(long count, int t, int n, long *p0, long *p1) {
    *p0 = count * t / n;
    *p1 = count * (t + 1) / n;
}

/* Parts each (row, KV head) pair's keys are split into for the attention phase, so that
 * the threads get even shares (one row of SmolLM2 has 3 pairs for 2 threads; its long
 * context is read at the speed of one thread for a third of the phase): the fewest, up to
 * 8, that make the jobs a multiple of the threads or at least 8 a thread. */
static long attention_parts(long pairs, int threads) {
    long p = 1;
    while (p < 8 && (pairs * p) % threads != 0 && pairs * p < 8L * threads) p++;
    return p;
}

/* x ([rows][hidden] floats: each row's token embedding) becomes the last layer's output.
 * Row r is the token at positions[r] of the sequence in cache slot slots[r]; cos/sin: the
 * rows' rope values ([rows][rot] floats each; table 2 may be NULL). Each product reads its
 * weight once for every TILE rows. The step is one OpenMP region of `threads` threads that
 * share each product's panels and the attention's (row, KV head, part of the keys) jobs
 * (attend_part; merged by each thread as the o product's inputs), meeting at a spinning
 * barrier between phases. Returns 0, -1 when scratch memory is refused, -2 for a weight
 * the kernels do not take. */
int fermi_decode_rows(const fermi_stack *s, float *x, long rows, const long *slots,
                      const long *positions, const float *cos1, const float *sin1,
                      const float *cos2, const float *sin2, int threads) {
    long h = s->heads, kv = s->kv_heads, d = s->head_dim, hid = s->hidden, inter = s->inter;
    long nqkv = (h + 2 * kv) * d, rot = s->rot, group = h / kv;
    int half = s->kv_half != 0;
    long widest = hid > inter ? hid : inter;
    if (h * d > widest) widest = h * d;
    for (long i = 0; i < s->layers; i++) {
        const fermi_layer *l = &s->layer[i];
        if (!weight_ok(&l->w[0], hid) || !weight_ok(&l->w[1], h * d) ||
            !weight_ok(&l->w[2], hid) || !weight_ok(&l->w[3], inter))
            return -2;
    }
    if (threads < 1) threads = 1;
    long parts = attention_parts(rows * kv, threads), pf = part_floats((int)group, (int)d);
    long longest = 1;
    for (long r = 0; r < rows; r++)
        if (positions[r] + 1 > longest) longest = positions[r] + 1;
    float *shared = malloc((size_t)rows * (nqkv + kv * parts * pf + 2 * inter) * sizeof(float));
    if (shared == NULL) return -1;
    float *qkv = shared, *att = qkv + rows * nqkv, *gu = att + rows * kv * parts * pf;
    team_barrier barrier;
    atomic_init(&barrier.arrived, 0);
    atomic_init(&barrier.phase, 0);
    atomic_int failed;
    atomic_init(&failed, 0);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads(), phase = 0;
        /* Each thread's own prepared rows, their int4 group sums and attention scores (a
         * head group's, over at most the longest row's keys). */
        long scratch = rows * widest + q_floats(rows, widest) + group * longest;
        float *u = malloc((size_t)scratch * sizeof(float));
        if (u == NULL) atomic_store(&failed, 1);
        team_wait(&barrier, n, &phase);
        if (atomic_load(&failed) == 0) {
            float *scores = u + rows * widest + q_floats(rows, widest);
            long p0, p1;
            for (long i = 0; i < s->layers; i++) {
                const fermi_layer *l = &s->layer[i];
                /* q/k/v of every row, the input norm inside */
                for (long r = 0; r < rows; r++)
                    prepare(x + r * hid, hid, l->norm1, s->eps, 0, u + r * hid);
                share((nqkv + PANEL - 1) / PANEL, t, n, &p0, &p1);
                q_inputs in0 = q_scratch(u + rows * widest, rows, hid);
                quantize_inputs(&l->w[0], u, hid, rows, &in0);
                panels(&l->w[0], l->bias[0], nqkv, hid, u, &in0, rows, NULL, 0, qkv, nqkv, p0, p1);
                team_wait(&barrier, n, &phase);
                /* q/k norms, rope and the cache write of each row */
                const float *cos = l->rope == 2 ? cos2 : cos1;
                const float *sin = l->rope == 2 ? sin2 : sin1;
                share(rows, t, n, &p0, &p1);
                for (long r = p0; r < p1; r++) {
                    long base = slots[r] * kv * s->max_seq * d;
                    attend_prepare(qkv + r * nqkv, (int)h, (int)kv, (int)d, l->q_norm, l->k_norm,
                                   s->eps, l->rope ? (int)rot : 0, l->rope ? cos + r * rot : NULL,
                                   l->rope ? sin + r * rot : NULL, kv_at(l->k_cache, base, half),
                                   kv_at(l->v_cache, base, half), s->max_seq, positions[r], half);
                }
                team_wait(&barrier, n, &phase);
                /* attention: (row, KV head, part of its keys) jobs */
                share(rows * kv * parts, t, n, &p0, &p1);
                for (long job = p0; job < p1; job++) {
                    long r = job / (kv * parts), g = job / parts % kv, p = job % parts;
                    long pos = positions[r];
                    long first = l->window > 0 && pos - l->window + 1 > 0 ? pos - l->window + 1 : 0;
                    long len = pos + 1 - first, k0 = first + len * p / parts;
                    long k1 = first + len * (p + 1) / parts;
                    long base = slots[r] * kv * s->max_seq * d + (g * s->max_seq + k0) * d;
                    float *part = att + job * pf;
                    attend_part(qkv + r * nqkv + g * group * d, (int)group,
                                kv_at(l->k_cache, base, half), kv_at(l->v_cache, base, half),
                                k1 - k0, (int)d, s->scale, scores, part, part + group,
                                part + 2 * group, half);
                }
                team_wait(&barrier, n, &phase);
                /* output product (its inputs: each row's parts merged), residual added in place */
                for (long r = 0; r < rows; r++)
                    for (long g = 0; g < kv; g++)
                        attend_merge(att + (r * kv + g) * parts * pf, (int)parts, (int)group,
                                     (int)d, u + r * h * d + g * group * d);
                share((hid + PANEL - 1) / PANEL, t, n, &p0, &p1);
                q_inputs in1 = q_scratch(u + rows * widest, rows, h * d);
                quantize_inputs(&l->w[1], u, h * d, rows, &in1);
                panels(&l->w[1], l->bias[1], hid, h * d, u, &in1, rows, x, hid, x, hid, p0, p1);
                team_wait(&barrier, n, &phase);
                /* gate and up, the post-attention norm inside */
                for (long r = 0; r < rows; r++)
                    prepare(x + r * hid, hid, l->norm2, s->eps, 0, u + r * hid);
                share((2 * inter + PANEL - 1) / PANEL, t, n, &p0, &p1);
                q_inputs in2 = q_scratch(u + rows * widest, rows, hid);
                quantize_inputs(&l->w[2], u, hid, rows, &in2);
                panels(&l->w[2], l->bias[2], 2 * inter, hid, u, &in2, rows, NULL, 0, gu, 2 * inter,
                       p0, p1);
                team_wait(&barrier, n, &phase);
                /* down, silu(gate) * up inside, residual added in place */
                for (long r = 0; r < rows; r++)
                    prepare(gu + r * 2 * inter, inter, NULL, 0.0f, 1, u + r * inter);
                share((hid + PANEL - 1) / PANEL, t, n, &p0, &p1);
                q_inputs in3 = q_scratch(u + rows * widest, rows, inter);
                quantize_inputs(&l->w[3], u, inter, rows, &in3);
                panels(&l->w[3], l->bias[3], hid, inter, u, &in3, rows, x, hid, x, hid, p0, p1);
                team_wait(&barrier, n, &phase);
            }
        }
        free(u);
    }
    free(shared);
    return atomic_load(&failed) == 0 ? 0 : -1;
}
