// Memba's LIM for both scan directions of a layer (see LimPairParams): one input shared by
// the directions (Vim) or one input per direction (VMamba).
//
// One thread per (direction, batch item, chunk position j, rank r) walks the T
// chunks. Loads and stores along r are coalesced across a warp; the reversed
// direction visits its tokens from the end, so neither its input nor its
// output is ever flipped. The arithmetic is explicitly rounded (no FMA
// contraction), as in the PyTorch reference, so the reset decisions agree.
#include "scan_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "float_convert.cuh"

namespace memba_scan {
namespace {

constexpr int kLimThreads = 256;

struct LimIndex {
  int dir, b, j, r;
  int64_t row;  // (b, j, r) offset in a (B, l, R) tensor
};

__device__ __forceinline__ bool lim_index(const LimPairParams& p, LimIndex& ix) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kLimThreads + threadIdx.x;
  const int64_t per_dir = static_cast<int64_t>(p.batch) * p.chunk_len * p.rank;
  if (i >= 2 * per_dir) return false;
  ix.dir = static_cast<int>(i / per_dir);
  ix.row = i % per_dir;
  ix.r = static_cast<int>(ix.row % p.rank);
  ix.j = static_cast<int>((ix.row / p.rank) % p.chunk_len);
  ix.b = static_cast<int>(ix.row / (static_cast<int64_t>(p.rank) * p.chunk_len));
  return true;
}

// Token of chunk i at this thread's position.
__device__ __forceinline__ int lim_token(const LimPairParams& p, const LimIndex& ix, int i) {
  const int s = i * p.chunk_len + ix.j;
  return ix.dir ? p.seqlen - 1 - s : s;
}

// (b, t, r) offset of this thread's direction in x: (B, L, R), or (B, L, 2, R) per direction.
__device__ __forceinline__ int64_t x_at(const LimPairParams& p, const LimIndex& ix, int t) {
  const int64_t bt = static_cast<int64_t>(ix.b) * p.seqlen + t;
  return (p.per_dir ? bt * 2 + ix.dir : bt) * p.rank + ix.r;
}

// The same in out, g_out and g_x: (2, B, L, R), or (B, L, 2, R) per direction (x's layout).
__device__ __forceinline__ int64_t out_at(const LimPairParams& p, const LimIndex& ix, int t) {
  if (p.per_dir) return x_at(p, ix, t);
  return ((static_cast<int64_t>(ix.dir) * p.batch + ix.b) * p.seqlen + t) * p.rank + ix.r;
}

template <typename T>
__global__ void __launch_bounds__(kLimThreads) lim_pair_fwd_kernel(const LimPairParams p) {
  LimIndex ix;
  if (!lim_index(p, ix)) return;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const T* up = static_cast<const T*>(p.u_prev[ix.dir]);
  float u = up ? to_f<T>(up[ix.row]) : 0.f, sum = 0.f;
  for (int i = 0; i < p.nchunks; ++i) {
    const int t = lim_token(p, ix, i);
    const float v = __fadd_rn(__fmul_rn(p.leak, u), to_f<T>(x[x_at(p, ix, t)]));
    u = v > p.threshold ? 0.f : v;
    out[out_at(p, ix, t)] = from_f<T>(u);
    sum = __fadd_rn(sum, u);
  }
  // tokens no chunk covers: the last L - l*T (direction 0) or the first (direction 1)
  const int covered = p.nchunks * p.chunk_len;
  for (int e = covered + ix.j; e < p.seqlen; e += p.chunk_len) {
    out[out_at(p, ix, ix.dir ? p.seqlen - 1 - e : e)] = from_f<T>(0.f);
  }
  static_cast<T*>(p.u_mean)[static_cast<int64_t>(ix.dir) * p.batch * p.chunk_len * p.rank + ix.row] =
      from_f<T>(__fdiv_rn(sum, static_cast<float>(p.nchunks)));
}

// dL/dx[t_i] = dp_i, dp_i = 0 where chunk i reset, else g_i + leak * dp_{i+1},
// g_i = g_out[t_i] + g_mean / T;  dL/du_prev = leak * dp_0.
template <typename T>
__global__ void __launch_bounds__(kLimThreads) lim_pair_bwd_kernel(const LimPairParams p) {
  LimIndex ix;
  if (!lim_index(p, ix)) return;
  const T* x = static_cast<const T*>(p.x);
  const T* up = static_cast<const T*>(p.u_prev[ix.dir]);
  const T* gm = static_cast<const T*>(p.g_mean[ix.dir]);
  const T* go = static_cast<const T*>(p.g_out);
  T* gx = static_cast<T*>(p.g_x);
  float u = up ? to_f<T>(up[ix.row]) : 0.f;
  unsigned long long reset = 0ull;
  for (int i = 0; i < p.nchunks; ++i) {
    const float v = __fadd_rn(__fmul_rn(p.leak, u), to_f<T>(x[x_at(p, ix, lim_token(p, ix, i))]));
    const bool fire = v > p.threshold;
    reset |= static_cast<unsigned long long>(fire) << i;
    u = fire ? 0.f : v;
  }
  const float g_mean = gm ? __fdiv_rn(to_f<T>(gm[ix.row]), static_cast<float>(p.nchunks)) : 0.f;
  float dp = 0.f;
  for (int i = p.nchunks - 1; i >= 0; --i) {
    const int64_t o = out_at(p, ix, lim_token(p, ix, i));
    const float g = __fadd_rn(__fadd_rn(to_f<T>(go[o]), g_mean), __fmul_rn(p.leak, dp));
    dp = (reset >> i) & 1ull ? 0.f : g;
    gx[o] = from_f<T>(dp);
  }
  const int covered = p.nchunks * p.chunk_len;
  for (int e = covered + ix.j; e < p.seqlen; e += p.chunk_len) {
    gx[out_at(p, ix, ix.dir ? p.seqlen - 1 - e : e)] = from_f<T>(0.f);
  }
  T* gp = static_cast<T*>(p.g_prev[ix.dir]);
  if (gp) gp[ix.row] = from_f<T>(__fmul_rn(p.leak, dp));
}

template <typename T>
cudaError_t lim_pair_launch(const LimPairParams& p, bool backward, cudaStream_t s) {
  const int64_t n = 2ll * p.batch * p.chunk_len * p.rank;
  const unsigned blocks = static_cast<unsigned>((n + kLimThreads - 1) / kLimThreads);
  if (p.nchunks < 1 || p.nchunks > kLimPairMaxChunks) return cudaErrorInvalidValue;
  if (backward) lim_pair_bwd_kernel<T><<<blocks, kLimThreads, 0, s>>>(p);
  else lim_pair_fwd_kernel<T><<<blocks, kLimThreads, 0, s>>>(p);
  return cudaGetLastError();
}

cudaError_t lim_pair_dispatch(const LimPairParams& p, DType dtype, bool backward,
                              cudaStream_t s) {
  switch (dtype) {
    case DType::kFloat32: return lim_pair_launch<float>(p, backward, s);
    case DType::kFloat16: return lim_pair_launch<__half>(p, backward, s);
    case DType::kBFloat16: return lim_pair_launch<__nv_bfloat16>(p, backward, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t lim_pair_forward(const LimPairParams& p, DType dtype, cudaStream_t stream) {
  return lim_pair_dispatch(p, dtype, false, stream);
}
cudaError_t lim_pair_backward(const LimPairParams& p, DType dtype, cudaStream_t stream) {
  return lim_pair_dispatch(p, dtype, true, stream);
}

}  // namespace memba_scan
