// VMamba's output gate LayerNorm(y) * silu(z), z = z + c with a correction c, and the plain
// LayerNorm of a tensor in the storage dtype (kGate false; see NormGateParams).
//
// One warp per token row: lane l holds the channel quads l, l + 32, ... of the row in
// registers (kVec quads at most, a template argument picked from D), so y is read once,
// the mean and the variance take two passes over registers (as exact as PyTorch's), and
// the row's sums are warp shuffles. The backward keeps x_hat and dL/dx_hat per quad and
// needs the same two row sums as LayerNorm's own backward.
#include "scan_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "float_convert.cuh"

namespace memba_scan {
namespace {

constexpr int kRowsPerBlock = 8;  // one warp per row
constexpr int kNormThreads = 32 * kRowsPerBlock;
constexpr unsigned kAll = 0xffffffffu;

// Four consecutive channels, loaded and stored as one access.
template <typename T>
struct alignas(4 * sizeof(T)) Quad {
  T v[4];
};

// A quad of channels as fp32.
struct F4 {
  float v[4];
};

template <typename T>
__device__ __forceinline__ F4 load4(const void* base, int64_t off) {
  const Quad<T> q = *reinterpret_cast<const Quad<T>*>(static_cast<const T*>(base) + off);
  F4 f;
#pragma unroll
  for (int e = 0; e < 4; ++e) f.v[e] = to_f<T>(q.v[e]);
  return f;
}

template <typename T>
__device__ __forceinline__ void store4(void* base, int64_t off, const F4& f) {
  Quad<T> q;
#pragma unroll
  for (int e = 0; e < 4; ++e) q.v[e] = from_f<T>(f.v[e]);
  *reinterpret_cast<Quad<T>*>(static_cast<T*>(base) + off) = q;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(kAll, v, m);
  return v;
}

// The gate input of a quad: z, plus c when given (Memba's correction).
template <typename T>
__device__ __forceinline__ F4 gate_input(const NormGateParams& p, int64_t row, int q) {
  F4 z = load4<T>(p.z, row * p.z_sr + 4 * q);
  if (p.c != nullptr) {
    const F4 c = load4<T>(p.c, row * p.dim + 4 * q);
#pragma unroll
    for (int e = 0; e < 4; ++e) z.v[e] += c.v[e];
  }
  return z;
}

// silu(z) and its derivative s (1 + z (1 - s)), s = sigmoid(z).
struct Silu {
  float g, dg;
  __device__ explicit Silu(float z) {
    const float s = 1.f / (1.f + __expf(-z));
    g = z * s;
    dg = s * (1.f + z * (1.f - s));
  }
};

// y's dtype: fp32 under the gate (the merged cross scan), else the storage dtype.
template <typename T, bool kGate>
using YType = std::conditional_t<kGate, float, T>;

template <typename T, int kVec, bool kGate>
__global__ void __launch_bounds__(kNormThreads)
norm_gate_fwd_kernel(const NormGateParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= p.rows) return;
  const int lane = threadIdx.x % 32, nq = p.dim / 4;
  F4 v[kVec];
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const int q = lane + 32 * i;
    v[i] = q < nq ? load4<YType<T, kGate>>(p.y, row * p.dim + 4 * q) : F4{};
#pragma unroll
    for (int e = 0; e < 4; ++e) s += v[i].v[e];
  }
  const float mean = warp_sum(s) / p.dim;
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    if (lane + 32 * i < nq) {
#pragma unroll
      for (int e = 0; e < 4; ++e) ss += (v[i].v[e] - mean) * (v[i].v[e] - mean);
    }
  }
  const float rstd = rsqrtf(warp_sum(ss) / p.dim + p.eps);
  if (lane == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const int q = lane + 32 * i;
    if (q < nq) {
      const F4 w = load4<float>(p.weight, 4 * q), b = load4<float>(p.bias, 4 * q);
      F4 o;
#pragma unroll
      for (int e = 0; e < 4; ++e) o.v[e] = (v[i].v[e] - mean) * rstd * w.v[e] + b.v[e];
      if (kGate) {
        const F4 z = gate_input<T>(p, row, q);
#pragma unroll
        for (int e = 0; e < 4; ++e) o.v[e] *= Silu(z.v[e]).g;
      }
      store4<T>(p.out, row * p.dim + 4 * q, o);
    }
  }
}

// Per channel: yn = x_hat w + b, out = yn silu(z); dL/dyn = g silu(z), dz = g yn silu'(z),
// dL/dx_hat = w dL/dyn; dy = rstd (dx_hat - mean(dx_hat) - x_hat mean(dx_hat x_hat)).
// Without the gate: dL/dyn = g, dL/dx_hat = w g.
template <typename T, int kVec, bool kGate>
__global__ void __launch_bounds__(kNormThreads)
norm_gate_bwd_kernel(const NormGateParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= p.rows) return;
  const int lane = threadIdx.x % 32, nq = p.dim / 4;
  const float mean = p.mean[row], rstd = p.rstd[row];
  F4 xh[kVec], dxh[kVec];
  float a = 0.f, c = 0.f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const int q = lane + 32 * i;
    if (q < nq) {
      const F4 y = load4<YType<T, kGate>>(p.y, row * p.dim + 4 * q);
      const F4 w = load4<float>(p.weight, 4 * q), b = load4<float>(p.bias, 4 * q);
      const F4 g = load4<T>(p.dout, row * p.dim + 4 * q);
      F4 z{}, dz;
      if (kGate) z = gate_input<T>(p, row, q);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float x = (y.v[e] - mean) * rstd;
        float gy = g.v[e];  // dL/dyn
        if (kGate) {
          const Silu sl(z.v[e]);
          dz.v[e] = g.v[e] * (x * w.v[e] + b.v[e]) * sl.dg;
          gy *= sl.g;
        }
        xh[i].v[e] = x;
        dxh[i].v[e] = gy * w.v[e];
        a += dxh[i].v[e];
        c += dxh[i].v[e] * x;
      }
      if (kGate) store4<T>(p.dz, row * p.dim + 4 * q, dz);
    }
  }
  const float ma = warp_sum(a) / p.dim, mc = warp_sum(c) / p.dim;
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const int q = lane + 32 * i;
    if (q < nq) {
      F4 dy;
#pragma unroll
      for (int e = 0; e < 4; ++e) dy.v[e] = rstd * (dxh[i].v[e] - ma - xh[i].v[e] * mc);
      store4<YType<T, kGate>>(p.dy, row * p.dim + 4 * q, dy);
    }
  }
}

template <typename T, bool kBackward, bool kGate>
cudaError_t norm_gate_launch(const NormGateParams& p, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>((p.rows + kRowsPerBlock - 1) / kRowsPerBlock));
  const int quads_per_lane = (p.dim / 4 + 31) / 32;
#define MEMBA_NORM_GATE_CASE(V)                                                            \
  if (quads_per_lane <= V) {                                                               \
    if (kBackward) norm_gate_bwd_kernel<T, V, kGate><<<grid, kNormThreads, 0, s>>>(p);    \
    else norm_gate_fwd_kernel<T, V, kGate><<<grid, kNormThreads, 0, s>>>(p);              \
    return cudaGetLastError();                                                             \
  }
  // the channel counts of VMamba's stages (192, 384, 768, 1536 for dims 96) fill whole quads
  MEMBA_NORM_GATE_CASE(1)
  MEMBA_NORM_GATE_CASE(2)
  MEMBA_NORM_GATE_CASE(3)
  MEMBA_NORM_GATE_CASE(4)
  MEMBA_NORM_GATE_CASE(6)
  MEMBA_NORM_GATE_CASE(8)
  MEMBA_NORM_GATE_CASE(12)
  MEMBA_NORM_GATE_CASE(16)
#undef MEMBA_NORM_GATE_CASE
  return cudaErrorInvalidValue;  // the binding checks dim <= kNormGateMaxDim first
}

template <typename T> struct NormGateFwd {
  static cudaError_t run(const NormGateParams& p, cudaStream_t s) {
    return norm_gate_launch<T, false, true>(p, s);
  }
};
template <typename T> struct NormGateBwd {
  static cudaError_t run(const NormGateParams& p, cudaStream_t s) {
    return norm_gate_launch<T, true, true>(p, s);
  }
};
template <typename T> struct LayerNormFwd {
  static cudaError_t run(const NormGateParams& p, cudaStream_t s) {
    return norm_gate_launch<T, false, false>(p, s);
  }
};
template <typename T> struct LayerNormBwd {
  static cudaError_t run(const NormGateParams& p, cudaStream_t s) {
    return norm_gate_launch<T, true, false>(p, s);
  }
};

template <template <typename> class F>
cudaError_t dispatch(DType dtype, const NormGateParams& p, cudaStream_t s) {
  switch (dtype) {
    case DType::kFloat32: return F<float>::run(p, s);
    case DType::kFloat16: return F<__half>::run(p, s);
    case DType::kBFloat16: return F<__nv_bfloat16>::run(p, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

static_assert(kNormGateMaxDim == 4 * 32 * 16, "the largest kernel keeps 16 quads per lane");

cudaError_t norm_gate_forward(const NormGateParams& p, DType dtype, cudaStream_t stream) {
  return dispatch<NormGateFwd>(dtype, p, stream);
}
cudaError_t norm_gate_backward(const NormGateParams& p, DType dtype, cudaStream_t stream) {
  return dispatch<NormGateBwd>(dtype, p, stream);
}
cudaError_t layer_norm_forward(const NormGateParams& p, DType dtype, cudaStream_t stream) {
  return dispatch<LayerNormFwd>(dtype, p, stream);
}
cudaError_t layer_norm_backward(const NormGateParams& p, DType dtype, cudaStream_t stream) {
  return dispatch<LayerNormBwd>(dtype, p, stream);
}

}  // namespace memba_scan
