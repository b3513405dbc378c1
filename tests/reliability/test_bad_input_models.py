"""Bad checkpoints and bad sampling flags for generate / analyze / evaluate: exit 2, ONE
`sdmoe: error:` line naming the problem, and no file under the world created or changed.

Reuses the world (a finished tiny run and broken copies of its model) of test_bad_input.py.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from sdmoe.cli import main
from tests.reliability.test_bad_input import _analyze, error_line, snapshot, world  # noqa: F401 - world: fixture


@pytest.fixture(scope="module")
def models(world):  # noqa: F811 - the imported fixture
    """Broken copies of the world's good model: a NaN in one expert tensor, an unknown model type."""
    from safetensors.torch import load_file, save_file

    nan = world.root / "nan_experts"
    shutil.copytree(world.good, nan)
    weights = load_file(nan / "model.safetensors")
    key = sorted(k for k in weights if ".experts." in k)[0]
    weights[key] = weights[key].clone()
    weights[key].view(-1)[3] = float("nan")
    save_file(weights, nan / "model.safetensors", metadata={"format": "pt"})

    gpt9 = world.root / "gpt9"
    shutil.copytree(world.good, gpt9)
    cfg = json.loads((gpt9 / "config.json").read_text())
    cfg["model_type"] = "gpt9"
    (gpt9 / "config.json").write_text(json.dumps(cfg))

    steps = sorted((world.run / "checkpoints").glob("step_*"))
    assert steps, "the tiny run should leave a training checkpoint"
    return SimpleNamespace(nan=nan, nan_key=key, gpt9=gpt9, step=steps[-1])


def _generate(path, *flags):
    return ["generate", str(path), "--max-new-tokens", "2", *flags]


# (id, argv(world, models, out), fragment(s) of the error line)
CASES = [
    ("analyze_layers_only_commas", lambda w, m, o: [*_analyze(w.good), "--layers", ",", "--out", o],
     ["--layers ',' names no layer"]),
    ("analyze_nan_experts", lambda w, m, o: [*_analyze(m.nan), "--out", o],
     ["holds NaN or infinite values", "nan_experts"]),
    ("analyze_unknown_model_type", lambda w, m, o: [*_analyze(m.gpt9), "--out", o],
     ["model_type 'gpt9', which transformers", "does not know"]),
    ("analyze_training_checkpoint", lambda w, m, o: [*_analyze(m.step), "--out", o],
     ["is an sdmoe training checkpoint", "run/model"]),
    ("generate_unknown_model_type", lambda w, m, o: _generate(m.gpt9), ["model_type 'gpt9', which transformers"]),
    ("generate_training_checkpoint", lambda w, m, o: _generate(m.step),
     ["is an sdmoe training checkpoint", "pass the run's final model", "run/model"]),
    ("generate_top_k_negative", lambda w, m, o: _generate(w.good, "--top-k", "-1"), ["--top-k must be >= 0"]),
    ("generate_max_new_tokens_zero", lambda w, m, o: ["generate", str(w.good), "--max-new-tokens", "0"],
     ["--max-new-tokens must be in 1..4096, got 0"]),
    ("generate_max_new_tokens_negative", lambda w, m, o: ["generate", str(w.good), "--max-new-tokens", "-1"],
     ["--max-new-tokens must be in 1..4096, got -1"]),
    ("generate_max_new_tokens_huge", lambda w, m, o: ["generate", str(w.good), "--max-new-tokens", "1000000"],
     ["--max-new-tokens must be in 1..4096"]),
    ("generate_beyond_the_context", lambda w, m, o: ["generate", str(w.good), "--max-new-tokens", "4000"],
     ["exceed the model's context of 512 tokens"]),
    ("generate_temperature_nan", lambda w, m, o: _generate(w.good, "--temperature", "nan"),
     ["--temperature must be >= 0 and finite"]),
    ("generate_temperature_inf", lambda w, m, o: _generate(w.good, "--temperature", "inf"),
     ["--temperature must be >= 0 and finite"]),
    # argv bytes that are not UTF-8 reach Python as lone surrogates: b"caf\xe9" -> "caf\udce9"
    ("generate_prompt_not_utf8", lambda w, m, o: _generate(w.good, "--prompt", b"caf\xe9".decode("utf-8", "surrogateescape")),
     ["--prompt is not valid UTF-8"]),
    ("evaluate_missing_model_dir", lambda w, m, o: ["evaluate", str(w.root / "nope")], ["does not exist"]),
    ("evaluate_training_checkpoint", lambda w, m, o: ["evaluate", str(m.step)], ["is an sdmoe training checkpoint"]),
    ("evaluate_unknown_model_type", lambda w, m, o: ["evaluate", str(m.gpt9)], ["model_type 'gpt9'"]),
    ("evaluate_no_tokenizer", lambda w, m, o: ["evaluate", str(w.no_tokenizer)], ["holds no tokenizer"]),
    ("evaluate_limit_zero", lambda w, m, o: ["evaluate", str(w.good), "--limit", "0"], ["--limit must be a positive"]),
]


@pytest.mark.parametrize("case, argv, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_model_input_is_one_line_exit_2_and_writes_nothing(case, argv, fragments, world, models, tmp_path,  # noqa: F811
                                                                capsys):
    out = tmp_path / "out"
    before = snapshot(world.root)
    assert main(argv(world, models, str(out))) == 2
    line = error_line(capsys)
    for fragment in fragments:
        assert fragment in line, line
    assert snapshot(world.root) == before  # nothing changed, nothing new (evaluate's task files included)
    assert not out.exists()


def test_nan_error_names_the_tensor(world, models, tmp_path, capsys):  # noqa: F811
    assert main([*_analyze(models.nan), "--weights-only", "--out", str(tmp_path / "o")]) == 2
    assert f"tensor {models.nan_key} in " in error_line(capsys)
