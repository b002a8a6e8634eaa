// Quantization and packing of NB-SMT operands: pure math, no ONNX Runtime types.
//
// The ORT glue (src/ort/) turns float activations and int8 weights into the
// "packed" rows that accumulate() consumes (kernels.h): every reduction of K
// elements becomes steps x T slots, packed[s * T + t] = element thread t
// handles at step s, idle slots 0. A PackLayout maps each element of the
// natural reduction order (Conv: input channel of the group, then kernel
// position, like the ONNX weight layout; MatMul: k) to its packed slot.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace nbsmt {

enum class Mapping : int { kChannel = 0, kInterleave = 1 };

struct PackLayout {
  int threads = 1;     // T
  int64_t length = 0;  // K, elements of one reduction in natural order
  int64_t steps = 0;   // S; a packed row holds S * T slots
  // dest[k]: packed slot of natural element k. Slots no element maps to are idle.
  std::vector<int64_t> dest;
  bool identity = false;  // dest[k] == k for all k (T = 1, or interleave)
  int64_t row_length() const { return steps * threads; }
};

// Conv: K = channels * kernel_size, natural k = c * kernel_size + kpos.
// kChannel: channels split into T blocks of B = ceil(channels / T); thread t owns
//   [t*B, min((t+1)*B, channels)) and walks (channel, kpos) of its block in order,
//   steps = B * kernel_size.
// kInterleave: k goes to thread k mod T at step k div T, steps = ceil(K / T).
PackLayout make_conv_layout(Mapping mapping, int threads, int64_t channels, int64_t kernel_size);

// MatMul: K elements. kChannel: blocks of L = ceil(K / T) elements, thread t owns
// [t*L, min((t+1)*L, K)); kInterleave as for Conv.
PackLayout make_matmul_layout(Mapping mapping, int threads, int64_t length);

// Packs `rows` weight rows (row r at w + r * w_stride, natural order) into
// out (rows x layout.row_length(), idle slots set to 0). Returns false if a
// weight is -128, which the contract excludes (weights are in [-127, 127]).
bool pack_weights(const PackLayout& layout, const int8_t* w, int64_t rows, int64_t w_stride,
                  int8_t* out);

// MatMul activations: quantizes rows [r0, r1) of a (row r at a + r * layout.length)
// with quantize_activation() and writes them packed to out + (r - r0) * row_length().
// Only slots of real elements are written: the caller zero-fills out once.
void quantize_pack_rows(const PackLayout& layout, const float* a, int64_t r0, int64_t r1,
                        float scale, bool act_signed, int16_t* out);

// Quantizes spatial positions [s0, s1) of one image x[C][spatial] into
// channels-last order out[s * C + c], so im2col reads a pixel's channels contiguously.
void quantize_channels_last(const float* x, int64_t channels, int64_t spatial, int64_t s0,
                            int64_t s1, float scale, bool act_signed, int16_t* out);

// Geometry of an N-d convolution (N <= 3). Lower ranks are expressed as 3-d with
// leading dimensions of size 1 (kernel 1, stride 1, dilation 1, pad 0).
struct ConvGeometry {
  int64_t in[3] = {1, 1, 1};
  int64_t out[3] = {1, 1, 1};
  int64_t kernel[3] = {1, 1, 1};
  int64_t stride[3] = {1, 1, 1};
  int64_t dilation[3] = {1, 1, 1};
  int64_t pad_begin[3] = {0, 0, 0};
  int64_t in_size() const { return in[0] * in[1] * in[2]; }
  int64_t out_size() const { return out[0] * out[1] * out[2]; }
  int64_t kernel_size() const { return kernel[0] * kernel[1] * kernel[2]; }
};

// Read-only tables for im2col_rows, built once per call.
struct Im2Col {
  ConvGeometry geo;
  int64_t channels = 0;    // C_g, input channels of one group
  int64_t row_length = 0;  // packed row length (layout.row_length())
  // dest_by_kpos[kpos * channels + c] = layout.dest[c * kernel_size + kpos]
  std::vector<int64_t> dest_by_kpos;
  bool channels_contiguous = false;  // dest_by_kpos[kpos * C + c] == dest_by_kpos[kpos * C] + c
};
Im2Col make_im2col(const ConvGeometry& geo, const PackLayout& layout, int64_t channels);

// Writes packed rows for output positions [p0, p1) of one group:
// row p at out + (p - p0) * row_length. xq is one image in channels-last order
// with `total_channels` channels; the group's channels start at `channel_offset`.
// Padded positions are written as 0; idle slots are not touched (the caller
// zero-fills out once).
void im2col_rows(const Im2Col& plan, const int16_t* xq, int64_t total_channels,
                 int64_t channel_offset, int64_t p0, int64_t p1, int16_t* out);

}  // namespace nbsmt
