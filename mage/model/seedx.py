"""SEED-X (ContinuousLVLM): frozen ViT -> input resampler -> LLaMA -> output resampler.

Training forward and losses follow docs/DESIGN.md "Model"; the losses are reduced per example
so that example n's own loss L_n is available to the Fisher (docs/METHOD.md section 3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from . import generation
from .config import SeedXConfig
from .losses import per_example_cross_entropy, per_example_mse
from .positions import position_ids_from_mask
from .resampler import Resampler
from .vision import VisionTransformer


@dataclass
class ModelOutput:
    loss: torch.Tensor  # scalar: mean of per_example_loss
    per_example_loss: torch.Tensor  # (B,) lm_w * per_example_lm_loss + rec_w * per_example_rec_loss
    lm_loss: torch.Tensor  # scalar: mean over examples of per_example_lm_loss
    rec_loss: torch.Tensor  # scalar: mean over examples of per_example_rec_loss
    per_example_lm_loss: torch.Tensor  # (B,)
    per_example_rec_loss: torch.Tensor  # (B,)


def llama_config(config: SeedXConfig, vocab_size: int, tokenizer, attn_implementation: str) -> LlamaConfig:
    llm = config.llm
    special = {}
    if tokenizer is not None:
        special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                   "eos_token_id": tokenizer.eos_token_id}
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_heads,
        max_position_embeddings=llm.max_position_embeddings, rms_norm_eps=llm.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": llm.rope_theta},
        tie_word_embeddings=False, attn_implementation=attn_implementation, **special,
    )


def enable_llm_checkpointing(llm: LlamaForCausalLM) -> None:
    """Recompute each decoder layer in backward (non-reentrant), under either transformers API name."""
    kwargs = {"use_reentrant": False}
    if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class SeedXModel(nn.Module):
    def __init__(self, config: SeedXConfig, tokenizer=None, attn_implementation: str = "sdpa"):
        super().__init__()
        config.validate()
        vocab_size = config.llm.vocab_size
        if vocab_size is None:
            if tokenizer is None:
                raise ValueError(f"config {config.name!r} takes its vocabulary size from the tokenizer; pass one")
            vocab_size = len(tokenizer)
        if tokenizer is not None and len(tokenizer) > vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the LLM vocabulary is {vocab_size}")
        self.config = config
        self.tokenizer = tokenizer
        self.llm = LlamaForCausalLM(llama_config(config, vocab_size, tokenizer, attn_implementation))
        self.visual_encoder = VisionTransformer(config.vision).requires_grad_(False).eval()
        self.input_resampler = Resampler(config.input_resampler)
        self.output_resampler = Resampler(config.output_resampler)
        hidden = config.llm.hidden_size
        # Added to each view's tokens as cat([p, 1 - p]) / 2 @ patch_pos_embed (p: tile centre).
        self.patch_pos_embed = nn.Parameter(hidden ** -0.5 * torch.randn(4, hidden))
        if config.gradient_checkpointing:
            self.enable_gradient_checkpointing()

    # ----- setup -----------------------------------------------------------------------------

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    def train(self, mode: bool = True) -> "SeedXModel":
        super().train(mode)
        self.visual_encoder.eval()  # frozen: never in training mode
        return self

    def enable_gradient_checkpointing(self) -> None:
        enable_llm_checkpointing(self.llm)

    @property
    def gradient_checkpointing(self) -> bool:
        llm = self.llm
        if hasattr(llm, "is_activation_checkpointing"):  # transformers >= 5
            return bool(llm.is_activation_checkpointing)
        return bool(llm.is_gradient_checkpointing)

    def freeze_for_sft(self) -> None:
        """SEED-X's SFT trainable set: embeddings, lm_head, norms, both resamplers, patch_pos_embed.

        Everything else (LLM linear weights, ViT, fixed pos_embed tables) is frozen. Parameters
        whose name contains "lora_" are left as they are, so this may run before or after LoRA.
        """
        for name, param in self.named_parameters():
            if "lora_" in name:
                continue
            trainable = (
                name == "patch_pos_embed"
                or (name.startswith(("input_resampler.", "output_resampler.")) and not name.endswith("pos_embed"))
                or name.startswith(("llm.model.embed_tokens.", "llm.lm_head."))
                or (name.startswith("llm.") and "norm" in name)
            )
            param.requires_grad_(trainable)

    # ----- images ----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) -> (M, Q, D): ViT tokens average-pooled by pool_stride (the regression target)."""
        features = self.visual_encoder(images)
        stride = self.config.pool_stride
        return F.avg_pool1d(features.transpose(1, 2), kernel_size=stride, stride=stride).transpose(1, 2)

    def input_image_embeddings(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(V, 3, H, W) views and (V, 2) tile centres -> (V, Q, hidden) LLM input embeddings."""
        if positions is None or positions.shape != (images.shape[0], 2):
            got = None if positions is None else tuple(positions.shape)
            raise ValueError(f"batch['image_positions'] must be ({images.shape[0]}, 2) for {images.shape[0]} views, got {got}")
        with torch.no_grad():
            features = self.visual_encoder(images)
        embeds = self.input_resampler(features.to(self.input_resampler.query.dtype))
        p = positions.to(self.patch_pos_embed.dtype)
        return embeds + (torch.cat([p, 1 - p], dim=-1) / 2 @ self.patch_pos_embed).unsqueeze(1)

    def _dummy_input_images(self) -> torch.Tensor:
        """A zero-weighted pass through the input side so its parameters stay in the graph (DDP)."""
        vision, resampler = self.config.vision, self.input_resampler
        dummy = resampler.query.new_zeros(1, vision.num_queries, resampler.kv_dim)
        return 0.0 * (resampler(dummy) + self.patch_pos_embed.mean(0)).sum()

    def _dummy_output_images(self) -> torch.Tensor:
        resampler = self.output_resampler
        dummy = resampler.query.new_zeros(1, resampler.num_queries, resampler.kv_dim)
        return 0.0 * resampler(dummy).sum()

    # ----- forward ---------------------------------------------------------------------------

    def embed_inputs(self, batch: dict, input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings with input-image views scattered in; plus the dummy term when there are none."""
        input_ids = batch["input_ids"] if input_ids is None else input_ids
        embeds = self.llm.get_input_embeddings()(input_ids)
        images = batch.get("images")
        mask = batch.get("input_image_mask")
        num_views = 0 if images is None else images.shape[0]
        # One host sync per step: a count mismatch would silently misalign image tokens otherwise.
        num_slots = 0 if mask is None else int(mask.sum())
        expected = num_views * self.num_image_tokens
        if num_slots != expected:
            raise ValueError(f"batch['input_image_mask'] has {num_slots} True entries but {num_views} image views "
                             f"need {expected} ({self.num_image_tokens} per view); check the collate function")
        if num_views == 0:
            return embeds, self._dummy_input_images()
        image_embeds = self.input_image_embeddings(images, batch.get("image_positions")).to(embeds.dtype)
        return embeds.masked_scatter(mask.unsqueeze(-1), image_embeds), None

    def forward(self, batch: dict) -> ModelOutput:
        input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        if input_ids.shape != labels.shape or input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and "
                             f"labels {tuple(labels.shape)} must have the same (B, T) shape")
        embeds, input_anchor = self.embed_inputs(batch)
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask),
                       output_hidden_states=True, use_cache=False)
        lm = per_example_cross_entropy(out.logits, labels)
        rec, output_anchor = self._reconstruction_loss(batch, out.hidden_states[-1])
        per_example = self.config.lm_loss_weight * lm + self.config.rec_loss_weight * rec
        for anchor in (input_anchor, output_anchor):
            if anchor is not None:
                per_example = per_example + anchor
        return ModelOutput(loss=per_example.mean(), per_example_loss=per_example, lm_loss=lm.mean(),
                           rec_loss=rec.mean(), per_example_lm_loss=lm, per_example_rec_loss=rec)

    def _reconstruction_loss(self, batch: dict, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B,) MSE of each row's output images; hidden = final (post-norm) hidden states (B, T, hidden)."""
        batch_size, q = hidden.shape[0], self.num_image_tokens
        targets = batch.get("target_images")
        mask = batch.get("output_image_mask")
        num_images = 0 if targets is None else targets.shape[0]
        slots = hidden.new_zeros(0, 2, dtype=torch.long) if mask is None else mask.nonzero()
        if slots.shape[0] != num_images * q:
            raise ValueError(f"batch['output_image_mask'] has {slots.shape[0]} True entries but {num_images} target "
                             f"images need {num_images * q} ({q} per image); check the collate function")
        if num_images == 0:
            return hidden.new_zeros(batch_size, dtype=torch.float32), self._dummy_output_images()
        rows = slots[:, 0].view(num_images, q)
        if bool((rows != rows[:, :1]).any()):
            raise ValueError("an output image's <img_i> tokens span several rows of output_image_mask")
        reconstructed = self.output_resampler(hidden[mask].view(num_images, q, -1))
        target = self.encode_image_features(targets)
        return per_example_mse(reconstructed, target, rows[:, 0], batch_size), None

    # ----- generation (evaluation) -------------------------------------------------------------

    def generate_text(self, batch: dict, max_new_tokens: int = 32) -> list[str]:
        """Greedy continuation of each left-padded prompt, decoded without special tokens."""
        return generation.generate_text(self, batch, max_new_tokens)

    def generate_free(self, batch: dict, max_new_tokens: int = 120) -> "generation.FreeGeneration":
        """Free-running greedy generation (the model must emit <img> itself): texts and image features."""
        return generation.generate_free(self, batch, max_new_tokens)

    def generate_image_features(self, batch: dict) -> torch.Tensor:
        """(B, Q, D): the output resampler's features for one image generated after each prompt."""
        return generation.generate_image_features(self, batch)
