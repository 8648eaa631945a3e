"""One row of the accuracy matrix: every task of the sequence scored with the current weights.

Text tasks generate an answer and score it with the task's scorer (with an error label per example for
the error-type forgetting); image tasks compare the generated output-image features with the target
image's features (cosine x 100; the tiny setting's stand-in for CLIP). Test examples are split over
ranks and the per-example results gathered, so every rank ends with the same row.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from mage.data.dataset import build_dataloader
from mage.data.readers import Record, load_test_records
from mage.data.tasks import TaskSpec
from mage.eval.scorers import error_labels, feature_cosine_score, score_text
from mage.trainer.data import image_config, to_device
from mage.trainer.distributed import DistInfo


def image_feature_scores(model, batch: dict) -> list[float]:
    """cosine(generated features, target features) x 100 per output image."""
    generated = model.generate_image_features(batch)
    return feature_cosine_score(generated, model.encode_image_features(batch["target_images"])).tolist()


@torch.no_grad()
def _evaluate_task(model, task: TaskSpec, records: list[Record], cfg, info: DistInfo, bf16: bool):
    """(index, prediction text or image score) for this rank's share of ``records``."""
    mine = list(range(info.rank, len(records), info.world_size))
    if not mine:
        return []
    shard = [records[i] for i in mine]
    loader = build_dataloader(shard, model.tokenizer, image_config(model), cfg.batch_size, mode="generate",
                              shuffle=False)
    out, start = [], 0
    for batch in loader:
        recs = shard[start:start + len(batch["example_ids"])]
        idx = mine[start:start + len(recs)]
        start += len(recs)
        batch = to_device(batch, info.device)
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=bf16):
            if task.output == "text":
                out += list(zip(idx, model.generate_text(batch, cfg.max_new_tokens)))
            else:
                out += list(zip(idx, image_feature_scores(model, batch)))
    return out


def evaluate_tasks(model, tasks: list[TaskSpec], root: Path, cfg, info: DistInfo, bf16: bool,
                   progress: Callable[[int], object] | None = None) -> tuple[list[float], dict[int, list[str]]]:
    """Scores (percent) of every task in order, and per-example error labels of the text tasks."""
    was_training = model.training
    model.eval()
    bar = progress(len(tasks)) if progress is not None else None
    scores, labels = [], {}
    try:
        for i, task in enumerate(tasks):
            records = load_test_records(task.name, root)
            if cfg.max_examples:
                records = records[:cfg.max_examples]
            local = _evaluate_task(model, task, records, cfg, info, bf16)
            if info.distributed:
                parts = [None] * info.world_size
                dist.all_gather_object(parts, local)
                local = [r for part in parts for r in part]
            outputs = [r[1] for r in sorted(local, key=lambda r: r[0])]
            if task.output == "text":
                # Scored on the gathered set: the error labeller's vocabulary is the whole test set's.
                references = [r.answer for r in records]
                score, correct = score_text(task.name, outputs, references)
                labels[i] = error_labels(task.name, outputs, references, correct=correct)
            else:
                score = sum(outputs) / len(outputs)
            scores.append(score)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return scores, labels
