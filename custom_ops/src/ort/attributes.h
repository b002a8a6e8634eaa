// Node attributes of NbSmtConv / NbSmtMatMul: reading, defaults, validation.
//
// Attributes are read once, when ONNX Runtime creates the kernel (from an
// OrtKernelInfo), and again by shape inference (from an OrtShapeInferContext);
// both go through AttrSource so the defaults and checks are the same.
// Defaults and choices mirror nbsmt_onnx/ops/schema.py.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "nbsmt/kernels.h"
#include "nbsmt/pack.h"
#include "ort_api.h"

namespace nbsmt::ort {

// Where attributes come from. Every getter returns false if the attribute is
// absent and throws OpError if it is present with another type.
class AttrSource {
 public:
  virtual ~AttrSource() = default;
  virtual bool get_int(const char* name, int64_t* out) const = 0;
  virtual bool get_string(const char* name, std::string* out) const = 0;
  virtual bool get_ints(const char* name, std::vector<int64_t>* out) const = 0;
};

class KernelInfoAttrs final : public AttrSource {
 public:
  KernelInfoAttrs(const OrtApi* api, const OrtKernelInfo* info, std::string label)
      : api_(api), info_(info), label_(std::move(label)) {}
  bool get_int(const char* name, int64_t* out) const override;
  bool get_string(const char* name, std::string* out) const override;
  bool get_ints(const char* name, std::vector<int64_t>* out) const override;

 private:
  // Present under some other type? (called after the expected getter failed)
  bool present_with_other_type(const char* name) const;
  [[noreturn]] void wrong_type(const char* name, const char* expected) const;
  const OrtApi* api_;
  const OrtKernelInfo* info_;
  std::string label_;
};

class ShapeInferAttrs final : public AttrSource {
 public:
  ShapeInferAttrs(const OrtApi* api, OrtShapeInferContext* ctx) : api_(api), ctx_(ctx) {}
  bool get_int(const char* name, int64_t* out) const override;
  bool get_string(const char* name, std::string* out) const override;
  bool get_ints(const char* name, std::vector<int64_t>* out) const override;

 private:
  const OrtOpAttr* find(const char* name) const;
  const OrtApi* api_;
  OrtShapeInferContext* ctx_;
};

// The four NB-SMT attributes shared by both ops (SPEC.md §3.1).
struct SmtAttributes {
  SmtConfig config;  // threads, reduce, act_signed
  Mapping mapping = Mapping::kChannel;
};
SmtAttributes read_smt_attributes(const AttrSource& src, const std::string& label);

enum class AutoPad { kNotSet, kSameUpper, kSameLower, kValid };

// ONNX Conv attributes (empty vector = absent: ONNX default applies).
struct ConvAttributes {
  AutoPad auto_pad = AutoPad::kNotSet;
  int64_t group = 1;
  std::vector<int64_t> dilations, kernel_shape, pads, strides;
  SmtAttributes smt;
};
ConvAttributes read_conv_attributes(const AttrSource& src, const std::string& label);

// Output size of one spatial dimension under ONNX Conv rules and the padding at
// its beginning. `in` < 0 means unknown (then *out = -1). Throws OpError if the
// (dilated) kernel does not fit into the padded input.
struct ConvDim {
  int64_t out = -1;
  int64_t pad_begin = 0;
};
ConvDim conv_output_dim(AutoPad auto_pad, int64_t in, int64_t kernel, int64_t stride,
                        int64_t dilation, int64_t pad_begin, int64_t pad_end);

// Checks the attribute vectors against the spatial rank and the weight's kernel
// dims and resolves the full geometry. x_spatial / kernel have `rank` entries.
ConvGeometry resolve_conv_geometry(const ConvAttributes& attrs,
                                   const std::vector<int64_t>& x_spatial,
                                   const std::vector<int64_t>& kernel, const std::string& label);

// The attribute vectors with ONNX defaults filled in for `rank` spatial dims;
// throws OpError naming the attribute if a length does not match.
struct ConvParams {
  std::vector<int64_t> strides, dilations, pads;  // pads: begin..., end...
};
ConvParams conv_params_for_rank(const ConvAttributes& attrs, size_t rank,
                                const std::string& label);

}  // namespace nbsmt::ort
