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

// Computes and stores every output of one channel.
void dc_channel_generic(const DcChannel& ch);
#if defined(__x86_64__) || defined(_M_X64)
void dc_channel_avx2(const DcChannel& ch);
// out[i] = quantize_activation(x[i * stride], scale, sgn) as float (AVX2 for stride 1).
void dc_quantize_avx2(const float* x, int64_t n, int64_t stride, float scale, bool sgn,
                      float* out);
void dc_reduce_avx2(const float* q, int64_t n, bool sgn, float* out);
#endif
void dc_quantize_generic(const float* x, int64_t n, int64_t stride, float scale, bool sgn,
                         float* out);
void dc_reduce_generic(const float* q, int64_t n, bool sgn, float* out);

}  // namespace detail
}  // namespace nbsmt
