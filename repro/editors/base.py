"""The interface every editor shares, and hyperparameters loaded from YAML by editor and model."""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

import torch
import yaml

from repro.core.models import LoadedModel


class Request(Protocol):
    """What an editor needs of an edit (``repro.data.EditRequest`` satisfies it)."""

    prompt: str  # with "{}" for the subject
    subject: str
    target_new: str
    target_true: str


@dataclass
class EditResult:
    """What one call to :meth:`Editor.apply` changed.

    ``deltas`` maps "layer:matrix_type" to the (out, in) update applied in place; ``info`` holds
    per-request diagnostics (optimisation steps, losses); ``timings`` the seconds spent in each
    phase of the call (e.g. "value" optimisation, "keys", the closed-form "update"), for benchmarks.
    """

    deltas: dict[str, torch.Tensor]
    info: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds


class Editor(ABC):
    """Edits a live model in place, one batch of requests per :meth:`apply` call.

    State that must carry over between sequential calls (e.g. earlier edits' keys) lives on the
    editor object, never in module globals.
    """

    name: str = ""  # the editor's key in the registry (repro.editors.registry)
    hparams_class: type = object  # the dataclass of its hyperparameters

    def __init__(self, lm: LoadedModel, hparams):
        self.lm = lm
        self.hp = hparams

    @classmethod
    def from_name(cls, lm: LoadedModel, **overrides) -> "Editor":
        """This editor for ``lm`` with hyperparameters from its registered YAML file + overrides."""
        from repro.editors.registry import editor_spec  # the registry imports every editor module

        return cls(lm, load_hparams(cls.hparams_class, editor_spec(cls.name).hparams_file, lm, overrides))

    @abstractmethod
    def apply(self, requests: list[Request]) -> EditResult:
        """Edit the model for ``requests``; return the deltas applied."""

    @abstractmethod
    def edited_matrices(self) -> list[tuple[int, str]]:
        """(layer, matrix type) of every matrix this editor may change."""

    def prepare(self) -> None:
        """Compute now, on the model as it is, what the editor would otherwise compute lazily at its
        first edit from the model (statistics, context prefixes). A resumed run calls this before
        putting the edited weights back, so that these match the uninterrupted run's."""

    def state_dict(self) -> dict[str, Any]:
        """Editor state needed to resume a sequence (beyond the model's weights)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state, got keys {sorted(state)}")


# Allowed values of hyperparameters shared by several editors, by name: (kind, low, high) with
# kind "int" or "float"; low/high inclusive bounds (None: unbounded); every number must be finite.
# A covariance from fewer than 1,000 tokens is singular in practice, so stats_tokens starts there.
HPARAM_RANGES: dict[str, tuple[str, float | None, float | None]] = {
    "v_steps": ("int", 1, None), "steps": ("int", 1, None), "stats_tokens": ("int", 1000, None),
    "n_prefix_short": ("int", 0, None), "n_prefix_long": ("int", 0, None), "mpes_extra_steps": ("int", 0, None),
    "batch_values_max": ("int", 1, None), "rank": ("int", 1, None), "n_blocks": ("int", 1, None),
    "v_lr": ("float", 1e-12, None), "lr": ("float", 1e-12, None), "clamp_norm_factor": ("float", 1e-12, None),
    "mom2_weight": ("float", 0, None), "alpha": ("float", 1e-12, None), "alpha_init": ("float", 1e-12, None),
    "eps": ("float", 1e-30, None), "v_weight_decay": ("float", 0, None), "kl_factor": ("float", 0, None),
    "nll_stop": ("float", 0, None), "loss_stop": ("float", 0, None), "cov_ridge": ("float", 0, None),
    "eta": ("float", 0, None), "l2": ("float", 0, None), "norm_weight": ("float", 0, None),
    "null_energy": ("float", 1e-12, 1.0), "null_threshold": ("float", 0, None), "dropout": ("float", 0, 0.999),
}
# Named choices of the value optimisation (repro.editors.locate.optimize_values); the first of each is
# the authors' form, the default.
EARLY_STOPS = ("loss", "nll", "mpes")
WEIGHT_DECAY_FORMS = ("norm", "squared")
KL_FORMS = ("published", "former")
MPES_ROWS = ("prefixed", "all")
KEY_AVERAGES = ("by_type", "flat")
CHOICES = {"early_stop": EARLY_STOPS, "v_weight_decay_form": WEIGHT_DECAY_FORMS, "kl_form": KL_FORMS,
           "mpes_rows": MPES_ROWS, "key_average": KEY_AVERAGES}


def refuse_fp16_training(editor: str, lm: LoadedModel) -> None:
    """Editors that train weights in the model's own precision cannot do it in float16: Adam's
    steps underflow and its denominators vanish (NaN within a few steps). bfloat16 has fp32's range."""
    if next(lm.model.parameters()).dtype == torch.float16:
        raise ValueError(f"{editor} trains weights in the model's precision, which float16 cannot hold "
                         f"(Adam's steps underflow to NaN): load the model in bfloat16 or float32")


def check_hparams(editor: str, hp) -> None:
    """Refuse hyperparameters outside :data:`HPARAM_RANGES` (and unknown named choices, :data:`CHOICES`),
    naming the editor, the hyperparameter, its value and what is allowed."""
    import math

    for f in dataclasses.fields(hp):
        value = getattr(hp, f.name)
        if f.name in CHOICES and value not in CHOICES[f.name]:
            raise ValueError(f"{editor} hyperparameter {f.name}={value!r}: allowed {CHOICES[f.name]}")
        if f.name not in HPARAM_RANGES or (value is None and f.default is None):
            continue  # unchecked, or an optional setting left out
        kind, low, high = HPARAM_RANGES[f.name]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        allowed = f"{'an integer' if kind == 'int' else 'a finite number'}" + (
            f" >= {low:g}" if low is not None else "") + (f" and <= {high:g}" if high is not None else "")
        if (not number or (kind == "int" and not float(value).is_integer()) or not math.isfinite(value)
                or (low is not None and value < low) or (high is not None and value > high)):
            raise ValueError(f"{editor} hyperparameter {f.name}={value!r}: must be {allowed}")


def load_hparams(cls, editor: str, lm: LoadedModel, overrides: dict[str, Any] | None = None):
    """Hyperparameters of ``editor`` for ``lm``: YAML ``default``, then the model family, then the
    model's own name, then ``overrides``. Unknown keys are an error."""
    text = resources.files(__package__).joinpath("hparams", f"{editor}.yaml").read_text()
    table = yaml.safe_load(text) or {}
    merged: dict[str, Any] = {}
    for key in ("default", f"family:{lm.spec.family}", lm.name):
        merged.update(table.get(key) or {})
    merged.update(overrides or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(merged) - names
    if unknown:
        raise ValueError(f"unknown {editor} hyperparameters {sorted(unknown)}; known: {sorted(names)}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in merged
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{editor} needs {missing} for model {lm.name!r}: add them to "
                         f"hparams/{editor}.yaml or pass them explicitly")
    hp = cls(**merged)
    check_hparams(editor, hp)
    return hp
