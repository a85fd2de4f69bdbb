// GEMM strategy of the aggregation node (see gemm.h), W_i = W[:, off_i:off_i + C_i]:
//   channels_last: an activation is a row-major (N*H*W, C) matrix view. z = sum_i X_i W_i^T by
//     mm then addmm (K = C_i); grad X_i = dZ W_i; grad W_i = dZ^T X_i, one mm with K = N*H*W.
//   NCHW: an activation is a batch of N (C, H*W) matrices. z_n = sum_i W_i X_i,n by bmm then
//     baddbmm with the weight broadcast over the batch (batch stride 0); grad X_i,n = W_i^T dZ_n
//     likewise; grad W_i = sum_n dZ_n X_i,n^T by bmm over chunks of the batch, each chunk summed
//     over images in the accumulation type (float32 for half types).
// Weight slices and their transposes are strided views (leading dimension sum C_i), not copies.
//
// On the CPU in float32, NCHW, with images of at most 64 pixels (with oneDNN available), the
// products go through oneDNN's 1x1 convolution over the concatenated children instead
// (at::convolution, at::convolution_backward), for the price of one copy of the children; the
// gradients of the children are copied out of the concatenation's gradient, dense in each
// child's layout. Measured (whole aggregation node, forward + backward, batch 8, float32, against
// eager, interleaved): oneDNN 0.79-0.93x where the per-image bmm above gives 0.57-0.78x (roots at
// 4x4 and 8x8 pixels, with up to 3328 input channels); at 16x16 and 32x32 pixels, and in
// channels_last at every size, the BLAS products were as fast or faster (0.73-0.96x against
// 0.71-0.94x) without the copies.
#include "gemm.h"

#include <ATen/Context.h>

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

constexpr int64_t kOnednnMaxPixels = 64;  // per image, NCHW (see above)

bool use_onednn(const at::Tensor& x, bool channels_last) {
  return x.device().is_cpu() && x.scalar_type() == at::kFloat && !channels_last &&
         x.size(2) * x.size(3) <= kOnednnMaxPixels && at::globalContext().userEnabledMkldnn() && at::hasMKLDNN();
}

// The children side by side in one (N, sum C_i, H, W) tensor laid out as `channels_last` says.
at::Tensor concatenated(at::TensorList children, bool channels_last) {
  std::vector<at::Tensor> parts;
  for (const at::Tensor& c : children) parts.push_back(in_layout(c, channels_last));
  if (parts.size() == 1) return parts[0];
  return at::cat(parts, 1).contiguous(memory_format(channels_last));
}

const std::vector<int64_t> kOnes{1, 1}, kZeros{0, 0};

}  // namespace

at::Tensor conv1x1(at::TensorList children, const at::Tensor& weight, bool channels_last) {
  const at::Tensor& x0 = children[0];
  const at::Tensor w = weight.to(x0.scalar_type());
  if (use_onednn(x0, channels_last)) {
    const at::Tensor w4 = w.contiguous().view({w.size(0), w.size(1), 1, 1});
    return at::convolution(concatenated(children, channels_last), w4, std::nullopt, kOnes, kZeros, kOnes, false,
                           kZeros, 1)
        .contiguous(memory_format(channels_last));
  }
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
  if (use_onednn(dz, channels_last)) {
    const at::Tensor w4 = w.contiguous().view({w.size(0), w.size(1), 1, 1});
    const at::Tensor x = concatenated(children, channels_last);
    auto [grad_x, grad_w4, unused] = at::convolution_backward(in_layout(dz, channels_last), x, w4, std::nullopt, kOnes,
                                                              kZeros, kOnes, false, kZeros, 1, {true, true, false});
    std::vector<at::Tensor> grads;
    int64_t offset = 0;
    for (size_t i = 0; i < children.size(); ++i) {
      const int64_t c = children[i].size(1);
      at::Tensor part = grad_x.narrow(1, offset, c);
      offset += c;
      at::Tensor grad = at::empty(part.sizes(), part.options().memory_format(memory_format(is_channels_last(children[i]))));
      if (i == 0 && grad_first.defined()) {
        at::add_out(grad, part, grad_first);
      } else {
        grad.copy_(part);
      }
      grads.push_back(grad);
    }
    return {grads, grad_w4.view({w.size(0), w.size(1)}).to(weight.scalar_type())};
  }
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
