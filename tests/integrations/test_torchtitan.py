"""torchtitan's own MoE (`torchtitan.models.common.moe.MoE`: GroupedExperts, TokenChoiceTopKRouter,
LocalTokenDispatcher) and OptimizersContainer, on CPU, with SD-MoE through `sdmoe.integrations.torchtitan`.

The step below is torchtitan's `Trainer.train_step` in order (its Trainer itself needs a CUDA device):
zero_grad, forward/backward, `dist_utils.clip_grad_norm_` with the trainer's max_norm, the optimizers'
step (where the hooks run), the LR schedulers' step."""

import math

import pytest
import torch
from torch import nn

pytest.importorskip("torchtitan.models.common.moe", reason='needs the torchtitan extra: pip install "sdmoe[torchtitan]"')

import torch.distributed.checkpoint as dcp  # noqa: E402
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig  # noqa: E402
from torchtitan.config.configs import TrainingConfig  # noqa: E402
from torchtitan.distributed import utils as dist_utils  # noqa: E402
from torchtitan.models.common.linear import Linear  # noqa: E402
from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter  # noqa: E402
from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher  # noqa: E402

from sdmoe.integrations.torchtitan import SDMoETorchtitan, SDMoETrainer, attach  # noqa: E402
from sdmoe.method import SDMoEConfig, export  # noqa: E402
from sdmoe.moe import find_moe_blocks  # noqa: E402

from .stack_helpers import (  # noqa: E402
    LR,
    MAX_NORM,
    WD,
    assert_same_weights,
    loss_of,
    own_loop,
    tails_orthogonality,
    tokens,
    twin,
)

V, D, F, E, K = 64, 16, 24, 4, 2


class TinyTitan(nn.Module):
    """Embedding -> two of torchtitan's MoE layers (residual) -> head; `layers` as in torchtitan's decoders."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.tok_embeddings = nn.Embedding(V, D)
        self.layers = nn.ModuleDict({str(i): _Block() for i in range(2)})
        self.output = nn.Linear(D, V, bias=False)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "layers" in name:
                    p.normal_(0, 0.2)

    def forward(self, ids_BT):
        x_BTD = self.tok_embeddings(ids_BT)
        for block in self.layers.values():
            x_BTD = x_BTD + block.moe(x_BTD)
        return self.output(x_BTD)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.moe_enabled = True
        self.moe = MoE.Config(
            num_experts=E,
            routed_experts=RoutedExperts.Config(
                inner_experts=GroupedExperts.Config(dim=D, hidden_dim=F, num_experts=E),
                token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=K)),
            router=TokenChoiceTopKRouter.Config(num_experts=E, gate=Linear.Config(in_features=D, out_features=E),
                                                top_k=K, score_func="softmax"),
            load_balance_coeff=None,
        ).build()


def _optimizers(model) -> OptimizersContainer:
    cfg = OptimizersContainer.Config(
        param_groups=[ParamGroupConfig(pattern=r".*", optimizer_name="AdamW", optimizer_kwargs={
            "lr": LR, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": WD})],
        implementation="foreach")
    return cfg.build(model_parts=[model])


def _titan_steps(model, optimizers, batches, max_norm=math.inf):
    """torchtitan's train_step, in its order; max_norm is the trainer's (inf once SD-MoE took it over)."""
    for ids in batches:
        optimizers.zero_grad()
        loss_of(model, ids).backward()
        dist_utils.clip_grad_norm_([p for p in model.parameters()], max_norm, foreach=True)
        optimizers.step()


def test_layout_of_grouped_experts_aliases_their_storage():
    model = TinyTitan()
    blocks = find_moe_blocks(model)
    assert [b.layer for b in blocks] == [0, 1] and {b.layout for b in blocks} == {"stacked"}
    b = blocks[0]
    inner = model.layers["0"].moe.routed_experts.inner_experts
    assert (b.num_experts, b.hidden_size, b.expert_ffn) == (E, D, F)
    assert b.router is model.layers["0"].moe.router.gate
    views, _ = b.views("data")
    # w1 (E, F, D) is the gate as is; w2 (E, D, F) is the down projection, viewed with the hidden space last
    assert views["gate"].data_ptr() == inner.w1_EFD.data_ptr() and views["up"].data_ptr() == inner.w3_EFD.data_ptr()
    torch.testing.assert_close(b.down_EDF(), inner.w2_EDF)
    views["down"][1, 2, 3] = 7.0  # an edit through the view lands in their parameter
    assert float(inner.w2_EDF[1, 3, 2]) == 7.0


@pytest.mark.parametrize("split", ["per_step", "fixed"])
def test_hooks_match_our_loop(split):
    """Same gradients in, same update out: torchtitan's step with the hooks == the controller's own loop."""
    cfg = SDMoEConfig(split_step=2, gradient_split=split, rank=4)
    batches = tokens(V, 6)
    ours = TinyTitan()
    theirs = twin(ours)
    ref = own_loop(ours, cfg, batches)

    optimizers = _optimizers(theirs)
    sd = SDMoETorchtitan(theirs, optimizers, cfg, max_norm=MAX_NORM)
    _titan_steps(theirs, optimizers, batches)
    assert sd.step == 6 and sd.controller.split_done
    assert_same_weights(theirs, ours)
    for a, b in zip(sd.controller.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    if split == "fixed":
        assert tails_orthogonality(sd.controller) < 1e-5
    assert float(sd.last_norm) > MAX_NORM  # the clip was active, so the comparison covers it


def test_gradient_split_lands_in_their_grads():
    """After the pre-step hook, every expert gradient in w1/w3/w2 is a tail: orthogonal to the fixed basis U."""
    cfg = SDMoEConfig(split_step=0, gradient_split="fixed", rank=4)
    model = TinyTitan()
    optimizers = _optimizers(model)
    sd = SDMoETorchtitan(model, optimizers, cfg)
    seen = {}

    def probe(*_):  # registered after SD-MoE's hook: sees the split gradients
        for li, layer in enumerate(sd.controller.layers):
            views, _ = layer.block.views("grad")
            seen[li] = max(float((g @ layer.basis[p]).norm() / g.norm()) for p, g in views.items())
            seen[f"shared{li}"] = float(layer.delta["gate"].grad.norm())

    optimizers.register_step_pre_hook(probe)
    _titan_steps(model, optimizers, tokens(V, 1))
    assert seen[0] < 1e-5 and seen[1] < 1e-5
    assert seen["shared0"] > 0  # the part taken out went to the shared gradient


def test_resume_through_distributed_checkpoint(tmp_path):
    """DCP save of model + their OptimizersContainer + the SD-MoE Stateful, load into fresh ones: the
    resumed run continues exactly."""
    cfg = SDMoEConfig(split_step=1, gradient_split="per_step", rank=4)
    batches = tokens(V, 5)
    model = TinyTitan()
    optimizers = _optimizers(model)
    sd = SDMoETorchtitan(model, optimizers, cfg, max_norm=MAX_NORM)
    _titan_steps(model, optimizers, batches[:3])
    dcp.save({"model": model.state_dict(), "optimizer": optimizers, "sdmoe": sd}, checkpoint_id=str(tmp_path / "ck"))
    _titan_steps(model, optimizers, batches[3:])

    fresh = TinyTitan(seed=1)
    fresh_opt = _optimizers(fresh)
    fresh_sd = SDMoETorchtitan(fresh, fresh_opt, cfg, max_norm=MAX_NORM)
    state = {"model": fresh.state_dict(), "optimizer": fresh_opt, "sdmoe": fresh_sd}
    dcp.load(state, checkpoint_id=str(tmp_path / "ck"))
    fresh.load_state_dict(state["model"])
    assert fresh_sd.step == 3 and fresh_sd.controller.split_done
    _titan_steps(fresh, fresh_opt, batches[3:])
    assert_same_weights(fresh, model)


def test_attach_takes_the_clip_and_joins_the_checkpoint():
    from types import SimpleNamespace

    model = TinyTitan()
    trainer = SimpleNamespace(model_parts=[model], optimizers=_optimizers(model),
                              config=SimpleNamespace(training=TrainingConfig(max_norm=0.5)),
                              checkpointer=SimpleNamespace(states={}))
    sd = attach(trainer, SDMoEConfig(split_step=0, rank=4))
    assert trainer.checkpointer.states["sdmoe"] is sd and sd.max_norm == 0.5
    assert trainer.config.training.max_norm == math.inf
    export(model)  # the hooks are SD-MoE hooks: export removes the forward one
    assert not model._forward_pre_hooks


def test_trainer_config_carries_sdmoe():
    """The README's config function: a registered MoE config, SD-MoE on, built by SDMoETrainer."""
    from torchtitan.models.qwen3.config_registry import qwen3_30b_a3b

    base = qwen3_30b_a3b()
    cfg = SDMoETrainer.configure(base, SDMoEConfig(split_step=3))
    assert type(cfg)._owner is SDMoETrainer and cfg.sdmoe.split_step == 3
    assert cfg.model_spec is base.model_spec and cfg.training == base.training


def test_analysis_and_monitor_read_their_module():
    """`analyze_model` (forward, gradients, routing) and the spectral monitor run on torchtitan's live MoE."""
    from sdmoe.analysis import analyze_model
    from sdmoe.analysis.monitor import spectral_snapshot

    model = TinyTitan()
    res = analyze_model(model, tokens(V, 2), k=4, progress=False)
    assert res.meta["layers"] == [0, 1] and res.meta["num_experts"] == E
    snap = spectral_snapshot(model, 4)
    assert 0 < snap["param_overlap/mean"] <= 1
