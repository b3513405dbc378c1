import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdmoe.config_fields import Rule, rule_of
from sdmoe.errors import UserError
from sdmoe.train.config import (
    PRESETS,
    PresetName,
    RunConfig,
    apply_overrides,
    from_dict,
    load_config_file,
    preset,
    set_value,
    validate,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_round_trip(name):
    cfg = preset(name)
    validate(cfg)
    assert from_dict(cfg.to_dict()) == cfg


def test_overrides_coerce_types():
    cfg = apply_overrides(preset("tiny"), ["optim.lr=0.01", "model.style=qwen2_moe", "loop.precision=bf16",
                                           "sdmoe.rank=[4,8]", "optim.betas=[0.9,0.99]"])
    assert cfg.optim.lr == 0.01 and cfg.model.style == "qwen2_moe" and cfg.loop.precision == "bf16"
    assert cfg.sdmoe.rank == [4, 8] and cfg.optim.betas == (0.9, 0.99)


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


# -- one declaration per field: coercion, ranges, torch-free -------------------------------------------


def _leaves(cls=RunConfig, prefix=""):
    """(dotted key, declared type, rule) of every leaf field of the config tree."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], key)
        else:
            yield key, hints[f.name], rule_of(f)


LEAVES = list(_leaves())


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.grad_clip=-1", "optim.grad_clip=-1.0 is out of range; use a number > 0"),
        ("optim.grad_clip=0", "optim.grad_clip=0.0 is out of range"),
        ("optim.min_lr_ratio=-5", "optim.min_lr_ratio=-5.0 is out of range; use a number in [0, 1]"),
        ("optim.lr=nan", "optim.lr=nan is not a finite number; use a number > 0"),
        ("optim.lr=-inf", "optim.lr=-inf is not a finite number"),
        ("optim.lr=NaN", "optim.lr=NaN is not a finite number"),
        ("optim.lr=1e999", "is not a finite number"),
        ("optim.betas=[0.9,1.0]", "optim.betas=[0.9, 1.0] is out of range; use a number in [0, 1)"),
        ("optim.betas=[0.9]", "optim.betas takes 2 numbers, got 1"),
        ("optim.betas=[0.9,0.9,0.9]", "optim.betas takes 2 numbers, got 3"),
        ("sdmoe.rank=[4.7, 2.2]", "sdmoe.rank[0] takes an integer, got 4.7"),  # was silently [4, 2]
        ("sdmoe.rank=4.7", "sdmoe.rank takes an integer or a list of integers, got 4.7"),
        ("sdmoe.rank=[4, true]", "sdmoe.rank[1] takes an integer, got True"),
        ("loop.monitor_rank=[4,4]", "loop.monitor_rank takes an integer"),  # only sdmoe.rank takes a list
        ("loop.seed=-1", "loop.seed=-1 is out of range"),
        ("loop.steps=0", "loop.steps=0 is out of range; use an integer >= 1"),
        ("loop.threads=-2", "loop.threads=-2 is out of range; use an integer in [0, 1024] (0 = PyTorch's default)"),
        ("loop.deterministic=maybe", "loop.deterministic takes true or false, got 'maybe'"),
        ("loop.deterministic=2", "loop.deterministic takes true or false, got '2'"),
        ("loop.precision=fp16", "unknown precision 'fp16'"),
        ("sdmoe.projections=gate,gate", "sdmoe.projections lists gate twice"),
        ("sdmoe.projections=[]", "sdmoe.projections needs at least 1 entry"),
        ("sdmoe.projections=gate,o_proj", "unknown projections entry 'o_proj'; sdmoe.projections[1] must be one of"),
        ("sdmoe.form=hybrid", "unknown form 'hybrid'; sdmoe.form must be"),
        ("sdmoe.mode=per_expert", "unknown config key 'sdmoe.mode'"),  # sdmoe 0.1's name: now sdmoe.form
        ("data.val_fraction=1", "data.val_fraction=1.0 is out of range; use a number in (0, 1)"),
        ("model.style=[\"a\"]", "unknown model style '[\"a\"]'"),
        ("model.hidden_size=true", "model.hidden_size takes an integer, got 'true'"),
        ("sdmoe.rank=" + "[" * 5000, "sdmoe.rank nests too deeply"),
        ("optim.lr.x=1", "optim.lr is a value, not a section"),
        ("model.hiden_size=3", "did you mean model.hidden_size?"),
        ("model.hiden_size=3", "unknown config key 'model.hiden_size'"),
        ("optim.lr=fast", "optim.lr takes a number"),
        ("loop.steps=1.5", "loop.steps takes an integer"),
        ("nonsense", "--set takes key=value"),
        ("model=3", "model is a section"),
    ],
)
def test_every_value_is_checked_against_its_declaration(override, fragment):
    with pytest.raises(UserError) as e:
        apply_overrides(preset("tiny"), [override])
    assert fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("override, key, expected", [
    ("loop.steps=1e3", "loop.steps", 1000),  # decision: an integral float is an integer (a JSON file may write 1e3)
    ("loop.steps=7.0", "loop.steps", 7),
    ("optim.lr=1", "optim.lr", 1.0),
    ("loop.deterministic=yes", "loop.deterministic", True),
    ("loop.deterministic=0", "loop.deterministic", False),
    ("sdmoe.rank=4,8", "sdmoe.rank", [4, 8]),
    ("sdmoe.rank=[4, 8]", "sdmoe.rank", [4, 8]),
    ("sdmoe.rank=16", "sdmoe.rank", 16),
    ("sdmoe.projections=up,down", "sdmoe.projections", ("up", "down")),
    ("data.text=a.txt, b.txt", "data.text", ["a.txt", "b.txt"]),
    ("optim.min_lr_ratio=0", "optim.min_lr_ratio", 0.0),
    ("optim.min_lr_ratio=1", "optim.min_lr_ratio", 1.0),
])
def test_values_convert_to_the_declared_type(override, key, expected):
    cfg = apply_overrides(preset("tiny"), [override])
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    assert value == expected and type(value) is type(expected)


def test_a_section_given_a_value_names_every_key_and_a_real_example():
    with pytest.raises(UserError) as e:
        apply_overrides(preset("tiny"), ["optim=3"])
    msg = str(e.value)
    names = [f.name for f in dataclasses.fields(preset("tiny").optim)]
    assert all(n in msg for n in names) and "e.g. optim.lr=0.003" in msg
    apply_overrides(preset("tiny"), ["optim.lr=0.003"])  # the example works as given


def test_validate_checks_configs_built_in_code():
    """Presets, constructors and flags bypass --set: validate walks the whole tree."""
    for attr, value, fragment in [("grad_clip", -1.0, "optim.grad_clip=-1.0 is out of range"),
                                  ("lr", float("nan"), "optim.lr=nan is not a finite number"),
                                  ("warmup_steps", "5", "optim.warmup_steps takes an integer, got '5'"),
                                  ("betas", (0.9,), "optim.betas takes 2 numbers, got 1")]:
        cfg = preset("tiny")
        setattr(cfg.optim, attr, value)
        with pytest.raises(UserError, match=re.escape(fragment)):
            validate(cfg)
    cfg = preset("tiny")
    cfg.optim.lr, cfg.optim.betas = 1, [0.9, 0.95]
    validate(cfg)  # normalised in place: what is saved and compared on resume has one form
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.optim.betas == (0.9, 0.95)


def test_sdmoe_values_are_checked_for_a_baseline_run_too_but_not_against_the_model():
    cfg = preset("tiny")
    cfg.sdmoe.rank = 99  # > d: only an sd-moe run checks the rank against the model
    validate(cfg)
    cfg.sdmoe.rank = -1  # never a rank, whatever the method
    with pytest.raises(UserError, match="sdmoe.rank=-1 is out of range"):
        validate(cfg)


@pytest.mark.parametrize("content, fragment", [
    ('{"model": {"style": ["a"]}}', "unknown model style ['a']; model.style must be one of"),
    ('{"model": {"hidden_size": "wide"}}', "model.hidden_size takes an integer, got 'wide'"),
    ('{"optim": {"lr": NaN}}', "optim.lr=nan is not a finite number"),
    ('{"optim": {"betas": [0.9, Infinity]}}', "optim.betas[1]=inf is not a finite number"),
    ('{"model": 3}', "model is a section, not a value"),
    ('{"preset": ["tiny"]}', "unknown preset ['tiny']"),
    ('[1, 2]', "must hold a JSON object of sections, got a list"),
    ('[' * 100000 + ']' * 100000, "nests too deeply"),
    ('{"loop": {"steps": ' + '9' * 5000 + '}}', "is not valid JSON"),
])
def test_config_file_mistakes_are_one_line(tmp_path, content, fragment):
    f = tmp_path / "c.json"
    f.write_text(content)
    with pytest.raises(UserError) as e:
        load_config_file(f)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_config_file_that_is_not_a_file(tmp_path):
    with pytest.raises(UserError, match="is a directory; pass a JSON file"):
        load_config_file(tmp_path)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="is not a regular file"):  # never opened: it would block
        load_config_file(fifo)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * ((1 << 20) + 1))
    with pytest.raises(UserError, match="too large for a config"):
        load_config_file(big)


def test_config_modules_import_no_torch():
    code = ("import sys, sdmoe.train.config, sdmoe.experiments.grid, sdmoe.models.config, sdmoe.data.config, "
            "sdmoe.method.config; cfg = sdmoe.train.config.preset('tiny'); sdmoe.train.config.validate(cfg); "
            "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules); "
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_lazy_package_names_still_resolve():
    import sdmoe
    import sdmoe.method.export  # noqa: F401  (a submodule of the same name must not shadow the function)
    from sdmoe.method import SDMoE, SDMoEConfig, convert, export  # noqa: F401

    assert callable(convert) and not isinstance(convert, type(sys)) and sdmoe.export is export
    assert sdmoe.SDMoEConfig is SDMoEConfig
    from sdmoe.data import DataConfig, prepare_dataset  # noqa: F401
    from sdmoe.models import STYLES, ModelConfig, build_model  # noqa: F401


def test_choices_agree_with_the_code_that_uses_them():
    from sdmoe.data.batches import DOMAIN_WEIGHTS
    from sdmoe.data.config import DOMAIN_WEIGHTS as DECLARED
    from sdmoe.data.config import MIN_VOCAB
    from sdmoe.data.tokenizer import MIN_VOCAB as TOKENIZER_MIN

    assert DECLARED == DOMAIN_WEIGHTS and MIN_VOCAB == TOKENIZER_MIN
    assert tuple(PRESETS) == typing.get_args(PresetName)


def test_every_field_is_declared_with_a_sensible_range():
    """Numbers have bounds; a field with no declaration would be checked for its type only."""
    for key, tp, rule in LEAVES:
        numeric = tp in (int, float) or tp == (int | list[int]) or typing.get_origin(tp) is tuple and \
            typing.get_args(tp)[0] is float
        if numeric:
            assert rule != Rule() and (rule.ge is not None or rule.gt is not None), key


# -- property: whatever a user types, the outcome is a value in range or one line naming the key -----

def _text(value):
    """`value` as a user types it after `--set key=`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value)


def _lo_hi(tp, rule):
    if tp is int:
        lo = rule.ge if rule.ge is not None else (rule.gt + 1 if rule.gt is not None else -(10**6))
        hi = rule.le if rule.le is not None else (rule.lt - 1 if rule.lt is not None else 10**9)
        return int(lo), int(hi)
    lo = rule.ge if rule.ge is not None else rule.gt if rule.gt is not None else -1e6
    hi = rule.le if rule.le is not None else rule.lt if rule.lt is not None else 1e6
    return lo, hi


def _valid(tp, rule):
    """Values the declaration accepts (as a field of that type would store them)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return st.booleans()
    if tp is int:
        lo, hi = _lo_hi(tp, rule)
        return st.integers(lo, hi)
    if tp is float:
        lo, hi = _lo_hi(tp, rule)
        return st.floats(lo, hi, exclude_min=rule.gt is not None, exclude_max=rule.lt is not None,
                         allow_nan=False, allow_infinity=False)
    if tp is str:
        return st.text(st.characters(codec="utf-8", exclude_characters=",[]"), max_size=20).map(str.strip)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if tp == (int | list[int]):
        return _valid(int, rule) | st.lists(_valid(int, rule), max_size=5)
    if origin is tuple and args[-1] is Ellipsis:
        return st.lists(_valid(args[0], rule), min_size=max(1, rule.min_len), unique=rule.unique).map(tuple)
    if origin is tuple:
        return st.tuples(*[_valid(a, rule) for a in args])
    if origin is list:
        return st.lists(_valid(args[0], rule), min_size=rule.min_len, max_size=4, unique=rule.unique)
    raise AssertionError(f"no strategy for {tp}")


def _invalid(tp, rule):
    """Values the declaration must refuse: out of range, not finite, wrong type or length."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    options = [st.sampled_from([{"a": 1}, None])]
    if tp in (int, float) or tp == (int | list[int]):
        scalar = float if tp is float else int
        lo, hi = _lo_hi(scalar, rule)
        if rule.ge is not None or rule.gt is not None:
            options.append(st.integers(-(10**12), math.floor(lo) - (scalar is int)).filter(
                lambda v: rule.ge is None and v <= rule.gt or rule.ge is not None and v < rule.ge))
        if rule.le is not None or rule.lt is not None:
            options.append(st.integers(math.ceil(hi) + (scalar is int), 10**12).filter(
                lambda v: rule.le is None and v >= rule.lt or rule.le is not None and v > rule.le))
        options.append(st.sampled_from([math.nan, math.inf, -math.inf, "fast", "1..2", [[1]]]))
        if scalar is int:
            options.append(st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: not v.is_integer()))
    elif tp is bool:
        options.append(st.sampled_from(["maybe", 2, -1, 0.5, [True]]))
    elif origin is typing.Literal:
        options.append(st.text(max_size=12).filter(lambda s: s.strip() not in args))
        options.append(st.just([args[0]]))
    elif origin is tuple and args[-1] is not Ellipsis:  # fixed length: wrong lengths and bad entries
        options.append(st.lists(st.floats(0, 0.5), max_size=5).filter(lambda v: len(v) != len(args)))
        options.append(st.sampled_from([[0.5, math.nan], [0.5, 1.0], [-0.1, 0.5], ["a", 0.5]]))
    elif origin in (list, tuple):
        options.append(st.sampled_from([[1, 2], [[["x"]]], [{"a": 1}]]))
        if rule.min_len:
            options.append(st.just([]))
    return st.one_of(options)


@st.composite
def _override(draw):
    key, tp, rule = draw(st.sampled_from(LEAVES))
    good = draw(st.booleans())
    value = draw(_valid(tp, rule) if good else _invalid(tp, rule))
    # A string field takes any text after --set: its wrong types exist only in a JSON file.
    text_field = tp is str or tp == list[str]
    how = "json" if text_field and not good else draw(st.sampled_from(["--set", "json"]))
    return key, good, value, how


def _plain(value):
    return json.loads(json.dumps(value))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(_override(), st.sampled_from(["baseline", "sd-moe"]))
def test_any_value_either_loads_in_range_or_is_one_line_naming_the_key(override, method):
    """Values drawn from each field's declared type: in range, out of range, not finite, wrong
    type or length, text. In range: stored as given. Anything else: one line naming the key."""
    key, good, value, how = override
    cfg = preset("tiny")
    cfg.method = method
    section, _, rest = key.partition(".")
    try:
        if how == "--set":
            apply_overrides(cfg, [f"{key}={_text(value)}"])
        else:  # as a config file holds it: {"optim": {"lr": ...}}
            payload = _plain(value)
            set_value(cfg, section, {rest: payload}) if rest else set_value(cfg, key, payload)
    except UserError as e:
        msg = str(e)
        assert msg and "\n" not in msg and len(msg) < 1000, msg
        assert key.split(".")[-1] in msg, msg  # the message names the setting
        assert not good, f"{key}={value!r} is in range but was refused: {msg}"
        return
    assert good, f"{key}={value!r} is outside its declaration but was accepted"
    stored = getattr(getattr(cfg, section), rest) if rest else getattr(cfg, key)
    assert _plain(stored) == _plain(value), (stored, value)
    before = cfg.to_dict()
    try:
        validate(cfg)  # the rules between fields may still refuse it, in one line
    except UserError as e:
        assert "\n" not in str(e)
    assert cfg.to_dict() == before  # what was stored already had the declared type and range
    assert from_dict(before) == cfg


def test_a_config_saved_by_sdmoe_0_1_loads_with_one_form_field():
    """0.1 wrote the decomposition as sdmoe.mode + sdmoe.shared_form; a saved run.json still loads."""
    from sdmoe.train.config import from_dict

    for mode, shared_form, form in (("shared", "full", "full"), ("shared", "lowrank", "lowrank"),
                                    ("per_expert", "full", "per_expert")):
        raw = preset("tiny").to_dict()
        del raw["sdmoe"]["form"]
        raw["sdmoe"].update(mode=mode, shared_form=shared_form)
        assert from_dict(raw).sdmoe.form == form
