"""Offline downstream-style tasks from held-out text, scored with lm-evaluation-harness.

From each domain's validation split (the text no model trained on):

- cloze (LAMBADA-style): a passage whose last word is to be predicted;
  accuracy = the target word is the greedy continuation, plus its perplexity.
- multiple choice (HellaSwag-style): a passage prefix and four endings of the
  same length, the true continuation and three taken from other passages of
  the same domain; accuracy = the true ending has the highest log-likelihood
  (acc_norm: per byte).

`build_tasks(out)` writes `cloze_<domain>.jsonl`, `mc_<domain>.jsonl` and one
harness task YAML each (`dataset_path: json`, local `data_files`), plus the
`sdmoe_cloze` / `sdmoe_mc` groups over all domains. `score_with_harness`
runs `lm_eval.simple_evaluate` on a saved model directory (optional extra:
`pip install "sdmoe[eval]"`).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdmoe.errors import UserError
from sdmoe.files import write_text_atomic
from sdmoe.moe.checkpoint import check_model_dir

TASK_PREFIX = "sdmoe"
_WORD = re.compile(r"^[A-Za-z][A-Za-z'\-]*[A-Za-z]$")
_TRAIL = re.compile(r"[^\w]+$")


@dataclass
class TaskConfig:
    n_per_domain: int = 200  # examples per domain and task (fewer if the text is short)
    cloze_context_words: int = 40  # words before the word to predict
    mc_context_words: int = 30
    mc_ending_words: int = 10
    num_choices: int = 4
    seed: int = 0


def _words(texts: list[str]) -> list[str]:
    # Lines joined: passages cross line breaks, like running text (wikitext's `= Title =` lines dropped).
    lines = [ln.strip() for t in texts for ln in t.splitlines()]
    return " ".join(ln for ln in lines if ln and not ln.startswith("=")).split()


def cloze_examples(texts: list[str], cfg: TaskConfig, domain: str = "") -> list[dict[str, Any]]:
    """Passages of `cloze_context_words` words, each ending at a content word (letters, >= 3 long)."""
    words = _words(texts)
    out: list[dict[str, Any]] = []
    i = cfg.cloze_context_words
    while i < len(words) and len(out) < cfg.n_per_domain:
        target = _TRAIL.sub("", words[i])
        if len(target) >= 3 and _WORD.match(target):
            context = " ".join(words[i - cfg.cloze_context_words: i])
            out.append({"context": context, "target": " " + target, "domain": domain})
            i += cfg.cloze_context_words + 1  # non-overlapping passages
        else:
            i += 1
    return out


def mc_examples(texts: list[str], cfg: TaskConfig, domain: str = "") -> list[dict[str, Any]]:
    """Prefix + true ending vs `num_choices - 1` endings of other passages of the same domain."""
    words = _words(texts)
    span = cfg.mc_context_words + cfg.mc_ending_words
    passages = [words[i: i + span] for i in range(0, len(words) - span + 1, span)]
    if len(passages) < cfg.num_choices:
        return []
    rng = random.Random(f"{cfg.seed}/{domain}")
    out = []
    for j, p in enumerate(passages[: cfg.n_per_domain]):
        others = rng.sample([k for k in range(len(passages)) if k != j], cfg.num_choices - 1)
        endings = [" ".join(p[cfg.mc_context_words:])] + [" ".join(passages[k][cfg.mc_context_words:]) for k in others]
        order = list(range(cfg.num_choices))
        rng.shuffle(order)
        out.append({"context": " ".join(p[: cfg.mc_context_words]), "choices": [endings[o] for o in order],
                    "label": order.index(0), "domain": domain})
    return out


def _yaml(fields: dict[str, Any]) -> str:
    # JSON values are valid YAML scalars / flow collections: no YAML library needed to write it.
    return "".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items())


def _task_yaml(name: str, kind: str, data_file: Path) -> str:
    common = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "doc_to_text": "{{context}}",
    }
    if kind == "cloze":
        return _yaml({**common, "output_type": "loglikelihood", "doc_to_target": "{{target}}",
                      "target_delimiter": "",
                      "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                      {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
                      "metadata": {"version": 1.0}})
    return _yaml({**common, "output_type": "multiple_choice", "doc_to_target": "{{label}}",
                  "doc_to_choice": "choices",
                  "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                  {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
                  "metadata": {"version": 1.0}})


def _group_yaml(group: str, tasks: list[str], metrics: list[str]) -> str:
    return _yaml({"group": group, "task": tasks,
                  "aggregate_metric_list": [{"metric": m, "aggregation": "mean", "weight_by_size": True}
                                            for m in metrics],
                  "metadata": {"version": 1.0}})


def build_tasks(out_dir: str | Path, text: list[str] | None = None, val_fraction: float = 0.05,
                cfg: TaskConfig | None = None) -> dict[str, Any]:
    """Write the task data (JSONL) and harness YAMLs for every domain's held-out text into `out_dir`.

    Returns {"tasks": [task names], "groups": [...], "counts": {task: n examples}, "dir": out_dir}.
    """
    from sdmoe.data.corpus import load_corpus, split_corpus
    from sdmoe.data.dataset import MIN_CORPUS_CHARS

    cfg = cfg or TaskConfig()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out} ({e.strerror}); choose a writable directory") from None
    split = split_corpus(load_corpus(text or [], min_chars=MIN_CORPUS_CHARS), val_fraction)
    tasks, counts = {"cloze": [], "mc": []}, {}
    for domain in split.domains:
        slug = re.sub(r"[^a-z0-9]+", "_", domain.lower()).strip("_") or "domain"
        for kind, make in (("cloze", cloze_examples), ("mc", mc_examples)):
            rows = make(split.val.get(domain, []), cfg, domain)
            if not rows:
                continue
            name = f"{TASK_PREFIX}_{kind}_{slug}"
            data = out / f"{kind}_{slug}.jsonl"
            write_text_atomic(data, "".join(json.dumps(r) + "\n" for r in rows))
            write_text_atomic(out / f"{name}.yaml", _task_yaml(name, kind, data))
            tasks[kind].append(name)
            counts[name] = len(rows)
    if not counts:
        raise UserError("the held-out text is too short to build any task; give more text or raise val_fraction")
    groups = []
    for kind, metrics in (("cloze", ["acc"]), ("mc", ["acc", "acc_norm"])):
        if tasks[kind]:
            group = f"{TASK_PREFIX}_{kind}"
            write_text_atomic(out / f"{group}.yaml", _group_yaml(group, tasks[kind], metrics))
            groups.append(group)
    return {"tasks": tasks["cloze"] + tasks["mc"], "groups": groups, "counts": counts, "dir": str(out)}


def task_names(tasks_dir: str | Path) -> list[str]:
    """The task (not group) names defined by the YAMLs in `tasks_dir`."""
    names = []
    for p in sorted(Path(tasks_dir).glob("*.yaml")):
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.startswith("task: \""):
                names.append(json.loads(line.split(":", 1)[1]))
    return names


def score_with_harness(model_dir: str | Path, tasks_dir: str | Path, tasks: list[str] | None = None,
                       limit: int | float | None = None, batch_size: int = 8, device: str = "cpu") -> dict[str, dict]:
    """Run lm-evaluation-harness on a `save_pretrained` directory -> {task: {metric: value}}."""
    _require_harness()
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_dir, tasks_dir = Path(model_dir).expanduser(), Path(tasks_dir)
    check_model_dir(model_dir)  # no custom code, known model type, tokenizer files: before the harness loads it
    names = tasks or task_names(tasks_dir)
    if not names:
        raise UserError(f"{tasks_dir} holds no task YAMLs; build them first (sdmoe.eval.tasks.build_tasks)")
    results = lm_eval.simple_evaluate(
        model="hf",
        # a dict, not "k=v,..." text: a comma in the path cannot split it; never the checkpoint's own code
        model_args={"pretrained": str(model_dir.resolve()), "dtype": "float32", "trust_remote_code": False},
        tasks=list(names),
        task_manager=TaskManager(include_path=str(tasks_dir.resolve()), include_defaults=False),
        batch_size=batch_size,
        device=device,
        limit=limit,
        log_samples=False,
        bootstrap_iters=0,
    )
    out: dict[str, dict] = {}
    for task, metrics in (results or {}).get("results", {}).items():
        out[task] = {k.split(",")[0]: v for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not k.startswith("alias") and "stderr" not in k}
    return out


def _require_harness() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError('lm-evaluation-harness is not installed; install the eval extra: '
                        'pip install "sdmoe[eval]" (lm_eval==0.4.13 + accelerate)') from None


def evaluate_model(model_dir: str | Path, text: list[str] | None = None, tasks_dir: str | Path | None = None,
                   limit: int | None = None, device: str = "auto") -> dict[str, dict]:
    """`sdmoe evaluate`: build the tasks (default MODEL_DIR/../eval-tasks), then score MODEL_DIR with the harness.

    The model directory and the harness are checked first: a bad MODEL_DIR creates no files.
    """
    from sdmoe.device import resolve_device

    model_dir = Path(model_dir).expanduser()
    check_model_dir(model_dir)
    _require_harness()
    target = str(resolve_device(device))  # "cuda" on a machine without one: one line, before any file
    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise UserError(f"--limit must be a positive number of examples per task, got {limit}")
    tasks_dir = Path(tasks_dir) if tasks_dir else model_dir.parent / "eval-tasks"
    build_tasks(tasks_dir, text=text)
    return score_with_harness(model_dir, tasks_dir, limit=limit, device=target)
