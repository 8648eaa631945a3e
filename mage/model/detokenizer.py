"""SEED-X's image decoder ("detokenizer"): output-resampler features -> SDXL UNet/VAE -> pixels.

The 64 x 4096 features of a generated image go through SEED-X's adapter, a perceiver resampler
(`DetokenizerResampler`: 64 latents of width 1024, depth 4, heads of 64 dims) that gives the UNet its
cross-attention states (768 + 1280 = 2048 wide, as SDXL's two text encoders would) and its pooled
embedding (1280, through an attention pool). SDXL-base-1.0's UNet and VAE then sample, with no text
encoders at all. Sampling follows SEED-X's evaluation: Euler scheduler, 50 steps, 1024 x 1024,
classifier-free guidance 7.5 against the features of an all-zero (normalised) image. Editing uses the
second-stage adapter, whose UNet takes 8 input channels (noise latents + the source image's VAE
latents, the latter unscaled as SEED-X encodes them) with InstructPix2Pix-style guidance: text 7.5,
image 1.5.

Everything is read from a local folder in SEED-X's `pretrained/` layout (`--model.decoder_path`):

    stable-diffusion-xl-base-1.0/{unet,vae,scheduler}/     (diffusers format)
    seed_detokenizer/first_stage/pytorch_model.bin         (generation adapter: resampler.*, unet.*)
    seed_detokenizer/second_stage/pytorch_model.bin        (editing adapter: resampler.*, full unet.*)

diffusers is optional (`pip install -e .[decoder]`); it is imported only when a decoder is built.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

SDXL_DIR = "stable-diffusion-xl-base-1.0"
ADAPTERS = {"generate": "seed_detokenizer/first_stage/pytorch_model.bin",
            "edit": "seed_detokenizer/second_stage/pytorch_model.bin"}
DIM_HEAD = 64  # SEED-X's adapter: heads of 64 dims (the head count follows from the weights' shapes)


def require_diffusers():
    try:
        import diffusers
    except ImportError:
        raise ImportError("decoding images needs diffusers: pip install -e '.[decoder]' (or pip install diffusers)") from None
    return diffusers


# ----- the adapter (same parameter names as SEED-X's checkpoint) ------------------------------------

class PerceiverAttention(nn.Module):
    """Latents attend to [inputs; latents] (Flamingo's perceiver attention)."""

    def __init__(self, dim: int, heads: int, dim_head: int = DIM_HEAD):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b = latents.shape[0]
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        # softmax in float32, as SEED-X does for fp16 stability
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        return self.to_out(out.transpose(1, 2).reshape(b, latents.shape[1], -1))


class AttentionPool(nn.Module):
    """The mean token (with its own position) attends over all tokens: the UNet's pooled embedding."""

    def __init__(self, num_tokens: int, dim: int, heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(num_tokens + 1, dim) / dim ** 0.5)
        self.k_proj, self.q_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, output_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        b, n, d = x.shape
        q = self.q_proj(x[:, :1]).view(b, 1, self.heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, d)
        return self.c_proj(out)


@dataclass(frozen=True)
class AdapterConfig:
    dim: int = 1024
    depth: int = 4
    heads: int = 16
    num_queries: int = 64
    embedding_dim: int = 4096
    output1_dim: int = 768
    output2_dim: int = 1280
    ff_mult: int = 4

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], prefix: str = "resampler.") -> "AdapterConfig":
        """The sizes of a saved adapter, read from its tensors' shapes."""
        latents = state[prefix + "latents"]
        depth = len({k.split(".")[2] for k in state if k.startswith(prefix + "layers.")})
        return cls(dim=latents.shape[-1], depth=depth, heads=state[prefix + "layers.0.0.to_q.weight"].shape[0] // DIM_HEAD,
                   num_queries=latents.shape[1], embedding_dim=state[prefix + "proj_in.weight"].shape[1],
                   output1_dim=state[prefix + "unet_proj_1.weight"].shape[0],
                   output2_dim=state[prefix + "unet_proj_2.weight"].shape[0],
                   ff_mult=state[prefix + "layers.0.1.1.weight"].shape[0] // latents.shape[-1])


class DetokenizerResampler(nn.Module):
    """SEED-X's adapter resampler: (B, N, embedding_dim) -> cross-attention states (B, Q, out1 + out2),
    pooled (B, out2). Parameter names match SEED-X's checkpoint (under `resampler.`)."""

    def __init__(self, cfg: AdapterConfig = AdapterConfig()):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.dim) / cfg.dim ** 0.5)
        self.proj_in = nn.Linear(cfg.embedding_dim, cfg.dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(cfg.dim, cfg.heads),
                           nn.Sequential(nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, cfg.dim * cfg.ff_mult, bias=False),
                                         nn.GELU(), nn.Linear(cfg.dim * cfg.ff_mult, cfg.dim, bias=False))])
            for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.dim)
        self.unet_proj_1 = nn.Linear(cfg.dim, cfg.output1_dim)
        self.unet_proj_2 = nn.Linear(cfg.dim, cfg.output2_dim)
        self.unet_attnpool = AttentionPool(cfg.num_queries, cfg.dim, cfg.heads, cfg.output2_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        hidden = self.norm_out(latents)
        states = torch.cat([self.unet_proj_1(hidden), self.unet_proj_2(hidden)], dim=-1)
        return states, self.unet_attnpool(hidden)


# ----- sampling ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingConfig:
    steps: int = 50
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5   # editing only
    size: int = 1024
    seed: int = 42


def widen_conv_in(unet, in_channels: int = 8) -> None:
    """The editing UNet's first conv takes noise + source latents: new input channels start at zero."""
    old = unet.conv_in
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :old.in_channels].copy_(old.weight)
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)


class ImageDecoder(nn.Module):
    """Adapter + UNet + VAE + scheduler: `decode(features, source_images=None)` -> PIL images."""

    def __init__(self, resampler: DetokenizerResampler, unet, vae, scheduler, negative_features: torch.Tensor):
        super().__init__()
        self.resampler, self.unet, self.vae, self.scheduler = resampler, unet, vae, scheduler
        # Features of an all-zero normalised image (Q, D): the unconditional branch of the guidance.
        self.register_buffer("negative_features", negative_features, persistent=False)

    @property
    def edits(self) -> bool:
        return self.unet.config.in_channels == 8

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _source_latents(self, images: list[Image.Image], size: int) -> torch.Tensor:
        pixels = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((size, size)), dtype=np.float32))
                              .permute(2, 0, 1) for im in images]) / 127.5 - 1.0
        pixels = pixels.to(self.vae.device, self.vae.dtype)
        return self.vae.encode(pixels).latent_dist.mode()  # unscaled, as SEED-X's editing pipeline

    @torch.no_grad()
    def decode(self, features: torch.Tensor, source_images: list[Image.Image] | None = None,
               sampling: SamplingConfig = SamplingConfig()) -> list[Image.Image]:
        """(B, Q, D) output-resampler features -> B images of sampling.size^2 (editing needs source_images)."""
        if source_images is not None and not self.edits:
            raise ValueError("editing needs the second-stage adapter's 8-channel UNet (build with edit=True)")
        b, device, dtype = features.shape[0], self.unet.device, self.unet.dtype
        negative = self.negative_features.to(device, dtype).unsqueeze(0).expand(b, -1, -1)
        states, pooled = self.resampler(torch.cat([features.to(device, dtype), negative]))
        cond, uncond = states.chunk(2)
        pooled_c, pooled_u = pooled.chunk(2)
        size = sampling.size
        generator = torch.Generator(device="cpu").manual_seed(sampling.seed)
        latents = torch.randn(b, 4, size // self.vae_scale, size // self.vae_scale, generator=generator)
        scheduler = self.scheduler
        scheduler.set_timesteps(sampling.steps, device=device)
        latents = (latents * scheduler.init_noise_sigma).to(device, dtype)
        time_ids = torch.tensor([size, size, 0, 0, size, size], device=device, dtype=dtype).expand(b, -1)
        edit = source_images is not None
        branches = 3 if edit else 2
        if edit:  # (text+image, image only, unconditional), as InstructPix2Pix
            source = self._source_latents(source_images, size).to(device, dtype)
            extra = torch.cat([source, source, torch.zeros_like(source)])
            states, pooled = torch.cat([cond, uncond, uncond]), torch.cat([pooled_c, pooled_u, pooled_u])
        else:
            states, pooled = torch.cat([cond, uncond]), torch.cat([pooled_c, pooled_u])
            extra = torch.zeros_like(latents).repeat(2, 1, 1, 1) if self.edits else None
        added = {"text_embeds": pooled, "time_ids": time_ids.repeat(branches, 1)}
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents] * branches), t)
            if extra is not None:
                x = torch.cat([x, extra], dim=1)
            eps = self.unet(x, t, encoder_hidden_states=states, added_cond_kwargs=added).sample
            if edit:
                e_full, e_image, e_none = eps.chunk(3)
                eps = (e_none + sampling.guidance_scale * (e_full - e_image)
                       + sampling.image_guidance_scale * (e_image - e_none))
            else:
                e_cond, e_none = eps.chunk(2)
                eps = e_none + sampling.guidance_scale * (e_cond - e_none)
            latents = scheduler.step(eps, t, latents).prev_sample
        pixels = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(p) for p in pixels]


def load_decoder(decoder_path: str | Path, negative_features: torch.Tensor, kind: str = "generate",
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> ImageDecoder:
    """SEED-X's decoder from a local `pretrained/`-style folder; kind "generate" or "edit"."""
    diffusers = require_diffusers()
    root = Path(decoder_path)
    sdxl, adapter_file = root / SDXL_DIR, root / ADAPTERS[kind]
    for need in (sdxl / "unet", sdxl / "vae", sdxl / "scheduler", adapter_file):
        if not need.exists():
            raise FileNotFoundError(f"decoder folder {str(root)!r} lacks {need.relative_to(root)}; it must hold "
                                    f"{SDXL_DIR}/{{unet,vae,scheduler}} and {ADAPTERS['generate']} / {ADAPTERS['edit']} "
                                    f"as in SEED-X's pretrained/ folder (docs/REAL_DATA.md)")
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(sdxl), subfolder="unet", local_files_only=True)
    vae = diffusers.AutoencoderKL.from_pretrained(str(sdxl), subfolder="vae", local_files_only=True)
    scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(str(sdxl), subfolder="scheduler", local_files_only=True)
    state = torch.load(str(adapter_file), map_location="cpu", weights_only=True)
    if kind == "edit":
        widen_conv_in(unet, 8)
    resampler = DetokenizerResampler(AdapterConfig.from_state_dict(state))
    resampler.load_state_dict({k[len("resampler."):]: v for k, v in state.items() if k.startswith("resampler.")})
    unet_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    if unet_state:
        result = unet.load_state_dict(unet_state, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{adapter_file}: UNet keys the SDXL UNet does not have: {result.unexpected_keys[:5]}")
    other = sorted({k.split(".")[0] for k in state} - {"resampler", "unet"})
    if other:
        raise ValueError(f"{adapter_file}: unexpected parts {other}; expected resampler.* and unet.*")
    decoder = ImageDecoder(resampler, unet, vae.float(), scheduler, negative_features)
    decoder.resampler.to(device, dtype)
    decoder.unet.to(device, dtype)
    decoder.vae.to(device)  # float32: SDXL's VAE overflows in float16
    return decoder.eval()


__all__ = ["AdapterConfig", "DetokenizerResampler", "ImageDecoder", "SamplingConfig", "load_decoder", "widen_conv_in",
           "require_diffusers"]
