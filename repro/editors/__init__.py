"""Knowledge editors behind one interface: ``make_editor(name, lm, **overrides).apply(requests)``.

The editors, their hyperparameter files, display names, order and figure colours are listed once,
in :mod:`repro.editors.registry`.
"""
from __future__ import annotations

from repro.core.models import LoadedModel
from repro.editors.base import Editor, EditResult, load_hparams
from repro.editors.registry import REGISTRY, EditorSpec, display_name, editor_color, editor_spec

# key -> editor class, in the study's order
EDITORS: dict[str, type[Editor]] = {key: spec.cls for key, spec in REGISTRY.items()}


def make_editor(name: str, lm: LoadedModel, **overrides) -> Editor:
    """An editor by name, with hyperparameters for ``lm`` from its registered YAML file + overrides."""
    return editor_spec(name).cls.from_name(lm, **overrides)


__all__ = ["EDITORS", "REGISTRY", "Editor", "EditResult", "EditorSpec", "display_name", "editor_color",
           "editor_spec", "load_hparams", "make_editor"]
