// What NbSmtConv and NbSmtMatMul share beyond the OrtCustomOp plumbing
// (op_common.h): the op object and C entry points of a kernel type, input checks,
// weight preparation, the float output rule and the optional stats output.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "nbsmt/kernels.h"
#include "nbsmt/pack.h"
#include "op_common.h"
#include "ort_api.h"

namespace nbsmt::ort {

// CreateKernelV2 / KernelComputeV2 / KernelDestroy of a kernel type with a
// constructor Kernel(api, info), a const compute(ctx) and members `api` and
// `kOpType` (the op name). Exceptions become ORT statuses here, never cross into ORT.
template <class Kernel>
struct KernelEntryPoints {
  static OrtStatusPtr ORT_API_CALL create(const OrtCustomOp*, const OrtApi* api,
                                          const OrtKernelInfo* info, void** kernel) {
    try {
      *kernel = new Kernel(api, info);
      return nullptr;
    } catch (...) {
      return status_from_current_exception(api, Kernel::kOpType);
    }
  }
  static OrtStatusPtr ORT_API_CALL compute(void* kernel, OrtKernelContext* ctx) {
    const auto* k = static_cast<const Kernel*>(kernel);
    try {
      k->compute(ctx);
      return nullptr;
    } catch (...) {
      return status_from_current_exception(k->api, Kernel::kOpType);
    }
  }
  static void ORT_API_CALL destroy(void* kernel) { delete static_cast<Kernel*>(kernel); }
};

// The op object (a static: it outlives every session) of a kernel type that also
// has a static infer_shape. Both ops have the same signature: inputs (float32
// activations, int8 weights, float32 activation scale, float32 per-channel
// scales, optional float32 bias), outputs (float32 Y, optional int64 stats).
template <class Kernel>
NbSmtCustomOp* nbsmt_custom_op() {
  using E = KernelEntryPoints<Kernel>;
  constexpr auto kFloat = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  static const OpDescription description = {
      Kernel::kOpType,
      {kFloat, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, kFloat, kFloat, kFloat},
      4,
      {kFloat, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64},
      1,
      E::create,
      E::compute,
      E::destroy,
      Kernel::infer_shape,
  };
  static NbSmtCustomOp op = [] {
    NbSmtCustomOp o;
    init_custom_op(&o, &description);
    return o;
  }();
  return &op;
}

// The inputs of an NB-SMT op in SPEC order, type-checked: float32 activations,
// int8 weights, float32 activation scale, float32 per-channel scales, optional
// float32 bias (absent: bias.present() is false). `names` are the op's input
// names in that order, for the messages.
struct OpInputs {
  Tensor act, weights, act_scale, channel_scale, bias;
};
OpInputs get_op_inputs(const OrtApi* api, OrtKernelContext* ctx,
                       const std::array<const char*, 5>& names, const std::string& label);

// Throws OpError("<label>: <name> [..] must have shape [n] (<meaning>)") unless
// t has shape [n] (per-output-channel scales and biases).
void expect_length(const Tensor& t, int64_t n, const char* name, const std::string& meaning,
                   const std::string& label);

// Throws OpError unless K <= kMaxReductionLength (int32 accumulators stay exact);
// `what` names K in the message ("K", "C/group * kernel size").
void expect_reduction_length(int64_t K, const char* what, const std::string& label);

// Packs the int8 weight rows of `w` (row r, element k at
// data[r * row_stride + k * elem_stride]) with `layout` and prepares `groups`
// equal consecutive blocks of rows for the kernels (one PreparedWeights each).
// Throws OpError naming `name` if a weight is -128 (outside the contract).
std::vector<std::shared_ptr<const PreparedWeights>> prepare_weight_groups(
    const SmtConfig& cfg, const PackLayout& layout, const Tensor& w, const char* name,
    int64_t rows, int64_t row_stride, int64_t elem_stride, int64_t groups,
    const std::string& label, const Parallel& parallel);

// The output rule (docs/ops.md §4.5) for a run of n accumulators:
//   y[i] = float32(scale * float32(acc[i])), then + bias only if there is one,
// each operation rounded to float32 (the build forbids FMA contraction; adding
// a zero bias instead would turn -0 into +0). `scale` = float32(x_scale * w_scale[m]).
// kPerElement = false: one output channel for the whole run (scale[0], bias[0];
// Conv: output positions of one channel); true: channel i for element i (MatMul: a row).
template <bool kPerElement>
inline void scale_accumulators(const int32_t* acc, int64_t n, const float* scale,
                               const float* bias, float* y) {
  const auto at = [](const float* v, int64_t i) { return kPerElement ? v[i] : v[0]; };
  if (bias == nullptr) {
    for (int64_t i = 0; i < n; ++i) y[i] = at(scale, i) * static_cast<float>(acc[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float v = at(scale, i) * static_cast<float>(acc[i]);
      y[i] = v + at(bias, i);
    }
  }
}

// The optional output `stats` (index 1, int64 [4], SPEC.md §3.4), allocated if
// the node has it. The kernels add to counters(), which is null when it does not
// (then no statistics are computed); write() stores them.
class StatsOutput {
 public:
  StatsOutput(const OrtApi* api, OrtKernelContext* ctx);
  SmtStats* counters() { return out_ != nullptr ? &stats_ : nullptr; }
  void write() const;

 private:
  int64_t* out_ = nullptr;
  SmtStats stats_;
};

}  // namespace nbsmt::ort
