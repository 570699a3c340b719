"""Plain-text summaries of run files (what notebooks print and the book quotes)."""
from __future__ import annotations

import json

import numpy as np
import xarray as xr

from repro.core.store import run_params, threads_note


def edited_norms(ds: xr.Dataset) -> xr.DataArray:
    """‖W‖_F over steps of each edited matrix, dims ("step", "edited"), labelled "layer:matrix"."""
    pairs = _edited_pairs(ds)
    cols = [ds["weight_norm"].sel(layer=layer, matrix=matrix).values for layer, matrix in pairs]
    return xr.DataArray(np.stack(cols, axis=1), dims=("step", "edited"),
                        coords={"step": ds["step"].values, "edited": [f"{l}:{m}" for l, m in pairs]})


def _edited_pairs(ds: xr.Dataset) -> list[tuple[int, str]]:
    """The run's edited matrices as (layer, matrix type), in the order of the ``edited`` mask (row-major)."""
    return [(int(ds["layer"].values[l]), str(ds["matrix"].values[m])) for l, m in zip(*np.nonzero(ds["edited"].values))]


def edited_labels(ds: xr.Dataset) -> list[str]:
    """The run's edited matrices as "layer:matrix", in the order of the ``edited`` mask (row-major)."""
    return [f"{layer}:{matrix}" for layer, matrix in _edited_pairs(ds)]


def edited_type(ds: xr.Dataset) -> str:
    """The matrix type (e.g. "mlp_down") of the run's first edited matrix, the one its edited
    matrices are compared within."""
    layer_idx, matrix_idx = np.nonzero(ds["edited"].values)
    if not layer_idx.size:
        raise ValueError(f"run {ds.attrs.get('run_id', '?')} marks no matrix as edited")
    return str(ds["matrix"].values[matrix_idx[0]])


def unedited_norms(ds: xr.Dataset, mtype: str, drop: bool = False) -> xr.DataArray:
    """‖W‖_F over steps of the matrices of type ``mtype`` the run left unedited (dims "step",
    "layer"): NaN at edited layers, or those layers dropped with ``drop``."""
    return ds["weight_norm"].sel(matrix=mtype).where(ds["edited"].sel(matrix=mtype) == 0, drop=drop)


def _above_unedited(ds: xr.Dataset) -> tuple[xr.DataArray, np.ndarray]:
    """Whether each edited matrix's norm is above the largest norm among the unedited matrices of
    its type, per measured step (dims "step", "edited"), and which were above it before any edit."""
    en = edited_norms(ds)
    mtype = edited_type(ds)
    unedited = unedited_norms(ds, mtype)
    above = en > unedited.max("layer").values[:, None]
    return above, above.isel(step=0).values


def started_above(ds: xr.Dataset) -> list[str]:
    """The edited matrices ("layer:matrix") whose norm was above the largest unedited matrix of
    their type before any edit (on Gemma-3-270M, MEMIT's and ENCORE's layer 5 ``mlp_down``): editing
    cannot make them pass it, so :func:`crossing_edit` and :func:`ends_above` leave them out."""
    above, first = _above_unedited(ds)
    return [str(e) for e in above["edited"].values[first]]


def crossing_edit(ds: xr.Dataset) -> int:
    """The first measured edit count after which an edited matrix that started at or below the
    largest norm among the unedited matrices of its type exceeds it (-1: never, or no edited matrix
    started at or below it; matrices already above before any edit, :func:`started_above`, are left out)."""
    above, first = _above_unedited(ds)
    hits = np.flatnonzero(above.values[:, ~first].any(axis=1))
    return int(ds["step"].values[hits[0]]) if hits.size else -1


def ends_above(ds: xr.Dataset) -> bool | None:
    """Whether an edited matrix that started at or below the largest unedited matrix of its type is
    above it at the last measured step; None when every edited matrix started above it."""
    above, first = _above_unedited(ds)
    return bool(above.values[-1, ~first].any()) if (~first).any() else None


def summarize_run(ds: xr.Dataset, decimals: int = 3) -> str:
    """A few deterministic lines: edits, efficacy, norms of edited vs unedited matrices."""
    en = edited_norms(ds)
    n = int(ds.sizes["edit"])
    lines = [
        f"run {ds.attrs.get('run_id', '?')}: editor={ds.attrs.get('editor')} model={ds.attrs.get('model')} "
        f"edits={n} edited={[str(x) for x in en['edited'].values]}",
        f"efficacy right after each edit: {ds['efficacy'].mean().item():.{decimals}f}",
        f"efficacy of all edits at the end: {ds['efficacy_final'].mean().item():.{decimals}f}",
    ]
    if "collapse_edit" in ds:
        first = int(ds["collapse_edit"])
        lines.append(f"ended: {ds.attrs.get('stop_reason', '?')} after {n} edits; collapse rule first held "
                     + (f"after edit {first}" if first >= 0 else "never"))
    for name in en["edited"].values:
        series = en.sel(edited=name).values
        layer, mtype = name.split(":")
        others = unedited_norms(ds, mtype)
        lines.append(
            f"{name}: norm {series[0]:.{decimals}f} -> {series[-1]:.{decimals}f} "
            f"(x{series[-1] / series[0]:.{decimals}f}); unedited {mtype} layers: mean "
            f"{float(others.isel(step=0).mean()):.{decimals}f} -> {float(others.isel(step=-1).mean()):.{decimals}f}"
        )
    return "\n".join(lines)


def edit_table(ds: xr.Dataset, decimals: int = 2) -> str:
    """One line per edit: subject, old -> new, NLLs before/after, efficacy, ‖ΔW‖."""
    rows = [f"{'edit':>4} {'subject':<28} {'true -> new':<34} {'nll new pre/post':>16} {'eff':>3} {'|dW|':>7}"]
    for i in range(ds.sizes["edit"]):
        e = ds.isel(edit=i)
        change = f"{e['target_true'].item()} -> {e['target_new'].item()}"
        nll = f"{e['nll_new_pre'].item():.{decimals}f}/{e['nll_new'].item():.{decimals}f}"
        rows.append(
            f"{int(e['edit']):>4} {str(e['subject'].item())[:28]:<28} {change[:34]:<34} {nll:>16} "
            f"{_flag(e['efficacy'].item()):>3} {e['delta_norm'].item():>7.{decimals}f}"
        )
    return "\n".join(rows)


def _flag(value) -> str:
    """0/1 as a digit, a missing value (a non-finite model was not scored) as '-'."""
    return "-" if value != value else str(int(value))


def provenance_lines(ds: xr.Dataset, path) -> str:
    """Which file and which parameters made a figure: printed under every figure of the book."""
    from pathlib import Path

    from repro.core.paths import ROOT

    path = Path(path)
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    params = run_params(ds, missing_ok=True)
    lines = [
        f"file: {shown}",
        f"parameters: {json.dumps(params, sort_keys=True)}",
        f"git: {ds.attrs.get('git_sha', '?')}  device: {ds.attrs.get('device', '?')}  "
        f"created: {ds.attrs.get('created_utc', '?')}  wall time: {ds.attrs.get('wall_time_s', '?')} s",
    ]
    if former_values(ds):
        from repro.editors.locate import FORMER_VALUES

        lines.append(f"value optimisation: made with {FORMER_VALUES}, not the authors' form")
    stretches = _segments(ds)
    if stretches:  # a run made in stretches: where each began and ran (and on how many threads)
        lines.append("stretches (from edit, device, git): " + "; ".join(
            f"{'?' if s < 0 else s + 1}, {d}{threads_note(t)}, {g[:12]}"
            for s, d, g, t in stretches))
    return "\n".join(lines)


def former_values(ds: xr.Dataset) -> bool:
    """Whether a run's editor optimised its values in the package's former form
    (:func:`repro.editors.locate.value_form`): such a run awaits its rerun with the published form."""
    from repro.editors.locate import value_form

    return value_form(json.loads(ds.attrs.get("hparams", "{}"))) == "former"


def display_name(editor: str) -> str:
    """The editor's name in tables and legends, from the editor registry; an unknown editor is an
    error. (Imported on first use: the registry loads the editors, torch included.)"""
    from repro.editors.registry import display_name as registered

    return registered(editor)


def model_name(model: str) -> str:
    """A model's name in the book: the packaged model's title, or the hub name as given."""
    from repro.core.models import PACKAGED

    spec = PACKAGED.get(model)
    return spec.title if spec is not None and spec.title else model


def run_model(ds: xr.Dataset) -> str:
    """The model a run file was made with. Files without the attribute are the default model's.
    (The default is read on first use, like the titles above.)"""
    from repro.core.models import DEFAULT_MODEL

    return str(ds.attrs.get("model", DEFAULT_MODEL))


def is_default_model(model: str) -> bool:
    """Whether ``model`` is the package's default one, which a run's label leaves unnamed."""
    from repro.core.models import DEFAULT_MODEL

    return model == DEFAULT_MODEL


LONG = 1000  # a sequential run planned for at least this many edits is a long run


def profile_runs(notebook: str, profile: str = "default", length: str = "all",
                 in_progress: bool = False) -> tuple[dict, list[str]]:
    """The finished runs of ``profile`` made by ``notebook`` as {run id: (Dataset, path)}, and the
    ids of those not run yet (the book lists them rather than silently leaving them out).

    ``length``: "short" keeps the runs declared with fewer than ``LONG`` edits (or none), "long"
    those with at least ``LONG``, "all" every run. ``in_progress``: an unfinished run with a
    progress view (``python -m repro.study --snapshot``) is returned from that view, whose
    ``stop_reason`` attribute says "in progress"."""
    from repro.runs.sequential import progress_path
    from repro.core.store import read_netcdf
    from repro.study import load_profile

    if length not in ("all", "short", "long"):
        raise ValueError(f"length must be 'all', 'short' or 'long', got {length!r}")
    done, missing = {}, []
    for run in load_profile(profile):
        if run.notebook != notebook:
            continue
        planned = int(run.parameters.get("n_edits", 0))
        if (length == "short" and planned >= LONG) or (length == "long" and planned < LONG):
            continue
        progress = progress_path(run.output)
        if run.output.exists():
            done[run.id] = (read_netcdf(run.output), run.output)
        elif in_progress and progress.exists():
            done[run.id] = (read_netcdf(progress), progress)
        else:
            missing.append(run.id)
    return done, missing


def norm_growth_table(runs: dict) -> str:
    """Per run: edits, batch, edited matrices, mean ‖W‖ of the edited matrices before → after and
    the ratio, the largest per-layer ratio, the share of measurement steps after which an edited
    matrix's norm was higher than before, the largest unedited matrix of that type, efficacy right
    after and at the end."""
    head = (f"{'editor':<10} {'edits':>5} {'batch':>5} {'edited':<22} {'norm before':>11} {'after':>8} "
            f"{'ratio':>6} {'max ratio':>9} {'rises':>5} {'max unedited':>12} {'ES now':>6} {'ES end':>6}")
    rows = [head]
    for ds, _ in runs.values():
        en = edited_norms(ds)
        mtype = edited_type(ds)
        unedited = unedited_norms(ds, mtype)
        layers = ",".join(str(x).split(":")[0] for x in en["edited"].values)
        params = run_params(ds, missing_ok=True)
        before, after = float(en.isel(step=0).mean()), float(en.isel(step=-1).mean())
        vals = en.transpose("step", ...).values
        max_ratio = float((vals[-1] / vals[0]).max())
        rises = float((np.diff(vals, axis=0) > 0).mean())
        rows.append(
            f"{display_name(str(ds.attrs.get('editor'))):<10} {ds.sizes['edit']:>5} {params.get('batch_size', 1):>5} "
            f"{('L' + layers + ' ' + mtype)[:22]:<22} {before:>11.2f} {after:>8.2f} {after / before:>6.3f} "
            f"{max_ratio:>9.3f} {rises:>5.2f} "
            f"{float(unedited.isel(step=-1).max()):>12.2f} {float(ds['efficacy'].mean()):>6.2f} "
            f"{float(ds['efficacy_final'].mean()):>6.2f}"
        )
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# Post-training runs (repro.runs.post_training, figure F1)
# --------------------------------------------------------------------------------------------
INTERVENTION_LABELS = {"cpt": "continued pre-training", "full_ft": "full fine-tuning", "lora": "LoRA fine-tuning"}


def relative_norms(ds: xr.Dataset) -> xr.DataArray:
    """‖W_t‖_F / ‖W_0‖_F per (step, layer, matrix) of a post-training run."""
    return ds["weight_norm"] / ds["weight_norm"].isel(step=0)


def growth_decomposition(ds: xr.Dataset) -> xr.Dataset:
    """Split each matrix's norm change at every recorded step into its two sources, from
    ‖W_t‖² = ‖W_0‖² + 2⟨W_0, ΔW⟩ + ‖ΔW‖² (ΔW = W_t − W_0, recorded as ``delta_norm``):

    - ``orthogonal``: ‖W_t‖/‖W_0‖ − 1 if ΔW were orthogonal to W_0, √(1 + ‖ΔW‖²/‖W_0‖²) − 1 (> 0);
    - ``observed``: ‖W_t‖/‖W_0‖ − 1;
    - ``cosine``: cos(W_0, ΔW) = (‖W_t‖² − ‖W_0‖² − ‖ΔW‖²) / (2 ‖W_0‖ ‖ΔW‖) (NaN where ΔW = 0).
    """
    w0 = ds["weight_norm"].isel(step=0)
    w, d = ds["weight_norm"], ds["delta_norm"]
    cosine = ((w**2 - w0**2 - d**2) / (2 * w0 * d)).where(d > 0)
    return xr.Dataset({"observed": w / w0 - 1, "orthogonal": np.sqrt(1 + (d / w0) ** 2) - 1, "cosine": cosine})


def short_matrix(mtype: str) -> str:
    """``attn_q`` -> ``q``, ``mlp_down`` -> ``down`` (labels of figures and tables)."""
    return str(mtype).split("_", 1)[-1]


def training_setting(ds: xr.Dataset) -> str:
    """A short label of a post-training run: intervention, learning rate, weight decay, steps."""
    p = run_params(ds, missing_ok=True)
    iv = p.get("intervention", ds.attrs.get("intervention", "?"))
    label = f"{INTERVENTION_LABELS.get(iv, iv)}, lr {p.get('lr', '?'):g}, wd {p.get('weight_decay', '?'):g}"
    if iv == "lora":
        label += f", r {p.get('lora_r')} α {p.get('lora_alpha'):g}"
    return label


def summarize_training(ds: xr.Dataset, decimals: int = 3) -> str:
    """A few deterministic lines about a post-training run: losses, held-out measurements and the
    final change of ‖W_t‖/‖W_0‖ per matrix type, in per cent (mean over the layers of the trained
    matrices, and the layer that changed most)."""
    rel = relative_norms(ds).where(ds["trained"] == 1)
    pct = 100 * (rel.isel(step=-1) - 1)
    loss = ds["train_loss"].values
    k = max(1, min(10, len(loss) // 5))
    ev = ds.isel(eval_step=[0, -1])
    lines = [
        f"run {ds.attrs.get('run_id', '?')}: {training_setting(ds)}; model={ds.attrs.get('model')} "
        f"steps={ds.sizes['opt_step']} trainable params={ds.attrs.get('n_trainable')}",
        f"training loss, mean of the first / last {k} steps: {loss[:k].mean():.3f} -> {loss[-k:].mean():.3f}",
        f"held-out Wikipedia perplexity: {float(ev['eval_ppl'][0]):.2f} -> {float(ev['eval_ppl'][1]):.2f}; "
        f"held-out task answer NLL: {float(ev['task_loss'][0]):.3f} -> {float(ev['task_loss'][1]):.3f}, "
        f"exact match: {float(ev['task_acc'][0]):.3f} -> {float(ev['task_acc'][1]):.3f}",
        f"after {int(ds['step'][-1])} steps, ‖W_t‖/‖W_0‖ − 1 in per cent per matrix type "
        f"(mean over layers | largest):",
    ]
    for m in ds["matrix"].values:
        col = pct.sel(matrix=m)
        if bool(col.notnull().any()):
            vals = col.values
            big = float(vals[np.nanargmax(np.abs(vals))])
            lines.append(f"  {short_matrix(m):<5} {float(col.mean()):+.{decimals}f} % | {big:+.{decimals}f} %")
        else:
            lines.append(f"  {short_matrix(m):<5} (not trained)")
    share = (ds["delta_norm"] / ds["weight_norm"].isel(step=0)).where(ds["trained"] == 1).isel(step=-1)
    what = "‖(α/r)BA‖/‖W_0‖" if ds.attrs.get("intervention") == "lora" else "‖W_t − W_0‖/‖W_0‖"
    lines.append(f"{what}, mean over trained matrices: {float(share.mean()):.{decimals + 1}f}")
    return "\n".join(lines)


def relative_norm_table(runs: dict, decimals: int = 3) -> str:
    """One row per post-training run (``{id: (Dataset, path)}``): steps, the final change
    ‖W_t‖/‖W_0‖ − 1 in per cent per matrix type (mean over the layers of the trained matrices),
    over all trained matrices, and of the matrix that grew most; how far the matrices moved
    (‖ΔW‖/‖W_0‖, mean; for LoRA the adapter's share); training loss (mean of the first and last
    steps) and held-out perplexity at the start and the end."""
    if not runs:
        return "(no post-training runs yet)"
    first = next(iter(runs.values()))[0]
    mats = [short_matrix(m) for m in first["matrix"].values]
    w = decimals + 5
    head = (f"{'run':<34} {'steps':>5} " + " ".join(f"{m:>{w}}" for m in mats)
            + f" {'all':>{w}} {'max':>{w}} {'|dW|/|W0|':>9} {'loss':>13} {'ppl':>15}")
    rows = ["‖W_t‖/‖W_0‖ − 1 in per cent at the last step (mean over layers), then the training "
            "loss and held-out perplexity, first -> last", head]
    for rid, (ds, _) in runs.items():
        pct = 100 * (relative_norms(ds).where(ds["trained"] == 1).isel(step=-1) - 1)
        per = [float(pct.sel(matrix=m).mean()) for m in ds["matrix"].values]
        cells = " ".join(f"{v:>+{w}.{decimals}f}" if np.isfinite(v) else f"{'-':>{w}}" for v in per)
        share = float((ds["delta_norm"] / ds["weight_norm"].isel(step=0)).where(ds["trained"] == 1).isel(step=-1).mean())
        loss = ds["train_loss"].values
        k = max(1, min(10, len(loss) // 5))
        ppl = ds["eval_ppl"].values
        rows.append(
            f"{rid[:34]:<34} {ds.sizes['opt_step']:>5} {cells} {float(pct.mean()):>+{w}.{decimals}f} "
            f"{float(pct.max()):>+{w}.{decimals}f} {share:>9.4f} "
            f"{loss[:k].mean():>6.3f}>{loss[-k:].mean():<6.3f} {ppl[0]:>7.2f}>{ppl[-1]:<7.2f}"
        )
    return "\n".join(rows)


# -- runs of thousands of edits -------------------------------------------------------------------
def growth_at(ds: xr.Dataset, edits: int) -> float:
    """Growth of the edited matrices after ``edits`` edits: the mean ‖W‖_F of the edited matrices
    then over its value before the first edit (NaN when the run has not measured that count)."""
    mean = edited_norms(ds).mean("edited")
    steps = list(ds["step"].values)
    return float(mean.sel(step=edits) / mean.isel(step=0)) if edits in steps else float("nan")


def common_edits(a: xr.Dataset, b: xr.Dataset) -> int:
    """The largest edit count at which both runs measured their norms: where two runs of the same
    plan are compared when one stopped earlier (a run that collapsed, or one still going)."""
    both = set(int(s) for s in a["step"].values) & set(int(s) for s in b["step"].values)
    return max(both) if both else 0


def remedy_pair(encore: xr.Dataset, memit: xr.Dataset) -> dict:
    """ENCORE against MEMIT over the edits both made (:func:`common_edits`), with the pair's planned
    length and batch size: growth of the edited matrices there, mean efficacy right after each edit
    up to there, the collapse-probe ratio there, and how each run stands (a run that stopped
    earlier, or is still going, is compared where the shorter one ends)."""
    at = common_edits(encore, memit)
    p = run_params(encore, missing_ok=True)
    out = {"edits": at, "planned": int(p.get("n_edits", at)), "batch": int(p.get("batch_size", 1))}
    for name, ds in (("ENCORE", encore), ("MEMIT", memit)):
        probe = float("nan")
        if "probe_ppl" in ds and "unedited" in ds["probe_ppl"].attrs and at > 0:
            probe = float(ds["probe_ppl"].sel(edit=at)) / float(ds["probe_ppl"].attrs["unedited"])
        out[name] = {"growth": growth_at(ds, at),
                     "efficacy": float(ds["efficacy"].sel(edit=slice(None, at)).mean()),
                     "probe": probe, "done": int(ds.sizes["edit"]), "status": run_status(ds),
                     "collapse": collapse_edit(ds)}
    return out


def remedy_pairs(runs: dict) -> list[tuple[str, dict]]:
    """The ENCORE and MEMIT runs of ``runs`` ({id: (Dataset, path)}) that edit the same model with the
    same planned length and batch size, as [(label, {"encore": item, "memit": item})], shortest plan
    first; a run without its partner is left out."""
    groups: dict[tuple, dict] = {}
    for item in runs.values():
        ds = item[0]
        editor = str(ds.attrs.get("editor"))
        if editor not in ("encore", "memit"):
            continue
        p = run_params(ds, missing_ok=True)
        key = (int(p.get("n_edits", ds.sizes["edit"])), int(p.get("batch_size", 1)), str(ds.attrs.get("model")))
        groups.setdefault(key, {})[editor] = item
    return [(f"{model_name(model)}: {n:,} edits in batches of {batch}", pair)
            for (n, batch, model), pair in sorted(groups.items()) if len(pair) == 2]


def collapse_edit(ds: xr.Dataset) -> int:
    """The first edit after which the collapse rule held (-1: never, or a file made before the rule)."""
    return int(ds["collapse_edit"]) if "collapse_edit" in ds else -1


def probe_ratio(ds: xr.Dataset) -> float:
    """The last collapse-probe perplexity over the unedited model's (NaN without a probe)."""
    probe = ds["probe_ppl"] if "probe_ppl" in ds else None
    if probe is None or "unedited" not in probe.attrs:
        return float("nan")
    return float(probe.values[-1]) / float(probe.attrs["unedited"])


def run_status(ds: xr.Dataset) -> str:
    """How the run stands: "completed", "collapsed", "non-finite" or "in progress" (a progress
    view); files made before runs recorded it count as completed."""
    return str(ds.attrs.get("stop_reason", "completed"))


def _segments(ds: xr.Dataset) -> list[tuple[int, str, str, int]]:
    """The stretches a run's file records, in order: (edits done when it began, -1 where that was
    not recorded; device; commit, "?" where not recorded; torch's CPU thread count, -1 where not
    recorded). Empty for files that record none."""
    try:
        starts = [int(x) for x in json.loads(ds.attrs["segment_starts"])]
        devices = [str(d) for d in json.loads(ds.attrs["devices_by_segment"])]
        shas = [str(g) for g in json.loads(ds.attrs.get("git_shas_by_segment", "[]"))]
        threads = [int(t) for t in json.loads(ds.attrs.get("threads_by_segment", "[]"))]
    except (KeyError, TypeError, ValueError):
        return []
    return [(s, d, shas[i] if i < len(shas) else "?", threads[i] if i < len(threads) else -1)
            for i, (s, d) in enumerate(zip(starts, devices))]


def _spans(ds: xr.Dataset) -> list[tuple[int, int, str, list[str], int]]:
    """The edits of each stretch as (first, end) indices with the kind of device ("cpu", "cuda",
    ...), the commits and torch's CPU thread count (-1: not recorded, or not one count). Stretches
    saved before their starting counts were recorded (start -1) come first and form one span, on
    their device where they agree on one, else "unknown"."""
    n = int(ds.sizes["edit"])
    segs = [(s, d.split(":")[0], g, t) for s, d, g, t in _segments(ds)]
    known = [seg for seg in segs if seg[0] >= 0]
    early = [seg for seg in segs if seg[0] < 0]
    spans = []
    if early:
        devices, threads = {d for _, d, _, _ in early}, {t for *_, t in early}
        spans.append((0, known[0][0] if known else n, devices.pop() if len(devices) == 1 else "unknown",
                      [g for _, _, g, _ in early], threads.pop() if len(threads) == 1 else -1))
    for (start, dev, sha, threads), nxt in zip(known, known[1:] + [None]):
        spans.append((start, nxt[0] if nxt else n, dev, [sha], threads))
    return [sp for sp in spans if sp[1] > sp[0]]


def edit_devices(ds: xr.Dataset) -> np.ndarray:
    """The kind of device ("cpu", "cuda", ...) each edit of a run was made on, from the stretches
    its file records (:func:`_spans`); "unknown" where they do not tell, as for every edit of a
    file that records no stretches."""
    out = np.full(int(ds.sizes["edit"]), "unknown", dtype=object)
    for first, end, dev, *_ in _spans(ds):
        out[first:end] = dev
    return out


def run_batch(ds: xr.Dataset, missing_ok: bool = False) -> int:
    """The batch size a run edited in (1: one fact at a time); ``missing_ok`` as in :func:`run_params`."""
    return int(run_params(ds, missing_ok).get("batch_size", 1))


def run_name(ds: xr.Dataset) -> str:
    """A long run's name in the tables: the editor's, with its batch size above 1 ("MEMIT, batches of 10")."""
    batch = run_batch(ds)
    return display_name(str(ds.attrs.get("editor"))) + (f", batches of {batch}" if batch > 1 else "")


def stretch_table(runs: dict):
    """One row per stretch of each run (a run paused and resumed, perhaps on another machine): its
    edits (first and last), device, torch's CPU thread count ("–" where not recorded), commits and
    median editor seconds per fact. Stretches saved before their starting counts were recorded are
    one row (their edits cannot be told apart). A pandas DataFrame."""
    import pandas as pd

    rows = []
    for ds, _ in runs.values():
        name = run_name(ds)
        sec = ds["edit_seconds"].values
        for first, end, dev, shas, threads in _spans(ds):
            rows.append({"run": name, "edits": f"{first + 1:,}–{end:,}", "device": dev,
                         "threads": str(threads) if threads > 0 else "–",
                         "s/edit": float(np.nanmedian(sec[first:end])), "commits": ", ".join(g[:7] for g in shas)})
    return pd.DataFrame(rows)


def long_run_table(runs: dict, at=(100, 1000, 3000)):
    """One row per run (labelled by editor and batch size): edits done of those planned, status, median editor
    seconds per fact on CPUs and on GPUs (:func:`edit_devices`; NaN where none was made there), growth of the edited matrices (:func:`growth_at`) after each count of ``at``
    and at the last measured step, the first edit after which an edited matrix passes the largest
    unedited one of its type (:func:`crossing_edit`), the first edit where the collapse rule held,
    and the last collapse-probe perplexity over the unedited model's. A pandas DataFrame."""
    import pandas as pd

    rows = []
    for rid, (ds, _) in runs.items():
        params = run_params(ds)
        last_step = int(ds["step"].values[-1])
        row = {
            "run": run_name(ds),
            "edits": f"{int(ds.sizes['edit']):,}/{int(params['n_edits']):,}",
            "status": run_status(ds),
        }
        on = edit_devices(ds)
        for dev, label in (("cpu", "s/edit CPU"), ("cuda", "s/edit GPU")):
            sec = ds["edit_seconds"].values[on == dev]
            row[label] = float(np.nanmedian(sec)) if np.isfinite(sec).any() else np.nan
        for k in at:
            row[f"growth @{k:,}"] = growth_at(ds, k)
        row["growth now"] = growth_at(ds, last_step)
        row["passes unedited"] = _edit_or_none(crossing_edit(ds))
        row["collapse"] = _edit_or_none(collapse_edit(ds))
        row["probe ×"] = probe_ratio(ds)
        rows.append(row)
    table = pd.DataFrame(rows).set_index("run")
    # edit counts stay integers, "never" is a missing value
    return table.astype({"passes unedited": "Int64", "collapse": "Int64"})


def _edit_or_none(edit: int):
    return int(edit) if edit > 0 else None


def norm_growth_frame(runs: dict):
    """Per run (rows labelled by editor): edits, batch size, edited layers and matrix type, mean ‖W‖
    of the edited matrices before and after, the growth (after over before), the largest per-layer
    ratio, the share of measured steps after which the mean edited norm rose, the largest unedited
    matrix of that type at the end, and efficacy right after each edit and after the sequence.
    A pandas DataFrame (the book shows it as an HTML table)."""
    import pandas as pd

    rows = []
    for ds, _ in runs.values():
        en = edited_norms(ds)
        mtype = edited_type(ds)
        unedited = unedited_norms(ds, mtype)
        mean = en.mean("edited").values
        vals = en.transpose("step", ...).values
        rows.append({
            "editor": display_name(str(ds.attrs.get("editor"))), "edits": int(ds.sizes["edit"]),
            "batch": run_batch(ds, missing_ok=True),
            "layers": ",".join(str(x).split(":")[0] for x in en["edited"].values),
            "‖W‖ before": float(mean[0]), "‖W‖ after": float(mean[-1]), "growth": float(mean[-1] / mean[0]),
            "largest layer ratio": float((vals[-1] / vals[0]).max()), "rises": float((np.diff(mean) > 0).mean()),
            "largest unedited": float(unedited.isel(step=-1).max()),
            "ES right after": float(ds["efficacy"].mean()), "ES at the end": float(ds["efficacy_final"].mean()),
        })
    return pd.DataFrame(rows).set_index("editor")


def relative_norm_frame(runs: dict):
    """The post-training table (pandas DataFrame, one row per run, labelled by its setting): the
    final change ‖W_t‖/‖W_0‖ − 1 in per cent per matrix type (mean over the trained layers), over
    all trained matrices and of the one that grew most; how far the matrices moved (‖ΔW‖/‖W_0‖,
    mean); the share of trained matrices that grew and of recording intervals over which the mean
    rose; the orthogonal-update prediction √(1 + ‖ΔW‖²/‖W_0‖²) − 1 (per cent) and the median cosine
    of the update with W_0; training loss and held-out perplexity, first and last."""
    import pandas as pd

    rows = []
    for ds, _ in runs.values():
        rel = relative_norms(ds).where(ds["trained"] == 1)
        pct = 100 * (rel.isel(step=-1) - 1)
        mean = rel.mean(("layer", "matrix")).values
        g = growth_decomposition(ds).where(ds["trained"] == 1).isel(step=-1)
        loss, ppl = ds["train_loss"].values, ds["eval_ppl"].values
        k = max(1, min(10, len(loss) // 5))
        row = {"run": training_setting(ds), "steps": int(ds.sizes["opt_step"])}
        row.update({f"{short_matrix(m)} %": float(pct.sel(matrix=m).mean()) for m in ds["matrix"].values})
        row.update({
            "all %": float(pct.mean()), "max %": float(pct.max()),
            "‖ΔW‖/‖W0‖": float((ds["delta_norm"] / ds["weight_norm"].isel(step=0)).where(ds["trained"] == 1)
                               .isel(step=-1).mean()),
            "grown": float((pct > 0).sum() / pct.notnull().sum()),
            "rising": float((np.diff(mean) > 0).mean()) if len(mean) > 1 else float("nan"),
            "if ⟂ %": 100 * float(g.orthogonal.mean()), "cos(W0, ΔW)": float(g.cosine.median()),
            "loss first": float(loss[:k].mean()), "loss last": float(loss[-k:].mean()),
            "ppl first": float(ppl[0]), "ppl last": float(ppl[-1]),
        })
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")
