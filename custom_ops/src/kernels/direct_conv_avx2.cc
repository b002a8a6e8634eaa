// AVX2 pieces of the direct convolution (nbsmt/direct_conv.h): 8 output
// positions per vector, up to 4 vectors (from any rows of the channel) per pass
// over the weight program, float32 FMA on integer values (exact, see the header),
// the output scaling fused into the store. Also used on AVX-512 machines.
#include "direct_conv_impl.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>

#define NBSMT_DC_AVX2 __attribute__((target("avx2,fma")))

namespace nbsmt {
namespace detail {

namespace {

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
  Block blocks[4];
  int nb = 0;
  for (int64_t o0 = 0; o0 < ch.out0; ++o0) {
    for (int64_t o1 = 0; o1 < ch.out1; ++o1) {
      const int64_t rowbase = (o0 * ch.q1 + o1) * ch.q2;
      float* yrow = ch.y + (o0 * ch.out1 + o1) * ch.out2;
      for (int64_t o2 = 0; o2 < ch.out2; o2 += 8) {
        blocks[nb++] = Block{rowbase + o2, yrow + o2,
                             static_cast<int>(std::min<int64_t>(8, ch.out2 - o2))};
        if (nb == 4) {
          run_block<4>(ch, blocks);
          nb = 0;
        }
      }
    }
  }
  switch (nb) {
    case 1: run_block<1>(ch, blocks); break;
    case 2: run_block<2>(ch, blocks); break;
    case 3: run_block<3>(ch, blocks); break;
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

}  // namespace detail
}  // namespace nbsmt

#endif  // x86-64
