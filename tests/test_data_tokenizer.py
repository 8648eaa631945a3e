import pytest

from mage.data import vocab
from mage.data.tokenizer import (BOS, EOS, IMAGE_TOKENS, SPECIAL_TOKENS, UNK, build_tokenizer, load_tokenizer)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("tiny")


def test_special_tokens_are_single_tokens(tok):
    assert tok.convert_tokens_to_ids(UNK) == 0 and tok.pad_token_id == 0
    ids = set()
    for t in SPECIAL_TOKENS + ("[INST]", "[/INST]"):
        enc = tok(t, add_special_tokens=False).input_ids
        assert len(enc) == 1, (t, enc)
        assert enc[0] != 0 or t == UNK, t
        ids.add(enc[0])
    assert len(ids) == len(SPECIAL_TOKENS) + 2  # all distinct
    # glued together they still split into single tokens
    glued = "<img>" + "".join(IMAGE_TOKENS[:16]) + "</img>"
    assert len(tok(glued, add_special_tokens=False).input_ids) == 18


def test_bos_prepended_and_decode_skips_specials(tok):
    ids = tok("red circle").input_ids
    assert ids[0] == tok.convert_tokens_to_ids(BOS)
    ids = tok("red circle" + EOS, add_special_tokens=False).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == "red circle"


@pytest.mark.parametrize("text", [
    "[0.27,0.42,0.83,0.73]", "[0.00,0.05,1.00,0.99]", "472", "0.27", "a red  circle in the top left",
    "[INST] What color is the circle? [/INST]\nred", "Is there a blue square in the image?\nyes",
])
def test_round_trip_exact(tok, text):
    ids = tok(text, add_special_tokens=False).input_ids
    assert 0 not in ids, tok.convert_ids_to_tokens(ids)
    assert tok.decode(ids) == text


def test_every_vocab_text_round_trips(tok):
    for text in vocab.all_texts():
        ids = tok(text, add_special_tokens=False).input_ids
        assert 0 not in ids, (text, tok.convert_ids_to_tokens(ids))
        assert tok.decode(ids) == text


def test_digits_and_punctuation_are_single_tokens(tok):
    assert tok.convert_ids_to_tokens(tok("12.5,[", add_special_tokens=False).input_ids) == ["1", "2", ".", "5", ",", "["]


def test_unknown_word_is_unk(tok):
    ids = tok("zebra", add_special_tokens=False).input_ids
    assert ids == [0]


def test_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="only 'tiny'"):
        build_tokenizer("big")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer files"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_reads_a_saved_tokenizer(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    text = "[INST] <img><img_00003></img>What is written in the image? [/INST]\n472"
    assert again(text).input_ids == tok(text).input_ids
