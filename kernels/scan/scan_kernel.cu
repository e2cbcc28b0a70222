// Kernels of scan_kernel.h.
//
// Selective scan, per channel d and state n (scan order s = t, or L-1-t when reversed; over a
// grid walked by columns, step t visits token (t % rows) * cols + t / rows):
//   dt[s] = softplus(delta[s] + bias[d])
//   h[s]  = exp(dt[s] A[d,n]) h[s-1] + dt[s] B[s,n] u[s]
//   y[s]  = (sum_n C[s,n] h[s,n] + D[d] u[s]) * silu(z[s])
//
// Layout: a block owns 64 channels of one batch item in one direction (blockIdx.z: up to
// four scans of the same shape share a launch); 4 threads share a channel,
// each holding 4 of its 16 states. The sequence is walked in chunks of 8 steps
// whose inputs are staged in shared memory as fp32 (coalesced loads, softplus done
// once per element). A chunk's inputs are copied (cp.async) while the block scans the
// chunk before, so the steps do not wait on global memory, and one barrier per chunk
// orders the staging, one the steps' outputs. Sums over states take 2 shuffles. Chunks
// are short so that the backward's per-step states fit in registers with 3 blocks per
// multiprocessor (the forward runs 4).
//
// Backward, per pair of chunks from last to first: the forward stored the state at the start
// of every pair (every kStateEvery = 16 steps); the second chunk's start state is recomputed
// from it over the first chunk's steps. Per chunk, the chunk's states are recomputed from its
// start state into registers, then the adjoint
//   dh[s] = C[s] dy[s] + exp(dt[s+1] A) dh[s+1]
// runs backwards. dB[s] and dC[s] are sums over channels: 7 shuffles reduce a
// warp's 8 channels (each lane ends with one of the 32 sums), shared memory the
// block's 8 warps, and each block writes its partial sums (no atomics, so the
// result is deterministic); a second kernel adds the blocks' partials in a fixed
// order and stores them in the caller's layout and dtype. With trainable A and D (dA set),
// a thread also sums its states' dA[d, n] = sum_s dh[s, n] dt[s] exp(dt[s] A) h[s-1] and
// dD[d] = sum_s dy[s] u[s] over the sequence and writes them once per batch item.
#include "scan_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "float_convert.cuh"

namespace memba_scan {
namespace {

constexpr int kLanesPerCh = 4;
constexpr int kSPT = kStates / kLanesPerCh;  // states per thread
constexpr int kCh = 64;                       // channels per block
constexpr int kThreads = kCh * kLanesPerCh;   // 256
constexpr int kWarps = kThreads / 32;
constexpr int kK = 8;                         // steps per chunk
constexpr int kPair = 2;                      // chunks per state stored by the forward
constexpr int kStateEvery = kPair * kK;       // steps between stored states
constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFull = 0xffffffffu;
static_assert(kThreads == kK * kCh / 2 && 3 * kK * kStates / 2 <= kThreads,
              "a chunk's inputs are copied in pairs, one per thread and tensor");

template <typename T>
__device__ __forceinline__ float ld(const void* base, int64_t off) {
  return to_f<T>(static_cast<const T*>(base)[off]);
}

__device__ __forceinline__ float softplus(float v) { return v <= 20.f ? log1pf(__expf(v)) : v; }
__device__ __forceinline__ float sigmoid(float v) { return 1.f / (1.f + __expf(-v)); }

__device__ __forceinline__ float sum4lanes(float v) {
  v += __shfl_xor_sync(kFull, v, 1);
  v += __shfl_xor_sync(kFull, v, 2);
  return v;
}

// The token (index along L) that scan step s visits.
__device__ __forceinline__ int time_of(const ScanParams& p, int s) {
  const int t = p.reverse ? p.seqlen - 1 - s : s;
  return p.rows > 0 ? (t % p.rows) * (p.seqlen / p.rows) + t / p.rows : t;
}

// Offset of thread (channel d, lane group sg)'s 4 states in the stored states
// (B, npairs, D, N) at pair q, i.e. before scan step q * kStateEvery.
__device__ __forceinline__ int64_t state_offset(const ScanParams& p, int b, int q, int d,
                                                int sg) {
  const int npairs = (p.nchunks + kPair - 1) / kPair;
  return ((static_cast<int64_t>(b) * npairs + q) * p.dim + d) * kStates + sg * kSPT;
}

// Shared-memory staging of one chunk (steps k0 .. k0+nk-1 in scan order).
struct Stage {
  float u[kK][kCh], dt[kK][kCh], z[kK][kCh];
  float B[kK][kStates], C[kK][kStates];
};

// Two consecutive elements (channels d, d+1 or states n, n+1), copied as one access.
template <typename T>
struct alignas(2 * sizeof(T)) Two {
  T a, b;
};

// Whether a tensor's pairs at even offsets can be copied as one Two<T>.
template <typename T>
__device__ __forceinline__ bool pairs_aligned(const void* base, int64_t sb, int64_t sl) {
  return reinterpret_cast<uintptr_t>(base) % sizeof(Two<T>) == 0 && (sb | sl) % 2 == 0;
}

// Asynchronous global -> shared copy of Bytes bytes of which the first ``src_bytes`` are read
// and the rest zero-filled (cp.async: the copy lands while the thread goes on).
template <int Bytes>
__device__ __forceinline__ void cp_async(void* dst, const void* src, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  if constexpr (Bytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src),
                 "r"(src_bytes));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(s), "l"(src),
                 "n"(Bytes), "r"(src_bytes));
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

// dst = elements off and off + 1 of base, of which the first n (0, 1 or 2) exist (the others
// are 0): one asynchronous copy when the pair is aligned, else plain loads.
template <typename T>
__device__ __forceinline__ void copy2(Two<T>& dst, const void* base, int64_t off, int n,
                                      bool aligned) {
  const T* src = static_cast<const T*>(base) + off;
  if (n > 0 && aligned) {
    cp_async<sizeof(Two<T>)>(&dst, src, n * static_cast<int>(sizeof(T)));
  } else {
    const T zero = from_f<T>(0.f);
    dst.a = n > 0 ? src[0] : zero;
    dst.b = n > 1 ? src[1] : zero;
  }
}

// One chunk's inputs as copied from global memory, in each thread's own slots: a token-channel
// pair (step k = tid / 32, channels 2 (tid % 32) + 0..1) of u, delta, z and dout, and a
// step-state pair of B (threads 0-63) or C (64-127). The copies of chunk c+1
// (the previous pair backwards) are in flight while the block scans chunk c, and every
// thread reads back only what it copied itself, so only ``cp_async_wait_all`` separates a
// copy from its use.
template <typename T>
struct RawChunk {
  Two<T> u[kThreads], dt[kThreads], z[kThreads], dout[kThreads], bcs[kThreads];

  // Per tensor: whether pairs can be copied in one access.
  struct Aligned {
    bool u, dt, z, dout, B, C;
    __device__ explicit Aligned(const ScanParams& p)
        : u(pairs_aligned<T>(p.u, p.u_sb, p.u_sl)),
          dt(pairs_aligned<T>(p.delta, p.dl_sb, p.dl_sl)),
          z(pairs_aligned<T>(p.z, p.z_sb, p.z_sl)),
          dout(pairs_aligned<T>(p.dout, p.do_sb, p.do_sl)),
          B(pairs_aligned<T>(p.Bm, p.B_sb, p.B_sl)),
          C(pairs_aligned<T>(p.Cm, p.C_sb, p.C_sl)) {}
  };

  // Starts the copies of the chunk of steps k0 .. k0+nk-1 (and commits them).
  __device__ void copy(const ScanParams& p, bool with_dout, int b, int d0, int k0, int nk) {
    const int tid = threadIdx.x;
    const Aligned al(p);
    {
      const int k = tid / (kCh / 2), d = d0 + 2 * (tid % (kCh / 2));
      const int n = k < nk ? max(0, min(2, p.dim - d)) : 0;
      const int t = n > 0 ? time_of(p, k0 + k) : 0;
      copy2<T>(u[tid], p.u, b * p.u_sb + t * p.u_sl + d, n, al.u);
      copy2<T>(dt[tid], p.delta, b * p.dl_sb + t * p.dl_sl + d, n, al.dt);
      if (p.has_z) copy2<T>(z[tid], p.z, b * p.z_sb + t * p.z_sl + d, n, al.z);
      if (with_dout) copy2<T>(dout[tid], p.dout, b * p.do_sb + t * p.do_sl + d, n, al.dout);
    }
    // warp-uniform: warps 0-1 copy B, 2-3 C, 4-7 nothing
    const int which = tid / (kK * kStates / 2), i = tid % (kK * kStates / 2);
    const int k = i / (kStates / 2), q = 2 * (i % (kStates / 2));
    const int n = k < nk ? 2 : 0, t = n > 0 ? time_of(p, k0 + k) : 0;
    if (which == 0) {
      copy2<T>(bcs[tid], p.Bm, b * p.B_sb + t * p.B_sl + q, n, al.B);
    } else if (which == 1) {
      copy2<T>(bcs[tid], p.Cm, b * p.C_sb + t * p.C_sl + q, n, al.C);
    }
    cp_async_commit();
  }

  // Waits for this thread's copies and writes the chunk (nk steps) to ``st`` as fp32, with
  // delta's bias and softplus applied; with ``dsp`` set, also d softplus / d delta =
  // 1 - exp(-dt) there (1 without softplus), and with ``s_do`` set, dout_scale * dout. Steps
  // past nk and channels past the last are zeros (dt = 0 leaves the state unchanged).
  __device__ void stage(const ScanParams& p, Stage& st, int d0, int nk,
                        float (*dsp)[kCh], float (*s_do)[kCh]) {
    cp_async_wait_all();
    const int tid = threadIdx.x;
    {
      const int k = tid / (kCh / 2), c = 2 * (tid % (kCh / 2));
      const Two<T> dr = dt[tid], ur = u[tid];
      float dv[2] = {to_f<T>(dr.a), to_f<T>(dr.b)};
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int d = d0 + c + e;
        if (k < nk && d < p.dim) {
          if (p.has_bias) dv[e] += p.bias[d];
          if (p.softplus) dv[e] = softplus(dv[e]);
        } else {
          dv[e] = 0.f;
        }
      }
      *reinterpret_cast<float2*>(&st.u[k][c]) = make_float2(to_f<T>(ur.a), to_f<T>(ur.b));
      *reinterpret_cast<float2*>(&st.dt[k][c]) = make_float2(dv[0], dv[1]);
      if (p.has_z) {
        const Two<T> zr = z[tid];
        *reinterpret_cast<float2*>(&st.z[k][c]) = make_float2(to_f<T>(zr.a), to_f<T>(zr.b));
      }
      if (dsp != nullptr) {
        *reinterpret_cast<float2*>(&dsp[k][c]) = p.softplus
            ? make_float2(-expm1f(-dv[0]), -expm1f(-dv[1])) : make_float2(1.f, 1.f);
      }
      if (s_do != nullptr) {
        const Two<T> gr = dout[tid];
        *reinterpret_cast<float2*>(&s_do[k][c]) =
            make_float2(p.dout_scale * to_f<T>(gr.a), p.dout_scale * to_f<T>(gr.b));
      }
    }
    const int which = tid / (kK * kStates / 2), i = tid % (kK * kStates / 2);
    const int k = i / (kStates / 2), q = 2 * (i % (kStates / 2));
    if (which < 2) {
      const Two<T> r = bcs[tid];
      const float2 v = make_float2(to_f<T>(r.a), to_f<T>(r.b));
      if (which == 0) *reinterpret_cast<float2*>(&st.B[k][q]) = v;
      else *reinterpret_cast<float2*>(&st.C[k][q]) = v;
    }
  }
};

// Writes a (kK, kCh) shared tile to a (B, L, D) tensor with strides (o_sb, o_sl, 1):
// o = scale * tile, or o += scale * tile when ``accum``.
template <typename T>
__device__ void store_tile(const ScanParams& p, const float (*tile)[kCh], void* out, int64_t o_sb,
                           int64_t o_sl, float scale, bool accum, int b, int d0, int k0, int nk) {
  T* o = static_cast<T*>(out);
  for (int i = threadIdx.x; i < kK * kCh; i += kThreads) {
    const int k = i / kCh, c = i % kCh, d = d0 + c;
    if (k < nk && d < p.dim) {
      const int t = time_of(p, k0 + k);
      T* dst = o + b * o_sb + t * o_sl + d;
      const float v = scale * tile[k][c];
      *dst = from_f<T>(accum ? to_f<T>(*dst) + v : v);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 4)
scan_fwd_kernel(const __grid_constant__ ScanDirs ps) {
  const ScanParams& p = ps.dir[blockIdx.z];
  __shared__ Stage st;
  __shared__ float s_y[kK][kCh];
  const int tid = threadIdx.x, cl = tid / kLanesPerCh, sg = tid % kLanesPerCh;
  const int b = blockIdx.y, d0 = blockIdx.x * kCh, d = d0 + cl;
  const bool dvalid = d < p.dim;
  float A2[kSPT], h[kSPT];
#pragma unroll
  for (int j = 0; j < kSPT; ++j) {
    A2[j] = dvalid ? p.A[d * kStates + sg * kSPT + j] * kLog2e : 0.f;
    h[j] = 0.f;
  }
  const float Dd = (p.has_D && dvalid) ? p.Dv[d] : 0.f;
  using Raw = RawChunk<T>;
  __shared__ Raw raw;
  raw.copy(p, /*with_dout=*/false, b, d0, 0, min(kK, p.seqlen));

  for (int c = 0; c < p.nchunks; ++c) {
    const int k0 = c * kK, nk = min(kK, p.seqlen - k0);
    // st is free: every thread is past the barrier that follows the last chunk's steps (and
    // s_y is written only after the next barrier, when every thread has stored it)
    raw.stage(p, st, d0, nk, nullptr, nullptr);
    __syncthreads();
    if (c + 1 < p.nchunks) {
      raw.copy(p, false, b, d0, k0 + kK, min(kK, p.seqlen - k0 - kK));
    }
    if (p.states != nullptr && dvalid && c % kPair == 0) {
      *reinterpret_cast<float4*>(p.states + state_offset(p, b, c / kPair, d, sg)) =
          make_float4(h[0], h[1], h[2], h[3]);
    }
    // Steps past the end (k >= nk, last chunk only) were staged as zeros: dt = 0
    // leaves h unchanged and their outputs are not stored, so no guard is needed
    // and the unrolled steps can overlap.
#pragma unroll
    for (int k = 0; k < kK; ++k) {
      const float u = st.u[k][cl], dt = st.dt[k][cl], dtu = dt * u;
      const float4 Bv = *reinterpret_cast<const float4*>(&st.B[k][sg * kSPT]);
      const float Bj[kSPT] = {Bv.x, Bv.y, Bv.z, Bv.w};
#pragma unroll
      for (int j = 0; j < kSPT; ++j) h[j] = fmaf(exp2f(dt * A2[j]), h[j], dtu * Bj[j]);
      const float4 Cv = *reinterpret_cast<const float4*>(&st.C[k][sg * kSPT]);
      const float y = sum4lanes(Cv.x * h[0] + Cv.y * h[1] + Cv.z * h[2] + Cv.w * h[3]);
      float o = y + Dd * u;
      if (p.has_z) {
        const float zz = st.z[k][cl];
        o *= zz * sigmoid(zz);
      }
      if (sg == 0) s_y[k][cl] = o;
    }
    __syncthreads();
    if (p.out_f32)
      store_tile<float>(p, s_y, p.out, p.out_sb, p.out_sl, p.out_scale, p.out_accum, b, d0, k0,
                        nk);
    else
      store_tile<T>(p, s_y, p.out, p.out_sb, p.out_sl, p.out_scale, p.out_accum, b, d0, k0, nk);
  }
}

// The backward's shared memory (dynamic: it exceeds the 48 KB of static shared memory): the
// staged inputs of a pair of chunks, the thread's states at the pair's start, the chunk's
// output tiles and dB/dC reduction slots, and the raw copies of the next pair.
template <typename T>
struct BwdShared {
  Stage st[kPair];
  float s_do[kPair][kK][kCh], s_dsp[kPair][kK][kCh];
  float s_du[kK][kCh], s_ddt[kK][kCh], s_dz[kK][kCh], s_dy[kK][kCh];
  float s_red[kWarps][kK][2 * kStates];
  float4 h0[kThreads];
  RawChunk<T> raw[kPair];
};

template <typename T, bool kParamGrads>
__global__ void __launch_bounds__(kThreads, 3)
scan_bwd_kernel(const __grid_constant__ ScanDirs ps) {
  const ScanParams& p = ps.dir[blockIdx.z];
  extern __shared__ __align__(16) unsigned char smem[];
  BwdShared<T>& sh = *reinterpret_cast<BwdShared<T>*>(smem);
  const int tid = threadIdx.x, cl = tid / kLanesPerCh, sg = tid % kLanesPerCh;
  const int lane = tid % 32, warp = tid / 32;
  const int b = blockIdx.y, d0 = blockIdx.x * kCh, d = d0 + cl;
  const bool dvalid = d < p.dim;
  float A2[kSPT], g[kSPT], dA[kSPT], dD = 0.f;
#pragma unroll
  for (int j = 0; j < kSPT; ++j) {
    A2[j] = dvalid ? p.A[d * kStates + sg * kSPT + j] * kLog2e : 0.f;
    g[j] = 0.f;  // exp(dt[s+1] A) dh[s+1], carried backwards
    dA[j] = 0.f;
  }
  const float Dd = (p.has_D && dvalid) ? p.Dv[d] : 0.f;
  // Reduced dB/dC slot of this lane after the transposing reduction (see below).
  const int red_ch = lane >> 2;
  const int red_slot = (red_ch >> 2) * kStates + sg * kSPT + (red_ch & 3);
  const int npairs = (p.nchunks + kPair - 1) / kPair;
  // Starts the copies of pair q: the thread's stored states at its start and its chunks.
  auto copy_pair = [&](int q) {
    if (dvalid) cp_async<16>(&sh.h0[tid], p.states + state_offset(p, b, q, d, sg), 16);
    for (int i = 0; i < kPair && kPair * q + i < p.nchunks; ++i) {
      const int k0 = (kPair * q + i) * kK;
      sh.raw[i].copy(p, /*with_dout=*/true, b, d0, k0, min(kK, p.seqlen - k0));
    }
  };

  // Chunk c's gradients from its start state h (two steps, one barrier, the stores); its
  // inputs are staged in st, s_do and s_dsp.
  auto chunk_backward = [&](const Stage& st, const float (*s_do)[kCh],
                            const float (*s_dsp)[kCh], float (&h)[kSPT], int c) {
    const int k0 = c * kK, nk = min(kK, p.seqlen - k0);
    float hist[kK][kSPT];
    // 1. recompute the chunk's states from its start state; dy and dz per step
    // As in the forward kernel, padded steps (k >= nk) are harmless: dt = 0 and
    // dout = 0 there, and in the adjoint below they come first, while g is still 0.
#pragma unroll
    for (int k = 0; k < kK; ++k) {
      const float u = st.u[k][cl], dt = st.dt[k][cl], dtu = dt * u;
      const float4 Bv = *reinterpret_cast<const float4*>(&st.B[k][sg * kSPT]);
      const float4 Cv = *reinterpret_cast<const float4*>(&st.C[k][sg * kSPT]);
      const float Bj[kSPT] = {Bv.x, Bv.y, Bv.z, Bv.w};
#pragma unroll
      for (int j = 0; j < kSPT; ++j) {
        h[j] = fmaf(exp2f(dt * A2[j]), h[j], dtu * Bj[j]);
        hist[k][j] = h[j];
      }
      const float y = sum4lanes(Cv.x * h[0] + Cv.y * h[1] + Cv.z * h[2] + Cv.w * h[3]);
      const float go = s_do[k][cl];
      float dy = go;
      if (p.has_z) {
        const float zz = st.z[k][cl], sz = sigmoid(zz);
        const float o = y + Dd * u;
        dy = go * zz * sz;
        if (sg == 0) sh.s_dz[k][cl] = go * o * sz * (1.f + zz * (1.f - sz));
      }
      if (sg == 0) sh.s_dy[k][cl] = dy;
    }
    __syncwarp();  // s_dy: a channel's 4 lanes are in one warp

    // 2. adjoint recurrence, last step of the chunk first
#pragma unroll
    for (int k = kK - 1; k >= 0; --k) {
      const float u = st.u[k][cl], dt = st.dt[k][cl], dtu = dt * u, dy = sh.s_dy[k][cl];
      const float4 Bv = *reinterpret_cast<const float4*>(&st.B[k][sg * kSPT]);
      const float4 Cv = *reinterpret_cast<const float4*>(&st.C[k][sg * kSPT]);
      const float Bj[kSPT] = {Bv.x, Bv.y, Bv.z, Bv.w};
      const float Cj[kSPT] = {Cv.x, Cv.y, Cv.z, Cv.w};
      float ddt = 0.f, du = 0.f, v[2 * kSPT];
#pragma unroll
      for (int j = 0; j < kSPT; ++j) {
        const float dh = fmaf(Cj[j], dy, g[j]);
        const float decayed = hist[k][j] - dtu * Bj[j];  // exp(dt A) h[s-1] = h[s] - dt B u
        // d h[s] / d dt[s] = A exp(dt A) h[s-1] + B u
        ddt = fmaf(dh, fmaf(A2[j] * (1.f / kLog2e), decayed, Bj[j] * u), ddt);
        if (kParamGrads) dA[j] = fmaf(dh * dt, decayed, dA[j]);  // d h[s] / d A
        du = fmaf(dh, Bj[j], du);
        v[j] = dh * dtu;              // dB partial
        v[kSPT + j] = dy * hist[k][j];  // dC partial
        g[j] = exp2f(dt * A2[j]) * dh;
      }
      if (kParamGrads) dD = fmaf(dy, u, dD);
      ddt = sum4lanes(ddt);
      du = sum4lanes(du);
      if (sg == 0) {
        sh.s_du[k][cl] = fmaf(du, dt, Dd * dy);
        sh.s_ddt[k][cl] = ddt * s_dsp[k][cl];
      }
      // Sum v over the warp's 8 channels (lanes with equal sg): halve the values held
      // per lane at each of the 3 levels; lane (ch, sg) ends with slot red_slot.
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const bool up = lane & 16;
        const float send = up ? v[i] : v[i + 4], keep = up ? v[i + 4] : v[i];
        v[i] = keep + __shfl_xor_sync(kFull, send, 16);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const bool up = lane & 8;
        const float send = up ? v[i] : v[i + 2], keep = up ? v[i + 2] : v[i];
        v[i] = keep + __shfl_xor_sync(kFull, send, 8);
      }
      {
        const bool up = lane & 4;
        const float send = up ? v[0] : v[1], keep = up ? v[1] : v[0];
        v[0] = keep + __shfl_xor_sync(kFull, send, 4);
      }
      sh.s_red[warp][k][red_slot] = v[0];
    }
    __syncthreads();

    // 3. write the chunk's gradients and dB/dC partials
    if (p.du_f32)
      store_tile<float>(p, sh.s_du, p.du, p.du_sb, p.du_sl, 1.f, false, b, d0, k0, nk);
    else
      store_tile<T>(p, sh.s_du, p.du, p.du_sb, p.du_sl, 1.f, false, b, d0, k0, nk);
    store_tile<T>(p, sh.s_ddt, p.ddelta, p.dd_sb, p.dd_sl, 1.f, false, b, d0, k0, nk);
    if (p.has_z) {
      store_tile<T>(p, sh.s_dz, p.dz, p.dz_sb, p.dz_sl, 1.f, p.dz_accum, b, d0, k0, nk);
    }
    for (int i = tid; i < kK * 2 * kStates; i += kThreads) {
      const int k = i / (2 * kStates), q = i % (2 * kStates);
      if (k < nk) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += sh.s_red[w][k][q];
        const int t = time_of(p, k0 + k);
        p.dbc[((static_cast<int64_t>(b) * gridDim.x + blockIdx.x) * p.seqlen + t) * 2 * kStates
              + q] = s;
      }
    }
  };

  copy_pair(npairs - 1);
  for (int q = npairs - 1; q >= 0; --q) {
    const int c0 = kPair * q, n = min(kPair, p.nchunks - c0);
    // st, s_do and s_dsp are free: every thread is past the barrier that follows the last
    // chunk's steps (the stores after it read only s_du, s_ddt, s_dz and s_red)
    for (int i = 0; i < n; ++i) {
      sh.raw[i].stage(p, sh.st[i], d0, min(kK, p.seqlen - (c0 + i) * kK), sh.s_dsp[i],
                      sh.s_do[i]);
    }
    const float4 h0 = dvalid ? sh.h0[tid] : make_float4(0.f, 0.f, 0.f, 0.f);
    __syncthreads();
    if (q > 0) copy_pair(q - 1);
#pragma unroll 1
    for (int i = n - 1; i >= 0; --i) {
      float h[kSPT] = {h0.x, h0.y, h0.z, h0.w};
      // a later chunk's start state: the earlier chunks' steps from the pair's stored state
#pragma unroll 1
      for (int e = 0; e < i; ++e) {
#pragma unroll
        for (int k = 0; k < kK; ++k) {
          const float dt = sh.st[e].dt[k][cl], dtu = dt * sh.st[e].u[k][cl];
          const float4 Bv = *reinterpret_cast<const float4*>(&sh.st[e].B[k][sg * kSPT]);
          const float Bj[kSPT] = {Bv.x, Bv.y, Bv.z, Bv.w};
#pragma unroll
          for (int j = 0; j < kSPT; ++j) h[j] = fmaf(exp2f(dt * A2[j]), h[j], dtu * Bj[j]);
        }
      }
      chunk_backward(sh.st[i], sh.s_do[i], sh.s_dsp[i], h, c0 + i);
      // the stores read the tiles that the next chunk's steps write
      if (i > 0) __syncthreads();
    }
  }
  if (kParamGrads && dvalid) {
    const int64_t bd = static_cast<int64_t>(b) * p.dim + d;
    *reinterpret_cast<float4*>(p.dA + bd * kStates + sg * kSPT) =
        make_float4(dA[0], dA[1], dA[2], dA[3]);
    if (sg == 0) p.dD[bd] = dD;
  }
}

// Sums the blocks' dB | dC partials into dbc_out: a thread per (b, t, column).
constexpr int kReduceThreads = 256;

template <typename TO>
__global__ void __launch_bounds__(kReduceThreads)
reduce_partials_kernel(const __grid_constant__ ScanDirs ps, int nblocks) {
  const ScanParams& p = ps.dir[blockIdx.y];
  constexpr int w = 2 * kStates;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x;
  if (i >= static_cast<int64_t>(p.batch) * p.seqlen * w) return;
  const int q = static_cast<int>(i % w);
  const int64_t bt = i / w;
  const int t = static_cast<int>(bt % p.seqlen), b = static_cast<int>(bt / p.seqlen);
  const float* src = p.dbc + (static_cast<int64_t>(b) * nblocks * p.seqlen + t) * w + q;
  float s = 0.f;
  for (int k = 0; k < nblocks; ++k) s += src[static_cast<int64_t>(k) * p.seqlen * w];
  static_cast<TO*>(p.dbc_out)[b * p.dbc_out_sb + t * p.dbc_out_sl + q] = from_f<TO>(s);
}

// ------------------------------------------------------------------ conv
// Depthwise conv of width W along L, per channel: forward direction
//   pre[t] = bias + sum_k w[k] x[t - (W-1) + k]      (causal)
// reversed direction (the causal conv of the flipped sequence, in input order)
//   pre[t] = bias + sum_k w[k] x[t + (W-1) - k]
// y = silu(pre). A thread owns one channel and kRun consecutive tokens.
constexpr int kRun = 8;
constexpr int kConvThreads = 128;

// A conv thread's channel d, first token t0 and batch item b, with the channel's
// weights and bias; ``load`` is false past the last channel.
template <int W>
struct ConvThread {
  int d, t0, b;
  float w[W], bias;
  __device__ __forceinline__ bool load(const ConvParams& p) {
    d = blockIdx.x * kConvThreads + threadIdx.x;
    t0 = blockIdx.y * kRun;
    b = blockIdx.z;
    if (d >= p.dim) return false;
#pragma unroll
    for (int k = 0; k < W; ++k) w[k] = p.w[d * W + k];
    bias = p.bias ? p.bias[d] : 0.f;
    return true;
  }
};

template <typename T, int W, bool kRev>
__global__ void __launch_bounds__(kConvThreads)
conv_fwd_kernel(const ConvParams p) {
  ConvThread<W> c;
  if (!c.load(p)) return;
  const int d = c.d, t0 = c.t0, b = c.b;
  // xs[i] = x[tb + i], tb = t0 - (W-1) forward, t0 reversed
  const int tb = kRev ? t0 : t0 - (W - 1);
  float xs[kRun + W - 1];
#pragma unroll
  for (int i = 0; i < kRun + W - 1; ++i) {
    const int t = tb + i;
    xs[i] = (t >= 0 && t < p.seqlen) ? ld<T>(p.x, b * p.x_sb + static_cast<int64_t>(t) * p.x_sl + d) : 0.f;
  }
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int r = 0; r < kRun; ++r) {
    const int t = t0 + r;
    if (t < p.seqlen) {
      float acc = c.bias;
#pragma unroll
      for (int k = 0; k < W; ++k) acc = fmaf(c.w[k], xs[kRev ? r + W - 1 - k : r + k], acc);
      if (p.silu) acc = acc * sigmoid(acc);
      out[b * p.o_sb + static_cast<int64_t>(t) * p.o_sl + d] = from_f<T>(acc);
    }
  }
}

// dx[t] = sum over the outputs s that read x[t] of w[k] * g[s] * silu'(pre[s]).
template <typename T, int W, bool kRev>
__global__ void __launch_bounds__(kConvThreads)
conv_bwd_kernel(const ConvParams p) {
  ConvThread<W> c;
  if (!c.load(p)) return;
  const int d = c.d, t0 = c.t0, b = c.b;
  constexpr int kX = kRun + 2 * (W - 1);  // xs[i] = x[t0 - (W-1) + i]
  constexpr int kG = kRun + W - 1;        // gp[i] = g'[s], s = t0 + i (fwd), t0 - (W-1) + i (rev)
  float xs[kX], gp[kG];
#pragma unroll
  for (int i = 0; i < kX; ++i) {
    const int t = t0 - (W - 1) + i;
    xs[i] = (t >= 0 && t < p.seqlen) ? ld<T>(p.x, b * p.x_sb + static_cast<int64_t>(t) * p.x_sl + d) : 0.f;
  }
#pragma unroll
  for (int i = 0; i < kG; ++i) {
    const int s = kRev ? t0 - (W - 1) + i : t0 + i;
    float v = 0.f;
    if (s >= 0 && s < p.seqlen) {
      float pre = c.bias;
      // forward: x[s - (W-1) + k] = xs[i + k]; reversed: x[s + (W-1) - k] = xs[i + (W-1) - k]
#pragma unroll
      for (int k = 0; k < W; ++k) pre = fmaf(c.w[k], xs[kRev ? i + W - 1 - k : i + k], pre);
      v = ld<T>(p.g, b * p.g_sb + static_cast<int64_t>(s) * p.g_sl + d);
      if (p.silu) {
        const float sg = sigmoid(pre);
        v *= sg * (1.f + pre * (1.f - sg));
      }
    }
    gp[i] = v;
  }
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int r = 0; r < kRun; ++r) {
    const int t = t0 + r;
    if (t < p.seqlen) {
      float acc = 0.f;
      // forward: s = t + (W-1) - k -> i = r + (W-1) - k; reversed: s = t - (W-1) + k -> i = r + k
#pragma unroll
      for (int k = 0; k < W; ++k) acc = fmaf(c.w[k], gp[kRev ? r + k : r + W - 1 - k], acc);
      T* dst = out + b * p.o_sb + static_cast<int64_t>(t) * p.o_sl + d;
      *dst = from_f<T>(p.accum ? to_f<T>(*dst) + acc : acc);
    }
  }
}

template <template <typename> class F, typename... Args>
cudaError_t dispatch_dtype(DType dtype, Args&&... args) {
  switch (dtype) {
    case DType::kFloat32: return F<float>::run(args...);
    case DType::kFloat16: return F<__half>::run(args...);
    case DType::kBFloat16: return F<__nv_bfloat16>::run(args...);
  }
  return cudaErrorInvalidValue;
}

dim3 scan_grid(const ScanDirs& ps) {
  const ScanParams& p = ps.dir[0];
  return dim3((p.dim + kCh - 1) / kCh, p.batch, ps.ndir);
}

template <typename T> struct ScanFwd {
  static cudaError_t run(const ScanDirs& ps, cudaStream_t s) {
    scan_fwd_kernel<T><<<scan_grid(ps), kThreads, 0, s>>>(ps);
    return cudaGetLastError();
  }
};
template <typename T> struct ScanBwd {
  static cudaError_t run(const ScanDirs& ps, cudaStream_t s) {
    const dim3 grid = scan_grid(ps);
    const ScanParams& p = ps.dir[0];
    // every direction has dA set or none has (the binding sets them together)
    const auto kernel = p.dA != nullptr ? scan_bwd_kernel<T, true> : scan_bwd_kernel<T, false>;
    constexpr int smem = sizeof(BwdShared<T>);
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    kernel<<<grid, kThreads, smem, s>>>(ps);
    const int64_t n = static_cast<int64_t>(p.batch) * p.seqlen * 2 * kStates;
    const dim3 blocks(static_cast<unsigned>((n + kReduceThreads - 1) / kReduceThreads), ps.ndir);
    // every direction's dB | dC output has the same dtype (the binding checks it)
    if (p.dbc_out_f32) reduce_partials_kernel<float><<<blocks, kReduceThreads, 0, s>>>(ps, grid.x);
    else reduce_partials_kernel<T><<<blocks, kReduceThreads, 0, s>>>(ps, grid.x);
    return cudaGetLastError();
  }
};

template <typename T, bool kBackward>
cudaError_t conv_launch(const ConvParams& p, cudaStream_t s) {
  const dim3 grid((p.dim + kConvThreads - 1) / kConvThreads, (p.seqlen + kRun - 1) / kRun, p.batch);
  if (p.width != 4) return cudaErrorInvalidValue;  // the host side checks this first
  if (kBackward) {
    if (p.reverse) conv_bwd_kernel<T, 4, true><<<grid, kConvThreads, 0, s>>>(p);
    else conv_bwd_kernel<T, 4, false><<<grid, kConvThreads, 0, s>>>(p);
  } else {
    if (p.reverse) conv_fwd_kernel<T, 4, true><<<grid, kConvThreads, 0, s>>>(p);
    else conv_fwd_kernel<T, 4, false><<<grid, kConvThreads, 0, s>>>(p);
  }
  return cudaGetLastError();
}
template <typename T> struct ConvFwd {
  static cudaError_t run(const ConvParams& p, cudaStream_t s) { return conv_launch<T, false>(p, s); }
};
template <typename T> struct ConvBwd {
  static cudaError_t run(const ConvParams& p, cudaStream_t s) { return conv_launch<T, true>(p, s); }
};

}  // namespace

int scan_chunk_len() { return kK; }
int scan_state_interval() { return kStateEvery; }
int scan_channels_per_block() { return kCh; }

cudaError_t scan_forward(const ScanDirs& ps, DType dtype, cudaStream_t stream) {
  return dispatch_dtype<ScanFwd>(dtype, ps, stream);
}
cudaError_t scan_backward(const ScanDirs& ps, DType dtype, cudaStream_t stream) {
  return dispatch_dtype<ScanBwd>(dtype, ps, stream);
}
cudaError_t conv_forward(const ConvParams& p, DType dtype, cudaStream_t stream) {
  return dispatch_dtype<ConvFwd>(dtype, p, stream);
}
cudaError_t conv_backward(const ConvParams& p, DType dtype, cudaStream_t stream) {
  return dispatch_dtype<ConvBwd>(dtype, p, stream);
}

}  // namespace memba_scan
