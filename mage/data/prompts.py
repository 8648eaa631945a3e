"""Fixed texts of the official SEED-X / MAGE recipes used on the real release (docs/REAL_DATA.md).

- `POLITE_REPLIES`: SEED-X's generation and editing samples supervise one of these short replies
  before `<img>` (the empty reply included); enabled by `data.polite_reply`.
- `OFFICIAL_GENERATION_PROMPT`: the instruction of the official Flickr30k evaluation for a test record
  that holds the caption only (set as `data.generation_prompt` in the seed-x-13b preset).
"""
from __future__ import annotations

POLITE_REPLIES = (
    "Here is a picture.", "I have designed an image.", "Here is a photo.", "I have generated an image.",
    "Here's a painting.", "Here's a drawing.", "Enjoy this illustration.", "Take a look at this image.",
    "Here is a picture.", "I have created a photo.", "Enjoy this photo.", "I have generated a picture.",
    "Here is a photograph.", "Here's an image.", "Certainly, here's an image.", "Absolutely, here is a painting.",
    "Sure, here is a picture.", "Of course, here is a photo.", "Certainly, please enjoy this picture.",
    "Sure, please enjoy this illustration.", "",
)
OFFICIAL_GENERATION_PROMPT = "Generate an image: {caption}"
