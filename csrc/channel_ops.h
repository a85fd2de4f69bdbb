// Per-channel elementwise passes and per-channel reductions over activations (N, C, P = H*W),
// written once for both devices: a "visit" does the work of one (row, vector) and a driver
// (CpuLoops in cpu/loops.h, CudaLoops in cuda/loops.cuh) runs it over all of them.
//
// Rows of contiguous vectors: NCHW rows are (n, c) with P pixels each; channels_last rows are
// pixels (n, p) with C channels each. Element (n, c, p) is at (n*C + c)*P + p, or (n*P + p)*C + c.
//
// A driver has
//   for_each<scalar_t>(make, vec_len, ptrs):   make(std::integral_constant<int, VEC>) returns a
//       visit with rows(), inner() and operator()(row, j); VEC > 1 when vec_len and every pointer
//       allow vectors of the driver's width (16 bytes on CUDA, 32 on CPU).
//   reduce<scalar_t>(make, finish, vec_len, ptrs, channels, parts, like): the visit also has
//       State, channels_last and vec (its VEC, which may stay 1 whatever was offered), and
//       operator()(State* st, row, j, c, part) adds one vector to st[0..vec) (channels
//       c..c+vec-1 when channels_last, else all channel c); partial states
//       per slice of rows are merged per (part, channel) in a fixed order, then finish(part, c, s).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <type_traits>
#include <utility>

#include "checks.h"
#include "kernel_utils.h"

namespace dla_fused {

// Calls f(std::true_type) or f(std::false_type): turns a run-time flag into a compile-time one, so
// that per-element code has no data-dependent branch left (see masked_by in kernel_utils.h).
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Calls f(std::true_type) for channels_last, f(std::false_type) for NCHW.
template <typename F>
void with_layout(bool channels_last, F&& f) {
  with_flag(channels_last, std::forward<F>(f));
}

// out = op(c, a, b, d) elementwise; b and d may be null (the op then ignores them).
template <typename scalar_t, typename acc_t, int VEC, bool CL, typename Op>
struct ChannelMap {
  scalar_t* out;
  const scalar_t* a;
  const scalar_t* b;
  const scalar_t* d;
  int64_t N, C, P;
  Op op;

  int64_t rows() const { return CL ? N * P : N * C; }
  int64_t inner() const { return (CL ? C : P) / VEC; }

  C10_HOST_DEVICE void operator()(int64_t row, int64_t j) const {
    const int64_t off = row * (CL ? C : P) + j * VEC;
    acc_t av[VEC], bv[VEC], dv[VEC], y[VEC];
    for (int v = 0; v < VEC; ++v) bv[v] = dv[v] = acc_t(0);
    load(a, off, av);
    if (b) load(b, off, bv);
    if (d) load(d, off, dv);
    const int64_t row_channel = CL ? 0 : row % C;
    for (int v = 0; v < VEC; ++v) y[v] = op(CL ? j * VEC + v : row_channel, av[v], bv[v], dv[v]);
    store(out, off, y);
  }
};

// Per-channel reduction: op(state, c, a, b, d) per element. NCHW rows are (image, segment of at
// most kSegment vectors of one channel's pixels), so that small batches still give many rows.
template <typename scalar_t, typename acc_t, int VEC, bool CL, typename Op>
struct ChannelReduce {
  using State = typename Op::State;
  static constexpr bool channels_last = CL;
  static constexpr int vec = VEC;
  static constexpr int64_t kSegment = 2048;

  const scalar_t* a;
  const scalar_t* b;
  const scalar_t* d;
  int64_t N, C, P;
  int64_t seg_len, segments;  // NCHW only
  Op op;

  ChannelReduce(const scalar_t* a, const scalar_t* b, const scalar_t* d, int64_t N, int64_t C,
                int64_t P, Op op)
      : a(a), b(b), d(d), N(N), C(C), P(P),
        seg_len(std::max<int64_t>(1, std::min<int64_t>(P / VEC, kSegment))),
        segments(ceil_div(P / VEC, seg_len)), op(op) {}

  int64_t rows() const { return CL ? N * P : N * segments; }
  int64_t inner() const { return CL ? C / VEC : seg_len; }

  C10_HOST_DEVICE void operator()(State* st, int64_t row, int64_t j, int64_t c, int64_t) const {
    int64_t off;
    if constexpr (CL) {
      off = row * C + j * VEC;
    } else {
      const int64_t vec_in_channel = (row % segments) * seg_len + j;
      if (vec_in_channel * VEC >= P) return;
      off = ((row / segments) * C + c) * P + vec_in_channel * VEC;
    }
    acc_t av[VEC], bv[VEC], dv[VEC];
    for (int v = 0; v < VEC; ++v) bv[v] = dv[v] = acc_t(0);
    load(a, off, av);
    if (b) load(b, off, bv);
    if (d) load(d, off, dv);
    for (int v = 0; v < VEC; ++v) op(st[v], CL ? c + v : c, av[v], bv[v], dv[v]);
  }
};

// out = op(c, a, b, d) over activations all laid out as `channels_last` says (b, d may be
// undefined). make_op(acc_t{}) builds the op for the accumulation type.
template <class Loops, class MakeOp>
void map_channels(const char* name, const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                  const at::Tensor& d, bool channels_last, MakeOp&& make_op) {
  const int64_t N = out.size(0), C = out.size(1), P = out.size(2) * out.size(3);
  dispatch_dtype(name, Loops::kName, out.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const auto op = make_op(acc_t{});
    using Op = std::decay_t<decltype(op)>;
    scalar_t* po = out.data_ptr<scalar_t>();
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = data_or_null<scalar_t>(b);
    const scalar_t* pd = data_or_null<scalar_t>(d);
    with_layout(channels_last, [&](auto layout) {
      constexpr bool CL = decltype(layout)::value;
      Loops::template for_each<scalar_t>(
          [&](auto vec) {
            return ChannelMap<scalar_t, acc_t, decltype(vec)::value, CL, Op>{po, pa, pb, pd, N, C, P, op};
          },
          CL ? C : P, {po, pa, pb, pd});
    });
  });
}

// Per-channel reduction of op over activations a, b, d (b, d may be undefined), all laid out as
// `channels_last` says; make_finish(acc_t{}) builds the finish(part, c, state) that stores results.
template <class Loops, class MakeOp, class MakeFinish>
void reduce_channels(const char* name, const at::Tensor& a, const at::Tensor& b, const at::Tensor& d,
                     bool channels_last, MakeOp&& make_op, MakeFinish&& make_finish) {
  const int64_t N = a.size(0), C = a.size(1), P = a.size(2) * a.size(3);
  dispatch_dtype(name, Loops::kName, a.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const auto op = make_op(acc_t{});
    using Op = std::decay_t<decltype(op)>;
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = data_or_null<scalar_t>(b);
    const scalar_t* pd = data_or_null<scalar_t>(d);
    with_layout(channels_last, [&](auto layout) {
      constexpr bool CL = decltype(layout)::value;
      Loops::template reduce<scalar_t>(
          [&](auto vec) {
            return ChannelReduce<scalar_t, acc_t, decltype(vec)::value, CL, Op>(pa, pb, pd, N, C, P, op);
          },
          make_finish(acc_t{}), CL ? C : P, {pa, pb, pd}, C, /*parts=*/1, a);
    });
  });
}

}  // namespace dla_fused
