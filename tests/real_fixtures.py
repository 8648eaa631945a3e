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


# ----- the Continual-NExT release, in its exact layout and keys, a few records per task -------------------

def _image(path: Path, size=(64, 48), color=(200, 30, 30)) -> None:
    from PIL import Image, ImageDraw
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, (30, 30, 30))
    ImageDraw.Draw(im).rectangle([size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2], fill=color)
    im.save(path)


def _jsonl(path: Path, records: list) -> None:
    import json
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _json(path: Path, data) -> None:
    import json
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


# What the readers must make of the fixture: usable training records, skipped ones, test records.
RELEASE_COUNTS = {"vqav2": (3, 3, 2), "imagenet": (2, 0, 2), "flickr30k": (2, 1, 2), "ocrvqa": (2, 0, 2),
                  "refcoco": (2, 0, 2), "hqedit": (1, 0, 2)}  # (train, skipped, test); hqedit: 2 more filtered


def write_release(root: Path) -> Path:
    """All six tasks as the release ships them: SEED-Data-* folders (Flickr30k under the MAGE README's
    "Fliackr30k" spelling), nested annotations/**/*.jsonl, records without an image (null / '' / 'none'),
    a leading '/' on image paths, RefCOCO test records without "answer", HQEdit test records without
    question_id, Flickr30k test records with the caption only, HQEdit pairs the official filter drops."""
    vqa = root / "SEED-Data-VQAv2"
    for name in ("COCO_train2014_1.jpg", "COCO_train2014_2.jpg", "COCO_train2014_3.jpg"):
        _image(vqa / "COCO2014" / "train2014" / name)
    _image(vqa / "COCO2014" / "val2014" / "COCO_val2014_1.jpg", color=(30, 30, 200))
    _jsonl(vqa / "annotations" / "vqav2_train.jsonl", [
        {"image": "COCO_train2014_1.jpg", "data": ["What color is the square?", "red", "Is it big?", "no"]},
        {"image": "/COCO_train2014_2.jpg", "data": ["What color is the square?", "red"]},
        {"image": None, "data": ["What is this?", "nothing"]},
        {"image": "", "data": ["What is this?", "nothing"]},
    ])
    _jsonl(vqa / "annotations" / "part2" / "more" / "train.jsonl", [
        {"image": "COCO_train2014_3.jpg", "data": ["How many squares?", "1"]},
        {"image": "none", "data": ["What is this?", "nothing"]},
    ])
    _json(vqa / "questions" / "test.json", [
        {"question_id": 11, "image": "val2014/COCO_val2014_1.jpg", "text": "What color is the square?", "answer": "blue"},
        {"question_id": 12, "image": "/val2014/COCO_val2014_1.jpg", "text": "How many squares?", "answer": "1"},
    ])

    imn = root / "SEED-Data-ImageNet"
    _image(imn / "imagenet" / "train" / "n01440764" / "a.JPEG")
    _image(imn / "imagenet" / "val" / "b.JPEG")
    _jsonl(imn / "annotations" / "train.jsonl", [
        {"image": "n01440764/a.JPEG", "data": ["What is the object in the image? Answer with one word.", "tench"]},
        {"image": "n01440764/a.JPEG", "data": ["What is the object in the image? Answer with one word.", "fish"]},
    ])
    _json(imn / "questions" / "test.json", [
        {"question_id": i, "image": "val/b.JPEG", "text": "What is the object in the image? Answer with one word.",
         "answer": "tench"} for i in range(2)])

    flickr = root / "SEED-Data-Fliackr30k"
    for name in ("1000092795.jpg", "10002456.jpg"):
        _image(flickr / "images" / name, size=(60, 40), color=(30, 200, 30))
    _jsonl(flickr / "annotations" / "flickr30k" / "train.jsonl", [
        {"image": "1000092795.jpg", "data": ["Please generate the image.", "A brown dog runs on the beach."]},
        {"image": "/10002456.jpg", "data": ["Please generate the image.", "Two people ride bikes."]},
        {"image": "null", "data": ["Please generate the image.", "Nothing."]},
    ])
    _json(flickr / "questions" / "test.json", [{"text": "A brown dog runs on the beach."},
                                              {"text": "Two people ride bikes."}])

    ocr = root / "SEED-Data-OCRVQA"
    _image(ocr / "OCR-VQA" / "images" / "123.jpg")
    _jsonl(ocr / "annotations" / "train.jsonl", [
        {"image": "123.jpg", "data": ["Who wrote this book?", "Unanswerable"]},
        {"image": "123.jpg", "data": ["What is the title of this book?", "Dogs"]},
    ])
    _json(ocr / "questions" / "test.json", [
        {"question_id": "123_1", "image": "123.jpg", "text": "Who wrote this book?", "answer": "Unanswerable"},
        {"question_id": "123_2", "image": "123.jpg", "text": "What is the title of this book?", "answer": "Dogs"}])

    ground = root / "SEED-Data-Grounding"
    _image(ground / "COCO2014" / "train2014" / "COCO_train2014_9.jpg")
    _image(ground / "COCO2014" / "val2014" / "COCO_val2014_9.jpg")
    _jsonl(ground / "annotations" / "refcoco" / "train.jsonl", [
        {"image": "COCO_train2014_9.jpg", "data": ["Please provide the box of the red square.", "[0.25,0.25,0.50,0.50]"]},
        {"image": "COCO_train2014_9.jpg", "data": ["Please provide the box of the red square.", "[0.25,0.25,0.50,0.50]"]},
    ])
    _json(ground / "questions" / "test.json", [
        {"question_id": 7, "size": [64, 48], "image": "val2014/COCO_val2014_9.jpg",
         "text": "Please provide the box of the red square.", "origin_answer_bbox": [16, 12, 16, 12],
         "answer_bbox": "[0.25,0.31,0.50,0.56]"},
        {"question_id": 8, "size": [64, 48], "image": "val2014/COCO_val2014_9.jpg",
         "text": "Please provide the box of the red square.", "origin_answer_bbox": [16, 12, 16, 12],
         "answer_bbox": "[0.25,0.31,0.50,0.56]"}])

    edit = root / "SEED-Data-HQEdit" / "images"
    for name, size in (("keep.png", (448, 448)), ("small.png", (200, 200)), ("wide.png", (800, 400))):
        _image(edit / "source_images" / name, size=size)
        _image(edit / "target_images" / name, size=size, color=(30, 30, 200))
    _jsonl(root / "SEED-Data-HQEdit" / "annotations" / "train.jsonl", [
        {"source_image": f"source_images/{n}", "target_image": f"target_images/{n}", "instruction": "make the square blue"}
        for n in ("keep.png", "small.png", "wide.png")])
    _json(root / "SEED-Data-HQEdit" / "questions" / "test.json", [
        {"source_image": "source_images/keep.png", "target_image": "target_images/keep.png",
         "instruction": "make the square blue"},
        {"source_image": "source_images/small.png", "target_image": "target_images/small.png",
         "instruction": "make the square blue"}])
    return root


def write_tiny_seed_x(folder: Path, tokenizer_dir: Path) -> dict[str, Path]:
    """The four SEED-X pieces, saved as released, for the tiny graph with the fixture tokenizer:
    agent/pytorch_model.bin (resamplers, patch_pos_embed), an HF LLaMA folder, the ViT state dict."""
    from mage.data.tokenizer import load_tokenizer
    from mage.model import build_model

    torch.manual_seed(0)
    model = build_model("tiny", tokenizer=load_tokenizer(tokenizer_dir))
    folder.mkdir(parents=True, exist_ok=True)
    agent = {k: v for k, v in model.state_dict().items()
             if k.startswith(("input_resampler.", "output_resampler.", "patch_pos_embed"))}
    (folder / "agent").mkdir(exist_ok=True)
    torch.save(agent, folder / "agent" / "pytorch_model.bin")
    model.llm.save_pretrained(folder / "llm")
    torch.save(model.visual_encoder.state_dict(), folder / "qwen_vit_G.pt")
    return {"agent_path": folder / "agent" / "pytorch_model.bin", "llm_path": folder / "llm",
            "vision_path": folder / "qwen_vit_G.pt", "tokenizer_path": tokenizer_dir}
