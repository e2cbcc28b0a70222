// VMamba's depthwise 3 x 3 conv + bias + SiLU, channels-last (see DwConvParams).
//
// Forward: a block owns 64 channels (16 quads of 4, loaded and stored as one access) of 16
// consecutive pixels; each thread sums its quad's 9 taps from x where it lies (a strided
// half of in_proj's output is read in place) and writes silu(pre). The block's weights sit
// in shared memory, tap-major, so a tap's 4 weights are one read.
//
// Backward: a block owns 64 channels of 4 x 8 tiles of one image. It first recomputes
// pre = conv(x) + bias on the tile and its one-pixel border (6 x 10 pixels) and keeps
// dpre = g silu'(pre) in shared memory (fp32), then each pixel's dx is the transposed conv,
// dx[h, w] = sum_{i,j} W[i, j] dpre[h-i+1, w-j+1], read from there. Nothing but dx is
// written: pre is not stored by the forward.
#include "scan_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "float_convert.cuh"

namespace memba_scan {
namespace {

constexpr int kTaps = 9;
constexpr int kQuads = 16;                // channel quads per block (64 channels)
constexpr int kFwdPixels = 16;            // pixels per forward block
constexpr int kFwdThreads = kQuads * kFwdPixels;
constexpr int kTileH = 4, kTileW = 8;     // backward tile
constexpr int kHaloH = kTileH + 2, kHaloW = kTileW + 2;
constexpr int kBwdThreads = kQuads * kTileH * kTileW;

template <typename T>
struct alignas(4 * sizeof(T)) Quad4 {
  T v[4];
};

template <typename T>
__device__ __forceinline__ float4 load_quad(const void* base, int64_t off) {
  const Quad4<T> q = *reinterpret_cast<const Quad4<T>*>(static_cast<const T*>(base) + off);
  return make_float4(to_f<T>(q.v[0]), to_f<T>(q.v[1]), to_f<T>(q.v[2]), to_f<T>(q.v[3]));
}

template <typename T>
__device__ __forceinline__ void store_quad(void* base, int64_t off, float4 f) {
  Quad4<T> q;
  q.v[0] = from_f<T>(f.x);
  q.v[1] = from_f<T>(f.y);
  q.v[2] = from_f<T>(f.z);
  q.v[3] = from_f<T>(f.w);
  *reinterpret_cast<Quad4<T>*>(static_cast<T*>(base) + off) = q;
}

__device__ __forceinline__ float4 fma4(float4 a, float4 b, float4 c) {
  return make_float4(fmaf(a.x, b.x, c.x), fmaf(a.y, b.y, c.y), fmaf(a.z, b.z, c.z),
                     fmaf(a.w, b.w, c.w));
}

__device__ __forceinline__ float sigmoid(float v) { return 1.f / (1.f + __expf(-v)); }

// The block's weights, s_w[tap][quad] (channels c0 .. c0 + 63; zero past the last channel),
// and biases.
struct BlockWeights {
  float4 w[kTaps][kQuads];
  float4 b[kQuads];

  __device__ void load(const DwConvParams& p, int c0) {
    float* wf = &w[0][0].x;
    for (int i = threadIdx.x; i < kTaps * 4 * kQuads; i += blockDim.x) {
      const int ch = i / kTaps, tap = i % kTaps, d = c0 + ch;
      wf[tap * 4 * kQuads + ch] = d < p.dim ? p.w[d * kTaps + tap] : 0.f;
    }
    float* bf = &b[0].x;
    for (int i = threadIdx.x; i < 4 * kQuads; i += blockDim.x) {
      bf[i] = (p.bias != nullptr && c0 + i < p.dim) ? p.bias[c0 + i] : 0.f;
    }
  }
};

// pre = bias + the 9 taps of x around (b, h, w), channels c .. c + 3 (quad q of the block).
template <typename T>
__device__ __forceinline__ float4 conv_at(const DwConvParams& p, const BlockWeights& s, int q,
                                          int b, int h, int w, int c) {
  float4 acc = s.b[q];
  const int64_t base = static_cast<int64_t>(b) * p.x_sb + c;
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    const int hh = h + i - 1;
    if (hh < 0 || hh >= p.height) continue;
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      const int ww = w + j - 1;
      if (ww < 0 || ww >= p.width) continue;
      acc = fma4(s.w[i * 3 + j][q], load_quad<T>(p.x, base + hh * p.x_sh + ww * p.x_sw), acc);
    }
  }
  return acc;
}

// Grids: blockIdx.x is the channel block, so that the blocks running side by side read whole
// pixel rows of x (a block alone reads 128 bytes of each); blockIdx.y walks the pixel groups
// (tiles), looping when there are more than a grid dimension holds.
template <typename T>
__global__ void __launch_bounds__(kFwdThreads) dwconv_fwd_kernel(const DwConvParams p) {
  __shared__ BlockWeights s;
  const int c0 = blockIdx.x * 4 * kQuads;
  s.load(p, c0);
  __syncthreads();
  const int q = threadIdx.x % kQuads, c = c0 + 4 * q;
  if (c >= p.dim) return;
  const int64_t pixels = static_cast<int64_t>(p.batch) * p.height * p.width;
  for (int64_t pix = static_cast<int64_t>(blockIdx.y) * kFwdPixels + threadIdx.x / kQuads;
       pix < pixels; pix += static_cast<int64_t>(gridDim.y) * kFwdPixels) {
    const int w = static_cast<int>(pix % p.width);
    const int64_t bh = pix / p.width;
    const int h = static_cast<int>(bh % p.height), b = static_cast<int>(bh / p.height);
    float4 v = conv_at<T>(p, s, q, b, h, w, c);
    v = make_float4(v.x * sigmoid(v.x), v.y * sigmoid(v.y), v.z * sigmoid(v.z),
                    v.w * sigmoid(v.w));
    store_quad<T>(p.out, pix * p.dim + c, v);
  }
}

__device__ __forceinline__ float dsilu(float pre, float g) {
  const float s = sigmoid(pre);
  return g * s * (1.f + pre * (1.f - s));
}

// One backward tile: image b, rows h0 .. h0 + 3, columns w0 .. w0 + 7, the block's channels.
template <typename T>
__device__ void backward_tile(const DwConvParams& p, const BlockWeights& s,
                              float4 (*s_dp)[kQuads], int c0, int b, int h0, int w0) {
  // 1. dpre on the tile and its border (zero outside the grid and past the last channel)
  for (int i = threadIdx.x; i < kHaloH * kHaloW * kQuads; i += kBwdThreads) {
    const int hp = i / kQuads, q = i % kQuads, c = c0 + 4 * q;
    const int h = h0 - 1 + hp / kHaloW, w = w0 - 1 + hp % kHaloW;
    float4 dp = make_float4(0.f, 0.f, 0.f, 0.f);
    if (h >= 0 && h < p.height && w >= 0 && w < p.width && c < p.dim) {
      const float4 pre = conv_at<T>(p, s, q, b, h, w, c);
      const float4 g = load_quad<T>(
          p.g, ((static_cast<int64_t>(b) * p.height + h) * p.width + w) * p.dim + c);
      dp = make_float4(dsilu(pre.x, g.x), dsilu(pre.y, g.y), dsilu(pre.z, g.z),
                       dsilu(pre.w, g.w));
    }
    s_dp[hp][q] = dp;
  }
  __syncthreads();
  // 2. dx of the tile's pixels: the transposed conv of dpre
  const int q = threadIdx.x % kQuads, c = c0 + 4 * q;
  const int py = threadIdx.x / kQuads / kTileW, px = threadIdx.x / kQuads % kTileW;
  const int h = h0 + py, w = w0 + px;
  if (c >= p.dim || h >= p.height || w >= p.width) return;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int i = 0; i < 3; ++i) {
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      acc = fma4(s.w[i * 3 + j][q], s_dp[(py + 2 - i) * kHaloW + (px + 2 - j)][q], acc);
    }
  }
  store_quad<T>(p.out, ((static_cast<int64_t>(b) * p.height + h) * p.width + w) * p.dim + c,
                acc);
}

template <typename T>
__global__ void __launch_bounds__(kBwdThreads) dwconv_bwd_kernel(const DwConvParams p) {
  __shared__ BlockWeights s;
  __shared__ float4 s_dp[kHaloH * kHaloW][kQuads];
  const int c0 = blockIdx.x * 4 * kQuads;
  const int tiles_w = (p.width + kTileW - 1) / kTileW;
  const int tiles_h = (p.height + kTileH - 1) / kTileH;
  const int64_t tiles = static_cast<int64_t>(p.batch) * tiles_h * tiles_w;
  s.load(p, c0);
  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    __syncthreads();  // the weights are loaded; the last tile's reads of s_dp are done
    const int tw = static_cast<int>(tile % tiles_w);
    const int th = static_cast<int>(tile / tiles_w % tiles_h);
    const int b = static_cast<int>(tile / (static_cast<int64_t>(tiles_w) * tiles_h));
    backward_tile<T>(p, s, s_dp, c0, b, th * kTileH, tw * kTileW);
  }
}

template <typename T, bool kBackward>
cudaError_t dwconv_launch(const DwConvParams& p, cudaStream_t stream) {
  const unsigned ch_blocks = static_cast<unsigned>((p.dim + 4 * kQuads - 1) / (4 * kQuads));
  constexpr int64_t kMaxGridY = 65535;
  if (kBackward) {
    const int64_t tiles = static_cast<int64_t>(p.batch) * ((p.height + kTileH - 1) / kTileH) *
                          ((p.width + kTileW - 1) / kTileW);
    const dim3 grid(ch_blocks, static_cast<unsigned>(std::min(tiles, kMaxGridY)));
    dwconv_bwd_kernel<T><<<grid, kBwdThreads, 0, stream>>>(p);
  } else {
    const int64_t pixels = static_cast<int64_t>(p.batch) * p.height * p.width;
    const int64_t groups = (pixels + kFwdPixels - 1) / kFwdPixels;
    const dim3 grid(ch_blocks, static_cast<unsigned>(std::min(groups, kMaxGridY)));
    dwconv_fwd_kernel<T><<<grid, kFwdThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <bool kBackward>
cudaError_t dwconv_dispatch(const DwConvParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return dwconv_launch<float, kBackward>(p, stream);
    case DType::kFloat16: return dwconv_launch<__half, kBackward>(p, stream);
    case DType::kBFloat16: return dwconv_launch<__nv_bfloat16, kBackward>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t dwconv_forward(const DwConvParams& p, DType dtype, cudaStream_t stream) {
  return dwconv_dispatch<false>(p, dtype, stream);
}
cudaError_t dwconv_backward(const DwConvParams& p, DType dtype, cudaStream_t stream) {
  return dwconv_dispatch<true>(p, dtype, stream);
}

}  // namespace memba_scan
