// Quantization and packing of NB-SMT operands: pure math, no ONNX Runtime types.
//
// The ORT glue (src/ort/) turns float activations and int8 weights into the
// "packed" rows that accumulate() consumes (kernels.h): every reduction of K
// elements becomes steps x T slots, packed[s * T + t] = element thread t
// handles at step s, idle slots 0. A PackLayout maps each element of the
// natural reduction order (Conv: input channel of the group, then kernel
// position, like the ONNX weight layout; MatMul: k) to its packed slot; the
// same layout is applied to activations and weights.
//
// Step order. accumulate() sums a function of each step's T slots over the
// steps, and the statistics are sums over steps too, so the accumulators and
// counters are unchanged by any permutation of the steps that is applied to
// all threads (and to activations and weights) alike. Only which elements meet
// at the same step matters. The Conv channel mapping uses this: thread t still
// walks its block of channels (channel-major, SPEC.md §3.3), but the glue
// stores step e = j * KS + kpos (j = channel within the block) at position
// kpos * B + j, so that one kernel position of one pixel is a contiguous copy
// in im2col.
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
  bool identity = false;  // dest[k] == k for all k
  // Conv channel mapping only: B = ceil(C_g / T) channels per thread, else 0.
  int64_t channel_block = 0;
  int64_t row_length() const { return steps * threads; }
};

// Conv: K = channels * kernel_size, natural k = c * kernel_size + kpos.
// kChannel (and any mapping with T = 1, where the mapping cannot matter):
//   channels split into T blocks of B = ceil(channels / T); thread t owns
//   [t*B, min((t+1)*B, channels)); its element (c, kpos) is step
//   e = (c - t*B) * kernel_size + kpos, stored at step position kpos * B + (c - t*B)
//   (see "Step order" above); steps = B * kernel_size.
// kInterleave: k goes to thread k mod T at step k div T, steps = ceil(K / T).
PackLayout make_conv_layout(Mapping mapping, int threads, int64_t channels, int64_t kernel_size);

// MatMul: K elements. kChannel: blocks of L = ceil(K / T) elements, thread t owns
// [t*L, min((t+1)*L, K)), element k at slot (k - t*L) * T + t; kInterleave:
// slot k (thread k mod T, step k div T). T = 1: natural order.
PackLayout make_matmul_layout(Mapping mapping, int threads, int64_t length);

// Packs `rows` weight rows into out (rows x layout.row_length(), idle slots 0).
// Element k of row r is w[r * row_stride + k * elem_stride]. Returns false if a
// weight is -128, which the contract excludes (weights are in [-127, 127]).
bool pack_weights(const PackLayout& layout, const int8_t* w, int64_t rows, int64_t row_stride,
                  int64_t elem_stride, int8_t* out);

// out[i] = quantize_activation(x[i], scale, act_signed) for i < n, computed
// without a per-element call (vectorizable); bit-identical to quantize_activation.
void quantize_activations(const float* x, int64_t n, float scale, bool act_signed,
                          int16_t* out);

// MatMul activations: quantizes rows [r0, r1) of a (row r at a + r * layout.length)
// and writes them packed to out + (r - r0) * row_length(). Only slots of real
// elements are written: the caller zero-fills out once.
void quantize_pack_rows(const PackLayout& layout, const float* a, int64_t r0, int64_t r1,
                        float scale, bool act_signed, int16_t* out);

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

// Read-only tables of one Conv call's quantization and im2col, built once.
//
// The quantized image is stored pixel-major: pixel s holds `pixel_stride` =
// groups * group_width int16 entries; channel c sits at entry channel_pos[c].
// With a channel-block layout a group's entries are ordered (j, t) -> j * T + t
// (channel t*B + j; entries past the group's channels stay 0), which makes one
// kernel position of one pixel a contiguous run of the packed row.
struct Im2Col {
  ConvGeometry geo;
  int64_t groups = 1;
  int64_t group_width = 0;   // entries per group per pixel
  int64_t pixel_stride = 0;  // groups * group_width
  int64_t row_length = 0;    // packed row length (layout.row_length())
  std::vector<int64_t> channel_pos;  // [groups * C_g]
  // dest_by_kpos[kpos * group_width + i]: packed slot of entry i at kernel position kpos
  std::vector<int64_t> dest_by_kpos;
  bool contiguous = false;  // dest_by_kpos[kpos * gw + i] == dest_by_kpos[kpos * gw] + i
  size_t image_entries() const { return static_cast<size_t>(geo.in_size() * pixel_stride); }
};
Im2Col make_im2col(const ConvGeometry& geo, const PackLayout& layout, int64_t channels_per_group,
                   int64_t groups);

// Quantizes pixels [s0, s1) of one image x[C][in_size] into xq (plan's pixel-major
// order). Entries that hold no channel are not written: zero-fill xq once.
void quantize_image(const Im2Col& plan, const float* x, int64_t s0, int64_t s1, float scale,
                    bool act_signed, int16_t* xq);

// Writes the packed rows of output positions [p0, p1) of group g to
// out + (p - p0) * row_length. Padded positions are written as 0; idle slots
// outside the gathered runs are not touched (the caller zero-fills out once).
void im2col_rows(const Im2Col& plan, const int16_t* xq, int64_t g, int64_t p0, int64_t p1,
                 int16_t* out);

}  // namespace nbsmt
