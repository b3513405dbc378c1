"""`sdmoe` command line: argument parsing and one-line errors, no logic.

Every subcommand hands its arguments to a library function. A `UserError`
becomes `sdmoe: error: <message>` and exit code 2, like argparse's own errors.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import warnings

from sdmoe import __version__
from sdmoe.errors import UserError

EPILOG = """\
examples:
  sdmoe train --preset demo                       train the demo model on the bundled corpora
  sdmoe train --preset demo --method sd-moe       the same with SD-MoE (split after a warm-up)
  sdmoe train --preset small --set optim.lr=0.006 --set model.style=qwen2_moe
  sdmoe generate runs/demo-baseline/model --prompt "Once upon a time"
  sdmoe analyze runs/demo-baseline/model --rank 8 --out runs/demo-analysis
  sdmoe compare --preset demo --out runs/compare-demo   the first look (make demo, about 5 min): one report
  sdmoe report runs/compare-demo                        rebuild that report from the run files
  sdmoe study --factor size --out runs/study            when does SD-MoE help? one factor at a time
  sdmoe upcycle-compare --out runs/compare-upcycle      upcycled experts, with and without SD-MoE
  sdmoe upcycle my-qwen3/ --experts 8 --top-k 2 --out my-qwen3-moe   a dense checkpoint made an MoE
"""


def _add_text(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", nargs="+", metavar="PATH", default=[],
                   help="your own UTF-8 text: files or directories (a directory's name is the domain "
                        "label of its files); default: the bundled corpora (drama, encyclopedia, fairy tales)")


def _add_device(p: argparse.ArgumentParser, what: str, default: str | None = "auto") -> None:
    p.add_argument("--device", default=default,
                   help=f"where {what} runs: auto (CUDA when torch sees a GPU, else the CPU) | cpu | cuda | cuda:N"
                        + ("" if default else " (default: the config's loop.device, auto)"))


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where it says something (not None, [], False)."""

    def _get_help_string(self, action):
        if action.default in (None, [], False) or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (`sdmoe: error: ...`) and exit 2, like a UserError."""

    def error(self, message: str):
        hint = f"; see `{self.prog} --help`"
        self.exit(2, f"sdmoe: error: {' '.join(message.split())}{hint}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sdmoe",
        description="Spectral-Decoupled Mixture-of-Experts: diagnose why MoE experts fail to specialise, "
                    "train with SD-MoE, and export ordinary transformers checkpoints.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sdmoe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in (_train_parser, _generate_parser, _analyze_parser, _compare_parser, _study_parser,
                _upcycle_compare_parser, _finetune_compare_parser, _methods_compare_parser, _evaluate_parser,
                _upcycle_parser, _report_parser):
        add(sub)
    return parser


def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="train a MoE language model (baseline or SD-MoE)",
                       description="Train a transformers MoE language model on real text. Checkpoints are atomic; "
                                   "--resume continues exactly where a run stopped. The final model is a "
                                   "save_pretrained directory (OUT/model) that plain transformers loads. "
                                   "Several processes: `torchrun --standalone --nproc-per-node N -m sdmoe train ...` "
                                   "(DDP; add --set loop.parallel=fsdp --set sdmoe.split_step=0 for FSDP2, which builds an --init "
                                   "model on the meta device, each rank reading only its shards; --set loop.meta_init=true "
                                   "does that for a new model too).",
                       formatter_class=_Help)
    t.add_argument("--preset", default="demo", help="tiny (seconds, tests) | demo (minutes) | small (the spec's lab model, ~1 h on 2 cores)")
    t.add_argument("--config", metavar="FILE", help="JSON file of sections (model, data, optim, loop, sdmoe) overriding the preset; "
                                                    "\"preset\": NAME inside picks the base")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one value, e.g. --set optim.lr=0.006 --set model.style=deepseek_v3 --set sdmoe.rank=16")
    t.add_argument("--method", choices=["baseline", "sd-moe"], help="baseline MoE or SD-MoE (default: the config's, baseline)")
    t.add_argument("--style", help="model architecture: qwen2_moe, deepseek_v3, qwen3_moe, deepseek_v2, olmoe, mixtral")
    t.add_argument("--init", metavar="PATH",
                   help="start from a local transformers MoE checkpoint (safetensors, its own tokenizer.json; no code "
                        "is run): continue training or fine-tune it; the model section comes from its config.json, "
                        "and SD-MoE splits at the first step (a trained model needs no warm-up; --set "
                        "sdmoe.split_step=N to wait). A dense checkpoint: `sdmoe upcycle` it first")
    t.add_argument("--steps", type=int, help="training steps (overrides loop.steps)")
    t.add_argument("--seed", type=int, help="seed for weights and data order (overrides loop.seed)")
    _add_text(t)
    _add_device(t, "training", default=None)
    t.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="forward/backward precision (default: auto = bf16 autocast on CUDA, float32 on the CPU; "
                        "weights, optimizer state and the SD-MoE split stay float32)")
    t.add_argument("--out", help="run directory (default: runs/<preset>-<method>-seed<seed>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")


def _generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="sample text from a saved model directory",
                       formatter_class=_Help)
    g.add_argument("model_dir", metavar="DIR", help="a save_pretrained directory, e.g. runs/demo-baseline-seed0/model")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=60,
                   help="tokens to sample, 1..4096 and within the model's context (max_position_embeddings)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; >= 0")
    g.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0 = no top-k cut")
    g.add_argument("--seed", type=int, default=0)


def _analyze_parser(sub) -> None:
    a = sub.add_parser("analyze", help="measure the paper's three spectral findings on a MoE checkpoint",
                       description="Parameter overlap, gradient alignment and gating bias of every MoE layer, plus "
                                   "expert load and specialisation. PATH is any local transformers MoE checkpoint "
                                   "directory (fused v5 experts or per-expert module lists); weights load layer by layer.",
                       formatter_class=_Help)
    a.add_argument("path", metavar="PATH", help="checkpoint directory (config.json + safetensors + tokenizer)")
    _add_text(a)
    a.add_argument("--layers", help="comma-separated MoE layer indices (default: all)")
    a.add_argument("--rank", type=int, default=8, help="subspace rank k")
    a.add_argument("--batches", type=int, default=4, help="batches of text for gradients and routing")
    a.add_argument("--seq-len", type=int, default=128)
    a.add_argument("--batch-size", type=int, default=8)
    _add_device(a, "the model's forward and backward")
    a.add_argument("--out", help="output directory (default: PATH/../analysis)")
    a.add_argument("--force", action="store_true", help="overwrite a previous analysis in --out")
    a.add_argument("--weights-only", action="store_true",
                   help="parameter findings alone, read layer by layer without loading the model "
                        "(for checkpoints larger than memory)")


def _experiment_parser(sub, command: str, help: str, description: str) -> argparse.ArgumentParser:
    """An experiment's subcommand: its presets (from the registry, each with what it runs and how long)."""
    from sdmoe.experiments.presets import default_preset, preset_help

    p = sub.add_parser(command, help=help, description=description, formatter_class=_Help)
    p.add_argument("--preset", default=default_preset(command), help=preset_help(command).replace("%", "%%"))
    return p


def _experiment_tail(p: argparse.ArgumentParser, out: str) -> None:
    """The flags every experiment ends with: --set on every run, the device, --out, --quiet."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="train-config override applied to every run, e.g. --set loop.threads=2")
    _add_device(p, "every run")
    p.add_argument("--out", help=f"{out}; the same command resumes it (finished runs skipped, interrupted ones "
                                 "resumed), other settings are refused")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _compare_parser(sub) -> None:
    from sdmoe.experiments.grid import VARIANT_NAMES

    c = _experiment_parser(
        sub, "compare", "baseline against SD-MoE: matched seeds, sweeps, one report with verdicts",
        "Train matched pairs (same initial weights, data order and seed; the only difference is SD-MoE) plus the "
        "control and the sweeps of the preset, then write OUT/report.html: every claim of the paper with our "
        "measured figure, its 95% interval and a verdict computed from the runs (reproduced, not as stated, "
        "not reproduced, inconclusive, not measurable). `make demo` runs --preset demo, the first look (about 5 "
        "minutes on 2 cores); --preset demo-full is the whole demo grid. The old spelling --preset "
        "upcycle|finetune still runs `sdmoe upcycle-compare` / `sdmoe finetune-compare`.")
    c.add_argument("--styles", help="comma-separated model styles (default: the preset's)")
    c.add_argument("--init", metavar="PATH",
                   help="every run starts from this local MoE checkpoint (as `train --init`): baseline and SD-MoE "
                        "paired from the same weights, the seeds setting the data order")
    c.add_argument("--seeds", type=int, help="seeds per pair (default: the preset's)")
    c.add_argument("--steps", type=int, help="training steps per run (default: the train preset's)")
    c.add_argument("--variants", help="comma-separated variants trained for every style and seed (default: the "
                                      f"preset's, baseline,sd-moe,control); names: {', '.join(VARIANT_NAMES)}")
    c.add_argument("--ablations", help="comma-separated further variants, trained at the tuned rate")
    c.add_argument("--lr-multipliers", help="comma-separated multiples of the preset's tuned rate for the LR sweep, "
                                            "1 among them (default: the preset's)")
    _add_text(c)
    _experiment_tail(c, "compare directory (default: runs/compare-<preset>)")


def _study_parser(sub) -> None:
    st = _experiment_parser(
        sub, "study", "when does SD-MoE help? text, repetition and size, one factor at a time",
        "Paired compares (the demo model, qwen2_moe, baseline against the default SD-MoE) with one factor "
        "changed at a time: the text (each bundled domain alone, and the mix; the control too), repetition "
        "(passes over the training text at the same step count, and more steps on the same text) and size "
        "(d=64, 96, 128 at fixed tokens per parameter). Writes OUT/study.md (a table per factor: the gain with "
        "its 95% interval), OUT/study.json and OUT/study.png; every cell is a resumable compare in "
        "OUT/FACTOR/CELL, and one OUT grows factor by factor.")
    st.add_argument("--factor", default="text", help="text | repetition | size | all (comma-separated)")
    st.add_argument("--seeds", type=int, help="paired seeds per cell (default: the preset's, 3)")
    st.add_argument("--sizes", help="hidden sizes of the size factor (default: the preset's, 64,96,128)")
    _experiment_tail(st, "study directory (default: runs/study)")


def _upcycle_compare_parser(sub) -> None:
    u = _experiment_parser(
        sub, "upcycle-compare", "upcycled experts (copy, Drop-Upcycling) continued with and without SD-MoE",
        "A dense parent (a qwen3 trained here, or --init DENSE), upcycled by copy (identical experts) and "
        "Drop-Upcycling, per seed; then five arms continued from the same weights, paired by seed: copy, "
        "copy + SD-MoE, drop, drop + SD-MoE and the dense parent trained on; the copy baseline's seed 0 twice "
        "(the same-seed noise). Writes OUT/upcycle.md and upcycle.json: each arm's gain over copy with its 95% "
        "interval and verdict, steps to copy's final loss, the experts' overlap, load and specialisation.")
    u.add_argument("--init", metavar="DENSE", help="your dense checkpoint as the parent (any family `sdmoe upcycle` "
                                                   "maps), instead of training one")
    u.add_argument("--seeds", type=int, help="paired seeds (default: the preset's, 3)")
    u.add_argument("--steps", type=int, help="each arm's continued training steps (default: the preset's, 300)")
    _add_text(u)
    _experiment_tail(u, "upcycle compare directory (default: runs/compare-<preset>)")


def _finetune_compare_parser(sub) -> None:
    f = _experiment_parser(
        sub, "finetune-compare", "an MoE of two domains adapted to the third, with and without SD-MoE",
        "An MoE trained on two bundled domains, then adapted to the third alone from its weights and tokenizer, "
        "baseline against SD-MoE, paired by seed. Writes OUT/finetune.md and finetune.json: the validation loss "
        "on the new domain and on the old ones (forgetting) after adapting, each gain with its 95% interval.")
    f.add_argument("--seeds", type=int, help="paired seeds (default: the preset's, 3)")
    f.add_argument("--steps", type=int, help="adaptation steps (default: the preset's, 200)")
    _experiment_tail(f, "finetune compare directory (default: runs/compare-<preset>)")


def _methods_compare_parser(sub) -> None:
    m = _experiment_parser(
        sub, "methods-compare", "which specialisation remedy? SD-MoE head to head with the others, and combined",
        "Six arms, paired by seed: the plain MoE (the reference), SD-MoE, Guo et al.'s orthogonality and variance "
        "losses (aux.orthogonality, aux.variance), global-batch balancing (aux.balance=global_batch), and SD-MoE "
        "with each. Each arm at its own best rate (and, for Guo et al.'s losses, targets) from a grid on the mix, "
        "then every cell: a new model on the mix and on one domain alone, and continued from copy-upcycled and "
        "from Branch-Train-Mix experts. Writes OUT/methods.md and methods.json: per cell and arm the gain over "
        "plain with its 95% interval and verdict, steps to plain's loss, the experts' overlap (parameters, "
        "outputs), I(expert; domain), load imbalance and step time; and which method when, from the verdicts.")
    m.add_argument("--seeds", type=int, help="paired seeds per cell (default: the preset's, 3)")
    m.add_argument("--steps", type=int, help="a new model's training steps (default: the preset's, 400)")
    _experiment_tail(m, "methods compare directory (default: runs/compare-<preset>)")


def _evaluate_parser(sub) -> None:
    e = sub.add_parser("evaluate", help="downstream-style tasks (cloze, multiple choice) with lm-evaluation-harness",
                       description="Builds, from each domain's held-out text, a LAMBADA-style last-word cloze and a "
                                   "HellaSwag-style 4-way multiple-choice task as lm-evaluation-harness task files "
                                   "over local JSON, then scores MODEL_DIR with the harness itself (offline). Needs "
                                   "the eval extra: pip install \"sdmoe[eval]\". The paper's benchmarks run the "
                                   "same way with the harness's own task names, e.g. `lm_eval --model hf "
                                   "--model_args pretrained=MODEL_DIR --tasks hellaswag,arc_easy,piqa` where their "
                                   "data is available.",
                       formatter_class=_Help)
    e.add_argument("model_dir", metavar="MODEL_DIR", help="a save_pretrained directory, e.g. a compare run's model/")
    _add_text(e)
    e.add_argument("--tasks-dir", help="where the task files go (default: MODEL_DIR/../eval-tasks)")
    e.add_argument("--limit", type=int, help="examples per task (default: all)")
    _add_device(e, "the harness's model")
    e.add_argument("--out", help="write the scores here as JSON")


def _upcycle_parser(sub) -> None:
    u = sub.add_parser("upcycle", help="turn a dense transformers checkpoint into an MoE checkpoint (copy, noise, "
                                       "drop; routers from prompts; BTX from fine-tunes)",
                       description="Upcycle a dense checkpoint (qwen3 -> qwen3_moe, qwen2 -> qwen2_moe, mistral or llama\n"
                                   "-> mixtral) into an ordinary transformers MoE checkpoint (config.json as save_pretrained\n"
                                   "writes it; mergekit reads it): every non-FFN weight copied exactly, each FFN made into\n"
                                   "experts, routers small and random or from prompts that describe each expert.\n"
                                   "`copy` at granularity 1 computes the dense model's logits exactly, with or without\n"
                                   "--shared-expert and whatever the routers. --experts-from builds Branch-Train-Mix\n"
                                   "experts from dense fine-tunes of DENSE. Layer by layer: the peak memory is the\n"
                                   "memory-mapped dense model plus one layer's experts (Qwen-1.8B to 8 experts: 4.5 GiB\n"
                                   "for a 14 GiB output). Put DENSE first: --prompts and --experts-from take several values.",
                       epilog="examples:\n"
                              "  sdmoe upcycle dense/ --experts 8 --top-k 2 --out moe/\n"
                              "  sdmoe upcycle dense/ --experts 3 --top-k 1 --router hidden \\\n"
                              "      --prompts code.txt maths.txt chat.txt --out moe/      # one prompt a line\n"
                              "  sdmoe upcycle dense/ --experts 3 --top-k 1 --router hidden \\\n"
                              "      --prompts experts.yaml --out moe/    # {name: [prompts]} or mergekit-moe's config\n"
                              "  sdmoe upcycle base/ --experts-from ft-code/ ft-maths/ --top-k 1 --out btx/   # BTX",
                       # the examples and the description keep their lines; the options show their defaults
                       formatter_class=type("_UpcycleHelp", (argparse.RawDescriptionHelpFormatter, _Help), {}))
    u.add_argument("dense", metavar="DENSE", help="a dense transformers checkpoint directory (safetensors, tokenizer)")
    u.add_argument("--experts", type=int, help="routed experts per layer (>= 2; with --experts-from: default one per "
                                               "fine-tune, or a multiple of their number)")
    u.add_argument("--top-k", type=int, required=True, help="experts each token is routed to (1 .. --experts)")
    u.add_argument("--out", required=True, help="the new MoE checkpoint directory (absent or empty)")
    u.add_argument("--method", default="copy", help="copy (identical experts) | noise (copy + Gaussian noise) | "
                                                    "drop (Drop-Upcycling: a share of each expert's neurons re-drawn)")
    u.add_argument("--granularity", type=int, default=1,
                   help="split the FFN into G segments, each expert one of them (Qwen1.5-MoE's recipe)")
    u.add_argument("--shared-expert", action="store_true",
                   help="qwen2 -> qwen2_moe: the shared expert a copy of the whole FFN, its gate zero (sigmoid 1/2), "
                        "the routed experts' down projections halved: the two halves sum to the dense FFN (default: "
                        "the shared expert silent at the start)")
    u.add_argument("--drop-ratio", type=float, default=0.5, help="drop: the share of each expert's neurons re-drawn")
    u.add_argument("--noise", type=float, default=0.01, help="noise: its std, relative to each weight's own")
    u.add_argument("--seed", type=int, default=0, help="routers (random), noise and dropped neurons")
    u.add_argument("--router", default="random",
                   help="random (small normal, seeded) | hidden (each expert's row: the dense model's hidden state "
                        "entering each layer at its prompts' last token, averaged, unit length; mergekit-moe's "
                        "gate_mode hidden) | hidden_avg (averaged over the prompts' tokens) | embed (the prompts' "
                        "token embeddings; mergekit's cheap_embed)")
    u.add_argument("--prompts", nargs="+", metavar="FILE",
                   help="what each expert should take, for --router hidden/hidden_avg/embed: one UTF-8 text file "
                        "per expert (one prompt a line), or one .json/.yaml file: {expert name: [prompts]}, a list "
                        "of prompt lists, or mergekit-moe's config (experts: [{positive_prompts, negative_prompts}])")
    u.add_argument("--experts-from", nargs="+", metavar="DIR",
                   help="Branch-Train-Mix: dense fine-tunes of DENSE (same family, shapes, config, vocabulary); "
                        "expert i's FFN from fine-tune i mod n")
    u.add_argument("--non-expert-from", default="average",
                   help="with --experts-from: attention, embeddings, norms and LM head as the fine-tunes' average "
                        "(BTX's recipe) | base (DENSE's own)")
    u.add_argument("--quiet", action="store_true", help="no progress bar")


def _report_parser(sub) -> None:
    r = sub.add_parser("report", help="rebuild an experiment's report from its run files (compare: report.html, "
                                      "summary.json, summary.csv; study, upcycle-compare, finetune-compare: their tables)")
    r.add_argument("out", metavar="DIR", help="a directory written by `sdmoe compare` (or study, upcycle-compare, "
                                              "finetune-compare)")


def _train(args) -> int:
    from pathlib import Path

    from sdmoe.train.config import (
        apply_overrides,
        config_file_sets,
        load_config_file,
        preset,
        set_value,
        start_from_checkpoint,
        validate,
    )
    from sdmoe.train.loop import train

    cfg = load_config_file(args.config, preset(args.preset)) if args.config else preset(args.preset)
    if args.init:  # continued: SD-MoE splits at the first step, unless the config file or a --set says when
        start_from_checkpoint(cfg, args.init, args.overrides, args.style,
                              keep_split_step=bool(args.config) and config_file_sets(args.config, "sdmoe.split_step"))
    apply_overrides(cfg, args.overrides)
    # Flags set config keys the way --set does: one declaration checks the value of either.
    flags = {"method": args.method, "model.style": args.style, "loop.steps": args.steps, "loop.seed": args.seed,
             "data.text": list(args.text) or None, "loop.device": args.device, "loop.precision": args.precision}
    for key, value in flags.items():
        if value is not None:
            set_value(cfg, key, value)
    validate(cfg)  # before the default --out below is named after cfg, and before anything is written
    start = f"{Path(cfg.init).name}-" if cfg.init else ""
    out = Path(args.out or f"runs/{start}{cfg.name}-{cfg.method}-seed{cfg.loop.seed}")
    result = train(cfg, out, resume=args.resume, progress=not args.quiet)
    if result.rank == 0:  # under torchrun, one summary
        print(result.summary())
    return 0


def _generate(args) -> int:
    from sdmoe.models.generate import generate_text

    print(generate_text(args.model_dir, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed))
    return 0


def _analyze(args) -> int:
    from sdmoe.analysis.run import analyze_path

    layers = None
    if args.layers:
        try:
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--layers takes comma-separated integers, got {args.layers!r}") from None
        if not layers:
            raise UserError(f"--layers {args.layers!r} names no layer; pass MoE layer indices such as 0,1 "
                            "(or leave --layers out for all)")
    result = analyze_path(args.path, text=args.text or None, layers=layers, rank=args.rank, out=args.out,
                          n_batches=args.batches, seq_len=args.seq_len, batch_size=args.batch_size, force=args.force,
                          weights_only=args.weights_only, device=args.device)
    print(result.summary())
    return 0


EXPERIMENT_FLAGS = ("styles", "init", "seeds", "steps", "variants", "ablations", "lr_multipliers", "overrides", "text",
                    "factor", "sizes")


def _experiment(args) -> int:
    """compare, study, upcycle-compare, finetune-compare: the preset and the flags given, run on the engine."""
    from sdmoe.experiments.engine import run_experiment
    from sdmoe.experiments.presets import configure, default_out

    flags = {k: getattr(args, k) for k in EXPERIMENT_FLAGS if getattr(args, k, None) not in (None, [])}
    experiment = configure(args.command, args.preset, flags)
    result = run_experiment(experiment, args.out or default_out(args.command, args.preset), progress=not args.quiet,
                            device=args.device)
    print(result.text)
    return 0


def _evaluate(args) -> int:
    import json
    from pathlib import Path

    from sdmoe.eval.tasks import evaluate_model
    from sdmoe.files import write_json_atomic

    scores = evaluate_model(args.model_dir, text=args.text or None, tasks_dir=args.tasks_dir, limit=args.limit,
                            device=args.device)
    if args.out:
        write_json_atomic(Path(args.out), scores)
    print(json.dumps(scores, indent=1))
    return 0


def _upcycle(args) -> int:
    from sdmoe.models.upcycle import upcycle

    result = upcycle(args.dense, args.out, args.experts, args.top_k, method=args.method, granularity=args.granularity,
                     shared_expert=args.shared_expert, drop_ratio=args.drop_ratio, noise=args.noise, seed=args.seed,
                     progress=not args.quiet, router=args.router, prompts=tuple(args.prompts or ()),
                     experts_from=tuple(args.experts_from or ()), non_expert_from=args.non_expert_from)
    print(result.summary())
    return 0


def _report(args) -> int:
    from sdmoe.experiments.presets import rebuild_report

    print(rebuild_report(args.out))
    return 0


COMMANDS = {"train": _train, "generate": _generate, "analyze": _analyze, "compare": _experiment, "study": _experiment,
            "upcycle-compare": _experiment, "finetune-compare": _experiment, "methods-compare": _experiment,
            "evaluate": _evaluate,
            "upcycle": _upcycle, "report": _report}


def main(argv: list[str] | None = None) -> int:
    # transformers' own bars (loading and writing shards) would interleave with ours.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help/--version exit 0 as usual; a usage error returns 2
        if e.code in (0, None):
            raise
        return int(e.code) if isinstance(e.code, int) else 2
    if not args.command:
        print(f"sdmoe: error: no command given; choose one of {', '.join(COMMANDS)} (see `sdmoe --help`)",
              file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        with _sigterm_as_interrupt():
            return COMMANDS[args.command](args)
    except UserError as e:
        from sdmoe.files import printable

        # A path in the message may hold bytes that are not UTF-8 (surrogates): printed as \xNN, never a crash.
        print(f"sdmoe: error: {printable(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"sdmoe: {'terminated' if signum == signal.SIGTERM else 'interrupted'}; nothing half-written was "
              "left; a training run continues with --resume from its last checkpoint", file=sys.stderr)
        return 128 + signum


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a scheduler's time limit, torchrun stopping its workers) raised as an exception, so the
    clean-up of Ctrl-C runs for it too: temp directories removed, locks released, the partial output gone."""

    signum = signal.SIGTERM


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Turn SIGTERM into `Terminated` while a command runs (main thread only; a handler someone else
    installed is left alone), and restore the previous handler after."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
