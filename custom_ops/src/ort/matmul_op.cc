// NbSmtMatMul (SPEC.md §3.2): Y[..., n] = NB-SMT sum over k of A[..., k] * Bq[k, n].
//
// The columns of Bq are packed and prepared for the kernels once for as long as
// Bq's bytes stay the same (the kernel object keeps them). The rows of A (all
// leading dims flattened) are quantized and packed in bounded chunks,
// accumulated against them, and scaled:
//   Y[r, n] = float32(a_scale * b_scale[n]) * float32(acc) (+ bias[n]).
#include <algorithm>
#include <memory>

#include "attributes.h"
#include "nbsmt/kernels.h"
#include "nbsmt/pack.h"
#include "op_common.h"
#include "parallel.h"
#include "weight_cache.h"

namespace nbsmt::ort {

namespace {

constexpr const char* kOpType = "NbSmtMatMul";
// Bound of the per-chunk buffers (packed rows of A and accumulators, bytes).
constexpr int64_t kChunkBudgetBytes = int64_t{16} << 20;

enum MatMulInput : size_t { kA = 0, kBq, kAScale, kBScale, kBias };

struct MatMulKernel {
  const OrtApi* api;
  std::string label;
  SmtAttributes attrs;
  mutable PreparedWeightsCache weights;  // thread-safe; see weight_cache.h
  void compute(OrtKernelContext* ctx) const;
};

void MatMulKernel::compute(OrtKernelContext* ctx) const {
  const Tensor a = get_input(api, ctx, kA);
  const Tensor bq = get_input(api, ctx, kBq);
  const Tensor as = get_input(api, ctx, kAScale);
  const Tensor bs = get_input(api, ctx, kBScale);
  const Tensor bias_t = get_input(api, ctx, kBias);
  expect_type(a, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "A", "float32", label);
  expect_type(bq, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, "Bq", "int8", label);
  expect_type(as, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "a_scale", "float32", label);
  expect_type(bs, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "b_scale", "float32", label);
  if (bias_t.present()) {
    expect_type(bias_t, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "bias", "float32", label);
  }

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
  if (bs.dims != std::vector<int64_t>{N}) {
    throw OpError(label + ": b_scale " + shape_str(bs.dims) + " must have shape [" +
                  std::to_string(N) + "] (one scale per column of Bq " + shape_str(bq.dims) + ")");
  }
  if (bias_t.present() && bias_t.dims != std::vector<int64_t>{N}) {
    throw OpError(label + ": bias " + shape_str(bias_t.dims) + " must have shape [" +
                  std::to_string(N) + "] (one bias per column of Bq " + shape_str(bq.dims) + ")");
  }
  if (K > kMaxReductionLength) {
    throw OpError(label + ": reduction length K = " + std::to_string(K) + " exceeds " +
                  std::to_string(kMaxReductionLength) +
                  ", the largest for which the int32 accumulator is exact");
  }

  // ---- outputs
  std::vector<int64_t> y_dims(a.dims.begin(), a.dims.end() - 1);
  y_dims.push_back(N);
  void* y_data = nullptr;
  void* stats_data = nullptr;
  if (!get_output(api, ctx, 0, y_dims, &y_data)) throw OpError(label + ": output Y is missing");
  const bool want_stats = get_output(api, ctx, 1, {4}, &stats_data);
  float* y = static_cast<float*>(y_data);
  auto* stats_out = static_cast<int64_t*>(want_stats ? stats_data : nullptr);

  SmtStats stats;
  SmtStats* stats_ptr = stats_out != nullptr ? &stats : nullptr;
  const int64_t P = element_count(std::vector<int64_t>(a.dims.begin(), a.dims.end() - 1));
  if (P > 0 && N > 0) {
    const SmtConfig& cfg = attrs.config;
    const PackLayout layout = make_matmul_layout(attrs.mapping, cfg.threads, K);
    const int64_t RL = layout.row_length();

    const OrtParallel par(api, ctx);
    // The layout depends only on Bq's shape and the attributes: the cache is keyed by Bq.
    const std::shared_ptr<const PreparedSet> prepared = weights.get(bq, [&] {
      // Bq is [K, N]; the kernels want one packed row per output column n.
      std::vector<int8_t> w_packed(static_cast<size_t>(N * RL));
      if (!pack_weights(layout, static_cast<const int8_t*>(bq.data), N, 1, N, w_packed.data())) {
        throw OpError(label + ": Bq contains -128; quantized weights must be in [-127, 127]");
      }
      return std::vector<std::shared_ptr<const PreparedWeights>>{
          prepare_weights(cfg, N, layout.steps, w_packed.data(), RL, par.get())};
    });
    const float* b_scale = static_cast<const float*>(bs.data);
    const float* bias = bias_t.present() ? static_cast<const float*>(bias_t.data) : nullptr;
    std::vector<float> scale(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) scale[n] = a_scale * b_scale[n];

    // Rows in chunks: packed activations and accumulators of a chunk stay within
    // the budget (at least one row), whatever the number of rows.
    const int64_t row_bytes = RL * static_cast<int64_t>(sizeof(int16_t)) +
                              N * static_cast<int64_t>(sizeof(int32_t));
    const int64_t chunk = std::clamp<int64_t>(kChunkBudgetBytes / row_bytes, 1, P);
    // Zero once: idle slots sit at the same positions in every row and are never written.
    std::vector<int16_t> a_packed(static_cast<size_t>(chunk * RL), 0);
    std::vector<int32_t> acc(static_cast<size_t>(chunk * N));

    const bool act_signed = cfg.act_signed;
    const float* adata = static_cast<const float*>(a.data);
    for (int64_t p0 = 0; p0 < P; p0 += chunk) {
      const int64_t rows = std::min(chunk, P - p0);
      par.for_ranges(rows, grain_for(rows, 8), [&](int64_t r0, int64_t r1) {
        quantize_pack_rows(layout, adata + p0 * K, r0, r1, a_scale, act_signed,
                           a_packed.data() + r0 * RL);
      });
      accumulate_prepared(*prepared->groups[0], rows, a_packed.data(), RL, acc.data(), N, 1, stats_ptr,
                          par.get());
      float* yc = y + p0 * N;
      par.for_ranges(rows, grain_for(rows, 8), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int32_t* ar = acc.data() + r * N;
          float* yr = yc + r * N;
          if (bias != nullptr) {
            for (int64_t n = 0; n < N; ++n) {
              const float v = scale[n] * static_cast<float>(ar[n]);
              yr[n] = v + bias[n];
            }
          } else {
            for (int64_t n = 0; n < N; ++n) yr[n] = scale[n] * static_cast<float>(ar[n]);
          }
        }
      });
    }
  }
  if (stats_out != nullptr) {
    stats_out[0] = stats.groups;
    stats_out[1] = stats.active_slots;
    stats_out[2] = stats.collisions;
    stats_out[3] = stats.reduced_operands;
  }
}

OrtStatusPtr ORT_API_CALL create_kernel(const OrtCustomOp*, const OrtApi* api,
                                        const OrtKernelInfo* info, void** kernel) {
  try {
    auto k = std::make_unique<MatMulKernel>();
    k->api = api;
    k->label = node_label(api, info, kOpType);
    k->attrs = read_smt_attributes(KernelInfoAttrs(api, info, k->label), k->label);
    *kernel = k.release();
    return nullptr;
  } catch (...) {
    return status_from_current_exception(api, kOpType);
  }
}

OrtStatusPtr ORT_API_CALL compute_kernel(void* kernel, OrtKernelContext* ctx) {
  const auto* k = static_cast<const MatMulKernel*>(kernel);
  try {
    k->compute(ctx);
    return nullptr;
  } catch (...) {
    return status_from_current_exception(k->api, kOpType);
  }
}

void ORT_API_CALL destroy_kernel(void* kernel) { delete static_cast<MatMulKernel*>(kernel); }

// Y = A.shape[:-1] + [N]; nothing is set when A's rank is unknown (see conv_op.cc).
OrtStatusPtr ORT_API_CALL infer_shape(const OrtCustomOp* op, OrtShapeInferContext* ctx) {
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

const OpDescription kDescription = {
    kOpType,
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8,
     ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
     ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT},
    4,
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64},
    1,
    create_kernel,
    compute_kernel,
    destroy_kernel,
    infer_shape,
};

}  // namespace

NbSmtCustomOp* matmul_custom_op() {
  static NbSmtCustomOp op = [] {
    NbSmtCustomOp o;
    init_custom_op(&o, &kDescription);
    return o;
  }();
  return &op;
}

}  // namespace nbsmt::ort
