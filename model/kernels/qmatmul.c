/* Matrix products on quantized weights with float32 activations.
 *
 * y[M, N] = x[M, K] @ W[N, K]^T, where W is kept in blocks of 32 values along K:
 *
 *   q4: 16 bytes per block; byte j holds value j (low nibble) and value j + 16
 *       (high nibble), 0..15; W = d * q + m      (GGUF Q4_0, Q4_1 and Q4_K map here)
 *   q8: 32 signed bytes per block;  W = d * q + m, m optional  (Q8_0, Q5_x map here)
 *
 * d and m are float32, one per block: (N, K / 32). The dequantized weight of a
 * block is exactly d * q + m in float32, as the reference dequantizers compute it;
 * the product sums d * (q . x) + m * sum(x) per block, so activations stay float32
 * and only the order of the float additions differs from dequantize-then-matmul.
 *
 * Rows of W are split between threads (OpenMP); up to MT rows of x share each
 * decoded weight block, so a batch of decodes reads the weights once.
 *
 * Builds (model/kernels/__init__.py): generic C; AVX2 + FMA (8 lanes); and AVX-512
 * F/BW/VL, which is the AVX2 code with the row kernels, the tile dequantizer and
 * the micro-kernels 16 lanes wide (QMM_AVX512 below).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_max_threads(void) { return 1; }
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QMM_AVX2 1
#else
#define QMM_AVX2 0
#endif
/* The avx512 build: the AVX2 code throughout, with 16-lane row and tile kernels. */
#if QMM_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define QMM_AVX512 1
#else
#define QMM_AVX512 0
#endif

#define QK 32
#define MT 4 /* rows of x per pass over a weight row */

int qmm_simd_width(void) { return QMM_AVX512 ? 16 : QMM_AVX2 ? 8 : 1; }

/* float16 -> float32 (exact). */
/* How far ahead of the block being decoded the kernels ask for weight bytes. Each
 * thread streams its share of a layer once per token from memory; the hardware
 * prefetchers alone left the q4 kernels at ~5 GB/s of the ~15 GB/s two cores draw
 * (measured on an AMD EPYC, the default model's decode step: 18.3 ms without, 15.5 ms
 * at 512 bytes; 512 to 2048 bytes within 3% of each other, 256 worse). Prefetching
 * past the end of an array is harmless. */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 1024
#endif
#define PREFETCH(p) __builtin_prefetch((const char *)(p) + PREFETCH_BYTES, 0, 3)
/* The scales of row `row` of an (N, nb) scale array (and of m, when present). */
#define PREFETCH_SCALES(d, m, f16, row, nb)                                            \
    do {                                                                               \
        const size_t at_ = (size_t)((row) * (nb)) * ((f16) ? 2 : 4);                  \
        __builtin_prefetch((const char *)(d) + at_, 0, 3);                             \
        if (m) __builtin_prefetch((const char *)(m) + at_, 0, 3);                      \
    } while (0)

static inline float f16_to_f32(uint16_t h) {
#if QMM_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else {
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7F800000 | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* Row `row` of an (N, nb) scale array as float32: a pointer into it when it is
 * float32, else its float16 values converted into buf (nb floats). NULL stays NULL.
 * Scales kept in float16 (exact for the GGUF types whose scales are float16) cut the
 * bytes a decode streams per q4 block from 24 to 20. */
static inline const float *row_scales(const void *s, int f16, int64_t row, int64_t nb,
                                      float *buf) {
    if (!s) return NULL;
    if (!f16) return (const float *)s + row * nb;
    const uint16_t *h = (const uint16_t *)s + row * nb;
    int64_t b = 0;
#if QMM_AVX2
    for (; b + 8 <= nb; b += 8)
        _mm256_storeu_ps(buf + b, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + b))));
#endif
    for (; b < nb; b++) buf[b] = f16_to_f32(h[b]);
    return buf;
}

/* Per-block sums of x: xs[M, K / 32]. */
static void block_sums(const float *x, int64_t M, int64_t K, float *xs) {
    const int64_t nb = K / QK;
    for (int64_t i = 0; i < M; i++)
        for (int64_t b = 0; b < nb; b++) {
            const float *p = x + i * K + b * QK;
            float s = 0.f;
            for (int j = 0; j < QK; j++) s += p[j];
            xs[i * nb + b] = s;
        }
}



#if QMM_AVX2
static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* e^x for 8 floats within about 2 ulp of expf (PyTorch's vectorised exp is not
 * bit-equal to expf either): x = n ln 2 + r with |r| <= ln 2 / 2, a degree-6
 * polynomial for e^r (the classic Cephes coefficients), then 2^n in the exponent.
 * Inputs below -87.3 give 0 (expf gives a subnormal there, or 0), above 88.7 +inf;
 * NaN stays NaN. */
static inline __m256 exp8(__m256 x) {
    const __m256 hi = _mm256_set1_ps(88.72283905206835f), lo = _mm256_set1_ps(-87.33654475f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ), over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
    const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    __m256 v = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), v); /* ln 2 in two parts */
    v = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), v);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(v, v), _mm256_add_ps(v, _mm256_set1_ps(1.f)));
    /* 2^n for n in [-126, 128]: n = 128 (x near 88.7) is split as 2^127 * 2 */
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i top = _mm256_cmpeq_epi32(ni, _mm256_set1_epi32(128));
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_sub_epi32(ni, _mm256_and_si256(top, _mm256_set1_epi32(1))),
                         _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    y = _mm256_blendv_ps(y, _mm256_add_ps(y, y), _mm256_castsi256_ps(top));
    y = _mm256_andnot_ps(under, y);
    y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), over);
    return _mm256_blendv_ps(y, x, nan);
}

/* 16 bytes of nibbles -> the block's 32 values as 4 x 8 floats: w[0] = values 0..7,
 * w[1] = 16..23, w[2] = 8..15, w[3] = 24..31 (see Q4_ORDER). One byte shuffle per
 * 8 bytes puts each byte alone in a 32-bit lane; its two nibbles are then a mask and
 * a shift away. */
static inline void decode_q4(const uint8_t *q, __m256 w[4]) {
    const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)q));
    const __m256i lo8 = _mm256_setr_epi8(0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1, -1, -1,
                                         4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7, -1, -1, -1);
    const __m256i hi8 = _mm256_add_epi8(lo8, _mm256_set1_epi32(8));
    const __m256i mask = _mm256_set1_epi32(0x0F);
    const __m256i a = _mm256_shuffle_epi8(bytes, lo8), b = _mm256_shuffle_epi8(bytes, hi8);
    w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(a, mask));
    w[1] = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4));
    w[2] = _mm256_cvtepi32_ps(_mm256_and_si256(b, mask));
    w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}
/* Offsets into a block of x matching w[0..3] of each decoder. */
static const int Q4_ORDER[4] = {0, 16, 8, 24};
static const int Q8_ORDER[4] = {0, 8, 16, 24};

static inline void decode_q8(const int8_t *q, __m256 w[4]) {
    for (int k = 0; k < 4; k++) {
        const __m128i b = _mm_loadl_epi64((const __m128i *)(q + 8 * k));
        w[k] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    }
}

#if QMM_AVX512
/* 16 bytes of nibbles -> the block's 32 values as 2 x 16 floats: each byte widened to
 * a 32-bit lane, its low nibble is value j (w[0]), its high nibble value j + 16 (w[1]). */
static inline void decode_q4_16(const uint8_t *q, __m512 w[2]) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    w[0] = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0x0F)));
    w[1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}

static inline void decode_q8_16(const int8_t *q, __m512 w[2]) {
    w[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
    w[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16))));
}

/* As the AVX2 kernels below, 16 lanes wide: a block is two vectors of x. */
#define ROW_BLOCK16(ACC, B_, DECODE, BYTES, MT_)                                        \
    do {                                                                                \
        __m512 w[2];                                                                    \
        DECODE(qrow + (B_) * (BYTES), w);                                               \
        PREFETCH(qrow + (B_) * (BYTES));                                                \
        const __m512 d = _mm512_set1_ps(drow[B_]);                                      \
        for (int i = 0; i < MT_; i++) {                                                 \
            const float *xb = x + i * K + (B_) * QK;                                    \
            __m512 t = _mm512_mul_ps(w[0], _mm512_loadu_ps(xb));                        \
            t = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xb + 16), t);                     \
            ACC[i] = _mm512_fmadd_ps(d, t, ACC[i]);                                     \
        }                                                                               \
    } while (0)

#define ROW_KERNEL16(NAME, QTYPE, DECODE, BYTES, MT_)                                   \
    static inline void NAME(const float *x, int64_t K, const QTYPE *qrow,              \
                            const float *drow, float *out) {                           \
        const int64_t nb = K / QK;                                                      \
        __m512 even[MT_], odd[MT_];                                                     \
        for (int i = 0; i < MT_; i++) even[i] = odd[i] = _mm512_setzero_ps();           \
        int64_t b = 0;                                                                  \
        for (; b + 2 <= nb; b += 2) {                                                   \
            ROW_BLOCK16(even, b, DECODE, BYTES, MT_);                                   \
            ROW_BLOCK16(odd, b + 1, DECODE, BYTES, MT_);                                \
        }                                                                               \
        if (b < nb) ROW_BLOCK16(even, b, DECODE, BYTES, MT_);                           \
        for (int i = 0; i < MT_; i++)                                                   \
            out[i] = _mm512_reduce_add_ps(_mm512_add_ps(even[i], odd[i]));              \
    }
ROW_KERNEL16(row_q4_1, uint8_t, decode_q4_16, QK / 2, 1)
ROW_KERNEL16(row_q4_2, uint8_t, decode_q4_16, QK / 2, 2)
ROW_KERNEL16(row_q4_3, uint8_t, decode_q4_16, QK / 2, 3)
ROW_KERNEL16(row_q4_4, uint8_t, decode_q4_16, QK / 2, 4)
ROW_KERNEL16(row_q8_1, int8_t, decode_q8_16, QK, 1)
ROW_KERNEL16(row_q8_2, int8_t, decode_q8_16, QK, 2)
ROW_KERNEL16(row_q8_3, int8_t, decode_q8_16, QK, 3)
ROW_KERNEL16(row_q8_4, int8_t, decode_q8_16, QK, 4)

/* Two weight rows against one row of x, each with its own even- and odd-block sums. */
#define ROW2_BLOCK16(B_, DECODE, BYTES, ACCA, ACCB)                                       \
    do {                                                                                 \
        __m512 wa[2], wb[2];                                                             \
        DECODE(qa + (B_) * (BYTES), wa);                                                 \
        DECODE(qb + (B_) * (BYTES), wb);                                                 \
        PREFETCH(qb + (B_) * (BYTES));                                                   \
        const __m512 x0 = _mm512_loadu_ps(x + (B_) * QK);                                \
        const __m512 x1 = _mm512_loadu_ps(x + (B_) * QK + 16);                           \
        const __m512 ta = _mm512_fmadd_ps(wa[1], x1, _mm512_mul_ps(wa[0], x0));          \
        const __m512 tb = _mm512_fmadd_ps(wb[1], x1, _mm512_mul_ps(wb[0], x0));          \
        ACCA = _mm512_fmadd_ps(_mm512_set1_ps(da[B_]), ta, ACCA);                        \
        ACCB = _mm512_fmadd_ps(_mm512_set1_ps(db[B_]), tb, ACCB);                        \
    } while (0)

#define ROW2_KERNEL16(NAME, QTYPE, DECODE, BYTES)                                        \
    static inline void NAME(const float *x, int64_t K, const QTYPE *qa, const QTYPE *qb, \
                            const float *da, const float *db, float out[2]) {            \
        const int64_t nb = K / QK;                                                       \
        __m512 a0 = _mm512_setzero_ps(), b0 = a0, a1 = a0, b1 = a0;                      \
        int64_t b = 0;                                                                   \
        for (; b + 2 <= nb; b += 2) {                                                    \
            ROW2_BLOCK16(b, DECODE, BYTES, a0, b0);                                      \
            ROW2_BLOCK16(b + 1, DECODE, BYTES, a1, b1);                                  \
        }                                                                                \
        if (b < nb) ROW2_BLOCK16(b, DECODE, BYTES, a0, b0);                              \
        out[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));                            \
        out[1] = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));                            \
    }
ROW2_KERNEL16(row2_q4, uint8_t, decode_q4_16, QK / 2)
ROW2_KERNEL16(row2_q8, int8_t, decode_q8_16, QK)
#else
/* One weight row against MT_ rows of x: out[i] = sum over blocks of d * (q . x_i).
 * MT_ is a compile-time constant in each instance, so the accumulators live in
 * registers; even and odd blocks use separate ones, so that the accumulation's
 * dependency chain does not set the pace when few rows share a block. */
#define ROW_BLOCK(ACC, B_, DECODE, BYTES, ORDER, MT_)                                   \
    do {                                                                                \
        __m256 w[4];                                                                    \
        DECODE(qrow + (B_) * (BYTES), w);                                               \
        PREFETCH(qrow + (B_) * (BYTES));                                                \
        const __m256 d = _mm256_set1_ps(drow[B_]);                                      \
        for (int i = 0; i < MT_; i++) {                                                 \
            const float *xb = x + i * K + (B_) * QK;                                    \
            __m256 t = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb + ORDER[0]));             \
            t = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + ORDER[1]), t);               \
            t = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + ORDER[2]), t);               \
            t = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + ORDER[3]), t);               \
            ACC[i] = _mm256_fmadd_ps(d, t, ACC[i]);                                     \
        }                                                                               \
    } while (0)

#define ROW_KERNEL(NAME, QTYPE, DECODE, BYTES, ORDER, MT_)                              \
    static inline void NAME(const float *x, int64_t K, const QTYPE *qrow,              \
                            const float *drow, float *out) {                           \
        const int64_t nb = K / QK;                                                      \
        __m256 even[MT_], odd[MT_];                                                     \
        for (int i = 0; i < MT_; i++) even[i] = odd[i] = _mm256_setzero_ps();           \
        int64_t b = 0;                                                                  \
        for (; b + 2 <= nb; b += 2) {                                                   \
            ROW_BLOCK(even, b, DECODE, BYTES, ORDER, MT_);                              \
            ROW_BLOCK(odd, b + 1, DECODE, BYTES, ORDER, MT_);                           \
        }                                                                               \
        if (b < nb) ROW_BLOCK(even, b, DECODE, BYTES, ORDER, MT_);                      \
        for (int i = 0; i < MT_; i++) out[i] = hsum(_mm256_add_ps(even[i], odd[i]));    \
    }
ROW_KERNEL(row_q4_1, uint8_t, decode_q4, QK / 2, Q4_ORDER, 1)
ROW_KERNEL(row_q4_2, uint8_t, decode_q4, QK / 2, Q4_ORDER, 2)
ROW_KERNEL(row_q4_3, uint8_t, decode_q4, QK / 2, Q4_ORDER, 3)
ROW_KERNEL(row_q4_4, uint8_t, decode_q4, QK / 2, Q4_ORDER, 4)
ROW_KERNEL(row_q8_1, int8_t, decode_q8, QK, Q8_ORDER, 1)
ROW_KERNEL(row_q8_2, int8_t, decode_q8, QK, Q8_ORDER, 2)
ROW_KERNEL(row_q8_3, int8_t, decode_q8, QK, Q8_ORDER, 3)
ROW_KERNEL(row_q8_4, int8_t, decode_q8, QK, Q8_ORDER, 4)

/* Two weight rows against one row of x: each x load serves both, and the two rows'
 * sums are independent chains (a batch-1 decode is bound by the decoding of blocks). */
#define ROW2_KERNEL(NAME, QTYPE, DECODE, BYTES, ORDER)                                   \
    static inline void NAME(const float *x, int64_t K, const QTYPE *qa, const QTYPE *qb, \
                            const float *da, const float *db, float out[2]) {            \
        const int64_t nb = K / QK;                                                       \
        __m256 acca = _mm256_setzero_ps(), accb = _mm256_setzero_ps();                   \
        for (int64_t b = 0; b < nb; b++) {                                               \
            __m256 wa[4], wb[4];                                                         \
            DECODE(qa + b * (BYTES), wa);                                                \
            DECODE(qb + b * (BYTES), wb);                                                \
            PREFETCH(qb + b * (BYTES));                                                  \
            const float *xb = x + b * QK;                                                \
            __m256 xc = _mm256_loadu_ps(xb + ORDER[0]);                                  \
            __m256 ta = _mm256_mul_ps(wa[0], xc), tb = _mm256_mul_ps(wb[0], xc);         \
            for (int c = 1; c < 4; c++) {                                                \
                xc = _mm256_loadu_ps(xb + ORDER[c]);                                     \
                ta = _mm256_fmadd_ps(wa[c], xc, ta);                                     \
                tb = _mm256_fmadd_ps(wb[c], xc, tb);                                     \
            }                                                                            \
            acca = _mm256_fmadd_ps(_mm256_set1_ps(da[b]), ta, acca);                     \
            accb = _mm256_fmadd_ps(_mm256_set1_ps(db[b]), tb, accb);                     \
        }                                                                                \
        out[0] = hsum(acca);                                                             \
        out[1] = hsum(accb);                                                             \
    }
ROW2_KERNEL(row2_q4, uint8_t, decode_q4, QK / 2, Q4_ORDER)
ROW2_KERNEL(row2_q8, int8_t, decode_q8, QK, Q8_ORDER)
#endif /* QMM_AVX512 */

#define ROW_DISPATCH(NAME, QTYPE, PREFIX)                                               \
    static void NAME(const float *x, int64_t mt, int64_t K, const QTYPE *qrow,         \
                     const float *drow, float *out) {                                \
        switch (mt) {                                                                   \
        case 1: PREFIX##_1(x, K, qrow, drow, out); break;                               \
        case 2: PREFIX##_2(x, K, qrow, drow, out); break;                               \
        case 3: PREFIX##_3(x, K, qrow, drow, out); break;                               \
        default: PREFIX##_4(x, K, qrow, drow, out); break;                              \
        }                                                                               \
    }
ROW_DISPATCH(row_q4, uint8_t, row_q4)
ROW_DISPATCH(row_q8, int8_t, row_q8)
#else
#define ROW2_GENERIC(NAME, QTYPE, ROW)                                                   \
    static void NAME(const float *x, int64_t K, const QTYPE *qa, const QTYPE *qb,       \
                     const float *da, const float *db, float out[2]) {                   \
        ROW(x, 1, K, qa, da, out);                                                       \
        ROW(x, 1, K, qb, db, out + 1);                                                   \
    }
static void row_q4(const float *x, int64_t mt, int64_t K, const uint8_t *qrow,
                   const float *drow, float *out) {
    const int64_t nb = K / QK;
    for (int64_t i = 0; i < mt; i++) {
        float acc = 0.f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *q = qrow + b * (QK / 2);
            const float *xb = x + i * K + b * QK;
            float t = 0.f;
            for (int j = 0; j < QK / 2; j++)
                t += (float)(q[j] & 0x0F) * xb[j] + (float)(q[j] >> 4) * xb[j + QK / 2];
            acc += drow[b] * t;
        }
        out[i] = acc;
    }
}

static void row_q8(const float *x, int64_t mt, int64_t K, const int8_t *qrow,
                   const float *drow, float *out) {
    const int64_t nb = K / QK;
    for (int64_t i = 0; i < mt; i++) {
        float acc = 0.f;
        for (int64_t b = 0; b < nb; b++) {
            const int8_t *q = qrow + b * QK;
            const float *xb = x + i * K + b * QK;
            float t = 0.f;
            for (int j = 0; j < QK; j++) t += (float)q[j] * xb[j];
            acc += drow[b] * t;
        }
        out[i] = acc;
    }
}
ROW2_GENERIC(row2_q4, uint8_t, row_q4)
ROW2_GENERIC(row2_q8, int8_t, row_q8)
#endif

#if QMM_AVX2
/* ---------------------------------------------------------------------------------
 * Batches of rows: a tile of weight rows is dequantized once into a per-thread float
 * buffer (exactly d * q + m, as qmm_dequant_* computes it) and multiplied by register
 * tiles of MT_ rows of x by NT_ rows of W, so the decoding of a block is paid once per
 * tile rather than once per group of rows, and each loaded vector feeds several FMAs.
 */
#define TILE_BYTES (96 * 1024) /* dequantized rows per tile: about this many bytes */
/* Below SMALL_TILE_ROWS rows of x the dequantizing, not the products, sets the pace:
 * writing a 96 KiB tile goes out to L2 at ~3.2 ns a q4 block, a tile that stays in L1
 * takes ~1.4 ns. The smaller tile is then read again by each group of four rows of x
 * from L1. 16 and 32 rows of the default model's layers on a Xeon with AVX-512:
 * 1.1-1.25x, bit-identical; at 512 rows the large tile is up to 1.2x faster. */
#define SMALL_TILE_ROWS 128
#if QMM_AVX512
#define SMALL_TILE_BYTES (24 * 1024)
#define TILE_ROW_STEP 6 /* rows of a tile: a multiple of the widest micro-kernel */
#else
#define SMALL_TILE_BYTES (16 * 1024) /* AVX2-only CPUs: often a 32 KiB L1 */
#define TILE_ROW_STEP 3
#endif

static __thread float *tile_buf;
static __thread size_t tile_cap;

static float *tile_scratch(size_t n) {
    if (n > tile_cap) {
        free(tile_buf);
        tile_buf = (float *)aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64);
        tile_cap = tile_buf ? n : 0;
    }
    return tile_buf;
}

#if QMM_AVX512 && !defined(QMM_DEQ256)
/* The 32 weights of the block at QB as two 16-float vectors V, exactly as the
 * dequantizers compute them: D * q, then + *MB where MB (a pointer) is not NULL. */
#define DEQUANT_BLOCK16(DECODE, QB, D, MB, V)                                           \
    do {                                                                                \
        DECODE(QB, V);                                                                  \
        const __m512 d_ = _mm512_set1_ps(D);                                            \
        V[0] = _mm512_mul_ps(V[0], d_);                                                 \
        V[1] = _mm512_mul_ps(V[1], d_);                                                 \
        if (MB) {                                                                       \
            const __m512 m_ = _mm512_set1_ps(*(MB));                                    \
            V[0] = _mm512_add_ps(V[0], m_);                                             \
            V[1] = _mm512_add_ps(V[1], m_);                                             \
        }                                                                               \
    } while (0)

#define DEQUANT_ROWS16(NAME, QTYPE, DECODE, BYTES)                                      \
    static void NAME(const QTYPE *q, const float *d, const float *m, int64_t rows,      \
                     int64_t nb, float *w) {                                            \
        for (int64_t b = 0; b < rows * nb; b++) {                                       \
            __m512 v[2];                                                                \
            PREFETCH(q + b * (BYTES));                                                  \
            DEQUANT_BLOCK16(DECODE, q + b * (BYTES), d[b], m ? m + b : NULL, v);        \
            _mm512_storeu_ps(w + b * QK, v[0]);                                         \
            _mm512_storeu_ps(w + b * QK + 16, v[1]);                                    \
        }                                                                               \
    }
DEQUANT_ROWS16(dequant_rows_q4, uint8_t, decode_q4_16, QK / 2)
DEQUANT_ROWS16(dequant_rows_q8, int8_t, decode_q8_16, QK)
#else
static void dequant_rows_q4(const uint8_t *q, const float *d, const float *m, int64_t rows,
                            int64_t nb, float *w) {
    for (int64_t b = 0; b < rows * nb; b++) {
        __m256 v[4];
        PREFETCH(q + b * (QK / 2));
        decode_q4(q + b * (QK / 2), v);
        const __m256 db = _mm256_set1_ps(d[b]);
        for (int c = 0; c < 4; c++) {
            __m256 r = _mm256_mul_ps(v[c], db);
            if (m) r = _mm256_add_ps(r, _mm256_set1_ps(m[b]));
            _mm256_storeu_ps(w + b * QK + Q4_ORDER[c], r);
        }
    }
}

static void dequant_rows_q8(const int8_t *q, const float *d, const float *m, int64_t rows,
                            int64_t nb, float *w) {
    for (int64_t b = 0; b < rows * nb; b++) {
        __m256 v[4];
        PREFETCH(q + b * QK);
        decode_q8(q + b * QK, v);
        const __m256 db = _mm256_set1_ps(d[b]);
        for (int c = 0; c < 4; c++) {
            __m256 r = _mm256_mul_ps(v[c], db);
            if (m) r = _mm256_add_ps(r, _mm256_set1_ps(m[b]));
            _mm256_storeu_ps(w + b * QK + Q8_ORDER[c], r);
        }
    }
}
#endif /* QMM_AVX512 */

/* y[i, j] (+)= x[i] . w[j] for MT_ rows of x (K apart) and NT_ rows of w (K apart),
 * in vectors of type VEC with LANES floats (K is a multiple of 32, so of the lanes);
 * ZERO, LOAD, FMA and HSUM are its operations, PIN the asm constraint of a VEC register.
 * Each vector of x is loaded once into a register: left to itself the compiler folded
 * the load into every FMA that uses it (MT_ * NT_ loads per step instead of
 * MT_ + NT_), and the loads, not the FMAs, bounded the kernel (with the pin and the
 * tiles below, 16 rows of the default model's layers on a Xeon with AVX-512: 1.7-2.2x). */
#define MICRO_KERNEL(NAME, MT_, NT_, VEC, LANES, ZERO, LOAD, FMA, HSUM, PIN)            \
    static void NAME(const float *x, const float *w, int64_t K, float *y, int64_t ldy,  \
                     int accumulate) {                                                  \
        VEC acc[MT_][NT_];                                                              \
        for (int i = 0; i < MT_; i++)                                                   \
            for (int j = 0; j < NT_; j++) acc[i][j] = ZERO();                           \
        for (int64_t k = 0; k < K; k += LANES) {                                        \
            VEC wv[NT_];                                                                \
            for (int j = 0; j < NT_; j++) wv[j] = LOAD(w + j * K + k);                  \
            for (int i = 0; i < MT_; i++) {                                             \
                VEC xv = LOAD(x + i * K + k);                                           \
                __asm__("" : PIN(xv));                                                  \
                for (int j = 0; j < NT_; j++) acc[i][j] = FMA(xv, wv[j], acc[i][j]);    \
            }                                                                           \
        }                                                                               \
        for (int i = 0; i < MT_; i++)                                                   \
            for (int j = 0; j < NT_; j++) {                                             \
                const float s = HSUM(acc[i][j]);                                        \
                if (accumulate) y[i * ldy + j] += s;                                    \
                else y[i * ldy + j] = s;                                                \
            }                                                                           \
    }
typedef void (*micro_fn)(const float *, const float *, int64_t, float *, int64_t, int);
/* The micro-kernels of NT_ weight rows for 1 to 4 rows of x (GEN makes one), and
 * TABLE of them indexed by rows of x. */
#define MICRO_COLUMN(TABLE, GEN, PREFIX, NT_)                                           \
    GEN(1, NT_) GEN(2, NT_) GEN(3, NT_) GEN(4, NT_)                                     \
    static const micro_fn TABLE[5] = {NULL, PREFIX##_1_##NT_, PREFIX##_2_##NT_,        \
                                      PREFIX##_3_##NT_, PREFIX##_4_##NT_};
#if QMM_AVX512
/* 16 lanes and 32 registers: register tiles of 4 rows of x by 6 rows of w (24
 * accumulators), then 3 and 1 for the last rows of a tile. */
#define PIN_ZMM(v) "+v"(v)
#define MICRO16(MT_, NT_)                                                               \
    MICRO_KERNEL(micro16_##MT_##_##NT_, MT_, NT_, __m512, 16, _mm512_setzero_ps,        \
                 _mm512_loadu_ps, _mm512_fmadd_ps, _mm512_reduce_add_ps, PIN_ZMM)
MICRO_COLUMN(MICRO_W6, MICRO16, micro16, 6)
MICRO_COLUMN(MICRO_W3, MICRO16, micro16, 3)
MICRO_COLUMN(MICRO_W1, MICRO16, micro16, 1)
#else
#define PIN_YMM(v) "+x"(v)
#define MICRO(MT_, NT_)                                                                 \
    MICRO_KERNEL(micro_##MT_##_##NT_, MT_, NT_, __m256, 8, _mm256_setzero_ps,           \
                 _mm256_loadu_ps, _mm256_fmadd_ps, hsum, PIN_YMM)
MICRO_COLUMN(MICRO_W3, MICRO, micro, 3)
MICRO_COLUMN(MICRO_W1, MICRO, micro, 1)
#endif

/* One tile: y[i0.., n0 + j] for its nr dequantized rows of w, all M rows of x. The
 * rows of x go four at a time in the outer loop, so those four (at most 24 KiB at the
 * default model's widths) stay in L1 while the tile's rows stream past (from L1 too
 * below SMALL_TILE_ROWS rows of x, from L2 above). */
static void tile_product(const float *x, int64_t M, int64_t K, const float *wt, int64_t nr,
                         float *y, int64_t N, int64_t n0, int accumulate) {
    for (int64_t i0 = 0; i0 < M; i0 += 4) {
        const int64_t mt = M - i0 < 4 ? M - i0 : 4;
        const float *xi = x + i0 * K;
        float *yi = y + i0 * N + n0;
        int64_t j = 0;
#if QMM_AVX512
        for (; j + 6 <= nr; j += 6) MICRO_W6[mt](xi, wt + j * K, K, yi + j, N, accumulate);
#endif
        for (; j + 3 <= nr; j += 3) MICRO_W3[mt](xi, wt + j * K, K, yi + j, N, accumulate);
        for (; j < nr; j++) MICRO_W1[mt](xi, wt + j * K, K, yi + j, N, accumulate);
    }
}

/* Returns 0, or -1 when a thread's tile buffer cannot be allocated. */
#define TILED(NAME, QTYPE, DEQUANT, BYTES)                                              \
    static int NAME(const float *x, int64_t M, int64_t K, const QTYPE *q, const void *d, \
                    const void *m, int f16, int64_t N, float *y, int accumulate) {      \
        const int64_t nb = K / QK;                                                      \
        const int64_t bytes = M < SMALL_TILE_ROWS ? SMALL_TILE_BYTES : TILE_BYTES;      \
        int64_t tr = bytes / (K * (int64_t)sizeof(float));                              \
        tr = tr < TILE_ROW_STEP ? TILE_ROW_STEP : tr - tr % TILE_ROW_STEP;              \
        const int64_t ntiles = (N + tr - 1) / tr;                                       \
        /* runs of tiles handed out one at a time, about four per thread: a static     \
         * split leaves a core waiting for a whole run at the end of most layers (and  \
         * for more when the other core is slowed by other work) */                     \
        int64_t run = ntiles / (4 * omp_get_max_threads());                             \
        run = run < 1 ? 1 : run;                                                        \
        int failed = 0;                                                                 \
        _Pragma("omp parallel for schedule(dynamic, 1)")                                \
        for (int64_t t0 = 0; t0 < ntiles; t0 += run) {                                  \
            float *wt = tile_scratch((size_t)(tr * K));                                 \
            if (!wt) {                                                                  \
                failed = 1;                                                             \
                continue;                                                               \
            }                                                                           \
            float dbuf[nb], mbuf[nb];                                                   \
            for (int64_t t = t0; t < t0 + run && t < ntiles; t++) {                     \
                const int64_t n0 = t * tr, nr = N - n0 < tr ? N - n0 : tr;              \
                for (int64_t r = 0; r < nr; r++)                                        \
                    DEQUANT(q + (n0 + r) * nb * (BYTES),                                \
                            row_scales(d, f16, n0 + r, nb, dbuf),                       \
                            row_scales(m, f16, n0 + r, nb, mbuf), 1, nb, wt + r * K);   \
                tile_product(x, M, K, wt, nr, y, N, n0, accumulate);                    \
            }                                                                           \
        }                                                                               \
        return failed ? -1 : 0;                                                         \
    }
TILED(tiled_q4, uint8_t, dequant_rows_q4, QK / 2)
TILED(tiled_q8, int8_t, dequant_rows_q8, QK)
#endif

#if QMM_AVX512
/* ---------------------------------------------------------------------------------
 * Small batches (2 to REGS_AUTO_MAX rows of x) on AVX-512: four weight rows at a time
 * are decoded block by block into registers and scaled there, exactly as the
 * dequantizers compute a weight (d * q, then + m), and each block serves every row of
 * x from the L1 cache. Between the row kernels (which decode a block once per four
 * rows of x and add the min term apart) and the tiled path (which pays a pass that
 * writes the whole weight out as floats), this measured 1.1-1.7x the better of the two
 * at 3 to 8 rows of the default model's layers on a 2-core Xeon (bench/notes.md).
 */
#define REGS_MAX_ROWS 8 /* rows of x per pass */
#define REGS_W 4        /* weight rows per pass */
/* Up to this many rows the batch takes this path (one pass). Measured against the
 * tiled path with its L1-sized tiles, over a whole step's layers: 0.86-0.96x of its time
 * at 4 to 8 rows, 1.16-1.23x at 9 to 16 (a pass of 8 and a short one). */
#define REGS_AUTO_MAX 8

/* MT_ rows of x (K apart) by NR_ weight rows (qstride apart): y[i, r] (+)= x_i . w_r. */
#define REG_KERNEL(NAME, QTYPE, DECODE, BYTES, MT_, NR_)                                \
    static void NAME(const float *x, int64_t K, const QTYPE *q, int64_t qstride,        \
                     const float *const *dr, const float *const *mr, float *y,          \
                     int64_t ldy, int accumulate) {                                     \
        const int64_t nb = K / QK;                                                      \
        __m512 acc[MT_][NR_];                                                           \
        for (int i = 0; i < MT_; i++)                                                   \
            for (int r = 0; r < NR_; r++) acc[i][r] = _mm512_setzero_ps();              \
        for (int64_t b = 0; b < nb; b++) {                                              \
            __m512 w[NR_][2];                                                           \
            for (int r = 0; r < NR_; r++) {                                             \
                const QTYPE *qb = q + r * qstride + b * (BYTES);                        \
                DEQUANT_BLOCK16(DECODE, qb, dr[r][b], mr[r] ? mr[r] + b : NULL, w[r]);  \
                PREFETCH(qb);                                                           \
            }                                                                           \
            for (int i = 0; i < MT_; i++) {                                             \
                __m512 x0 = _mm512_loadu_ps(x + i * K + b * QK);                        \
                __m512 x1 = _mm512_loadu_ps(x + i * K + b * QK + 16);                   \
                __asm__("" : "+v"(x0), "+v"(x1)); /* one load each, as MICRO_KERNEL */  \
                for (int r = 0; r < NR_; r++) {                                         \
                    acc[i][r] = _mm512_fmadd_ps(w[r][0], x0, acc[i][r]);                \
                    acc[i][r] = _mm512_fmadd_ps(w[r][1], x1, acc[i][r]);                \
                }                                                                       \
            }                                                                           \
        }                                                                               \
        for (int i = 0; i < MT_; i++)                                                   \
            for (int r = 0; r < NR_; r++) {                                             \
                const float s = _mm512_reduce_add_ps(acc[i][r]);                        \
                if (accumulate) y[i * ldy + r] += s;                                    \
                else y[i * ldy + r] = s;                                                \
            }                                                                           \
    }
#define REG_KERNELS(PREFIX, QTYPE, DECODE, BYTES, MT_)                                  \
    REG_KERNEL(PREFIX##_##MT_##_4, QTYPE, DECODE, BYTES, MT_, 4)                        \
    REG_KERNEL(PREFIX##_##MT_##_1, QTYPE, DECODE, BYTES, MT_, 1)
#define REG_TABLES(PREFIX, QTYPE, DECODE, BYTES)                                        \
    REG_KERNELS(PREFIX, QTYPE, DECODE, BYTES, 1)                                        \
    REG_KERNELS(PREFIX, QTYPE, DECODE, BYTES, 2)                                        \
    REG_KERNELS(PREFIX, QTYPE, DECODE, BYTES, 3)                                        \
    REG_KERNELS(PREFIX, QTYPE, DECODE, BYTES, 4)                                        \
    REG_KERNELS(PREFIX, QTYPE, DECODE, BYTES, 5)                                        \
    REG_KERNELS(PREFIX, QTYPE, DECODE, BYTES, 6)                                        \
    REG_KERNELS(PREFIX, QTYPE, DECODE, BYTES, 7)                                        \
    REG_KERNELS(PREFIX, QTYPE, DECODE, BYTES, 8)                                        \
    typedef void (*PREFIX##_fn)(const float *, int64_t, const QTYPE *, int64_t,         \
                                const float *const *, const float *const *, float *,    \
                                int64_t, int);                                          \
    static const PREFIX##_fn PREFIX##_w4[REGS_MAX_ROWS + 1] = {                         \
        NULL, PREFIX##_1_4, PREFIX##_2_4, PREFIX##_3_4, PREFIX##_4_4,                   \
        PREFIX##_5_4, PREFIX##_6_4, PREFIX##_7_4, PREFIX##_8_4};                        \
    static const PREFIX##_fn PREFIX##_w1[REGS_MAX_ROWS + 1] = {                         \
        NULL, PREFIX##_1_1, PREFIX##_2_1, PREFIX##_3_1, PREFIX##_4_1,                   \
        PREFIX##_5_1, PREFIX##_6_1, PREFIX##_7_1, PREFIX##_8_1};
REG_TABLES(reg_q4, uint8_t, decode_q4_16, QK / 2)
REG_TABLES(reg_q8, int8_t, decode_q8_16, QK)

/* Any M (in groups of REGS_MAX_ROWS rows of x); the weight rows split between threads. */
#define REGS(NAME, QTYPE, PREFIX, BYTES)                                                \
    static int NAME(const float *x, int64_t M, int64_t K, const QTYPE *q, const void *d, \
                    const void *m, int f16, int64_t N, float *y, int accumulate) {      \
        const int64_t nb = K / QK, rowq = nb * (BYTES);                                 \
        _Pragma("omp parallel for schedule(static)")                                    \
        for (int64_t p = 0; p < (N + REGS_W - 1) / REGS_W; p++) {                       \
            const int64_t n = p * REGS_W, nr = N - n < REGS_W ? N - n : REGS_W;         \
            float dbuf[REGS_W][nb], mbuf[REGS_W][nb];                                   \
            const float *dr[REGS_W], *mr[REGS_W];                                       \
            for (int64_t r = 0; r < nr; r++) {                                          \
                dr[r] = row_scales(d, f16, n + r, nb, dbuf[r]);                         \
                mr[r] = row_scales(m, f16, n + r, nb, mbuf[r]);                         \
            }                                                                           \
            for (int64_t i0 = 0; i0 < M; i0 += REGS_MAX_ROWS) {                         \
                const int64_t mt = M - i0 < REGS_MAX_ROWS ? M - i0 : REGS_MAX_ROWS;     \
                const float *xi = x + i0 * K;                                           \
                float *yi = y + i0 * N + n;                                             \
                if (nr == REGS_W)                                                       \
                    PREFIX##_w4[mt](xi, K, q + n * rowq, rowq, dr, mr, yi, N, accumulate); \
                else                                                                    \
                    for (int64_t r = 0; r < nr; r++)                                    \
                        PREFIX##_w1[mt](xi, K, q + (n + r) * rowq, rowq, dr + r, mr + r, \
                                        yi + r, N, accumulate);                         \
            }                                                                           \
        }                                                                               \
        return 0;                                                                       \
    }
REGS(regs_q4, uint8_t, reg_q4, QK / 2)
REGS(regs_q8, int8_t, reg_q8, QK)
#endif

static inline float min_term(const float *mrow, const float *xs, int64_t nb) {
    int64_t b = 0;
    float s = 0.f;
#if QMM_AVX2
    /* vectorised: a scalar chain of nb dependent FMAs would cost as much as the blocks */
    __m256 acc = _mm256_setzero_ps();
    for (; b + 8 <= nb; b += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(mrow + b), _mm256_loadu_ps(xs + b), acc);
    s = hsum(acc);
#endif
    for (; b < nb; b++) s += mrow[b] * xs[b];
    return s;
}

/* accumulate: y += x @ W^T (a residual add for free) instead of y = x @ W^T.
 * d and m: (N, K / 32) float32, or float16 when f16 (m may be NULL).
 * Returns 0, or -1 when scratch memory cannot be allocated. */
#define GEMM(NAME, QTYPE, ROW, ROW2, BYTES, PAIRS, TILED_CALL, REGS_CALL)               \
    int NAME(const float *x, int64_t M, int64_t K, const QTYPE *q, const void *d,       \
             const void *m, int64_t N, float *y, int accumulate, int f16) {             \
        const int64_t nb = K / QK;                                                      \
        const int path = batch_path(M);                                                 \
        if (path == PATH_REGISTERS)                                                     \
            return REGS_CALL(x, M, K, q, d, m, f16, N, y, accumulate);                  \
        if (path == PATH_TILED) return TILED_CALL(x, M, K, q, d, m, f16, N, y, accumulate); \
        float *xs = NULL;                                                               \
        if (m) {                                                                        \
            xs = (float *)malloc(sizeof(float) * (size_t)(M * nb));                     \
            if (!xs) return -1;                                                         \
            block_sums(x, M, K, xs);                                                    \
        }                                                                               \
        if (PAIRS && M == 1) {                                                          \
            _Pragma("omp parallel for schedule(static)")                                \
            for (int64_t p = 0; p < (N + 1) / 2; p++) {                                 \
                const int64_t n = 2 * p, two = n + 1 < N;                               \
                PREFETCH_SCALES(d, m, f16, n + 16, nb);                                 \
                float out[2], da[nb], db[nb], ma[nb], mb[nb];                           \
                const float *drow[2] = {row_scales(d, f16, n, nb, da),                  \
                                        two ? row_scales(d, f16, n + 1, nb, db) : NULL}; \
                const float *mrow[2] = {row_scales(m, f16, n, nb, ma),                  \
                                        two ? row_scales(m, f16, n + 1, nb, mb) : NULL}; \
                if (two)                                                                \
                    ROW2(x, K, q + n * nb * (BYTES), q + (n + 1) * nb * (BYTES),        \
                         drow[0], drow[1], out);                                        \
                else                                                                    \
                    ROW(x, 1, K, q + n * nb * (BYTES), drow[0], out);                   \
                for (int64_t r = 0; r <= two; r++) {                                    \
                    float v = out[r];                                                   \
                    if (m) v += min_term(mrow[r], xs, nb);                              \
                    if (accumulate) y[n + r] += v;                                      \
                    else y[n + r] = v;                                                  \
                }                                                                       \
            }                                                                           \
            free(xs);                                                                   \
            return 0;                                                                   \
        }                                                                               \
        _Pragma("omp parallel for schedule(static)")                                    \
        for (int64_t n = 0; n < N; n++) {                                               \
            const QTYPE *qrow = q + n * nb * (BYTES);                                   \
            float dbuf[nb], mbuf[nb];                                                   \
            const float *drow = row_scales(d, f16, n, nb, dbuf);                        \
            const float *mrow = row_scales(m, f16, n, nb, mbuf);                        \
            for (int64_t i0 = 0; i0 < M; i0 += MT) {                                    \
                const int64_t mt = M - i0 < MT ? M - i0 : MT;                           \
                float out[MT];                                                          \
                ROW(x + i0 * K, mt, K, qrow, drow, out);                                \
                for (int64_t i = 0; i < mt; i++) {                                      \
                    float v = out[i];                                                   \
                    if (m) v += min_term(mrow, xs + (i0 + i) * nb, nb);                 \
                    if (accumulate) y[(i0 + i) * N + n] += v;                           \
                    else y[(i0 + i) * N + n] = v;                                       \
                }                                                                       \
            }                                                                           \
        }                                                                               \
        free(xs);                                                                       \
        return 0;                                                                       \
    }
/* Pairs of rows pay for q4 (decoding dominates); q8 at batch 1 is bound by memory. */
#if !QMM_AVX2
#define tiled_q4(...) 0
#define tiled_q8(...) 0
#endif
#if !QMM_AVX512
#define regs_q4(...) 0
#define regs_q8(...) 0
#endif
/* The batch paths: the row kernels, the tiled kernel (AVX2 and AVX-512 builds) and the
 * register kernels (AVX-512 build). */
enum { PATH_AUTO = -1, PATH_ROWS = 0, PATH_TILED = 1, PATH_REGISTERS = 2 };
static int forced_path = PATH_AUTO;
/* The path for M rows of x. Rows of x from which the tiled path beats the others:
 * 4 (AVX2, against the row kernels; measured with bench/kernels.py), past
 * REGS_AUTO_MAX (AVX-512, against the register kernels). */
static inline int batch_path(int64_t M) {
    int path = forced_path;
    if (path == PATH_AUTO) {
#if QMM_AVX512
        path = M == 1 ? PATH_ROWS : M <= REGS_AUTO_MAX ? PATH_REGISTERS : PATH_TILED;
#else
        path = M >= 4 ? PATH_TILED : PATH_ROWS;
#endif
    }
    if (path == PATH_REGISTERS && !QMM_AVX512) path = PATH_ROWS;
    if (path == PATH_TILED && !QMM_AVX2) path = PATH_ROWS;
    return path;
}
/* For tests and measurements: one path for every batch (PATH_ROWS, PATH_TILED or
 * PATH_REGISTERS; one the build lacks gives the row kernels), or PATH_AUTO; returns
 * the previous setting. */
int qmm_force_path(int path) {
    const int previous = forced_path;
    forced_path = path;
    return previous;
}
GEMM(qmm_q4, uint8_t, row_q4, row2_q4, QK / 2, 1, tiled_q4, regs_q4)
GEMM(qmm_q8, int8_t, row_q8, row2_q8, QK, 0, tiled_q8, regs_q8)

/* Dequantize row n of a weight to float32 (w: its K values): the AVX2 build with the
 * tiled kernel's vectorised row decoder, the generic build with the scalar loop; both
 * compute d * q, then + m, rounding each. */
static void dequant_row_q4(const uint8_t *q, const void *d, const void *m, int f16, int64_t n,
                           int64_t nb, float *w) {
    float dbuf[nb], mbuf[nb];
    const float *dr = row_scales(d, f16, n, nb, dbuf), *mr = row_scales(m, f16, n, nb, mbuf);
#if QMM_AVX2
    dequant_rows_q4(q + n * nb * (QK / 2), dr, mr, 1, nb, w);
#else
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *qb = q + (n * nb + b) * (QK / 2);
        float *wb = w + b * QK;
        for (int j = 0; j < QK / 2; j++) {
            wb[j] = dr[b] * (float)(qb[j] & 0x0F);
            wb[j + QK / 2] = dr[b] * (float)(qb[j] >> 4);
        }
        if (mr) /* no "+ 0": it would turn a -0.0 into +0.0 */
            for (int j = 0; j < QK; j++) wb[j] += mr[b];
    }
#endif
}

static void dequant_row_q8(const int8_t *q, const void *d, const void *m, int f16, int64_t n,
                           int64_t nb, float *w) {
    float dbuf[nb], mbuf[nb];
    const float *dr = row_scales(d, f16, n, nb, dbuf), *mr = row_scales(m, f16, n, nb, mbuf);
#if QMM_AVX2
    dequant_rows_q8(q + n * nb * QK, dr, mr, 1, nb, w);
#else
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *qb = q + (n * nb + b) * QK;
        float *wb = w + b * QK;
        for (int j = 0; j < QK; j++) wb[j] = dr[b] * (float)qb[j];
        if (mr)
            for (int j = 0; j < QK; j++) wb[j] += mr[b];
    }
#endif
}

/* Dequantize whole rows to float32 (for large batches, which go to a float GEMM). */
void qmm_dequant_q4(const uint8_t *q, const void *d, const void *m, int64_t N, int64_t K,
                    float *w, int f16) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) dequant_row_q4(q, d, m, f16, n, K / QK, w + n * K);
}

void qmm_dequant_q8(const int8_t *q, const void *d, const void *m, int64_t N, int64_t K,
                    float *w, int f16) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) dequant_row_q8(q, d, m, f16, n, K / QK, w + n * K);
}

/* ---------------------------------------------------------------------------------
 * Decode attention straight from the paged KV cache: one query token per sequence.
 *
 * q: B rows of H * hd float32, q_stride apart; k, v: (num_blocks, block_size, KV, hd) in float32,
 * float16 or bfloat16 (kv_dtype 0, 1, 2); tables: (B, W) int64; ctx: (B,) int64;
 * out: (B, H, hd) float32. Query heads h in [g * G, (g + 1) * G) share KV head g.
 * Softmax over the ctx[b] keys of sequence b, in float32, as SDPA computes it
 * (scores, max, exp, sum, weighted values), without gathering the blocks.
 */
static inline float load_kv(const void *base, int64_t i, int kv_dtype) {
    if (kv_dtype == 0) return ((const float *)base)[i];
    uint16_t h = ((const uint16_t *)base)[i];
    if (kv_dtype == 2) {
        uint32_t bits = (uint32_t)h << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    return f16_to_f32(h);
}

#if QMM_AVX2
/* 8 values of a cache row as float32. */
static inline __m256 load8_kv(const void *base, int64_t i, int kv_dtype) {
    if (kv_dtype == 0) return _mm256_loadu_ps((const float *)base + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + i));
    if (kv_dtype == 1) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif
#if QMM_AVX512
/* 16 values of a cache row as float32. */
static inline __m512 load16_kv(const void *base, int64_t i, int kv_dtype) {
    if (kv_dtype == 0) return _mm512_loadu_ps((const float *)base + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
    if (kv_dtype == 1) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* The sums of 8 vectors' lanes, added in the order _mm512_reduce_add_ps adds one
 * vector's (halves, quarters, then pairs), so that a key's score is the same whether
 * it went in a step of eight keys or alone. */
static inline __m256 reduce8(const __m512 a[8]) {
    __m512 b[4];
    for (int j = 0; j < 4; j++) /* 256-bit halves: b[j] = [a[2j] half-sums | a[2j+1]'s] */
        b[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xEE));
    /* 128-bit quarters: c0 holds a[0..3], c1 a[4..7], four lanes each */
    const __m512 c0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x88),
                                    _mm512_shuffle_f32x4(b[0], b[1], 0xDD));
    const __m512 c1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x88),
                                    _mm512_shuffle_f32x4(b[2], b[3], 0xDD));
    /* lanes (0 + 2) and (1 + 3), then their sum: in 128-bit lane L, element 0 is a[L]'s
     * sum and element 1 a[4 + L]'s */
    const __m512 d = _mm512_add_ps(_mm512_unpacklo_ps(c0, c1), _mm512_unpackhi_ps(c0, c1));
    const __m512 e = _mm512_add_ps(d, _mm512_shuffle_ps(d, d, 0xEE));
    return _mm512_castps512_ps256(_mm512_permutexvar_ps(
        _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0), e));
}
#endif

/* Element offset of key j of a sequence in the cache: its block from the table. Callers
 * walk keys block by block (no division per key). */
#define KEY_BASE(table, blk, block_size, row) ((table)[blk] * (block_size) * (row))

/* The block functions and the task body are inlined into one copy per cache dtype, so
 * that no load tests the dtype: the tests inside the loops cost 15-35% of attention. */
#define INLINE static inline __attribute__((always_inline))

/* Scores of one query head against the len keys of one cache block, from element base
 * (keys row elements apart): s[t] = scale * q . k_t; returns their maximum. */
INLINE float block_scores(const float *qh, const void *k, int kv_dtype, int64_t base,
                          int64_t row, int64_t hd, int64_t len, float scale, float *s) {
    float mx = -INFINITY;
    int64_t t = 0;
#if QMM_AVX512
    if (hd % 16 == 0 && hd <= 256) {
        __m512 qv[16];
        for (int64_t e = 0; e < hd; e += 16) qv[e / 16] = _mm512_loadu_ps(qh + e);
        for (; t + 8 <= len; t += 8) { /* eight keys at once: eight independent sums */
            __m512 acc[8];
            for (int u = 0; u < 8; u++) acc[u] = _mm512_setzero_ps();
            const int64_t kb = base + t * row;
            for (int64_t e = 0; e < hd; e += 16) {
                const __m512 qe = qv[e / 16];
                for (int u = 0; u < 8; u++)
                    acc[u] = _mm512_fmadd_ps(qe, load16_kv(k, kb + u * row + e, kv_dtype), acc[u]);
            }
            _mm256_storeu_ps(s + t, _mm256_mul_ps(reduce8(acc), _mm256_set1_ps(scale)));
        }
        for (; t < len; t++) { /* the rest one at a time, each sum reduced as above */
            __m512 acc = _mm512_setzero_ps();
            const int64_t kb = base + t * row;
            for (int64_t e = 0; e < hd; e += 16)
                acc = _mm512_fmadd_ps(qv[e / 16], load16_kv(k, kb + e, kv_dtype), acc);
            s[t] = _mm512_reduce_add_ps(acc) * scale;
        }
    }
#endif
#if QMM_AVX2
    if (hd % 8 == 0 && hd <= 256 && t < len) {
        __m256 qv[32];
        for (int64_t e = 0; e < hd; e += 8) qv[e / 8] = _mm256_loadu_ps(qh + e);
        for (; t + 8 <= len; t += 8) { /* eight keys at once: eight independent sums */
            __m256 acc[8];
            for (int u = 0; u < 8; u++) acc[u] = _mm256_setzero_ps();
            const int64_t kb = base + t * row;
            for (int64_t e = 0; e < hd; e += 8) {
                const __m256 qe = qv[e / 8];
                for (int u = 0; u < 8; u++)
                    acc[u] = _mm256_fmadd_ps(qe, load8_kv(k, kb + u * row + e, kv_dtype), acc[u]);
            }
            /* each sum reduced as the four-key step below reduces it, so the scores do not
             * depend on which step took a key */
            const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]),
                                             _mm256_hadd_ps(acc[2], acc[3]));
            const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]),
                                             _mm256_hadd_ps(acc[6], acc[7]));
            const __m256 lo = _mm256_permute2f128_ps(h0, h1, 0x20);
            const __m256 hi = _mm256_permute2f128_ps(h0, h1, 0x31);
            _mm256_storeu_ps(s + t, _mm256_mul_ps(_mm256_add_ps(lo, hi), _mm256_set1_ps(scale)));
        }
        for (; t + 4 <= len; t += 4) { /* four keys at once: four independent sums */
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                             _mm256_setzero_ps()};
            const int64_t kb = base + t * row;
            /* the four keys' loads and FMAs interleaved, each sum in key order */
            for (int64_t e = 0; e < hd; e += 8) {
                const __m256 qe = qv[e / 8];
                for (int u = 0; u < 4; u++)
                    acc[u] = _mm256_fmadd_ps(qe, load8_kv(k, kb + u * row + e, kv_dtype), acc[u]);
            }
            /* the four sums reduced together: two horizontal adds, then the halves */
            const __m256 h01 = _mm256_hadd_ps(acc[0], acc[1]);
            const __m256 h23 = _mm256_hadd_ps(acc[2], acc[3]);
            const __m256 h = _mm256_hadd_ps(h01, h23); /* lanes 0..3 twice */
            const __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
            _mm_storeu_ps(s + t, _mm_mul_ps(r, _mm_set1_ps(scale)));
        }
    }
#endif
    for (; t < len; t++) {
        const int64_t kb = base + t * row;
        float dot = 0.f;
        for (int64_t e = 0; e < hd; e++) dot += qh[e] * load_kv(k, kb + e, kv_dtype);
        s[t] = dot * scale;
    }
    for (t = 0; t < len; t++)
        if (s[t] > mx) mx = s[t];
    return mx;
}

/* oh += sum_t p[t] v_t over the len values of one cache block (keys in order, as one
 * running sum per dimension over the whole sequence would add them). */
INLINE void block_values(const float *p, const void *v, int kv_dtype, int64_t base,
                         int64_t row, int64_t hd, int64_t len, float *oh) {
    int64_t e0 = 0;
#if QMM_AVX512
    for (; e0 + 64 <= hd; e0 += 64) { /* as below, in four 16-lane vectors */
        __m512 o[4];
        for (int c = 0; c < 4; c++) o[c] = _mm512_loadu_ps(oh + e0 + 16 * c);
        for (int64_t t = 0; t < len; t++) {
            const __m512 pv = _mm512_set1_ps(p[t]);
            for (int c = 0; c < 4; c++)
                o[c] = _mm512_fmadd_ps(pv, load16_kv(v, base + t * row + e0 + 16 * c, kv_dtype), o[c]);
        }
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(oh + e0 + 16 * c, o[c]);
    }
#endif
#if QMM_AVX2
    for (; e0 + 64 <= hd; e0 += 64) { /* 64 dimensions at a time, held in registers */
        __m256 o[8];
        for (int c = 0; c < 8; c++) o[c] = _mm256_loadu_ps(oh + e0 + 8 * c);
        for (int64_t t = 0; t < len; t++) {
            const __m256 pv = _mm256_set1_ps(p[t]);
            for (int c = 0; c < 8; c++)
                o[c] = _mm256_fmadd_ps(pv, load8_kv(v, base + t * row + e0 + 8 * c, kv_dtype), o[c]);
        }
        for (int c = 0; c < 8; c++) _mm256_storeu_ps(oh + e0 + 8 * c, o[c]);
    }
#endif
    for (int64_t t = 0; t < len; t++)
        for (int64_t e = e0; e < hd; e++) oh[e] += p[t] * load_kv(v, base + t * row + e, kv_dtype);
}

/* exp(s - mx) normalised to sum 1, in place over n scores. */
static void softmax_inplace(float *s, int64_t n, float mx) {
    float sum = 0.f;
    int64_t j = 0;
#if QMM_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(mx)));
        _mm256_storeu_ps(s + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum(acc);
#endif
    for (; j < n; j++) {
        s[j] = expf(s[j] - mx);
        sum += s[j];
    }
    const float inv = 1.f / sum;
    for (j = 0; j < n; j++) s[j] *= inv;
}

/* The query heads that share a KV head walk the cache block by block together, so
 * that each block of keys and values comes from memory once and serves them all from
 * the L1 cache (a task per query head read the cache G times: at 1,000 tokens of
 * context and 16 sequences, attention took three quarters of a decode step). Each
 * head's arithmetic is unchanged. */
typedef struct {
    const float *q;
    int64_t q_stride;
    const void *k, *v;
    int64_t block_size, H, KV, hd, G, row, per_task;
    const int64_t *tables, *ctx;
    int64_t W;
    float scale;
    float *out;
} AttnArgs;

/* Asks for len keys (or values) of cache block blk ahead of their use, span bytes of
 * each row from element off on: a sequence's blocks lie anywhere in the cache, and the
 * hardware prefetchers stop at the end of each (one sequence at a context of 192 and
 * 1,000: attention 15-20% faster; with 16 sequences, bound by memory, no change). */
INLINE void prefetch_block(const void *cache, const int64_t *table, int64_t blk, int64_t bs,
                           int64_t row, int64_t off, int64_t len, int64_t span, int64_t elem) {
    const char *p = (const char *)cache + (KEY_BASE(table, blk, bs, row) + off) * elem;
    for (int64_t t = 0; t < len; t++)
        for (int64_t c = 0; c < span; c += 64) __builtin_prefetch(p + t * row * elem + c, 0, 3);
}

/* One task: per_task KV heads of one sequence, with all their query heads. */
INLINE void attend_task(const AttnArgs *a, int64_t task, const int kv_dtype) {
    const int64_t KV = a->KV, G = a->G, hd = a->hd, row = a->row, bs = a->block_size;
    const int64_t b = task / (KV / a->per_task), g0 = task % (KV / a->per_task) * a->per_task;
    const int64_t n = a->ctx[b], heads = a->per_task * G;
    const int64_t *table = a->tables + b * a->W;
    float *og = a->out + (b * a->H + g0 * G) * hd; /* the task's output heads */
    const float *qg = a->q + b * a->q_stride + g0 * G * hd;
    for (int64_t e = 0; e < heads * hd; e++) og[e] = 0.f;
    float *s = n > 0 ? (float *)malloc(sizeof(float) * (size_t)(heads * n)) : NULL;
    if (!s) return; /* no context (or no memory): zeros */
    float mx[heads];
    for (int64_t i = 0; i < heads; i++) mx[i] = -INFINITY;
    const int64_t elem = kv_dtype == 0 ? 4 : 2, span = a->per_task * hd * elem;
    for (int64_t j0 = 0, blk = 0; j0 < n; j0 += bs, blk++) {
        const int64_t len = n - j0 < bs ? n - j0 : bs;
        if (j0 + bs < n)
            prefetch_block(a->k, table, blk + 1, bs, row, g0 * hd,
                           n - j0 - bs < bs ? n - j0 - bs : bs, span, elem);
        for (int64_t i = 0; i < heads; i++) {
            const int64_t base = KEY_BASE(table, blk, bs, row) + (g0 + i / G) * hd;
            const float m = block_scores(qg + i * hd, a->k, kv_dtype, base, row, hd, len,
                                         a->scale, s + i * n + j0);
            if (m > mx[i]) mx[i] = m;
        }
    }
    prefetch_block(a->v, table, 0, bs, row, g0 * hd, n < bs ? n : bs, span, elem);
    for (int64_t i = 0; i < heads; i++) softmax_inplace(s + i * n, n, mx[i]);
    for (int64_t j0 = 0, blk = 0; j0 < n; j0 += bs, blk++) {
        const int64_t len = n - j0 < bs ? n - j0 : bs;
        if (j0 + bs < n)
            prefetch_block(a->v, table, blk + 1, bs, row, g0 * hd,
                           n - j0 - bs < bs ? n - j0 - bs : bs, span, elem);
        for (int64_t i = 0; i < heads; i++) {
            const int64_t base = KEY_BASE(table, blk, bs, row) + (g0 + i / G) * hd;
            block_values(s + i * n + j0, a->v, kv_dtype, base, row, hd, len, og + i * hd);
        }
    }
    free(s);
}

void qmm_decode_attention(const float *q, int64_t q_stride, const void *k, const void *v,
                          int kv_dtype, int64_t block_size, int64_t B, int64_t H, int64_t KV,
                          int64_t hd, const int64_t *tables, int64_t W, const int64_t *ctx,
                          float scale, float *out) {
    /* With enough sequences to share out, a task takes every KV head of its sequence
     * and so reads each block's rows whole and in order (the hardware prefetchers
     * follow that; a task per KV head reads a strided slice of each row); with few,
     * a task per KV head keeps the cores busy. */
    const int64_t per_task = B >= 4 * omp_get_max_threads() ? KV : 1;
    const AttnArgs a = {q,  q_stride, k,      v,        block_size, H,     KV,  hd,
                        H / KV, KV * hd, per_task, tables, ctx,        W,     scale, out};
    const int64_t tasks = B * (KV / per_task);
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; task++) {
        if (kv_dtype == 0)
            attend_task(&a, task, 0);
        else if (kv_dtype == 1)
            attend_task(&a, task, 1);
        else
            attend_task(&a, task, 2);
    }
}

/* ---------------------------------------------------------------------------------
 * The small operations of a Llama block, fused so that a decode step is a few calls
 * per layer instead of dozens of tiny PyTorch ops.
 */

/* y[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, for T rows of C values. */
void qmm_rms_norm(const float *x, const float *w, int64_t T, int64_t C, float eps, float *y) {
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * C;
        float *yt = y + t * C;
        float ss = 0.f;
        int64_t c0 = 0;
#if QMM_AVX2
        __m256 acc = _mm256_setzero_ps(); /* eight partial sums, as a vectorised norm has */
        for (; c0 + 8 <= C; c0 += 8) {
            const __m256 v = _mm256_loadu_ps(xt + c0);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        ss = hsum(acc);
#endif
        for (int64_t c = c0; c < C; c++) ss += xt[c] * xt[c];
        const float r = 1.f / sqrtf(ss / (float)C + eps);
        for (int64_t c = 0; c < C; c++) yt[c] = w[c] * (xt[c] * r);
    }
}

/* a[t, j] = silu(g[t, j]) * g[t, I + j] for T rows of 2 * I values (gate, then up). */
void qmm_silu_mul(const float *g, int64_t T, int64_t I, float *a) {
    /* ~1.5 us a row of 1,536: worth both cores from a batch of decodes up */
#pragma omp parallel for schedule(static) if (T * I >= 16384)
    for (int64_t t = 0; t < T; t++) {
        const float *gt = g + t * 2 * I;
        float *at = a + t * I;
        int64_t j = 0;
#if QMM_AVX2
        const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
        for (; j + 8 <= I; j += 8) {
            const __m256 x = _mm256_loadu_ps(gt + j);
            const __m256 sig = _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, x)));
            _mm256_storeu_ps(at + j, _mm256_mul_ps(_mm256_div_ps(x, sig), _mm256_loadu_ps(gt + I + j)));
        }
#endif
        for (; j < I; j++) {
            const float x = gt[j];
            at[j] = x / (1.f + expf(-x)) * gt[I + j];
        }
    }
}

static inline uint16_t to_half(float f, int kv_dtype) {
    if (kv_dtype == 2) { /* bfloat16, round to nearest even */
        uint32_t bits;
        memcpy(&bits, &f, 4);
        if ((bits & 0x7F800000) == 0x7F800000) return (uint16_t)((bits >> 16) | ((bits & 0xFFFF) ? 0x40 : 0));
        bits += 0x7FFF + ((bits >> 16) & 1);
        return (uint16_t)(bits >> 16);
    }
#if QMM_AVX2
    return _cvtss_sh(f, 0); /* round to nearest even */
#else
    /* float32 -> float16, round to nearest even (normal, subnormal, inf, nan) */
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000;
    int32_t exp = (int32_t)((x >> 23) & 0xFF) - 127 + 15;
    uint32_t man = x & 0x7FFFFF;
    if (((x >> 23) & 0xFF) == 0xFF) return (uint16_t)(sign | 0x7C00 | (man ? 0x200 : 0));
    if (exp >= 31) return (uint16_t)(sign | 0x7C00);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        man |= 0x800000;
        const int shift = 14 - exp;
        uint32_t h = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = (uint32_t)(exp << 10) | (man >> 13), rem = man & 0x1FFF;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
#endif
}

/* RoPE (rotate-half) on the q and k heads of each token's qkv row, in place, then
 * k and v written to the cache slots. qkv: (T, (H + 2 KV) hd); cos, sin: tables
 * (positions, hd) with sin's first half negated (see model/gpt.py apply_rope);
 * k_cache, v_cache: one layer, (slots, KV, hd) in kv_dtype. */
void qmm_rope_store(float *qkv, int64_t T, int64_t H, int64_t KV, int64_t hd,
                    const int64_t *positions, const float *cos, const float *sin_signed,
                    const int64_t *slots, void *k_cache, void *v_cache, int kv_dtype) {
    const int64_t width = (H + 2 * KV) * hd, half = hd / 2;
    float tmp[1024];
    for (int64_t t = 0; t < T; t++) {
        float *row = qkv + t * width;
        if (cos) {
            const float *c = cos + positions[t] * hd, *s = sin_signed + positions[t] * hd;
            for (int64_t h = 0; h < H + KV; h++) {
                float *x = row + h * hd;
                for (int64_t e = 0; e < hd; e++) tmp[e] = x[e];
                for (int64_t e = 0; e < hd; e++) {
                    const float rolled = tmp[e < half ? e + half : e - half];
                    x[e] = tmp[e] * c[e] + rolled * s[e];
                }
            }
        }
        if (!k_cache) continue;
        const float *k = row + H * hd, *v = row + (H + KV) * hd;
        const int64_t n = KV * hd, off = slots[t] * n;
        if (kv_dtype == 0) {
            memcpy((float *)k_cache + off, k, sizeof(float) * (size_t)n);
            memcpy((float *)v_cache + off, v, sizeof(float) * (size_t)n);
        } else {
            uint16_t *kc = (uint16_t *)k_cache + off, *vc = (uint16_t *)v_cache + off;
            for (int64_t e = 0; e < n; e++) {
                kc[e] = to_half(k[e], kv_dtype);
                vc[e] = to_half(v[e], kv_dtype);
            }
        }
    }
}

/* ---------------------------------------------------------------------------------
 * A whole decode step of a Llama model's blocks in one call: per layer, RMSNorm,
 * qkv, RoPE and cache store, attention, output product into the residual, RMSNorm,
 * gate and up, SiLU-and-multiply, down product into the residual. The same
 * functions as above, without a round trip to Python between them.
 */
typedef struct {
    const void *q; /* q4: uint8 nibbles; q8: int8 */
    const void *d, *m; /* float32, or float16 when f16 */
    int64_t n, k;
    int32_t kind; /* 0: q4, 1: q8 */
    int32_t f16;
} QWeight;

typedef struct {
    QWeight qkv, o, fc, down;
    const float *attn_norm, *mlp_norm;
} QLayer;

static int qmatmul(const QWeight *w, const float *x, int64_t M, float *y, int accumulate) {
    if (w->kind == 0)
        return qmm_q4(x, M, w->k, (const uint8_t *)w->q, w->d, w->m, w->n, y, accumulate,
                      w->f16);
    return qmm_q8(x, M, w->k, (const int8_t *)w->q, w->d, w->m, w->n, y, accumulate, w->f16);
}

/* x: (B, C) residual stream, updated in place. Caches: (n_layer, slots, KV, hd), one
 * layer layer_stride elements after the previous. scratch: B * (C + (H + 2 KV) hd +
 * H hd + 3 I) floats. Returns 0, or -1 when memory runs out. */
int qmm_decode_layers(const QLayer *layers, int64_t n_layer, float *x, int64_t B, int64_t C,
                      int64_t H, int64_t KV, int64_t hd, int64_t I, float eps,
                      const int64_t *positions, const float *cos, const float *sin_signed,
                      const int64_t *slots, void *k_cache, void *v_cache, int64_t layer_stride,
                      int kv_dtype, int64_t block_size, const int64_t *tables, int64_t W,
                      const int64_t *ctx, float scale, float *scratch) {
    const int64_t width = (H + 2 * KV) * hd, elem = kv_dtype == 0 ? 4 : 2;
    float *h = scratch, *qkv = h + B * C, *att = qkv + B * width, *g = att + B * H * hd;
    float *a = g + B * 2 * I;
    for (int64_t l = 0; l < n_layer; l++) {
        const QLayer *L = layers + l;
        char *kc = (char *)k_cache + l * layer_stride * elem;
        char *vc = (char *)v_cache + l * layer_stride * elem;
        qmm_rms_norm(x, L->attn_norm, B, C, eps, h);
        if (qmatmul(&L->qkv, h, B, qkv, 0)) return -1;
        qmm_rope_store(qkv, B, H, KV, hd, positions, cos, sin_signed, slots, kc, vc, kv_dtype);
        qmm_decode_attention(qkv, width, kc, vc, kv_dtype, block_size, B, H, KV, hd, tables, W,
                             ctx, scale, att);
        if (qmatmul(&L->o, att, B, x, 1)) return -1;
        qmm_rms_norm(x, L->mlp_norm, B, C, eps, h);
        if (qmatmul(&L->fc, h, B, g, 0)) return -1;
        qmm_silu_mul(g, B, I, a);
        if (qmatmul(&L->down, a, B, x, 1)) return -1;
    }
    return 0;
}

/* Rows ids[0..B) of a quantized (n, C) embedding, dequantized into x (B, C) on the
 * calling thread (a row is too little work for a parallel region). Returns 0, or -2
 * for an id outside the table. */
static int embed_rows(const QWeight *e, const int64_t *ids, int64_t B, float *x) {
    const int64_t nb = e->k / QK;
    for (int64_t b = 0; b < B; b++) {
        const int64_t id = ids[b];
        if (id < 0 || id >= e->n) return -2;
        if (e->kind == 0)
            dequant_row_q4((const uint8_t *)e->q, e->d, e->m, e->f16, id, nb, x + b * e->k);
        else
            dequant_row_q8((const int8_t *)e->q, e->d, e->m, e->f16, id, nb, x + b * e->k);
    }
    return 0;
}

/* A whole decode step in one call, so that no PyTorch operation runs between the
 * embedding and the logits: the embedding rows of ids (when embed is given; else x
 * holds the B input rows), the blocks as qmm_decode_layers runs them, the final
 * RMSNorm, and the output layer into out (B, head->n) when head is given; without
 * head, out (B, C) receives the normalised hidden states. x is the (B, C) residual
 * stream; scratch is as qmm_decode_layers takes it. Returns 0, -1 when memory runs
 * out, -2 for an id outside the embedding. */
int qmm_decode_step(const QWeight *embed, const int64_t *ids, const float *final_norm,
                    const QWeight *head, float *out, const QLayer *layers, int64_t n_layer,
                    float *x, int64_t B, int64_t C, int64_t H, int64_t KV, int64_t hd,
                    int64_t I, float eps, const int64_t *positions, const float *cos,
                    const float *sin_signed, const int64_t *slots, void *k_cache,
                    void *v_cache, int64_t layer_stride, int kv_dtype, int64_t block_size,
                    const int64_t *tables, int64_t W, const int64_t *ctx, float scale,
                    float *scratch) {
    if (embed && embed_rows(embed, ids, B, x)) return -2;
    if (qmm_decode_layers(layers, n_layer, x, B, C, H, KV, hd, I, eps, positions, cos,
                          sin_signed, slots, k_cache, v_cache, layer_stride, kv_dtype,
                          block_size, tables, W, ctx, scale, scratch))
        return -1;
    if (!head) {
        qmm_rms_norm(x, final_norm, B, C, eps, out);
        return 0;
    }
    float *h = scratch; /* the blocks are done with it */
    qmm_rms_norm(x, final_norm, B, C, eps, h);
    return qmatmul(head, h, B, out, 0);
}

/* Token masks of constrained decoding, applied in place: for each of the n rows
 * rows[i] of logits (row_stride floats apart), every token j < width whose bit
 * (bit j % 32 of word j / 32 of bitmask row i, words apart) is clear gets -inf. */
void qmm_apply_token_mask(float *logits, int64_t row_stride, const int64_t *rows, int64_t n,
                          const uint32_t *bitmask, int64_t words, int64_t width) {
    for (int64_t i = 0; i < n; i++) {
        float *row = logits + rows[i] * row_stride;
        const uint32_t *bits = bitmask + i * words;
        for (int64_t w = 0; w * 32 < width; w++) {
            uint32_t off = ~bits[w];
            if (!off) continue; /* all 32 allowed */
            const int64_t base = w * 32, end = width - base < 32 ? width - base : 32;
            if (off == 0xFFFFFFFFu && end == 32) {
                for (int j = 0; j < 32; j++) row[base + j] = -INFINITY;
                continue;
            }
            for (int64_t j = 0; j < end; j++)
                if (off >> j & 1u) row[base + j] = -INFINITY;
        }
    }
}
