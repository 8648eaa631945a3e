"""The paper's CLIP score from a local CLIP (transformers), never downloaded.

score = 100 x cosine of CLIP's projected embeddings: text-image for Flickr30k (generated image vs the
caption), image-image for HQEdit (generated vs target image). The official evaluation uses OpenAI's
ViT-B/32; the same weights in the transformers layout (a folder with config.json, the weights, the
image processor and tokenizer files, e.g. a local copy of openai/clip-vit-base-patch32) go in
`eval.clip_path`. A generation that produced no image scores 0 (the caller passes None).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image


def _pooled(out) -> torch.Tensor:
    # transformers < 5 returns the projected tensor, >= 5 a model output with it as pooler_output
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """CLIP text-image and image-image cosine x 100 from a local transformers CLIP folder."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"CLIP folder {str(path)!r} has no config.json; save a CLIP ViT-B/32 in the "
                                    f"transformers layout there (model, image processor and tokenizer files)")
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(str(path), local_files_only=True, dtype=dtype).to(self.device).eval()
        self.processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.max_length = self.model.config.text_config.max_position_embeddings  # 77 for OpenAI's CLIP

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, self.model.dtype)
        return torch.nn.functional.normalize(_pooled(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return torch.nn.functional.normalize(_pooled(out).float(), dim=-1)

    def text_image(self, images: Sequence[Image.Image | None], texts: Sequence[str]) -> list[float]:
        """100 x cos(image, text) per pair; 0 where the image is None (no image was generated)."""
        return self._pairs(images, texts, self.text_embeddings)

    def image_image(self, images: Sequence[Image.Image | None], targets: Sequence[Image.Image]) -> list[float]:
        """100 x cos(image, target image) per pair; 0 where the image is None."""
        return self._pairs(images, targets, self.image_embeddings)

    def _pairs(self, images, references, embed) -> list[float]:
        if len(images) != len(references):
            raise ValueError(f"{len(images)} images for {len(references)} references")
        have = [i for i, im in enumerate(images) if im is not None]
        scores = [0.0] * len(images)
        if have:
            a = self.image_embeddings([images[i] for i in have])
            b = embed([references[i] for i in have])
            for i, s in zip(have, (100.0 * (a * b).sum(-1)).tolist()):
                scores[i] = s
        return scores
