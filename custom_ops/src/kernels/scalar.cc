// The straightforward NB-SMT loop (SPEC.md §3.3-§3.4): ground truth for the fast kernels.
#include <cmath>

#include "nbsmt/kernels.h"

namespace nbsmt {

int16_t quantize_activation(float x, float x_scale, bool act_signed) {
  const float q = std::nearbyint(x / x_scale);  // IEEE float32 division, round half to even
  const float lo = act_signed ? -127.0f : 0.0f;
  const float hi = act_signed ? 127.0f : 255.0f;
  if (std::isnan(q)) return 0;
  if (q < lo) return static_cast<int16_t>(lo);
  if (q > hi) return static_cast<int16_t>(hi);
  return static_cast<int16_t>(q);
}

void accumulate_scalar(const SmtConfig& cfg, int64_t P, int64_t M, int64_t steps,
                       const int16_t* x, int64_t x_stride, const int8_t* w, int64_t w_stride,
                       int32_t* acc, int64_t acc_row_stride, int64_t acc_col_stride,
                       SmtStats* stats) {
  const int T = cfg.threads;
  SmtStats local;
  for (int64_t p = 0; p < P; ++p) {
    const int16_t* xr = x + p * x_stride;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* wr = w + m * w_stride;
      int64_t sum = 0;
      for (int64_t s = 0; s < steps; ++s) {
        int n = 0;
        for (int t = 0; t < T; ++t) n += (xr[s * T + t] != 0 && wr[s * T + t] != 0);
        local.groups += 1;
        local.active_slots += n;
        if (n >= 2) local.collisions += 1;
        for (int t = 0; t < T; ++t) {
          int xv = xr[s * T + t];
          int wv = wr[s * T + t];
          if (xv == 0 || wv == 0) continue;  // idle thread: contributes 0
          bool red_x = false, red_w = false;
          if (n >= 3) {
            red_x = red_w = true;
          } else if (n == 2) {
            red_x = cfg.reduce == Reduce::kActivations;
            red_w = cfg.reduce == Reduce::kWeights;
          }
          if (red_x) {
            int r = cfg.act_signed ? reduce_signed(xv) : reduce_unsigned(xv);
            local.reduced_operands += (r != xv);
            xv = r;
          }
          if (red_w) {
            int r = reduce_signed(wv);
            local.reduced_operands += (r != wv);
            wv = r;
          }
          sum += static_cast<int64_t>(xv) * wv;
        }
      }
      acc[p * acc_row_stride + m * acc_col_stride] = static_cast<int32_t>(sum);
    }
  }
  if (stats != nullptr) stats->add(local);
}

}  // namespace nbsmt
