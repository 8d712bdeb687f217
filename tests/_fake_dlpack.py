"""DLPack capsules that claim to be CUDA tensors, built with ctypes: they carry any shape, dtype
and strides (and a null data pointer) to a2r_kernels._C on a machine without a GPU, so tests can
check that _C rejects a bad tensor by name before it touches memory or the CUDA runtime."""

from __future__ import annotations

import ctypes

KDL_CUDA = 2
# dtype name -> (DLDataTypeCode, bits): kDLInt 0, kDLFloat 2, kDLBfloat 4, kDLBool 6
DTYPES = {"float32": (2, 32), "float16": (2, 16), "bfloat16": (4, 16), "int32": (0, 32),
          "int64": (0, 64), "bool": (6, 8), "float64": (2, 64)}


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


_NAME = b"dltensor"
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_alive: list = []   # the structs and arrays the capsules point into (never freed: tests are small)


def fake_cuda(shape, dtype: str = "float32", strides=None, device: int = 0, data: int = 0):
    """A "dltensor" capsule of a CUDA tensor of ``shape`` (contiguous unless ``strides``)."""
    ndim = len(shape)
    if strides is None:
        strides, step = [], 1
        for size in reversed(shape):
            strides.insert(0, step)
            step *= size
    shape_arr = (ctypes.c_int64 * max(ndim, 1))(*shape)
    stride_arr = (ctypes.c_int64 * max(ndim, 1))(*strides)
    code, bits = DTYPES[dtype]
    managed = _DLManagedTensor()
    managed.dl_tensor = _DLTensor(data, _DLDevice(KDL_CUDA, device), ndim,
                                  _DLDataType(code, bits, 1), shape_arr, stride_arr, 0)
    _alive.extend([shape_arr, stride_arr, managed])
    return _capsule_new(ctypes.addressof(managed), _NAME, None)
