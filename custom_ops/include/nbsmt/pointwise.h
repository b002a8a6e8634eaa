// Pointwise NB-SMT convolution (1x1 kernel, stride 1, no padding, one group,
// T = 1 or 2) on the NCHW layout directly: pure math on pointers and shapes, no
// ONNX Runtime types.
//
// The GEMM path (kernels.h) makes rows of output positions and vectorises over
// output channels; its results must then be transposed into NCHW, and its
// quantized input is stored pixel-major (another transpose). For a pointwise
// convolution the input channels of one pixel are exactly its reduction, so
// this kernel swaps the roles: vector lanes are 8 consecutive output positions
// of one channel (contiguous in NCHW, in and out), and the weights are
// broadcast.
//
// Arithmetic: the dense method of the GEMM kernels (engine.h) with int16 pairs.
// The reduction is laid out by the same PackLayout (steps x T slots) and read
// as pairs of consecutive slots, (x_2i, x_2i+1) . (w_2i, w_2i+1) with one
// vpmaddwd per 8 positions; for T = 2 a pair is the two threads of one step and
// a second term adds the correction product (R(x) - x) nz(x_partner) .
// w nz(w_partner) (reduce=activations) or x nz(x_partner) . (R(w) - w)
// nz(w_partner) (reduce=weights). Integer sums, exact; the output is
// float32(out_scale[m] * float32(acc)) (+ bias[m]), each operation rounded to
// float32 — identical to the GEMM path and to the NumPy reference.
//
// Statistics (docs/spec.md §3.4) are not produced here: a node that asks for
// them runs through the GEMM path.
#pragma once

#include <cstdint>
#include <memory>

#include "nbsmt/kernels.h"
#include "nbsmt/pack.h"

namespace nbsmt {

// Whether pointwise convolutions with this configuration run through this kernel
// with the kernel ISA in use (the AVX2 backend; T = 1 or 2).
bool pointwise_conv_preferred(const SmtConfig& cfg);

// The weights as int16 pairs per step, broadcast by the kernel. Immutable once built.
struct PointwiseWeights;

// w: M x C int8 (the ONNX layout of a 1x1 kernel); layout: make_conv_layout(mapping,
// T, C, 1). Returns nullptr if a weight is -128 (outside the contract).
std::shared_ptr<const PointwiseWeights> prepare_pointwise_conv(const SmtConfig& cfg,
                                                               const PackLayout& layout,
                                                               const int8_t* w, int64_t M);

// Y[n][m][p] = float32(out_scale[m] * acc[n][m][p]) (+ bias[m] if bias != null) for
// N images x [C][P]. Quantizes the activations itself.
void pointwise_conv(const PointwiseWeights& w, int64_t N, int64_t P, const float* x,
                    float x_scale, const float* out_scale, const float* bias, float* y,
                    const Parallel& parallel);

}  // namespace nbsmt
