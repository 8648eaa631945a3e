// CUDA implementation of mage::pema_update_ (schema and checks in ../pema.cpp).
//
// A multi-tensor launch in the manner of torch._foreach / apex multi_tensor_apply: the pointers and
// sizes of up to kMaxTensors tensor groups, and a (tensor, chunk) pair per block, travel by value in
// the kernel's parameters, so the 560 LoRA tensors of a 13B model take a handful of launches instead
// of one per tensor. One pass per element reads the mode's inputs, computes beta and writes the EMA.

#include <cstdint>
#include <vector>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "../pema.h"

namespace mage {
namespace {

// The 4 KiB parameter limit caps a launch at 32 tensor groups, so a list of 560 LoRA tensors takes
// at least 18 launches; chunks of 2^14 elements give each of them a few hundred blocks, enough to
// fill an H100's 132 SMs.
constexpr int kMaxTensors = 32;            // tensor groups per launch
constexpr int kMaxBlocks = 448;            // blocks per launch, one chunk each
constexpr int64_t kChunk = int64_t{1} << 14;  // elements per block
constexpr int kThreads = 512;
constexpr int kVec = 4;                    // elements per vector load: 16 B of float32, 8 B of bfloat16

struct LaunchTable {
  float* ema[kMaxTensors];
  const void* param[kMaxTensors];
  const void* grad[kMaxTensors];
  const float* fisher[kMaxTensors];
  const float* fisher_prev[kMaxTensors];  // null unless mode 'fisher'
  int64_t numel[kMaxTensors];
  int32_t block_chunk[kMaxBlocks];
  uint8_t block_tensor[kMaxBlocks];
};
// Kernel parameters are limited to 4 KiB on every architecture torch supports.
static_assert(sizeof(LaunchTable) + sizeof(PemaMode) + sizeof(PemaScalars) <= 4096,
              "LaunchTable must fit in the 4 KiB of kernel parameters");
static_assert(kChunk % kVec == 0, "chunks must start on a vector boundary");

template <typename T>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T>
__device__ __forceinline__ bool pack_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % sizeof(Pack<T>) == 0;
}

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* ptr) {
  return *reinterpret_cast<const Pack<T>*>(ptr);
}

template <typename P, typename G>
__global__ void __launch_bounds__(kThreads)
    pema_multi_tensor_kernel(const LaunchTable table, const PemaMode mode, const PemaScalars s) {
  const int t = table.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunk;
  const int64_t numel = table.numel[t];
  const int64_t end = begin + kChunk < numel ? begin + kChunk : numel;
  float* ema = table.ema[t];
  const P* param = static_cast<const P*>(table.param[t]);
  const G* grad = static_cast<const G*>(table.grad[t]);
  const float* fisher = table.fisher[t];
  const float* fisher_prev = table.fisher_prev[t];
  const bool reads_grad = pema_reads_grad(mode);
  const bool reads_fisher = pema_reads_fisher(mode);
  const bool reads_prev = pema_reads_fisher_prev(mode);

  // begin is a multiple of kVec, so whole-tensor alignment decides whether this chunk can use packs.
  const bool vectorised = pack_aligned<float>(ema) && pack_aligned<P>(param) &&
                          (!reads_grad || pack_aligned<G>(grad)) &&
                          (!reads_fisher || pack_aligned<float>(fisher)) &&
                          (!reads_prev || pack_aligned<float>(fisher_prev));
  int64_t tail_begin = begin;
  if (vectorised) {
    const int64_t vec_end = begin + (end - begin) / kVec * kVec;
    const int64_t stride = static_cast<int64_t>(blockDim.x) * kVec;
    for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kVec; i < vec_end; i += stride) {
      Pack<float> e = load_pack(ema + i);
      const Pack<P> p = load_pack(param + i);
      const Pack<G> g = reads_grad ? load_pack(grad + i) : Pack<G>{};
      const Pack<float> f = reads_fisher ? load_pack(fisher + i) : Pack<float>{};
      const Pack<float> fp = reads_prev ? load_pack(fisher_prev + i) : Pack<float>{};
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        e.v[k] = pema_new_ema(mode, e.v[k], static_cast<float>(p.v[k]), static_cast<float>(g.v[k]), f.v[k],
                              fp.v[k], s);
      }
      *reinterpret_cast<Pack<float>*>(ema + i) = e;
    }
    tail_begin = vec_end;
  }
  for (int64_t i = tail_begin + threadIdx.x; i < end; i += blockDim.x) {
    const float g = reads_grad ? static_cast<float>(grad[i]) : 0.0f;
    const float f = reads_fisher ? fisher[i] : 0.0f;
    const float fp = reads_prev ? fisher_prev[i] : 0.0f;
    ema[i] = pema_new_ema(mode, ema[i], static_cast<float>(param[i]), g, f, fp, s);
  }
}

struct Lists {
  at::TensorList emas, params, grads, fishers;
  const std::optional<at::TensorList>& fisher_prevs;
};

// Launches the kernel over the tensor groups `indices`, whose params are P and grads G.
template <typename P, typename G>
void launch_groups(const Lists& lists, const std::vector<size_t>& indices, PemaMode mode,
                   const PemaScalars& s, cudaStream_t stream) {
  const bool with_prev = pema_reads_fisher_prev(mode);
  LaunchTable table{};
  int n_tensors = 0;
  int n_blocks = 0;
  auto launch = [&] {
    pema_multi_tensor_kernel<P, G><<<n_blocks, kThreads, 0, stream>>>(table, mode, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  for (const size_t i : indices) {
    const int64_t numel = lists.emas[i].numel();
    if (numel == 0) {
      continue;
    }
    int slot = n_tensors++;
    table.ema[slot] = lists.emas[i].mutable_data_ptr<float>();
    table.param[slot] = lists.params[i].const_data_ptr();
    table.grad[slot] = lists.grads[i].const_data_ptr();
    table.fisher[slot] = lists.fishers[i].const_data_ptr<float>();
    table.fisher_prev[slot] = with_prev ? (*lists.fisher_prevs)[i].const_data_ptr<float>() : nullptr;
    table.numel[slot] = numel;
    const int64_t n_chunks = (numel + kChunk - 1) / kChunk;
    TORCH_CHECK(n_chunks <= INT32_MAX, "mage::pema_update_: tensor ", i, " has ", numel,
                " elements, more than the kernel's chunk index can address; split it");
    for (int64_t c = 0; c < n_chunks; ++c) {
      table.block_tensor[n_blocks] = static_cast<uint8_t>(slot);
      table.block_chunk[n_blocks] = static_cast<int32_t>(c);
      ++n_blocks;
      const bool more_chunks = c + 1 < n_chunks;
      if (n_blocks == kMaxBlocks || (n_tensors == kMaxTensors && !more_chunks)) {
        launch();  // the arguments are copied at launch, so the table can be refilled at once
        n_blocks = 0;
        n_tensors = 0;
        if (more_chunks) {  // the rest of this tensor goes on in slot 0 of a fresh table
          table.ema[0] = table.ema[slot];
          table.param[0] = table.param[slot];
          table.grad[0] = table.grad[slot];
          table.fisher[0] = table.fisher[slot];
          table.fisher_prev[0] = table.fisher_prev[slot];
          table.numel[0] = table.numel[slot];
          slot = 0;
          n_tensors = 1;
        }
      }
    }
  }
  if (n_blocks > 0) {
    launch();
  }
}

void pema_update_cuda(at::TensorList emas, at::TensorList params, at::TensorList grads,
                      at::TensorList fishers, std::optional<at::TensorList> fisher_prevs,
                      c10::string_view mode, double lam, double beta_min, double beta_max,
                      double fixed_beta) {
  const PemaMode parsed = check_pema_inputs(emas, params, grads, fishers, fisher_prevs, mode, beta_min,
                                            beta_max, c10::DeviceType::CUDA);
  if (emas.empty()) {
    return;
  }
  const PemaScalars scalars = make_pema_scalars(lam, beta_min, beta_max, fixed_beta);
  const c10::cuda::CUDAGuard guard(emas[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // One kernel instantiation per (param dtype, grad dtype): group the tensors accordingly.
  std::vector<size_t> by_dtypes[4];
  for (size_t i = 0; i < emas.size(); ++i) {
    const int key = 2 * (params[i].scalar_type() == at::kBFloat16) + (grads[i].scalar_type() == at::kBFloat16);
    by_dtypes[key].push_back(i);
  }
  const Lists lists{emas, params, grads, fishers, fisher_prevs};
  using at::BFloat16;
  if (!by_dtypes[0].empty()) launch_groups<float, float>(lists, by_dtypes[0], parsed, scalars, stream);
  if (!by_dtypes[1].empty()) launch_groups<float, BFloat16>(lists, by_dtypes[1], parsed, scalars, stream);
  if (!by_dtypes[2].empty()) launch_groups<BFloat16, float>(lists, by_dtypes[2], parsed, scalars, stream);
  if (!by_dtypes[3].empty()) launch_groups<BFloat16, BFloat16>(lists, by_dtypes[3], parsed, scalars, stream);
}

}  // namespace

TORCH_LIBRARY_IMPL(mage, CUDA, m) {
  m.impl("pema_update_", &pema_update_cuda);
}

}  // namespace mage
