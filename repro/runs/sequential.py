"""A sequential editing run: edit a model fact after fact (or batch after batch), measuring as it
goes, and store everything in one NetCDF file.

After every editor call a cheap probe checks the collapse rule of
:mod:`repro.measure.collapse` (probe perplexity far above the unedited model's, or non-finite
weights or logits); the first edit where it holds is stored in the file. A non-finite model stops
the run at once, a collapsed one once it has stayed collapsed for ``collapse.patience`` edits;
either way the file is written and says why the run ended.

Interrupted runs resume: every ``checkpoint_every`` edits the weights of the edited matrices and
the measurements so far are saved (atomically) next to the output as ``<output>.state.pt``; a
rerun with the same parameters continues from there. A finished run is not redone unless its
parameters differ or ``overwrite`` is set. A run may also be given a deadline (``stop_at``, or the
environment variable ``NORMGROWTH_STOP_AT``, read by :mod:`repro.core.deadline`): once it has passed, the run
saves its state after the current batch and raises :class:`Paused`, to be resumed later, on the same
machine or another (a long run started on a CPU can go on on a GPU and back). Each stretch of a run
records its commit, its device, torch's CPU thread count and the edit count it started at
(``git_shas_by_segment``, ``devices_by_segment``, ``threads_by_segment``, ``segment_starts``).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from tqdm import tqdm

from repro.runs import memory

from repro.core import store
from repro.core.deadline import from_env as deadline_from_env
from repro.runs.lifecycle import Run, execute
from repro.data.counterfact import EditRequest, load_records, to_request
from repro.data.splits import SPLITS, held_out_records, select_records
from repro.data.text import load_text
from repro.editors import make_editor
from repro.editors.registry import check_overrides
from repro.measure.collapse import NONFINITE, CollapseParams, CollapseProbe, collapsed_for, first_collapse
from repro.measure.norms import weight_norms
from repro.measure.rewrite import compare_targets, prefers_new
from repro.core.models import DEFAULT_MODEL, DTYPES, LoadedModel, copy_weights, load_model, put_weights
from repro.core.paths import from_root

log = logging.getLogger(__name__)


@dataclass
class SequentialParams:
    model: str = DEFAULT_MODEL
    editor: str = "rome"
    n_edits: int = 100
    batch_size: int = 1  # facts per editor call
    seed: int = 0
    facts: str = "data/facts/smollm2-135m.json"
    split: str = "eval"  # "train" facts are kept for meta-training (MEND), never evaluated on
    norm_every: int = 1  # measure all weight norms every k edits (and before/after)
    # k: edit quality, downstream abilities and activations every k edits (and before the first and
    # after the last); 0: off. 20 keeps measurement at about a sixth to a third of a 100-edit run on
    # SmolLM2-135M (benchmarks/results/checkpoint_cost_smollm2-135m.txt).
    measure_every: int = 20
    # further checkpoints at these edit counts (e.g. log-spaced: [50, 100, 250, 500, 1000, 2000, 3000])
    measure_at: list = field(default_factory=list)
    measure: dict = field(default_factory=dict)  # repro.measure.checkpoint.MeasureParams overrides
    collapse: dict = field(default_factory=dict)  # repro.measure.collapse.CollapseParams overrides
    checkpoint_every: int = 10
    output: str = "data/runs/sequential.nc"
    device: str | None = None
    # precision of the model's forward and backward passes; second moments and closed-form solves
    # stay fp64, value optimisation keeps δ and Adam's state in fp32 (models.DTYPES)
    dtype: str = "float32"
    hparams: dict = field(default_factory=dict)  # editor hyperparameter overrides

    def validate(self) -> None:
        for name in ("n_edits", "batch_size", "norm_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size > self.n_edits:
            raise ValueError(f"batch_size ({self.batch_size}) must not exceed n_edits ({self.n_edits}): "
                             f"a run makes at most n_edits edits")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.measure_every < 0:
            raise ValueError(f"measure_every must be >= 0 (0: off), got {self.measure_every}")
        at = list(self.measure_at)
        if any(not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= self.n_edits for m in at):
            raise ValueError(f"measure_at must hold edit counts between 1 and n_edits={self.n_edits}, got {at}")
        if self.measure and not (self.measure_every or at):
            raise ValueError("measure options given but measure_every is 0 and measure_at empty (measurements off)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        CollapseParams(**self.collapse)  # checks names and ranges
        if not str(self.output).endswith(".nc"):
            raise ValueError(f"output must be a .nc file, got {self.output!r}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Paused(RuntimeError):
    """A run stopped at its deadline with its state saved: rerunning it resumes from there."""


def _deadline(stop_at: float | None, clock=None) -> float | None:
    """``stop_at``, else the environment's ``NORMGROWTH_STOP_AT`` (:mod:`repro.core.deadline`, whose delays
    and clock times ``clock()`` anchors, default the system clock), else None."""
    return float(stop_at) if stop_at is not None else deadline_from_env(clock)


def same_params(saved: dict, current: dict) -> bool:
    """Whether a resume state saved with ``saved`` parameters belongs to a run with ``current``
    ones: equal, where a parameter added to :class:`SequentialParams` after the state was saved
    counts as equal when ``current`` holds its default."""
    defaults = SequentialParams().as_dict()
    extra = set(current) - set(saved)
    return (all(saved[k] == current.get(k) for k in saved)
            and all(current[k] == defaults.get(k) for k in extra))


def _crossed(done: int, batch: int, every: int) -> bool:
    """Whether the edit count passed a multiple of ``every`` with the last batch of ``batch`` facts."""
    return done // every != (done - batch) // every


def _reached(done: int, batch: int, at) -> bool:
    """Whether the last batch of ``batch`` facts passed one of the edit counts ``at``."""
    return any(done - batch < m <= done for m in at)


def _edit_scores(lm: LoadedModel, reqs: list[EditRequest]) -> tuple[np.ndarray, np.ndarray]:
    return compare_targets(lm, [r.text for r in reqs], [r.target_new for r in reqs], [r.target_true for r in reqs])


def run_sequential(params: SequentialParams, overwrite: bool = False, progress: bool = True,
                   stop_at: float | None = None) -> xr.Dataset:
    """Run (or resume, or reuse) a sequential editing run and return its Dataset. With a deadline
    (``stop_at`` or ``NORMGROWTH_STOP_AT``, seconds since the epoch) the run saves its state and
    raises :class:`Paused` at the first batch that ends after it, unless that batch was its last."""
    deadline = _deadline(stop_at)
    return execute(params, lambda run: _run(params, run, progress, deadline), overwrite,
                   same_params=same_params)


def _run(params: SequentialParams, run: Run, progress: bool, deadline: float | None = None) -> xr.Dataset:
    output, pdict = run.output, run.params
    # the facts first: a bad facts file or too short a split fails before the model loads
    all_records = load_records(from_root(params.facts))
    try:
        records = select_records(all_records, params.n_edits, params.seed, params.split)
    except ValueError as err:
        raise ValueError(f"{params.facts}: {err} (n_edits={params.n_edits})") from None
    requests = [to_request(r) for r in records]
    check_overrides(params.editor, params.hparams)  # an unknown editor or setting: before the model loads
    lm = load_model(params.model, device=params.device, dtype=DTYPES[params.dtype])
    editor = make_editor(params.editor, lm, **params.hparams)
    if progress:
        print(memory.describe(memory.estimate(lm, editor), lm), flush=True)
    editor.prepare()  # statistics and prefixes from the unedited model, also when resuming
    edited = editor.edited_matrices()
    weight = lambda l, m: lm.spec.weight(lm.model, l, m)  # noqa: E731
    probe = CollapseProbe(lm, load_text("test"), edited, CollapseParams(**params.collapse))

    # the unedited weights: the freshly loaded model's (also when resuming: they are not saved)
    weights0 = copy_weights(lm, edited, cpu=True)
    state = {"params": pdict, "done": 0, "rows": [], "norm_steps": [], "norms": [], "drift": [],
             "elapsed": 0.0, "measures": [], "measure_seconds": 0.0, "weights0": weights0}
    saved = run.resume()  # None also for a damaged file (moved aside) or other parameters
    if saved is not None:
        state = saved
        state.setdefault("weights0", weights0)
        put_weights(lm, edited, saved["weights"])
        editor.load_state_dict(saved["editor"])
        log.info("%s: %d edits done", output.name, state["done"])
    # the commit each stretch of the run was made with (a long run may be resumed several times)
    # and the device, torch's CPU thread count and the edit count it started at; a state saved before
    # these were recorded had all its stretches on the device it last recorded
    n_before = len(state.get("git_shas", []))
    state.setdefault("devices", [state.get("device", "not recorded")] * n_before).append(str(lm.device))
    state.setdefault("threads", [-1] * n_before).append(torch.get_num_threads())  # -1: not recorded
    state.setdefault("segment_starts", [-1] * n_before).append(state["done"])  # -1: not recorded
    state.setdefault("git_shas", []).append(store.git_sha())
    state["device"] = str(lm.device)
    if "probe_ref" not in state:  # the unedited model's probe perplexity (weights0 are in place)
        state.update(probe_ref=probe.set_reference(), probe_done=[], probe_why=[],
                     stop_reason="completed")
    else:
        probe.set_reference(state["probe_ref"])

    measurer = None
    if params.measure_every or params.measure_at:
        from repro.measure.checkpoint import MeasureParams, Measurer

        mp = MeasureParams(**params.measure)
        held_out = held_out_records(all_records, records, mp.n_recall, params.seed, params.split)
        measurer = Measurer(lm, records, held_out, edited, mp, seed=params.seed)
        # the reference (unedited) activations: swap the original weights in while taking them
        current = copy_weights(lm, edited)
        put_weights(lm, edited, state["weights0"])
        with torch.no_grad():
            measurer.set_reference()
        put_weights(lm, edited, current)

    def measure_now():
        t = time.perf_counter()
        state["measures"].append(portable(measurer.measure(state["done"])))
        state["measure_seconds"] += time.perf_counter() - t

    def checkpoint():
        state["weights"] = copy_weights(lm, edited, cpu=True)
        state["editor"] = editor.state_dict()
        # the unedited weights are those of the loaded model: not saved (smaller state files)
        run.save({k: v for k, v in state.items() if k != "weights0"})

    def record_norms():
        state["norm_steps"].append(state["done"])
        state["norms"].append(weight_norms(lm).values)
        state["drift"].append([float(torch.linalg.vector_norm((weight(l, m).detach().cpu() - w0).double()))
                               for (l, m), w0 in zip(edited, state["weights0"])])

    if state["done"] == 0 and not state["norm_steps"]:
        record_norms()
    if measurer is not None and state["done"] == 0 and not state["measures"]:
        measure_now()

    patience = probe.params.patience
    bar = tqdm(total=params.n_edits, initial=state["done"], desc=f"{params.editor} edits", disable=not progress)
    while state["done"] < params.n_edits and state["stop_reason"] == "completed":
        start = state["done"]
        batch = requests[start : start + params.batch_size]
        pre_new, pre_true = _edit_scores(lm, batch)
        t_edit = time.perf_counter()
        try:
            result = editor.apply(batch)
        except Exception:
            if probe.weights_finite():
                raise
            # the editor failed on weights it had made non-finite: record that, stop cleanly
            log.exception("%s failed with non-finite weights at edit %d", params.editor, start + len(batch))
            result = None
        seconds = (time.perf_counter() - t_edit) / len(batch)
        ppl, why = probe.check() if result is not None else (float("nan"), NONFINITE)
        if why == NONFINITE:
            post_new = post_true = np.full(len(batch), np.nan)  # no metric from a non-finite model
            delta_norm = np.nan
        else:
            post_new, post_true = _edit_scores(lm, batch)
            delta_norm = float(np.sqrt(sum(float(d.double().pow(2).sum()) for d in result.deltas.values())))
        for i, req in enumerate(batch):
            info = result.info[i] if result is not None and i < len(result.info) else {}
            state["rows"].append({
                "case_id": req.case_id, "subject": req.subject, "target_new": req.target_new,
                "target_true": req.target_true, "nll_new_pre": pre_new[i], "nll_true_pre": pre_true[i],
                "nll_new": post_new[i], "nll_true": post_true[i], "edit_seconds": seconds,
                "delta_norm": delta_norm if i == len(batch) - 1 else np.nan,
                "v_steps": info.get("v_steps", np.nan), "probe_ppl": ppl, "collapsed": why is not None,
            })
        state["done"] += len(batch)
        state["probe_done"].append(state["done"])
        state["probe_why"].append(why or "")
        if why == NONFINITE:
            state["stop_reason"] = "non-finite"
            log.warning("non-finite weights or logits after %d edits: the run stops here", state["done"])
        else:
            streak = collapsed_for(state["probe_done"], [bool(w) for w in state["probe_why"]])
            if patience and streak is not None and streak >= patience:
                state["stop_reason"] = "collapsed"
                log.warning("collapsed for %d edits after %d edits: the run stops here", streak, state["done"])
        stopping = state["stop_reason"] != "completed"
        last = state["done"] == params.n_edits or stopping
        if _crossed(state["done"], len(batch), params.norm_every) or last:
            record_norms()
        if (measurer is not None and state["stop_reason"] != "non-finite"
                and ((params.measure_every and _crossed(state["done"], len(batch), params.measure_every))
                     or _reached(state["done"], len(batch), params.measure_at) or last)):
            measure_now()
        pause = deadline is not None and not last and time.time() >= deadline
        if _crossed(state["done"], len(batch), params.checkpoint_every) or last or pause:
            checkpoint()
        bar.update(len(batch))
        bar.set_postfix(probe_ppl=f"{ppl:.1f}")
        if pause:
            bar.close()
            raise Paused(f"{output.name}: paused at its deadline after {state['done']} of "
                         f"{params.n_edits} edits; the state is saved in {run.state_file.name}")
    bar.close()

    n_done = state["done"]
    if state["stop_reason"] == "non-finite":
        final_new = final_true = np.full(n_done, np.nan)
    else:
        final_new, final_true = _edit_scores(lm, requests[:n_done])
    ds = _to_dataset(state, lm.n_layers, list(lm.spec.matrices), edited, final_new, final_true)
    return run.finish(
        ds, str(lm.device), **_run_attrs(params, editor, edited),
        measure_time_s=round(state["measure_seconds"], 2),
        measure_params=dataclasses.asdict(measurer.params) if measurer is not None else {},
        collapse_rule=probe.params.rule(), collapse_params=dataclasses.asdict(probe.params),
        stop_reason=state["stop_reason"], n_edits_done=n_done, **_segment_attrs(state),
    )


def portable(ds: xr.Dataset) -> dict:
    """A checkpoint's measurements as the state keeps them: plain dicts of numpy arrays. A pickled
    Dataset carries its pandas indexes, whose string type depends on the machine (pyarrow-backed
    where pyarrow is installed), so a state saved on one machine might not load on another."""
    d = ds.to_dict(data="array")
    for part in ("coords", "data_vars"):
        for var in d[part].values():
            if var["data"].dtype == object:  # strings: fixed-width numpy strings, no pandas type
                var["data"] = var["data"].astype(str)
    return d


def from_portable(m) -> xr.Dataset:
    """The Dataset of a checkpoint kept by :func:`portable` (or, in states saved before, as is)."""
    return xr.Dataset.from_dict(m) if isinstance(m, dict) else m


def _segment_attrs(state: dict) -> dict:
    """The stretches a run was made in: commit, device, torch's CPU thread count and starting edit
    count of each (-1: a stretch saved before these were recorded); the run's ``git_sha``, the commit its last
    stretch started from (the code that made the edits, even if the checkout moved on while it ran);
    and the editor's context prefixes, which the state keeps so that every stretch uses the same ones
    ("none" for editors without)."""
    shas = state.get("git_shas", [])
    templates = (state.get("editor") or {}).get("templates")
    return {"git_sha": (shas or ["unknown"])[-1],
            "context_templates": templates if templates is not None else "none",
            "git_shas_by_segment": shas,
            "devices_by_segment": state.get("devices", [state.get("device", "not recorded")] * len(shas)),
            "threads_by_segment": state.get("threads", [-1] * len(shas)),
            "segment_starts": state.get("segment_starts", [-1] * len(shas))}


def _run_attrs(params: SequentialParams, editor, edited) -> dict:
    """What a sequential run's file says about the run besides its parameters (a finished run and a
    view of one in progress alike): model, editor, edited matrices, facts file, hyperparameters."""
    return {"model": params.model, "editor": params.editor, "edited_matrices": [f"{l}:{m}" for l, m in edited],
            "facts_file": params.facts,
            "hparams": dataclasses.asdict(editor.hp) if dataclasses.is_dataclass(editor.hp) else {}}


def _to_dataset(state: dict, n_layers: int, matrices: list[str], edited, final_new, final_true) -> xr.Dataset:
    """The run's Dataset from its state: per-edit rows, norm steps, checkpoint measurements."""
    rows = state["rows"]
    edit = np.arange(1, len(rows) + 1)
    col = lambda k: np.array([r[k] for r in rows])  # noqa: E731
    mask = np.zeros((n_layers, len(matrices)), dtype=np.int8)
    for layer, mtype in edited:
        mask[layer, matrices.index(mtype)] = 1
    nll_new, nll_true = col("nll_new").astype(float), col("nll_true").astype(float)
    probe_ppl = np.array([r.get("probe_ppl", np.nan) for r in rows], dtype=float)
    collapsed = np.array([r.get("collapsed", False) for r in rows], dtype=np.int8)
    ds = xr.Dataset(
        {
            "weight_norm": (("step", "layer", "matrix"), np.stack(state["norms"])),
            "drift_norm": (("step", "edited_matrix"), np.array(state["drift"], dtype=float)),
            "edited": (("layer", "matrix"), mask),
            "delta_norm": ("edit", col("delta_norm").astype(float)),
            "nll_new_pre": ("edit", col("nll_new_pre").astype(float)),
            "nll_true_pre": ("edit", col("nll_true_pre").astype(float)),
            "nll_new": ("edit", nll_new),
            "nll_true": ("edit", nll_true),
            "efficacy": ("edit", _wins(nll_new, nll_true)),
            "efficacy_final": ("edit", _wins(np.asarray(final_new, float), np.asarray(final_true, float))),
            "probe_ppl": ("edit", probe_ppl),
            "collapsed": ("edit", collapsed),
            "collapse_edit": ((), first_collapse(np.arange(1, len(rows) + 1), collapsed)),
            "edit_seconds": ("edit", col("edit_seconds").astype(float)),
            "v_steps": ("edit", col("v_steps").astype(float)),
            "case_id": ("edit", col("case_id").astype(np.int64)),
            "subject": ("edit", col("subject").astype(str)),
            "target_new": ("edit", col("target_new").astype(str)),
            "target_true": ("edit", col("target_true").astype(str)),
        },
        coords={"step": np.array(state["norm_steps"]), "layer": np.arange(n_layers),
                "matrix": matrices, "edit": edit, "edited_matrix": [f"{l}:{m}" for l, m in edited]},
    )
    ds["weight_norm"].attrs["long_name"] = "Frobenius norm after `step` edits"
    ds["drift_norm"].attrs["long_name"] = "‖W_step − W_0‖_F of each edited matrix: how far the edits moved it"
    ds["delta_norm"].attrs["long_name"] = "Frobenius norm of the update made by the editor call ending at this edit"
    ds["efficacy"].attrs["long_name"] = "P(new) > P(true) on the rewrite prompt right after the edit"
    ds["efficacy_final"].attrs["long_name"] = "P(new) > P(true) on the rewrite prompt after all edits"
    ds["edit_seconds"].attrs["long_name"] = "seconds of editor time per fact"
    ds["probe_ppl"].attrs["long_name"] = "collapse probe: perplexity of held-out text after the editor call making this edit"
    ds["probe_ppl"].attrs["unedited"] = float(state.get("probe_ref", np.nan))
    ds["collapsed"].attrs["long_name"] = "1 where the collapse rule held after the editor call making this edit"
    ds["collapse_edit"].attrs["long_name"] = "first edit after which the collapse rule held (-1: never)"
    if state["measures"]:
        measures = xr.concat([from_portable(m) for m in state["measures"]], dim="ckpt", data_vars="minimal", coords="minimal",
                             compat="override", join="outer")
        if "edit" in measures.dims:  # per-fact scores of facts never edited (a run that stopped early)
            measures = measures.isel(edit=slice(0, len(rows)))
        ds = xr.merge([ds, measures], combine_attrs="drop_conflicts", compat="no_conflicts", join="outer")
    return ds


def progress_path(output: str | Path) -> Path:
    """Where :func:`snapshot` writes a view of a run still in progress: ``progress/<name>`` beside
    the run's own file (never the run's own path, so an unfinished run is never taken for done)."""
    output = Path(output)
    return output.parent / "progress" / output.name


def snapshot(output: str | Path, write: bool = True) -> xr.Dataset | None:
    """A Dataset of a run in progress, read from its resume state without touching the run: the
    norms, per-edit rows, probe and checkpoint measurements made so far, with ``stop_reason`` "in
    progress" and ``n_edits_done``. Scores after the whole sequence (``efficacy_final``) do not exist
    yet and are NaN. Written to :func:`progress_path` when ``write``; None when there is no state."""
    output = from_root(output)
    state_file = store.state_path(output)
    if not state_file.exists():
        return None
    try:
        state = store.peek_state(state_file)
    except Exception as err:
        raise RuntimeError(f"the resume state {state_file} cannot be read ({type(err).__name__}: {err})") from err
    params = SequentialParams(**state["params"])
    lm = load_model(params.model, device="cpu")  # the architecture's layer and matrix names
    editor = make_editor(params.editor, lm, **params.hparams)
    edited = editor.edited_matrices()
    n_done = len(state["rows"])
    missing = np.full(n_done, np.nan)
    ds = _to_dataset(state, lm.n_layers, list(lm.spec.matrices), edited, missing, missing)
    ds.attrs.update(store.provenance(
        state["params"], state.get("device", "not recorded"), run_id=output.stem, **_run_attrs(params, editor, edited),
        wall_time_s=round(float(state["elapsed"]), 2), measure_time_s=round(float(state["measure_seconds"]), 2),
        collapse_params=state["params"].get("collapse", {}), stop_reason="in progress", n_edits_done=n_done,
        **_segment_attrs(state), snapshot_of=state_file.name,
    ))
    if write:
        store.write_netcdf(ds, progress_path(output))
    return ds


def _wins(nll_new: np.ndarray, nll_true: np.ndarray) -> np.ndarray:
    """1 where the new object is preferred, as int8; as float with NaN where either NLL is missing
    (a model that became non-finite is not scored)."""
    missing = np.isnan(nll_new) | np.isnan(nll_true)
    wins = prefers_new(np.where(missing, 0.0, nll_new), np.where(missing, 0.0, nll_true))
    if not missing.any():
        return wins.astype(np.int8)
    return np.where(missing, np.nan, wins.astype(float))
