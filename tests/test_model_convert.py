"""Official MAGE/SEED-X checkpoint layout -> the four LoRA groups (mage.model.convert)."""
import pytest
import torch
from safetensors.torch import load_file

from mage.lora import iter_multi_lora, wrap_llama_lora
from mage.model import build_model
from mage.model.checkpoint import CheckpointError
from mage.model.convert import convert_official, is_official_layout, load_init, main

RANK, GROUPS, ALPHA = 8, 4, 32.0
PEFT = "llm.base_model.model."


def _model():
    torch.manual_seed(0)
    model = build_model("tiny")
    wrap_llama_lora(model.llm, rank=RANK, num_groups=GROUPS, alpha=ALPHA, dropout=0.0)
    return model.eval()


def _official_state(model, plain_lora=False):
    """A random checkpoint in the official key layout for `model`'s shapes (what the MAGE code saves)."""
    g = torch.Generator().manual_seed(1)
    state = {}
    for name, layer in iter_multi_lora(model):
        peft = PEFT + name[len("llm."):]
        if plain_lora:
            state[f"{peft}.lora_A.default.weight"] = torch.randn(GROUPS * RANK, layer.in_features, generator=g)
            state[f"{peft}.lora_B.default.weight"] = torch.randn(layer.out_features, GROUPS * RANK, generator=g)
        else:
            for i in range(GROUPS):
                a = torch.randn(RANK, layer.in_features, generator=g)
                b = torch.randn(layer.out_features, RANK, generator=g)
                state[f"{peft}.lora_A.default.loraA.{i}.mlp.weight"] = a
                state[f"{peft}.lora_A.default.loraA.{i}.weight"] = a.clone()  # the expert's alias
                state[f"{peft}.lora_B.default.loraB.{i}.mlp.weight"] = b
                state[f"{peft}.lora_B.default.loraB.{i}.weight"] = b.clone()
            state[f"{peft}.lora_router.default.weight"] = torch.randn(GROUPS, layer.in_features, generator=g)
        state[f"{peft}.weight"] = torch.randn(layer.out_features, layer.in_features, generator=g)
    hidden = model.config.llm.hidden_size
    for i in range(model.config.llm.num_layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"{PEFT}model.layers.{i}.{norm}.modules_to_save.default.weight"] = torch.rand(hidden, generator=g)
            state[f"{PEFT}model.layers.{i}.{norm}.original_module.weight"] = torch.ones(hidden)
    state[f"{PEFT}model.norm.modules_to_save.default.weight"] = torch.rand(hidden, generator=g)
    emb = model.llm.get_input_embeddings().weight
    state[f"{PEFT}model.embed_tokens.weight"] = torch.randn(emb.shape, generator=g)
    state[f"{PEFT}lm_head.weight"] = torch.randn(emb.shape, generator=g)
    state["patch_pos_embed"] = torch.randn(model.patch_pos_embed.shape, generator=g)
    state["input_resampler.query"] = torch.randn(model.input_resampler.query.shape, generator=g)
    return state


def _official_formula(x, state, peft):
    """The official MAGE layer: W x + sum_i B_i A_i x * alpha / R (router fixed to ones, no dropout)."""
    y = x @ state[f"{peft}.weight"].T
    for i in range(GROUPS):
        a = state[f"{peft}.lora_A.default.loraA.{i}.mlp.weight"]
        b = state[f"{peft}.lora_B.default.loraB.{i}.mlp.weight"]
        y = y + (x @ a.T) @ b.T * (ALPHA / (GROUPS * RANK))
    return y


def test_official_layout_loads_into_four_groups_and_matches_the_official_formula(tmp_path):
    model = _model()
    state = _official_state(model)
    assert is_official_layout(state)
    torch.save(state, tmp_path / "pytorch_model.bin")
    report = load_init(model, tmp_path / "pytorch_model.bin")
    assert "lora_router" in report.summary() and "original_module" in report.summary()
    layer = dict(iter_multi_lora(model))["llm.model.layers.1.mlp.down_proj"]
    peft = PEFT + "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(layer.lora_A_groups[2], state[f"{peft}.lora_A.default.loraA.2.mlp.weight"])
    x = torch.randn(3, 5, layer.in_features)
    ref = _official_formula(x.double(), {k: v.double() for k, v in state.items()}, peft)
    # float32 layer vs float64 reference: tolerance from float32's rounding at the output's magnitude
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    norm = model.llm.model.layers[0].input_layernorm.weight
    torch.testing.assert_close(norm, state[f"{PEFT}model.layers.0.input_layernorm.modules_to_save.default.weight"])
    torch.testing.assert_close(model.llm.lm_head.weight, state[f"{PEFT}lm_head.weight"])
    torch.testing.assert_close(model.patch_pos_embed, state["patch_pos_embed"])


def test_plain_lora_rank_rows_split_into_groups(tmp_path):
    model = _model()
    state = _official_state(model, plain_lora=True)
    converted, _ = convert_official(state)
    a = state[PEFT + "model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    torch.testing.assert_close(converted["llm.model.layers.0.self_attn.q_proj.lora_A_groups.3"], a[24:32])
    torch.save(state, tmp_path / "lora.bin")
    load_init(model, tmp_path / "lora.bin")
    layer = dict(iter_multi_lora(model))["llm.model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(layer.lora_A, a)  # the stacked view is the official rank-32 A


def test_converter_cli_and_errors(tmp_path):
    model = _model()
    state = _official_state(model)
    torch.save(state, tmp_path / "official.bin")
    main(["--src", str(tmp_path / "official.bin"), "--out", str(tmp_path / "init.safetensors")])
    saved = load_file(tmp_path / "init.safetensors")
    assert "model.llm.model.layers.0.self_attn.q_proj.lora_B_groups.1" in saved
    fresh = _model()
    load_init(fresh, tmp_path / "init.safetensors")  # this project's layout loads too
    torch.testing.assert_close(fresh.llm.lm_head.weight, state[f"{PEFT}lm_head.weight"])

    bad = dict(state, **{"llm.base_model.model.model.layers.0.mystery.default.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unknown meaning"):
        convert_official(bad)
    alias = PEFT + "model.layers.0.self_attn.q_proj.lora_A.default.loraA.0.weight"
    with pytest.raises(CheckpointError, match="differs from its alias"):
        convert_official(dict(state, **{alias: torch.zeros_like(state[alias])}))
    wrong = dict(state, **{f"{PEFT}lm_head.weight": torch.zeros(3, 3)})
    torch.save(wrong, tmp_path / "wrong.bin")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_init(_model(), tmp_path / "wrong.bin")
