#include "ort_api.h"

#include <new>

namespace nbsmt::ort {

void throw_if_error(const OrtApi* api, OrtStatus* status, const std::string& context) {
  if (status == nullptr) return;
  std::string message = context + ": " + api->GetErrorMessage(status);
  const OrtErrorCode code = api->GetErrorCode(status);
  api->ReleaseStatus(status);
  throw OpError(message, code);
}

OrtStatus* status_from_current_exception(const OrtApi* api, const char* op_type) noexcept {
  try {
    throw;
  } catch (const OpError& e) {
    return api->CreateStatus(e.code(), e.what());
  } catch (const std::bad_alloc&) {
    return api->CreateStatus(ORT_RUNTIME_EXCEPTION,
                             (std::string(op_type) + ": out of memory").c_str());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_RUNTIME_EXCEPTION,
                             (std::string(op_type) + ": internal error: " + e.what()).c_str());
  } catch (...) {
    return api->CreateStatus(ORT_RUNTIME_EXCEPTION,
                             (std::string(op_type) + ": unknown internal error").c_str());
  }
}

std::string shape_str(const std::vector<int64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ",";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

int64_t element_count(const std::vector<int64_t>& dims) {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

Tensor get_input(const OrtApi* api, OrtKernelContext* ctx, size_t index) {
  Tensor t;
  size_t count = 0;
  throw_if_error(api, api->KernelContext_GetInputCount(ctx, &count), "KernelContext_GetInputCount");
  if (index >= count) return t;
  throw_if_error(api, api->KernelContext_GetInput(ctx, index, &t.value), "KernelContext_GetInput");
  if (t.value == nullptr) return t;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  throw_if_error(api, api->GetTensorTypeAndShape(t.value, &info), "GetTensorTypeAndShape");
  size_t rank = 0;
  OrtStatus* st = api->GetTensorElementType(info, &t.type);
  if (st == nullptr) st = api->GetDimensionsCount(info, &rank);
  if (st == nullptr) {
    t.dims.resize(rank);
    st = api->GetDimensions(info, t.dims.data(), rank);
  }
  api->ReleaseTensorTypeAndShapeInfo(info);
  throw_if_error(api, st, "reading an input shape");
  // GetTensorData is API 1.21+; the mutable accessor exists in every version we support.
  void* data = nullptr;
  throw_if_error(api, api->GetTensorMutableData(const_cast<OrtValue*>(t.value), &data),
                 "GetTensorMutableData");
  t.data = data;
  return t;
}

bool get_output(const OrtApi* api, OrtKernelContext* ctx, size_t index,
                const std::vector<int64_t>& dims, void** data) {
  *data = nullptr;
  size_t count = 0;
  throw_if_error(api, api->KernelContext_GetOutputCount(ctx, &count),
                 "KernelContext_GetOutputCount");
  if (index >= count) return false;
  OrtValue* value = nullptr;
  throw_if_error(api, api->KernelContext_GetOutput(ctx, index, dims.data(), dims.size(), &value),
                 "KernelContext_GetOutput");
  if (value == nullptr) return false;  // an optional output the node leaves out ("")
  throw_if_error(api, api->GetTensorMutableData(value, data), "GetTensorMutableData");
  return true;
}

std::string node_label(const OrtApi* api, const OrtKernelInfo* info, const char* op_type) {
  size_t size = 0;
  std::string name;
  OrtStatus* st = api->KernelInfo_GetNodeName(info, nullptr, &size);
  if (st == nullptr && size > 1) {
    std::vector<char> buf(size);
    st = api->KernelInfo_GetNodeName(info, buf.data(), &size);
    if (st == nullptr) name.assign(buf.data());
  }
  if (st != nullptr) api->ReleaseStatus(st);
  if (name.empty()) return std::string(op_type) + " (unnamed node)";
  return std::string(op_type) + " '" + name + "'";
}

}  // namespace nbsmt::ort
