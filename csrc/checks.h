// Input checks and memory-layout helpers shared by the CPU and CUDA implementations.
//
// The Python op layer validates user input fully; these checks catch misuse of the primitives
// themselves, with messages that name the op and the argument.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <optional>
#include <ostream>
#include <vector>

namespace dla_fused {

// channels_last when x is laid out that way and not also plain contiguous: the rule of
// memory_format_of in dla_fused/ops/primitives.py. Results take the layout of their first
// activation argument; the other activations are brought to it with `in_layout`.
inline bool is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat memory_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// x densely laid out as NCHW or channels_last (no copy when it already is); undefined stays undefined.
inline at::Tensor in_layout(const at::Tensor& x, bool channels_last) {
  return x.defined() ? x.contiguous(memory_format(channels_last)) : x;
}

inline at::Tensor in_layout(const std::optional<at::Tensor>& x, bool channels_last) {
  return x.has_value() ? in_layout(*x, channels_last) : at::Tensor();
}

// The activation dtypes the kernels of both devices take; `device` names the driver in the message.
inline void check_dtype(const char* op, const char* device, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "dla_fused::", op, " on ", device, " supports float32, float16, bfloat16 and float64 tensors, got ",
              dtype);
}

// f(scalar_t{}) for the activation dtype, after check_dtype.
template <typename F>
void dispatch_dtype(const char* op, const char* device, at::ScalarType dtype, F&& f) {
  check_dtype(op, device, dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dla_fused", [&] { f(scalar_t{}); });
}

// Per-channel vectors and statistics: float64 for float64 activations, float32 otherwise.
inline at::ScalarType acc_type(at::ScalarType activation) {
  return activation == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// The name of an argument in messages: `name`, or `name[index]` for an element of a list.
struct ArgName {
  ArgName(const char* name, int64_t index = -1) : name(name), index(index) {}  // NOLINT: implicit on purpose
  const char* name;
  int64_t index;
};

inline std::ostream& operator<<(std::ostream& out, const ArgName& arg) {
  out << arg.name;
  if (arg.index >= 0) out << '[' << arg.index << ']';
  return out;
}

// The checks below stream tensor properties (dtype, sizes, device) straight into their messages.

// A 4-D floating-point activation.
inline void check_activation(const char* op, ArgName name, const at::Tensor& x) {
  TORCH_CHECK(x.defined(), "dla_fused::", op, ": ", name, " is undefined");
  TORCH_CHECK(x.dim() == 4 && at::isFloatingType(x.scalar_type()), "dla_fused::", op, ": ", name,
              " must be a 4-D (N, C, H, W) floating-point tensor, got ", x.scalar_type(), " of shape ", x.sizes());
}

// An activation with the dtype and device of `like` and the given sizes (-1: any).
inline void check_activation_like(const char* op, ArgName name, const at::Tensor& x, const at::Tensor& like,
                                  const std::vector<int64_t>& sizes) {
  check_activation(op, name, x);
  bool match = x.dim() == static_cast<int64_t>(sizes.size());
  for (size_t d = 0; match && d < sizes.size(); ++d) {
    match = sizes[d] < 0 || sizes[d] == x.size(d);
  }
  TORCH_CHECK(match && x.scalar_type() == like.scalar_type() && x.device() == like.device(), "dla_fused::", op,
              ": ", name, " must be a ", like.scalar_type(),
              " tensor of shape ", at::IntArrayRef(sizes), " (-1: any) on ", like.device(), ", got ",
              x.scalar_type(), " of shape ", x.sizes(), " on ", x.device());
}

inline void check_activation_like(const char* op, ArgName name, const std::optional<at::Tensor>& x,
                                  const at::Tensor& like, const std::vector<int64_t>& sizes) {
  if (x.has_value()) check_activation_like(op, name, *x, like, sizes);
}

// A contiguous per-channel vector of C values in the accumulation type of `activation`.
inline void check_channel_vector(const char* op, const char* name, const at::Tensor& v, int64_t channels,
                                 const at::Tensor& activation) {
  const auto acc = acc_type(activation.scalar_type());
  TORCH_CHECK(v.dim() == 1 && v.numel() == channels && v.scalar_type() == acc &&
                  v.device() == activation.device() && v.is_contiguous(),
              "dla_fused::", op, ": ", name, " must be a contiguous ", acc, " vector of ", channels,
              " elements on ", activation.device(), ", got ", v.scalar_type(), " of shape ", v.sizes(), " on ",
              v.device());
}

inline void check_channel_vector(const char* op, const char* name, const std::optional<at::Tensor>& v,
                                 int64_t channels, const at::Tensor& activation) {
  if (v.has_value()) check_channel_vector(op, name, *v, channels, activation);
}

}  // namespace dla_fused
