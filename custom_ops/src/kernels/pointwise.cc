// Pointwise convolution on NCHW (nbsmt/pointwise.h): weight pairs, the parallel
// driver, and the AVX2 kernels (a portable version of each piece keeps the file
// building everywhere; only the AVX2 backend selects this path).
#include "nbsmt/pointwise.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "engine.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define NBSMT_PW_X86 1
#define NBSMT_PW_AVX2 __attribute__((target("avx2,fma,bmi,bmi2,popcnt")))
#endif

namespace nbsmt {

namespace {

constexpr int kMr = 6;   // output channels per tile (broadcast weights)
constexpr int kNr = 16;  // output positions per tile (two vectors of 8)
// Bound of the quantized-input buffer (bytes): images are processed in chunks.
constexpr int64_t kChunkBudgetBytes = int64_t{16} << 20;
// Positions per task are chosen so that a task's input pairs stay about this size (L1).
constexpr int64_t kTaskInputBytes = int64_t{16} << 10;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline uint32_t pair_dword(int lo, int hi) {
  return static_cast<uint32_t>(static_cast<uint16_t>(lo)) |
         static_cast<uint32_t>(static_cast<uint16_t>(hi)) << 16;
}

// w-side value of the T = 2 correction term (engine.h, dense_w_value).
inline int correction_weight(Reduce reduce, int w, int partner) {
  if (partner == 0) return 0;
  return reduce == Reduce::kActivations ? w : reduce_signed(w) - w;
}

}  // namespace

struct PointwiseWeights {
  SmtConfig cfg;
  int64_t M = 0, C = 0;
  int64_t Mpad = 0;    // M rounded up to kMr (zero weights past M)
  int64_t pairs = 0;   // slot pairs of one term
  int nterms = 1;      // 2 for T = 2 (the correction term)
  std::vector<int64_t> pair_channel;  // [2 * pairs]: channel of each slot, -1 if idle
  // [Mpad / kMr][nterms * pairs][kMr] int16 pairs: a tile's weights are contiguous.
  std::vector<uint32_t> w;
  uint32_t& at(int64_t m, int64_t i) { return w[((m / kMr) * nterms * pairs + i) * kMr + m % kMr]; }
};

bool pointwise_conv_preferred(const SmtConfig& cfg) {
#if defined(NBSMT_PW_X86)
  return cfg.threads <= 2 && detail::selected_backend().isa == detail::Isa::kAvx2;
#else
  (void)cfg;
  return false;
#endif
}

std::shared_ptr<const PointwiseWeights> prepare_pointwise_conv(const SmtConfig& cfg,
                                                               const PackLayout& layout,
                                                               const int8_t* w, int64_t M) {
  auto pw = std::make_shared<PointwiseWeights>();
  const int64_t C = layout.length, L = layout.row_length();
  pw->cfg = cfg;
  pw->M = M;
  pw->C = C;
  pw->Mpad = ceil_div(M, kMr) * kMr;
  pw->pairs = ceil_div(L, 2);
  pw->nterms = cfg.threads == 2 ? 2 : 1;
  pw->pair_channel.assign(static_cast<size_t>(2 * pw->pairs), -1);
  for (int64_t c = 0; c < C; ++c) pw->pair_channel[layout.dest[c]] = c;
  pw->w.assign(static_cast<size_t>(pw->nterms * pw->pairs * pw->Mpad), 0u);
  std::vector<int8_t> packed(static_cast<size_t>(2 * pw->pairs), 0);
  for (int64_t m = 0; m < M; ++m) {
    if (!pack_weights(layout, w + m * C, 1, C, 1, packed.data())) return nullptr;
    for (int64_t i = 0; i < pw->pairs; ++i) {
      const int w0 = packed[2 * i], w1 = packed[2 * i + 1];
      pw->at(m, i) = pair_dword(w0, w1);
      if (pw->nterms == 2) {
        pw->at(m, pw->pairs + i) =
            pair_dword(correction_weight(cfg.reduce, w0, w1), correction_weight(cfg.reduce, w1, w0));
      }
    }
  }
  return pw;
}

namespace {

// The quantized input of a chunk of images: per image, P16 / kNr tiles of kNr
// positions (P16 = P rounded up to kNr), each [nterms * pairs][kNr] int16 pairs
// (a tile's whole reduction is contiguous); positions past P are 0.
struct Job {
  const PointwiseWeights* w;
  int64_t P, P16, tiles;  // tiles = P16 / kNr
  const float* x;  // first image of the chunk
  float x_scale;
  uint32_t* xq;
  int64_t tiles_per_task;                    // quantization tasks: images x tile ranges
  int64_t pblock, pblocks, mchunk, mchunks;  // compute tasks: images x pblocks x mchunks
  const float* out_scale;
  const float* bias;
  float* y;  // first image of the chunk
  int64_t npairs() const { return w->nterms * w->pairs; }
  uint32_t* tile(int64_t img, int64_t t) const { return xq + (img * tiles + t) * npairs() * kNr; }
};

// ---- portable pieces -----------------------------------------------------------

// Term 0 of pair i for the positions of tiles [t0, t1) of one image.
void quantize_pairs_generic(const Job& j, int64_t img, int64_t i, int64_t t0, int64_t t1) {
  const PointwiseWeights& w = *j.w;
  const int64_t cl = w.pair_channel[2 * i], ch = w.pair_channel[2 * i + 1];
  const float* xi = j.x + img * w.C * j.P;
  const bool sgn = w.cfg.act_signed;
  for (int64_t t = t0; t < t1; ++t) {
    uint32_t* dst = j.tile(img, t) + i * kNr;
    for (int64_t l = 0; l < kNr; ++l) {
      const int64_t p = t * kNr + l;
      const int lo = cl >= 0 && p < j.P ? quantize_activation(xi[cl * j.P + p], j.x_scale, sgn) : 0;
      const int hi = ch >= 0 && p < j.P ? quantize_activation(xi[ch * j.P + p], j.x_scale, sgn) : 0;
      dst[l] = pair_dword(lo, hi);
    }
  }
}

inline int32_t pair_dot(uint32_t a, uint32_t b) {
  return static_cast<int16_t>(a & 0xffff) * static_cast<int16_t>(b & 0xffff) +
         static_cast<int16_t>(a >> 16) * static_cast<int16_t>(b >> 16);
}

// One tile: x [npairs][kNr], w [npairs][kMr]; outputs of channels r < mvalid and
// positions p < pvalid at y + r * ldy + p.
void tile_generic(const uint32_t* x, int64_t npairs, const uint32_t* w, const float* scale,
                  const float* bias, int64_t mvalid, float* y, int64_t ldy, int64_t pvalid) {
  for (int64_t r = 0; r < mvalid; ++r) {
    for (int64_t p = 0; p < pvalid; ++p) {
      uint32_t acc = 0;  // wrapping int32, like the vector kernels
      for (int64_t i = 0; i < npairs; ++i) {
        acc += static_cast<uint32_t>(pair_dot(x[i * kNr + p], w[i * kMr + r]));
      }
      float v = scale[r] * static_cast<float>(static_cast<int32_t>(acc));
      if (bias != nullptr) v = v + bias[r];
      y[r * ldy + p] = v;
    }
  }
}

// ---- AVX2 ----------------------------------------------------------------------

#if defined(NBSMT_PW_X86)

NBSMT_PW_AVX2 inline __m256i quantize8(const float* p, __m256 s, __m256 lo, __m256 hi) {
  __m256 q = _mm256_div_ps(_mm256_loadu_ps(p), s);        // IEEE division, as the reference
  q = _mm256_and_ps(q, _mm256_cmp_ps(q, q, _CMP_ORD_Q));  // NaN -> 0
  // Clipped, then rounded half to even by vcvtps2dq (default rounding mode).
  return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(q, lo), hi));
}

NBSMT_PW_AVX2 void quantize_pairs_avx2(const Job& j, int64_t img, int64_t i, int64_t t0,
                                       int64_t t1) {
  const PointwiseWeights& w = *j.w;
  const int64_t cl = w.pair_channel[2 * i], ch = w.pair_channel[2 * i + 1];
  const float* xi = j.x + img * w.C * j.P;
  const float* xl = cl >= 0 ? xi + cl * j.P : nullptr;
  const float* xh = ch >= 0 ? xi + ch * j.P : nullptr;
  const bool sgn = w.cfg.act_signed;
  const __m256 s = _mm256_set1_ps(j.x_scale);
  const __m256 lo = _mm256_set1_ps(sgn ? -127.0f : 0.0f), hi = _mm256_set1_ps(sgn ? 127.0f : 255.0f);
  const __m256i mask16 = _mm256_set1_epi32(0xffff), zero = _mm256_setzero_si256();
  alignas(32) float tl[8], th[8];
  for (int64_t t = t0; t < t1; ++t) {
    uint32_t* dst = j.tile(img, t) + i * kNr;
    for (int64_t h = 0; h < kNr; h += 8) {
      const int64_t p = t * kNr + h;
      __m256i d = zero;
      if (p < j.P) {
        const float* pl = xl != nullptr ? xl + p : nullptr;
        const float* ph = xh != nullptr ? xh + p : nullptr;
        if (p + 8 > j.P) {  // tail: the remaining positions, zeros after them
          const size_t n = static_cast<size_t>(j.P - p);
          std::fill(tl, tl + 8, 0.0f);
          std::fill(th, th + 8, 0.0f);
          if (pl != nullptr) std::memcpy(tl, pl, n * sizeof(float));
          if (ph != nullptr) std::memcpy(th, ph, n * sizeof(float));
          pl = pl != nullptr ? tl : nullptr;
          ph = ph != nullptr ? th : nullptr;
        }
        const __m256i vl = pl != nullptr ? quantize8(pl, s, lo, hi) : zero;
        const __m256i vh = ph != nullptr ? quantize8(ph, s, lo, hi) : zero;
        d = _mm256_or_si256(_mm256_and_si256(vl, mask16), _mm256_slli_epi32(vh, 16));
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + h), d);
    }
  }
}

// float32(scale * float32(acc)) (+ bias), each rounded (no FMA), for n of 8 positions.
NBSMT_PW_AVX2 inline void store8(__m256i acc, float scale, const float* bias, float* dst,
                                 int64_t n) {
  if (n <= 0) return;
  __m256 f = _mm256_mul_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(acc));
  if (bias != nullptr) f = _mm256_add_ps(f, _mm256_set1_ps(*bias));
  if (n >= 8) {
    _mm256_storeu_ps(dst, f);
    return;
  }
  alignas(32) float tail[8];
  _mm256_store_ps(tail, f);
  std::memcpy(dst, tail, static_cast<size_t>(n) * sizeof(float));
}

// kMr channels x kNr positions: per pair, two vectors of 8 positions' x pairs
// and one broadcast weight pair per channel; vpmaddwd gives the pair sums.
NBSMT_PW_AVX2 void tile_avx2(const uint32_t* x, int64_t npairs, const uint32_t* w,
                             const float* scale, const float* bias, int64_t mvalid, float* y,
                             int64_t ldy, int64_t pvalid) {
  static_assert(kMr == 6, "the accumulators below are written out for 6 channels");
  // Named accumulators (not arrays): 12 registers, no spills.
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256i c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t i = 0; i < npairs; ++i) {
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i * kNr));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i * kNr + 8));
    const int32_t* wi = reinterpret_cast<const int32_t*>(w + i * kMr);
    __m256i wb = _mm256_set1_epi32(wi[0]);
    c00 = _mm256_add_epi32(c00, _mm256_madd_epi16(x0, wb));
    c01 = _mm256_add_epi32(c01, _mm256_madd_epi16(x1, wb));
    wb = _mm256_set1_epi32(wi[1]);
    c10 = _mm256_add_epi32(c10, _mm256_madd_epi16(x0, wb));
    c11 = _mm256_add_epi32(c11, _mm256_madd_epi16(x1, wb));
    wb = _mm256_set1_epi32(wi[2]);
    c20 = _mm256_add_epi32(c20, _mm256_madd_epi16(x0, wb));
    c21 = _mm256_add_epi32(c21, _mm256_madd_epi16(x1, wb));
    wb = _mm256_set1_epi32(wi[3]);
    c30 = _mm256_add_epi32(c30, _mm256_madd_epi16(x0, wb));
    c31 = _mm256_add_epi32(c31, _mm256_madd_epi16(x1, wb));
    wb = _mm256_set1_epi32(wi[4]);
    c40 = _mm256_add_epi32(c40, _mm256_madd_epi16(x0, wb));
    c41 = _mm256_add_epi32(c41, _mm256_madd_epi16(x1, wb));
    wb = _mm256_set1_epi32(wi[5]);
    c50 = _mm256_add_epi32(c50, _mm256_madd_epi16(x0, wb));
    c51 = _mm256_add_epi32(c51, _mm256_madd_epi16(x1, wb));
  }
  const __m256i acc[kMr][2] = {{c00, c01}, {c10, c11}, {c20, c21},
                               {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < kMr && r < mvalid; ++r) {
    const float* b = bias != nullptr ? bias + r : nullptr;
    store8(acc[r][0], scale[r], b, y + r * ldy, pvalid);
    store8(acc[r][1], scale[r], b, y + r * ldy + 8, pvalid - 8);
  }
}

#endif  // NBSMT_PW_X86

using QuantizeFn = void (*)(const Job&, int64_t, int64_t, int64_t, int64_t);
using TileFn = void (*)(const uint32_t*, int64_t, const uint32_t*, const float*, const float*,
                        int64_t, float*, int64_t, int64_t);

struct Kernels {
  QuantizeFn quantize;
  TileFn tile;
};

Kernels pick_kernels() {
#if defined(NBSMT_PW_X86)
  if (detail::selected_backend().isa != detail::Isa::kGeneric) {
    return {quantize_pairs_avx2, tile_avx2};
  }
#endif
  return {quantize_pairs_generic, tile_generic};
}

struct Run {
  Job job;
  Kernels k;
};

void quantize_task(const Run& run, int64_t task) {
  const Job& j = run.job;
  const PointwiseWeights& w = *j.w;
  const int64_t per_image = ceil_div(j.tiles, j.tiles_per_task);
  const int64_t img = task / per_image;
  const int64_t t0 = (task % per_image) * j.tiles_per_task;
  const int64_t t1 = std::min(j.tiles, t0 + j.tiles_per_task);
  for (int64_t i = 0; i < w.pairs; ++i) run.k.quantize(j, img, i, t0, t1);
  if (w.nterms == 2) {
    // The correction operands of each pair (the two threads of a step): term 1
    // follows term 0 in each tile.
    for (int64_t t = t0; t < t1; ++t) {
      const uint32_t* term0 = j.tile(img, t);
      correction_operands(w.cfg, reinterpret_cast<const int16_t*>(term0), 2 * w.pairs * kNr,
                          reinterpret_cast<int16_t*>(j.tile(img, t) + w.pairs * kNr));
    }
  }
}

void compute_task(const Run& run, int64_t task) {
  const Job& j = run.job;
  const PointwiseWeights& w = *j.w;
  const int64_t mc = task % j.mchunks, pb = (task / j.mchunks) % j.pblocks;
  const int64_t img = task / (j.mchunks * j.pblocks);
  const int64_t m0 = mc * j.mchunk, m1 = std::min(w.Mpad, m0 + j.mchunk);
  const int64_t p0 = pb * j.pblock, p1 = std::min(j.P, p0 + j.pblock);
  const int64_t npairs = j.npairs();
  float* yi = j.y + img * w.M * j.P;
  for (int64_t m = m0; m < m1; m += kMr) {
    const uint32_t* wt = w.w.data() + (m / kMr) * npairs * kMr;
    for (int64_t p = p0; p < p1; p += kNr) {
      run.k.tile(j.tile(img, p / kNr), npairs, wt, j.out_scale + m,
                 j.bias != nullptr ? j.bias + m : nullptr, std::min<int64_t>(kMr, w.M - m),
                 yi + m * j.P + p, j.P, std::min<int64_t>(kNr, j.P - p));
    }
  }
}

}  // namespace

void pointwise_conv(const PointwiseWeights& w, int64_t N, int64_t P, const float* x,
                    float x_scale, const float* out_scale, const float* bias, float* y,
                    const Parallel& parallel) {
  if (N <= 0 || P <= 0 || w.M <= 0) return;
  Run run{};
  run.k = pick_kernels();
  Job& j = run.job;
  j.w = &w;
  j.P = P;
  j.P16 = ceil_div(P, kNr) * kNr;
  j.x_scale = x_scale;
  j.out_scale = out_scale;
  j.bias = bias;
  const int64_t image_words = w.nterms * w.pairs * j.P16;
  const int64_t chunk = std::clamp<int64_t>(
      kChunkBudgetBytes / std::max<int64_t>(1, image_words * 4), 1, N);
  const std::unique_ptr<uint32_t[]> xq(new uint32_t[static_cast<size_t>(chunk * image_words)]);
  j.xq = xq.get();
  j.tiles = j.P16 / kNr;
  // Quantization tasks of at least ~8192 input elements.
  j.tiles_per_task = std::max<int64_t>(1, 8192 / (w.C * kNr));
  // Compute tasks: positions in blocks whose input pairs stay in L1, output
  // channels split further when there are few blocks (small late layers).
  const int64_t npairs = w.nterms * w.pairs;
  j.pblock = std::clamp<int64_t>(kTaskInputBytes / (npairs * 4) / kNr * kNr, kNr, 16 * kNr);
  j.pblocks = ceil_div(P, j.pblock);
  const int64_t mtiles = w.Mpad / kMr;
  const int64_t split = std::min(mtiles, std::max<int64_t>(1, ceil_div(16, chunk * j.pblocks)));
  j.mchunk = ceil_div(mtiles, split) * kMr;
  j.mchunks = ceil_div(w.Mpad, j.mchunk);
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t images = std::min(chunk, N - n0);
    j.x = x + n0 * w.C * P;
    j.y = y + n0 * w.M * P;
    parallel(
        [](void* data, size_t t) { quantize_task(*static_cast<Run*>(data), static_cast<int64_t>(t)); },
        static_cast<size_t>(images * ceil_div(j.tiles, j.tiles_per_task)), &run);
    parallel(
        [](void* data, size_t t) { compute_task(*static_cast<Run*>(data), static_cast<int64_t>(t)); },
        static_cast<size_t>(images * j.pblocks * j.mchunks), &run);
  }
}

}  // namespace nbsmt
