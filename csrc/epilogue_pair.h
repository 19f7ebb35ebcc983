/* Instantiates epilogue_impl.h for float and double at one instruction-set
 * level; the includer (epilogue.h) defines EP_ATTR, EP_BYTES and EP_ISA,
 * undefined at the end. */
#define T float
#define EP_INT int32_t
#define EP(x) FBP_CAT(FBP_CAT(FBP_CAT(ep_, x), _f32_), EP_ISA)
#include "epilogue_impl.h"
#undef T
#undef EP_INT
#undef EP

#define T double
#define EP_INT int64_t
#define EP(x) FBP_CAT(FBP_CAT(FBP_CAT(ep_, x), _f64_), EP_ISA)
#include "epilogue_impl.h"
#undef T
#undef EP_INT
#undef EP

#undef EP_ATTR
#undef EP_BYTES
#undef EP_ISA
