"""SD-MoE configuration: every variant of the method is a value here.

See docs/design (sd-moe-spec.md, "The method") for the math. Each field's type
and range are declared next to it (`sdmoe.config_fields`); `validate` checks
them and the rules between fields that need no model; `resolve_ranks` checks
the ranks against the model's hidden size and layer count. Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from sdmoe.config_fields import check_tree, setting
from sdmoe.errors import UserError

Form = Literal["full", "lowrank", "per_expert"]
GradientSplit = Literal["per_step", "fixed", "none"]
BasisSource = Literal["weights", "gradients", "activations"]
RouterInput = Literal["full", "residual"]
Projection = Literal["gate", "up", "down"]

FORMS = get_args(Form)
GRADIENT_SPLITS = get_args(GradientSplit)
BASIS_SOURCES = get_args(BasisSource)
ROUTER_INPUTS = get_args(RouterInput)
PROJECTIONS = get_args(Projection)


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
    basis_source: BasisSource = "weights"
    # train as a plain MoE before this step, then split
    split_step: int = setting(100, ge=0, note="0 = split at once")
    reestimate_every: int = setting(0, ge=0, note="0 = never")  # re-estimate U every K steps after the split
    tracker_iters: int = setting(1, ge=1)  # warm-started subspace iterations per step (per_step)
    tracker_oversample: int = setting(0, ge=0)  # extra tracked columns (Rayleigh-Ritz picks the best r)
    # per_step: exact top-r every K steps; measures tracker drift
    exact_every: int = setting(0, ge=0, note="0 = never")
    lr_shared_mult: float = setting(1.0, ge=0, note="0 = freeze the shared part")
    lr_tail_mult: float = setting(1.0, ge=0, note="0 = freeze the tails")
    normalize_tail_updates: bool = False  # rescale each projected tail gradient to its unprojected norm
    router_input: RouterInput = "full"  # "residual": the router sees x minus its top-r data directions
    projections: tuple[Projection, ...] = setting(("gate", "up", "down"), min_len=1, unique=True)
    # batches (steps before the split) accumulated for gradient/activation bases
    basis_batches: int = setting(4, ge=1)

    def validate(self) -> "SDMoEConfig":
        """Raise UserError (one line, naming what is supported) for a config that cannot work."""
        check_tree(self, "sdmoe")
        if self.form == "lowrank" and self.gradient_split == "per_step":
            raise UserError(
                "form='lowrank' keeps the shared part in a fixed basis U, but gradient_split='per_step' "
                "moves Q every step; use form='full' with per_step, or gradient_split 'fixed' or 'none'"
            )
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


def upgrade_saved(section: dict) -> dict:
    """A saved `sdmoe` section in today's keys: sdmoe 0.1 wrote the decomposition as two fields,
    `mode` ("shared" | "per_expert") and `shared_form` ("full" | "lowrank"), now one `form`."""
    if "mode" not in section and "shared_form" not in section:
        return section
    out = {k: v for k, v in section.items() if k not in ("mode", "shared_form")}
    out.setdefault("form", "per_expert" if section.get("mode") == "per_expert" else section.get("shared_form", "full"))
    return out
