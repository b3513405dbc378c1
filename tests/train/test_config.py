import json

import pytest

from sdmoe.errors import UserError
from sdmoe.train.config import (
    PRESETS,
    apply_overrides,
    from_dict,
    load_config_file,
    preset,
    validate,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_round_trip(name):
    cfg = preset(name)
    validate(cfg)
    assert from_dict(cfg.to_dict()) == cfg


def test_overrides_coerce_types():
    cfg = apply_overrides(preset("tiny"), ["optim.lr=0.01", "model.style=qwen2_moe", "loop.bf16=true",
                                           "sdmoe.rank=[4,8]", "optim.betas=[0.9,0.99]"])
    assert cfg.optim.lr == 0.01 and cfg.model.style == "qwen2_moe" and cfg.loop.bf16 is True
    assert cfg.sdmoe.rank == [4, 8] and cfg.optim.betas == (0.9, 0.99)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.hiden_size=3", "unknown config key 'model.hiden_size'"),
        ("optim.lr=fast", "optim.lr takes a number"),
        ("loop.steps=1.5", "loop.steps takes an integer"),
        ("nonsense", "--set takes key=value"),
        ("model=3", "model is a section"),
    ],
)
def test_bad_overrides_are_one_line_errors(override, fragment):
    with pytest.raises(UserError) as e:
        apply_overrides(preset("tiny"), [override])
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown preset 'huge'; choose one of tiny, demo, small"):
        preset("huge")


def test_config_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"preset": "tiny", "model": {"hidden_size": 48}, "method": "sd-moe"}))
    cfg = load_config_file(f)
    assert cfg.model.hidden_size == 48 and cfg.method == "sd-moe" and cfg.name == "tiny"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_config_file(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_config_file(tmp_path / "missing.json")


def test_validate_rejects_bad_values():
    cfg = preset("tiny")
    cfg.method = "magic"
    with pytest.raises(UserError, match="unknown method 'magic'"):
        validate(cfg)
