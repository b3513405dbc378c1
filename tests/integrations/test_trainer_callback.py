"""SDMoETrainerCallback inside a real (tiny, CPU) transformers.Trainer run."""

import math

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import sdmoe
from sdmoe.integrations import SDMoETrainerCallback
from sdmoe.method import SDMoEConfig
from sdmoe.models import ModelConfig, build_model

STEPS, SPLIT, MAX_NORM = 10, 4, 0.05


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, vocab, n=64, seq=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Probe(TrainerCallback):
    """Listed after SDMoETrainerCallback: sees the gradients it split and clipped, and the lrs it scheduled.

    An optimizer step pre-hook registered after the driver's (torch runs them in that order)."""

    def __init__(self, cb):
        self.cb, self.norms, self.lrs = cb, {}, {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        self.state, self.model = state, model
        self.cb.handle.optimizer.register_step_pre_hook(self._after_split_and_clip)

    def _after_split_and_clip(self, optimizer, *_):
        step = self.state.global_step
        shared = self.cb.controller.parameters()  # the shared parts' gradients are clipped with the model's
        grads = [p.grad for p in [*self.model.parameters(), *shared] if p.grad is not None]
        self.norms[step] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        self.lrs[step] = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}

    def on_optimizer_step(self, args, state, control, **kw):
        if (opt := self.cb.controller.shared_optimizer) is not None:  # the rate the shared step just used
            self.lrs[state.global_step]["sdmoe.shared"] = opt.param_groups[0]["lr"]


def _model(vocab):
    cfg = ModelConfig(style="qwen3_moe", hidden_size=32, num_layers=2, num_heads=2, num_experts=4, top_k=2,
                      expert_ffn=32)
    return build_model(cfg, vocab_size=vocab, seed=0)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=3e-3,
                lr_scheduler_type="linear", logging_steps=2, save_strategy="no", report_to=[], use_cpu=True,
                max_grad_norm=MAX_NORM, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _orthogonality(ctl):
    worst = 0.0
    for li, layer in enumerate(ctl.layers):
        for p, t in ctl.tails(li).items():
            u = layer.basis[p].to(t.dtype)
            worst = max(worst, float((t @ u).norm() / t.norm()))
    return worst


def test_trainer_splits_schedules_clips_and_exports(tmp_path):
    model = _model(256)
    cb = SDMoETrainerCallback(SDMoEConfig(split_step=SPLIT, gradient_split="fixed", rank=4, lr_shared_mult=0.5),
                              monitor_every=4)
    probe = Probe(cb)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=RandomTokens(256), callbacks=[cb, probe])
    trainer.train()

    ctl = cb.controller
    assert ctl.split_done and cb.split_at == SPLIT
    assert _orthogonality(ctl) < 1e-5  # fixed mode: tails re-projected against U after every step
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) >= STEPS // 2 and all(math.isfinite(v) for v in losses)

    # The Trainer's optimizer trains the experts (the tails) in the group it put them in, the shared optimizer
    # the shared parts, on the scheduler's curve times lr_shared_mult, every step after the split.
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    experts = {id(p) for b in ctl.blocks for p in b.host_parameters()}
    assert all(p in opt.state for g in opt.param_groups for p in g["params"] if id(p) in experts)
    for step in range(SPLIT, STEPS):
        lrs = probe.lrs[step]
        ref = next(v for k, v in lrs.items() if not k.startswith("sdmoe"))
        assert lrs["sdmoe.shared"] == pytest.approx(0.5 * ref, rel=1e-6)
    assert probe.lrs[STEPS - 1]["sdmoe.shared"] < probe.lrs[SPLIT]["sdmoe.shared"]  # decays, not frozen
    # Clipping follows the split: the norm is exactly max_grad_norm (a clip before the split would leave it
    # below, the split being a projection); and the Trainer's own clipping is handed back afterwards.
    for step in range(SPLIT, STEPS):
        assert probe.norms[step] == pytest.approx(MAX_NORM, rel=5e-5)
    assert trainer.args.max_grad_norm == MAX_NORM

    # The monitor joined the Trainer's log.
    logged = [r for r in trainer.state.log_history if "sdmoe/param_overlap/mean" in r]
    assert [r["step"] for r in logged] == [4, 8]
    assert "sdmoe/tails_overlap/mean" in logged[-1] and any("sdmoe/split_at" in r for r in trainer.state.log_history)

    # Export: a plain transformers model with the same function.
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    trainer.model.eval()
    with torch.no_grad():
        before = trainer.model(input_ids=ids).logits
    sdmoe.export(trainer.model)
    assert not any("sdmoe" in n for n, _ in trainer.model.named_parameters())
    trainer.model.save_pretrained(tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "export", trust_remote_code=False).eval()
    with torch.no_grad():
        after = plain(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_split_at_init_own_groups_and_per_step(tmp_path):
    """split_step=0 splits before the Trainer builds its optimizer (the multi-process path); the shared
    optimizer follows the scheduler's rate times its multiplier."""
    model = _model(256)
    cb = SDMoETrainerCallback(SDMoEConfig(split_step=0, gradient_split="per_step", rank=4, lr_shared_mult=2.0))
    probe = Probe(cb)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=RandomTokens(256),
                      callbacks=[cb, probe])
    assert cb.controller.split_done and cb.split_at == 0  # at Trainer construction, before train()
    trainer.train()
    for step in range(4):
        lrs = probe.lrs[step]
        ref = next(v for k, v in lrs.items() if not k.startswith("sdmoe"))
        assert lrs["sdmoe.shared"] == pytest.approx(2.0 * ref, rel=1e-6)
    assert all(math.isfinite(r["loss"]) for r in trainer.state.log_history if "loss" in r)
    qs = [q for layer in cb.controller.layers for q in layer.q.values()]
    assert all(float(q.abs().sum()) > 0 for q in qs)  # the tracker ran


def test_gradient_accumulation_and_split_step_counts_optimizer_steps(tmp_path):
    model = _model(256)
    cb = SDMoETrainerCallback(SDMoEConfig(split_step=2, gradient_split="fixed", rank=4))
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=4, gradient_accumulation_steps=2,
                                              per_device_train_batch_size=2),
                      train_dataset=RandomTokens(256), callbacks=[cb])
    trainer.train()
    assert cb.split_at == 2 and _orthogonality(cb.controller) < 1e-5


def test_multi_process_needs_split_at_init(monkeypatch):
    from types import SimpleNamespace

    from sdmoe.errors import UserError

    cb = SDMoETrainerCallback(SDMoEConfig(split_step=3))
    args = SimpleNamespace(world_size=2, max_grad_norm=1.0, fp16=False)
    with pytest.raises(UserError, match="split_step=0"):
        cb.on_train_begin(args, None, None, model=_model(64))
