/* Body of the softmax losses for one element type at one instruction-set
 * level; included by losses_pair.h with T, LS_INT (same-size integer),
 * LS_MANT, LS_BIAS (mantissa bits, exponent bias), LS(x) (name suffix) and
 * LS_ATTR defined.  See losses.h for the design. */

#ifndef LS_SCALAR
#define VL (LS_BYTES / (int)sizeof(T))
typedef T LS(vec) __attribute__((vector_size(LS_BYTES)));
typedef LS_INT LS(ivec) __attribute__((vector_size(LS_BYTES)));

/* Lanes where mask is set take a, the others b (mask: all ones or zeros). */
/* Every lane = c. */
#define LS_SPLAT(c) ((LS(vec)){0} + (T)(c))

static FBP_INLINE LS_ATTR LS(vec) LS(blend)(LS(ivec) mask, LS(vec) a, LS(vec) b)
{
    return (LS(vec))((mask & (LS(ivec))a) | (~mask & (LS(ivec))b));
}

static FBP_INLINE LS_ATTR LS(vec) LS(vexp)(LS(vec) x)
{
    /* Beyond hi exp overflows, below lo it rounds to 0 (lo is a little
     * past the smallest subnormal's log, which still rounds correctly). */
    const T hi = sizeof(T) == 4 ? (T)88.72283935546875 : (T)709.782712893384;
    const T lo = sizeof(T) == 4 ? (T)-104.0 : (T)-745.2;
    /* ln 2 split so that n * ln2_hi is exact for every n used here. */
    const T ln2_hi = sizeof(T) == 4 ? (T)0.693145751953125 : (T)6.93147180369123816490e-01;
    const T ln2_lo = sizeof(T) == 4 ? (T)1.428606765330187045e-06
                                    : (T)1.90821492927058770002e-10;
    const T log2e = (T)1.4426950408889634;
    /* Adding 1.5 * 2^mant rounds to an integer held in the low bits. */
    const T shift = sizeof(T) == 4 ? (T)12582912.0 : (T)6755399441055744.0;
    LS(ivec) over = x > LS_SPLAT(hi), under = x < LS_SPLAT(lo);
    /* Clamped so that n stays small (NaN passes through unchanged). */
    LS(vec) xc = LS(blend)(over, LS_SPLAT(hi), LS(blend)(under, LS_SPLAT(lo), x));
    LS(vec) t = xc * log2e + shift;
    LS(ivec) n = (LS(ivec))t - (LS(ivec))LS_SPLAT(shift);
    LS(vec) nf = t - shift;
    LS(vec) r = xc - nf * ln2_hi;
    r = r - nf * ln2_lo;
    /* e^r = 1 + r + r^2 q(r), q the Taylor series after its first two terms:
     * to r^7/7! in float, r^13/13! in double (next term < 0.05 ulp). */
    LS(vec) q;
    if (sizeof(T) == 4) {
        q = LS_SPLAT(1.0 / 5040);
        q = q * r + (T)(1.0 / 720);
        q = q * r + (T)(1.0 / 120);
        q = q * r + (T)(1.0 / 24);
        q = q * r + (T)(1.0 / 6);
        q = q * r + (T)0.5;
    } else {
        q = LS_SPLAT(1.0 / 6227020800.0);
        q = q * r + (T)(1.0 / 479001600.0);
        q = q * r + (T)(1.0 / 39916800.0);
        q = q * r + (T)(1.0 / 3628800.0);
        q = q * r + (T)(1.0 / 362880.0);
        q = q * r + (T)(1.0 / 40320.0);
        q = q * r + (T)(1.0 / 5040.0);
        q = q * r + (T)(1.0 / 720.0);
        q = q * r + (T)(1.0 / 120.0);
        q = q * r + (T)(1.0 / 24.0);
        q = q * r + (T)(1.0 / 6.0);
        q = q * r + (T)0.5;
    }
    LS(vec) p = (T)1 + (r + r * r * q);
    /* 2^n as 2^n1 * 2^n2, each a normal number: p * 2^n1 is exact and the
     * one rounding (into the subnormals, if any) is the last product. */
    LS(ivec) n1 = n >> 1, n2 = n - n1;
    LS(vec) s1 = (LS(vec))((n1 + LS_BIAS) << LS_MANT);
    LS(vec) s2 = (LS(vec))((n2 + LS_BIAS) << LS_MANT);
    LS(vec) e = p * s1 * s2;
    e = LS(blend)(over, LS_SPLAT(INFINITY), e);
    return LS(blend)(under, LS_SPLAT(0), e);
}

/* x[i] = exp(x[i]) for i < n, in place. */
static LS_ATTR void LS(exp_array)(T *x, int64_t n)
{
    int64_t i = 0;
    LS(vec) v;
    for (; i + VL <= n; i += VL) {
        memcpy(&v, x + i, sizeof v);
        v = LS(vexp)(v);
        memcpy(x + i, &v, sizeof v);
    }
    if (i < n) {   /* the tail through a zero-padded vector */
        memset(&v, 0, sizeof v);
        memcpy(&v, x + i, (size_t)(n - i) * sizeof(T));
        v = LS(vexp)(v);
        memcpy(x + i, &v, (size_t)(n - i) * sizeof(T));
    }
}
#undef VL
#undef LS_SPLAT
#else
static void LS(exp_array)(T *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = (T)exp((double)x[i]);
}
#endif

/* Rows [lo, hi) of loss `which` (FBP_LOSS_*; see losses.h for the
 * contract): writes their rows of g, given scale = 1 / (sum of all rows'
 * weights), and each row's term of the weighted loss sum.  With terms NULL
 * the terms are added up in row order and their sum returned; otherwise
 * terms[i] receives row i's, so that row ranges computed on different
 * threads can be added up in row order afterwards, bitwise the same. */
static LS_ATTR double LS(softmax_rows)(int which, T *z, T *y, T *w, T *g, int64_t lo,
                                       int64_t hi, int64_t k, double scale, double *terms)
{
    const double eps = sizeof(T) == 4 ? FLT_EPSILON : DBL_EPSILON;
    double total = 0.0;
    int64_t i, j;
    /* g = z - row max, then exp of the whole block in one vector sweep. */
    for (i = lo; i < hi; i++) {
        const T *zi = z + i * k;
        T *gi = g + i * k;
        T zmax = zi[0];
        for (j = 1; j < k; j++)
            zmax = zi[j] > zmax ? zi[j] : zmax;
        for (j = 0; j < k; j++)
            gi[j] = zi[j] - zmax;
    }
    LS(exp_array)(g + lo * k, (hi - lo) * k);
    for (i = lo; i < hi; i++) {
        const T *zi = z + i * k, *yi = y + i * k;
        T *gi = g + i * k;
        const double wi = w[i];
        double s = 0.0, row = 0.0, term;
        for (j = 0; j < k; j++)
            s += gi[j];
        if (which == FBP_LOSS_SK_LOG) {
            /* -sum_j y log p_j, p clipped to [eps, 1 - eps] as sklearn does */
            for (j = 0; j < k; j++) {
                if (yi[j] != 0) {
                    double p = gi[j] / s;
                    p = p > eps ? p : eps;
                    p = p < 1 - eps ? p : 1 - eps;
                    row += yi[j] * log(p);
                }
            }
            for (j = 0; j < k; j++)
                gi[j] = (T)(scale * (wi * (gi[j] / s - yi[j])));
            term = -(wi * row);
        } else {
            /* -sum_j y_j log softmax_j = sum_j y_j (lse - z_j); the gradient
             * softmax * sum(y) - y also holds for probability targets */
            T zmax = zi[0];
            double ysum = 0.0, lse;
            for (j = 1; j < k; j++)
                zmax = zi[j] > zmax ? zi[j] : zmax;
            lse = zmax + log(s);
            for (j = 0; j < k; j++) {
                ysum += yi[j];
                row += yi[j] * (lse - zi[j]);
            }
            term = wi * row;
            for (j = 0; j < k; j++)
                gi[j] = (T)(scale * (wi * (gi[j] / s * ysum - yi[j])));
        }
        if (terms)
            terms[i] = term;
        else
            total += term;
    }
    return total;
}

/* Loss `which` over all m rows (see losses.h for the contract). */
static LS_ATTR double LS(softmax_loss)(int which, T *z, T *y, T *w, T *g, int64_t m,
                                          int64_t k)
{
    double wsum = 0.0;
    for (int64_t i = 0; i < m; i++)
        wsum += w[i];
    const double scale = 1.0 / wsum;
    return LS(softmax_rows)(which, z, y, w, g, 0, m, k, scale, NULL) * scale;
}
