// NbSmtMatMul (SPEC.md §3.2): Y[..., n] = NB-SMT sum over k of A[..., k] * Bq[k, n].
//
// The columns of Bq are packed and prepared for the kernels once for as long as
// Bq's bytes stay the same (the kernel object keeps them). The rows of A (all
// leading dims flattened) are quantized and packed in bounded chunks,
// accumulated against them, and scaled by the kernels' tile writer (FloatOutput):
//   Y[r, n] = float32(a_scale * b_scale[n]) * float32(acc) (+ bias[n]).
#include <algorithm>
#include <memory>

#include "attributes.h"
#include "nbsmt/kernels.h"
#include "nbsmt/pack.h"
#include "op_common.h"
#include "op_kernel.h"
#include "parallel.h"
#include "weight_cache.h"

namespace nbsmt::ort {

namespace {

// Bound of the per-chunk buffers (packed rows of A and accumulators, bytes).
constexpr int64_t kChunkBudgetBytes = int64_t{16} << 20;

// Input indices read by shape inference (SPEC order; Compute reads all via get_op_inputs).
enum MatMulInput : size_t { kA = 0, kBq = 1 };

struct MatMulKernel {
  static constexpr const char* kOpType = "NbSmtMatMul";
  MatMulKernel(const OrtApi* api_, const OrtKernelInfo* info)
      : api(api_),
        label(node_label(api, info, kOpType)),
        attrs(read_smt_attributes(KernelInfoAttrs(api, info, label), label)),
        weights(is_constant_input(api, info, kBq)) {}
  void compute(OrtKernelContext* ctx) const;
  // Output shapes for ORT (InferOutputShapeFn), best effort.
  static OrtStatusPtr ORT_API_CALL infer_shape(const OrtCustomOp* op, OrtShapeInferContext* ctx);

  const OrtApi* api;
  const std::string label;
  const SmtAttributes attrs;
  mutable PreparedWeightsCache weights;  // thread-safe; see weight_cache.h
};

void MatMulKernel::compute(OrtKernelContext* ctx) const {
  const OpInputs in = get_op_inputs(api, ctx, {"A", "Bq", "a_scale", "b_scale", "bias"}, label);
  const Tensor &a = in.act, &bq = in.weights, &as = in.act_scale, &bs = in.channel_scale;
  const Tensor& bias_t = in.bias;

  // ---- shapes
  if (a.dims.empty()) {
    throw OpError(label + ": A " + shape_str(a.dims) + " must have rank >= 1 ([..., K])");
  }
  if (bq.dims.size() != 2) {
    throw OpError(label + ": Bq " + shape_str(bq.dims) + " must have rank 2 ([K, N])");
  }
  const int64_t K = a.dims.back();
  const int64_t N = bq.dims[1];
  if (bq.dims[0] != K) {
    throw OpError(label + ": A " + shape_str(a.dims) + " has K=" + std::to_string(K) +
                  " but Bq " + shape_str(bq.dims) + " expects K=" + std::to_string(bq.dims[0]));
  }
  const float a_scale = read_activation_scale(as, "a_scale", label);
  expect_length(bs, N, "b_scale", "one scale per column of Bq " + shape_str(bq.dims), label);
  if (bias_t.present()) {
    expect_length(bias_t, N, "bias", "one bias per column of Bq " + shape_str(bq.dims), label);
  }
  expect_reduction_length(K, "K", label);

  // ---- outputs
  std::vector<int64_t> y_dims(a.dims.begin(), a.dims.end() - 1);
  y_dims.push_back(N);
  void* y_data = nullptr;
  if (!get_output(api, ctx, 0, y_dims, &y_data)) throw OpError(label + ": output Y is missing");
  float* y = static_cast<float*>(y_data);
  StatsOutput stats(api, ctx);
  const int64_t P = element_count(std::vector<int64_t>(a.dims.begin(), a.dims.end() - 1));
  if (P > 0 && N > 0) {
    const SmtConfig& cfg = attrs.config;
    const PackLayout layout = make_matmul_layout(attrs.mapping, cfg.threads, K);
    const int64_t RL = layout.row_length();

    const OrtParallel par(api, ctx);
    // The layout depends only on Bq's shape and the attributes: the cache is keyed by Bq.
    // Bq is [K, N]: weight row n (output column n) is element k at k * N + n.
    const std::shared_ptr<const PreparedSet> prepared = weights.get(bq, [&](PreparedSet& set) {
      set.groups = prepare_weight_groups(cfg, layout, bq, "Bq", N, 1, N, 1, label, par.get());
    });
    const float* b_scale = static_cast<const float*>(bs.data);
    const float* bias = bias_t.present() ? static_cast<const float*>(bias_t.data) : nullptr;
    std::vector<float> scale(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) scale[n] = a_scale * b_scale[n];

    // Rows in chunks: packed activations of a chunk stay within the budget (at
    // least one row), whatever the number of rows.
    const int64_t row_bytes = RL * static_cast<int64_t>(sizeof(int16_t));
    const int64_t chunk = std::clamp<int64_t>(kChunkBudgetBytes / row_bytes, 1, P);
    // Zero once: idle slots sit at the same positions in every row and are never written.
    std::vector<int16_t> a_packed(static_cast<size_t>(chunk * RL), 0);

    const bool act_signed = cfg.act_signed;
    const float* adata = static_cast<const float*>(a.data);
    for (int64_t p0 = 0; p0 < P; p0 += chunk) {
      const int64_t rows = std::min(chunk, P - p0);
      par.for_ranges(rows, grain_for(rows, 8), [&](int64_t r0, int64_t r1) {
        quantize_pack_rows(layout, adata + p0 * K, r0, r1, a_scale, act_signed,
                           a_packed.data() + r0 * RL);
      });
      // Outputs scaled and written by the kernels' tile writer (row-major Y).
      FloatOutput out;
      out.y = y + p0 * N;
      out.scale = scale.data();
      out.bias = bias;
      out.rows_per_image = rows;
      out.row_stride = N;
      out.col_stride = 1;
      accumulate_prepared(*prepared->groups[0], rows, a_packed.data(), RL, out, stats.counters(),
                          par.get());
    }
  }
  stats.write();
}

// Y = A.shape[:-1] + [N]; nothing is set when A's rank is unknown (see conv_op.cc).
OrtStatusPtr ORT_API_CALL MatMulKernel::infer_shape(const OrtCustomOp* op,
                                                      OrtShapeInferContext* ctx) {
  const OrtApi* api = static_cast<const NbSmtCustomOp*>(op)->api;
  if (api == nullptr) return nullptr;
  try {
    std::vector<InferDim> ad, bd;
    ONNXTensorElementDataType at{}, bt{};
    if (!infer_input_dims(api, ctx, kA, &ad, &at) || ad.empty()) return nullptr;
    std::vector<InferDim> yd(ad.begin(), ad.end() - 1);
    InferDim n;
    if (infer_input_dims(api, ctx, kBq, &bd, &bt) && bd.size() == 2) n = bd[1];
    yd.push_back(n);
    infer_set_output(api, ctx, 0, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, yd);
  } catch (...) {
    // Best effort: leave the shape unknown.
  }
  return nullptr;
}

}  // namespace

NbSmtCustomOp* matmul_custom_op() { return nbsmt_custom_op<MatMulKernel>(); }

}  // namespace nbsmt::ort
