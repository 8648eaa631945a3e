"""The model accepts the batches of mage.data.collate (the contract of docs/DESIGN.md, end to end)."""
from __future__ import annotations

import torch

from mage.data.collate import Example, collate
from mage.data.images import ImageConfig
from mage.model import build_model


def examples() -> list[Example]:
    gen = torch.Generator().manual_seed(0)

    def image():
        return torch.randn(1, 3, 112, 112, generator=gen)

    centre = torch.tensor([[0.5, 0.5]])
    return [
        Example(0, "vqa", [("What color is the circle?", "red")], views=image(), positions=centre),
        Example(2, "gen", [("a red circle in the top left", "")], output_image=True, target=image()[0]),
        Example(5, "edit", [("Make the circle blue.", "")], output_image=True, views=image(), positions=centre,
                target=image()[0]),
        Example(0, "text", [("What shape is the red object?", "circle"), ("What color is it?", "red")]),
    ]


def test_model_trains_and_generates_on_collated_batches():
    torch.manual_seed(0)
    model = build_model("tiny")
    cfg = ImageConfig.tiny()
    batch = collate(examples(), model.tokenizer, cfg, mode="train")
    out = model(batch)
    assert out.per_example_loss.shape == (4,) and torch.isfinite(out.loss)
    assert (out.per_example_rec_loss[[1, 2]] > 0).all() and (out.per_example_rec_loss[[0, 3]] == 0).all()
    out.loss.backward()
    assert model.input_resampler.query.grad.abs().sum() > 0 and model.output_resampler.query.grad.abs().sum() > 0

    prompts = collate(examples(), model.tokenizer, cfg, mode="generate")
    texts = model.generate_text(prompts, max_new_tokens=3)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    image_prompts = collate([examples()[i] for i in (1, 2)], model.tokenizer, cfg, mode="generate")
    features = model.generate_image_features(image_prompts)
    assert features.shape == (2, 16, model.config.vision.output_dim)
    assert model.encode_image_features(image_prompts["target_images"]).shape == features.shape
