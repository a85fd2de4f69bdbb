// Building blocks of the hand-written kernels, compiled for the host (CPU loops) and the device
// (CUDA kernels) alike: vector loads and stores, reduction states, small math.
//
// Kernels see an activation as rows of contiguous vectors of VEC elements: one vector is one
// 16-byte access on CUDA and one 32-byte SIMD-sized chunk on CPU (the drivers check length and
// alignment first, and fall back to VEC = 1).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

namespace dla_fused {

// Vectors of `vec` elements (`bytes` bytes) when the contiguous length is a multiple of vec and
// every pointer is aligned to the vector size.
inline bool vectorizable(int vec, int bytes, int64_t vec_len, std::initializer_list<const void*> ptrs) {
  if (vec_len % vec != 0) return false;
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % bytes != 0) return false;
  }
  return true;
}

// f(std::integral_constant<int, VEC>{}) with VEC = kBytes / sizeof(scalar_t) when vec_len and ptrs
// allow vectors of kBytes bytes, else with VEC = 1: how a driver picks its visit's vector width.
template <typename scalar_t, int kBytes, typename F>
void with_vector_width(int64_t vec_len, std::initializer_list<const void*> ptrs, F&& f) {
  constexpr int kVec = kBytes / sizeof(scalar_t);
  if (vectorizable(kVec, kBytes, vec_len, ptrs)) {
    f(std::integral_constant<int, kVec>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// VEC consecutive elements at ptr[off], converted to the accumulation type.
template <int VEC, typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline void load(const scalar_t* ptr, int64_t off, acc_t (&out)[VEC]) {
  const Pack<scalar_t, VEC> pack = *reinterpret_cast<const Pack<scalar_t, VEC>*>(ptr + off);
  for (int v = 0; v < VEC; ++v) out[v] = static_cast<acc_t>(pack.v[v]);
}

template <int VEC, typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline void store(scalar_t* ptr, int64_t off, const acc_t (&in)[VEC]) {
  Pack<scalar_t, VEC> pack;
  for (int v = 0; v < VEC; ++v) pack.v[v] = static_cast<scalar_t>(in[v]);
  *reinterpret_cast<Pack<scalar_t, VEC>*>(ptr + off) = pack;
}

template <typename T>
C10_HOST_DEVICE inline T relu(T x) {
  return x < T(0) ? T(0) : x;  // NaN passes through, as torch.relu
}

// g where the ReLU output y is positive, else 0. On the host this is integer arithmetic on the
// bits (y > 0 exactly when y's bits, read as a signed integer, are positive): GCC compiles
// `g * T(y > 0)` and often `y > 0 ? g : 0` to a branch on the sign of y, which mispredicts half the
// time on real activations (about 10x slower).
template <typename T>
C10_HOST_DEVICE inline T masked_by(T g, T y) {
#if defined(__CUDA_ARCH__)
  return y > T(0) ? g : T(0);
#else
  using Bits = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;
  static_assert(sizeof(T) == sizeof(Bits), "masked_by takes float or double");
  Bits yb, gb;
  std::memcpy(&yb, &y, sizeof(T));
  std::memcpy(&gb, &g, sizeof(T));
  gb &= -static_cast<Bits>(yb > 0);
  std::memcpy(&g, &gb, sizeof(T));
  return g;
#endif
}

// The aggregation node's activations (codes shared with dla_fused/ops/aggregation.py ACTIVATIONS).
enum Activation : int64_t { kIdentity = 0, kRelu = 1, kLeakyRelu = 2, kSilu = 3 };

template <typename T>
C10_HOST_DEVICE inline T exp_of(T x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

template <typename T>
C10_HOST_DEVICE inline T sigmoid(T x) {
  return T(1) / (T(1) + exp_of(-x));
}

// act(y) for an activation code; slope is LeakyReLU's negative slope.
template <typename T>
C10_HOST_DEVICE inline T activate(T y, int64_t act, T slope) {
  switch (act) {
    case kRelu:
      return relu(y);
    case kLeakyRelu:
      return y > T(0) ? y : y * slope;
    case kSilu:
      return y / (T(1) + exp_of(-y));
    default:
      return y;
  }
}

// g * act'(y), from the activation's input y.
template <typename T>
C10_HOST_DEVICE inline T activation_grad(T g, T y, int64_t act, T slope) {
  switch (act) {
    case kRelu:
      return y > T(0) ? g : T(0);
    case kLeakyRelu:
      return y > T(0) ? g : g * slope;
    case kSilu: {
      const T s = sigmoid(y);
      return g * (s * (T(1) + y * (T(1) - s)));
    }
    default:
      return g;
  }
}

// Gradient masks read from the activation's output (nonzero slope: LeakyReLU, whose output is
// positive exactly where its input is, for slope >= 0).
enum Mask : int { kUnmasked = 0, kReluMask = 1, kLeakyMask = 2 };

template <int MASK, typename T>
C10_HOST_DEVICE inline T mask_grad(T g, T out, T slope) {
  if constexpr (MASK == kUnmasked) {
    return g;
  } else if constexpr (MASK == kReluMask) {
    return masked_by(g, out);
  } else {
    return out > T(0) ? g : g * slope;
  }
}

// f(std::integral_constant<int, MASK>{}) for an output-based mask (none when there is no output).
template <typename F>
void with_mask(bool has_out, double slope, F&& f) {
  if (!has_out) {
    f(std::integral_constant<int, kUnmasked>{});
  } else if (slope == 0.0) {
    f(std::integral_constant<int, kReluMask>{});
  } else {
    f(std::integral_constant<int, kLeakyMask>{});
  }
}

C10_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// K running sums.
template <typename acc_t, int K>
struct Sums {
  acc_t v[K];

  C10_HOST_DEVICE static Sums identity() {
    Sums s;
    for (int k = 0; k < K; ++k) s.v[k] = acc_t(0);
    return s;
  }

  C10_HOST_DEVICE void merge(const Sums& o) {
    for (int k = 0; k < K; ++k) v[k] += o.v[k];
  }
};

}  // namespace dla_fused
