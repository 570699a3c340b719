"""The one list of the study's editors: per editor its key, class, hyperparameter file, display
name, order and figure colour. Everything that needs an editor by key (``make_editor``, report
tables, figure colours and orders) reads it here.

Colours are seaborn's colour-blind-safe "colorblind" palette, one colour per editor in the
study's order (hex strings here, so that this module needs no plotting library).
"""
from __future__ import annotations

from dataclasses import dataclass

from repro.editors.base import Editor
from repro.editors.finetune import FTL, FTM
from repro.editors.lora import LoRAEditor
from repro.editors.memit import EMMET, ENCORE, MEMIT, AlphaEdit
from repro.editors.mend import MEND  # never import .mend_train here: it imports this package
from repro.editors.rome import ROME, RROME

# seaborn.color_palette("colorblind", 10).as_hex()
COLORBLIND = ("#0173b2", "#de8f05", "#029e73", "#d55e00", "#cc78bc",
              "#ca9161", "#fbafe4", "#949494", "#ece133", "#56b4e9")


@dataclass(frozen=True)
class EditorSpec:
    key: str  # the name runs, configs and make_editor use
    cls: type[Editor]
    hparams_file: str  # hparams/<hparams_file>.yaml
    display: str  # the name in tables and figure legends
    order: int  # position in the study's order (that of the runs in study.yaml); picks the colour
    color: str  # figure colour (hex)


def _specs(*rows: tuple[str, type[Editor], str, str]) -> dict[str, EditorSpec]:
    if len(rows) > len(COLORBLIND):
        raise ValueError(f"{len(rows)} editors but only {len(COLORBLIND)} colours")
    wrong = [key for key, cls, _, _ in rows if cls.name != key]
    if wrong:
        raise ValueError(f"registry keys {wrong} differ from their classes' names")
    return {key: EditorSpec(key, cls, hp, display, i, COLORBLIND[i])
            for i, (key, cls, hp, display) in enumerate(rows)}


REGISTRY: dict[str, EditorSpec] = _specs(
    ("rome", ROME, "rome", "ROME"),
    ("r-rome", RROME, "rome", "r-ROME"),
    ("memit", MEMIT, "memit", "MEMIT"),
    ("emmet", EMMET, "emmet", "EMMET"),
    ("alphaedit", AlphaEdit, "alphaedit", "AlphaEdit"),
    ("encore", ENCORE, "encore", "ENCORE"),
    ("ft-l", FTL, "ft-l", "FT-L"),
    ("ft-m", FTM, "ft-m", "FT-M"),
    ("lora", LoRAEditor, "lora", "LoRA"),
    ("mend", MEND, "mend", "MEND"),
)


def editor_spec(key: str) -> EditorSpec:
    """The registry entry of ``key``; an unknown key is an error naming the known ones."""
    try:
        return REGISTRY[key]
    except KeyError:
        raise ValueError(f"unknown editor {key!r}; known: {', '.join(REGISTRY)}") from None


def display_name(key: str) -> str:
    return editor_spec(key).display


def editor_color(key: str) -> str:
    return editor_spec(key).color


def check_overrides(key: str, overrides: dict) -> None:
    """Refuse an unknown editor, or hyperparameter names its settings do not have, before any model
    loads (values are checked when the editor is made: some depend on the model)."""
    import dataclasses

    spec = editor_spec(key)
    names = {f.name for f in dataclasses.fields(spec.cls.hparams_class)}
    unknown = set(overrides or {}) - names
    if unknown:
        raise ValueError(f"unknown {key} hyperparameters {sorted(unknown)}; known: {sorted(names)}")
