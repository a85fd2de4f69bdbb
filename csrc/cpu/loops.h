// CPU driver of the hand-written kernels (interface in ../channel_ops.h): at::parallel_for over
// rows, one element per step (VEC = 1; the compiler vectorises the inner loops it can).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <initializer_list>
#include <type_traits>
#include <vector>

namespace dla_fused {

struct CpuLoops {
  static constexpr int64_t kGrainElements = 32768;  // elements per parallel task, at least
  static constexpr int64_t kSlices = 16;            // row slices of a reduction (fixed: deterministic)

  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };

  static void check_dtype(const char* op, at::ScalarType dtype) {
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                "dla_fused::", op, " on CPU supports float32, float16, bfloat16 and float64 tensors, got ", dtype);
  }

  // f(scalar_t{}) for the dtype.
  template <typename F>
  static void dispatch(const char* op, at::ScalarType dtype, F&& f) {
    check_dtype(op, dtype);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dla_fused", [&] { f(scalar_t{}); });
  }

  template <typename scalar_t, typename Make>
  static void for_each(Make&& make, int64_t /*vec_len*/, std::initializer_list<const void*> /*ptrs*/) {
    const auto visit = make(std::integral_constant<int, 1>{});
    const int64_t rows = visit.rows(), inner = visit.inner();
    if (rows == 0 || inner == 0) return;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / inner), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        for (int64_t j = 0; j < inner; ++j) visit(row, j);
      }
    });
  }

  // Partial states per (part, slice of rows, channel), merged per (part, channel) in slice order.
  template <typename scalar_t, typename Make, typename Finish>
  static void reduce(Make&& make, const Finish& finish, int64_t /*vec_len*/,
                     std::initializer_list<const void*> /*ptrs*/, int64_t channels, int64_t parts,
                     const at::Tensor& /*like*/) {
    const auto visit = make(std::integral_constant<int, 1>{});
    using Visit = std::decay_t<decltype(visit)>;
    using State = typename Visit::State;
    static_assert(Visit::vec == 1, "CPU visits are scalar");
    const int64_t rows = visit.rows(), inner = visit.inner();
    const int64_t slices = std::clamp<int64_t>(rows, 1, kSlices);
    const auto first_row = [&](int64_t slice) { return slice * rows / slices; };
    std::vector<State> partial(parts * slices * channels, State::identity());
    if constexpr (Visit::channels_last) {
      // One task per (part, slice) keeps a state per channel; row j is channel j.
      at::parallel_for(0, parts * slices, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t part = task / slices, slice = task % slices;
          State* states = partial.data() + task * channels;
          for (int64_t row = first_row(slice); row < first_row(slice + 1); ++row) {
            for (int64_t j = 0; j < inner; ++j) visit(states + j, row, j, j, part);
          }
        }
      });
    } else {
      // One task per (part, slice, channel).
      at::parallel_for(0, parts * slices * channels, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t c = task % channels, part = task / channels / slices, slice = task / channels % slices;
          State state = State::identity();
          for (int64_t row = first_row(slice); row < first_row(slice + 1); ++row) {
            for (int64_t j = 0; j < inner; ++j) visit(&state, row, j, c, part);
          }
          partial[task] = state;
        }
      });
    }
    at::parallel_for(0, parts * channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t part = t / channels, c = t % channels;
        State state = State::identity();
        for (int64_t slice = 0; slice < slices; ++slice) state.merge(partial[(part * slices + slice) * channels + c]);
        finish(part, c, state);
      }
    });
  }
};

}  // namespace dla_fused
