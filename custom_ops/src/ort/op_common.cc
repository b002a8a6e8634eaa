#include "op_common.h"

#include <atomic>
#include <cmath>

namespace nbsmt::ort {

namespace {

const OpDescription* describe(const OrtCustomOp* op) {
  return static_cast<const NbSmtCustomOp*>(op)->description;
}

const char* ORT_API_CALL get_name(const OrtCustomOp* op) { return describe(op)->name; }

const char* ORT_API_CALL get_execution_provider_type(const OrtCustomOp*) {
  return nullptr;  // CPU
}

ONNXTensorElementDataType ORT_API_CALL get_input_type(const OrtCustomOp* op, size_t i) {
  const auto& t = describe(op)->input_types;
  return i < t.size() ? t[i] : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}
size_t ORT_API_CALL get_input_type_count(const OrtCustomOp* op) {
  return describe(op)->input_types.size();
}
ONNXTensorElementDataType ORT_API_CALL get_output_type(const OrtCustomOp* op, size_t i) {
  const auto& t = describe(op)->output_types;
  return i < t.size() ? t[i] : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}
size_t ORT_API_CALL get_output_type_count(const OrtCustomOp* op) {
  return describe(op)->output_types.size();
}

OrtCustomOpInputOutputCharacteristic ORT_API_CALL get_input_characteristic(const OrtCustomOp* op,
                                                                          size_t i) {
  return i < describe(op)->required_inputs ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL get_output_characteristic(const OrtCustomOp* op,
                                                                           size_t i) {
  return i < describe(op)->required_outputs ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}

OrtMemType ORT_API_CALL get_input_memory_type(const OrtCustomOp*, size_t) {
  return OrtMemTypeDefault;
}

int ORT_API_CALL variadic_min_arity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL variadic_homogeneity(const OrtCustomOp*) { return 1; }

int ORT_API_CALL get_start_version(const OrtCustomOp*) { return kOpsetVersion; }
int ORT_API_CALL get_end_version(const OrtCustomOp*) { return kOpsetVersion; }

}  // namespace

void init_custom_op(NbSmtCustomOp* op, const OpDescription* d) {
  OrtCustomOp* base = op;
  *base = OrtCustomOp{};  // every field null, including ones newer than API 17
  op->description = d;
  base->version = kOrtApiVersion;
  base->CreateKernel = nullptr;  // ORT uses CreateKernelV2 (API >= 16)
  base->KernelCompute = nullptr;  // ORT uses KernelComputeV2 (API >= 16)
  base->GetName = get_name;
  base->GetExecutionProviderType = get_execution_provider_type;
  base->GetInputType = get_input_type;
  base->GetInputTypeCount = get_input_type_count;
  base->GetOutputType = get_output_type;
  base->GetOutputTypeCount = get_output_type_count;
  base->KernelDestroy = d->destroy;
  base->GetInputCharacteristic = get_input_characteristic;
  base->GetOutputCharacteristic = get_output_characteristic;
  base->GetInputMemoryType = get_input_memory_type;
  base->GetVariadicInputMinArity = variadic_min_arity;
  base->GetVariadicInputHomogeneity = variadic_homogeneity;
  base->GetVariadicOutputMinArity = variadic_min_arity;
  base->GetVariadicOutputHomogeneity = variadic_homogeneity;
  base->CreateKernelV2 = d->create;
  base->KernelComputeV2 = d->compute;
  base->InferOutputShapeFn = d->infer_shape;
  base->GetStartVersion = get_start_version;
  base->GetEndVersion = get_end_version;
}

void expect_type(const Tensor& t, ONNXTensorElementDataType type, const char* name,
                 const char* type_name, const std::string& label) {
  if (t.type != type) throw OpError(label + ": input " + name + " must be " + type_name);
}

float read_activation_scale(const Tensor& t, const char* name, const std::string& label) {
  if (t.dims.size() > 1 || t.size() != 1) {
    throw OpError(label + ": " + name + " must be a scalar (shape [] or [1]), got " +
                  shape_str(t.dims));
  }
  const float s = *static_cast<const float*>(t.data);
  if (!(std::isfinite(s) && s > 0.0f)) {
    throw OpError(label + ": " + name + "=" + std::to_string(s) + " must be finite and > 0");
  }
  return s;
}

bool infer_input_dims(const OrtApi* api, OrtShapeInferContext* ctx, size_t index,
                      std::vector<InferDim>* dims, ONNXTensorElementDataType* type) {
  size_t count = 0;
  OrtStatus* st = api->ShapeInferContext_GetInputCount(ctx, &count);
  if (st != nullptr) {
    api->ReleaseStatus(st);
    return false;
  }
  if (index >= count) return false;
  OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by the context
  st = api->ShapeInferContext_GetInputTypeShape(ctx, index, &info);
  if (st != nullptr) {
    api->ReleaseStatus(st);
    return false;
  }
  size_t rank = 0;
  std::vector<int64_t> values;
  std::vector<const char*> symbols;
  st = api->GetTensorElementType(info, type);
  if (st == nullptr) st = api->GetDimensionsCount(info, &rank);
  if (st == nullptr) {
    values.resize(rank);
    symbols.assign(rank, nullptr);
    st = api->GetDimensions(info, values.data(), rank);
  }
  if (st == nullptr) st = api->GetSymbolicDimensions(info, symbols.data(), rank);
  if (st != nullptr) {
    api->ReleaseStatus(st);
    return false;
  }
  dims->assign(rank, InferDim{});
  for (size_t i = 0; i < rank; ++i) {
    (*dims)[i].value = values[i] >= 0 ? values[i] : -1;
    if (symbols[i] != nullptr && symbols[i][0] != '\0' && values[i] < 0) {
      (*dims)[i].symbol = symbols[i];
    }
  }
  return true;
}

void infer_set_output(const OrtApi* api, OrtShapeInferContext* ctx, size_t index,
                      ONNXTensorElementDataType type, const std::vector<InferDim>& dims) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  throw_if_error(api, api->CreateTensorTypeAndShapeInfo(&info), "CreateTensorTypeAndShapeInfo");
  // ORT writes every dim without a symbol as a value, so an unknown dim needs a
  // name of its own (a fresh one: nothing says it equals any other dim).
  static std::atomic<uint64_t> next_unknown{0};
  std::vector<std::string> names;
  std::vector<int64_t> values;
  for (const InferDim& d : dims) {
    values.push_back(d.known() ? d.value : -1);
    if (d.known()) {
      names.emplace_back();
    } else if (!d.symbol.empty()) {
      names.push_back(d.symbol);
    } else {
      names.push_back("nbsmt_unk_" + std::to_string(next_unknown.fetch_add(1)));
    }
  }
  std::vector<const char*> symbols;
  for (const std::string& n : names) symbols.push_back(n.c_str());
  OrtStatus* st = api->SetTensorElementType(info, type);
  if (st == nullptr) st = api->SetDimensions(info, values.data(), values.size());
  if (st == nullptr) st = api->SetSymbolicDimensions(info, symbols.data(), symbols.size());
  if (st == nullptr) st = api->ShapeInferContext_SetOutputTypeShape(ctx, index, info);
  api->ReleaseTensorTypeAndShapeInfo(info);
  throw_if_error(api, st, "setting an output shape");
}

}  // namespace nbsmt::ort
