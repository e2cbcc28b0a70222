// Python bindings of the token-major scan and conv kernels (module memba_vision._scan_cuda).
//
//   scan_fwd(u, delta, A, B, C, D, z, delta_bias, softplus, reverse,
//            out=None, out_scale=1, accumulate=False, save_states=False) -> (y, states)
//   scan_bwd(u, delta, A, B, C, D, z, delta_bias, dout, states, softplus, reverse,
//            dout_scale=1, dz_out=None, dz_accumulate=False, dBC_out=None, dA_out=None,
//            dD_out=None) -> (du, ddelta, dz or None, dB, dC)
//   scan_dirs_fwd(u, delta, A, B, C, D, delta_bias, softplus, reverse, rows, out=None,
//                 save_states=False) -> (y (B, L, K, D), states)
//   scan_dirs_bwd(u, delta, A, B, C, D, delta_bias, dout, states, softplus, reverse, rows,
//                 du_out=None, dBC_out=None, dA_out=None, dD_out=None)
//       -> (du, ddelta (B, L, K, D), dB, dC (B, L, K, 16))
//       K <= 4 scans of one u in one launch, each with its own delta, B, C (B, L, K, *),
//       A (K, D, 16), D and delta_bias (K, D), reverse[k] and rows[k] (rows > 0: the L
//       tokens are a row-major (rows, L / rows) grid, scanned column by column); no gate.
//       dout (B, L, D) is shared (the scans' outputs are summed downstream); out and du_out
//       may be fp32 whatever u's dtype.
//   states: with save_states, the forward also returns the scan's state before every 16th
//       step, (B, ceil(L / 16), D, 16) fp32 ((K, B, ...) for scan_dirs), which the backward
//       takes (None without save_states: inference).
//   conv_fwd(x, weight, bias, reverse, silu) -> y
//   conv_bwd(x, weight, bias, grad_y, reverse, silu, out=None, accumulate=False) -> dx
//   gate_z_fwd(S, W, z=None) -> z' (2, B, L, D)
//   gate_z_bwd(dz, dv, W_in, out) -> dv_sum (B, L, 16)
//       Memba's gate branch on Vim: z'_k = z + S_k W^T for both scan directions (S (2, B, L,
//       16), W (D, 16)); the backward writes dz'_0 + dz'_1 + (dv_0 + dv_1) W_in into ``out``
//       (B, L, D) (dz (2, B, L, D) the scans' z' gradients, or None: z' = S W^T without the
//       residual; dv (2, B, L, 16); W_in (16, D)) and returns dv_0 + dv_1. S, dv, dz and z'
//       contiguous in z's dtype; z and out (B, L, D) with equally spaced 4-element-aligned rows
//       (a half of in_proj's output or of its gradient is fine); W, W_in fp32 contiguous;
//       S, dv, dz, W and W_in 16-byte aligned.
//   lim_pair_fwd(x, u_prev_f, u_prev_b, num_chunks, leak, threshold) -> (out, u_mean)
//   lim_pair_bwd(x, u_prev_f, u_prev_b, grad_out, grad_mean_f, grad_mean_b, num_chunks,
//                leak, threshold) -> (grad_x, grad_u_prev_f or None, grad_u_prev_b or None)
//   dwconv_fwd(x, weight, bias) -> u
//   dwconv_bwd(x, weight, bias, grad_u) -> dx
//       VMamba's depthwise 3 x 3 conv (padding 1) + bias + SiLU, channels-last: x (B, H, W,
//       D) with D, its pixel strides and its address multiples of 4 elements (a half of
//       in_proj's output is fine), weight (D, 1, 3, 3) and bias (D,) fp32 (or None); u, dx
//       and grad_u (B, H, W, D) contiguous in x's dtype. The weight and bias get no gradient.
//   layer_norm_fwd(x, weight, bias, eps) -> (out, mean, rstd)
//   layer_norm_bwd(x, weight, bias, mean, rstd, dout) -> dx
//       LayerNorm over the last axis of x (..., D) in x's dtype (VMamba's block norms under
//       autocast): x, out, dout and dx contiguous in x's dtype, D % 4 == 0, D <= 2048; weight
//       and bias (D,) fp32, which get no gradient here; the statistics and the affine in
//       fp32; mean and rstd (rows,) fp32.
//   norm_gate_fwd(y, weight, bias, eps, z, c=None) -> (out, mean, rstd)
//   norm_gate_bwd(y, weight, bias, z, mean, rstd, dout, c=None) -> (dy, dz)
//       VMamba's output gate LayerNorm(y) * silu(z + c), y (B, L, D) fp32 contiguous, z
//       (B, L, D) equally spaced rows (a half of in_proj's output is fine), c (B, L, D)
//       contiguous in z's dtype or None, D % 4 == 0, D <= 2048; out and dz (the gradient of
//       z and of c) in z's dtype, dy fp32, contiguous; mean and rstd (B, L) fp32.
//
// The optional outputs let a caller fuse the glue around the kernels: ``out`` /
// ``dz_out`` / conv ``out`` may be strided (B, L, D) views (e.g. a half of a
// (B, L, 2D) gradient) and are added to with ``accumulate``; y is stored times
// ``out_scale`` and the backward reads ``dout_scale * dout``; ``dBC_out`` (B, L, 2N),
// fp32 or u's dtype with a contiguous last axis, receives dB | dC. For trainable A and D,
// ``dA_out`` (D, 16) and ``dD_out`` (D,) (scan_dirs_bwd: (K, D, 16) and (K, D)), fp32
// contiguous, receive their gradients (the other parameters' gradients follow from ddelta,
// dB and dC: the callers compute them with matrix products). The LIM pair works
// on x (B, L, R), shared by the two directions, and returns them stacked: out and grad_x
// (2, B, L, R), u_mean (2, B, l, R); or on x (B, L, 2, R), one input per direction, and
// returns out and grad_x in x's layout.
//
// u, delta, z, dout, x, grad_y: (B, L, D) with the channel axis contiguous;
// B, C: (B, L, 16), state axis contiguous (slices of a wider tensor are fine); A (D, 16),
// D and delta_bias (D,), conv weight (D, 4) and bias (D,): fp32. Optional arguments may be
// None. Results are contiguous, in u's (x's) dtype; dB and dC are fp32.
// The gate weights' gradients are computed by the autograd wrappers in memba_vision.ops with
// small matrix products; the conv weight and bias get no gradient here.
//
// Every op checks the device, dtype, shape and strides of all its tensor arguments
// before it reads a pointer or allocates (kernels/common/tensor_checks.h); a wrong one
// raises RuntimeError "memba_vision <op>: <argument> must ...". Outputs given as
// buffers must not be expanded (repeated elements). u / x and the LIM pair's x are
// fp32, fp16 or bf16; the LIM pair's tensors are contiguous.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <typeinfo>

#include "../common/tensor_checks.h"
#include "scan_kernel.h"

namespace memba_scan {
namespace {

using OptTensor = std::optional<at::Tensor>;
using memba_checks::check_tensor;
using memba_checks::kAny;
using memba_checks::shape_text;
using memba_checks::Strides;

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: MEMBA_CHECK(false, "memba_vision scan: unsupported dtype ", t.scalar_type());
  }
  return DType::kFloat32;
}

constexpr at::ScalarType kKernelDtypes[] = {at::kFloat, at::kHalf, at::kBFloat16};

// The tensor an op takes its device from: defined and on a GPU.
void check_cuda_tensor(const char* op, const char* arg, const at::Tensor& t) {
  MEMBA_CHECK(t.defined() && t.is_cuda(), op, ": ", arg, " must be a CUDA tensor, got ",
              t.defined() ? t.device().str() : std::string("an undefined tensor"));
}

// A tensor the kernels read or write 4 elements at a time.
void check_aligned4(const char* op, const char* arg, const at::Tensor& t) {
  MEMBA_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % (4 * t.element_size()) == 0, op, ": ",
              arg, "'s address must be a multiple of 4 elements");
}

// The first token-major tensor of an op (u, x): a CUDA (B, L, C) tensor of a kernel
// dtype with a contiguous last axis, non-empty and within the kernels' index ranges.
void check_leading(const char* op, const char* arg, const at::Tensor& t) {
  check_cuda_tensor(op, arg, t);
  check_tensor(op, arg, t, t.device(), kKernelDtypes, {kAny, kAny, kAny}, Strides::kLastAxis);
  MEMBA_CHECK(t.size(0) >= 1 && t.size(1) >= 1 && t.size(2) >= 1, op, ": ", arg,
              " must not be empty, got ", shape_text(t.sizes()));
  MEMBA_CHECK(t.size(0) <= 65535 && t.size(1) < (1 << 30) && t.size(2) < (1 << 24), op, ": ",
              arg, " is too large: ", shape_text(t.sizes()));
}

// A (B, L, last) tensor like u: same device and dtype, contiguous last axis.
void check_tokens(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& u,
                  int64_t last, bool output = false) {
  check_tensor(op, arg, t, u.device(), u.scalar_type(), {u.size(0), u.size(1), last},
               Strides::kLastAxis, output);
}

// A frozen parameter: contiguous fp32 on u's device.
void check_param(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& u,
                 at::IntArrayRef shape) {
  check_tensor(op, arg, t, u.device(), at::kFloat, shape, Strides::kContiguous);
}

void check_cuda(cudaError_t err, const char* what) {
  MEMBA_CHECK(err == cudaSuccess, "memba_vision scan: ", what, " failed: ",
              cudaGetErrorString(err));
}

// Every input of the scan (both directions of the op share them).
void check_scan_inputs(const char* op, const at::Tensor& u, const at::Tensor& delta,
                       const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                       const OptTensor& D, const OptTensor& z, const OptTensor& bias) {
  check_leading(op, "u", u);
  const int64_t dim = u.size(2);
  check_tokens(op, "delta", delta, u, dim);
  check_param(op, "A", A, u, {dim, kStates});
  check_tokens(op, "B", B, u, kStates);
  check_tokens(op, "C", C, u, kStates);
  if (present(D)) check_param(op, "D", *D, u, {dim});
  if (present(z)) check_tokens(op, "z", *z, u, dim);
  if (present(bias)) check_param(op, "delta_bias", *bias, u, {dim});
}

// A (B, L, D) tensor read or written a channel quad at a time: its token rows (b, t) equally
// spaced and starting at multiples of 4 elements (e.g. a half of in_proj's output).
void check_quad_rows(const char* op, const char* arg, const at::Tensor& t) {
  MEMBA_CHECK(t.size(0) == 1 || t.stride(0) == t.size(1) * t.stride(1), op, ": ", arg,
              "'s token rows must be equally spaced, got strides ", shape_text(t.strides()));
  MEMBA_CHECK(t.stride(1) % 4 == 0 &&
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % (4 * t.element_size()) == 0,
              op, ": ", arg, "'s rows must start at multiples of 4 elements, got strides ",
              shape_text(t.strides()));
}

// rows > 0 (a grid scanned by columns) must divide the sequence length.
void check_rows(const char* op, const at::Tensor& u, int64_t rows) {
  MEMBA_CHECK(rows >= 0 && (rows == 0 || u.size(1) % rows == 0), op, ": rows must be 0 or divide "
              "the sequence length ", u.size(1), ", got ", rows);
}

// Call only after the inputs are checked: reads pointers and strides, touches no memory.
ScanParams make_params(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                       const at::Tensor& B, const at::Tensor& C, const OptTensor& D,
                       const OptTensor& z, const OptTensor& bias, bool softplus, bool reverse,
                       int64_t rows = 0) {
  const int64_t batch = u.size(0), L = u.size(1), dim = u.size(2);
  ScanParams p{};
  p.rows = static_cast<int>(rows);
  p.batch = static_cast<int>(batch);
  p.seqlen = static_cast<int>(L);
  p.dim = static_cast<int>(dim);
  p.nchunks = static_cast<int>((L + scan_chunk_len() - 1) / scan_chunk_len());
  p.reverse = reverse;
  p.softplus = softplus;
  p.has_z = present(z);
  p.has_D = present(D);
  p.has_bias = present(bias);
  p.u = u.data_ptr(); p.u_sb = u.stride(0); p.u_sl = u.stride(1);
  p.delta = delta.data_ptr(); p.dl_sb = delta.stride(0); p.dl_sl = delta.stride(1);
  p.Bm = B.data_ptr(); p.B_sb = B.stride(0); p.B_sl = B.stride(1);
  p.Cm = C.data_ptr(); p.C_sb = C.stride(0); p.C_sl = C.stride(1);
  if (present(z)) { p.z = z->data_ptr(); p.z_sb = z->stride(0); p.z_sl = z->stride(1); }
  p.A = A.data_ptr<float>();
  p.Dv = p.has_D ? D->data_ptr<float>() : nullptr;
  p.bias = p.has_bias ? bias->data_ptr<float>() : nullptr;
  return p;
}

// A given (checked) output buffer, or a new contiguous one of ``sizes`` like ``ref``.
at::Tensor output_like(const OptTensor& given, const at::Tensor& ref, at::IntArrayRef sizes) {
  return present(given) ? *given : at::empty(sizes, ref.options());
}
at::Tensor output_like(const OptTensor& given, const at::Tensor& ref) {
  return output_like(given, ref, ref.sizes());
}

// The forward's output, a (B, L, D) view: out (+)= scale * y.
void set_out(ScanParams& p, const at::Tensor& out, double scale, bool accumulate) {
  p.out = out.data_ptr(); p.out_sb = out.stride(0); p.out_sl = out.stride(1);
  p.out_f32 = out.scalar_type() == at::kFloat;
  p.out_scale = static_cast<float>(scale);
  p.out_accum = accumulate;
}

// The backward's inputs, outputs and scratch of one direction: dout, du and ddelta (B, L, D)
// views, the forward's states (B, npairs, D, N), the per-block dB | dC partials dbc
// (B, nblocks, L, 2N) and their sum dbc_sum (B, L, 2N).
void set_bwd(ScanParams& p, const at::Tensor& dout, double dout_scale, const at::Tensor& du,
             const at::Tensor& ddelta, const at::Tensor& states, const at::Tensor& dbc,
             const at::Tensor& dbc_sum) {
  p.dout = dout.data_ptr(); p.do_sb = dout.stride(0); p.do_sl = dout.stride(1);
  p.dout_scale = static_cast<float>(dout_scale);
  p.du = du.data_ptr(); p.du_sb = du.stride(0); p.du_sl = du.stride(1);
  p.du_f32 = du.scalar_type() == at::kFloat;
  p.ddelta = ddelta.data_ptr(); p.dd_sb = ddelta.stride(0); p.dd_sl = ddelta.stride(1);
  p.states = states.data_ptr<float>();
  p.dbc = dbc.data_ptr<float>();
  p.dbc_out = dbc_sum.data_ptr(); p.dbc_out_sb = dbc_sum.stride(0);
  p.dbc_out_sl = dbc_sum.stride(1);
  p.dbc_out_f32 = dbc_sum.scalar_type() == at::kFloat;
}

// The shape of the states the forward stores for ``ndir`` directions of u's shape:
// (ndir, B, ceil(L / scan_state_interval()), D, N), without ndir when ``single``.
std::vector<int64_t> states_shape(const at::Tensor& u, int64_t ndir, bool single) {
  const int64_t every = scan_state_interval();
  std::vector<int64_t> shape{ndir, u.size(0), (u.size(1) + every - 1) / every, u.size(2),
                             kStates};
  if (single) shape.erase(shape.begin());
  return shape;
}

// The forward's states (fp32, contiguous) when ``save``, set in ps; else undefined.
OptTensor forward_states(ScanDirs& ps, const at::Tensor& u, bool save, bool single) {
  if (!save) return std::nullopt;
  at::Tensor states = at::empty(states_shape(u, ps.ndir, false), u.options().dtype(at::kFloat));
  for (int k = 0; k < ps.ndir; ++k) ps.dir[k].states = states[k].data_ptr<float>();
  return single ? states[0] : states;
}

void check_states(const char* op, const at::Tensor& states, const at::Tensor& u, int64_t ndir,
                  bool single) {
  check_tensor(op, "states", states, u.device(), at::kFloat, states_shape(u, ndir, single),
               Strides::kContiguous);
}

// The backward's per-block dB | dC partials for ``ndir`` directions of u's shape,
// (ndir, B, nblocks, L, 2N) fp32.
at::Tensor bwd_scratch(const at::Tensor& u, int64_t ndir) {
  const int64_t nblocks = (u.size(2) + scan_channels_per_block() - 1) / scan_channels_per_block();
  return at::empty({ndir, u.size(0), nblocks, u.size(1), 2 * kStates},
                   u.options().dtype(at::kFloat));
}

// Per-batch-item parts of the A and D gradients of ``ndir`` directions, (ndir, B, D, N) and
// (ndir, B, D) fp32, when dA_out or dD_out is given (else undefined), set in ps.
std::pair<at::Tensor, at::Tensor> param_grad_items(ScanDirs& ps, const at::Tensor& u,
                                                   const OptTensor& dA_out,
                                                   const OptTensor& dD_out) {
  if (!present(dA_out) && !present(dD_out)) return {};
  const auto f32 = u.options().dtype(at::kFloat);
  at::Tensor dA = at::empty({ps.ndir, u.size(0), u.size(2), kStates}, f32);
  at::Tensor dD = at::empty({ps.ndir, u.size(0), u.size(2)}, f32);
  for (int k = 0; k < ps.ndir; ++k) {
    ps.dir[k].dA = dA[k].data_ptr<float>();
    ps.dir[k].dD = dD[k].data_ptr<float>();
  }
  return {dA, dD};
}

// dA_out / dD_out = the items' sums over the batch (axis 1).
void sum_param_grads(const std::pair<at::Tensor, at::Tensor>& items, const OptTensor& dA_out,
                     const OptTensor& dD_out) {
  const at::Tensor &dA = items.first, &dD = items.second;
  const std::vector<int64_t> batch_axis{1};
  if (present(dA_out)) {
    at::Tensor out = dA_out->view({dA.size(0), dA.size(2), dA.size(3)});
    at::sum_out(out, dA, batch_axis);
  }
  if (present(dD_out)) {
    at::Tensor out = dD_out->view({dD.size(0), dD.size(2)});
    at::sum_out(out, dD, batch_axis);
  }
}

// dA_out / dD_out of ``ndir`` directions: fp32 contiguous (ndir, D, 16) / (ndir, D), or (D, 16)
// / (D,) without the direction axis (``single``).
void check_param_grads(const char* op, const at::Tensor& u, int64_t ndir, bool single,
                       const OptTensor& dA_out, const OptTensor& dD_out) {
  std::vector<int64_t> a_shape{ndir, u.size(2), kStates}, d_shape{ndir, u.size(2)};
  if (single) {
    a_shape.erase(a_shape.begin());
    d_shape.erase(d_shape.begin());
  }
  if (present(dA_out)) {
    check_tensor(op, "dA_out", *dA_out, u.device(), at::kFloat, a_shape, Strides::kContiguous,
                 /*output=*/true);
  }
  if (present(dD_out)) {
    check_tensor(op, "dD_out", *dD_out, u.device(), at::kFloat, d_shape, Strides::kContiguous,
                 /*output=*/true);
  }
}

void run_backward(const ScanDirs& ps, const at::Tensor& u, const char* what) {
  check_cuda(scan_backward(ps, dtype_of(u), at::cuda::getCurrentCUDAStream()), what);
}

ScanDirs one_direction(const ScanParams& p) {
  ScanDirs ps{};
  ps.dir[0] = p;
  ps.ndir = 1;
  return ps;
}

std::tuple<at::Tensor, OptTensor> scan_fwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& bias,
    bool softplus, bool reverse, const OptTensor& out_buf, double out_scale, bool accumulate,
    bool save_states) {
  const char* op = "memba_vision scan_fwd";
  check_scan_inputs(op, u, delta, A, B, C, D, z, bias);
  if (present(out_buf)) check_tokens(op, "out", *out_buf, u, u.size(2), /*output=*/true);
  MEMBA_CHECK(!accumulate || present(out_buf), op, ": accumulate needs out");
  ScanParams p = make_params(u, delta, A, B, C, D, z, bias, softplus, reverse);
  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor out = output_like(out_buf, u);
  set_out(p, out, out_scale, accumulate);
  ScanDirs ps = one_direction(p);
  const OptTensor states = forward_states(ps, u, save_states, /*single=*/true);
  check_cuda(scan_forward(ps, dtype_of(u), at::cuda::getCurrentCUDAStream()), "scan_fwd");
  return {out, states};
}

std::tuple<at::Tensor, at::Tensor, OptTensor, at::Tensor, at::Tensor> scan_bwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& bias,
    const at::Tensor& dout, const at::Tensor& states, bool softplus, bool reverse,
    double dout_scale, const OptTensor& dz_out, bool dz_accumulate, const OptTensor& dBC_out,
    const OptTensor& dA_out, const OptTensor& dD_out) {
  const char* op = "memba_vision scan_bwd";
  check_scan_inputs(op, u, delta, A, B, C, D, z, bias);
  check_tokens(op, "dout", dout, u, u.size(2));
  check_states(op, states, u, 1, /*single=*/true);
  MEMBA_CHECK(!dz_accumulate || present(dz_out), op, ": dz_accumulate needs dz_out");
  MEMBA_CHECK(!present(dz_out) || present(z), op, ": dz_out without z");
  if (present(dz_out)) check_tokens(op, "dz_out", *dz_out, u, u.size(2), /*output=*/true);
  if (present(dBC_out)) {  // fp32 or u's dtype
    const at::ScalarType dtypes[] = {at::kFloat, u.scalar_type()};
    check_tensor(op, "dBC_out", *dBC_out, u.device(), dtypes, {u.size(0), u.size(1), 2 * kStates},
                 Strides::kLastAxis, /*output=*/true);
  }
  check_param_grads(op, u, 1, true, dA_out, dD_out);
  ScanParams p = make_params(u, delta, A, B, C, D, z, bias, softplus, reverse);
  const c10::cuda::CUDAGuard guard(u.device());
  const at::Tensor dbc = bwd_scratch(u, 1);
  at::Tensor dbc_sum = present(dBC_out)
      ? *dBC_out : at::empty({u.size(0), u.size(1), 2 * kStates}, u.options().dtype(at::kFloat));
  at::Tensor du = at::empty(u.sizes(), u.options());
  at::Tensor ddelta = at::empty(u.sizes(), u.options());
  set_bwd(p, dout, dout_scale, du, ddelta, states, dbc[0], dbc_sum);
  OptTensor dz;
  if (p.has_z) {
    dz = output_like(dz_out, u);
    p.dz = dz->data_ptr(); p.dz_sb = dz->stride(0); p.dz_sl = dz->stride(1);
    p.dz_accum = dz_accumulate;
  }
  ScanDirs ps = one_direction(p);
  const auto items = param_grad_items(ps, u, dA_out, dD_out);
  run_backward(ps, u, "scan_bwd");
  sum_param_grads(items, dA_out, dD_out);
  return {du, ddelta, dz, dbc_sum.narrow(2, 0, kStates), dbc_sum.narrow(2, kStates, kStates)};
}

// scan_dirs_* inputs: u (B, L, D); delta, B, C (B, L, K, *), contiguous last axis, u's dtype;
// A (K, D, 16), D and delta_bias (K, D), fp32 contiguous; reverse and rows: K entries.
// Returns K.
int64_t check_dirs_inputs(const char* op, const at::Tensor& u, const at::Tensor& delta,
                          const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                          const OptTensor& D, const OptTensor& bias,
                          const std::vector<bool>& reverse, const std::vector<int64_t>& rows) {
  check_leading(op, "u", u);
  const int64_t batch = u.size(0), L = u.size(1), dim = u.size(2);
  check_tensor(op, "delta", delta, u.device(), u.scalar_type(), {batch, L, kAny, dim},
               Strides::kLastAxis);
  const int64_t K = delta.size(2);
  MEMBA_CHECK(K >= 1 && K <= kMaxDirs, op, ": delta must have 1 to ", kMaxDirs,
              " directions (axis 2), got ", K);
  check_tensor(op, "A", A, u.device(), at::kFloat, {K, dim, kStates}, Strides::kContiguous);
  check_tensor(op, "B", B, u.device(), u.scalar_type(), {batch, L, K, kStates},
               Strides::kLastAxis);
  check_tensor(op, "C", C, u.device(), u.scalar_type(), {batch, L, K, kStates},
               Strides::kLastAxis);
  if (present(D)) check_tensor(op, "D", *D, u.device(), at::kFloat, {K, dim}, Strides::kContiguous);
  if (present(bias)) {
    check_tensor(op, "delta_bias", *bias, u.device(), at::kFloat, {K, dim}, Strides::kContiguous);
  }
  MEMBA_CHECK(static_cast<int64_t>(reverse.size()) == K && static_cast<int64_t>(rows.size()) == K,
              op, ": reverse and rows must have one entry per direction (", K, "), got ",
              reverse.size(), " and ", rows.size());
  for (const int64_t r : rows) check_rows(op, u, r);
  return K;
}

// Direction k's parameters (its slices of the direction-axis tensors).
ScanParams dir_params(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                      const at::Tensor& B, const at::Tensor& C, const OptTensor& D,
                      const OptTensor& bias, bool softplus, const std::vector<bool>& reverse,
                      const std::vector<int64_t>& rows, int64_t k) {
  const OptTensor Dk = present(D) ? OptTensor(D->select(0, k)) : std::nullopt;
  const OptTensor bk = present(bias) ? OptTensor(bias->select(0, k)) : std::nullopt;
  return make_params(u, delta.select(2, k), A.select(0, k), B.select(2, k), C.select(2, k), Dk,
                     std::nullopt, bk, softplus, reverse[k], rows[k]);
}

std::tuple<at::Tensor, OptTensor> scan_dirs_fwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const OptTensor& D, const OptTensor& bias, bool softplus,
    const std::vector<bool>& reverse, const std::vector<int64_t>& rows, const OptTensor& out_buf,
    bool save_states) {
  const char* op = "memba_vision scan_dirs_fwd";
  const int64_t K = check_dirs_inputs(op, u, delta, A, B, C, D, bias, reverse, rows);
  if (present(out_buf)) {  // u's dtype, or fp32
    const at::ScalarType dtypes[] = {u.scalar_type(), at::kFloat};
    check_tensor(op, "out", *out_buf, u.device(), dtypes, {u.size(0), u.size(1), K, u.size(2)},
                 Strides::kLastAxis, /*output=*/true);
  }
  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor out = output_like(out_buf, u, {u.size(0), u.size(1), K, u.size(2)});
  ScanDirs ps{};
  ps.ndir = static_cast<int>(K);
  for (int64_t k = 0; k < K; ++k) {
    ps.dir[k] = dir_params(u, delta, A, B, C, D, bias, softplus, reverse, rows, k);
    set_out(ps.dir[k], out.select(2, k), 1.0, false);
  }
  const OptTensor states = forward_states(ps, u, save_states, /*single=*/false);
  check_cuda(scan_forward(ps, dtype_of(u), at::cuda::getCurrentCUDAStream()), "scan_dirs_fwd");
  return {out, states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_dirs_bwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const OptTensor& D, const OptTensor& bias, const at::Tensor& dout,
    const at::Tensor& states, bool softplus, const std::vector<bool>& reverse,
    const std::vector<int64_t>& rows, const OptTensor& du_out, const OptTensor& dBC_out,
    const OptTensor& dA_out, const OptTensor& dD_out) {
  const char* op = "memba_vision scan_dirs_bwd";
  const int64_t K = check_dirs_inputs(op, u, delta, A, B, C, D, bias, reverse, rows);
  const int64_t batch = u.size(0), L = u.size(1), dim = u.size(2);
  check_tokens(op, "dout", dout, u, dim);
  check_states(op, states, u, K, /*single=*/false);
  if (present(du_out)) {  // u's dtype, or fp32
    const at::ScalarType dtypes[] = {u.scalar_type(), at::kFloat};
    check_tensor(op, "du_out", *du_out, u.device(), dtypes, {batch, L, K, dim},
                 Strides::kLastAxis, /*output=*/true);
  }
  if (present(dBC_out)) {  // fp32 or u's dtype
    const at::ScalarType dtypes[] = {at::kFloat, u.scalar_type()};
    check_tensor(op, "dBC_out", *dBC_out, u.device(), dtypes, {batch, L, K, 2 * kStates},
                 Strides::kLastAxis, /*output=*/true);
  }
  check_param_grads(op, u, K, false, dA_out, dD_out);
  const c10::cuda::CUDAGuard guard(u.device());
  const at::Tensor dbc = bwd_scratch(u, K);
  at::Tensor dbc_sum = present(dBC_out)
      ? *dBC_out : at::empty({batch, L, K, 2 * kStates}, u.options().dtype(at::kFloat));
  at::Tensor du = output_like(du_out, u, {batch, L, K, dim});
  at::Tensor ddelta = at::empty({batch, L, K, dim}, u.options());
  ScanDirs ps{};
  ps.ndir = static_cast<int>(K);
  for (int64_t k = 0; k < K; ++k) {
    ps.dir[k] = dir_params(u, delta, A, B, C, D, bias, softplus, reverse, rows, k);
    set_bwd(ps.dir[k], dout, 1.0, du.select(2, k), ddelta.select(2, k), states[k], dbc[k],
            dbc_sum.select(2, k));
  }
  const auto items = param_grad_items(ps, u, dA_out, dD_out);
  run_backward(ps, u, "scan_dirs_bwd");
  sum_param_grads(items, dA_out, dD_out);
  return {du, ddelta, dbc_sum.narrow(3, 0, kStates), dbc_sum.narrow(3, kStates, kStates)};
}

// conv_fwd / conv_bwd inputs: x (B, L, D), weight (D, 4), bias (D,).
void check_conv_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                       const OptTensor& bias) {
  check_leading(op, "x", x);
  check_param(op, "weight", weight, x, {x.size(2), 4});
  if (present(bias)) check_param(op, "bias", *bias, x, {x.size(2)});
}

// Call only after check_conv_inputs.
ConvParams make_conv(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                     bool reverse, bool silu) {
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

void set_conv_out(ConvParams& p, const at::Tensor& out) {
  p.out = out.data_ptr(); p.o_sb = out.stride(0); p.o_sl = out.stride(1);
}

at::Tensor conv_fwd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                    bool reverse, bool silu) {
  check_conv_inputs("memba_vision conv_fwd", x, weight, bias);
  ConvParams p = make_conv(x, weight, bias, reverse, silu);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  set_conv_out(p, out);
  check_cuda(conv_forward(p, dtype_of(x), at::cuda::getCurrentCUDAStream()), "conv_fwd");
  return out;
}

at::Tensor conv_bwd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                    const at::Tensor& grad_y, bool reverse, bool silu, const OptTensor& out,
                    bool accumulate) {
  const char* op = "memba_vision conv_bwd";
  check_conv_inputs(op, x, weight, bias);
  check_tokens(op, "grad_y", grad_y, x, x.size(2));
  if (present(out)) check_tokens(op, "out", *out, x, x.size(2), /*output=*/true);
  MEMBA_CHECK(!accumulate || present(out), op, ": accumulate needs out");
  ConvParams p = make_conv(x, weight, bias, reverse, silu);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = output_like(out, x);
  p.g = grad_y.data_ptr(); p.g_sb = grad_y.stride(0); p.g_sl = grad_y.stride(1);
  set_conv_out(p, dx);
  p.accum = accumulate;
  check_cuda(conv_backward(p, dtype_of(x), at::cuda::getCurrentCUDAStream()), "conv_bwd");
  return dx;
}

// lim_pair inputs: x (B, L, R) shared by both directions or (B, L, 2, R) one per direction,
// contiguous; u_prev_f / u_prev_b (B, l, R) contiguous or None, l = L // num_chunks.
void check_lim_pair_inputs(const char* op, const at::Tensor& x, const OptTensor& u_prev_f,
                           const OptTensor& u_prev_b, int64_t num_chunks) {
  const bool per_dir = x.defined() && x.dim() == 4;
  MEMBA_CHECK(!per_dir || x.size(2) == 2, op, ": x must be (B, L, R) or (B, L, 2, R), got ",
              shape_text(x.sizes()));
  check_leading(op, "x", per_dir ? x.flatten(2) : x);
  check_tensor(op, "x", x, x.device(), x.scalar_type(), std::vector<int64_t>(x.dim(), kAny),
               Strides::kContiguous);
  MEMBA_CHECK(num_chunks >= 1 && num_chunks <= kLimPairMaxChunks && num_chunks <= x.size(1),
              op, ": num_chunks must be in [1, min(", kLimPairMaxChunks, ", L=", x.size(1),
              ")], got ", num_chunks);
  const std::vector<int64_t> prev{x.size(0), x.size(1) / num_chunks, x.size(-1)};
  if (present(u_prev_f)) {
    check_tensor(op, "u_prev_f", *u_prev_f, x.device(), x.scalar_type(), prev,
                 Strides::kContiguous);
  }
  if (present(u_prev_b)) {
    check_tensor(op, "u_prev_b", *u_prev_b, x.device(), x.scalar_type(), prev,
                 Strides::kContiguous);
  }
}

// out, grad_out and grad_x: (2, B, L, R) for a shared x, x's shape for one x per direction.
std::vector<int64_t> lim_pair_out_shape(const at::Tensor& x) {
  if (x.dim() == 4) return x.sizes().vec();
  return {2, x.size(0), x.size(1), x.size(2)};
}

// Call only after check_lim_pair_inputs.
LimPairParams make_lim_pair(const at::Tensor& x, const OptTensor& u_prev_f,
                           const OptTensor& u_prev_b, int64_t num_chunks, double leak,
                           double threshold) {
  LimPairParams p{};
  p.batch = static_cast<int>(x.size(0));
  p.seqlen = static_cast<int>(x.size(1));
  p.rank = static_cast<int>(x.size(-1));
  p.per_dir = x.dim() == 4;
  p.nchunks = static_cast<int>(num_chunks);
  p.chunk_len = static_cast<int>(x.size(1) / num_chunks);
  p.leak = static_cast<float>(leak);
  p.threshold = static_cast<float>(threshold);
  p.x = x.data_ptr();
  p.u_prev[0] = present(u_prev_f) ? u_prev_f->data_ptr() : nullptr;
  p.u_prev[1] = present(u_prev_b) ? u_prev_b->data_ptr() : nullptr;
  return p;
}

std::tuple<at::Tensor, at::Tensor> lim_pair_fwd(const at::Tensor& x, const OptTensor& u_prev_f,
                                                const OptTensor& u_prev_b, int64_t num_chunks,
                                                double leak, double threshold) {
  check_lim_pair_inputs("memba_vision lim_pair_fwd", x, u_prev_f, u_prev_b, num_chunks);
  LimPairParams p = make_lim_pair(x, u_prev_f, u_prev_b, num_chunks, leak, threshold);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(lim_pair_out_shape(x), x.options());
  at::Tensor u_mean = at::empty({2, x.size(0), p.chunk_len, x.size(-1)}, x.options());
  p.out = out.data_ptr();
  p.u_mean = u_mean.data_ptr();
  check_cuda(lim_pair_forward(p, dtype_of(x), at::cuda::getCurrentCUDAStream()), "lim_pair_fwd");
  return {out, u_mean};
}

std::tuple<at::Tensor, OptTensor, OptTensor> lim_pair_bwd(
    const at::Tensor& x, const OptTensor& u_prev_f, const OptTensor& u_prev_b,
    const at::Tensor& grad_out, const OptTensor& grad_mean_f, const OptTensor& grad_mean_b,
    int64_t num_chunks, double leak, double threshold) {
  const char* op = "memba_vision lim_pair_bwd";
  check_lim_pair_inputs(op, x, u_prev_f, u_prev_b, num_chunks);
  const int64_t l = x.size(1) / num_chunks;
  check_tensor(op, "grad_out", grad_out, x.device(), x.scalar_type(), lim_pair_out_shape(x),
               Strides::kContiguous);
  if (present(grad_mean_f)) {
    check_tensor(op, "grad_mean_f", *grad_mean_f, x.device(), x.scalar_type(),
                 {x.size(0), l, x.size(-1)}, Strides::kContiguous);
  }
  if (present(grad_mean_b)) {
    check_tensor(op, "grad_mean_b", *grad_mean_b, x.device(), x.scalar_type(),
                 {x.size(0), l, x.size(-1)}, Strides::kContiguous);
  }
  LimPairParams p = make_lim_pair(x, u_prev_f, u_prev_b, num_chunks, leak, threshold);
  p.g_mean[0] = present(grad_mean_f) ? grad_mean_f->data_ptr() : nullptr;
  p.g_mean[1] = present(grad_mean_b) ? grad_mean_b->data_ptr() : nullptr;
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = at::empty(grad_out.sizes(), x.options());
  OptTensor grad_prev[2];
  for (int d = 0; d < 2; ++d) {
    p.g_prev[d] = nullptr;
    if (p.u_prev[d] != nullptr) {
      grad_prev[d] = at::empty({x.size(0), p.chunk_len, x.size(-1)}, x.options());
      p.g_prev[d] = grad_prev[d]->data_ptr();
    }
  }
  p.g_out = grad_out.data_ptr();
  p.g_x = grad_x.data_ptr();
  check_cuda(lim_pair_backward(p, dtype_of(x), at::cuda::getCurrentCUDAStream()), "lim_pair_bwd");
  return {grad_x, grad_prev[0], grad_prev[1]};
}

void check_aligned16(const char* op, const char* arg, const at::Tensor& t) {
  MEMBA_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", arg,
              "'s address must be a multiple of 16 bytes");
}

// A (2, B, L, last) tensor of gate_z (one (B, L, last) per direction): contiguous, 16-byte
// aligned, on ref's device in ref's dtype.
void check_gate_pair(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& ref,
                     int64_t batch, int64_t L, int64_t last) {
  check_tensor(op, arg, t, ref.device(), ref.scalar_type(), {2, batch, L, last},
               Strides::kContiguous);
  check_aligned16(op, arg, t);
}

// GateZParams for rows of (B, L, D) tensors and the weight W (D, 16) read as w[d * w_sd + r *
// w_sr]. Call only after the checks.
GateZParams make_gate_z(const at::Tensor& v, const at::Tensor& w, int64_t dim, bool transposed) {
  GateZParams p{};
  p.rows = v.size(1) * v.size(2);
  p.dim = static_cast<int>(dim);
  p.v[0] = v.select(0, 0).data_ptr();
  p.v[1] = v.select(0, 1).data_ptr();
  p.w = w.data_ptr<float>();
  p.w_sd = transposed ? 1 : kGateRank;
  p.w_sr = transposed ? dim : 1;
  return p;
}

void check_gate_dim(const char* op, int64_t dim) {
  MEMBA_CHECK(dim % 4 == 0 && dim >= 4 && dim < (1 << 24), op,
              ": the channel count must be a positive multiple of 4, got ", dim);
}

at::Tensor gate_z_fwd(const at::Tensor& S, const at::Tensor& W, const OptTensor& z) {
  const char* op = "memba_vision gate_z_fwd";
  check_cuda_tensor(op, "S", S);
  check_tensor(op, "S", S, S.device(), kKernelDtypes, {2, kAny, kAny, kGateRank},
               Strides::kContiguous);
  MEMBA_CHECK(S.size(1) >= 1 && S.size(2) >= 1, op, ": S must not be empty, got ",
              shape_text(S.sizes()));
  check_aligned16(op, "S", S);
  check_tensor(op, "W", W, S.device(), at::kFloat, {kAny, kGateRank}, Strides::kContiguous);
  check_aligned16(op, "W", W);
  const int64_t dim = W.size(0);
  check_gate_dim(op, dim);
  if (present(z)) {
    check_tensor(op, "z", *z, S.device(), S.scalar_type(), {S.size(1), S.size(2), dim},
                 Strides::kLastAxis);
    check_quad_rows(op, "z", *z);
  }
  GateZParams p = make_gate_z(S, W, dim, /*transposed=*/false);
  const c10::cuda::CUDAGuard guard(S.device());
  at::Tensor out = at::empty({2, S.size(1), S.size(2), dim}, S.options());
  if (present(z)) {
    p.nbase = 1;
    p.base[0] = z->data_ptr();
    p.base_sr[0] = z->stride(1);
  }
  for (int k = 0; k < 2; ++k) {
    p.out[k] = out.select(0, k).data_ptr();
    p.out_sr[k] = dim;
  }
  check_cuda(gate_z(p, dtype_of(S), at::cuda::getCurrentCUDAStream()), "gate_z_fwd");
  return out;
}

at::Tensor gate_z_bwd(const OptTensor& dz, const at::Tensor& dv, const at::Tensor& W_in,
                      const at::Tensor& out) {
  const char* op = "memba_vision gate_z_bwd";
  check_cuda_tensor(op, "out", out);
  check_tensor(op, "out", out, out.device(), kKernelDtypes, {kAny, kAny, kAny}, Strides::kLastAxis,
               /*output=*/true);
  MEMBA_CHECK(out.size(0) >= 1 && out.size(1) >= 1, op, ": out must not be empty, got ",
              shape_text(out.sizes()));
  const int64_t batch = out.size(0), L = out.size(1), dim = out.size(2);
  check_gate_dim(op, dim);
  check_quad_rows(op, "out", out);
  check_gate_pair(op, "dv", dv, out, batch, L, kGateRank);
  if (present(dz)) check_gate_pair(op, "dz", *dz, out, batch, L, dim);
  check_tensor(op, "W_in", W_in, out.device(), at::kFloat, {kGateRank, dim},
               Strides::kContiguous);
  check_aligned16(op, "W_in", W_in);
  GateZParams p = make_gate_z(dv, W_in, dim, /*transposed=*/true);
  const c10::cuda::CUDAGuard guard(out.device());
  at::Tensor v_sum = at::empty({batch, L, kGateRank}, dv.options());
  if (present(dz)) {
    p.nbase = 2;
    for (int k = 0; k < 2; ++k) {
      p.base[k] = dz->select(0, k).data_ptr();
      p.base_sr[k] = dim;
    }
  }
  p.sum_v = true;
  p.out[0] = out.data_ptr();
  p.out_sr[0] = out.stride(1);
  p.v_sum = v_sum.data_ptr();
  check_cuda(gate_z(p, dtype_of(out), at::cuda::getCurrentCUDAStream()), "gate_z_bwd");
  return v_sum;
}

// dwconv inputs: x (B, H, W, D) of a kernel dtype, channel axis contiguous, D, the pixel
// strides and the address multiples of 4 elements; weight (D, 1, 3, 3), bias (D,) fp32.
void check_dwconv_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                         const OptTensor& bias) {
  check_cuda_tensor(op, "x", x);
  check_tensor(op, "x", x, x.device(), kKernelDtypes, {kAny, kAny, kAny, kAny},
               Strides::kLastAxis);
  MEMBA_CHECK(x.numel() > 0, op, ": x must not be empty, got ", shape_text(x.sizes()));
  MEMBA_CHECK(x.size(0) * x.size(1) * x.size(2) < (int64_t{1} << 31) && x.size(3) < (1 << 24),
              op, ": x is too large: ", shape_text(x.sizes()));
  MEMBA_CHECK(x.size(3) % 4 == 0 && x.stride(0) % 4 == 0 && x.stride(1) % 4 == 0 &&
                  x.stride(2) % 4 == 0 &&
                  reinterpret_cast<uintptr_t>(x.data_ptr()) % (4 * x.element_size()) == 0,
              op, ": x's channels, pixel strides and address must be multiples of 4 elements, "
              "got shape ", shape_text(x.sizes()), " and strides ", shape_text(x.strides()));
  check_param(op, "weight", weight, x, {x.size(3), 1, 3, 3});
  if (present(bias)) check_param(op, "bias", *bias, x, {x.size(3)});
}

DwConvParams make_dwconv(const at::Tensor& x, const at::Tensor& weight,
                         const OptTensor& bias) {
  DwConvParams p{};
  p.batch = static_cast<int>(x.size(0));
  p.height = static_cast<int>(x.size(1));
  p.width = static_cast<int>(x.size(2));
  p.dim = static_cast<int>(x.size(3));
  p.x = x.data_ptr();
  p.x_sb = x.stride(0); p.x_sh = x.stride(1); p.x_sw = x.stride(2);
  p.w = weight.data_ptr<float>();
  p.bias = present(bias) ? bias->data_ptr<float>() : nullptr;
  return p;
}

at::Tensor dwconv_fwd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias) {
  check_dwconv_inputs("memba_vision dwconv_fwd", x, weight, bias);
  DwConvParams p = make_dwconv(x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor u = at::empty(x.sizes(), x.options());
  p.out = u.data_ptr();
  check_cuda(dwconv_forward(p, dtype_of(x), at::cuda::getCurrentCUDAStream()), "dwconv_fwd");
  return u;
}

at::Tensor dwconv_bwd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                      const at::Tensor& grad_u) {
  const char* op = "memba_vision dwconv_bwd";
  check_dwconv_inputs(op, x, weight, bias);
  check_tensor(op, "grad_u", grad_u, x.device(), x.scalar_type(), x.sizes(),
               Strides::kContiguous);
  check_aligned4(op, "grad_u", grad_u);
  DwConvParams p = make_dwconv(x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty(x.sizes(), x.options());
  p.g = grad_u.data_ptr();
  p.out = dx.data_ptr();
  check_cuda(dwconv_backward(p, dtype_of(x), at::cuda::getCurrentCUDAStream()), "dwconv_bwd");
  return dx;
}

// layer_norm inputs: x (..., D) contiguous of a kernel dtype, D % 4 == 0, D <= 2048, 4-element
// aligned; weight and bias (D,) fp32 contiguous.
void check_layer_norm_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& bias) {
  check_cuda_tensor(op, "x", x);
  check_tensor(op, "x", x, x.device(), kKernelDtypes, x.sizes(), Strides::kContiguous);
  MEMBA_CHECK(x.dim() >= 1 && x.numel() > 0, op, ": x must not be empty, got ",
              shape_text(x.sizes()));
  const int64_t D = x.size(-1);
  MEMBA_CHECK(D % 4 == 0 && D <= kNormGateMaxDim, op, ": the channel count must be a multiple "
              "of 4 and at most ", kNormGateMaxDim, ", got ", D);
  check_aligned4(op, "x", x);
  check_param(op, "weight", weight, x, {D});
  check_param(op, "bias", bias, x, {D});
}

NormGateParams make_layer_norm(const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bias, double eps) {
  NormGateParams p{};
  p.dim = static_cast<int>(x.size(-1));
  p.rows = x.numel() / p.dim;
  p.eps = static_cast<float>(eps);
  p.y = x.data_ptr();
  p.weight = weight.data_ptr<float>();
  p.bias = bias.data_ptr<float>();
  return p;  // z null: the plain LayerNorm
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_layer_norm_inputs("memba_vision layer_norm_fwd", x, weight, bias);
  NormGateParams p = make_layer_norm(x, weight, bias, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor mean = at::empty({p.rows}, weight.options());
  at::Tensor rstd = at::empty({p.rows}, weight.options());
  p.out = out.data_ptr();
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  check_cuda(layer_norm_forward(p, dtype_of(x), at::cuda::getCurrentCUDAStream()),
             "layer_norm_fwd");
  return {out, mean, rstd};
}

at::Tensor layer_norm_bwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& mean, const at::Tensor& rstd,
                          const at::Tensor& dout) {
  const char* op = "memba_vision layer_norm_bwd";
  check_layer_norm_inputs(op, x, weight, bias);
  const int64_t rows = x.numel() / x.size(-1);
  check_tensor(op, "mean", mean, x.device(), at::kFloat, {rows}, Strides::kContiguous);
  check_tensor(op, "rstd", rstd, x.device(), at::kFloat, {rows}, Strides::kContiguous);
  check_tensor(op, "dout", dout, x.device(), x.scalar_type(), x.sizes(), Strides::kContiguous);
  check_aligned4(op, "dout", dout);
  NormGateParams p = make_layer_norm(x, weight, bias, 0.0);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty(x.sizes(), x.options());
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.dout = dout.data_ptr();
  p.dy = dx.data_ptr();
  check_cuda(layer_norm_backward(p, dtype_of(x), at::cuda::getCurrentCUDAStream()),
             "layer_norm_bwd");
  return dx;
}

// norm_gate inputs: z (B, L, D) (checked like u) whose rows (b, t) are equally spaced and
// 4-element aligned; y (B, L, D) fp32 contiguous; weight and bias (D,) fp32 contiguous.
void check_norm_gate_inputs(const char* op, const at::Tensor& y, const at::Tensor& weight,
                            const at::Tensor& bias, const at::Tensor& z, const OptTensor& c) {
  check_leading(op, "z", z);
  const int64_t D = z.size(2);
  MEMBA_CHECK(D % 4 == 0 && D <= kNormGateMaxDim, op, ": the channel count must be a multiple "
              "of 4 and at most ", kNormGateMaxDim, ", got ", D);
  check_quad_rows(op, "z", z);
  check_tensor(op, "y", y, z.device(), at::kFloat, {z.size(0), z.size(1), D},
               Strides::kContiguous);
  check_param(op, "weight", weight, z, {D});
  check_param(op, "bias", bias, z, {D});
  if (present(c)) check_tensor(op, "c", *c, z.device(), z.scalar_type(), z.sizes(),
                               Strides::kContiguous);
}

NormGateParams make_norm_gate(const at::Tensor& y, const at::Tensor& weight,
                              const at::Tensor& bias, double eps, const at::Tensor& z,
                              const OptTensor& c) {
  NormGateParams p{};
  p.rows = z.size(0) * z.size(1);
  p.dim = static_cast<int>(z.size(2));
  p.eps = static_cast<float>(eps);
  p.y = y.data_ptr<float>();
  p.weight = weight.data_ptr<float>();
  p.bias = bias.data_ptr<float>();
  p.z = z.data_ptr();
  p.z_sr = z.stride(1);
  p.c = present(c) ? c->data_ptr() : nullptr;
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_gate_fwd(
    const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias, double eps,
    const at::Tensor& z, const OptTensor& c) {
  check_norm_gate_inputs("memba_vision norm_gate_fwd", y, weight, bias, z, c);
  NormGateParams p = make_norm_gate(y, weight, bias, eps, z, c);
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor out = at::empty(z.sizes(), z.options());
  at::Tensor mean = at::empty({z.size(0), z.size(1)}, y.options());
  at::Tensor rstd = at::empty({z.size(0), z.size(1)}, y.options());
  p.out = out.data_ptr();
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  check_cuda(norm_gate_forward(p, dtype_of(z), at::cuda::getCurrentCUDAStream()),
             "norm_gate_fwd");
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor> norm_gate_bwd(
    const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& z,
    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& dout, const OptTensor& c) {
  const char* op = "memba_vision norm_gate_bwd";
  check_norm_gate_inputs(op, y, weight, bias, z, c);
  check_tensor(op, "mean", mean, z.device(), at::kFloat, {z.size(0), z.size(1)},
               Strides::kContiguous);
  check_tensor(op, "rstd", rstd, z.device(), at::kFloat, {z.size(0), z.size(1)},
               Strides::kContiguous);
  check_tensor(op, "dout", dout, z.device(), z.scalar_type(), z.sizes(), Strides::kContiguous);
  NormGateParams p = make_norm_gate(y, weight, bias, 0.0, z, c);
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor dy = at::empty(z.sizes(), y.options());
  at::Tensor dz = at::empty(z.sizes(), z.options());
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.dout = dout.data_ptr();
  p.dy = dy.data_ptr<float>();
  p.dz = dz.data_ptr();
  check_cuda(norm_gate_backward(p, dtype_of(z), at::cuda::getCurrentCUDAStream()),
             "norm_gate_bwd");
  return {dy, dz};
}

}  // namespace
}  // namespace memba_scan

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Token-major selective scan, depthwise convs and gates (frozen SSM parameters)";
  namespace py = pybind11;
  // A failed check becomes RuntimeError(message) here, without c10::Error::what(),
  // which would symbolise the C++ backtrace, and without depending on torch's own
  // translator being visible to this module (it is not when the extension's pybind11
  // build differs from torch's).
  py::register_local_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const c10::Error& e) {
      if (typeid(e) != typeid(c10::Error)) throw;  // out of memory etc.: torch's translator
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
  m.def("scan_fwd", &memba_scan::scan_fwd, "selective scan forward", py::arg("u"),
        py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"),
        py::arg("delta_bias"), py::arg("softplus"),
        py::arg("reverse"), py::arg("out") = py::none(), py::arg("out_scale") = 1.0,
        py::arg("accumulate") = false, py::arg("save_states") = false);
  m.def("scan_bwd", &memba_scan::scan_bwd, "selective scan backward", py::arg("u"),
        py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"),
        py::arg("delta_bias"), py::arg("dout"), py::arg("states"),
        py::arg("softplus"), py::arg("reverse"), py::arg("dout_scale") = 1.0,
        py::arg("dz_out") = py::none(), py::arg("dz_accumulate") = false,
        py::arg("dBC_out") = py::none(), py::arg("dA_out") = py::none(),
        py::arg("dD_out") = py::none());
  m.def("scan_dirs_fwd", &memba_scan::scan_dirs_fwd, "selective scans of one input in up to "
        "four directions, one launch", py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"),
        py::arg("C"), py::arg("D"), py::arg("delta_bias"), py::arg("softplus"),
        py::arg("reverse"), py::arg("rows"), py::arg("out") = py::none(),
        py::arg("save_states") = false);
  m.def("scan_dirs_bwd", &memba_scan::scan_dirs_bwd, "backward of scan_dirs_fwd", py::arg("u"),
        py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"),
        py::arg("D"), py::arg("delta_bias"), py::arg("dout"), py::arg("states"),
        py::arg("softplus"), py::arg("reverse"), py::arg("rows"), py::arg("du_out") = py::none(),
        py::arg("dBC_out") = py::none(), py::arg("dA_out") = py::none(),
        py::arg("dD_out") = py::none());
  m.def("conv_fwd", &memba_scan::conv_fwd, "depthwise causal conv + SiLU forward");
  m.def("conv_bwd", &memba_scan::conv_bwd, "depthwise causal conv + SiLU backward (input grad)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("grad_y"), py::arg("reverse"),
        py::arg("silu"), py::arg("out") = py::none(), py::arg("accumulate") = false);
  m.def("gate_z_fwd", &memba_scan::gate_z_fwd, "Memba's z' = z + S_k W^T of both directions",
        py::arg("S"), py::arg("W"), py::arg("z") = py::none());
  m.def("gate_z_bwd", &memba_scan::gate_z_bwd,
        "Memba's dz = dz'_0 + dz'_1 + (dv_0 + dv_1) W_in into out; returns dv_0 + dv_1",
        py::arg("dz"), py::arg("dv"), py::arg("W_in"), py::arg("out"));
  m.def("lim_pair_fwd", &memba_scan::lim_pair_fwd, "LIM of both scan directions, forward");
  m.def("lim_pair_bwd", &memba_scan::lim_pair_bwd, "LIM of both scan directions, backward");
  m.def("dwconv_fwd", &memba_scan::dwconv_fwd, "depthwise 3x3 conv + bias + SiLU forward",
        py::arg("x"), py::arg("weight"), py::arg("bias"));
  m.def("dwconv_bwd", &memba_scan::dwconv_bwd,
        "depthwise 3x3 conv + bias + SiLU backward (input grad)", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("grad_u"));
  m.def("layer_norm_fwd", &memba_scan::layer_norm_fwd, "LayerNorm in the storage dtype, forward",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("layer_norm_bwd", &memba_scan::layer_norm_bwd,
        "LayerNorm in the storage dtype, backward (input grad)", py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("mean"), py::arg("rstd"), py::arg("dout"));
  m.def("norm_gate_fwd", &memba_scan::norm_gate_fwd, "LayerNorm(y) * silu(z), forward",
        py::arg("y"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("z"),
        py::arg("c") = py::none());
  m.def("norm_gate_bwd", &memba_scan::norm_gate_bwd, "LayerNorm(y) * silu(z), backward",
        py::arg("y"), py::arg("weight"), py::arg("bias"), py::arg("z"), py::arg("mean"),
        py::arg("rstd"), py::arg("dout"), py::arg("c") = py::none());
}
