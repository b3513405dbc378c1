"""Every plot returns a PNG from plain numbers."""

import numpy as np

from sdmoe.report import plots


def _is_png(b):
    return isinstance(b, bytes) and b[:8] == b"\x89PNG\r\n\x1a\n" and len(b) > 500


def test_all_plots(tmp_path):
    o = np.eye(4).tolist()
    assert _is_png(plots.overlap_heatmaps({"gate": o, "up": o, "down": o}, "t"))
    assert _is_png(plots.spectra_plot({"gate": [[3, 2, 1], [2, 1, 0.5]], "one": [1, 0.1]}))
    assert _is_png(plots.data_spectrum_plot({"L0": [5, 1, 0.1, 0.01]}, k=2))
    assert _is_png(plots.bars_vs_baseline({"a": 0.3}, 0.1))
    assert _is_png(plots.grouped_bars({"L0": {"gate": 0.2, "up": 0.3}, "L1": {"gate": 0.1}}, 0.05))
    assert _is_png(plots.load_bars([0.7, 0.1, 0.1, 0.1]))
    assert _is_png(plots.coactivation_heatmap(o))
    p = plots.save_png(tmp_path / "x.png", plots.load_bars([0.5, 0.5]))
    assert _is_png(p.read_bytes())
