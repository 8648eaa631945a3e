"""The six Continual-NExT tasks (docs/METHOD.md sections 1, 2, 6, 7): modalities, trained LoRA groups, scorer, layout."""
from __future__ import annotations

from dataclasses import dataclass

# LoRA group order fixed by docs/METHOD.md section 2 (same as mage.lora.GROUP_NAMES).
GROUP_NAMES = ("text_in", "image_in", "text_out", "image_out")


@dataclass(frozen=True)
class TaskSpec:
    name: str                 # our key: "vqav2", ...
    title: str                # the paper's name: "VQAv2", ...
    inputs: tuple[str, ...]   # input modalities, subset of ("text", "image")
    output: str               # "text" or "image"
    scorer: str               # "exact_match" | "box_iou" | "text_image_score" | "image_cosine"
    dir_name: str             # folder of the task under the data root (the release's name)
    train_image_dir: str      # training image folder, relative to the task folder
    test_image_dir: str       # folder that test-record image paths are relative to
    record_kind: str          # training JSONL form: "conversation" | "generation" | "edit"

    @property
    def lora_groups(self) -> tuple[int, ...]:
        """Indices (into GROUP_NAMES) of the LoRA groups this task trains (docs/METHOD.md section 2)."""
        groups = [0]  # text_in: every task has a text instruction
        if "image" in self.inputs:
            groups.append(1)
        groups.append(2 if self.output == "text" else 3)
        return tuple(sorted(groups))

    @property
    def lora_group_names(self) -> tuple[str, ...]:
        return tuple(GROUP_NAMES[g] for g in self.lora_groups)

    @property
    def has_image_input(self) -> bool:
        return "image" in self.inputs


TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("vqav2", "VQAv2", ("image", "text"), "text", "exact_match", "SEED-Data-VQAv2",
             "COCO2014/train2014", "COCO2014", "conversation"),
    TaskSpec("imagenet", "ImageNet", ("image", "text"), "text", "exact_match", "SEED-Data-ImageNet",
             "imagenet/train", "imagenet", "conversation"),
    TaskSpec("flickr30k", "Flickr30k", ("text",), "image", "text_image_score", "SEED-Data-Flickr30k",
             "images", "images", "generation"),
    TaskSpec("ocrvqa", "OCRVQA", ("image", "text"), "text", "exact_match", "SEED-Data-OCRVQA",
             "OCR-VQA/images", "OCR-VQA/images", "conversation"),
    TaskSpec("refcoco", "RefCOCO", ("image", "text"), "text", "box_iou", "SEED-Data-Grounding",
             "COCO2014/train2014", "COCO2014", "conversation"),
    TaskSpec("hqedit", "HQEdit", ("image", "text"), "image", "image_cosine", "SEED-Data-HQEdit",
             "images", "images", "edit"),
)
TASK_NAMES = tuple(t.name for t in TASKS)
_BY_NAME = {t.name: t for t in TASKS}

ORDERS = {
    "default": TASK_NAMES,
    "reverse": tuple(reversed(TASK_NAMES)),
    "alphabetical": tuple(sorted(TASK_NAMES, key=lambda n: _BY_NAME[n].title.lower())),
}


def get_task(name: str) -> TaskSpec:
    """The spec of one task, by our key or the paper's name (case-insensitive)."""
    key = name.lower()
    if key not in _BY_NAME:
        raise KeyError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}")
    return _BY_NAME[key]


def task_index(name: str) -> int:
    """Position of a task in the default order (used as task_ids in batches)."""
    return TASK_NAMES.index(get_task(name).name)


def task_order(order: str | list[str] | tuple[str, ...] = "default") -> tuple[str, ...]:
    """A task sequence: "default", "reverse", "alphabetical", or an explicit list of task names."""
    if isinstance(order, str):
        if order not in ORDERS:
            raise KeyError(f"unknown task order {order!r}; valid orders: {', '.join(ORDERS)} "
                           f"(or an explicit list of task names)")
        return ORDERS[order]
    names = tuple(get_task(n).name for n in order)
    if len(set(names)) != len(names):
        raise ValueError(f"task order {list(order)} repeats a task")
    return names
