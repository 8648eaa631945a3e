"""Tokenizer parity with SEED-X: the slow LLaMA tokenizer of transformers 4.30 (SEED-X's pinned version),
on a small fixture tokenizer built the same way (SentencePiece LLaMA model + the added image/loc tokens)."""
import json
import re

import pytest

pytest.importorskip("sentencepiece", reason="the slow LLaMA tokenizer: pip install sentencepiece (in .[test])")

import sentencepiece as spm  # noqa: E402

from mage.data.collate import Example, collate  # noqa: E402
from mage.data.images import ImageConfig  # noqa: E402
from mage.data.tokenizer import load_tokenizer  # noqa: E402
from tests.real_fixtures import write_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def seed_x_encode(folder, text: str) -> list[int]:
    """transformers 4.30's slow LlamaTokenizer.encode(text, add_special_tokens=False), written out: split
    on added tokens (longest first), strip the whitespace on both sides of each, SentencePiece-encode the
    rest piece by piece (each with its dummy-prefix space)."""
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    added = json.loads((folder / "added_tokens.json").read_text())
    pattern = "(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")"
    parts = re.split(pattern, text)
    for i, part in enumerate(parts):
        if part in added:
            if i > 0:
                parts[i - 1] = parts[i - 1].rstrip()
            if i + 1 < len(parts):
                parts[i + 1] = parts[i + 1].lstrip()
    ids = []
    for part in parts:
        if part in added:
            ids.append(added[part])
        elif part:
            ids.extend(sp.encode(part))
    return ids


IMG = "<img>" + "".join(f"<img_{i:05d}>" for i in range(64)) + "</img>"
PATCH = "<patch>" + "".join(f"<img_{i:05d}>" for i in range(64)) + "</patch>"
TEXTS = (
    f"[INST] {IMG}What color is the circle in the image? [/INST]\n",
    f"[INST] What color is the circle in the image?{IMG} [/INST]\n",
    f"[INST] {PATCH}{PATCH}{IMG}What is written in the image? [/INST]\n",
    "[INST] Please provide the box of the red square. [/INST]\n",
    "<box_start><loc-12><loc-200><loc-57><loc-223><box_end>",
    "\n[INST] Generate an image: two people ride bikes. [/INST]\n",
    "Sure, here is a picture.<img>",
    "[0.27,0.42,0.83,0.73]",
)


def test_load_tokenizer_is_the_slow_sentencepiece_tokenizer(folder):
    tok = load_tokenizer(folder)
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.pad_token_id == tok.unk_token_id == 0
    assert tok.convert_tokens_to_ids("<patch>") == json.loads((folder / "added_tokens.json").read_text())["<patch>"]
    assert hasattr(tok, "sp_model")  # SentencePiece itself, not a converted fast tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_ids_around_inst_image_patch_and_loc_tokens_match_seed_x(folder, text):
    tok = load_tokenizer(folder)
    assert tok.encode(text, add_special_tokens=False) == seed_x_encode(folder, text)


def test_collated_sequence_is_seed_x_s(folder):
    """<s> + encode("[INST] {image tokens}{question} [/INST]\\n") + encode(answer) + </s>, as SEED-X's loader."""
    import torch
    tok = load_tokenizer(folder)
    cfg = ImageConfig(size=448, num_query_tokens=64, any_resolution=True)
    views = torch.zeros(3, 3, 448, 448)  # a 2x1 grid: two tiles and the global view
    ex = Example(task_id=0, example_id="x", turns=[("What is written in the image?", "Unanswerable")],
                 views=views, positions=torch.full((3, 2), 0.5))
    batch = collate([ex], tok, cfg)
    prompt = f"[INST] {PATCH}{PATCH}{IMG}What is written in the image? [/INST]\n"
    expected = [1] + seed_x_encode(folder, prompt) + seed_x_encode(folder, "Unanswerable") + [2]
    assert batch["input_ids"][0].tolist() == expected
    assert int(batch["input_image_mask"].sum()) == 3 * 64
    for text in ("make the sky blue", "Here is a picture.\nSure", "ü 12 [0.27,0.42,0.83,0.73]"):
        assert tok.decode(seed_x_encode(folder, text)) == text  # byte-fallback pieces decode to text
