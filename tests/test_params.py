"""Parameters checked before anything loads (repro.params): names, types (papermill strings
included), ranges from each dataclass's validate()."""
from __future__ import annotations

import ast

import pytest

from repro import params as P
from repro.experiment import SequentialParams


# ---- checking and coercing values ----------------------------------------------------------------
@pytest.mark.parametrize("value", ["abc", "2", 2.5, True, None, [2]])
def test_a_bad_integer_is_refused_naming_the_parameter(value):
    with pytest.raises(ValueError, match=r"n_edits must be an integer, got " + repr(value).replace("[", r"\[")):
        P.build(SequentialParams, {"n_edits": value})


@pytest.mark.parametrize("text,want", [("false", False), ("False", False), ("0", False), ("no", False),
                                       ("true", True), ("True", True), ("1", True), (False, False)])
def test_booleans_from_papermill_strings(text, want):
    _, nb = P.build(SequentialParams, {"overwrite": text}, P.Overwrite)
    assert nb.overwrite is want


@pytest.mark.parametrize("text", ["maybe", "", "off!", 1, None, []])
def test_anything_else_is_no_boolean(text):
    with pytest.raises(ValueError, match="overwrite must be true/false"):
        P.build(SequentialParams, {"overwrite": text}, P.Overwrite)


def test_unknown_names_are_listed_with_the_allowed_ones_and_all_problems_reported():
    with pytest.raises(ValueError) as err:
        P.build(SequentialParams, {"n_edit": 5, "batch_size": "x", "seed": 0.5})
    msg = str(err.value)
    assert "unknown parameter 'n_edit'" in msg and "allowed: model, editor, n_edits" in msg
    assert "batch_size must be an integer, got 'x'" in msg and "seed must be an integer, got 0.5" in msg


def test_types_of_the_other_annotations():
    from repro.layer_sweep import LayerSweepParams
    from repro.training import TrainParams

    p = P.build(TrainParams, {"lr": 1, "lora_targets": ["q", "v"], "device": None})
    assert p.lr == 1.0 and isinstance(p.lr, float) and p.lora_targets == ["q", "v"]
    for bad, match in [({"lr": "1e-4"}, "lr must be a number"), ({"device": 3}, "device must be a string or None"),
                       ({"lora_targets": "q"}, "lora_targets must be a list of strings or None"),
                       ({"intervention": None}, "intervention must be a string")]:
        with pytest.raises(ValueError, match=match):
            P.build(TrainParams, bad)
    with pytest.raises(ValueError, match="layers must be a list of integers"):
        P.build(LayerSweepParams, {"layers": [3, "6"]})
    with pytest.raises(ValueError, match="hparams must be a mapping"):
        P.build(SequentialParams, {"hparams": "{}"})


@pytest.mark.parametrize("values,match", [({"n_edits": 0}, "n_edits must be >= 1"),
                                          ({"batch_size": 0}, "batch_size must be >= 1"),
                                          ({"measure_at": [5], "n_edits": 3}, "measure_at"),
                                          ({"collapse": {"nope": 1}}, "nope")])
def test_ranges_come_from_the_dataclass_validate(values, match):
    with pytest.raises((ValueError, TypeError), match=match):
        P.build(SequentialParams, values)


def test_the_notebook_namespace_is_checked_misspelt_names_included():
    ns = {**P.defaults(SequentialParams), "overwrite": "false", "In": [], "_": 3, "np": ast}
    params, nb = P.from_notebook(SequentialParams, ns, P.Overwrite)
    assert params == SequentialParams() and nb.overwrite is False
    with pytest.raises(ValueError, match="unknown parameter 'n_edit'"):
        P.from_notebook(SequentialParams, {**ns, "n_edit": 5}, P.Overwrite)
    with pytest.raises(ValueError, match="n_edits must be an integer, got 'abc'"):
        P.from_notebook(SequentialParams, {**ns, "n_edits": "abc"}, P.Overwrite)


