"""Two CPU ranks (gloo): the Fisher and its example count are summed over ranks, every rank holds the same
EMA; and the whole trainer runs under torchrun."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mage.trainer.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
BATCH = {0: 2, 1: 3}  # unequal micro-batches: the global count is not world_size x local
ACCUM, STEPS = 2, 2


def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        import mage.methods.base as method_base
        from mage.methods import build_method
        from mage.trainer.config import MethodConfig, OptimConfig, TrainConfig
        from mage.trainer.distributed import DistInfo
        from mage.trainer.engine import DDPEngine
        from tests.test_methods import text_batch, tiny_model

        model = tiny_model(seed=0)  # same weights on both ranks
        method = build_method("mage", MethodConfig(pema_mode="fisher"), model)  # a mode that reads the Fisher
        method.on_task_start((0, 1, 2))
        engine = DDPEngine(model, method.param_groups(0.05), OptimConfig(lr=1e-2, warmup_steps=0),
                           TrainConfig(grad_accum=ACCUM), STEPS, DistInfo(rank, world, 0, torch.device("cpu")))
        seen = {"local": [], "reduced": [], "counts": []}
        real_reduce = method_base.all_reduce_sum_

        def spy_reduce(tensors):
            is_fisher = tensors and tensors[0].dtype == torch.float32
            if is_fisher:
                seen["local"].append(torch.cat([t.reshape(-1) for t in tensors]).clone())
            real_reduce(tensors)
            if is_fisher:
                seen["reduced"].append(torch.cat([t.reshape(-1) for t in tensors]).clone())
            else:
                seen["counts"].append([t.item() for t in tensors])

        method_base.all_reduce_sum_ = spy_reduce
        torch.manual_seed(100 + rank)  # different dropout and data per rank
        model.train()
        for s in range(STEPS):
            for micro in range(ACCUM):
                last = micro == ACCUM - 1
                with engine.accumulating(last):
                    method.before_backward(BATCH[rank], ACCUM)
                    out = engine.forward(text_batch(model, BATCH[rank], seed=1000 * rank + 10 * s + micro))
                    engine.backward(out.loss, last)
            method.before_clip(engine.grad_of)
            engine.clip()
            engine.step()
            method.after_optimizer_step()
        ema = torch.cat([t.reshape(-1) for t in method.ema.values()])
        params = torch.cat([p.detach().reshape(-1) for _, p in method.trainable_named_parameters()])
        torch.save({"ema": ema, "params": params, **seen}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_fisher_counts_and_ema(tmp_path):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "rdzv"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    global_count = ACCUM * (BATCH[0] + BATCH[1])
    for r in (r0, r1):
        assert len(r["counts"]) == STEPS
        assert all(c == global_count for step in r["counts"] for c in step)
    for step in range(STEPS):
        # Each rank's local Fisher is its own; after the reduction both hold the sum of the two.
        assert not torch.equal(r0["local"][step], r1["local"][step])
        torch.testing.assert_close(r0["reduced"][step], r0["local"][step] + r1["local"][step], rtol=0, atol=0)
        assert torch.equal(r0["reduced"][step], r1["reduced"][step])
    assert torch.equal(r0["ema"], r1["ema"]) and torch.equal(r0["params"], r1["params"])


def test_torchrun_two_ranks_end_to_end(tmp_path):
    from mage.data.mini import generate

    data = generate(tmp_path / "data", seed=0, train_per_task=8, test_per_task=3, tasks=["imagenet", "flickr30k"])
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "train.py"), "--data.root", str(data), "--data.tasks", "imagenet,flickr30k",
           "--run.out_dir", str(out), "--train.steps_per_task", "2", "--train.batch_size", "2",
           "--optim.warmup_steps", "1", "--eval.max_examples", "3", "--eval.max_new_tokens", "3",
           "--run.progress", "false"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # start_new_session + killpg on timeout: a hung rank must not outlive the test.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, stderr[-3000:]
    saved = json.loads((out / "accuracy_matrix.json").read_text())
    assert len(saved["matrix"]) == 2 and len(saved["zero_shot"]) == 2
    _, state = load_checkpoint(out / "checkpoints")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
