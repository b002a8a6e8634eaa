// Internal pieces of the direct convolution (nbsmt/direct_conv.h) shared by the
// portable and the AVX2 implementation.
#pragma once

#include <cstdint>

namespace nbsmt {
namespace detail {

// One product x * w of an output channel's program. `off` is the position of x
// in the image's quantized planes relative to the output position's base offset;
// R(x) sits at off + reduced_delta (DcChannel). rw = R(w).
struct DcTerm {
  int64_t off;
  float w, rw;
};

// A step with two or more non-zero weights: terms [first, first + count) of `cterms`.
struct DcStep {
  int32_t first, count;
};

// What one output channel computes, and where it goes.
struct DcChannel {
  const DcTerm* exact;  // steps that cannot collide: plain products
  int64_t nexact;
  const DcTerm* cterms;
  const DcStep* steps;
  int64_t nsteps;
  const float* planes;     // the image's quantized planes
  int64_t reduced_delta;   // R(x) planes at planes + reduced_delta (collision steps only)
  bool reduce_activations;
  // Output: positions [out0][out1][out2], output position (o0, o1, o2) reads
  // planes + (o0 * q1 + o1) * q2 + o2 + term.off.
  int64_t out0, out1, out2, q1, q2;
  float* y;
  float scale;
  const float* bias;  // nullable
};

// Depthwise convolution of up to 8 channels of one image (one input and one
// output channel per group, every step exact: no two non-zero weights share a
// step), 8 channels per vector: the channels' quantized phase planes are
// interleaved [phase][position][8 lanes] in `buf`, each kernel position is one
// vector of 8 weights, and 8 output positions accumulate at once (no per-channel
// loop, so small images cost little per channel).
constexpr int64_t kMaxDwKernel = 512;  // = kDirectMaxK: C/group = 1
struct DwBlock {
  const float* x;   // the first channel's input; channel l at x + l * in_size
  int nc;           // channels in the block (1..8)
  int64_t in[3], pad_begin[3], out[3];
  int64_t q[3], s[3];  // phase planes: extent and stride (phases) per axis
  int64_t nph, size;   // phases; positions per plane (slack of >= 8 positions included)
  const char* used;    // [nph]: phase read by some kernel position
  const int64_t* off;  // [ks]: kernel position -> position offset (phase * size + offset)
  int64_t ks;          // kernel positions, at most kMaxDwKernel
  int64_t stride[2];   // the convolution's strides along axes 0 and 1
  const int64_t* kdil; // [ks][2]: kernel position's dilated offsets along axes 0 and 1
  const float* w;      // [ks][8] weights (0 in unused lanes)
  float* buf;          // nph * size * 8 floats, 32-byte aligned
  float x_scale;
  bool sgn;
  float* y;            // the first channel's output; channel l at y + l * out_size
  const float* scale;  // [nc]
  const float* bias;   // [nc] or null
};

// Computes and stores every output of one channel.
void dc_channel_generic(const DcChannel& ch);
#if defined(__x86_64__) || defined(_M_X64)
void dc_channel_avx2(const DcChannel& ch);
// out[i] = quantize_activation(x[i * stride], scale, sgn) as float (AVX2 for stride 1).
void dc_quantize_avx2(const float* x, int64_t n, int64_t stride, float scale, bool sgn,
                      float* out);
void dc_reduce_avx2(const float* q, int64_t n, bool sgn, float* out);
void dc_split_avx2(const float* src, int64_t n, int64_t stride, float* out);
void dc_depthwise8_avx2(const DwBlock& b);
#endif
void dc_quantize_generic(const float* x, int64_t n, int64_t stride, float scale, bool sgn,
                         float* out);
void dc_reduce_generic(const float* q, int64_t n, bool sgn, float* out);
// out[i] = src[i * stride] for i < n (one stride phase of a quantized row).
void dc_split_generic(const float* src, int64_t n, int64_t stride, float* out);

}  // namespace detail
}  // namespace nbsmt
