import pytest
import torch

from sdmoe.errors import UserError
from sdmoe.train import checkpoint as ckpt


def _save(root, step, keep=2):
    return ckpt.save_checkpoint(root, step, {"w": torch.full((2, 2), float(step))}, {"state": {}}, {"k": 1}, keep)


def test_keeps_last_k_and_leaves_no_temporaries(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step_0000020", "step_0000030"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    model, _, state = ckpt.load_checkpoint(tmp_path / "step_0000030")
    assert model["w"][0, 0] == 30 and state["step"] == 30 and state["k"] == 1


def test_incomplete_directories_are_ignored_and_cleaned(tmp_path):
    _save(tmp_path, 10)
    (tmp_path / ".tmp-step_0000020-abc").mkdir()
    (tmp_path / "step_0000020").mkdir()  # no state.json: a crash before the rename cannot produce this, but be safe
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000010"]
    ckpt.clean_partial(tmp_path)
    assert not (tmp_path / ".tmp-step_0000020-abc").exists()


def test_truncated_weights_are_a_user_error(tmp_path):
    path = _save(tmp_path, 10)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="unreadable"):
        ckpt.load_checkpoint(path)
