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
from mage.eval.scorers import error_labels, feature_cosine_score, image_error_labels, score_text
from mage.trainer.data import image_config, to_device
from mage.trainer.distributed import DistInfo


def image_features(model, batch: dict, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(generated, target) features (M, Q, D), float32, one output image per example."""
    targets = batch.get("target_images")
    if targets is None or targets.shape[0] != len(batch["example_ids"]):
        raise ValueError("image-output test records need their target image for the feature score (the real "
                         "Flickr30k test set has captions only: score it with a CLIP text-image model instead)")
    generator = model if generator is None else generator
    return generator.generate_image_features(batch).float(), model.encode_image_features(targets).float()


def centred_feature_scores(generated: list[torch.Tensor], targets: list[torch.Tensor], model,
                           info: DistInfo) -> list[float]:
    """cosine x 100 per image, both sides centred on the mean target feature of the whole test set (all ranks)."""
    q, d = model.num_image_tokens, model.output_resampler.embed_dim
    total = sum((t.sum(0) for t in targets), torch.zeros(q, d, device=info.device))
    count = torch.tensor(float(sum(t.shape[0] for t in targets)), device=info.device)
    if info.distributed:  # every rank takes part, also one whose share is empty
        dist.all_reduce(total)
        dist.all_reduce(count)
    if not targets:
        return []
    center = total / count.clamp(min=1)
    return feature_cosine_score(torch.cat(generated), torch.cat(targets), center).tolist()


@torch.no_grad()
def _evaluate_task(model, task: TaskSpec, records: list[Record], cfg, info: DistInfo, bf16: bool, generator=None):
    """(index, prediction text or image score) for this rank's share of ``records``; ``generator`` (a method's
    decoding, e.g. LAE's two models) replaces the model's generate_text / generate_image_features."""
    generator = model if generator is None else generator
    mine = list(range(info.rank, len(records), info.world_size))
    shard = [records[i] for i in mine]
    loader = build_dataloader(shard, model.tokenizer, image_config(model), cfg.batch_size, mode="generate",
                              shuffle=False) if shard else []
    texts, generated, targets = [], [], []
    for batch in loader:
        batch = to_device(batch, info.device)
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=bf16):
            if task.output == "text":
                texts += generator.generate_text(batch, cfg.max_new_tokens)
            else:
                g, t = image_features(model, batch, generator)
                generated.append(g)
                targets.append(t)
    if task.output == "text":
        return list(zip(mine, texts))
    return list(zip(mine, centred_feature_scores(generated, targets, model, info)))


def evaluate_tasks(model, tasks: list[TaskSpec], root: Path, cfg, info: DistInfo, bf16: bool,
                   progress: Callable[[int], object] | None = None,
                   generator=None) -> tuple[list[float], dict[int, list[str]]]:
    """Scores (percent) of every task in order, and per-example error labels of every task (image tasks:
    a score below ``cfg.image_label_threshold`` is a hallucination, see ``image_error_labels``)."""
    was_training = model.training
    model.eval()
    bar = progress(len(tasks)) if progress is not None else None
    scores, labels = [], {}
    try:
        for i, task in enumerate(tasks):
            records = load_test_records(task.name, root)
            if cfg.max_examples:
                records = records[:cfg.max_examples]
            local = _evaluate_task(model, task, records, cfg, info, bf16, generator)
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
                labels[i] = image_error_labels(outputs, cfg.image_label_threshold)
            scores.append(score)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return scores, labels
