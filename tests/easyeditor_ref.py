"""The reference implementation the editor tests compare against: the ``easyeditor`` wheel
(EasyEdit 0.0.1.dev0 on PyPI), installed for the tests only (``scripts/test.sh``, ``--no-deps``).

Only the modules an editor needs are imported, never the package's ``__init__`` files (they import
every editor and its heavy dependencies): each package on the way is registered as an empty
namespace pointing at the installed folder, so the wheel's own relative imports resolve to its own
files. The wheel's code runs unmodified; three adapters let it run here, each at its boundary:

- ``on_device``: the wheel hard-codes ``f"cuda:{hparams.device}"``; a torch function mode maps
  every ``cuda:N`` device it names to the model's device (the CPU here).
- ``layer_tuples``: the wheel was written when a decoder layer returned a tuple (hidden states
  first); transformers 5 returns the tensor itself. Hooks the wheel registers on the given layers
  see a 1-tuple and hand the tensor back to the model.
- ``statistics``: the wheel collects its second moment C from a Wikipedia download; the tests hand
  it the same C as the package's editor instead (``layer_stats`` answers with it).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import types
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

PACKAGES = ("easyeditor", "easyeditor.util", "easyeditor.models", "easyeditor.models.rome",
            "easyeditor.models.memit", "easyeditor.models.ft")


@functools.cache
def root() -> Path:
    spec = importlib.util.find_spec("easyeditor")  # finds the folder without running its __init__
    if spec is None or not spec.submodule_search_locations:
        why = "the reference implementation (easyeditor wheel) is not installed: scripts/test.sh installs it"
        if os.environ.get("CI"):  # CI runs scripts/test.sh: there the oracle must be present
            pytest.fail(why)
        pytest.skip(why)
    return Path(list(spec.submodule_search_locations)[0])


def load(name: str) -> types.ModuleType:
    """``easyeditor.<name>`` (e.g. ``models.rome.rome_main``), importing nothing else of the
    wheel than what that module imports itself. ``layer_stats`` (which needs the ``datasets``
    package) is a stand-in answering with the statistics of :func:`statistics`."""
    base = root()
    for pkg in PACKAGES:
        if pkg not in sys.modules:
            mod = types.ModuleType(pkg)
            mod.__path__ = [str(base.joinpath(*pkg.split(".")[1:]))]
            sys.modules[pkg] = mod
    stats = "easyeditor.models.rome.layer_stats"
    if stats not in sys.modules:
        mod = types.ModuleType(stats)
        mod.layer_stats = _layer_stats
        sys.modules[stats] = mod
    return importlib.import_module(f"easyeditor.{name}")


_SECOND_MOMENT: dict[str, torch.Tensor] = {}


class _Moment:
    def __init__(self, C: torch.Tensor):
        self.mom2 = types.SimpleNamespace(moment=lambda: C.clone())


def _layer_stats(model, tok, layer_name, *args, **kwargs):
    if layer_name not in _SECOND_MOMENT:
        raise KeyError(f"no second moment handed to the reference for {layer_name}")
    return _Moment(_SECOND_MOMENT[layer_name])


@contextmanager
def statistics(moments: dict[str, torch.Tensor]):
    """The reference's ``layer_stats`` answers with ``moments[module name]`` (and its caches of
    earlier answers are emptied before and after)."""
    caches = [load("models.rome.compute_u").inv_mom2_cache, load("models.memit.memit_main").COV_CACHE]
    for cache in caches:
        cache.clear()
    _SECOND_MOMENT.clear()
    _SECOND_MOMENT.update(moments)
    try:
        yield
    finally:
        _SECOND_MOMENT.clear()
        for cache in caches:
            cache.clear()


class _OnDevice(TorchFunctionMode):
    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def _map(self, x):
        if isinstance(x, str) and x.startswith("cuda"):
            return self.device
        if isinstance(x, torch.device) and x.type == "cuda":
            return self.device
        return x

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = {k: self._map(v) for k, v in (kwargs or {}).items()}
        args = tuple(self._map(a) for a in args)
        return func(*args, **kwargs)


@contextmanager
def layer_tuples(layers):
    """Hooks registered on ``layers`` meanwhile see their tensor output as a 1-tuple."""
    for layer in layers:
        register = layer.register_forward_hook

        def wrapped_register(hook, *args, _register=register, **kwargs):
            def as_tuple(module, inputs, output):
                if not isinstance(output, torch.Tensor):
                    return hook(module, inputs, output)
                out = hook(module, inputs, (output,))
                return None if out is None else out[0]
            return _register(as_tuple, *args, **kwargs)

        layer.register_forward_hook = wrapped_register
    try:
        yield
    finally:
        for layer in layers:
            del layer.register_forward_hook


@contextmanager
def reference_run(lm, moments: dict[str, torch.Tensor]):
    """Everything the wheel needs around a call on ``lm``: its device, tuple-returning layers,
    right padding (the wheel places targets assuming it) and the given statistics."""
    tok = lm.tokenizer
    side = tok.padding_side
    tok.padding_side = "right"
    try:
        with ExitStack() as stack:
            stack.enter_context(statistics(moments))
            stack.enter_context(layer_tuples(list(lm.spec.layer_modules(lm.model))))
            stack.enter_context(_OnDevice(lm.device))
            yield
    finally:
        tok.padding_side = side


# module names the wheel's hyperparameters take, per family
MODULES = {
    "llama": dict(rewrite_module_tmp="model.layers.{}.mlp.down_proj", mlp_module_tmp="model.layers.{}.mlp",
                  layer_module_tmp="model.layers.{}", attn_module_tmp="model.layers.{}.self_attn",
                  ln_f_module="model.norm", lm_head_module="lm_head"),
    "gpt2": dict(rewrite_module_tmp="transformer.h.{}.mlp.c_proj", mlp_module_tmp="transformer.h.{}.mlp",
                 layer_module_tmp="transformer.h.{}", attn_module_tmp="transformer.h.{}.attn",
                 ln_f_module="transformer.ln_f", lm_head_module="lm_head"),
}


def weight_change(lm, layer: int, mtype: str, edit) -> torch.Tensor:
    """ΔW (as stored) that ``edit()`` makes to the matrix, which is put back afterwards."""
    W = lm.spec.weight(lm.model, layer, mtype)
    before = W.detach().clone()
    edit()
    delta = (W.detach() - before).double()
    with torch.no_grad():
        W.copy_(before)
    return delta


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    """(cosine of the two updates, |‖ours‖ − ‖theirs‖| / ‖theirs‖)."""
    cos = float(torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0))
    rel = float((ours.norm() - theirs.norm()).abs() / theirs.norm())
    return cos, rel


def assert_agree(ours, theirs, what: str, tolerance: dict) -> tuple[float, float]:
    """The two updates agree within ``tolerance`` ({"cos": bound on 1 − cos, "rel": on the relative
    norm difference}); the reference must have written one."""
    assert theirs.norm() > 0, f"{what}: the reference wrote no update"
    cos, rel = agreement(ours, theirs)
    assert 1 - cos < tolerance["cos"] and rel < tolerance["rel"], \
        f"{what}: 1 - cos {1 - cos:.2e}, rel. norm diff {rel:.2e}"
    return cos, rel
