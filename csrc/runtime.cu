// runtime.cu — CUDA runtime queries for qdpo._C (device count, runtime version).
// The kernels of the `cuda` backend live in their own files beside this one.
#include <cuda_runtime.h>

namespace qdpo {

// Returns a cudaError_t; *count is set on success. Error 35/100 means no driver/GPU.
int device_count(int* count) { return static_cast<int>(cudaGetDeviceCount(count)); }

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace qdpo
