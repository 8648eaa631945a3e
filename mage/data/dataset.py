"""A torch Dataset per task and a resumable, seeded, rank-aware loader over it.

`build_dataloader(...)` returns a `ResumableLoader`: iterate it like a DataLoader (one epoch per
`for` loop; the next loop starts the next epoch), and save/restore its position with
`state_dict()` / `load_state_dict()`. It counts the batches the consumer actually took (not those
prefetched by workers), so a restored loader yields exactly the batches that were not trained on.
Its `ResumableSampler` shards like `DistributedSampler` (same permutation on every rank from
(seed, epoch), padded to a multiple of world_size, rank r takes every world_size-th index) and has
`set_epoch`. With world_size > 1 the padding repeats a few examples; evaluation should shard the
records itself (or drop repeated example_ids).
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mage.data.collate import Example, collate
from mage.data.images import ImageConfig, image_views, load_image, target_view
from mage.data.readers import Record
from mage.data.tasks import get_task, task_index
from mage.data.prompts import POLITE_REPLIES


def polite_reply_for(example_id: str) -> str:
    """One of SEED-X's polite replies, fixed per example (crc32 of its id; SEED-X draws at random)."""
    return POLITE_REPLIES[zlib.crc32(example_id.encode("utf-8")) % len(POLITE_REPLIES)]


class TaskDataset(Dataset):
    """Records of one or more tasks -> `Example`s with their images loaded and transformed.

    `polite_reply`: image answers get one of SEED-X's polite replies (chosen by the example id, so
    the same example always gets the same one) supervised before `<img>`.
    """

    def __init__(self, records: list[Record], image_cfg: ImageConfig, polite_reply: bool = False,
                 cache_images: bool = False):
        self.records = list(records)
        self.image_cfg = image_cfg
        self.polite_reply = polite_reply
        # Decoded, transformed images by record index: a small benchmark trains many epochs on the same few
        # hundred images, and decoding them again every epoch costs as much as a LoRA step on CPU.
        self._images: dict[int, tuple] | None = {} if cache_images else None

    def _load_images(self, r: Record) -> tuple:
        views = positions = target = None
        if r.image is not None:
            views, positions = image_views(load_image(r.image), self.image_cfg)
        if r.target_image is not None:
            target = target_view(load_image(r.target_image), self.image_cfg)
        return views, positions, target

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Example:
        r = self.records[i]
        spec = get_task(r.task)
        if self._images is None:
            views, positions, target = self._load_images(r)
        else:
            if i not in self._images:
                self._images[i] = self._load_images(r)
            views, positions, target = self._images[i]
        output_image = spec.output == "image"
        reply = polite_reply_for(r.example_id) if (self.polite_reply and output_image) else ""
        return Example(task_id=task_index(spec.name), example_id=r.example_id, turns=list(r.turns),
                       output_image=output_image, views=views, positions=positions, target=target, reply=reply)


class ResumableSampler(Sampler[int]):
    """Seeded shuffling, DistributedSampler-style sharding, and a start offset for resuming mid-epoch."""

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if num_samples < 1:
            raise ValueError("ResumableSampler over an empty dataset: the task has no records")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start = 0  # indices of this rank's epoch to skip (set when resuming)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world_size)

    def epoch_indices(self) -> list[int]:
        """This rank's indices of the current epoch, from the beginning."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        total = len(self) * self.world_size
        order += order[: total - len(order)]  # pad like DistributedSampler
        return order[self.rank:total:self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start:])


class ResumableLoader:
    """A DataLoader over a ResumableSampler that knows how far its consumer got."""

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, batch_size: int, collate_fn,
                 num_workers: int = 0):
        self.sampler, self.batch_size = sampler, batch_size
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                                 num_workers=num_workers, persistent_workers=False)
        self.epoch = 0
        self.batches_done = 0  # batches of the current epoch taken by the consumer

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        self.sampler.set_epoch(self.epoch)
        self.sampler.start = self.batches_done * self.batch_size
        for batch in self.loader:
            self.batches_done += 1
            yield batch
        self.epoch += 1
        self.batches_done = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.sampler.seed,
                "num_samples": self.sampler.num_samples, "world_size": self.sampler.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_samples", "world_size"):
            if state[key] != getattr(self.sampler, key):
                raise ValueError(f"loader state has {key}={state[key]} but this loader has "
                                 f"{getattr(self.sampler, key)}; resume with the same data, seed and world size")
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])


def build_dataloader(records: list[Record], tokenizer, image_cfg: ImageConfig, batch_size: int, seed: int = 0,
                     mode: str = "train", shuffle: bool | None = None, rank: int = 0, world_size: int = 1,
                     num_workers: int = 0, max_length: int | None = None, polite_reply: bool = False,
                     force_image: bool = True, cache_images: bool = False) -> ResumableLoader:
    """Loader of collated batches over records. Training shuffles by default; "generate" keeps file order.
    `polite_reply`, `cache_images`: see TaskDataset; `force_image`: see mage.data.collate.collate."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    shuffle = (mode == "train") if shuffle is None else shuffle
    sampler = ResumableSampler(len(records), seed=seed, shuffle=shuffle, rank=rank, world_size=world_size)
    fn = partial(collate, tokenizer=tokenizer, image_cfg=image_cfg, mode=mode, max_length=max_length,
                 force_image=force_image)
    return ResumableLoader(TaskDataset(records, image_cfg, polite_reply, cache_images), sampler, batch_size, fn,
                           num_workers)
