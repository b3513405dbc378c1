"""SD-MoE: shared/tail decomposition of MoE experts, spectral gradient split, convert/export."""

from .config import SDMoEConfig
from .controller import SDMoE
from .convert import convert, export

__all__ = ["SDMoEConfig", "SDMoE", "convert", "export"]
