"""One list of the expert projections: the layouts, the analysis and the method's config name the same three."""

from typing import get_args

from sdmoe.analysis import gradients, parameters
from sdmoe.method.config import Projection, SDMoEConfig
from sdmoe.moe import layout
from sdmoe.moe.projections import PROJECTIONS


def test_every_module_names_the_same_projections():
    assert PROJECTIONS == ("gate", "up", "down")
    # the config's Literal spells them out for type checkers: it must not drift from the constant
    assert get_args(Projection) == PROJECTIONS and SDMoEConfig().projections == PROJECTIONS
    assert layout.PROJECTIONS is PROJECTIONS and parameters.PROJECTIONS is PROJECTIONS
    assert gradients.PROJECTIONS is PROJECTIONS


def test_the_package_resolves_the_layout_on_first_use():
    # sdmoe.moe no longer imports the layout (torch) itself, so the torch-free sdmoe.method.config can
    # import the projections (tests/train/test_config.py checks it loads without torch)
    from sdmoe.moe import MoEBlock, find_moe_blocks

    assert MoEBlock is layout.MoEBlock and find_moe_blocks is layout.find_moe_blocks
