"""The paper's three findings and the functional signs, on a live model or a checkpoint on disk.

One file per finding (`parameters`, `gradients`, `gating`, `functional`), a
cheap training-time `monitor`, and `run` tying them together with the report.
"""

from sdmoe.analysis.functional import FunctionalFindings, functional_findings
from sdmoe.analysis.gating import GatingFindings, gating_findings, routing_agreement
from sdmoe.analysis.gradients import (
    DataSpectrum,
    GradientFindings,
    data_spectrum,
    gradient_findings,
    gradient_overlap,
)
from sdmoe.analysis.monitor import spectral_snapshot
from sdmoe.analysis.parameters import (
    ProjectionFindings,
    layer_findings,
    parameter_findings,
    projection_findings,
)
from sdmoe.analysis.run import AnalysisResult, analyze_model, analyze_path

__all__ = [
    "AnalysisResult",
    "analyze_model",
    "analyze_path",
    "spectral_snapshot",
    "ProjectionFindings",
    "projection_findings",
    "layer_findings",
    "parameter_findings",
    "GradientFindings",
    "DataSpectrum",
    "gradient_overlap",
    "data_spectrum",
    "gradient_findings",
    "GatingFindings",
    "gating_findings",
    "routing_agreement",
    "FunctionalFindings",
    "functional_findings",
]
