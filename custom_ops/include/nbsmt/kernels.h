// NB-SMT arithmetic kernels: pure math on pointers and shapes, no ONNX Runtime types.
//
// The contract is SPEC.md §2-§3. The ORT glue (src/ort/) quantizes activations,
// lays the reduction axis out in the "packed" order described below (im2col for
// Conv), accumulates (prepare_weights() + accumulate_prepared()), and scales the
// integer accumulators to float. Nothing here keeps state between calls.
//
// Packed layout. Every reduction of K elements is split among T threads
// according to the mapping (channel blocks or interleave). The glue reorders
// each row of activations and weights into S steps x T slots,
//     packed[s * T + t] = element that thread t handles at step s,
// with 0 in idle slots (a missing element at the end of a block). A zero
// operand makes its slot inactive, so idle slots need no special case and the
// kernel below is independent of the mapping.
//
// Implementation (src/kernels/engine.h explains the math): T = 1 and T = 2 are
// exact integer matrix products of transformed operands (T = 2: the exact product
// plus a correction product, since the collision indicator factorises); T = 4
// gathers, per step, rows of a weight table selected by the activations'
// non-zero pattern. Integer arithmetic throughout, so every result equals
// accumulate_scalar() exactly; runtime-dispatched AVX-512 VNNI / AVX2 / portable code.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace nbsmt {

enum class Reduce : int { kActivations = 0, kWeights = 1 };

// The largest reduction length for which an int32 accumulator is exact
// (the largest product is 255 * -128 = -32640, with a reduced weight; K * 32640 < 2^31).
constexpr int64_t kMaxReductionLength = 65793;

struct SmtConfig {
  int threads = 2;                   // T: 1, 2 or 4
  Reduce reduce = Reduce::kActivations;
  bool act_signed = false;           // activations in [-127, 127] (else [0, 255])
};

// Counters of SPEC.md §3.4, summed over a call.
struct SmtStats {
  int64_t groups = 0;            // output elements x steps
  int64_t active_slots = 0;      // sum over (element, step) of n
  int64_t collisions = 0;        // (element, step) pairs with n >= 2
  int64_t reduced_operands = 0;  // operands of active threads changed by R
  void add(const SmtStats& o) {
    groups += o.groups;
    active_slots += o.active_slots;
    collisions += o.collisions;
    reduced_operands += o.reduced_operands;
  }
};

// Runs fn(data, i) for i in [0, total), possibly concurrently. The ORT glue
// backs it with KernelContext_ParallelFor; tests use run_serial.
struct Parallel {
  void* ctx = nullptr;
  void (*run)(void* ctx, void (*fn)(void*, size_t), size_t total, void* data) = nullptr;
  void operator()(void (*fn)(void*, size_t), size_t total, void* data) const {
    if (run == nullptr || total <= 1) {
      for (size_t i = 0; i < total; ++i) fn(data, i);
    } else {
      run(ctx, fn, total, data);
    }
  }
};

// One NB-SMT "GEMM":
//   acc[p * acc_row_stride + m * acc_col_stride] =
//       NB-SMT reduction over s in [0, steps) of (x[p][s*T + t], w[m][s*T + t]), t < T
// x: P rows of steps*T quantized activations (row stride x_stride, elements);
// w: M rows of steps*T int8 weights in [-127, 127] (row stride w_stride).
// stats (nullable): counters of this call are *added* to *stats.
// The result is identical, integer for integer, whatever `parallel` does.
// Exactly prepare_weights() + accumulate_prepared(): the weights are prepared on
// every call and nothing is kept between calls (the library has no caches). When
// the same weights meet several blocks of rows (images, chunks, calls), prepare
// them once and keep the PreparedWeights (the ORT glue keeps them per node).
void accumulate(const SmtConfig& cfg, int64_t P, int64_t M, int64_t steps,
                const int16_t* x, int64_t x_stride, const int8_t* w, int64_t w_stride,
                int32_t* acc, int64_t acc_row_stride, int64_t acc_col_stride,
                SmtStats* stats, const Parallel& parallel);

// Weights transformed for the fast kernels (a few bytes per weight). Immutable
// once built: share it between threads and calls while the weights are unchanged.
struct PreparedWeights;
std::shared_ptr<const PreparedWeights> prepare_weights(const SmtConfig& cfg, int64_t M,
                                                       int64_t steps, const int8_t* w,
                                                       int64_t w_stride,
                                                       const Parallel& parallel);

// Packed activation rows produced on demand (e.g. im2col), inside the worker
// tasks and concurrently for disjoint ranges: fill(ctx, p0, p1, out) writes rows
// [p0, p1), row p at out + (p - p0) * steps * T. `out` is zero-filled before the
// call, so slots the producer never writes (idle slots) read as 0. Rows go from
// the producer through the kernels while they are in cache: no P x K buffer.
struct RowSource {
  void* ctx = nullptr;
  void (*fill)(void* ctx, int64_t p0, int64_t p1, int16_t* out) = nullptr;
  // The producer writes every slot of its rows (idle ones as 0): `out` is then
  // not zero-filled before the call.
  bool writes_every_slot = false;
};

// Packed rows given as runs of already quantized data (an "indirect" GEMM: no
// im2col copy). Row p is the concatenation of `runs` runs of `run_length` slots;
// fill(ctx, p0, p1, out) writes, for rows [p0, p1), the start of run k of row p
// at out[(p - p0) * runs + k] (run_length int16 there). With T = 2 the kernels
// also read the slots' correction operands (correction_operands()) at
// ptr + term1_offset. Used only by kernels that support it (AVX2, T = 1 and 2,
// no stats, the reduction in one block); otherwise the RowSource is used.
struct RunSource {
  void* ctx = nullptr;
  void (*fill)(void* ctx, int64_t p0, int64_t p1, const int16_t** out) = nullptr;
  int64_t runs = 0, run_length = 0, term1_offset = 0;
  // T = 4 (gather method): the entries of every run, made once per run by
  // gather_run_entries() (a pixel's entries then serve every row that reads
  // it, instead of being made again per row). fill_records(ctx, p0, p1, out)
  // writes, for rows [p0, p1), the record of run k of row p at
  // out[(p - p0) * runs + k]. Null: T = 4 rows are made by the RowSource.
  void (*fill_records)(void* ctx, int64_t p0, int64_t p1, const int32_t** out) = nullptr;
};

// T = 4 with a RunSource: the int32 size of one run's entry record, and the
// record of the run of `run_length` slots at x (its steps in order; entry
// indexes count from the run's first step).
// Used by accumulate_prepared() when the weights take that path (reads_gather_runs).
int64_t gather_record_ints(int64_t run_length);
void gather_run_entries(const PreparedWeights& w, const int16_t* x, int64_t run_length,
                        int32_t* record);
// Whether accumulate_prepared() uses the runs' entry records for these weights.
bool reads_gather_runs(const PreparedWeights& w, int64_t run_length);

// Whether accumulate_prepared() reads a RunSource with runs of `run_length`
// slots in place for these weights (and then, for T = 2, its correction operands).
bool reads_runs(const PreparedWeights& w, int64_t run_length);

// The T = 2 correction operand of each slot of packed data (pairs of slots
// (2i, 2i + 1) are the two threads of a step): reduce=activations
// (R(x) - x) * [partner != 0], reduce=weights x * [partner != 0]. n even.
void correction_operands(const SmtConfig& cfg, const int16_t* x, int64_t n, int16_t* out);

// Float outputs written by the kernels' tile writer instead of int32
// accumulators (docs/ops.md §4.5, no second pass over the output): for row r and
// column m, y[(r / rows_per_image) * image_stride + (r % rows_per_image) * row_stride
// + m * col_stride] = float32(scale[m] * float32(acc)), then + bias[m] if bias
// is not null (each operation rounded to float32, no FMA).
struct FloatOutput {
  float* y = nullptr;
  const float* scale = nullptr;
  const float* bias = nullptr;
  int64_t rows_per_image = 1, image_stride = 0, row_stride = 0, col_stride = 1;
};

// accumulate() with prepared weights (cfg, M and steps come from `w`), rows
// from memory or from a RowSource.
void accumulate_prepared(const PreparedWeights& w, int64_t P, const int16_t* x, int64_t x_stride,
                         int32_t* acc, int64_t acc_row_stride, int64_t acc_col_stride,
                         SmtStats* stats, const Parallel& parallel);
void accumulate_prepared(const PreparedWeights& w, int64_t P, const RowSource& rows,
                         int32_t* acc, int64_t acc_row_stride, int64_t acc_col_stride,
                         SmtStats* stats, const Parallel& parallel);
// The same with the output scaling fused into the tile writer (FloatOutput).
void accumulate_prepared(const PreparedWeights& w, int64_t P, const int16_t* x, int64_t x_stride,
                         const FloatOutput& out, SmtStats* stats, const Parallel& parallel);
void accumulate_prepared(const PreparedWeights& w, int64_t P, const RowSource& rows,
                         const FloatOutput& out, SmtStats* stats, const Parallel& parallel);
// Rows from `runs` where the kernels can read them in place (see RunSource),
// else from `rows`; identical results.
void accumulate_prepared(const PreparedWeights& w, int64_t P, const RowSource& rows,
                         const RunSource& runs, const FloatOutput& out, SmtStats* stats,
                         const Parallel& parallel);

// Kernel implementation used by accumulate(): "generic" (portable C++), "avx2" or
// "avx512" (AVX-512 BW/VL/VNNI). By default the best one the CPU supports; the
// environment variable NBSMT_KERNEL_ISA=scalar|avx2|avx512 (read once) or
// force_kernel() choose another (tests prove every one equal to the scalar loop).
// force_kernel(nullptr) restores the default; it returns false if `name` is
// unknown or the CPU cannot run it.
bool force_kernel(const char* name);
const char* active_kernel();

// Straightforward loop over the SPEC rules; the ground truth accumulate() is
// tested against in C++ (and the NumPy reference in Python).
void accumulate_scalar(const SmtConfig& cfg, int64_t P, int64_t M, int64_t steps,
                       const int16_t* x, int64_t x_stride, const int8_t* w, int64_t w_stride,
                       int32_t* acc, int64_t acc_row_stride, int64_t acc_col_stride,
                       SmtStats* stats);

// SPEC.md §3.3 operand reduction R to a 4-bit window (values stay on the 8-bit grid).
inline int reduce_unsigned(int v) {
  if (v < 16) return v;
  // round_half_even(v / 16) for v >= 0
  int q = v >> 4, r = v & 15;
  if (r > 8 || (r == 8 && (q & 1))) ++q;
  if (q > 15) q = 15;
  return q * 16;
}
inline int reduce_signed(int v) {
  if (v >= -8 && v <= 7) return v;
  // round_half_even(v / 16) with floor division (works for negatives)
  int q = v >> 4, r = v - q * 16;  // r in [0, 16)
  if (r > 8 || (r == 8 && (q & 1))) ++q;
  if (q < -8) q = -8;
  if (q > 7) q = 7;
  return q * 16;
}

// SPEC.md §2: Xq = clip(round_half_even(float32(x) / s_x), lo, hi); NaN -> 0.
int16_t quantize_activation(float x, float x_scale, bool act_signed);

}  // namespace nbsmt
