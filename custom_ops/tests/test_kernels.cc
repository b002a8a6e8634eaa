// Self-test of the fast NB-SMT kernels: accumulate() must equal accumulate_scalar()
// (the straightforward SPEC loop) integer for integer, stats included, for every
// kernel implementation the CPU can run, every configuration, odd shapes, tails,
// sparse / saturated / all-zero operands, large K and any parallel split.
//
// Usage: nbsmt_kernel_tests [cases] [seed]     (defaults: 300 random cases, seed 1)
// Prints one line per failure (with the case) and finally "N passed, M failed";
// exits non-zero on any failure.
#include <atomic>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "nbsmt/kernels.h"

namespace {

using nbsmt::Reduce;
using nbsmt::SmtConfig;
using nbsmt::SmtStats;

// Runs tasks on 3 real threads pulling indices from a shared counter, so task
// order and placement vary between runs.
void run_threaded(void*, void (*fn)(void*, size_t), size_t total, void* data) {
  std::atomic<size_t> next{0};
  auto worker = [&] {
    for (size_t i = next.fetch_add(1); i < total; i = next.fetch_add(1)) fn(data, i);
  };
  std::thread a(worker), b(worker);
  worker();
  a.join();
  b.join();
}

// Runs tasks serially in reverse order.
void run_reversed(void*, void (*fn)(void*, size_t), size_t total, void* data) {
  for (size_t i = total; i-- > 0;) fn(data, i);
}

struct Case {
  SmtConfig cfg;
  int64_t P = 1, M = 1, steps = 1;
  int64_t x_pad = 0, w_pad = 0;
  bool col_major = false;  // acc[m * P + p] instead of acc[p * M + m]
  double x_zero = 0.5, w_zero = 0.1;
  int kind = 0;  // 0 random mix, 1 saturated, 2 all-zero x, 3 all-zero w
  int parallel = 0;  // 0 serial, 1 threads, 2 reversed
  int entry = 0;     // 0 accumulate(), 1 prepared weights + rows in memory, 2 + RowSource
  bool stats = true;
  uint64_t seed = 0;
};

std::string describe(const Case& c) {
  char buf[400];
  std::snprintf(buf, sizeof buf,
                "T=%d reduce=%s act_signed=%d P=%" PRId64 " M=%" PRId64 " steps=%" PRId64
                " x_pad=%" PRId64 " w_pad=%" PRId64
                " col_major=%d x_zero=%.2f w_zero=%.2f kind=%d parallel=%d entry=%d stats=%d"
                " seed=%" PRIu64,
                c.cfg.threads, c.cfg.reduce == Reduce::kActivations ? "activations" : "weights",
                c.cfg.act_signed ? 1 : 0, c.P, c.M, c.steps, c.x_pad, c.w_pad, c.col_major ? 1 : 0,
                c.x_zero, c.w_zero, c.kind, c.parallel, c.entry, c.stats ? 1 : 0, c.seed);
  return buf;
}

// Values that exercise R: the 4-bit window edges, half-way points (ties) and the extremes.
int pick_activation(std::mt19937_64& rng, bool is_signed) {
  static const int kEdges[] = {1, 7, 8, 9, 15, 16, 17, 23, 24, 25, 40, 56, 120, 127, 232, 239,
                               240, 247, 248, 249, 254, 255};
  const int lo = is_signed ? -127 : 0, hi = is_signed ? 127 : 255;
  int v;
  switch (rng() % 4) {
    case 0: {
      v = kEdges[rng() % (sizeof kEdges / sizeof kEdges[0])];
      if (is_signed && (rng() & 1)) v = -v;
      break;
    }
    case 1: v = static_cast<int>(rng() % 16) - (is_signed ? 8 : 0); break;
    default: v = lo + static_cast<int>(rng() % static_cast<uint64_t>(hi - lo + 1));
  }
  if (v < lo) v = lo;
  if (v > hi) v = hi;
  return v;
}

int pick_weight(std::mt19937_64& rng) {
  static const int kEdges[] = {-127, -120, -113, -112, -104, -24, -9, -8, -7, 7, 8, 9, 23, 24,
                               104, 111, 112, 119, 120, 127};
  switch (rng() % 4) {
    case 0: return kEdges[rng() % (sizeof kEdges / sizeof kEdges[0])];
    case 1: return static_cast<int>(rng() % 16) - 8;
    default: return static_cast<int>(rng() % 255) - 127;
  }
}

// RowSource over rows in memory that writes only the non-zero elements, so the
// kernels' zero-filling of the destination is part of what is tested.
struct SparseRows {
  const int16_t* x;
  int64_t stride, K;
  static void fill(void* ctx, int64_t p0, int64_t p1, int16_t* out) {
    const auto& s = *static_cast<const SparseRows*>(ctx);
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t k = 0; k < s.K; ++k) {
        const int16_t v = s.x[p * s.stride + k];
        if (v != 0) out[(p - p0) * s.K + k] = v;
      }
    }
  }
};

struct Result {
  bool ok = true;
  std::string what;
};

Result run_case(const Case& c, const char* kernel) {
  std::mt19937_64 rng(c.seed);
  const int T = c.cfg.threads;
  const int64_t K = c.steps * T;
  const int64_t xs = K + c.x_pad, ws = K + c.w_pad;
  std::vector<int16_t> x(static_cast<size_t>(c.P * xs + 1));
  std::vector<int8_t> w(static_cast<size_t>(c.M * ws + 1));
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const bool sgn = c.cfg.act_signed;
  for (int64_t p = 0; p < c.P; ++p) {
    for (int64_t k = 0; k < xs; ++k) {
      int v;
      if (k >= K) {
        v = 77;  // padding beyond K must be ignored
      } else if (c.kind == 2) {
        v = 0;
      } else if (c.kind == 1) {
        v = u(rng) < c.x_zero ? 0 : (sgn ? ((rng() & 1) ? 127 : -127) : 255);
      } else {
        v = u(rng) < c.x_zero ? 0 : pick_activation(rng, sgn);
      }
      x[p * xs + k] = static_cast<int16_t>(v);
    }
  }
  for (int64_t m = 0; m < c.M; ++m) {
    for (int64_t k = 0; k < ws; ++k) {
      int v;
      if (k >= K) {
        v = 55;
      } else if (c.kind == 3) {
        v = 0;
      } else if (c.kind == 1) {
        v = u(rng) < c.w_zero ? 0 : ((rng() & 1) ? 127 : -127);
      } else {
        v = u(rng) < c.w_zero ? 0 : pick_weight(rng);
      }
      w[m * ws + k] = static_cast<int8_t>(v);
    }
  }
  const int64_t ars = c.col_major ? 1 : c.M, acs = c.col_major ? c.P : 1;
  std::vector<int32_t> want(static_cast<size_t>(c.P * c.M)), got(want.size(), 0x5a5a5a5a);
  nbsmt::Parallel par;
  if (c.parallel == 1) par.run = run_threaded;
  if (c.parallel == 2) par.run = run_reversed;
  if (!nbsmt::force_kernel(kernel)) return {false, std::string("cannot force kernel ") + kernel};
  SmtStats want_stats, got_stats;
  want_stats.groups = got_stats.groups = 1000;  // both must *add* to existing counters
  nbsmt::accumulate_scalar(c.cfg, c.P, c.M, c.steps, x.data(), xs, w.data(), ws, want.data(), ars,
                           acs, &want_stats);
  SmtStats* gs = c.stats ? &got_stats : nullptr;
  if (c.entry == 0) {
    nbsmt::accumulate(c.cfg, c.P, c.M, c.steps, x.data(), xs, w.data(), ws, got.data(), ars, acs,
                      gs, par);
  } else {
    const auto pw = nbsmt::prepare_weights(c.cfg, c.M, c.steps, w.data(), ws, par);
    std::fill(w.begin(), w.end(), int8_t{99});  // prepared weights must not refer to w
    SparseRows rows{x.data(), xs, K};
    const nbsmt::RowSource source{&rows, SparseRows::fill};
    if (c.entry == 1) {
      nbsmt::accumulate_prepared(*pw, c.P, x.data(), xs, got.data(), ars, acs, gs, par);
    } else {
      nbsmt::accumulate_prepared(*pw, c.P, source, got.data(), ars, acs, gs, par);
    }
    // The same prepared weights again, rows the other way: identical results.
    std::vector<int32_t> again(got.size(), 0x3c3c3c3c);
    if (c.entry == 1) {
      nbsmt::accumulate_prepared(*pw, c.P, source, again.data(), ars, acs, nullptr, par);
    } else {
      nbsmt::accumulate_prepared(*pw, c.P, x.data(), xs, again.data(), ars, acs, nullptr, par);
    }
    if (again != got) return {false, "second use of the prepared weights differs"};
  }
  Result res;
  for (int64_t p = 0; p < c.P && res.ok; ++p) {
    for (int64_t m = 0; m < c.M; ++m) {
      const int64_t i = p * ars + m * acs;
      if (got[i] != want[i]) {
        char buf[160];
        std::snprintf(buf, sizeof buf, "acc[p=%" PRId64 "][m=%" PRId64 "] = %d, want %d", p, m,
                      got[i], want[i]);
        res = {false, buf};
        break;
      }
    }
  }
  if (res.ok && c.stats &&
      (got_stats.groups != want_stats.groups || got_stats.active_slots != want_stats.active_slots ||
       got_stats.collisions != want_stats.collisions ||
       got_stats.reduced_operands != want_stats.reduced_operands)) {
    char buf[300];
    std::snprintf(buf, sizeof buf,
                  "stats [%" PRId64 ", %" PRId64 ", %" PRId64 ", %" PRId64 "], want [%" PRId64
                  ", %" PRId64 ", %" PRId64 ", %" PRId64 "]",
                  got_stats.groups, got_stats.active_slots, got_stats.collisions,
                  got_stats.reduced_operands, want_stats.groups, want_stats.active_slots,
                  want_stats.collisions, want_stats.reduced_operands);
    res = {false, buf};
  }
  return res;
}

Case random_case(std::mt19937_64& rng, uint64_t seed) {
  Case c;
  c.seed = seed;
  static const int kThreads[] = {1, 2, 4};
  c.cfg.threads = kThreads[rng() % 3];
  c.cfg.reduce = (rng() & 1) ? Reduce::kWeights : Reduce::kActivations;
  c.cfg.act_signed = (rng() % 3) == 0;
  auto range = [&](int64_t lo, int64_t hi) {
    return lo + static_cast<int64_t>(rng() % static_cast<uint64_t>(hi - lo + 1));
  };
  switch (rng() % 8) {
    case 0:  // tiny
      c.P = range(1, 5);
      c.M = range(1, 5);
      c.steps = range(1, 9);
      break;
    case 1:  // many columns (several panels, column tails)
      c.P = range(1, 20);
      c.M = range(60, 300);
      c.steps = range(1, 120);
      break;
    case 2:  // many rows (row tiles, row tails)
      c.P = range(90, 400);
      c.M = range(1, 40);
      c.steps = range(1, 80);
      break;
    case 3:  // long reductions: several blocks of steps
      c.P = range(1, 12);
      c.M = range(1, 140);
      c.steps = range(300, 2600);
      break;
    default:
      c.P = range(1, 64);
      c.M = range(1, 96);
      c.steps = range(1, 200);
  }
  c.x_pad = (rng() % 3 == 0) ? range(1, 9) : 0;
  c.w_pad = (rng() % 3 == 0) ? range(1, 9) : 0;
  c.col_major = rng() & 1;
  static const double kZero[] = {0.0, 0.2, 0.5, 0.5, 0.7, 0.9, 0.95};
  c.x_zero = kZero[rng() % 7];
  c.w_zero = kZero[rng() % 4];
  const int k = static_cast<int>(rng() % 20);
  c.kind = k == 0 ? 1 : k == 1 ? 2 : k == 2 ? 3 : 0;
  c.parallel = static_cast<int>(rng() % 3);
  c.entry = static_cast<int>(rng() % 3);
  c.stats = rng() % 4 != 0;
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  const int cases = argc > 1 ? std::atoi(argv[1]) : 300;
  const uint64_t seed = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1;
  std::vector<const char*> kernels;
  for (const char* k : {"scalar", "avx2", "avx512"}) {
    if (nbsmt::force_kernel(k)) kernels.push_back(k);
  }
  nbsmt::force_kernel(nullptr);
  std::printf("kernels: default=%s tested=", nbsmt::active_kernel());
  for (const char* k : kernels) std::printf("%s ", k);
  std::printf("\n");

  std::vector<Case> all;
  // Exactness at large K (SPEC: float32 sums would not be exact): K = 4608,
  // saturated operands, every configuration.
  for (int T : {1, 2, 4}) {
    for (Reduce r : {Reduce::kActivations, Reduce::kWeights}) {
      for (bool sgn : {false, true}) {
        Case c;
        c.cfg.threads = T;
        c.cfg.reduce = r;
        c.cfg.act_signed = sgn;
        c.P = 7;
        c.M = 19;
        c.steps = 4608 / T;
        c.kind = 1;
        c.x_zero = 0.0;
        c.w_zero = 0.0;
        c.seed = 1000 + T * 4 + (r == Reduce::kWeights) * 2 + sgn;
        all.push_back(c);
        c.x_zero = 0.3;  // saturated but with collisions and idle slots
        c.seed += 100;
        all.push_back(c);
        // The largest reduction the int32 accumulator allows.
        c.P = 3;
        c.M = 5;
        c.steps = nbsmt::kMaxReductionLength / T;
        c.x_zero = 0.0;
        c.seed += 100;
        all.push_back(c);
      }
    }
  }
  for (int T : {1, 2, 4}) {  // an empty reduction: every accumulator is 0
    Case c;
    c.cfg.threads = T;
    c.P = 3;
    c.M = 5;
    c.steps = 0;
    c.seed = 2000 + T;
    all.push_back(c);
  }
  std::mt19937_64 rng(seed);
  for (int i = 0; i < cases; ++i) all.push_back(random_case(rng, seed * 1000003ULL + static_cast<uint64_t>(i)));

  int passed = 0, failed = 0;
  for (const Case& c : all) {
    for (const char* k : kernels) {
      const Result r = run_case(c, k);
      if (r.ok) {
        ++passed;
      } else {
        ++failed;
        std::printf("FAIL kernel=%s %s: %s\n", k, describe(c).c_str(), r.what.c_str());
        std::fflush(stdout);
      }
    }
  }
  nbsmt::force_kernel(nullptr);
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
