// RegisterCustomOps: the library's only exported symbol (see exports.map).
//
// ONNX Runtime calls it once per OrtSessionOptions that registers the library.
// The custom-op domain "nbsmt" (opset 1, NbSmtConv + NbSmtMatMul) is created on
// the first call and then added to every session options object: ORT requires
// the domain to outlive all sessions using it and does not take ownership, so
// one process-wide domain is the only choice that neither grows with the number
// of sessions nor frees a domain a live session may still read.
//
// The domain is deliberately never released: at process exit ONNX Runtime (a
// separate library, possibly finalized first) may already be gone, and releasing
// it is ORT's code. It is a single small allocation per load of this library.
#include <cstdio>
#include <mutex>
#include <string>

#include "op_common.h"
#include "ort_api.h"

namespace {

using nbsmt::ort::kDomain;
using nbsmt::ort::kOrtApiVersion;

// ONNX Runtime before 1.24 dereferences a null type while building the shape
// inference context of a node whose optional input is given as "" (segfault,
// observed with 1.17.3 - 1.23.2, fixed in 1.24.1). There the ops register no
// InferOutputShapeFn: ORT still infers the output types, only not the shapes.
bool shape_inference_is_safe(const char* ort_version) {
  int major = 0, minor = 0;
  if (ort_version == nullptr || std::sscanf(ort_version, "%d.%d", &major, &minor) != 2) {
    return false;
  }
  return major > 1 || (major == 1 && minor >= 24);
}

std::mutex g_mutex;
OrtCustomOpDomain* g_domain = nullptr;  // guarded by g_mutex; created once, never released

OrtStatus* shared_domain(const OrtApi* api, const char* ort_version, OrtCustomOpDomain** out) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_domain == nullptr) {
    nbsmt::ort::NbSmtCustomOp* ops[] = {nbsmt::ort::conv_custom_op(),
                                        nbsmt::ort::matmul_custom_op()};
    const bool infer = shape_inference_is_safe(ort_version);
    for (auto* op : ops) {
      op->api = api;  // shape inference callbacks have no API argument
      if (!infer) op->InferOutputShapeFn = nullptr;
    }
    OrtCustomOpDomain* domain = nullptr;
    if (OrtStatus* st = api->CreateCustomOpDomain(kDomain, &domain)) return st;
    for (auto* op : ops) {
      if (OrtStatus* st = api->CustomOpDomain_Add(domain, op)) {
        api->ReleaseCustomOpDomain(domain);
        return st;
      }
    }
    g_domain = domain;
  }
  *out = g_domain;
  return nullptr;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  if (api_base == nullptr) return nullptr;  // nothing to report an error with
  const OrtApi* api = api_base->GetApi(kOrtApiVersion);
  if (api == nullptr) {
    // Too old a runtime. CreateStatus is the first entry of every API version.
    const OrtApi* any = api_base->GetApi(1);
    if (any == nullptr) return nullptr;
    const std::string message =
        std::string("the NB-SMT op library (libnbsmt_ops) needs ONNX Runtime >= 1.17 (C API ") +
        std::to_string(kOrtApiVersion) + "); this process runs ONNX Runtime " +
        api_base->GetVersionString() + ". Upgrade onnxruntime.";
    return any->CreateStatus(ORT_FAIL, message.c_str());
  }
  if (options == nullptr) {
    return api->CreateStatus(ORT_INVALID_ARGUMENT, "RegisterCustomOps: options is null");
  }
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = shared_domain(api, api_base->GetVersionString(), &domain)) return st;
  return api->AddCustomOpDomain(options, domain);
}
