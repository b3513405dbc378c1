"""SD-MoE configuration: every variant of the method is a value here.

See docs/spec.md ("The method") for the math. Each field's type
and range are declared next to it (`sdmoe.config_fields`); `validate` checks
them and the rules between fields that need no model; `resolve_ranks` checks
the ranks against the model's hidden size and layer count. The strings that
choose the gradient split (`gradient_split`, `projection_sides`, `form`) are
read once, by `split.split_rule`, into the rule object the rest of `method/`
asks. Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from sdmoe.config_fields import check_tree, setting
from sdmoe.errors import UserError
from sdmoe.moe.projections import PROJECTIONS

Form = Literal["full", "lowrank", "per_expert"]
GradientSplit = Literal["per_step", "fixed", "none"]
BasisSource = Literal["weights", "gradients", "activations", "shared"]
ProjectionSides = Literal["one", "two"]
BasisMethod = Literal["exact", "randomized"]
Projection = Literal["gate", "up", "down"]  # a type needs the literals: the same as PROJECTIONS (tests/moe)

FORMS = get_args(Form)
GRADIENT_SPLITS = get_args(GradientSplit)
BASIS_SOURCES = get_args(BasisSource)


@dataclass
class SDMoEConfig:
    # The decomposition W_i = C_i + T_i. "full": C = S, a full F x D matrix shared by the experts (their
    # mean at the split); "lowrank": C = A U^T, A: F x r shared (needs a fixed basis); "per_expert":
    # C_i = A_i U^T with A_i = W_i U (exact, function-preserving conversion of a trained model).
    form: Form = "full"
    # "per_step": every step Q = tracked top-r of the experts' gradients; tails get G_i (I - QQ^T),
    #   the shared part sum_i G_i QQ^T.
    # "fixed": Q = U (the layer's basis); tails re-projected against U after every optimizer step.
    # "none": the control: same reparameterisation, plain autograd gradients.
    gradient_split: GradientSplit = "per_step"
    # common rank r per layer (one number or a per-layer list); 0 -> d // 4; <= d - 1 (resolve_ranks)
    rank: int | list[int] = setting(0, ge=0, note="0 = d // 4")
    rank_fraction: float = setting(0.0, ge=0, lt=1, note="0 = use sdmoe.rank")  # r = round(fraction * d) instead
    # Where U comes from: the experts' weights (top-r of the stack), their gradients or the layer inputs
    # over the warm-up, or "shared": the shared weight S's own top-r singular vectors (the paper's).
    basis_source: BasisSource = "weights"
    # "one": split the hidden (d) side only: tails G_i (I - P_D). "two" (the paper's): both sides of the
    # shared weight's subspace, tails (I - P_F) G_i (I - P_D), shared part the rest (fixed bases, full form).
    projection_sides: ProjectionSides = "one"
    # "randomized": bases from weights or the shared weight by a randomized range finder (Gaussian
    # projection, power iterations, QR; the paper's) instead of an exact eigendecomposition.
    basis_method: BasisMethod = "exact"
    range_oversample: int = setting(8, ge=0)  # randomized: extra columns of the Gaussian projection
    # randomized: products with W^T W before the QR (1: one Gaussian projection of the Gram, then QR)
    range_power_iters: int = setting(1, ge=1)
    # recompute U (and the other side's basis) from its source every K steps after the split, without
    # changing any weight (the paper: every 16 steps from W_C); weights or shared bases only
    refresh_every: int = setting(0, ge=0, note="0 = never")
    # train as a plain MoE before this step, then split
    split_step: int = setting(100, ge=0, note="0 = split at once")
    reestimate_every: int = setting(0, ge=0, note="0 = never")  # re-estimate U every K steps after the split
    tracker_iters: int = setting(1, ge=1)  # warm-started subspace iterations per step (per_step)
    tracker_oversample: int = setting(0, ge=0)  # extra tracked columns (Rayleigh-Ritz picks the best r)
    # per_step: exact top-r every K steps; measures tracker drift
    exact_every: int = setting(0, ge=0, note="0 = never")
    # the shared part's rate: the experts' group's rate times this (the tails train at the group's own rate)
    lr_shared_mult: float = setting(1.0, ge=0, note="0 = freeze the shared part")
    projections: tuple[Projection, ...] = setting(PROJECTIONS, min_len=1, unique=True)
    # batches (steps before the split) accumulated for gradient/activation bases
    basis_batches: int = setting(4, ge=1)

    def validate(self) -> "SDMoEConfig":
        """Raise UserError (one line, naming what is supported) for a config that cannot work."""
        check_tree(self, "sdmoe")
        if self.projection_sides == "two":
            if self.form != "full" or self.gradient_split == "per_step":
                raise UserError("projection_sides='two' splits in fixed bases of the full shared weight: set "
                                "form='full' and gradient_split='fixed' (or 'none', the control)")
            if self.basis_source not in ("weights", "shared"):
                raise UserError(f"projection_sides='two' needs bases on both sides of the experts' matrices, which "
                                f"basis_source={self.basis_source!r} lacks; use basis_source 'shared' or 'weights'")
        if self.basis_source == "shared" and self.form != "full":
            raise UserError("basis_source='shared' takes U from the full shared weight S: set form='full'")
        if self.refresh_every and self.basis_source not in ("weights", "shared"):
            raise UserError(f"refresh_every recomputes U from the weights or the shared weight; with "
                            f"basis_source={self.basis_source!r} use reestimate_every, or refresh_every=0")
        if self.rank_fraction and self.rank != 0:
            raise UserError(f"sdmoe.rank={self.rank!r} and sdmoe.rank_fraction={self.rank_fraction} both set the "
                            "rank; set one of them (rank=0 or rank_fraction=0)")
        if self.form == "lowrank" and self.gradient_split == "per_step":
            raise UserError(
                "form='lowrank' keeps the shared part in a fixed basis U, but gradient_split='per_step' "
                "moves Q every step; use form='full' with per_step, or gradient_split 'fixed' or 'none'"
            )
        return self

    def resolve_ranks(self, hidden_size: int, num_layers: int) -> list[int]:
        """Per-layer common rank r (0 -> d // 4); 1 <= r <= d - 1 (d = hidden size)."""
        d = hidden_size
        if self.rank_fraction:
            r = max(1, round(self.rank_fraction * d))
            if r >= d:
                raise UserError(f"sdmoe.rank_fraction={self.rank_fraction} gives r={r}, not below d={d}; lower it")
            return [r] * num_layers
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


# Fields sdmoe 0.3 removed (docs/CHANGELOG.md), with the value that meant "off": a run saved by 0.2 with
# that value trains the same without them; any other value is refused where the run is read.
REMOVED = {"lr_tail_mult": 1.0, "tracker_lag": 0, "normalize_tail_updates": False, "router_input": "full"}


def upgrade_saved(section: dict) -> dict:
    """A saved `sdmoe` section in today's keys: sdmoe 0.1 wrote the decomposition as two fields,
    `mode` ("shared" | "per_expert") and `shared_form` ("full" | "lowrank"), now one `form`; 0.2's
    fields that 0.3 removed are dropped where they were off, and refused where they were not."""
    for key, off in REMOVED.items():
        if key in section and section[key] != off:
            raise UserError(f"this run set sdmoe.{key}={section[key]!r}, an option sdmoe 0.3 removed "
                            f"(docs/CHANGELOG.md); read or resume it with sdmoe 0.2")
    section = {k: v for k, v in section.items() if k not in REMOVED}
    if "mode" not in section and "shared_form" not in section:
        return section
    out = {k: v for k, v in section.items() if k not in ("mode", "shared_form")}
    out.setdefault("form", "per_expert" if section.get("mode") == "per_expert" else section.get("shared_form", "full"))
    return out
