"""Continual-learning methods, by name: ``build_method(name, cfg, model)``."""
from __future__ import annotations

from torch import nn

from mage.methods.base import ContinualMethod
from mage.methods.bounds import Joint, ZeroShot
from mage.methods.cia import CIA
from mage.methods.ewc import EWC
from mage.methods.finetune import EqualWeight, GroupMasked, SequentialLoRA
from mage.methods.lae import LAE
from mage.methods.mage import MAGE
from mage.methods.moelora import MoELoRA
from mage.methods.pgp import PGP
from mage.methods.reglora import RegLoRA

METHODS: dict[str, type[ContinualMethod]] = {
    cls.name: cls for cls in (MAGE, SequentialLoRA, EqualWeight, GroupMasked, EWC, CIA, PGP, MoELoRA, RegLoRA, LAE,
                Joint, ZeroShot)}


def method_class(name: str) -> type[ContinualMethod]:
    """The class of method ``name``; an unknown name is an error that lists the valid ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def unread_config_fields(name: str) -> frozenset[str]:
    """The ``method.*`` config keys that method ``name`` never reads: the other methods' own knobs."""
    others = {f for cls in METHODS.values() for f in cls.config_fields} - set(method_class(name).config_fields)
    return frozenset(f"method.{f}" for f in others)


def build_method(name: str, cfg, model: nn.Module) -> ContinualMethod:
    """The method ``name`` on ``model`` (whose LoRA layers are already wrapped), with its MethodConfig."""
    return method_class(name)(cfg, model)


__all__ = ["METHODS", "method_class", "build_method", "unread_config_fields", "ContinualMethod", "MAGE", "SequentialLoRA", "EqualWeight", "GroupMasked", "EWC",
           "CIA", "PGP", "MoELoRA", "RegLoRA", "LAE", "Joint", "ZeroShot"]
