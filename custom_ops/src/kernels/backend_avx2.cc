// AVX2 implementation of the per-ISA pieces (engine.h), for x86-64 CPUs without
// AVX-512 VNNI. The dense method (T = 1, 2) uses int16 operands (Plan::wide):
// x and w values are stored as int16 pairs, so vpmaddwd multiplies them with no
// widening or offsets in the inner loop (|a * b| <= 255 * 128, pair sums fit
// int32). The gather method (T = 4) keeps the shared u8 x s8 layout, emulating
// the four-way dot product with widened bytes. Pieces that are not hot (weight
// preparation, statistics) use the portable versions.
#include "engine.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "nbsmt/pack.h"

#define NBSMT_AVX2 __attribute__((target("avx2,fma,bmi,bmi2,popcnt")))
#define NBSMT_AVX2_INLINE __attribute__((target("avx2,fma,bmi,bmi2,popcnt"), always_inline)) inline

namespace nbsmt {
namespace detail {

namespace {

// R(v) on 16 int16 lanes (same formula as the AVX-512 backend).
NBSMT_AVX2_INLINE __m256i reduce16(__m256i v, bool is_signed) {
  const __m256i odd = _mm256_and_si256(_mm256_srai_epi16(v, 4), _mm256_set1_epi16(1));
  __m256i q = _mm256_srai_epi16(_mm256_add_epi16(_mm256_add_epi16(v, _mm256_set1_epi16(7)), odd), 4);
  if (is_signed) {
    q = _mm256_max_epi16(_mm256_min_epi16(q, _mm256_set1_epi16(7)), _mm256_set1_epi16(-8));
    const __m256i keep = _mm256_and_si256(_mm256_cmpgt_epi16(v, _mm256_set1_epi16(-9)),
                                          _mm256_cmpgt_epi16(_mm256_set1_epi16(8), v));
    return _mm256_blendv_epi8(_mm256_slli_epi16(q, 4), v, keep);
  }
  q = _mm256_min_epi16(q, _mm256_set1_epi16(15));
  const __m256i keep = _mm256_cmpgt_epi16(_mm256_set1_epi16(16), v);
  return _mm256_blendv_epi8(_mm256_slli_epi16(q, 4), v, keep);
}

// ---- dense (int16 pairs, Plan::wide) ------------------------------------------

// x side of block b: term 0 = x itself, term 1 (T = 2) = the correction operand
// D(x) nz(x_partner) (reduce=activations) or x nz(x_partner) (weights), as int16.
NBSMT_AVX2 void dense_transform(const Plan& plan, int64_t b, const int16_t* x, int64_t x_stride,
                                int64_t nrows, uint8_t* a, int64_t lda) {
  const int T = plan.T;
  const int64_t seg = plan.seg_bytes(b) / 2;  // int16 elements of one term
  const int64_t n = T * plan.block_len(b);
  const bool sgn = plan.cfg.act_signed;
  const bool act = plan.cfg.reduce == Reduce::kActivations;
  const __m256i zero = _mm256_setzero_si256();
  alignas(32) int16_t tail[16];
  for (int64_t r = 0; r < nrows; ++r) {
    const int16_t* xr = x + r * x_stride + plan.block_step0(b) * T;
    int16_t* out = reinterpret_cast<int16_t*>(a + r * lda);
    std::memcpy(out, xr, static_cast<size_t>(n) * sizeof(int16_t));
    for (int64_t l = n; l < seg; ++l) out[l] = 0;
    if (T != 2) continue;
    int16_t* out1 = out + seg;  // n == seg for T = 2
    for (int64_t l = 0; l < n; l += 16) {
      __m256i v;
      const bool full = l + 16 <= n;
      if (full) {
        v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + l));
      } else {
        for (int i = 0; i < 16; ++i) tail[i] = l + i < n ? xr[l + i] : 0;
        v = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
      }
      // Partner slot: swap the int16 halves of every dword (steps start even).
      const __m256i vp = _mm256_or_si256(_mm256_slli_epi32(v, 16), _mm256_srli_epi32(v, 16));
      const __m256i pnz = _mm256_xor_si256(_mm256_cmpeq_epi16(vp, zero), _mm256_set1_epi16(-1));
      const __m256i t1 = act ? _mm256_sub_epi16(reduce16(v, sgn), v) : v;
      const __m256i val = _mm256_and_si256(t1, pnz);
      if (full) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out1 + l), val);
      } else {
        _mm256_store_si256(reinterpret_cast<__m256i*>(tail), val);
        for (int64_t i = 0; i < n - l; ++i) out1[l + i] = tail[i];
      }
    }
  }
}

}  // namespace

// correction_operands (kernels.h), 16 slots per vector (n even: pairs never split).
NBSMT_AVX2 void avx2_correction_operands(const SmtConfig& cfg, const int16_t* x, int64_t n,
                                         int16_t* out) {
  const bool sgn = cfg.act_signed;
  const bool act = cfg.reduce == Reduce::kActivations;
  const __m256i zero = _mm256_setzero_si256();
  int64_t l = 0;
  for (; l + 16 <= n; l += 16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + l));
    const __m256i vp = _mm256_or_si256(_mm256_slli_epi32(v, 16), _mm256_srli_epi32(v, 16));
    const __m256i pnz = _mm256_xor_si256(_mm256_cmpeq_epi16(vp, zero), _mm256_set1_epi16(-1));
    const __m256i t1 = act ? _mm256_sub_epi16(reduce16(v, sgn), v) : v;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + l), _mm256_and_si256(t1, pnz));
  }
  for (; l < n; ++l) {
    const int v = x[l];
    const int value = act ? (sgn ? reduce_signed(v) : reduce_unsigned(v)) - v : v;
    out[l] = static_cast<int16_t>(x[l ^ 1] != 0 ? value : 0);
  }
}

namespace {

// MR rows x 16 columns: per dword q, two vectors of 8 columns x (w_k, w_k+1) and
// one broadcast (x_k, x_k+1) per row; vpmaddwd gives the pair sums per column.
template <int MR>
NBSMT_AVX2 void dense_micro(int64_t kq, const uint8_t* a, int64_t lda, const uint8_t* panel,
                            int64_t row_bytes, int32_t* c, int64_t ldc, bool first) {
  __m256i lo[MR], hi[MR];
  for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
  for (int64_t q = 0; q < kq; ++q) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + q * row_bytes));
    const __m256i b1 =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + q * row_bytes + 32));
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 4 * q, 4);
      const __m256i av = _mm256_set1_epi32(pair);
      lo[r] = _mm256_add_epi32(lo[r], _mm256_madd_epi16(av, b0));
      hi[r] = _mm256_add_epi32(hi[r], _mm256_madd_epi16(av, b1));
    }
  }
  for (int r = 0; r < MR; ++r) {
    __m256i* dst = reinterpret_cast<__m256i*>(c + r * ldc);
    __m256i s0 = lo[r], s1 = hi[r];
    if (!first) {
      s0 = _mm256_add_epi32(s0, _mm256_loadu_si256(dst));
      s1 = _mm256_add_epi32(s1, _mm256_loadu_si256(dst + 1));
    }
    _mm256_storeu_si256(dst, s0);
    _mm256_storeu_si256(dst + 1, s1);
  }
}

NBSMT_AVX2 void dense_gemm(int64_t kq, const uint8_t* a, int64_t lda, int64_t nrows,
                           const uint8_t* panel, int nv, int32_t* c, int64_t ldc, bool first) {
  const int64_t row_bytes = static_cast<int64_t>(nv) * 64;
  for (int64_t g = 0; g < nv; ++g) {  // groups of 16 columns
    const uint8_t* pg = panel + g * 64;
    int32_t* cg = c + g * 16;
    int64_t r = 0;
    for (; r + 6 <= nrows; r += 6) {
      dense_micro<6>(kq, a + r * lda, lda, pg, row_bytes, cg + r * ldc, ldc, first);
    }
    switch (nrows - r) {
      case 5: dense_micro<5>(kq, a + r * lda, lda, pg, row_bytes, cg + r * ldc, ldc, first); break;
      case 4: dense_micro<4>(kq, a + r * lda, lda, pg, row_bytes, cg + r * ldc, ldc, first); break;
      case 3: dense_micro<3>(kq, a + r * lda, lda, pg, row_bytes, cg + r * ldc, ldc, first); break;
      case 2: dense_micro<2>(kq, a + r * lda, lda, pg, row_bytes, cg + r * ldc, ldc, first); break;
      case 1: dense_micro<1>(kq, a + r * lda, lda, pg, row_bytes, cg + r * ldc, ldc, first); break;
      default: break;
    }
  }
}

// dense_micro with rows given as runs (Backend::dense_gemm_runs): the same
// arithmetic, the x pairs read in place from each row's runs.
template <int MR>
NBSMT_AVX2 void runs_micro(int nterms, int64_t runs, int64_t kq_run, const int16_t* const* ptrs,
                           int64_t term1_offset, const uint8_t* panel, int64_t row_bytes,
                           int32_t* c, int64_t ldc) {
  __m256i lo[MR], hi[MR];
  for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
  const uint8_t* b = panel;
  for (int t = 0; t < nterms; ++t) {
    for (int64_t k = 0; k < runs; ++k) {
      const int16_t* a[MR];
      for (int r = 0; r < MR; ++r) a[r] = ptrs[r * runs + k] + t * term1_offset;
      for (int64_t q = 0; q < kq_run; ++q, b += row_bytes) {
        const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
        const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32));
        for (int r = 0; r < MR; ++r) {
          int32_t pair;
          std::memcpy(&pair, a[r] + 2 * q, 4);
          const __m256i av = _mm256_set1_epi32(pair);
          lo[r] = _mm256_add_epi32(lo[r], _mm256_madd_epi16(av, b0));
          hi[r] = _mm256_add_epi32(hi[r], _mm256_madd_epi16(av, b1));
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    __m256i* dst = reinterpret_cast<__m256i*>(c + r * ldc);
    _mm256_storeu_si256(dst, lo[r]);
    _mm256_storeu_si256(dst + 1, hi[r]);
  }
}

NBSMT_AVX2 void dense_gemm_runs(int nterms, int64_t runs, int64_t kq_run,
                                const int16_t* const* ptrs, int64_t term1_offset, int64_t nrows,
                                const uint8_t* panel, int nv, int32_t* c, int64_t ldc) {
  const int64_t row_bytes = static_cast<int64_t>(nv) * 64;
  for (int64_t g = 0; g < nv; ++g) {
    const uint8_t* pg = panel + g * 64;
    int32_t* cg = c + g * 16;
    int64_t r = 0;
    for (; r + 6 <= nrows; r += 6) {
      runs_micro<6>(nterms, runs, kq_run, ptrs + r * runs, term1_offset, pg, row_bytes,
                    cg + r * ldc, ldc);
    }
    const int64_t left = nrows - r;
    const int16_t* const* pr = ptrs + r * runs;
    int32_t* cr = cg + r * ldc;
    switch (left) {
      case 5: runs_micro<5>(nterms, runs, kq_run, pr, term1_offset, pg, row_bytes, cr, ldc); break;
      case 4: runs_micro<4>(nterms, runs, kq_run, pr, term1_offset, pg, row_bytes, cr, ldc); break;
      case 3: runs_micro<3>(nterms, runs, kq_run, pr, term1_offset, pg, row_bytes, cr, ldc); break;
      case 2: runs_micro<2>(nterms, runs, kq_run, pr, term1_offset, pg, row_bytes, cr, ldc); break;
      case 1: runs_micro<1>(nterms, runs, kq_run, pr, term1_offset, pg, row_bytes, cr, ldc); break;
      default: break;
    }
  }
}

// Four u8 bytes as int16 (a0 a1 a2 a3) repeated over a ymm.
NBSMT_AVX2_INLINE __m256i broadcast_u8x4(const uint8_t* p) {
  int32_t d;
  std::memcpy(&d, p, 4);
  return _mm256_broadcastq_epi64(_mm_cvtepu8_epi16(_mm_cvtsi32_si128(d)));
}
NBSMT_AVX2_INLINE __m256i broadcast_s8x4(int32_t d) {
  return _mm256_broadcastq_epi64(_mm_cvtepi8_epi16(_mm_cvtsi32_si128(d)));
}

// Pair sums (k0 k1, k2 k3) of columns 0-3 (lo) and 4-7 (hi) -> 8 column sums.
NBSMT_AVX2_INLINE __m256i finish8(__m256i lo, __m256i hi) {
  return _mm256_permute4x64_epi64(_mm256_hadd_epi32(lo, hi), 0xd8);
}

// ---- gather -----------------------------------------------------------------

// int16 lanes -> bytes (truncating), 16 lanes -> 16 bytes.
NBSMT_AVX2_INLINE __m128i to_bytes(__m256i v) {
  const __m256i lowbytes = _mm256_and_si256(v, _mm256_set1_epi16(0xff));
  return _mm_packus_epi16(_mm256_castsi256_si128(lowbytes), _mm256_extracti128_si256(lowbytes, 1));
}

// Per x-side pattern pi: the pshufb control that compacts a step's bytes
// [x0 x1 x2 x3 r0 r1 r2 r3] (r = R(x)) into its one or two entry dwords (engine.h:
// x byte of the j-th active slot at j, its R(x) byte at 2 + j or 4 + j).
struct EntryControls {
  alignas(16) uint64_t ctrl[16];
};

const EntryControls& entry_controls() {
  static const EntryControls controls = [] {
    EntryControls l{};
    for (int pi = 0; pi < 16; ++pi) {
      uint8_t c[8];
      for (int i = 0; i < 8; ++i) c[i] = 0x80;
      int slots[4], ns = 0;
      for (int t = 0; t < 4; ++t) {
        if (pi >> t & 1) slots[ns++] = t;
      }
      for (int j = 0; j < ns; ++j) {
        c[j] = static_cast<uint8_t>(slots[j]);
        c[(ns <= 2 ? 2 : 4) + j] = static_cast<uint8_t>(4 + slots[j]);
      }
      std::memcpy(&l.ctrl[pi], c, 8);
    }
    return l;
  }();
  return controls;
}

// The entries of one row for the steps of block b, 4 steps (16 slots) per vector:
// non-zero pattern from a compare mask, x and R(x) bytes compacted per step by
// pshufb, entries written in step order (as the portable code does).
NBSMT_AVX2 int64_t gather_entries(const Plan& plan, int64_t b, const int16_t* x, GatherEntry* out,
                                  int32_t* byte_sum) {
  const bool sgn = plan.cfg.act_signed;
  const int64_t s0 = plan.block_step0(b);
  const int64_t len = plan.block_len(b);
  const uint64_t* ctrl = entry_controls().ctrl;
  const int16_t* xs = x + s0 * 4;
  const __m256i zero = _mm256_setzero_si256(), ones16 = _mm256_set1_epi16(1);
  __m256i sumv = zero;
  alignas(32) int16_t tail[16];
  alignas(16) uint64_t packed[4];
  int64_t n = 0;
  for (int64_t i = 0; i < len; i += 4) {
    __m256i v;
    if (i + 4 <= len) {
      v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs + 4 * i));
    } else {
      for (int l = 0; l < 16; ++l) tail[l] = l < 4 * (len - i) ? xs[4 * i + l] : 0;
      v = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
    }
    // Two mask bits per int16 slot; set where the slot is non-zero.
    const uint32_t nzm = ~static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi16(v, zero)));
    if (nzm == 0) continue;
    const __m256i rv = reduce16(v, sgn);
    if (sgn) sumv = _mm256_add_epi32(sumv, _mm256_madd_epi16(_mm256_add_epi16(v, rv), ones16));
    const __m128i xb = to_bytes(v), rb = to_bytes(rv);
    int pi[4];
    for (int st = 0; st < 4; ++st) {
      const uint32_t m = (nzm >> (8 * st)) & 0x55u;
      pi[st] = static_cast<int>((m & 1u) | ((m >> 1) & 2u) | ((m >> 2) & 4u) | ((m >> 3) & 8u));
    }
    // Step pairs as qwords (x dword, R(x) dword); pshufb indexes the whole
    // 16 bytes, so the second step's control points 8 bytes further.
    const __m128i q01 = _mm_unpacklo_epi32(xb, rb), q23 = _mm_unpackhi_epi32(xb, rb);
    const __m128i second = _mm_set_epi64x(0x0808080808080808ll, 0);
    const auto control = [&](int a, int b2) {
      return _mm_add_epi8(_mm_set_epi64x(static_cast<int64_t>(ctrl[b2]), static_cast<int64_t>(ctrl[a])),
                          second);
    };
    _mm_store_si128(reinterpret_cast<__m128i*>(packed), _mm_shuffle_epi8(q01, control(pi[0], pi[1])));
    _mm_store_si128(reinterpret_cast<__m128i*>(packed + 2),
                    _mm_shuffle_epi8(q23, control(pi[2], pi[3])));
    for (int st = 0; st < 4; ++st) {
      const int p = pi[st];
      if (p == 0) continue;
      const auto index = static_cast<int32_t>((i + st) * kGatherDwords + kGatherBase[p]);
      out[n].index = index;
      out[n].bytes = static_cast<int32_t>(static_cast<uint32_t>(packed[st]));
      ++n;
      if (kGatherCount[p] == 2) {
        out[n].index = index + 1;
        out[n].bytes = static_cast<int32_t>(static_cast<uint32_t>(packed[st] >> 32));
        ++n;
      }
    }
  }
  if (sgn) {
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sumv);
    uint32_t total = 0;
    for (int l = 0; l < 8; ++l) total += static_cast<uint32_t>(lanes[l]);
    *byte_sum = static_cast<int32_t>(static_cast<uint32_t>(*byte_sum) + total);
  }
  return n;
}

// Dword lanes picked from a 16-entry table by bw (0..15) in every lane.
NBSMT_AVX2_INLINE __m256i lookup16(const uint32_t* table, __m256i bw, __m256i high) {
  const __m256i lo = _mm256_permutevar8x32_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(table)), bw);
  const __m256i hi = _mm256_permutevar8x32_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(table + 8)), bw);
  return _mm256_blendv_epi8(lo, hi, high);
}

NBSMT_AVX2 void gather_expand(const Plan& plan, const uint8_t* source, int64_t s0, int64_t len,
                              int nv, uint8_t* slice) {
  const int64_t W4 = static_cast<int64_t>(nv) * 64;
  const GatherExpandControls& luts = gather_expand_controls();
  const int mode = plan.cfg.reduce == Reduce::kActivations ? 0 : 1;
  const __m256i lane_base = _mm256_set_epi32(0x0c0c0c0c, 0x08080808, 0x04040404, 0, 0x0c0c0c0c,
                                             0x08080808, 0x04040404, 0);
  const __m256i flip = _mm256_set1_epi8(plan.cfg.act_signed ? static_cast<char>(0x80) : 0);
  for (int64_t s = 0; s < len; ++s) {
    const uint8_t* src = source + (s0 + s) * 3 * W4;
    uint8_t* dst = slice + s * kGatherDwords * W4;
    for (int64_t v = 0; v < 2 * nv; ++v) {  // 8 columns at a time
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + v * 32));
      const __m256i rv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + W4 + v * 32));
      const __m256i bw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * W4 + v * 32));
      const __m256i high = _mm256_cmpgt_epi32(bw, _mm256_set1_epi32(7));
      for (int d = 0; d < kGatherDwords; ++d) {
        const __m256i cw = _mm256_add_epi8(lookup16(luts.ctrl_w[mode][d], bw, high), lane_base);
        const __m256i cr = _mm256_add_epi8(lookup16(luts.ctrl_r[mode][d], bw, high), lane_base);
        const __m256i out = _mm256_or_si256(_mm256_shuffle_epi8(wv, cw), _mm256_shuffle_epi8(rv, cr));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d * W4 + v * 32),
                            _mm256_xor_si256(out, flip));
      }
    }
  }
}

// 16 columns (two groups of 8) of one row.
template <bool SIGNED>
NBSMT_AVX2 void gather_micro16(const GatherEntry* e, int64_t n, const uint8_t* slice,
                               int64_t row_bytes, int32_t* c, bool first) {
  __m256i lo0 = _mm256_setzero_si256(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* row = slice + static_cast<int64_t>(e[i].index) * row_bytes;
    const __m256i t0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
    const __m256i t1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32));
    __m256i d, a0, b0, a1, b1;
    if (SIGNED) {  // entries s8, table u8
      d = broadcast_s8x4(e[i].bytes);
      a0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(t0));
      b0 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(t0, 1));
      a1 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(t1));
      b1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(t1, 1));
    } else {  // entries u8, table s8
      d = broadcast_u8x4(reinterpret_cast<const uint8_t*>(&e[i].bytes));
      a0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(t0));
      b0 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(t0, 1));
      a1 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(t1));
      b1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(t1, 1));
    }
    lo0 = _mm256_add_epi32(lo0, _mm256_madd_epi16(d, a0));
    hi0 = _mm256_add_epi32(hi0, _mm256_madd_epi16(d, b0));
    lo1 = _mm256_add_epi32(lo1, _mm256_madd_epi16(d, a1));
    hi1 = _mm256_add_epi32(hi1, _mm256_madd_epi16(d, b1));
  }
  __m256i s0 = finish8(lo0, hi0), s1 = finish8(lo1, hi1);
  __m256i* dst = reinterpret_cast<__m256i*>(c);
  if (!first) {
    s0 = _mm256_add_epi32(s0, _mm256_loadu_si256(dst));
    s1 = _mm256_add_epi32(s1, _mm256_loadu_si256(dst + 1));
  }
  _mm256_storeu_si256(dst, s0);
  _mm256_storeu_si256(dst + 1, s1);
}

NBSMT_AVX2 void gather_gemm(const GatherEntry* e, int64_t n, const uint8_t* slice, int nv,
                            bool act_signed, int32_t* c, bool first) {
  const int64_t row_bytes = static_cast<int64_t>(nv) * 64;
  for (int v = 0; v < nv; ++v) {
    if (act_signed) {
      gather_micro16<true>(e, n, slice + v * 64, row_bytes, c + v * 16, first);
    } else {
      gather_micro16<false>(e, n, slice + v * 64, row_bytes, c + v * 16, first);
    }
  }
}

}  // namespace

// 8 x 8 int32 transpose: t[i] = row i -> u[j] = column j.
NBSMT_AVX2_INLINE void transpose8x8(const __m256i* t, __m256i* u) {
  const __m256i a0 = _mm256_unpacklo_epi32(t[0], t[1]), a1 = _mm256_unpackhi_epi32(t[0], t[1]);
  const __m256i a2 = _mm256_unpacklo_epi32(t[2], t[3]), a3 = _mm256_unpackhi_epi32(t[2], t[3]);
  const __m256i a4 = _mm256_unpacklo_epi32(t[4], t[5]), a5 = _mm256_unpackhi_epi32(t[4], t[5]);
  const __m256i a6 = _mm256_unpacklo_epi32(t[6], t[7]), a7 = _mm256_unpackhi_epi32(t[6], t[7]);
  const __m256i b0 = _mm256_unpacklo_epi64(a0, a2), b1 = _mm256_unpackhi_epi64(a0, a2);
  const __m256i b2 = _mm256_unpacklo_epi64(a1, a3), b3 = _mm256_unpackhi_epi64(a1, a3);
  const __m256i b4 = _mm256_unpacklo_epi64(a4, a6), b5 = _mm256_unpackhi_epi64(a4, a6);
  const __m256i b6 = _mm256_unpacklo_epi64(a5, a7), b7 = _mm256_unpackhi_epi64(a5, a7);
  u[0] = _mm256_permute2x128_si256(b0, b4, 0x20);
  u[1] = _mm256_permute2x128_si256(b1, b5, 0x20);
  u[2] = _mm256_permute2x128_si256(b2, b6, 0x20);
  u[3] = _mm256_permute2x128_si256(b3, b7, 0x20);
  u[4] = _mm256_permute2x128_si256(b0, b4, 0x31);
  u[5] = _mm256_permute2x128_si256(b1, b5, 0x31);
  u[6] = _mm256_permute2x128_si256(b2, b6, 0x31);
  u[7] = _mm256_permute2x128_si256(b3, b7, 0x31);
}

// 8 x 8 blocks: rows r..r+7 of columns m..m+7 are loaded as 8 row vectors and,
// for a channel-major output (row_stride 1), transposed so that each column's 8
// rows are one contiguous store. Tails go through the portable code.
NBSMT_AVX2 void avx2_float_tile(const int32_t* c, int64_t ldc, int64_t rows, int64_t cols,
                                const int32_t* colcorr, const int32_t* rowcorr,
                                const float* scale, const float* bias, float* y,
                                int64_t row_stride, int64_t col_stride) {
  const int64_t r8 = row_stride == 1 ? rows / 8 * 8 : 0;
  const int64_t m8 = cols / 8 * 8;
  if (col_stride == 1) {  // row-major output: a row of 8 columns at a time
    for (int64_t r = 0; r < rows; ++r) {
      const __m256i rc = _mm256_set1_epi32(rowcorr != nullptr ? rowcorr[r] : 0);
      int64_t m = 0;
      for (; m < m8; m += 8) {
        __m256i acc = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + r * ldc + m));
        acc = _mm256_add_epi32(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(colcorr + m)));
        acc = _mm256_add_epi32(acc, rc);
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(scale + m), _mm256_cvtepi32_ps(acc));
        if (bias != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + m));
        _mm256_storeu_ps(y + r * row_stride + m, v);
      }
      if (m < cols) {
        generic_float_tile(c + r * ldc + m, ldc, 1, cols - m, colcorr + m,
                           rowcorr != nullptr ? rowcorr + r : nullptr, scale + m,
                           bias != nullptr ? bias + m : nullptr, y + r * row_stride + m, row_stride, 1);
      }
    }
    return;
  }
  for (int64_t r = 0; r < r8; r += 8) {
    __m256i rc = _mm256_setzero_si256();
    if (rowcorr != nullptr) rc = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rowcorr + r));
    for (int64_t m = 0; m < m8; m += 8) {
      __m256i t[8];
      for (int i = 0; i < 8; ++i) {
        t[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + (r + i) * ldc + m));
      }
      __m256i u[8];
      transpose8x8(t, u);
      for (int j = 0; j < 8; ++j) {
        const int64_t mm = m + j;
        const __m256i acc = _mm256_add_epi32(_mm256_add_epi32(u[j], _mm256_set1_epi32(colcorr[mm])), rc);
        __m256 v = _mm256_mul_ps(_mm256_set1_ps(scale[mm]), _mm256_cvtepi32_ps(acc));
        if (bias != nullptr) v = _mm256_add_ps(v, _mm256_set1_ps(bias[mm]));
        _mm256_storeu_ps(y + r + mm * col_stride, v);
      }
    }
    if (m8 < cols) {
      generic_float_tile(c + r * ldc + m8, ldc, 8, cols - m8, colcorr + m8,
                         rowcorr != nullptr ? rowcorr + r : nullptr, scale + m8,
                         bias != nullptr ? bias + m8 : nullptr, y + r + m8 * col_stride,
                         row_stride, col_stride);
    }
  }
  if (r8 < rows) {
    generic_float_tile(c + r8 * ldc, ldc, rows - r8, cols, colcorr,
                       rowcorr != nullptr ? rowcorr + r8 : nullptr, scale, bias,
                       y + r8 * row_stride, row_stride, col_stride);
  }
}

// quantize_image (pack.h): the pixel's entries are made 8 at a time. The 8
// channels (or none: an entry without a channel stays 0) of 8 consecutive
// entries are quantized for 8 pixels (float32 division, NaN -> 0, clip, round
// half to even by vcvtps2dq in the default rounding mode), transposed, and
// stored as 8 int16 per pixel. Pixel tails go through quantize_activation.
NBSMT_AVX2 void avx2_quantize_image(const Im2Col& plan, const float* x, int64_t s0, int64_t s1,
                                    float scale, bool act_signed, int16_t* xq) {
  const int64_t C = static_cast<int64_t>(plan.channel_pos.size());
  const int64_t S = plan.geo.in_size();
  const int64_t ps = plan.pixel_stride;
  std::vector<int64_t> channel_at(static_cast<size_t>(ps), -1);  // entry -> channel
  for (int64_t c = 0; c < C; ++c) channel_at[plan.channel_pos[c]] = c;
  const __m256 sv = _mm256_set1_ps(scale);
  const __m256 lo = _mm256_set1_ps(act_signed ? -127.0f : 0.0f);
  const __m256 hi = _mm256_set1_ps(act_signed ? 127.0f : 255.0f);
  const int64_t s8 = s0 + (s1 - s0) / 8 * 8;
  alignas(16) int16_t part[8];
  for (int64_t e0 = 0; e0 < ps; e0 += 8) {
    const int ne = static_cast<int>(std::min<int64_t>(8, ps - e0));
    const int64_t* ch = channel_at.data() + e0;
    bool any = false;
    for (int j = 0; j < ne; ++j) any |= ch[j] >= 0;
    if (!any) continue;  // entries without channels: already 0
    for (int64_t s = s0; s < s8; s += 8) {
      __m256i t[8], u[8];
      for (int j = 0; j < 8; ++j) {
        if (j >= ne || ch[j] < 0) {
          t[j] = _mm256_setzero_si256();
          continue;
        }
        __m256 q = _mm256_div_ps(_mm256_loadu_ps(x + ch[j] * S + s), sv);
        q = _mm256_and_ps(q, _mm256_cmp_ps(q, q, _CMP_ORD_Q));  // NaN -> 0
        t[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(q, lo), hi));
      }
      transpose8x8(t, u);
      for (int i = 0; i < 8; ++i) {
        const __m128i v = _mm_packs_epi32(_mm256_castsi256_si128(u[i]),
                                          _mm256_extracti128_si256(u[i], 1));
        int16_t* dst = xq + (s + i) * ps + e0;
        if (ne == 8) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), v);
        } else {
          _mm_store_si128(reinterpret_cast<__m128i*>(part), v);
          std::memcpy(dst, part, static_cast<size_t>(ne) * sizeof(int16_t));
        }
      }
    }
    for (int j = 0; j < ne; ++j) {
      if (ch[j] < 0) continue;
      for (int64_t s = s8; s < s1; ++s) {
        xq[s * ps + e0 + j] = quantize_activation(x[ch[j] * S + s], scale, act_signed);
      }
    }
  }
}

const Backend& avx2_backend() {
  static const Backend be{Isa::kAvx2,
                          true,
                          dense_transform,
                          generic_dense_weight_row,
                          dense_gemm,
                          generic_gather_weight_column,
                          gather_entries,
                          gather_expand,
                          gather_gemm,
                          generic_stats_rows,
                          avx2_float_tile,
                          dense_gemm_runs};
  return be;
}

}  // namespace detail
}  // namespace nbsmt

#endif  // x86-64
