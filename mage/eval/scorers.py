"""Per-task scores and the offline error-type labeller (docs/METHOD.md section 6).

- `exact_match` (default for VQAv2, ImageNet, OCRVQA): normalised equality (lowercase, punctuation
  and articles a/an/the removed, spaces collapsed); an empty prediction is wrong.
- `substring_compat`: the public MAGE code's rule (case-insensitive; a prediction with a word repeated
  more than twice is wrong; otherwise equal or a substring either way counts, so an empty prediction
  counts as correct). Named, never the default.
- `box_correct` (RefCOCO): "[x1,y1,x2,y2]" normalised to 0..1, correct if IoU >= 0.5.
- `ocrvqa_compat`, `box_iou_compat`: the public code's OCRVQA ("Unanswerable" is wrong) and RefCOCO
  (IoU > 0.5, its parsing quirk included) scorers; `COMPAT_SCORERS` names the official one per task.
- `feature_cosine_score` (Flickr30k / HQEdit with the tiny model's fixed encoder): 100 x cosine.
- `error_labels`: per example one of "correct", "IUF" (wrong format), "HAL" (well-formed but wrong),
  "OTH" (cannot be judged), the input of `mage.eval.metrics.continual_metrics(error_labels=...)`.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

import torch

from mage.data.tasks import get_task

IOU_THRESHOLD = 0.5
MAX_ANSWER_WORDS = 8  # a longer text answer to a short-answer task does not follow the instruction

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_NUM = r"\s*([-+]?(?:\d+\.?\d*|\.\d+))\s*"
_BOX = re.compile(r"^\s*[\[(]" + ",".join([_NUM] * 4) + r"[\])]\s*$")
_IMAGE_TOKEN = re.compile(r"<(img|/img|patch|/patch|img_\d+)>")


def normalize_answer(text: str) -> str:
    """Lowercase, strip punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> bool:
    pred = normalize_answer(prediction)
    return bool(pred) and pred == normalize_answer(reference)


def substring_compat(prediction: str, reference: str) -> bool:
    """The public code's VQA scorer: containment either way after strip + upper-casing."""
    if any(n > 2 for n in Counter(prediction.split()).values()):
        return False
    pred, ref = prediction.upper().strip(), reference.upper().strip()
    return pred == ref or ref in pred or pred in ref


def ocrvqa_compat(prediction: str, reference: str) -> bool:
    """The public code's OCRVQA scorer: substring_compat, but a prediction containing "Unanswerable" is wrong."""
    return "Unanswerable" not in prediction and substring_compat(prediction, reference)


def box_iou_compat(prediction: str, reference: str) -> bool:
    """The public code's RefCOCO scorer, quirks included: brackets and parentheses removed, then the first
    and last character dropped (so "[0.27,0.42,0.83,0.73]" reads as .27,0.42,0.83,0.7), four numbers or
    wrong, IoU > 0.5 (strict) against the reference box."""
    text = prediction.strip()
    for c in "[]()":
        text = text.replace(c, "")
    try:
        pred = [float(v) for v in text[1:-1].split(",")]
        ref = [float(v) for v in reference.replace("[", "").replace("]", "").split(",")]
    except ValueError:
        return False
    return len(pred) == 4 and len(ref) == 4 and box_iou(pred, ref) > IOU_THRESHOLD


# The official evaluation's scorer per text task (eval.text_scorer = "compat").
COMPAT_SCORERS = {"vqav2": "substring_compat", "imagenet": "substring_compat", "ocrvqa": "ocrvqa_compat",
                  "refcoco": "box_iou_compat"}


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """"[x1,y1,x2,y2]" (or with parentheses, spaces allowed) -> floats, or None if not that format."""
    m = _BOX.match(text)
    return tuple(float(v) for v in m.groups()) if m else None  # type: ignore[return-value]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0 for empty or inverted boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def _valid_box(box: tuple[float, float, float, float] | None) -> bool:
    return box is not None and all(0.0 <= v <= 1.0 for v in box) and box[0] < box[2] and box[1] < box[3]


def box_correct(prediction: str, reference: str, threshold: float = IOU_THRESHOLD) -> bool:
    pred, ref = parse_box(prediction), parse_box(reference)
    if ref is None:
        raise ValueError(f"reference box {reference!r} is not of the form [x1,y1,x2,y2]")
    return pred is not None and box_iou(pred, ref) >= threshold


def feature_cosine_score(predicted: torch.Tensor, target: torch.Tensor,
                         center: torch.Tensor | None = None) -> torch.Tensor:
    """100 x cosine similarity per image of (M, ...) feature tensors (each image flattened): (M,) float32.

    Flattening keeps the token layout, so an object drawn in the wrong place scores lower. ``center``
    (the mean target feature of the test set, shape (...)) is subtracted from both first: features of a
    frozen random encoder share a large common component (every pair of images scores ~98 uncentred),
    and centring makes "predict the average image" score 0 instead.
    """
    if predicted.shape != target.shape or predicted.dim() < 2:
        raise ValueError(f"feature shapes {tuple(predicted.shape)} and {tuple(target.shape)} must be equal (M, ...)")
    p, t = predicted.flatten(1).float(), target.flatten(1).float()
    if center is not None:
        if center.shape != predicted.shape[1:]:
            raise ValueError(f"center has shape {tuple(center.shape)}, expected {tuple(predicted.shape[1:])}")
        c = center.flatten().float().to(p.device)
        p, t = p - c, t - c
    return 100.0 * torch.nn.functional.cosine_similarity(p, t, dim=1)


TEXT_SCORERS: dict[str, Callable[[str, str], bool]] = {
    "exact_match": exact_match,
    "substring_compat": substring_compat,
    "box_iou": box_correct,
    "ocrvqa_compat": ocrvqa_compat,
    "box_iou_compat": box_iou_compat,
}


def score_text(task: str, predictions: Sequence[str], references: Sequence[str], scorer: str | None = None) -> tuple[float, list[bool]]:
    """Accuracy in percent and per-example correctness of a text task (scorer defaults to the task's)."""
    name = scorer or get_task(task).scorer
    if name not in TEXT_SCORERS:
        raise ValueError(f"scorer {name!r} does not score text; text scorers: {', '.join(TEXT_SCORERS)}")
    if len(predictions) != len(references) or not references:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references; need equal, non-zero counts")
    correct = [TEXT_SCORERS[name](p, r) for p, r in zip(predictions, references)]
    return 100.0 * sum(correct) / len(correct), correct


def _well_formed_text(task: str, prediction: str, vocabulary: set[str] | None) -> bool:
    if get_task(task).scorer == "box_iou":
        return _valid_box(parse_box(prediction))
    pred = normalize_answer(prediction)
    if not pred or _IMAGE_TOKEN.search(prediction) or parse_box(prediction) is not None:
        return False
    if len(pred.split()) > MAX_ANSWER_WORDS:
        return False
    return vocabulary is None or pred in vocabulary


# Closed-vocabulary tasks: an answer outside the set of reference answers does not follow the instruction.
CLOSED_VOCABULARY_TASKS = ("vqav2", "imagenet")


def error_labels(task: str, predictions: Sequence[str], references: Sequence[str],
                 correct: Sequence[bool] | None = None, vocabulary: set[str] | None = None) -> list[str]:
    """Offline rule labels of a text task: "correct", "IUF" (wrong format), "HAL" (well-formed, wrong), "OTH".

    Well-formed: boxes (RefCOCO) parse as [x1,y1,x2,y2] inside 0..1 with x1 < x2 and y1 < y2; text
    answers are non-empty, hold no image tokens and no box, have at most MAX_ANSWER_WORDS words and,
    for the closed-vocabulary tasks, are in `vocabulary` (default: the normalised references).
    "OTH": the reference itself cannot be judged (e.g. an unparseable reference box).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    spec = get_task(task)
    if spec.output != "text":
        raise ValueError(f"task {task} answers with images; use image_error_labels")
    if vocabulary is None and spec.name in CLOSED_VOCABULARY_TASKS:
        vocabulary = {normalize_answer(r) for r in references}
    labels = []
    for i, (p, r) in enumerate(zip(predictions, references)):
        if spec.scorer == "box_iou" and parse_box(r) is None:
            labels.append("OTH")
            continue
        ok = correct[i] if correct is not None else TEXT_SCORERS[spec.scorer](p, r)
        labels.append("correct" if ok else ("HAL" if _well_formed_text(spec.name, p, vocabulary) else "IUF"))
    return labels


def image_error_labels(scores: Sequence[float | None], threshold: float) -> list[str]:
    """Labels of an image task from per-example scores (None: no image was produced).

    No image -> "IUF"; score >= threshold -> "correct"; a finite lower score -> "HAL" (an image, but not
    the asked one); a non-finite score -> "OTH".
    """
    labels = []
    for s in scores:
        if s is None:
            labels.append("IUF")
        elif not math.isfinite(s):
            labels.append("OTH")
        else:
            labels.append("correct" if s >= threshold else "HAL")
    return labels
