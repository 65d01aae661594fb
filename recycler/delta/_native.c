/* The Δ engine's arithmetic as one compiled pass per element (chosen by recycler/delta/fast.py).
 *
 * Every function reads the inputs' bit patterns once and, per element, widens to float32, subtracts or
 * adds α·Δ, narrows with round-to-nearest-even, flags residual exceptions and round-trip fixes and writes
 * the output: the memory traffic is the inputs and the output, once. They compute what the numpy
 * reference (recycler/delta/kernels.py) computes, bit for bit (tests/test_native.py).
 *
 * Exactness rests on IEEE float32 add/subtract/multiply and nothing else: the build passes
 * -ffp-contract=off (no fusing t + a*w into an FMA, which aarch64 and -march=native would otherwise do)
 * and never -ffast-math; x86-64 computes float in SSE registers (no x87 excess precision). The one
 * place reassociation is allowed is the float64 sums of squares (the norms; `omp simd` reductions),
 * whose order is then the compiler's: fixed for a build, independent of the thread count.
 *
 * Dtypes: bf16, fp16, fp32, and FP8 (E4M3, E5M2) for apply and recycle with a float32 Δ; any other
 * combination returns UNSUPPORTED and the reference computes it.
 *
 * The GIL is released around every loop, so chunks of one tensor run on several threads at once.
 * Limited API (abi3): one wheel per platform serves every Python from 3.11.
 */
#define Py_LIMITED_API 0x030B0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

enum { BF16 = 0, F16 = 1, F32 = 2, E4M3 = 3, E5M2 = 4, NCODES = 5 };
enum { OK = 0, NONFINITE = 1, UNSUPPORTED = 2 }; /* UNSUPPORTED: no kernel for these dtypes (reference) */
#define BLOCK 2048 /* elements per diff block: its float32 Δ, flags and the base stay in L1 */

#define INLINE static inline __attribute__((always_inline))

/* Each specialised kernel is compiled twice on x86-64, for the baseline (SSE2: what a wheel may assume)
 * and for AVX2 (twice the vector width), and the loader picks one per machine (GNU ifunc).
 * -DRECYCLER_BASELINE builds the baseline only (tests/test_native.py compares the two). */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && !defined(RECYCLER_BASELINE)
#define KERNEL static __attribute__((target_clones("avx2", "default")))
#else
#define KERNEL static
#endif

INLINE float f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
INLINE uint32_t u32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* float16 bits → float32 bits, exact (subnormals normalised, NaN payloads kept, as numpy). */
INLINE uint32_t f16_to_f32(uint32_t h) {
    uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1F) return sign | 0x7F800000u | (m << 13);
    if (e != 0) return sign | ((e + 112u) << 23) | (m << 13);
    if (m == 0) return sign;
    uint32_t p = 31u - (uint32_t)__builtin_clz(m); /* the leading bit of a subnormal's mantissa */
    return sign | ((p + 103u) << 23) | ((m << (23u - p)) & 0x7FFFFFu);
}

/* float32 bits → float16 bits, round to nearest even (overflow → ±Inf, as numpy's cast). */
INLINE uint32_t f32_to_f16(uint32_t u) {
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    if (a >= 0x7F800000u) { /* Inf, NaN (quietened, the payload's high bits kept) */
        if (a == 0x7F800000u) return sign | 0x7C00u;
        return sign | 0x7E00u | ((a >> 13) & 0x3FFu);
    }
    if (a >= 0x477FF000u) return sign | 0x7C00u; /* ≥ 65520 rounds to Inf */
    if (a >= 0x38800000u) {                        /* a float16 normal: rebias, keep 10 bits, RNE */
        uint32_t m = a - 0x38000000u;
        return sign | ((m + 0xFFFu + ((m >> 13) & 1u)) >> 13);
    }
    if (a < 0x33000000u) return sign; /* ≤ 2⁻²⁵ (a tie at 2⁻²⁵ goes to even: 0) */
    uint32_t e = a >> 23, mant = (a & 0x7FFFFFu) | 0x800000u, s = 126u - e;
    uint32_t half = (1u << (s - 1u)) - 1u;
    return sign | ((mant + half + ((mant >> s) & 1u)) >> s);
}

INLINE int wide(int code) { return code == F32 ? 4 : code >= E4M3 ? 1 : 2; }

INLINE uint32_t load(const void *p, Py_ssize_t i, int code) {
    if (code == F32) return ((const uint32_t *)p)[i];
    if (code >= E4M3) return ((const uint8_t *)p)[i];
    return ((const uint16_t *)p)[i];
}

INLINE void store(void *p, Py_ssize_t i, uint32_t v, int code) {
    if (code == F32) ((uint32_t *)p)[i] = v;
    else if (code >= E4M3) ((uint8_t *)p)[i] = (uint8_t)v;
    else ((uint16_t *)p)[i] = (uint16_t)v;
}

/* float8_e4m3fn (bias 7, 3 mantissa bits, no Inf, 0x7F/0xFF NaN) → float32 bits, exact; branch-free so
 * that the loops around it vectorise (a table would be a gather). */
INLINE uint32_t e4m3_to_f32(uint32_t c) {
    uint32_t sign = (c & 0x80u) << 24, e = (c >> 3) & 0xFu, m = c & 7u;
    uint32_t normal = sign | ((e + 120u) << 23) | (m << 20);
    uint32_t sub = sign | u32((float)m * 0x1p-9f); /* m·2⁻⁹, exact */
    return (c & 0x7Fu) == 0x7Fu ? sign | 0x7FC00000u : e ? normal : sub;
}

/* float32 bits of one element of a `code` array. E5M2 is the high byte of a float16 (bias 15). */
INLINE uint32_t widen(uint32_t x, int code) {
    if (code == BF16) return x << 16;
    if (code == F16) return f16_to_f32(x);
    if (code == E4M3) return e4m3_to_f32(x);
    if (code == E5M2) return f16_to_f32(x << 8);
    return x;
}

/* float32 bits → an FP8 magnitude keeping `mb` mantissa bits, RNE, for a format of exponent bias
 * `bias` (normals from 2^(1−bias), subnormals k·2^(1−bias−mb)); overflow is checked by too_big. */
INLINE uint32_t f32_to_f8(uint32_t u, uint32_t mb, uint32_t bias) {
    uint32_t sign = (u >> 24) & 0x80u, a = u & 0x7FFFFFFFu, drop = 23u - mb;
    if (a >= (128u - bias) << 23) { /* a normal: rebias, keep mb bits, RNE (a carry is correct) */
        uint32_t m = a - ((127u - bias) << 23);
        return sign | ((m + (1u << (drop - 1u)) - 1u + ((m >> drop) & 1u)) >> drop);
    }
    uint32_t e = a >> 23; /* a subnormal k·2^(1−bias−mb): k = mantissa >> (150 + 1 − bias − mb − e) */
    if (e + mb + bias < 126u) return sign; /* below half the smallest subnormal (a tie there: 0) */
    uint32_t mant = (a & 0x7FFFFFu) | 0x800000u, sh = 150u + 1u - bias - mb - e;
    return sign | ((mant + (1u << (sh - 1u)) - 1u + ((mant >> sh) & 1u)) >> sh);
}

/* float32 bits → `code` bits, RNE, for finite values and ±Inf. 32-bit lanes (twice the vector width of
 * 64): only NaN patterns above 0xFFFF8000 would wrap, and a NaN is refused before its rounding matters
 * (the kernels return NONFINITE and the reference raises). */
INLINE uint32_t rne(uint32_t u, int code) {
    if (code == BF16) return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    if (code == F16) return f32_to_f16(u);
    if (code == E4M3) return f32_to_f8(u, 3, 7);
    if (code == E5M2) return f32_to_f8(u, 2, 15);
    return u;
}

/* A stored Δ stays finite: ±Inf (from a finite d32) becomes ±max, the pattern just below ±Inf. */
INLINE uint32_t saturate(uint32_t h, int code) {
    if (code == BF16) return h - ((h & 0x7FFFu) == 0x7F80u);
    if (code == F16) return h - ((h & 0x7FFFu) == 0x7C00u);
    return h;
}

/* 1 if the float32 result `rb` is NaN/Inf or rounds to ±Inf in `code` (a refusal). */
INLINE uint32_t too_big(uint32_t rb, int code) {
    uint32_t a = rb & 0x7FFFFFFFu;
    if (code == BF16) return a >= 0x7F7F8000u;
    if (code == F16) return a >= 0x477FF000u;
    if (code == E4M3) return a > 0x43E80000u;  /* above 464 (464 is a tie that goes to the even 448) */
    if (code == E5M2) return a >= 0x47680000u; /* from 59392 (that tie goes to the even code: Inf) */
    return a >= 0x7F800000u;
}

/* Bit k = bit 0 of byte k of `x`. */
INLINE uint64_t mask8(uint64_t x) { return ((x & 0x0101010101010101ull) * 0x0102040810204080ull) >> 56; }

typedef struct {
    int64_t *exc_idx;
    float *exc_val;
    int64_t *rt_idx;
    double sums[2];
    Py_ssize_t ne, nr;
} DiffOut;

INLINE void sumsq(const float *d, const void *base, Py_ssize_t k, int bcode, double *sd, double *sb) {
    double x = 0.0, y = 0.0;
#pragma omp simd reduction(+ : x, y)
    for (Py_ssize_t j = 0; j < k; j++) {
        double a = (double)d[j], b = (double)f32(widen(load(base, j, bcode), bcode));
        x += a * a;
        y += b * b;
    }
    *sd += x;
    *sb += y;
}

INLINE int diff_body(const void *base, const void *tuned, void *out, Py_ssize_t n, DiffOut *o, int bcode,
                     int tcode, int scode, int check_rt) {
    float dbuf[BLOCK];
    uint8_t flags[BLOCK] __attribute__((aligned(8)));
    Py_ssize_t ne = 0, nr = 0;
    double sd = 0.0, sb = 0.0;
    for (Py_ssize_t s = 0; s < n; s += BLOCK) {
        Py_ssize_t k = n - s < BLOCK ? n - s : BLOCK;
        const char *bs = (const char *)base + s * wide(bcode);
        const char *ts = (const char *)tuned + s * wide(tcode);
        char *os = (char *)out + s * wide(scode);
        uint32_t hits = 0;
        for (Py_ssize_t j = 0; j < k; j++) {
            uint32_t fb = widen(load(ts, j, tcode), tcode);
            float b = f32(widen(load(bs, j, bcode), bcode));
            float d = f32(fb) - b;
            uint32_t db = u32(d), e = 0, r = 0;
            dbuf[j] = d;
            if (scode == F32) {
                store(os, j, db, F32);
            } else {
                uint32_t h = rne(db, scode);
                e = scode == BF16 ? (db & 0xFFFFu) != 0 : widen(h, scode) != db;
                store(os, j, saturate(h, scode), scode);
            }
            if (check_rt) r = u32(b + d) != fb; /* a candidate; the exact check is in the scan */
            flags[j] = (uint8_t)(e | (r << 1));
            hits |= e | (r << 1);
        }
        sumsq(dbuf, bs, k, bcode, &sd, &sb);
        if (!hits) continue;
        if (k < BLOCK) memset(flags + k, 0, (size_t)(BLOCK - k));
        for (Py_ssize_t w = 0; w < BLOCK / 8; w++) { /* 8 flags a word: visit only the set ones */
            uint64_t x;
            memcpy(&x, flags + 8 * w, 8);
            if (!x) continue;
            for (uint64_t m = mask8(x); m; m &= m - 1) {
                Py_ssize_t j = 8 * w + __builtin_ctzll(m);
                o->exc_idx[ne] = s + j;
                o->exc_val[ne] = dbuf[j];
                ne++;
            }
            for (uint64_t m = mask8(x >> 1); m; m &= m - 1) { /* does float32(m) + d32 round to m′? */
                Py_ssize_t j = 8 * w + __builtin_ctzll(m);
                uint32_t yb = u32(f32(widen(load(bs, j, bcode), bcode)) + dbuf[j]);
                o->rt_idx[nr] = s + j;
                nr += rne(yb, bcode) != load(ts, j, tcode);
            }
        }
    }
    o->ne = ne;
    o->nr = nr;
    o->sums[0] = sd;
    o->sums[1] = sb;
    return isfinite(sd) && isfinite(sb) ? OK : NONFINITE; /* Σ of float32² cannot overflow float64 */
}

/* One specialised copy per combination of dtypes: the codes are constants inside each. */
typedef int (*diff_fn)(const void *, const void *, void *, Py_ssize_t, DiffOut *);
#define DIFF(B, T, S, R)                                                                                   \
    KERNEL int diff_##B##_##T##_##S##_##R(const void *b, const void *t, void *o, Py_ssize_t n, DiffOut *r) { \
        return diff_body(b, t, o, n, r, B, T, S, R);                                                       \
    }
#define DIFF_R(B, T, S) DIFF(B, T, S, 0) DIFF(B, T, S, 1)
#define DIFF_S(B, T) DIFF_R(B, T, 0) DIFF_R(B, T, 1) DIFF_R(B, T, 2)
#define DIFF_T(B) DIFF_S(B, 0) DIFF_S(B, 1) DIFF_S(B, 2)
DIFF_T(0)
DIFF_T(1)
DIFF_T(2)
#define E(B, T, S) diff_##B##_##T##_##S##_0, diff_##B##_##T##_##S##_1
#define ES(B, T) E(B, T, 0), E(B, T, 1), E(B, T, 2)
#define ET(B) ES(B, 0), ES(B, 1), ES(B, 2)
static const diff_fn DIFFS[54] = {ET(0), ET(1), ET(2)};
/* No FP8 diff: compiled, it measured 5.5–5.9 ns per element against numpy's 3.0 (a table lookup and
 * a float32 subtraction, which numpy does well), so FP8 Δs are computed by the reference; FP8 apply and
 * recycle are compiled (3.3–4.3 ns against numpy's 56–66 ns, whose narrowing is a search). */
static diff_fn diff_kernel(int b, int t, int s, int r) {
    if (b < E4M3 && t < E4M3 && s < E4M3) return DIFFS[((b * 3 + t) * 3 + s) * 2 + r];
    return NULL;
}

/* `measure`: also Σd32² and Σwiden(base)² in float64 into sums[0..1] (recycle's relatedness check, on
 * the blocks it streams anyway); only those two sums may be reassociated (`omp simd` reduction). */
INLINE int apply_pair_body(const void *target, void *out, const void *base, const void *tuned, Py_ssize_t n,
                           float a32, double *sums, int code, int bcode, int tcode, int fix_rt, int measure) {
    uint32_t bad = 0;
    double x = 0.0, y = 0.0;
#pragma omp simd reduction(| : bad) reduction(+ : x, y)
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t tb = load(target, i, code);
        float t = f32(widen(tb, code));
        float b = f32(widen(load(base, i, bcode), bcode));
        float w = f32(widen(load(tuned, i, tcode), tcode)) - b;
        uint32_t rb = u32(t + a32 * w);
        bad |= too_big(rb, code);
        uint32_t o = rne(rb, code);
        if (fix_rt) o = tb == load(base, i, bcode) ? load(tuned, i, tcode) : o;
        store(out, i, o, code);
        if (measure) {
            x += (double)w * (double)w;
            y += (double)b * (double)b;
        }
    }
    if (measure) {
        sums[0] = x;
        sums[1] = y;
    }
    return bad ? NONFINITE : OK;
}

typedef int (*pair_fn)(const void *, void *, const void *, const void *, Py_ssize_t, float, double *);
#define PAIR(C, B, T, R, M)                                                                              \
    KERNEL int pair_##C##_##B##_##T##_##R##_##M(const void *t, void *o, const void *b, const void *u,      \
                                                Py_ssize_t n, float a, double *s) {                        \
        return apply_pair_body(t, o, b, u, n, a, s, C, B, T, R, M);                                        \
    }
#define PAIR_M(C, B, T, R) PAIR(C, B, T, R, 0) PAIR(C, B, T, R, 1)
#define PAIR_R(C, B, T) PAIR_M(C, B, T, 0) PAIR_M(C, B, T, 1)
#define PAIR_T(C, B) PAIR_R(C, B, 0) PAIR_R(C, B, 1) PAIR_R(C, B, 2)
#define PAIR_B(C) PAIR_T(C, 0) PAIR_T(C, 1) PAIR_T(C, 2)
PAIR_B(0)
PAIR_B(1)
PAIR_B(2)
#define PM(C, B, T, R) pair_##C##_##B##_##T##_##R##_0, pair_##C##_##B##_##T##_##R##_1
#define P(C, B, T) PM(C, B, T, 0), PM(C, B, T, 1)
#define PT(C, B) P(C, B, 0), P(C, B, 1), P(C, B, 2)
#define PB(C) PT(C, 0), PT(C, 1), PT(C, 2)
static const pair_fn PAIRS[108] = {PB(0), PB(1), PB(2)};
PAIR_R(3, 3, 3)
PAIR_R(4, 4, 4)
static const pair_fn PAIRS_F8[2][4] = {{PM(3, 3, 3, 0), PM(3, 3, 3, 1)}, {PM(4, 4, 4, 0), PM(4, 4, 4, 1)}};

static pair_fn pair_kernel(int c, int b, int t, int r, int m) {
    if (c < E4M3 && b < E4M3 && t < E4M3) return PAIRS[(((c * 3 + b) * 3 + t) * 2 + r) * 2 + m];
    if (c == b && b == t) return PAIRS_F8[c - E4M3][r * 2 + m];
    return NULL;
}

typedef struct {
    const int64_t *exc_idx;
    const float *exc_val;
    Py_ssize_t ne;
    const int64_t *rt_idx;
    const void *rt_base, *rt_tuned;
    Py_ssize_t nr;
} Residual;

INLINE int apply_stored_body(const void *target, void *out, const void *stored, Py_ssize_t n,
                             const Residual *r, float a32, int code, int scode) {
    uint32_t bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        float t = f32(widen(load(target, i, code), code));
        uint32_t rb = u32(t + a32 * f32(widen(load(stored, i, scode), scode)));
        bad |= too_big(rb, code);
        store(out, i, rne(rb, code), code);
    }
    if (bad) { /* maybe only at an exception's nearest-dtype value: check with the exact ones */
        bad = 0;
        Py_ssize_t p = 0, nxt = r->ne ? r->exc_idx[0] : -1;
        for (Py_ssize_t i = 0; i < n; i++) {
            float w = f32(widen(load(stored, i, scode), scode));
            if (i == nxt) {
                w = r->exc_val[p++];
                nxt = p < r->ne ? r->exc_idx[p] : -1;
            }
            bad |= too_big(u32(f32(widen(load(target, i, code), code)) + a32 * w), code);
        }
    }
    for (Py_ssize_t p = 0; p < r->ne; p++) {
        Py_ssize_t i = r->exc_idx[p];
        uint32_t rb = u32(f32(widen(load(target, i, code), code)) + a32 * r->exc_val[p]);
        bad |= too_big(rb, code);
        store(out, i, rne(rb, code), code);
    }
    if (bad) return NONFINITE;
    for (Py_ssize_t p = 0; p < r->nr; p++) {
        Py_ssize_t i = r->rt_idx[p];
        if (load(target, i, code) == load(r->rt_base, p, code)) store(out, i, load(r->rt_tuned, p, code), code);
    }
    return OK;
}

typedef int (*stored_fn)(const void *, void *, const void *, Py_ssize_t, const Residual *, float);
#define STORED(C, S)                                                                                     \
    KERNEL int stored_##C##_##S(const void *t, void *o, const void *s, Py_ssize_t n, const Residual *r,     \
                                float a) {                                                                 \
        return apply_stored_body(t, o, s, n, r, a, C, S);                                                  \
    }
#define STORED_C(C) STORED(C, 0) STORED(C, 1) STORED(C, 2)
STORED_C(0)
STORED_C(1)
STORED_C(2)
static const stored_fn STOREDS[9] = {stored_0_0, stored_0_1, stored_0_2, stored_1_0, stored_1_1,
                                     stored_1_2, stored_2_0, stored_2_1, stored_2_2};
STORED(3, 2)
STORED(4, 2)

static stored_fn stored_kernel(int c, int s) {
    if (c < E4M3 && s < E4M3) return STOREDS[c * 3 + s];
    if (s == F32) return c == E4M3 ? stored_3_2 : stored_4_2;
    return NULL;
}

INLINE int apply_dense_body(const void *target, void *out, const float *d32, Py_ssize_t n, float a32, int code) {
    uint32_t bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t rb = u32(f32(widen(load(target, i, code), code)) + a32 * d32[i]);
        bad |= too_big(rb, code);
        store(out, i, rne(rb, code), code);
    }
    return bad ? NONFINITE : OK;
}

typedef int (*dense_fn)(const void *, void *, const float *, Py_ssize_t, float);
#define DENSE(C)                                                                                         \
    KERNEL int dense_##C(const void *t, void *o, const float *d, Py_ssize_t n, float a) {                  \
        return apply_dense_body(t, o, d, n, a, C);                                                         \
    }
DENSE(0)
DENSE(1)
DENSE(2)
DENSE(3)
DENSE(4)
static const dense_fn DENSES[NCODES] = {dense_0, dense_1, dense_2, dense_3, dense_4};

/* ---- Python glue: buffers in, checked lengths, the GIL released around the loops ------------------ */

typedef struct {
    Py_buffer v[10];
    int held;
} Views;

static void release(Views *vs) {
    for (int i = 0; i < vs->held; i++) PyBuffer_Release(&vs->v[i]);
    vs->held = 0;
}

/* The buffer of `obj` (writable if asked), at least `need` bytes; NULL with an exception set. */
static void *view(Views *vs, PyObject *obj, Py_ssize_t need, int writable, const char *what) {
    Py_buffer *b = &vs->v[vs->held];
    if (PyObject_GetBuffer(obj, b, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) return NULL;
    vs->held++;
    if (b->len < need) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, %zd needed", what, b->len, need);
        return NULL;
    }
    return b->buf;
}

static int check_code(int code) {
    if (code < BF16 || code >= NCODES) {
        PyErr_Format(PyExc_ValueError, "unknown dtype code %d", code);
        return 0;
    }
    return 1;
}

/* Elements of `obj` of `size` bytes each; -1 with an exception set. */
static Py_ssize_t count(Views *vs, PyObject *obj, int size) {
    Py_buffer *b = &vs->v[vs->held];
    if (PyObject_GetBuffer(obj, b, PyBUF_SIMPLE) < 0) return -1;
    vs->held++;
    return b->len / size;
}

/* diff(bcode, tcode, scode, check_rt, base, tuned, out, exc_idx, exc_val, rt_idx, sums) → (status, ne, nr) */
static PyObject *py_diff(PyObject *self, PyObject *args) {
    int bc, tc, sc, rt;
    PyObject *ob, *ot, *oo, *oi, *ov, *or_, *os;
    if (!PyArg_ParseTuple(args, "iiipOOOOOOO", &bc, &tc, &sc, &rt, &ob, &ot, &oo, &oi, &ov, &or_, &os)) return NULL;
    if (!(check_code(bc) && check_code(tc) && check_code(sc))) return NULL;
    Views vs = {.held = 0};
    Py_ssize_t n = count(&vs, ob, wide(bc));
    DiffOut o;
    const void *t;
    void *out;
    double *sums;
    if (n < 0 || !(t = view(&vs, ot, n * wide(tc), 0, "tuned")) || !(out = view(&vs, oo, n * wide(sc), 1, "out")) ||
        !(o.exc_idx = view(&vs, oi, n * 8, 1, "exc_idx")) || !(o.exc_val = view(&vs, ov, n * 4, 1, "exc_val")) ||
        !(o.rt_idx = view(&vs, or_, n * 8, 1, "rt_idx")) || !(sums = view(&vs, os, 16, 1, "sums"))) {
        release(&vs);
        return NULL;
    }
    const void *b = vs.v[0].buf;
    int status;
    Py_BEGIN_ALLOW_THREADS
    diff_fn fn = diff_kernel(bc, tc, sc, rt);
    o.ne = o.nr = 0;
    status = fn ? fn(b, t, out, n, &o) : UNSUPPORTED;
    Py_END_ALLOW_THREADS
    sums[0] = o.sums[0];
    sums[1] = o.sums[1];
    release(&vs);
    return Py_BuildValue("inn", status, o.ne, o.nr);
}

/* apply_pair(code, bcode, tcode, fix_rt, target, out, base, tuned, alpha[, sums]) → status */
static PyObject *py_apply_pair(PyObject *self, PyObject *args) {
    int c, bc, tc, fix;
    float a;
    PyObject *ot, *oo, *ob, *ou, *osums = Py_None;
    if (!PyArg_ParseTuple(args, "iiipOOOOf|O", &c, &bc, &tc, &fix, &ot, &oo, &ob, &ou, &a, &osums)) return NULL;
    if (!(check_code(c) && check_code(bc) && check_code(tc))) return NULL;
    Views vs = {.held = 0};
    Py_ssize_t n = count(&vs, ot, wide(c));
    void *out;
    const void *b, *u;
    double *sums = NULL;
    if (n < 0 || !(out = view(&vs, oo, n * wide(c), 1, "out")) || !(b = view(&vs, ob, n * wide(bc), 0, "base")) ||
        !(u = view(&vs, ou, n * wide(tc), 0, "tuned")) ||
        (osums != Py_None && !(sums = view(&vs, osums, 16, 1, "sums")))) {
        release(&vs);
        return NULL;
    }
    const void *t = vs.v[0].buf;
    int status;
    Py_BEGIN_ALLOW_THREADS
    pair_fn fn = pair_kernel(c, bc, tc, fix, sums != NULL);
    status = fn ? fn(t, out, b, u, n, a, sums) : UNSUPPORTED;
    Py_END_ALLOW_THREADS
    release(&vs);
    return PyLong_FromLong(status);
}

/* apply_stored(code, scode, target, out, stored, exc_idx, exc_val, rt_idx, rt_base, rt_tuned, alpha) → status */
static PyObject *py_apply_stored(PyObject *self, PyObject *args) {
    int c, sc;
    float a;
    PyObject *ot, *oo, *os, *oi, *ov, *ori, *orb, *ort;
    if (!PyArg_ParseTuple(args, "iiOOOOOOOOf", &c, &sc, &ot, &oo, &os, &oi, &ov, &ori, &orb, &ort, &a)) return NULL;
    if (!(check_code(c) && check_code(sc))) return NULL;
    Views vs = {.held = 0};
    Py_ssize_t n = count(&vs, ot, wide(c)), ne, nr;
    void *out;
    const void *s;
    Residual r;
    if (n < 0 || !(out = view(&vs, oo, n * wide(c), 1, "out")) || !(s = view(&vs, os, n * wide(sc), 0, "stored")) ||
        (ne = count(&vs, oi, 8)) < 0 || !(r.exc_val = view(&vs, ov, ne * 4, 0, "exc_val")) ||
        (nr = count(&vs, ori, 8)) < 0 || !(r.rt_base = view(&vs, orb, nr * wide(c), 0, "rt_base")) ||
        !(r.rt_tuned = view(&vs, ort, nr * wide(c), 0, "rt_tuned"))) {
        release(&vs);
        return NULL;
    }
    r.exc_idx = vs.v[3].buf;
    r.ne = ne;
    r.rt_idx = vs.v[5].buf;
    r.nr = nr;
    for (Py_ssize_t p = 0; p < ne; p++) /* indices come from a file: never write outside `out` */
        if (r.exc_idx[p] < 0 || r.exc_idx[p] >= n) goto bad_index;
    for (Py_ssize_t p = 0; p < nr; p++)
        if (r.rt_idx[p] < 0 || r.rt_idx[p] >= n) goto bad_index;
    const void *t = vs.v[0].buf;
    int status;
    Py_BEGIN_ALLOW_THREADS
    stored_fn fn = stored_kernel(c, sc);
    status = fn ? fn(t, out, s, n, &r, a) : UNSUPPORTED;
    Py_END_ALLOW_THREADS
    release(&vs);
    return PyLong_FromLong(status);
bad_index:
    release(&vs);
    PyErr_SetString(PyExc_IndexError, "a residual index lies outside the chunk");
    return NULL;
}

/* apply_dense(code, target, out, d32, alpha) → status */
static PyObject *py_apply_dense(PyObject *self, PyObject *args) {
    int c;
    float a;
    PyObject *ot, *oo, *od;
    if (!PyArg_ParseTuple(args, "iOOOf", &c, &ot, &oo, &od, &a)) return NULL;
    if (!check_code(c)) return NULL;
    Views vs = {.held = 0};
    Py_ssize_t n = count(&vs, ot, wide(c));
    void *out;
    const float *d;
    if (n < 0 || !(out = view(&vs, oo, n * wide(c), 1, "out")) || !(d = view(&vs, od, n * 4, 0, "d32"))) {
        release(&vs);
        return NULL;
    }
    const void *t = vs.v[0].buf;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = DENSES[c](t, out, d, n, a);
    Py_END_ALLOW_THREADS
    release(&vs);
    return PyLong_FromLong(status);
}

static PyMethodDef METHODS[] = {
    {"diff", py_diff, METH_VARARGS, "diff(bcode, tcode, scode, check_rt, base, tuned, out, exc_idx, exc_val, rt_idx, sums)"},
    {"apply_pair", py_apply_pair, METH_VARARGS, "apply_pair(code, bcode, tcode, fix_rt, target, out, base, tuned, alpha[, sums])"},
    {"apply_stored", py_apply_stored, METH_VARARGS,
     "apply_stored(code, scode, target, out, stored, exc_idx, exc_val, rt_idx, rt_base, rt_tuned, alpha)"},
    {"apply_dense", py_apply_dense, METH_VARARGS, "apply_dense(code, target, out, d32, alpha)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_native", "The Δ engine's one-pass kernels.", -1, METHODS};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&MODULE); }
