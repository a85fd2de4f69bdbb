// The matrix products of the aggregation node, through ATen (BLAS on CPU, cuBLAS on CUDA), on
// strided views over each child: the concatenation of the children is never materialised.
// Same code for both devices; gemm.cpp explains the strategy per layout.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace dla_fused {

// z = sum_i W[:, off_i:off_i + C_i] x_i per pixel: the 1x1 convolution of the concatenated children.
// z is laid out as NCHW or channels_last (`channels_last`); children in the other layout are
// converted first. weight is the 2-D (C_out, sum C_i) matrix.
at::Tensor conv1x1(at::TensorList children, const at::Tensor& weight, bool channels_last);

// Gradients of conv1x1 for dz, laid out as `channels_last` says: grad_children[i] = W_i^T dz, each
// in its child's layout, and grad_weight = sum over pixels of dz x_i^T, laid out and typed like
// weight. When grad_first is defined (dz's shape and layout) it is added to grad_children[0]: the
// product accumulates onto it in place.
std::tuple<std::vector<at::Tensor>, at::Tensor> conv1x1_backward(
    const at::Tensor& dz, at::TensorList children, const at::Tensor& weight,
    const at::Tensor& grad_first, bool channels_last);

}  // namespace dla_fused
