"""Four LoRA groups on one linear layer (docs/METHOD.md section 2), with the per-example Fisher (section 3).

The G groups of rank r are one rank-G*r LoRA whose rank slices are owned by groups. Each group has its
own parameters so that a frozen group is simply absent from the optimizer (no state, no decay); the
stacked ``lora_A`` / ``lora_B`` views feed one fused op.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mage.lora_function import dropout_mask, multi_lora_linear_eager

GROUP_NAMES = ("text_in", "image_in", "text_out", "image_out")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BACKENDS = ("auto", "eager", "triton")


def _graph_task_id() -> int:
    get = getattr(torch._C, "_current_graph_task_id", None)
    return get() if get is not None else -1


class _CountExamples(torch.autograd.Function):
    """Identity whose backward adds the number of examples with c_n != 0 to the module's counter.

    Counting in backward (not forward) keeps the count right under gradient checkpointing, which runs
    the forward twice, and for forwards that never reach backward (evaluation). It is also where a
    module used twice in one graph shows: its per-example gradient is G1 + G2, but each use squares only
    its own part (G1^2 + G2^2), so the Fisher would be silently wrong; that raises instead.
    """

    @staticmethod
    def forward(ctx, y, module, num_examples):
        ctx.module, ctx.num_examples = module, num_examples
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        module = ctx.module
        # Private but stable since torch 2.1: the id of the running backward pass (-1 outside one).
        task = _graph_task_id()
        if task != -1 and module._fisher_graph_task == task:
            raise RuntimeError(
                f"MultiLoRALinear({module.extra_repr()}) ran more than once in one backward pass with "
                "track_fisher on: the per-example Fisher needs (G1 + G2)^2 but each use can only square its "
                "own share (G1^2 + G2^2). Call the module once per step, or turn its track_fisher off.")
        module._fisher_graph_task = task
        module.fisher_count.add_(ctx.num_examples)
        return dy, None, None


def _resolve_groups(groups: Iterable[int | str], num_groups: int) -> tuple[int, ...]:
    resolved = []
    for g in groups:
        if isinstance(g, str):
            if g not in GROUP_NAMES[:num_groups]:
                raise ValueError(f"unknown LoRA group {g!r}; valid names: {GROUP_NAMES[:num_groups]}")
            g = GROUP_NAMES.index(g)
        if not 0 <= int(g) < num_groups:
            raise ValueError(f"LoRA group index {g} out of range 0..{num_groups - 1}")
        resolved.append(int(g))
    return tuple(sorted(set(resolved)))


_GATE_FALLBACK_WARNED = False


def gated_multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                            lora_B: torch.Tensor, scaling: float, dropout_p: float, seed: int, gate: torch.Tensor,
                            rank: int) -> torch.Tensor:
    """y = x W^T + b + s * sum_g gate_g(token) * (drop(x) A_g^T) B_g^T (MoELoRA's per-token group gate).

    ``gate`` (..., G) holds one weight per token and group; plain autograd, so the gate's own gradient
    (the router's) flows. Same dropout mask as the eager reference for a given ``seed``.
    """
    if gate.shape[:-1] != x.shape[:-1] or gate.shape[-1] * rank != lora_A.shape[0]:
        raise ValueError(f"group gate must be (..., {lora_A.shape[0] // rank}) over x's tokens {tuple(x.shape[:-1])}, "
                         f"got {tuple(gate.shape)}")
    x_lora = x * dropout_mask(x.shape, dropout_p, seed, x.device, x.dtype) if dropout_p > 0 else x
    # The adapter in A's dtype (e.g. float32 adapters over a bf16 base), added back in x's dtype.
    h = (x_lora.to(lora_A.dtype) @ lora_A.t()) * gate.repeat_interleave(rank, dim=-1).to(lora_A.dtype)
    return F.linear(x, weight, bias) + (scaling * (h @ lora_B.to(lora_A.dtype).t())).to(x.dtype)


def _triton_function():
    from kernels.multi_lora_linear import multi_lora_linear_triton  # lazy: triton is optional on CPU

    return multi_lora_linear_triton


class MultiLoRALinear(nn.Module):
    """y = base(x) + s * sum_g (drop(x) A_g^T) B_g^T, s = alpha / (num_groups * rank)."""

    def __init__(self, base: nn.Linear, rank: int = 8, num_groups: int = 4, alpha: float = 32.0,
                 dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MultiLoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown LoRA backend {backend!r}; choose one of {BACKENDS}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base
        base.requires_grad_(False)
        self.rank, self.num_groups, self.alpha, self.dropout, self.backend = rank, num_groups, alpha, dropout, backend
        self.scaling = alpha / (rank * num_groups)
        d_in, d_out = base.in_features, base.out_features
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        # A ~ N(0, 0.01^2), B = 0 (docs/METHOD.md section 2): the adapter starts as the identity.
        self.lora_A_groups = nn.ParameterList(
            nn.Parameter(torch.randn(rank, d_in, **kw) * 0.01) for _ in range(num_groups))
        self.lora_B_groups = nn.ParameterList(nn.Parameter(torch.zeros(d_out, rank, **kw)) for _ in range(num_groups))
        total = rank * num_groups
        self.register_buffer("fisher_A", torch.zeros(total, d_in, device=kw["device"], dtype=torch.float32))
        self.register_buffer("fisher_B", torch.zeros(d_out, total, device=kw["device"], dtype=torch.float32))
        self.register_buffer("fisher_count", torch.zeros((), device=kw["device"], dtype=torch.float64))
        self.track_fisher = False
        self.example_scale: torch.Tensor | None = None
        # Example boundaries of a packed batch (int32, B + 1, FlashAttention varlen); None: batch rows.
        self.cu_seqlens: torch.Tensor | None = None
        self._fisher_graph_task = -1
        # Optional module x (..., in) -> per-token group weights (..., num_groups) (MoELoRA's router). When
        # set, the layer runs gated_multi_lora_linear (eager; no per-example Fisher on that path).
        self.group_gate: nn.Module | None = None
        self._trainable: tuple[int, ...] = tuple(range(num_groups))
        self._grad_rows: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def lora_A(self) -> torch.Tensor:
        return torch.cat(list(self.lora_A_groups), dim=0)

    @property
    def lora_B(self) -> torch.Tensor:
        return torch.cat(list(self.lora_B_groups), dim=1)

    @property
    def trainable_groups(self) -> tuple[int, ...]:
        return self._trainable

    def set_trainable_groups(self, groups: Iterable[int | str]) -> None:
        self._trainable = _resolve_groups(groups, self.num_groups)
        for g in range(self.num_groups):
            on = g in self._trainable
            self.lora_A_groups[g].requires_grad_(on)
            self.lora_B_groups[g].requires_grad_(on)
        self._grad_rows = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for g in self._trainable for p in (self.lora_A_groups[g], self.lora_B_groups[g])]

    def grad_rows(self) -> torch.Tensor:
        """Rank rows (of the stacked A) owned by the trainable groups."""
        if self._grad_rows is None or self._grad_rows.device != self.fisher_A.device:
            rows = [g * self.rank + i for g in self._trainable for i in range(self.rank)]
            self._grad_rows = torch.tensor(rows, dtype=torch.long, device=self.fisher_A.device)
        return self._grad_rows

    def reset_fisher(self) -> None:
        self.fisher_A.zero_()
        self.fisher_B.zero_()
        self.fisher_count.zero_()

    def _function(self, x: torch.Tensor):
        if self.backend == "eager" or (self.backend == "auto" and not x.is_cuda):
            return multi_lora_linear_eager
        return _triton_function()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (2, 3) or x.shape[-1] != self.in_features:
            raise ValueError(f"MultiLoRALinear expects x of shape (batch, seq, {self.in_features}) or "
                             f"(tokens, {self.in_features}), got {tuple(x.shape)}")
        p = self.dropout if self.training else 0.0
        # The seed comes from torch's generator so runs are reproducible and checkpoint recomputation
        # (which restores RNG state) regenerates the same dropout mask.
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if p > 0 else 0
        track = self.track_fisher and torch.is_grad_enabled()
        c = self.example_scale if track else None
        fisher = (self.fisher_A, self.fisher_B) if track else (None, None)
        fn = self._function(x)
        if self.group_gate is not None:
            return self._gated_forward(x, fn, p, seed, track)
        weight, bias, lora_A, lora_B = self.base.weight, self.base.bias, self.lora_A, self.lora_B
        # One compute dtype for the op, as autocast would pick for F.linear: the fused op runs outside
        # autocast's op table, and the eager backward outside CPU autocast. The trainer holds A and B in fp32
        # over bf16 base weights (fp32 master weights); their gradients return through the casts in fp32.
        dtype = (torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type)
                 else x.dtype)
        x, weight, lora_A, lora_B = x.to(dtype), weight.to(dtype), lora_A.to(dtype), lora_B.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        varlen = {} if self.cu_seqlens is None else {"cu_seqlens": self.cu_seqlens}
        y = fn(x, weight, bias, lora_A, lora_B, self.scaling, p, seed, self.grad_rows(), *fisher, c, **varlen)
        if track and y.requires_grad:
            examples = x.shape[0] if self.cu_seqlens is None else self.cu_seqlens.numel() - 1
            n = examples if c is None else (c != 0).sum()
            y = _CountExamples.apply(y, self, n)
        return y

    def _gated_forward(self, x: torch.Tensor, fn, p: float, seed: int, track: bool) -> torch.Tensor:
        global _GATE_FALLBACK_WARNED
        if track:
            raise RuntimeError("the per-example Fisher is not computed on the gated (MoELoRA) path: turn "
                               "track_fisher off or remove group_gate")
        if fn is not multi_lora_linear_eager and not _GATE_FALLBACK_WARNED:
            _GATE_FALLBACK_WARNED = True
            warnings.warn("MultiLoRALinear with a group gate runs the eager gated path; the fused Triton kernels "
                          "take no per-token gate", stacklevel=3)
        return gated_multi_lora_linear(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scaling,
                                       p, seed, self.group_gate(x), self.rank)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}x{self.num_groups}, "
                f"alpha={self.alpha}, dropout={self.dropout}, trainable_groups={self._trainable}")


def iter_multi_lora(model: nn.Module) -> Iterator[tuple[str, MultiLoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, MultiLoRALinear):
            yield name, module


def wrap_llama_lora(llm: nn.Module, rank: int = 8, num_groups: int = 4, alpha: float = 32.0, dropout: float = 0.05,
                    targets: Sequence[str] = LLAMA_TARGETS, backend: str = "auto") -> list[str]:
    """Replace the target linears of a transformers LLaMA (q, k, v, o, gate, up, down) in place.

    Returns the qualified names of the wrapped modules; raises if none matched (a wrong model or
    target list would otherwise train nothing silently).
    """
    wrapped = []
    for name, module in list(llm.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, MultiLoRALinear(child, rank, num_groups, alpha, dropout, backend))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"no nn.Linear named any of {tuple(targets)} found in {type(llm).__name__}")
    return wrapped


def set_trainable_groups(model: nn.Module, groups: Iterable[int | str]) -> None:
    groups = tuple(groups)
    for _, m in iter_multi_lora(model):
        m.set_trainable_groups(groups)


def set_example_scale(model: nn.Module, scale: torch.Tensor | None) -> None:
    """Per-example scale c_n for the Fisher of every MultiLoRALinear (None means 1)."""
    for _, m in iter_multi_lora(model):
        m.example_scale = scale


def set_cu_seqlens(model: nn.Module, cu_seqlens: torch.Tensor | None) -> None:
    """Example boundaries (int32, B + 1) of a packed batch for every MultiLoRALinear; None: batch rows."""
    for _, m in iter_multi_lora(model):
        m.cu_seqlens = cu_seqlens


def set_track_fisher(model: nn.Module, on: bool) -> None:
    for _, m in iter_multi_lora(model):
        m.track_fisher = on


def reset_fisher(model: nn.Module) -> None:
    for _, m in iter_multi_lora(model):
        m.reset_fisher()
