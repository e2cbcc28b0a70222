// Argument checks shared by the extensions' bindings (kernels/scan/scan.cpp,
// kernels/lim/lim.cpp). A binding checks every tensor argument's device, dtype,
// shape and strides before it reads or writes any memory; a failed check raises
// RuntimeError "<op>: <argument> must ..., got ...".
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <string>
#include <type_traits>

namespace memba_checks {

constexpr int64_t kAny = -1;  // a size of any value in an expected shape

// The pieces of an error message as text. Numbers are written with std::to_string and no
// number ever goes through a C++ stream here: on the GPU machine's build, streaming a number
// from this extension wrote nothing (a shape came out as "(, , )"), and torch's own formatting
// of a number or a shape in a failed check crashed the process (segmentation fault).
inline std::string text(const std::string& v) { return v; }
inline std::string text(const char* v) { return v; }
inline std::string text(at::ScalarType v) { return c10::toString(v); }
inline std::string text(const at::Device& v) { return v.str(); }
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
std::string text(T v) { return std::to_string(v); }

// "(2, *, 64)": an expected shape (kAny: "*"), or a tensor's sizes or strides.
inline std::string shape_text(at::IntArrayRef shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += shape[i] == kAny ? std::string("*") : std::to_string(shape[i]);
  }
  return s + ")";
}
inline std::string text(at::IntArrayRef v) { return shape_text(v); }

// The message, concatenated here: TORCH_CHECK receives one string.
template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (s.append(text(args)), ...);
  return s;
}

// TORCH_CHECK with the message made by ``message``.
#define MEMBA_CHECK(cond, ...) TORCH_CHECK((cond), ::memba_checks::message(__VA_ARGS__))

enum class Strides {
  kAny,         // the op reads through any strides (or makes its own contiguous copy)
  kLastAxis,    // the last axis has stride 1; the others may have any stride
  kContiguous,  // row-major contiguous
};

inline std::string dtypes_text(at::ArrayRef<at::ScalarType> dtypes) {
  std::string s;
  for (size_t i = 0; i < dtypes.size(); ++i) {
    bool seen = false;
    for (size_t j = 0; j < i; ++j) seen = seen || dtypes[j] == dtypes[i];
    if (seen) continue;
    if (i) s += " or ";
    s += c10::toString(dtypes[i]);
  }
  return s;
}

// ``t`` (argument ``arg`` of ``op``) must be defined, on ``device``, of one of ``dtypes``,
// of ``shape`` (kAny: any size) and have ``strides``. An ``output`` (a buffer the op
// writes into) must also not repeat elements (an expanded tensor).
inline void check_tensor(const char* op, const char* arg, const at::Tensor& t,
                         const at::Device& device, at::ArrayRef<at::ScalarType> dtypes,
                         at::IntArrayRef shape, Strides strides, bool output = false) {
  MEMBA_CHECK(t.defined(), op, ": ", arg, " is an undefined tensor");
  MEMBA_CHECK(t.device() == device, op, ": ", arg, " must be on ", device, ", got ",
              t.device());
  bool dtype_ok = false;
  for (const at::ScalarType d : dtypes) dtype_ok = dtype_ok || t.scalar_type() == d;
  MEMBA_CHECK(dtype_ok, op, ": ", arg, " must be ", dtypes_text(dtypes), ", got ",
              t.scalar_type());
  bool shape_ok = t.dim() == static_cast<int64_t>(shape.size());
  for (int64_t i = 0; shape_ok && i < t.dim(); ++i) {
    shape_ok = shape[i] == kAny || t.size(i) == shape[i];
  }
  MEMBA_CHECK(shape_ok, op, ": ", arg, " must have shape ", shape_text(shape), ", got ",
              shape_text(t.sizes()));
  if (strides == Strides::kContiguous) {
    MEMBA_CHECK(t.is_contiguous(), op, ": ", arg, " must be contiguous, got strides ",
                shape_text(t.strides()), " for shape ", shape_text(t.sizes()));
  } else if (strides == Strides::kLastAxis) {
    MEMBA_CHECK(t.dim() >= 1 && t.stride(-1) == 1, op, ": ", arg,
                " must have a contiguous last axis (stride 1), got strides ",
                shape_text(t.strides()));
  }
  if (output) {
    MEMBA_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", arg,
                " must not have overlapping elements (an expanded tensor), got strides ",
                shape_text(t.strides()));
  }
}

inline void check_tensor(const char* op, const char* arg, const at::Tensor& t,
                         const at::Device& device, at::ScalarType dtype, at::IntArrayRef shape,
                         Strides strides, bool output = false) {
  check_tensor(op, arg, t, device, at::ArrayRef<at::ScalarType>(dtype), shape, strides, output);
}

}  // namespace memba_checks
