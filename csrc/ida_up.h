// The IDA-Up primitives (schemas in ops.cpp, semantics in dla_fused/ops/primitives.py), written
// once over a device driver `Loops` (CpuLoops, CudaLoops; see channel_ops.h).
//
// The upsampling is a depthwise conv_transpose2d with kernel K = 2f, stride f, padding f/2: output
// o reads input i at kernel index k where o = i f - pad + k. Along one axis that is exactly two
// taps, (i0, k0) and (i0 - 1, k0 + f) with i0 = (o + pad) / f, k0 = (o + pad) - i0 f; so each
// output pixel gathers a 2x2 neighbourhood of p = relu(z * scale + shift) (computed on the fly).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "channel_ops.h"
#include "checks.h"
#include "kernel_utils.h"

namespace dla_fused {

struct UpGeometry {
  int64_t N, C, h, w;  // the coarse map z
  int64_t Ho, Wo;      // the output
  int64_t f, pad, K;   // stride, padding f/2, kernel 2f
};

// First tap of output position o along one axis (see the file comment).
C10_HOST_DEVICE inline void first_tap(int64_t o, const UpGeometry& g, int64_t& i0, int64_t& k0) {
  i0 = (o + g.pad) / g.f;
  k0 = o + g.pad - i0 * g.f;
}

// p = relu(z * scale + shift), or z without projection (scale null).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t project(acc_t z, const acc_t* scale, const acc_t* shift, int64_t c) {
  return scale ? relu(z * scale[c] + shift[c]) : z;
}

// Without upsampling: out = p + b (b optional).
template <typename acc_t>
struct ProjectAddOp {
  const acc_t* scale;
  const acc_t* shift;
  bool add_b;
  C10_HOST_DEVICE acc_t operator()(int64_t c, acc_t z, acc_t b, acc_t) const {
    const acc_t p = project(z, scale, shift, c);
    return add_b ? p + b : p;
  }
};

// Without upsampling: grad of p masked by p > 0 (unmasked without projection).
template <typename acc_t, bool MASKED>
struct ProjectMaskOp {
  const acc_t* scale;
  const acc_t* shift;
  C10_HOST_DEVICE acc_t operator()(int64_t c, acc_t grad, acc_t, acc_t z) const {
    return MASKED ? masked_by(grad, project(z, scale, shift, c)) : grad;
  }
};

// Depthwise weights in the accumulation type, (K*K, C) for channels_last (VEC channels of one tap
// are contiguous), (C, K*K) for NCHW.
inline at::Tensor tap_weights(const at::Tensor& up_weight, const UpGeometry& g, at::ScalarType acc, bool cl) {
  const at::Tensor w = up_weight.reshape({g.C, g.K * g.K}).to(acc);
  return cl ? w.t().contiguous() : w.contiguous();
}

// One vector of the output: channels_last rows are output pixels (VEC channels), NCHW rows are
// (n, c, oy) (VEC consecutive ox).
template <typename scalar_t, typename acc_t, int VEC, bool CL>
struct UpsampleVisit {
  scalar_t* out;
  const scalar_t* z;
  const scalar_t* skip;
  const acc_t* scale;
  const acc_t* shift;
  const acc_t* weight;
  UpGeometry g;

  int64_t rows() const { return CL ? g.N * g.Ho * g.Wo : g.N * g.C * g.Ho; }
  int64_t inner() const { return (CL ? g.C : g.Wo) / VEC; }

  C10_HOST_DEVICE void operator()(int64_t row, int64_t j) const {
    acc_t y[VEC];
    for (int v = 0; v < VEC; ++v) y[v] = acc_t(0);
    int64_t off, iy0, ky0, ix0, kx0;
    if constexpr (CL) {
      const int64_t ox = row % g.Wo, oy = (row / g.Wo) % g.Ho, n = row / (g.Wo * g.Ho), c0 = j * VEC;
      first_tap(oy, g, iy0, ky0);
      first_tap(ox, g, ix0, kx0);
      for (int dy = 0; dy < 2; ++dy) {
        const int64_t iy = iy0 - dy;
        if (iy < 0 || iy >= g.h) continue;
        for (int dx = 0; dx < 2; ++dx) {
          const int64_t ix = ix0 - dx;
          if (ix < 0 || ix >= g.w) continue;
          acc_t zv[VEC];
          load(z, ((n * g.h + iy) * g.w + ix) * g.C + c0, zv);
          const acc_t* wt = weight + ((ky0 + dy * g.f) * g.K + kx0 + dx * g.f) * g.C + c0;
          for (int v = 0; v < VEC; ++v) y[v] += project(zv[v], scale, shift, c0 + v) * wt[v];
        }
      }
      off = row * g.C + c0;
    } else {
      const int64_t oy = row % g.Ho, nc = row / g.Ho, c = nc % g.C, ox0 = j * VEC;
      const scalar_t* zc = z + nc * g.h * g.w;
      const acc_t* wc = weight + c * g.K * g.K;
      first_tap(oy, g, iy0, ky0);
      first_tap(ox0, g, ix0, kx0);
      for (int v = 0; v < VEC; ++v) {
        if (v > 0 && ++kx0 == g.f) {  // the next output column: no division per element
          kx0 = 0;
          ++ix0;
        }
        for (int dy = 0; dy < 2; ++dy) {
          const int64_t iy = iy0 - dy;
          if (iy < 0 || iy >= g.h) continue;
          for (int dx = 0; dx < 2; ++dx) {
            const int64_t ix = ix0 - dx;
            if (ix < 0 || ix >= g.w) continue;
            y[v] += project(static_cast<acc_t>(zc[iy * g.w + ix]), scale, shift, c) *
                    wc[(ky0 + dy * g.f) * g.K + kx0 + dx * g.f];
          }
        }
      }
      off = row * g.Wo + ox0;
    }
    if (skip) {
      acc_t s[VEC];
      load(skip, off, s);
      for (int v = 0; v < VEC; ++v) y[v] += s[v];
    }
    store(out, off, y);
  }
};

// One vector of the gradient of p: input pixel (iy, ix) gathers grad_out over its 2f x 2f window
// (oy = iy f - pad + ky), then masks by p > 0. Rows as UpsampleVisit's, over the coarse map.
template <typename scalar_t, typename acc_t, int VEC, bool CL>
struct UpsampleGradVisit {
  scalar_t* grad_p;
  const scalar_t* grad_out;
  const scalar_t* z;
  const acc_t* scale;
  const acc_t* shift;
  const acc_t* weight;
  UpGeometry g;

  int64_t rows() const { return CL ? g.N * g.h * g.w : g.N * g.C * g.h; }
  int64_t inner() const { return (CL ? g.C : g.w) / VEC; }

  C10_HOST_DEVICE void operator()(int64_t row, int64_t j) const {
    acc_t acc[VEC];
    for (int v = 0; v < VEC; ++v) acc[v] = acc_t(0);
    int64_t off;
    if constexpr (CL) {
      const int64_t ix = row % g.w, iy = (row / g.w) % g.h, n = row / (g.w * g.h), c0 = j * VEC;
      for (int64_t ky = 0; ky < g.K; ++ky) {
        const int64_t oy = iy * g.f - g.pad + ky;
        if (oy < 0 || oy >= g.Ho) continue;
        for (int64_t kx = 0; kx < g.K; ++kx) {
          const int64_t ox = ix * g.f - g.pad + kx;
          if (ox < 0 || ox >= g.Wo) continue;
          acc_t gv[VEC];
          load(grad_out, ((n * g.Ho + oy) * g.Wo + ox) * g.C + c0, gv);
          const acc_t* wt = weight + (ky * g.K + kx) * g.C + c0;
          for (int v = 0; v < VEC; ++v) acc[v] += gv[v] * wt[v];
        }
      }
      off = row * g.C + c0;
    } else {
      const int64_t iy = row % g.h, nc = row / g.h, c = nc % g.C, ix0 = j * VEC;
      const scalar_t* gc = grad_out + nc * g.Ho * g.Wo;
      const acc_t* wc = weight + c * g.K * g.K;
      for (int64_t ky = 0; ky < g.K; ++ky) {
        const int64_t oy = iy * g.f - g.pad + ky;
        if (oy < 0 || oy >= g.Ho) continue;
        for (int v = 0; v < VEC; ++v) {
          for (int64_t kx = 0; kx < g.K; ++kx) {
            const int64_t ox = (ix0 + v) * g.f - g.pad + kx;
            if (ox < 0 || ox >= g.Wo) continue;
            acc[v] += static_cast<acc_t>(gc[oy * g.Wo + ox]) * wc[ky * g.K + kx];
          }
        }
      }
      off = row * g.w + ix0;
    }
    if (scale) {
      acc_t zv[VEC];
      load(z, off, zv);
      const int64_t c = CL ? j * VEC : (row / g.h) % g.C;
      for (int v = 0; v < VEC; ++v) acc[v] = masked_by(acc[v], project(zv[v], scale, shift, CL ? c + v : c));
    }
    store(grad_p, off, acc);
  }
};

// Gradient of the depthwise weights, a reduction over images and positions. Output positions
// split into f x f residue classes (part = ry f + rx with ry = (oy + pad) mod f): in class
// (ry, rx) every output pixel uses the taps (ry + dy f, rx + dx f), dy, dx in {0, 1}, with input
// (iy0 - dy, ix0 - dx); each class sums those four taps. Rows are (n, a, b) output pixels of the
// class (oy = oy_first + a f, ox = ox_first + b f) for channels_last, (n, a) with j = b for NCHW
// (scalar: the class's pixels are strided).
template <typename scalar_t, typename acc_t, int VEC, bool CL>
struct UpWeightGradVisit {
  using State = Sums<acc_t, 4>;
  static constexpr bool channels_last = CL;
  static constexpr int vec = VEC;
  static_assert(CL || VEC == 1, "NCHW classes are strided: scalar only");

  const scalar_t* grad_out;
  const scalar_t* z;
  const acc_t* scale;
  const acc_t* shift;
  UpGeometry g;

  int64_t class_rows() const { return ceil_div(g.Ho, g.f); }
  int64_t class_cols() const { return ceil_div(g.Wo, g.f); }
  int64_t rows() const { return CL ? g.N * class_rows() * class_cols() : g.N * class_rows(); }
  int64_t inner() const { return CL ? g.C / VEC : class_cols(); }

  C10_HOST_DEVICE void operator()(State* st, int64_t row, int64_t j, int64_t c, int64_t part) const {
    const int64_t rows_per_image = ceil_div(g.Ho, g.f), cols = ceil_div(g.Wo, g.f);
    int64_t n, a, b;
    if constexpr (CL) {
      b = row % cols;
      a = (row / cols) % rows_per_image;
      n = row / (cols * rows_per_image);
    } else {
      a = row % rows_per_image;
      n = row / rows_per_image;
      b = j;
    }
    const int64_t ry = part / g.f, rx = part % g.f;
    const int64_t oy = ((ry - g.pad) % g.f + g.f) % g.f + a * g.f;
    const int64_t ox = ((rx - g.pad) % g.f + g.f) % g.f + b * g.f;
    if (oy >= g.Ho || ox >= g.Wo) return;
    const int64_t iy0 = (oy + g.pad) / g.f, ix0 = (ox + g.pad) / g.f;
    acc_t gv[VEC];
    load(grad_out, CL ? ((n * g.Ho + oy) * g.Wo + ox) * g.C + c : ((n * g.C + c) * g.Ho + oy) * g.Wo + ox, gv);
    for (int dy = 0; dy < 2; ++dy) {
      const int64_t iy = iy0 - dy;
      if (iy < 0 || iy >= g.h) continue;
      for (int dx = 0; dx < 2; ++dx) {
        const int64_t ix = ix0 - dx;
        if (ix < 0 || ix >= g.w) continue;
        acc_t zv[VEC];
        load(z, CL ? ((n * g.h + iy) * g.w + ix) * g.C + c : ((n * g.C + c) * g.h + iy) * g.w + ix, zv);
        for (int v = 0; v < VEC; ++v) st[v].v[dy * 2 + dx] += gv[v] * project(zv[v], scale, shift, c + v);
      }
    }
  }
};

template <typename acc_t>
struct UpWeightGradFinish {
  acc_t* grad;  // (C, K, K)
  int64_t f, K;
  C10_HOST_DEVICE void operator()(int64_t part, int64_t c, const Sums<acc_t, 4>& s) const {
    const int64_t ry = part / f, rx = part % f;
    for (int dy = 0; dy < 2; ++dy) {
      for (int dx = 0; dx < 2; ++dx) grad[(c * K + ry + dy * f) * K + rx + dx * f] = s.v[dy * 2 + dx];
    }
  }
};

template <class Loops>
struct IdaUp {
  static at::Tensor upsample(const at::Tensor& z, const std::optional<at::Tensor>& scale,
                             const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& up_weight,
                             int64_t factor, const std::optional<at::Tensor>& skip) {
    constexpr const char* op = "ida_upsample";
    const UpGeometry g = check_and_measure(op, z, scale, shift, up_weight, factor);
    check_activation_like(op, "skip", skip, z, {g.N, g.C, g.Ho, g.Wo});
    typename Loops::Guard guard(z);

    const bool cl = is_channels_last(z);
    const at::Tensor zz = in_layout(z, cl), sk = in_layout(skip, cl);
    at::Tensor out = at::empty({g.N, g.C, g.Ho, g.Wo}, z.options().memory_format(memory_format(cl)));
    if (!up_weight) {
      map_channels<Loops>(op, out, zz, sk, {}, cl, [&](auto acc) {
        using acc_t = decltype(acc);
        return ProjectAddOp<acc_t>{data_or_null<acc_t>(scale), data_or_null<acc_t>(shift), sk.defined()};
      });
      return out;
    }
    const at::Tensor taps = tap_weights(*up_weight, g, acc_type(z.scalar_type()), cl);
    dispatch_dtype(op, Loops::kName, z.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* po = out.data_ptr<scalar_t>();
      const scalar_t* pz = zz.data_ptr<scalar_t>();
      const scalar_t* ps = data_or_null<scalar_t>(sk);
      const acc_t *scale_p = data_or_null<acc_t>(scale), *shift_p = data_or_null<acc_t>(shift);
      const acc_t* pw = taps.data_ptr<acc_t>();
      with_layout(cl, [&](auto layout) {
        constexpr bool CL = decltype(layout)::value;
        Loops::template for_each<scalar_t>(
            [&](auto vec) {
              return UpsampleVisit<scalar_t, acc_t, decltype(vec)::value, CL>{po, pz, ps, scale_p, shift_p, pw, g};
            },
            CL ? g.C : g.Wo, {po, ps, CL ? pz : nullptr});
      });
    });
    return out;
  }

  static std::tuple<at::Tensor, at::Tensor> upsample_backward(const at::Tensor& grad_out, const at::Tensor& z,
                                                              const std::optional<at::Tensor>& scale,
                                                              const std::optional<at::Tensor>& shift,
                                                              const std::optional<at::Tensor>& up_weight,
                                                              int64_t factor) {
    constexpr const char* op = "ida_upsample_backward";
    const UpGeometry g = check_and_measure(op, z, scale, shift, up_weight, factor);
    check_activation_like(op, "grad_out", grad_out, z, {g.N, g.C, g.Ho, g.Wo});
    typename Loops::Guard guard(z);

    const bool cl = is_channels_last(z);
    const at::Tensor zz = in_layout(z, cl), go = in_layout(grad_out, cl);
    at::Tensor grad_p = at::empty(z.sizes(), z.options().memory_format(memory_format(cl)));
    if (!up_weight) {
      with_flag(scale.has_value(), [&](auto masked) {
        map_channels<Loops>(op, grad_p, go, {}, zz, cl, [&](auto acc) {
          using acc_t = decltype(acc);
          return ProjectMaskOp<acc_t, decltype(masked)::value>{data_or_null<acc_t>(scale), data_or_null<acc_t>(shift)};
        });
      });
      return {grad_p, at::empty({0}, z.options())};
    }
    const auto acc_dtype = acc_type(z.scalar_type());
    const at::Tensor taps = tap_weights(*up_weight, g, acc_dtype, cl);
    at::Tensor grad_w = at::empty({g.C, 1, g.K, g.K}, z.options().dtype(acc_dtype));
    dispatch_dtype(op, Loops::kName, z.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* pgp = grad_p.data_ptr<scalar_t>();
      const scalar_t* pgo = go.data_ptr<scalar_t>();
      const scalar_t* pz = zz.data_ptr<scalar_t>();
      const acc_t *scale_p = data_or_null<acc_t>(scale), *shift_p = data_or_null<acc_t>(shift);
      const acc_t* pw = taps.data_ptr<acc_t>();
      with_layout(cl, [&](auto layout) {
        constexpr bool CL = decltype(layout)::value;
        Loops::template for_each<scalar_t>(
            [&](auto vec) {
              return UpsampleGradVisit<scalar_t, acc_t, decltype(vec)::value, CL>{pgp,     pgo, pz, scale_p,
                                                                                 shift_p, pw,  g};
            },
            CL ? g.C : g.w, {pgp, pz, CL ? pgo : nullptr});
        Loops::template reduce<scalar_t>(
            [&](auto vec) {
              return UpWeightGradVisit<scalar_t, acc_t, CL ? decltype(vec)::value : 1, CL>{pgo, pz, scale_p,
                                                                                           shift_p, g};
            },
            UpWeightGradFinish<acc_t>{grad_w.data_ptr<acc_t>(), g.f, g.K}, g.C, {pgo, pz}, g.C, g.f * g.f, zz);
      });
    });
    return {grad_p, grad_w.to(up_weight->scalar_type())};
  }

 private:
  static UpGeometry check_and_measure(const char* op, const at::Tensor& z, const std::optional<at::Tensor>& scale,
                                      const std::optional<at::Tensor>& shift,
                                      const std::optional<at::Tensor>& up_weight, int64_t factor) {
    check_activation(op, "z", z);
    check_dtype(op, Loops::kName, z.scalar_type());
    TORCH_CHECK(factor >= 1, "dla_fused::", op, ": factor must be at least 1, got ", factor);
    UpGeometry g{z.size(0), z.size(1), z.size(2), z.size(3), z.size(2), z.size(3), factor, factor / 2, 2 * factor};
    TORCH_CHECK(scale.has_value() == shift.has_value(), "dla_fused::", op, ": scale and shift go together");
    check_channel_vector(op, "scale", scale, g.C, z);
    check_channel_vector(op, "shift", shift, g.C, z);
    if (up_weight) {
      const at::Tensor& u = *up_weight;
      TORCH_CHECK(u.dim() == 4 && u.size(0) == g.C && u.size(1) == 1 && u.size(2) == g.K && u.size(3) == g.K &&
                      at::isFloatingType(u.scalar_type()) && u.device() == z.device(),
                  "dla_fused::", op, ": up_weight must be a floating-point (", g.C, ", 1, ", g.K, ", ", g.K,
                  ") tensor on ", z.device(), " for factor ", factor, ", got ", u.scalar_type(), " of shape ",
                  u.sizes(), " on ", u.device());
      g.Ho = (g.h - 1) * g.f - 2 * g.pad + g.K;
      g.Wo = (g.w - 1) * g.f - 2 * g.pad + g.K;
    }
    return g;
  }
};

}  // namespace dla_fused
