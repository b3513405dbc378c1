"""The analysis report renders from a plain dict (no model needed), e.g. a saved analysis.json."""

from sdmoe.report.analysis import SECTION_TITLES, write_report


def test_renders_from_minimal_dict(tmp_path):
    d = {
        "meta": {"model": "m", "k": 2},
        "parameters": [{"layer": 0, "projection": p, "k": 2, "mean_overlap": 0.5, "baseline": 0.1, "ratio": 5.0,
                        "overlap": [[1, 0.5], [0.5, 1]], "singular_values": [[2, 1], [2, 1]],
                        "topk_energy": [0.9, 0.9], "common_energy": [0.8, 0.7], "common_baseline": 0.1}
                       for p in ("gate", "up", "down")],
        "functional": [{"layer": 0, "n_tokens": 10, "load": [0.9, 0.1], "load_entropy": 0.4, "shared_experts": [0],
                        "coactivation": [[0.9, 0], [0, 0.1]], "output_cosine_mean": None}],
    }
    paths = write_report(d, tmp_path)
    html = paths["report.html"].read_text()
    assert "data:image/png;base64" in html and "5.0x random: strong overlap" in html
    for t in SECTION_TITLES.values():
        assert t in html
    assert (tmp_path / "param_overlap_L0.png").is_file() and (tmp_path / "load_L0.png").is_file()
