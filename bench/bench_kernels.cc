// Microbenchmark of the NB-SMT kernels alone (no ONNX Runtime): ResNet-18 3x3
// conv layers at 224x224 batch 8 (rows made on demand by an im2col RowSource, as
// the ORT glue can) and a 128x768 @ 768x768 MatMul, ReLU-like activations
// (50 % zeros). Prints weight-preparation and product times per kernel
// implementation and configuration (bench/bench_ops.py compares end to end
// against ONNX Runtime's float Conv/MatMul).
//
// Build: cmake -S custom_ops -B build -DNBSMT_BUILD_BENCH=ON
// Run:   build/nbsmt_bench_kernels [threads] [stats 0/1] [shape] [config] [kernel] (substring filters)
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <random>
#include <string>
#include <cstring>
#include <thread>
#include <vector>

#include "nbsmt/kernels.h"

namespace {

// A minimal persistent pool standing in for ORT's intra-op thread pool.
class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  static void run(void* ctx, void (*fn)(void*, size_t), size_t total, void* data) {
    static_cast<Pool*>(ctx)->run_impl(fn, total, data);
  }

 private:
  void run_impl(void (*fn)(void*, size_t), size_t total, void* data) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = fn;
      data_ = data;
      total_ = total;
      next_ = 0;
      active_ = static_cast<int>(workers_.size());
      ++gen_;
    }
    cv_.notify_all();
    work();
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [this] { return active_ == 0; });
  }
  void work() {
    for (size_t i = next_.fetch_add(1); i < total_; i = next_.fetch_add(1)) fn_(data_, i);
  }
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || gen_ != seen; });
        if (stop_) return;
        seen = gen_;
      }
      work();
      std::lock_guard<std::mutex> lk(mu_);
      if (--active_ == 0) done_cv_.notify_all();
    }
  }
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  bool stop_ = false;
  uint64_t gen_ = 0;
  void (*fn_)(void*, size_t) = nullptr;
  void* data_ = nullptr;
  size_t total_ = 0;
  std::atomic<size_t> next_{0};
  int active_ = 0;
};

struct Shape {
  const char* name;
  int64_t N, C, H, M;  // Conv 3x3, pad 1, stride 1 on N x C x H x H; N = 0: MatMul P=C, K=H
};

// im2col from a channels-last int16 image batch into packed rows (T = 1 order:
// kernel position major, channels contiguous), as the ORT glue does per task.
struct Im2col {
  const int16_t* img;  // [N][H][H][C]
  int64_t N, C, H;
  static void fill(void* ctx, int64_t p0, int64_t p1, int16_t* out) {
    const auto& g = *static_cast<const Im2col*>(ctx);
    const int64_t HW = g.H * g.H, K = 9 * g.C;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = p / HW, y = (p % HW) / g.H, x = p % g.H;
      int16_t* row = out + (p - p0) * K;
      for (int64_t ky = 0; ky < 3; ++ky) {
        for (int64_t kx = 0; kx < 3; ++kx) {
          const int64_t iy = y + ky - 1, ix = x + kx - 1;
          if (iy < 0 || iy >= g.H || ix < 0 || ix >= g.H) continue;  // zero-filled
          std::memcpy(row + (ky * 3 + kx) * g.C, g.img + ((n * g.H + iy) * g.H + ix) * g.C,
                      static_cast<size_t>(g.C) * sizeof(int16_t));
        }
      }
    }
  }
};

double best_of(int reps, const std::function<void()>& f) {
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, dt);
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  const bool with_stats = argc > 2 && std::atoi(argv[2]) != 0;
  const std::string only_shape = argc > 3 ? argv[3] : "";   // substring filters
  const std::string only_cfg = argc > 4 ? argv[4] : "";
  const std::string only_kernel = argc > 5 ? argv[5] : "";
  Pool pool(threads);
  nbsmt::Parallel par;
  par.ctx = &pool;
  par.run = threads > 1 ? Pool::run : nullptr;
  const Shape shapes[] = {
      {"conv64 56x56 b8", 8, 64, 56, 64},   {"conv128 28x28 b8", 8, 128, 28, 128},
      {"conv256 14x14 b8", 8, 256, 14, 256}, {"conv512 7x7 b8", 8, 512, 7, 512},
      {"matmul 128x768x768", 0, 128, 768, 768},
  };
  struct Cfg {
    const char* name;
    int T;
    nbsmt::Reduce r;
  };
  const Cfg cfgs[] = {{"T1", 1, nbsmt::Reduce::kActivations},
                      {"T2a", 2, nbsmt::Reduce::kActivations},
                      {"T2w", 2, nbsmt::Reduce::kWeights},
                      {"T4a", 4, nbsmt::Reduce::kActivations},
                      {"T4w", 4, nbsmt::Reduce::kWeights}};
  std::vector<const char*> kernels;
  for (const char* k : {"avx512", "avx2", "scalar"}) {
    if (nbsmt::force_kernel(k)) kernels.push_back(k);
  }
  std::printf("threads=%d stats=%d; best of 5 (generic: 1 run on a slice of rows, scaled);\n"
              "prepare = weight transform (once per weights), rows = products with rows\n"
              "made on demand by an im2col RowSource (MatMul: rows from memory)\n",
              threads, with_stats);
  std::mt19937_64 rng(7);
  for (const Shape& s : shapes) {
    if (std::string(s.name).find(only_shape) == std::string::npos) continue;
    const bool conv = s.N > 0;
    const int64_t P = conv ? s.N * s.H * s.H : s.C;
    const int64_t K = conv ? 9 * s.C : s.H;
    std::vector<int16_t> img(static_cast<size_t>(conv ? s.N * s.H * s.H * s.C : P * K));
    std::vector<int8_t> w(static_cast<size_t>(s.M * K));
    for (auto& v : img) v = static_cast<int16_t>((rng() & 1) ? 0 : 1 + rng() % 255);
    for (auto& v : w) v = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
    std::vector<int32_t> acc(static_cast<size_t>(P * s.M));
    Im2col src{img.data(), s.N, s.C, s.H};
    nbsmt::RowSource rows{&src, Im2col::fill};
    for (const Cfg& c : cfgs) {
      if (std::string(c.name).find(only_cfg) == std::string::npos) continue;
      nbsmt::SmtConfig cfg;
      cfg.threads = c.T;
      cfg.reduce = c.r;
      const int64_t steps = K / c.T;
      std::printf("%-20s %-4s", s.name, c.name);
      for (const char* k : kernels) {
        if (std::string(k).find(only_kernel) == std::string::npos) continue;
        nbsmt::force_kernel(k);
        const bool slow = std::string(k) == "scalar";
        const int reps = slow ? 1 : 5;
        const int64_t Pr = slow ? std::min<int64_t>(P, 64) : P;  // rows timed
        std::shared_ptr<const nbsmt::PreparedWeights> pw;
        const double tp = best_of(reps, [&] {
          pw = nbsmt::prepare_weights(cfg, s.M, steps, w.data(), K, par);
        });
        nbsmt::SmtStats st;
        const double t = best_of(reps, [&] {
          if (conv) {
            nbsmt::accumulate_prepared(*pw, Pr, rows, acc.data(), s.M, 1,
                                       with_stats ? &st : nullptr, par);
          } else {
            nbsmt::accumulate_prepared(*pw, Pr, img.data(), K, acc.data(), s.M, 1,
                                       with_stats ? &st : nullptr, par);
          }
        }) * static_cast<double>(P) / static_cast<double>(Pr);
        std::printf("  %s prep %6.2f rows %7.2f ms (%5.0f GMAC/s)", k, tp * 1e3, t * 1e3,
                    static_cast<double>(P * s.M * K) / t * 1e-9);
      }
      std::printf("\n");
      std::fflush(stdout);
    }
  }
  return 0;
}
