"""SeedXModel (tiny, CPU): forward, per-example losses, gradients, dummy paths, meta-device sizes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mage.model import SeedXModel, build_model, get_config
from tests.test_model_batches import KINDS, collate, make_example

# fp32 on CPU: per-example losses recomputed in another batch layout agree to a few ulps of ~10.
ATOL = 1e-5


@pytest.fixture(scope="module")
def model() -> SeedXModel:
    torch.manual_seed(0)
    return build_model("tiny")


def batch_of(model, kinds, seed=0, padding="right", **kwargs) -> dict:
    gen = torch.Generator().manual_seed(seed)
    examples = [make_example(model.tokenizer, kind, gen) for kind in kinds]
    return collate(examples, model.tokenizer.pad_token_id, padding=padding, **kwargs)


def test_tiny_config_sizes(model):
    config = model.config
    assert config.num_image_tokens == 16 and config.vision.num_patches == 64
    assert model.visual_encoder(torch.zeros(2, 3, 112, 112)).shape == (2, 64, config.vision.output_dim)
    assert model.llm.config.vocab_size == len(model.tokenizer)
    assert model.llm.config._attn_implementation == "sdpa"
    assert not model.llm.config.tie_word_embeddings


def test_forward_shapes_and_loss_composition(model):
    batch = batch_of(model, KINDS)
    out = model(batch)
    b = len(KINDS)
    for name in ("per_example_loss", "per_example_lm_loss", "per_example_rec_loss"):
        assert getattr(out, name).shape == (b,)
    for value in (out.loss, out.lm_loss, out.rec_loss):
        assert value.shape == () and torch.isfinite(value)
    torch.testing.assert_close(out.loss, out.per_example_loss.mean())
    torch.testing.assert_close(out.per_example_loss, out.per_example_lm_loss + 6.0 * out.per_example_rec_loss)
    has_output_image = torch.tensor([kind in ("gen", "edit") for kind in KINDS])
    assert (out.per_example_rec_loss[~has_output_image] == 0).all()
    assert (out.per_example_rec_loss[has_output_image] > 0).all()
    assert (out.per_example_lm_loss > 0).all()


def test_loss_weights_are_configurable():
    torch.manual_seed(0)
    weighted = build_model("tiny", lm_loss_weight=0.5, rec_loss_weight=2.0)
    out = weighted(batch_of(weighted, ("gen", "vqa")))
    torch.testing.assert_close(out.per_example_loss, 0.5 * out.per_example_lm_loss + 2.0 * out.per_example_rec_loss)


def _trim(batch: dict, row: int) -> dict:
    """Example `row` of a right-padded batch as a batch of one, without its padding."""
    length = int(batch["attention_mask"][row].sum())
    single = {k: batch[k][row:row + 1, :length] for k in
              ("input_ids", "attention_mask", "labels", "input_image_mask", "output_image_mask")}
    views_before = int(batch["input_image_mask"][:row].sum()) // 16
    views = int(batch["input_image_mask"][row].sum()) // 16
    targets_before = int(batch["output_image_mask"][:row].sum()) // 16
    targets = int(batch["output_image_mask"][row].sum()) // 16
    single["images"] = batch["images"][views_before:views_before + views]
    single["image_positions"] = batch["image_positions"][views_before:views_before + views]
    single["target_images"] = batch["target_images"][targets_before:targets_before + targets]
    return single


def test_per_example_loss_equals_each_example_run_alone(model):
    kinds = ("edit", "text", "tiles", "gen", "vqa", "gen")
    batch = batch_of(model, kinds, seed=3)
    out = model(batch)
    for row in range(len(kinds)):
        alone = model(_trim(batch, row))
        torch.testing.assert_close(out.per_example_loss[row], alone.per_example_loss[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(out.per_example_lm_loss[row], alone.lm_loss, atol=ATOL, rtol=0)
        torch.testing.assert_close(out.per_example_rec_loss[row], alone.rec_loss, atol=ATOL, rtol=0)


def test_losses_match_an_independent_computation(model):
    """One example: CE equals HF's own shifted loss; MSE is recomputed from hidden_states[-1]."""
    batch = batch_of(model, ("edit",), seed=5)
    out = model(batch)
    embeds, _ = model.embed_inputs(batch)
    ref = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"],
                    output_hidden_states=True)
    torch.testing.assert_close(out.lm_loss, ref.loss, atol=ATOL, rtol=0)
    hidden = ref.hidden_states[-1][batch["output_image_mask"]].view(1, 16, -1)
    features = model.visual_encoder(batch["target_images"])  # (1, 64, output_dim)
    target = features.view(1, 16, 4, -1).mean(dim=2)  # 4 consecutive tokens -> 1
    expected = F.mse_loss(model.output_resampler(hidden), target)
    torch.testing.assert_close(out.rec_loss, expected, atol=ATOL, rtol=0)


def test_input_images_are_scattered_row_major_with_patch_positions(model):
    batch = batch_of(model, ("tiles", "vqa"))
    embeds, anchor = model.embed_inputs(batch)
    assert anchor is None
    expected = model.input_image_embeddings(batch["images"], batch["image_positions"])
    torch.testing.assert_close(embeds[batch["input_image_mask"]], expected.reshape(-1, expected.shape[-1]))
    # the view's position term: cat([p, 1 - p]) / 2 @ patch_pos_embed
    p = batch["image_positions"][0]
    without = model.input_resampler(model.visual_encoder(batch["images"][:1]))[0]
    torch.testing.assert_close(expected[0] - without,
                               (torch.cat([p, 1 - p]) / 2 @ model.patch_pos_embed).expand_as(without))
    text = ~batch["input_image_mask"]
    torch.testing.assert_close(embeds[text], model.llm.get_input_embeddings()(batch["input_ids"])[text])


def test_left_padded_training_batch_gives_the_same_losses(model):
    kinds = ("vqa", "text", "gen")
    right = model(batch_of(model, kinds, seed=2, padding="right"))
    left = model(batch_of(model, kinds, seed=2, padding="left"))
    torch.testing.assert_close(left.per_example_loss, right.per_example_loss, atol=ATOL, rtol=0)


def _grad_norm(module_or_param) -> float:
    params = [module_or_param] if isinstance(module_or_param, torch.nn.Parameter) else module_or_param.parameters()
    return sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)


def test_gradients_reach_trainable_parts_and_not_the_vit():
    torch.manual_seed(0)
    model = build_model("tiny")
    model(batch_of(model, KINDS)).loss.backward()
    for name in ("input_resampler", "output_resampler"):
        resampler = getattr(model, name)
        for pname in ("query", "attn.in_proj_weight", "attn.out_proj.weight", "ln_q.weight", "ln_kv.weight",
                      "kv_proj.weight"):
            assert resampler.get_parameter(pname).grad.abs().sum() > 0, f"{name}.{pname}"
        assert resampler.pos_embed.grad is None and not resampler.pos_embed.requires_grad
    assert model.patch_pos_embed.grad.abs().sum() > 0
    assert model.llm.get_input_embeddings().weight.grad.abs().sum() > 0
    assert model.llm.lm_head.weight.grad.abs().sum() > 0
    for name, param in model.visual_encoder.named_parameters():
        assert param.grad is None and not param.requires_grad, name
    assert not model.visual_encoder.training
    model.train()
    assert model.training and not model.visual_encoder.training


@pytest.mark.parametrize("kinds", [("text", "text"), ("vqa", "text"), ("gen", "text")])
@pytest.mark.parametrize("drop_empty", [False, True])
def test_dummy_paths_keep_every_trainable_parameter_in_the_graph(kinds, drop_empty):
    torch.manual_seed(0)
    model = build_model("tiny")
    batch = batch_of(model, kinds, drop_empty_images=drop_empty)
    out = model(batch)
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    # the dummy terms weigh 0: the losses are those of the real tokens only
    if "vqa" not in kinds:
        assert _grad_norm(model.input_resampler) == 0 and _grad_norm(model.patch_pos_embed) == 0
    if "gen" not in kinds:
        assert _grad_norm(model.output_resampler) == 0
        assert (out.per_example_rec_loss == 0).all()


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    batch = None
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model("tiny", gradient_checkpointing=checkpointing)
        batch = batch if batch is not None else batch_of(model, ("vqa", "gen"))
        model.train()
        out = model(batch)
        out.loss.backward()
        results.append((out.per_example_loss.detach(), model.llm.get_input_embeddings().weight.grad.clone(),
                        model.input_resampler.query.grad.clone()))
    assert model.gradient_checkpointing
    for plain, checkpointed in zip(*results):
        torch.testing.assert_close(checkpointed, plain)


def test_freeze_for_sft_leaves_seed_x_trainable_set():
    torch.manual_seed(0)
    model = build_model("tiny")
    model.freeze_for_sft()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "patch_pos_embed" in trainable and "llm.lm_head.weight" in trainable
    assert "llm.model.embed_tokens.weight" in trainable and "llm.model.norm.weight" in trainable
    assert "llm.model.layers.0.input_layernorm.weight" in trainable
    assert "llm.model.layers.0.self_attn.q_proj.weight" not in trainable
    assert "input_resampler.query" in trainable and "input_resampler.pos_embed" not in trainable
    assert not any(n.startswith("visual_encoder.") for n in trainable)


def test_bad_batches_get_clear_errors(model):
    batch = batch_of(model, ("vqa",))
    batch["input_image_mask"][0, 0] = True
    with pytest.raises(ValueError, match="input_image_mask"):
        model(batch)
    batch = batch_of(model, ("gen",))
    batch["target_images"] = batch["target_images"][:0]
    with pytest.raises(ValueError, match="output_image_mask"):
        model(batch)
    batch = batch_of(model, ("vqa",))
    batch["images"] = torch.zeros(1, 3, 64, 64)
    with pytest.raises(ValueError, match="112"):
        model(batch)


def test_meta_build_has_the_real_sizes():
    model = build_model("seed-x-13b", device="meta")
    assert all(p.is_meta for p in model.parameters())

    def count(module):
        return sum(p.numel() for p in module.parameters())

    h, inter, layers, vocab = 5120, 13824, 40, 32330
    llama = 2 * vocab * h + layers * (4 * h * h + 3 * h * inter + 2 * h) + h  # untied, no biases
    assert count(model.llm) == llama == 13_019_243_520
    assert count(model.input_resampler) == 126_525_440
    assert count(model.output_resampler) == 88_637_440
    assert model.patch_pos_embed.numel() == 20_480
    assert 1.93e9 < count(model.visual_encoder) < 1.95e9
    assert model.llm.dtype == torch.bfloat16
    assert model.config.num_image_tokens == 64
    assert model.llm.config.rms_norm_eps == 1e-5 and model.llm.config.max_position_embeddings == 2048


def test_config_validation_names_the_mismatch():
    config = get_config("tiny")
    out = config.output_resampler
    bad = config.replace(output_resampler=out.__class__(grid_size=3, embed_dim=out.embed_dim, num_heads=4,
                                                        kv_dim=out.kv_dim))
    with pytest.raises(ValueError, match="queries"):
        bad.validate()
    with pytest.raises(ValueError, match="unknown model preset"):
        get_config("seed-x-7b")
