// Argument checks shared by the extensions' bindings (kernels/scan/scan.cpp,
// kernels/lim/lim.cpp). A binding checks every tensor argument's device, dtype,
// shape and strides before it reads or writes any memory; a failed check raises
// RuntimeError "<op>: <argument> must ..., got ...".
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <sstream>
#include <string>

namespace memba_checks {

constexpr int64_t kAny = -1;  // a size of any value in an expected shape

enum class Strides {
  kAny,         // the op reads through any strides (or makes its own contiguous copy)
  kLastAxis,    // the last axis has stride 1; the others may have any stride
  kContiguous,  // row-major contiguous
};

inline std::string shape_text(at::IntArrayRef shape) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s << ", ";
    if (shape[i] == kAny) s << "*"; else s << shape[i];
  }
  s << ")";
  return s.str();
}

inline std::string dtypes_text(at::ArrayRef<at::ScalarType> dtypes) {
  std::ostringstream s;
  for (size_t i = 0; i < dtypes.size(); ++i) {
    bool seen = false;
    for (size_t j = 0; j < i; ++j) seen = seen || dtypes[j] == dtypes[i];
    if (seen) continue;
    if (i) s << " or ";
    s << dtypes[i];
  }
  return s.str();
}

// ``t`` (argument ``arg`` of ``op``) must be defined, on ``device``, of one of ``dtypes``,
// of ``shape`` (kAny: any size) and have ``strides``. An ``output`` (a buffer the op
// writes into) must also not repeat elements (an expanded tensor).
inline void check_tensor(const char* op, const char* arg, const at::Tensor& t,
                         const at::Device& device, at::ArrayRef<at::ScalarType> dtypes,
                         at::IntArrayRef shape, Strides strides, bool output = false) {
  TORCH_CHECK(t.defined(), op, ": ", arg, " is an undefined tensor");
  TORCH_CHECK(t.device() == device, op, ": ", arg, " must be on ", device, ", got ",
              t.device());
  bool dtype_ok = false;
  for (const at::ScalarType d : dtypes) dtype_ok = dtype_ok || t.scalar_type() == d;
  TORCH_CHECK(dtype_ok, op, ": ", arg, " must be ", dtypes_text(dtypes), ", got ",
              t.scalar_type());
  bool shape_ok = t.dim() == static_cast<int64_t>(shape.size());
  for (int64_t i = 0; shape_ok && i < t.dim(); ++i) {
    shape_ok = shape[i] == kAny || t.size(i) == shape[i];
  }
  TORCH_CHECK(shape_ok, op, ": ", arg, " must have shape ", shape_text(shape), ", got ",
              t.sizes());
  if (strides == Strides::kContiguous) {
    TORCH_CHECK(t.is_contiguous(), op, ": ", arg, " must be contiguous, got strides ",
                t.strides(), " for shape ", t.sizes());
  } else if (strides == Strides::kLastAxis) {
    TORCH_CHECK(t.dim() >= 1 && t.stride(-1) == 1, op, ": ", arg,
                " must have a contiguous last axis (stride 1), got strides ", t.strides());
  }
  if (output) {
    TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", arg,
                " must not have overlapping elements (an expanded tensor), got strides ",
                t.strides());
  }
}

inline void check_tensor(const char* op, const char* arg, const at::Tensor& t,
                         const at::Device& device, at::ScalarType dtype, at::IntArrayRef shape,
                         Strides strides, bool output = false) {
  check_tensor(op, arg, t, device, at::ArrayRef<at::ScalarType>(dtype), shape, strides, output);
}

}  // namespace memba_checks
