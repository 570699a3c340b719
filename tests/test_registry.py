"""The editor registry: one entry per editor, read by make_editor, report tables and figures."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import seaborn as sns
import xarray as xr
from matplotlib.colors import to_rgb

from repro.reporting import tables as report
from repro.editors import EDITORS, REGISTRY, load_hparams, make_editor
from repro.reporting.figures import editor_colors

STUDY = ["rome", "r-rome", "memit", "emmet", "alphaedit", "encore", "ft-l", "ft-m", "lora", "mend"]


def test_entries_are_consistent():
    assert list(REGISTRY) == STUDY == list(EDITORS)
    assert [s.order for s in REGISTRY.values()] == list(range(len(STUDY)))
    for key, spec in REGISTRY.items():
        assert spec.key == key == spec.cls.name and EDITORS[key] is spec.cls
    assert len({s.display for s in REGISTRY.values()}) == len(STUDY)
    # one colour-blind-safe colour per editor, in the study's order
    assert [s.color for s in REGISTRY.values()] == sns.color_palette("colorblind", len(STUDY)).as_hex()


@pytest.mark.parametrize("key", STUDY)
def test_hyperparameters_load_for_the_study_model(key):
    spec = REGISTRY[key]
    lm = SimpleNamespace(name="smollm2-135m", spec=SimpleNamespace(family="llama"))
    hp = load_hparams(spec.cls.hparams_class, spec.hparams_file, lm)
    assert isinstance(hp, spec.cls.hparams_class)


def test_names_and_colours_come_from_the_registry():
    assert [report.display_name(k) for k in STUDY] == [
        "ROME", "r-ROME", "MEMIT", "EMMET", "AlphaEdit", "ENCORE", "FT-L", "FT-M", "LoRA", "MEND"]
    run = xr.Dataset(attrs={"editor": "lora"})
    colors = editor_colors({"x": (run, None)})
    assert colors == {k: to_rgb(s.color) for k, s in REGISTRY.items()}
    assert len(set(colors.values())) == len(STUDY)


def test_an_unknown_editor_is_an_error_naming_the_known_ones(tiny_lm):
    known = "known: " + ", ".join(STUDY)
    with pytest.raises(ValueError, match=known):
        make_editor("nope", tiny_lm)
    with pytest.raises(ValueError, match="unknown editor 'nope'"):
        report.display_name("nope")
    with pytest.raises(ValueError, match="unknown editor 'nope'"):  # never a borrowed colour
        editor_colors({"x": (xr.Dataset(attrs={"editor": "nope"}), None)})
