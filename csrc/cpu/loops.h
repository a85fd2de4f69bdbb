// CPU driver of the hand-written kernels (interface in ../channel_ops.h): at::parallel_for over
// rows, one vector of 32 bytes per step when length and alignment allow (the visit's fixed-size
// loops over the vector then compile to SIMD), one element otherwise.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "../kernel_utils.h"

namespace dla_fused {

struct CpuLoops {
  static constexpr int64_t kGrainElements = 32768;  // elements per parallel task, at least
  static constexpr int64_t kSlices = 16;            // row slices of a reduction (fixed: deterministic)

  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };

  static constexpr const char* kName = "CPU";  // in error messages

  template <typename scalar_t, typename Make>
  static void for_each(Make&& make, int64_t vec_len, std::initializer_list<const void*> ptrs) {
    with_vector_width<scalar_t, kVecBytes>(vec_len, ptrs, [&](auto vec) { run(make(vec)); });
  }

  template <typename scalar_t, typename Make, typename Finish>
  static void reduce(Make&& make, const Finish& finish, int64_t vec_len, std::initializer_list<const void*> ptrs,
                     int64_t channels, int64_t parts, const at::Tensor& /*like*/) {
    with_vector_width<scalar_t, kVecBytes>(vec_len, ptrs,
                                           [&](auto vec) { run_reduce(make(vec), finish, channels, parts); });
  }

 private:
  static constexpr int kVecBytes = 32;  // one AVX register: the fixed-size inner loops vectorise

  template <typename Visit>
  static void run(const Visit& visit) {
    const int64_t rows = visit.rows(), inner = visit.inner();
    if (rows == 0 || inner == 0) return;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / inner), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        for (int64_t j = 0; j < inner; ++j) visit(row, j);
      }
    });
  }

  // Partial states per (part, slice of rows, channel), merged per (part, channel) in slice order.
  template <typename Visit, typename Finish>
  static void run_reduce(const Visit& visit, const Finish& finish, int64_t channels, int64_t parts) {
    using State = typename Visit::State;
    constexpr int VEC = Visit::vec;
    const int64_t rows = visit.rows(), inner = visit.inner();
    const int64_t slices = std::clamp<int64_t>(rows, 1, kSlices);
    const auto first_row = [&](int64_t slice) { return slice * rows / slices; };
    std::vector<State> partial(parts * slices * channels, State::identity());
    if constexpr (Visit::channels_last) {
      // One task per (part, slice) keeps a state per channel; vector j holds channels j*VEC...
      at::parallel_for(0, parts * slices, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t part = task / slices, slice = task % slices;
          State* states = partial.data() + task * channels;
          for (int64_t row = first_row(slice); row < first_row(slice + 1); ++row) {
            for (int64_t j = 0; j < inner; ++j) visit(states + j * VEC, row, j, j * VEC, part);
          }
        }
      });
    } else {
      // One task per (part, slice, channel), VEC states merged at the end.
      at::parallel_for(0, parts * slices * channels, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t c = task % channels, part = task / channels / slices, slice = task / channels % slices;
          State states[VEC];
          for (int v = 0; v < VEC; ++v) states[v] = State::identity();
          for (int64_t row = first_row(slice); row < first_row(slice + 1); ++row) {
            for (int64_t j = 0; j < inner; ++j) visit(states, row, j, c, part);
          }
          for (int v = 1; v < VEC; ++v) states[0].merge(states[v]);
          partial[task] = states[0];
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
