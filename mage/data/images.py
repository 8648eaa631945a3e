"""Image transform and SEED-X "any resolution" views (docs/DESIGN.md, "Model").

An input image becomes V views, each a (3, size, size) tensor normalised with the CLIP mean/std:
- global only (the tiny default): V = 1, the image resized to size x size, position (0.5, 0.5);
- any resolution: the best grid among `grids` ("WxH" = W tiles wide, H tiles high) is chosen by
  resolution fit, the image resized to (W*size, H*size) and cut into tiles row-major, each with the
  normalised centre of its tile as position, then the global view last (0.5, 0.5): V = W*H + 1.
Output (target) images always use the global view only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SEEDX_GRIDS = ("1x1", "1x2", "1x3", "2x1", "3x1", "1x4", "4x1", "2x2")
# SEED-X trains and evaluates these tasks' input images on the 1x1 grid only (resolution_grids = ['1x1']).
SINGLE_GRID_TASKS = ("flickr30k", "hqedit")


@dataclass(frozen=True)
class ImageConfig:
    size: int = 112                  # side of every view (112 tiny, 448 real)
    num_query_tokens: int = 16       # image tokens per view (16 tiny, 64 real)
    any_resolution: bool = False     # False: global view only
    grids: tuple[str, ...] = SEEDX_GRIDS

    def __post_init__(self) -> None:
        if self.size < 1 or self.num_query_tokens < 1:
            raise ValueError(f"ImageConfig(size={self.size}, num_query_tokens={self.num_query_tokens}): both must be >= 1")
        for g in self.grids:
            _parse_grid(g)

    @classmethod
    def tiny(cls) -> "ImageConfig":
        return cls(size=112, num_query_tokens=16, any_resolution=False)

    @classmethod
    def real(cls) -> "ImageConfig":
        return cls(size=448, num_query_tokens=64, any_resolution=True)

    def for_task(self, task: str) -> "ImageConfig":
        """This config with the official per-task grids: 1x1 only for SINGLE_GRID_TASKS."""
        if self.any_resolution and task in SINGLE_GRID_TASKS:
            return dataclasses.replace(self, grids=("1x1",))
        return self


def _parse_grid(grid: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in grid.lower().split("x"))
    except ValueError:
        raise ValueError(f"image grid {grid!r} is not of the form 'WxH' (e.g. '1x2')") from None
    if w < 1 or h < 1:
        raise ValueError(f"image grid {grid!r} needs at least one tile each way")
    return w, h


def to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """Resize to size x size (bicubic) and normalise with the CLIP mean/std: (3, size, size) float32."""
    image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def best_grid(width: int, height: int, grids: tuple[str, ...], size: int) -> tuple[int, int]:
    """SEED-X's choice: the smaller (by area) of the best resolution-fit grid and the best aspect-ratio grid."""
    resolutions = [(w * size, h * size) for w, h in map(_parse_grid, grids)]
    # Fit: the most effective pixels after downscaling into the grid, ties to the least waste.
    fit, best = None, (-1, 0)
    for rw, rh in resolutions:
        scale = min(rw / width, rh / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        key = (effective, -(rw * rh - effective))
        if key > best:
            fit, best = (rw, rh), key
    # Aspect: closest aspect ratio, ties to the closest area.
    aspect, best_a = None, (float("inf"), float("inf"))
    for rw, rh in resolutions:
        ar, ar0 = rh / rw, height / width
        key_a = (max(ar, ar0) / min(ar, ar0), max(rw * rh, width * height) / min(rw * rh, width * height))
        if key_a < best_a:
            aspect, best_a = (rw, rh), key_a
    rw, rh = fit if fit[0] * fit[1] <= aspect[0] * aspect[1] else aspect
    return rw // size, rh // size


def image_views(image: Image.Image, cfg: ImageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The views of one input image and their positions: (V, 3, size, size), (V, 2) (tiles first, global last)."""
    image = image.convert("RGB")
    global_view = to_tensor(image, cfg.size)
    if not cfg.any_resolution:
        return global_view[None], torch.tensor([[0.5, 0.5]])
    gw, gh = best_grid(*image.size, cfg.grids, cfg.size)
    big = image.resize((gw * cfg.size, gh * cfg.size), Image.Resampling.BICUBIC)
    views, positions = [], []
    for row in range(gh):
        for col in range(gw):
            tile = big.crop((col * cfg.size, row * cfg.size, (col + 1) * cfg.size, (row + 1) * cfg.size))
            views.append(to_tensor(tile, cfg.size))
            positions.append(((col + 0.5) / gw, (row + 0.5) / gh))
    views.append(global_view)
    positions.append((0.5, 0.5))
    return torch.stack(views), torch.tensor(positions, dtype=torch.float32)


def target_view(image: Image.Image, cfg: ImageConfig) -> torch.Tensor:
    """An output (generation / editing target) image: the global view only, (3, size, size)."""
    return to_tensor(image, cfg.size)


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, with an error that names the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"cannot read image {str(path)!r}: {exc}") from exc
