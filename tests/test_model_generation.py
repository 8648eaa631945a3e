"""Evaluation-time generation: greedy text with a KV cache under left padding, image features."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mage.model import SeedXModel, build_model
from mage.model.generation import greedy_tokens
from tests.test_model_batches import collate, make_example

PROMPT_KINDS = ("vqa", "text", "tiles", "edit")
ATOL = 1e-5  # fp32, same math in a different batch layout


@pytest.fixture(scope="module")
def model() -> SeedXModel:
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    # At init (std 0.02) a tiny LLaMA's next token barely depends on context or position; sharpen its
    # layers so that a wrong position id or a leaked pad changes the greedy output.
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if param.dim() == 2 and ".layers." in name:
                param.mul_(10.0)
    return model


def prompts(model, kinds, padding="left", seed=0, suffix=()):
    gen = torch.Generator().manual_seed(seed)
    examples = [make_example(model.tokenizer, kind, gen, prompt_only=True, words=i) for i, kind in enumerate(kinds)]
    for ex in examples:
        ex.add(model.tokenizer.convert_tokens_to_ids(list(suffix)))
    return collate(examples, model.tokenizer.pad_token_id, padding=padding), examples


def single(batch: dict, row: int) -> dict:
    """Row `row` of a left-padded batch, unpadded, as a batch of one."""
    keep = batch["attention_mask"][row].bool()
    out = {k: batch[k][row:row + 1, keep] for k in ("input_ids", "attention_mask", "input_image_mask")}
    views_before = int(batch["input_image_mask"][:row].sum()) // 16
    views = int(batch["input_image_mask"][row].sum()) // 16
    out["images"] = batch["images"][views_before:views_before + views]
    out["image_positions"] = batch["image_positions"][views_before:views_before + views]
    return out


def reference_greedy(model, batch: dict, steps: int) -> list[int]:
    """No cache, no padding: rerun the whole sequence for every new token."""
    embeds, _ = model.embed_inputs(batch)
    tokens = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model.llm(inputs_embeds=embeds).logits[0, -1]
            token = int(logits.argmax())
            tokens.append(token)
            if token == model.tokenizer.eos_token_id:
                break
            embeds = torch.cat([embeds, model.llm.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
    return tokens


def test_greedy_with_cache_and_left_padding_matches_the_reference(model):
    batch, _ = prompts(model, PROMPT_KINDS)
    assert (batch["attention_mask"][:, 0] == 0).any()  # really left-padded
    steps = 6
    tokens = greedy_tokens(model, batch, steps, model.tokenizer.eos_token_id, model.tokenizer.pad_token_id)
    assert tokens.shape[0] == len(PROMPT_KINDS) and tokens.shape[1] <= steps
    for row in range(len(PROMPT_KINDS)):
        alone = single(batch, row)
        expected = reference_greedy(model, alone, steps)
        got = tokens[row].tolist()[: len(expected)]
        assert got == expected, f"row {row}"
        assert greedy_tokens(model, alone, steps, model.tokenizer.eos_token_id,
                             model.tokenizer.pad_token_id)[0].tolist()[: len(expected)] == expected


def test_generate_text_returns_decoded_strings(model):
    batch, _ = prompts(model, PROMPT_KINDS)
    texts = model.generate_text(batch, max_new_tokens=5)
    assert isinstance(texts, list) and len(texts) == len(PROMPT_KINDS) and all(isinstance(t, str) for t in texts)
    tokens = greedy_tokens(model, batch, 5, model.tokenizer.eos_token_id, model.tokenizer.pad_token_id)
    for text, row in zip(texts, tokens.tolist()):
        eos = model.tokenizer.eos_token_id
        row = row[: row.index(eos)] if eos in row else row
        assert text == model.tokenizer.decode(row, skip_special_tokens=True).strip()
    for row in range(len(PROMPT_KINDS)):
        assert model.generate_text(single(batch, row), max_new_tokens=5) == [texts[row]]


def test_generation_stops_at_eos(model):
    eager = copy.deepcopy(model)
    eos = eager.tokenizer.eos_token_id
    head = torch.nn.Linear(eager.llm.config.hidden_size, eager.llm.config.vocab_size)
    with torch.no_grad():  # logits = one-hot(EOS) whatever the hidden state
        head.weight.zero_()
        head.bias.zero_()
        head.bias[eos] = 1.0
    eager.llm.lm_head = head
    batch, _ = prompts(eager, PROMPT_KINDS[:2])
    assert greedy_tokens(eager, batch, 8, eos, eager.tokenizer.pad_token_id).tolist() == [[eos], [eos]]
    assert eager.generate_text(batch, max_new_tokens=8) == ["", ""]


def test_generation_requires_left_padding(model):
    batch, _ = prompts(model, PROMPT_KINDS[:2], padding="right")
    with pytest.raises(ValueError, match="left-padded"):
        model.generate_text(batch, max_new_tokens=2)


@pytest.mark.parametrize("ends_with_boi", [True, False])
def test_image_features_are_the_teacher_forced_output_resampler(model, ends_with_boi):
    tok = model.tokenizer
    suffix = ("<img>",) if ends_with_boi else ()
    batch, _ = prompts(model, ("text", "edit", "vqa"), suffix=suffix)
    features = model.generate_image_features(batch)
    assert features.shape == (3, 16, model.config.vision.output_dim)
    image_tokens = tok.convert_tokens_to_ids([f"<img_{i:05d}>" for i in range(16)])
    for row in range(3):
        alone = single(batch, row)
        ids = alone["input_ids"][0].tolist() + ([] if ends_with_boi else [tok.convert_tokens_to_ids("<img>")])
        ids = torch.tensor([ids + image_tokens])
        embeds, _ = model.embed_inputs({**alone, "input_ids": ids[:, : alone["input_ids"].shape[1]]})
        embeds = torch.cat([embeds, model.llm.get_input_embeddings()(ids[:, embeds.shape[1]:])], dim=1)
        with torch.no_grad():
            hidden = model.llm(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1][:, -16:]
            expected = model.output_resampler(hidden)
        torch.testing.assert_close(features[row:row + 1], expected, atol=ATOL, rtol=0)


def test_mixed_boi_endings_are_rejected(model):
    batch, _ = prompts(model, ("text", "vqa"))
    batch["input_ids"][0, -1] = model.tokenizer.convert_tokens_to_ids("<img>")
    with pytest.raises(ValueError, match="make them agree"):
        model.generate_image_features(batch)


def test_encode_image_features_is_the_pooled_vit_output(model):
    images = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(4))
    features = model.encode_image_features(images)
    assert features.shape == (3, 16, model.config.vision.output_dim) and not features.requires_grad
    vit = model.visual_encoder(images)
    torch.testing.assert_close(features, F.avg_pool1d(vit.transpose(1, 2), 4).transpose(1, 2))
    torch.testing.assert_close(features[:, 1], vit[:, 4:8].mean(dim=1))


def test_generation_without_tokenizer_is_an_error():
    torch.manual_seed(0)
    bare = build_model("tiny")
    batch, _ = prompts(bare, ("text",))
    bare.tokenizer = None
    with pytest.raises(ValueError, match="needs a tokenizer"):
        bare.generate_text(batch)
