"""Knowledge editors behind one interface: ``make_editor(name, lm, **overrides).apply(requests)``."""
from __future__ import annotations

from ..models import LoadedModel
from .base import Editor, EditResult, load_hparams
from .finetune import FTL, FTM
from .lora import LoRAEditor
from .memit import EMMET, ENCORE, MEMIT, AlphaEdit
from .mend import MEND  # never import .mend_train here: it imports this package
from .rome import ROME, RROME

EDITORS: dict[str, type[Editor]] = {
    "rome": ROME, "r-rome": RROME, "memit": MEMIT, "emmet": EMMET, "alphaedit": AlphaEdit, "encore": ENCORE,
    "ft-l": FTL, "ft-m": FTM, "lora": LoRAEditor, "mend": MEND,
}


def make_editor(name: str, lm: LoadedModel, **overrides) -> Editor:
    """An editor by name, with hyperparameters for ``lm`` from ``hparams/<name>.yaml`` + overrides."""
    if name not in EDITORS:
        raise ValueError(f"unknown editor {name!r}; known: {', '.join(sorted(EDITORS))}")
    return EDITORS[name].from_name(lm, **overrides)


__all__ = ["EDITORS", "Editor", "EditResult", "load_hparams", "make_editor"]
