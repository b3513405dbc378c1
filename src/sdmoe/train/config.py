"""One run's whole configuration: presets, config files and `--set key=value`.

A run is a tree of dataclasses (model, data, optim, loop, method). Presets are
plain instances; a JSON config file or `--set section.key=value` overrides any
leaf. Unknown keys and values of the wrong type are user errors.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdmoe.data import DataConfig
from sdmoe.errors import UserError
from sdmoe.method import SDMoEConfig
from sdmoe.models import ModelConfig
from sdmoe.models.build import validate as validate_model


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    # DeepSeek-style aux-loss-free balancing: bias += rate * sign(mean load - load).
    bias_update_rate: float = 1e-3


@dataclass
class LoopConfig:
    steps: int = 300
    eval_every: int = 50
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    monitor_every: int = 50  # spectral monitor (parameter / gradient overlap); 0 = off
    monitor_rank: int = 8
    seed: int = 0
    threads: int = 0  # torch threads; 0 = leave PyTorch's default
    bf16: bool = False  # bf16 autocast for forward/backward
    deterministic: bool = True
    nan_policy: str = "stop"  # "stop" | "skip": what a NaN/Inf loss or gradient does
    # under torchrun: "ddp" (replicate the model) or "fsdp" (FSDP2: shard every decoder layer;
    # SD-MoE then splits at step 0, before sharding). Ignored in a single process.
    parallel: str = "ddp"


@dataclass
class RunConfig:
    name: str = "run"
    method: str = "baseline"  # "baseline" | "sd-moe"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    sdmoe: SDMoEConfig = field(default_factory=SDMoEConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


METHODS = ("baseline", "sd-moe")


def _preset_tiny() -> RunConfig:
    return RunConfig(
        name="tiny",
        model=ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_experts=4, top_k=2, expert_ffn=32),
        data=DataConfig(vocab_size=512, seq_len=32, batch_size=4, eval_batches=2),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        loop=LoopConfig(steps=20, eval_every=10, log_every=5, checkpoint_every=10, monitor_every=10, monitor_rank=4),
        sdmoe=SDMoEConfig(split_step=5, basis_batches=2),
    )


def _preset_demo() -> RunConfig:
    # A few minutes on 2 cores: the spec's lab model at half width, shorter sequences.
    return RunConfig(
        name="demo",
        model=ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_experts=8, top_k=2, expert_ffn=64),
        data=DataConfig(vocab_size=2048, seq_len=64, batch_size=16, eval_batches=4),
        # The baseline's best rate of the grid 1.5e-3 ... 2.4e-2 (docs/results.md).
        optim=OptimConfig(lr=3e-3, warmup_steps=20),
        # Overlap of top-4 subspaces: k/d = 4/64, the spec's 8/128.
        loop=LoopConfig(steps=400, eval_every=25, log_every=10, checkpoint_every=100, monitor_every=50,
                        monitor_rank=4),
        sdmoe=SDMoEConfig(split_step=50),
    )


def _preset_small() -> RunConfig:
    # The spec's "first measurement" setting: d=128, 4 layers, 8 experts top-2.
    return RunConfig(
        name="small",
        model=ModelConfig(hidden_size=128, num_layers=4, num_heads=4, num_experts=8, top_k=2, expert_ffn=128),
        data=DataConfig(vocab_size=4096, seq_len=128, batch_size=16, eval_batches=8),
        optim=OptimConfig(lr=1.2e-2, warmup_steps=30),
        loop=LoopConfig(steps=600, eval_every=50, log_every=10, checkpoint_every=100, monitor_every=50),
        sdmoe=SDMoEConfig(split_step=100),
    )


PRESETS = {"tiny": _preset_tiny, "demo": _preset_demo, "small": _preset_small}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def _coerce(value: Any, current: Any, key: str) -> Any:
    """Convert a config-file or command-line value to the type of the default."""
    if isinstance(value, str) and not isinstance(current, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            # Let bare words through for typed errors below (e.g. lr=fast).
            pass
    if isinstance(current, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise UserError(f"{key} takes true or false, got {value!r}")
        return value
    if isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, list) and key.endswith("rank"):
            return [int(v) for v in value]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"{key} takes an integer, got {value!r}")
        return value
    if isinstance(current, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise UserError(f"{key} takes a number, got {value!r}")
        return float(value)
    if isinstance(current, (tuple, list)):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} takes a list (comma-separated or JSON), got {value!r}")
        return type(current)(value)
    if isinstance(current, str) and not isinstance(value, str):
        raise UserError(f"{key} takes a string, got {value!r}")
    return value


def set_value(cfg: RunConfig, key: str, value: Any) -> None:
    """Set a dotted key (`model.hidden_size`) on the config tree."""
    node: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            where = ".".join(parts[:i]) or "the top level"
            raise UserError(f"unknown config key {key!r}: {where} has {', '.join(names)}")
        if i == len(parts) - 1:
            current = getattr(node, part)
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    raise UserError(f"{key} is a section; set its keys, e.g. {key}.{names[0]}=...")
                for k, v in value.items():
                    set_value(cfg, f"{key}.{k}", v)
            else:
                setattr(node, part, _coerce(value, current, key))
        else:
            node = getattr(node, part)
            if not dataclasses.is_dataclass(node):
                raise UserError(f"unknown config key {key!r}: {'.'.join(parts[: i + 1])} is not a section")


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set takes key=value, got {item!r} (e.g. --set optim.lr=0.01)")
        key, value = item.split("=", 1)
        set_value(cfg, key.strip(), value.strip())
    return cfg


def load_config_file(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    """A JSON file of nested sections; `"preset": "demo"` at the top picks the base."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist; pass a JSON file (see `sdmoe train --help`)")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {p} is not valid JSON ({e}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file {p} must hold a JSON object of sections")
    cfg = preset(raw.pop("preset")) if "preset" in raw else (base or RunConfig())
    for key, value in raw.items():
        set_value(cfg, key, value)
    return cfg


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Rebuild a config saved with `to_dict` (checkpoints, compare grids)."""
    cfg = RunConfig()
    for key, value in raw.items():
        set_value(cfg, key, value)
    return cfg


def validate(cfg: RunConfig) -> None:
    if cfg.method not in METHODS:
        raise UserError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    if cfg.loop.steps <= 0:
        raise UserError(f"loop.steps must be positive, got {cfg.loop.steps}")
    if cfg.optim.lr <= 0:
        raise UserError(f"optim.lr must be positive, got {cfg.optim.lr}")
    if cfg.loop.nan_policy not in ("stop", "skip"):
        raise UserError(f"loop.nan_policy must be stop or skip, got {cfg.loop.nan_policy!r}")
    if cfg.loop.parallel not in ("ddp", "fsdp"):
        raise UserError(f"loop.parallel must be ddp or fsdp, got {cfg.loop.parallel!r}")
    if cfg.loop.parallel == "fsdp" and cfg.method == "sd-moe":
        if cfg.sdmoe.split_step != 0:  # FSDP2 shards the split model; a later split would replace sharded parameters
            raise UserError(f"loop.parallel=fsdp needs the SD-MoE split before sharding: set sdmoe.split_step=0 "
                            f"(got {cfg.sdmoe.split_step}), or use loop.parallel=ddp")
        if cfg.sdmoe.reestimate_every:
            raise UserError("loop.parallel=fsdp cannot re-estimate U during training: set sdmoe.reestimate_every=0, "
                            "or use loop.parallel=ddp")
    for name in ("eval_every", "log_every", "checkpoint_every", "keep_checkpoints"):
        if getattr(cfg.loop, name) <= 0:
            raise UserError(f"loop.{name} must be positive, got {getattr(cfg.loop, name)}")
    # Model shape errors surface before any data is read or directory written.
    validate_model(cfg.model, cfg.data.vocab_size)
    if cfg.method == "sd-moe":
        # So do SD-MoE errors (unknown basis source, rank out of range), not after the run dir exists.
        cfg.sdmoe.validate()
        cfg.sdmoe.resolve_ranks(cfg.model.hidden_size, cfg.model.num_layers)
        if cfg.sdmoe.split_step >= cfg.loop.steps:
            raise UserError(
                f"sdmoe.split_step={cfg.sdmoe.split_step} is not before loop.steps={cfg.loop.steps}: the run would end "
                "before SD-MoE splits the experts; lower sdmoe.split_step or raise --steps"
            )
