#include "attributes.h"

#include <algorithm>

namespace nbsmt::ort {

namespace {

void release(const OrtApi* api, OrtStatus* st) {
  if (st != nullptr) api->ReleaseStatus(st);
}

std::string join(const std::vector<int64_t>& v) { return shape_str(v); }

}  // namespace

// ---------------------------------------------------------------- KernelInfoAttrs

bool KernelInfoAttrs::present_with_other_type(const char* name) const {
  int64_t i = 0;
  float f = 0;
  size_t size = 0;
  OrtStatus* st = api_->KernelInfoGetAttribute_int64(info_, name, &i);
  if (st == nullptr) return true;
  release(api_, st);
  st = api_->KernelInfoGetAttribute_float(info_, name, &f);
  if (st == nullptr) return true;
  release(api_, st);
  st = api_->KernelInfoGetAttribute_string(info_, name, nullptr, &size);
  if (st == nullptr) return true;
  release(api_, st);
  st = api_->KernelInfoGetAttributeArray_int64(info_, name, nullptr, &size);
  if (st == nullptr) return true;
  release(api_, st);
  st = api_->KernelInfoGetAttributeArray_float(info_, name, nullptr, &size);
  if (st == nullptr) return true;
  release(api_, st);
  return false;
}

void KernelInfoAttrs::wrong_type(const char* name, const char* expected) const {
  throw OpError(label_ + ": attribute '" + name + "' must be " + expected);
}

bool KernelInfoAttrs::get_int(const char* name, int64_t* out) const {
  OrtStatus* st = api_->KernelInfoGetAttribute_int64(info_, name, out);
  if (st == nullptr) return true;
  release(api_, st);
  if (present_with_other_type(name)) wrong_type(name, "an int");
  return false;
}

bool KernelInfoAttrs::get_string(const char* name, std::string* out) const {
  size_t size = 0;
  OrtStatus* st = api_->KernelInfoGetAttribute_string(info_, name, nullptr, &size);
  if (st != nullptr) {
    release(api_, st);
    if (present_with_other_type(name)) wrong_type(name, "a string");
    return false;
  }
  std::vector<char> buf(size + 1, '\0');
  throw_if_error(api_, api_->KernelInfoGetAttribute_string(info_, name, buf.data(), &size),
                 label_ + ": reading attribute '" + name + "'");
  out->assign(buf.data());
  return true;
}

bool KernelInfoAttrs::get_ints(const char* name, std::vector<int64_t>* out) const {
  size_t size = 0;
  OrtStatus* st = api_->KernelInfoGetAttributeArray_int64(info_, name, nullptr, &size);
  if (st != nullptr) {
    release(api_, st);
    if (present_with_other_type(name)) wrong_type(name, "a list of ints");
    return false;
  }
  out->assign(size, 0);
  if (size > 0) {
    throw_if_error(api_, api_->KernelInfoGetAttributeArray_int64(info_, name, out->data(), &size),
                   label_ + ": reading attribute '" + name + "'");
    out->resize(size);
  }
  return true;
}

// ---------------------------------------------------------------- ShapeInferAttrs
// ReadOpAttr cannot always tell a wrong type from an empty value; shape inference
// is best effort anyway (kernel creation reports attribute errors precisely).

const OrtOpAttr* ShapeInferAttrs::find(const char* name) const {
  const OrtOpAttr* attr = nullptr;
  OrtStatus* st = api_->ShapeInferContext_GetAttribute(ctx_, name, &attr);
  if (st != nullptr) {
    release(api_, st);
    return nullptr;
  }
  return attr;
}

bool ShapeInferAttrs::get_int(const char* name, int64_t* out) const {
  const OrtOpAttr* attr = find(name);
  if (attr == nullptr) return false;
  size_t written = 0;
  throw_if_error(api_, api_->ReadOpAttr(attr, ORT_OP_ATTR_INT, out, sizeof(*out), &written), name);
  return true;
}

bool ShapeInferAttrs::get_string(const char* name, std::string* out) const {
  const OrtOpAttr* attr = find(name);
  if (attr == nullptr) return false;
  std::vector<char> buf(64, '\0');
  size_t needed = 0;
  OrtStatus* st = api_->ReadOpAttr(attr, ORT_OP_ATTR_STRING, buf.data(), buf.size(), &needed);
  if (st != nullptr && needed > buf.size()) {
    release(api_, st);
    buf.assign(needed, '\0');
    st = api_->ReadOpAttr(attr, ORT_OP_ATTR_STRING, buf.data(), buf.size(), &needed);
  }
  throw_if_error(api_, st, name);
  out->assign(buf.data());
  return true;
}

bool ShapeInferAttrs::get_ints(const char* name, std::vector<int64_t>* out) const {
  const OrtOpAttr* attr = find(name);
  if (attr == nullptr) return false;
  std::vector<int64_t> buf(16, 0);
  size_t bytes = 0;
  OrtStatus* st =
      api_->ReadOpAttr(attr, ORT_OP_ATTR_INTS, buf.data(), buf.size() * sizeof(int64_t), &bytes);
  if (st != nullptr && bytes > buf.size() * sizeof(int64_t)) {
    release(api_, st);
    buf.assign(bytes / sizeof(int64_t), 0);
    st = api_->ReadOpAttr(attr, ORT_OP_ATTR_INTS, buf.data(), buf.size() * sizeof(int64_t), &bytes);
  }
  throw_if_error(api_, st, name);
  buf.resize(bytes / sizeof(int64_t));
  *out = std::move(buf);
  return true;
}

// ---------------------------------------------------------------- parsing

SmtAttributes read_smt_attributes(const AttrSource& src, const std::string& label) {
  SmtAttributes a;
  int64_t threads = 2;
  src.get_int("threads", &threads);
  if (threads != 1 && threads != 2 && threads != 4) {
    throw OpError(label + ": attribute threads=" + std::to_string(threads) +
                  " is invalid; expected one of 1, 2, 4");
  }
  a.config.threads = static_cast<int>(threads);

  std::string mapping = "channel";
  src.get_string("mapping", &mapping);
  if (mapping == "channel") {
    a.mapping = Mapping::kChannel;
  } else if (mapping == "interleave") {
    a.mapping = Mapping::kInterleave;
  } else {
    throw OpError(label + ": attribute mapping='" + mapping +
                  "' is invalid; expected 'channel' or 'interleave'");
  }

  std::string reduce = "activations";
  src.get_string("reduce", &reduce);
  if (reduce == "activations") {
    a.config.reduce = Reduce::kActivations;
  } else if (reduce == "weights") {
    a.config.reduce = Reduce::kWeights;
  } else {
    throw OpError(label + ": attribute reduce='" + reduce +
                  "' is invalid; expected 'activations' or 'weights'");
  }

  int64_t act_signed = 0;
  src.get_int("act_signed", &act_signed);
  if (act_signed != 0 && act_signed != 1) {
    throw OpError(label + ": attribute act_signed=" + std::to_string(act_signed) +
                  " is invalid; expected 0 or 1");
  }
  a.config.act_signed = act_signed == 1;
  return a;
}

ConvAttributes read_conv_attributes(const AttrSource& src, const std::string& label) {
  ConvAttributes a;
  std::string auto_pad = "NOTSET";
  src.get_string("auto_pad", &auto_pad);
  if (auto_pad == "NOTSET") {
    a.auto_pad = AutoPad::kNotSet;
  } else if (auto_pad == "SAME_UPPER") {
    a.auto_pad = AutoPad::kSameUpper;
  } else if (auto_pad == "SAME_LOWER") {
    a.auto_pad = AutoPad::kSameLower;
  } else if (auto_pad == "VALID") {
    a.auto_pad = AutoPad::kValid;
  } else {
    throw OpError(label + ": attribute auto_pad='" + auto_pad +
                  "' is invalid; expected NOTSET, SAME_UPPER, SAME_LOWER or VALID");
  }

  src.get_int("group", &a.group);
  if (a.group < 1) {
    throw OpError(label + ": attribute group=" + std::to_string(a.group) + " must be >= 1");
  }

  auto read_list = [&](const char* name, std::vector<int64_t>* out, int64_t min_value) {
    src.get_ints(name, out);
    for (int64_t v : *out) {
      if (v < min_value) {
        throw OpError(label + ": attribute " + name + "=" + join(*out) + " is invalid; every entry must be >= " +
                      std::to_string(min_value));
      }
    }
    if (out->size() > (std::string(name) == "pads" ? 6u : 3u)) {
      throw OpError(label + ": attribute " + name + "=" + join(*out) +
                    " has too many entries (NbSmtConv supports 1-D, 2-D and 3-D)");
    }
  };
  read_list("dilations", &a.dilations, 1);
  read_list("kernel_shape", &a.kernel_shape, 1);
  read_list("pads", &a.pads, 0);
  read_list("strides", &a.strides, 1);
  if (a.pads.size() % 2 != 0) {
    throw OpError(label + ": attribute pads=" + join(a.pads) +
                  " must have an even number of entries (begin..., end...)");
  }
  a.smt = read_smt_attributes(src, label);
  return a;
}

// ---------------------------------------------------------------- geometry

ConvDim conv_output_dim(AutoPad auto_pad, int64_t in, int64_t kernel, int64_t stride,
                        int64_t dilation, int64_t pad_begin, int64_t pad_end) {
  ConvDim d;
  const int64_t dk = (kernel - 1) * dilation + 1;  // dilated kernel extent
  switch (auto_pad) {
    case AutoPad::kNotSet:
      d.pad_begin = pad_begin;
      if (in < 0) return d;
      if (in + pad_begin + pad_end < dk) {
        throw OpError("the dilated kernel (" + std::to_string(dk) +
                      ") is larger than the padded input (" +
                      std::to_string(in + pad_begin + pad_end) + ")");
      }
      d.out = (in + pad_begin + pad_end - dk) / stride + 1;
      return d;
    case AutoPad::kValid:
      d.pad_begin = 0;
      if (in < 0) return d;
      if (in < dk) {
        throw OpError("the dilated kernel (" + std::to_string(dk) +
                      ") is larger than the input (" + std::to_string(in) + ") with auto_pad=VALID");
      }
      d.out = (in - dk) / stride + 1;
      return d;
    case AutoPad::kSameUpper:
    case AutoPad::kSameLower: {
      if (in < 0) return d;
      // ONNX: output = ceil(in / stride); the total padding, clamped at 0, is split
      // evenly, the odd one going to the end (SAME_UPPER) or the beginning (SAME_LOWER).
      d.out = (in + stride - 1) / stride;
      const int64_t total = std::max<int64_t>(0, (d.out - 1) * stride + dk - in);
      d.pad_begin = auto_pad == AutoPad::kSameUpper ? total / 2 : (total + 1) / 2;
      return d;
    }
  }
  return d;
}

ConvParams conv_params_for_rank(const ConvAttributes& attrs, size_t rank,
                                const std::string& label) {
  ConvParams p;
  auto fill = [&](const char* name, const std::vector<int64_t>& given, size_t n, int64_t def,
                  std::vector<int64_t>* out) {
    if (given.empty()) {
      out->assign(n, def);
    } else if (given.size() != n) {
      throw OpError(label + ": attribute " + name + "=" + join(given) + " has " +
                    std::to_string(given.size()) + " entries but the input has " +
                    std::to_string(rank) + " spatial dimensions (expected " +
                    std::to_string(n) + ")");
    } else {
      *out = given;
    }
  };
  fill("strides", attrs.strides, rank, 1, &p.strides);
  fill("dilations", attrs.dilations, rank, 1, &p.dilations);
  fill("pads", attrs.pads, 2 * rank, 0, &p.pads);
  if (!attrs.kernel_shape.empty() && attrs.kernel_shape.size() != rank) {
    throw OpError(label + ": attribute kernel_shape=" + join(attrs.kernel_shape) + " has " +
                  std::to_string(attrs.kernel_shape.size()) + " entries but the input has " +
                  std::to_string(rank) + " spatial dimensions");
  }
  return p;
}

ConvGeometry resolve_conv_geometry(const ConvAttributes& attrs,
                                   const std::vector<int64_t>& x_spatial,
                                   const std::vector<int64_t>& kernel, const std::string& label) {
  const size_t rank = x_spatial.size();
  const ConvParams p = conv_params_for_rank(attrs, rank, label);
  if (!attrs.kernel_shape.empty() && attrs.kernel_shape != kernel) {
    throw OpError(label + ": attribute kernel_shape=" + join(attrs.kernel_shape) +
                  " does not match the kernel dims of Wq " + join(kernel));
  }
  ConvGeometry g;
  const size_t off = 3 - rank;  // lower ranks occupy the trailing dimensions
  for (size_t i = 0; i < rank; ++i) {
    ConvDim d;
    try {
      d = conv_output_dim(attrs.auto_pad, x_spatial[i], kernel[i], p.strides[i], p.dilations[i],
                          p.pads[i], p.pads[i + rank]);
    } catch (const OpError& e) {
      throw OpError(label + ": X spatial dims " + join(x_spatial) + ", dimension " +
                    std::to_string(i) + ": " + e.what());
    }
    g.in[off + i] = x_spatial[i];
    g.out[off + i] = d.out;
    g.kernel[off + i] = kernel[i];
    g.stride[off + i] = p.strides[i];
    g.dilation[off + i] = p.dilations[i];
    g.pad_begin[off + i] = d.pad_begin;
  }
  return g;
}

}  // namespace nbsmt::ort
