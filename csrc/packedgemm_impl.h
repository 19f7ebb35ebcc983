/* Body of the packed GEMM for one instruction-set level.  packedgemm.h
 * defines PG_ATTR (target attribute), PG_ISA (name suffix), PG_BYTES
 * (vector size) and PG_F32, PG_F64 (each type's blocking: MR rows and NV
 * vectors of the register block, KC, MC, NC cache blocks), then includes
 * this file, which includes itself once per element type and undefines
 * them all at the end.  See packedgemm.h for the design. */

#ifndef PG_TY

#define PG_TY f32
#define T float
#define PG_BLK PG_F32
#include "packedgemm_impl.h"
#undef PG_TY
#undef T
#undef PG_BLK

#define PG_TY f64
#define T double
#define PG_BLK PG_F64
#include "packedgemm_impl.h"
#undef PG_TY
#undef T
#undef PG_BLK

#undef PG_ATTR
#undef PG_ISA
#undef PG_BYTES
#undef PG_F32
#undef PG_F64

#else

#define PG(x) FBP_CAT(FBP_CAT(pg_##x##_, PG_TY), FBP_CAT(_, PG_ISA))
#define VL ((int)(PG_BYTES / sizeof(T)))
#define PG_CALL(f, ...) f(__VA_ARGS__)
#define PG_1(a, b, c, d, e) a
#define PG_2(a, b, c, d, e) b
#define PG_3(a, b, c, d, e) c
#define PG_4(a, b, c, d, e) d
#define PG_5(a, b, c, d, e) e
#define MR PG_CALL(PG_1, PG_BLK)
#define NV PG_CALL(PG_2, PG_BLK)
#define NR (NV * VL)
#define KC PG_CALL(PG_3, PG_BLK)
#define MC PG_CALL(PG_4, PG_BLK)
#define NC PG_CALL(PG_5, PG_BLK)

typedef T PG(vec) __attribute__((vector_size(PG_BYTES)));

static FBP_INLINE PG_ATTR PG(vec) PG(load)(const T *p)
{
    PG(vec) v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* C[MR, NR] = (or +=, when acc) the product of an MR-row panel of A and an
 * NR-column panel of B, both packed p-major.  Accumulating onto C's stored
 * values (rather than adding a fresh partial sum of each k block) makes
 * every entry one chain of multiply-adds over p = 0 .. k-1 in order, the
 * same whatever the blocking or the entry's place in C. */
static FBP_INLINE PG_ATTR void PG(micro)(int kc, const T *ap, const T *bp, T *c, long ldc,
                                         int acc)
{
    PG(vec) s[MR][NV];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NV; j++) {
            PG(vec) z = {0};
            s[i][j] = acc ? PG(load)(c + i * ldc + j * VL) : z;
        }
#pragma GCC unroll 4
    for (int p = 0; p < kc; p++, ap += MR, bp += NR) {
        PG(vec) b[NV];
        for (int j = 0; j < NV; j++)
            b[j] = PG(load)(bp + j * VL);
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < NV; j++)
                s[i][j] += ap[i] * b[j];
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NV; j++)
            memcpy(c + i * ldc + j * VL, &s[i][j], sizeof s[i][j]);
}

#ifdef FBP_SHUFFLE
typedef T PG(h8) __attribute__((vector_size(8 * sizeof(T))));

/* 8 elements in or out (macros: a 64-byte vector passed by value outside
 * AVX-512 code draws GCC's ABI note) */
#define PG_LOAD8(v, p) memcpy(&(v), (p), sizeof(v))
#define PG_STORE8(p, v) memcpy((p), &(v), sizeof(v))

/* 8 x 8 transposes in registers: smallgemm.h's FBP_T8 (a loop over an
 * array of vectors was compiled to scalar moves: 0.63 TSC ticks an
 * element packing A @ B.T's B at AVX2, 10-20% of M's and L's such
 * products). */
#define PG_T8(r0, r1, r2, r3, r4, r5, r6, r7) FBP_T8(PG(h8), r0, r1, r2, r3, r4, r5, r6, r7)
#endif

/* One W-wide panel of a kc-deep block of op(X), p-major:
 *     dst[p * W + i] = src[i * rs + p * cs]   (zero for w <= i < W)
 * rs == 1 copies rows of the source; otherwise cs == 1 and the panel is a
 * transpose, done by 8 x 8 tiles in registers where the compiler has
 * shuffles (element by element, NT ran 15% slower at 256 x 2048 x 2048). */
static FBP_INLINE PG_ATTR void PG(pack)(const int W, int w, int kc, const T *src, long rs,
                                        long cs, T *dst)
{
    if (rs == 1) {
        for (int p = 0; p < kc; p++, src += cs, dst += W) {
            if (w == W)
                for (int i = 0; i < W; i++)
                    dst[i] = src[i];
            else
                for (int i = 0; i < W; i++)
                    dst[i] = i < w ? src[i] : 0;
        }
        return;
    }
    int i = 0;
#ifdef FBP_SHUFFLE
    for (; i + 8 <= w; i += 8) {
        int p = 0;
        for (; p + 8 <= kc; p += 8) {
            const T *s0 = src + i * rs + p;
            PG(h8) r0, r1, r2, r3, r4, r5, r6, r7;
            PG_LOAD8(r0, s0);
            PG_LOAD8(r1, s0 + rs);
            PG_LOAD8(r2, s0 + 2 * rs);
            PG_LOAD8(r3, s0 + 3 * rs);
            PG_LOAD8(r4, s0 + 4 * rs);
            PG_LOAD8(r5, s0 + 5 * rs);
            PG_LOAD8(r6, s0 + 6 * rs);
            PG_LOAD8(r7, s0 + 7 * rs);
            PG_T8(r0, r1, r2, r3, r4, r5, r6, r7);
            T *d0 = dst + p * W + i;
            PG_STORE8(d0, r0);
            PG_STORE8(d0 + W, r1);
            PG_STORE8(d0 + 2 * W, r2);
            PG_STORE8(d0 + 3 * W, r3);
            PG_STORE8(d0 + 4 * W, r4);
            PG_STORE8(d0 + 5 * W, r5);
            PG_STORE8(d0 + 6 * W, r6);
            PG_STORE8(d0 + 7 * W, r7);
        }
        for (; p < kc; p++)
            for (int q = 0; q < 8; q++)
                dst[p * W + i + q] = src[(i + q) * rs + p];
    }
    if (W == 4 && w == 4) {
        /* 4-row panels (the AVX2 tiles, and float64's at AVX-512): 4 x 8
         * blocks, transposed in two stages of shuffles (element by element
         * this packing was ~3% of A @ B at 256 x 2048 x 2048). */
        int p = 0;
        for (; p + 8 <= kc; p += 8) {
            PG(h8) r0, r1, r2, r3;
            memcpy(&r0, src + p, sizeof r0);
            memcpy(&r1, src + rs + p, sizeof r1);
            memcpy(&r2, src + 2 * rs + p, sizeof r2);
            memcpy(&r3, src + 3 * rs + p, sizeof r3);
            PG(h8) t0 = FBP_SHUFFLE(r0, r1, 0, 8, 1, 9, 2, 10, 3, 11);
            PG(h8) t1 = FBP_SHUFFLE(r0, r1, 4, 12, 5, 13, 6, 14, 7, 15);
            PG(h8) t2 = FBP_SHUFFLE(r2, r3, 0, 8, 1, 9, 2, 10, 3, 11);
            PG(h8) t3 = FBP_SHUFFLE(r2, r3, 4, 12, 5, 13, 6, 14, 7, 15);
            PG(h8) o[4] = {FBP_SHUFFLE(t0, t2, 0, 1, 8, 9, 2, 3, 10, 11),
                           FBP_SHUFFLE(t0, t2, 4, 5, 12, 13, 6, 7, 14, 15),
                           FBP_SHUFFLE(t1, t3, 0, 1, 8, 9, 2, 3, 10, 11),
                           FBP_SHUFFLE(t1, t3, 4, 5, 12, 13, 6, 7, 14, 15)};
            memcpy(dst + p * 4, o, sizeof o);
        }
        for (; p < kc; p++)
            for (int q = 0; q < 4; q++)
                dst[p * 4 + q] = src[q * rs + p];
        return;
    }
#endif
    for (; i < W; i++)
        for (int p = 0; p < kc; p++)
            dst[p * W + i] = i < w ? src[i * rs + p] : 0;
}

/* An mc x nc block of C from packed A (mc x kc) and B (kc x nc).  Each B
 * panel stays in L1 while the A panels stream from L2.  With bsrc, B's
 * panels are packed here, each just before its first use (on the first row
 * block), which overlaps reading B with the arithmetic.  Edge blocks go
 * through a full-size tile, so every entry comes from the same kernel. */
static FBP_INLINE PG_ATTR void PG(macro)(int mc, int nc, int kc, const T *ap, T *bp,
                                         const T *bsrc, long rsb, long csb,
                                         T *c, long ldc, int acc)
{
    T tile[MR * NR];
    int tiles = (mc + MR - 1) / MR;
    for (int j = 0; j < nc; j += NR) {
        int nw = nc - j < NR ? nc - j : NR;
        if (bsrc)
            PG(pack)(NR, nw, kc, bsrc + j * rsb, rsb, csb, bp + (long)j * kc);
        for (int i = 0; i < mc; i += MR) {
            int mw = mc - i < MR ? mc - i : MR;
            T *cc = c + i * ldc + j;
#ifndef FBP_PG_NO_PREFETCH
            /* The source rows of the next B panel, a share with each tile:
             * in A @ B each of its kc rows lies in another page of B (a
             * layer's W), where the hardware prefetchers do not follow, so
             * packing it would wait on memory once per row. */
            if (bsrc && rsb == 1 && j + NR < nc) {
                int q = i / MR, lo = q * kc / tiles, hi = (q + 1) * kc / tiles;
                const T *nb = bsrc + j + NR;
                for (int p = lo; p < hi; p++) {
                    for (int e = 0; e < NR; e += 64 / (int)sizeof(T))
                        __builtin_prefetch(nb + p * csb + e, 0, 2);
                    __builtin_prefetch(nb + p * csb + NR - 1, 0, 2);
                }
            }
            /* The next tile's rows of C, which its kernel reads first when it
             * accumulates (acc): C is too large to stay in cache, and
             * waiting on those loads cost ~10% of an L-sized product. */
            if (acc) {
                T *nx = i + MR < mc ? cc + MR * ldc : c + j + NR;
                for (int r = 0; r < MR; r++) {
                    __builtin_prefetch(nx + r * ldc, 1, 3);
                    __builtin_prefetch(nx + r * ldc + NR - 1, 1, 3);
                }
            }
#endif
            if (mw == MR && nw == NR) {
                PG(micro)(kc, ap + (long)i * kc, bp + (long)j * kc, cc, ldc, acc);
                continue;
            }
            for (int r = 0; acc && r < mw; r++)
                memcpy(tile + r * NR, cc + r * ldc, nw * sizeof(T));
            PG(micro)(kc, ap + (long)i * kc, bp + (long)j * kc, tile, NR, acc);
            for (int r = 0; r < mw; r++)
                memcpy(cc + r * ldc, tile + r * NR, nw * sizeof(T));
        }
    }
}

static PG_ATTR int PG(gemm)(int trans_a, int trans_b, int m, int n, int k,
                            const T *a, int lda, const T *b, int ldb, T *c, int ldc)
{
    if (m <= 0 || n <= 0 || k <= 0)
        return 0;
    /* op(A)(i, p) = a[i rsa + p csa], op(B)(p, j) = b[j rsb + p csb]. */
    long rsa = trans_a ? 1 : lda, csa = trans_a ? lda : 1;
    long rsb = trans_b ? ldb : 1, csb = trans_b ? 1 : ldb;
    int mcap = MC < m ? MC : m, ncap = NC < n ? NC : n, kcap = KC < k ? KC : k;
    long asz = ((mcap + MR - 1) / MR * MR * (long)kcap + 15) & ~15L;
    long bsz = (ncap + NR - 1) / NR * NR * (long)kcap;
    T *ap = (T *)fbp_pg_buffer((asz + bsz) * sizeof(T)), *bp;
    if (!ap)
        return 0;
    bp = ap + asz;
    for (int jc = 0; jc < n; jc += NC) {
        int nc = n - jc < NC ? n - jc : NC;
        for (int pc = 0; pc < k; pc += KC) {
            int kc = k - pc < KC ? k - pc : KC;
            for (int ic = 0; ic < m; ic += MC) {
                int mc = m - ic < MC ? m - ic : MC;
                for (int i = 0; i < mc; i += MR) {
#ifndef FBP_PG_NO_PREFETCH
                    /* op(A) = A.T (a dW's x.T): each of a panel's kc rows is
                     * another row of x, a page away; fetch the rows of the
                     * next cache line's worth of columns while this one is
                     * copied (the hardware prefetchers stop at pages). */
                    const int line = 64 / (int)sizeof(T);
                    if (rsa == 1 && (i % line) < MR && i + line < mc)
                        for (int p = 0; p < kc; p++)
                            __builtin_prefetch(a + (ic + i + line) + (pc + p) * csa, 0, 2);
#endif
                    PG(pack)(MR, mc - i < MR ? mc - i : MR, kc,
                             a + (ic + i) * rsa + pc * csa, rsa, csa, ap + (long)i * kc);
                }
                PG(macro)(mc, nc, kc, ap, bp, ic ? NULL : b + jc * rsb + pc * csb, rsb, csb,
                          c + (long)ic * ldc + jc, ldc, pc > 0);
            }
        }
    }
    return 1;
}

#undef PG
#undef VL
#undef MR
#undef NR
#undef KC
#undef MC
#undef NC
#undef NV
#undef PG_CALL
#undef PG_1
#undef PG_2
#undef PG_3
#undef PG_4
#undef PG_5
#undef PG_T8
#undef PG_LOAD8
#undef PG_STORE8

#endif
