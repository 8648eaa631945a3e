"""One row of the accuracy matrix: every task of the sequence scored with the current weights.

Text tasks generate an answer and score it with the task's scorer (with an error label per example for
the error-type forgetting); image tasks compare the generated output-image features with the target
image's features (cosine x 100 after subtracting the test set's mean target feature; the tiny
setting's stand-in for CLIP). Test examples are split over
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


def image_feature_scores(model, batch: dict, center: torch.Tensor | None) -> list[float]:
    """cosine(generated features, target features) x 100 per output image, both centred on ``center``."""
    targets = batch.get("target_images")
    if targets is None or targets.shape[0] != len(batch["example_ids"]):
        raise ValueError("image-output test records need their target image for the feature score (the real "
                         "Flickr30k test set has captions only: score it with a CLIP text-image model instead)")
    generated = model.generate_image_features(batch)
    return feature_cosine_score(generated, model.encode_image_features(targets), center).tolist()


def _loader(model, records: list[Record], cfg, info: DistInfo):
    """This rank's share of ``records`` (indices into them) and a prompt-only loader over it."""
    mine = list(range(info.rank, len(records), info.world_size))
    shard = [records[i] for i in mine]
    return mine, shard, build_dataloader(shard, model.tokenizer, image_config(model), cfg.batch_size,
                                         mode="generate", shuffle=False)


@torch.no_grad()
def _target_feature_mean(model, records: list[Record], cfg, info: DistInfo) -> torch.Tensor:
    """Mean target feature (Q, D) over the whole test set (all ranks): the centre of the feature score."""
    total, count = None, torch.zeros((), device=info.device)
    for batch in _loader(model, records, cfg, info)[2]:
        targets = batch.get("target_images")
        if targets is None or targets.shape[0] == 0:
            continue
        features = model.encode_image_features(targets.to(info.device)).float()
        total = features.sum(0) if total is None else total + features.sum(0)
        count += features.shape[0]
    if total is None:  # this rank got no examples: still take part in the reduction
        q, d = model.num_image_tokens, model.output_resampler.embed_dim
        total = torch.zeros(q, d, device=info.device)
    if info.distributed:
        dist.all_reduce(total)
        dist.all_reduce(count)
    return total / count.clamp(min=1)


@torch.no_grad()
def _evaluate_task(model, task: TaskSpec, records: list[Record], cfg, info: DistInfo, bf16: bool):
    """(index, prediction text or image score) for this rank's share of ``records``."""
    center = _target_feature_mean(model, records, cfg, info) if task.output != "text" else None
    mine, shard, loader = _loader(model, records, cfg, info)
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
                out += list(zip(idx, image_feature_scores(model, batch, center)))
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
