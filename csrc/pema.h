// Host-side pieces of mage::pema_update_ shared by the CPU (pema.cpp) and CUDA (cuda/pema.cu) builds.
#pragma once

#include <optional>
#include <string_view>

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include "pema_math.h"

namespace mage {

// Checks the arguments of one call (list lengths, dtypes, shapes, devices, contiguity, mode) and
// returns the parsed mode; every failure is a TORCH_CHECK saying what is wrong and what to do.
PemaMode check_pema_inputs(at::TensorList emas, at::TensorList params, at::TensorList grads,
                           at::TensorList fishers, const std::optional<at::TensorList>& fisher_prevs,
                           std::string_view mode, double beta_min, double beta_max,
                           c10::DeviceType device_type);

// Rounds the double arguments of the schema to the float32 scalars the kernels use.
PemaScalars make_pema_scalars(double lam, double beta_min, double beta_max, double fixed_beta);

}  // namespace mage
