// AVX2 implementation of the per-ISA pieces (engine.h). (placeholder: generic)
#include "engine.h"
namespace nbsmt { namespace detail {
#if defined(__x86_64__) || defined(_M_X64)
const Backend& avx2_backend() { return generic_backend(); }
#endif
}}
