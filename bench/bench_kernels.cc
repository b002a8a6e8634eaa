// Microbenchmark of nbsmt::accumulate() alone (no ONNX Runtime): ResNet-18 conv
// layers at 224x224 batch 8 as im2col GEMMs and a 128x768 @ 768x768 MatMul,
// ReLU-like activations (50 % zeros). Prints the best time of several runs per
// kernel implementation and configuration, and the speed-up over the scalar loop
// (measured on a reduced problem and scaled).
//
// Build: cmake -S custom_ops -B build -DNBSMT_BUILD_BENCH=ON && build/nbsmt_bench_kernels [threads]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <random>
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
  int64_t P, M, K;
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
  Pool pool(threads);
  nbsmt::Parallel par;
  par.ctx = &pool;
  par.run = threads > 1 ? Pool::run : nullptr;
  const Shape shapes[] = {
      {"conv64 56x56", 8 * 56 * 56, 64, 64 * 9},   {"conv128 28x28", 8 * 28 * 28, 128, 128 * 9},
      {"conv256 14x14", 8 * 14 * 14, 256, 256 * 9}, {"conv512 7x7", 8 * 7 * 7, 512, 512 * 9},
      {"matmul 128x768x768", 128, 768, 768},
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
  std::printf("threads=%d stats=%d; times in ms (best of 5); GMAC/s counts K*M*P\n", threads,
              with_stats);
  std::mt19937_64 rng(7);
  for (const Shape& s : shapes) {
    std::vector<int16_t> x(static_cast<size_t>(s.P * s.K));
    std::vector<int8_t> w(static_cast<size_t>(s.M * s.K));
    for (auto& v : x) v = static_cast<int16_t>((rng() & 1) ? 0 : 1 + rng() % 255);
    for (auto& v : w) v = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
    std::vector<int32_t> acc(static_cast<size_t>(s.P * s.M));
    for (const Cfg& c : cfgs) {
      nbsmt::SmtConfig cfg;
      cfg.threads = c.T;
      cfg.reduce = c.r;
      const int64_t steps = s.K / c.T;
      std::printf("%-20s %-4s", s.name, c.name);
      for (const char* k : kernels) {
        nbsmt::force_kernel(k);
        const bool slow = std::string(k) == "scalar";
        const int reps = slow ? 1 : 5;
        // The generic kernel is slow: time a slice of rows and scale.
        const int64_t P = slow ? std::min<int64_t>(s.P, 64) : s.P;
        nbsmt::SmtStats st;
        const double t = best_of(reps, [&] {
          nbsmt::accumulate(cfg, P, s.M, steps, x.data(), s.K, w.data(), s.K, acc.data(), s.M, 1,
                            with_stats ? &st : nullptr, par);
        }) * static_cast<double>(s.P) / static_cast<double>(P);
        std::printf("  %s %8.2f ms (%6.1f GMAC/s)", k, t * 1e3,
                    static_cast<double>(s.P * s.M * s.K) / t * 1e-9);
      }
      std::printf("\n");
      std::fflush(stdout);
    }
  }
  return 0;
}
