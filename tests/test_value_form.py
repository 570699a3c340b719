"""Runs made with the former value optimisation are told apart from those made with the published
one by the hyperparameters their files record, and the book marks them."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import xarray as xr

from repro.editors.locate import value_form
from repro.editors.memit import ENCOREHyperParams, MEMITHyperParams
from repro.editors.rome import ROMEHyperParams


def test_the_defaults_are_the_published_form():
    for cls, extra in ((ROMEHyperParams, {"layer": 1}), (MEMITHyperParams, {"layers": [1]}),
                       (ENCOREHyperParams, {"layers": [1]})):
        assert value_form(dataclasses.asdict(cls(**extra))) == "published", cls.__name__


@pytest.mark.parametrize("change", [{"v_weight_decay_form": "squared"}, {"kl_form": "former"}, {"early_stop": "nll"}])
def test_any_former_form_is_former(change):
    hp = dict(dataclasses.asdict(MEMITHyperParams(layers=[1])), **change)
    assert value_form(hp) == "former"


def test_files_from_before_the_forms_were_named_are_former_and_editors_without_values_are_neither():
    old = {"layer": 1, "v_steps": 20, "v_weight_decay": 0.5, "early_stop": "nll", "nll_stop": 0.05}
    assert value_form(old) == "former"
    assert value_form({"layer": 1, "steps": 25, "lr": 5e-4}) is None  # FT-L: no value optimisation


def _run(hparams: dict) -> xr.Dataset:
    n = 3
    ds = xr.Dataset({"weight_norm": (("step", "layer", "matrix"), np.ones((n + 1, 2, 1))),
                     "edited": (("layer", "matrix"), np.array([[1], [0]]))},
                    coords={"step": np.arange(n + 1), "layer": [0, 1], "matrix": ["mlp_down"], "edit": np.arange(n)})
    ds.attrs.update(editor="rome", run_id="r", hparams=json.dumps(hparams), params=json.dumps({"batch_size": 1}))
    return ds


def test_the_book_marks_former_runs():
    from repro.reporting.claims import FORMER_MARK, former_note, run_label
    from repro.reporting.tables import provenance_lines

    former = _run({"layer": 1, "v_steps": 20, "early_stop": "nll"})
    published = _run(dataclasses.asdict(ROMEHyperParams(layer=1)))
    assert run_label(former).endswith(FORMER_MARK) and not run_label(published).endswith(FORMER_MARK)
    assert "former value optimisation" in provenance_lines(former, "x.nc")
    assert "value optimisation" not in provenance_lines(published, "x.nc")
    note = former_note({"a": (former, "a.nc"), "b": (published, "b.nc")})
    assert note.startswith(f"{FORMER_MARK} 1 of these 2 runs") and run_label(former) in note
    assert former_note({"b": (published, "b.nc")}) == ""
