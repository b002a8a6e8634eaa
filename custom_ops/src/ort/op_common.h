// The OrtCustomOp plumbing shared by NbSmtConv and NbSmtMatMul.
//
// An op is a static NbSmtCustomOp (an OrtCustomOp plus a pointer to its
// description); it outlives every session. Its `version` is kOrtApiVersion, so
// ORT >= 1.17 reads exactly the fields filled here: CreateKernelV2 /
// KernelComputeV2 (status-returning), InferOutputShapeFn, Get{Start,End}Version.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "ort_api.h"

namespace nbsmt::ort {

struct OpDescription {
  const char* name;
  std::vector<ONNXTensorElementDataType> input_types;
  size_t required_inputs;  // inputs at index >= required_inputs are optional
  std::vector<ONNXTensorElementDataType> output_types;
  size_t required_outputs;
  OrtStatusPtr(ORT_API_CALL* create)(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*,
                                     void**);
  OrtStatusPtr(ORT_API_CALL* compute)(void*, OrtKernelContext*);
  void(ORT_API_CALL* destroy)(void*);
  OrtStatusPtr(ORT_API_CALL* infer_shape)(const OrtCustomOp*, OrtShapeInferContext*);
};

struct NbSmtCustomOp : OrtCustomOp {
  const OpDescription* description = nullptr;
  // Set once by RegisterCustomOps; shape inference has no other way to reach the API.
  const OrtApi* api = nullptr;
};

// Fills every OrtCustomOp field from the description (unused ones null).
void init_custom_op(NbSmtCustomOp* op, const OpDescription* description);

// The two ops (statics defined in conv_op.cc / matmul_op.cc).
NbSmtCustomOp* conv_custom_op();
NbSmtCustomOp* matmul_custom_op();

// Throws OpError("<label>: input <name> must be <type_name>") unless t has `type`.
void expect_type(const Tensor& t, ONNXTensorElementDataType type, const char* name,
                 const char* type_name, const std::string& label);

// x_scale / a_scale: a float32 scalar of shape [] or [1], finite and > 0.
float read_activation_scale(const Tensor& t, const char* name, const std::string& label);

// --- shape inference helpers (best effort: unknown stays unknown)

struct InferDim {
  int64_t value = -1;  // -1: unknown
  std::string symbol;  // non-empty: a named symbolic dimension
  bool known() const { return value >= 0; }
};

// Dims of input `index`; false if the input or its shape is not available.
// ORT cannot tell an unknown rank from a scalar here: callers that need rank >= 1
// treat rank 0 as unknown.
bool infer_input_dims(const OrtApi* api, OrtShapeInferContext* ctx, size_t index,
                      std::vector<InferDim>* dims, ONNXTensorElementDataType* type);

// Sets the type and shape of output `index`. Unknown dims keep their symbol, or
// get a fresh unique one ("nbsmt_unk_<n>").
void infer_set_output(const OrtApi* api, OrtShapeInferContext* ctx, size_t index,
                      ONNXTensorElementDataType type, const std::vector<InferDim>& dims);

}  // namespace nbsmt::ort
