import pytest

from sdmoe.errors import UserError
from sdmoe.experiments.grid import CompareConfig, plan, variant_overrides
from sdmoe.experiments.presets import PRESETS


def compare_preset(name: str) -> CompareConfig:
    return PRESETS[name].build()


def _differs_only_in_method(a, b):
    da, db = a.run_config().to_dict(), b.run_config().to_dict()
    for key in ("method", "sdmoe", "name"):
        da.pop(key), db.pop(key)
    return da == db


def test_the_first_look_is_one_style_on_the_mix_then_drama_alone():
    """`make demo`: 3 paired seeds of baseline, SD-MoE and the control on the mix, the same-seed rerun, then
    baseline against SD-MoE on drama alone: 16 runs (about 7 minutes on 2 cores)."""
    from sdmoe.experiments.compare import per_text_config, per_text_domains

    cfg = compare_preset("demo")
    specs = plan(cfg)
    assert len(specs) == 3 * 3 + 1 and {s.style for s in specs} == {"qwen2_moe"} and {s.lr_mult for s in specs} == {1}
    assert per_text_domains(cfg) == ["drama"] and len(plan(per_text_config(cfg, "drama"))) == 6
    assert cfg.analyze and cfg.timing_processes == 4
    cfg.per_text_domains = ["poetry"]
    with pytest.raises(UserError, match="per_text_domains names poetry, which the text does not have"):
        per_text_domains(cfg)


def test_the_full_demo_plan_contents():
    cfg = compare_preset("demo-full")
    specs = plan(cfg)
    ids = [s.run_id for s in specs]
    assert len(ids) == len(set(ids)) == 18 + 1 + 4  # main grid, the same-seed rerun, the rate sweep
    main = [s for s in specs if s.lr_mult == 1.0 and s.variant != "baseline-rerun"]
    assert len(main) == 2 * 3 * 3  # styles x seeds x (baseline, sd-moe, control)
    rerun = [s for s in specs if s.variant == "baseline-rerun"]
    base0 = next(s for s in specs if s.run_id == "qwen2_moe/baseline/lr1/seed0")
    assert len(rerun) == 1 and rerun[0].run_config().to_dict() | {"name": ""} == base0.run_config().to_dict() | {"name": ""}
    sweep = [s for s in specs if s.lr_mult != 1.0]
    assert sorted((s.variant, s.lr_mult) for s in sweep) == [("baseline", 0.5), ("baseline", 4.0),
                                                            ("sd-moe", 0.5), ("sd-moe", 4.0)]
    assert {s.style for s in sweep} == {"qwen2_moe"} and {s.seed for s in sweep} == {0}
    assert "qwen2_moe/sd-moe/lr1/seed0" in ids and "qwen2_moe/baseline/lr4/seed0" in ids
    # then each bundled domain alone: baseline against SD-MoE, first style, 3 seeds
    from sdmoe.experiments.compare import per_text_config, text_domains

    assert cfg.per_text and text_domains(cfg) == ["drama", "encyclopedia", "fairy_tales"]
    sub = plan(per_text_config(cfg, "drama"))
    assert len(sub) == 6 and {s.style for s in sub} == {"qwen2_moe"}
    assert all(s.run_config(per_text_config(cfg, "drama")).data.domains == ["drama"] for s in sub)


def test_pairs_share_everything_but_the_method():
    specs = plan(compare_preset("demo-full"))
    groups = {}
    for s in specs:
        groups.setdefault(s.pair_key, []).append(s)
    for key, group in groups.items():
        assert "baseline" in {s.variant for s in group}, key
        base = next(s for s in group if s.variant == "baseline")
        for s in group:
            assert _differs_only_in_method(base, s), s.run_id
            rc = s.run_config()
            assert rc.loop.seed == s.seed and rc.model.style == s.style
    # the LR multiplier scales the preset's rate
    a = next(s for s in specs if s.run_id == "qwen2_moe/baseline/lr4/seed0").run_config()
    b = next(s for s in specs if s.run_id == "qwen2_moe/baseline/lr1/seed0").run_config()
    assert a.optim.lr == pytest.approx(4 * b.optim.lr)


def test_variants_set_the_sdmoe_section():
    cfgs = {s.variant: s.run_config() for s in plan(compare_preset("demo-full")) if s.lr_mult == 1.0}
    assert cfgs["baseline"].method == "baseline"
    assert cfgs["sd-moe"].method == "sd-moe" and cfgs["sd-moe"].sdmoe.gradient_split == "per_step"
    assert cfgs["control"].sdmoe.gradient_split == "none"


def test_paper_plan_has_every_ablation_and_valid_configs():
    cfg = compare_preset("paper")
    specs = plan(cfg)
    variants = {s.variant for s in specs}
    assert {"baseline", "sd-moe", "control", "fixed-weights", "per-expert", "reestimate-50", "rank-4",
            "rank-64", "shared-lr-2", "tracker-2"} <= variants
    assert cfg.seeds >= 3
    assert {s.style for s in specs if s.lr_mult == 4.0} == set(cfg.styles)
    for s in specs:
        rc = s.run_config(cfg)
        assert rc.name == s.run_id
        rc.sdmoe.validate()  # every override is a real, valid SDMoEConfig value
        if s.variant.startswith("rank-"):
            assert rc.sdmoe.rank == int(s.variant.split("-")[1])


def test_unknown_variant_and_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="unknown compare variant"):
        variant_overrides("sd-moe-turbo")
    for removed in ("router-residual", "normalized-tails", "tracker-lag", "tail-lr-2"):  # 0.3, docs/CHANGELOG.md
        with pytest.raises(UserError, match=f"unknown compare variant '{removed}'"):
            variant_overrides(removed)
    with pytest.raises(UserError, match="baseline"):
        plan(CompareConfig(variants=["sd-moe"]))
    with pytest.raises(UserError, match="style"):
        plan(CompareConfig(styles=["gpt2"]))
    with pytest.raises(UserError, match="include 1"):
        plan(CompareConfig(lr_multipliers=[2.0]))


def test_config_round_trips():
    cfg = compare_preset("paper")
    assert CompareConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UserError, match="unknown compare setting"):
        CompareConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_the_lab_compare_pairs_its_seeds_at_the_baselines_tuned_rate():
    """The lab preset's paired seeds run at 6e-3 (the baseline's best rate, docs/results.md), its rate grid
    around it; a --set given later still wins."""
    cfg = compare_preset("lab")
    rates = {s.lr_mult: s.run_config(cfg).optim.lr for s in plan(cfg) if s.variant == "baseline"}
    assert rates[1.0] == pytest.approx(6e-3) and rates[0.5] == pytest.approx(3e-3) and max(rates) == 4.0
    cfg.overrides = [*cfg.overrides, "optim.lr=0.012"]
    paired = [s.run_config(cfg).optim.lr for s in plan(cfg) if s.lr_mult == 1.0]
    assert paired and paired == pytest.approx([1.2e-2] * len(paired))
