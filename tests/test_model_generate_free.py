"""Free-running generation through transformers generate (SEED-X's evaluation): the image-token rule,
parity with the project's greedy decoder, and image features equal to the teacher-forced ones."""
from __future__ import annotations

import torch
from torch import nn

from mage.model.generation import ImageTokenProcessor, greedy_tokens
from tests.test_model_generation import model, prompts  # noqa: F401  (module fixture)


class _ShiftLogits(nn.Module):
    """lm_head plus a constant on some tokens' logits (+1e4 on <img>: a model that always answers
    with an image)."""

    def __init__(self, head: nn.Module, tokens, shift: float):
        super().__init__()
        self.head, self.tokens, self.shift = head, list(tokens), shift

    def forward(self, x):
        out = self.head(x)
        out[..., self.tokens] += self.shift
        return out


def test_image_token_processor_forces_the_chain_and_blocks_it_elsewhere():
    boi, images, eoi = 10, [11, 12, 13], 14
    proc = ImageTokenProcessor(boi, images, eoi)
    scores = torch.randn(5, 20)
    last = torch.tensor([[3, boi], [3, 11], [3, 13], [3, 5], [3, eoi]])
    out = proc(last, scores.clone())
    assert out[0].argmax() == 11 and out[1].argmax() == 12 and out[2].argmax() == eoi
    assert torch.isinf(out[0]).sum() == 19  # exactly one allowed token
    for row in (3, 4):  # outside an image: the image tokens and </img> are blocked, the rest untouched
        assert torch.isinf(out[row, [11, 12, 13, eoi]]).all()
        keep = [i for i in range(20) if i not in (11, 12, 13, eoi)]
        torch.testing.assert_close(out[row, keep], scores[row, keep])


def test_free_generation_matches_the_greedy_decoder_on_text(model):  # noqa: F811
    batch, _ = prompts(model, ("vqa", "text", "tiles"))
    tok = model.tokenizer
    blocked = tok.convert_tokens_to_ids([f"<img_{i:05d}>" for i in range(16)] + ["</img>", "<img>"])
    head = model.llm.lm_head
    model.llm.lm_head = _ShiftLogits(head, blocked, -1e4)  # so the processor's rule never bites
    try:
        free = model.generate_free(batch, max_new_tokens=6)
        ref = greedy_tokens(model, batch, 6, tok.eos_token_id, tok.pad_token_id).tolist()
    finally:
        model.llm.lm_head = head
    for row, ids in enumerate(free.token_ids):
        expected = ref[row][: ref[row].index(tok.eos_token_id)] if tok.eos_token_id in ref[row] else ref[row]
        assert ids == expected
    assert all(f is None for f in free.image_features)  # the model never chose <img>: no image


def test_emitted_image_gives_the_teacher_forced_features(model):  # noqa: F811
    batch, _ = prompts(model, ("text", "vqa"))
    boi = model.tokenizer.convert_tokens_to_ids("<img>")
    head = model.llm.lm_head
    model.llm.lm_head = _ShiftLogits(head, [boi], 1e4)
    try:
        free = model.generate_free(batch, max_new_tokens=model.num_image_tokens + 4)
    finally:
        model.llm.lm_head = head
    forced = model.generate_image_features(batch)  # appends <img> + the Q image tokens to the prompt
    for row in range(2):
        assert free.token_ids[row][0] == boi
        torch.testing.assert_close(free.image_features[row], forced[row], rtol=1e-4, atol=1e-4)
