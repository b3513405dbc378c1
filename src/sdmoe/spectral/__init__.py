"""Pure linear algebra for SD-MoE: subspaces, overlaps, spectra, tracking.

Tensors in, numbers out; no models. Every subspace lives in the hidden space
R^D and every matrix passed in has its last dim = D (transpose down
projections, stored D x F, to F x D first). Computation is float32 (float64
for float64 input or when asked), also for bf16/fp16 input, on any device.
"""

from .overlap import (
    mean_expert_overlap,
    mean_off_diagonal,
    overlap_matrix,
    random_overlap_baseline,
    subspace_overlap,
)
from .spectra import (
    SecondMoment,
    data_subspace,
    energy_share,
    lowrank_share,
    projected_share,
    second_moment,
    singular_values,
)
from .subspace import common_subspace, expert_subspaces, top_subspace
from .tracking import SubspaceTracker, exact_top, subspace_error, subspace_iteration

__all__ = [
    "top_subspace",
    "expert_subspaces",
    "common_subspace",
    "subspace_overlap",
    "overlap_matrix",
    "mean_off_diagonal",
    "mean_expert_overlap",
    "random_overlap_baseline",
    "energy_share",
    "singular_values",
    "lowrank_share",
    "second_moment",
    "SecondMoment",
    "data_subspace",
    "projected_share",
    "SubspaceTracker",
    "subspace_iteration",
    "exact_top",
    "subspace_error",
]
