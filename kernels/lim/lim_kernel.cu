// Fused LIM forward and backward kernels (one launch each).
//
// x, out, grad_x: (B, L, R) contiguous; u_prev, u_mean, grad_u_prev,
// grad_u_mean: (B, l, R) contiguous with l = L / T. Inside one batch item,
// chunk i is the contiguous block of l*R elements starting at i*l*R, so a
// thread owns V consecutive elements at offset q in [0, l*R) and walks the T
// chunks with stride l*R: every load and store is coalesced and, when the
// sizes and pointers allow it, 16 bytes wide (8 bytes in the backward for
// 2-byte types, see kBwdVec). The same thread also writes the zero tail rows
// (l*T .. L-1) at offsets q, q + l*R, ... of the tail.
//
// Arithmetic is done in at::opmath_type (fp32 for fp16/bf16/fp32, fp64 for
// fp64) with explicitly rounded mul/add/div, so the result does not depend on
// FMA contraction or --use_fast_math and matches the PyTorch reference.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <optional>

namespace memba_lim {
namespace {

constexpr int kThreads = 128;  // small blocks spread small problems over more SMs
constexpr int kSegment = 32;  // reset decisions kept as the bits of one uint32
constexpr int kBatch = 4;     // chunks whose loads are issued together

// Elements per thread (V) and access width. The forward always moves 16 bytes
// per access. The backward keeps five values per element (u0, grad_u_mean / T,
// the running grad, u, the reset bits) besides its loads: at V = 8 fp16/bf16
// elements that took 128 registers (16 resident warps per SM, two dependent
// load phases per thread). For 2-byte types it therefore uses
//   V = MEMBA_LIM_BWD_VEC_2B (default 4: 8-byte accesses), capped at
//       80 registers by __launch_bounds__ (6 blocks = 24 warps per SM; sm_90,
//       nvcc 13.0: bf16 80, fp16 78 registers, no spills), and
//   MEMBA_LIM_BWD_PREFETCH_2B (default 1): the loads of the first grad_out
//       batch are issued together with those of x, so for T <= kBatch a
//       thread waits for memory once instead of twice.
// fp32 / fp64 are unchanged. Both knobs can be overridden at build time to
// compare variants, e.g. NVCC_APPEND_FLAGS="-DMEMBA_LIM_BWD_VEC_2B=8
// -DMEMBA_LIM_BWD_PREFETCH_2B=0" (after removing build/) restores the
// earlier backward.
#ifndef MEMBA_LIM_BWD_VEC_2B
#define MEMBA_LIM_BWD_VEC_2B 4
#endif
#ifndef MEMBA_LIM_BWD_PREFETCH_2B
#define MEMBA_LIM_BWD_PREFETCH_2B 1
#endif
static_assert(MEMBA_LIM_BWD_VEC_2B == 2 || MEMBA_LIM_BWD_VEC_2B == 4 ||
                  MEMBA_LIM_BWD_VEC_2B == 8,
              "MEMBA_LIM_BWD_VEC_2B must be 2, 4 or 8");
template <typename T> constexpr int kFwdVec = 16 / sizeof(T);
template <typename T>
constexpr int kBwdVec = sizeof(T) == 2 ? MEMBA_LIM_BWD_VEC_2B : 16 / sizeof(T);
template <typename T>
constexpr bool kBwdPrefetch = sizeof(T) == 2 && MEMBA_LIM_BWD_PREFETCH_2B != 0;
// Minimum resident blocks per SM asked of the compiler. 0 emits no
// .minnctapersm, i.e. the same code as a plain __launch_bounds__(kThreads)
// (a 1 there changes the fp32 / fp64 register allocation).
template <typename T>
constexpr int kBwdMinBlocks = sizeof(T) == 2 && MEMBA_LIM_BWD_VEC_2B <= 4 ? 6 : 0;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Loads / stores one Pack as a single 2-, 4-, 8- or 16-byte access.
template <int Bytes> struct Word;
template <> struct Word<2> { using type = uint16_t; };
template <> struct Word<4> { using type = uint32_t; };
template <> struct Word<8> { using type = uint2; };
template <> struct Word<16> { using type = uint4; };

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load(const T* p) {
  using W = typename Word<sizeof(Pack<T, N>)>::type;
  const W w = *reinterpret_cast<const W*>(p);
  Pack<T, N> out;
  *reinterpret_cast<W*>(&out) = w;
  return out;
}

// __stcg keeps the store one instruction wide (a plain assignment of the Pack
// may be split into per-element stores by the compiler).
template <typename T, int N>
__device__ __forceinline__ void store(T* p, const Pack<T, N>& val) {
  using W = typename Word<sizeof(Pack<T, N>)>::type;
  __stcg(reinterpret_cast<W*>(p), *reinterpret_cast<const W*>(&val));
}

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

template <typename scalar_t, int V>
__device__ __forceinline__ void write_zero_tail(scalar_t* __restrict__ row, int64_t q,
                                                int64_t chunk, int64_t tail) {
  // row points at (batch start + T*chunk + q); tail = (L - l*T) * R elements.
  Pack<scalar_t, V> zero;
#pragma unroll
  for (int k = 0; k < V; ++k) zero.v[k] = scalar_t(0);
  for (int64_t t = q; t < tail; t += chunk, row += chunk) store<scalar_t, V>(row, zero);
}

// One thread per V elements of a chunk: u <- leak*u + x_i; reset; out_i = u.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
lim_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ u_prev,
                   scalar_t* __restrict__ out, scalar_t* __restrict__ u_mean,
                   int64_t n_vec, int64_t chunk, int64_t seq, int T,
                   at::opmath_type<scalar_t> leak, at::opmath_type<scalar_t> threshold) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= n_vec) return;
  const int64_t p = idx * V;              // offset in (B, l, R)
  const int64_t b = p / chunk;
  const int64_t q = p - b * chunk;        // offset inside one chunk
  const scalar_t* xp = x + b * seq + q;
  scalar_t* op = out + b * seq + q;

  acc_t u[V], sum[V];
  if (u_prev != nullptr) {
    const auto up = load<scalar_t, V>(u_prev + p);
#pragma unroll
    for (int k = 0; k < V; ++k) u[k] = static_cast<acc_t>(up.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) u[k] = acc_t(0);
  }
#pragma unroll
  for (int k = 0; k < V; ++k) sum[k] = acc_t(0);

  for (int i0 = 0; i0 < T; i0 += kBatch) {
    Pack<scalar_t, V> xv[kBatch];  // all loads of the batch in flight at once
#pragma unroll
    for (int s = 0; s < kBatch; ++s) {
      if (i0 + s < T) xv[s] = load<scalar_t, V>(xp + (i0 + s) * chunk);
    }
#pragma unroll
    for (int s = 0; s < kBatch; ++s) {
      if (i0 + s >= T) break;
      Pack<scalar_t, V> o;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const acc_t pre = add_rn(mul_rn(leak, u[k]), static_cast<acc_t>(xv[s].v[k]));
        u[k] = pre > threshold ? acc_t(0) : pre;
        sum[k] = add_rn(sum[k], u[k]);
        o.v[k] = static_cast<scalar_t>(u[k]);
      }
      store<scalar_t, V>(op + (i0 + s) * chunk, o);
    }
  }

  Pack<scalar_t, V> mean;
  const acc_t t_count = static_cast<acc_t>(T);
#pragma unroll
  for (int k = 0; k < V; ++k) mean.v[k] = static_cast<scalar_t>(div_rn(sum[k], t_count));
  store<scalar_t, V>(u_mean + p, mean);

  write_zero_tail<scalar_t, V>(op + static_cast<int64_t>(T) * chunk, q, chunk,
                               seq - static_cast<int64_t>(T) * chunk);
}

// Recomputes the reset decisions of up to kSegment chunks as bits, then runs
//   gpre_i = keep_i * (grad_out_i + grad_u_mean / T + leak * gpre_{i+1})
// backwards over them. T > kSegment is handled segment by segment from the
// last one, re-integrating from u_prev each time (O(T^2 / 32), rare).
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads, kBwdMinBlocks<scalar_t>)
lim_backward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ u_prev,
                    const scalar_t* __restrict__ grad_out,
                    const scalar_t* __restrict__ grad_u_mean,
                    scalar_t* __restrict__ grad_x, scalar_t* __restrict__ grad_u_prev,
                    int64_t n_vec, int64_t chunk, int64_t seq, int T,
                    at::opmath_type<scalar_t> leak, at::opmath_type<scalar_t> threshold) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= n_vec) return;
  const int64_t p = idx * V;
  const int64_t b = p / chunk;
  const int64_t q = p - b * chunk;
  const scalar_t* xp = x + b * seq + q;
  const scalar_t* gop = grad_out == nullptr ? nullptr : grad_out + b * seq + q;
  scalar_t* gxp = grad_x == nullptr ? nullptr : grad_x + b * seq + q;

  acc_t u0[V], gmean[V], g[V];
  if (u_prev != nullptr) {
    const auto up = load<scalar_t, V>(u_prev + p);
#pragma unroll
    for (int k = 0; k < V; ++k) u0[k] = static_cast<acc_t>(up.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) u0[k] = acc_t(0);
  }
  const acc_t t_count = static_cast<acc_t>(T);
  if (grad_u_mean != nullptr) {
    const auto gm = load<scalar_t, V>(grad_u_mean + p);
#pragma unroll
    for (int k = 0; k < V; ++k) gmean[k] = div_rn(static_cast<acc_t>(gm.v[k]), t_count);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) gmean[k] = acc_t(0);
  }
#pragma unroll
  for (int k = 0; k < V; ++k) g[k] = acc_t(0);

  const int n_seg = (T + kSegment - 1) / kSegment;
  for (int seg = n_seg - 1; seg >= 0; --seg) {
    const int start = seg * kSegment;
    const int end = min(T, start + kSegment);
    acc_t u[V];
    uint32_t keep[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      u[k] = u0[k];
      keep[k] = 0;
    }
    // With kBwdPrefetch, the grad_out loads of the batch the reverse pass starts
    // with (i = end-1, end-2, ...) are issued here, before those of x.
    Pack<scalar_t, V> go_first[kBatch];
    if constexpr (kBwdPrefetch<scalar_t>) {
      if (gop != nullptr) {
#pragma unroll
        for (int s = 0; s < kBatch; ++s) {
          if (end - 1 - s >= start) {
            go_first[s] = load<scalar_t, V>(gop + (end - 1 - s) * chunk);
          }
        }
      }
    }
    for (int i0 = 0; i0 < end; i0 += kBatch) {
      Pack<scalar_t, V> xv[kBatch];
#pragma unroll
      for (int s = 0; s < kBatch; ++s) {
        if (i0 + s < end) xv[s] = load<scalar_t, V>(xp + (i0 + s) * chunk);
      }
#pragma unroll
      for (int s = 0; s < kBatch; ++s) {
        if (i0 + s >= end) break;
        const int bit = i0 + s - start;  // a decision is kept only when bit >= 0
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const acc_t pre = add_rn(mul_rn(leak, u[k]), static_cast<acc_t>(xv[s].v[k]));
          const bool fire = pre > threshold;
          u[k] = fire ? acc_t(0) : pre;
          if (!fire && bit >= 0) keep[k] |= 1u << bit;
        }
      }
    }
    for (int i0 = end - 1; i0 >= start; i0 -= kBatch) {
      Pack<scalar_t, V> go[kBatch];
      if (gop != nullptr) {
        if (kBwdPrefetch<scalar_t> && i0 == end - 1) {
#pragma unroll
          for (int s = 0; s < kBatch; ++s) go[s] = go_first[s];
        } else {
#pragma unroll
          for (int s = 0; s < kBatch; ++s) {
            if (i0 - s >= start) go[s] = load<scalar_t, V>(gop + (i0 - s) * chunk);
          }
        }
      }
#pragma unroll
      for (int s = 0; s < kBatch; ++s) {
        const int i = i0 - s;
        if (i < start) break;
        Pack<scalar_t, V> o;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const acc_t d =
              gop != nullptr ? add_rn(static_cast<acc_t>(go[s].v[k]), gmean[k]) : gmean[k];
          g[k] = (keep[k] >> (i - start)) & 1u ? add_rn(d, mul_rn(leak, g[k])) : acc_t(0);
          o.v[k] = static_cast<scalar_t>(g[k]);
        }
        if (gxp != nullptr) store<scalar_t, V>(gxp + i * chunk, o);
      }
    }
  }

  if (grad_u_prev != nullptr) {
    Pack<scalar_t, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) o.v[k] = static_cast<scalar_t>(mul_rn(leak, g[k]));
    store<scalar_t, V>(grad_u_prev + p, o);
  }
  if (gxp != nullptr) {
    write_zero_tail<scalar_t, V>(gxp + static_cast<int64_t>(T) * chunk, q, chunk,
                                 seq - static_cast<int64_t>(T) * chunk);
  }
}

bool aligned(const void* ptr, int bytes) {
  return ptr == nullptr || reinterpret_cast<std::uintptr_t>(ptr) % bytes == 0;
}

template <typename scalar_t>
const scalar_t* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->const_data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
scalar_t* mutable_or_null(at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<scalar_t>() : nullptr;
}

struct Geometry {
  int64_t chunk, seq, n;  // l*R, L*R, B*l*R
};

Geometry geometry(const at::Tensor& x, int64_t num_chunks) {
  const int64_t L = x.size(1), R = x.size(2);
  const int64_t chunk = (L / num_chunks) * R;
  return {chunk, L * R, x.size(0) * chunk};
}

int64_t num_blocks(int64_t n_vec) { return (n_vec + kThreads - 1) / kThreads; }

}  // namespace

void lim_forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& u_prev,
                      at::Tensor& out, at::Tensor& u_mean, int64_t num_chunks,
                      double leak, double threshold) {
  const Geometry geo = geometry(x, num_chunks);
  if (geo.n == 0) return;  // B == 0 or R == 0: nothing to write
  const c10::cuda::CUDAGuard device_guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "lim_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        constexpr int kVec = kFwdVec<scalar_t>;
        constexpr int kBytes = kVec * sizeof(scalar_t);
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        const scalar_t* up = data_or_null<scalar_t>(u_prev);
        scalar_t* op = out.mutable_data_ptr<scalar_t>();
        scalar_t* mp = u_mean.mutable_data_ptr<scalar_t>();
        const bool vec = geo.chunk % kVec == 0 && geo.seq % kVec == 0 &&
                         aligned(xp, kBytes) && aligned(up, kBytes) && aligned(op, kBytes) &&
                         aligned(mp, kBytes);
        const int T = static_cast<int>(num_chunks);
        if (vec) {
          const int64_t n_vec = geo.n / kVec;
          lim_forward_kernel<scalar_t, kVec><<<num_blocks(n_vec), kThreads, 0, stream>>>(
              xp, up, op, mp, n_vec, geo.chunk, geo.seq, T, static_cast<acc_t>(leak),
              static_cast<acc_t>(threshold));
        } else {
          lim_forward_kernel<scalar_t, 1><<<num_blocks(geo.n), kThreads, 0, stream>>>(
              xp, up, op, mp, geo.n, geo.chunk, geo.seq, T, static_cast<acc_t>(leak),
              static_cast<acc_t>(threshold));
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void lim_backward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& u_prev,
                       const std::optional<at::Tensor>& grad_out,
                       const std::optional<at::Tensor>& grad_u_mean, at::Tensor& grad_x,
                       at::Tensor& grad_u_prev, int64_t num_chunks, double leak,
                       double threshold) {
  const Geometry geo = geometry(x, num_chunks);
  if (geo.n == 0) return;
  const c10::cuda::CUDAGuard device_guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "lim_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        constexpr int kVec = kBwdVec<scalar_t>;
        constexpr int kBytes = kVec * sizeof(scalar_t);
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        const scalar_t* up = data_or_null<scalar_t>(u_prev);
        const scalar_t* gop = data_or_null<scalar_t>(grad_out);
        const scalar_t* gmp = data_or_null<scalar_t>(grad_u_mean);
        scalar_t* gxp = mutable_or_null<scalar_t>(grad_x);
        scalar_t* gup = mutable_or_null<scalar_t>(grad_u_prev);
        const bool vec = geo.chunk % kVec == 0 && geo.seq % kVec == 0 &&
                         aligned(xp, kBytes) && aligned(up, kBytes) && aligned(gop, kBytes) &&
                         aligned(gmp, kBytes) && aligned(gxp, kBytes) && aligned(gup, kBytes);
        const int T = static_cast<int>(num_chunks);
        if (vec) {
          const int64_t n_vec = geo.n / kVec;
          lim_backward_kernel<scalar_t, kVec><<<num_blocks(n_vec), kThreads, 0, stream>>>(
              xp, up, gop, gmp, gxp, gup, n_vec, geo.chunk, geo.seq, T,
              static_cast<acc_t>(leak), static_cast<acc_t>(threshold));
        } else {
          lim_backward_kernel<scalar_t, 1><<<num_blocks(geo.n), kThreads, 0, stream>>>(
              xp, up, gop, gmp, gxp, gup, geo.n, geo.chunk, geo.seq, T,
              static_cast<acc_t>(leak), static_cast<acc_t>(threshold));
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace memba_lim
