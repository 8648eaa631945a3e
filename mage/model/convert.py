"""Official MAGE / SEED-X checkpoints -> this project's four-group layout, and `--model.init_from`.

The official code saves the agent (ContinuousLVLM) with its LLM wrapped by PEFT:

    llm.base_model.model.model.layers.L.self_attn.q_proj.lora_A.default.loraA.{i}.mlp.weight   (r, in)
    llm.base_model.model.model.layers.L.self_attn.q_proj.lora_A.default.loraA.{i}.weight       (same tensor)
    ...lora_B.default.loraB.{i}.mlp.weight (out, r), ...lora_router.default.weight (experts, in)
    ...input_layernorm.modules_to_save.default.weight, ...input_layernorm.original_module.weight
    llm.base_model.model.model.embed_tokens.weight, llm.base_model.model.lm_head.weight
    input_resampler.*, output_resampler.*, patch_pos_embed

and the plain LoRA baseline `...q_proj.lora_A.default.weight` (R, in) / `lora_B.default.weight` (out, R).
Its MAGE layer computes y = W x + sum_i B_i A_i drop(x) * alpha / R with the router fixed to ones, which
is `MultiLoRALinear` with expert i = group i (text_in, image_in, text_out, image_out) and the same
scaling alpha / (groups * rank). A plain LoRA's rank rows are split into the groups in order.

Known-harmless extras are reported and dropped: `lora_router` (unused: the official forward multiplies
by a fixed 1.0), `original_module` (the pre-training copy PEFT keeps of a `modules_to_save` norm) and
the duplicate `.weight` alias of an expert's `.mlp.weight` (checked equal). Any other unknown key is
an error.

    python -m mage.model.convert --src train_output/mage/VQAv2/pytorch_model.bin --out vqav2_init.safetensors
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .checkpoint import CheckpointError, read_state_dict

_PEFT_PREFIX = re.compile(r"^(?:module\.)?llm\.base_model\.model\.")
_EXPERT = re.compile(r"^(?P<layer>.+)\.lora_(?P<ab>[AB])\.default\.lora(?P=ab)\.(?P<i>\d+)(?P<mlp>\.mlp)?\.weight$")
_PLAIN = re.compile(r"^(?P<layer>.+)\.lora_(?P<ab>[AB])\.default\.weight$")
_SAVED = re.compile(r"^(?P<module>.+)\.modules_to_save\.default\.(?P<param>\w+)$")
_HARMLESS = (re.compile(r"\.lora_router\.default\.weight$"), re.compile(r"\.original_module\.\w+$"))


@dataclass
class ConversionReport:
    converted: int = 0
    dropped: list[str] = field(default_factory=list)   # known-harmless keys that were not converted

    def summary(self) -> str:
        kinds = sorted({"lora_router" if "lora_router" in k else "original_module" if "original_module" in k
                        else "expert .weight alias" for k in self.dropped})
        return (f"{self.converted} tensors converted; {len(self.dropped)} known-harmless key(s) dropped"
                + (f" ({', '.join(kinds)})" if kinds else ""))


def is_official_layout(state: dict[str, torch.Tensor]) -> bool:
    """True when the keys are PEFT's (base_model.model / .default. / modules_to_save)."""
    return any(_PEFT_PREFIX.match(k) or ".default." in k for k in state)


def convert_official(state: dict[str, torch.Tensor], num_groups: int = 4) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """The official key layout -> this project's model keys (`llm.model.layers.L...lora_A_groups.g`, ...)."""
    out: dict[str, torch.Tensor] = {}
    report = ConversionReport()
    unknown: list[str] = []
    for key, tensor in state.items():
        name = _PEFT_PREFIX.sub("llm.", key.removeprefix("module."))
        if any(p.search(name) for p in _HARMLESS):
            report.dropped.append(key)
            continue
        if m := _EXPERT.match(name):
            target = f"{m['layer']}.lora_{m['ab']}_groups.{m['i']}"
            if int(m["i"]) >= num_groups:
                raise CheckpointError(f"{key}: expert {m['i']} but the model has {num_groups} LoRA groups")
            if target in out:  # the expert's `.weight` alias of `.mlp.weight`
                if not torch.equal(out[target], tensor):
                    raise CheckpointError(f"{key} differs from its alias; the checkpoint is inconsistent")
                report.dropped.append(key)
                continue
            out[target] = tensor
        elif m := _PLAIN.match(name):
            dim = 0 if m["ab"] == "A" else 1
            if tensor.shape[dim] % num_groups:
                raise CheckpointError(f"{key}: rank {tensor.shape[dim]} is not divisible by {num_groups} groups")
            for g, part in enumerate(tensor.chunk(num_groups, dim=dim)):
                out[f"{m['layer']}.lora_{m['ab']}_groups.{g}"] = part.contiguous()
        elif m := _SAVED.match(name):
            out[f"{m['module']}.{m['param']}"] = tensor
        elif ".default." not in name and name.startswith(("llm.", "input_resampler.", "output_resampler.", "patch_pos_embed")):
            out[name] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{len(unknown)} key(s) of unknown meaning in the official checkpoint: "
                              f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}")
    report.converted = len(out)
    return out, report


def _lora_base_names(model: nn.Module) -> dict[str, str]:
    """`...q_proj.weight` (the official name of a wrapped linear's weight) -> `...q_proj.base.weight`."""
    names = {}
    for key in model.state_dict():
        if key.endswith(".base.weight") or key.endswith(".base.bias"):
            names[key.replace(".base.", ".")] = key
    return names


def load_init(model: nn.Module, path: str | Path) -> ConversionReport:
    """Initialise `model` from a checkpoint in the official layout or in this project's layout.

    Keys absent from the file keep their current values (an agent file holds no ViT and maybe no base
    weights); keys the model does not have and shape mismatches are errors naming the keys.
    """
    state = read_state_dict(path)
    if is_official_layout(state):
        state, report = convert_official(state, num_groups=_num_groups(model))
    else:  # this project's checkpoints carry a "model." prefix on the weights and other sections beside
        report = ConversionReport()
        if any(k.startswith("model.") for k in state):
            report.dropped = [k for k in state if not k.startswith("model.")]
            state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        report.converted = len(state)
    own = model.state_dict()
    base_names = _lora_base_names(model)
    state = {base_names.get(k, k): v for k, v in state.items()}
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and v.shape != own[k].shape]
    if unexpected or mismatched:
        raise CheckpointError(f"{path} does not fit the model: "
                              + (f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}; " if unexpected else "")
                              + (f"shape mismatch {mismatched[:10]}" if mismatched else "")
                              + ". Check the model preset and lora.rank / lora.num_groups.")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(dtype=own[k].dtype))
    return report


def _num_groups(model: nn.Module) -> int:
    for m in model.modules():
        if hasattr(m, "lora_A_groups"):
            return len(m.lora_A_groups)
    raise CheckpointError("the model has no MultiLoRALinear layers: wrap the LLM with LoRA before loading")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mage.model.convert",
                                description="convert an official MAGE/SEED-X agent checkpoint to the four-group layout")
    p.add_argument("--src", required=True, help="official pytorch_model.bin (or .safetensors)")
    p.add_argument("--out", required=True, help="output .safetensors (keys prefixed 'model.', loadable by --model.init_from)")
    p.add_argument("--num-groups", type=int, default=4)
    a = p.parse_args(argv)
    state, report = convert_official(read_state_dict(a.src), a.num_groups)
    save_file({f"model.{k}": v.contiguous() for k, v in state.items()}, a.out)
    print(f"{a.out}: {report.summary()}")


if __name__ == "__main__":
    main()
