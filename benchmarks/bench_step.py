"""One optimizer step of the LLM at LLaMA-2-13B layer shapes: plain LoRA vs MAGE (Fisher + PEMA).

    python benchmarks/bench_step.py --layers 8          # CUDA, bf16, 4096 tokens (40 layers need ~26 GB of weights)
    python benchmarks/bench_step.py --tiny              # CPU-sized shapes, float32, seconds

Providers (all rank 32 = 4 groups x rank 8, dropout 0.05, AdamW, clip 1.0, same random weights):
  lora   our MultiLoRALinear, all four groups trained, no Fisher, no EMA (the sequential fine-tune)
  mage   our MultiLoRALinear, three groups trained (image+text in, text out) with the per-example Fisher
         in backward, the Fisher all-reduce/mean and the PEMA update after the step
  peft   PEFT's LoRA (r=32) on the same model, when `peft` is installed: the outside reference
One step = forward, per-example-mean cross-entropy, backward, method hooks, clip, AdamW, scheduler.
Reported: median step time, tokens/s, MFU (model FLOPs of the step / device bf16 peak), peak memory.
Rows are appended to benchmarks/results/step.csv with device, date and commit.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from mage.provenance import append_csv_rows, git_commit

if not torch.cuda.is_available() or "--tiny" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, in case a kernel is reached

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from mage.lora import LLAMA_TARGETS, wrap_llama_lora  # noqa: E402
from mage.methods import build_method  # noqa: E402
from mage.trainer.config import MethodConfig, OptimConfig, TrainConfig  # noqa: E402
from mage.trainer.distributed import DistInfo  # noqa: E402
from mage.trainer.engine import DDPEngine  # noqa: E402

CSV_PATH = Path(__file__).resolve().parent / "results" / "step.csv"
FIELDS = ["device", "date", "commit", "provider", "layers", "hidden", "intermediate", "tokens", "seq", "dtype",
          "median_ms", "tokens_per_s", "mfu", "peak_mb"]
PEAK_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12)]
SHAPES = {  # LLaMA-2-13B (SEED-X's LLM, vocab with image/loc tokens) and a CPU-sized copy
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, vocab_size=32330),
    "tiny": dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, vocab_size=512),
}
TRAINED_BY_MAGE = (0, 1, 2)


def build_llm(shape: str, layers: int, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    cfg = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      attn_implementation="sdpa", **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.requires_grad_(False)
    return model


def per_example_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean over examples of each example's mean next-token cross-entropy (docs/METHOD.md section 3)."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return ce.mean(1).mean()


def our_step(model, method, engine, ids):
    def step():
        method.before_backward(ids.shape[0], 1)
        engine.backward(per_example_loss(model, ids), True)
        method.before_clip(engine.grad_of)
        engine.clip()
        engine.step()
        method.after_optimizer_step()
    return step


def setup_ours(provider: str, model, device: torch.device, steps: int):
    wrap_llama_lora(model, rank=8, num_groups=4, alpha=32.0, dropout=0.05)
    method = build_method(provider, MethodConfig(name=provider, train_non_lora=False), model)
    method.on_task_start(TRAINED_BY_MAGE)
    engine = DDPEngine(model, method.param_groups(0.05), OptimConfig(warmup_steps=1), TrainConfig(grad_accum=1),
                       steps, DistInfo(0, 1, 0, device))
    return method, engine


def setup_peft(model, device: torch.device, steps: int):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=list(LLAMA_TARGETS)))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": params, "weight_decay": 0.05}]
    from mage.trainer.optim import build_optimizer, build_scheduler

    opt = build_optimizer(groups, OptimConfig(), device)
    sched = build_scheduler(opt, OptimConfig(warmup_steps=1), steps)

    def step():
        per_example_loss(model, ids_holder[0]).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    ids_holder = [None]
    return step, ids_holder


def step_flops(model_cfg: LlamaConfig, layers: int, tokens: int, seq: int, lora_rank: int, lora_trained: int) -> float:
    """Model FLOPs of one step: frozen linears do forward + input-gradient (4 x params x tokens), the LoRA
    adapters forward + both gradients, causal attention fwd+bwd (3 x 2 x seq x d per token and layer),
    the lm_head forward + input gradient."""
    d, f, v = model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.vocab_size
    frozen = layers * (4 * d * d + 3 * d * f)
    lora_dims = layers * (4 * (d + d) + 3 * (d + f))       # d_in + d_out summed over the 7 targets
    # forward 2r, input gradient 2r, weight gradients of the trained rows 2r_t (per d_in + d_out)
    lora = tokens * lora_dims * (4 * lora_rank + 2 * lora_trained)
    attention = layers * 3 * 2 * seq * d * tokens          # QK^T + AV, causal (half of 4 s d), fwd + 2x bwd
    return 4 * frozen * tokens + lora + attention + 4 * v * d * tokens


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p for key, p in PEAK_BF16 if key in name), 989e12)




def time_step(step, device: torch.device, reps: int) -> tuple[float, float]:
    """(median ms, peak MB) over ``reps`` steps after two warm-up steps."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU-sized shapes in float32 (default without CUDA)")
    p.add_argument("--layers", type=int, help="decoder layers (default 40 on CUDA, 2 with --tiny)")
    p.add_argument("--tokens", type=int, help="tokens per step (default 4096; 128 with --tiny)")
    p.add_argument("--seq", type=int, help="tokens per example (default 1024; 32 with --tiny)")
    p.add_argument("--providers", nargs="+", default=["lora", "mage", "peft"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)

    tiny = args.tiny or not torch.cuda.is_available()
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    shape = "tiny" if tiny else "13b"
    layers = args.layers or (2 if tiny else 40)
    tokens, seq = args.tokens or (128 if tiny else 4096), args.seq or (32 if tiny else 1024)
    if tokens % seq:
        raise SystemExit(f"--tokens {tokens} must be a multiple of --seq {seq}")
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (tokens // seq, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    rows = []
    for provider in args.providers:
        if provider == "peft":
            try:
                import peft  # noqa: F401
            except ImportError:
                print("peft: not installed (pip install peft), skipped")
                continue
        model = build_llm(shape, layers, dtype, device)
        if provider == "peft":
            step, holder = setup_peft(model, device, 1000)
            holder[0] = ids
        elif provider in ("lora", "mage"):
            method, engine = setup_ours(provider, model, device, 1000)
            step = our_step(model, method, engine, ids)
        else:
            raise SystemExit(f"unknown provider {provider!r}; choose from lora, mage, peft")
        model.train()
        ms, peak = time_step(step, device, args.reps)
        trained = 4 if provider in ("lora", "peft") else len(TRAINED_BY_MAGE)
        flops = step_flops(model.config, layers, tokens, seq, 32, 8 * trained)
        peak_f = peak_flops(device)
        row = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "commit": git_commit(), "provider": provider, "layers": layers,
            "hidden": model.config.hidden_size, "intermediate": model.config.intermediate_size,
            "tokens": tokens, "seq": seq, "dtype": str(dtype).removeprefix("torch."),
            "median_ms": round(ms, 3), "tokens_per_s": round(tokens / ms * 1e3, 1),
            "mfu": "" if peak_f is None else round(flops / (ms / 1e3) / peak_f, 4),
            "peak_mb": "" if peak != peak else round(peak, 1),
        }
        rows.append(row)
        print(f"{provider:>5}: {ms:9.2f} ms/step  {row['tokens_per_s']:>10} tok/s  MFU {row['mfu'] or 'n/a'}  "
              f"peak {row['peak_mb'] or 'n/a'} MB")
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rows and not args.no_csv:
        append_csv_rows(CSV_PATH, FIELDS, rows)
    return rows


if __name__ == "__main__":
    main()
