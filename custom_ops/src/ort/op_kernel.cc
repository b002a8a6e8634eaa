#include "op_kernel.h"

namespace nbsmt::ort {

OpInputs get_op_inputs(const OrtApi* api, OrtKernelContext* ctx,
                       const std::array<const char*, 5>& names, const std::string& label) {
  constexpr auto kFloat = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  OpInputs in;
  in.act = get_input(api, ctx, 0);
  in.weights = get_input(api, ctx, 1);
  in.act_scale = get_input(api, ctx, 2);
  in.channel_scale = get_input(api, ctx, 3);
  in.bias = get_input(api, ctx, 4);
  expect_type(in.act, kFloat, names[0], "float32", label);
  expect_type(in.weights, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, names[1], "int8", label);
  expect_type(in.act_scale, kFloat, names[2], "float32", label);
  expect_type(in.channel_scale, kFloat, names[3], "float32", label);
  if (in.bias.present()) expect_type(in.bias, kFloat, names[4], "float32", label);
  return in;
}

void expect_length(const Tensor& t, int64_t n, const char* name, const std::string& meaning,
                   const std::string& label) {
  if (t.dims != std::vector<int64_t>{n}) {
    throw OpError(label + ": " + name + " " + shape_str(t.dims) + " must have shape [" +
                  std::to_string(n) + "] (" + meaning + ")");
  }
}

void expect_reduction_length(int64_t K, const char* what, const std::string& label) {
  if (K > kMaxReductionLength) {
    throw OpError(label + ": reduction length " + what + " = " + std::to_string(K) +
                  " exceeds " + std::to_string(kMaxReductionLength) +
                  ", the largest for which the int32 accumulator is exact");
  }
}

std::vector<std::shared_ptr<const PreparedWeights>> prepare_weight_groups(
    const SmtConfig& cfg, const PackLayout& layout, const Tensor& w, const char* name,
    int64_t rows, int64_t row_stride, int64_t elem_stride, int64_t groups,
    const std::string& label, const Parallel& parallel) {
  const int64_t RL = layout.row_length();
  std::vector<int8_t> packed(static_cast<size_t>(rows * RL));
  if (!pack_weights(layout, static_cast<const int8_t*>(w.data), rows, row_stride, elem_stride,
                    packed.data())) {
    throw OpError(label + ": " + name +
                  " contains -128; quantized weights must be in [-127, 127]");
  }
  const int64_t group_rows = rows / groups;
  std::vector<std::shared_ptr<const PreparedWeights>> prepared(static_cast<size_t>(groups));
  for (int64_t g = 0; g < groups; ++g) {
    prepared[g] = prepare_weights(cfg, group_rows, layout.steps,
                                  packed.data() + g * group_rows * RL, RL, parallel);
  }
  return prepared;
}

StatsOutput::StatsOutput(const OrtApi* api, OrtKernelContext* ctx) {
  void* data = nullptr;
  if (get_output(api, ctx, 1, {4}, &data)) out_ = static_cast<int64_t*>(data);
}

void StatsOutput::write() const {
  if (out_ == nullptr) return;
  out_[0] = stats_.groups;
  out_[1] = stats_.active_slots;
  out_[2] = stats_.collisions;
  out_[3] = stats_.reduced_operands;
}

}  // namespace nbsmt::ort
