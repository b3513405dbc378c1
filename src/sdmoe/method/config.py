"""SD-MoE configuration: every variant of the method is a value here.

See docs/design (sd-moe-spec.md, "The method") for the math. `validate`
checks everything that can be checked without a model; `resolve_ranks`
checks the ranks against the model's hidden size and layer count.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdmoe.errors import UserError

MODES = ("shared", "per_expert")
SHARED_FORMS = ("full", "lowrank")
GRADIENT_SPLITS = ("per_step", "fixed", "none")
BASIS_SOURCES = ("weights", "gradients", "activations")
ROUTER_INPUTS = ("full", "residual")
PROJECTIONS = ("gate", "up", "down")


@dataclass
class SDMoEConfig:
    # "shared": W_i = shared + T_i (training); "per_expert": W_i = A_i U^T + T_i, A_i = W_i U
    # (exact, function-preserving conversion of a trained model).
    mode: str = "shared"
    # shared mode only. "full": W_i = W_s + T_i, W_s a full F x D matrix (the experts' mean at
    # the split); "lowrank": W_i = A U^T + T_i, A: F x r shared (needs a fixed basis).
    shared_form: str = "full"
    # "per_step": every step Q = tracked top-r of the experts' gradients; tails get G_i (I - QQ^T),
    #   the shared part sum_i G_i QQ^T.
    # "fixed": Q = U (the layer's basis); tails re-projected against U after every optimizer step.
    # "none": the control: same reparameterisation, plain autograd gradients.
    gradient_split: str = "per_step"
    rank: int | list[int] = 0  # common rank r per layer (one number or a per-layer list); 0 -> d // 4
    basis_source: str = "weights"  # "weights" | "gradients" | "activations"
    split_step: int = 100  # train as a plain MoE before this step, then split (0 = split at once)
    reestimate_every: int = 0  # re-estimate U every K steps after the split (0 = never)
    tracker_iters: int = 1  # warm-started subspace iterations per step (per_step)
    tracker_oversample: int = 0  # extra tracked columns (Rayleigh-Ritz picks the best r)
    exact_every: int = 0  # per_step: exact top-r every K steps (0 = never); measures tracker drift
    lr_shared_mult: float = 1.0
    lr_tail_mult: float = 1.0
    normalize_tail_updates: bool = False  # rescale each projected tail gradient to its unprojected norm
    router_input: str = "full"  # "full" | "residual" (router sees x minus its top-r data directions)
    projections: tuple[str, ...] = ("gate", "up", "down")
    basis_batches: int = 4  # batches (steps before the split) accumulated for gradient/activation bases

    def validate(self) -> "SDMoEConfig":
        """Raise UserError (one line, naming what is supported) for a config that cannot work."""
        _choice("mode", self.mode, MODES)
        _choice("shared_form", self.shared_form, SHARED_FORMS)
        _choice("gradient_split", self.gradient_split, GRADIENT_SPLITS)
        _choice("basis_source", self.basis_source, BASIS_SOURCES)
        _choice("router_input", self.router_input, ROUTER_INPUTS)
        if isinstance(self.projections, str) or not self.projections:
            raise UserError(f"sdmoe.projections must be a non-empty list drawn from {list(PROJECTIONS)}, "
                            f"got {self.projections!r}")
        for p in self.projections:
            _choice("sdmoe.projections entry", p, PROJECTIONS)
        if len(set(self.projections)) != len(tuple(self.projections)):
            raise UserError(f"sdmoe.projections has duplicates: {list(self.projections)}; list each of "
                            f"{list(PROJECTIONS)} at most once")
        if self.mode == "shared" and self.shared_form == "lowrank" and self.gradient_split == "per_step":
            raise UserError(
                "shared_form='lowrank' keeps the shared part in a fixed basis U, but gradient_split='per_step' "
                "moves Q every step; use shared_form='full' with per_step, or gradient_split 'fixed' or 'none'"
            )
        for name in ("split_step", "reestimate_every", "tracker_oversample", "exact_every"):
            _nonneg_int(name, getattr(self, name), 0)
        for name in ("tracker_iters", "basis_batches"):
            _nonneg_int(name, getattr(self, name), 1)
        for name in ("lr_shared_mult", "lr_tail_mult"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise UserError(f"sdmoe.{name} must be a number >= 0, got {v!r}")
        ranks = self.rank if isinstance(self.rank, (list, tuple)) else [self.rank]
        for r in ranks:
            if isinstance(r, bool) or not isinstance(r, int):
                raise UserError(f"sdmoe.rank must be an int or a list of ints (0 = d // 4), got {self.rank!r}")
        return self

    def resolve_ranks(self, hidden_size: int, num_layers: int) -> list[int]:
        """Per-layer common rank r (0 -> d // 4); 1 <= r <= d - 1 (d = hidden size)."""
        d = hidden_size
        if isinstance(self.rank, (list, tuple)):
            if len(self.rank) != num_layers:
                raise UserError(f"sdmoe.rank lists {len(self.rank)} ranks but the model has {num_layers} MoE "
                                f"layers; give one rank per MoE layer or a single number")
            ranks = [int(r) for r in self.rank]
        else:
            ranks = [int(self.rank)] * num_layers
        ranks = [d // 4 if r == 0 else r for r in ranks]
        for r in ranks:
            if r <= 0 or r >= d:
                raise UserError(f"sdmoe.rank={r} is out of range; rank must be in 1..d-1 (d={d}), or 0 for d // 4")
        return ranks


def _choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"unknown {name} {value!r}; supported: {', '.join(repr(a) for a in allowed)}")


def _nonneg_int(name: str, v, minimum: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise UserError(f"sdmoe.{name} must be an int >= {minimum}, got {v!r}")
