// NbSmtConv (SPEC.md §3.1): ONNX Conv semantics with NB-SMT integer arithmetic.
//
// Weights are packed (pack.h) and prepared for the kernels per group, once for
// as long as Wq's bytes stay the same (the kernel object keeps them). Images are
// quantized once (pixel-major, a bounded chunk of images at a time); the kernel
// tasks im2col the packed rows they need on demand (RowSource) and accumulate
// them against the prepared weights; the result is scaled to float
// by the kernels' tile writer (FloatOutput, kernels.h; direct_conv.h and
// pointwise.h, the paths that skip the GEMM, likewise):
//   Y[n, m, p] = float32(x_scale * w_scale[m]) * float32(acc) (+ B[m])
// each operation rounded to float32 (the build forbids FMA contraction).
#include <algorithm>
#include <memory>

#include "attributes.h"
#include "nbsmt/direct_conv.h"
#include "nbsmt/kernels.h"
#include "nbsmt/pack.h"
#include "nbsmt/pointwise.h"
#include "op_common.h"
#include "op_kernel.h"
#include "parallel.h"
#include "weight_cache.h"

namespace nbsmt::ort {

namespace {

// Bound of the per-chunk buffers (quantized images and accumulators, bytes): keeps
// the memory independent of the batch size (a chunk holds at least one image).
constexpr int64_t kChunkBudgetBytes = int64_t{16} << 20;

// Input indices read by shape inference (SPEC order; Compute reads all via get_op_inputs).
enum ConvInput : size_t { kX = 0, kWq = 1 };

// Packed rows of one group made on demand by im2col from the quantized images of
// a chunk; row r of the chunk is output position r % P of its image r / P.
struct Im2ColSource {
  const Im2Col* plan;
  const int16_t* xq;  // the chunk's images, image_entries each
  int64_t image_entries, P, group;

  static void fill(void* ctx, int64_t r0, int64_t r1, int16_t* out) {
    const auto& s = *static_cast<const Im2ColSource*>(ctx);
    for (int64_t r = r0; r < r1;) {
      const int64_t img = r / s.P, p = r % s.P;
      const int64_t count = std::min(r1 - r, s.P - p);
      im2col_rows(*s.plan, s.xq + img * s.image_entries, s.group, p, p + count,
                  out + (r - r0) * s.plan->row_length);
      r += count;
    }
  }
  // im2col writes every slot when each kernel position is one contiguous run and
  // the runs tile the row (Im2Col::contiguous, group_width * KS == row_length).
  RowSource row_source() {
    const int64_t KS = plan->geo.kernel_size(), gw = plan->group_width;
    bool every = plan->contiguous && gw * KS == plan->row_length;
    for (int64_t kpos = 0; every && kpos < KS; ++kpos) {
      every = plan->dest_by_kpos[kpos * gw] == kpos * gw;
    }
    return RowSource{this, fill, every};
  }
};

// The same rows as runs read in place (RunSource, kernels.h): run k of row r is
// group g's entries of the input pixel under kernel position k, or a zero run
// where that position is in the padding.
struct Im2ColRuns {
  const Im2Col* plan;
  const int16_t* xq;    // the chunk's images, image_entries each
  const int16_t* zero;  // run_length zeros (and zeros at + term1_offset)
  int64_t image_entries, P, group;
  // T = 4: entry records, one per (image, pixel, group) of the chunk in xq's
  // order (record_ints each), then the zero run's.
  const int32_t* records = nullptr;
  const int32_t* zero_record = nullptr;
  int64_t record_ints = 0;

  static void fill(void* ctx, int64_t r0, int64_t r1, const int16_t** out) {
    const auto& s = *static_cast<const Im2ColRuns*>(ctx);
    const int64_t gw = s.plan->group_width;
    s.visit(r0, r1, s.xq + s.group * gw, s.plan->pixel_stride, s.image_entries, s.zero, out);
  }
  static void fill_records(void* ctx, int64_t r0, int64_t r1, const int32_t** out) {
    const auto& s = *static_cast<const Im2ColRuns*>(ctx);
    const int64_t gw = s.plan->group_width, groups = s.plan->pixel_stride / gw;
    const int64_t R = s.record_ints;
    s.visit(r0, r1, s.records + s.group * R, groups * R, s.image_entries / gw * R, s.zero_record,
            out);
  }

  // out[(r - r0) * KS + kpos] = first + img * image_step + pixel * pixel_step for the
  // input pixel under kernel position kpos of row r, or `pad` in the padding.
  template <class T>
  void visit(int64_t r0, int64_t r1, const T* first, int64_t pixel_step, int64_t image_step,
             const T* pad, const T** out) const {
    const Im2ColRuns& s = *this;
    const ConvGeometry& geo = s.plan->geo;
    const int64_t ps = pixel_step;
    const int64_t KS = geo.kernel_size();
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t img = r / s.P, p = r % s.P;
      const int64_t o2 = p % geo.out[2], o1 = (p / geo.out[2]) % geo.out[1];
      const int64_t o0 = p / (geo.out[2] * geo.out[1]);
      const T* base = first + img * image_step;
      const T** dst = out + (r - r0) * KS;
      int64_t kpos = 0;
      for (int64_t k0 = 0; k0 < geo.kernel[0]; ++k0) {
        const int64_t i0 = o0 * geo.stride[0] - geo.pad_begin[0] + k0 * geo.dilation[0];
        const bool v0 = i0 >= 0 && i0 < geo.in[0];
        for (int64_t k1 = 0; k1 < geo.kernel[1]; ++k1) {
          const int64_t i1 = o1 * geo.stride[1] - geo.pad_begin[1] + k1 * geo.dilation[1];
          const bool v1 = v0 && i1 >= 0 && i1 < geo.in[1];
          for (int64_t k2 = 0; k2 < geo.kernel[2]; ++k2, ++kpos) {
            const int64_t i2 = o2 * geo.stride[2] - geo.pad_begin[2] + k2 * geo.dilation[2];
            const bool valid = v1 && i2 >= 0 && i2 < geo.in[2];
            dst[kpos] = valid ? base + ((i0 * geo.in[1] + i1) * geo.in[2] + i2) * ps : pad;
          }
        }
      }
    }
  }
};

struct ConvKernel {
  static constexpr const char* kOpType = "NbSmtConv";
  ConvKernel(const OrtApi* api_, const OrtKernelInfo* info)
      : api(api_),
        label(node_label(api, info, kOpType)),
        attrs(read_conv_attributes(KernelInfoAttrs(api, info, label), label)),
        weights(is_constant_input(api, info, kWq)) {}
  void compute(OrtKernelContext* ctx) const;
  // Output shapes for ORT (InferOutputShapeFn), best effort.
  static OrtStatusPtr ORT_API_CALL infer_shape(const OrtCustomOp* op, OrtShapeInferContext* ctx);

  const OrtApi* api;
  const std::string label;
  const ConvAttributes attrs;
  mutable PreparedWeightsCache weights;  // thread-safe; see weight_cache.h
};

void ConvKernel::compute(OrtKernelContext* ctx) const {
  const OpInputs in = get_op_inputs(api, ctx, {"X", "Wq", "x_scale", "w_scale", "B"}, label);
  const Tensor &x = in.act, &w = in.weights, &xs = in.act_scale, &ws = in.channel_scale;
  const Tensor& b = in.bias;

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
  expect_length(ws, M, "w_scale", "one scale per output channel of Wq " + shape_str(w.dims),
                label);
  if (b.present()) {
    expect_length(b, M, "B", "one bias per output channel of Wq " + shape_str(w.dims), label);
  }
  const int64_t KS = geo.kernel_size();
  const int64_t K = Cg * KS;
  expect_reduction_length(K, "C/group * kernel size", label);

  // ---- outputs
  std::vector<int64_t> y_dims = {N, M};
  for (size_t i = 3 - (rank - 2); i < 3; ++i) y_dims.push_back(geo.out[i]);
  void* y_data = nullptr;
  if (!get_output(api, ctx, 0, y_dims, &y_data)) throw OpError(label + ": output Y is missing");
  float* y = static_cast<float*>(y_data);
  StatsOutput stats(api, ctx);
  const int64_t P = geo.out_size();
  const int64_t in_size = geo.in_size();
  const int64_t Mg = M / group;
  if (N > 0 && P > 0 && M > 0) {
    const SmtConfig& cfg = attrs.smt.config;
    const PackLayout layout = make_conv_layout(attrs.smt.mapping, cfg.threads, Cg, KS);
    const Im2Col plan = make_im2col(geo, layout, Cg, group);

    const OrtParallel par(api, ctx);
    // Depthwise and narrow grouped convs run through the direct kernel
    // (direct_conv.h) unless the node asks for statistics (the GEMM path counts them).
    const bool direct = stats.counters() == nullptr && direct_conv_preferred(group, Cg, Mg, KS);
    // 1x1 convolutions with stride 1 and no padding run on NCHW directly (pointwise.h)
    // where that kernel is preferred, unless the node asks for statistics.
    bool pointwise = stats.counters() == nullptr && group == 1 && KS == 1 && in_size == P &&
                     pointwise_conv_preferred(cfg);
    for (int d = 0; d < 3; ++d) pointwise &= geo.pad_begin[d] == 0 && geo.stride[d] == 1;
    // The layout depends only on Wq's shape and the attributes: the cache is keyed by Wq.
    // The path is chosen when the weights are prepared (from the shapes, the outputs,
    // the kernel ISA and, for the direct kernel, the weights) and recorded in the set.
    const std::shared_ptr<const PreparedSet> prepared = weights.get(w, [&](PreparedSet& set) {
      const auto* wq = static_cast<const int8_t*>(w.data);
      if (pointwise) {
        set.pointwise = prepare_pointwise_conv(cfg, layout, wq, M);
        if (set.pointwise == nullptr) {
          throw OpError(label + ": Wq contains -128; quantized weights must be in [-127, 127]");
        }
        return;
      }
      if (direct) {
        set.direct = prepare_direct_conv(cfg, layout, wq, M, group, Cg);
        if (set.direct == nullptr) {
          throw OpError(label + ": Wq contains -128; quantized weights must be in [-127, 127]");
        }
        // A wide group whose steps can collide: the direct kernel resolves collisions
        // per output position, the GEMM kernels with full 16-channel vectors do better.
        if (Mg < 16 || !direct_conv_has_collision_steps(*set.direct)) return;
        set.direct = nullptr;
      }
      set.groups = prepare_weight_groups(cfg, layout, w, "Wq", M, K, 1, group, label, par.get());
    });
    const float* w_scale = static_cast<const float*>(ws.data);
    const float* bias = b.present() ? static_cast<const float*>(b.data) : nullptr;
    std::vector<float> scale(static_cast<size_t>(M));
    for (int64_t m = 0; m < M; ++m) scale[m] = x_scale * w_scale[m];
    const float* xdata = static_cast<const float*>(x.data);
    // The path is the one the cached weights were prepared for (every path gives
    // the same results; the kernel ISA, which the choice also depends on, can change).
    if (prepared->pointwise != nullptr) {
      pointwise_conv(*prepared->pointwise, N, P, xdata, x_scale, scale.data(), bias, y, par.get());
      stats.write();
      return;
    }
    if (prepared->direct != nullptr || prepared->groups.empty()) {
      if (prepared->direct == nullptr) throw OpError(label + ": internal error: no prepared weights");
      direct_conv(*prepared->direct, geo, N, xdata, x_scale, scale.data(), bias, y, par.get());
      stats.write();
      return;
    }

    // Rows are (image, output position) pairs, processed in chunks of whole
    // images; a chunk may hold several small images (late layers) so that the
    // kernels see large matrices. Only the chunk's images are quantized (xq,
    // pixel-major); their packed rows are made by im2col inside the kernel tasks
    // (RowSource), a few rows at a time, and never stored for the whole chunk.
    const int64_t image_entries = static_cast<int64_t>(plan.image_entries());
    // Rows as runs read in place (no im2col) where the kernels can: each kernel
    // position is one contiguous run of a pixel's group entries.
    const int64_t gw = plan.group_width;
    bool as_runs = stats.counters() == nullptr && plan.contiguous && gw * KS == plan.row_length;
    for (int64_t kpos = 0; as_runs && kpos < KS; ++kpos) {
      as_runs = plan.dest_by_kpos[kpos * gw] == kpos * gw;
    }
    // T = 1 / 2: runs read in place; T = 4: runs with entry records made once
    // per (pixel, group) and shared by the rows that read them.
    // (KS > 1: a 1x1 conv reads each pixel in one row only.)
    const bool gather_runs = as_runs && KS > 1 && reads_gather_runs(*prepared->groups[0], gw);
    const bool runs_ok = gather_runs || (as_runs && reads_runs(*prepared->groups[0], gw));
    const bool two_terms = runs_ok && !gather_runs && cfg.threads == 2;
    // The chunk's quantized images and their entry records (T = 4) stay within the budget.
    const int64_t rec_ints = gather_runs ? gather_record_ints(gw) : 0;
    const int64_t image_bytes = image_entries * static_cast<int64_t>(sizeof(int16_t)) +
                                image_entries / gw * rec_ints * static_cast<int64_t>(sizeof(int32_t));
    const int64_t chunk_images = std::clamp<int64_t>(kChunkBudgetBytes / image_bytes, 1, N);
    // Buffer: the quantized images (E entries), a zero run; with T = 2 the same
    // again for the correction operands (RunSource::term1_offset = E + Z).
    const int64_t E = chunk_images * image_entries, Z = runs_ok ? gw : 0;
    const int64_t term1_offset = two_terms ? E + Z : 0;
    const size_t xq_entries = static_cast<size_t>((E + Z) * (two_terms ? 2 : 1));
    const std::unique_ptr<int16_t[]> xq_buffer(new int16_t[xq_entries]);
    int16_t* const xq = xq_buffer.get();
    // Entries that hold no channel are never written: zero them once, if there are any.
    if (plan.pixel_stride > C) std::fill(xq, xq + E, int16_t{0});
    std::fill(xq + E, xq + E + Z, int16_t{0});
    if (two_terms) std::fill(xq + term1_offset + E, xq + term1_offset + E + Z, int16_t{0});
    const bool act_signed = cfg.act_signed;
    // Entry records of the runs (T = 4): one per (image, pixel, group) of the chunk,
    // then the zero run's (empty).
    const std::unique_ptr<int32_t[]> records(
        gather_runs ? new int32_t[static_cast<size_t>((E / gw + 1) * rec_ints)] : nullptr);
    if (gather_runs) gather_run_entries(*prepared->groups[0], xq + E, gw, records.get() + (E / gw) * rec_ints);
    // A 1x1 conv with stride 1 and no padding whose pixel entries are exactly the
    // packed row (group = 1): the quantized image's pixels are the rows, no im2col.
    bool pixels_are_rows = group == 1 && KS == 1 && in_size == P &&
                           plan.pixel_stride == plan.row_length && plan.contiguous &&
                           plan.dest_by_kpos[0] == 0;
    for (int d = 0; d < 3; ++d) pixels_are_rows &= geo.pad_begin[d] == 0 && geo.stride[d] == 1;
    for (int64_t n0 = 0; n0 < N; n0 += chunk_images) {
      const int64_t images = std::min(chunk_images, N - n0);
      const int64_t rows = images * P;
      par.for_ranges(images * in_size, grain_for(images * in_size, 256),
                     [&](int64_t a, int64_t b) {
                       for (int64_t i = a; i < b;) {
                         const int64_t img = i / in_size, s0 = i % in_size;
                         const int64_t s1 = std::min(in_size, s0 + (b - i));
                         int16_t* xi = xq + img * image_entries;
                         quantize_image(plan, xdata + (n0 + img) * C * in_size, s0, s1,
                                        x_scale, act_signed, xi);
                         if (two_terms) {
                           const int64_t ps = plan.pixel_stride;
                           correction_operands(cfg, xi + s0 * ps, (s1 - s0) * ps,
                                               xi + term1_offset + s0 * ps);
                         }
                         i += s1 - s0;
                       }
                     });
      if (gather_runs) {
        par.for_ranges(images * in_size, grain_for(images * in_size, 64), [&](int64_t a, int64_t b) {
          for (int64_t i = a; i < b; ++i) {  // pixel i % in_size of image i / in_size
            const int16_t* px = xq + (i / in_size) * image_entries + (i % in_size) * plan.pixel_stride;
            for (int64_t g = 0; g < group; ++g) {
              const int16_t* run = px + g * gw;
              gather_run_entries(*prepared->groups[g], run, gw,
                                 records.get() + ((run - xq) / gw) * rec_ints);
            }
          }
        });
      }
      for (int64_t g = 0; g < group; ++g) {
        // Outputs scaled and written by the kernels' tile writer: row r is output
        // position r % P of image r / P; column m is output channel g * Mg + m.
        FloatOutput out;
        out.y = y + (n0 * M + g * Mg) * P;
        out.scale = scale.data() + g * Mg;
        out.bias = bias != nullptr ? bias + g * Mg : nullptr;
        out.rows_per_image = P;
        out.image_stride = M * P;
        out.row_stride = 1;
        out.col_stride = P;
        if (pixels_are_rows && !runs_ok) {
          accumulate_prepared(*prepared->groups[g], rows, xq, plan.pixel_stride, out,
                              stats.counters(), par.get());
          continue;
        }
        Im2ColSource source{&plan, xq, image_entries, P, g};
        if (runs_ok) {
          Im2ColRuns runs{&plan, xq, xq + E, image_entries, P, g};
          RunSource run_source{&runs, Im2ColRuns::fill, KS, gw, term1_offset};
          if (gather_runs) {
            runs.records = records.get();
            runs.zero_record = records.get() + (E / gw) * rec_ints;
            runs.record_ints = rec_ints;
            run_source.fill_records = Im2ColRuns::fill_records;
          }
          accumulate_prepared(*prepared->groups[g], rows, source.row_source(), run_source, out,
                              stats.counters(), par.get());
          continue;
        }
        accumulate_prepared(*prepared->groups[g], rows, source.row_source(), out,
                            stats.counters(), par.get());
      }
    }
  }
  stats.write();
}

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
OrtStatusPtr ORT_API_CALL ConvKernel::infer_shape(const OrtCustomOp* op,
                                                    OrtShapeInferContext* ctx) {
  const OrtApi* api = static_cast<const NbSmtCustomOp*>(op)->api;
  if (api == nullptr) return nullptr;
  try {
    std::vector<InferDim> xd, wd;
    ONNXTensorElementDataType xt{}, wt{};
    if (!infer_input_dims(api, ctx, kX, &xd, &xt)) return nullptr;
    const size_t rank = xd.size();
    if (rank < 3 || rank > 5) return nullptr;
    const bool have_w = infer_input_dims(api, ctx, kWq, &wd, &wt) && wd.size() == rank;
    const ConvAttributes attrs =
        read_conv_attributes(ShapeInferAttrs(api, ctx), ConvKernel::kOpType);
    const ConvParams p = conv_params_for_rank(attrs, rank - 2, ConvKernel::kOpType);

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

}  // namespace

NbSmtCustomOp* conv_custom_op() { return nbsmt_custom_op<ConvKernel>(); }

}  // namespace nbsmt::ort
