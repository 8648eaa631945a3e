// mage::pema_update_: the schema, the argument checks and the CPU implementation.
//
// One call updates a whole list of EMA tensors in place (multi-tensor, like torch._foreach_*):
//   beta = clamp(rule(mode), beta_min, beta_max), non-finite -> beta_max;  ema <- beta*ema + (1-beta)*param
// with the rules of pema_math.h. The CUDA implementation lives in cuda/pema.cu.

#include <algorithm>
#include <string>
#include <vector>

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "pema.h"

namespace mage {
namespace {

constexpr const char* kOp = "mage::pema_update_: ";

PemaMode parse_mode(std::string_view mode) {
  if (mode == "paper") return PemaMode::kPaper;
  if (mode == "taylor") return PemaMode::kTaylor;
  if (mode == "fixed") return PemaMode::kFixed;
  if (mode == "fisher") return PemaMode::kFisher;
  TORCH_CHECK(false, kOp, "unknown mode '", std::string(mode),
              "'; choose one of 'paper', 'taylor', 'fixed', 'fisher'");
}

void check_list_length(const char* name, size_t got, size_t want) {
  TORCH_CHECK(got == want, kOp, "got ", want, " emas but ", got, " ", name,
              "; pass exactly one entry of ", name, " per EMA tensor, in the same order");
}

// What a list holds decides the dtypes it may have and what the error messages advise.
enum class Role { kEma, kParamOrGrad, kFisher };

// Tensor `name`[i] against its EMA emas[i].
void check_tensor(const char* name, size_t i, const at::Tensor& t, const at::Tensor& ema,
                  const c10::Device& device, Role role) {
  TORCH_CHECK(t.defined(), kOp, name, "[", i, "] is an undefined tensor; pass a tensor");
  TORCH_CHECK(t.device() == device, kOp, name, "[", i, "] is on ", t.device(), " but emas[0] is on ",
              device, "; move every tensor of one call to the same device");
  const auto dtype = t.scalar_type();
  switch (role) {
    case Role::kEma:
      TORCH_CHECK(dtype == at::kFloat, kOp, "emas[", i, "] has dtype ", dtype,
                  "; PEMA keeps its EMA in float32: allocate it with .float()");
      TORCH_CHECK(t.is_contiguous(), kOp, "emas[", i, "] is not contiguous; the update is in place, so keep "
                  "the EMA in a contiguous float32 tensor (a .contiguous() copy would not be updated)");
      return;
    case Role::kParamOrGrad:
      TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, kOp, name, "[", i, "] has dtype ", dtype,
                  "; params and grads must be float32 or bfloat16: convert with .float()");
      break;
    case Role::kFisher:
      TORCH_CHECK(dtype == at::kFloat, kOp, name, "[", i, "] has dtype ", dtype,
                  "; Fisher tensors must be float32: convert with .float()");
      break;
  }
  TORCH_CHECK(t.sizes() == ema.sizes(), kOp, name, "[", i, "] has shape ", t.sizes(), " but emas[", i,
              "] has shape ", ema.sizes(), "; pass tensors of the EMA's shape, in the order of emas");
  TORCH_CHECK(t.is_contiguous(), kOp, name, "[", i, "] is not contiguous; pass ", name, "[", i,
              "].contiguous()");
  const at::MemOverlapStatus overlap = at::get_overlap_status(t, ema);
  TORCH_CHECK(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, kOp, name, "[",
              i, "] shares memory with emas[", i, "], which the op overwrites; pass a separate tensor (.clone())");
}

}  // namespace

PemaMode check_pema_inputs(at::TensorList emas, at::TensorList params, at::TensorList grads,
                           at::TensorList fishers, const std::optional<at::TensorList>& fisher_prevs,
                           std::string_view mode, double beta_min, double beta_max,
                           c10::DeviceType device_type) {
  const PemaMode parsed = parse_mode(mode);
  TORCH_CHECK(beta_min <= beta_max, kOp, "beta_min (", beta_min, ") is larger than beta_max (", beta_max,
              "); pass beta_min <= beta_max");
  const size_t n = emas.size();
  check_list_length("params", params.size(), n);
  check_list_length("grads", grads.size(), n);
  check_list_length("fishers", fishers.size(), n);
  if (parsed == PemaMode::kFisher) {
    TORCH_CHECK(fisher_prevs.has_value(), kOp, "mode 'fisher' needs fisher_prevs (the running sum of the "
                "earlier tasks' Fisher, one per EMA tensor); pass fisher_prevs");
  }
  if (fisher_prevs.has_value()) {
    check_list_length("fisher_prevs", fisher_prevs->size(), n);
  }
  if (n == 0) {
    return parsed;
  }
  const c10::Device device = emas[0].device();
  TORCH_CHECK(device.type() == device_type, kOp, "emas[0] is on ", device, " but this is the ",
              c10::DeviceTypeName(device_type), " implementation; move every tensor of one call to one device");
  for (size_t i = 0; i < n; ++i) {
    check_tensor("emas", i, emas[i], emas[i], device, Role::kEma);
    check_tensor("params", i, params[i], emas[i], device, Role::kParamOrGrad);
    check_tensor("grads", i, grads[i], emas[i], device, Role::kParamOrGrad);
    check_tensor("fishers", i, fishers[i], emas[i], device, Role::kFisher);
    if (fisher_prevs.has_value()) {
      check_tensor("fisher_prevs", i, (*fisher_prevs)[i], emas[i], device, Role::kFisher);
    }
  }
  return parsed;
}

PemaScalars make_pema_scalars(double lam, double beta_min, double beta_max, double fixed_beta) {
  return PemaScalars{static_cast<float>(lam), static_cast<float>(beta_min), static_cast<float>(beta_max),
                     static_cast<float>(fixed_beta), static_cast<float>(1.0 - fixed_beta)};
}

namespace {

// Raw pointers of one tensor group (ema, param, grad, fisher[, fisher_prev]).
struct CpuGroup {
  float* ema;
  const void* param;
  const void* grad;
  const float* fisher;
  const float* fisher_prev;  // null unless mode 'fisher'
};

using RangeFn = void (*)(const CpuGroup&, int64_t, int64_t, const PemaScalars&);

template <PemaMode M, typename P, typename G>
void update_range(const CpuGroup& t, int64_t begin, int64_t end, const PemaScalars& s) {
  // Distinct tensors (the op's contract): __restrict__ lets the compiler vectorise the loop.
  float* __restrict__ ema = t.ema;
  const P* __restrict__ param = static_cast<const P*>(t.param);
  const G* __restrict__ grad = static_cast<const G*>(t.grad);
  const float* __restrict__ fisher = t.fisher;
  const float* __restrict__ fisher_prev = t.fisher_prev;
  for (int64_t i = begin; i < end; ++i) {
    const float g = pema_reads_grad(M) ? static_cast<float>(grad[i]) : 0.0f;
    const float f = pema_reads_fisher(M) ? fisher[i] : 0.0f;
    const float fp = pema_reads_fisher_prev(M) ? fisher_prev[i] : 0.0f;
    ema[i] = pema_new_ema(M, ema[i], static_cast<float>(param[i]), g, f, fp, s);
  }
}

template <PemaMode M>
RangeFn pick_dtypes(at::ScalarType param, at::ScalarType grad) {
  using at::BFloat16;
  if (param == at::kFloat) {
    return grad == at::kFloat ? &update_range<M, float, float> : &update_range<M, float, BFloat16>;
  }
  return grad == at::kFloat ? &update_range<M, BFloat16, float> : &update_range<M, BFloat16, BFloat16>;
}

// The mode is a template argument on CPU so each loop body is branch-free and vectorisable.
RangeFn pick_range_fn(PemaMode mode, at::ScalarType param, at::ScalarType grad) {
  switch (mode) {
    case PemaMode::kPaper: return pick_dtypes<PemaMode::kPaper>(param, grad);
    case PemaMode::kTaylor: return pick_dtypes<PemaMode::kTaylor>(param, grad);
    case PemaMode::kFixed: return pick_dtypes<PemaMode::kFixed>(param, grad);
    case PemaMode::kFisher: return pick_dtypes<PemaMode::kFisher>(param, grad);
  }
  TORCH_CHECK(false, kOp, "internal error: unhandled mode");
}

// Elements per work item: large enough to amortise scheduling, small enough to balance many
// small tensors across threads.
constexpr int64_t kCpuChunk = int64_t{1} << 15;

struct WorkItem {
  size_t tensor;
  int64_t begin;
  int64_t end;
};

void pema_update_cpu(at::TensorList emas, at::TensorList params, at::TensorList grads,
                     at::TensorList fishers, std::optional<at::TensorList> fisher_prevs,
                     c10::string_view mode, double lam, double beta_min, double beta_max,
                     double fixed_beta) {
  const PemaMode parsed = check_pema_inputs(emas, params, grads, fishers, fisher_prevs, mode, beta_min,
                                            beta_max, c10::DeviceType::CPU);
  const PemaScalars scalars = make_pema_scalars(lam, beta_min, beta_max, fixed_beta);
  const bool with_prev = pema_reads_fisher_prev(parsed);

  std::vector<CpuGroup> groups;
  std::vector<RangeFn> fns;
  std::vector<WorkItem> items;
  groups.reserve(emas.size());
  fns.reserve(emas.size());
  for (size_t i = 0; i < emas.size(); ++i) {
    groups.push_back(CpuGroup{emas[i].mutable_data_ptr<float>(), params[i].const_data_ptr(),
                              grads[i].const_data_ptr(), fishers[i].const_data_ptr<float>(),
                              with_prev ? (*fisher_prevs)[i].const_data_ptr<float>() : nullptr});
    fns.push_back(pick_range_fn(parsed, params[i].scalar_type(), grads[i].scalar_type()));
    const int64_t numel = emas[i].numel();
    for (int64_t begin = 0; begin < numel; begin += kCpuChunk) {
      items.push_back(WorkItem{i, begin, std::min(begin + kCpuChunk, numel)});
    }
  }
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const WorkItem& w = items[k];
      fns[w.tensor](groups[w.tensor], w.begin, w.end, scalars);
    }
  });
}

}  // namespace

// The mode argument is called `rule` in the schema: torch.compile's auto_functionalize passes its own
// keyword `mode` to its handlers, which an op argument of that name would collide with.
TORCH_LIBRARY(mage, m) {
  m.def(
      "pema_update_(Tensor(a!)[] emas, Tensor[] params, Tensor[] grads, Tensor[] fishers, "
      "Tensor[]? fisher_prevs, str rule, float lam, float beta_min, float beta_max, float fixed_beta) -> ()");
}

TORCH_LIBRARY_IMPL(mage, CPU, m) {
  m.impl("pema_update_", &pema_update_cpu);
}

}  // namespace mage
