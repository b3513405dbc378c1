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
  sdmoe compare --preset demo --out runs/compare-demo   the main job: baseline vs SD-MoE, one report
  sdmoe report runs/compare-demo                        rebuild that report from the run files
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

    g = sub.add_parser("generate", help="sample text from a saved model directory",
                       formatter_class=_Help)
    g.add_argument("model_dir", metavar="DIR", help="a save_pretrained directory, e.g. runs/demo-baseline-seed0/model")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=60,
                   help="tokens to sample, 1..4096 and within the model's context (max_position_embeddings)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; >= 0")
    g.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0 = no top-k cut")
    g.add_argument("--seed", type=int, default=0)

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
    c = sub.add_parser("compare", help="baseline against SD-MoE: matched seeds, sweeps, one report with verdicts",
                       description="Train matched pairs (same initial weights, data order and seed; the only "
                                   "difference is SD-MoE) plus the control and the sweeps of the preset, then write "
                                   "OUT/report.html: every claim of the paper with our measured figure, its 95% "
                                   "interval and a verdict computed from the runs. Re-running the same command "
                                   "skips finished runs and resumes interrupted ones.",
                       formatter_class=_Help)
    c.add_argument("--preset", default="demo", help="demo (about 10 min on 2 cores) | lab (the lab model: default against the "
                                                   "paper's own split, 3 seeds at the baseline's tuned rate 6e-3; 2-3 hours on "
                                                   "CPU) | paper (the full "
                                                   "grid; hours on CPU) | upcycle (a dense parent upcycled by copy and Drop-Upcycling, "
                                                   "continued with and without SD-MoE, 3 seeds) | finetune (an MoE of two domains adapted "
                                                   "to the third, with and without SD-MoE: forgetting) | tiny")
    c.add_argument("--styles", help="comma-separated model styles (default: the preset's, qwen2_moe,deepseek_v3)")
    c.add_argument("--init", metavar="PATH",
                   help="every run starts from this local MoE checkpoint (as `train --init`): baseline and SD-MoE "
                        "paired from the same weights, the seeds setting the data order; with --preset upcycle, a "
                        "dense checkpoint: the parent to upcycle, instead of training one")
    c.add_argument("--seeds", type=int, help="seeds per pair (default: the preset's)")
    c.add_argument("--steps", type=int, help="training steps per run (default: the train preset's)")
    c.add_argument("--variants", help="comma-separated variants trained for every style and seed (default: "
                                      "baseline,sd-moe,control); names: baseline, sd-moe, control, fixed-weights, "
                                      "fixed-gradients, per-expert, router-residual, normalized-tails, paper (the "
                                      "paper's own two-sided split), paper-one-sided, paper-refresh-1, "
                                      "paper-no-refresh, paper-rank-d4, paper-after-warmup, tracker-lag (the default split "
                                      "in the last step's tracked basis: one pass), rank-<r>, tail-lr-<m>, "
                                      "shared-lr-<m>, tracker-<n>, reestimate-<k>")
    c.add_argument("--ablations", help="comma-separated further variants, trained at the tuned rate")
    c.add_argument("--lr-multipliers", help="comma-separated multiples of the preset's tuned rate for the LR sweep "
                                            "(default: 1,2,4)")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="train-config override applied to every run, e.g. --set loop.threads=2")
    _add_text(c)
    _add_device(c, "every run")
    c.add_argument("--out", help="compare directory (default: runs/compare-<preset>)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")

    st = sub.add_parser("study", help="when does SD-MoE help? text, repetition and size, one factor at a time",
                        description="Paired compares (demo preset, qwen2_moe, baseline against the default SD-MoE) "
                                    "with one factor changed at a time: the text (each bundled domain alone, and "
                                    "the mix; the control too), repetition (passes over the training text at the "
                                    "same step count, and more steps on the same text) and size (d=64, 96, 128 at "
                                    "fixed tokens per parameter). Writes OUT/study.md (a table per factor: the gain "
                                    "with its 95%% interval), OUT/study.json and OUT/study.png; every cell is a "
                                    "resumable compare in OUT/FACTOR/CELL. About 20 s a run on 2 cores at d=64.",
                        formatter_class=_Help)
    st.add_argument("--factor", default="text", help="text | repetition | size | all (comma-separated)")
    st.add_argument("--seeds", type=int, default=3, help="paired seeds per cell")
    st.add_argument("--sizes", default="64,96,128", help="hidden sizes of the size factor")
    st.add_argument("--out", default="runs/study", help="study directory")
    _add_device(st, "every run")
    st.add_argument("--quiet", action="store_true", help="no progress bars")

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

    r = sub.add_parser("report", help="rebuild a compare's report.html, summary.json and summary.csv from its run files")
    r.add_argument("out", metavar="DIR", help="a directory written by `sdmoe compare`")
    return parser


def _train(args) -> int:
    from pathlib import Path

    from sdmoe.train.config import (apply_overrides, config_file_sets, load_config_file, preset, set_value,
                                    start_from_checkpoint, validate)
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


def _compare(args) -> int:
    from sdmoe.config_fields import assign
    from sdmoe.experiments.compare import run_compare
    from sdmoe.experiments.grid import compare_preset

    if args.preset.startswith(("upcycle", "finetune")):
        return _compare_from_a_parent(args)
    cfg = compare_preset(args.preset)
    # Each flag sets its compare setting through the setting's declaration (type, range, finite numbers).
    if args.init:  # every run starts from the checkpoint: its style is the compare's one style
        from sdmoe.train.config import RunConfig, start_from_checkpoint

        if args.styles:
            raise UserError("--styles with --init: the style is the checkpoint's; drop --styles")
        start = RunConfig()
        start_from_checkpoint(start, args.init)  # every check `train --init` makes, before anything is written
        cfg.styles, cfg.init = [start.model.style], start.init
    flags = {"styles": args.styles, "seeds": args.seeds, "steps": args.steps, "variants": args.variants,
             "ablations": args.ablations, "lr_multipliers": args.lr_multipliers, "text": list(args.text) or None}
    for key, value in flags.items():
        if value is not None:
            try:
                assign(cfg, key, value)
            except UserError as e:
                raise UserError(f"--{key.replace('_', '-')}: {e}") from None
    cfg.overrides = list(cfg.overrides) + list(args.overrides)
    result = run_compare(cfg, args.out or f"runs/compare-{args.preset}", progress=not args.quiet, device=args.device)
    print(result.text)
    return 0


def _compare_from_a_parent(args) -> int:
    """`compare --preset upcycle`: a dense parent, upcycled, continued with and without SD-MoE; `--preset finetune`:
    an MoE trained on two domains, adapted to the third with and without SD-MoE (grids of their own)."""
    from pathlib import Path

    from sdmoe.config_fields import assign
    from sdmoe.experiments.finetune import finetune_preset, run_finetune_compare
    from sdmoe.experiments.upcycle import run_upcycle_compare, upcycle_preset

    upcycling = args.preset.startswith("upcycle")
    cfg = upcycle_preset(args.preset) if upcycling else finetune_preset(args.preset)
    unsupported = [f"--{n}" for n in ("styles", "variants", "ablations", "lr_multipliers") if getattr(args, n, None)]
    if args.init and not upcycling:
        unsupported.append("--init")
    if unsupported:
        raise UserError(f"{', '.join(unsupported)} with --preset {args.preset}: its arms are fixed; drop them")
    if args.text and not upcycling:
        raise UserError("--text with --preset finetune: its domains are the bundled ones; drop --text")
    for key, value in {"seeds": args.seeds, "steps": args.steps, "text": list(args.text) or None}.items():
        if value is not None:
            assign(cfg, key, value)
    cfg.overrides = list(args.overrides)
    if args.init:  # the dense parent to upcycle, instead of training one
        from sdmoe.moe.checkpoint import check_model_dir

        check_model_dir(args.init)
        cfg.init = str(Path(args.init).expanduser().resolve())
    out = Path(args.out or f"runs/compare-{args.preset}")
    (run_upcycle_compare if upcycling else run_finetune_compare)(cfg, out, progress=not args.quiet)
    print((out / ("upcycle.md" if upcycling else "finetune.md")).read_text(encoding="utf-8"))
    return 0


def _study(args) -> int:
    from sdmoe.experiments.study import FACTORS, run_study

    factors = list(FACTORS) if args.factor == "all" else [f.strip() for f in args.factor.split(",") if f.strip()]
    unknown = [f for f in factors if f not in FACTORS]
    if unknown or not factors:
        raise UserError(f"--factor {args.factor!r}: choose from {', '.join(FACTORS)} or all")
    try:
        sizes = tuple(int(x) for x in args.sizes.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--sizes takes comma-separated hidden sizes such as 64,96,128, got {args.sizes!r}") from None
    if not sizes or any(d < 8 or d % 8 for d in sizes):
        raise UserError(f"--sizes {args.sizes!r}: each hidden size must be a multiple of 8 (4 heads of even size)")
    if args.seeds < 2:
        raise UserError(f"--seeds {args.seeds}: a paired interval needs at least 2 seeds")
    payload = run_study(factors, args.out, seeds=args.seeds, sizes=sizes, progress=not args.quiet, device=args.device)
    from pathlib import Path

    print((Path(args.out) / "study.md").read_text(encoding="utf-8"))
    print(f"study: {len(payload['cells'])} cells; {Path(args.out) / 'study.md'}, study.json, study.png")
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
    from sdmoe.experiments.compare import rebuild_report

    print(rebuild_report(args.out))
    return 0


COMMANDS = {"train": _train, "generate": _generate, "analyze": _analyze, "compare": _compare, "study": _study,
            "evaluate": _evaluate, "upcycle": _upcycle, "report": _report}


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
