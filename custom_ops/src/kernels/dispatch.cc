// Choice of the instruction-set backend of the fast kernels (engine.h).
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "engine.h"

namespace nbsmt {
namespace detail {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kGeneric: return "generic";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "?";
}

namespace {

bool cpu_has(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kGeneric: return true;
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
             __builtin_cpu_supports("popcnt");
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vnni");
  }
  return false;
#else
  return isa == Isa::kGeneric;
#endif
}

const Backend* best_backend() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2}) {
    if (const Backend* be = backend_for(isa)) return be;
  }
  return &generic_backend();
}

// NBSMT_KERNEL_ISA, read once; an unknown or unsupported name falls back to the
// best backend (the choice is observable through active_kernel()).
const Backend* initial_backend() {
  const char* env = std::getenv("NBSMT_KERNEL_ISA");
  if (env != nullptr && *env != '\0') {
    Isa isa;
    if (parse_isa(env, &isa)) {
      if (const Backend* be = backend_for(isa)) return be;
    }
  }
  return best_backend();
}

std::atomic<const Backend*> g_forced{nullptr};

}  // namespace

bool parse_isa(const char* name, Isa* out) {
  if (std::strcmp(name, "scalar") == 0 || std::strcmp(name, "generic") == 0) {
    *out = Isa::kGeneric;
  } else if (std::strcmp(name, "avx2") == 0) {
    *out = Isa::kAvx2;
  } else if (std::strcmp(name, "avx512") == 0) {
    *out = Isa::kAvx512;
  } else {
    return false;
  }
  return true;
}

const Backend* backend_for(Isa isa) {
  if (!cpu_has(isa)) return nullptr;
  switch (isa) {
    case Isa::kGeneric: return &generic_backend();
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::kAvx2: return &avx2_backend();
    case Isa::kAvx512: return &avx512_backend();
#else
    default: return nullptr;
#endif
  }
  return nullptr;
}

const Backend& selected_backend() {
  if (const Backend* forced = g_forced.load(std::memory_order_acquire)) return *forced;
  static const Backend* const chosen = initial_backend();
  return *chosen;
}

}  // namespace detail

bool force_kernel(const char* name) {
  if (name == nullptr) {
    detail::g_forced.store(nullptr, std::memory_order_release);
    return true;
  }
  detail::Isa isa;
  if (!detail::parse_isa(name, &isa)) return false;
  const detail::Backend* be = detail::backend_for(isa);
  if (be == nullptr) return false;
  detail::g_forced.store(be, std::memory_order_release);
  return true;
}

const char* active_kernel() { return detail::isa_name(detail::selected_backend().isa); }

}  // namespace nbsmt
