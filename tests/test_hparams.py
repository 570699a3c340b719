"""Editor hyperparameters outside their allowed ranges are refused when the editor is made,
naming the editor, the hyperparameter, the value and what is allowed."""
from __future__ import annotations

import pytest

from repro.editors import make_editor


@pytest.mark.parametrize("editor,override,match", [
    ("rome", {"cov_ridge": -1.0}, r"rome hyperparameter cov_ridge=-1\.0: must be a finite number >= 0"),
    ("rome", {"stats_tokens": 1}, r"stats_tokens=1: must be an integer >= 1000"),
    ("rome", {"clamp_norm_factor": float("inf")}, r"clamp_norm_factor=inf: must be a finite number"),
    ("rome", {"v_lr": 1e30, "v_steps": 0}, r"v_steps=0: must be an integer >= 1"),
    ("r-rome", {"early_stop": "never"}, r"early_stop='never': allowed \('loss', 'nll', 'mpes'\)"),
        ("memit", {"v_weight_decay_form": "cubic"}, r"v_weight_decay_form='cubic': allowed \('norm', 'squared'\)"),
        ("rome", {"kl_form": "reverse"}, r"kl_form='reverse': allowed \('published', 'former'\)"),
        ("memit", {"key_average": "median"}, r"key_average='median': allowed \('by_type', 'flat'\)"),
    ("memit", {"mom2_weight": float("nan")}, r"mom2_weight=nan"),
    ("alphaedit", {"null_energy": 2.0}, r"null_energy=2\.0: must be a finite number >= 1e-12 and <= 1"),
    ("ft-m", {"lr": 0.0}, r"ft-m hyperparameter lr=0\.0"),
    ("ft-m", {"steps": 2.5}, r"steps=2\.5: must be an integer"),
    ("lora", {"rank": True}, r"rank=True"),
])
def test_out_of_range_hyperparameters_are_refused(tiny_lm, editor, override, match):
    with pytest.raises(ValueError, match=match):
        make_editor(editor, tiny_lm, **LAYERS[editor], **override)


LAYERS = {"rome": {"layer": 1}, "r-rome": {"layer": 1}, "ft-m": {"layer": 1}, "memit": {"layers": [1]},
          "alphaedit": {"layers": [1]}, "lora": {"layers": [1]}}


@pytest.mark.parametrize("editor", sorted(LAYERS))
def test_the_packaged_settings_pass(tiny_lm, editor):
    assert make_editor(editor, tiny_lm, **LAYERS[editor]).hp is not None  # the YAML defaults are in range
