// Direct NB-SMT convolution for depthwise and narrow grouped convolutions, and
// for convolutions with a small reduction (first layers): pure math on pointers
// and shapes, no ONNX Runtime types.
//
// The GEMM kernels (kernels.h) vectorise over output channels of one group, 16
// at a time; a depthwise convolution has one output channel per group, so they
// would run 1/16 of their lanes, once per group. This kernel vectorises over
// output positions instead (8 per vector, along the innermost spatial axis) and
// broadcasts one weight per reduction element, so every group and channel uses
// full vectors whatever its width.
//
// Arithmetic. Activations are quantized (docs/spec.md §2) into float32 planes
// holding integers in [-127, 255]; products are at most 255 * 128 in magnitude
// (also with reduced operands), so every partial sum of K <= kDirectMaxK = 512
// products is an integer below 2^24 and float32 arithmetic (FMA or not) is exact:
// the accumulator equals the int32 one, and float32(acc) is the accumulator itself.
// The NB-SMT rules work per step: the weights of a step are known when the
// weights are prepared, so a step with at most one non-zero weight can never
// collide and becomes plain products ("exact terms"); only steps with two or
// more non-zero weights count the active threads per output position (n) and
// choose x or R(x), w or R(w) per lane. Depthwise convolutions with the channel
// mapping have one channel per group: T = 2 and T = 4 never collide there and
// cost what T = 1 costs.
//
// Layout. The quantized input of each channel is split into stride phases
// (plane b holds the padded input at positions i * stride + b per spatial
// axis, zero outside the image), so that every kernel position reads a
// contiguous run at a constant offset from the output position, for any
// stride, dilation and padding. Output scaling (docs/ops.md §4.5) is fused into
// the kernel's store: y = float32(scale[m] * acc) (+ bias[m]).
//
// Statistics (the counters of docs/spec.md §3.4) are not produced here: a node that asks for
// them runs through the GEMM path.
#pragma once

#include <cstdint>
#include <memory>

#include "nbsmt/kernels.h"
#include "nbsmt/pack.h"

namespace nbsmt {

// Largest reduction length (C/group * kernel size) of the direct kernel (exact float sums).
constexpr int64_t kDirectMaxK = 512;

// Reductions up to this length (C/group * kernel size) run through the direct
// kernel whatever the group count: with so few products per output (first
// layers on 1-3 input channels), the GEMM kernels spend their time making rows.
constexpr int64_t kDirectSmallK = 32;

// Whether a Conv with these shapes runs through the direct kernel: K <= kDirectMaxK
// and either group > 1 with fewer than 16 output channels per group, or
// K <= kDirectSmallK.
bool direct_conv_preferred(int64_t groups, int64_t channels_per_group, int64_t outputs_per_group,
                           int64_t kernel_size);

// The weights as per-output-channel programs (exact terms and collision steps).
// Immutable once built; depends only on the weights and the attributes.
struct DirectConvWeights;

// w: M x (C_g * kernel_size) int8 in the ONNX layout [M][C_g][kernel...];
// layout: make_conv_layout(mapping, T, C_g, kernel_size). Returns nullptr if a
// weight is -128 (outside the contract).
std::shared_ptr<const DirectConvWeights> prepare_direct_conv(const SmtConfig& cfg,
                                                             const PackLayout& layout,
                                                             const int8_t* w, int64_t M,
                                                             int64_t groups,
                                                             int64_t channels_per_group);

// Whether some step of some output channel has two or more non-zero weights (a
// possible collision, resolved per output position).
bool direct_conv_has_collision_steps(const DirectConvWeights& w);

// Y[n][m][out] = float32(out_scale[m] * acc[n][m][out]) (+ bias[m] if bias != null)
// for N images x [C][geo.in] (C = groups * C_g). Quantizes the activations itself.
void direct_conv(const DirectConvWeights& w, const ConvGeometry& geo, int64_t N, const float* x,
                 float x_scale, const float* out_scale, const float* bias, float* y,
                 const Parallel& parallel);

}  // namespace nbsmt
