// Quantization, weight packing and im2col into the packed NB-SMT layout (pack.h).
#include "nbsmt/pack.h"

#include <algorithm>
#include <cstring>

#include "engine.h"
#include "nbsmt/kernels.h"

namespace nbsmt {

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Work buffers on the stack: no allocation inside parallel tasks.
constexpr int64_t kTile = 256;

}  // namespace

PackLayout make_conv_layout(Mapping mapping, int threads, int64_t channels, int64_t kernel_size) {
  PackLayout layout;
  layout.threads = threads;
  layout.length = channels * kernel_size;
  layout.dest.resize(static_cast<size_t>(layout.length));
  if (mapping == Mapping::kInterleave && threads > 1) {
    layout.steps = ceil_div(layout.length, threads);
    for (int64_t k = 0; k < layout.length; ++k) layout.dest[k] = k;
  } else {
    const int64_t block = ceil_div(channels, threads);
    layout.channel_block = block;
    layout.steps = block * kernel_size;
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t t = c / block;
      const int64_t j = c - t * block;
      for (int64_t kpos = 0; kpos < kernel_size; ++kpos) {
        // step e = j * kernel_size + kpos of thread t, stored at step position kpos * B + j
        layout.dest[c * kernel_size + kpos] = (kpos * block + j) * threads + t;
      }
    }
  }
  layout.identity = true;
  for (int64_t k = 0; k < layout.length; ++k) {
    if (layout.dest[k] != k) {
      layout.identity = false;
      break;
    }
  }
  return layout;
}

PackLayout make_matmul_layout(Mapping mapping, int threads, int64_t length) {
  // One-element "channels": slot (k - t*L) * T + t (channel) or k (interleave).
  PackLayout layout = make_conv_layout(mapping, threads, length, 1);
  layout.channel_block = 0;
  return layout;
}

bool pack_weights(const PackLayout& layout, const int8_t* w, int64_t rows, int64_t row_stride,
                  int64_t elem_stride, int8_t* out) {
  const int64_t rl = layout.row_length();
  const int64_t K = layout.length;
  const int64_t* dest = layout.dest.data();
  bool ok = true;
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* src = w + r * row_stride;
    int8_t* dst = out + r * rl;
    std::memset(dst, 0, static_cast<size_t>(rl));
    for (int64_t k = 0; k < K; ++k) {
      const int8_t v = src[k * elem_stride];
      ok &= (v != -128);
      dst[dest[k]] = v;
    }
  }
  return ok;
}

namespace {

// Same value as quantize_activation(): float32 division, NaN -> 0, clip, round
// half to even. Clipping first is equivalent (the bounds are integers) and keeps
// |q| <= 255, where adding and subtracting 1.5 * 2^23 rounds to the nearest
// integer, ties to even, in the default rounding mode (the one nearbyint uses).
// Branch-free so the compiler vectorizes it; lo/hi as arguments (not selected
// inside) keep the loop free of control flow.
__attribute__((noinline)) void quantize_span(const float* x, int64_t n, float scale, float lo,
                                              float hi, int16_t* out) {
  const float magic = 12582912.0f;
  for (int64_t i = 0; i < n; ++i) {
    float q = x[i] / scale;
    q = q == q ? q : 0.0f;  // NaN -> 0
    q = q < lo ? lo : q;
    q = q > hi ? hi : q;
    q = (q + magic) - magic;
    out[i] = static_cast<int16_t>(static_cast<int32_t>(q));
  }
}

}  // namespace

void quantize_activations(const float* x, int64_t n, float scale, bool act_signed,
                          int16_t* out) {
  if (act_signed) {
    quantize_span(x, n, scale, -127.0f, 127.0f, out);
  } else {
    quantize_span(x, n, scale, 0.0f, 255.0f, out);
  }
}

void quantize_pack_rows(const PackLayout& layout, const float* a, int64_t r0, int64_t r1,
                        float scale, bool act_signed, int16_t* out) {
  const int64_t rl = layout.row_length();
  const int64_t K = layout.length;
  const int64_t* dest = layout.dest.data();
  int16_t tmp[kTile];
  for (int64_t r = r0; r < r1; ++r) {
    const float* src = a + r * K;
    int16_t* dst = out + (r - r0) * rl;
    if (layout.identity) {
      quantize_activations(src, K, scale, act_signed, dst);
      continue;
    }
    for (int64_t k0 = 0; k0 < K; k0 += kTile) {
      const int64_t n = std::min(kTile, K - k0);
      quantize_activations(src + k0, n, scale, act_signed, tmp);
      for (int64_t i = 0; i < n; ++i) dst[dest[k0 + i]] = tmp[i];
    }
  }
}

Im2Col make_im2col(const ConvGeometry& geo, const PackLayout& layout, int64_t channels_per_group,
                   int64_t groups) {
  Im2Col plan;
  plan.geo = geo;
  plan.groups = groups;
  plan.row_length = layout.row_length();
  const int64_t ks = geo.kernel_size();
  const int64_t cg = channels_per_group;
  const int64_t block = layout.channel_block;
  const int64_t T = layout.threads;
  const bool blocked = block > 0;
  plan.group_width = blocked ? block * T : cg;
  plan.pixel_stride = groups * plan.group_width;
  const int64_t gw = plan.group_width;

  auto pos = [&](int64_t c) { return blocked ? (c % block) * T + c / block : c; };
  plan.channel_pos.resize(static_cast<size_t>(groups * cg));
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t c = 0; c < cg; ++c) plan.channel_pos[g * cg + c] = g * gw + pos(c);
  }
  plan.dest_by_kpos.resize(static_cast<size_t>(ks * gw));
  for (int64_t kpos = 0; kpos < ks; ++kpos) {
    // Entries without a channel (blocked layout) hold 0 and land on idle slots.
    for (int64_t i = 0; i < gw; ++i) plan.dest_by_kpos[kpos * gw + i] = kpos * gw + i;
    for (int64_t c = 0; c < cg; ++c) {
      plan.dest_by_kpos[kpos * gw + pos(c)] = layout.dest[c * ks + kpos];
    }
  }
  plan.contiguous = true;
  for (int64_t kpos = 0; kpos < ks && plan.contiguous; ++kpos) {
    for (int64_t i = 0; i < gw; ++i) {
      if (plan.dest_by_kpos[kpos * gw + i] != plan.dest_by_kpos[kpos * gw] + i) {
        plan.contiguous = false;
        break;
      }
    }
  }
  return plan;
}

void quantize_image(const Im2Col& plan, const float* x, int64_t s0, int64_t s1, float scale,
                    bool act_signed, int16_t* xq) {
#if defined(__x86_64__) || defined(_M_X64)
  if (detail::selected_backend().isa != detail::Isa::kGeneric) {
    detail::avx2_quantize_image(plan, x, s0, s1, scale, act_signed, xq);
    return;
  }
#endif
  const int64_t C = static_cast<int64_t>(plan.channel_pos.size());
  const int64_t S = plan.geo.in_size();
  const int64_t ps = plan.pixel_stride;
  int16_t tmp[kTile];
  for (int64_t t0 = s0; t0 < s1; t0 += kTile) {
    const int64_t n = std::min(kTile, s1 - t0);
    for (int64_t c = 0; c < C; ++c) {
      quantize_activations(x + c * S + t0, n, scale, act_signed, tmp);
      int16_t* dst = xq + t0 * ps + plan.channel_pos[c];
      for (int64_t i = 0; i < n; ++i) dst[i * ps] = tmp[i];
    }
  }
}

namespace {

// Copies / clears runs of a few dozen bytes: inlined fixed-size moves instead of
// a libc call per kernel position (most runs are one group's channels of a pixel).
inline void copy_run(int16_t* dst, const int16_t* src, size_t bytes) {
  auto* d = reinterpret_cast<char*>(dst);
  const auto* s = reinterpret_cast<const char*>(src);
  for (; bytes >= 32; bytes -= 32, d += 32, s += 32) __builtin_memcpy(d, s, 32);
  if (bytes >= 16) {
    __builtin_memcpy(d, s, 16);
    d += 16, s += 16, bytes -= 16;
  }
  if (bytes >= 8) {
    __builtin_memcpy(d, s, 8);
    d += 8, s += 8, bytes -= 8;
  }
  if (bytes >= 4) {
    __builtin_memcpy(d, s, 4);
    d += 4, s += 4, bytes -= 4;
  }
  if (bytes >= 2) __builtin_memcpy(d, s, 2);
}

inline void clear_run(int16_t* dst, size_t bytes) {
  auto* d = reinterpret_cast<char*>(dst);
  for (; bytes >= 32; bytes -= 32, d += 32) __builtin_memset(d, 0, 32);
  if (bytes > 0) __builtin_memset(d, 0, bytes);
}

}  // namespace

void im2col_rows(const Im2Col& plan, const int16_t* xq, int64_t g, int64_t p0, int64_t p1,
                 int16_t* out) {
  const ConvGeometry& geo = plan.geo;
  const int64_t gw = plan.group_width;
  if (gw == 0) return;  // a group without input channels: nothing to gather
  const int64_t rl = plan.row_length;
  const int64_t ps = plan.pixel_stride;
  const int64_t* dk = plan.dest_by_kpos.data();
  const bool contiguous = plan.contiguous;
  const size_t run_bytes = static_cast<size_t>(gw) * sizeof(int16_t);
  const int16_t* base = xq + g * gw;

  // Output coordinates of p0; advanced incrementally.
  int64_t o2 = p0 % geo.out[2];
  int64_t o1 = (p0 / geo.out[2]) % geo.out[1];
  int64_t o0 = p0 / (geo.out[2] * geo.out[1]);
  for (int64_t p = p0; p < p1; ++p) {
    int16_t* row = out + (p - p0) * rl;
    const int64_t b0 = o0 * geo.stride[0] - geo.pad_begin[0];
    const int64_t b1 = o1 * geo.stride[1] - geo.pad_begin[1];
    const int64_t b2 = o2 * geo.stride[2] - geo.pad_begin[2];
    int64_t kpos = 0;
    for (int64_t k0 = 0; k0 < geo.kernel[0]; ++k0) {
      const int64_t i0 = b0 + k0 * geo.dilation[0];
      const bool v0 = i0 >= 0 && i0 < geo.in[0];
      for (int64_t k1 = 0; k1 < geo.kernel[1]; ++k1) {
        const int64_t i1 = b1 + k1 * geo.dilation[1];
        const bool v1 = v0 && i1 >= 0 && i1 < geo.in[1];
        for (int64_t k2 = 0; k2 < geo.kernel[2]; ++k2, ++kpos) {
          const int64_t i2 = b2 + k2 * geo.dilation[2];
          const bool valid = v1 && i2 >= 0 && i2 < geo.in[2];
          const int64_t* dst = dk + kpos * gw;
          if (valid) {
            const int16_t* src = base + ((i0 * geo.in[1] + i1) * geo.in[2] + i2) * ps;
            if (contiguous) {
              copy_run(row + dst[0], src, run_bytes);
            } else {
              for (int64_t i = 0; i < gw; ++i) row[dst[i]] = src[i];
            }
          } else if (contiguous) {
            clear_run(row + dst[0], run_bytes);
          } else {
            for (int64_t i = 0; i < gw; ++i) row[dst[i]] = 0;
          }
        }
      }
    }
    if (++o2 == geo.out[2]) {
      o2 = 0;
      if (++o1 == geo.out[1]) {
        o1 = 0;
        ++o0;
      }
    }
  }
}

}  // namespace nbsmt
