/* Body of the epilogue kernels for one element type at one level; included
 * by epilogue_pair.h with T, EP_INT (same-size integer), EP(x) (name
 * suffix), EP_ATTR and EP_BYTES defined.  See epilogue.h. */

#define VL (EP_BYTES / (int)sizeof(T))
typedef T EP(vec) __attribute__((vector_size(EP_BYTES)));
typedef EP_INT EP(ivec) __attribute__((vector_size(EP_BYTES)));

static FBP_INLINE EP_ATTR EP(vec) EP(load)(const T *p)
{
    EP(vec) v;
    memcpy(&v, p, sizeof v);
    return v;
}

static FBP_INLINE EP_ATTR void EP(store)(T *p, EP(vec) v)
{
    memcpy(p, &v, sizeof v);
}

/* The activation of v (RELU or LEAKY_RELU, else identity), lane by lane
 * exactly as the scalar `0 if v <= 0 else v` / `v if v > 0 else slope * v`.
 * ReLU keeps NaN (as np.maximum and torch.relu do; `v > 0 ? v : 0` made it
 * 0, hiding an overflow upstream): its mask is "not <= 0". */
static FBP_INLINE EP_ATTR EP(vec) EP(act)(EP(vec) v, int act, T slope)
{
    EP(ivec) pos = v > (EP(vec)){0};
    if (act == FBP_ACT_RELU)
        return (EP(vec))(~(v <= (EP(vec)){0}) & (EP(ivec))v);
    if (act == FBP_ACT_LEAKY_RELU)
        return (EP(vec))((pos & (EP(ivec))v) | (~pos & (EP(ivec))(v * slope)));
    return v;
}

static FBP_INLINE EP_ATTR T EP(act1)(T v, int act, T slope)
{
    if (act == FBP_ACT_RELU)
        return v <= 0 ? 0 : v;
    if (act == FBP_ACT_LEAKY_RELU)
        return v > 0 ? v : slope * v;
    return v;
}

/* g scaled by act' where the output is a (identity: g itself). */
static FBP_INLINE EP_ATTR EP(vec) EP(dact)(EP(vec) g, EP(vec) a, int act, T slope)
{
    EP(ivec) pos = a > (EP(vec)){0};
    if (act == FBP_ACT_RELU)
        return (EP(vec))(pos & (EP(ivec))g);
    if (act == FBP_ACT_LEAKY_RELU)
        return (EP(vec))((pos & (EP(ivec))g) | (~pos & (EP(ivec))(g * slope)));
    return g;
}

static FBP_INLINE EP_ATTR T EP(dact1)(T g, T a, int act, T slope)
{
    if (act == FBP_ACT_RELU)
        return a > 0 ? g : 0;
    if (act == FBP_ACT_LEAKY_RELU)
        return a > 0 ? g : slope * g;
    return g;
}

/* One body per activation (act is a constant after inlining), so the inner
 * loops have no branches. */
static FBP_INLINE EP_ATTR void EP(bias_act_body)(T *z, const T *b, int64_t m, int64_t n,
                                                 int act, T slope)
{
    for (int64_t i = 0; i < m; i++) {
        T *row = z + i * n;
        int64_t j = 0;
        for (; j + VL <= n; j += VL)
            EP(store)(row + j, EP(act)(EP(load)(row + j) + EP(load)(b + j), act, slope));
        for (; j < n; j++)
            row[j] = EP(act1)(row[j] + b[j], act, slope);
    }
}

static EP_ATTR int EP(bias_act)(T *z, const T *b, int64_t m, int64_t n, int act, T slope)
{
    switch (act) {
    case FBP_ACT_IDENTITY: EP(bias_act_body)(z, b, m, n, FBP_ACT_IDENTITY, slope); return 1;
    case FBP_ACT_RELU: EP(bias_act_body)(z, b, m, n, FBP_ACT_RELU, slope); return 1;
    case FBP_ACT_LEAKY_RELU: EP(bias_act_body)(z, b, m, n, FBP_ACT_LEAKY_RELU, slope); return 1;
    }
    return 0;
}

/* Backward over a band of B vectors of columns starting at j: each row's
 * g is rewritten and added to B accumulators, which hold db[j : j + B VL]
 * summed row by row from 0. */
#define EP_BAND(B)                                                          \
    do {                                                                    \
        EP(vec) acc[B];                                                     \
        for (int u = 0; u < B; u++)                                         \
            acc[u] = (EP(vec)){0};                                          \
        for (int64_t i = 0; i < m; i++) {                                   \
            T *gr = g + i * n + j;                                          \
            const T *ar = a + i * n + j;                                    \
            for (int u = 0; u < B; u++) {                                   \
                EP(vec) v = EP(load)(gr + u * VL);                          \
                if (act != FBP_ACT_IDENTITY) {                              \
                    v = EP(dact)(v, EP(load)(ar + u * VL), act, slope);     \
                    EP(store)(gr + u * VL, v);                              \
                }                                                           \
                acc[u] += v;                                                \
            }                                                               \
        }                                                                   \
        for (int u = 0; u < B; u++)                                         \
            EP(store)(db + j + u * VL, acc[u]);                             \
        j += B * VL;                                                        \
    } while (0)

static FBP_INLINE EP_ATTR void EP(backward_db_body)(T *g, const T *a, T *db, int64_t m,
                                                    int64_t n, int act, T slope)
{
    int64_t j = 0;
    while (j + 4 * VL <= n)
        EP_BAND(4);
    while (j + VL <= n)
        EP_BAND(1);
    if (j < n) {   /* the last columns, fewer than a vector */
        int64_t j0 = j;
        for (; j < n; j++)
            db[j] = 0;
        for (int64_t i = 0; i < m; i++) {
            T *gr = g + i * n;
            const T *ar = a + i * n;
            for (j = j0; j < n; j++) {
                T v = EP(dact1)(gr[j], ar[j], act, slope);
                gr[j] = v;
                db[j] += v;
            }
        }
    }
}

static EP_ATTR int EP(backward_db)(T *g, const T *a, T *db, int64_t m, int64_t n, int act,
                                      T slope)
{
    switch (act) {
    case FBP_ACT_IDENTITY:
        EP(backward_db_body)(g, a, db, m, n, FBP_ACT_IDENTITY, slope); return 1;
    case FBP_ACT_RELU:
        EP(backward_db_body)(g, a, db, m, n, FBP_ACT_RELU, slope); return 1;
    case FBP_ACT_LEAKY_RELU:
        EP(backward_db_body)(g, a, db, m, n, FBP_ACT_LEAKY_RELU, slope); return 1;
    }
    return 0;
}

#undef EP_BAND
#undef VL
