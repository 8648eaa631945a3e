"""Tokenizers: the tiny closed-vocabulary tokenizer built in code, and the real SEED-X tokenizer loader.

The tiny tokenizer is a WordLevel model (one id per word) over every word Continual-NExT-mini writes
(`mage.data.vocab`), so a tiny LLaMA learns words, not sub-word pieces. Digits, punctuation and each
whitespace character are single tokens, a space being the token "▁": numbers ("0.27") and boxes
("[0.27,0.42,0.83,0.73]") tokenize digit by digit and every text decodes back exactly. Unknown words
map to `<unk>` (id 0, also the pad token, as in SEED-X).

Special tokens follow SEED-X: `<s>`, `</s>`, `<unk>`, 100 image tokens `<img_00000>`..`<img_00099>`
(the tiny model uses the first 16, the real one 64), `<img>`, `</img>`, `<patch>`, `</patch>`,
`<box_start>`, `<box_end>`, `<loc-0>`..`<loc-223>`. Read their ids from the tokenizer, never hard-code
them (only `<unk>` = 0 is fixed).
"""
from __future__ import annotations

import string
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mage.data import vocab

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
PAD = UNK
IMG_START, IMG_END = "<img>", "</img>"
PATCH_START, PATCH_END = "<patch>", "</patch>"
BOX_START, BOX_END = "<box_start>", "<box_end>"
NUM_IMAGE_TOKENS_DEFINED = 100
NUM_LOC_TOKENS = 224
IMAGE_TOKENS = tuple(f"<img_{i:05d}>" for i in range(NUM_IMAGE_TOKENS_DEFINED))
LOC_TOKENS = tuple(f"<loc-{i}>" for i in range(NUM_LOC_TOKENS))
STRUCTURE_TOKENS = (IMG_START, IMG_END, PATCH_START, PATCH_END, BOX_START, BOX_END)
SPECIAL_TOKENS = (UNK, BOS, EOS) + IMAGE_TOKENS + STRUCTURE_TOKENS + LOC_TOKENS
# The chat markers are ordinary (not special) single tokens of the tiny vocabulary.
CHAT_TOKENS = ("[INST]", "[/INST]")

SPACE = "\u2581"  # "▁", the token of one space character
# Isolate every digit, underscore and non-word character (punctuation, "▁", "\n"); letter runs stay words.
_SPLIT = Regex(r"\d|_|[^\w]")


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Replace(" ", SPACE)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Split(_SPLIT, behavior="isolated")


def _word_pieces() -> list[str]:
    """The sorted closed vocabulary: every piece of the mini corpus (and its lowercase), digits, punctuation."""
    norm, pre = _normalizer(), _pre_tokenizer()
    pieces: set[str] = set(string.digits) | set(string.punctuation) | {SPACE, "\n"}
    for text in vocab.all_texts():
        for variant in (text, text.lower(), text.capitalize()):
            for chat in CHAT_TOKENS:
                variant = variant.replace(chat, " ")
            pieces.update(p for p, _ in pre.pre_tokenize_str(norm.normalize_str(variant)))
    return sorted(pieces)


def _build_tiny() -> Tokenizer:
    words = [w for w in _word_pieces() if w not in SPECIAL_TOKENS]
    ordered = [UNK, BOS, EOS, *CHAT_TOKENS, *words, *IMAGE_TOKENS, *STRUCTURE_TOKENS, *LOC_TOKENS]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(ordered)}, unk_token=UNK))
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.Fuse()])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in CHAT_TOKENS])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    # LLaMA convention: encode(..., add_special_tokens=True) prepends BOS only.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def build_tokenizer(name: str = "tiny") -> PreTrainedTokenizerFast:
    """The tokenizer of a model built in code. Only "tiny" exists; the real model uses `load_tokenizer`."""
    if name != "tiny":
        raise ValueError(f"build_tokenizer({name!r}): only 'tiny' is built in code; load the real SEED-X "
                         f"tokenizer with mage.data.tokenizer.load_tokenizer(path)")
    extra = list(IMAGE_TOKENS + STRUCTURE_TOKENS + LOC_TOKENS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_build_tiny(), bos_token=BOS, eos_token=EOS,
                                        unk_token=UNK, pad_token=PAD, clean_up_tokenization_spaces=False)
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    _check_special_tokens(tokenizer)
    return tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The real SEED-X tokenizer (LLaMA-2 + image/loc tokens) from a local directory, no network.

    With a `tokenizer.model` (SentencePiece) in the folder this is the slow LLaMA tokenizer, as SEED-X
    configures it (`transformers.LlamaTokenizer`, transformers 4.30): every added token (image, patch,
    box, loc) splits the text and strips the whitespace on both of its sides, and each remaining piece
    is encoded by SentencePiece with its dummy-prefix space (`slow_llama_tokenizer`). A folder with
    only `tokenizer.json` falls back to the fast tokenizer (its spacing around added tokens can differ).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"SEED-X tokenizer directory {str(path)!r} does not exist; download the "
                                f"SEED-X checkpoint (its tokenizer folder) and pass that folder")
    try:
        if (path / "tokenizer.model").is_file():
            tokenizer = slow_llama_tokenizer(path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"could not load a tokenizer from {str(path)!r} ({exc}); the folder must hold "
                                f"the SEED-X tokenizer files (tokenizer.model / tokenizer.json and "
                                f"tokenizer_config.json)") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # SEED-X pads with <unk>
    _check_special_tokens(tokenizer)
    return tokenizer


def slow_llama_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """SentencePiece LLaMA tokenizer with transformers 4.30's added-token rule (strip both sides)."""
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        raise ImportError("the slow LLaMA tokenizer needs sentencepiece: pip install sentencepiece") from None
    tokenizer = _slow_class().from_pretrained(str(path), local_files_only=True, legacy=True)
    # transformers 4.30 stripped whitespace on both sides of every added token given as a plain string
    # (how SEED-X's tokens were added); newer versions keep it unless the token says so.
    base = tokenizer.sp_model.get_piece_size()
    decoder = tokenizer._added_tokens_decoder
    for token_id, token in list(decoder.items()):
        if token_id >= base:
            decoder[token_id] = AddedToken(token.content, lstrip=True, rstrip=True, normalized=False,
                                           special=token.special)
    tokenizer._update_trie()
    return tokenizer


def _slow_class():
    """transformers < 5: the slow LlamaTokenizer; >= 5: the generic SentencePiece tokenizer, decoding as
    LLaMA's slow one did (SentencePiece decodes runs of pieces, so byte-fallback pieces become text)."""
    try:
        from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    except ImportError:
        from transformers import LlamaTokenizer
        return LlamaTokenizer

    class SlowLlamaTokenizer(SentencePieceBackend):
        def convert_tokens_to_string(self, tokens: list[str]) -> str:
            out, run = [], []
            for token in tokens:
                if token in self._added_tokens_encoder:  # added and special tokens: verbatim
                    out += [self.sp_model.decode(run), token]
                    run = []
                else:
                    run.append(token)
            return "".join(out + [self.sp_model.decode(run)])

    return SlowLlamaTokenizer


def _check_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    needed = [BOS, EOS, UNK, *IMAGE_TOKENS[:64], *STRUCTURE_TOKENS]
    missing = [t for t in needed if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)
               and t != UNK]
    if missing:
        raise ValueError(f"tokenizer lacks the SEED-X special tokens {missing[:5]}{'...' if len(missing) > 5 else ''}"
                         f" ({len(missing)} missing); use the SEED-X tokenizer that adds the image and loc tokens")
