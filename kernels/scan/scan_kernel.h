// Token-major selective scan and depthwise causal conv for frozen SSM parameters.
//
// "Token-major" means (B, L, D) tensors with the channel axis contiguous: a
// thread owns a channel and walks the sequence, so every load across a warp is
// coalesced and no transposing copy is needed around the kernels. A scan may
// run in reverse token order (Vim's backward direction) without any flip, and
// over a row-major H x W grid column by column (VMamba's column-major
// directions) without any transpose.
//
// Plain CUDA (no torch headers): scan.cpp checks tensors and calls these
// launchers with raw pointers and the current stream.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace memba_scan {

constexpr int kStates = 16;    // d_state (N); other sizes take the fallback path
constexpr int kGateRank = 16;  // rank of Memba's gate correction (the LIM width)

enum class DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One direction of the scan. Token-major tensors are addressed as
// ptr[b * s_b + t * s_l + d] (channel stride 1); B and C as ptr[b * s_b + t * s_l + n]
// (state stride 1).
struct ScanParams {
  int batch, seqlen, dim, nchunks;
  // rows > 0: the L = rows x cols tokens are a row-major grid walked column by column
  // (VMamba's column-major scan): scan step t visits token (t % rows) * cols + t / rows
  int rows;
  bool reverse, softplus, has_z, has_D, has_bias;  // has_z: gate y with silu(z)
  const void *u, *delta, *z, *Bm, *Cm, *dout;
  int64_t u_sb, u_sl, dl_sb, dl_sl, z_sb, z_sl, B_sb, B_sl, C_sb, C_sl, do_sb, do_sl;
  const float *A;     // (D, N)
  const float *Dv;    // (D,) or null
  const float *bias;  // (D,) or null
  void *out;          // (B, L, D) with strides out_sb, out_sl: out (+)= out_scale * y
  int64_t out_sb, out_sl;
  bool out_f32;       // out is fp32 whatever u's dtype (sums of several scans stay fp32)
  float out_scale;    // 1 unless the caller folds a scale into the store
  bool out_accum;     // add to what ``out`` holds instead of overwriting it
  float dout_scale;   // the backward reads dout_scale * dout
  float *states;      // (B, ceil(L / scan_state_interval()), D, N): the state before every
                      // scan_state_interval()-th step (the forward stores it when set)
  void *du, *ddelta;  // (B, L, D) with strides du_sb, du_sl and dd_sb, dd_sl
  int64_t du_sb, du_sl, dd_sb, dd_sl;
  bool du_f32;        // du is fp32 whatever u's dtype
  void *dz;           // (B, L, D) with strides dz_sb, dz_sl; dz_accum adds to it
  int64_t dz_sb, dz_sl;
  bool dz_accum;
  float *dbc;         // (B, nblocks, L, 2N): per-block partial sums of dB | dC
  void *dbc_out;      // (B, L, 2N) with strides dbc_out_sb, dbc_out_sl: dB | dC summed
  int64_t dbc_out_sb, dbc_out_sl;
  bool dbc_out_f32;   // dbc_out is fp32 (else u's dtype)
  // Trainable A and D (full fine-tuning), or null: each batch item's part of their gradients,
  // dA (B, D, N) and dD (B, D), fp32 (the caller sums them over the batch)
  float *dA, *dD;
};

// Up to kMaxDirs scans of one shape run in one launch (blockIdx.z picks the direction):
// VMamba's four cross-scan directions fill the GPU together where one alone would leave
// most multiprocessors idle (e.g. 56 x 56 tokens and 192 channels).
constexpr int kMaxDirs = 4;
struct ScanDirs {
  ScanParams dir[kMaxDirs];  // the same batch, seqlen, dim and dtype in every direction
  int ndir;
};

// Steps per chunk, steps between the states the forward stores, and channels per block,
// fixed by the kernels.
int scan_chunk_len();
int scan_state_interval();
int scan_channels_per_block();

// y = scan (out); with states set, also the state before every scan_state_interval()-th step.
cudaError_t scan_forward(const ScanDirs& ps, DType dtype, cudaStream_t stream);
// du, ddelta, dz and dB | dC into dbc_out (and dA, dD when set); needs the states stored by
// scan_forward and the dbc buffer for the per-block partials, which a second kernel sums.
cudaError_t scan_backward(const ScanDirs& ps, DType dtype, cudaStream_t stream);

struct ConvParams {
  int batch, seqlen, dim, width;
  bool reverse, silu;
  const void *x, *g;  // x (B, L, D) with strides x_sb, x_sl; g likewise
  int64_t x_sb, x_sl, g_sb, g_sl;
  const float *w;     // (D, width)
  const float *bias;  // (D,) or null
  void *out;          // (B, L, D) with strides o_sb, o_sl: y (forward) or dx (backward)
  int64_t o_sb, o_sl;
  bool accum;         // backward: add dx to what ``out`` holds
};

cudaError_t conv_forward(const ConvParams& p, DType dtype, cudaStream_t stream);
cudaError_t conv_backward(const ConvParams& p, DType dtype, cudaStream_t stream);

// Memba's LIM neuron for both scan directions of one layer in one launch (the
// gate of Vim's mixer, with one x; of VMamba's, with an x per direction).
// Direction 0 integrates x's tokens in order, direction 1
// in reverse order; chunk i of direction dir, position j, is token
//   t = i*l + j (dir 0) or L-1 - (i*l + j) (dir 1),    l = L / T,
// and tokens no chunk covers get a zero output. Per (dir, b, j, r):
//   u = u_prev[dir] or 0;  for i < T: u = leak*u + x[(dir,) t]; u = u > threshold ? 0 : u;
//   out[dir, t] = u;  u_mean[dir] = mean_i u
// Forward and backward (the exact piecewise gradient) recompute everything from
// x and u_prev; T is at most 64 (the reset decisions are the bits of a uint64).
struct LimPairParams {
  int batch, seqlen, rank, nchunks, chunk_len;
  float leak, threshold;
  bool per_dir;           // x, out, g_out and g_x are (B, L, 2, R): an input per direction
  const void *x;          // (B, L, R) contiguous, shared by the directions (or per_dir)
  const void *u_prev[2];  // (B, l, R) contiguous, or null (zero membrane)
  void *out;              // (2, B, L, R) contiguous (or per_dir)
  void *u_mean;           // (2, B, l, R) contiguous
  const void *g_out;      // backward: like out
  const void *g_mean[2];  // (B, l, R) contiguous, or null
  void *g_x;              // like out: each direction's gradient of x
  void *g_prev[2];        // (B, l, R) or null
};
constexpr int kLimPairMaxChunks = 64;

cudaError_t lim_pair_forward(const LimPairParams& p, DType dtype, cudaStream_t stream);
cudaError_t lim_pair_backward(const LimPairParams& p, DType dtype, cudaStream_t stream);

// Memba's gate branch on Vim (gate_kernel.cu), over rows = B * L tokens of D channels:
//   sum_v false (forward):  out[k] = sum_i base[i] + v[k] W^T,      k = 0, 1
//                           (z'_k = z + S_k W_out^T, the two scan directions' gates)
//   sum_v true (backward):  out[0] = sum_i base[i] + (v[0] + v[1]) W^T
//                           (dz = dz'_0 + dz'_1 + (dv_0 + dv_1) W_in), and v_sum = v[0] + v[1]
// base (0 to 2 of them) and out (rows, D) in the storage dtype with row strides base_sr / out_sr
// (multiples of 4, 4-element aligned); v and v_sum (rows, kGateRank) contiguous, 16-byte
// aligned; W[d, r] = w[d * w_sd + r * w_sr] fp32, either W (D, 16) (w_sr = 1) or W_in (16, D)
// (w_sd = 1), contiguous and 16-byte aligned. D is a multiple of 4. Sums in fp32.
struct GateZParams {
  int64_t rows;
  int dim;
  int nbase;
  const void* base[2];
  int64_t base_sr[2];
  const void* v[2];
  const float* w;
  int64_t w_sd, w_sr;
  bool sum_v;
  void* out[2];
  int64_t out_sr[2];
  void* v_sum;  // or null
};

cudaError_t gate_z(const GateZParams& p, DType dtype, cudaStream_t stream);

// VMamba's output gate, out = LayerNorm(y) * silu(z) over the D channels of each token row,
// in one pass (norm_gate_kernel.cu). y (rows, D) fp32 contiguous (the merged cross scan);
// z (rows, D) in the storage dtype with row stride z_sr (e.g. the z half of in_proj's output),
// plus c (rows, D) contiguous in z's dtype when given (Memba's z' = z + S W^T, added in fp32);
// LayerNorm weight and bias (D,) fp32. Forward: out (rows, D) in z's dtype, and the rows'
// mean and 1 / std (rows,) fp32 for the backward. Backward, from dout (rows, D) in z's
// dtype: dy (rows, D) fp32, like y, and dz (rows, D) in z's dtype, the gradient of z (and of
// c) (the weight and bias get no gradient here).
// D is a multiple of 4 and at most kNormGateMaxDim; z's rows are 4-element aligned.
// Without z (null), the same kernels are a plain LayerNorm in the storage dtype: y, out, dout
// and dy (rows, D) in that dtype, the statistics and the affine in fp32, out rounded once
// (VMamba's block norms under autocast, layer_norm_forward / layer_norm_backward).
struct NormGateParams {
  int64_t rows;
  int dim;
  float eps;
  const void* y;      // fp32 (gate) or the storage dtype (plain LayerNorm)
  const float *weight, *bias;
  const void* z;      // or null: plain LayerNorm
  int64_t z_sr;
  const void* c;      // or null
  void* out;          // forward
  float *mean, *rstd;  // written by the forward, read by the backward
  const void* dout;   // backward
  void* dy;           // backward, contiguous, y's dtype
  void* dz;           // backward, contiguous
};
constexpr int kNormGateMaxDim = 2048;

cudaError_t norm_gate_forward(const NormGateParams& p, DType dtype, cudaStream_t stream);
cudaError_t norm_gate_backward(const NormGateParams& p, DType dtype, cudaStream_t stream);
// The plain LayerNorm (z null, y in ``dtype``).
cudaError_t layer_norm_forward(const NormGateParams& p, DType dtype, cudaStream_t stream);
cudaError_t layer_norm_backward(const NormGateParams& p, DType dtype, cudaStream_t stream);

// VMamba's depthwise 3 x 3 conv (padding 1) with its bias and SiLU, channels-last
// (dwconv_kernel.cu): u[b, h, w, d] = silu(bias[d] + sum_{i,j < 3} W[d, i, j] x[b, h+i-1,
// w+j-1, d]), zero outside the grid. x (B, H, W, D) in the storage dtype with pixel strides
// x_sb, x_sh, x_sw (e.g. the x half of in_proj's output), channel stride 1; W (D, 3, 3) and
// bias (D,) fp32. Forward: u, contiguous. Backward, from g = dL/du (contiguous): dx,
// contiguous (W and bias get no gradient here). D, the pixel strides and x's address are
// multiples of 4 elements.
struct DwConvParams {
  int batch, height, width, dim;
  const void* x;
  int64_t x_sb, x_sh, x_sw;
  const float *w, *bias;
  const void* g;  // backward
  void* out;      // u (forward) or dx (backward)
};

cudaError_t dwconv_forward(const DwConvParams& p, DType dtype, cudaStream_t stream);
cudaError_t dwconv_backward(const DwConvParams& p, DType dtype, cudaStream_t stream);

}  // namespace memba_scan
