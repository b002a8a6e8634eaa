// AVX-512 (F/BW/VL/VNNI) implementation of the per-ISA pieces (engine.h).
//
// Compiled for the baseline ISA; only the functions below carry target
// attributes and are reached through the Backend table after a CPU check, so
// the library still loads and runs on any x86-64.
#include <vector>

#include "engine.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized inside maskz intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#define NBSMT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define NBSMT_AVX512_INLINE \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"), always_inline)) inline

namespace nbsmt {
namespace detail {
namespace {

// R(v) on 32 int16 lanes (SPEC §3.3), same formula as reduce_unsigned/signed:
// round_half_even(v / 16) = (v + 7 + ((v >> 4) & 1)) >> 4 with floor shifts.
NBSMT_AVX512_INLINE __m512i reduce16(__m512i v, bool is_signed) {
  const __m512i one = _mm512_set1_epi16(1);
  const __m512i odd = _mm512_and_si512(_mm512_srai_epi16(v, 4), one);
  __m512i q = _mm512_srai_epi16(_mm512_add_epi16(_mm512_add_epi16(v, _mm512_set1_epi16(7)), odd), 4);
  if (is_signed) {
    q = _mm512_max_epi16(_mm512_min_epi16(q, _mm512_set1_epi16(7)), _mm512_set1_epi16(-8));
    const __m512i r = _mm512_slli_epi16(q, 4);
    const __mmask32 keep = _mm512_cmpge_epi16_mask(v, _mm512_set1_epi16(-8)) &
                           _mm512_cmple_epi16_mask(v, _mm512_set1_epi16(7));
    return _mm512_mask_blend_epi16(keep, r, v);
  }
  q = _mm512_min_epi16(q, _mm512_set1_epi16(15));
  const __m512i r = _mm512_slli_epi16(q, 4);
  return _mm512_mask_blend_epi16(_mm512_cmplt_epi16_mask(v, _mm512_set1_epi16(16)), r, v);
}

// acc + u8(a) . s8(b), four bytes per lane. Inline asm keeps the accumulator
// in place: GCC 12 copies registers around the intrinsic and spills.
NBSMT_AVX512_INLINE __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "vm"(b));
  return acc;
}

// The first n of 32 lanes (n may be <= 0 or >= 32).
inline __mmask32 lane_mask(int64_t n) {
  if (n <= 0) return 0;
  return n >= 32 ? 0xFFFFFFFFu : static_cast<__mmask32>((1ull << n) - 1);
}

// ---- dense ------------------------------------------------------------------

NBSMT_AVX512 void dense_transform(const Plan& plan, int64_t b, const int16_t* x, int64_t x_stride,
                                  int64_t nrows, uint8_t* a, int64_t lda) {
  const int T = plan.T;
  const int64_t seg = plan.seg_bytes(b);
  const int64_t n = T * plan.block_len(b);
  const bool sgn = plan.cfg.act_signed;
  const bool act = plan.cfg.reduce == Reduce::kActivations;
  const __m512i off0 = _mm512_set1_epi16(static_cast<int16_t>(plan.x_offset[0]));
  const __m512i off1 = _mm512_set1_epi16(static_cast<int16_t>(plan.x_offset[1]));
  for (int64_t r = 0; r < nrows; ++r) {
    const int16_t* xr = x + r * x_stride + plan.block_step0(b) * T;
    uint8_t* out = a + r * lda;
    for (int64_t l = 0; l < seg; l += 32) {
      const __mmask32 in = lane_mask(n - l);   // lanes holding real elements
      const __mmask32 st = lane_mask(seg - l); // bytes inside the segment
      const __m512i v = _mm512_maskz_loadu_epi16(in, xr + l);
      __m512i t0 = _mm512_add_epi16(v, off0);
      _mm256_mask_storeu_epi8(out + l, st, _mm512_cvtepi16_epi8(t0));
      if (T == 2) {
        // Partner slot: swap the two int16 halves of every dword (steps start even).
        const __m512i vp = _mm512_rol_epi32(v, 16);
        const __mmask32 pnz = _mm512_test_epi16_mask(vp, vp);
        __m512i t1 = act ? _mm512_sub_epi16(reduce16(v, sgn), v) : v;
        t1 = _mm512_add_epi16(_mm512_maskz_mov_epi16(pnz, t1), off1);
        _mm256_mask_storeu_epi8(out + seg + l, st, _mm512_cvtepi16_epi8(t1));
      }
    }
  }
}

NBSMT_AVX512 int32_t dense_weight_row(const Plan& plan, int64_t b, const int8_t* w, int8_t* out) {
  const int T = plan.T;
  const int64_t seg = plan.seg_bytes(b);
  const int64_t n = T * plan.block_len(b);
  const bool act = plan.cfg.reduce == Reduce::kActivations;
  const __m512i off0 = _mm512_set1_epi16(static_cast<int16_t>(plan.x_offset[0]));
  const __m512i off1 = _mm512_set1_epi16(static_cast<int16_t>(plan.x_offset[1]));
  __m512i corr = _mm512_setzero_si512();
  for (int64_t l = 0; l < seg; l += 32) {
    const __mmask32 in = lane_mask(n - l);
    const __mmask32 st = lane_mask(seg - l);
    const __m512i v = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(in, w + l));
    corr = _mm512_add_epi32(corr, _mm512_madd_epi16(v, off0));
    _mm256_mask_storeu_epi8(out + l, st, _mm512_cvtepi16_epi8(v));
    if (T == 2) {
      const __m512i vp = _mm512_rol_epi32(v, 16);
      const __mmask32 pnz = _mm512_test_epi16_mask(vp, vp);
      __m512i t1 = act ? v : _mm512_sub_epi16(reduce16(v, true), v);
      t1 = _mm512_maskz_mov_epi16(pnz, t1);
      corr = _mm512_add_epi32(corr, _mm512_madd_epi16(t1, off1));
      _mm256_mask_storeu_epi8(out + seg + l, st, _mm512_cvtepi16_epi8(t1));
    }
  }
  return _mm512_reduce_add_epi32(corr);
}

// MR rows x NV vectors of 16 columns; panel layout [kq][NV * 16][4].
template <int MR, int NV>
NBSMT_AVX512 void dense_micro(int64_t kq, const uint8_t* a, int64_t lda, const uint8_t* panel,
                              int32_t* c, int64_t ldc, bool first) {
  __m512i acc[MR][NV];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = first ? _mm512_setzero_si512() : _mm512_loadu_si512(c + r * ldc + v * 16);
    }
  }
  const uint8_t* bp = panel;
  for (int64_t q = 0; q < kq; ++q) {
    __m512i bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_si512(bp + v * 64);
    bp += NV * 64;
    for (int r = 0; r < MR; ++r) {
      int32_t a4;
      __builtin_memcpy(&a4, a + r * lda + 4 * q, 4);
      const __m512i av = _mm512_set1_epi32(a4);
      for (int v = 0; v < NV; ++v) acc[r][v] = dpbusd(acc[r][v], av, bv[v]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) _mm512_storeu_si512(c + r * ldc + v * 16, acc[r][v]);
  }
}

template <int NV>
NBSMT_AVX512 void dense_rows(int64_t kq, const uint8_t* a, int64_t lda, int64_t nrows,
                             const uint8_t* panel, int32_t* c, int64_t ldc, bool first) {
  constexpr int kMR = NV <= 2 ? 8 : 6;
  int64_t r = 0;
  for (; r + kMR <= nrows; r += kMR) {
    dense_micro<kMR, NV>(kq, a + r * lda, lda, panel, c + r * ldc, ldc, first);
  }
  const int64_t rest = nrows - r;
  a += r * lda;
  c += r * ldc;
  switch (rest) {
    case 1: dense_micro<1, NV>(kq, a, lda, panel, c, ldc, first); break;
    case 2: dense_micro<2, NV>(kq, a, lda, panel, c, ldc, first); break;
    case 3: dense_micro<3, NV>(kq, a, lda, panel, c, ldc, first); break;
    case 4: dense_micro<4, NV>(kq, a, lda, panel, c, ldc, first); break;
    case 5: dense_micro<5, NV>(kq, a, lda, panel, c, ldc, first); break;
    case 6: dense_micro<6, NV>(kq, a, lda, panel, c, ldc, first); break;
    case 7: dense_micro<7, NV>(kq, a, lda, panel, c, ldc, first); break;
    default: break;
  }
}

NBSMT_AVX512 void dense_gemm(int64_t kq, const uint8_t* a, int64_t lda, int64_t nrows,
                             const uint8_t* panel, int nv, int32_t* c, int64_t ldc, bool first) {
  switch (nv) {
    case 1: dense_rows<1>(kq, a, lda, nrows, panel, c, ldc, first); break;
    case 2: dense_rows<2>(kq, a, lda, nrows, panel, c, ldc, first); break;
    case 3: dense_rows<3>(kq, a, lda, nrows, panel, c, ldc, first); break;
    default: dense_rows<4>(kq, a, lda, nrows, panel, c, ldc, first); break;
  }
}

// ---- gather -----------------------------------------------------------------

// Compact weights of one column (engine.h): for every step the w dword, the
// R(w) dword and the non-zero pattern, at dst + step * 3 * W * 4 (+ W * 4, + 2 W * 4).
NBSMT_AVX512 void gather_weight_column(const Plan& plan, const int8_t* w, int64_t W,
                                       uint8_t* dst) {
  const __m512i step_index = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
      _mm512_set1_epi32(static_cast<int>(3 * W)));
  const __m512i bit_weights = _mm512_set1_epi32(0x08040201);
  const __m512i ones = _mm512_set1_epi8(1);
  int32_t* out = reinterpret_cast<int32_t*>(dst);
  for (int64_t s = 0; s < plan.steps; s += 16) {
    const int64_t n = plan.steps - s < 16 ? plan.steps - s : 16;
    const __mmask64 in = n == 16 ? ~__mmask64{0} : ((__mmask64{1} << (4 * n)) - 1);
    const __m512i v = _mm512_maskz_loadu_epi8(in, w + 4 * s);
    const __m512i lo = reduce16(_mm512_cvtepi8_epi16(_mm512_castsi512_si256(v)), true);
    const __m512i hi = reduce16(_mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(v, 1)), true);
    const __m512i r = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi16_epi8(lo)),
                                         _mm512_cvtepi16_epi8(hi), 1);
    const __m512i flags = _mm512_and_si512(_mm512_movm_epi8(_mm512_test_epi8_mask(v, v)), bit_weights);
    const __m512i bw = _mm512_dpbusd_epi32(_mm512_setzero_si512(), flags, ones);
    const __mmask16 st = static_cast<__mmask16>((1u << n) - 1);
    int32_t* base = out + s * 3 * W;
    _mm512_mask_i32scatter_epi32(base, st, step_index, v, 4);
    _mm512_mask_i32scatter_epi32(base + W, st, step_index, r, 4);
    _mm512_mask_i32scatter_epi32(base + 2 * W, st, step_index, bw, 4);
  }
}

// Per pattern pi: pshufb control that compacts a step's bytes
// [x0 x1 x2 x3 r0 r1 r2 r3] into (dword1, dword2) (engine.h), and the table
// index data: kGatherBase[pi] | (two dwords ? 1 << 40 : 0).
struct GatherLuts {
  alignas(64) uint64_t ctrl[16];
  alignas(64) uint64_t base[16];
};

GatherLuts make_gather_luts() {
  GatherLuts l{};
  for (int pi = 0; pi < 16; ++pi) {
    uint8_t c[8];
    for (int i = 0; i < 8; ++i) c[i] = 0x80;
    int slots[4], ns = 0;
    for (int t = 0; t < 4; ++t) {
      if (pi >> t & 1) slots[ns++] = t;
    }
    for (int j = 0; j < ns; ++j) {
      c[j] = static_cast<uint8_t>(slots[j]);                         // x byte
      c[(ns <= 2 ? 2 : 4) + j] = static_cast<uint8_t>(4 + slots[j]);  // R(x) byte
    }
    __builtin_memcpy(&l.ctrl[pi], c, 8);
    l.base[pi] = pi == 0 ? 0
                         : static_cast<uint64_t>(kGatherBase[pi]) |
                               (kGatherCount[pi] == 2 ? (uint64_t{1} << 40) : 0);
  }
  return l;
}

const GatherLuts& gather_luts() {
  static const GatherLuts luts = make_gather_luts();
  return luts;
}

NBSMT_AVX512 int64_t gather_entries(const Plan& plan, int64_t b, const int16_t* x,
                                    GatherEntry* out, int32_t* byte_sum) {
  const bool sgn = plan.cfg.act_signed;
  const int64_t s0 = plan.block_step0(b);
  const int64_t len = plan.block_len(b);
  const GatherLuts& luts = gather_luts();
  const __m512i ctrl_lo = _mm512_load_si512(luts.ctrl), ctrl_hi = _mm512_load_si512(luts.ctrl + 8);
  const __m512i base_lo = _mm512_load_si512(luts.base), base_hi = _mm512_load_si512(luts.base + 8);
  const __m512i pair_idx = _mm512_set_epi32(15, 7, 14, 6, 13, 5, 12, 4, 11, 3, 10, 2, 9, 1, 8, 0);
  const __m512i nibble_shift = _mm512_set_epi64(28, 24, 20, 16, 12, 8, 4, 0);
  const __m512i odd_lane = _mm512_set_epi64(0x0808080808080808ll, 0, 0x0808080808080808ll, 0,
                                            0x0808080808080808ll, 0, 0x0808080808080808ll, 0);
  const __m512i step_idx = _mm512_set_epi64(7 * kGatherDwords, 6 * kGatherDwords, 5 * kGatherDwords,
                                            4 * kGatherDwords, 3 * kGatherDwords, 2 * kGatherDwords,
                                            kGatherDwords, 0);
  const __m512i low32 = _mm512_set1_epi64(0xFFFFFFFFll);
  const __m512i two_flag = _mm512_set1_epi64(int64_t{1} << 40);
  const __m512i ones16 = _mm512_set1_epi16(1);
  __m512i sumv = _mm512_setzero_si512();
  int64_t n = 0;
  const int16_t* xs = x + s0 * 4;
  // The next block of this row is read after all other rows of the task: fetch
  // it now so that the walk over rows is not one cache miss per row.
  if (b + 1 < plan.nblocks) {
    const char* next = reinterpret_cast<const char*>(xs + 4 * len);
    const int64_t bytes = 8 * plan.block_len(b + 1);
    for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(next + o, _MM_HINT_T0);
  }
  for (int64_t i = 0; i < len; i += 8) {  // 8 steps = 32 lanes
    const __m512i v = _mm512_maskz_loadu_epi16(lane_mask(4 * (len - i)), xs + 4 * i);
    const __mmask32 nzm = _mm512_test_epi16_mask(v, v);
    if (nzm == 0) continue;
    const __m512i rv = reduce16(v, sgn);
    if (sgn) sumv = _mm512_add_epi32(sumv, _mm512_madd_epi16(_mm512_add_epi16(v, rv), ones16));
    // dwords [x_s0..x_s7 | r_s0..r_s7] -> qword per step (x bytes, R bytes).
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi16_epi8(v)),
                                            _mm512_cvtepi16_epi8(rv), 1);
    const __m512i steps8 = _mm512_permutexvar_epi32(pair_idx, both);
    const __m512i pi = _mm512_and_si512(
        _mm512_srlv_epi64(_mm512_set1_epi64(static_cast<int64_t>(nzm)), nibble_shift),
        _mm512_set1_epi64(15));
    const __m512i ctrl =
        _mm512_add_epi8(_mm512_permutex2var_epi64(ctrl_lo, pi, ctrl_hi), odd_lane);
    const __m512i packed = _mm512_shuffle_epi8(steps8, ctrl);
    const __m512i bdata = _mm512_permutex2var_epi64(base_lo, pi, base_hi);
    const __m512i idx1 = _mm512_add_epi64(
        _mm512_add_epi64(_mm512_set1_epi64(i * kGatherDwords), step_idx),
        _mm512_and_si512(bdata, _mm512_set1_epi64(0xFF)));
    const __mmask8 m1 = _mm512_test_epi64_mask(pi, pi);
    const __mmask8 m2 = _mm512_test_epi64_mask(bdata, two_flag);
    const __m512i e1 = _mm512_or_si512(_mm512_slli_epi64(packed, 32), idx1);
    const __m512i e2 = _mm512_or_si512(_mm512_andnot_si512(low32, packed),
                                       _mm512_add_epi64(idx1, _mm512_set1_epi64(1)));
    _mm512_storeu_si512(out + n, _mm512_maskz_compress_epi64(m1, e1));
    n += __builtin_popcount(m1);
    _mm512_storeu_si512(out + n, _mm512_maskz_compress_epi64(m2, e2));
    n += __builtin_popcount(m2);
  }
  if (sgn) *byte_sum += _mm512_reduce_add_epi32(sumv);
  return n;
}

NBSMT_AVX512 void gather_expand(const Plan& plan, const uint8_t* source, int64_t s0, int64_t len,
                                int nv, uint8_t* slice) {
  const int64_t W4 = static_cast<int64_t>(nv) * 64;  // bytes of one table row
  const GatherExpandControls& luts = gather_expand_controls();
  const int mode = plan.cfg.reduce == Reduce::kActivations ? 0 : 1;
  // pshufb indexes within 16-byte lanes: column c's bytes sit at 4 * (c % 4).
  const __m512i lane_base = _mm512_set_epi32(
      0x0c0c0c0c, 0x08080808, 0x04040404, 0, 0x0c0c0c0c, 0x08080808, 0x04040404, 0, 0x0c0c0c0c,
      0x08080808, 0x04040404, 0, 0x0c0c0c0c, 0x08080808, 0x04040404, 0);
  const __m512i flip = _mm512_set1_epi8(plan.cfg.act_signed ? static_cast<char>(0x80) : 0);
  for (int64_t s = 0; s < len; ++s) {
    const uint8_t* src = source + (s0 + s) * 3 * W4;
    uint8_t* dst = slice + s * kGatherDwords * W4;
    for (int v = 0; v < nv; ++v) {
      const __m512i wv = _mm512_loadu_si512(src + v * 64);
      const __m512i rv = _mm512_loadu_si512(src + W4 + v * 64);
      const __m512i bw = _mm512_loadu_si512(src + 2 * W4 + v * 64);
      for (int d = 0; d < kGatherDwords; ++d) {
        const __m512i cw = _mm512_add_epi8(
            _mm512_permutexvar_epi32(bw, _mm512_load_si512(luts.ctrl_w[mode][d])), lane_base);
        const __m512i cr = _mm512_add_epi8(
            _mm512_permutexvar_epi32(bw, _mm512_load_si512(luts.ctrl_r[mode][d])), lane_base);
        const __m512i out = _mm512_or_si512(_mm512_shuffle_epi8(wv, cw), _mm512_shuffle_epi8(rv, cr));
        _mm512_storeu_si512(dst + d * W4 + v * 64, _mm512_xor_si512(out, flip));
      }
    }
  }
}

template <int NV, bool SIGNED>
NBSMT_AVX512 void gather_micro(const GatherEntry* e, int64_t n, const uint8_t* table, int32_t* c,
                               bool first) {
  constexpr int64_t kRow = NV * 64;
  constexpr int kSets = NV <= 4 ? 2 : 1;  // independent accumulators to hide latency
  __m512i acc[kSets][NV];
  for (int v = 0; v < NV; ++v) {
    acc[0][v] = first ? _mm512_setzero_si512() : _mm512_loadu_si512(c + v * 16);
    if (kSets == 2) acc[kSets - 1][v] = _mm512_setzero_si512();
  }
  int64_t i = 0;
  for (; i + kSets <= n; i += kSets) {
    for (int s = 0; s < kSets; ++s) {
      const uint8_t* row = table + static_cast<int64_t>(e[i + s].index) * kRow;
      const __m512i d = _mm512_set1_epi32(e[i + s].bytes);
      for (int v = 0; v < NV; ++v) {
        const __m512i t = _mm512_loadu_si512(row + v * 64);
        acc[s][v] = SIGNED ? dpbusd(acc[s][v], t, d)
                           : dpbusd(acc[s][v], d, t);
      }
    }
  }
  for (; i < n; ++i) {
    const uint8_t* row = table + static_cast<int64_t>(e[i].index) * kRow;
    const __m512i d = _mm512_set1_epi32(e[i].bytes);
    for (int v = 0; v < NV; ++v) {
      const __m512i t = _mm512_loadu_si512(row + v * 64);
      acc[0][v] = SIGNED ? dpbusd(acc[0][v], t, d) : dpbusd(acc[0][v], d, t);
    }
  }
  for (int v = 0; v < NV; ++v) {
    __m512i sum = acc[0][v];
    if (kSets == 2) sum = _mm512_add_epi32(sum, acc[kSets - 1][v]);
    _mm512_storeu_si512(c + v * 16, sum);
  }
}

template <bool SIGNED>
NBSMT_AVX512 void gather_dispatch(const GatherEntry* e, int64_t n, const uint8_t* table, int nv,
                                  int32_t* c, bool first) {
  switch (nv) {
    case 1: gather_micro<1, SIGNED>(e, n, table, c, first); break;
    case 2: gather_micro<2, SIGNED>(e, n, table, c, first); break;
    case 3: gather_micro<3, SIGNED>(e, n, table, c, first); break;
    case 4: gather_micro<4, SIGNED>(e, n, table, c, first); break;
    case 5: gather_micro<5, SIGNED>(e, n, table, c, first); break;
    case 6: gather_micro<6, SIGNED>(e, n, table, c, first); break;
    case 7: gather_micro<7, SIGNED>(e, n, table, c, first); break;
    default: gather_micro<8, SIGNED>(e, n, table, c, first); break;
  }
}

NBSMT_AVX512 void gather_gemm(const GatherEntry* e, int64_t n, const uint8_t* table, int nv,
                              bool act_signed, int32_t* c, bool first) {
  if (act_signed) {
    gather_dispatch<true>(e, n, table, nv, c, first);
  } else {
    gather_dispatch<false>(e, n, table, nv, c, first);
  }
}

// ---- statistics (stats.cc explains the factorisation) --------------------------

// "R(v) != v" on 32 int16 lanes.
NBSMT_AVX512_INLINE __mmask32 changed16(__m512i v, bool is_signed) {
  const __mmask32 grid0 = _mm512_testn_epi16_mask(v, _mm512_set1_epi16(15));
  if (is_signed) {
    const __mmask32 window = _mm512_cmpge_epi16_mask(v, _mm512_set1_epi16(-8)) &
                             _mm512_cmple_epi16_mask(v, _mm512_set1_epi16(7));
    const __mmask32 grid = grid0 & _mm512_cmple_epi16_mask(v, _mm512_set1_epi16(112));
    return static_cast<__mmask32>(~(window | grid));
  }
  const __mmask32 window = _mm512_cmplt_epi16_mask(v, _mm512_set1_epi16(16));
  const __mmask32 grid = grid0 & _mm512_cmple_epi16_mask(v, _mm512_set1_epi16(240));
  return static_cast<__mmask32>(~(window | grid));
}

NBSMT_AVX512 void stats_rows_lanes(const Plan& plan, const StatsSummary& s, const int16_t* x,
                                   int64_t x_stride, int64_t nrows, SmtStats* out) {
  // Per-slot counters over at most rows_per_task (< 32768) rows fit int16.
  const int64_t K = plan.K;
  const int64_t Kp = (K + 31) / 32 * 32;
  const bool two = plan.T == 2;
  const bool sgn = plan.cfg.act_signed;
  const int nf = two ? 3 : 1;
  std::vector<int16_t> cnt(static_cast<size_t>(nf * Kp), 0);
  int16_t* ca = cnt.data();
  int16_t* caa = ca + Kp;
  int16_t* cca = caa + Kp;
  const __m512i minus1 = _mm512_set1_epi16(-1);
  for (int64_t r = 0; r < nrows; ++r) {
    const int16_t* xr = x + r * x_stride;
    for (int64_t l = 0; l < K; l += 32) {
      const __m512i v = _mm512_maskz_loadu_epi16(lane_mask(K - l), xr + l);
      const __mmask32 a = _mm512_test_epi16_mask(v, v);
      __m512i c = _mm512_loadu_si512(ca + l);
      _mm512_storeu_si512(ca + l, _mm512_mask_sub_epi16(c, a, c, minus1));
      if (two) {
        const __m512i vq = _mm512_rol_epi32(v, 16);
        const __mmask32 aq = _mm512_test_epi16_mask(vq, vq);
        c = _mm512_loadu_si512(caa + l);
        _mm512_storeu_si512(caa + l, _mm512_mask_sub_epi16(c, a & aq, c, minus1));
        c = _mm512_loadu_si512(cca + l);
        _mm512_storeu_si512(cca + l, _mm512_mask_sub_epi16(c, changed16(v, sgn) & aq, c, minus1));
      }
    }
  }
  add_slot_counts(plan, s, ca, caa, cca, out);
}

NBSMT_AVX512 void stats_rows_codes(const Plan& plan, const StatsSummary& s, const int16_t* x,
                                   int64_t x_stride, int64_t nrows, SmtStats* out) {
  const bool sgn = plan.cfg.act_signed;
  const int64_t steps = plan.steps;
  // Slot weights of the base-3 step code: (1, 3) and (9, 27) pairs for madd.
  const __m512i code_weights = _mm512_set1_epi64(0x001b000900030001ll);
  const __m512i step81 = _mm512_set_epi64(7 * 81, 6 * 81, 5 * 81, 4 * 81, 3 * 81, 2 * 81, 81, 0);
  const __m512i low32 = _mm512_set1_epi64(0xFFFFFFFFll);
  const __m512i one16 = _mm512_set1_epi16(1);
  __m512i sum_active = _mm512_setzero_si512(), sum_coll = _mm512_setzero_si512();
  __m512i sum_red = _mm512_setzero_si512();
  const long long* g = reinterpret_cast<const long long*>(s.g.data());  // [step][81] x 2 qwords
  for (int64_t r = 0; r < nrows; ++r) {
    const int16_t* xr = x + r * x_stride;
    for (int64_t i = 0; i < steps; i += 8) {
      const int64_t n = steps - i < 8 ? steps - i : 8;
      const __m512i v = _mm512_maskz_loadu_epi16(lane_mask(4 * n), xr + 4 * i);
      const __mmask32 a = _mm512_test_epi16_mask(v, v);
      // state = nz + changed: 0, 1 or 2 per slot.
      const __m512i st = _mm512_mask_add_epi16(_mm512_maskz_mov_epi16(a, one16), changed16(v, sgn),
                                               _mm512_maskz_mov_epi16(a, one16), one16);
      const __m512i pairs = _mm512_madd_epi16(st, code_weights);      // dwords: s0+3s1, 9s2+27s3
      const __m512i code = _mm512_and_si512(_mm512_add_epi64(pairs, _mm512_srli_epi64(pairs, 32)), low32);
      const __m512i idx = _mm512_add_epi64(
          _mm512_add_epi64(code, step81), _mm512_set1_epi64((i)*81));
      const __mmask8 valid = static_cast<__mmask8>((1u << n) - 1);
      const __m512i idx2 = _mm512_slli_epi64(idx, 1);               // two qwords per entry
      const __m512i q0 = _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), valid, idx2, g, 8);
      const __m512i q1 = _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), valid,
                                                     _mm512_add_epi64(idx2, _mm512_set1_epi64(1)), g, 8);
      sum_active = _mm512_add_epi64(sum_active, _mm512_and_si512(q0, low32));
      sum_coll = _mm512_add_epi64(sum_coll, _mm512_srli_epi64(q0, 32));
      sum_red = _mm512_add_epi64(sum_red, _mm512_and_si512(q1, low32));
    }
  }
  out->active_slots += _mm512_reduce_add_epi64(sum_active);
  out->collisions += _mm512_reduce_add_epi64(sum_coll);
  out->reduced_operands += _mm512_reduce_add_epi64(sum_red);
}

NBSMT_AVX512 void stats_rows(const Plan& plan, const StatsSummary& s, const int16_t* x,
                             int64_t x_stride, int64_t nrows, SmtStats* out) {
  if (plan.T == 4) {
    stats_rows_codes(plan, s, x, x_stride, nrows, out);
  } else {
    stats_rows_lanes(plan, s, x, x_stride, nrows, out);
  }
}

}  // namespace

const Backend& avx512_backend() {
  static const Backend be{Isa::kAvx512,        false,        dense_transform, dense_weight_row,
                          dense_gemm,          gather_weight_column, gather_entries,
                          gather_expand,       gather_gemm,      stats_rows,
                          avx2_float_tile,     nullptr};
  return be;
}

}  // namespace detail
}  // namespace nbsmt

#endif  // x86-64
