// Op schemas of dla_fused: defined once here; csrc/cpu and csrc/cuda only add implementations
// (TORCH_LIBRARY_IMPL). The Python layer (dla_fused/ops) composes them into the two fused ops.
// Semantics of every op are given by its plain-PyTorch twin in dla_fused/ops/primitives.py.
//
// Conventions: activations are 4-D (N, C, H, W), NCHW or channels_last; results take the memory
// format of their first activation input. Per-channel vectors (scale, shift, mean, ...) are in
// the accumulation type: float64 for float64 activations, float32 otherwise.
#include <torch/extension.h>

TORCH_LIBRARY(dla_fused, m) {
  // Activations (act): 0 identity, 1 ReLU, 2 LeakyReLU with negative slope `slope` (>= 0),
  // 3 SiLU. A gradient "masked by out" is grad_out where out > 0 and slope * grad_out elsewhere
  // (ReLU: slope 0; LeakyReLU; out None: grad_out itself); SiLU's needs its input, see
  // agg_activation_grad.
  //
  // Aggregation node: z = sum_i W[:, off_i:off_i + C_i] x_i, per pixel; then optionally
  // z = z + shift + residual and, when activate, act(z). stats: also return the batch mean and
  // biased variance of z per channel (otherwise two empty tensors).
  m.def("agg_conv(Tensor[] children, Tensor weight, Tensor? shift, Tensor? residual, bool activate, "
        "bool stats, int act=1, float slope=0.0) -> (Tensor, Tensor, Tensor)");
  // In place: z = act(z * scale + shift (+ residual)).
  m.def("agg_apply_(Tensor(a!) z, Tensor scale, Tensor shift, Tensor? residual, int act=1, "
        "float slope=0.0) -> ()");
  // The same, out of place: returns act(z * scale + shift (+ residual)), z unchanged.
  m.def("agg_apply(Tensor z, Tensor scale, Tensor shift, Tensor? residual, int act=1, "
        "float slope=0.0) -> Tensor");
  // Returns grad_out * act'(z * scale + shift (+ residual)).
  m.def("agg_activation_grad(Tensor grad_out, Tensor z, Tensor scale, Tensor shift, Tensor? residual, "
        "int act, float slope) -> Tensor");
  // g = grad_out masked by out; returns (sum g, sum g * (z - mean)).
  m.def("agg_backward_reduce(Tensor grad_out, Tensor? out, Tensor z, Tensor mean, float slope=0.0) "
        "-> (Tensor, Tensor)");
  // In place: z <- scale * g (+ z_coef * (z - mean) + bias), g = grad_out masked by out. z is read
  // only when z_coef is given.
  m.def("agg_backward_dz_(Tensor(a!) z, Tensor grad_out, Tensor? out, Tensor scale, Tensor? z_coef, "
        "Tensor? bias, Tensor? mean, float slope=0.0) -> ()");
  // The same, out of place: returns dz, z unchanged.
  m.def("agg_backward_dz(Tensor z, Tensor grad_out, Tensor? out, Tensor scale, Tensor? z_coef, "
        "Tensor? bias, Tensor? mean, float slope=0.0) -> Tensor");
  // grad_children[i] = W_i^T dz (+ grad_out masked by out, for children[0] when grad_out is
  // given); grad_weight = sum over pixels of dz x^T, laid out like weight.
  m.def("agg_backward_gemm(Tensor dz, Tensor[] children, Tensor weight, Tensor? grad_out, "
        "Tensor? out, float slope=0.0) -> (Tensor[], Tensor)");
  // IDA-Up: p = relu(z * scale + shift) (p = z when scale is None);
  // out = conv_transpose2d(p, up_weight, stride=factor, padding=factor // 2, groups=C) (p when
  // up_weight is None) (+ skip).
  m.def("ida_upsample(Tensor z, Tensor? scale, Tensor? shift, Tensor? up_weight, int factor, "
        "Tensor? skip) -> Tensor");
  // Returns (grad of p masked by p > 0 when scale is given, grad of up_weight or an empty tensor).
  m.def("ida_upsample_backward(Tensor grad_out, Tensor z, Tensor? scale, Tensor? shift, "
        "Tensor? up_weight, int factor) -> (Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.attr("with_cuda") = static_cast<bool>(DLA_FUSED_WITH_CUDA);
}
