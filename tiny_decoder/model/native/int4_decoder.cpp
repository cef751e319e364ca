/* One-token decoding of a pre-norm RoPE / RMSNorm / SwiGLU decoder with int4 weights, batch 1, CPU.
 *
 * The whole step (and a greedy loop of steps) runs in one OpenMP parallel region: the rows of every
 * matrix product and the heads of attention are split among the threads, with a barrier between phases,
 * instead of one parallel region, one allocation and one dispatch per operation. Built and loaded by
 * tiny_decoder/model/native_decoder.py (which documents the layout of every array); called through ctypes.
 * C-style C++ (compiled by the C++ compiler the compiled step uses, the entry point extern "C").
 *
 * Weights: each matrix (N, K) in groups of 32 inputs (down's K padded to them with zero weights). Row n, group g: 16 bytes, byte j holding input
 * 32g + j in its low nibble and 32g + 16 + j in its high one (values 0..15), and a (scale, minimum) pair:
 * w = q * scale + minimum. A product is sum_g scale * (x_g . q_g) + minimum * sum(x_g).
 */
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef float vf16 __attribute__((vector_size(64)));
typedef unsigned char vu8 __attribute__((vector_size(16)));
typedef int vi16 __attribute__((vector_size(64)));

static inline vf16 load_f16(const float *p) {
    vf16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline vu8 load_u8(const uint8_t *p) {
    vu8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float sum_lanes(vf16 v) {
#if defined(__AVX512F__)
    __m512 m;
    memcpy(&m, &v, sizeof m);
    return _mm512_reduce_add_ps(m);
#else /* a tree: 4 dependent adds, not 16 */
    float t[16];
    memcpy(t, &v, sizeof t);
    for (int width = 8; width > 0; width /= 2)
        for (int i = 0; i < width; i++) t[i] += t[i + width];
    return t[0];
#endif
}

/* q . k over head_dim values (a multiple of 16: 16 lanes at a time; else one by one) */
static inline float head_dot(const float *q, const float *k, int D) {
    if (D % 16) {
        float dot = 0.0f;
        for (int i = 0; i < D; i++) dot += q[i] * k[i];
        return dot;
    }
    vf16 acc = load_f16(q) * load_f16(k);
    for (int i = 16; i < D; i += 16) acc += load_f16(q + i) * load_f16(k + i);
    return sum_lanes(acc);
}

/* group sums of x (K / 32 of them): the minimum's part of every row's product */
static void group_sums(const float *x, int groups, float *sums) {
    for (int g = 0; g < groups; g++) sums[g] = sum_lanes(load_f16(x + 32 * g) + load_f16(x + 32 * g + 16));
}

/* x_g . q_g over one group of 32 inputs, as 16 lanes (summed by the caller) */
static inline vf16 group_dot(const uint8_t *q, const float *x) {
#if defined(__AVX512F__)
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    __m512 low = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
    __m512 high = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
    __m512 dot = _mm512_fmadd_ps(_mm512_loadu_ps(x + 16), high, _mm512_mul_ps(_mm512_loadu_ps(x), low));
    vf16 v;
    memcpy(&v, &dot, sizeof v);
    return v;
#else /* the compiler's vectors (AVX2, NEON, ...): widened to ints first, bytes to floats directly is scalar */
    vi16 b = __builtin_convertvector(load_u8(q), vi16);
    vf16 low = __builtin_convertvector(b & 15, vf16), high = __builtin_convertvector(b >> 4, vf16);
    return load_f16(x) * low + load_f16(x + 16) * high;
#endif
}

/* row n of a product: q (groups * 16 bytes), sz (groups (scale, minimum) pairs) */
static float row_dot(const uint8_t *q, const float *sz, const float *x, const float *sums, int groups) {
    vf16 even = {0}, odd = {0};
    float minimum = 0.0f;
    int g = 0;
    for (; g + 2 <= groups; g += 2) { /* two accumulators: two groups in flight */
        even += sz[2 * g] * group_dot(q + 16 * g, x + 32 * g);
        odd += sz[2 * g + 2] * group_dot(q + 16 * g + 16, x + 32 * g + 32);
        minimum += sz[2 * g + 1] * sums[g] + sz[2 * g + 3] * sums[g + 1];
    }
    if (g < groups) {
        even += sz[2 * g] * group_dot(q + 16 * g, x + 32 * g);
        minimum += sz[2 * g + 1] * sums[g];
    }
    return sum_lanes(even + odd) + minimum;
}

typedef struct {
    const uint8_t *q;
    const float *sz;
} Matrix;

static Matrix matrix(const void *q, const void *sz) {
    Matrix m = {static_cast<const uint8_t *>(q), static_cast<const float *>(sz)};
    return m;
}

/* out[n] (+)= row n . x for this thread's rows (omp for: the caller is inside the parallel region) */
static void product(Matrix m, int rows, int inputs, const float *x, float *sums, float *out, int accumulate) {
    int groups = inputs / 32;
    group_sums(x, groups, sums);
#pragma omp for schedule(static)
    for (int n = 0; n < rows; n++) {
        float y = row_dot(m.q + (size_t)n * (inputs / 2), m.sz + (size_t)n * groups * 2, x, sums, groups);
        out[n] = accumulate ? out[n] + y : y;
    }
}

static void rms_normalized(const float *x, int d, float eps, float *out) {
    float square = 0.0f;
    for (int i = 0; i < d; i++) square += x[i] * x[i];
    float scale = 1.0f / sqrtf(square / d + eps);
    for (int i = 0; i < d; i++) out[i] = x[i] * scale;
}

enum { DIM, LAYERS, HEADS, HEAD_DIM, HIDDEN, VOCAB, CONTEXT, N_DIMS };

typedef struct {
    int d, layers, heads, head_dim, hidden, vocab, context, inner;
    int hidden_padded; /* down's inputs: the hidden width rounded up to groups of 32 (its weights zero there) */
    const float *eps;      /* 2 per layer (attention, feed-forward), then the final norm's */
    const float *embedding; /* (vocab, d) */
    const float *rotary;   /* (context, head_dim / 2, 2): cos, sin */
    Matrix head;
    const Matrix *qkv, *proj, *up, *down; /* one per layer; up: gate rows then up rows */
    float *const *keys, *const *values;   /* one (heads, context, head_dim) cache per layer */
} Model;

/* out = sum_t p[t] * scale * v[t] over `count` rows of D values (D a multiple of 16, up to 64: the sums in
 * registers; else value by value) */
static void weighted_sum(const float *p, float scale, const float *v, int count, int D, float *out) {
    if (D % 16 == 0 && D <= 64) {
        vf16 acc[4] = {};
        int lanes = D / 16;
        for (int t = 0; t < count; t++) {
            float weight = p[t] * scale;
            for (int i = 0; i < lanes; i++) acc[i] += weight * load_f16(v + (size_t)t * D + 16 * i);
        }
        for (int i = 0; i < lanes; i++) memcpy(out + 16 * i, &acc[i], sizeof acc[i]);
        return;
    }
    for (int i = 0; i < D; i++) out[i] = 0.0f;
    for (int t = 0; t < count; t++)
        for (int i = 0; i < D; i++) out[i] += p[t] * scale * v[(size_t)t * D + i];
}

/* attention of this thread's heads at `position`: q, k rotated, k / v written into the cache */
static void attend(const Model *m, int layer, int position, float *qkv, float *scores, float *out) {
    int D = m->head_dim, pairs = D / 2;
    const float *rot = m->rotary + (size_t)position * D;
    float scale = 1.0f / sqrtf((float)D);
#pragma omp for schedule(static)
    for (int h = 0; h < m->heads; h++) {
        float *q = qkv + h * D, *k = qkv + m->inner + h * D, *v = qkv + 2 * m->inner + h * D;
        for (int i = 0; i < pairs; i++) { /* rotary on interleaved pairs (the rows were permuted so) */
            float c = rot[2 * i], s = rot[2 * i + 1];
            float q0 = q[2 * i], q1 = q[2 * i + 1], k0 = k[2 * i], k1 = k[2 * i + 1];
            q[2 * i] = q0 * c - q1 * s, q[2 * i + 1] = q0 * s + q1 * c;
            k[2 * i] = k0 * c - k1 * s, k[2 * i + 1] = k0 * s + k1 * c;
        }
        float *key_cache = m->keys[layer] + (size_t)h * m->context * D;
        float *value_cache = m->values[layer] + (size_t)h * m->context * D;
        memcpy(key_cache + (size_t)position * D, k, D * sizeof(float));
        memcpy(value_cache + (size_t)position * D, v, D * sizeof(float));
        float highest = -INFINITY;
        for (int t = 0; t <= position; t++) {
            scores[t] = head_dot(q, key_cache + (size_t)t * D, D) * scale;
            highest = scores[t] > highest ? scores[t] : highest;
        }
        float total = 0.0f;
        for (int t = 0; t <= position; t++) total += scores[t] = expf(scores[t] - highest);
        weighted_sum(scores, 1.0f / total, value_cache, position + 1, D, out + h * D);
    }
}

typedef struct {
    float *x, *qkv, *attention, *hidden, *logits; /* shared */
} Shared;

/* one token through every layer, inside the parallel region; the logits in shared->logits */
static void forward(const Model *m, Shared *s, int token, int position, float *normed, float *sums, float *scores) {
#pragma omp single
    memcpy(s->x, m->embedding + (size_t)token * m->d, m->d * sizeof(float));
    for (int l = 0; l < m->layers; l++) {
        rms_normalized(s->x, m->d, m->eps[2 * l], normed); /* every thread its own copy: no barrier */
        product(m->qkv[l], 3 * m->inner, m->d, normed, sums, s->qkv, 0);
        attend(m, l, position, s->qkv, scores, s->attention);
        product(m->proj[l], m->d, m->inner, s->attention, sums, s->x, 1);
        rms_normalized(s->x, m->d, m->eps[2 * l + 1], normed);
        int groups = m->d / 32, H = m->hidden;
        group_sums(normed, groups, sums);
#pragma omp for schedule(static)
        for (int n = 0; n < H; n++) {
            size_t stride = (size_t)(m->d / 2), pairs = (size_t)groups * 2;
            float gate = row_dot(m->up[l].q + n * stride, m->up[l].sz + n * pairs, normed, sums, groups);
            float up = row_dot(m->up[l].q + (H + n) * stride, m->up[l].sz + (H + n) * pairs, normed, sums, groups);
            s->hidden[n] = gate / (1.0f + expf(-gate)) * up; /* silu(gate) * up */
        }
        product(m->down[l], m->d, m->hidden_padded, s->hidden, sums, s->x, 1); /* its inputs' tail: zeros */
    }
    rms_normalized(s->x, m->d, m->eps[2 * m->layers], normed);
    product(m->head, m->vocab, m->d, normed, sums, s->logits, 0);
}

static int argmax(const float *values, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (values[i] > values[best]) best = i;
    return best;
}

/* Feeds tokens[0..n_feed) at positions start.. (their logits: the last one's in `logits`), then, if
 * greedy > 0, picks the argmax of `logits` as out[0] and feeds each pick back for the next, `greedy` of
 * them in all, stopping after one equal to eos (eos < 0: none). Returns the count of out written (the
 * caller checks that start + n_feed + greedy - 1 <= context). */
extern "C" int td_int4_decode(const int64_t *dims, const float *eps, const void *const *pointers, int threads,
                   const int64_t *tokens, int n_feed, int start, int greedy, int eos, int64_t *out, float *logits) {
    Model m = {};
    m.d = (int)dims[DIM], m.layers = (int)dims[LAYERS], m.heads = (int)dims[HEADS], m.head_dim = (int)dims[HEAD_DIM];
    m.hidden = (int)dims[HIDDEN], m.vocab = (int)dims[VOCAB], m.context = (int)dims[CONTEXT];
    m.inner = m.heads * m.head_dim;
    m.hidden_padded = (m.hidden + 31) / 32 * 32;
    int L = m.layers;
    Matrix *matrices = (Matrix *)malloc(sizeof(Matrix) * 4 * L);
    m.eps = eps;
    m.embedding = static_cast<const float *>(pointers[0]);
    m.rotary = static_cast<const float *>(pointers[1]);
    m.head = matrix(pointers[2], pointers[3]);
    for (int l = 0; l < 4 * L; l++) matrices[l] = matrix(pointers[4 + 2 * l], pointers[5 + 2 * l]);
    m.qkv = matrices, m.proj = matrices + L, m.up = matrices + 2 * L, m.down = matrices + 3 * L;
    m.keys = (float *const *)(pointers + 4 + 8 * L);
    m.values = (float *const *)(pointers + 4 + 9 * L);
    int widest = m.hidden_padded > m.inner ? m.hidden_padded : m.inner;
    widest = widest > m.d ? widest : m.d;
    float *shared = (float *)calloc(m.d + 3 * m.inner + m.inner + m.hidden_padded, sizeof(float)); /* zero tail */
    Shared s = {shared, shared + m.d, shared + m.d + 3 * m.inner, shared + m.d + 4 * m.inner, logits};
    int written = 0;
#pragma omp parallel num_threads(threads)
    {
        float *own = (float *)malloc(sizeof(float) * (m.d + widest / 32 + 1 + m.context));
        float *normed = own, *sums = own + m.d, *scores = own + m.d + widest / 32 + 1;
        for (int i = 0; i < n_feed; i++) forward(&m, &s, (int)tokens[i], start + i, normed, sums, scores);
        int position = start + n_feed;
        for (int i = 0; i < greedy; i++) {
            if (i > 0) forward(&m, &s, (int)out[i - 1], position++, normed, sums, scores);
#pragma omp single
            {
                out[i] = argmax(logits, m.vocab);
                written = i + 1;
            }
            if (eos >= 0 && out[i] == eos) break; /* every thread reads the same out[i] after the barrier */
        }
        free(own);
    }
    free(shared);
    free(matrices);
    return written;
}
