// Python bindings of the token-major scan and conv kernels (module memba_vision._scan_cuda).
//
//   scan_fwd(u, delta, A, B, C, D, z, delta_bias, S, W, softplus, reverse) -> y
//   scan_bwd(u, delta, A, B, C, D, z, delta_bias, S, W, dout, softplus, reverse)
//       -> (du, ddelta, dz or None, dB, dC)
//   conv_fwd(x, weight, bias, reverse, silu) -> y
//   conv_bwd(x, weight, bias, grad_y, reverse, silu) -> dx
//
// u, delta, z, dout, x, grad_y: (B, L, D) with the channel axis contiguous;
// B, C: (B, L, 16) and the gate spikes S: (B, L, 16), state axis contiguous (slices
// of a wider tensor are fine); A (D, 16), D and delta_bias (D,), the gate weight
// W (D, 16), conv weight (D, 4) and bias (D,): fp32. Optional arguments may be
// None. Results are contiguous, in u's (x's) dtype; dB and dC are fp32.
// The frozen parameters (A, D, delta_bias, W's rows, conv weight/bias) get no
// gradient here: the autograd wrappers in memba_vision.ops compute W's and S's
// gradients from dz with two small matrix products.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "scan_kernel.h"

namespace memba_scan {
namespace {

using OptTensor = std::optional<at::Tensor>;

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "memba_vision scan: unsupported dtype ", t.scalar_type());
  }
  return DType::kFloat32;
}

void check_tokens(const at::Tensor& t, const at::Tensor& ref, int64_t last, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), "memba_vision scan: ", name,
              " must be a CUDA tensor on ", ref.device());
  TORCH_CHECK(t.dim() == 3 && t.size(0) == ref.size(0) && t.size(1) == ref.size(1) &&
                  t.size(2) == last,
              "memba_vision scan: ", name, " must be (", ref.size(0), ", ", ref.size(1), ", ",
              last, "), got ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1, "memba_vision scan: ", name, "'s last axis must be contiguous");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "memba_vision scan: ", name, " is ",
              t.scalar_type(), " but u is ", ref.scalar_type());
}

void check_param(const at::Tensor& t, const at::Tensor& ref, at::IntArrayRef shape,
                 const char* name) {
  TORCH_CHECK(t.device() == ref.device() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.sizes() == shape,
              "memba_vision scan: ", name, " must be a contiguous fp32 CUDA tensor of shape ",
              shape, ", got ", t.sizes(), " ", t.scalar_type());
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "memba_vision scan: ", what, " failed: ",
              cudaGetErrorString(err));
}

ScanParams make_params(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                       const at::Tensor& B, const at::Tensor& C, const OptTensor& D,
                       const OptTensor& z, const OptTensor& bias, const OptTensor& S,
                       const OptTensor& W, bool softplus, bool reverse) {
  TORCH_CHECK(u.is_cuda() && u.dim() == 3 && u.stride(2) == 1,
              "memba_vision scan: u must be a CUDA (B, L, D) tensor with contiguous channels, got ",
              u.sizes());
  const int64_t batch = u.size(0), L = u.size(1), dim = u.size(2);
  TORCH_CHECK(L >= 1 && batch >= 1 && dim >= 1, "memba_vision scan: empty input");
  TORCH_CHECK(batch <= 65535 && L < (1 << 30) && dim < (1 << 24),
              "memba_vision scan: input too large: ", u.sizes());
  check_tokens(delta, u, dim, "delta");
  check_tokens(B, u, kStates, "B");
  check_tokens(C, u, kStates, "C");
  check_param(A, u, {dim, kStates}, "A");
  if (present(D)) check_param(*D, u, {dim}, "D");
  if (present(bias)) check_param(*bias, u, {dim}, "delta_bias");
  if (present(z)) check_tokens(*z, u, dim, "z");
  TORCH_CHECK(present(S) == present(W), "memba_vision scan: gate spikes and weight go together");
  if (present(S)) {
    check_tokens(*S, u, kGateRank, "gate spikes");
    check_param(*W, u, {dim, kGateRank}, "gate weight");
  }
  ScanParams p{};
  p.batch = static_cast<int>(batch);
  p.seqlen = static_cast<int>(L);
  p.dim = static_cast<int>(dim);
  p.nchunks = static_cast<int>((L + scan_chunk_len() - 1) / scan_chunk_len());
  p.reverse = reverse;
  p.softplus = softplus;
  p.has_z = present(z) || present(S);  // gate z' = (z or 0) + S W^T
  p.has_D = present(D);
  p.has_bias = present(bias);
  p.has_gate = present(S);
  p.u = u.data_ptr(); p.u_sb = u.stride(0); p.u_sl = u.stride(1);
  p.delta = delta.data_ptr(); p.dl_sb = delta.stride(0); p.dl_sl = delta.stride(1);
  p.Bm = B.data_ptr(); p.B_sb = B.stride(0); p.B_sl = B.stride(1);
  p.Cm = C.data_ptr(); p.C_sb = C.stride(0); p.C_sl = C.stride(1);
  if (present(z)) { p.z = z->data_ptr(); p.z_sb = z->stride(0); p.z_sl = z->stride(1); }
  if (p.has_gate) {
    p.S = S->data_ptr(); p.S_sb = S->stride(0); p.S_sl = S->stride(1);
    p.W = W->data_ptr<float>();
  }
  p.A = A.data_ptr<float>();
  p.Dv = p.has_D ? D->data_ptr<float>() : nullptr;
  p.bias = p.has_bias ? bias->data_ptr<float>() : nullptr;
  return p;
}

at::Tensor scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                    const at::Tensor& B, const at::Tensor& C, const OptTensor& D,
                    const OptTensor& z, const OptTensor& bias, const OptTensor& S,
                    const OptTensor& W, bool softplus, bool reverse) {
  ScanParams p = make_params(u, delta, A, B, C, D, z, bias, S, W, softplus, reverse);
  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor out = at::empty(u.sizes(), u.options());
  p.out = out.data_ptr();
  check_cuda(scan_forward(p, dtype_of(u), false, at::cuda::getCurrentCUDAStream()), "scan_fwd");
  return out;
}

std::tuple<at::Tensor, at::Tensor, OptTensor, at::Tensor, at::Tensor> scan_bwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& bias,
    const OptTensor& S, const OptTensor& W, const at::Tensor& dout, bool softplus, bool reverse) {
  ScanParams p = make_params(u, delta, A, B, C, D, z, bias, S, W, softplus, reverse);
  check_tokens(dout, u, u.size(2), "grad_out");
  const c10::cuda::CUDAGuard guard(u.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto f32 = u.options().dtype(at::kFloat);
  const int64_t nblocks = (u.size(2) + scan_channels_per_block() - 1) / scan_channels_per_block();
  at::Tensor ckpt = at::empty({u.size(0), p.nchunks, u.size(2), kStates}, f32);
  at::Tensor dbc = at::empty({u.size(0), nblocks, u.size(1), 2 * kStates}, f32);
  at::Tensor du = at::empty(u.sizes(), u.options());
  at::Tensor ddelta = at::empty(u.sizes(), u.options());
  OptTensor dz;
  if (p.has_z) dz = at::empty(u.sizes(), u.options());
  p.ckpt = ckpt.data_ptr<float>();
  p.dout = dout.data_ptr(); p.do_sb = dout.stride(0); p.do_sl = dout.stride(1);
  p.du = du.data_ptr();
  p.ddelta = ddelta.data_ptr();
  p.dz = p.has_z ? dz->data_ptr() : nullptr;
  p.dbc = dbc.data_ptr<float>();
  check_cuda(scan_forward(p, dtype_of(u), true, stream), "scan_bwd (state checkpoints)");
  check_cuda(scan_backward(p, dtype_of(u), stream), "scan_bwd");
  at::Tensor dbc_sum = nblocks == 1 ? dbc.select(1, 0) : dbc.sum(1);  // (B, L, 2N)
  return {du, ddelta, dz, dbc_sum.narrow(2, 0, kStates), dbc_sum.narrow(2, kStates, kStates)};
}

ConvParams make_conv(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                     bool reverse, bool silu) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 3 && x.stride(2) == 1,
              "memba_vision conv: x must be a CUDA (B, L, D) tensor with contiguous channels, got ",
              x.sizes());
  TORCH_CHECK(x.size(0) <= 65535, "memba_vision conv: batch too large");
  check_param(weight, x, {x.size(2), 4}, "conv weight (width 4)");
  if (present(bias)) check_param(*bias, x, {x.size(2)}, "conv bias");
  dtype_of(x);
  ConvParams p{};
  p.batch = static_cast<int>(x.size(0));
  p.seqlen = static_cast<int>(x.size(1));
  p.dim = static_cast<int>(x.size(2));
  p.width = 4;
  p.reverse = reverse;
  p.silu = silu;
  p.x = x.data_ptr(); p.x_sb = x.stride(0); p.x_sl = x.stride(1);
  p.w = weight.data_ptr<float>();
  p.bias = present(bias) ? bias->data_ptr<float>() : nullptr;
  return p;
}

at::Tensor conv_fwd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                    bool reverse, bool silu) {
  ConvParams p = make_conv(x, weight, bias, reverse, silu);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  p.out = out.data_ptr();
  check_cuda(conv_forward(p, dtype_of(x), at::cuda::getCurrentCUDAStream()), "conv_fwd");
  return out;
}

at::Tensor conv_bwd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                    const at::Tensor& grad_y, bool reverse, bool silu) {
  ConvParams p = make_conv(x, weight, bias, reverse, silu);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.stride(2) == 1 &&
                  grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(),
              "memba_vision conv: grad_y must match x (", x.sizes(), ", ", x.scalar_type(),
              ") with contiguous channels");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty(x.sizes(), x.options());
  p.g = grad_y.data_ptr(); p.g_sb = grad_y.stride(0); p.g_sl = grad_y.stride(1);
  p.out = dx.data_ptr();
  check_cuda(conv_backward(p, dtype_of(x), at::cuda::getCurrentCUDAStream()), "conv_bwd");
  return dx;
}

}  // namespace
}  // namespace memba_scan

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Token-major selective scan and depthwise causal conv (frozen SSM parameters)";
  m.def("scan_fwd", &memba_scan::scan_fwd, "selective scan forward");
  m.def("scan_bwd", &memba_scan::scan_bwd, "selective scan backward");
  m.def("conv_fwd", &memba_scan::conv_fwd, "depthwise causal conv + SiLU forward");
  m.def("conv_bwd", &memba_scan::conv_bwd, "depthwise causal conv + SiLU backward (input grad)");
}
