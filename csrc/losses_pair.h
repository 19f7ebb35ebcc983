/* Instantiates losses_impl.h for float and double at one instruction-set
 * level.  The includer (losses.h) defines LS_ATTR (target attribute),
 * LS_BYTES (vector size) and LS_ISA (name suffix), or LS_SCALAR for the
 * libm fallback; they are undefined at the end. */

#define T float
#define LS_INT int32_t
#define LS_MANT 23
#define LS_BIAS 127
#define LS(x) FBP_CAT(FBP_CAT(FBP_CAT(ls_, x), _f32_), LS_ISA)
#include "losses_impl.h"
#undef T
#undef LS_INT
#undef LS_MANT
#undef LS_BIAS
#undef LS

#define T double
#define LS_INT int64_t
#define LS_MANT 52
#define LS_BIAS 1023
#define LS(x) FBP_CAT(FBP_CAT(FBP_CAT(ls_, x), _f64_), LS_ISA)
#include "losses_impl.h"
#undef T
#undef LS_INT
#undef LS_MANT
#undef LS_BIAS
#undef LS

#undef LS_ATTR
#undef LS_BYTES
#undef LS_ISA
