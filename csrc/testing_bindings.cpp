// pybind11 module _C_testing: host builds of kernel code, for tests on machines without a GPU.
//
// Not part of the package: CMake writes it to tests/ (A2R_TESTING_OUTPUT_DIR), next to the tests
// that import it (tests/test_cuda.py). It links the same kernel objects as a2r_kernels._C, so the
// code it runs on the host is the code the kernels run: the Philox stream and the per-position
// denoise math, compiled for the CPU. It has no entry point the ops use.

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "ops.h"

namespace py = pybind11;

PYBIND11_MODULE(_C_testing, m) {
  m.doc() = "Host builds of a2r_kernels._C's kernel code, for tests without a GPU (test-only).";
  m.def("philox_uniform", &a2r::philox_uniform_host,
        "u = ((r >> 9) + 0.5) * 2^-23 of the first Philox4x32-10 word at counter (c0..c3), key "
        "seed: the denoise kernels' random stream, computed on the host.",
        py::arg("seed"), py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3") = 0);
  m.def(
      "denoise_predict_row_host",
      [](uintptr_t row, int64_t vocab, double temperature, int remasking, uint64_t seed,
         uint32_t pos, int64_t mask_id, int group_width, int num_splits) {
        if (remasking < 0 || remasking > static_cast<int>(a2r::Remasking::kRandom)) {
          throw std::invalid_argument("denoise_predict_row_host: remasking code must be in [0, " +
                                      std::to_string(static_cast<int>(a2r::Remasking::kRandom)) +
                                      "]");
        }
        int64_t x0 = 0;
        float confidence = 0.f;
        a2r::denoise_predict_row_host(
            reinterpret_cast<const float*>(row), vocab, static_cast<float>(temperature),
            temperature > 0 ? static_cast<float>(1.0 / temperature) : 0.f,
            static_cast<a2r::Remasking>(remasking), seed, pos, mask_id, group_width, num_splits,
            &x0, &confidence);
        return py::make_tuple(x0, confidence);
      },
      "(x0, confidence) of one masked position from a HOST fp32 row of logits (address of "
      "row[vocab]), by the denoise kernel's per-position code compiled for the CPU; group_width: "
      "logits per 16-byte load of the kernel being emulated (4: fp32, 8: fp16 / bf16); "
      "num_splits: CTAs per position over V; mask_id: the x0 of a row without a distribution.",
      py::arg("row"), py::arg("vocab"), py::arg("temperature"), py::arg("remasking"),
      py::arg("seed"), py::arg("pos"), py::arg("mask_id"), py::arg("group_width") = 4,
      py::arg("num_splits") = 1);
}
