"""The closed world of Continual-NExT-mini: object words, colours, positions and prompt templates.

Shared by the generator (`mage.data.mini`), the base-model pretraining mixture (`mage.data.pretrain_mix`)
and the tiny tokenizer (`mage.data.tokenizer`), so every word either can write is one token of the tiny
vocabulary. The six tasks deliberately share words and question forms, as the real ones do:

- transfer: VQAv2 and OCRVQA both ask "What color is the ...?" and both answer with digits (counts,
  written numbers), so training one helps the other (the paper's "recall" effect);
- interference: VQAv2 and RefCOCO are both asked "Where is the {color} {shape}?" on the same kind of
  scene; VQAv2 answers with a position word ("top left"), RefCOCO with a box. Training one pulls the
  other's answers towards its own format.

The pretraining templates (PRETRAIN_*) are other phrasings and compositions of the same skills; no
pretraining prompt is a task prompt.
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

# The nine cells of a 3x3 layout, row-major, by name -> the cell centre (fraction of the image side).
POSITIONS: dict[str, tuple[float, float]] = {
    name: ((col + 0.5) / 3, (row + 0.5) / 3)
    for row, names in enumerate((("top left", "top", "top right"), ("left", "center", "right"),
                                 ("bottom left", "bottom", "bottom right")))
    for col, name in enumerate(names)
}
CELL_NAMES = tuple(POSITIONS)  # index = row * 3 + col

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
    "where": "Where is the {color} {shape}?",
}
CLASSIFY_QUESTION = "What is the object in the image? Answer with one word."
GENERATE_INSTRUCTION = "Please generate the image."
CAPTION = "{article} {color} {shape} in the {position}"  # article: "a" / "an"
OCR_QUESTION = "What is written in the image?"
OCR_COLOR_QUESTION = "What color is the text?"
GROUNDING_QUESTION = "Please provide the box of the {color} {shape} in the image."
GROUNDING_WHERE_QUESTION = VQA_QUESTIONS["where"]   # same prompt as VQAv2's, answered with a box
EDIT_INSTRUCTIONS = {
    "recolor": "make the {shape} {color}",
    "reshape": "turn the {shape} into a {shape2}",
    "move": "move the {shape} to the {position}",
}
PROMPT_TEMPLATE = "[INST] {instruction} [/INST]\n"
# Every prompt template of the six tasks: what no pretraining prompt may be, and whose every word it must use.
TASK_PROMPTS = (*VQA_QUESTIONS.values(), CLASSIFY_QUESTION, GENERATE_INSTRUCTION, OCR_QUESTION, OCR_COLOR_QUESTION,
                GROUNDING_QUESTION, GROUNDING_WHERE_QUESTION, *EDIT_INSTRUCTIONS.values())

# The base model's pretraining mixture (mage.data.pretrain_mix): general skills, each asked in a few
# phrasings (so the base learns the question, not one template), never a task prompt. Between them they
# use every word of the task prompts, in other sentences: the continual phase freezes the embeddings, so
# a word the base never read would stay at its random init (tests/test_pretrain.py).
PRETRAIN_PROMPTS = {
    "describe": ("Describe the image.", "Describe the picture."),  # -> "a red circle at the top left and ..."
    "count": ("Count the shapes.", "How many shapes are there?", "Count the things in the picture.",
              "How many objects do you see?"),  # -> "2"
    "locate": ("Which part of the picture is the {color} {shape} in?", "In which part is the {color} {shape}?",
               "Find the {color} {shape}.", "Where in the picture is the {color} {shape}?"),  # -> "top left"
    "name": ("Name the {color} thing.", "Which shape is {color}?", "What is the {color} thing?",
             "Which one is {color}?"),  # -> "circle"
    "color": ("Which color is the {shape}?", "Name the color of the {shape}."),  # -> "red"
    "classify": ("Which object is this?", "Name the object."),  # -> "star"
    "read": ("Read the digits.", "Which number is shown?", "Read the number in the picture.", "Read the text.",
             "What number is written here?"),  # -> "47"
    "point": ("Give the center of the {color} {shape}.", "Point to the {color} {shape}."),  # -> "[0.50,0.17]"
    "draw": ("Draw {description}.", "Paint {description}.", "Please draw {description}.",
             "Can you generate {description}?"),  # -> image
    "copy": ("Copy the picture.", "Repeat the picture.", "Please turn the picture into a copy."),  # image -> same image
    "verify": ("Does the picture show {article} {color} {shape}?", "Can you see {article} {color} {shape}?",
               "Is {article} {color} {shape} in the picture?"),  # -> "yes"
    "corners": ("Give the corners of the {color} {shape}.", "Outline the {color} {shape}.",
                "Can you provide the box around the {color} {shape}?"),  # -> "[0.17,0.33,0.45,0.61]"
    "remove": ("Remove the {color} {shape}.", "Take away the {color} {shape}.",
               "Please make the {color} {shape} disappear."),  # image -> image without it
    "add": ("Add {description}.", "Put {description} in the picture.",
            "Please move {description} into the picture."),  # image -> image with it
}
# Answer-format hints a real MLLM meets in its instruction data, appended to one text prompt in three
# (never the tasks' own "Answer with one word."), so the base follows a question whatever its tail.
PRETRAIN_SUFFIXES = ("Answer briefly.", "Use a single word or phrase.", "Reply in a few words.",
                     "Reply with a single word.")
PRETRAIN_DESCRIBE_OBJECT = "{article} {color} {shape} at the {position}"
PRETRAIN_DESCRIBE_CLASS = "{article} {color} {cls}"           # an ImageNet-class drawing, described
PRETRAIN_TEXTS = (PRETRAIN_DESCRIBE_OBJECT, PRETRAIN_DESCRIBE_CLASS, *PRETRAIN_SUFFIXES,
                  *(p for prompts in PRETRAIN_PROMPTS.values() for p in prompts))
# The polite reply of SEED-X's editing recipe is not used: image answers are the image tokens only.

# Extra words kept in the tiny vocabulary so that natural variants of the prompts still tokenize.
EXTRA_WORDS = ("a", "an", "the", "of", "and", "is", "are", "it", "this", "that", "there", "to", "in", "on",
               "answer", "image", "picture", "object", "objects", "color", "shape", "box", "one", "word",
               "what", "where", "which", "how", "many", "please", "generate", "provide", "sorry", "i",
               "cannot", "not", "unknown", "none", "here", "with", "at", "left", "right", "top", "bottom",
               "center", "text", "written", "digits", "number", "thing", "part", "describe", "count",
               "shapes", "read", "give", "draw", "copy", "name")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def all_texts() -> list[str]:
    """Every template, word and phrase of the mini benchmark (the tiny tokenizer's corpus)."""
    texts: list[str] = [PROMPT_TEMPLATE, GENERATE_INSTRUCTION, CAPTION, OCR_QUESTION, OCR_COLOR_QUESTION,
                        GROUNDING_QUESTION, CLASSIFY_QUESTION, *PRETRAIN_TEXTS]
    texts += list(VQA_QUESTIONS.values()) + list(EDIT_INSTRUCTIONS.values())
    texts += list(COLORS) + list(SHAPES) + list(POSITIONS) + list(CLASSES) + list(YES_NO) + list(EXTRA_WORDS)
    return texts
