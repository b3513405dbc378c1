"""Atomic checkpoints: a run never leaves half a checkpoint behind.

A checkpoint is a directory `step_000123/` holding the model weights
(safetensors), the optimizer state, and `state.json` (step, RNG states,
config, SD-MoE controller state). It is written under a temporary name and
renamed into place in one `os.replace` (`sdmoe.files.atomic_dir`), so a crash
at any instant leaves either the previous checkpoint set or the new one, never
a partial one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdmoe.errors import UserError
from sdmoe.files import TMP_DIR_PREFIX, atomic_dir, read_json_strict, tmp_dir_name, tmp_file_name, write_json_atomic

_PREFIX = "step_"
# The longest file name `save_pretrained` may write into the final model directory (a sharded model's index).
_LONGEST_MODEL_FILE = "model.safetensors.index.json"


def _name(step: int) -> str:
    return f"{_PREFIX}{step:07d}"


def rng_state() -> dict[str, Any]:
    # Batches are a pure function of (seed, step), so the torch generator
    # (used by sampling-based ops and dropout, if enabled) is the only RNG a
    # run consumes.
    return {"torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    state: dict[str, Any],
    keep: int,
    sdmoe_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `step` atomically, then drop all but the newest `keep`.

    `sdmoe_state`: the SD-MoE controller's state (bases, shared parts, the shared optimizer's
    moments), written to `sdmoe.pt` beside the optimizer's."""
    final = ckpt_root / _name(step)
    # Re-saving a step (e.g. after a skip policy) replaces it whole.
    with atomic_dir(final, replace=True) as tmp:
        # safetensors refuses tensors that share storage (tied or parametrized
        # views); contiguous clones make every entry its own tensor.
        tensors = {k: v.detach().contiguous().clone() for k, v in model_state.items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        # Into a Python file, not a path: torch's own C++ writer reports a full disk as
        # RuntimeError("unexpected pos"), through a Python file the OSError is its context.
        with open(tmp / "optimizer.pt", "wb") as f:
            torch.save(optimizer_state, f)
        if sdmoe_state is not None:
            with open(tmp / "sdmoe.pt", "wb") as f:
                torch.save(sdmoe_state, f)
        write_json_atomic(tmp / "state.json", {**state, "step": step, "rng": rng_state()})
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories never count)."""
    try:  # the directory may vanish between a check and the listing (a starting run's path probes)
        entries = list(ckpt_root.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [p for p in entries if p.is_dir() and p.name.startswith(_PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def clean_partial(ckpt_root: Path) -> None:
    """Remove what a killed process left half-written in `ckpt_root`: `.tmp-*`
    directories (checkpoints, the final model) and `.<name>.*.tmp` files (JSON, metrics)."""
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.name.startswith(TMP_DIR_PREFIX) or (p.name.startswith(".") and p.name.endswith(".tmp")):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


def run_dir_probes(steps: int) -> list[str]:
    """The longest paths a training run of `steps` steps writes below its directory, one per
    directory it writes (checkpoints/, the final model's temp dir, the run dir itself), for
    `sdmoe.files.probe_writable`: a path too long for them fails before the first step."""
    return [
        f"checkpoints/{tmp_dir_name(_name(steps))}/{tmp_file_name('state.json')}",
        f"{tmp_dir_name('model')}/{_LONGEST_MODEL_FILE}",
        tmp_file_name("metrics.jsonl"),
    ]


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, Any]]:
    fix = "delete it to resume from an earlier one"
    state = read_json_strict(path / "state.json", fix=f"checkpoint {path.name} is unusable: {fix}")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "rng" not in state:
        raise UserError(f"checkpoint {path}/state.json lacks its step or RNG state; {fix}")
    try:
        model_state = load_file(str(path / "model.safetensors"))
        # weights_only: tensors and plain values, never pickled code (a checkpoint directory may be foreign)
        # map_location: a checkpoint written on a GPU resumes on a CPU-only machine (and the optimizer
        # moves its state to its parameters' device when it loads it)
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any unreadable part means the same fix
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); {fix}") from None
    return model_state, optimizer_state, state


def load_sdmoe_state(path: Path) -> dict[str, Any] | None:
    """The SD-MoE controller state of checkpoint `path` (`sdmoe.pt`), or None if it has none."""
    f = path / "sdmoe.pt"
    if not f.is_file():
        return None
    try:
        return torch.load(f, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any unreadable part means the same fix
        raise UserError(f"checkpoint {path} has an unreadable sdmoe.pt ({type(e).__name__}); delete the checkpoint "
                        "to resume from an earlier one") from None
