// Python binding of the fused LIM kernels (module memba_vision._lim_cuda).
//
//   forward(x, u_prev, num_chunks, leak, threshold) -> (out, u_mean)
//       x (B, L, R), u_prev (B, l, R) or None  ->  out (B, L, R), u_mean (B, l, R)
//   backward(x, u_prev, grad_out, grad_u_mean, num_chunks, leak, threshold,
//            need_grad_x, need_grad_u_prev) -> (grad_x or None, grad_u_prev or None)
//       grad_out / grad_u_mean may be None (treated as zeros, never read).
//
// x and u_prev must be contiguous CUDA tensors of one floating dtype (the
// Python wrapper makes them contiguous once); incoming grads are made
// contiguous here, which is free when they already are.
#include <torch/extension.h>

#include <limits>
#include <optional>
#include <tuple>

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

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

void check_x(const at::Tensor& x, int64_t num_chunks) {
  TORCH_CHECK(x.is_cuda(), "lim_cuda: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3, "lim_cuda: x must be (B, L, R), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "lim_cuda: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), "lim_cuda: x must be contiguous");
  TORCH_CHECK(num_chunks >= 1 && num_chunks <= x.size(1),
              "lim_cuda: num_chunks must be in [1, L=", x.size(1), "], got ", num_chunks);
  TORCH_CHECK(num_chunks <= std::numeric_limits<int>::max(), "lim_cuda: num_chunks too large");
}

// Checks a (B, l, R) companion of x (u_prev, grad_u_mean) or a (B, L, R) one.
void check_like(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape,
                const char* name) {
  TORCH_CHECK(t.device() == x.device(), "lim_cuda: ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "lim_cuda: ", name, " dtype ",
              t.scalar_type(), " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "lim_cuda: ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "lim_cuda: ", name, " must be contiguous");
}

std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& t) {
  if (!present(t)) return std::nullopt;
  return t->contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x,
                                           const std::optional<at::Tensor>& u_prev,
                                           int64_t num_chunks, double leak, double threshold) {
  check_x(x, num_chunks);
  const int64_t B = x.size(0), L = x.size(1), R = x.size(2), l = L / num_chunks;
  const std::optional<at::Tensor> u = present(u_prev) ? u_prev : std::nullopt;
  if (u) check_like(*u, x, {B, l, R}, "u_prev");
  at::Tensor out = at::empty_like(x);
  at::Tensor u_mean = at::empty({B, l, R}, x.options());
  lim_forward_cuda(x, u, out, u_mean, num_chunks, leak, threshold);
  return {out, u_mean};
}

std::tuple<at::Tensor, at::Tensor> backward(
    const at::Tensor& x, const std::optional<at::Tensor>& u_prev,
    const std::optional<at::Tensor>& grad_out, const std::optional<at::Tensor>& grad_u_mean,
    int64_t num_chunks, double leak, double threshold, bool need_grad_x,
    bool need_grad_u_prev) {
  check_x(x, num_chunks);
  const int64_t B = x.size(0), L = x.size(1), R = x.size(2), l = L / num_chunks;
  const std::optional<at::Tensor> u = present(u_prev) ? u_prev : std::nullopt;
  if (u) check_like(*u, x, {B, l, R}, "u_prev");
  TORCH_CHECK(!need_grad_u_prev || u, "lim_cuda: need_grad_u_prev without u_prev");
  const auto go = contiguous_or_none(grad_out);
  const auto gm = contiguous_or_none(grad_u_mean);
  if (go) check_like(*go, x, {B, L, R}, "grad_out");
  if (gm) check_like(*gm, x, {B, l, R}, "grad_u_mean");
  at::Tensor grad_x, grad_u_prev;
  if (need_grad_x) grad_x = at::empty_like(x);
  if (need_grad_u_prev) grad_u_prev = at::empty({B, l, R}, x.options());
  if (need_grad_x || need_grad_u_prev) {
    lim_backward_cuda(x, u, go, gm, grad_x, grad_u_prev, num_chunks, leak, threshold);
  }
  return {grad_x, grad_u_prev};
}

}  // namespace memba_lim

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused LIM (leaky integrate membrane) forward and backward CUDA kernels";
  m.def("forward", &memba_lim::forward, "LIM forward -> (out, u_mean)", py::arg("x"),
        py::arg("u_prev"), py::arg("num_chunks"), py::arg("leak"), py::arg("threshold"));
  m.def("backward", &memba_lim::backward,
        "LIM backward -> (grad_x or None, grad_u_prev or None)", py::arg("x"),
        py::arg("u_prev"), py::arg("grad_out"), py::arg("grad_u_mean"), py::arg("num_chunks"),
        py::arg("leak"), py::arg("threshold"), py::arg("need_grad_x"),
        py::arg("need_grad_u_prev"));
}
