"""Procedural drawing for Continual-NExT-mini: shapes, object classes and seven-segment digits (PIL only).

Everything is drawn with integer coordinates from a seeded `random.Random`, so the same seed gives the
same pixels (and, PNG being lossless and timestamp-free, the same file bytes).
"""
from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

from mage.data.vocab import BACKGROUND, COLORS

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, inclusive of the drawn extent


def canvas(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (size, size), BACKGROUND)
    return img, ImageDraw.Draw(img)


def draw_shape(d: ImageDraw.ImageDraw, shape: str, color: str, cx: int, cy: int, r: int) -> Box:
    """A filled shape of half-size r centred at (cx, cy); returns its bounding box."""
    rgb = COLORS[color]
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=rgb)
    elif shape == "square":
        d.rectangle(box, fill=rgb)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=rgb)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return box


def draw_class(d: ImageDraw.ImageDraw, cls: str, color: str, cx: int, cy: int, r: int, rng: random.Random) -> None:
    """One object of an ImageNet-like class, its own silhouette, in the given colour."""
    rgb = COLORS[color]
    w = max(2, r // 3)  # stroke width
    if cls == "ring":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=rgb, width=w)
    elif cls == "cross":
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=rgb)
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=rgb)
    elif cls == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((round(cx + rad * math.cos(ang)), round(cy + rad * math.sin(ang))))
        d.polygon(pts, fill=rgb)
    elif cls == "arrow":
        d.rectangle((cx - r, cy - w, cx + r // 3, cy + w), fill=rgb)
        d.polygon([(cx + r // 3, cy - r // 2 - w), (cx + r, cy), (cx + r // 3, cy + r // 2 + w)], fill=rgb)
    elif cls == "moon":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
        off = r // 2
        d.ellipse((cx - r + off, cy - r - off // 2, cx + r + off, cy + r - off // 2), fill=BACKGROUND)
    elif cls == "house":
        d.rectangle((cx - r * 3 // 4, cy, cx + r * 3 // 4, cy + r), fill=rgb)
        d.polygon([(cx - r, cy), (cx, cy - r), (cx + r, cy)], fill=rgb)
    elif cls == "tree":
        d.polygon([(cx, cy - r), (cx + r * 3 // 4, cy + r // 3), (cx - r * 3 // 4, cy + r // 3)], fill=rgb)
        d.rectangle((cx - w // 2 - 1, cy + r // 3, cx + w // 2 + 1, cy + r), fill=rgb)
    elif cls == "stripes":
        for k in range(3):
            y = cy - r + k * (2 * r) // 3
            d.rectangle((cx - r, y, cx + r, y + w), fill=rgb)
    elif cls == "grid":
        step = (2 * r) // 3
        for i in range(3):
            for j in range(3):
                x, y = cx - r + i * step, cy - r + j * step
                d.rectangle((x, y, x + step - 3, y + step - 3), fill=rgb)
    elif cls == "dots":
        for _ in range(6):
            x, y = cx + rng.randint(-r, r), cy + rng.randint(-r, r)
            d.ellipse((x - w, y - w, x + w, y + w), fill=rgb)
    else:
        raise ValueError(f"unknown class {cls!r}")


# Seven-segment digits: segments a (top), b (top right), c (bottom right), d (bottom), e (bottom left),
# f (top left), g (middle).
_SEGMENTS = {"0": "abcdef", "1": "bc", "2": "abged", "3": "abgcd", "4": "fgbc", "5": "afgcd",
             "6": "afgedc", "7": "abc", "8": "abcdefg", "9": "abcdfg"}


def draw_digit(d: ImageDraw.ImageDraw, digit: str, x: int, y: int, w: int, h: int, t: int,
               rgb: tuple[int, int, int]) -> None:
    """A seven-segment digit in the box (x, y, x + w, y + h) with stroke t."""
    m = y + h // 2
    seg = {
        "a": (x, y, x + w, y + t), "d": (x, y + h - t, x + w, y + h), "g": (x, m - t // 2, x + w, m + t - t // 2),
        "f": (x, y, x + t, m), "b": (x + w - t, y, x + w, m),
        "e": (x, m, x + t, y + h), "c": (x + w - t, m, x + w, y + h),
    }
    for s in _SEGMENTS[digit]:
        d.rectangle(seg[s], fill=rgb)
