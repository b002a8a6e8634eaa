// AVX2 pieces of the direct convolution (nbsmt/direct_conv.h): 8 output
// positions per vector, up to 8 vectors (from any rows of the channel) per pass
// over the weight program, float32 FMA on integer values (exact, see the header),
// the output scaling fused into the store; and the depthwise kernel with 8
// channels per vector (DwBlock). Also used on AVX-512 machines.
#include "direct_conv_impl.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>

#define NBSMT_DC_AVX2 __attribute__((target("avx2,fma")))

namespace nbsmt {
namespace detail {

namespace {

constexpr int kMaxVectors = 8;

struct Block {
  int64_t base;  // plane offset of the first lane's output position
  float* y;
  int n;         // valid lanes (1..8)
};

template <int NV>
NBSMT_DC_AVX2 void run_block(const DcChannel& ch, const Block* b) {
  __m256 acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = _mm256_setzero_ps();
  const float* P = ch.planes;
  for (int64_t i = 0; i < ch.nexact; ++i) {
    const DcTerm& e = ch.exact[i];
    const __m256 w = _mm256_set1_ps(e.w);
    const float* p = P + e.off;
    for (int v = 0; v < NV; ++v) acc[v] = _mm256_fmadd_ps(_mm256_loadu_ps(p + b[v].base), w, acc[v]);
  }
  if (ch.nsteps > 0) {
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    const __m256 two = _mm256_set1_ps(2.0f), three = _mm256_set1_ps(3.0f);
    const bool act = ch.reduce_activations;
    for (int64_t s = 0; s < ch.nsteps; ++s) {
      const DcTerm* t = ch.cterms + ch.steps[s].first;
      const int count = ch.steps[s].count;
      __m256 fx[NV], fw[NV];
      for (int v = 0; v < NV; ++v) fx[v] = _mm256_setzero_ps();
      for (int j = 0; j < count; ++j) {  // n = active threads per lane
        const float* p = P + t[j].off;
        for (int v = 0; v < NV; ++v) {
          const __m256 nz = _mm256_cmp_ps(_mm256_loadu_ps(p + b[v].base), zero, _CMP_NEQ_OQ);
          fx[v] = _mm256_add_ps(fx[v], _mm256_and_ps(nz, one));
        }
      }
      for (int v = 0; v < NV; ++v) {
        const __m256 ge2 = _mm256_cmp_ps(fx[v], two, _CMP_GE_OQ);
        const __m256 ge3 = _mm256_cmp_ps(fx[v], three, _CMP_GE_OQ);
        fx[v] = act ? ge2 : ge3;  // activations reduced
        fw[v] = act ? ge3 : ge2;  // weights reduced
      }
      const bool reduce_x = act || count >= 3;
      const bool reduce_w = !act || count >= 3;
      for (int j = 0; j < count; ++j) {
        const __m256 w = _mm256_set1_ps(t[j].w), rw = _mm256_set1_ps(t[j].rw);
        const float* p = P + t[j].off;
        for (int v = 0; v < NV; ++v) {
          __m256 xv = _mm256_loadu_ps(p + b[v].base);
          if (reduce_x) {
            xv = _mm256_blendv_ps(xv, _mm256_loadu_ps(p + ch.reduced_delta + b[v].base), fx[v]);
          }
          const __m256 wv = reduce_w ? _mm256_blendv_ps(w, rw, fw[v]) : w;
          acc[v] = _mm256_fmadd_ps(xv, wv, acc[v]);
        }
      }
    }
  }
  const __m256 scale = _mm256_set1_ps(ch.scale);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int v = 0; v < NV; ++v) {
    __m256 r = _mm256_mul_ps(scale, acc[v]);
    if (ch.bias != nullptr) r = _mm256_add_ps(r, _mm256_set1_ps(*ch.bias));
    if (b[v].n == 8) {
      _mm256_storeu_ps(b[v].y, r);
    } else {
      _mm256_maskstore_ps(b[v].y, _mm256_cmpgt_epi32(_mm256_set1_epi32(b[v].n), lanes), r);
    }
  }
}

}  // namespace

NBSMT_DC_AVX2 void dc_channel_avx2(const DcChannel& ch) {
  // 8 vectors per pass: 8 independent FMA chains cover the FMA latency (4 cycles
  // at 2 per cycle); with 4 the exact terms ran at half the FMA throughput.
  Block blocks[kMaxVectors];
  int nb = 0;
  for (int64_t o0 = 0; o0 < ch.out0; ++o0) {
    for (int64_t o1 = 0; o1 < ch.out1; ++o1) {
      const int64_t rowbase = (o0 * ch.q1 + o1) * ch.q2;
      float* yrow = ch.y + (o0 * ch.out1 + o1) * ch.out2;
      for (int64_t o2 = 0; o2 < ch.out2; o2 += 8) {
        blocks[nb++] = Block{rowbase + o2, yrow + o2,
                             static_cast<int>(std::min<int64_t>(8, ch.out2 - o2))};
        if (nb == kMaxVectors) {
          run_block<kMaxVectors>(ch, blocks);
          nb = 0;
        }
      }
    }
  }
  switch (nb) {
    case 1: run_block<1>(ch, blocks); break;
    case 2: run_block<2>(ch, blocks); break;
    case 3: run_block<3>(ch, blocks); break;
    case 4: run_block<4>(ch, blocks); break;
    case 5: run_block<5>(ch, blocks); break;
    case 6: run_block<6>(ch, blocks); break;
    case 7: run_block<7>(ch, blocks); break;
    default: break;
  }
}

NBSMT_DC_AVX2 void dc_quantize_avx2(const float* x, int64_t n, int64_t stride, float scale,
                                    bool sgn, float* out) {
  if (stride != 1) {
    dc_quantize_generic(x, n, stride, scale, sgn, out);
    return;
  }
  const __m256 s = _mm256_set1_ps(scale);
  const __m256 lo = _mm256_set1_ps(sgn ? -127.0f : 0.0f), hi = _mm256_set1_ps(sgn ? 127.0f : 255.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 q = _mm256_div_ps(_mm256_loadu_ps(x + i), s);  // IEEE division, as the reference
    q = _mm256_and_ps(q, _mm256_cmp_ps(q, q, _CMP_ORD_Q));  // NaN -> 0
    q = _mm256_min_ps(_mm256_max_ps(q, lo), hi);
    _mm256_storeu_ps(out + i, _mm256_round_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  if (i < n) {  // masked lanes read 0 (quantized to 0) and are not stored
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - i)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 q = _mm256_div_ps(_mm256_maskload_ps(x + i, mask), s);
    q = _mm256_and_ps(q, _mm256_cmp_ps(q, q, _CMP_ORD_Q));
    q = _mm256_min_ps(_mm256_max_ps(q, lo), hi);
    _mm256_maskstore_ps(out + i, mask,
                        _mm256_round_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

NBSMT_DC_AVX2 void dc_reduce_avx2(const float* q, int64_t n, bool sgn, float* out) {
  const __m256 sixteenth = _mm256_set1_ps(0.0625f), sixteen = _mm256_set1_ps(16.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(q + i);
    __m256 r = _mm256_round_ps(_mm256_mul_ps(v, sixteenth),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 keep;
    if (sgn) {
      r = _mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-8.0f)), _mm256_set1_ps(7.0f));
      keep = _mm256_and_ps(_mm256_cmp_ps(v, _mm256_set1_ps(-8.0f), _CMP_GE_OQ),
                           _mm256_cmp_ps(v, _mm256_set1_ps(7.0f), _CMP_LE_OQ));
    } else {
      r = _mm256_min_ps(r, _mm256_set1_ps(15.0f));
      keep = _mm256_cmp_ps(v, sixteen, _CMP_LT_OQ);
    }
    _mm256_storeu_ps(out + i, _mm256_blendv_ps(_mm256_mul_ps(r, sixteen), v, keep));
  }
  if (i < n) dc_reduce_generic(q + i, n - i, sgn, out + i);
}

namespace {

NBSMT_DC_AVX2 inline void transpose8x8_ps(const __m256* t, __m256* u) {
  const __m256 a0 = _mm256_unpacklo_ps(t[0], t[1]), a1 = _mm256_unpackhi_ps(t[0], t[1]);
  const __m256 a2 = _mm256_unpacklo_ps(t[2], t[3]), a3 = _mm256_unpackhi_ps(t[2], t[3]);
  const __m256 a4 = _mm256_unpacklo_ps(t[4], t[5]), a5 = _mm256_unpackhi_ps(t[4], t[5]);
  const __m256 a6 = _mm256_unpacklo_ps(t[6], t[7]), a7 = _mm256_unpackhi_ps(t[6], t[7]);
  const __m256 b0 = _mm256_shuffle_ps(a0, a2, 0x44), b1 = _mm256_shuffle_ps(a0, a2, 0xEE);
  const __m256 b2 = _mm256_shuffle_ps(a1, a3, 0x44), b3 = _mm256_shuffle_ps(a1, a3, 0xEE);
  const __m256 b4 = _mm256_shuffle_ps(a4, a6, 0x44), b5 = _mm256_shuffle_ps(a4, a6, 0xEE);
  const __m256 b6 = _mm256_shuffle_ps(a5, a7, 0x44), b7 = _mm256_shuffle_ps(a5, a7, 0xEE);
  u[0] = _mm256_permute2f128_ps(b0, b4, 0x20);
  u[1] = _mm256_permute2f128_ps(b1, b5, 0x20);
  u[2] = _mm256_permute2f128_ps(b2, b6, 0x20);
  u[3] = _mm256_permute2f128_ps(b3, b7, 0x20);
  u[4] = _mm256_permute2f128_ps(b0, b4, 0x31);
  u[5] = _mm256_permute2f128_ps(b1, b5, 0x31);
  u[6] = _mm256_permute2f128_ps(b2, b6, 0x31);
  u[7] = _mm256_permute2f128_ps(b3, b7, 0x31);
}

NBSMT_DC_AVX2 inline __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

NBSMT_DC_AVX2 inline void zero_positions(float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) _mm256_store_ps(dst + i * 8, _mm256_setzero_ps());
}

// The block's channels quantized (docs/spec.md §2, as dc_quantize_avx2) into
// interleaved phase planes: 8 input elements of each of the 8 channels per
// step, transposed so that each element's 8 channels are one vector, which goes
// to its phase plane; padding, margins and slack are zero.
NBSMT_DC_AVX2 void dw_fill(const DwBlock& b) {
  const int64_t s0 = b.s[0], s1 = b.s[1], s2 = b.s[2];
  const int64_t q0 = b.q[0], q1 = b.q[1], q2 = b.q[2];
  const int64_t in1 = b.in[1], in2 = b.in[2], in_size = b.in[0] * b.in[1] * b.in[2];
  const __m256 sv = _mm256_set1_ps(b.x_scale), zero = _mm256_setzero_ps();
  const __m256 lo = _mm256_set1_ps(b.sgn ? -127.0f : 0.0f);
  const __m256 hi = _mm256_set1_ps(b.sgn ? 127.0f : 255.0f);
  for (int64_t b0 = 0; b0 < s0; ++b0) {
    for (int64_t b1 = 0; b1 < s1; ++b1) {
      const int64_t ph01 = (b0 * s1 + b1) * s2;
      bool any = false;
      for (int64_t b2 = 0; b2 < s2; ++b2) any |= b.used[ph01 + b2] != 0;
      if (!any) continue;
      for (int64_t i0 = 0; i0 < q0; ++i0) {
        const int64_t j0 = i0 * s0 + b0 - b.pad_begin[0];
        for (int64_t i1 = 0; i1 < q1; ++i1) {
          const int64_t j1 = i1 * s1 + b1 - b.pad_begin[1];
          const int64_t r = (i0 * q1 + i1) * q2;
          const bool valid = j0 >= 0 && j0 < b.in[0] && j1 >= 0 && j1 < in1;
          for (int64_t b2 = 0; b2 < s2; ++b2) {
            if (!b.used[ph01 + b2]) continue;
            float* plane = b.buf + ((ph01 + b2) * b.size + r) * 8;
            if (!valid) {
              zero_positions(plane, q2);
              continue;
            }
            // Positions [lo, hi) hold input elements b2 - pad + i * s2.
            const int64_t first = b2 - b.pad_begin[2];
            const int64_t l = std::min(first >= 0 ? 0 : (-first + s2 - 1) / s2, q2);
            const int64_t h = std::clamp<int64_t>(in2 - 1 - first < 0 ? 0 : (in2 - 1 - first) / s2 + 1, l, q2);
            zero_positions(plane, l);
            zero_positions(plane + h * 8, q2 - h);
          }
          if (!valid) continue;
          const float* src = b.x + (j0 * in1 + j1) * in2;
          // Reads past the row's end that stay in the channel are plain loads
          // (the extra lanes are not stored); masked only at the channel's end.
          const int64_t row_start = (j0 * in1 + j1) * in2;
          for (int64_t e = 0; e < in2; e += 8) {
            const int64_t n = std::min<int64_t>(8, in2 - e);
            const bool full = row_start + e + 8 <= in_size;
            const __m256i mask = first_lanes(n);
            __m256 t[8], u[8];
            for (int l = 0; l < 8; ++l) {
              if (l >= b.nc) {
                t[l] = zero;
                continue;
              }
              const float* p = src + l * in_size + e;
              __m256 q = _mm256_div_ps(full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask), sv);
              q = _mm256_and_ps(q, _mm256_cmp_ps(q, q, _CMP_ORD_Q));  // NaN -> 0
              q = _mm256_min_ps(_mm256_max_ps(q, lo), hi);
              t[l] = _mm256_round_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            }
            transpose8x8_ps(t, u);
            if (s2 == 1) {  // element e + k at position e + k + pad of the one phase
              const int64_t i0 = e + b.pad_begin[2];
              float* dst = b.buf + (ph01 * b.size + r + i0) * 8;
              const int64_t nk = std::min(n, q2 - i0);
              // A constant trip count (a variable one became a slow `rep movs` memcpy).
              for (int k = 0; k < 8; ++k) {
                if (k < nk) _mm256_store_ps(dst + k * 8, u[k]);
              }
              continue;
            }
            // Element E = e + k + pad goes to phase E % s2, position E / s2.
            int64_t b2 = (e + b.pad_begin[2]) % s2, i = (e + b.pad_begin[2]) / s2;
            for (int k = 0; k < 8; ++k) {
              if (k < n && i < q2 && b.used[ph01 + b2]) {
                _mm256_store_ps(b.buf + ((ph01 + b2) * b.size + r + i) * 8, u[k]);
              }
              if (++b2 == s2) {
                b2 = 0;
                ++i;
              }
            }
          }
        }
      }
      for (int64_t b2 = 0; b2 < s2; ++b2) {
        if (!b.used[ph01 + b2]) continue;
        const int64_t used = q0 * q1 * q2;
        zero_positions(b.buf + ((ph01 + b2) * b.size + used) * 8, b.size - used);
      }
    }
  }
}

}  // namespace

NBSMT_DC_AVX2 void dc_depthwise8_avx2(const DwBlock& b) {
  dw_fill(b);
  const int64_t out1 = b.out[1], out2 = b.out[2];
  const int64_t out_size = b.out[0] * out1 * out2;
  alignas(32) float sc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, bi[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int l = 0; l < b.nc; ++l) {
    sc[l] = b.scale[l];
    if (b.bias != nullptr) bi[l] = b.bias[l];
  }
  const __m256 scale = _mm256_load_ps(sc), bias = _mm256_load_ps(bi);
  int64_t off[kMaxDwKernel];
  for (int64_t o0 = 0; o0 < b.out[0]; ++o0) {
    for (int64_t o1 = 0; o1 < out1; ++o1) {
      const int64_t rowbase = (o0 * b.q[1] + o1) * b.q[2];
      float* yrow = b.y + (o0 * out1 + o1) * out2;
      // Kernel positions whose input row lies in the padding add only zeros: skipped.
      int64_t ks = 0;
      for (int64_t k = 0; k < b.ks; ++k) {
        const int64_t j0 = o0 * b.stride[0] - b.pad_begin[0] + b.kdil[k * 2];
        const int64_t j1 = o1 * b.stride[1] - b.pad_begin[1] + b.kdil[k * 2 + 1];
        if (j0 >= 0 && j0 < b.in[0] && j1 >= 0 && j1 < b.in[1]) off[ks++] = k;
      }
      const int64_t row_start = (o0 * out1 + o1) * out2;
      for (int64_t o2 = 0; o2 < out2; o2 += 8) {
        // 8 positions (those past the row's end read other plane data or the
        // slack and are not stored); one vector of 8 channels each.
        __m256 acc[8];
        for (int v = 0; v < 8; ++v) acc[v] = _mm256_setzero_ps();
        const float* base = b.buf + (rowbase + o2) * 8;
        for (int64_t i = 0; i < ks; ++i) {
          const int64_t k = off[i];
          const __m256 wv = _mm256_loadu_ps(b.w + k * 8);
          const float* p = base + b.off[k] * 8;
          for (int v = 0; v < 8; ++v) acc[v] = _mm256_fmadd_ps(_mm256_load_ps(p + v * 8), wv, acc[v]);
        }
        for (int v = 0; v < 8; ++v) {
          acc[v] = _mm256_mul_ps(scale, acc[v]);
          if (b.bias != nullptr) acc[v] = _mm256_add_ps(acc[v], bias);
        }
        __m256 u[8];
        transpose8x8_ps(acc, u);  // u[l]: channel l at the 8 positions
        const int64_t n = std::min<int64_t>(8, out2 - o2);
        const __m256i mask = first_lanes(n);
        // Stores past a row's end that stay in the channel are overwritten by
        // the next rows (processed later); masked only at the channel's end.
        const bool full = row_start + o2 + 8 <= out_size;
        for (int l = 0; l < b.nc; ++l) {
          float* dst = yrow + l * out_size + o2;
          if (full) {
            _mm256_storeu_ps(dst, u[l]);
          } else {
            _mm256_maskstore_ps(dst, mask, u[l]);
          }
        }
      }
    }
  }
}

NBSMT_DC_AVX2 void dc_split_avx2(const float* src, int64_t n, int64_t stride, float* out) {
  int64_t i = 0;
  if (stride == 2) {  // the even elements of 16 floats per step
    for (; i + 8 <= n; i += 8) {
      const __m256 a = _mm256_loadu_ps(src + 2 * i), b = _mm256_loadu_ps(src + 2 * i + 8);
      const __m256 even = _mm256_shuffle_ps(a, b, 0x88);  // a0 a2 b0 b2 | a4 a6 b4 b6
      _mm256_storeu_ps(out + i, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(even), 0xD8)));
    }
  }
  if (i < n) dc_split_generic(src + i * stride, n - i, stride, out + i);
}

}  // namespace detail
}  // namespace nbsmt

#endif  // x86-64
