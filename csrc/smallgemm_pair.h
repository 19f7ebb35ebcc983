/* Instantiates smallgemm_impl.h for float and double at one instruction-set
 * level.  The includer (smallgemm.h) defines SG_ATTR (target attribute),
 * SG_MNK_CAP, SG_T_MNK_CAP (with a transposed operand), SG_SWEEP_CAP and
 * SG_ROW_CAP (bytes of a row of C; where BLAS or the packed kernels take
 * over above FBP_SMALL_MNK), SG_BYTES (vector
 * size) and SG_ISA (name suffix); they are undefined at the end. */

#define T float
#define VL (SG_BYTES / 4)
#define SG(x) FBP_CAT(FBP_CAT(x, _f32_), SG_ISA)
#include "smallgemm_impl.h"
#undef T
#undef VL
#undef SG

#define T double
#define VL (SG_BYTES / 8)
#define SG(x) FBP_CAT(FBP_CAT(x, _f64_), SG_ISA)
#include "smallgemm_impl.h"
#undef T
#undef VL
#undef SG

#undef SG_ATTR
#undef SG_MNK_CAP
#undef SG_T_MNK_CAP
#undef SG_SWEEP_CAP
#undef SG_ROW_CAP
#undef SG_ROWS
#undef SG_BYTES
#undef SG_ISA
