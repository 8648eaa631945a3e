"""Loading real SEED-X weights from local files (never from the network).

SEED-X ships three pieces:
- the agent checkpoint (`agent/pytorch_model.bin`): `input_resampler.*`, `output_resampler.*`,
  `patch_pos_embed`, as saved from ContinuousLVLM;
- the LLM (`llm/`): a HF LLaMA directory (config.json + weights), or bare safetensors/.bin weights;
- the Qwen-VL ViT-G (`qwen_vit_G.pt`): `conv1.weight`, `positional_embedding`, `transformer.*`, ...

Every loader checks names and shapes before touching the model and raises CheckpointError naming the
missing, unexpected and mis-shaped keys.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaForCausalLM

from .build import DEFAULT_DTYPES, build_model, default_attn_implementation
from .seedx import SeedXModel, enable_llm_checkpointing

AGENT_PREFIXES = ("input_resampler.", "output_resampler.", "patch_pos_embed")
VISUAL_PREFIXES = ("visual_encoder.", "visual.")  # stripped when every key carries one
_SHOWN = 20  # names listed per kind of problem in an error message


class CheckpointError(ValueError):
    """A checkpoint does not match the model: names the offending keys."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors / .bin / .pt file, or of a directory of (possibly sharded) HF weights."""
    path = Path(path)
    if path.is_dir():
        return _read_weights_dir(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files written before torch 1.6 (not zip) cannot be memory-mapped
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "module", "model"):  # DeepSpeed / trainer wrappers around the tensors
        if isinstance(state, dict) and set(state) == {wrapper} and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{str(path)!r} does not hold a flat state dict of tensors")
    return state


def _read_weights_dir(path: Path) -> dict[str, torch.Tensor]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(read_state_dict(path / shard))
            return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return read_state_dict(path / name)
    raise FileNotFoundError(f"no weights in {str(path)!r}: expected model.safetensors, pytorch_model.bin "
                            f"or a sharded *.index.json")


def _describe(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _SHOWN else "")


def check_state_dict(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError listing missing, unexpected and shape-mismatched keys by name."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_describe(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model ({'; '.join(problems)}). Check that the "
                              f"file is the right SEED-X piece and that the model preset matches it.")


def load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str,
              prefixes: tuple[str, ...] | None = None) -> None:
    """Load `state` into `module` (only the keys under `prefixes` when given), converting to the
    module's dtypes. A module on the meta device gets the tensors assigned instead of copied."""
    expected = module.state_dict()
    if prefixes is not None:
        expected = {k: v for k, v in expected.items() if k.startswith(prefixes)}
    check_state_dict(expected, state, source)
    on_meta = any(t.is_meta for t in expected.values())
    converted = {k: v.to(dtype=expected[k].dtype) for k, v in state.items()}
    module.load_state_dict(converted, strict=prefixes is None, assign=on_meta)


def _strip_common_prefix(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_agent(model: SeedXModel, path: str | Path) -> None:
    """The agent checkpoint: input_resampler.*, output_resampler.*, patch_pos_embed."""
    load_into(model, read_state_dict(path), f"agent checkpoint {str(path)!r}", prefixes=AGENT_PREFIXES)


def load_visual_encoder(model: SeedXModel, path: str | Path) -> None:
    """The Qwen-VL ViT weights (a `visual.` or `visual_encoder.` prefix on every key is stripped)."""
    state = _strip_common_prefix(read_state_dict(path), VISUAL_PREFIXES)
    load_into(model.visual_encoder, state, f"visual encoder checkpoint {str(path)!r}")


def _rebuild_rotary_embedding(llm: LlamaForCausalLM) -> None:
    # inv_freq is a non-persistent buffer: absent from checkpoints, so a meta-built LLM must recompute it.
    rotary = llm.model.rotary_emb
    if any(b.is_meta for b in rotary.buffers()):
        with torch.device("cpu"):
            llm.model.rotary_emb = type(rotary)(config=llm.config)


def _check_llm_config(model: SeedXModel, loaded: LlamaForCausalLM, path: Path) -> None:
    ours, theirs = model.llm.config, loaded.config
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "tie_word_embeddings")
    wrong = [f"{f}: {getattr(theirs, f)} in {str(path)!r} vs {getattr(ours, f)} in preset {model.config.name!r}"
             for f in fields if getattr(theirs, f) != getattr(ours, f)]
    if wrong:
        raise CheckpointError(f"LLM config does not match the model: {'; '.join(wrong)}")


def load_llm(model: SeedXModel, path: str | Path) -> None:
    """The LLaMA weights: a HF directory (with config.json) via from_pretrained, else bare weights."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        dtype = model.llm.get_input_embeddings().weight.dtype
        device = model.patch_pos_embed.device
        attn = model.llm.config._attn_implementation
        loaded, info = LlamaForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=dtype, attn_implementation=attn, output_loading_info=True,
            ignore_mismatched_sizes=True)  # so mismatches come back in `info` and are reported by name below
        _check_llm_config(model, loaded, path)
        problems = {k: sorted(map(str, info.get(k) or [])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        problems = {k: v for k, v in problems.items() if v}
        if problems:
            raise CheckpointError(f"LLM checkpoint {str(path)!r} does not match the model: "
                                  + "; ".join(f"{k.replace('_', ' ')}: {_describe(v)}" for k, v in problems.items()))
        if model.gradient_checkpointing:
            enable_llm_checkpointing(loaded)
        model.llm = loaded if device.type == "meta" else loaded.to(device)
        return
    load_into(model.llm, read_state_dict(path), f"LLM checkpoint {str(path)!r}")
    _rebuild_rotary_embedding(model.llm)


def load_seed_x(
    agent: str | Path,
    llm: str | Path,
    visual_encoder: str | Path,
    *,
    name: str = "seed-x-13b",
    tokenizer=None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    gradient_checkpointing: bool | None = None,
) -> SeedXModel:
    """Build `name` on the meta device, load the three SEED-X pieces and move the model to `device`.

    `tokenizer`: a tokenizer object or a local tokenizer directory (mage.data.tokenizer.load_tokenizer).
    """
    if isinstance(tokenizer, (str, Path)):
        from mage.data.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(tokenizer)
    device = torch.device(device)
    dtype = dtype if dtype is not None else DEFAULT_DTYPES.get(name, torch.float32)
    model = build_model(name, device="meta", dtype=dtype, tokenizer=tokenizer,
                        attn_implementation=default_attn_implementation(device, dtype),
                        gradient_checkpointing=gradient_checkpointing)
    load_llm(model, llm)
    load_visual_encoder(model, visual_encoder)
    load_agent(model, agent)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise CheckpointError(f"no weights were loaded for: {_describe(still_meta)}")
    return model.to(device)
