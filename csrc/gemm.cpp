// GEMM strategy of the aggregation node (see gemm.h), W_i = W[:, off_i:off_i + C_i]:
//   channels_last: an activation is a row-major (N*H*W, C) matrix view. z = sum_i X_i W_i^T by
//     mm then addmm (K = C_i); grad X_i = dZ W_i; grad W_i = dZ^T X_i, one mm with K = N*H*W.
//   NCHW: an activation is a batch of N (C, H*W) matrices. z_n = sum_i W_i X_i,n by bmm then
//     baddbmm with the weight broadcast over the batch (batch stride 0); grad X_i,n = W_i^T dZ_n
//     likewise; grad W_i = sum_n dZ_n X_i,n^T by bmm over chunks of the batch, each chunk summed
//     over images in the accumulation type (float32 for half types).
// Weight slices and their transposes are strided views (leading dimension sum C_i), not copies.
#include "gemm.h"

#include <algorithm>

#include "checks.h"

namespace dla_fused {
namespace {

// Largest (images x C_out x C_i) block of per-image weight products held at once (NCHW).
constexpr int64_t kWeightProductElements = int64_t{1} << 24;

// The (N*H*W, C) matrix of a channels_last activation, or the (N, C, H*W) batch of an NCHW one.
at::Tensor as_matrices(const at::Tensor& x, bool channels_last) {
  if (channels_last) return x.permute({0, 2, 3, 1}).view({-1, x.size(1)});
  return x.view({x.size(0), x.size(1), x.size(2) * x.size(3)});
}

// out (+)= x m for (pixels, channels) matrices; out_n (+)= m^T x_n per image for NCHW batches.
void channel_product(at::Tensor& out, const at::Tensor& x, const at::Tensor& m, bool channels_last,
                     bool accumulate) {
  if (channels_last) {
    if (accumulate) {
      out.addmm_(x, m);
    } else {
      at::mm_out(out, x, m);
    }
    return;
  }
  const at::Tensor mt = m.t().expand({x.size(0), m.size(1), m.size(0)});
  if (accumulate) {
    out.baddbmm_(mt, x);
  } else {
    at::bmm_out(out, mt, x);
  }
}

// sum over pixels of dz x^T, a (C_out, C_x) matrix.
at::Tensor weight_product(const at::Tensor& dzm, const at::Tensor& xm, bool channels_last,
                          at::ScalarType acc) {
  if (channels_last) return at::mm(dzm.t(), xm);
  const int64_t images = dzm.size(0);
  const int64_t per_image = std::max<int64_t>(1, dzm.size(1) * xm.size(1));
  const int64_t chunk = std::clamp<int64_t>(kWeightProductElements / per_image, 1, std::max<int64_t>(images, 1));
  at::Tensor sum = at::zeros({dzm.size(1), xm.size(1)}, dzm.options().dtype(acc));
  for (int64_t start = 0; start < images; start += chunk) {
    const int64_t len = std::min(chunk, images - start);
    sum.add_(at::bmm(dzm.narrow(0, start, len), xm.narrow(0, start, len).transpose(1, 2))
                 .sum({0}, /*keepdim=*/false, acc));
  }
  return sum;
}

}  // namespace

at::Tensor conv1x1(at::TensorList children, const at::Tensor& weight, bool channels_last) {
  const at::Tensor& x0 = children[0];
  const at::Tensor w = weight.to(x0.scalar_type());
  at::Tensor z = at::empty({x0.size(0), w.size(0), x0.size(2), x0.size(3)},
                           x0.options().memory_format(memory_format(channels_last)));
  at::Tensor zm = as_matrices(z, channels_last);
  int64_t offset = 0;
  for (size_t i = 0; i < children.size(); ++i) {
    const int64_t c = children[i].size(1);
    channel_product(zm, as_matrices(in_layout(children[i], channels_last), channels_last),
                    w.narrow(1, offset, c).t(), channels_last, /*accumulate=*/i > 0);
    offset += c;
  }
  return z;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> conv1x1_backward(
    const at::Tensor& dz, at::TensorList children, const at::Tensor& weight,
    const at::Tensor& grad_first, bool channels_last) {
  const at::Tensor w = weight.to(dz.scalar_type());
  const at::Tensor dzm = as_matrices(dz, channels_last);
  const auto acc = acc_type(dz.scalar_type());
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  std::vector<at::Tensor> grads;
  int64_t offset = 0;
  for (size_t i = 0; i < children.size(); ++i) {
    const at::Tensor& child = children[i];
    const int64_t c = child.size(1);
    const bool onto_first = i == 0 && grad_first.defined();
    at::Tensor grad = onto_first ? grad_first
                                 : at::empty(child.sizes(), dz.options().memory_format(memory_format(channels_last)));
    at::Tensor gm = as_matrices(grad, channels_last);
    channel_product(gm, dzm, w.narrow(1, offset, c), channels_last, /*accumulate=*/onto_first);
    grads.push_back(in_layout(grad, is_channels_last(child)));
    grad_weight.narrow(1, offset, c)
        .copy_(weight_product(dzm, as_matrices(in_layout(child, channels_last), channels_last),
                              channels_last, acc));
    offset += c;
  }
  return {grads, grad_weight};
}

}  // namespace dla_fused
