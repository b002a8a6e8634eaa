// Selects the implementation of accumulate(). Fast paths are added here.
#include "nbsmt/kernels.h"

namespace nbsmt {

void accumulate(const SmtConfig& cfg, int64_t P, int64_t M, int64_t steps,
                const int16_t* x, int64_t x_stride, const int8_t* w, int64_t w_stride,
                int32_t* acc, int64_t acc_row_stride, int64_t acc_col_stride,
                SmtStats* stats, const Parallel& parallel) {
  // Split the rows of x across workers; each worker adds its own stats.
  struct Job {
    const SmtConfig* cfg; int64_t P, M, steps; const int16_t* x; int64_t xs;
    const int8_t* w; int64_t ws; int32_t* acc; int64_t ars, acs; int64_t chunk;
    SmtStats* parts;
  };
  const int64_t chunks = P < 64 ? (P > 0 ? P : 1) : 64;
  const int64_t chunk = (P + chunks - 1) / chunks;
  SmtStats parts_storage[64];
  Job job{&cfg, P, M, steps, x, x_stride, w, w_stride, acc, acc_row_stride, acc_col_stride,
          chunk, parts_storage};
  parallel(
      [](void* data, size_t i) {
        auto* j = static_cast<Job*>(data);
        const int64_t p0 = static_cast<int64_t>(i) * j->chunk;
        int64_t p1 = p0 + j->chunk;
        if (p1 > j->P) p1 = j->P;
        if (p0 >= p1) return;
        accumulate_scalar(*j->cfg, p1 - p0, j->M, j->steps, j->x + p0 * j->xs, j->xs, j->w, j->ws,
                          j->acc + p0 * j->ars, j->ars, j->acs, &j->parts[i]);
      },
      static_cast<size_t>(chunks), &job);
  if (stats != nullptr) {
    for (int64_t i = 0; i < chunks; ++i) stats->add(parts_storage[i]);
  }
}

}  // namespace nbsmt
