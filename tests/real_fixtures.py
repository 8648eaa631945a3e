"""Tiny stand-ins of the real pieces, saved to disk in their real formats (built at test time, no download):
a random CLIP (transformers CLIPModel + image processor + byte-level tokenizer)."""
from __future__ import annotations

from pathlib import Path

import torch


def _byte_vocab() -> dict[str, int]:
    """Every byte-level character alone and as a word end (CLIP's BPE without merges)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(c, len(vocab))
    return vocab


def write_tiny_clip(path: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": 600, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "eos_token_id": 1, "bos_token_id": 0,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    CLIPTokenizer(vocab=_byte_vocab(), merges=[]).save_pretrained(path)
    return path


# ----- SEED-X's decoder in its pretrained/ layout, tiny ------------------------------------------------

def tiny_adapter_config(embedding_dim: int, num_queries: int):
    from mage.model.detokenizer import AdapterConfig
    return AdapterConfig(dim=64, depth=1, heads=1, num_queries=num_queries, embedding_dim=embedding_dim,
                         output1_dim=16, output2_dim=32, ff_mult=2)


def _tiny_unet(cfg, in_channels: int = 4):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cfg.output1_dim + cfg.output2_dim, attention_head_dim=8, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=cfg.output2_dim + 6 * 8)


def write_tiny_decoder(path: Path, embedding_dim: int, num_queries: int, seed: int = 0) -> Path:
    """stable-diffusion-xl-base-1.0/{unet,vae,scheduler} + seed_detokenizer/{first,second}_stage adapters."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler

    from mage.model.detokenizer import DetokenizerResampler, widen_conv_in

    torch.manual_seed(seed)
    cfg = tiny_adapter_config(embedding_dim, num_queries)
    sdxl = path / "stable-diffusion-xl-base-1.0"
    unet = _tiny_unet(cfg)
    unet.save_pretrained(sdxl / "unet")
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                  sample_size=32).save_pretrained(sdxl / "vae")
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           timestep_spacing="leading", steps_offset=1).save_pretrained(sdxl / "scheduler")
    first = {f"resampler.{k}": v for k, v in DetokenizerResampler(cfg).state_dict().items()}
    first.update({f"unet.{k}": v for k, v in unet.state_dict().items() if ".to_k." in k or ".to_v." in k})
    (path / "seed_detokenizer" / "first_stage").mkdir(parents=True)
    torch.save(first, path / "seed_detokenizer" / "first_stage" / "pytorch_model.bin")
    widen_conv_in(unet, 8)
    with torch.no_grad():
        unet.conv_in.weight[:, 4:].normal_(0, 0.1)  # a trained editing UNet reads the source latents
    second = {f"resampler.{k}": v for k, v in DetokenizerResampler(cfg).state_dict().items()}
    second.update({f"unet.{k}": v for k, v in unet.state_dict().items()})
    (path / "seed_detokenizer" / "second_stage").mkdir(parents=True)
    torch.save(second, path / "seed_detokenizer" / "second_stage" / "pytorch_model.bin")
    return path


# ----- SEED-X's tokenizer, built the same way (LLaMA SentencePiece + added tokens), tiny -----------------

CORPUS = (
    "What color is the circle in the image?", "What is the object in the image? Answer with one word.",
    "Please generate the image. A brown dog runs on the beach.", "Generate an image: two people ride bikes.",
    "Here is a picture.", "Sure, here is a picture.", "[INST] What is written in the image? [/INST]\n",
    "Please provide the box of the red square.", "make the sky blue", "turn the cat into a dog",
    "Who wrote this book? Unanswerable", "yes no 0 1 2 3 4 5 6 7 8 9 [0.27,0.42,0.83,0.73]",
)


def seed_x_added_tokens() -> list[str]:
    from mage.data.tokenizer import IMAGE_TOKENS, LOC_TOKENS
    return [*IMAGE_TOKENS, "<img>", "</img>", "<box_start>", "<box_end>", *LOC_TOKENS, "<patch>", "</patch>"]


def write_tokenizer(path: Path, vocab_size: int = 420) -> Path:
    """LLaMA-style SentencePiece BPE (byte fallback, identity normaliser, <unk>=0 <s>=1 </s>=2) plus SEED-X's
    added tokens after the base vocabulary, saved as transformers 4.30 saved SEED-X's tokenizer folder."""
    import io
    import json

    import sentencepiece as spm

    path.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(CORPUS) * 20), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True)
    (path / "tokenizer.model").write_bytes(model.getvalue())
    base = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    added = {t: base + i for i, t in enumerate(seed_x_added_tokens())}
    (path / "added_tokens.json").write_text(json.dumps(added))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (path / "special_tokens_map.json").write_text(json.dumps(specials))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "model_max_length": 2048,
         **specials}))
    return path
