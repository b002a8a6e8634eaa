// SPEC §3.4 counters without visiting every (row, column, step) triple.
//
// The counters are sums over all output elements (p, m) and steps of functions
// of the step's x-side and w-side values. Each function used here is a sum of
// products f(x side) * g(w side), so the double sum over (p, m) factorises into
// (sum_p f) * (sum_m g) per step and slot:
//   T = 1: active = sum_k (#rows with x_k != 0) * (#columns with w_k != 0).
//   T = 2 (slot k, partner q): active as T = 1; collisions (at even k only)
//     = (#rows nz(x_k) nz(x_q)) * (#columns nz(w_k) nz(w_q)); reduced operands
//     = sum_k (#rows changed(x_k) nz(x_q)) * (#columns nz(w_k) nz(w_q))   [activations]
//     or sum_k (#rows nz(x_k) nz(x_q)) * (#columns changed(w_k) nz(w_q))  [weights],
//     changed(v) = (R(v) != v), which implies v != 0.
//   T = 4: each slot's state in {0 zero, 1 non-zero and unchanged by R, 2
//     changed} gives a step code (3^4 = 81). The counters for a pair of codes
//     come from the scalar rule; weighted by the histogram of w-side codes of the
//     step they give g[step][x code] (built once per weights), looked up per
//     (row, step).
// The w-side half is the StatsSummary; rows are added per task (Backend::stats_rows).
#include <algorithm>
#include <vector>

#include "engine.h"

namespace nbsmt {
namespace detail {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int kCodes = 81;

inline int code_state(int v, bool is_signed) {
  return v == 0 ? 0 : 1 + changed_by_reduce(v, is_signed);
}

// Counters (active, collision, reduced) of one step for x code cx and w code cw,
// straight from the SPEC rule.
void code_counters(Reduce reduce, int cx, int cw, int32_t out[3]) {
  int sx[4], sw[4];
  for (int t = 0; t < 4; ++t) {
    sx[t] = cx % 3;
    cx /= 3;
    sw[t] = cw % 3;
    cw /= 3;
  }
  int n = 0;
  for (int t = 0; t < 4; ++t) n += (sx[t] != 0 && sw[t] != 0);
  int reduced = 0;
  for (int t = 0; t < 4; ++t) {
    if (sx[t] == 0 || sw[t] == 0) continue;
    const bool red_x = n >= 3 || (n == 2 && reduce == Reduce::kActivations);
    const bool red_w = n >= 3 || (n == 2 && reduce == Reduce::kWeights);
    reduced += (red_x && sx[t] == 2) + (red_w && sw[t] == 2);
  }
  out[0] = n;
  out[1] = n >= 2;
  out[2] = reduced;
}

struct CodeTable {
  int32_t f[2][kCodes][kCodes][3];  // [reduce][cx][cw][counter]
};

const CodeTable& code_table() {
  static const CodeTable* table = [] {
    auto* t = new CodeTable;
    for (int r = 0; r < 2; ++r) {
      for (int cx = 0; cx < kCodes; ++cx) {
        for (int cw = 0; cw < kCodes; ++cw) {
          code_counters(r == 0 ? Reduce::kActivations : Reduce::kWeights, cx, cw, t->f[r][cx][cw]);
        }
      }
    }
    return t;
  }();
  return *table;
}

struct SummaryJob {
  const Plan* plan;
  const int8_t* w;
  int64_t w_stride;
  int64_t steps_per_task;
  StatsSummary* out;
};

void summary_codes_task(const SummaryJob& j, int64_t task) {
  const Plan& plan = *j.plan;
  const int64_t s0 = task * j.steps_per_task;
  const int64_t s1 = std::min(plan.steps, s0 + j.steps_per_task);
  const auto& f = code_table().f[plan.cfg.reduce == Reduce::kActivations ? 0 : 1];
  int64_t hist[kCodes];
  for (int64_t s = s0; s < s1; ++s) {
    std::fill(hist, hist + kCodes, 0);
    for (int64_t m = 0; m < plan.M; ++m) {
      const int8_t* ws = j.w + m * j.w_stride + s * 4;
      ++hist[code_state(ws[0], true) + 3 * code_state(ws[1], true) + 9 * code_state(ws[2], true) +
             27 * code_state(ws[3], true)];
    }
    int32_t* g = j.out->g.data() + s * kCodes * 4;
    std::fill(g, g + kCodes * 4, 0);
    for (int cw = 0; cw < kCodes; ++cw) {
      if (hist[cw] == 0) continue;
      const int32_t h = static_cast<int32_t>(hist[cw]);
      for (int cx = 0; cx < kCodes; ++cx) {
        for (int c = 0; c < 3; ++c) g[cx * 4 + c] += f[cx][cw][c] * h;
      }
    }
  }
}

}  // namespace

StatsSummary make_stats_summary(const Plan& plan, const int8_t* w, int64_t w_stride,
                                const Parallel& parallel) {
  StatsSummary s;
  const int64_t K = plan.K;
  if (plan.T == 4) {
    // g values are at most M * 8 (reduced operands of a step), far below 2^31.
    s.g.assign(static_cast<size_t>(plan.steps * kCodes * 4), 0);
    SummaryJob job{&plan, w, w_stride, std::max<int64_t>(8, ceil_div(plan.steps, 64)), &s};
    parallel(
        [](void* data, size_t i) {
          summary_codes_task(*static_cast<SummaryJob*>(data), static_cast<int64_t>(i));
        },
        static_cast<size_t>(ceil_div(plan.steps, job.steps_per_task)), &job);
    return s;
  }
  s.wb.assign(static_cast<size_t>(K), 0);
  if (plan.T == 2) {
    s.wbb.assign(static_cast<size_t>(K), 0);
    s.wcb.assign(static_cast<size_t>(K), 0);
  }
  for (int64_t m = 0; m < plan.M; ++m) {
    const int8_t* wr = w + m * w_stride;
    for (int64_t k = 0; k < K; ++k) {
      const int b = wr[k] != 0;
      s.wb[k] += b;
      if (plan.T == 2) {
        const int bq = wr[k ^ 1] != 0;
        s.wbb[k] += b & bq;
        s.wcb[k] += changed_by_reduce(wr[k], true) & bq;
      }
    }
  }
  return s;
}

void generic_stats_rows(const Plan& plan, const StatsSummary& s, const int16_t* x,
                        int64_t x_stride, int64_t nrows, SmtStats* out) {
  const bool sgn = plan.cfg.act_signed;
  const int64_t K = plan.K;
  if (plan.T == 4) {
    int64_t sums[3] = {0, 0, 0};
    for (int64_t r = 0; r < nrows; ++r) {
      const int16_t* xr = x + r * x_stride;
      for (int64_t st = 0; st < plan.steps; ++st) {
        const int16_t* xs = xr + st * 4;
        const int code = code_state(xs[0], sgn) + 3 * code_state(xs[1], sgn) +
                         9 * code_state(xs[2], sgn) + 27 * code_state(xs[3], sgn);
        const int32_t* g = s.g.data() + (st * kCodes + code) * 4;
        sums[0] += g[0];
        sums[1] += g[1];
        sums[2] += g[2];
      }
    }
    out->active_slots += sums[0];
    out->collisions += sums[1];
    out->reduced_operands += sums[2];
    return;
  }
  const bool two = plan.T == 2;
  std::vector<int32_t> ca(static_cast<size_t>(K), 0), caa, cca;
  if (two) {
    caa.assign(static_cast<size_t>(K), 0);
    cca.assign(static_cast<size_t>(K), 0);
  }
  for (int64_t r = 0; r < nrows; ++r) {
    const int16_t* xr = x + r * x_stride;
    if (!two) {
      for (int64_t k = 0; k < K; ++k) ca[k] += xr[k] != 0;
      continue;
    }
    for (int64_t k = 0; k < K; ++k) {
      const int a = xr[k] != 0;
      const int aq = xr[k ^ 1] != 0;
      ca[k] += a;
      caa[k] += a & aq;
      cca[k] += changed_by_reduce(xr[k], sgn) & aq;
    }
  }
  add_slot_counts(plan, s, ca.data(), caa.data(), cca.data(), out);
}

}  // namespace detail
}  // namespace nbsmt
