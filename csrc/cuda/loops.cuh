// CUDA driver of the hand-written kernels (interface in ../channel_ops.h).
//
// for_each: a 2-D grid of 256-thread blocks, threadIdx.x over the vectors of a row (coalesced
//   16-byte accesses when VEC > 1), threadIdx.y and the grid's y over rows; grid-stride loops.
// reduce: two levels. Level 1, grid (slices, channel tiles or channels, parts): each thread keeps
//   VEC states, a block merges them in shared memory in a fixed tree order and writes one partial
//   state per (part, slice, channel). Level 2: one thread per (part, channel) merges the slices in
//   order and calls finish. Results are deterministic for a given GPU.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "../kernel_utils.h"

namespace dla_fused {
namespace cuda_loops {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 4;   // reductions: slices are chosen to give about this many blocks per SM
constexpr int64_t kMaxGridDim = 65535;

inline int64_t pow2_at_least(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

template <typename Visit>
__global__ void __launch_bounds__(kThreads) for_each_kernel(const Visit visit, int64_t rows, int64_t inner) {
  for (int64_t row = blockIdx.y * int64_t(blockDim.y) + threadIdx.y; row < rows; row += int64_t(gridDim.y) * blockDim.y) {
    for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < inner; j += int64_t(gridDim.x) * blockDim.x) {
      visit(row, j);
    }
  }
}

// Level 1. channels_last: block (x: channel vectors of tile blockIdx.y, y: rows); NCHW: block
// (x: vectors of a row, y: rows) for channel blockIdx.y. Rows are split over gridDim.x slices.
template <typename Visit>
__global__ void __launch_bounds__(kThreads)
    reduce_kernel(const Visit visit, int64_t rows, int64_t inner, int64_t channels, typename Visit::State* partial) {
  using State = typename Visit::State;
  constexpr int VEC = Visit::vec;
  constexpr bool CL = Visit::channels_last;
  constexpr int KEEP = CL ? VEC : 1;  // states per thread kept through the block merge
  extern __shared__ __align__(16) unsigned char reduce_smem[];
  State* smem = reinterpret_cast<State*>(reduce_smem);

  const int64_t part = blockIdx.z;
  State st[VEC];
  for (int v = 0; v < VEC; ++v) st[v] = State::identity();
  for (int64_t row = blockIdx.x * int64_t(blockDim.y) + threadIdx.y; row < rows; row += int64_t(gridDim.x) * blockDim.y) {
    if constexpr (CL) {
      const int64_t j = blockIdx.y * int64_t(blockDim.x) + threadIdx.x;
      if (j < inner) visit(st, row, j, j * VEC, part);
    } else {
      for (int64_t j = threadIdx.x; j < inner; j += blockDim.x) visit(st, row, j, blockIdx.y, part);
    }
  }
  if constexpr (!CL) {
    for (int v = 1; v < VEC; ++v) st[0].merge(st[v]);
  }

  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int v = 0; v < KEEP; ++v) smem[tid * KEEP + v] = st[v];
  __syncthreads();
  for (int s = blockDim.y / 2; s > 0; s >>= 1) {  // over rows
    if (threadIdx.y < s) {
      for (int v = 0; v < KEEP; ++v) smem[tid * KEEP + v].merge(smem[(tid + s * blockDim.x) * KEEP + v]);
    }
    __syncthreads();
  }
  const int64_t slice = (part * gridDim.x + blockIdx.x) * channels;
  if constexpr (CL) {
    if (threadIdx.y == 0) {
      for (int v = 0; v < VEC; ++v) {
        const int64_t c = (blockIdx.y * int64_t(blockDim.x) + threadIdx.x) * VEC + v;
        if (c < channels) partial[slice + c] = smem[threadIdx.x * VEC + v];
      }
    }
  } else {
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {  // over the vectors of a row
      if (threadIdx.y == 0 && threadIdx.x < s) smem[threadIdx.x].merge(smem[threadIdx.x + s]);
      __syncthreads();
    }
    if (tid == 0) partial[slice + blockIdx.y] = smem[0];
  }
}

// Level 2.
template <typename State, typename Finish>
__global__ void finish_kernel(const Finish finish, const State* partial, int64_t slices, int64_t channels,
                              int64_t parts) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= parts * channels) return;
  const int64_t part = t / channels, c = t % channels;
  State state = State::identity();
  for (int64_t s = 0; s < slices; ++s) state.merge(partial[(part * slices + s) * channels + c]);
  finish(part, c, state);
}

template <typename Visit>
void launch_for_each(const Visit& visit) {
  const int64_t rows = visit.rows(), inner = visit.inner();
  if (rows == 0 || inner == 0) return;
  const int64_t tx = std::min<int64_t>(kThreads, pow2_at_least(inner)), ty = kThreads / tx;
  const dim3 block(tx, ty);
  const dim3 grid(std::min(ceil_div(inner, tx), kMaxGridDim), std::min(ceil_div(rows, ty), kMaxGridDim));
  for_each_kernel<<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(visit, rows, inner);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Visit, typename Finish>
void launch_reduce(const Visit& visit, const Finish& finish, int64_t channels, int64_t parts, const at::Tensor& like) {
  using State = typename Visit::State;
  constexpr bool CL = Visit::channels_last;
  constexpr int KEEP = CL ? Visit::vec : 1;
  TORCH_CHECK(channels <= kMaxGridDim && parts <= kMaxGridDim, "dla_fused: at most ", kMaxGridDim,
              " channels and ", kMaxGridDim, " parts per reduction");
  const int64_t rows = visit.rows(), inner = visit.inner();
  const int64_t tx = std::min<int64_t>(CL ? 32 : kThreads, pow2_at_least(std::max<int64_t>(inner, 1)));
  const int64_t ty = kThreads / tx;
  const int64_t tiles = CL ? ceil_div(std::max<int64_t>(inner, 1), tx) : channels;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, like.get_device()));
  const int64_t slices = std::clamp<int64_t>(ceil_div(int64_t(kBlocksPerSm) * sms, tiles * parts), 1,
                                             std::min(std::max<int64_t>(ceil_div(rows, ty), 1), kMaxGridDim));
  at::Tensor partial = at::empty({int64_t(parts * slices * channels * sizeof(State))},
                                 like.options().dtype(at::kByte).memory_format(at::MemoryFormat::Contiguous));
  State* partial_ptr = reinterpret_cast<State*>(partial.data_ptr());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(slices, tiles, parts), block(tx, ty);
  reduce_kernel<<<grid, block, kThreads * KEEP * sizeof(State), stream>>>(visit, rows, inner, channels, partial_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_kernel<<<ceil_div(parts * channels, kThreads), kThreads, 0, stream>>>(finish, partial_ptr, slices,
                                                                                   channels, parts);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_loops

struct CudaLoops {
  class Guard {
   public:
    explicit Guard(const at::Tensor& t) : guard_(t.device()) {}

   private:
    c10::cuda::OptionalCUDAGuard guard_;
  };

  static constexpr const char* kName = "CUDA";  // in error messages

  template <typename scalar_t, typename Make>
  static void for_each(Make&& make, int64_t vec_len, std::initializer_list<const void*> ptrs) {
    with_vector_width<scalar_t, kVecBytes>(vec_len, ptrs,
                                           [&](auto vec) { cuda_loops::launch_for_each(make(vec)); });
  }

  template <typename scalar_t, typename Make, typename Finish>
  static void reduce(Make&& make, const Finish& finish, int64_t vec_len, std::initializer_list<const void*> ptrs,
                     int64_t channels, int64_t parts, const at::Tensor& like) {
    with_vector_width<scalar_t, kVecBytes>(vec_len, ptrs, [&](auto vec) {
      cuda_loops::launch_reduce(make(vec), finish, channels, parts, like);
    });
  }

 private:
  static constexpr int kVecBytes = 16;  // one 128-bit load or store per thread
};

}  // namespace dla_fused
