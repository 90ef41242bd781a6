/* A probe, not a kernel the server uses: int8 activations against the float kernels.
 *
 * Built by bench/int8_probe.py together with model/kernels/qmatmul.c (included below,
 * so the float kernels and the helpers are the server's own). Each 32-value block of
 * a row of x becomes int8 values and one float scale (amax / 127), as llama.cpp's
 * Q8_0 activations are; a block's products are then integer dot products (u8 x s8
 * pairs summed in int16, then int32: maddubs and madd), scaled once by d * dx. The
 * min term of q4 blocks uses the exact float block sums of x. Register tiles: two
 * weight rows by four rows of x. Built for AVX2 (maddubs), or for AVX-512 with VNNI
 * (the float kernels then the server's avx512 build, the dot products vpdpbusd).
 */
#include "../model/kernels/qmatmul.c"

#if QMM_AVX2
static void quantize_x8(const float *x, int64_t M, int64_t K, int8_t *qx, float *dx) {
    for (int64_t r = 0; r < M * (K / QK); r++) {
        const float *xb = x + r * QK;
        float amax = 0.f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
        dx[r] = d;
        for (int j = 0; j < QK; j++) qx[r * QK + j] = (int8_t)lrintf(xb[j] * inv);
    }
}

static inline __m256i q4_bytes(const uint8_t *q) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)q);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw),
                            _mm256_set1_epi8(0x0F));
}
static inline __m256i q8_bytes(const int8_t *q) {
    return _mm256_loadu_si256((const __m256i *)q);
}
static inline __m256 dot_u8s8(__m256i w, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    /* VNNI: the four u8 x s8 products of each 32-bit lane summed in one instruction,
     * without maddubs' int16 saturation */
    return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x));
#else
    const __m256i p = _mm256_maddubs_epi16(w, x);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
#endif
}

#define I8_ROWS 4
#define I8_KERNEL(NAME, QTYPE, BYTES, LOADW, SIGNED)                                     \
    static void NAME(const int8_t *qx, const float *dx, int64_t mt, int64_t nb,          \
                     const QTYPE *qa, const QTYPE *qb, const float *da, const float *db, \
                     float out[2][I8_ROWS]) {                                             \
        __m256 acc[2][I8_ROWS];                                                           \
        for (int r = 0; r < 2; r++)                                                       \
            for (int i = 0; i < I8_ROWS; i++) acc[r][i] = _mm256_setzero_ps();            \
        for (int64_t b = 0; b < nb; b++) {                                                \
            const QTYPE *qs[2] = {qa + b * (BYTES), qb + b * (BYTES)};                    \
            const float dw[2] = {da[b], db[b]};                                           \
            PREFETCH(qs[1]);                                                              \
            for (int r = 0; r < 2; r++) {                                                 \
                const __m256i w = LOADW(qs[r]);                                           \
                const __m256i wu = SIGNED ? _mm256_sign_epi8(w, w) : w;                  \
                for (int i = 0; i < I8_ROWS && i < mt; i++) {                             \
                    __m256i xv = _mm256_loadu_si256((const __m256i *)(qx + (i * nb + b) * QK)); \
                    if (SIGNED) xv = _mm256_sign_epi8(xv, w);                            \
                    acc[r][i] = _mm256_fmadd_ps(dot_u8s8(wu, xv),                         \
                                                _mm256_set1_ps(dw[r] * dx[i * nb + b]),   \
                                                acc[r][i]);                               \
                }                                                                         \
            }                                                                             \
        }                                                                                 \
        for (int r = 0; r < 2; r++)                                                       \
            for (int i = 0; i < I8_ROWS; i++) out[r][i] = i < mt ? hsum(acc[r][i]) : 0.f; \
    }
I8_KERNEL(i8_rows_q4, uint8_t, QK / 2, q4_bytes, 0)
I8_KERNEL(i8_rows_q8, int8_t, QK, q8_bytes, 1)

/* y = x @ W^T with x quantized to int8 first; the arguments of qmm_q4 / qmm_q8. */
#define GEMM_I8(NAME, QTYPE, BYTES, KERNEL)                                               \
    int NAME(const float *x, int64_t M, int64_t K, const QTYPE *q, const void *d,          \
             const void *m, int64_t N, float *y, int f16) {                               \
        const int64_t nb = K / QK;                                                        \
        int8_t *qx = (int8_t *)malloc((size_t)(M * K));                                   \
        float *dx = (float *)malloc(sizeof(float) * (size_t)(M * nb));                    \
        float *xs = (float *)malloc(sizeof(float) * (size_t)(M * nb));                    \
        if (!qx || !dx || !xs) {                                                          \
            free(qx);                                                                     \
            free(dx);                                                                     \
            free(xs);                                                                     \
            return -1;                                                                    \
        }                                                                                 \
        quantize_x8(x, M, K, qx, dx);                                                     \
        if (m) block_sums(x, M, K, xs);                                                   \
        _Pragma("omp parallel for schedule(static)")                                      \
        for (int64_t p = 0; p < (N + 1) / 2; p++) {                                       \
            const int64_t n = 2 * p, n2 = n + 1 < N ? n + 1 : n;                          \
            float da[nb], db[nb], ma[nb], mb[nb];                                         \
            const float *drow[2] = {row_scales(d, f16, n, nb, da),                        \
                                    row_scales(d, f16, n2, nb, db)};                      \
            const float *mrow[2] = {row_scales(m, f16, n, nb, ma),                        \
                                    row_scales(m, f16, n2, nb, mb)};                      \
            for (int64_t i0 = 0; i0 < M; i0 += I8_ROWS) {                                 \
                const int64_t mt = M - i0 < I8_ROWS ? M - i0 : I8_ROWS;                   \
                float out[2][I8_ROWS];                                                    \
                KERNEL(qx + i0 * K, dx + i0 * nb, mt, nb, q + n * nb * (BYTES),           \
                       q + n2 * nb * (BYTES), drow[0], drow[1], out);                     \
                for (int r = 0; r < 1 + (n2 != n); r++)                                   \
                    for (int64_t i = 0; i < mt; i++)                                      \
                        y[(i0 + i) * N + n + r] =                                         \
                            out[r][i] + (m ? min_term(mrow[r], xs + (i0 + i) * nb, nb) : 0.f); \
            }                                                                             \
        }                                                                                 \
        free(qx);                                                                         \
        free(dx);                                                                         \
        free(xs);                                                                         \
        return 0;                                                                         \
    }
GEMM_I8(probe_q4_i8, uint8_t, QK / 2, i8_rows_q4)
GEMM_I8(probe_q8_i8, int8_t, QK, i8_rows_q8)
#endif
