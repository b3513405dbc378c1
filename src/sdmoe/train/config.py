"""One run's whole configuration: presets, config files and `--set key=value`.

A run is a tree of dataclasses (model, data, optim, loop, sdmoe). Presets are
plain instances; a JSON config file or `--set section.key=value` overrides any
leaf. Every field declares its type, its range and whether a resume may change
it next to its default (`sdmoe.config_fields`): values are converted and checked
against that one declaration when they are set, and `validate` checks the whole
tree (however it was built) plus the rules between fields, before anything is
written. Imports no torch: `sdmoe train --help` and a bad value cost no torch import.
"""

from __future__ import annotations

import dataclasses
import json
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from sdmoe.config_fields import MAX_SEED, assign, check_tree, parse_value, setting
from sdmoe.data.config import DataConfig
from sdmoe.device import check_device_name
from sdmoe.errors import UserError
from sdmoe.method.config import SDMoEConfig, upgrade_saved
from sdmoe.models.config import ModelConfig
from sdmoe.models.config import validate as validate_model

Method = Literal["baseline", "sd-moe"]
NanPolicy = Literal["stop", "skip"]
Parallel = Literal["auto", "ddp", "fsdp"]
Precision = Literal["auto", "fp32", "bf16"]
PresetName = Literal["tiny", "demo", "small", "gpu"]
METHODS = get_args(Method)
MAX_THREADS = 1024
# A config file is a few hundred bytes; reading is bounded so a wrong path (a huge file) fails fast.
MAX_CONFIG_BYTES = 1 << 20


@dataclass
class OptimConfig:
    lr: float = setting(3e-3, gt=0)
    weight_decay: float = setting(0.1, ge=0)
    betas: tuple[float, float] = setting((0.9, 0.95), ge=0, lt=1)
    eps: float = setting(1e-8, gt=0)
    # max gradient norm; > 0 (torch's clip_grad_norm_ scales by max_norm / norm: 0 would zero
    # every gradient, a negative value reverse it). No clipping: a large value such as 1e9.
    grad_clip: float = setting(1.0, gt=0)
    warmup_steps: int = setting(20, ge=0)
    min_lr_ratio: float = setting(0.1, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    # DeepSeek-style aux-loss-free balancing: bias += rate * sign(mean load - load).
    bias_update_rate: float = setting(1e-3, ge=0, note="0 = off")


# `resume="any"`: the setting changes what is logged, evaluated or kept, never the numbers of
# training (evaluation and the monitor run under no_grad, count no router load, draw no
# random numbers), so a resume may change it. loop.steps may grow: see check_out_dir.
@dataclass
class LoopConfig:
    steps: int = setting(300, ge=1, resume="grow")
    eval_every: int = setting(50, ge=1, resume="any")
    log_every: int = setting(10, ge=1, resume="any")
    checkpoint_every: int = setting(100, ge=1, resume="any")
    keep_checkpoints: int = setting(2, ge=1, resume="any")
    # spectral monitor (parameter / gradient overlap)
    monitor_every: int = setting(50, ge=0, note="0 = off", resume="any")
    monitor_rank: int = setting(8, ge=1, resume="any")
    seed: int = setting(0, ge=0, le=MAX_SEED)
    # torch threads; a resume may change it (float sums may then differ in the last bits)
    threads: int = setting(0, ge=0, le=MAX_THREADS, note="0 = PyTorch's default", resume="any")
    # Where the run computes: auto (CUDA when torch sees a GPU, else the CPU) | cpu | cuda | cuda:N.
    # "auto": bf16 autocast on CUDA, float32 on the CPU (weights, gradients, optimizer state and the
    # SD-MoE split stay float32 either way). A resume may move a run between devices (a checkpoint
    # written on a GPU resumes on a CPU and back); the numbers then differ by rounding, as with threads.
    device: str = setting("auto", resume="any")
    precision: Precision = setting("auto", resume="any")
    deterministic: bool = True
    # what a NaN/Inf loss or gradient does; a resume may change it (it acts only at such a step)
    nan_policy: NanPolicy = setting("stop", resume="any")
    # "auto": DDP under torchrun, one process otherwise; "ddp" (replicate the model) and "fsdp" (FSDP2: shard
    # every decoder layer; SD-MoE then splits at step 0) promise several processes and need a torchrun launch.
    # A resume may change it (as threads: the numbers differ by reduction order); a checkpoint's own format
    # (FSDP2's optimizer state by name) is checked where it loads. Before 0.3 the default "ddp" meant "auto".
    parallel: Parallel = setting("auto", resume="any")
    # under loop.parallel=fsdp, a new model (no --init) built on the meta device, each rank drawing only its
    # shards (sdmoe.train.fsdp.build_sharded): no rank holds it whole. The same seed gives the same model on
    # any number of ranks, but not build_model's (DDP's, one process's) draws. With --init it is always so.
    meta_init: bool = setting(False, resume="any")
    # gradient accumulation: each step's batch (this process's rows of it) in this many micro-batches, one
    # forward and backward each, the gradients summed before the optimizer steps (their mean loss)
    micro_batches: int = setting(1, ge=1)


Balance = Literal["micro_batch", "global_batch"]


@dataclass
class AuxConfig:
    """The other specialisation remedies, as loss terms beside the language-model loss (`sdmoe.remedies`)."""

    # Where the balance loss counts the experts' shares: each micro-batch's own (the host model's Switch
    # loss), or the global batch's (every micro-batch of the step and every data-parallel rank; Qwen's
    # global-batch balancing). The same with one micro-batch on one process: see loop.micro_batches.
    balance: Balance = "micro_batch"
    # Guo et al.'s terms: each one's target magnitude; its weight is the power of ten that brings the first
    # step's value nearest to it (the authors' rule). 0 = off; the authors' targets are 1e-4 and 1e-2.
    orthogonality: float = setting(0.0, ge=0, note="0 = off; the authors' target 1e-4")
    variance: float = setting(0.0, ge=0, note="0 = off; the authors' target 1e-2")


@dataclass
class RunConfig:
    name: str = setting("run", resume="any")  # the progress bar's label and the default --out
    method: Method = "baseline"
    # a local transformers MoE checkpoint to start from ("" = a new model built from `model`, which then
    # describes the checkpoint: `sdmoe.models.pretrained.model_config_of`); its own tokenizer tokenises the text
    init: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    sdmoe: SDMoEConfig = field(default_factory=SDMoEConfig)
    aux: AuxConfig = field(default_factory=AuxConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def _preset_gpu() -> RunConfig:
    # One large GPU for minutes, not hours: d=1024, 12 layers, 32 fine-grained experts top-4 plus a
    # gated shared expert (qwen2_moe), 0.71B parameters of which 0.18B are active per token;
    # sequences of 1024. A step sees 16 x 1024 = 16,384 tokens, 600 steps 9.8M tokens: about 10
    # passes over the bundled corpora (1.0M training tokens at this vocabulary). For fewer passes,
    # a larger corpus through --text (docs/performance.md, "The gpu preset").
    return RunConfig(
        name="gpu",
        model=ModelConfig(style="qwen2_moe", hidden_size=1024, num_layers=12, num_heads=16, num_experts=32, top_k=4,
                          expert_ffn=512, shared_expert_ffn=1024, max_seq_len=1024),
        data=DataConfig(vocab_size=8192, seq_len=1024, batch_size=16, eval_batches=4),
        optim=OptimConfig(lr=1e-3, warmup_steps=50),
        # deterministic off: CUDA's deterministic scatter/index_add kernels cost more than they buy here
        loop=LoopConfig(steps=600, eval_every=100, log_every=10, checkpoint_every=200, monitor_every=200,
                        deterministic=False),
        sdmoe=SDMoEConfig(split_step=100),
    )


PRESETS = {"tiny": _preset_tiny, "demo": _preset_demo, "small": _preset_small, "gpu": _preset_gpu}  # PresetName


def preset(name: str) -> RunConfig:
    if not isinstance(name, str) or name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def set_value(cfg: RunConfig, key: str, value: Any) -> None:
    """Set a dotted key (`model.hidden_size`) on the config tree, converted to its declared
    type and checked against its declared range; a dict for a section sets its keys."""
    assign(cfg, key, value)


def parse_setting(key: str, value: Any) -> Any:
    """The value `set_value` would store at `key`, checked the same way, without a config."""
    return parse_value(RunConfig, key, value)


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set takes key=value, got {item!r} (e.g. --set optim.lr=0.01)")
        key, value = item.split("=", 1)
        set_value(cfg, key.strip(), value.strip())
    return cfg


def _read_config_text(p: Path) -> str:
    try:
        st = p.stat()
    except FileNotFoundError:
        raise UserError(f"config file {p} does not exist; pass a JSON file (see `sdmoe train --help`)") from None
    except OSError as e:
        raise UserError(f"cannot read config file {p} ({e.strerror}); pass a readable JSON file") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"config file {p} is a directory; pass a JSON file inside it")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
        raise UserError(f"config file {p} is not a regular file; pass a JSON file")
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise UserError(f"cannot read config file {p} ({e.strerror}); pass a readable JSON file") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise UserError(f"config file {p} is larger than {MAX_CONFIG_BYTES >> 20} MiB, too large for a config; "
                        "pass the small JSON file of sections")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"config file {p} is not valid JSON ({e}); save it as UTF-8 text") from None


def load_config_file(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    """A JSON file of nested sections; `"preset": "demo"` at the top picks the base."""
    p = Path(path)
    text = _read_config_text(p)
    try:
        raw = json.loads(text)
    except RecursionError:
        raise UserError(f"config file {p} nests too deeply to be a config; it holds sections of values") from None
    except ValueError as e:  # JSONDecodeError, or an integer with more digits than Python converts
        raise UserError(f"config file {p} is not valid JSON ({e}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file {p} must hold a JSON object of sections, got a {type(raw).__name__}")
    if "preset" in raw:
        name = raw.pop("preset")
        if not isinstance(name, str) or name not in PRESETS:
            raise UserError(f"config file {p}: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        cfg = preset(name)
    else:
        cfg = base or RunConfig()
    for key, value in raw.items():
        set_value(cfg, key, value)
    return cfg


def config_file_sets(path: str | Path, key: str) -> bool:
    """Whether the config file (read by `load_config_file` already) sets the dotted `key` itself."""
    section, _, name = key.partition(".")
    raw = json.loads(_read_config_text(Path(path)))
    return isinstance(raw.get(section), dict) and name in raw[section]


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Rebuild a config saved with `to_dict` (checkpoints, compare grids)."""
    cfg = RunConfig()
    for key, value in upgraded(raw).items():
        set_value(cfg, key, value)
    return cfg


def upgraded(raw: dict[str, Any]) -> dict[str, Any]:
    """A config saved by an earlier version (run.json, a compare grid) in today's keys and values."""
    out = dict(raw)
    if isinstance(out.get("sdmoe"), dict):
        out["sdmoe"] = upgrade_saved(out["sdmoe"])
    if isinstance(out.get("loop"), dict):
        out["loop"] = _upgrade_loop(out["loop"])
    return out


def _upgrade_loop(section: dict) -> dict:
    """A saved `loop` section in today's keys: before 0.2, `bf16` (true | false) chose the precision."""
    if "bf16" not in section:
        return section
    out = {k: v for k, v in section.items() if k != "bf16"}
    out.setdefault("precision", "bf16" if section["bf16"] is True else "fp32")
    return out


def refuse_model_settings(overrides: list[str] = (), style: str | None = None) -> None:
    """A run that starts from a checkpoint takes its model from it: a model setting could not apply."""
    changed = [o.split("=", 1)[0].strip() for o in overrides if o.strip().startswith("model.")]
    if changed or style:
        what = f"--set {changed[0]}" if changed else f"--style {style}"
        raise UserError(f"{what} with --init: the model is the checkpoint's (its config.json); drop it, or "
                        "train a new model without --init")


def start_from_checkpoint(cfg: RunConfig, path: str, overrides: list[str] = (), style: str | None = None,
                          keep_split_step: bool = False) -> None:
    """`train --init PATH`: the run starts from the checkpoint, whose config.json is its model section
    (read now, without the weights); a setting of the model section is refused, as it could not apply.

    SD-MoE splits at the first step (`sdmoe.split_step=0`): the from-scratch warm-up waits for common
    structure that a trained model has already, and the split of a trained model changes no logit. A
    `--set sdmoe.split_step` applied after this wins; `keep_split_step` keeps one a config file set."""
    from sdmoe.models.checks import check_checkpoint, check_tokenizer_fits
    from sdmoe.models.pretrained import load_tokenizer, model_config_of

    refuse_model_settings(overrides, style)
    # every check that needs no weights, before a command writes anything (a compare, its first run)
    checked = check_checkpoint(path)
    cfg.model = model_config_of(path)  # a dense model, a family sdmoe does not train: named before the tokenizer
    check_tokenizer_fits(load_tokenizer(path), checked.embedding_rows, path)
    cfg.init = str(Path(path).expanduser().resolve())
    if not keep_split_step:
        cfg.sdmoe.split_step = 0


# What torchrun sets in every worker: all of them, or none (one process).
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_world() -> int:
    """The number of processes this one was launched among (1 outside torchrun); a one-line error for a
    torchrun environment that is only partly set or holds values torchrun never writes."""
    import os

    env = {k: os.environ.get(k) for k in TORCHRUN_ENV}
    if env["WORLD_SIZE"] in (None, "1") and env["RANK"] in (None, "0"):
        return 1  # one process, launched by hand or by `torchrun --nproc-per-node 1`
    missing = [k for k, v in env.items() if v is None]
    if missing:
        given = [k for k, v in env.items() if v is not None]
        raise UserError(f"a partial torchrun environment: {', '.join(given)} set but {', '.join(missing)} not; launch "
                        "with `torchrun --standalone --nproc-per-node N -m sdmoe train ...`, or unset "
                        f"{', '.join(given)} for one process")
    try:
        world, rank, local = int(env["WORLD_SIZE"]), int(env["RANK"]), int(env["LOCAL_RANK"])
        port = int(env["MASTER_PORT"])
    except ValueError:
        raise UserError("the torchrun environment holds a value that is not an integer (RANK, LOCAL_RANK, "
                        f"WORLD_SIZE, MASTER_PORT: {env['RANK']}, {env['LOCAL_RANK']}, {env['WORLD_SIZE']}, "
                        f"{env['MASTER_PORT']}); launch with torchrun, which sets them") from None
    if not (world >= 1 and 0 <= rank < world and 0 <= local <= rank and 0 < port < 65536):
        raise UserError(f"the torchrun environment is inconsistent (RANK={rank}, LOCAL_RANK={local}, WORLD_SIZE="
                        f"{world}, MASTER_PORT={port}); launch with torchrun, which sets them")
    return world


def check_launch(parallel: str) -> None:
    """`loop.parallel=ddp|fsdp` promise several processes: refused in one, rather than silently training a
    one-process run that run.json would record as distributed."""
    if parallel != "auto" and launched_world() == 1:
        raise UserError(f"loop.parallel={parallel} needs several processes, but this is one (not launched by "
                        f"torchrun); run `torchrun --standalone --nproc-per-node 2 -m sdmoe train ...`, or drop "
                        "loop.parallel for one process")


def validate(cfg: RunConfig) -> None:
    """Every field against its declaration, then the rules between fields; raises a one-line UserError."""
    check_tree(cfg)  # types, ranges, choices, finite numbers: also of values set in code or by a flag
    try:
        check_device_name(cfg.loop.device)
    except UserError as e:
        raise UserError(f"loop.device: {e}") from None
    if cfg.loop.meta_init and cfg.loop.parallel != "fsdp":
        raise UserError("loop.meta_init=true builds FSDP2 shards: set loop.parallel=fsdp (under torchrun), or "
                        "drop loop.meta_init")
    if cfg.loop.parallel == "fsdp" and cfg.method == "sd-moe":
        if cfg.sdmoe.split_step != 0:  # FSDP2 shards the split model; a later split would replace sharded parameters
            raise UserError(f"loop.parallel=fsdp needs the SD-MoE split before sharding: set sdmoe.split_step=0 "
                            f"(got {cfg.sdmoe.split_step}), or use loop.parallel=ddp")
        if cfg.sdmoe.reestimate_every:
            raise UserError("loop.parallel=fsdp cannot re-estimate U during training: set sdmoe.reestimate_every=0, "
                            "or use loop.parallel=ddp")
    # Model shape errors surface before any data is read or directory written (a checkpoint's model is
    # what it is: its shapes are checked against its weights when it loads).
    if not cfg.init:
        validate_model(cfg.model, cfg.data.vocab_size)
    if cfg.method == "sd-moe":
        # So do SD-MoE errors (rank out of range for d), not after the run dir exists.
        cfg.sdmoe.validate()
        cfg.sdmoe.resolve_ranks(cfg.model.hidden_size, cfg.model.num_layers)
        if cfg.sdmoe.split_step >= cfg.loop.steps:
            raise UserError(
                f"sdmoe.split_step={cfg.sdmoe.split_step} is not before loop.steps={cfg.loop.steps}: the run would end "
                "before SD-MoE splits the experts; lower sdmoe.split_step or raise --steps"
            )
    if cfg.data.batch_size % cfg.loop.micro_batches:
        raise UserError(f"loop.micro_batches={cfg.loop.micro_batches} does not divide data.batch_size="
                        f"{cfg.data.batch_size}; choose a divisor of it")
    if cfg.aux.balance == "global_batch" and cfg.model.style == "deepseek_v3" and not cfg.init:
        raise UserError("aux.balance=global_batch changes where the Switch balance loss counts, and deepseek_v3 "
                        "balances with its router bias instead (no such loss); use another model.style, or "
                        "aux.balance=micro_batch")
    check_launch(cfg.loop.parallel)  # last: a rule between fields names the field to fix first
