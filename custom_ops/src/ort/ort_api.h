// Small helpers over the ONNX Runtime C API shared by the NB-SMT op glue.
//
// Errors inside the glue are thrown as OpError (a complete, user-facing
// message) and converted to an OrtStatus at the C boundary (CreateKernelV2,
// KernelComputeV2), so nothing ever aborts or unwinds into ONNX Runtime.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "onnxruntime_c_api.h"

namespace nbsmt::ort {

// The ONNX Runtime C API version the library is written against: ORT 1.17 is
// the oldest release with every entry point used here (KernelContext_ParallelFor,
// ShapeInferContext_*, ReadOpAttr). RegisterCustomOps asks for exactly this API
// and every OrtCustomOp declares it as its `version`, so newer runtimes read only
// the OrtCustomOp fields that exist in 1.17.
constexpr uint32_t kOrtApiVersion = 17;

// The op domain and its (only) opset version.
inline constexpr const char* kDomain = "nbsmt";
constexpr int kOpsetVersion = 1;

// A user-facing error; the message is returned to ONNX Runtime as is.
class OpError : public std::runtime_error {
 public:
  explicit OpError(const std::string& message, OrtErrorCode code = ORT_INVALID_ARGUMENT)
      : std::runtime_error(message), code_(code) {}
  OrtErrorCode code() const { return code_; }

 private:
  OrtErrorCode code_;
};

// Throws OpError("<context>: <ORT message>") if status is an error (and releases it).
void throw_if_error(const OrtApi* api, OrtStatus* status, const std::string& context);

// Converts the exception being handled into an OrtStatus. Call only inside catch (...).
OrtStatus* status_from_current_exception(const OrtApi* api, const char* op_type) noexcept;

// "[8,4,3,3]"
std::string shape_str(const std::vector<int64_t>& dims);

// Product of dims (0 for an empty tensor); dims must be non-negative.
int64_t element_count(const std::vector<int64_t>& dims);

// One input or output tensor as seen by a kernel.
struct Tensor {
  const OrtValue* value = nullptr;  // nullptr: an absent optional input
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> dims;
  const void* data = nullptr;
  bool present() const { return value != nullptr; }
  int64_t size() const { return element_count(dims); }
};

// Reads input `index` (absent optional input -> Tensor with value == nullptr).
Tensor get_input(const OrtApi* api, OrtKernelContext* ctx, size_t index);

// Allocates output `index` with `dims` and stores its data pointer in *data
// (nullptr for an empty tensor). Returns false when the node does not produce
// that (optional) output.
bool get_output(const OrtApi* api, OrtKernelContext* ctx, size_t index,
                const std::vector<int64_t>& dims, void** data);

// "NbSmtConv 'conv1'" (or "NbSmtConv (unnamed node)"): the prefix of every error.
std::string node_label(const OrtApi* api, const OrtKernelInfo* info, const char* op_type);

}  // namespace nbsmt::ort
