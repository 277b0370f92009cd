// runtime.cu — CUDA runtime queries for qdpo._C (device count, runtime version)
// and the status/error-detail plumbing every launcher returns through.
// The kernels of the `cuda` backend live in their own files beside this one.
#include <cuda_runtime.h>

#include "qdpo_api.h"

namespace qdpo {

namespace {
thread_local const char* g_detail = "";
}  // namespace

// Returns a cudaError_t; *count is set on success. Error 35/100 means no driver/GPU.
int device_count(int* count) { return static_cast<int>(cudaGetDeviceCount(count)); }

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }
const char* cuda_error_string(int code) { return error_string(code); }

int fail(int code, const char* detail) {
  g_detail = detail;
  return code;
}

const char* last_detail() { return g_detail; }

const char* status_name(int code) {
  switch (code) {
    case kOk: return "ok";
    case kErrBits: return "bits not in {4, 8}";
    case kErrDtype: return "unsupported dtype";
    case kErrShape: return "bad shape";
    case kErrTooLarge: return "operand too large for int32 indexing";
    case kErrNull: return "null pointer";
    case kErrAlign: return "misaligned pointer or stride";
    case kErrWorkspace: return "split-K workspace too small";
    case kErrMode: return "unknown mode";
    default: return code > 0 ? "CUDA error" : "unknown status";
  }
}

}  // namespace qdpo
