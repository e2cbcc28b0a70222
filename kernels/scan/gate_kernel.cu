// Memba's gate branch on Vim (GateZParams in scan_kernel.h): the forward's
//   z'_k = z + S_k W_out^T        (k = 0, 1: the two scan directions)
// and the backward's gradient of z
//   dz = dz'_0 + dz'_1 + (dv_0 + dv_1) W_in,
// both "a sum of rows plus a rank-16 product", one launch each.
//
// A block owns 256 channels (64 channel quads, threadIdx.x) of 32 rows (threadIdx.y splits
// them); a thread owns one quad (one vector access per row of every D-wide tensor) of 8 rows.
// A thread first issues the loads of all its rows' quads, then the block stages its channels'
// weights and its rows' 16-value S (dv) in shared memory with coalesced loads, and only then
// computes; each thread keeps its 4 x 16 weights in registers. At bf16 a Vim-S call takes
// about 23.5 us, three times the memory floor, bound by latency: 128 registers per thread
// leave 2 blocks (16 warps) per multiprocessor (ncu, docs/benchmarks.md).
#include "scan_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "float_convert.cuh"

namespace memba_scan {
namespace {

constexpr int kQuads = 64;                  // channel quads per block (threadIdx.x)
constexpr int kBlockCh = 4 * kQuads;        // channels per block
constexpr int kRowGroups = 4;               // threadIdx.y
constexpr int kRowsPerThread = 8;
constexpr int kGateThreads = kQuads * kRowGroups;

template <typename T>
struct alignas(4 * sizeof(T)) Quad {
  T v[4];
};

// out = b + sum_r v[r] W[., r] for the thread's 4 channels, stored at row ``row``.
template <typename T>
__device__ __forceinline__ void store_update(void* out, int64_t o_sr, int64_t row, int d,
                                             const float (&b)[4], const float (&w)[4][kGateRank],
                                             const float (&v)[kGateRank]) {
  Quad<T> q;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float acc = b[i];
#pragma unroll
    for (int r = 0; r < kGateRank; ++r) acc = fmaf(v[r], w[i][r], acc);
    q.v[i] = from_f<T>(acc);
  }
  *reinterpret_cast<Quad<T>*>(static_cast<T*>(out) + row * o_sr + d) = q;
}

template <typename T>
__global__ void __launch_bounds__(kGateThreads, 2) gate_z_kernel(const GateZParams p) {
  constexpr int kBlockRows = kRowGroups * kRowsPerThread;
  __shared__ __align__(16) float ws[kGateRank][kBlockCh];
  __shared__ __align__(16) float vs[2][kBlockRows][kGateRank];  // (sum_v: vs[0] = v0 + v1)
  const int c0 = blockIdx.y * kBlockCh, nch = min(kBlockCh, p.dim - c0);  // a multiple of 4
  const int tid = threadIdx.y * kQuads + threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBlockRows;
  const int d = c0 + 4 * threadIdx.x;
  const bool active = 4 * static_cast<int>(threadIdx.x) < nch;
  // 1. the loads of this thread's rows' base quads, summed once they land
  Quad<T> raw[kRowsPerThread][2];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t row = row0 + i * kRowGroups + threadIdx.y;
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      if (active && row < p.rows && k < p.nbase) {
        raw[i][k] = *reinterpret_cast<const Quad<T>*>(static_cast<const T*>(p.base[k]) +
                                                       row * p.base_sr[k] + d);
      }
    }
  }
  // 2. the block's weights and rows of v, staged
  if (p.w_sr == 1) {  // W (D, 16): a float4 holds 4 ranks of one channel
    for (int e = tid; e < nch * (kGateRank / 4); e += kGateThreads) {
      const int c = e / (kGateRank / 4), r = 4 * (e % (kGateRank / 4));
      const float4 v = __ldg(reinterpret_cast<const float4*>(p.w + (c0 + c) * p.w_sd + r));
      ws[r][c] = v.x;
      ws[r + 1][c] = v.y;
      ws[r + 2][c] = v.z;
      ws[r + 3][c] = v.w;
    }
  } else {  // W_in (16, D): a float4 holds 4 channels of one rank
    for (int e = tid; e < nch / 4 * kGateRank; e += kGateThreads) {
      const int r = e / (nch / 4), c = 4 * (e % (nch / 4));
      *reinterpret_cast<float4*>(&ws[r][c]) =
          __ldg(reinterpret_cast<const float4*>(p.w + (c0 + c) * p.w_sd + r * p.w_sr));
    }
  }
  for (int e = tid; e < kBlockRows * kGateRank; e += kGateThreads) {
    const int rl = e / kGateRank, r = e % kGateRank;
    const int64_t off = (row0 + rl) * kGateRank + r;
    if (row0 + rl >= p.rows) break;
    const float a = to_f<T>(static_cast<const T*>(p.v[0])[off]);
    const float b = to_f<T>(static_cast<const T*>(p.v[1])[off]);
    if (p.sum_v) {
      vs[0][rl][r] = a + b;
      if (p.v_sum != nullptr && blockIdx.y == 0) static_cast<T*>(p.v_sum)[off] = from_f<T>(a + b);
    } else {
      vs[0][rl][r] = a;
      vs[1][rl][r] = b;
    }
  }
  __syncthreads();
  if (!active) return;
  float w[4][kGateRank];
#pragma unroll
  for (int r = 0; r < kGateRank; ++r) {
    const float4 v = *reinterpret_cast<const float4*>(&ws[r][4 * threadIdx.x]);
    w[0][r] = v.x;
    w[1][r] = v.y;
    w[2][r] = v.z;
    w[3][r] = v.w;
  }
  // 3. per row: out_k = base + v_k W^T
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int rl = i * kRowGroups + threadIdx.y;
    const int64_t row = row0 + rl;
    if (row >= p.rows) return;
    float b[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      if (k < p.nbase) {
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] += to_f<T>(raw[i][k].v[j]);
      }
    }
    for (int k = 0; k < (p.sum_v ? 1 : 2); ++k) {
      float v[kGateRank];
#pragma unroll
      for (int r = 0; r < kGateRank; r += 4) {
        const float4 q = *reinterpret_cast<const float4*>(&vs[k][rl][r]);
        v[r] = q.x;
        v[r + 1] = q.y;
        v[r + 2] = q.z;
        v[r + 3] = q.w;
      }
      store_update<T>(p.out[k], p.out_sr[k], row, d, b, w, v);
    }
  }
}

template <typename T>
cudaError_t gate_z_launch(const GateZParams& p, cudaStream_t stream) {
  constexpr int64_t kRowsPerBlock = kRowGroups * kRowsPerThread;
  const dim3 grid(static_cast<unsigned>((p.rows + kRowsPerBlock - 1) / kRowsPerBlock),
                  (p.dim + kBlockCh - 1) / kBlockCh);
  gate_z_kernel<T><<<grid, dim3(kQuads, kRowGroups), 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t gate_z(const GateZParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return gate_z_launch<float>(p, stream);
    case DType::kFloat16: return gate_z_launch<__half>(p, stream);
    case DType::kBFloat16: return gate_z_launch<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace memba_scan
