"""One row of the accuracy matrix: every task of the sequence scored with the current weights.

Text tasks generate an answer and score it with the task's scorer (`eval.text_scorer`: "default" =
normalised exact match / IoU >= 0.5; "compat" = the public MAGE evaluation's scorers), with an error
label per example for the error-type forgetting. Image tasks (Flickr30k, HQEdit) are generated in one
of two ways (`eval.image_generation`):
- "forced" (the mini default): the prompt ends with `<img>` and the image tokens are teacher-forced;
- "free" (SEED-X, the paper): free-running `generate`; a model that never emits `<img>` produces no
  image, scores 0 on that example and is labelled instruction-unfollowing (IUF) for the error-type
  forgetting;
and scored in one of two ways (`eval.image_scorer`, per task through task_overrides):
- "feature_cosine": the tiny setting's STAND-IN for CLIP (cosine x 100 of output-resampler features vs
  the target image's ViT features, centred on the test set's mean target feature); needs target images;
- "clip": the paper's score: the features are decoded to pixels by SEED-X's decoder
  (`model.decoder_path`) and scored by a local CLIP (`eval.clip_path`): text-image against the caption
  for Flickr30k, image-image against the target image for HQEdit (editing conditions on the source).
Test examples are split over ranks and the per-example results gathered, so every rank ends with the
same row.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from mage.data.dataset import build_dataloader
from mage.data.images import load_image
from mage.data.readers import Record, load_test_records
from mage.data.tasks import TaskSpec
from mage.eval.scorers import COMPAT_SCORERS, error_labels, feature_cosine_score, image_error_labels, score_text
from mage.trainer.config import ConfigError
from mage.trainer.data import image_config, reader_options, to_device
from mage.trainer.distributed import DistInfo

IMAGE_SCORERS = ("feature_cosine", "clip")
SCORER_NOTES = {"feature_cosine": "feature-cosine stand-in (not CLIP)", "clip": "CLIP score"}
_CACHE: dict[tuple, object] = {}  # loaded CLIP scorers and decoders, reused across evaluation rounds


def check_eval_config(eval_cfg, task: TaskSpec, decoder_path: str) -> None:
    """Raise ConfigError for a choice that cannot run (before any training)."""
    if eval_cfg.image_generation not in ("forced", "free"):
        raise ConfigError(f"eval.image_generation must be 'forced' or 'free', got {eval_cfg.image_generation!r}")
    if eval_cfg.text_scorer not in ("default", "compat"):
        raise ConfigError(f"eval.text_scorer must be 'default' or 'compat', got {eval_cfg.text_scorer!r}")
    if eval_cfg.image_scorer not in IMAGE_SCORERS:
        raise ConfigError(f"eval.image_scorer must be one of {IMAGE_SCORERS}, got {eval_cfg.image_scorer!r}")
    if task.output == "image" and eval_cfg.image_scorer == "clip":
        missing = [name for name, v in (("eval.clip_path", eval_cfg.clip_path), ("model.decoder_path", decoder_path))
                   if not v]
        if missing:
            raise ConfigError(f"task {task.name}: eval.image_scorer = 'clip' decodes images and scores them with "
                              f"CLIP; set {' and '.join(missing)} (local folders, docs/REAL_DATA.md)")


def scorer_names(tasks: list[TaskSpec], eval_for: Callable[[str], object]) -> dict[str, str]:
    """What each task's score is (named in the reports: the stand-in is never mistaken for CLIP)."""
    out = {}
    for t in tasks:
        e = eval_for(t.name)
        if t.output == "image":
            out[t.name] = f"{SCORER_NOTES[e.image_scorer]}, {e.image_generation} image generation"
        else:
            out[t.name] = (COMPAT_SCORERS[t.name] if e.text_scorer == "compat" else t.scorer)
    return out


def _clip(path: str, device: torch.device):
    from mage.eval.clip_score import ClipScorer
    key = ("clip", path, str(device))
    if key not in _CACHE:
        _CACHE[key] = ClipScorer(path, device=device)
    return _CACHE[key]


def _decoder(model, path: str, kind: str, device: torch.device):
    from mage.model.detokenizer import load_decoder
    key = ("decoder", path, kind, str(device))
    if key not in _CACHE:
        size = model.config.vision.image_size
        # SEED-X's unconditional branch: the features of an all-zero (normalised) image
        negative = model.encode_image_features(torch.zeros(1, 3, size, size, device=device,
                                                           dtype=model.patch_pos_embed.dtype))[0].float()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        _CACHE[key] = load_decoder(path, negative, kind=kind, device=device, dtype=dtype)
    return _CACHE[key]


def centred_feature_scores(generated: list[torch.Tensor | None], target_batches: list[torch.Tensor], model,
                           info: DistInfo) -> list[float]:
    """cosine x 100 per image, both sides centred on the mean target feature of the whole test set (all
    ranks); 0 where no image was generated (None). `target_batches`: (M_b, Q, D) per evaluation batch."""
    q, d = model.num_image_tokens, model.output_resampler.embed_dim
    # summed batch by batch, in the order the mini benchmark's scores were calibrated with
    total = sum((t.sum(0) for t in target_batches), torch.zeros(q, d, device=info.device))
    targets = torch.cat(target_batches) if target_batches else torch.zeros(0, q, d, device=info.device)
    count = torch.tensor(float(targets.shape[0]), device=info.device)
    if info.distributed:  # every rank takes part, also one whose share is empty
        dist.all_reduce(total)
        dist.all_reduce(count)
    have = [i for i, g in enumerate(generated) if g is not None]
    scores = [0.0] * len(generated)
    if have:
        center = total / count.clamp(min=1)
        got = feature_cosine_score(torch.stack([generated[i] for i in have]), targets[have], center).tolist()
        for i, s in zip(have, got):
            scores[i] = s
    return scores


def _image_outputs(model, batch: dict, eval_cfg, generator=None) -> list[torch.Tensor | None]:
    """(Q, D) features of each example's generated image, None where the model produced no image."""
    if eval_cfg.image_generation == "free":
        out = model.generate_free(batch, eval_cfg.max_new_tokens + model.num_image_tokens + 2)
        return [None if f is None else f.float() for f in out.image_features]
    return list((model if generator is None else generator).generate_image_features(batch).float())


def _clip_scores(model, task: TaskSpec, records: list[Record], generated: list[torch.Tensor | None], eval_cfg,
                 decoder_path: str, device: torch.device) -> list[float]:
    from mage.model.detokenizer import SamplingConfig
    sampling = SamplingConfig(steps=eval_cfg.decode_steps, guidance_scale=eval_cfg.guidance_scale,
                              image_guidance_scale=eval_cfg.image_guidance_scale, size=eval_cfg.decode_size,
                              seed=eval_cfg.decode_seed)
    edit = task.has_image_input
    decoder = _decoder(model, decoder_path, "edit" if edit else "generate", device)
    images = [None] * len(records)
    for i, (rec, feat) in enumerate(zip(records, generated)):  # one at a time: SDXL at 1024^2 is large
        if feat is not None:
            source = [load_image(rec.image)] if edit else None
            images[i] = decoder.decode(feat.unsqueeze(0), source, sampling)[0]
    clip = _clip(eval_cfg.clip_path, device)
    if edit:
        return clip.image_image(images, [load_image(r.target_image) for r in records])
    return clip.text_image(images, [r.answer for r in records])


@torch.no_grad()
def _evaluate_task(model, task: TaskSpec, records: list[Record], eval_cfg, info: DistInfo, bf16: bool,
                   data_cfg, decoder_path: str, generator=None):
    """(index, prediction text or image score) for this rank's share of ``records``; ``generator`` (a method's
    decoding, e.g. LAE's two models) replaces the model's generate_text / generate_image_features (forced
    image generation only)."""
    if generator is not None and eval_cfg.image_generation == "free":
        raise ConfigError("this method decodes with its own generator, which has no free-running mode; "
                          "use eval.image_generation = 'forced'")
    generator = model if generator is None else generator
    mine = list(range(info.rank, len(records), info.world_size))
    shard = [records[i] for i in mine]
    per_task_grids = bool(data_cfg is not None and data_cfg.per_task_grids)
    free = eval_cfg.image_generation == "free"
    loader = build_dataloader(shard, model.tokenizer, image_config(model, task.name, per_task_grids),
                              eval_cfg.batch_size, mode="generate", shuffle=False,
                              force_image=not free) if shard else []
    texts, generated, targets = [], [], []
    cosine = task.output == "image" and eval_cfg.image_scorer == "feature_cosine"
    for batch in loader:
        batch = to_device(batch, info.device)
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=bf16):
            if task.output == "text":
                texts += (model.generate_free(batch, eval_cfg.max_new_tokens).texts if free
                          else generator.generate_text(batch, eval_cfg.max_new_tokens))
                continue
            generated += _image_outputs(model, batch, eval_cfg, generator)
            if cosine:
                t = batch.get("target_images")
                if t is None or t.shape[0] != len(batch["example_ids"]):
                    raise ValueError(f"task {task.name}: the feature-cosine stand-in needs every test record's target "
                                     f"image (the release's Flickr30k test set has captions only): set "
                                     f"eval.image_scorer = 'clip' with eval.clip_path and model.decoder_path")
                targets.append(model.encode_image_features(t).float())
    if task.output == "text":
        return list(zip(mine, texts))
    if cosine:
        scores = centred_feature_scores(generated, targets, model, info)
    else:
        scores = _clip_scores(model, task, shard, generated, eval_cfg, decoder_path, info.device)
    return list(zip(mine, [(s, g is not None) for s, g in zip(scores, generated)]))


def evaluate_tasks(model, tasks: list[TaskSpec], root: Path, cfg, info: DistInfo, bf16: bool,
                   progress: Callable[[int], object] | None = None, *, eval_for: Callable[[str], object] | None = None,
                   data_cfg=None, decoder_path: str = "", generator=None) -> tuple[list[float], dict[int, list[str]]]:
    """Scores (percent) of every task in order, and per-example error labels of every task (image tasks:
    no image under free-running generation is IUF; a score below ``image_label_threshold`` is HAL).

    `cfg` is the EvalConfig; `eval_for(task)` gives a task's own (task_overrides), `data_cfg` the
    DataConfig (reader options, per-task grids), `decoder_path` SEED-X's decoder folder, `generator` a
    method's decoding (LAE).
    """
    eval_for = eval_for or (lambda _name: cfg)
    for task in tasks:
        check_eval_config(eval_for(task.name), task, decoder_path)
    options = reader_options(data_cfg) if data_cfg is not None else None
    was_training = model.training
    model.eval()
    bar = progress(len(tasks)) if progress is not None else None
    scores, labels = [], {}
    try:
        for i, task in enumerate(tasks):
            eval_cfg = eval_for(task.name)
            records = load_test_records(task.name, root, options)
            if eval_cfg.max_examples:
                records = records[:eval_cfg.max_examples]
            local = _evaluate_task(model, task, records, eval_cfg, info, bf16, data_cfg, decoder_path, generator)
            if info.distributed:
                parts = [None] * info.world_size
                dist.all_gather_object(parts, local)
                local = [r for part in parts for r in part]
            outputs = [r[1] for r in sorted(local, key=lambda r: r[0])]
            if task.output == "text":
                # Scored on the gathered set: the error labeller's vocabulary is the whole test set's.
                references = [r.answer for r in records]
                scorer = COMPAT_SCORERS[task.name] if eval_cfg.text_scorer == "compat" else None
                score, correct = score_text(task.name, outputs, references, scorer=scorer)
                labels[i] = error_labels(task.name, outputs, references, correct=correct)
            else:
                score = sum(s for s, _ in outputs) / len(outputs)
                labels[i] = image_error_labels([s if produced else None for s, produced in outputs],
                                               eval_cfg.image_label_threshold)
            scores.append(score)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return scores, labels


__all__ = ["evaluate_tasks", "centred_feature_scores", "scorer_names", "check_eval_config", "IMAGE_SCORERS"]
