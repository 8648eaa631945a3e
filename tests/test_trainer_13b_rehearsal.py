"""The seed-x-13b preset's code path, rehearsed on CPU: two DDP ranks (gloo) under torchrun, SEED-X weights
read from a release layout on disk (agent file, HF LLaMA folder, ViT state dict, tokenizer folder) and held in
bf16 like the 13B's, gradient checkpointing, bf16 autocast, the preset's engine and method. Only the sizes are
the tiny graph's. One rank's loss is made NaN at one step: both ranks must skip it together."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from mage.trainer.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TASK = "vqav2"

# The entry each torchrun rank runs: train.py, with the tiny graph loaded in bf16 (as load_seed_x loads the
# 13B) and a NaN loss on rank 1's first micro-batch of step 2 (1-based).
ENTRY = r'''
import dataclasses, json, os, sys
import torch
sys.path.insert(0, {repo!r})
import mage.model.build as build
build.DEFAULT_DTYPES["tiny"] = torch.bfloat16
from mage.lora import iter_multi_lora
from mage.trainer.engine import DDPEngine
from mage.trainer.loop import SequenceTrainer

rank, calls = int(os.environ["RANK"]), [0]
real_forward, real_train_task = DDPEngine.forward, SequenceTrainer._train_task

def forward(self, batch):
    out = real_forward(self, batch)
    calls[0] += 1
    if rank == 1 and calls[0] == 3:  # grad_accum 2: the first micro-batch of step 2
        out = dataclasses.replace(out, loss=out.loss * float("nan"))
    return out

def train_task(self, k):
    m = self.model
    lora = next(mod for _, mod in iter_multi_lora(m))
    with open(os.path.join({out!r}, f"dtypes.rank{{rank}}.json"), "w") as f:
        json.dump({{"base": str(lora.base.weight.dtype), "lora": str(lora.lora_A_groups[0].dtype),
                   "fisher": str(lora.fisher_A.dtype), "count": str(lora.fisher_count.dtype),
                   "embed": str(m.llm.get_input_embeddings().weight.dtype),
                   "vit": str(next(m.visual_encoder.parameters()).dtype),
                   "checkpointing": m.gradient_checkpointing}}, f)
    return real_train_task(self, k)

DDPEngine.forward, SequenceTrainer._train_task = forward, train_task
from mage.trainer.main import main
main()
'''


def write_release(root: Path) -> dict[str, Path]:
    """A tiny SEED-X in the release's layout (what model.*_path of the 13B preset point to)."""
    from mage.model import build_model
    from mage.model.checkpoint import AGENT_PREFIXES

    torch.manual_seed(3)
    model = build_model("tiny")
    paths = {"agent": root / "agent" / "pytorch_model.bin", "llm": root / "llm", "vit": root / "qwen_vit_G.pt",
             "tokenizer": root / "tokenizer"}
    paths["agent"].parent.mkdir(parents=True)
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith(AGENT_PREFIXES)}, paths["agent"])
    model.llm.save_pretrained(paths["llm"])
    torch.save(model.visual_encoder.state_dict(), paths["vit"])
    model.tokenizer.save_pretrained(paths["tokenizer"])
    return paths


def test_seed_x_13b_preset_starts_under_ddp_and_trains(tmp_path):
    from mage.data.mini import generate

    data = generate(tmp_path / "data", seed=0, train_per_task=8, test_per_task=2, tasks=[TASK])
    w = write_release(tmp_path / "release")
    out = tmp_path / "run"
    out.mkdir()
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY.format(repo=str(REPO), out=str(out)))
    steps = 3
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(entry),
           "--config", "seed-x-13b", "--model.name", "tiny", "--model.agent_path", str(w["agent"]),
           "--model.llm_path", str(w["llm"]), "--model.vision_path", str(w["vit"]),
           "--model.tokenizer_path", str(w["tokenizer"]), "--data.root", str(data), "--data.tasks", TASK,
           "--train.device", "cpu", "--train.steps_per_task", str(steps), "--train.batch_size", "2",
           "--optim.warmup_steps", "1", "--run.checkpoint_every", "2", "--run.out_dir", str(out),
           "--eval.max_examples", "2", "--eval.max_new_tokens", "2", "--eval.zero_shot", "false",
           "--run.progress", "false", "--run.tensorboard", "false"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # a rank that skipped alone would leave the other waiting in a collective
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, stderr[-3000:]

    saved = json.loads((out / "config.json").read_text())
    # What the preset decides, not overridden above.
    assert saved["train"]["engine"] == "ddp" and saved["train"]["bf16"] == "true"
    assert saved["train"]["grad_accum"] == 2 and saved["model"]["gradient_checkpointing"] is True
    assert saved["method"]["name"] == "mage" and saved["lora"]["rank"] == 8 and saved["lora"]["num_groups"] == 4
    for r in range(2):
        dtypes = json.loads((out / f"dtypes.rank{r}.json").read_text())
        assert dtypes == {"base": "torch.bfloat16", "vit": "torch.bfloat16", "lora": "torch.float32",
                          "embed": "torch.float32", "fisher": "torch.float32", "count": "torch.float64",
                          "checkpointing": True}
    # Rank 1's NaN made both ranks skip step 2; the run went on and finished.
    assert stdout.count("non-finite loss or gradient, step skipped") == 1
    assert "step 2: non-finite" in stdout
    tensors, state = load_checkpoint(out / "checkpoints")
    assert state["world_size"] == 2 and state["task"] == 1
    assert len(json.loads((out / "accuracy_matrix.json").read_text())["matrix"]) == 1
    end = load_file(out / "checkpoints" / "task01_end.safetensors")
    lora = {k: v for k, v in end.items() if ".lora_" in k}
    assert lora and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in lora.values())
