"""Loading SEED-X weights laid out as the real release: agent file, HF LLaMA dir, ViT state dict."""
from __future__ import annotations

import dataclasses

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mage.model import build_model
from mage.model.checkpoint import (CheckpointError, load_agent, load_llm, load_seed_x, load_visual_encoder,
                                   read_state_dict)

AGENT_PREFIXES = ("input_resampler.", "output_resampler.", "patch_pos_embed")


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(1)
    return build_model("tiny")


def write_release(model, root: Path, agent_format: str = "bin", llm_format: str = "hf") -> dict[str, Path]:
    """The tiny model's weights in SEED-X's layout under `root`."""
    state = model.state_dict()
    agent = {k: v.clone() for k, v in state.items() if k.startswith(AGENT_PREFIXES)}
    paths = {"agent": root / "agent" / ("pytorch_model.bin" if agent_format == "bin" else "model.safetensors")}
    paths["agent"].parent.mkdir(parents=True)
    if agent_format == "bin":
        torch.save(agent, paths["agent"])
    else:
        save_file(agent, str(paths["agent"]))
    if llm_format == "hf":
        paths["llm"] = root / "llm"
        model.llm.save_pretrained(paths["llm"])
    else:
        paths["llm"] = root / "llm.safetensors"
        save_file({k: v.contiguous() for k, v in model.llm.state_dict().items()}, str(paths["llm"]))
    paths["visual_encoder"] = root / "qwen_vit_G.pt"
    torch.save(model.visual_encoder.state_dict(), paths["visual_encoder"])
    return paths


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("agent_format,llm_format", [("bin", "hf"), ("safetensors", "safetensors")])
def test_load_seed_x_from_a_release_layout(source, tmp_path, agent_format, llm_format):
    paths = write_release(source, tmp_path, agent_format, llm_format)
    loaded = load_seed_x(paths["agent"], paths["llm"], paths["visual_encoder"], name="tiny",
                         tokenizer=source.tokenizer)
    assert_same_weights(loaded, source)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    # frozen parts stay frozen after assignment from the checkpoint
    assert not any(p.requires_grad for p in loaded.visual_encoder.parameters())
    assert not loaded.input_resampler.pos_embed.requires_grad and loaded.input_resampler.query.requires_grad
    gen = torch.Generator().manual_seed(0)
    from tests.test_model_batches import collate, make_example
    batch = collate([make_example(source.tokenizer, k, gen) for k in ("edit", "text")], source.tokenizer.pad_token_id)
    torch.testing.assert_close(loaded(batch).per_example_loss, source(batch).per_example_loss)


def test_loaders_copy_into_an_existing_model(source, tmp_path):
    paths = write_release(source, tmp_path)
    torch.manual_seed(2)
    target = build_model("tiny", tokenizer=source.tokenizer)
    load_agent(target, paths["agent"])
    load_visual_encoder(target, paths["visual_encoder"])
    load_llm(target, paths["llm"])
    assert_same_weights(target, source)


def test_visual_prefix_is_stripped(source, tmp_path):
    path = tmp_path / "vit.pt"
    torch.save({f"visual.{k}": v for k, v in source.visual_encoder.state_dict().items()}, path)
    torch.manual_seed(2)
    target = build_model("tiny", tokenizer=source.tokenizer)
    load_visual_encoder(target, path)
    assert_same_weights(target.visual_encoder, source.visual_encoder)


def _agent_state(source) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in source.state_dict().items() if k.startswith(AGENT_PREFIXES)}


def test_missing_agent_key_is_named(source, tmp_path):
    state = _agent_state(source)
    del state["input_resampler.query"]
    torch.save(state, tmp_path / "agent.bin")
    with pytest.raises(CheckpointError, match=r"missing keys: input_resampler\.query"):
        load_agent(source, tmp_path / "agent.bin")


def test_unexpected_and_mis_shaped_agent_keys_are_named(source, tmp_path):
    state = _agent_state(source)
    width = source.patch_pos_embed.shape[1]
    state["patch_pos_embed"] = torch.zeros(4, width + 1)
    state["output_resampler.extra"] = torch.zeros(3)
    torch.save(state, tmp_path / "agent.bin")
    with pytest.raises(CheckpointError) as error:
        load_agent(source, tmp_path / "agent.bin")
    message = str(error.value)
    assert "unexpected keys: output_resampler.extra" in message
    assert f"patch_pos_embed: checkpoint (4, {width + 1}) vs model (4, {width})" in message
    # nothing was loaded: the check runs before any copy
    assert source.patch_pos_embed.shape == (4, width)


def test_llm_dir_problems_are_named(source, tmp_path):
    llm_dir = tmp_path / "llm"
    source.llm.save_pretrained(llm_dir)
    state = read_state_dict(llm_dir)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(llm_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_llm(source, llm_dir)
    with pytest.raises(CheckpointError, match=r"missing keys: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_llm(source, llm_dir / "model.safetensors")


def test_llm_dir_shape_mismatch_is_named(source, tmp_path):
    llm_dir = tmp_path / "llm"
    source.llm.save_pretrained(llm_dir)
    state = read_state_dict(llm_dir)
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(170, 64)
    save_file({k: v.contiguous() for k, v in state.items()}, str(llm_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"mismatched keys: .*model\.layers\.0\.mlp\.up_proj\.weight"):
        load_llm(source, llm_dir)


def test_llm_config_mismatch_is_named(source, tmp_path):
    torch.manual_seed(0)
    other = build_model("tiny", config=source.config.replace(
        llm=dataclasses.replace(source.config.llm, num_layers=3)))
    other.llm.save_pretrained(tmp_path / "llm")
    with pytest.raises(CheckpointError, match="num_hidden_layers: 3"):
        load_llm(source, tmp_path / "llm")


def test_vit_shape_mismatch_is_named(source, tmp_path):
    state = dict(source.visual_encoder.state_dict())
    state["positional_embedding"] = torch.zeros(9, 64)
    torch.save(state, tmp_path / "vit.pt")
    with pytest.raises(CheckpointError, match=r"positional_embedding: checkpoint \(9, 64\) vs model \(16, 64\)"):
        load_visual_encoder(source, tmp_path / "vit.pt")


def test_missing_file_is_reported(source, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_agent(source, tmp_path / "nothing.bin")
