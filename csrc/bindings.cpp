// bindings.cpp — the pybind11 module qdpo._C. Functions take plain integers
// (device pointers, sizes, a stream) so the module links against the CUDA
// runtime only; Python turns them into torch.ops.qdpo backends.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "qdpo_math.cuh"

namespace qdpo {
int device_count(int* count);
int runtime_version();
const char* error_string(int code);
}  // namespace qdpo

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "qdpo CUDA extension (built from csrc/ by setup.py)";
  m.def("runtime_version", &qdpo::runtime_version, "CUDA runtime version the module was linked with");
  m.def("device_count", []() {
    int n = 0;
    int err = qdpo::device_count(&n);
    if (err != 0) {
      throw std::runtime_error(std::string("qdpo._C: no usable CUDA device (") +
                               qdpo::error_string(err) + ", code " + std::to_string(err) + ")");
    }
    return n;
  }, "Number of CUDA devices; raises RuntimeError when there is no usable GPU");
  // Host builds of the shared math, so the CPU test suite checks it bit-exactly.
  m.def("host_quantize_one", &qdpo::quantize_one, py::arg("w"), py::arg("s"), py::arg("z"), py::arg("bits"));
  m.def("host_dequantize_one", &qdpo::dequantize_one, py::arg("q"), py::arg("s"), py::arg("z"));
  m.def("host_ste_pass", &qdpo::ste_pass, py::arg("w"), py::arg("s"), py::arg("z"), py::arg("bits"));
  m.def("host_pack_nibbles", &qdpo::pack_nibbles, py::arg("even"), py::arg("odd"));
  m.def("host_unpack_nibble", &qdpo::unpack_nibble, py::arg("byte"), py::arg("k"));
}
