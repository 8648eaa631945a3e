// The elementwise PEMA rule, shared by the CPU and CUDA kernels so both compute the same thing.
//
// Every operation is written in the order of the eager reference (mage/pema.py) and both builds
// disable floating-point contraction (-ffp-contract=off, --fmad=false): each product and sum is
// rounded once, as in the chain of eager float32 torch ops, so the native op reproduces it.
#pragma once

#include <cfloat>
#include <cmath>

#include <c10/macros/Macros.h>

namespace mage {

enum class PemaMode : int { kPaper = 0, kTaylor = 1, kFixed = 2, kFisher = 3 };

// Scalars of one update, already rounded to float32 the way torch rounds a Python scalar
// operand of a float32 op. one_minus_fixed_beta is (1 - fixed_beta) taken in double first,
// because the reference computes it on Python floats before it meets a tensor.
struct PemaScalars {
  float lam;
  float beta_min;
  float beta_max;
  float fixed_beta;
  float one_minus_fixed_beta;
};

// Which inputs a mode reads: kernels skip the loads of the others.
C10_HOST_DEVICE constexpr bool pema_reads_grad(PemaMode m) {
  return m == PemaMode::kPaper || m == PemaMode::kTaylor;
}
C10_HOST_DEVICE constexpr bool pema_reads_fisher(PemaMode m) {
  return m != PemaMode::kFixed;
}
C10_HOST_DEVICE constexpr bool pema_reads_fisher_prev(PemaMode m) {
  return m == PemaMode::kFisher;
}

// beta before clamping; delta = param - ema.
C10_HOST_DEVICE inline float pema_raw_beta(PemaMode mode, float delta, float grad, float fisher,
                                           float fisher_prev, const PemaScalars& s) {
  switch (mode) {
    case PemaMode::kPaper:
      return (grad + 1.0f) / (delta * (fisher * fisher + s.lam));
    case PemaMode::kTaylor:
      return grad / (delta * (fisher + s.lam));
    case PemaMode::kFixed:
      return s.fixed_beta;
    case PemaMode::kFisher: {
      const float total = fisher_prev + fisher;
      // An entry no task has weighed (both Fishers 0) gets w = 0: the plain EMA.
      const float w = total > 0.0f ? fisher_prev / total : 0.0f;
      return s.one_minus_fixed_beta * w + s.fixed_beta;
    }
  }
  return s.beta_max;
}

// clamp(raw, beta_min, beta_max), with a non-finite raw (delta = 0 divides by zero) -> beta_max.
// Written as selects (no early return, no fminf/fmaxf) so compilers vectorise it; for finite raw it
// equals torch.clamp's min(max(raw, beta_min), beta_max).
C10_HOST_DEVICE inline float pema_clamp_beta(float raw, const PemaScalars& s) {
  // fabsf(nan) <= x is false and fabsf(inf) > FLT_MAX: one test catches both.
  const bool finite = fabsf(raw) <= FLT_MAX;
  const float above_min = raw < s.beta_min ? s.beta_min : raw;
  const float clamped = above_min > s.beta_max ? s.beta_max : above_min;
  return finite ? clamped : s.beta_max;
}

// theta* <- beta * theta* + (1 - beta) * theta: beta = 1 keeps ema and beta = 0 copies param exactly.
C10_HOST_DEVICE inline float pema_new_ema(PemaMode mode, float ema, float param, float grad,
                                          float fisher, float fisher_prev, const PemaScalars& s) {
  const float beta = pema_clamp_beta(pema_raw_beta(mode, param - ema, grad, fisher, fisher_prev, s), s);
  return ema * beta + (1.0f - beta) * param;
}

}  // namespace mage
