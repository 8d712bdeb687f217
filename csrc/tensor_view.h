// TensorView: a tensor as it crosses into a2r_kernels._C, and the checks that protect memory.
//
// Plain C++ (no CUDA, no torch headers). Python hands every tensor over as a DLPack capsule
// (torch.utils.dlpack.to_dlpack: no copy, no stream sync); csrc/bindings.cpp turns the capsule's
// DLTensor into a TensorView that borrows it for the duration of the call (the caller's tensor
// keeps the memory alive). The entry points in ops.h take TensorViews and, next to their launch,
// check what a wrong value would turn into an out-of-bounds access or a wrong reinterpretation
// of memory (device, dtype, rank, the shapes the kernels index by, unit strides, alignment),
// throwing std::invalid_argument (ValueError in Python) that names the argument. Everything else
// (GQA divisibility, sm_scale, the values inside plan tensors) is the public op's to check, once.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "third_party/dlpack/dlpack.h"

namespace a2r {

// Element types the kernels read and write. The float codes are the kernels' dispatch codes.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt32, kInt64, kBool, kOther };

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kBool: return "bool";
    default: return "an unsupported dtype";
  }
}

class TensorView {
 public:
  TensorView(const DLTensor& tensor, std::string name) : t_(tensor), name_(std::move(name)) {
    if (t_.ndim < 0) fail("has a negative rank");
    if (t_.dtype.lanes != 1) fail("must not be a vector dtype (lanes != 1)");
  }

  const std::string& name() const { return name_; }
  int ndim() const { return t_.ndim; }
  int64_t size(int d) const { return t_.shape[d]; }
  // Element stride of dimension d (DLPack may leave strides null for a compact row-major tensor).
  int64_t stride(int d) const {
    if (t_.strides != nullptr) return t_.strides[d];
    int64_t s = 1;
    for (int i = d + 1; i < t_.ndim; ++i) s *= t_.shape[i];
    return s;
  }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < t_.ndim; ++i) n *= t_.shape[i];
    return n;
  }
  void* data() const { return static_cast<char*>(t_.data) + t_.byte_offset; }
  template <typename T>
  T* data_as() const { return static_cast<T*>(data()); }
  int device_index() const { return t_.device.device_id; }
  bool is_cuda() const { return t_.device.device_type == kDLCUDA; }

  DType dtype() const {
    const DLDataType d = t_.dtype;
    if (d.code == kDLFloat && d.bits == 32) return DType::kFloat32;
    if (d.code == kDLFloat && d.bits == 16) return DType::kFloat16;
    if (d.code == kDLBfloat && d.bits == 16) return DType::kBFloat16;
    if (d.code == kDLInt && d.bits == 32) return DType::kInt32;
    if (d.code == kDLInt && d.bits == 64) return DType::kInt64;
    if ((d.code == kDLBool || d.code == kDLUInt) && d.bits == 8) return DType::kBool;
    return DType::kOther;
  }

  // ---------------------------------------------------------------------- checks (named)
  [[noreturn]] void fail(const std::string& what) const {
    throw std::invalid_argument(name_ + " " + what);
  }

  // A CUDA tensor of rank `ndim` (`shape_doc` says which, e.g. "[S, Hq, D]").
  const TensorView& expect(int ndim, const char* shape_doc) const {
    if (!is_cuda()) fail(std::string("must be a CUDA tensor ") + shape_doc + ", got a tensor on "
                         "DLPack device type " + std::to_string(t_.device.device_type));
    return expect_rank(ndim, shape_doc);
  }
  // A host (CPU) tensor of rank `ndim`: the CPU kernels (csrc/cpu/) dereference its pointer.
  const TensorView& expect_host(int ndim, const char* shape_doc) const {
    if (t_.device.device_type != kDLCPU) {
      fail(std::string("must be a CPU tensor ") + shape_doc + ", got a tensor on DLPack device "
           "type " + std::to_string(t_.device.device_type));
    }
    return expect_rank(ndim, shape_doc);
  }
  const TensorView& expect_rank(int ndim, const char* shape_doc) const {
    if (t_.ndim != ndim) {
      fail(std::string("must be ") + shape_doc + " (" + std::to_string(ndim) + "-D), got " +
           std::to_string(t_.ndim) + "-D " + shape_string());
    }
    return *this;
  }
  const TensorView& expect_dtype(DType dtype) const {
    if (this->dtype() != dtype) {
      fail(std::string("must have dtype ") + dtype_name(dtype) + ", got " +
           dtype_name(this->dtype()));
    }
    return *this;
  }
  const TensorView& expect_float() const {
    const DType d = dtype();
    if (d != DType::kFloat32 && d != DType::kFloat16 && d != DType::kBFloat16) {
      fail(std::string("must have dtype float32, float16 or bfloat16, got ") + dtype_name(d));
    }
    return *this;
  }
  const TensorView& expect_size(int d, int64_t n, const char* what) const {
    if (size(d) != n) {
      fail("must have shape[" + std::to_string(d) + "] = " + what + " = " + std::to_string(n) +
           ", got " + shape_string());
    }
    return *this;
  }
  const TensorView& expect_same_device(const TensorView& other) const {
    if (device_index() != other.device_index()) {
      fail("is on cuda:" + std::to_string(device_index()) + " but " + other.name() +
           " is on cuda:" + std::to_string(other.device_index()));
    }
    return *this;
  }
  // The kernels read rows of the last dimension as unit-stride vectors.
  const TensorView& expect_unit_last_stride() const {
    if (numel() > 0 && t_.ndim > 0 && size(t_.ndim - 1) > 1 && stride(t_.ndim - 1) != 1) {
      fail("must have unit stride in its last dimension, got strides " + stride_string());
    }
    return *this;
  }
  const TensorView& expect_contiguous() const {
    int64_t expected = 1;
    for (int d = t_.ndim - 1; d >= 0; --d) {
      if (size(d) > 1 && stride(d) != expected) {
        fail("must be contiguous, got shape " + shape_string() + " strides " + stride_string());
      }
      expected *= size(d);
    }
    return *this;
  }

  std::string shape_string() const { return list_string(t_.shape); }
  std::string stride_string() const {
    std::string s = "[";
    for (int i = 0; i < t_.ndim; ++i) s += (i ? ", " : "") + std::to_string(stride(i));
    return s + "]";
  }

 private:
  std::string list_string(const int64_t* values) const {
    std::string s = "[";
    for (int i = 0; i < t_.ndim; ++i) s += (i ? ", " : "") + std::to_string(values[i]);
    return s + "]";
  }

  DLTensor t_;
  std::string name_;
};

}  // namespace a2r
