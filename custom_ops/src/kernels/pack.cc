// Quantization, weight packing and im2col into the packed NB-SMT layout (pack.h).
#include "nbsmt/pack.h"

#include <cstring>

#include "nbsmt/kernels.h"

namespace nbsmt {

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void finish_layout(PackLayout& layout) {
  layout.identity = true;
  for (int64_t k = 0; k < layout.length; ++k) {
    if (layout.dest[k] != k) {
      layout.identity = false;
      break;
    }
  }
}

}  // namespace

PackLayout make_conv_layout(Mapping mapping, int threads, int64_t channels, int64_t kernel_size) {
  PackLayout layout;
  layout.threads = threads;
  layout.length = channels * kernel_size;
  layout.dest.resize(static_cast<size_t>(layout.length));
  if (mapping == Mapping::kInterleave || threads == 1) {
    layout.steps = ceil_div(layout.length, threads);
    for (int64_t k = 0; k < layout.length; ++k) layout.dest[k] = k;
  } else {
    const int64_t block = ceil_div(channels, threads);
    layout.steps = block * kernel_size;
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t t = c / block;
      for (int64_t kpos = 0; kpos < kernel_size; ++kpos) {
        const int64_t e = (c - t * block) * kernel_size + kpos;  // step of thread t
        layout.dest[c * kernel_size + kpos] = e * threads + t;
      }
    }
  }
  finish_layout(layout);
  return layout;
}

PackLayout make_matmul_layout(Mapping mapping, int threads, int64_t length) {
  // A MatMul reduction is a Conv reduction with one-element "channels".
  return make_conv_layout(mapping, threads, length, 1);
}

bool pack_weights(const PackLayout& layout, const int8_t* w, int64_t rows, int64_t w_stride,
                  int8_t* out) {
  const int64_t rl = layout.row_length();
  const int64_t K = layout.length;
  const int64_t* dest = layout.dest.data();
  bool ok = true;
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* src = w + r * w_stride;
    int8_t* dst = out + r * rl;
    std::memset(dst, 0, static_cast<size_t>(rl));
    if (layout.identity) {
      std::memcpy(dst, src, static_cast<size_t>(K));
    } else {
      for (int64_t k = 0; k < K; ++k) dst[dest[k]] = src[k];
    }
    for (int64_t k = 0; k < K; ++k) ok &= (src[k] != -128);
  }
  return ok;
}

void quantize_pack_rows(const PackLayout& layout, const float* a, int64_t r0, int64_t r1,
                        float scale, bool act_signed, int16_t* out) {
  const int64_t rl = layout.row_length();
  const int64_t K = layout.length;
  const int64_t* dest = layout.dest.data();
  for (int64_t r = r0; r < r1; ++r) {
    const float* src = a + r * K;
    int16_t* dst = out + (r - r0) * rl;
    if (layout.identity) {
      for (int64_t k = 0; k < K; ++k) dst[k] = quantize_activation(src[k], scale, act_signed);
    } else {
      for (int64_t k = 0; k < K; ++k) {
        dst[dest[k]] = quantize_activation(src[k], scale, act_signed);
      }
    }
  }
}

void quantize_channels_last(const float* x, int64_t channels, int64_t spatial, int64_t s0,
                            int64_t s1, float scale, bool act_signed, int16_t* out) {
  // Tiles of spatial positions keep the strided writes inside a small window.
  constexpr int64_t kTile = 64;
  for (int64_t t0 = s0; t0 < s1; t0 += kTile) {
    const int64_t t1 = t0 + kTile < s1 ? t0 + kTile : s1;
    for (int64_t c = 0; c < channels; ++c) {
      const float* src = x + c * spatial;
      for (int64_t s = t0; s < t1; ++s) {
        out[s * channels + c] = quantize_activation(src[s], scale, act_signed);
      }
    }
  }
}

Im2Col make_im2col(const ConvGeometry& geo, const PackLayout& layout, int64_t channels) {
  Im2Col plan;
  plan.geo = geo;
  plan.channels = channels;
  plan.row_length = layout.row_length();
  const int64_t ks = geo.kernel_size();
  plan.dest_by_kpos.resize(static_cast<size_t>(ks * channels));
  plan.channels_contiguous = true;
  for (int64_t kpos = 0; kpos < ks; ++kpos) {
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t d = layout.dest[c * ks + kpos];
      plan.dest_by_kpos[kpos * channels + c] = d;
      if (d != plan.dest_by_kpos[kpos * channels] + c) plan.channels_contiguous = false;
    }
  }
  return plan;
}

void im2col_rows(const Im2Col& plan, const int16_t* xq, int64_t total_channels,
                 int64_t channel_offset, int64_t p0, int64_t p1, int16_t* out) {
  const ConvGeometry& g = plan.geo;
  const int64_t C = plan.channels;
  const int64_t rl = plan.row_length;
  const int64_t* dk = plan.dest_by_kpos.data();
  const bool contiguous = plan.channels_contiguous;
  const size_t copy_bytes = static_cast<size_t>(C) * sizeof(int16_t);
  if (C == 0) return;  // nothing to gather (a group without input channels)

  // Output coordinates of p0; advanced incrementally.
  int64_t o2 = p0 % g.out[2];
  int64_t o1 = (p0 / g.out[2]) % g.out[1];
  int64_t o0 = p0 / (g.out[2] * g.out[1]);
  for (int64_t p = p0; p < p1; ++p) {
    int16_t* row = out + (p - p0) * rl;
    const int64_t b0 = o0 * g.stride[0] - g.pad_begin[0];
    const int64_t b1 = o1 * g.stride[1] - g.pad_begin[1];
    const int64_t b2 = o2 * g.stride[2] - g.pad_begin[2];
    int64_t kpos = 0;
    for (int64_t k0 = 0; k0 < g.kernel[0]; ++k0) {
      const int64_t i0 = b0 + k0 * g.dilation[0];
      const bool v0 = i0 >= 0 && i0 < g.in[0];
      for (int64_t k1 = 0; k1 < g.kernel[1]; ++k1) {
        const int64_t i1 = b1 + k1 * g.dilation[1];
        const bool v1 = v0 && i1 >= 0 && i1 < g.in[1];
        for (int64_t k2 = 0; k2 < g.kernel[2]; ++k2, ++kpos) {
          const int64_t i2 = b2 + k2 * g.dilation[2];
          const bool valid = v1 && i2 >= 0 && i2 < g.in[2];
          const int64_t* dst = dk + kpos * C;
          if (valid) {
            const int16_t* src =
                xq + ((i0 * g.in[1] + i1) * g.in[2] + i2) * total_channels + channel_offset;
            if (contiguous) {
              std::memcpy(row + dst[0], src, copy_bytes);
            } else {
              for (int64_t c = 0; c < C; ++c) row[dst[c]] = src[c];
            }
          } else if (contiguous) {
            std::memset(row + dst[0], 0, copy_bytes);
          } else {
            for (int64_t c = 0; c < C; ++c) row[dst[c]] = 0;
          }
        }
      }
    }
    if (++o2 == g.out[2]) {
      o2 = 0;
      if (++o1 == g.out[1]) {
        o1 = 0;
        ++o0;
      }
    }
  }
}

}  // namespace nbsmt
