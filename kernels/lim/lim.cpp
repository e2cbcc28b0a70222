// The LIM operator (module memba_vision._lim_cuda); importing it registers
//
//   memba_vision::lim(Tensor x, Tensor? u_prev, int num_chunks, float leak,
//                     float threshold) -> (Tensor out, Tensor u_mean)
//       x (B, L, R), u_prev (B, l, R) or None -> out (B, L, R), u_mean (B, l, R)
//   memba_vision::lim_backward(Tensor x, Tensor? u_prev, Tensor? grad_out,
//                              Tensor? grad_u_mean, int num_chunks, float leak,
//                              float threshold, bool need_grad_x,
//                              bool need_grad_u_prev) -> (Tensor grad_x, Tensor grad_u_prev)
//       grads not asked for come back undefined (None); a missing grad_out /
//       grad_u_mean counts as zeros and is never read.
//
// Kernels: CUDA (lim_kernel.cu) and Meta (shapes only, for fake tensors).
// `lim` also has an Autograd kernel, a C++ torch::autograd::Function, so a
// backward pass through it never enters Python. Inputs may be non-contiguous
// (they are made contiguous once, a no-op when they already are); every tensor's
// device, dtype and shape is checked first (kernels/common/tensor_checks.h).
#include <torch/extension.h>

#include <limits>
#include <string>
#include <optional>
#include <tuple>

#include "../common/tensor_checks.h"

namespace memba_lim {

void lim_forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& u_prev,
                      at::Tensor& out, at::Tensor& u_mean, int64_t num_chunks,
                      double leak, double threshold);

void lim_backward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& u_prev,
                       const std::optional<at::Tensor>& grad_out,
                       const std::optional<at::Tensor>& grad_u_mean, at::Tensor& grad_x,
                       at::Tensor& grad_u_prev, int64_t num_chunks, double leak,
                       double threshold);

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

OptTensor contiguous_or_none(const OptTensor& t) {
  if (!present(t)) return std::nullopt;
  return t->contiguous();
}

// x (B, L, R), floating point, on CUDA; any strides (the op makes a contiguous copy).
void check_x(const char* op, const at::Tensor& x, int64_t num_chunks) {
  MEMBA_CHECK(x.defined() && x.is_cuda(), op, ": x must be a CUDA tensor, got ",
              x.defined() ? x.device().str() : std::string("an undefined tensor"));
  MEMBA_CHECK(x.dim() == 3, op, ": x must have shape (B, L, R), got ",
              memba_checks::shape_text(x.sizes()));
  MEMBA_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ",
              x.scalar_type());
  MEMBA_CHECK(num_chunks >= 1 && num_chunks <= x.size(1), op,
              ": num_chunks must be in [1, L=", x.size(1), "], got ", num_chunks);
  MEMBA_CHECK(num_chunks <= std::numeric_limits<int>::max(), op, ": num_chunks too large");
}

// A (B, l, R) or (B, L, R) companion of x (u_prev, grad_out, grad_u_mean): x's device
// and dtype, any strides (made contiguous after all checks).
void check_like(const char* op, const char* name, const OptTensor& t, const at::Tensor& x,
                at::IntArrayRef shape) {
  if (present(t)) {
    memba_checks::check_tensor(op, name, *t, x.device(), x.scalar_type(), shape,
                               memba_checks::Strides::kAny);
  }
}

// ------------------------------------------------------------ CUDA kernels
std::tuple<at::Tensor, at::Tensor> lim_cuda_impl(const at::Tensor& x_in,
                                                 const OptTensor& u_prev, int64_t num_chunks,
                                                 double leak, double threshold) {
  const char* op = "memba_vision::lim";
  check_x(op, x_in, num_chunks);
  const int64_t B = x_in.size(0), L = x_in.size(1), R = x_in.size(2), l = L / num_chunks;
  check_like(op, "u_prev", u_prev, x_in, {B, l, R});
  const at::Tensor x = x_in.contiguous();
  const OptTensor u = contiguous_or_none(u_prev);
  at::Tensor out = at::empty_like(x);
  at::Tensor u_mean = at::empty({B, l, R}, x.options());
  lim_forward_cuda(x, u, out, u_mean, num_chunks, leak, threshold);
  return {out, u_mean};
}

std::tuple<at::Tensor, at::Tensor> lim_backward_cuda_impl(
    const at::Tensor& x_in, const OptTensor& u_prev, const OptTensor& grad_out,
    const OptTensor& grad_u_mean, int64_t num_chunks, double leak, double threshold,
    bool need_grad_x, bool need_grad_u_prev) {
  const char* op = "memba_vision::lim_backward";
  check_x(op, x_in, num_chunks);
  const int64_t B = x_in.size(0), L = x_in.size(1), R = x_in.size(2), l = L / num_chunks;
  check_like(op, "u_prev", u_prev, x_in, {B, l, R});
  check_like(op, "grad_out", grad_out, x_in, {B, L, R});
  check_like(op, "grad_u_mean", grad_u_mean, x_in, {B, l, R});
  MEMBA_CHECK(!need_grad_u_prev || present(u_prev), op, ": need_grad_u_prev without u_prev");
  const at::Tensor x = x_in.contiguous();
  const OptTensor u = contiguous_or_none(u_prev);
  const OptTensor go = contiguous_or_none(grad_out);
  const OptTensor gm = contiguous_or_none(grad_u_mean);
  at::Tensor grad_x, grad_u_prev;
  if (need_grad_x) grad_x = at::empty_like(x);
  if (need_grad_u_prev) grad_u_prev = at::empty({B, l, R}, x.options());
  if (need_grad_x || need_grad_u_prev) {
    lim_backward_cuda(x, u, go, gm, grad_x, grad_u_prev, num_chunks, leak, threshold);
  }
  return {grad_x, grad_u_prev};
}

// ------------------------------------------------- Meta kernels (shapes only)
std::tuple<at::Tensor, at::Tensor> lim_meta(const at::Tensor& x, const OptTensor& u_prev,
                                            int64_t num_chunks, double leak, double threshold) {
  MEMBA_CHECK(x.dim() == 3 && num_chunks >= 1, "memba_vision::lim: bad arguments");
  const c10::SymInt l = x.sym_size(1) / num_chunks;
  return {at::empty_symint(x.sym_sizes(), x.options()),
          at::empty_symint({x.sym_size(0), l, x.sym_size(2)}, x.options())};
}

std::tuple<at::Tensor, at::Tensor> lim_backward_meta(
    const at::Tensor& x, const OptTensor& u_prev, const OptTensor& grad_out,
    const OptTensor& grad_u_mean, int64_t num_chunks, double leak, double threshold,
    bool need_grad_x, bool need_grad_u_prev) {
  MEMBA_CHECK(x.dim() == 3 && num_chunks >= 1, "memba_vision::lim_backward: bad arguments");
  at::Tensor grad_x, grad_u_prev;
  if (need_grad_x) grad_x = at::empty_symint(x.sym_sizes(), x.options());
  if (need_grad_u_prev) {
    const c10::SymInt l = x.sym_size(1) / num_chunks;
    grad_u_prev = at::empty_symint({x.sym_size(0), l, x.sym_size(2)}, x.options());
  }
  return {grad_x, grad_u_prev};
}

// ------------------------------------------------------------------ Autograd
// Both calls go through the dispatcher below the autograd keys, so the
// Autograd kernel works for any backend kernel (CUDA, Meta / fake tensors).
std::tuple<at::Tensor, at::Tensor> call_lim(const at::Tensor& x, const OptTensor& u_prev,
                                            int64_t num_chunks, double leak, double threshold) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("memba_vision::lim", "")
                             .typed<decltype(lim_cuda_impl)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, u_prev, num_chunks, leak, threshold);
}

std::tuple<at::Tensor, at::Tensor> call_lim_backward(
    const at::Tensor& x, const OptTensor& u_prev, const OptTensor& grad_out,
    const OptTensor& grad_u_mean, int64_t num_chunks, double leak, double threshold,
    bool need_grad_x, bool need_grad_u_prev) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("memba_vision::lim_backward", "")
                             .typed<decltype(lim_backward_cuda_impl)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, u_prev, grad_out, grad_u_mean, num_chunks, leak, threshold, need_grad_x,
                 need_grad_u_prev);
}

}  // namespace

// Saves only x and u_prev (contiguous) and the scalars; the backward kernel
// recomputes the reset decisions from them. Not twice differentiable. Its node
// shows up as torch::autograd::CppNode<memba_lim::LimFunction>.
class LimFunction : public torch::autograd::Function<LimFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const OptTensor& u_prev, int64_t num_chunks, double leak,
                               double threshold) {
    const at::Tensor xc = x.contiguous();
    const OptTensor uc = contiguous_or_none(u_prev);
    auto [out, u_mean] = call_lim(xc, uc, num_chunks, leak, threshold);
    ctx->save_for_backward({xc, uc.value_or(at::Tensor())});
    ctx->saved_data["num_chunks"] = num_chunks;
    ctx->saved_data["leak"] = leak;
    ctx->saved_data["threshold"] = threshold;
    ctx->set_materialize_grads(false);  // an unused output's grad stays undefined
    return {out, u_mean};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_out = grads[0];
    const at::Tensor& grad_u_mean = grads[1];
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& u_prev = saved[1];
    // Edges are the defined tensor inputs: 0 = x, 1 = u_prev when given.
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_u = u_prev.defined() && ctx->needs_input_grad(1);
    at::Tensor grad_x, grad_u_prev;
    if ((grad_out.defined() || grad_u_mean.defined()) && (need_x || need_u)) {
      std::tie(grad_x, grad_u_prev) = call_lim_backward(
          x, u_prev.defined() ? OptTensor(u_prev) : std::nullopt,
          grad_out.defined() ? OptTensor(grad_out) : std::nullopt,
          grad_u_mean.defined() ? OptTensor(grad_u_mean) : std::nullopt,
          ctx->saved_data["num_chunks"].toInt(), ctx->saved_data["leak"].toDouble(),
          ctx->saved_data["threshold"].toDouble(), need_x, need_u);
    }
    return {grad_x, grad_u_prev, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

namespace {

std::tuple<at::Tensor, at::Tensor> lim_autograd(const at::Tensor& x, const OptTensor& u_prev,
                                                int64_t num_chunks, double leak,
                                                double threshold) {
  const bool track = at::GradMode::is_enabled() &&
                     (x.requires_grad() || (present(u_prev) && u_prev->requires_grad()));
  if (!track) return call_lim(x, u_prev, num_chunks, leak, threshold);
  const variable_list out = LimFunction::apply(x, u_prev, num_chunks, leak, threshold);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace memba_lim

// FRAGMENT: other memba_vision extensions may add ops to the same namespace.
TORCH_LIBRARY_FRAGMENT(memba_vision, m) {
  m.def("lim(Tensor x, Tensor? u_prev, int num_chunks, float leak, float threshold) "
        "-> (Tensor, Tensor)");
  m.def("lim_backward(Tensor x, Tensor? u_prev, Tensor? grad_out, Tensor? grad_u_mean, "
        "int num_chunks, float leak, float threshold, bool need_grad_x, "
        "bool need_grad_u_prev) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(memba_vision, CUDA, m) {
  m.impl("lim", &memba_lim::lim_cuda_impl);
  m.impl("lim_backward", &memba_lim::lim_backward_cuda_impl);
}

TORCH_LIBRARY_IMPL(memba_vision, Meta, m) {
  m.impl("lim", &memba_lim::lim_meta);
  m.impl("lim_backward", &memba_lim::lim_backward_meta);
}

TORCH_LIBRARY_IMPL(memba_vision, Autograd, m) {
  m.impl("lim", &memba_lim::lim_autograd);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused LIM CUDA kernels; importing registers torch.ops.memba_vision.lim "
            "(with a C++ autograd backward) and torch.ops.memba_vision.lim_backward";
}
