"""Run parameters in one place: each notebook's parameters are the fields of one params dataclass
(its defaults are the notebook's defaults) plus the few notebook-only parameters in ``NOTEBOOKS``.

:func:`coerce` checks a dict of values against a dataclass's annotations, before any model loads:
unknown names are listed with the allowed ones; a wrong type is refused naming the parameter, the
value and what is allowed. Papermill passes ``-p`` values it cannot read as numbers as strings, so
booleans given as text ("false", "True", "0", ...) are parsed (anything else is refused, never
truthy), but numbers are never read from strings: ``n_edits "2"``, ``n_edits abc`` and
``n_edits 2.5`` are errors. Integers are accepted for float parameters (as floats). Ranges are each
dataclass's own ``validate()``; :func:`build` runs both and returns the instance.

The notebooks call :func:`from_notebook` on their namespace, ``python -m repro.study`` calls
:func:`check_run` on every selected profile entry before executing any, and the runners
(``run_sequential`` ...) keep calling ``validate()``.
"""
from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from dataclasses import dataclass
from typing import Any

from repro.core.store import parse_bool


@dataclass
class Overwrite:
    """Notebook-only: replace a finished run made with other parameters."""
    overwrite: bool = False

    def validate(self) -> None:
        pass


@dataclass
class MENDEval:
    """Notebook-only (train_mend): evaluation-split facts edited one at a time at the end, and
    whether to replace a finished training made with other parameters."""
    n_eval: int = 20
    overwrite: bool = False

    def validate(self) -> None:
        if self.n_eval < 0:
            raise ValueError(f"n_eval must be >= 0, got {self.n_eval}")


# notebook -> (its params dataclass as "module:Class", the dataclass of its notebook-only parameters)
NOTEBOOKS: dict[str, tuple[str, type]] = {
    "notebooks/sequential_editing.ipynb": ("repro.runs.sequential:SequentialParams", Overwrite),
    "notebooks/single_edit_efficacy.ipynb": ("repro.runs.efficacy:EfficacyParams", Overwrite),
    "notebooks/layer_sweep.ipynb": ("repro.runs.layer_sweep:LayerSweepParams", Overwrite),
    "notebooks/post_training.ipynb": ("repro.runs.post_training:TrainParams", Overwrite),
    "notebooks/train_mend.ipynb": ("repro.runs.mend_training:MENDTrainParams", MENDEval),
}


def params_class(notebook: str) -> tuple[type, type]:
    """The params dataclass and the notebook-only dataclass of a notebook (a path as in study.yaml)."""
    key = str(notebook).replace("\\", "/")
    key = next((k for k in NOTEBOOKS if key == k or key.endswith("/" + k)), key)
    if key not in NOTEBOOKS:
        raise ValueError(f"no params dataclass is known for {notebook}; known: {', '.join(NOTEBOOKS)}")
    where, extra = NOTEBOOKS[key]
    module, name = where.split(":")
    return getattr(importlib.import_module(module), name), extra


def accepts(notebook: str, name: str) -> bool:
    """Whether a notebook takes parameter ``name``."""
    return any(name in {f.name for f in dataclasses.fields(c)} for c in params_class(notebook))


def defaults(cls: type) -> dict:
    """The default of every field of a dataclass (factories called)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            raise TypeError(f"{cls.__name__}.{f.name} has no default: every parameter needs one")
    return out


def _describe(tp) -> str:
    if tp is type(None):
        return "None"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is not None:
        args = typing.get_args(tp)
        if origin is list and args:
            return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(args[0], _describe(args[0]))
        return _describe(origin)
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(tp, getattr(tp, "__name__", str(tp)))


class _Refused(Exception):
    pass


def _coerce_value(value: Any, tp) -> Any:
    """``value`` as type ``tp`` or :class:`_Refused`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):  # None first where it is allowed: never "None" the string
            if arg is type(None) and value is None:
                return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce_value(value, arg)
            except _Refused:
                pass
        raise _Refused
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Refused
    if tp is bool:
        try:
            return parse_bool(value, "")
        except ValueError:
            raise _Refused from None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Refused
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Refused
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Refused
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Refused
        args = typing.get_args(tp)
        return [_coerce_value(v, args[0]) for v in value] if args else list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise _Refused
        return dict(value)
    raise TypeError(f"unsupported parameter type {tp!r}")


def coerce(cls: type, values: dict, extra: type | None = None) -> dict:
    """``values`` checked and coerced against the annotations of dataclass ``cls`` (and of the
    notebook-only dataclass ``extra``); raises one ``ValueError`` listing every problem."""
    hints = {**typing.get_type_hints(cls), **(typing.get_type_hints(extra) if extra else {})}
    allowed = [f.name for f in dataclasses.fields(cls)] + ([f.name for f in dataclasses.fields(extra)] if extra else [])
    problems, out = [], {}
    unknown = [k for k in values if k not in hints]
    if unknown:
        problems.append(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                        f"(allowed: {', '.join(allowed)})")
    for name, value in values.items():
        if name not in hints:
            continue
        try:
            out[name] = _coerce_value(value, hints[name])
        except _Refused:
            problems.append(f"{name} must be {_describe(hints[name])}, got {value!r} ({type(value).__name__})")
    if problems:
        raise ValueError(f"{cls.__name__}: " + "; ".join(problems))
    return out


def build(cls: type, values: dict, extra: type | None = None):
    """The ``cls`` instance of ``values`` (missing ones at their defaults), types and ranges
    checked; with ``extra``, returns ``(instance, notebook-only instance)``."""
    clean = coerce(cls, values, extra)
    own = {f.name for f in dataclasses.fields(cls)}
    params = cls(**{k: v for k, v in clean.items() if k in own})
    params.validate()
    if extra is None:
        return params
    rest = extra(**{k: v for k, v in clean.items() if k not in own})
    rest.validate()
    return params, rest


def check_run(notebook: str, values: dict) -> None:
    """Raise ``ValueError`` when a notebook's parameters (e.g. a profile entry's) are invalid."""
    cls, extra = params_class(notebook)
    build(cls, values, extra)


# names IPython puts in a notebook's namespace that are no parameters
_IPYTHON = {"In", "Out", "get_ipython", "exit", "quit", "open"}
_PARAMETER_TYPES = (str, int, float, bool, list, dict, type(None))


def from_notebook(cls: type, namespace: dict, extra: type | None = None):
    """Build ``cls`` (and ``extra``) from a notebook's namespace right after its parameters: every
    plain value there (what papermill can inject) must be a parameter, so a misspelt ``-p`` name is
    an error rather than silently ignored."""
    values = {k: v for k, v in namespace.items()
              if not k.startswith("_") and k not in _IPYTHON and isinstance(v, _PARAMETER_TYPES)}
    return build(cls, values, extra)


def check_types(params) -> None:
    """The Python API's check: a params dataclass instance made in code (``SequentialParams(n_edits="2")``)
    is checked by the same rules as a notebook's or a profile's values."""
    coerce(type(params), {f.name: getattr(params, f.name) for f in dataclasses.fields(params)})
