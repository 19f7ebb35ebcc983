/* Body of the small-GEMM kernels for one element type and vector width.
 * Included by smallgemm.h once per variant, with T (float or double), VL
 * (lanes per vector: 4, 8 or 16), SG(x) (name suffix) and SG_ATTR (the
 * instruction set these functions are compiled for) defined.  See
 * smallgemm.h for the design. */

typedef T SG(vec) __attribute__((vector_size(VL * sizeof(T))));

static FBP_INLINE SG_ATTR SG(vec) SG(load)(const T *p)
{
    SG(vec) v;
    memcpy(&v, p, sizeof v);   /* an unaligned vector load */
    return v;
}

static FBP_INLINE SG_ATTR void SG(store)(T *p, SG(vec) v)
{
    memcpy(p, &v, sizeof v);
}

/* A vector of C's entries; lane by lane when C is written transposed
 * (column stride cs != 1). */
static FBP_INLINE SG_ATTR void SG(put)(T *c, long cs, SG(vec) v)
{
    if (cs == 1) {
        SG(store)(c, v);
        return;
    }
    for (int j = 0; j < VL; j++)
        c[j * cs] = v[j];
}

/* "Broadcast" form, vectorized across C's columns:
 *     C[r, c] = sum_p A(r, p) * B[p, c]
 * A(r, p) = a[r * rsa + p * csa] (any strides: A or A.T of a row-major
 * array), B rows contiguous (B[p, c] = b[p * ldb + c]), C[r, c] =
 * c_[r * rsc + c * csc].  A and B are read in place (no packing: they are
 * small and stay in L1).  Each block keeps 8 vector accumulators in
 * registers (4 rows x 2 vectors, or 8 rows x 1 vector when C is narrower
 * than two vectors): enough independent FMAs to hide their latency.  With
 * AVX-512's 32 vector registers a block is 8 rows x 2 vectors: 16
 * accumulators keep both FMA pipes busy with slack, and each A element
 * read serves more of C (float64 on the project machine: 200 x 100 x 64
 * A @ B 31.5 -> 25 us, 64 x 100 x 200 A.T @ B 44 -> 26 us).
 *
 * Sizes that are not a multiple of the block end with one block placed
 * flush with the last row or column.  It overlaps the block before and
 * rewrites those entries with identical values (same operands, same order),
 * which is much cheaper than a narrower block whose few accumulators leave
 * the FMA units waiting. */
static FBP_INLINE SG_ATTR void SG(block_4x2)(int k, const T *a0, long rsa, long csa,
                                     const T *bp, long ldb, T *cc, long rsc, long csc)
{
    const T *a1 = a0 + rsa, *a2 = a1 + rsa, *a3 = a2 + rsa;
    SG(vec) s00 = {0}, s01 = {0}, s10 = {0}, s11 = {0};
    SG(vec) s20 = {0}, s21 = {0}, s30 = {0}, s31 = {0};
    for (int p = 0; p < k; p++, bp += ldb) {
        SG(vec) b0 = SG(load)(bp), b1 = SG(load)(bp + VL);
        T x0 = a0[p * csa], x1 = a1[p * csa], x2 = a2[p * csa], x3 = a3[p * csa];
        s00 += x0 * b0; s01 += x0 * b1;
        s10 += x1 * b0; s11 += x1 * b1;
        s20 += x2 * b0; s21 += x2 * b1;
        s30 += x3 * b0; s31 += x3 * b1;
    }
    SG(put)(cc, csc, s00); SG(put)(cc + VL * csc, csc, s01); cc += rsc;
    SG(put)(cc, csc, s10); SG(put)(cc + VL * csc, csc, s11); cc += rsc;
    SG(put)(cc, csc, s20); SG(put)(cc + VL * csc, csc, s21); cc += rsc;
    SG(put)(cc, csc, s30); SG(put)(cc + VL * csc, csc, s31);
}

static FBP_INLINE SG_ATTR void SG(block_8x1)(int k, const T *a0, long rsa, long csa,
                                     const T *bp, long ldb, T *cc, long rsc, long csc)
{
    const T *a1 = a0 + rsa, *a2 = a1 + rsa, *a3 = a2 + rsa, *a4 = a3 + rsa;
    const T *a5 = a4 + rsa, *a6 = a5 + rsa, *a7 = a6 + rsa;
    SG(vec) s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, s4 = {0}, s5 = {0}, s6 = {0}, s7 = {0};
    for (int p = 0; p < k; p++, bp += ldb) {
        SG(vec) b0 = SG(load)(bp);
        s0 += a0[p * csa] * b0; s1 += a1[p * csa] * b0;
        s2 += a2[p * csa] * b0; s3 += a3[p * csa] * b0;
        s4 += a4[p * csa] * b0; s5 += a5[p * csa] * b0;
        s6 += a6[p * csa] * b0; s7 += a7[p * csa] * b0;
    }
    SG(put)(cc, csc, s0); cc += rsc; SG(put)(cc, csc, s1); cc += rsc;
    SG(put)(cc, csc, s2); cc += rsc; SG(put)(cc, csc, s3); cc += rsc;
    SG(put)(cc, csc, s4); cc += rsc; SG(put)(cc, csc, s5); cc += rsc;
    SG(put)(cc, csc, s6); cc += rsc; SG(put)(cc, csc, s7);
}

static FBP_INLINE SG_ATTR void SG(block_rx2)(const int R, int k, const T *a0, long rsa,
                                     long csa, const T *bp, long ldb, T *cc, long rsc,
                                     long csc)
{
    SG(vec) s[8][2];
    for (int i = 0; i < R; i++) {
        SG(vec) z = {0};
        s[i][0] = z;
        s[i][1] = z;
    }
    for (int p = 0; p < k; p++, bp += ldb) {
        SG(vec) b0 = SG(load)(bp), b1 = SG(load)(bp + VL);
        const T *ap = a0 + p * csa;
        for (int i = 0; i < R; i++) {
            T x = ap[i * rsa];
            s[i][0] += x * b0;
            s[i][1] += x * b1;
        }
    }
    for (int i = 0; i < R; i++, cc += rsc) {
        SG(put)(cc, csc, s[i][0]);
        SG(put)(cc + VL * csc, csc, s[i][1]);
    }
}

/* One row, any width: the fallback for fewer rows than a block.  Each
 * entry of C is one chain of multiply-adds in k order, as in the blocks and
 * the packed kernels: a product cut into ranges (threads) may reach this
 * fallback for a range whose whole product ran in blocks or packed, and
 * must give the same bits (splitting k into two chains, as this once did
 * for speed, made 1 and 2 threads differ on thin products).  The chains of
 * up to four column vectors run side by side, which hides the multiply-add
 * latency as the two chains did. */
static FBP_INLINE SG_ATTR void SG(row)(int n, int k, const T *a0, long csa,
                               const T *b, long ldb, T *c0, long csc)
{
    int c = 0;
    for (; c + 4 * VL <= n; c += 4 * VL) {
        SG(vec) s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        const T *bp = b + c;
        for (int p = 0; p < k; p++, bp += ldb) {
            T x = a0[p * csa];
            s0 += x * SG(load)(bp);
            s1 += x * SG(load)(bp + VL);
            s2 += x * SG(load)(bp + 2 * VL);
            s3 += x * SG(load)(bp + 3 * VL);
        }
        SG(put)(c0 + c * csc, csc, s0);
        SG(put)(c0 + (c + VL) * csc, csc, s1);
        SG(put)(c0 + (c + 2 * VL) * csc, csc, s2);
        SG(put)(c0 + (c + 3 * VL) * csc, csc, s3);
    }
    if (c + 2 * VL <= n) {   /* two or three vectors left */
        int three = c + 3 * VL <= n;
        SG(vec) s0 = {0}, s1 = {0}, s2 = {0};
        const T *bp = b + c;
        for (int p = 0; p < k; p++, bp += ldb) {
            T x = a0[p * csa];
            s0 += x * SG(load)(bp);
            s1 += x * SG(load)(bp + VL);
            if (three)
                s2 += x * SG(load)(bp + 2 * VL);
        }
        SG(put)(c0 + c * csc, csc, s0);
        SG(put)(c0 + (c + VL) * csc, csc, s1);
        if (three)
            SG(put)(c0 + (c + 2 * VL) * csc, csc, s2);
        c += three ? 3 * VL : 2 * VL;
    }
    for (; c + VL <= n; c += VL) {
        SG(vec) s0 = {0};
        const T *bp = b + c;
        for (int p = 0; p < k; p++, bp += ldb)
            s0 += a0[p * csa] * SG(load)(bp);
        SG(put)(c0 + c * csc, csc, s0);
    }
    for (; c < n; c++) {
        T s0 = 0;
        for (int p = 0; p < k; p++)
            s0 += a0[p * csa] * b[p * ldb + c];
        c0[c * csc] = s0;
    }
}

/* Start of the i-th block of size bs along an axis of length len >= bs:
 * blocks tile the axis and the last one is flush with its end. */
static FBP_INLINE SG_ATTR int SG(block_at)(int i, int bs, int len)
{
    int at = i * bs;
    return at + bs <= len ? at : len - bs;
}

static FBP_INLINE SG_ATTR void SG(bcast)(int m, int n, int k,
                                 const T *a, long rsa, long csa,
                                 const T *b, long ldb,
                                 T *c_, long rsc, long csc)
{
    int mr, nc;   /* rows per block, columns per block */
    if (n >= 2 * VL) {
        /* 64-byte vectors: AVX-512, which has 32 vector registers */
        /* SG_ROWS-row blocks (8 with AVX-512's 32 registers, 6 with AVX2's
         * 16, 4 at the baseline), unless the last block's overlap would
         * waste much: 32 rows in 6-row blocks compute 36 (S's 32 x 64 x 64
         * ran 6% slower than in 4-row blocks).  AVX2, 1 thread, 6 against 4
         * rows: digits' 200 x 100 x 64 float64 52 against 49 GFLOP/s, M's
         * 64 x 128 x 256 float32 109 against 98. */
        mr = m >= SG_ROWS && (SG_ROWS == 8 || m % SG_ROWS == 0 || m > 8 * SG_ROWS)
             ? SG_ROWS : 4;
        nc = 2 * VL;
    } else if (n >= VL) {
        mr = 8; nc = VL;
    } else {
        mr = 0; nc = 0;
    }
    if (mr == 0 || m < mr) {
        for (int r = 0; r < m; r++)
            SG(row)(n, k, a + r * rsa, csa, b, ldb, c_ + r * rsc, csc);
        return;
    }
    int nbr = (m + mr - 1) / mr, nbc = (n + nc - 1) / nc;
    for (int i = 0; i < nbr; i++) {
        int r = SG(block_at)(i, mr, m);
        for (int j = 0; j < nbc; j++) {
            int c = SG(block_at)(j, nc, n);
            if (mr == 4)
                SG(block_4x2)(k, a + r * rsa, rsa, csa, b + c, ldb,
                              c_ + r * rsc + c * csc, rsc, csc);
            else if (nc == 2 * VL && mr == 8)
                SG(block_rx2)(8, k, a + r * rsa, rsa, csa, b + c, ldb,
                              c_ + r * rsc + c * csc, rsc, csc);
            else if (nc == 2 * VL)
                SG(block_rx2)(6, k, a + r * rsa, rsa, csa, b + c, ldb,
                              c_ + r * rsc + c * csc, rsc, csc);
            else
                SG(block_8x1)(k, a + r * rsa, rsa, csa, b + c, ldb,
                              c_ + r * rsc + c * csc, rsc, csc);
        }
    }
}

/* t[i] = the sum of the lanes of s[i], for 8 accumulators, by a tree of
 * shuffles and adds rather than 8 separate horizontal sums. */
#ifdef FBP_SHUFFLE
typedef T SG(h8) __attribute__((vector_size(8 * sizeof(T))));
typedef T SG(h4) __attribute__((vector_size(4 * sizeof(T))));

static FBP_INLINE SG_ATTR SG(h8) SG(tree8)(const SG(h8) *v)
{
    SG(h8) u[4], w[2];
    for (int i = 0; i < 4; i++)
        u[i] = FBP_SHUFFLE(v[2 * i], v[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14)
             + FBP_SHUFFLE(v[2 * i], v[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    for (int i = 0; i < 2; i++)
        w[i] = FBP_SHUFFLE(u[2 * i], u[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13)
             + FBP_SHUFFLE(u[2 * i], u[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    return FBP_SHUFFLE(w[0], w[1], 0, 1, 2, 3, 8, 9, 10, 11)
         + FBP_SHUFFLE(w[0], w[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

static FBP_INLINE SG_ATTR SG(h4) SG(tree4)(const SG(h4) *v)
{
    SG(h4) u0 = FBP_SHUFFLE(v[0], v[1], 0, 4, 2, 6) + FBP_SHUFFLE(v[0], v[1], 1, 5, 3, 7);
    SG(h4) u1 = FBP_SHUFFLE(v[2], v[3], 0, 4, 2, 6) + FBP_SHUFFLE(v[2], v[3], 1, 5, 3, 7);
    return FBP_SHUFFLE(u0, u1, 0, 1, 4, 5) + FBP_SHUFFLE(u0, u1, 2, 3, 6, 7);
}
#endif

static FBP_INLINE SG_ATTR void SG(sums8)(const SG(vec) *s, T *t)
{
#if !defined(FBP_SHUFFLE) || VL == 2
    for (int i = 0; i < 8; i++) {
        T a = 0;
        for (int j = 0; j < VL; j++)
            a += s[i][j];
        t[i] = a;
    }
#elif VL == 4
    SG(h4) r0 = SG(tree4)(s), r1 = SG(tree4)(s + 4);
    memcpy(t, &r0, sizeof r0);
    memcpy(t + 4, &r1, sizeof r1);
#elif VL == 8
    SG(h8) r = SG(tree8)(s);
    memcpy(t, &r, sizeof r);
#else  /* VL == 16: fold each accumulator's halves first */
    SG(h8) f[8];
    for (int i = 0; i < 8; i++)
        f[i] = FBP_SHUFFLE(s[i], s[i], 0, 1, 2, 3, 4, 5, 6, 7)
             + FBP_SHUFFLE(s[i], s[i], 8, 9, 10, 11, 12, 13, 14, 15);
    SG(h8) r = SG(tree8)(f);
    memcpy(t, &r, sizeof r);
#endif
}

/* "Dot" form, vectorized along the shared dimension:
 *     C[r, c] = sum_p A[r, p] * B[c, p]     (C = A @ B.T)
 * with A and B rows contiguous.  A block is R rows x NC columns with
 * R * NC = 8 vector accumulators (R and NC are constants at every call
 * site, so the loops unroll); their lane sums come out of sums8
 * together. */
static FBP_INLINE SG_ATTR void SG(dot_block)(const int R, const int NC, int k,
                                     const T *a, long lda, const T *b, long ldb,
                                     T *cc, long ldc)
{
    int kv = k - k % VL;
    SG(vec) s[8] = {{0}};
    for (int p = 0; p < kv; p += VL) {
        SG(vec) y[8];
        for (int j = 0; j < NC; j++)
            y[j] = SG(load)(b + j * ldb + p);
        for (int i = 0; i < R; i++) {
            SG(vec) x = SG(load)(a + i * lda + p);
            for (int j = 0; j < NC; j++)
                s[i * NC + j] += x * y[j];
        }
    }
    T t[8];
    SG(sums8)(s, t);
    for (int p = kv; p < k; p++)
        for (int i = 0; i < R; i++)
            for (int j = 0; j < NC; j++)
                t[i * NC + j] += a[i * lda + p] * b[j * ldb + p];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < NC; j++)
            cc[i * ldc + j] = t[i * NC + j];
}

static FBP_INLINE SG_ATTR void SG(dot)(int m, int n, int k,
                               const T *a, long lda, const T *b, long ldb,
                               T *c_, long ldc)
{
    /* Widest column block C fits (4, 2 or 1 columns) with 8 / C rows. */
    int nc = n >= 4 ? 4 : n >= 2 ? 2 : 1, rb = 8 / nc;
    if (m < rb) {
        for (int r = 0; r < m; r++)
            for (int c = 0; c < n; c++) {
                T t = 0;
                for (int p = 0; p < k; p++)
                    t += a[r * lda + p] * b[c * ldb + p];
                c_[r * ldc + c] = t;
            }
        return;
    }
    int nbr = (m + rb - 1) / rb, nbc = (n + nc - 1) / nc;
    for (int i = 0; i < nbr; i++) {
        int r = SG(block_at)(i, rb, m);
        for (int j = 0; j < nbc; j++) {
            int c = SG(block_at)(j, nc, n);
            const T *ar = a + r * lda, *bc = b + c * ldb;
            T *cc = c_ + r * ldc + c;
            if (nc == 4)
                SG(dot_block)(2, 4, k, ar, lda, bc, ldb, cc, ldc);
            else if (nc == 2)
                SG(dot_block)(4, 2, k, ar, lda, bc, ldb, cc, ldc);
            else
                SG(dot_block)(8, 1, k, ar, lda, bc, ldb, cc, ldc);
        }
    }
}

/* How the small kernels compute a product (SG_* path codes, smallgemm.h).
 * The choice depends on the whole product's shape only, and every entry of
 * C comes out of the same chain of multiply-adds whatever block it falls
 * in, so a caller that splits C into column (or, for the narrow paths, row)
 * ranges and runs each range on the whole product's path gets bitwise the
 * result of one call. */
static SG_ATTR int SG(small_plan_capped)(int trans_a, int trans_b, int m, int n, int k)
{
    long mnk = (long)m * n * k;
    if (mnk > (trans_a || trans_b ? SG_T_MNK_CAP : SG_MNK_CAP) || m <= 0 || n <= 0 || k <= 0)
        return FBP_SG_NONE;
    if (!trans_b) {
        /* The broadcast form sweeps B once per block of rows: B must stay
         * in cache (the operand it reads is B, or A for narrow A.T @ B). */
        long swept = (long)k * (n >= VL || !trans_a ? n : m) * (long)sizeof(T);
        if (swept > SG_SWEEP_CAP)
            return FBP_SG_NONE;
        if (mnk > FBP_SMALL_MNK && (long)n * (long)sizeof(T) >= SG_ROW_CAP)
            return FBP_SG_NONE;
        if (n >= VL)
            return FBP_SG_BCAST;
        if (trans_a)
            return FBP_SG_TN_NARROW;
        if ((long)n * k * (long)sizeof(T) > FBP_SMALL_TMP)
            return FBP_SG_NONE;
        return FBP_SG_NN_NARROW;
    }
    if (trans_a)
        return FBP_SG_NONE;   /* TT: never used by the engine */
    if ((long)n * k * (long)sizeof(T) <= FBP_SMALL_TMP && (k < 4 * VL || (n >= VL && VL >= 8)))
        /* B.T copied, then the broadcast form: for a short shared
         * dimension, and for a long one where C's rows fill vectors of 8
         * lanes or more, where it beat the dot form by 1.1-2x (32 x 64 x 64
         * float32: 2.6 against 3.7 us at AVX2); with 4 lanes or fewer the
         * dot form was as fast or faster. */
        return FBP_SG_NT_COPY;
    /* NT with a long shared dimension: dot products along rows.  Their
     * reductions across lanes cost about as much as the multiply-adds at
     * k ~ 8 vectors, so BLAS keeps the larger ones. */
    return mnk > FBP_SMALL_MNK ? FBP_SG_NONE : FBP_SG_NT_DOT;
}

static SG_ATTR int SG(small_plan)(int trans_a, int trans_b, int m, int n, int k)
{
    int path = SG(small_plan_capped)(trans_a, trans_b, m, n, k);
#if SG_BYTES >= 32
    /* A.T @ B with 4 to 12 columns, above the caps: a layer's weight
     * gradient into a narrow output layer (L's 2048 x 10 over 256 rows).
     * The packed kernels, the alternative at these levels, copy A.T whole
     * and pad C's few columns to a tile of 24-32, and ran such products at
     * 15% of the peak; the narrow path sweeps A once per 4 columns of C,
     * and ran them 1.3-12x faster with A up to 8 MiB (both types, both
     * levels, m 256-8192, k 64-2048; 2048 x 10 x 256 float32 at AVX2:
     * 0.58 -> 0.19 ms).  It lost with a 16 MiB A (float64, 2048 x 8 x
     * 1024: 1.75x slower), with 2 columns of float64 (1.1x), and came out
     * even at 20-24 columns of float32.  Every entry is still one chain of
     * multiply-adds in k order, the packed kernels' bits. */
    if (path == FBP_SG_NONE && trans_a && !trans_b && m > 0 && k > 0 && n >= 4 && n <= 12 &&
        (long)k * m * (long)sizeof(T) <= FBP_NARROW_SWEEP)
        path = FBP_SG_TN_NARROW;
#endif
    return path;
}

/* dst[c * rows + r] = src[r * ld + c] for r < rows, c < cols: the
 * transposed copy of B that the narrow and copying paths run on, by 8 x 8
 * register transposes where the compiler has shuffles and 8 elements fill
 * whole vectors of this level (element by element, 32 x 64 x 64 A @ B.T
 * spent a third of its time copying its B; the baseline level's 16-byte
 * vectors keep the plain loop, which the compiler does better there). */
static FBP_INLINE SG_ATTR void SG(transpose)(int rows, int cols, const T *src, long ld, T *dst)
{
    int r0 = 0;
#if defined(FBP_SHUFFLE) && SG_BYTES >= 32
    typedef T h8 __attribute__((vector_size(8 * sizeof(T))));
    for (; r0 + 8 <= rows; r0 += 8) {
        int c = 0;
        for (; c + 8 <= cols; c += 8) {
            const T *s = src + r0 * ld + c;
            h8 v0, v1, v2, v3, v4, v5, v6, v7;
            memcpy(&v0, s, sizeof v0);
            memcpy(&v1, s + ld, sizeof v1);
            memcpy(&v2, s + 2 * ld, sizeof v2);
            memcpy(&v3, s + 3 * ld, sizeof v3);
            memcpy(&v4, s + 4 * ld, sizeof v4);
            memcpy(&v5, s + 5 * ld, sizeof v5);
            memcpy(&v6, s + 6 * ld, sizeof v6);
            memcpy(&v7, s + 7 * ld, sizeof v7);
            FBP_T8(h8, v0, v1, v2, v3, v4, v5, v6, v7);
            T *d = dst + (long)c * rows + r0;
            memcpy(d, &v0, sizeof v0);
            memcpy(d + rows, &v1, sizeof v1);
            memcpy(d + 2 * rows, &v2, sizeof v2);
            memcpy(d + 3 * rows, &v3, sizeof v3);
            memcpy(d + 4 * rows, &v4, sizeof v4);
            memcpy(d + 5 * rows, &v5, sizeof v5);
            memcpy(d + 6 * rows, &v6, sizeof v6);
            memcpy(d + 7 * rows, &v7, sizeof v7);
        }
        for (; c < cols; c++)
            for (int r = r0; r < r0 + 8; r++)
                dst[(long)c * rows + r] = src[r * ld + c];
    }
#endif
    for (int r = r0; r < rows; r++)
        for (int c = 0; c < cols; c++)
            dst[(long)c * rows + r] = src[r * ld + c];
}

/* Runs path (from small_plan, perhaps for a larger product that this one is
 * a row or column range of).  Strides are row-major leading dimensions, as
 * in gemm_rm. */
static SG_ATTR void SG(small_run)(int path, int trans_a, int m, int n, int k,
                                  const T *a, int lda, const T *b, int ldb,
                                  T *c, int ldc)
{
    T tmp[FBP_SMALL_TMP / sizeof(T)];
    switch (path) {
    case FBP_SG_BCAST:
        /* NN / TN: A(r, p) = a[r lda + p] or a[p lda + r]. */
        if (trans_a)
            SG(bcast)(m, n, k, a, 1, lda, b, ldb, c, ldc, 1);
        else
            SG(bcast)(m, n, k, a, lda, 1, b, ldb, c, ldc, 1);
        return;
    case FBP_SG_TN_NARROW:
        /* TN with few columns: C.T[c, r] = sum_p B[p, c] A[p, r],
         * vectorized across r (rows of A are contiguous in r). */
        SG(bcast)(n, m, k, b, 1, ldb, a, lda, c, 1, ldc);
        return;
    case FBP_SG_NN_NARROW:
        /* NN with few columns: B.T (n x k) into tmp, then dot products. */
        SG(transpose)(k, n, b, ldb, tmp);
        SG(dot)(m, n, k, a, lda, tmp, k, c, ldc);
        return;
    case FBP_SG_NT_DOT:
        SG(dot)(m, n, k, a, lda, b, ldb, c, ldc);
        return;
    case FBP_SG_NT_COPY:
        /* NT: B.T (k x n) into tmp, then the broadcast form, which needs no
         * reductions across lanes. */
        SG(transpose)(n, k, b, ldb, tmp);
        SG(bcast)(m, n, k, a, lda, 1, tmp, n, c, ldc, 1);
        return;
    }
}
