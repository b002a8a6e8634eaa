// Placeholder until the ORT glue lands: exports RegisterCustomOps only.
#include "onnxruntime_c_api.h"

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* /*options*/, const OrtApiBase* /*api_base*/) {
  return nullptr;
}
