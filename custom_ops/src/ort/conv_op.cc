// NbSmtConv (SPEC.md §3.1): ONNX Conv semantics with NB-SMT integer arithmetic.
//
// Per image and group: quantize X once (channels-last), im2col a bounded chunk
// of output positions into packed rows (pack.h), nbsmt::accumulate() against the
// packed weights, and scale to float:
//   Y[n, m, p] = float32(x_scale * w_scale[m]) * float32(acc) (+ B[m])
// each operation rounded to float32 (the build forbids FMA contraction).
#include <algorithm>
#include <memory>

#include "attributes.h"
#include "nbsmt/kernels.h"
#include "nbsmt/pack.h"
#include "op_common.h"
#include "parallel.h"

namespace nbsmt::ort {

namespace {

constexpr const char* kOpType = "NbSmtConv";
// Upper bound of the packed-activation chunk (bytes); keeps memory independent
// of batch and image size.
constexpr int64_t kPackBudgetBytes = int64_t{16} << 20;

enum ConvInput : size_t { kX = 0, kWq, kXScale, kWScale, kB };

struct ConvKernel {
  const OrtApi* api;
  std::string label;
  ConvAttributes attrs;
  void compute(OrtKernelContext* ctx) const;
};

void ConvKernel::compute(OrtKernelContext* ctx) const {
  const Tensor x = get_input(api, ctx, kX);
  const Tensor w = get_input(api, ctx, kWq);
  const Tensor xs = get_input(api, ctx, kXScale);
  const Tensor ws = get_input(api, ctx, kWScale);
  const Tensor b = get_input(api, ctx, kB);
  expect_type(x, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "X", "float32", label);
  expect_type(w, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, "Wq", "int8", label);
  expect_type(xs, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "x_scale", "float32", label);
  expect_type(ws, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "w_scale", "float32", label);
  if (b.present()) expect_type(b, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "B", "float32", label);

  // ---- shapes
  const size_t rank = x.dims.size();
  if (rank < 3 || rank > 5) {
    throw OpError(label + ": X " + shape_str(x.dims) +
                  " must be [N, C, D1..Dk] with k = 1, 2 or 3 spatial dimensions");
  }
  if (w.dims.size() != rank) {
    throw OpError(label + ": Wq " + shape_str(w.dims) + " must have the rank of X " +
                  shape_str(x.dims) + " ([M, C/group, k1..kk])");
  }
  const int64_t N = x.dims[0], C = x.dims[1];
  const int64_t M = w.dims[0], Cg = w.dims[1];
  const int64_t group = attrs.group;
  if (Cg * group != C) {
    throw OpError(label + ": X " + shape_str(x.dims) + " has " + std::to_string(C) +
                  " channels but Wq " +
                  shape_str(w.dims) + " with group=" + std::to_string(group) + " expects " +
                  std::to_string(Cg * group));
  }
  if (M % group != 0) {
    throw OpError(label + ": Wq " + shape_str(w.dims) + " has " + std::to_string(M) +
                  " output channels, not divisible by group=" + std::to_string(group));
  }
  const std::vector<int64_t> x_spatial(x.dims.begin() + 2, x.dims.end());
  const std::vector<int64_t> kernel(w.dims.begin() + 2, w.dims.end());
  const ConvGeometry geo = resolve_conv_geometry(attrs, x_spatial, kernel, label);
  const float x_scale = read_activation_scale(xs, "x_scale", label);
  if (ws.dims != std::vector<int64_t>{M}) {
    throw OpError(label + ": w_scale " + shape_str(ws.dims) + " must have shape [" +
                  std::to_string(M) + "] (one scale per output channel of Wq " +
                  shape_str(w.dims) + ")");
  }
  if (b.present() && b.dims != std::vector<int64_t>{M}) {
    throw OpError(label + ": B " + shape_str(b.dims) + " must have shape [" + std::to_string(M) +
                  "] (one bias per output channel of Wq " + shape_str(w.dims) + ")");
  }
  const int64_t KS = geo.kernel_size();
  const int64_t K = Cg * KS;
  if (K > kMaxReductionLength) {
    throw OpError(label + ": reduction length C/group * kernel size = " + std::to_string(K) +
                  " exceeds " + std::to_string(kMaxReductionLength) +
                  ", the largest for which the int32 accumulator is exact");
  }

  // ---- outputs
  std::vector<int64_t> y_dims = {N, M};
  for (size_t i = 3 - (rank - 2); i < 3; ++i) y_dims.push_back(geo.out[i]);
  void* y_data = nullptr;
  void* stats_data = nullptr;
  if (!get_output(api, ctx, 0, y_dims, &y_data)) throw OpError(label + ": output Y is missing");
  const bool want_stats = get_output(api, ctx, 1, {4}, &stats_data);
  float* y = static_cast<float*>(y_data);
  auto* stats_out = static_cast<int64_t*>(want_stats ? stats_data : nullptr);

  SmtStats stats;
  SmtStats* stats_ptr = stats_out != nullptr ? &stats : nullptr;
  const int64_t P = geo.out_size();
  const int64_t in_size = geo.in_size();
  const int64_t Mg = M / group;
  if (N > 0 && P > 0 && M > 0) {
    const SmtConfig& cfg = attrs.smt.config;
    const PackLayout layout = make_conv_layout(attrs.smt.mapping, cfg.threads, Cg, KS);
    const int64_t RL = layout.row_length();
    const Im2Col plan = make_im2col(geo, layout, Cg, group);

    std::vector<int8_t> w_packed(static_cast<size_t>(M * RL));
    if (!pack_weights(layout, static_cast<const int8_t*>(w.data), M, K, 1, w_packed.data())) {
      throw OpError(label + ": Wq contains -128; quantized weights must be in [-127, 127]");
    }
    const float* w_scale = static_cast<const float*>(ws.data);
    const float* bias = b.present() ? static_cast<const float*>(b.data) : nullptr;
    std::vector<float> scale(static_cast<size_t>(M));
    for (int64_t m = 0; m < M; ++m) scale[m] = x_scale * w_scale[m];

    // Rows are (image, output position) pairs over the whole batch, processed in
    // chunks of bounded size; a chunk may span several small images (late layers)
    // so that accumulate() sees large matrices. Only the chunk's images are
    // quantized (an image split between two chunks is quantized twice).
    const int64_t total_rows = N * P;
    const int64_t row_bytes = std::max<int64_t>(1, RL) * static_cast<int64_t>(sizeof(int16_t));
    const int64_t chunk = std::max<int64_t>(1, std::min(total_rows, kPackBudgetBytes / row_bytes));
    const int64_t max_images = std::min(N, (chunk + P - 1) / P + 1);
    const int64_t image_entries = static_cast<int64_t>(plan.image_entries());
    // Zero once: entries without a channel, and the idle slots of the packed rows,
    // sit at the same positions for every image and row and are never written.
    std::vector<int16_t> xq(static_cast<size_t>(max_images * image_entries), 0);
    std::vector<int16_t> x_packed(static_cast<size_t>(chunk * RL), 0);
    std::vector<int32_t> acc(static_cast<size_t>(chunk * Mg));

    const OrtParallel par(api, ctx);
    const bool act_signed = cfg.act_signed;
    const float* xdata = static_cast<const float*>(x.data);
    // Calls f(n, first, count, offset) for the pieces of rows [r0, r1) that lie in
    // one image: image n, output positions [first, first + count), chunk row offset.
    auto for_image_pieces = [P](int64_t r0, int64_t r1, int64_t base, const auto& f) {
      for (int64_t r = r0; r < r1;) {
        const int64_t n = r / P, p = r % P;
        const int64_t count = std::min(r1 - r, P - p);
        f(n, p, count, r - base);
        r += count;
      }
    };
    for (int64_t c0 = 0; c0 < total_rows; c0 += chunk) {
      const int64_t rows = std::min(chunk, total_rows - c0);
      const int64_t n_first = c0 / P;
      const int64_t n_count = (c0 + rows - 1) / P - n_first + 1;
      par.for_ranges(n_count * in_size, grain_for(n_count * in_size, 256),
                     [&](int64_t a, int64_t b) {
                       for (int64_t i = a; i < b;) {
                         const int64_t img = i / in_size, s0 = i % in_size;
                         const int64_t s1 = std::min(in_size, s0 + (b - i));
                         quantize_image(plan, xdata + (n_first + img) * C * in_size, s0, s1,
                                        x_scale, act_signed, xq.data() + img * image_entries);
                         i += s1 - s0;
                       }
                     });
      for (int64_t g = 0; g < group; ++g) {
        par.for_ranges(rows, grain_for(rows, 16), [&](int64_t a, int64_t b) {
          for_image_pieces(c0 + a, c0 + b, c0, [&](int64_t n, int64_t p, int64_t count, int64_t off) {
            im2col_rows(plan, xq.data() + (n - n_first) * image_entries, g, p, p + count,
                        x_packed.data() + off * RL);
          });
        });
        accumulate(cfg, rows, Mg, layout.steps, x_packed.data(), RL,
                   w_packed.data() + g * Mg * RL, RL, acc.data(), Mg, 1, stats_ptr, par.get());
        par.for_ranges(Mg, grain_for(Mg, 4), [&](int64_t m0, int64_t m1) {
          for (int64_t m = m0; m < m1; ++m) {
            const int64_t oc = g * Mg + m;
            const float s = scale[oc];
            const float bm = bias != nullptr ? bias[oc] : 0.0f;
            for_image_pieces(c0, c0 + rows, c0, [&](int64_t n, int64_t p, int64_t count, int64_t off) {
              float* yr = y + (n * M + oc) * P + p;
              const int32_t* ar = acc.data() + off * Mg + m;
              if (bias != nullptr) {
                for (int64_t r = 0; r < count; ++r) {
                  const float v = s * static_cast<float>(ar[r * Mg]);
                  yr[r] = v + bm;
                }
              } else {
                for (int64_t r = 0; r < count; ++r) yr[r] = s * static_cast<float>(ar[r * Mg]);
              }
            });
          }
        });
      }
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
    auto k = std::make_unique<ConvKernel>();
    k->api = api;
    k->label = node_label(api, info, kOpType);
    k->attrs = read_conv_attributes(KernelInfoAttrs(api, info, k->label), k->label);
    *kernel = k.release();
    return nullptr;
  } catch (...) {
    return status_from_current_exception(api, kOpType);
  }
}

OrtStatusPtr ORT_API_CALL compute_kernel(void* kernel, OrtKernelContext* ctx) {
  const auto* k = static_cast<const ConvKernel*>(kernel);
  try {
    k->compute(ctx);
    return nullptr;
  } catch (...) {
    return status_from_current_exception(k->api, kOpType);
  }
}

void ORT_API_CALL destroy_kernel(void* kernel) { delete static_cast<ConvKernel*>(kernel); }

std::string conv_dim_symbol(AutoPad auto_pad, const std::string& in, int64_t k, int64_t s,
                            int64_t d, int64_t pb, int64_t pe) {
  const std::string dk = std::to_string((k - 1) * d + 1);
  const std::string st = std::to_string(s);
  switch (auto_pad) {
    case AutoPad::kSameUpper:
    case AutoPad::kSameLower:
      return s == 1 ? in : "ceil((" + in + ")/" + st + ")";
    case AutoPad::kValid:
      return "floor(((" + in + ")-" + dk + ")/" + st + ")+1";
    case AutoPad::kNotSet:
      if (s == 1 && pb + pe == (k - 1) * d) return in;  // "same" padding by hand
      break;
  }
  return "floor(((" + in + ")+" + std::to_string(pb + pe) + "-" + dk + ")/" + st + ")+1";
}

// Y = [N, M, out...] when the shapes allow; otherwise nothing is set (ORT keeps the
// type). Errors are reported at kernel creation / compute, not here: ORT ignores
// the status returned by shape inference.
OrtStatusPtr ORT_API_CALL infer_shape(const OrtCustomOp* op, OrtShapeInferContext* ctx) {
  const OrtApi* api = static_cast<const NbSmtCustomOp*>(op)->api;
  if (api == nullptr) return nullptr;
  try {
    std::vector<InferDim> xd, wd;
    ONNXTensorElementDataType xt{}, wt{};
    if (!infer_input_dims(api, ctx, kX, &xd, &xt)) return nullptr;
    const size_t rank = xd.size();
    if (rank < 3 || rank > 5) return nullptr;
    const bool have_w = infer_input_dims(api, ctx, kWq, &wd, &wt) && wd.size() == rank;
    const ConvAttributes attrs = read_conv_attributes(ShapeInferAttrs(api, ctx), kOpType);
    const ConvParams p = conv_params_for_rank(attrs, rank - 2, kOpType);

    std::vector<InferDim> yd(rank);
    yd[0] = xd[0];
    if (have_w) yd[1] = wd[0];
    for (size_t i = 0; i < rank - 2; ++i) {
      int64_t k = -1;
      if (!attrs.kernel_shape.empty()) {
        k = attrs.kernel_shape[i];
      } else if (have_w && wd[2 + i].known()) {
        k = wd[2 + i].value;
      }
      if (k < 0) continue;  // stays unknown
      const int64_t s = p.strides[i], dl = p.dilations[i];
      const int64_t pb = p.pads[i], pe = p.pads[i + rank - 2];
      if (xd[2 + i].known()) {
        yd[2 + i].value = conv_output_dim(attrs.auto_pad, xd[2 + i].value, k, s, dl, pb, pe).out;
      } else if (!xd[2 + i].symbol.empty()) {
        // A name that spells out the formula: equal names really are equal sizes.
        yd[2 + i].symbol = conv_dim_symbol(attrs.auto_pad, xd[2 + i].symbol, k, s, dl, pb, pe);
      }
    }
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

NbSmtCustomOp* conv_custom_op() {
  static NbSmtCustomOp op = [] {
    NbSmtCustomOp o;
    init_custom_op(&o, &kDescription);
    return o;
  }();
  return &op;
}

}  // namespace nbsmt::ort
