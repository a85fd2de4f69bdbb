// The aggregation-node primitives (schemas in ops.cpp, semantics in dla_fused/ops/primitives.py),
// written once over a device driver `Loops` (CpuLoops, CudaLoops): the matrix products go through
// ATen (gemm.h); the per-element math below runs in the hand-written loops of channel_ops.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "channel_ops.h"
#include "checks.h"
#include "gemm.h"
#include "kernel_utils.h"

namespace dla_fused {

// y = a * scale + shift + b, then the activation (each step optional): the epilogue of agg_conv
// (no scale) and agg_apply_. ReLU (GENERIC false) is compiled on its own, branch-free; the other
// activations (GENERIC) switch on `act`.
template <typename acc_t, bool GENERIC>
struct AffineOp {
  const acc_t* scale;
  const acc_t* shift;
  bool add_b;
  bool act_out;
  int64_t act;
  acc_t slope;

  C10_HOST_DEVICE acc_t operator()(int64_t c, acc_t a, acc_t b, acc_t) const {
    acc_t y = scale ? a * scale[c] : a;
    if (shift) y = y + shift[c];
    if (add_b) y = y + b;
    if (!act_out) return y;
    if constexpr (GENERIC) {
      return activate(y, act, slope);
    } else {
      return relu(y);
    }
  }
};

// g * act'(y) with y = z * scale + shift + r (r when add_r): the activation's gradient from its
// recomputed input (agg_activation_grad).
template <typename acc_t>
struct ActivationGradOp {
  const acc_t* scale;
  const acc_t* shift;
  bool add_r;
  int64_t act;
  acc_t slope;

  C10_HOST_DEVICE acc_t operator()(int64_t c, acc_t g, acc_t r, acc_t z) const {
    acc_t y = z * scale[c] + shift[c];
    if (add_r) y = y + r;
    return activation_grad(g, y, act, slope);
  }
};

// g = a masked by the activation output b (mask_grad), then g * scale + z_coef * (z - mean) + bias
// (each step optional; bias and mean come with z_coef): agg_backward_dz_ and the masked gradient.
template <typename acc_t, int MASK>
struct GradOp {
  const acc_t* scale;
  const acc_t* z_coef;
  const acc_t* bias;
  const acc_t* mean;
  acc_t slope;

  C10_HOST_DEVICE acc_t operator()(int64_t c, acc_t a, acc_t b, acc_t z) const {
    acc_t g = mask_grad<MASK>(a, b, slope);
    if (scale) g = g * scale[c];
    if (z_coef) g = g + z_coef[c] * (z - mean[c]) + bias[c];
    return g;
  }
};

// Batch mean and biased variance of z from sums of (z - k) and (z - k)^2, with k[c] one value of
// channel c (the shifted-data algorithm): the shift removes the mean's magnitude, so a mean of 100
// with a standard deviation of 1 loses no precision to cancellation, and no per-element division
// is needed (unlike Welford's update).
template <typename acc_t>
struct MomentsOp {
  using State = Sums<acc_t, 2>;
  const acc_t* k;
  C10_HOST_DEVICE void operator()(State& s, int64_t c, acc_t z, acc_t, acc_t) const {
    const acc_t d = z - k[c];
    s.v[0] += d;
    s.v[1] += d * d;
  }
};

template <typename acc_t>
struct MomentsFinish {
  const acc_t* k;
  acc_t* mean;
  acc_t* var;
  acc_t count;
  C10_HOST_DEVICE void operator()(int64_t, int64_t c, const Sums<acc_t, 2>& s) const {
    const acc_t m = s.v[0] / count;
    mean[c] = k[c] + m;
    const acc_t v = s.v[1] / count - m * m;
    var[c] = v > acc_t(0) ? v : acc_t(0);
  }
};

// sum g and sum g (z - mean), g = grad_out masked by the activation output (mask_grad).
template <typename acc_t, int MASK>
struct GradSumsOp {
  using State = Sums<acc_t, 2>;
  const acc_t* mean;
  acc_t slope;
  C10_HOST_DEVICE void operator()(State& s, int64_t c, acc_t grad, acc_t out, acc_t z) const {
    const acc_t g = mask_grad<MASK>(grad, out, slope);
    s.v[0] += g;
    s.v[1] += g * (z - mean[c]);
  }
};

template <typename acc_t>
struct SumsFinish {
  acc_t* first;
  acc_t* second;
  C10_HOST_DEVICE void operator()(int64_t, int64_t c, const Sums<acc_t, 2>& s) const {
    first[c] = s.v[0];
    second[c] = s.v[1];
  }
};

template <class Loops>
struct Aggregation {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> conv(at::TensorList children, const at::Tensor& weight,
                                                             const std::optional<at::Tensor>& shift,
                                                             const std::optional<at::Tensor>& residual,
                                                             bool activate, bool stats, int64_t act, double slope) {
    constexpr const char* op = "agg_conv";
    const int64_t c_out = check_children_and_weight(op, children, weight, at::Tensor());
    const at::Tensor& x0 = children[0];
    const int64_t N = x0.size(0), H = x0.size(2), W = x0.size(3);
    check_channel_vector(op, "shift", shift, c_out, x0);
    check_activation_like(op, "residual", residual, x0, {N, c_out, H, W});
    typename Loops::Guard guard(x0);

    const bool cl = is_channels_last(x0);
    at::Tensor z = conv1x1(children, weight, cl);
    const auto vec_options = x0.options().dtype(acc_type(x0.scalar_type()));
    at::Tensor mean = at::empty({stats ? c_out : 0}, vec_options);
    at::Tensor var = at::empty({stats ? c_out : 0}, vec_options);
    if (stats) {
      const at::Tensor k = z.select(0, 0).select(1, 0).select(1, 0).to(vec_options).contiguous();  // z[0, :, 0, 0]
      reduce_channels<Loops>(
          op, z, {}, {}, cl,
          [&](auto acc) {
            using acc_t = decltype(acc);
            return MomentsOp<acc_t>{k.data_ptr<acc_t>()};
          },
          [&](auto acc) {
            using acc_t = decltype(acc);
            return MomentsFinish<acc_t>{k.data_ptr<acc_t>(), mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(),
                                        static_cast<acc_t>(N * H * W)};
          });
    }
    if (shift || residual || activate) {
      const at::Tensor res = in_layout(residual, cl);
      with_flag(activate && act != kRelu, [&](auto generic) {
        map_channels<Loops>(op, z, z, res, {}, cl, [&](auto acc) {
          using acc_t = decltype(acc);
          return AffineOp<acc_t, decltype(generic)::value>{nullptr, data_or_null<acc_t>(shift), res.defined(),
                                                           activate, act, static_cast<acc_t>(slope)};
        });
      });
    }
    return {z, mean, var};
  }

  static void apply_(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                     const std::optional<at::Tensor>& residual, int64_t act, double slope) {
    apply_impl("agg_apply_", z, scale, shift, residual, act, slope, /*in_place=*/true);
  }

  // Out of place: returns act(z * scale + shift (+ residual)) in z's layout; z is kept (the
  // backward of the keep-z mode reads it).
  static at::Tensor apply(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                          const std::optional<at::Tensor>& residual, int64_t act, double slope) {
    return apply_impl("agg_apply", z, scale, shift, residual, act, slope, /*in_place=*/false);
  }

  // grad_out * act'(z * scale + shift (+ residual)), in grad_out's layout.
  static at::Tensor activation_grad(const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& scale,
                                    const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                                    int64_t act, double slope) {
    constexpr const char* op = "agg_activation_grad";
    check_activation(op, "grad_out", grad_out);
    check_dtype(op, Loops::kName, grad_out.scalar_type());
    check_activation_like(op, "z", z, grad_out, grad_out.sizes().vec());
    check_activation_like(op, "residual", residual, grad_out, grad_out.sizes().vec());
    check_channel_vector(op, "scale", scale, grad_out.size(1), grad_out);
    check_channel_vector(op, "shift", shift, grad_out.size(1), grad_out);
    check_act(op, act, slope);
    typename Loops::Guard guard(grad_out);

    const bool cl = is_channels_last(grad_out);
    const at::Tensor g = in_layout(grad_out, cl), zz = in_layout(z, cl), res = in_layout(residual, cl);
    const at::Tensor result = at::empty(g.sizes(), g.options().memory_format(memory_format(cl)));
    map_channels<Loops>(op, result, g, res, zz, cl, [&](auto acc) {
      using acc_t = decltype(acc);
      return ActivationGradOp<acc_t>{scale.data_ptr<acc_t>(), shift.data_ptr<acc_t>(), res.defined(), act,
                                     static_cast<acc_t>(slope)};
    });
    return result;
  }

  static std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& grad_out,
                                                            const std::optional<at::Tensor>& out,
                                                            const at::Tensor& z, const at::Tensor& mean,
                                                            double slope) {
    constexpr const char* op = "agg_backward_reduce";
    check_activation(op, "grad_out", grad_out);
    check_dtype(op, Loops::kName, grad_out.scalar_type());
    check_activation_like(op, "out", out, grad_out, grad_out.sizes().vec());
    check_activation_like(op, "z", z, grad_out, grad_out.sizes().vec());
    const int64_t C = grad_out.size(1);
    check_channel_vector(op, "mean", mean, C, grad_out);
    typename Loops::Guard guard(grad_out);

    const bool cl = is_channels_last(grad_out);
    const at::Tensor g = in_layout(grad_out, cl), o = in_layout(out, cl), zz = in_layout(z, cl);
    at::Tensor sum_g = at::empty({C}, mean.options());
    at::Tensor sum_gz = at::empty({C}, mean.options());
    with_mask(o.defined(), slope, [&](auto mask) {
      reduce_channels<Loops>(
          op, g, o, zz, cl,
          [&](auto acc) {
            using acc_t = decltype(acc);
            return GradSumsOp<acc_t, decltype(mask)::value>{mean.data_ptr<acc_t>(), static_cast<acc_t>(slope)};
          },
          [&](auto acc) {
            using acc_t = decltype(acc);
            return SumsFinish<acc_t>{sum_g.data_ptr<acc_t>(), sum_gz.data_ptr<acc_t>()};
          });
    });
    return {sum_g, sum_gz};
  }

  static void backward_dz_(const at::Tensor& z, const at::Tensor& grad_out, const std::optional<at::Tensor>& out,
                           const at::Tensor& scale, const std::optional<at::Tensor>& z_coef,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mean,
                           double slope) {
    dz_impl("agg_backward_dz_", z, grad_out, out, scale, z_coef, bias, mean, slope, /*in_place=*/true);
  }

  // Out of place: returns dz = scale * g (+ z_coef * (z - mean) + bias) in z's layout, z unchanged.
  static at::Tensor backward_dz(const at::Tensor& z, const at::Tensor& grad_out, const std::optional<at::Tensor>& out,
                                const at::Tensor& scale, const std::optional<at::Tensor>& z_coef,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mean,
                                double slope) {
    return dz_impl("agg_backward_dz", z, grad_out, out, scale, z_coef, bias, mean, slope, /*in_place=*/false);
  }

  static std::tuple<std::vector<at::Tensor>, at::Tensor> backward_gemm(const at::Tensor& dz, at::TensorList children,
                                                                       const at::Tensor& weight,
                                                                       const std::optional<at::Tensor>& grad_out,
                                                                       const std::optional<at::Tensor>& out,
                                                                       double slope) {
    constexpr const char* op = "agg_backward_gemm";
    check_activation(op, "dz", dz);
    check_dtype(op, Loops::kName, dz.scalar_type());
    const int64_t c_out = check_children_and_weight(op, children, weight, dz);
    TORCH_CHECK(c_out == dz.size(1), "dla_fused::", op, ": weight has ", c_out, " rows but dz has ", dz.size(1),
                " channels");
    if (grad_out) {
      check_activation_like(op, ArgName("children", 0), children[0], dz, dz.sizes().vec());
    }
    check_activation_like(op, "grad_out", grad_out, dz, dz.sizes().vec());
    check_activation_like(op, "out", out, dz, dz.sizes().vec());
    typename Loops::Guard guard(dz);

    const bool cl = is_channels_last(dz);
    const at::Tensor d = in_layout(dz, cl);
    at::Tensor first;  // masked grad_out, onto which the product for children[0] accumulates
    if (grad_out) {
      first = at::empty(d.sizes(), d.options().memory_format(memory_format(cl)));
      const at::Tensor o = in_layout(out, cl);
      with_mask(o.defined(), slope, [&](auto mask) {
        map_channels<Loops>(op, first, in_layout(grad_out, cl), o, {}, cl, [&](auto acc) {
          using acc_t = decltype(acc);
          return GradOp<acc_t, decltype(mask)::value>{nullptr, nullptr, nullptr, nullptr, static_cast<acc_t>(slope)};
        });
      });
    }
    return conv1x1_backward(d, children, weight, first, cl);
  }

 private:
  // act(z * scale + shift (+ residual)): into z itself (returned) or into a new tensor in z's layout.
  static at::Tensor apply_impl(const char* op, const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                               const std::optional<at::Tensor>& residual, int64_t act, double slope, bool in_place) {
    check_activation(op, "z", z);
    check_dtype(op, Loops::kName, z.scalar_type());
    check_channel_vector(op, "scale", scale, z.size(1), z);
    check_channel_vector(op, "shift", shift, z.size(1), z);
    check_activation_like(op, "residual", residual, z, z.sizes().vec());
    check_act(op, act, slope);
    typename Loops::Guard guard(z);

    const bool cl = is_channels_last(z);
    const at::Tensor zz = in_layout(z, cl);
    const at::Tensor res = in_layout(residual, cl);
    const at::Tensor result = in_place ? zz : at::empty(zz.sizes(), zz.options().memory_format(memory_format(cl)));
    with_flag(act != kRelu, [&](auto generic) {
      map_channels<Loops>(op, result, zz, res, {}, cl, [&](auto acc) {
        using acc_t = decltype(acc);
        return AffineOp<acc_t, decltype(generic)::value>{scale.data_ptr<acc_t>(), shift.data_ptr<acc_t>(),
                                                         res.defined(), true, act, static_cast<acc_t>(slope)};
      });
    });
    if (in_place && !result.is_same(z)) z.copy_(result);
    return in_place ? z : result;
  }

  // dz = scale * g (+ z_coef * (z - mean) + bias): into z itself (returned) or into a new tensor.
  static at::Tensor dz_impl(const char* op, const at::Tensor& z, const at::Tensor& grad_out,
                            const std::optional<at::Tensor>& out, const at::Tensor& scale,
                            const std::optional<at::Tensor>& z_coef, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& mean, double slope, bool in_place) {
    check_activation(op, "z", z);
    check_dtype(op, Loops::kName, z.scalar_type());
    check_activation_like(op, "grad_out", grad_out, z, z.sizes().vec());
    check_activation_like(op, "out", out, z, z.sizes().vec());
    const int64_t C = z.size(1);
    check_channel_vector(op, "scale", scale, C, z);
    check_channel_vector(op, "z_coef", z_coef, C, z);
    check_channel_vector(op, "bias", bias, C, z);
    check_channel_vector(op, "mean", mean, C, z);
    TORCH_CHECK(!z_coef || (bias && mean), "dla_fused::", op, ": z_coef needs bias and mean");
    typename Loops::Guard guard(z);

    const bool cl = is_channels_last(z);
    const at::Tensor zz = in_layout(z, cl);
    const at::Tensor g = in_layout(grad_out, cl), o = in_layout(out, cl);
    const at::Tensor result = in_place ? zz : at::empty(zz.sizes(), zz.options().memory_format(memory_format(cl)));
    with_mask(o.defined(), slope, [&](auto mask) {
      map_channels<Loops>(op, result, g, o, z_coef ? zz : at::Tensor(), cl, [&](auto acc) {
        using acc_t = decltype(acc);
        return GradOp<acc_t, decltype(mask)::value>{scale.data_ptr<acc_t>(), data_or_null<acc_t>(z_coef),
                                                    data_or_null<acc_t>(bias), data_or_null<acc_t>(mean),
                                                    static_cast<acc_t>(slope)};
      });
    });
    if (in_place && !result.is_same(z)) z.copy_(result);
    return in_place ? z : result;
  }

  static void check_act(const char* op, int64_t act, double slope) {
    TORCH_CHECK(act >= kIdentity && act <= kSilu, "dla_fused::", op,
                ": act must be 0 (identity), 1 (relu), 2 (leaky_relu) or 3 (silu), got ", act);
    TORCH_CHECK(slope >= 0.0 && slope == slope, "dla_fused::", op, ": slope must be >= 0, got ", slope);
  }

  // Children: 4-D activations like `like` in dtype and device with children[0]'s N, H, W;
  // weight: (C_out, sum C_i). Returns C_out.
  static int64_t check_children_and_weight(const char* op, at::TensorList children, const at::Tensor& weight,
                                           const at::Tensor& like) {
    TORCH_CHECK(!children.empty(), "dla_fused::", op, ": children must hold at least one tensor");
    check_activation(op, ArgName("children", 0), children[0]);
    const at::Tensor& ref = like.defined() ? like : children[0];
    check_dtype(op, Loops::kName, ref.scalar_type());
    const at::Tensor& x0 = children[0];
    int64_t total = 0;
    for (size_t i = 0; i < children.size(); ++i) {
      check_activation_like(op, ArgName("children", static_cast<int64_t>(i)), children[i], ref,
                            {ref.size(0), -1, ref.size(2), ref.size(3)});
      total += children[i].size(1);
    }
    TORCH_CHECK(weight.dim() == 2 && weight.size(1) == total && at::isFloatingType(weight.scalar_type()) &&
                    weight.device() == x0.device(),
                "dla_fused::", op, ": weight must be a floating-point (C_out, ", total, ") matrix on ", x0.device(),
                " (the children have ", total, " channels), got ", weight.scalar_type(), " of shape ", weight.sizes(),
                " on ", weight.device());
    return weight.size(0);
  }
};

}  // namespace dla_fused
