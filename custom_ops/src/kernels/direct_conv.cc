// Direct convolution for depthwise / narrow grouped Convs (nbsmt/direct_conv.h):
// weight programs, stride-phase planes, the parallel driver and the portable kernel.
#include "nbsmt/direct_conv.h"

#include <algorithm>
#include <cmath>
#include <cstring>
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
  return groups > 1 && outputs_per_group < 16 && channels_per_group * kernel_size >= 1 &&
         channels_per_group * kernel_size <= kDirectMaxK;
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

struct Isa {
  QuantizeFn quantize;
  ReduceFn reduce;
  ChannelFn channel;
};

Isa pick_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  // AVX-512 machines run the AVX2 kernel (it is not the bottleneck there).
  if (detail::selected_backend().isa != detail::Isa::kGeneric) {
    return {detail::dc_quantize_avx2, detail::dc_reduce_avx2, detail::dc_channel_avx2};
  }
#endif
  return {detail::dc_quantize_generic, detail::dc_reduce_generic, detail::dc_channel_generic};
}

// Fills phase plane `ph` of one channel from q, the channel's [in] activations
// already quantized (zero outside the image).
void fill_plane(const ConvGeometry& geo, const Planes& p, int64_t ph, const float* q,
                float* out) {
  const int64_t b[3] = {ph / (p.s[1] * p.s[2]), (ph / p.s[2]) % p.s[1], ph % p.s[2]};
  const int64_t s2 = p.s[2], q2 = p.q[2];
  // Valid i2: 0 <= i2 * s2 + b2 - pb2 < in2.
  const int64_t first = b[2] - geo.pad_begin[2];
  int64_t lo = first >= 0 ? 0 : ceil_div(-first, s2);
  int64_t hi = geo.in[2] - 1 - first < 0 ? 0 : (geo.in[2] - 1 - first) / s2 + 1;
  lo = std::min(lo, q2);
  hi = std::clamp(hi, lo, q2);
  for (int64_t i0 = 0; i0 < p.q[0]; ++i0) {
    const int64_t j0 = i0 * p.s[0] + b[0] - geo.pad_begin[0];
    for (int64_t i1 = 0; i1 < p.q[1]; ++i1) {
      const int64_t j1 = i1 * p.s[1] + b[1] - geo.pad_begin[1];
      float* row = out + (i0 * p.q[1] + i1) * q2;
      if (j0 < 0 || j0 >= geo.in[0] || j1 < 0 || j1 >= geo.in[1] || hi <= lo) {
        std::fill(row, row + q2, 0.0f);
        continue;
      }
      std::fill(row, row + lo, 0.0f);
      const float* src = q + (j0 * geo.in[1] + j1) * geo.in[2] + lo * s2 + first;
      if (s2 == 1) {
        std::memcpy(row + lo, src, static_cast<size_t>(hi - lo) * sizeof(float));
      } else {
        for (int64_t i = lo; i < hi; ++i) row[i] = src[(i - lo) * s2];
      }
      std::fill(row + hi, row + q2, 0.0f);
    }
  }
  const int64_t used = p.q[0] * p.q[1] * q2;
  std::fill(out + used, out + p.size, 0.0f);
}

struct Job {
  const DirectConvWeights* w;
  const ConvGeometry* geo;
  const Planes* planes;
  Isa isa;
  const float* x;      // first image of the chunk
  int64_t C, images;
  float x_scale;
  bool need_reduced;
  float* buf;          // images x C x nph x size floats (+ the same again for R(x))
  int64_t image_floats, reduced_delta;
  const std::vector<detail::DcTerm>* exact;
  const std::vector<detail::DcTerm>* cterms;
  const float* out_scale;
  const float* bias;
  float* y;            // first image of the chunk
};

void quantize_task(const Job& j, int64_t task) {
  const int64_t img = task / j.C, c = task % j.C;
  const Planes& p = *j.planes;
  const int64_t in = j.geo->in_size();
  const bool sgn = j.w->cfg.act_signed;
  // The channel quantized once, contiguously, then laid out into its phase planes.
  thread_local std::vector<float> q;
  if (q.size() < static_cast<size_t>(in)) q.resize(static_cast<size_t>(in));
  j.isa.quantize(j.x + (img * j.C + c) * in, in, 1, j.x_scale, sgn, q.data());
  for (int64_t ph = 0; ph < p.nph; ++ph) {
    if (!p.used[ph]) continue;
    float* plane = j.buf + img * j.image_floats + (c * p.nph + ph) * p.size;
    fill_plane(*j.geo, p, ph, q.data(), plane);
    if (j.need_reduced) j.isa.reduce(plane, p.size, sgn, plane + j.reduced_delta);
  }
}

void channel_task(const Job& j, int64_t task) {
  const DirectConvWeights& w = *j.w;
  const int64_t img = task / w.M, m = task % w.M;
  const ConvGeometry& geo = *j.geo;
  detail::DcChannel ch{};
  ch.exact = j.exact->data() + w.exact_begin[m];
  ch.nexact = w.exact_begin[m + 1] - w.exact_begin[m];
  ch.steps = w.steps.data() + w.step_begin[m];
  ch.nsteps = w.step_begin[m + 1] - w.step_begin[m];
  ch.cterms = j.cterms->data();
  ch.planes = j.buf + img * j.image_floats;
  ch.reduced_delta = j.reduced_delta;
  ch.reduce_activations = w.cfg.reduce == Reduce::kActivations;
  ch.out0 = geo.out[0];
  ch.out1 = geo.out[1];
  ch.out2 = geo.out[2];
  ch.q1 = j.planes->q[1];
  ch.q2 = j.planes->q[2];
  ch.y = j.y + (img * w.M + m) * geo.out_size();
  ch.scale = j.out_scale[m];
  ch.bias = j.bias != nullptr ? j.bias + m : nullptr;
  j.isa.channel(ch);
}

}  // namespace

void direct_conv(const DirectConvWeights& w, const ConvGeometry& geo, int64_t N, const float* x,
                 float x_scale, const float* out_scale, const float* bias, float* y,
                 const Parallel& parallel) {
  if (N <= 0 || w.M <= 0 || geo.out_size() <= 0) return;
  const int64_t KS = geo.kernel_size();
  const int64_t M = w.M, Mg = M / w.groups, Cg = w.Cg, C = w.groups * Cg;
  const Planes planes = make_planes(geo);
  // The terms with their plane offsets for this geometry.
  auto resolve = [&](const std::vector<DirectConvWeights::Term>& terms, int64_t m,
                     int64_t begin, int64_t end, std::vector<detail::DcTerm>* out) {
    for (int64_t i = begin; i < end; ++i) {
      const DirectConvWeights::Term& t = terms[i];
      const int64_t c = (m / Mg) * Cg + t.c_local;
      (*out)[i] = detail::DcTerm{
          (c * planes.nph + planes.kph[t.kpos]) * planes.size + planes.koff[t.kpos], t.w, t.rw};
    }
  };
  std::vector<detail::DcTerm> exact(w.exact.size()), cterms(w.cterms.size());
  for (int64_t m = 0; m < M; ++m) {
    resolve(w.exact, m, w.exact_begin[m], w.exact_begin[m + 1], &exact);
    for (int64_t s = w.step_begin[m]; s < w.step_begin[m + 1]; ++s) {
      const detail::DcStep& st = w.steps[s];
      resolve(w.cterms, m, st.first, st.first + st.count, &cterms);
    }
  }
  (void)KS;

  const bool need_reduced = !w.steps.empty() &&
                            (w.cfg.reduce == Reduce::kActivations || w.cfg.threads == 4);
  const int64_t plane_floats = C * planes.nph * planes.size;
  const int64_t image_floats = plane_floats * (need_reduced ? 2 : 1);
  const int64_t chunk = std::clamp<int64_t>(
      kChunkBudgetBytes / std::max<int64_t>(1, image_floats * 4), 1, N);
  // Not zero-filled: quantize_task writes every plane the channel tasks read.
  const std::unique_ptr<float[]> buf(new float[static_cast<size_t>(chunk * image_floats)]);

  Job job{};
  job.w = &w;
  job.geo = &geo;
  job.planes = &planes;
  job.isa = pick_isa();
  job.C = C;
  job.x_scale = x_scale;
  job.need_reduced = need_reduced;
  job.buf = buf.get();
  job.image_floats = image_floats;
  job.reduced_delta = plane_floats;
  job.exact = &exact;
  job.cterms = &cterms;
  job.out_scale = out_scale;
  job.bias = bias;
  const int64_t in = geo.in_size(), out = geo.out_size();
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    job.images = std::min(chunk, N - n0);
    job.x = x + n0 * C * in;
    job.y = y + n0 * M * out;
    parallel(
        [](void* data, size_t i) { quantize_task(*static_cast<Job*>(data), static_cast<int64_t>(i)); },
        static_cast<size_t>(job.images * C), &job);
    parallel(
        [](void* data, size_t i) { channel_task(*static_cast<Job*>(data), static_cast<int64_t>(i)); },
        static_cast<size_t>(job.images * M), &job);
  }
}

}  // namespace nbsmt
