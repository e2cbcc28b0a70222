// Memba's gate branch on Vim (GateZParams in scan_kernel.h): the forward's
//   z'_k = z + S_k W_out^T        (k = 0, 1: the two scan directions)
// and the backward's gradient of z
//   dz = dz'_0 + dz'_1 + (dv_0 + dv_1) W_in,
// both "a sum of rows plus a rank-16 product", one launch each.
//
// fp16 and bf16 with 16-byte rows (D and the row strides multiples of 8, 16-byte aligned
// addresses: every Vim config) run gate_z_tile_kernel: a warp owns a 64-channel slice of
// 16-row tiles, walks tiles with the next one's rows already on their way into shared memory
// (cp.async, whole 128-byte row segments), moves them into the accumulators with ldmatrix,
// adds the product on the tensor cores (mma.m16n8k16, K = the 16 ranks) and writes back
// through shared memory in 16-byte stores. Per element it issues a handful of
// instructions where the CUDA-core kernel issued 16 multiply-adds and their loads.
//
// Everything else (fp32, D a multiple of 4 only, misaligned halves) runs gate_z_kernel: a block
// owns 256 channels (64 channel quads, threadIdx.x) of 32 rows (threadIdx.y splits them); a
// thread owns one quad of 8 rows, first issues the loads of all its rows' quads, then the
// block stages its channels' weights and its rows' 16 values of S (dv) in shared memory, and
// each thread keeps its 4 x 16 weights in registers. At bf16 it took about 23.5 us per Vim-S
// call, three times the memory floor, bound by latency: 128 registers per thread leave 2 blocks
// (16 warps) per multiprocessor (ncu, docs/benchmarks.md).
#include "scan_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

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

// ---- fp16 / bf16 on the tensor cores -------------------------------------------------------

constexpr int kTileWarps = 4;   // warps per block; each walks its own tiles
constexpr int kTileRows = 16;   // the mma's M
constexpr int kTileCh = 64;     // a block's channel slice: 8 mma tiles of 8 channels
constexpr int kSegs = kTileCh / 8;  // 16-byte segments per tile row

// One stage of a warp's pipeline: its bases' 16 x 64 tiles and its v tiles (16 x 16), as
// 16-byte segments. Base tiles are swizzled (segment s of row r at s ^ (r % 8)) and v tiles
// (segment s of row r at s ^ (r / 4 % 2)), so that ldmatrix and the fragments' stores see no
// bank conflict.
struct alignas(16) TileStage {
  uint4 base[2][kTileRows * kSegs];
  uint4 v[2][kTileRows * 2];
};

__device__ __forceinline__ int base_seg(int row, int seg) {
  return row * kSegs + (seg ^ (row % 8));
}
__device__ __forceinline__ int v_seg(int row, int seg) {
  return row * 2 + (seg ^ (row / 4 % 2));
}

__device__ __forceinline__ __attribute__((unused)) uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// cp.async, ldmatrix and these mma shapes need sm_80: gate_z_tile_launch runs the CUDA-core
// kernel on older devices, and for them this file compiles the tile kernel as a trap.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define MEMBA_TILE_ASM(...) __trap()
#else
#define MEMBA_TILE_ASM(...) asm volatile(__VA_ARGS__)
#endif

// 16 bytes from global to shared memory, or 16 zero bytes (none read) where ``valid`` is
// false; src is a readable address either way.
__device__ __forceinline__ void copy16(void* dst, const void* src, bool valid) {
  MEMBA_TILE_ASM("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
                 "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void copy_commit() { MEMBA_TILE_ASM("cp.async.commit_group;\n" ::); }
// Waits for all but the newest ``pending`` (0 or 1) groups of this thread's copies.
__device__ __forceinline__ void copy_wait(int pending) {
  if (pending) {
    MEMBA_TILE_ASM("cp.async.wait_group 1;\n" ::);
  } else {
    MEMBA_TILE_ASM("cp.async.wait_group 0;\n" ::);
  }
}

// Four 8 x 8 matrices of 16-bit elements: lane i gives the address of row i % 8 of matrix
// i / 8; register k gets lane t's pair (row t / 4, columns 2 (t % 4), +1) of matrix k.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* addr) {
  MEMBA_TILE_ASM("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(addr)));
}

// d += a b on the tensor cores (m16n8k16, fp32 accumulators); T picks the PTX input type.
#define MEMBA_MMA_16816(ab)                                                          \
  MEMBA_TILE_ASM("mma.sync.aligned.m16n8k16.row.col.f32." ab "." ab ".f32 "          \
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n" \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                    \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>);
  if constexpr (std::is_same_v<T, __half>) {
    MEMBA_MMA_16816("f16");
  } else {
    MEMBA_MMA_16816("bf16");
  }
}
#undef MEMBA_MMA_16816

// Two elements of T in 32 bits (element 0 in the low half, as mma and memory hold them).
template <typename T>
struct alignas(2 * sizeof(T)) Pair {
  T v[2];
};
template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y) {
  Pair<T> p;
  p.v[0] = from_f<T>(x);
  p.v[1] = from_f<T>(y);
  return *reinterpret_cast<const uint32_t*>(&p);
}
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t bits) {
  const Pair<T> p = *reinterpret_cast<const Pair<T>*>(&bits);
  return make_float2(to_f<T>(p.v[0]), to_f<T>(p.v[1]));
}

// 5 blocks (20 warps) per multiprocessor: 96 registers per thread (ptxas, sm_90) and 40 KB of
// shared memory per block.
template <typename T>
__global__ void __launch_bounds__(32 * kTileWarps, 5) gate_z_tile_kernel(const GateZParams p) {
  __shared__ TileStage stages[kTileWarps][2];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int c0 = blockIdx.y * kTileCh;
  const int64_t ntiles = (p.rows + kTileRows - 1) / kTileRows;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kTileWarps;
  // B fragments of W for this slice's 8 channel tiles: lane (g, t) holds channel 8j + g,
  // ranks 2t, 2t + 1 (b0) and 2t + 8, 2t + 9 (b1), rounded to T as autocast rounds weights
  uint32_t b[kSegs][2];
#pragma unroll
  for (int j = 0; j < kSegs; ++j) {
    const int c = c0 + 8 * j + g;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = 2 * t + 8 * h;
      const float w0 = c < p.dim ? __ldg(p.w + c * p.w_sd + r * p.w_sr) : 0.f;
      const float w1 = c < p.dim ? __ldg(p.w + c * p.w_sd + (r + 1) * p.w_sr) : 0.f;
      b[j][h] = pack2<T>(w0, w1);
    }
  }
  // cp.async of tile ``tile``'s rows into stage ``s``: lane i copies segments i, i + 32, ...
  auto fetch = [&](int64_t tile, int s) {
    TileStage& st = stages[warp][s];
    const int64_t row0 = tile * kTileRows;
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      if (k < p.nbase) {
        const T* base = static_cast<const T*>(p.base[k]);
#pragma unroll
        for (int i = 0; i < kTileRows * kSegs / 32; ++i) {
          const int e = lane + 32 * i, r = e / kSegs, seg = e % kSegs;
          const int64_t row = row0 + r;
          const int c = c0 + 8 * seg;
          const bool ok = row < p.rows && c < p.dim;
          copy16(&st.base[k][base_seg(r, seg)], base + (ok ? row * p.base_sr[k] + c : 0), ok);
        }
      }
    }
    {  // v: 16 rows x 32 bytes per direction, one segment per lane
      const int r = lane / 2, seg = lane % 2;
      const int64_t row = row0 + r;
      const bool ok = row < p.rows;
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const T* v = static_cast<const T*>(p.v[k]);
        copy16(&st.v[k][v_seg(r, seg)], v + (ok ? row * kGateRank + 8 * seg : 0), ok);
      }
    }
    copy_commit();
  };
  // ldmatrix addresses: lane i reads row i % 8 + 8 (i / 8 % 2) of a 16-row tile, and segment
  // i / 16 of a pair of segments (the two 8-channel tiles of one ldmatrix_x4)
  const int lr = lane % 8 + 8 * (lane / 8 % 2), lseg = lane / 16;
  int64_t tile = static_cast<int64_t>(blockIdx.x) * kTileWarps + warp;
  if (tile < ntiles) fetch(tile, 0);
  for (int s = 0; tile < ntiles; s ^= 1, tile += stride) {
    const bool more = tile + stride < ntiles;
    if (more) fetch(tile + stride, s ^ 1);
    copy_wait(more ? 1 : 0);
    __syncwarp();
    TileStage& st = stages[warp][s];
    // accumulators: the bases' sum, tile j's (c0, c1) at row g and (c2, c3) at row g + 8
    float acc[kSegs][4];
#pragma unroll
    for (int j = 0; j < kSegs; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
    }
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      if (k < p.nbase) {
#pragma unroll
        for (int j = 0; j < kSegs; j += 2) {
          uint32_t m[4];  // (rows 0-7, tile j), (rows 8-15, tile j), the same for tile j + 1
          ldmatrix_x4(m, &st.base[k][base_seg(lr, j + lseg)]);
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const float2 f = unpack2<T>(m[q]);
            acc[j + q / 2][2 * (q % 2)] += f.x;
            acc[j + q / 2][2 * (q % 2) + 1] += f.y;
          }
        }
      }
    }
    // A fragments of v[k]: (rows 0-7, ranks 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15)
    uint32_t a[2][4];
#pragma unroll
    for (int k = 0; k < 2; ++k) ldmatrix_x4(a[k], &st.v[k][v_seg(lr, lseg)]);
    __syncwarp();  // every lane has read the stage: its first base tile now takes the output
    const int64_t row0 = tile * kTileRows;
    auto emit = [&](void* out, int64_t o_sr, const float (&d)[kSegs][4]) {
      uint4* buf = st.base[0];
      uint32_t* words = reinterpret_cast<uint32_t*>(buf);  // lane (g, t): word t of a segment
#pragma unroll
      for (int j = 0; j < kSegs; ++j) {
        words[4 * base_seg(g, j) + t] = pack2<T>(d[j][0], d[j][1]);
        words[4 * base_seg(g + 8, j) + t] = pack2<T>(d[j][2], d[j][3]);
      }
      __syncwarp();
      T* o = static_cast<T*>(out);
#pragma unroll
      for (int i = 0; i < kTileRows * kSegs / 32; ++i) {
        const int e = lane + 32 * i, r = e / kSegs, seg = e % kSegs;
        const int64_t row = row0 + r;
        const int c = c0 + 8 * seg;
        if (row < p.rows && c < p.dim) {
          *reinterpret_cast<uint4*>(o + row * o_sr + c) = buf[base_seg(r, seg)];
        }
      }
      __syncwarp();
    };
    if (p.sum_v) {
#pragma unroll
      for (int j = 0; j < kSegs; ++j) {
        mma_16816<T>(acc[j], a[0], b[j][0], b[j][1]);
        mma_16816<T>(acc[j], a[1], b[j][0], b[j][1]);
      }
      emit(p.out[0], p.out_sr[0], acc);
      if (p.v_sum != nullptr && blockIdx.y == 0) {  // v[0] + v[1], rounded once
        uint32_t* dst = static_cast<uint32_t*>(p.v_sum);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 x = unpack2<T>(a[0][e]), y = unpack2<T>(a[1][e]);
          const int64_t row = row0 + g + 8 * (e % 2);
          if (row < p.rows) {
            dst[row * (kGateRank / 2) + t + 4 * (e / 2)] = pack2<T>(x.x + y.x, x.y + y.y);
          }
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        float d[kSegs][4];
#pragma unroll
        for (int j = 0; j < kSegs; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) d[j][e] = acc[j][e];
          mma_16816<T>(d[j], a[k], b[j][0], b[j][1]);
        }
        emit(p.out[k], p.out_sr[k], d);
      }
    }
  }
}

// Whether gate_z_tile_kernel can take these tensors: 16-byte rows and addresses.
bool tile_ready(const GateZParams& p) {
  auto aligned = [](const void* ptr, int64_t sr, int elt) {
    return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (sr * elt) % 16 == 0;
  };
  bool ok = p.dim % 8 == 0;
  for (int k = 0; k < p.nbase; ++k) ok = ok && aligned(p.base[k], p.base_sr[k], 2);
  for (int k = 0; k < (p.sum_v ? 1 : 2); ++k) ok = ok && aligned(p.out[k], p.out_sr[k], 2);
  return ok;
}

template <typename T>
cudaError_t gate_z_tile_launch(const GateZParams& p, cudaStream_t stream) {
  // enough blocks to fill every multiprocessor once; each warp then walks its tiles
  static int per_sm[64] = {};  // per device: blocks per multiprocessor, -1 before sm_80
  int dev = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  if (dev >= 64) return gate_z_launch<T>(p, stream);
  if (per_sm[dev] == 0) {
    int major = 0;
    err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    if (err == cudaSuccess && major >= 8) {
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm[dev], gate_z_tile_kernel<T>,
                                                          32 * kTileWarps, 0);
    }
    if (err != cudaSuccess) return err;
    if (per_sm[dev] == 0) per_sm[dev] = -1;
  }
  if (per_sm[dev] < 0) return gate_z_launch<T>(p, stream);
  const int slices = (p.dim + kTileCh - 1) / kTileCh;
  const int64_t tiles = (p.rows + kTileRows - 1) / kTileRows;
  const int64_t fill = (static_cast<int64_t>(per_sm[dev]) * sms + slices - 1) / slices;
  const int64_t blocks =
      std::max<int64_t>(1, std::min(fill, (tiles + kTileWarps - 1) / kTileWarps));
  gate_z_tile_kernel<T><<<dim3(static_cast<unsigned>(blocks), slices), 32 * kTileWarps, 0,
                          stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t gate_z(const GateZParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return gate_z_launch<float>(p, stream);
    case DType::kFloat16:
      return tile_ready(p) ? gate_z_tile_launch<__half>(p, stream)
                           : gate_z_launch<__half>(p, stream);
    case DType::kBFloat16:
      return tile_ready(p) ? gate_z_tile_launch<__nv_bfloat16>(p, stream)
                           : gate_z_launch<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace memba_scan
