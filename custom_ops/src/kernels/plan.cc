// Layout planning, weight preparation and the parallel driver of the fast kernels
// (engine.h).
#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>

#include "engine.h"

namespace nbsmt {
namespace detail {

// Patterns pi = 1..15 in numeric order; |pi| <= 2 takes one dword, else two.
const int8_t kGatherCount[16] = {0, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1, 2, 1, 2, 2, 2};
const int8_t kGatherBase[16] = {-1, 0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 13, 14, 16, 18};

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Cache blocking targets (bytes): a dense block of A rows (6 rows per
// micro-kernel) stays in L1 while a block-panel of weights streams from L2; a
// gather table slice stays in L2 while all rows of a task use it.
constexpr int64_t kDenseBlockBytes = 2048;
constexpr int64_t kGatherSliceBytes = 160 * 1024;

}  // namespace

int Plan::panel_vectors(int64_t p) const {
  const int64_t rest = mpad16 / 16 - p * panel_nv;
  return static_cast<int>(rest < panel_nv ? rest : panel_nv);
}

int64_t Plan::block_len(int64_t b) const {
  const int64_t len = steps - block_step0(b);
  return len < block_steps ? len : block_steps;
}

int64_t Plan::seg_bytes(int64_t b) const {
  return wide ? round_up(T * block_len(b), 2) * 2 : round_up(T * block_len(b), 4);
}

Plan make_plan(const SmtConfig& cfg, int64_t steps, int64_t M, bool wide) {
  Plan plan;
  plan.wide = wide && cfg.threads != 4;
  plan.cfg = cfg;
  plan.T = cfg.threads;
  plan.gather = cfg.threads == 4;
  plan.steps = steps;
  plan.K = steps * cfg.threads;
  plan.M = M;
  plan.mpad16 = round_up(std::max<int64_t>(M, 1), 16);
  plan.panel_nv = static_cast<int>(std::min<int64_t>(plan.gather ? 8 : 4, plan.mpad16 / 16));
  plan.npanels = ceil_div(plan.mpad16 / 16, plan.panel_nv);

  if (plan.gather) {
    const int64_t per_step = kGatherDwords * 4 * plan.panel_nv * 16;
    const int64_t target = std::clamp<int64_t>(kGatherSliceBytes / per_step / 8 * 8, 8, 256);
    const int64_t nb = std::max<int64_t>(1, ceil_div(steps, target));
    plan.block_steps = round_up(ceil_div(std::max<int64_t>(steps, 1), nb), 8);
  } else {
    plan.nterms = plan.T == 1 ? 1 : 2;
    if (!plan.wide) {
      plan.x_offset[0] = cfg.act_signed ? 128 : 0;
      plan.x_offset[1] = cfg.reduce == Reduce::kActivations ? 16 : (cfg.act_signed ? 128 : 0);
    }
    const int64_t per_step = plan.nterms * plan.T * (plan.wide ? 2 : 1);
    // int16 blocks twice as many bytes: the same steps per block as the u8 layout.
    const int64_t block_bytes = plan.wide ? 2 * kDenseBlockBytes : kDenseBlockBytes;
    const int64_t target = std::max<int64_t>(32, block_bytes / per_step / 32 * 32);
    const int64_t nb = std::max<int64_t>(1, ceil_div(steps, target));
    plan.block_steps = round_up(ceil_div(std::max<int64_t>(steps, 1), nb), 32);
  }
  plan.nblocks = std::max<int64_t>(1, ceil_div(steps, plan.block_steps));
  if (!plan.gather) {
    plan.b_block_offset.resize(static_cast<size_t>(plan.nblocks));
    int64_t off = 0;
    for (int64_t b = 0; b < plan.nblocks; ++b) {
      plan.b_block_offset[b] = off;
      off += plan.block_bytes(b) * plan.mpad16;
      plan.max_block_bytes = std::max(plan.max_block_bytes, plan.block_bytes(b));
    }
    plan.b_bytes = off;
  }
  plan.rows_per_task = plan.gather ? 512 : 96;
  return plan;
}

namespace {

struct SelectorTables {
  GatherSelectors mode[2];  // reduce = activations, weights
};

SelectorTables make_selector_tables() {
  SelectorTables g{};
  for (int mode = 0; mode < 2; ++mode) {
    for (int bw = 0; bw < 16; ++bw) {
      for (int pi = 1; pi < 16; ++pi) {
        int slots[4];
        int ns = 0;
        for (int t = 0; t < 4; ++t) {
          if (pi >> t & 1) slots[ns++] = t;
        }
        const int n = __builtin_popcount(static_cast<unsigned>(pi & bw));
        uint8_t* out = g.mode[mode].sel[bw] + kGatherBase[pi] * 4;
        // Entry layout (engine.h): x byte of the j-th slot of pi at j, its
        // R(x) byte at 2 + j (one dword) or 4 + j (two dwords).
        for (int j = 0; j < ns; ++j) {
          const int t = slots[j];
          uint8_t xs = 0, rs = 0;  // coefficient of x_t and of R(x_t)
          if (bw >> t & 1) {
            if (n == 1) {
              xs = static_cast<uint8_t>(1 + t);  // x_t * w_t
            } else if (n == 2 && mode == 0) {
              rs = static_cast<uint8_t>(1 + t);  // R(x_t) * w_t
            } else if (n == 2) {
              xs = static_cast<uint8_t>(5 + t);  // x_t * R(w_t)
            } else {
              rs = static_cast<uint8_t>(5 + t);  // R(x_t) * R(w_t)
            }
          }
          out[j] = xs;
          out[(ns <= 2 ? 2 : 4) + j] = rs;
        }
      }
    }
  }
  return g;
}

}  // namespace

const GatherSelectors& gather_selectors(Reduce reduce) {
  static const SelectorTables tables = make_selector_tables();
  return tables.mode[reduce == Reduce::kActivations ? 0 : 1];
}

const GatherExpandControls& gather_expand_controls() {
  static const GatherExpandControls controls = [] {
    GatherExpandControls l{};
    for (int mode = 0; mode < 2; ++mode) {
      const GatherSelectors& g =
          gather_selectors(mode == 0 ? Reduce::kActivations : Reduce::kWeights);
      for (int d = 0; d < kGatherDwords; ++d) {
        for (int bw = 0; bw < 16; ++bw) {
          uint32_t cw = 0, cr = 0;
          for (int i = 0; i < 4; ++i) {
            const int code = g.sel[bw][d * 4 + i];
            const uint32_t w_byte = code >= 1 && code <= 4 ? static_cast<uint32_t>(code - 1) : 0x80;
            const uint32_t r_byte = code >= 5 ? static_cast<uint32_t>(code - 5) : 0x80;
            cw |= w_byte << (8 * i);
            cr |= r_byte << (8 * i);
          }
          l.ctrl_w[mode][d][bw] = cw;
          l.ctrl_r[mode][d][bw] = cr;
        }
      }
    }
    return l;
  }();
  return controls;
}

}  // namespace detail

// ---- weight preparation -----------------------------------------------------

namespace {

using detail::Backend;
using detail::Plan;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
constexpr int64_t kTargetTasks = 16;  // enough independent tasks for the thread pool

struct PrepareJob {
  const Backend* be;
  PreparedWeights* pw;
  const int8_t* w;
  int64_t w_stride;
};

// Dense: the panel's columns, block by block, into [kq][W][4].
void prepare_dense_panel(const PrepareJob& job, int64_t p) {
  const Plan& plan = job.pw->plan;
  const int64_t W = plan.panel_vectors(p) * 16;
  const int64_t col0 = plan.panel_col0(p);
  const int64_t cols = std::min<int64_t>(W, plan.M - col0);
  std::vector<int8_t> row(static_cast<size_t>(plan.max_block_bytes));
  for (int64_t b = 0; b < plan.nblocks; ++b) {
    const int64_t bytes = plan.block_bytes(b);
    uint8_t* panel = job.pw->bytes.data() + plan.b_block_offset[b] + bytes * col0;
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t m = col0 + c;
      const int8_t* wr = job.w + m * job.w_stride + plan.block_step0(b) * plan.T;
      const int32_t corr = job.be->dense_weight_row(plan, b, wr, row.data());
      job.pw->colcorr[m] = static_cast<int32_t>(static_cast<uint32_t>(job.pw->colcorr[m]) -
                                                static_cast<uint32_t>(corr));
      for (int64_t q = 0; q < bytes / 4; ++q) {
        std::memcpy(panel + (q * W + c) * 4, row.data() + q * 4, 4);
      }
    }
  }
}

// Gather: compact weights [step][3][W][4] of the panel: w bytes, R(w) bytes, pattern.
void prepare_gather_panel(const PrepareJob& job, int64_t p) {
  const Plan& plan = job.pw->plan;
  const int64_t W = plan.panel_vectors(p) * 16;
  const int64_t col0 = plan.panel_col0(p);
  const int64_t cols = std::min<int64_t>(W, plan.M - col0);
  uint8_t* base = job.pw->bytes.data() + plan.source_panel_offset(p);
  for (int64_t c = 0; c < cols; ++c) {
    job.be->gather_weight_column(plan, job.w + (col0 + c) * job.w_stride, W, base + c * 4);
  }
}

// A growable, uninitialised, 64-byte aligned buffer.
class Buffer {
 public:
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { release(); }
  template <typename T>
  T* get(int64_t n) {
    const size_t bytes = static_cast<size_t>(n > 0 ? n : 1) * sizeof(T);
    if (bytes > size_) {
      release();
      ptr_ = ::operator new(bytes, std::align_val_t(64));
      size_ = bytes;
    }
    return static_cast<T*>(ptr_);
  }

 private:
  void release() {
    if (ptr_ != nullptr) ::operator delete(ptr_, std::align_val_t(64));
    ptr_ = nullptr;
    size_ = 0;
  }
  void* ptr_ = nullptr;
  size_t size_ = 0;
};

// Scratch memory of one running task. A call keeps a pool of them, so buffers
// are allocated once per concurrently running worker, not once per task (large
// allocations are fresh mmaps whose page faults would cost more than the task).
struct TaskScratch {
  Buffer x, a, c, entries, counts, rowsum, slice;
};

class ScratchPool {
 public:
  TaskScratch* acquire() {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.empty()) {
      all_.push_back(std::make_unique<TaskScratch>());
      return all_.back().get();
    }
    TaskScratch* s = free_.back();
    free_.pop_back();
    return s;
  }
  void release(TaskScratch* s) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(s);
  }

 private:
  std::mutex mu_;
  std::vector<TaskScratch*> free_;
  std::vector<std::unique_ptr<TaskScratch>> all_;
};

}  // namespace

std::shared_ptr<const PreparedWeights> prepare_weights(const SmtConfig& cfg, int64_t M,
                                                       int64_t steps, const int8_t* w,
                                                       int64_t w_stride,
                                                       const Parallel& parallel) {
  auto pw = std::make_shared<PreparedWeights>();
  const Backend* be = &detail::selected_backend();
  pw->be = be;
  pw->plan = detail::make_plan(cfg, steps, M, be->wide_dense);
  const Plan& plan = pw->plan;
  const int64_t K = plan.K;
  pw->w.resize(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m) std::memcpy(pw->w.data() + m * K, w + m * w_stride, K);
  pw->colcorr.assign(static_cast<size_t>(M), 0);
  if (plan.gather) {
    pw->bytes.assign(static_cast<size_t>(plan.source_panel_offset(plan.npanels)), 0);
  } else {
    pw->bytes.assign(static_cast<size_t>(plan.b_bytes), 0);
  }
  PrepareJob job{be, pw.get(), pw->w.data(), K};
  if (M > 0 && steps > 0) {
    parallel(
        [](void* data, size_t i) {
          const auto& j = *static_cast<PrepareJob*>(data);
          if (j.pw->plan.gather) {
            prepare_gather_panel(j, static_cast<int64_t>(i));
          } else {
            prepare_dense_panel(j, static_cast<int64_t>(i));
          }
        },
        static_cast<size_t>(plan.npanels), &job);
  }
  return pw;
}

const detail::StatsSummary& PreparedWeights::stats_summary(const Parallel& parallel) const {
  std::call_once(stats_once, [&] {
    stats = detail::make_stats_summary(plan, w.data(), plan.K, parallel);
  });
  return stats;
}

// ---- the parallel driver ----------------------------------------------------

namespace {

struct Run {
  const PreparedWeights* pw;
  const Backend* be;
  int64_t P;
  const int16_t* x;
  int64_t x_stride;
  const RowSource* source;
  const RunSource* runs;  // non-null: rows read in place (dense_gemm_runs)
  int32_t* acc;
  int64_t ars, acs;
  const FloatOutput* fout;  // non-null: float outputs instead of acc
  const detail::StatsSummary* summary;  // null: no statistics
  int64_t rows_per_task, row_tasks, panels_per_task;
  SmtStats* parts;
  ScratchPool* pool;
};

// The float outputs of a tile (FloatOutput), one image's run of rows at a time.
void store_float_tile(const Run& j, int64_t p0, int64_t rows, int64_t m0, int64_t m1,
                      const int32_t* c, int64_t ldc, const int32_t* rowcorr) {
  const FloatOutput& o = *j.fout;
  for (int64_t r = 0; r < rows;) {
    const int64_t p = p0 + r, img = p / o.rows_per_image, pos = p % o.rows_per_image;
    const int64_t n = std::min(rows - r, o.rows_per_image - pos);
    j.be->float_tile(c + r * ldc, ldc, n, m1 - m0, j.pw->colcorr.data() + m0,
                     rowcorr != nullptr ? rowcorr + r : nullptr, o.scale + m0,
                     o.bias != nullptr ? o.bias + m0 : nullptr,
                     o.y + img * o.image_stride + pos * o.row_stride + m0 * o.col_stride,
                     o.row_stride, o.col_stride);
    r += n;
  }
}

void store_tile(const Run& j, int64_t p0, int64_t rows, int64_t m0, int64_t m1,
                const int32_t* c, int64_t ldc, const int32_t* rowcorr) {
  if (j.fout != nullptr) {
    store_float_tile(j, p0, rows, m0, m1, c, ldc, rowcorr);
    return;
  }
  const int32_t* colcorr = j.pw->colcorr.data();
  if (j.ars != 1 || j.acs == 1) {
    for (int64_t r = 0; r < rows; ++r) {
      const uint32_t rc = rowcorr ? static_cast<uint32_t>(rowcorr[r]) : 0u;
      int32_t* dst = j.acc + (p0 + r) * j.ars;
      const int32_t* src = c + r * ldc - m0;
      for (int64_t m = m0; m < m1; ++m) {
        dst[m * j.acs] = static_cast<int32_t>(static_cast<uint32_t>(src[m]) +
                                              static_cast<uint32_t>(colcorr[m]) + rc);
      }
    }
  } else {  // column-major output: write each column's run of rows
    for (int64_t m = m0; m < m1; ++m) {
      int32_t* dst = j.acc + m * j.acs + p0;
      const uint32_t cc = static_cast<uint32_t>(colcorr[m]);
      const int32_t* src = c + (m - m0);
      for (int64_t r = 0; r < rows; ++r) {
        const uint32_t rc = rowcorr ? static_cast<uint32_t>(rowcorr[r]) : 0u;
        dst[r] = static_cast<int32_t>(static_cast<uint32_t>(src[r * ldc]) + cc + rc);
      }
    }
  }
}

void dense_task(const Run& j, TaskScratch& scratch, const int16_t* x, int64_t xs, int64_t p0,
                int64_t rows, int64_t pan0, int64_t pan1) {
  const Plan& plan = j.pw->plan;
  const int64_t c0 = plan.panel_col0(pan0);
  const int64_t c1 = std::min(plan.panel_col0(pan1), plan.mpad16);
  const int64_t ldc = c1 - c0;
  const int64_t lda = plan.max_block_bytes;
  uint8_t* a = scratch.a.get<uint8_t>(rows * lda);
  int32_t* c = scratch.c.get<int32_t>(rows * ldc);
  // int16 pairs at T = 1 are the packed rows themselves (every block even long).
  const bool in_place = plan.wide && plan.T == 1 && plan.steps % 2 == 0;
  for (int64_t b = 0; b < plan.nblocks; ++b) {
    const uint8_t* ab = a;
    int64_t ldab = lda;
    if (in_place) {
      ab = reinterpret_cast<const uint8_t*>(x + plan.block_step0(b));
      ldab = xs * static_cast<int64_t>(sizeof(int16_t));
    } else {
      j.be->dense_transform(plan, b, x, xs, rows, a, lda);
    }
    const int64_t bytes = plan.block_bytes(b);
    const uint8_t* block = j.pw->bytes.data() + plan.b_block_offset[b];
    for (int64_t p = pan0; p < pan1; ++p) {
      j.be->dense_gemm(bytes / 4, ab, ldab, rows, block + bytes * plan.panel_col0(p),
                       plan.panel_vectors(p), c + (plan.panel_col0(p) - c0), ldc, b == 0);
    }
  }
  store_tile(j, p0, rows, c0, std::min(c1, plan.M), c, ldc, nullptr);
}

// Rows read in place from their runs (RunSource): one block, no transform.
void runs_task(const Run& j, TaskScratch& scratch, int64_t p0, int64_t rows, int64_t pan0,
               int64_t pan1) {
  const Plan& plan = j.pw->plan;
  const RunSource& src = *j.runs;
  const int64_t c0 = plan.panel_col0(pan0);
  const int64_t c1 = std::min(plan.panel_col0(pan1), plan.mpad16);
  const int64_t ldc = c1 - c0;
  const auto** ptrs = scratch.a.get<const int16_t*>(rows * src.runs);
  int32_t* c = scratch.c.get<int32_t>(rows * ldc);
  src.fill(src.ctx, p0, p0 + rows, ptrs);
  const int64_t bytes = plan.block_bytes(0);
  const uint8_t* block = j.pw->bytes.data() + plan.b_block_offset[0];
  for (int64_t p = pan0; p < pan1; ++p) {
    j.be->dense_gemm_runs(plan.nterms, src.runs, src.run_length / 2, ptrs, src.term1_offset,
                          rows, block + bytes * plan.panel_col0(p), plan.panel_vectors(p),
                          c + (plan.panel_col0(p) - c0), ldc);
  }
  store_tile(j, p0, rows, c0, std::min(c1, plan.M), c, ldc, nullptr);
}

void gather_task(const Run& j, TaskScratch& scratch, const int16_t* x, int64_t xs, int64_t p0,
                 int64_t rows, int64_t pan0, int64_t pan1) {
  const Plan& plan = j.pw->plan;
  const int64_t c0 = plan.panel_col0(pan0);
  const int64_t c1 = std::min(plan.panel_col0(pan1), plan.mpad16);
  const int64_t ldc = c1 - c0;
  // At most 2 entries per step, plus slack for 8-entry vector stores.
  const int64_t cap = 2 * plan.block_steps + 16;
  detail::GatherEntry* e = scratch.entries.get<detail::GatherEntry>(rows * cap);
  int64_t* n = scratch.counts.get<int64_t>(rows);
  int32_t* rowsum = scratch.rowsum.get<int32_t>(rows);
  uint8_t* slice = scratch.slice.get<uint8_t>(plan.slice_bytes());
  int32_t* c = scratch.c.get<int32_t>(rows * ldc);
  std::fill(rowsum, rowsum + rows, 0);
  for (int64_t b = 0; b < plan.nblocks; ++b) {
    for (int64_t r = 0; r < rows; ++r) {
      n[r] = j.be->gather_entries(plan, b, x + r * xs, e + r * cap, rowsum + r);
    }
    for (int64_t p = pan0; p < pan1; ++p) {
      const int nv = plan.panel_vectors(p);
      j.be->gather_expand(plan, j.pw->bytes.data() + plan.source_panel_offset(p),
                          plan.block_step0(b), plan.block_len(b), nv, slice);
      int32_t* cp = c + (plan.panel_col0(p) - c0);
      for (int64_t r = 0; r < rows; ++r) {
        j.be->gather_gemm(e + r * cap, n[r], slice, nv, plan.cfg.act_signed, cp + r * ldc,
                          b == 0);
      }
    }
  }
  const bool sgn = plan.cfg.act_signed;
  if (sgn) {
    for (int64_t r = 0; r < rows; ++r) {
      rowsum[r] = static_cast<int32_t>(0u - 128u * static_cast<uint32_t>(rowsum[r]));
    }
  }
  store_tile(j, p0, rows, c0, std::min(c1, plan.M), c, ldc, sgn ? rowsum : nullptr);
}

// T = 4 rows as runs with precomputed entry records (RunSource::entries): the
// entries of a row for block b are its runs' entries whose steps lie in the
// block, re-indexed from the run's first step to the block's.
void gather_runs_task(const Run& j, TaskScratch& scratch, int64_t p0, int64_t rows,
                      int64_t pan0, int64_t pan1) {
  const Plan& plan = j.pw->plan;
  const RunSource& src = *j.runs;
  const int64_t c0 = plan.panel_col0(pan0);
  const int64_t c1 = std::min(plan.panel_col0(pan1), plan.mpad16);
  const int64_t ldc = c1 - c0;
  const int64_t run_steps = src.run_length / plan.T;
  const int64_t cap = 2 * plan.block_steps + 16;
  const auto** recs = scratch.a.get<const int32_t*>(rows * src.runs);
  detail::GatherEntry* e = scratch.entries.get<detail::GatherEntry>(rows * cap);
  int64_t* n = scratch.counts.get<int64_t>(rows);
  int32_t* rowsum = scratch.rowsum.get<int32_t>(rows);
  uint8_t* slice = scratch.slice.get<uint8_t>(plan.slice_bytes());
  int32_t* c = scratch.c.get<int32_t>(rows * ldc);
  src.fill_records(src.ctx, p0, p0 + rows, recs);
  std::fill(rowsum, rowsum + rows, 0);
  for (int64_t b = 0; b < plan.nblocks; ++b) {
    const int64_t s0 = plan.block_step0(b), s1 = s0 + plan.block_len(b);
    for (int64_t r = 0; r < rows; ++r) {
      detail::GatherEntry* out = e + r * cap;
      int64_t count = 0;
      uint32_t sum = 0;
      for (int64_t k = 0; k < src.runs; ++k) {
        const int64_t first = k * run_steps;  // the run's first step in the row
        if (first + run_steps <= s0 || first >= s1) continue;
        const int32_t* rec = recs[r * src.runs + k];
        const auto* re = reinterpret_cast<const detail::GatherEntry*>(rec + 2);
        const int32_t shift = static_cast<int32_t>((first - s0) * detail::kGatherDwords);
        if (first >= s0 && first + run_steps <= s1) {  // the whole run is in the block
          // Four entries at a time (records and rows have slack for the overshoot).
          const int32_t* src_i = rec + 2;
          int32_t* dst_i = reinterpret_cast<int32_t*>(out + count);
          for (int32_t i = 0; i < rec[0]; i += 4) {
            for (int q = 0; q < 8; q += 2) {
              dst_i[2 * i + q] = src_i[2 * i + q] + shift;
              dst_i[2 * i + q + 1] = src_i[2 * i + q + 1];
            }
          }
          count += rec[0];
          sum += static_cast<uint32_t>(rec[1]);
          continue;
        }
        for (int32_t i = 0; i < rec[0]; ++i) {  // entries of the steps in the block only
          const int64_t step = first + re[i].index / detail::kGatherDwords;
          if (step < s0 || step >= s1) continue;
          out[count++] = {re[i].index + shift, re[i].bytes};
          if (plan.cfg.act_signed) {
            for (int q = 0; q < 4; ++q) sum += static_cast<uint32_t>(static_cast<int8_t>(re[i].bytes >> (8 * q)));
          }
        }
      }
      n[r] = count;
      rowsum[r] = static_cast<int32_t>(static_cast<uint32_t>(rowsum[r]) + sum);
    }
    for (int64_t p = pan0; p < pan1; ++p) {
      const int nv = plan.panel_vectors(p);
      j.be->gather_expand(plan, j.pw->bytes.data() + plan.source_panel_offset(p), s0,
                          plan.block_len(b), nv, slice);
      int32_t* cp = c + (plan.panel_col0(p) - c0);
      for (int64_t r = 0; r < rows; ++r) {
        j.be->gather_gemm(e + r * cap, n[r], slice, nv, plan.cfg.act_signed, cp + r * ldc,
                          b == 0);
      }
    }
  }
  const bool sgn = plan.cfg.act_signed;
  if (sgn) {
    for (int64_t r = 0; r < rows; ++r) {
      rowsum[r] = static_cast<int32_t>(0u - 128u * static_cast<uint32_t>(rowsum[r]));
    }
  }
  store_tile(j, p0, rows, c0, std::min(c1, plan.M), c, ldc, sgn ? rowsum : nullptr);
}

void run_task(const Run& j, int64_t task) {
  const Plan& plan = j.pw->plan;
  const int64_t rt = task % j.row_tasks;
  const int64_t ct = task / j.row_tasks;
  const int64_t p0 = rt * j.rows_per_task;
  const int64_t rows = std::min(j.rows_per_task, j.P - p0);
  const int64_t pan0 = ct * j.panels_per_task;
  const int64_t pan1 = std::min(pan0 + j.panels_per_task, plan.npanels);
  TaskScratch* scratch = j.pool->acquire();
  if (j.runs != nullptr && plan.gather) {
    gather_runs_task(j, *scratch, p0, rows, pan0, pan1);
    j.pool->release(scratch);
    return;
  }
  if (j.runs != nullptr) {
    runs_task(j, *scratch, p0, rows, pan0, pan1);
    j.pool->release(scratch);
    return;
  }
  const int16_t* x = j.x + p0 * j.x_stride;
  int64_t xs = j.x_stride;
  if (j.source != nullptr) {
    int16_t* filled = scratch->x.get<int16_t>(rows * plan.K);
    if (!j.source->writes_every_slot) {
      std::memset(filled, 0, static_cast<size_t>(rows * plan.K) * sizeof(int16_t));
    }
    j.source->fill(j.source->ctx, p0, p0 + rows, filled);
    x = filled;
    xs = plan.K;
  }
  if (j.summary != nullptr && ct == 0) {
    j.be->stats_rows(plan, *j.summary, x, xs, rows, &j.parts[task]);
  }
  if (plan.gather) {
    gather_task(j, *scratch, x, xs, p0, rows, pan0, pan1);
  } else {
    dense_task(j, *scratch, x, xs, p0, rows, pan0, pan1);
  }
  j.pool->release(scratch);
}

void run(const PreparedWeights& pw, int64_t P, const int16_t* x, int64_t x_stride,
         const RowSource* source, const RunSource* runs, int32_t* acc, int64_t ars,
         int64_t acs, const FloatOutput* fout, SmtStats* stats, const Parallel& parallel) {
  const Plan& plan = pw.plan;
  if (P <= 0 || plan.M <= 0) return;
  if (plan.steps <= 0) {
    for (int64_t p = 0; p < P; ++p) {
      for (int64_t m = 0; m < plan.M; ++m) {
        if (fout == nullptr) {
          acc[p * ars + m * acs] = 0;
          continue;
        }
        float v = fout->scale[m] * 0.0f;
        if (fout->bias != nullptr) v = v + fout->bias[m];
        fout->y[(p / fout->rows_per_image) * fout->image_stride +
                (p % fout->rows_per_image) * fout->row_stride + m * fout->col_stride] = v;
      }
    }
    return;
  }
  Run j{};
  j.pw = &pw;
  j.be = pw.be;  // the backend the weights were laid out for
  j.P = P;
  j.x = x;
  j.x_stride = x_stride;
  j.source = source;
  // Runs are read in place only by a backend with that kernel, for the dense
  // method in one block, without statistics (stats_rows reads whole rows).
  bool in_place = runs != nullptr && stats == nullptr && reads_runs(pw, runs->run_length) &&
                  runs->runs * runs->run_length == plan.K &&
                  (plan.T == 1 || runs->term1_offset != 0);
  // T = 4: runs with precomputed entry records.
  in_place |= runs != nullptr && stats == nullptr && runs->fill_records != nullptr &&
              reads_gather_runs(pw, runs->run_length) && runs->runs * runs->run_length == plan.K;
  j.runs = in_place ? runs : nullptr;
  j.acc = acc;
  j.ars = ars;
  j.acs = acs;
  j.fout = fout;
  j.summary = stats != nullptr ? &pw.stats_summary(parallel) : nullptr;
  // Row tiles (multiples of 8) and panel groups: at least kTargetTasks tasks
  // when the shape allows, without tiles so small that per-tile work (the
  // gather table slices, the weight panels) stops being amortised.
  int64_t rows = std::min(plan.rows_per_task, P);
  const int64_t want_row_tasks = ceil_div(kTargetTasks, plan.npanels);
  if (ceil_div(P, rows) < want_row_tasks) {
    // Gather tiles expand the weight table once per block and panel: keep them
    // large enough (>= 256 rows) for that to stay a small part of the work.
    rows = std::max<int64_t>(std::min<int64_t>(P, plan.gather ? 256 : 8),
                             round_up(ceil_div(P, want_row_tasks), 8));
  }
  if (source != nullptr && j.runs == nullptr) {
    // Rows made by a RowSource live in a per-task buffer: bound it for long rows.
    constexpr int64_t kRowBufferBytes = int64_t{8} << 20;
    const int64_t row_bytes = plan.K * static_cast<int64_t>(sizeof(int16_t));
    rows = std::min(rows, std::max<int64_t>(8, kRowBufferBytes / std::max<int64_t>(row_bytes, 1)));
  }
  j.rows_per_task = rows;
  j.row_tasks = ceil_div(P, rows);
  const int64_t col_tasks =
      std::min<int64_t>(plan.npanels, std::max<int64_t>(1, ceil_div(kTargetTasks, j.row_tasks)));
  j.panels_per_task = ceil_div(plan.npanels, col_tasks);
  const int64_t tasks = j.row_tasks * ceil_div(plan.npanels, j.panels_per_task);
  std::vector<SmtStats> parts(static_cast<size_t>(tasks));
  j.parts = parts.data();
  ScratchPool pool;
  j.pool = &pool;
  parallel([](void* data, size_t i) { run_task(*static_cast<Run*>(data), static_cast<int64_t>(i)); },
           static_cast<size_t>(tasks), &j);
  if (stats != nullptr) {
    SmtStats total;
    total.groups = P * plan.M * plan.steps;
    for (const SmtStats& s : parts) {
      total.active_slots += s.active_slots;
      total.collisions += s.collisions;
      total.reduced_operands += s.reduced_operands;
    }
    stats->add(total);
  }
}

}  // namespace

void accumulate_prepared(const PreparedWeights& w, int64_t P, const int16_t* x, int64_t x_stride,
                         int32_t* acc, int64_t acc_row_stride, int64_t acc_col_stride,
                         SmtStats* stats, const Parallel& parallel) {
  run(w, P, x, x_stride, nullptr, nullptr, acc, acc_row_stride, acc_col_stride, nullptr, stats,
      parallel);
}

void accumulate_prepared(const PreparedWeights& w, int64_t P, const RowSource& rows,
                         int32_t* acc, int64_t acc_row_stride, int64_t acc_col_stride,
                         SmtStats* stats, const Parallel& parallel) {
  run(w, P, nullptr, 0, &rows, nullptr, acc, acc_row_stride, acc_col_stride, nullptr, stats,
      parallel);
}

void accumulate_prepared(const PreparedWeights& w, int64_t P, const int16_t* x, int64_t x_stride,
                         const FloatOutput& out, SmtStats* stats, const Parallel& parallel) {
  run(w, P, x, x_stride, nullptr, nullptr, nullptr, 0, 0, &out, stats, parallel);
}

void accumulate_prepared(const PreparedWeights& w, int64_t P, const RowSource& rows,
                         const FloatOutput& out, SmtStats* stats, const Parallel& parallel) {
  run(w, P, nullptr, 0, &rows, nullptr, nullptr, 0, 0, &out, stats, parallel);
}

void accumulate_prepared(const PreparedWeights& w, int64_t P, const RowSource& rows,
                         const RunSource& runs, const FloatOutput& out, SmtStats* stats,
                         const Parallel& parallel) {
  run(w, P, nullptr, 0, &rows, &runs, nullptr, 0, 0, &out, stats, parallel);
}

bool reads_gather_runs(const PreparedWeights& w, int64_t run_length) {
  const Plan& plan = w.plan;
  return w.be != nullptr && plan.gather && run_length > 0 && run_length % plan.T == 0 &&
         plan.K % run_length == 0;
}

int64_t gather_record_ints(int64_t run_length) {
  // count, byte sum, then at most two entries (two int32 each) per step of 4 slots,
  // plus slack for the vector stores of the entry makers and the readers
  return 2 + 2 * (2 * ((run_length + 3) / 4) + 8);
}

void gather_run_entries(const PreparedWeights& w, const int16_t* x, int64_t run_length,
                        int32_t* record) {
  // The run's steps as a plan of their own: one block, entry indexes from its first step.
  Plan sub = w.plan;
  sub.steps = run_length / sub.T;
  sub.K = run_length;
  sub.block_steps = std::max<int64_t>(sub.steps, 1);
  sub.nblocks = 1;
  int32_t sum = 0;
  auto* entries = reinterpret_cast<detail::GatherEntry*>(record + 2);
  const int64_t count = w.be->gather_entries(sub, 0, x, entries, &sum);
  // Readers copy four entries at a time: the (at most three) after the last are defined.
  for (int64_t i = count; i < count + 3; ++i) entries[i] = detail::GatherEntry{0, 0};
  record[0] = static_cast<int32_t>(count);
  record[1] = sum;
}

bool reads_runs(const PreparedWeights& w, int64_t run_length) {
  const Plan& plan = w.plan;
  return w.be != nullptr && w.be->dense_gemm_runs != nullptr && plan.wide && !plan.gather &&
         plan.nblocks == 1 && run_length > 0 && run_length % 2 == 0 &&
         plan.K % run_length == 0 && plan.seg_bytes(0) == plan.K * 2;
}

void correction_operands(const SmtConfig& cfg, const int16_t* x, int64_t n, int16_t* out) {
#if defined(__x86_64__) || defined(_M_X64)
  if (detail::selected_backend().isa != detail::Isa::kGeneric) {
    detail::avx2_correction_operands(cfg, x, n, out);
    return;
  }
#endif
  const bool act = cfg.reduce == Reduce::kActivations;
  for (int64_t i = 0; i < n; ++i) {
    const int v = x[i];
    const int partner = x[i ^ 1];
    const int value = act ? (cfg.act_signed ? reduce_signed(v) : reduce_unsigned(v)) - v : v;
    out[i] = static_cast<int16_t>(partner != 0 ? value : 0);
  }
}

void accumulate(const SmtConfig& cfg, int64_t P, int64_t M, int64_t steps,
                const int16_t* x, int64_t x_stride, const int8_t* w, int64_t w_stride,
                int32_t* acc, int64_t acc_row_stride, int64_t acc_col_stride,
                SmtStats* stats, const Parallel& parallel) {
  if (P <= 0 || M <= 0) return;
  const std::shared_ptr<const PreparedWeights> pw =
      prepare_weights(cfg, M, steps, w, w_stride, parallel);
  accumulate_prepared(*pw, P, x, x_stride, acc, acc_row_stride, acc_col_stride, stats, parallel);
}

}  // namespace nbsmt
