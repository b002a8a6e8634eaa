// nbsmt::Parallel backed by ONNX Runtime's intra-op thread pool.
#pragma once

#include <algorithm>
#include <cstdint>

#include "nbsmt/kernels.h"
#include "ort_api.h"

namespace nbsmt::ort {

// Runs work on the session's intra-op pool via KernelContext_ParallelFor (API 17).
// With intra_op_num_threads = 1 ORT runs the calls inline. Every task writes
// disjoint memory, so results never depend on the schedule.
class OrtParallel {
 public:
  OrtParallel(const OrtApi* api, OrtKernelContext* ctx) : api_(api), ctx_(ctx) {
    parallel_.ctx = this;
    parallel_.run = &OrtParallel::run;
  }
  OrtParallel(const OrtParallel&) = delete;
  OrtParallel& operator=(const OrtParallel&) = delete;

  const Parallel& get() const { return parallel_; }

  // Calls f(begin, end) on consecutive ranges of [0, n) of about `grain` items,
  // possibly concurrently. f must not throw.
  template <class F>
  void for_ranges(int64_t n, int64_t grain, const F& f) const {
    if (n <= 0) return;
    grain = std::max<int64_t>(1, grain);
    struct Job {
      const F* f;
      int64_t n, grain;
    } job{&f, n, grain};
    const int64_t tasks = (n + grain - 1) / grain;
    parallel_(
        [](void* data, size_t i) {
          const Job* j = static_cast<const Job*>(data);
          const int64_t b = static_cast<int64_t>(i) * j->grain;
          (*j->f)(b, std::min(j->n, b + j->grain));
        },
        static_cast<size_t>(tasks), &job);
  }

 private:
  static void run(void* self, void (*fn)(void*, size_t), size_t total, void* data) {
    auto* p = static_cast<OrtParallel*>(self);
    OrtStatus* st = p->api_->KernelContext_ParallelFor(p->ctx_, fn, total, 0, data);
    if (st != nullptr) {
      // ORT rejects the call before running anything (e.g. no context): run inline.
      p->api_->ReleaseStatus(st);
      for (size_t i = 0; i < total; ++i) fn(data, i);
    }
  }

  const OrtApi* api_;
  OrtKernelContext* ctx_;
  Parallel parallel_;
};

// Grain for splitting n items into at most `max_tasks` tasks of at least `min_grain`.
inline int64_t grain_for(int64_t n, int64_t min_grain, int64_t max_tasks = 64) {
  return std::max(min_grain, (n + max_tasks - 1) / max_tasks);
}

}  // namespace nbsmt::ort
