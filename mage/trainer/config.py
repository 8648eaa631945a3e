"""Run configuration: one small dataclass per component, presets from files, command-line overrides.

A preset (TOML, JSON or YAML) holds sections named like the dataclasses below; the command line then
overrides single fields with ``--set optim.lr=2e-4`` or ``--optim.lr 2e-4``. Every key is checked against
the dataclass fields, so a typo is an error that lists the valid keys instead of a silently ignored
setting. ``task_overrides`` changes fields for one task only (the paper trains HQEdit with batch 6 for
10,001 steps): ``{"hqedit": {"train.batch_size": 6, "train.steps_per_task": 10001}}``.
"""
from __future__ import annotations

import json
import tomllib
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message says what to change."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny"                  # "tiny" (CPU-sized SEED-X graph) or "seed-x-13b"
    gradient_checkpointing: bool = False
    # Start from a fine-tuned agent (the paper's common VQAv2 checkpoint): a file in the official
    # MAGE/SEED-X PEFT layout or this project's layout (mage.model.convert), loaded after the LoRA wrap.
    init_from: str = ""
    # SEED-X's image decoder: a folder in SEED-X's `pretrained/` layout (stable-diffusion-xl-base-1.0/,
    # seed_detokenizer/first_stage/, seed_detokenizer/second_stage/); "" = no decoding (feature score).
    decoder_path: str = ""
    # Local SEED-X weights (all four, or none for a random-init model): the agent file (resamplers +
    # patch_pos_embed), the HF LLaMA-2-13B-chat folder, the ViT state dict and the tokenizer folder.
    agent_path: str = ""
    llm_path: str = ""
    vision_path: str = ""
    tokenizer_path: str = ""
    # The tiny model's starting point: "" = random init, "auto" = the pretrained tiny base of `base_seed`
    # (assets/ or built once into the cache; mage.model.pretrain), or a path to such a .safetensors file.
    base: str = ""
    base_seed: int = 0

    def weight_paths(self) -> dict[str, str]:
        return {"agent_path": self.agent_path, "llm_path": self.llm_path, "vision_path": self.vision_path,
                "tokenizer_path": self.tokenizer_path}


@dataclass(frozen=True)
class DataConfig:
    root: str = "data/mini"             # Continual-NExT(-mini) in the release layout
    order: str = "default"              # default | reverse | alphabetical
    tasks: tuple[str, ...] = ()         # explicit task list (overrides `order`); () = all tasks of `order`
    generate_mini: bool = True          # write Continual-NExT-mini into `root` if it is missing
    mini_seed: int = 0
    num_workers: int = 0
    # Real-release behaviour (docs/REAL_DATA.md); the defaults keep the mini benchmark as it was.
    edit_filter: bool = False           # drop HQEdit training pairs < 400 px or aspect outside [0.6, 1/0.6]
    generation_prompt: str = "Please generate the image. {caption}"  # Flickr30k test prompt (caption-only text)
    per_task_grids: bool = False        # Flickr30k and HQEdit inputs use the 1x1 grid only (SEED-X)
    polite_reply: bool = False          # image answers supervise a short polite reply before <img>
    cache_images: bool = False          # keep decoded training images in memory (mini: ~100 MB a task; not for real data)
    # Leading tasks already trained in model.init_from (the paper's common VQAv2 start): evaluated, not retrained.
    pretrained_tasks: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8                       # per group; 4 groups = one rank-32 LoRA
    num_groups: int = 4
    alpha: float = 32.0
    dropout: float = 0.05
    backend: str = "auto"               # auto | eager | triton


@dataclass(frozen=True)
class MethodConfig:
    name: str = "mage"                  # see mage.methods.METHODS
    pema_mode: str = "fixed"            # paper | taylor | fixed | fisher (docs/METHOD.md section 4); the presets' measured best, docs/RESULTS.md
    lam: float = 1e-5
    beta_min: float = 0.0
    beta_max: float = 1.0
    fixed_beta: float = 0.99
    train_non_lora: bool = True         # embeddings, lm_head, norms, resamplers, patch_pos_embed (SEED-X)
    train_embeddings: bool = True       # within those: token embeddings and lm_head (docs/TRAINING.md)
    train_input_resampler: bool = True  # within those: the input resampler (docs/TRAINING.md)
    pema_horizon: float = 0.0           # > 0: fixed/fisher beta = 1 - 1/(horizon * steps_per_task); 0: fixed_beta
    # Baselines (docs/METHOD.md section 5; docs/TRAINING.md "Baselines"): EWC, PGP.
    ewc_lambda: float = 5e4             # weight of (lambda/2) * sum F (theta - theta*)^2; docs/TRAINING.md "EWC's λ"
    ewc_samples: int = 200              # examples of the finished task for its Fisher (whole micro-batches)
    ewc_online: bool = False            # False: last task's Fisher (the references); True: sum over tasks
    pgp_samples: int = 200              # examples of the finished task whose activations grow the bases
    pgp_tokens_per_example: int = 8     # activation rows sampled per example (valid tokens) per layer
    pgp_threshold: float = 0.97         # GPM energy threshold epsilon
    pgp_max_basis: float = 0.5          # cap on a basis' size, as a fraction of the layer's input width
    reglora_lambda: float = 2500.0      # RegLoRA: weight of mean |(B A)_ij| over the stored key positions
    reglora_top_fraction: float = 0.02  # RegLoRA: share of |B A| entries kept as key positions per task
    lae_momentum: float = 0.99          # LAE: offline EMA m (the paper's 0.99; the LAE reference uses 0.9999)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.05
    warmup_steps: int = 125
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0              # max global grad norm; <= 0 disables clipping


@dataclass(frozen=True)
class TrainConfig:
    steps_per_task: int = 3001          # optimizer steps
    batch_size: int = 16                # examples per micro-batch per rank
    grad_accum: int = 2                 # micro-batches per optimizer step
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    bf16: str = "auto"                  # auto (= on CUDA) | true | false: bf16 autocast
    engine: str = "ddp"                 # ddp | deepspeed (GPU only)
    zero_stage: int = 1                 # DeepSpeed ZeRO stage (1 or 2)
    find_unused_parameters: bool = False
    # A step whose loss or gradient is not finite is skipped (docs/TRAINING.md "Non-finite steps"); the run
    # stops with an error once a task has skipped more than this many (0: stop at the first).
    max_nonfinite_steps: int = 10


@dataclass(frozen=True)
class EvalConfig:
    max_examples: int = 0               # per task and evaluation; 0 = the whole test set
    batch_size: int = 16
    max_new_tokens: int = 32
    zero_shot: bool = True              # row 0 of the matrix: every task before any training
    # Real-release evaluation (docs/REAL_DATA.md); the defaults keep the mini benchmark as it was.
    image_generation: str = "forced"    # forced (prompt ends with <img>) | free (model must emit <img>: SEED-X)
    text_scorer: str = "default"        # default (normalised exact match, IoU >= 0.5) | compat (public MAGE code)
    image_scorer: str = "feature_cosine"  # feature_cosine (tiny stand-in, not CLIP) | clip (decode + CLIP ViT-B/32)
    clip_path: str = ""                 # local transformers CLIP folder (ViT-B/32), for image_scorer = clip
    decode_steps: int = 50              # SEED-X decoder: Euler steps, guidance, output side, seed
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5   # editing (HQEdit) only
    decode_size: int = 1024
    decode_seed: int = 42
    # An image answer scoring below this (per example, same scale as the task score) is labelled a
    # hallucination in the error-type forgetting (Avg.HAL); 50 sits between the mini benchmark's
    # untrained (~0) and learned (~90) centred feature scores.
    image_label_threshold: float = 50.0


@dataclass(frozen=True)
class RunConfig:
    out_dir: str = "runs/mini"
    checkpoint_every: int = 0           # mid-task checkpoint every N optimizer steps; 0 = task ends only
    log_every: int = 10
    progress: bool = True               # progress bars on rank 0
    tensorboard: bool = True


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "lora": LoRAConfig, "method": MethodConfig,
    "optim": OptimConfig, "train": TrainConfig, "eval": EvalConfig, "run": RunConfig,
}
# Fields that may change between a run and its resumption: they do not change what is computed.
RESUME_FREE_FIELDS = frozenset({
    "data.root", "data.num_workers", "data.generate_mini", "train.device", "run.out_dir", "run.checkpoint_every",
    "run.log_every", "run.progress", "run.tensorboard", "train.max_nonfinite_steps", "eval.clip_path",
    "model.decoder_path",
})


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    task_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def flat(self) -> dict[str, Any]:
        """Every field as ``section.key -> value`` (task overrides as one JSON string)."""
        out = {f"{s}.{k}": v for s in SECTIONS for k, v in asdict(getattr(self, s)).items()}
        out["task_overrides"] = json.dumps(self.task_overrides, sort_keys=True)
        return out

    def for_task(self, task: str) -> Config:
        """This config with the task's overrides applied."""
        return apply_overrides(replace(self, task_overrides={}), self.task_overrides.get(task, {}))


# ---------------------------------------------------------------------------------------------- parsing

def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a preset or command-line value to the field's type, or explain why it cannot be."""
    origin = typing.get_origin(tp)
    if isinstance(value, str) and tp is not str:
        text = value.strip()
        if tp is bool:
            low = text.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        if origin is tuple:
            text = text.strip("[]()")
            value = [v.strip().strip("'\"") for v in text.split(",") if v.strip()]
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise ConfigError(f"{where}: cannot read {value!r} as {getattr(tp, '__name__', tp)}") from None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise ConfigError(f"{where}: expected {len(item_types)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(v, t, where) for v, t in zip(value, item_types))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _split_key(key: str) -> tuple[str, str]:
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name:
        raise ConfigError(f"unknown config key {key!r}: keys look like SECTION.FIELD with SECTION one of "
                          f"{sorted(SECTIONS)}")
    valid = [f.name for f in fields(SECTIONS[section])]
    if name not in valid:
        raise ConfigError(f"unknown config key {key!r}; valid keys in [{section}]: {', '.join(valid)}")
    return section, name


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Set ``section.field`` keys (values as text or typed), checking names and types."""
    by_section: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        if key == "task_overrides":
            if isinstance(value, str):
                value = json.loads(value)
            cfg = replace(cfg, task_overrides=_check_task_overrides(value))
            continue
        section, name = _split_key(key)
        tp = _field_types(SECTIONS[section])[name]
        by_section.setdefault(section, {})[name] = _coerce(value, tp, key)
    for section, changes in by_section.items():
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), **changes)})
    return cfg


def _check_task_overrides(value: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict):
        raise ConfigError(f"task_overrides must map task names to {{'section.field': value}}, got {value!r}")
    out = {}
    for task, changes in value.items():
        if not isinstance(changes, dict):
            raise ConfigError(f"task_overrides.{task} must be a table of 'section.field' = value")
        flat = _flatten(changes)
        for key in flat:
            _split_key(key)
        out[str(task).lower()] = flat
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and (prefix or k in SECTIONS):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def read_preset(path: str | Path) -> dict[str, Any]:
    """A preset file as nested dicts (.toml, .json, .yaml/.yml)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; presets: {', '.join(list_presets())}")
    text = path.read_text()
    if path.suffix == ".toml":
        return tomllib.loads(text)
    if path.suffix == ".json":
        return json.loads(text)
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path} is YAML but PyYAML is not installed: pip install pyyaml, "
                              "or use the .toml/.json preset") from None
        return yaml.safe_load(text) or {}
    raise ConfigError(f"config file {path}: unknown format {path.suffix!r}; use .toml, .json or .yaml")


def list_presets() -> list[str]:
    return sorted({p.stem for p in CONFIG_DIR.glob("*") if p.suffix in (".toml", ".json", ".yaml", ".yml")})


def preset_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix:
        return p
    for suffix in (".toml", ".json", ".yaml", ".yml"):
        if (CONFIG_DIR / f"{name_or_path}{suffix}").is_file():
            return CONFIG_DIR / f"{name_or_path}{suffix}"
    raise ConfigError(f"unknown preset {name_or_path!r}; presets in {CONFIG_DIR}: {', '.join(list_presets())}")


def config_from_dict(d: dict[str, Any], base: Config | None = None) -> Config:
    unknown = set(d) - set(SECTIONS) - {"task_overrides"}
    if unknown:
        raise ConfigError(f"unknown config section(s) {sorted(unknown)}; valid: {sorted(SECTIONS)} and task_overrides")
    flat = {}
    for section, values in d.items():
        if section == "task_overrides":
            flat["task_overrides"] = values
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section [{section}] must be a table, got {values!r}")
        flat.update({f"{section}.{k}": v for k, v in values.items()})
    return apply_overrides(base or Config(), flat)


def load_config(preset: str = "mini", overrides: dict[str, Any] | None = None) -> Config:
    """The preset (name in configs/ or a file path) with ``overrides`` applied, validated."""
    cfg = config_from_dict(read_preset(preset_path(preset)))
    cfg = apply_overrides(cfg, overrides or {})
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that need no other module; task and method names are checked where they are resolved."""
    checks = [
        (cfg.train.steps_per_task >= 1, "train.steps_per_task must be >= 1"),
        (cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (cfg.train.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (cfg.train.engine in ("ddp", "deepspeed"), f"train.engine must be 'ddp' or 'deepspeed', got {cfg.train.engine!r}"),
        (cfg.train.zero_stage in (1, 2), f"train.zero_stage must be 1 or 2, got {cfg.train.zero_stage}"),
        (cfg.train.bf16 in ("auto", "true", "false"), f"train.bf16 must be auto|true|false, got {cfg.train.bf16!r}"),
        (cfg.train.max_nonfinite_steps >= 0, "train.max_nonfinite_steps must be >= 0 (0 = stop at the first)"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]"),
        (cfg.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (cfg.method.beta_min <= cfg.method.beta_max, "method.beta_min must be <= method.beta_max"),
        (cfg.method.pema_horizon >= 0, "method.pema_horizon must be >= 0 (0 = use method.fixed_beta)"),
        (cfg.lora.rank >= 1 and cfg.lora.num_groups >= 1, "lora.rank and lora.num_groups must be >= 1"),
        (cfg.eval.max_examples >= 0, "eval.max_examples must be >= 0 (0 = all)"),
        (cfg.run.checkpoint_every >= 0, "run.checkpoint_every must be >= 0 (0 = only at task ends)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def parse_cli(argv: list[str]) -> tuple[str, dict[str, str]]:
    """``[--config PRESET|FILE] [--set a.b=v ...] [--a.b v | --a.b=v ...]`` -> (preset, overrides)."""
    preset, overrides = "mini", {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(_usage())
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}\n{_usage()}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"option {arg} needs a value\n{_usage()}")
            value = argv[i + 1]
            i += 1
        i += 1
        if key in ("config", "preset"):
            preset = value
        elif key == "set":
            k, eq2, v = value.partition("=")
            if not eq2:
                raise ConfigError(f"--set expects KEY=VALUE, got {value!r}")
            overrides[k.strip()] = v
        else:
            _split_key(key)
            overrides[key] = value
    return preset, overrides


def _usage() -> str:
    keys = "\n".join(f"  [{s}] " + ", ".join(f.name for f in fields(c)) for s, c in SECTIONS.items())
    return ("usage: [torchrun ...] train.py [--config PRESET|FILE] [--set SECTION.FIELD=VALUE ...] "
            "[--SECTION.FIELD VALUE ...]\n"
            f"presets: {', '.join(list_presets())}\nkeys:\n{keys}")


def save_config(cfg: Config, path: str | Path) -> None:
    """The resolved config as JSON (loadable again with --config PATH)."""
    Path(path).write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")


def config_differences(saved: dict[str, Any], current: Config) -> list[str]:
    """Fields whose values differ between a saved flat config and ``current``, outside RESUME_FREE_FIELDS and
    the other methods' own knobs (``method.ewc_lambda`` does not change a MAGE run)."""
    from mage.methods import unread_config_fields  # here: mage.methods is heavy and needs no config

    now = current.flat()
    defaults = Config().flat()
    unread = unread_config_fields(current.method.name) if saved.get("method.name") == current.method.name else frozenset()
    diffs = []
    for key in sorted(set(saved) | set(now)):
        if key in RESUME_FREE_FIELDS or key in unread:
            continue
        if key not in saved and now.get(key) == defaults.get(key):
            continue  # a field added after the checkpoint was written, at its default: same computation
        a, b = saved.get(key, "<absent>"), now.get(key, "<absent>")
        if isinstance(a, list):
            a = tuple(a)
        if a != b:
            diffs.append(f"{key}: {a!r} in the checkpoint, {b!r} now")
    return diffs


__all__ = [
    "Config", "ConfigError", "ModelConfig", "DataConfig", "LoRAConfig", "MethodConfig", "OptimConfig",
    "TrainConfig", "EvalConfig", "RunConfig", "SECTIONS", "load_config", "apply_overrides", "parse_cli",
    "save_config", "config_differences", "list_presets",
]
