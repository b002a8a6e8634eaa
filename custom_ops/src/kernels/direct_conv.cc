// Direct convolution for depthwise / narrow grouped Convs and small reductions
// (nbsmt/direct_conv.h): weight programs, stride-phase planes, the parallel
// driver and the portable kernel.
#include "nbsmt/direct_conv.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <memory>
#include <vector>

#include "direct_conv_impl.h"
#include "engine.h"

namespace nbsmt {

struct DirectConvWeights {
  struct Term {
    int32_t c_local, kpos;
    float w, rw;
  };
  SmtConfig cfg;
  int64_t M = 0, groups = 1, Cg = 0, KS = 0;
  // Per output channel m: exact terms [exact_begin[m], exact_begin[m + 1]) of
  // `exact`; collision steps [step_begin[m], step_begin[m + 1]) of `steps`, whose
  // terms index `cterms`.
  std::vector<Term> exact, cterms;
  std::vector<detail::DcStep> steps;
  std::vector<int64_t> exact_begin, step_begin;
};

bool direct_conv_preferred(int64_t groups, int64_t channels_per_group, int64_t outputs_per_group,
                           int64_t kernel_size) {
  const int64_t K = channels_per_group * kernel_size;
  if (K < 1 || K > kDirectMaxK) return false;
  return (groups > 1 && outputs_per_group < 16) || K <= kDirectSmallK;
}

std::shared_ptr<const DirectConvWeights> prepare_direct_conv(const SmtConfig& cfg,
                                                             const PackLayout& layout,
                                                             const int8_t* w, int64_t M,
                                                             int64_t groups,
                                                             int64_t channels_per_group) {
  auto pw = std::make_shared<DirectConvWeights>();
  const int T = cfg.threads;
  const int64_t K = layout.length;
  pw->cfg = cfg;
  pw->M = M;
  pw->groups = groups;
  pw->Cg = channels_per_group;
  pw->KS = channels_per_group > 0 ? K / channels_per_group : 0;
  // slot -> natural element (or -1 for an idle slot)
  std::vector<int64_t> slot_k(static_cast<size_t>(layout.row_length()), -1);
  for (int64_t k = 0; k < K; ++k) slot_k[layout.dest[k]] = k;
  pw->exact_begin.assign(1, 0);
  pw->step_begin.assign(1, 0);
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* wr = w + m * K;
    for (int64_t k = 0; k < K; ++k) {
      if (wr[k] == -128) return nullptr;
    }
    for (int64_t s = 0; s < layout.steps; ++s) {
      int64_t ks[4];
      int n = 0;
      for (int t = 0; t < T; ++t) {
        const int64_t k = slot_k[s * T + t];
        if (k >= 0 && wr[k] != 0) ks[n++] = k;
      }
      if (n == 0) continue;
      auto term = [&](int64_t k) {
        return DirectConvWeights::Term{static_cast<int32_t>(k / pw->KS),
                                       static_cast<int32_t>(k % pw->KS),
                                       static_cast<float>(wr[k]),
                                       static_cast<float>(reduce_signed(wr[k]))};
      };
      if (n == 1) {
        pw->exact.push_back(term(ks[0]));
      } else {
        pw->steps.push_back(
            detail::DcStep{static_cast<int32_t>(pw->cterms.size()), static_cast<int32_t>(n)});
        for (int i = 0; i < n; ++i) pw->cterms.push_back(term(ks[i]));
      }
    }
    pw->exact_begin.push_back(static_cast<int64_t>(pw->exact.size()));
    pw->step_begin.push_back(static_cast<int64_t>(pw->steps.size()));
  }
  return pw;
}

bool direct_conv_has_collision_steps(const DirectConvWeights& w) { return !w.steps.empty(); }

namespace detail {

namespace {

// Round half to even of |q| <= 255 (default rounding mode), as pack.cc does.
inline float round_small(float q) {
  const float magic = 12582912.0f;
  return (q + magic) - magic;
}

inline float reduce_float(float v, bool sgn) {
  if (sgn) {
    if (v >= -8.0f && v <= 7.0f) return v;
    float q = round_small(v * 0.0625f);
    q = q < -8.0f ? -8.0f : (q > 7.0f ? 7.0f : q);
    return q * 16.0f;
  }
  if (v < 16.0f) return v;
  float q = round_small(v * 0.0625f);
  q = q > 15.0f ? 15.0f : q;
  return q * 16.0f;
}

}  // namespace

void dc_quantize_generic(const float* x, int64_t n, int64_t stride, float scale, bool sgn,
                         float* out) {
  const float lo = sgn ? -127.0f : 0.0f, hi = sgn ? 127.0f : 255.0f;
  for (int64_t i = 0; i < n; ++i) {
    float q = x[i * stride] / scale;
    q = q == q ? q : 0.0f;
    q = q < lo ? lo : q;
    q = q > hi ? hi : q;
    out[i] = round_small(q);
  }
}

void dc_split_generic(const float* src, int64_t n, int64_t stride, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = src[i * stride];
}

void dc_reduce_generic(const float* q, int64_t n, bool sgn, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = reduce_float(q[i], sgn);
}

void dc_channel_generic(const DcChannel& ch) {
  constexpr int L = 8;
  for (int64_t o0 = 0; o0 < ch.out0; ++o0) {
    for (int64_t o1 = 0; o1 < ch.out1; ++o1) {
      const int64_t rowbase = (o0 * ch.q1 + o1) * ch.q2;
      float* yrow = ch.y + (o0 * ch.out1 + o1) * ch.out2;
      for (int64_t o2 = 0; o2 < ch.out2; o2 += L) {
        const int n = static_cast<int>(std::min<int64_t>(L, ch.out2 - o2));
        const float* base = ch.planes + rowbase + o2;
        float acc[L] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t i = 0; i < ch.nexact; ++i) {
          const DcTerm& e = ch.exact[i];
          for (int l = 0; l < n; ++l) acc[l] += base[e.off + l] * e.w;
        }
        for (int64_t s = 0; s < ch.nsteps; ++s) {
          const DcTerm* t = ch.cterms + ch.steps[s].first;
          const int count = ch.steps[s].count;
          for (int l = 0; l < n; ++l) {
            int active = 0;
            for (int j = 0; j < count; ++j) active += base[t[j].off + l] != 0.0f;
            const bool fx = ch.reduce_activations ? active >= 2 : active >= 3;
            const bool fw = ch.reduce_activations ? active >= 3 : active >= 2;
            for (int j = 0; j < count; ++j) {
              const float xv = fx ? base[t[j].off + ch.reduced_delta + l] : base[t[j].off + l];
              acc[l] += xv * (fw ? t[j].rw : t[j].w);
            }
          }
        }
        for (int l = 0; l < n; ++l) {
          float v = ch.scale * acc[l];
          if (ch.bias != nullptr) v = v + *ch.bias;
          yrow[o2 + l] = v;
        }
      }
    }
  }
}

}  // namespace detail

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int64_t kChunkBudgetBytes = int64_t{16} << 20;
constexpr int64_t kSlack = 16;  // floats after each plane: vector reads past a row's end

struct Planes {
  int64_t q[3];       // phase-plane extent per axis
  int64_t s[3];       // strides (phases per axis)
  int64_t nph = 1;    // phases per channel
  int64_t size = 0;   // floats per plane, slack included (a multiple of 8)
  std::vector<char> used;           // [nph]
  std::vector<int64_t> kph, koff;   // per kernel position: phase, offset in the plane
};

Planes make_planes(const ConvGeometry& geo) {
  Planes p;
  for (int d = 0; d < 3; ++d) {
    p.s[d] = geo.stride[d];
    p.q[d] = geo.out[d] + (geo.kernel[d] - 1) * geo.dilation[d] / geo.stride[d];
  }
  p.nph = p.s[0] * p.s[1] * p.s[2];
  p.size = ceil_div(p.q[0] * p.q[1] * p.q[2] + kSlack, 8) * 8;
  p.used.assign(static_cast<size_t>(p.nph), 0);
  const int64_t KS = geo.kernel_size();
  p.kph.resize(static_cast<size_t>(KS));
  p.koff.resize(static_cast<size_t>(KS));
  int64_t kpos = 0;
  for (int64_t k0 = 0; k0 < geo.kernel[0]; ++k0) {
    for (int64_t k1 = 0; k1 < geo.kernel[1]; ++k1) {
      for (int64_t k2 = 0; k2 < geo.kernel[2]; ++k2, ++kpos) {
        const int64_t e[3] = {k0 * geo.dilation[0], k1 * geo.dilation[1], k2 * geo.dilation[2]};
        const int64_t ph = ((e[0] % p.s[0]) * p.s[1] + e[1] % p.s[1]) * p.s[2] + e[2] % p.s[2];
        p.kph[kpos] = ph;
        p.koff[kpos] = ((e[0] / p.s[0]) * p.q[1] + e[1] / p.s[1]) * p.q[2] + e[2] / p.s[2];
        p.used[ph] = 1;
      }
    }
  }
  return p;
}

using QuantizeFn = void (*)(const float*, int64_t, int64_t, float, bool, float*);
using ReduceFn = void (*)(const float*, int64_t, bool, float*);
using ChannelFn = void (*)(const detail::DcChannel&);
using SplitFn = void (*)(const float*, int64_t, int64_t, float*);
using Depthwise8Fn = void (*)(const detail::DwBlock&);

struct Isa {
  QuantizeFn quantize;
  ReduceFn reduce;
  ChannelFn channel;
  SplitFn split;
  Depthwise8Fn depthwise8;  // null: depthwise layers take the per-channel kernel too
};

Isa pick_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  // AVX-512 machines run the AVX2 kernel (it is not the bottleneck there).
  if (detail::selected_backend().isa != detail::Isa::kGeneric) {
    return {detail::dc_quantize_avx2, detail::dc_reduce_avx2, detail::dc_channel_avx2,
            detail::dc_split_avx2, detail::dc_depthwise8_avx2};
  }
#endif
  return {detail::dc_quantize_generic, detail::dc_reduce_generic, detail::dc_channel_generic,
          detail::dc_split_generic, nullptr};
}

// Scratch of one task: the quantized phase planes of one group of one image
// (and their R(x) copies), plus one quantized input row. Kept per worker thread
// between tasks so that no task allocates; a large one is released at the end of
// its task (see kKeepScratchFloats).
struct Scratch {
  // 64-byte aligned floats (the depthwise kernel's vectors are aligned loads).
  struct Floats {
    float* data = nullptr;
    size_t size = 0;
    Floats() = default;
    Floats(const Floats&) = delete;
    Floats& operator=(const Floats&) = delete;
    ~Floats() { std::free(data); }
    float* get(size_t n) {
      if (n > size) {
        std::free(data);
        const size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
        data = static_cast<float*>(std::aligned_alloc(64, bytes));
        if (data == nullptr) throw std::bad_alloc();
        size = bytes / sizeof(float);
      }
      return data;
    }
    void release() {
      std::free(data);
      data = nullptr;
      size = 0;
    }
  };
  Floats planes, row;
};
constexpr size_t kKeepScratchFloats = size_t{1} << 20;

// Quantizes one channel x[in] into its phase planes (plane ph at out + ph * p.size;
// zero outside the image, slack included). Every input element is quantized once,
// straight into its plane row when the innermost stride is 1, else into `row` and
// then split into the stride phases of the innermost axis.
void fill_channel_planes(const ConvGeometry& geo, const Planes& p, const Isa& isa, const float* x,
                         float scale, bool sgn, float* row, float* out) {
  const int64_t s0 = p.s[0], s1 = p.s[1], s2 = p.s[2];
  const int64_t q0 = p.q[0], q1 = p.q[1], q2 = p.q[2];
  const int64_t in1 = geo.in[1], in2 = geo.in[2];
  // Phase b2 of the innermost axis: plane positions [lo, hi) hold the input
  // elements first + i * s2 (first = b2 - pad).
  auto range = [&](int64_t b2, int64_t* first, int64_t* lo, int64_t* hi) {
    *first = b2 - geo.pad_begin[2];
    const int64_t l = std::min(*first >= 0 ? 0 : ceil_div(-*first, s2), q2);
    const int64_t h = in2 - 1 - *first < 0 ? 0 : (in2 - 1 - *first) / s2 + 1;
    *lo = l;
    *hi = std::clamp(h, l, q2);
  };
  for (int64_t b0 = 0; b0 < s0; ++b0) {
    for (int64_t b1 = 0; b1 < s1; ++b1) {
      const int64_t ph01 = (b0 * s1 + b1) * s2;
      bool any = false;
      for (int64_t b2 = 0; b2 < s2; ++b2) any |= p.used[ph01 + b2] != 0;
      if (!any) continue;
      for (int64_t i0 = 0; i0 < q0; ++i0) {
        const int64_t j0 = i0 * s0 + b0 - geo.pad_begin[0];
        for (int64_t i1 = 0; i1 < q1; ++i1) {
          const int64_t j1 = i1 * s1 + b1 - geo.pad_begin[1];
          const int64_t r = (i0 * q1 + i1) * q2;
          if (j0 < 0 || j0 >= geo.in[0] || j1 < 0 || j1 >= in1) {
            for (int64_t b2 = 0; b2 < s2; ++b2) {
              if (p.used[ph01 + b2]) std::fill_n(out + (ph01 + b2) * p.size + r, q2, 0.0f);
            }
            continue;
          }
          const float* src = x + (j0 * in1 + j1) * in2;
          int64_t first, lo, hi;
          if (s2 == 1) {
            range(0, &first, &lo, &hi);
            float* dst = out + ph01 * p.size + r;
            std::fill(dst, dst + lo, 0.0f);
            if (hi > lo) isa.quantize(src + lo + first, hi - lo, 1, scale, sgn, dst + lo);
            std::fill(dst + hi, dst + q2, 0.0f);
            continue;
          }
          isa.quantize(src, in2, 1, scale, sgn, row);
          for (int64_t b2 = 0; b2 < s2; ++b2) {
            if (!p.used[ph01 + b2]) continue;
            range(b2, &first, &lo, &hi);
            float* dst = out + (ph01 + b2) * p.size + r;
            std::fill(dst, dst + lo, 0.0f);
            if (hi > lo) isa.split(row + lo * s2 + first, hi - lo, s2, dst + lo);
            std::fill(dst + hi, dst + q2, 0.0f);
          }
        }
      }
      const int64_t used_floats = q0 * q1 * q2;
      for (int64_t b2 = 0; b2 < s2; ++b2) {
        if (p.used[ph01 + b2]) std::fill(out + (ph01 + b2) * p.size + used_floats, out + (ph01 + b2 + 1) * p.size, 0.0f);
      }
    }
  }
}

struct Job {
  const DirectConvWeights* w;
  const ConvGeometry* geo;
  const Planes* planes;
  Isa isa;
  const float* x;
  int64_t C;
  float x_scale;
  bool need_reduced;
  int64_t group_floats;  // Cg x nph x size: the planes of one group (R(x) planes follow)
  int64_t mchunk, mchunks;  // shared planes: a task computes mchunk output channels of a group
  float* shared;            // shared planes: [image][group][group_stride]
  int64_t group_stride;     // group_floats, twice that with R(x) planes
  const std::vector<detail::DcTerm>* exact;
  const std::vector<detail::DcTerm>* cterms;
  const float* out_scale;
  const float* bias;
  float* y;
};

// Channel c of group g of image img quantized into its phase planes (and their
// R(x) copies) in `planes`, the group's buffer.
void fill_channel(const Job& j, int64_t img, int64_t g, int64_t c, float* row, float* planes) {
  const DirectConvWeights& w = *j.w;
  const Planes& p = *j.planes;
  const ConvGeometry& geo = *j.geo;
  const bool sgn = w.cfg.act_signed;
  float* cp = planes + c * p.nph * p.size;
  fill_channel_planes(geo, p, j.isa, j.x + (img * j.C + g * w.Cg + c) * geo.in_size(), j.x_scale,
                      sgn, row, cp);
  if (!j.need_reduced) return;
  for (int64_t ph = 0; ph < p.nph; ++ph) {
    if (p.used[ph]) j.isa.reduce(cp + ph * p.size, p.size, sgn, cp + ph * p.size + j.group_floats);
  }
}

// Output channels [m0, m1) of image img from their group's planes.
void compute_channels(const Job& j, int64_t img, int64_t m0, int64_t m1, const float* planes) {
  const DirectConvWeights& w = *j.w;
  const Planes& p = *j.planes;
  const ConvGeometry& geo = *j.geo;
  detail::DcChannel ch{};
  ch.cterms = j.cterms->data();
  ch.planes = planes;
  ch.reduced_delta = j.group_floats;
  ch.reduce_activations = w.cfg.reduce == Reduce::kActivations;
  ch.out0 = geo.out[0];
  ch.out1 = geo.out[1];
  ch.out2 = geo.out[2];
  ch.q1 = p.q[1];
  ch.q2 = p.q[2];
  for (int64_t m = m0; m < m1; ++m) {
    ch.exact = j.exact->data() + w.exact_begin[m];
    ch.nexact = w.exact_begin[m + 1] - w.exact_begin[m];
    ch.steps = w.steps.data() + w.step_begin[m];
    ch.nsteps = w.step_begin[m + 1] - w.step_begin[m];
    ch.y = j.y + (img * w.M + m) * geo.out_size();
    ch.scale = j.out_scale[m];
    ch.bias = j.bias != nullptr ? j.bias + m : nullptr;
    j.isa.channel(ch);
  }
}

// One group of one image: its channels quantized into phase planes (in cache),
// then every output channel of the group computed from them.
void group_task(const Job& j, int64_t task) {
  const DirectConvWeights& w = *j.w;
  const int64_t img = task / w.groups, g = task % w.groups, Mg = w.M / w.groups;
  thread_local Scratch scratch;
  float* planes = scratch.planes.get(static_cast<size_t>(j.group_floats * (j.need_reduced ? 2 : 1)));
  float* row = scratch.row.get(static_cast<size_t>(j.geo->in[2] + kSlack));
  for (int64_t c = 0; c < w.Cg; ++c) fill_channel(j, img, g, c, row, planes);
  compute_channels(j, img, g * Mg, (g + 1) * Mg, planes);
  if (scratch.planes.size > kKeepScratchFloats) scratch.planes.release();
}

// Few groups (a dense layer with a small reduction has one): the planes of a
// chunk of images are quantized once into a shared buffer (one task per
// channel), then tasks of mchunk output channels compute from them.
void shared_fill_task(const Job& j, int64_t task) {
  const DirectConvWeights& w = *j.w;
  const int64_t c = task % w.Cg, g = task / w.Cg % w.groups, img = task / w.Cg / w.groups;
  thread_local Scratch scratch;
  float* row = scratch.row.get(static_cast<size_t>(j.geo->in[2] + kSlack));
  fill_channel(j, img, g, c, row, j.shared + (img * w.groups + g) * j.group_stride);
}

void shared_compute_task(const Job& j, int64_t task) {
  const DirectConvWeights& w = *j.w;
  const int64_t chunk = task % j.mchunks, g = task / j.mchunks % w.groups;
  const int64_t img = task / j.mchunks / w.groups, Mg = w.M / w.groups;
  const int64_t m0 = g * Mg + chunk * j.mchunk, m1 = std::min((g + 1) * Mg, m0 + j.mchunk);
  compute_channels(j, img, m0, m1, j.shared + (img * w.groups + g) * j.group_stride);
}

struct Depthwise8Job {
  detail::DwBlock proto;  // everything but the block's channels and buffer
  Depthwise8Fn run;
  int64_t C, blocks, in, out, plane_floats;
  const float* x;
  const float* wv;  // [blocks][ks][8]
  const float* out_scale;
  const float* bias;
  float* y;
};

void depthwise8_task(const Depthwise8Job& j, int64_t task) {
  const int64_t img = task / j.blocks, blk = task % j.blocks;
  const int64_t c0 = blk * 8;
  thread_local Scratch scratch;
  detail::DwBlock b = j.proto;
  b.x = j.x + (img * j.C + c0) * j.in;
  b.nc = static_cast<int>(std::min<int64_t>(8, j.C - c0));
  b.w = j.wv + blk * b.ks * 8;
  b.buf = scratch.planes.get(static_cast<size_t>(j.plane_floats));
  b.y = j.y + (img * j.C + c0) * j.out;
  b.scale = j.out_scale + c0;
  b.bias = j.bias != nullptr ? j.bias + c0 : nullptr;
  j.run(b);
  if (scratch.planes.size > kKeepScratchFloats) scratch.planes.release();
}

}  // namespace

void direct_conv(const DirectConvWeights& w, const ConvGeometry& geo, int64_t N, const float* x,
                 float x_scale, const float* out_scale, const float* bias, float* y,
                 const Parallel& parallel) {
  if (N <= 0 || w.M <= 0 || geo.out_size() <= 0) return;
  const int64_t M = w.M, Cg = w.Cg, C = w.groups * Cg;
  const Planes planes = make_planes(geo);
  const Isa isa = pick_isa();
  if (isa.depthwise8 != nullptr && Cg == 1 && M == w.groups && w.steps.empty()) {
    // Depthwise without collision steps: 8 channels per vector (DwBlock).
    const int64_t KS = geo.kernel_size(), blocks = ceil_div(C, 8);
    std::vector<float> wv(static_cast<size_t>(blocks * KS * 8), 0.0f);
    std::vector<int64_t> off(static_cast<size_t>(KS)), kdil(static_cast<size_t>(2 * KS));
    for (int64_t k = 0; k < KS; ++k) {
      off[k] = planes.kph[k] * planes.size + planes.koff[k];
      kdil[2 * k] = (k / (geo.kernel[1] * geo.kernel[2])) * geo.dilation[0];
      kdil[2 * k + 1] = ((k / geo.kernel[2]) % geo.kernel[1]) * geo.dilation[1];
    }
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t i = w.exact_begin[m]; i < w.exact_begin[m + 1]; ++i) {
        wv[((m / 8) * KS + w.exact[i].kpos) * 8 + m % 8] = w.exact[i].w;
      }
    }
    Depthwise8Job job{};
    detail::DwBlock& b = job.proto;
    for (int d = 0; d < 3; ++d) {
      b.in[d] = geo.in[d];
      b.pad_begin[d] = geo.pad_begin[d];
      b.out[d] = geo.out[d];
      b.q[d] = planes.q[d];
      b.s[d] = planes.s[d];
    }
    b.nph = planes.nph;
    b.size = planes.size;
    b.used = planes.used.data();
    b.off = off.data();
    b.ks = KS;
    b.stride[0] = geo.stride[0];
    b.stride[1] = geo.stride[1];
    b.kdil = kdil.data();
    b.x_scale = x_scale;
    b.sgn = w.cfg.act_signed;
    job.run = isa.depthwise8;
    job.C = C;
    job.blocks = blocks;
    job.in = geo.in_size();
    job.out = geo.out_size();
    job.plane_floats = planes.nph * planes.size * 8;
    job.x = x;
    job.wv = wv.data();
    job.out_scale = out_scale;
    job.bias = bias;
    job.y = y;
    parallel(
        [](void* data, size_t i) {
          depthwise8_task(*static_cast<Depthwise8Job*>(data), static_cast<int64_t>(i));
        },
        static_cast<size_t>(N * blocks), &job);
    return;
  }

  // The terms with their plane offsets for this geometry.
  auto resolve = [&](const std::vector<DirectConvWeights::Term>& terms, int64_t begin, int64_t end, std::vector<detail::DcTerm>* out) {
    for (int64_t i = begin; i < end; ++i) {
      const DirectConvWeights::Term& t = terms[i];
      // Offsets within the planes of the channel's group (group_task's buffer).
      const int64_t c = t.c_local;
      (*out)[i] = detail::DcTerm{
          (c * planes.nph + planes.kph[t.kpos]) * planes.size + planes.koff[t.kpos], t.w, t.rw};
    }
  };
  std::vector<detail::DcTerm> exact(w.exact.size()), cterms(w.cterms.size());
  for (int64_t m = 0; m < M; ++m) {
    resolve(w.exact, w.exact_begin[m], w.exact_begin[m + 1], &exact);
    for (int64_t s = w.step_begin[m]; s < w.step_begin[m + 1]; ++s) {
      const detail::DcStep& st = w.steps[s];
      resolve(w.cterms, st.first, st.first + st.count, &cterms);
    }
  }

  const bool need_reduced = !w.steps.empty() &&
                            (w.cfg.reduce == Reduce::kActivations || w.cfg.threads == 4);
  Job job{};
  job.w = &w;
  job.geo = &geo;
  job.planes = &planes;
  job.isa = isa;
  job.x = x;
  job.C = C;
  job.x_scale = x_scale;
  job.need_reduced = need_reduced;
  job.group_floats = Cg * planes.nph * planes.size;
  job.exact = &exact;
  job.cterms = &cterms;
  job.out_scale = out_scale;
  job.bias = bias;
  job.y = y;
  // Fewer (image, group) tasks than the runtime may have threads: split the
  // output channels of a group among tasks, over planes quantized once.
  const int64_t Mg = M / w.groups;
  const int64_t split = std::min(Mg, std::max<int64_t>(1, ceil_div(8, N * w.groups)));
  if (split == 1) {
    parallel(
        [](void* data, size_t i) { group_task(*static_cast<Job*>(data), static_cast<int64_t>(i)); },
        static_cast<size_t>(N * w.groups), &job);
    return;
  }
  job.mchunk = ceil_div(Mg, split);
  job.mchunks = ceil_div(Mg, job.mchunk);
  job.group_stride = job.group_floats * (need_reduced ? 2 : 1);
  const int64_t image_floats = w.groups * job.group_stride;
  const int64_t chunk = std::clamp<int64_t>(
      kChunkBudgetBytes / std::max<int64_t>(1, image_floats * 4), 1, N);
  const std::unique_ptr<float[]> shared(new float[static_cast<size_t>(chunk * image_floats)]);
  job.shared = shared.get();
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t images = std::min(chunk, N - n0);
    job.x = x + n0 * C * geo.in_size();
    job.y = y + n0 * M * geo.out_size();
    parallel(
        [](void* data, size_t i) {
          shared_fill_task(*static_cast<Job*>(data), static_cast<int64_t>(i));
        },
        static_cast<size_t>(images * w.groups * Cg), &job);
    parallel(
        [](void* data, size_t i) {
          shared_compute_task(*static_cast<Job*>(data), static_cast<int64_t>(i));
        },
        static_cast<size_t>(images * w.groups * job.mchunks), &job);
  }
}

}  // namespace nbsmt
