// Building blocks of the hand-written kernels, compiled for the host (CPU loops) and the device
// (CUDA kernels) alike: vector loads and stores, reduction states, small math.
//
// Kernels see an activation as rows of contiguous vectors of VEC elements: VEC > 1 only on CUDA,
// where one vector is one 16-byte access (the drivers check length and alignment first).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace dla_fused {

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

C10_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Mean and sum of squared deviations of a stream of values (Welford); two partial states merge
// with the pairwise update of Chan, Golub and LeVeque: d = mean_b - mean_a,
// mean = mean_a + d n_b / n, M2 = M2_a + M2_b + d^2 n_a n_b / n.
template <typename acc_t>
struct Moments {
  acc_t count, mean, m2;

  C10_HOST_DEVICE static Moments identity() { return {acc_t(0), acc_t(0), acc_t(0)}; }

  C10_HOST_DEVICE void add(acc_t x) {
    count += acc_t(1);
    const acc_t d = x - mean;
    mean += d / count;
    m2 += d * (x - mean);
  }

  C10_HOST_DEVICE void merge(const Moments& o) {
    if (o.count == acc_t(0)) return;
    if (count == acc_t(0)) {
      *this = o;
      return;
    }
    const acc_t n = count + o.count;
    const acc_t w = o.count / n;
    const acc_t d = o.mean - mean;
    mean += d * w;
    m2 += o.m2 + d * d * count * w;
    count = n;
  }
};

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
