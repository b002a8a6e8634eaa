// Prepared weights of one node, kept by its kernel object across Compute calls.
//
// Preparing weights for the fast kernels (nbsmt::prepare_weights) costs far more
// than a comparison of the weight bytes, and the weight input (Wq / Bq) is
// normally a constant initializer. But it is an input: a model may feed it at
// run time and change it between runs. So every Compute compares the input's
// shape and bytes with the copy the cached weights were built from (memcmp, in
// full: a hit can never change a result) and rebuilds on any difference.
//
// A weight input that is a constant initializer (the usual case) cannot change:
// there the comparison is skipped after the first build.
//
// One cache per kernel object, i.e. per node and session; it is freed with the
// session. Memory: the raw weight bytes plus the prepared weights of the last
// weights seen (see docs/ops.md, "Memory and work split"). No global state.
//
// ORT may run Compute concurrently on one kernel: the mutex guards only the
// exchange of a shared_ptr; the comparison, the build and the compute work on an
// immutable snapshot that stays alive while any call uses it.
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "nbsmt/direct_conv.h"
#include "nbsmt/kernels.h"
#include "nbsmt/pointwise.h"
#include "ort_api.h"

namespace nbsmt::ort {

// Immutable once built.
struct PreparedSet {
  std::vector<int64_t> dims;  // shape of the weight input they were built from
  std::vector<int8_t> raw;    // its bytes (empty for a constant initializer: never compared)
  std::vector<std::shared_ptr<const PreparedWeights>> groups;  // one per Conv group (GEMM path)
  std::shared_ptr<const DirectConvWeights> direct;  // Conv direct path (direct_conv.h), or null
  std::shared_ptr<const PointwiseWeights> pointwise;  // Conv pointwise path (pointwise.h), or null
};

class PreparedWeightsCache {
 public:
  PreparedWeightsCache() = default;
  // `constant`: the weight input is a constant initializer of the session (ORT
  // KernelInfoGetConstantInput_tensor): its bytes cannot change between runs, so
  // once built the prepared weights are reused without comparing them again.
  explicit PreparedWeightsCache(bool constant) : constant_(constant) {}

  // The prepared weights of `w` (an int8 tensor): the cached set if w has the
  // same dims and bytes, else a set filled by build(PreparedSet&) (the GEMM
  // groups or the direct-conv weights), which becomes the cached one. build may
  // throw (nothing is cached then).
  template <class Build>
  std::shared_ptr<const PreparedSet> get(const Tensor& w, const Build& build) {
    std::shared_ptr<const PreparedSet> current = snapshot();
    const auto* bytes = static_cast<const int8_t*>(w.data);
    if (current != nullptr && (constant_ || matches(*current, w.dims, bytes))) return current;
    auto fresh = std::make_shared<PreparedSet>();
    fresh->dims = w.dims;
    if (!constant_) fresh->raw.assign(bytes, bytes + w.size());  // only compared if not constant
    build(*fresh);
    std::shared_ptr<const PreparedSet> result = std::move(fresh);
    std::lock_guard<std::mutex> lock(mu_);
    current_ = result;
    return result;
  }

 private:
  std::shared_ptr<const PreparedSet> snapshot() const {
    std::lock_guard<std::mutex> lock(mu_);
    return current_;
  }
  static bool matches(const PreparedSet& set, const std::vector<int64_t>& dims,
                      const int8_t* bytes) {
    return set.dims == dims &&
           (set.raw.empty() || std::memcmp(set.raw.data(), bytes, set.raw.size()) == 0);
  }

  const bool constant_ = false;
  mutable std::mutex mu_;
  std::shared_ptr<const PreparedSet> current_;  // guarded by mu_
};

// Whether input `index` of the node is a constant initializer (not overridable by a
// feed); false when ORT cannot tell.
inline bool is_constant_input(const OrtApi* api, const OrtKernelInfo* info, size_t index) {
  int constant = 0;
  const OrtValue* value = nullptr;
  OrtStatus* status = api->KernelInfoGetConstantInput_tensor(info, index, &constant, &value);
  if (status != nullptr) {
    api->ReleaseStatus(status);
    return false;
  }
  return constant != 0 && value != nullptr;
}

}  // namespace nbsmt::ort
