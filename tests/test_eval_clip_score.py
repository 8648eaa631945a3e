"""CLIP score (mage.eval.clip_score) on a tiny random CLIP saved in the transformers layout."""
import pytest
import torch
from PIL import Image

from mage.eval.clip_score import ClipScorer
from tests.real_fixtures import write_tiny_clip


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    return ClipScorer(write_tiny_clip(tmp_path_factory.mktemp("clip")))


def _images():
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())
            for h, w in ((40, 50), (64, 32), (33, 33))]


def test_text_image_score_is_clip_cosine_times_100(scorer):
    images, texts = _images(), ["a red square", "two dogs on a beach", "x"]
    scores = scorer.text_image(images, texts)
    # Reference: CLIPModel.forward's logits divided by its logit scale = the cosine.
    tokens = scorer.tokenizer(texts, padding=True, return_tensors="pt")
    pixels = scorer.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = scorer.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    cosine = out.logits_per_image / scorer.model.logit_scale.exp()
    torch.testing.assert_close(torch.tensor(scores), 100 * cosine.diagonal(), rtol=1e-4, atol=1e-3)
    assert len(set(round(s, 3) for s in scores)) == 3


def test_image_image_score_and_missing_images(scorer):
    images = _images()
    same = scorer.image_image(images, images)
    assert same == pytest.approx([100.0] * 3, abs=1e-3)
    mixed = scorer.image_image([images[0], None, images[2]], [images[1], images[1], images[0]])
    assert mixed[1] == 0.0 and -100 <= mixed[0] < 100 and mixed[0] != mixed[2]
    with pytest.raises(ValueError, match="2 images for 3"):
        scorer.text_image(images[:2], ["a", "b", "c"])


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ClipScorer(tmp_path)
