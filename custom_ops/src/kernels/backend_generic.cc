// Portable implementation of the per-ISA pieces (engine.h): plain C++ on the same
// packed byte layouts as the SIMD backends, so it also checks those layouts.
#include <cstring>

#include "engine.h"

namespace nbsmt {
namespace detail {
namespace {

void dense_transform(const Plan& plan, int64_t b, const int16_t* x, int64_t x_stride,
                     int64_t nrows, uint8_t* a, int64_t lda) {
  const int T = plan.T;
  const int64_t seg = plan.seg_bytes(b);
  const int64_t n = T * plan.block_len(b);
  for (int64_t r = 0; r < nrows; ++r) {
    const int16_t* xr = x + r * x_stride + plan.block_step0(b) * T;
    uint8_t* out = a + r * lda;
    for (int term = 0; term < plan.nterms; ++term) {
      uint8_t* dst = out + term * seg;
      const int off = plan.x_offset[term];
      for (int64_t l = 0; l < n; ++l) {
        const int xp = T == 2 ? xr[l ^ 1] : 0;
        dst[l] = static_cast<uint8_t>(dense_x_value(plan, term, xr[l], xp) + off);
      }
      for (int64_t l = n; l < seg; ++l) dst[l] = 0;  // padding (weights are 0 there)
    }
  }
}

}  // namespace

int32_t generic_dense_weight_row(const Plan& plan, int64_t b, const int8_t* w, int8_t* out) {
  const int T = plan.T;
  const int64_t seg = plan.seg_bytes(b);
  const int64_t n = T * plan.block_len(b);
  uint32_t corr = 0;
  if (plan.wide) {  // int16 elements, no offsets
    for (int term = 0; term < plan.nterms; ++term) {
      int8_t* dst = out + term * seg;
      for (int64_t l = 0; l < seg / 2; ++l) {
        const int16_t v = l < n ? static_cast<int16_t>(
                                      dense_w_value(plan, term, w[l], T == 2 ? w[l ^ 1] : 0))
                                : int16_t{0};
        std::memcpy(dst + 2 * l, &v, 2);
      }
    }
    return 0;
  }
  for (int term = 0; term < plan.nterms; ++term) {
    int8_t* dst = out + term * seg;
    for (int64_t l = 0; l < n; ++l) {
      const int v = dense_w_value(plan, term, w[l], T == 2 ? w[l ^ 1] : 0);
      dst[l] = static_cast<int8_t>(v);
      corr += static_cast<uint32_t>(plan.x_offset[term]) * static_cast<uint32_t>(v);
    }
    for (int64_t l = n; l < seg; ++l) dst[l] = 0;
  }
  return static_cast<int32_t>(corr);
}

namespace {

void dense_gemm(int64_t kq, const uint8_t* a, int64_t lda, int64_t nrows, const uint8_t* panel,
                int nv, int32_t* c, int64_t ldc, bool first) {
  const int W = nv * 16;
  uint32_t sum[128];
  for (int64_t r = 0; r < nrows; ++r) {
    const uint8_t* ar = a + r * lda;
    int32_t* cr = c + r * ldc;
    for (int col = 0; col < W; ++col) sum[col] = first ? 0u : static_cast<uint32_t>(cr[col]);
    for (int64_t q = 0; q < kq; ++q) {
      const int a0 = ar[4 * q], a1 = ar[4 * q + 1], a2 = ar[4 * q + 2], a3 = ar[4 * q + 3];
      const int8_t* bq = reinterpret_cast<const int8_t*>(panel) + q * W * 4;
      for (int col = 0; col < W; ++col) {
        const int8_t* bb = bq + col * 4;
        sum[col] += static_cast<uint32_t>(a0 * bb[0] + a1 * bb[1] + a2 * bb[2] + a3 * bb[3]);
      }
    }
    for (int col = 0; col < W; ++col) cr[col] = static_cast<int32_t>(sum[col]);
  }
}

}  // namespace

int64_t generic_gather_entries(const Plan& plan, int64_t b, const int16_t* x, GatherEntry* out,
                               int32_t* byte_sum) {
  const bool sgn = plan.cfg.act_signed;
  const int64_t s0 = plan.block_step0(b);
  const int64_t s1 = s0 + plan.block_len(b);
  int64_t n = 0;
  int32_t bsum = 0;
  for (int64_t s = s0; s < s1; ++s) {
    const int16_t* xs = x + s * 4;
    int pi = 0;
    for (int t = 0; t < 4; ++t) pi |= (xs[t] != 0) << t;
    if (pi == 0) continue;
    uint8_t bytes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int ns = 0;
    for (int t = 0; t < 4; ++t) {
      if (xs[t] != 0) ++ns;
    }
    int j = 0;
    for (int t = 0; t < 4; ++t) {
      if (xs[t] == 0) continue;
      const int rv = reduce_value(xs[t], sgn);
      bytes[j] = static_cast<uint8_t>(xs[t]);
      bytes[(ns <= 2 ? 2 : 4) + j] = static_cast<uint8_t>(rv);
      if (sgn) bsum += xs[t] + rv;
      ++j;
    }
    const int32_t index = static_cast<int32_t>((s - s0) * kGatherDwords + kGatherBase[pi]);
    for (int d = 0; d < kGatherCount[pi]; ++d) {
      out[n].index = index + d;
      std::memcpy(&out[n].bytes, bytes + 4 * d, 4);
      ++n;
    }
  }
  *byte_sum += bsum;
  return n;
}

void generic_gather_weight_column(const Plan& plan, const int8_t* w, int64_t W, uint8_t* dst) {
  for (int64_t s = 0; s < plan.steps; ++s) {
    uint8_t* d = dst + s * 3 * W * 4;
    int32_t bw = 0;
    for (int t = 0; t < 4; ++t) {
      const int v = w[s * 4 + t];
      d[t] = static_cast<uint8_t>(v);
      d[W * 4 + t] = static_cast<uint8_t>(reduce_signed(v));
      bw |= (v != 0) << t;
    }
    std::memcpy(d + 2 * W * 4, &bw, 4);
  }
}

namespace {

void gather_expand(const Plan& plan, const uint8_t* source, int64_t s0, int64_t len, int nv,
                   uint8_t* slice) {
  const int W = nv * 16;
  const GatherSelectors& g = gather_selectors(plan.cfg.reduce);
  const uint8_t flip = plan.cfg.act_signed ? 0x80 : 0x00;  // signed mode stores value + 128
  for (int64_t s = 0; s < len; ++s) {
    const uint8_t* src = source + (s0 + s) * 3 * W * 4;
    uint8_t* dst = slice + s * kGatherDwords * W * 4;
    for (int c = 0; c < W; ++c) {
      uint8_t val[9];
      val[0] = 0;
      for (int t = 0; t < 4; ++t) {
        val[1 + t] = src[c * 4 + t];
        val[5 + t] = src[W * 4 + c * 4 + t];
      }
      int32_t bw;
      std::memcpy(&bw, src + 2 * W * 4 + c * 4, 4);
      const uint8_t* sel = g.sel[bw];
      for (int d = 0; d < kGatherDwords; ++d) {
        for (int i = 0; i < 4; ++i) dst[(d * W + c) * 4 + i] = val[sel[d * 4 + i]] ^ flip;
      }
    }
  }
}

void gather_gemm(const GatherEntry* e, int64_t n, const uint8_t* table, int nv, bool act_signed,
                 int32_t* c, bool first) {
  const int W = nv * 16;
  uint32_t sum[128];
  for (int col = 0; col < W; ++col) sum[col] = first ? 0u : static_cast<uint32_t>(c[col]);
  for (int64_t i = 0; i < n; ++i) {
    uint8_t xb[4];
    std::memcpy(xb, &e[i].bytes, 4);
    const uint8_t* row = table + static_cast<int64_t>(e[i].index) * W * 4;
    if (act_signed) {  // entries s8, table u8
      const int a0 = static_cast<int8_t>(xb[0]), a1 = static_cast<int8_t>(xb[1]);
      const int a2 = static_cast<int8_t>(xb[2]), a3 = static_cast<int8_t>(xb[3]);
      for (int col = 0; col < W; ++col) {
        const uint8_t* t = row + col * 4;
        sum[col] += static_cast<uint32_t>(a0 * t[0] + a1 * t[1] + a2 * t[2] + a3 * t[3]);
      }
    } else {  // entries u8, table s8
      const int a0 = xb[0], a1 = xb[1], a2 = xb[2], a3 = xb[3];
      const int8_t* trow = reinterpret_cast<const int8_t*>(row);
      for (int col = 0; col < W; ++col) {
        const int8_t* t = trow + col * 4;
        sum[col] += static_cast<uint32_t>(a0 * t[0] + a1 * t[1] + a2 * t[2] + a3 * t[3]);
      }
    }
  }
  for (int col = 0; col < W; ++col) c[col] = static_cast<int32_t>(sum[col]);
}

}  // namespace

void generic_float_tile(const int32_t* c, int64_t ldc, int64_t rows, int64_t cols,
                        const int32_t* colcorr, const int32_t* rowcorr, const float* scale,
                        const float* bias, float* y, int64_t row_stride, int64_t col_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t rc = rowcorr != nullptr ? static_cast<uint32_t>(rowcorr[r]) : 0u;
    for (int64_t m = 0; m < cols; ++m) {
      const auto acc = static_cast<int32_t>(static_cast<uint32_t>(c[r * ldc + m]) +
                                            static_cast<uint32_t>(colcorr[m]) + rc);
      float v = scale[m] * static_cast<float>(acc);
      if (bias != nullptr) v = v + bias[m];
      y[r * row_stride + m * col_stride] = v;
    }
  }
}

const Backend& generic_backend() {
  static const Backend be{Isa::kGeneric,
                          false,
                          dense_transform,
                          generic_dense_weight_row,
                          dense_gemm,
                          generic_gather_weight_column,
                          generic_gather_entries,
                          gather_expand,
                          gather_gemm,
                          generic_stats_rows,
                          generic_float_tile,
                          nullptr};
  return be;
}

}  // namespace detail
}  // namespace nbsmt
