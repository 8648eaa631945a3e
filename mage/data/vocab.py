"""The closed world of Continual-NExT-mini: object words, colours, positions and prompt templates.

Shared by the generator (`mage.data.mini`) and the tiny tokenizer (`mage.data.tokenizer`), so every
word the mini benchmark can write is one token of the tiny vocabulary. The six tasks deliberately
reuse the same words (colours, shapes, "image", "the") and similar question forms, so that training
a later task moves the same embeddings and adapters that earlier tasks rely on: that is what makes
forgetting measurable on a tiny model.
"""
from __future__ import annotations

# name -> RGB; colours far apart so that a tiny frozen random ViT still separates them.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 220),
    "white": (245, 245, 245),
}
BACKGROUND = (25, 25, 25)

SHAPES = ("circle", "square", "triangle", "diamond")

# "top left" etc: the cell of a 3x3 layout whose centre the object sits on.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}

# The ImageNet stand-in: ten object classes, each drawn by its own recipe in mini.py.
CLASSES = ("ring", "cross", "star", "arrow", "moon", "house", "tree", "stripes", "grid", "dots")
# Each class has its usual colour (as real objects do), so a tiny model gets a fast first cue; the
# pairs sharing a colour (cross/grid, arrow/dots) still need the silhouette.
CLASS_COLORS = {"ring": "cyan", "cross": "red", "star": "yellow", "arrow": "white", "moon": "orange",
                "house": "purple", "tree": "green", "stripes": "blue", "grid": "red", "dots": "white"}

YES_NO = ("yes", "no")

# Prompts. {shape}, {color}, {position}, {shape2}, {n} are filled by the generator.
VQA_QUESTIONS = {
    "color": "What color is the {shape}?",
    "shape": "What shape is the {color} object?",
    "count": "How many objects are in the image?",
    "exists": "Is there {article} {color} {shape} in the image?",
}
CLASSIFY_QUESTION = "What is the object in the image? Answer with one word."
GENERATE_INSTRUCTION = "Please generate the image."
CAPTION = "{article} {color} {shape} in the {position}"  # article: "a" / "an"
OCR_QUESTION = "What is written in the image?"
GROUNDING_QUESTION = "Please provide the box of the {color} {shape} in the image."
EDIT_INSTRUCTIONS = {
    "recolor": "make the {shape} {color}",
    "reshape": "turn the {shape} into a {shape2}",
    "move": "move the {shape} to the {position}",
}
PROMPT_TEMPLATE = "[INST] {instruction} [/INST]\n"
# The polite reply of SEED-X's editing recipe is not used: image answers are the image tokens only.

# Extra words kept in the tiny vocabulary so that natural variants of the prompts still tokenize.
EXTRA_WORDS = ("a", "an", "the", "of", "and", "is", "are", "it", "this", "that", "there", "to", "in", "on",
               "answer", "image", "picture", "object", "objects", "color", "shape", "box", "one", "word",
               "what", "where", "which", "how", "many", "please", "generate", "provide", "sorry", "i",
               "cannot", "not", "unknown", "none", "here", "with", "at", "left", "right", "top", "bottom")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def all_texts() -> list[str]:
    """Every template, word and phrase of the mini benchmark (the tiny tokenizer's corpus)."""
    texts: list[str] = [PROMPT_TEMPLATE, GENERATE_INSTRUCTION, CAPTION, OCR_QUESTION, GROUNDING_QUESTION,
                        CLASSIFY_QUESTION]
    texts += list(VQA_QUESTIONS.values()) + list(EDIT_INSTRUCTIONS.values())
    texts += list(COLORS) + list(SHAPES) + list(POSITIONS) + list(CLASSES) + list(YES_NO) + list(EXTRA_WORDS)
    return texts
