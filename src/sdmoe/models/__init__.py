from sdmoe.models.build import (
    STYLES,
    ModelConfig,
    build_model,
    count_parameters,
    to_hf_config,
)

__all__ = ["STYLES", "ModelConfig", "build_model", "count_parameters", "to_hf_config"]
