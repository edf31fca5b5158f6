/* Compiled host loops of the merge methods; `alignment/merge/kernels.py` loads this library with ctypes
 * (the Python entry below only makes the built file importable, so its path can be found).
 *
 * Every function reads the task vectors implicitly: `models` holds `num` float32 arrays of `n` elements and
 * `base` one more, or NULL where the method has no base; tau_i = models[i] - base (models[i] without a base).
 * Temporaries live in blocks of BLOCK elements, so one pass reads each input once at memory speed and the
 * inner loops, with nothing else in them, vectorise (`c ? value : 0` becomes a select, not a branch, because
 * the build says floating point never traps: -fno-trapping-math). Functions return 0, -1 when a temporary could
 * not be allocated, or -2 when an input changed between two passes over it. No -ffast-math: `v - v` must stay
 * NaN for a NaN or Inf input (the combine's screen); only the float32 partial sums of a block are reordered
 * (`omp simd reduction`), and blocks accumulate in float64.
 */
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 2048       /* N + 4 float32 rows of it stay in L2 */
#define BUCKETS 65536    /* histogram of the top 16 bits of a non-negative float32 */
/* The calling convention of the functions below: kernels.py refuses a build whose version is not its own (an
 * in-place build left over from older sources would otherwise be called with the wrong arguments). */
#define LOOPS_VERSION 2

int merge_loops_version(void) { return LOOPS_VERSION; }

/* The x86-64 baseline is SSE2; an AVX2 clone is picked at load time where the CPU has it (GCC with glibc: ifunc). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__)
#define VECTORIZED __attribute__((target_clones("avx2", "default")))
#else
#define VECTORIZED
#endif

static inline int64_t block_size(int64_t n, int64_t start) { return n - start < BLOCK ? n - start : BLOCK; }

static inline uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

/* DARE's 24-bit draw for element `index` of a model with keys (k0, k1); the entry is kept when it is below the cut. */
static inline uint32_t dare_draw(uint32_t index, uint32_t k0, uint32_t k1) {
    return lowbias32(lowbias32(index ^ k0) ^ k1) >> 8;
}

/* dest[:m] = the float32 bits of |x - base| (of |x| without a base), which order like the magnitudes. */
static inline void load_magnitude_bits(const float *restrict x, const float *restrict base, int64_t m,
                                       uint32_t *restrict dest) {
    for (int64_t j = 0; j < m; j++) {
        const float tau = base ? x[j] - base[j] : x[j];
        uint32_t bits;
        memcpy(&bits, &tau, sizeof bits);
        dest[j] = bits & 0x7FFFFFFFu;
    }
}

/* One block of model i's task vector, into tau[:m] and its contribution into acc[:m]: tau = x - base (x without a
 * base), kept where |tau| >= c and (when drop) DARE's draw is below the cut, kept entries times s; acc += w tau, or
 * sign(w tau) when count; screen += tau - tau before the trim (NaN for a NaN or Inf). One loop reads x once; the
 * flags are constants at every call (see merge_combine), so each combination compiles to its own vectorised loop. */
static inline __attribute__((always_inline)) void load_task_vector(
        const float *restrict x, const float *restrict base, int has_base, int drop, int count, int64_t m, float c,
        uint32_t index, uint32_t k0, uint32_t k1, uint32_t cut, float s, float w, float *restrict tau,
        float *restrict acc, float *restrict screen) {
    for (int64_t j = 0; j < m; j++) {
        float v = has_base ? x[j] - base[j] : x[j];
        screen[j] += v - v;
        int keep = __builtin_fabsf(v) >= c;
        if (drop) keep &= dare_draw(index + (uint32_t)j, k0, k1) < cut;
        v = keep ? v * s : 0.0f;
        tau[j] = v;
        const float weighted = w * v;
        acc[j] += count ? (weighted > 0 ? 1.0f : (weighted < 0 ? -1.0f : 0.0f)) : weighted;
    }
}

/* out[:n] = the merged values of elements [first_index, first_index + n) of a tensor; one read of every input.
 * *screen = 0 when every tau was finite, else NaN (tau - tau per element, at the cost of one subtraction).
 *
 * Per model i: tau_i kept where |tau_i| >= thresholds[i] (0 keeps all) and, when cuts[i] < 2**24, where its DARE
 * draw is below cuts[i]; kept entries times scales[i]. Then
 *   election 0:   out = base + sum_i coefficients[i] tau_i            (normalisation and lam already folded in)
 *   election 1/2: TIES' disjoint sum with weights w = coefficients: the elected sign is + where S >= 0, else -,
 *                 S = sum_i w_i tau_i (1) or sum_i sign(w_i tau_i) (2); A = {i: sign(w_i tau_i) = elected sign};
 *                 out = base + lam * sum_A w_i tau_i, divided by sum_A w_i when normalize (by 1 where that is 0).
 * keys: [num, 2] uint32, model i's DARE keys; first_index makes a piece of a tensor draw as the whole would.
 */
VECTORIZED
int merge_combine(const float *const *models, int64_t num, const float *base, int64_t n, int64_t first_index,
                  const float *coefficients, const float *thresholds, const float *scales, const uint32_t *cuts,
                  const uint32_t *keys, int64_t election, int64_t normalize, float lam, float *out,
                  float *screen_out) {
    float *taus = malloc(sizeof(float) * BLOCK * (num + 2));
    if (!taus) return -1;
    float *restrict acc = taus + num * BLOCK, *restrict denominator = acc + BLOCK;
    float numerator[BLOCK], screen[BLOCK];
    memset(screen, 0, sizeof screen);
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int64_t m = block_size(n, start);
        const float *restrict b = base ? base + start : NULL;
        for (int64_t j = 0; j < m; j++) acc[j] = 0.0f;
        for (int64_t i = 0; i < num; i++) {
            const uint32_t k0 = keys[2 * i], k1 = keys[2 * i + 1], index = (uint32_t)(first_index + start);
            const uint32_t cut = cuts[i];
            const int drop = cut < (1u << 24);
            const float c = thresholds[i], s = scales[i], w = coefficients[i];
            const float *restrict x = models[i] + start;
            float *restrict tau = taus + i * BLOCK;
#define LOAD(HAS_BASE, DROP, COUNT) \
    load_task_vector(x, b, HAS_BASE, DROP, COUNT, m, c, index, k0, k1, cut, s, w, tau, acc, screen); break
            switch ((b != NULL) * 4 + drop * 2 + (election == 2)) {
                case 0: LOAD(0, 0, 0);
                case 1: LOAD(0, 0, 1);
                case 2: LOAD(0, 1, 0);
                case 3: LOAD(0, 1, 1);
                case 4: LOAD(1, 0, 0);
                case 5: LOAD(1, 0, 1);
                case 6: LOAD(1, 1, 0);
                default: LOAD(1, 1, 1);
            }
#undef LOAD
        }
        if (election != 0) {
            for (int64_t j = 0; j < m; j++) numerator[j] = denominator[j] = 0.0f;
            for (int64_t i = 0; i < num; i++) {
                const float *restrict tau = taus + i * BLOCK;
                const float w = coefficients[i];
                for (int64_t j = 0; j < m; j++) {
                    const float weighted = w * tau[j];
                    const int agree = acc[j] >= 0 ? weighted > 0 : weighted < 0;
                    numerator[j] += agree ? weighted : 0.0f;
                    denominator[j] += agree ? w : 0.0f;
                }
            }
            if (normalize)
                for (int64_t j = 0; j < m; j++)
                    acc[j] = lam * (numerator[j] / (denominator[j] != 0 ? denominator[j] : 1.0f));
            else
                for (int64_t j = 0; j < m; j++) acc[j] = lam * numerator[j];
        }
        float *restrict o = out + start;
        if (b)
            for (int64_t j = 0; j < m; j++) o[j] = b[j] + acc[j];
        else
            memcpy(o, acc, m * sizeof(float));
    }
    float total = 0.0f;
    for (int64_t j = 0; j < BLOCK; j++) total += screen[j];
    *screen_out = total;
    free(taus);
    return 0;
}

/* counts[num, BUCKETS] += per model, a histogram of the top 16 bits of |tau|. One pass: each block of the base
 * is read once for all models. */
VECTORIZED
int merge_magnitude_histograms(const float *const *models, int64_t num, const float *base, int64_t n,
                               int64_t *counts) {
    uint32_t bits[BLOCK];
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int64_t m = block_size(n, start);
        for (int64_t i = 0; i < num; i++) {
            int64_t *restrict count = counts + i * BUCKETS;
            load_magnitude_bits(models[i] + start, base ? base + start : NULL, m, bits);
            for (int64_t j = 0; j < m; j++) count[bits[j] >> 16]++;
        }
    }
    return 0;
}

/* Per model i, the |tau| whose top 16 bits are buckets[i], into out[offsets[i]:offsets[i + 1]] (sized from the
 * histogram). One pass, as merge_magnitude_histograms; -2 if a model has more of them than the histogram counted
 * (its mapped file changed in between). */
VECTORIZED
int merge_bucket_magnitudes(const float *const *models, int64_t num, const float *base, int64_t n,
                            const int64_t *buckets, const int64_t *offsets, float *out) {
    int64_t *found = malloc(sizeof(int64_t) * num);
    if (!found) return -1;
    memcpy(found, offsets, sizeof(int64_t) * num);
    uint32_t bits[BLOCK];
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int64_t m = block_size(n, start);
        for (int64_t i = 0; i < num; i++) {
            load_magnitude_bits(models[i] + start, base ? base + start : NULL, m, bits);
            const uint32_t bucket = (uint32_t)buckets[i];
            /* Matches are rare (one bucket of 65536): a vectorised test skips the runs of 64 that hold none. */
            for (int64_t run = 0; run < m; run += 64) {
                const int64_t stop = run + 64 < m ? run + 64 : m;
                uint32_t any = 0;
                for (int64_t j = run; j < stop; j++) any |= bits[j] >> 16 == bucket;
                if (any)
                    for (int64_t j = run; j < stop; j++)
                        if (bits[j] >> 16 == bucket) {
                            if (found[i] == offsets[i + 1]) {
                                free(found);
                                return -2;
                            }
                            memcpy(&out[found[i]++], &bits[j], sizeof(float));
                        }
            }
        }
    }
    free(found);
    return 0;
}

/* result[num, num] = float64 dot products of the task vectors (float32 within a block, float64 across blocks). */
VECTORIZED
int merge_gram(const float *const *models, int64_t num, const float *base, int64_t n, double *result) {
    float *taus = malloc(sizeof(float) * BLOCK * num);
    if (!taus) return -1;
    memset(result, 0, sizeof(double) * num * num);
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int64_t m = block_size(n, start);
        for (int64_t i = 0; i < num; i++) {
            float *restrict tau = taus + i * BLOCK;
            const float *restrict x = models[i] + start;
            if (base)
                for (int64_t j = 0; j < m; j++) tau[j] = x[j] - base[start + j];
            else
                memcpy(tau, x, m * sizeof(float));
        }
        for (int64_t i = 0; i < num; i++)
            for (int64_t k = i; k < num; k++) {
                const float *restrict a = taus + i * BLOCK, *restrict c = taus + k * BLOCK;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t j = 0; j < m; j++) dot += a[j] * c[j];
                result[i * num + k] += dot;
            }
    }
    for (int64_t i = 0; i < num; i++)
        for (int64_t k = 0; k < i; k++) result[i * num + k] = result[k * num + i];
    free(taus);
    return 0;
}

/* Per model i, sums[2i] = sum |tau_i| and sums[2i + 1] = sum |tau_i| over the entries kept: |tau_i| >= thresholds[i]
 * and DARE's draw (keys [num, 2]) below cuts[i] (every draw is, for a cut of 2**24), float64. One pass: each block
 * of the base is read once for all models. */
VECTORIZED
int merge_l1_norms(const float *const *models, int64_t num, const float *base, int64_t n, const float *thresholds,
                   const uint32_t *keys, const uint32_t *cuts, double *sums) {
    memset(sums, 0, sizeof(double) * 2 * num);
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int64_t m = block_size(n, start);
        for (int64_t i = 0; i < num; i++) {
            const float *restrict x = models[i] + start;
            const float *restrict b = base ? base + start : NULL;
            const float c = thresholds[i];
            const uint32_t k0 = keys[2 * i], k1 = keys[2 * i + 1], cut = cuts[i];
            float block_before = 0.0f, block_after = 0.0f;
#pragma omp simd reduction(+ : block_before, block_after)
            for (int64_t j = 0; j < m; j++) {
                const float magnitude = __builtin_fabsf(b ? x[j] - b[j] : x[j]);
                const int keep = magnitude >= c && dare_draw((uint32_t)(start + j), k0, k1) < cut;
                block_before += magnitude;
                block_after += keep ? magnitude : 0.0f;
            }
            sums[2 * i] += block_before;
            sums[2 * i + 1] += block_after;
        }
    }
    return 0;
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_loops",
    .m_doc = "Merge loops; called through ctypes by alignment.merge.kernels."};

PyMODINIT_FUNC PyInit__loops(void) { return PyModule_Create(&module); }
