"""The trainer builds SEED-X from local weights in the release layout when model.*_path are set."""
import pytest
import torch

from mage.data.tokenizer import build_tokenizer
from mage.lora import iter_multi_lora
from mage.model import build_model
from mage.trainer.config import load_config
from mage.trainer.loop import build_trainable_model
from tests.test_model_checkpoint import write_release


def test_trainer_loads_local_seed_x_weights(tmp_path):
    torch.manual_seed(7)
    source = build_model("tiny")
    paths = write_release(source, tmp_path)
    build_tokenizer("tiny").save_pretrained(tmp_path / "tokenizer")
    cfg = load_config("mini", {"model.agent_path": str(paths["agent"]), "model.llm_path": str(paths["llm"]),
                               "model.vision_path": str(paths["visual_encoder"]),
                               "model.tokenizer_path": str(tmp_path / "tokenizer")})
    model = build_trainable_model(cfg, torch.device("cpu"))
    name, layer = next(iter_multi_lora(model.llm))
    expected = dict(source.llm.named_parameters())[f"{name}.weight"]
    assert torch.equal(layer.base.weight, expected)
    torch.testing.assert_close(model.input_resampler.query, source.input_resampler.query, rtol=0, atol=0)
    torch.testing.assert_close(model.visual_encoder.proj, source.visual_encoder.proj, rtol=0, atol=0)


def test_partial_or_missing_weight_paths_are_refused(tmp_path):
    with pytest.raises(ValueError, match="missing: model.vision_path, model.tokenizer_path"):
        build_trainable_model(load_config("mini", {"model.agent_path": "a", "model.llm_path": "b"}),
                              torch.device("cpu"))
    with pytest.raises(ValueError, match="trained from local weights"):
        build_trainable_model(load_config("seed-x-13b"), torch.device("meta"))
