"""Study profiles: validation and skipping of finished runs."""
from __future__ import annotations

import pytest

from repro import study


def test_default_profile_is_well_formed():
    runs = study.load_profile("default")
    assert {"rome_smollm2-135m_n100", "r-rome_smollm2-135m_n100"} <= {r.id for r in runs}
    for run in runs:
        assert (study.ROOT / run.notebook).exists()
        assert run.parameters["output"].startswith("data/runs/")


def test_unknown_profile_and_malformed_runs(tmp_path):
    with pytest.raises(ValueError, match="known"):
        study.load_profile("nope")
    bad = tmp_path / "s.yaml"
    bad.write_text("p:\n  - id: a\n    notebook: x.ipynb\n    parameters: {}\n")
    with pytest.raises(ValueError, match="parameters.output"):
        study.load_profile("p", bad)


def test_finished_runs_are_skipped(tmp_path, monkeypatch, capsys):
    prof = tmp_path / "s.yaml"
    prof.write_text("p:\n  - id: r1\n    notebook: notebooks/sequential_editing.ipynb\n"
                    f"    parameters: {{output: {tmp_path}/r1.nc}}\n")
    (tmp_path / "r1.nc").write_text("x")
    monkeypatch.setattr(study, "PROFILES", prof)
    monkeypatch.setattr(study, "EXECUTED", tmp_path)
    (tmp_path / "r1.ipynb").write_text("{}")
    monkeypatch.setattr(study, "execute", lambda *a, **k: pytest.fail("executed a finished run"))
    assert study.main(["--profile", "p"]) == 0
    assert "[skip] r1" in capsys.readouterr().out
