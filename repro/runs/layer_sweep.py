"""Which layer to edit: single edits of held-out facts at each candidate layer, scored by
efficacy, paraphrase and neighborhood success (CounterFact), each edit undone before the next."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import xarray as xr
from tqdm import tqdm

from repro.core.models import DEFAULT_MODEL, LoadedModel, copy_weights, load_model, put_weights
from repro.core.paths import from_root
from repro.data.counterfact import Record, load_records, to_request
from repro.data.splits import SPLITS, select_records
from repro.editors import make_editor
from repro.measure.rewrite import harmonic_mean, record_scores
from repro.runs.lifecycle import Run, execute


@dataclass
class LayerSweepParams:
    """Parameters of a layer sweep (notebooks/layer_sweep.ipynb)."""

    model: str = DEFAULT_MODEL
    editor: str = "rome"
    layers: list[int] = field(default_factory=lambda: [1, 3, 5, 7, 9, 12, 15, 20])  # candidate layers
    n_facts: int = 8  # held-out facts edited alone at each layer
    seed: int = 1
    split: str = "eval"
    facts: str = "data/facts/smollm2-135m.json"
    hparams: dict = field(default_factory=dict)  # editor hyperparameter overrides (not the layer)
    output: str = "data/runs/layer_sweep.nc"
    device: str | None = None

    def validate(self) -> None:
        if self.n_facts < 1:
            raise ValueError(f"n_facts must be >= 1, got {self.n_facts}")
        if not self.layers or any(layer < 0 for layer in self.layers):
            raise ValueError(f"layers must be a non-empty list of layer indices >= 0, got {self.layers}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if not str(self.output).endswith(".nc"):
            raise ValueError(f"output must be a .nc file, got {self.output!r}")

    def as_dict(self) -> dict:
        """The parameters a sweep file records: all but ``output`` (where it goes, not how it was made)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "output"}


def run_layer_sweep(params: LayerSweepParams, overwrite: bool = False, progress: bool = True) -> xr.Dataset:
    """Run (or resume, or reuse) a layer sweep and return its Dataset: the facts of ``params``
    edited one at a time at each candidate layer (:func:`sweep_layers`), stored with provenance."""

    def body(run: Run) -> xr.Dataset:
        lm = load_model(params.model, device=params.device)
        records = select_records(load_records(from_root(params.facts)), params.n_facts, params.seed, params.split)
        ds = sweep_layers(lm, records, params.layers, params.editor, params.hparams, progress=progress, run=run)
        return run.finish(ds, str(lm.device), model=params.model, editor=params.editor)

    return execute(params, body, overwrite)


def sweep_layers(
    lm: LoadedModel, records: list[Record], layers: list[int], editor: str = "rome",
    hparams: dict | None = None, progress: bool = True, run: Run | None = None,
) -> xr.Dataset:
    """Scores (layer, fact) of editing each fact alone at each layer, plus the unedited scores.
    With ``run`` the scores so far (and the editor's state) are saved after every fact, and a
    sweep resumes where it stopped."""
    base = record_scores(lm, records)
    shape = (len(layers), len(records))
    es, ps, ns, secs = (np.zeros(shape) for _ in range(4))
    saved = run.resume() if run is not None else None
    done = 0  # facts done, counted over (layer, fact) in order
    if saved is not None:
        es, ps, ns, secs = (np.asarray(saved[k]) for k in ("es", "ps", "ns", "secs"))
        done = saved["done"]
    bar = tqdm(total=shape[0] * shape[1], initial=done, desc="layer sweep", disable=not progress)
    for i, layer in enumerate(layers):
        if (i + 1) * len(records) <= done:
            continue
        ed = make_editor(editor, lm, **{**(hparams or {}), "layer": layer})
        matrices = ed.edited_matrices()
        w0 = copy_weights(lm, matrices)
        if saved is not None and done > i * len(records):
            ed.load_state_dict(saved["editor"])  # resuming inside this layer
        for j, rec in enumerate(records):
            if i * len(records) + j < done:
                continue
            t = time.perf_counter()
            ed.apply([to_request(rec)])
            secs[i, j] = time.perf_counter() - t
            s = record_scores(lm, [rec])
            es[i, j], ps[i, j], ns[i, j] = s["es"][0], s["ps"][0], s["ns"][0]
            put_weights(lm, matrices, w0)
            done += 1
            if run is not None:
                run.save({"done": done, "es": es, "ps": ps, "ns": ns, "secs": secs, "editor": ed.state_dict()})
            bar.update()
    bar.close()
    ds = xr.Dataset(
        {
            "es": (("layer", "fact"), es), "ps": (("layer", "fact"), ps), "ns": (("layer", "fact"), ns),
            "edit_seconds": (("layer", "fact"), secs),
            "es_unedited": ("fact", base["es"]), "ps_unedited": ("fact", base["ps"]),
            "ns_unedited": ("fact", base["ns"]),
            "case_id": ("fact", np.array([r.case_id for r in records])),
        },
        coords={"layer": np.array(layers), "fact": np.arange(len(records))},
    )
    ds["score"] = ("layer", np.array([
        harmonic_mean(ds.es.sel(layer=l).mean(), ds.ps.sel(layer=l).mean(), ds.ns.sel(layer=l).mean())
        for l in layers
    ]))
    ds["score"].attrs["long_name"] = "harmonic mean of mean ES, PS, NS over facts"
    return ds


def best_layer(ds: xr.Dataset) -> int:
    """The layer with the highest overall score S (ties: the earliest)."""
    return int(ds["layer"][int(np.argmax(ds["score"].values))])
