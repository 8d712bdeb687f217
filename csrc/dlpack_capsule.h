// A DLPack capsule (a Python object) as an a2r::TensorView, for the pybind11 modules _C
// (csrc/bindings.cpp) and _cpu (csrc/cpu/bindings_cpu.cpp).
//
// The capsule ("dltensor" or "dltensor_versioned") is only read, never consumed: it keeps its
// name, and its deleter runs when Python drops it, after the call. The view borrows the tensor
// for the duration of the call (the caller's tensor keeps the memory alive).
#pragma once

#include <pybind11/pybind11.h>

#include <optional>
#include <stdexcept>
#include <string>

#include "tensor_view.h"

namespace a2r {

// The DLTensor inside `obj`, named `name` in errors (std::invalid_argument -> ValueError).
inline TensorView dlpack_view(const pybind11::handle& obj, const char* name) {
  PyObject* capsule = obj.ptr();
  if (PyCapsule_CheckExact(capsule)) {
    if (PyCapsule_IsValid(capsule, "dltensor")) {
      auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
      return TensorView(managed->dl_tensor, name);
    }
    if (PyCapsule_IsValid(capsule, "dltensor_versioned")) {
      auto* managed = static_cast<DLManagedTensorVersioned*>(
          PyCapsule_GetPointer(capsule, "dltensor_versioned"));
      if (managed->version.major != DLPACK_MAJOR_VERSION) {
        throw std::invalid_argument(std::string(name) + " is a DLPack " +
                                    std::to_string(managed->version.major) + ".x tensor; a2r " +
                                    "kernels read DLPack " + std::to_string(DLPACK_MAJOR_VERSION) +
                                    ".x");
      }
      return TensorView(managed->dl_tensor, name);
    }
  }
  throw std::invalid_argument(
      std::string(name) + " must be a tensor (a DLPack capsule, torch.utils.dlpack.to_dlpack(t)), "
      "got " + std::string(pybind11::str(pybind11::type::handle_of(obj).attr("__name__"))));
}

inline std::optional<TensorView> optional_dlpack_view(const pybind11::handle& obj,
                                                      const char* name) {
  if (obj.is_none()) return std::nullopt;
  return dlpack_view(obj, name);
}

}  // namespace a2r
