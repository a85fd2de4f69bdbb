// Op schemas of dla_fused: defined once here; csrc/cpu and csrc/cuda only add implementations
// (TORCH_LIBRARY_IMPL). The Python layer (dla_fused/ops) composes them into the two fused ops.
// Semantics of every op are given by its plain-PyTorch twin in dla_fused/ops/primitives.py.
//
// Conventions: activations are 4-D (N, C, H, W), NCHW or channels_last; results take the memory
// format of their first activation input. Per-channel vectors (scale, shift, mean, ...) are in
// the accumulation type: float64 for float64 activations, float32 otherwise.
#include <torch/extension.h>

TORCH_LIBRARY(dla_fused, m) {
  // Aggregation node: z = sum_i W[:, off_i:off_i + C_i] x_i, per pixel; then optionally
  // z = relu?(z + shift + residual). stats: also return the batch mean and biased variance of z
  // per channel (otherwise two empty tensors).
  m.def("agg_conv(Tensor[] children, Tensor weight, Tensor? shift, Tensor? residual, bool relu, "
        "bool stats) -> (Tensor, Tensor, Tensor)");
  // In place: z = relu(z * scale + shift (+ residual)).
  m.def("agg_apply_(Tensor(a!) z, Tensor scale, Tensor shift, Tensor? residual) -> ()");
  // The same, out of place: returns relu(z * scale + shift (+ residual)), z unchanged.
  m.def("agg_apply(Tensor z, Tensor scale, Tensor shift, Tensor? residual) -> Tensor");
  // g = grad_out * (out > 0) (grad_out when out is None); returns (sum g, sum g * (z - mean)).
  m.def("agg_backward_reduce(Tensor grad_out, Tensor? out, Tensor z, Tensor mean) -> (Tensor, Tensor)");
  // In place: z <- scale * g (+ z_coef * (z - mean) + bias). z is read only when z_coef is given.
  m.def("agg_backward_dz_(Tensor(a!) z, Tensor grad_out, Tensor? out, Tensor scale, Tensor? z_coef, "
        "Tensor? bias, Tensor? mean) -> ()");
  // The same, out of place: returns dz, z unchanged.
  m.def("agg_backward_dz(Tensor z, Tensor grad_out, Tensor? out, Tensor scale, Tensor? z_coef, "
        "Tensor? bias, Tensor? mean) -> Tensor");
  // grad_children[i] = W_i^T dz (+ grad_out * (out > 0) for children[0] when grad_out is given);
  // grad_weight = sum over pixels of dz x^T, laid out like weight.
  m.def("agg_backward_gemm(Tensor dz, Tensor[] children, Tensor weight, Tensor? grad_out, "
        "Tensor? out) -> (Tensor[], Tensor)");
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
