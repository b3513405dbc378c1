"""SD-MoE under torch.compile: the whole model (compiled before or after `attach`, or in place), each decoder
block, and the Trainer's `torch_compile=True` train as the eager model does, and export a plain checkpoint.

The fast cases compile with `backend="aot_eager"`: dynamo's tracing and AOTAutograd's joint graph (where the
model's forward pre-hook used to be traced into, and the split with it), without inductor's C++ code generation
(about 60 s per model on this CPU). The `slow` cases repeat them with inductor.

Tolerances. Losses: relative 1e-5 (measured over the 5 steps, float32: at most 1.7e-7 with aot_eager, 2.6e-7
with inductor; the compiled graph orders a few sums differently). Weights: 1e-2 of how far training moved them
(measured: SD-MoE 3.5e-5 with aot_eager, 1.9e-3 with inductor; the baseline 1.7e-6 and 5.1e-5). The split
leaves gradient entries at rounding level (the tails' part inside the basis) and AdamW divides them by their own
root mean square, so a last-bit difference becomes a step of its own size: with eps=1e-4 instead of 1e-8 the
SD-MoE run agrees to 2.8e-6, as the baseline does. A run that split one step late, or not at all, misses by
about 1 (the whole movement), a hundred times the tolerance.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import Trainer, TrainingArguments

import sdmoe
from sdmoe.errors import UserError
from sdmoe.integrations import SDMoETrainerCallback
from sdmoe.method import SDMoE, SDMoEConfig
from sdmoe.method.hooks import attached

from .method_helpers import VOCAB, batch, lm_loss, make_model

BACKEND = "aot_eager"
STEPS, SPLIT, CLIP = 5, 1, 0.5  # split at step 1: inside the compiled run, after its first compilation
LOSS_RTOL, WEIGHT_TOL = 1e-5, 1e-2


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles from scratch: a cache filled by an earlier test (or dynamo's recompile limit, past
    which it runs the frame eagerly with only a warning) must not make a compiled run an eager one."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _compile(model: torch.nn.Module, how: str, backend: str) -> torch.nn.Module:
    """The model the loop calls: compiled whole ('before', 'after': a wrapper; 'inplace': `Module.compile`), or
    each decoder layer compiled in place ('blocks') or replaced by its compiled wrapper, as torchtitan does
    ('blocks-replaced': the wrapper's `_orig_mod.` then is in the parameters' names, by the caller's choice)."""
    if how == "inplace":
        model.compile(backend=backend)
        return model
    if how.startswith("blocks"):
        layers = model.model.layers
        for i, layer in enumerate(layers):
            if how == "blocks":
                layer.compile(backend=backend)
            else:
                layers[i] = torch.compile(layer, backend=backend)
        return model
    return torch.compile(model, backend=backend)


def _train(kind: str, cfg: SDMoEConfig | None, how: str = "eager", backend: str = BACKEND):
    """STEPS steps of a plain loop with `sdmoe.attach`; the model compiled `how` (or eager). Returns the
    losses, the plain model, the handle and the steps it split at."""
    model = make_model(kind)
    run = _compile(model, how, backend) if how == "before" else model  # "eager": not compiled
    opt = torch.optim.AdamW(run.parameters(), lr=1e-2, weight_decay=0.1)
    handle = sdmoe.attach(run, opt, cfg, max_norm=CLIP)
    if how not in ("before", "eager"):
        run = _compile(model, how, backend)
    split_at: list[int] = []
    handle.on("split", lambda step, record: split_at.append(step))
    losses = []
    for step in range(STEPS):
        loss = lm_loss(run, batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model, handle, split_at


@torch.no_grad()
def _weight_gap(a: torch.nn.Module, b: torch.nn.Module, kind: str) -> float:
    """The largest ||a - b|| over how far b moved from the initial weights, over parameters."""
    start = dict(make_model(kind).named_parameters())
    return max(float((pa - pb).norm() / (pb - start[n]).norm()) for (n, pb), pa in
               zip(b.named_parameters(), a.parameters()))


def _compare(kind: str, sd: bool, how: str, backend: str = BACKEND) -> dict:
    """The same training eager and compiled `how`; what `_assert_like_eager` checks."""
    cfg = (lambda: SDMoEConfig(split_step=SPLIT)) if sd else (lambda: None)
    eager_losses, eager, *_ = _train(kind, cfg())
    losses, model, handle, split_at = _train(kind, cfg(), how, backend)
    return dict(kind=kind, sd=sd, how=how, eager_losses=eager_losses, eager=eager, losses=losses, model=model,
                handle=handle, split_at=split_at, graphs=counters["stats"]["unique_graphs"])


def _assert_like_eager(run: dict) -> None:
    kind, model, eager = run["kind"], run["model"], run["eager"]
    assert run["graphs"] > 0  # it did compile
    torch.testing.assert_close(run["losses"], run["eager_losses"], rtol=LOSS_RTOL, atol=0)
    assert _weight_gap(model, eager, kind) < WEIGHT_TOL
    if run["how"] != "blocks-replaced":
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in eager.named_parameters()]  # no _orig_mod.
    if run["sd"]:
        handle = run["handle"]
        assert run["split_at"] == [SPLIT] and handle.controller.split_done and handle.step == STEPS
        assert _weight_gap(eager, _train(kind, None)[1], kind) > 10 * WEIGHT_TOL  # the split changed training


@pytest.fixture(scope="module")
def compiled_before_attach():
    """Mixtral compiled, then attached (`attach` gets the wrapper) and trained: compared and exported below."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    counters.clear()
    try:
        yield _compare("mixtral", True, "before")
    finally:
        torch.set_num_threads(threads)


def test_a_model_compiled_before_attach_trains_sd_moe_like_the_eager_one(compiled_before_attach):
    _assert_like_eager(compiled_before_attach)


@pytest.mark.parametrize(("kind", "how"), [("qwen3_moe", "after"),
                                           pytest.param("mixtral", "blocks", marks=pytest.mark.slow)])
def test_a_model_compiled_after_attach_or_by_blocks_trains_sd_moe_like_the_eager_one(kind, how):
    _assert_like_eager(_compare(kind, True, how))


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "how", "sd"), [("qwen3_moe", "before", False), ("mixtral", "after", False),
                                                 ("qwen3_moe", "inplace", True),
                                                 ("qwen3_moe", "blocks-replaced", True)])
def test_more_ways_to_compile_train_like_eager(kind, how, sd):
    _assert_like_eager(_compare(kind, sd, how))


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "how", "sd"), [("qwen3_moe", "after", True), ("mixtral", "before", True),
                                                 ("qwen3_moe", "before", False), ("mixtral", "blocks", True),
                                                 ("qwen3_moe", "inplace", True)])
def test_inductor_trains_like_eager(kind, how, sd):
    _assert_like_eager(_compare(kind, sd, how, backend="inductor"))


@pytest.mark.slow
def test_collection_windows_under_compile():
    """Activation bases: the routers' input moments, collected over a window by hooks in the MoE blocks,
    inside the compiled graph."""
    def cfg():
        return SDMoEConfig(split_step=3, basis_source="activations", basis_batches=2)

    eager_losses, eager, *_ = _train("qwen3_moe", cfg())
    losses, model, _, split_at = _train("qwen3_moe", cfg(), "after")
    assert split_at == [3]
    torch.testing.assert_close(losses, eager_losses, rtol=LOSS_RTOL, atol=0)
    assert _weight_gap(model, eager, "qwen3_moe") < WEIGHT_TOL


def test_export_of_a_compiled_model_saves_a_plain_checkpoint(compiled_before_attach, tmp_path):
    from transformers import AutoModelForCausalLM

    model = compiled_before_attach["model"]
    plain = sdmoe.export(model)
    assert plain is model and attached(model) is None
    assert not any("_orig_mod" in k for k in plain.state_dict())
    plain.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for (k, a), b in zip(plain.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_attach_to_a_compiled_model_drives_the_module_under_it():
    model = make_model("mixtral")
    compiled = torch.compile(model, backend=BACKEND)  # wrapping compiles nothing yet
    opt = torch.optim.AdamW(compiled.parameters(), lr=1e-2)
    handle = sdmoe.attach(compiled, opt, SDMoEConfig(split_step=SPLIT))
    eager_names = [b.name for b in SDMoE(make_model("mixtral"), SDMoEConfig()).blocks]
    assert handle.model is model and [b.name for b in handle.controller.blocks] == eager_names
    assert len(eager_names) == 2
    with pytest.raises(UserError, match="already attached"):
        sdmoe.attach(model, opt, SDMoEConfig(split_step=SPLIT))  # the same model, eager or compiled
    assert sdmoe.export(compiled) is model  # the wrapper's export detaches the driver
    assert attached(model) is None and not handle._handles and not opt._optimizer_step_pre_hooks


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32, seq=16):
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer_run(tmp_path, compile_: bool):
    model = make_model("qwen3_moe")
    cb = SDMoETrainerCallback(SDMoEConfig(split_step=SPLIT))
    args = TrainingArguments(output_dir=str(tmp_path / f"out{int(compile_)}"), max_steps=4, logging_steps=1,
                             per_device_train_batch_size=4, learning_rate=1e-2, max_grad_norm=CLIP,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                             dataloader_num_workers=0, **({"torch_compile_backend": BACKEND} if compile_ else {}))
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[cb])
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], model, cb


@pytest.mark.slow
def test_the_trainers_torch_compile_trains_like_eager(tmp_path):
    eager_losses, eager, _ = _trainer_run(tmp_path, False)
    losses, model, cb = _trainer_run(tmp_path, True)
    assert counters["stats"]["unique_graphs"] > 0 and cb.split_at == SPLIT
    torch.testing.assert_close(losses, eager_losses, rtol=LOSS_RTOL, atol=0)
    assert _weight_gap(model, eager, "qwen3_moe") < WEIGHT_TOL
