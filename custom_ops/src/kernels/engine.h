// Internal machinery of the fast accumulate() (not part of the public interface).
//
// The NB-SMT reduction is rewritten as integer products over transformed
// operands, computed with u8 x s8 four-way dot products (AVX-512 VNNI `vpdpbusd`,
// or a portable emulation). Two methods:
//
// Dense (T = 1, T = 2). For T = 2 the collision indicator of a step factorises,
//   [n == 2] = nz(x0) nz(x1) * nz(w0) nz(w1),
// so with D(v) = R(v) - v the NB-SMT sum is an exact product plus a correction:
//   reduce=activations:  sum_k x_k w_k + sum_k (D(x_k) nz(x_q)) * (w_k nz(w_q))
//   reduce=weights:      sum_k x_k w_k + sum_k (x_k nz(x_q)) * (D(w_k) nz(w_q))
// (q = the partner slot of k in its step). Each slot therefore carries `nterms`
// (1 or 2) x-side bytes and w-side bytes, and acc = A . B^T over nterms * K.
//
// Gather (T = 4). n depends on all four slots, but only through the x-side
// non-zero pattern pi (4 bits) of the step and the weights. For a fixed pi the
// step's contribution is linear in the bytes x_t, R(x_t) of the slots in pi,
// with coefficients that depend on the weights only (w_t, R(w_t) or 0, chosen by
// n = |pi & nz(w)| and the reduce mode). So each (row, step) becomes one or two
// "entries" (the x bytes, compacted: |pi| <= 2 -> one dword, else two) that
// select a row of a weight table T[step][dword index][column], and
// acc[p][:] = sum over the entries of row p of (entry bytes . table row).
// That is ~1.25 dot products per step at 50 % activation sparsity (steps with
// pi = 0 give no entry), against 12 for the expansion of [n >= k] indicators
// into dense products. The table (20 dwords per step and column) is expanded
// from a compact form one slice (a block of steps x a column panel) at a time.
//
// Byte encodings for u8 x s8 dot products: the x side must be u8, so x-side
// values that can be negative get an offset o (value + o), corrected by
// colcorr[m] = -sum_j o_j B[m][j]. In the gather method with signed activations
// the roles swap: table bytes are stored + 128 as u8, entries are s8, and the
// correction is rowcorr[p] = -128 * (sum of the row's entry bytes).
// All arithmetic is int32 with wrap-around (exact modulo 2^32); the true results
// fit in int32 (K <= kMaxReductionLength), so the final values are exact.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "nbsmt/kernels.h"
#include "nbsmt/pack.h"

namespace nbsmt {
namespace detail {

enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };
const char* isa_name(Isa isa);
bool parse_isa(const char* name, Isa* out);  // "scalar"/"generic", "avx2", "avx512"

// Gather method: patterns pi = 1..15 take kGatherCount[pi] dwords (|pi| <= 2 -> 1,
// else 2) starting at dword index kGatherBase[pi] of a step; 20 dwords per step.
constexpr int kGatherDwords = 20;
extern const int8_t kGatherBase[16];
extern const int8_t kGatherCount[16];

struct GatherEntry {
  int32_t index;  // (step - first step of the block) * 20 + dword index
  int32_t bytes;  // four x-side bytes (u8, or s8 for signed activations)
};

// Everything derived from (cfg, steps, M): method, byte layout, blocking.
struct Plan {
  SmtConfig cfg;
  int T = 1;
  bool gather = false;
  int64_t steps = 0;
  int64_t K = 0;  // steps * T: elements of a packed row
  int64_t M = 0;

  // Column panels: full panels hold panel_nv vectors of 16 columns.
  int panel_nv = 4;
  int64_t npanels = 0;
  int64_t mpad16 = 0;  // M rounded up to 16
  int64_t panel_col0(int64_t p) const { return p * panel_nv * 16; }
  int panel_vectors(int64_t p) const;  // vectors of 16 columns in panel p

  // Blocks of steps (the reduction is processed block by block).
  int64_t block_steps = 0;
  int64_t nblocks = 0;
  int64_t block_step0(int64_t b) const { return b * block_steps; }
  int64_t block_len(int64_t b) const;

  // Rows per task (a task is a row tile x a group of panels).
  int64_t rows_per_task = 0;

  // Dense method. Elements are u8 (x side) x s8 (w side) in groups of 4 per dword,
  // or, with `wide` (the AVX2 backend), int16 x int16 in pairs per dword: every
  // x-side value then fits as it is (no offsets) and the AVX2 kernel multiplies
  // pairs with one vpmaddwd and no widening in the inner loop.
  bool wide = false;
  int nterms = 1;
  int x_offset[2] = {0, 0};                 // u8 offsets of the x-side terms (0 if wide)
  int64_t seg_bytes(int64_t b) const;       // bytes of one term in block b (multiple of 4)
  int64_t block_bytes(int64_t b) const { return nterms * seg_bytes(b); }
  int64_t max_block_bytes = 0;
  std::vector<int64_t> b_block_offset;      // byte offset of block b in the packed weights
  int64_t b_bytes = 0;                      // total packed weight bytes

  // Gather method: compact weights [panel][step][3][W][4] (w bytes, R(w) bytes,
  // non-zero pattern as int32), and a table slice [step][20][W][4] per block.
  int64_t source_panel_offset(int64_t p) const { return steps * 3 * 4 * panel_col0(p); }
  int64_t slice_bytes() const { return block_steps * kGatherDwords * panel_nv * 16 * 4; }
};

Plan make_plan(const SmtConfig& cfg, int64_t steps, int64_t M, bool wide);

// Per-step w-side sums for the statistics (stats.cc).
struct StatsSummary {
  std::vector<int64_t> wb, wbb, wcb;  // T = 1, 2: per slot (see stats.cc)
  std::vector<int32_t> g;             // T = 4: [step][81 codes][4]
};

// Branch-free "R(v) != v" (v within the operand range; R(0) = 0).
inline int changed_by_reduce(int v, bool is_signed) {
  if (is_signed) {
    const bool window = v >= -8 && v <= 7;
    const bool grid = (v & 15) == 0 && v <= 112;
    return !(window || grid);
  }
  const bool window = v < 16;
  const bool grid = (v & 15) == 0 && v <= 240;
  return !(window || grid);
}

struct Backend;

}  // namespace detail

// The public opaque type (kernels.h).
struct PreparedWeights {
  detail::Plan plan;
  const detail::Backend* be = nullptr;  // the backend the bytes were laid out for
  std::vector<uint8_t> bytes;    // dense: [block][panel][kq][W][4]; gather: compact source
  std::vector<int32_t> colcorr;  // dense: M entries added to every output of column m
  std::vector<int8_t> w;         // the weights (M x K), for the statistics summary
  mutable std::once_flag stats_once;
  mutable detail::StatsSummary stats;
  const detail::StatsSummary& stats_summary(const Parallel& parallel) const;
};

namespace detail {

// Operand reduction R of SPEC §3.3.
inline int reduce_value(int v, bool is_signed) {
  return is_signed ? reduce_signed(v) : reduce_unsigned(v);
}

// Dense-method x-side value (before the u8 offset) of term `term` for a slot
// with activation x whose partner activation is xp; and the w-side value.
inline int dense_x_value(const Plan& plan, int term, int x, int xp) {
  if (term == 0) return x;
  if (xp == 0) return 0;
  if (plan.cfg.reduce == Reduce::kActivations) return reduce_value(x, plan.cfg.act_signed) - x;
  return x;
}
inline int dense_w_value(const Plan& plan, int term, int w, int wp) {
  if (term == 0) return w;
  if (wp == 0) return 0;
  if (plan.cfg.reduce == Reduce::kActivations) return w;
  return reduce_signed(w) - w;
}

// ---- per-ISA pieces ---------------------------------------------------------

struct Backend {
  Isa isa;
  bool wide_dense;  // dense method on int16 pairs (Plan::wide)
  // Dense x side: bytes of block b for rows [0, nrows) (row r at x + r * x_stride)
  // to a + r * lda.
  void (*dense_transform)(const Plan& plan, int64_t b, const int16_t* x, int64_t x_stride,
                          int64_t nrows, uint8_t* a, int64_t lda);
  // Dense w side: the term-major bytes of block b of one weight row (T*len int8
  // at w) to out (block_bytes(b) bytes). Returns sum_j x_offset[term_j] * byte_j.
  int32_t (*dense_weight_row)(const Plan& plan, int64_t b, const int8_t* w, int8_t* out);
  // c[r][0 .. 16*nv) (+)= a[r] . panel for rows [0, nrows); panel layout [kq][W][4].
  void (*dense_gemm)(int64_t kq, const uint8_t* a, int64_t lda, int64_t nrows,
                     const uint8_t* panel, int nv, int32_t* c, int64_t ldc, bool first);
  // Gather compact weights of one column (its steps*4 int8 at w) into a panel of
  // W columns: per step the w dword, the R(w) dword and the non-zero pattern, at
  // dst + step * 3 * W * 4 (+ W * 4, + 2 * W * 4); dst points at the column.
  void (*gather_weight_column)(const Plan& plan, const int8_t* w, int64_t W, uint8_t* dst);
  // Gather entries of one x row for the steps of block b. Returns the count;
  // adds the sum of the entry bytes (as signed values) to *byte_sum.
  int64_t (*gather_entries)(const Plan& plan, int64_t b, const int16_t* x, GatherEntry* out,
                            int32_t* byte_sum);
  // Table slice for steps [s0, s0 + len) of a panel (W = 16 * nv columns) from
  // the compact weights of that panel.
  void (*gather_expand)(const Plan& plan, const uint8_t* source, int64_t s0, int64_t len, int nv,
                        uint8_t* slice);
  // c[0 .. 16*nv) (+)= sum over entries of bytes . slice row [index].
  void (*gather_gemm)(const GatherEntry* e, int64_t n, const uint8_t* slice, int nv,
                      bool act_signed, int32_t* c, bool first);
  // Statistics of rows [0, nrows), added to *out (active, collisions, reduced).
  void (*stats_rows)(const Plan& plan, const StatsSummary& s, const int16_t* x, int64_t x_stride,
                     int64_t nrows, SmtStats* out);
  // Float outputs of a tile (FloatOutput, kernels.h) whose rows lie in one image:
  // for r < rows, m < cols, with acc = c[r * ldc + m] + colcorr[m] (+ rowcorr[r])
  // (int32, wrapping), y[r * row_stride + m * col_stride] =
  // float32(scale[m] * float32(acc)) (+ bias[m] if bias is not null).
  void (*float_tile)(const int32_t* c, int64_t ldc, int64_t rows, int64_t cols,
                     const int32_t* colcorr, const int32_t* rowcorr, const float* scale,
                     const float* bias, float* y, int64_t row_stride, int64_t col_stride);
  // Wide dense method, one block, rows as runs (RunSource): c[r][0 .. 16*nv) =
  // sum over terms t < nterms, runs k, dwords q < kq_run of the pair at
  // ptrs[r * runs + k] + t * term1_offset + 2q times panel row
  // (t * runs + k) * kq_run + q. Null if the backend has no such kernel.
  void (*dense_gemm_runs)(int nterms, int64_t runs, int64_t kq_run, const int16_t* const* ptrs,
                          int64_t term1_offset, int64_t nrows, const uint8_t* panel, int nv,
                          int32_t* c, int64_t ldc);
};

// Portable float_tile; the AVX2 one is also used by the AVX-512 backend.
void generic_float_tile(const int32_t* c, int64_t ldc, int64_t rows, int64_t cols,
                        const int32_t* colcorr, const int32_t* rowcorr, const float* scale,
                        const float* bias, float* y, int64_t row_stride, int64_t col_stride);
#if defined(__x86_64__) || defined(_M_X64)
void avx2_correction_operands(const SmtConfig& cfg, const int16_t* x, int64_t n, int16_t* out);
void avx2_quantize_image(const Im2Col& plan, const float* x, int64_t s0, int64_t s1, float scale,
                         bool act_signed, int16_t* xq);
void avx2_float_tile(const int32_t* c, int64_t ldc, int64_t rows, int64_t cols,
                     const int32_t* colcorr, const int32_t* rowcorr, const float* scale,
                     const float* bias, float* y, int64_t row_stride, int64_t col_stride);
#endif

const Backend& generic_backend();
#if defined(__x86_64__) || defined(_M_X64)
const Backend& avx2_backend();
const Backend& avx512_backend();
#endif
// The backend accumulate() uses: forced, else NBSMT_KERNEL_ISA (read once), else
// the best the CPU supports.
const Backend& selected_backend();
// The backend for an explicit choice, or nullptr if the CPU lacks it.
const Backend* backend_for(Isa isa);

// Gather selectors: sel[bw][dword * 4 + byte] in {0 zero, 1 + t: w_t, 5 + t: R(w_t)}
// for the w-side non-zero pattern bw (portable table build, plan.cc).
struct GatherSelectors {
  uint8_t sel[16][kGatherDwords * 4];
};
const GatherSelectors& gather_selectors(Reduce reduce);

// pshufb controls of the x86 gather_expand, per reduce mode (0 activations,
// 1 weights), dword d and w-side pattern bw: pick a column's table bytes from its
// w dword (ctrl_w) and its R(w) dword (ctrl_r); 0x80 bytes give 0. Built from
// the selectors with portable code (plan.cc), whatever backend reads them.
struct GatherExpandControls {
  alignas(64) uint32_t ctrl_w[2][kGatherDwords][16];
  alignas(64) uint32_t ctrl_r[2][kGatherDwords][16];
};
const GatherExpandControls& gather_expand_controls();

// Portable pieces other backends reuse (backend_generic.cc).
int32_t generic_dense_weight_row(const Plan& plan, int64_t b, const int8_t* w, int8_t* out);
void generic_gather_weight_column(const Plan& plan, const int8_t* w, int64_t W, uint8_t* dst);
int64_t generic_gather_entries(const Plan& plan, int64_t b, const int16_t* x, GatherEntry* out,
                               int32_t* byte_sum);

// Statistics summary of the w side (stats.cc) and the generic per-row counters.
StatsSummary make_stats_summary(const Plan& plan, const int8_t* w, int64_t w_stride,
                                const Parallel& parallel);
void generic_stats_rows(const Plan& plan, const StatsSummary& s, const int16_t* x,
                        int64_t x_stride, int64_t nrows, SmtStats* out);

// The last step of stats_rows for T = 1, 2 (stats.cc): per-slot counts over a
// task's rows times the w-side sums. ca[k] = rows with x_k != 0; for T = 2 also
// caa[k] = rows with x_k and its partner non-zero, cca[k] = rows with x_k changed
// by R and its partner non-zero (caa, cca unused for T = 1).
template <class Count>
void add_slot_counts(const Plan& plan, const StatsSummary& s, const Count* ca, const Count* caa,
                     const Count* cca, SmtStats* out) {
  const int64_t K = plan.K;
  int64_t active = 0, collisions = 0, reduced = 0;
  for (int64_t k = 0; k < K; ++k) active += ca[k] * s.wb[k];
  if (plan.T == 2) {
    const bool act = plan.cfg.reduce == Reduce::kActivations;
    for (int64_t k = 0; k < K; k += 2) collisions += caa[k] * s.wbb[k];
    for (int64_t k = 0; k < K; ++k) reduced += act ? cca[k] * s.wbb[k] : caa[k] * s.wcb[k];
  }
  out->active_slots += active;
  out->collisions += collisions;
  out->reduced_operands += reduced;
}

}  // namespace detail
}  // namespace nbsmt
