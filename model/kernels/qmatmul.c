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
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QMM_AVX2 1
#else
#define QMM_AVX2 0
#endif

#define QK 32
#define MT 4 /* rows of x per pass over a weight row */

int qmm_simd_width(void) { return QMM_AVX2 ? 8 : 1; }

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

static inline float min_term(const float *mrow, const float *xs, int64_t nb) {
    float s = 0.f;
    for (int64_t b = 0; b < nb; b++) s += mrow[b] * xs[b];
    return s;
}

#if QMM_AVX2
static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* 16 bytes of nibbles -> the block's 32 values as 4 x 8 floats, in order. */
static inline void decode_q4(const uint8_t *q, __m256 w[4]) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)q);
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

static inline void decode_q8(const int8_t *q, __m256 w[4]) {
    for (int k = 0; k < 4; k++) {
        const __m128i b = _mm_loadl_epi64((const __m128i *)(q + 8 * k));
        w[k] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    }
}

/* One weight row against up to MT rows of x: acc[i] += d * (q . x_i) per block. */
#define ROW_KERNEL(NAME, QTYPE, DECODE, BYTES)                                          \
    static void NAME(const float *x, int64_t mt, int64_t K, const QTYPE *qrow,         \
                     const float *drow, float out[MT]) {                                \
        const int64_t nb = K / QK;                                                      \
        __m256 acc[MT];                                                                 \
        for (int i = 0; i < MT; i++) acc[i] = _mm256_setzero_ps();                      \
        for (int64_t b = 0; b < nb; b++) {                                              \
            __m256 w[4];                                                                \
            DECODE(qrow + b * (BYTES), w);                                              \
            const __m256 d = _mm256_set1_ps(drow[b]);                                   \
            for (int64_t i = 0; i < mt; i++) {                                          \
                const float *xb = x + i * K + b * QK;                                   \
                __m256 t = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb));                    \
                t = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), t);                  \
                t = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + 16), t);                 \
                t = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), t);                 \
                acc[i] = _mm256_fmadd_ps(d, t, acc[i]);                                 \
            }                                                                           \
        }                                                                               \
        for (int64_t i = 0; i < mt; i++) out[i] = hsum(acc[i]);                         \
    }
ROW_KERNEL(row_q4, uint8_t, decode_q4, QK / 2)
ROW_KERNEL(row_q8, int8_t, decode_q8, QK)
#else
static void row_q4(const float *x, int64_t mt, int64_t K, const uint8_t *qrow,
                   const float *drow, float out[MT]) {
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
                   const float *drow, float out[MT]) {
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
#endif

/* xs: scratch of M * K / 32 floats (only read when m is not NULL). */
#define GEMM(NAME, QTYPE, ROW, BYTES)                                                   \
    void NAME(const float *x, int64_t M, int64_t K, const QTYPE *q, const float *d,     \
              const float *m, int64_t N, float *y, float *xs) {                         \
        const int64_t nb = K / QK;                                                      \
        if (m) block_sums(x, M, K, xs);                                                 \
        _Pragma("omp parallel for schedule(static)")                                    \
        for (int64_t n = 0; n < N; n++) {                                               \
            const QTYPE *qrow = q + n * nb * (BYTES);                                   \
            const float *drow = d + n * nb;                                             \
            for (int64_t i0 = 0; i0 < M; i0 += MT) {                                    \
                const int64_t mt = M - i0 < MT ? M - i0 : MT;                           \
                float out[MT];                                                          \
                ROW(x + i0 * K, mt, K, qrow, drow, out);                                \
                for (int64_t i = 0; i < mt; i++) {                                      \
                    float v = out[i];                                                   \
                    if (m) v += min_term(m + n * nb, xs + (i0 + i) * nb, nb);           \
                    y[(i0 + i) * N + n] = v;                                            \
                }                                                                       \
            }                                                                           \
        }                                                                               \
    }
GEMM(qmm_q4, uint8_t, row_q4, QK / 2)
GEMM(qmm_q8, int8_t, row_q8, QK)

/* Dequantize whole rows to float32 (for large batches, which go to a float GEMM). */
void qmm_dequant_q4(const uint8_t *q, const float *d, const float *m, int64_t N, int64_t K,
                    float *w) {
    const int64_t nb = K / QK;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *qb = q + (n * nb + b) * (QK / 2);
            const float db = d[n * nb + b], mb = m ? m[n * nb + b] : 0.f;
            float *wb = w + n * K + b * QK;
            for (int j = 0; j < QK / 2; j++) {
                wb[j] = db * (float)(qb[j] & 0x0F) + mb;
                wb[j + QK / 2] = db * (float)(qb[j] >> 4) + mb;
            }
        }
}

void qmm_dequant_q8(const int8_t *q, const float *d, const float *m, int64_t N, int64_t K,
                    float *w) {
    const int64_t nb = K / QK;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t b = 0; b < nb; b++) {
            const int8_t *qb = q + (n * nb + b) * QK;
            const float db = d[n * nb + b], mb = m ? m[n * nb + b] : 0.f;
            float *wb = w + n * K + b * QK;
            for (int j = 0; j < QK; j++) wb[j] = db * (float)qb[j] + mb;
        }
}
