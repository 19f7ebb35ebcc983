/* Softmax losses (sk_log_loss, cross_entropy) with a vectorized exp.
 *
 * Why: at the output layer of a classifier the loss is one exp per logit.
 * Through Numba each is a scalar libm call (about 17 us of a 127 us
 * training step on digits, 200 x 10 logits); here the logits of the whole
 * batch, shifted by their row maxima, go through one vector exp.
 *
 * The engine calls every loss with one contract (the other losses are
 * Numba cfuncs, fastbp/_numba/losses.py):
 *     double loss(T *z, T *y, T *w, T *g, int64_t m, int64_t k)
 * returns the weighted mean loss (accumulated in double for both dtypes) and
 * writes g = dL/dz; z, y, g are row-major (m, k), w (m,).  The arithmetic
 * after the exp is in double (p = e / s, sums in row order);
 * tests/test_losses.py holds the results to fastbp.reference's
 * sk_log_loss_loss_grad and cross_entropy_loss_grad at every level.
 *
 * The exp (losses_impl.h, LS(vexp)): n = round(x / ln 2), r = x - n ln 2 in
 * two parts (Cody-Waite), e^r by its Taylor series (error below 0.05 ulp on
 * |r| <= ln 2 / 2), then times 2^n as two exact powers of two so that results
 * down to the smallest subnormal need no special case.  About 1 ulp in float
 * and double (tests/test_losses.py measures it against long double expl);
 * exp(+-inf) and NaN as in C.
 *
 * Compiled once per instruction-set level like smallgemm.h (whose
 * fbp_isa_best picks the level); without GCC/Clang vector extensions
 * (MSVC) the kernels use libm's exp.
 */
#ifndef FASTBP_LOSSES_H
#define FASTBP_LOSSES_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "smallgemm.h"   /* fbp_isa_best, FBP_ISA_*, FBP_CAT, FBP_INLINE */

/* Which softmax loss: Loss in fastbp/_ext/engine.pxd (losses.pyx checks at
 * compile time that these agree with it). */
#define FBP_LOSS_SK_LOG 0         /* sk_log_loss: sklearn's log_loss on softmax */
#define FBP_LOSS_CROSS_ENTROPY 1  /* cross_entropy: torch.nn.CrossEntropyLoss */

#ifndef FBP_VECTORS
#define LS_SCALAR 1
#define LS_ATTR
#define LS_ISA base
#include "losses_pair.h"
#define FBP_LOSS_DISPATCH(fn, ty, isa, args) fn##_##ty##_base args
#else

#define LS_ATTR
#define LS_BYTES FBP_BASE_BYTES
#define LS_ISA base
#include "losses_pair.h"

#ifdef FBP_X86_DISPATCH
#define LS_ATTR __attribute__((target("avx2,fma")))
#define LS_BYTES 32
#define LS_ISA avx2
#include "losses_pair.h"

#define LS_ATTR __attribute__((target("avx512f,avx2,fma")))
#define LS_BYTES 64
#define LS_ISA avx512
#include "losses_pair.h"
#endif
#define FBP_LOSS_DISPATCH(fn, ty, isa, args) FBP_DISPATCH(fn, ty, isa, args)
#endif

/* exp of n values in place at level isa (-1: the best); test hook. */
static inline void fbp_exp_isa_f32(int isa, float *x, int64_t n)
{ FBP_LOSS_DISPATCH(ls_exp_array, f32, fbp_isa_clamp(isa), (x, n)); }
static inline void fbp_exp_isa_f64(int isa, double *x, int64_t n)
{ FBP_LOSS_DISPATCH(ls_exp_array, f64, fbp_isa_clamp(isa), (x, n)); }

/* Loss `which` (FBP_LOSS_*) at level isa (-1: the best). */
static inline double fbp_softmax_loss_isa_f32(int isa, int which, float *z, float *y,
                                              float *w, float *g, int64_t m, int64_t k)
{ return FBP_LOSS_DISPATCH(ls_softmax_loss, f32, fbp_isa_clamp(isa), (which, z, y, w, g, m, k)); }
static inline double fbp_softmax_loss_isa_f64(int isa, int which, double *z, double *y,
                                              double *w, double *g, int64_t m, int64_t k)
{ return FBP_LOSS_DISPATCH(ls_softmax_loss, f64, fbp_isa_clamp(isa), (which, z, y, w, g, m, k)); }

/* Rows [lo, hi) of loss `which` (LS(softmax_rows)) at level isa (-1: the
 * best, as the engine's row-parallel steps call it; losses.softmax_rows
 * passes others for tests). */
static inline double fbp_softmax_rows_isa_f32(int isa, int which, float *z, float *y, float *w,
                                              float *g, int64_t lo, int64_t hi, int64_t k,
                                              double scale, double *terms)
{ return FBP_LOSS_DISPATCH(ls_softmax_rows, f32, fbp_isa_clamp(isa),
                           (which, z, y, w, g, lo, hi, k, scale, terms)); }
static inline double fbp_softmax_rows_isa_f64(int isa, int which, double *z, double *y,
                                              double *w, double *g, int64_t lo, int64_t hi,
                                              int64_t k, double scale, double *terms)
{ return FBP_LOSS_DISPATCH(ls_softmax_rows, f64, fbp_isa_clamp(isa),
                           (which, z, y, w, g, lo, hi, k, scale, terms)); }

/* The engine's entry points (their addresses go into train_batches). */
static double fbp_sk_log_loss_f32(float *z, float *y, float *w, float *g, int64_t m, int64_t k)
{ return fbp_softmax_loss_isa_f32(-1, FBP_LOSS_SK_LOG, z, y, w, g, m, k); }
static double fbp_sk_log_loss_f64(double *z, double *y, double *w, double *g, int64_t m,
                                  int64_t k)
{ return fbp_softmax_loss_isa_f64(-1, FBP_LOSS_SK_LOG, z, y, w, g, m, k); }
static double fbp_cross_entropy_f32(float *z, float *y, float *w, float *g, int64_t m,
                                    int64_t k)
{ return fbp_softmax_loss_isa_f32(-1, FBP_LOSS_CROSS_ENTROPY, z, y, w, g, m, k); }
static double fbp_cross_entropy_f64(double *z, double *y, double *w, double *g, int64_t m,
                                    int64_t k)
{ return fbp_softmax_loss_isa_f64(-1, FBP_LOSS_CROSS_ENTROPY, z, y, w, g, m, k); }

#endif
