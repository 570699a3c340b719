"""Figures F4-F7 and table T1: what sequential editing does to the model, from the checkpoint
measurements stored in the run files (dimension ``ckpt``: number of edits made so far).

Everything here reads run Datasets only; ``runs`` is a ``{run_id: (Dataset, path)}`` mapping as
returned by :func:`measured_runs`.
"""
from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr
from matplotlib.colors import to_rgb

from repro.editors.registry import REGISTRY, editor_spec
from repro.measure.rewrite import harmonic_mean
from repro.reporting.plots import BOOK_WIDTH
from repro.reporting.tables import (collapse_edit, crossing_edit, display_name, edited_norms, edited_type, growth_at,
                                    profile_runs, run_batch, unedited_norms)
from repro.core.store import run_params


def measured_runs(profile: str = "default", length: str = "short",
                  in_progress: bool = False) -> tuple[dict, list[str]]:
    """The sequential runs of ``profile`` whose files hold checkpoint measurements, and the ids of
    the sequential runs that do not (missing, or made without measurements); ``length`` and
    ``in_progress`` as in :func:`repro.reporting.tables.profile_runs` (default: the 100-edit runs)."""
    runs, missing = profile_runs("notebooks/sequential_editing.ipynb", profile, length, in_progress)
    have = {rid: v for rid, v in runs.items() if "ckpt" in v[0].dims}
    return have, missing + [rid for rid in runs if rid not in have]


def editor_colors(runs: dict) -> dict[str, tuple]:
    """{editor: RGB} of every registered editor (repro.editors.registry); a run made by an editor
    the registry does not know is an error, never a borrowed colour."""
    for ds, _ in runs.values():
        editor_spec(str(ds.attrs.get("editor")))
    return {key: to_rgb(spec.color) for key, spec in REGISTRY.items()}


def _label(ds: xr.Dataset, min_batch: int = 100) -> str:
    """The run's name in legends and tables: the editor's, plus its batch size from ``min_batch``
    up (default: 100, since the long runs edit MEMIT and ENCORE both in batches of 10 and of 100,
    those of 100 dashed; the long-run figures name every batch size above 1)."""
    batch = run_batch(ds)
    return display_name(str(ds.attrs.get("editor"))) + (f" (batches of {batch})" if batch >= min_batch else "")


def _style(ds: xr.Dataset) -> str:
    return "--" if run_batch(ds) >= 100 else "-"


def by_model(runs: dict) -> dict[str, dict]:
    """``runs`` split by the model they edit, {model key: runs}, in the order of first appearance:
    norms and scores of different models are never drawn on one axis."""
    groups: dict[str, dict] = {}
    for rid, v in runs.items():
        groups.setdefault(str(v[0].attrs.get("model")), {})[rid] = v
    return groups


def _panels(n: int, ncol: int = 2, height: float = 2.6):
    """``n`` panels in rows of ``ncol`` at the book's width (spare cells hidden), as a flat list."""
    nrow = -(-n // ncol)
    fig, grid = plt.subplots(nrow, ncol, figsize=(BOOK_WIDTH, height * nrow + 0.6), squeeze=False)
    flat = list(grid.flat)
    for ax in flat[n:]:
        ax.axis("off")
    return flat[:n]


def _shared_legend(axes, ncol: int = 5) -> None:
    """One legend for all panels, below them, outside the data (labels of the first panel, plus
    any reference lines of the others)."""
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig = axes[0].figure
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.06 + 0.04 * (len(labels) // ncol), 1, 1))


def _lines(runs: dict, ax, value, ylabel: str, title: str):
    colors = editor_colors(runs)
    for ds, _ in runs.values():
        y = value(ds)
        ax.plot(ds["ckpt"].values, y, marker="o", ms=3, color=colors[str(ds.attrs.get("editor"))], ls=_style(ds),
                label=_label(ds))
    ax.set(xlabel="number of edits", ylabel=ylabel, title=title)
    return ax


def off_scale_runs(runs: dict, value, factor: float = 3.0) -> tuple[list, float, float]:
    """Runs whose largest value exceeds ``factor`` times the largest of all the others (one broken
    model would otherwise flatten every other line), and the (low, high) range of the rest."""
    peaks = {rid: float(np.nanmax(value(ds))) for rid, (ds, _) in runs.items()}
    order = sorted(peaks, key=peaks.get, reverse=True)
    out = []
    # highest first: the largest of the runs not yet set aside is always the next one in order
    for rid, below in zip(order, order[1:]):
        if peaks[rid] <= factor * peaks[below]:
            break
        out.append(rid)
    kept = [value(ds) for rid, (ds, _) in runs.items() if rid not in out]
    lo = min(float(np.nanmin(v)) for v in kept) if kept else 0.0
    hi = max(float(np.nanmax(v)) for v in kept) if kept else 1.0
    return out, lo, hi


def _clip_outliers(runs: dict, ax, value):
    out, lo, hi = off_scale_runs(runs, value)
    if not out:
        return
    pad = 0.05 * (hi - lo or 1.0)
    ax.set_ylim(lo - pad, hi + pad)
    note = "; ".join(f"{_label(runs[r][0])} off scale: {float(value(runs[r][0])[-1]):.0f} at the end" for r in out)
    ax.text(0.02, 0.97, note, transform=ax.transAxes, va="top", fontsize=7)


# -- F4: downstream abilities ----------------------------------------------------------------
def plot_downstream(runs: dict, axes=None):
    """F4: few-shot accuracy per task and their mean, recall of never-edited facts and held-out
    perplexity vs number of edits, one line per editor; chance levels dashed."""
    first = next(iter(runs.values()))[0]
    tasks = list(first["task"].values)
    n = len(tasks) + 3
    shared = axes is None
    if axes is None:
        axes = _panels(n)
    for ax, task in zip(axes, tasks):
        _lines(runs, ax, lambda ds, t=task: ds["task_acc"].sel(task=t).values, "accuracy", f"{task} (few-shot)")
        ax.axhline(float(first["task_chance"].sel(task=task)), color="0.4", ls="--", lw=1, label="chance")
    _lines(runs, axes[len(tasks)], lambda ds: ds["task_mean_acc"].values, "mean accuracy", "tasks, mean")
    axes[len(tasks)].axhline(float(first["task_chance"].mean()), color="0.4", ls="--", lw=1, label="chance")
    _lines(runs, axes[len(tasks) + 1], lambda ds: ds["recall"].values, "share true > new",
           "recall of unedited facts")
    axes[len(tasks) + 1].axhline(0.5, color="0.4", ls="--", lw=1)
    perplexity = lambda ds: ds["perplexity"].values  # noqa: E731
    _lines(runs, axes[len(tasks) + 2], perplexity, "perplexity", "held-out Wikipedia")
    _clip_outliers(runs, axes[len(tasks) + 2], perplexity)
    if shared:
        _shared_legend(axes)
    else:
        axes[0].legend(frameon=False, fontsize=7)
    return axes


# -- F5: edit quality ------------------------------------------------------------------------
def plot_edit_quality(runs: dict, axes=None):
    """F5: efficacy, paraphrase, neighborhood score and their harmonic mean over all facts edited
    so far, and generation entropy, vs number of edits, one line per editor."""
    panels = [("es", "efficacy ES"), ("ps", "paraphrase PS"), ("ns", "neighborhood NS"), ("score", "S (harmonic mean)"),
              ("gen_entropy_mean", "generation entropy (bits)")]
    shared = axes is None
    if axes is None:
        axes = _panels(len(panels))
    for ax, (var, title) in zip(axes, panels):
        _lines(runs, ax, lambda ds, v=var: ds[v].values, title.split(" (")[0], title)
        if var != "gen_entropy_mean":
            ax.set_ylim(-0.02, 1.02)
    if shared:
        _shared_legend(axes)
    else:
        axes[0].legend(frameon=False, fontsize=7)
    return axes


# -- F6: activation norms --------------------------------------------------------------------
def relative_activation_norms(ds: xr.Dataset, sites=("resid", "attn", "mlp")) -> xr.DataArray:
    """Mean activation norm per site, relative to the unedited model's (checkpoint 0), averaged
    over layers: dims (ckpt, site)."""
    norm = ds["act_norm"].sel(site=list(sites))
    return (norm / norm.isel(ckpt=0)).mean("layer")


def plot_activation_norms(runs: dict, axes=None, sites=("resid", "attn", "mlp")):
    """F6a: mean norm of the residual stream, attention output and MLP output (relative to the
    unedited model, mean over layers) vs number of edits, one line per editor."""
    shared = axes is None
    if axes is None:
        axes = _panels(len(sites), ncol=len(sites) if len(sites) <= 3 else 2)
    for ax, site in zip(axes, sites):
        _lines(runs, ax, lambda ds, s=site: relative_activation_norms(ds, sites).sel(site=s).values,
               "‖h‖ / ‖h‖ unedited (mean over layers)", f"{site} norm")
        ax.axhline(1.0, color="0.4", ls="--", lw=1)
    if shared:
        _shared_legend(axes)
    else:
        axes[0].legend(frameon=False, fontsize=7)
    return axes


def plot_activation_norm_layers(ds: xr.Dataset, axes=None, sites=("resid", "attn", "mlp")):
    """F6b for one run: per layer, the mean norm of each site before editing and after the last
    edit, and each block's share of the residual stream (unedited vs edited)."""
    if axes is None:
        _, axes = plt.subplots(1, len(sites) + 1, figsize=(3.5 * (len(sites) + 1), 3.2))
    first, last = ds.isel(ckpt=0), ds.isel(ckpt=-1)
    edited_layers = ds["layer"].values[ds["edited"].any("matrix").values.astype(bool)]
    for ax, site in zip(axes, sites):
        ax.plot(ds["layer"], first["act_norm"].sel(site=site), color="0.3", label="unedited")
        ax.plot(ds["layer"], last["act_norm"].sel(site=site), color="tab:red", label=f"after {int(last['ckpt'])} edits")
        for l in edited_layers:
            ax.axvline(l, color="tab:red", alpha=0.15, lw=4)
        ax.set(xlabel="layer", ylabel="mean ‖h‖", title=f"{site}", yscale="log")
    ax = axes[len(sites)]
    for block, ls in (("attn", "-"), ("mlp", "--")):
        ax.plot(ds["layer"], first["act_share"].sel(block=block), color="0.3", ls=ls, label=f"{block}, unedited")
        ax.plot(ds["layer"], last["act_share"].sel(block=block), color="tab:red", ls=ls, label=f"{block}, edited")
    ax.set(xlabel="layer", ylabel="‖block output‖ / ‖residual‖", title="share of the residual stream", yscale="log")
    axes[0].legend(frameon=False, fontsize=7)
    ax.legend(frameon=False, fontsize=7)
    return axes


# -- F7: subspaces ---------------------------------------------------------------------------
def plot_subspaces(runs: dict, axes=None, site: str = "resid"):
    """F7a: subspace overlap (mean cos² of the top-k principal angles), linear CKA and mean
    cosine of matched activations, against the unedited model, mean over layers, vs edits."""
    panels = [("subspace_overlap", "subspace overlap (mean cos²)"), ("cka", "linear CKA"), ("act_cosine", "mean cosine")]
    shared = axes is None
    if axes is None:
        axes = _panels(len(panels), ncol=len(panels))
    for ax, (var, title) in zip(axes, panels):
        _lines(runs, ax, lambda ds, v=var: ds[v].sel(site=site).mean("layer").values, title, f"{site}: {title}")
    if shared:
        _shared_legend(axes)
    else:
        axes[0].legend(frameon=False, fontsize=7)
    return axes


def plot_subspace_layers(runs: dict, ax=None, site: str = "resid", var: str = "subspace_overlap"):
    """F7b: per layer, ``var`` after the last edit, one line per editor."""
    ax = ax or plt.subplots(figsize=(5, 3.2))[1]
    colors = editor_colors(runs)
    for ds, _ in runs.values():
        ax.plot(ds["layer"], ds[var].sel(site=site).isel(ckpt=-1), color=colors[str(ds.attrs.get("editor"))],
                label=_label(ds))
    ax.set(xlabel="layer", ylabel=var.replace("_", " "), title=f"{site} after the last edit")
    ax.legend(frameon=False, fontsize=7)
    return ax


def plot_pca(ds: xr.Dataset, layer: int, ax=None, site: str = "resid"):
    """F7c: 2-D PCA picture of the probe tokens at one layer, unedited (grey) and after the last
    edit (red), both in the unedited model's principal basis."""
    ax = ax or plt.subplots(figsize=(4, 4))[1]
    ref = ds["pca_ref"].sel(site=site, layer=layer).values
    cur = ds["pca"].sel(site=site, layer=layer).isel(ckpt=-1).values
    ax.scatter(ref[:, 0], ref[:, 1], s=8, color="0.5", alpha=0.6, label="unedited")
    ax.scatter(cur[:, 0], cur[:, 1], s=8, color="tab:red", alpha=0.6, label=f"after {int(ds['ckpt'][-1])} edits")
    ax.set(xlabel="PC1 (unedited)", ylabel="PC2 (unedited)", title=f"{_label(ds)}, {site}, layer {layer}")
    ax.legend(frameon=False, fontsize=7)
    return ax


# -- F2 at length: the whole trajectory of the long runs --------------------------------------------

def long_runs(runs: dict, min_edits: int = 1000) -> dict:
    """The runs planned for at least ``min_edits`` edits (finished, or stopped early by collapse)."""
    return {rid: v for rid, v in runs.items() if int(run_params(v[0]).get("n_edits", 0)) >= min_edits}


def _long_label(ds: xr.Dataset) -> str:
    """A long run's name in legends: every batch size above 1, and how far a run still going has got."""
    label = _label(ds, min_batch=2)
    if ds.attrs.get("stop_reason") == "in progress":
        label += f", in progress: {int(ds.sizes['edit']):,} edits"
    return label


def plot_long_norm_growth(runs: dict, ax=None):
    """Mean ‖W‖_F of each run's edited matrices vs number of edits (log axis), one colour per editor
    (dashed: batches of 100); the largest unedited matrix of the same type as a grey line; a dot
    where the run's largest edited matrix first passes it, a cross where the collapse rule first
    held."""
    ax = ax or plt.subplots(figsize=(7.2, 3.8))[1]
    colors = editor_colors(runs)
    ceiling = []
    for ds, _ in runs.values():
        en = edited_norms(ds)
        mtype = edited_type(ds)
        unedited = unedited_norms(ds, mtype)
        ceiling.append(float(unedited.isel(step=0).max()))
        steps = ds["step"].values
        keep = steps > 0
        y = en.mean("edited").values
        color = colors[str(ds.attrs.get("editor"))]
        ax.plot(steps[keep], y[keep], color=color, lw=1.8, ls=_style(ds), label=_long_label(ds))
        cross = crossing_edit(ds)
        if cross > 0:
            ax.plot([cross], [y[list(steps).index(cross)]], "o", color=color, ms=6, mec="k", mew=0.6)
        first = collapse_edit(ds)
        if first > 0:
            at = min(range(len(steps)), key=lambda i: abs(steps[i] - first))
            ax.plot([steps[at]], [y[at]], "X", color=color, ms=9, mec="k", mew=0.6)
    if ceiling:
        ax.axhline(max(ceiling), color="0.5", lw=1, ls=":", label="largest unedited matrix")
    ax.plot([], [], "o", color="0.6", mec="k", mew=0.6, label="passes it")
    ax.plot([], [], "X", color="0.6", mec="k", mew=0.6, ms=8, label="collapse rule first holds")
    ax.set_xscale("log")
    ax.set(xlabel="number of edits (log scale)", ylabel="mean ‖W‖ of the edited matrices")
    ax.legend(frameon=False, fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def plot_probe(runs: dict, ax=None, factor: float | None = None):
    """The collapse probe after every editor call: held-out perplexity over the unedited model's
    (log axes), one colour per editor; the collapse threshold as a dotted line."""
    ax = ax or plt.subplots(figsize=(7.2, 3.4))[1]
    colors = editor_colors(runs)
    for ds, _ in runs.values():
        if "probe_ppl" not in ds:
            continue
        ratio = ds["probe_ppl"].values / float(ds["probe_ppl"].attrs["unedited"])
        ax.plot(ds["edit"].values, ratio, color=colors[str(ds.attrs.get("editor"))], lw=1.2,
                ls=_style(ds), label=_label(ds, min_batch=2))
        if factor is None:
            factor = float(json.loads(ds.attrs.get("collapse_params", "{}")).get("factor", 10.0))
    if factor is not None:
        ax.axhline(factor, color="0.4", ls=":", lw=1, label=f"collapse threshold (×{factor:g})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="number of edits (log scale)", ylabel="probe perplexity / unedited")
    ax.legend(frameon=False, fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


CHECKPOINT_TICKS = (0, 50, 100, 250, 500, 1000, 2000, 3000, 5000, 10000)


def symlog_edits(ax, linthresh: float = 50) -> None:
    """An edit-count axis for checkpoint measurements of long runs: symlog (linear up to
    ``linthresh``, so that the unedited model at 0 is drawn), labelled at 0 and each power of ten,
    with unlabelled ticks at the other usual checkpoint counts."""
    right = ax.get_xlim()[1]
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.set_xlim(-linthresh / 5, right)
    shown = [t for t in CHECKPOINT_TICKS if t <= right * 1.02]
    major = [t for t in shown if t == 0 or np.log10(t).is_integer()]
    ax.set_xticks(major, [f"{t:,}" for t in major])
    ax.set_xticks([t for t in shown if t not in major], minor=True)
    ax.set_xlabel("number of edits (symlog)")


def plot_rolling_efficacy(runs: dict, ax=None, window: int = 100):
    """Efficacy right after each editor call, as a rolling mean over ``window`` edits (drawn from
    the ``window // 10``-th edit on), against the number of edits (log axis), one colour per editor
    (dashed: batches of 100)."""
    ax = ax or plt.subplots(figsize=(7.2, 3.4))[1]
    colors = editor_colors(runs)
    for ds, _ in runs.values():
        eff = ds["efficacy"].astype(float).rolling(edit=window, min_periods=max(1, window // 10)).mean()
        ax.plot(ds["edit"].values, eff.values, color=colors[str(ds.attrs.get("editor"))], lw=1.4, ls=_style(ds),
                label=_long_label(ds))
    ax.set_xscale("log")
    ax.set(xlabel="number of edits (log scale)", ylabel=f"efficacy right after the edit\n({window}-edit rolling mean)",
           ylim=(-0.02, 1.02))
    ax.legend(frameon=False, fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


# -- F6b / F7b: per layer, every editor at once -----------------------------------------------
def plot_layer_heatmap(runs: dict, value, label: str, ax=None, log: bool = True, center: float = 1.0,
                       cap: float | None = None):
    """One row per run, one column per layer: ``value(ds)`` (per layer, after the last edit) as a
    heat map, diverging around ``center`` (log colour scale when ``log``); each run's edited layers
    outlined. For ratios to the unedited model (activation norms) and similarities (overlap)."""
    from matplotlib.colors import LogNorm, TwoSlopeNorm
    from matplotlib.patches import Rectangle

    rows = [np.asarray(value(ds), dtype=float) for ds, _ in runs.values()]
    vals = np.vstack(rows)
    ax = ax or plt.subplots(figsize=(BOOK_WIDTH, 0.42 * len(rows) + 1.4))[1]
    if log:  # ``cap``: ratios beyond ×cap (or 1/cap) take the end colours, so small changes stay visible
        top = max(float(np.nanmax(np.abs(np.log(vals)))), 1e-3)
        top = min(top, float(np.log(cap))) if cap else top
        norm = LogNorm(vmin=np.exp(-top), vmax=np.exp(top))
    else:
        lo, hi = float(np.nanmin(vals)), float(np.nanmax(vals))
        norm = TwoSlopeNorm(center, min(lo, center - 1e-6), max(hi, center + 1e-6))
    im = ax.imshow(vals, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    for r, (ds, _) in enumerate(runs.values()):
        for c in np.flatnonzero(ds["edited"].any("matrix").values):
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="k", lw=1.0))
    ax.set_yticks(range(len(rows)), [_label(ds) for ds, _ in runs.values()])
    ax.set_xlabel("layer (outlined: edited)")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    bar = plt.colorbar(im, ax=ax, label=label, fraction=0.04, pad=0.02, extend="both" if cap else "neither")
    if log:
        from matplotlib.ticker import FixedLocator, NullFormatter

        ticks = [t for t in (0.5, 0.8, 0.9, 1.0, 1.1, 1.25, 2.0, 5.0) if norm.vmin <= t <= norm.vmax]
        bar.ax.yaxis.set_major_locator(FixedLocator(ticks))
        bar.ax.yaxis.set_minor_formatter(NullFormatter())
        bar.ax.set_yticklabels([f"{t:g}" for t in ticks])
    return ax


def activation_ratio_by_layer(ds: xr.Dataset, site: str = "resid") -> np.ndarray:
    """Per layer: mean activation norm at ``site`` after the last edit over the unedited model's."""
    norm = ds["act_norm"].sel(site=site)
    return (norm.isel(ckpt=-1) / norm.isel(ckpt=0)).values


# -- T1 ------------------------------------------------------------------------------------
def summary_frame(runs: dict):
    """T1 as a table (pandas DataFrame, one row per editor): after the last edit, ES, PS, NS and S
    over all edited facts, generation entropy, mean downstream accuracy, recall of unedited facts
    and perplexity, each beside the unedited model's value, and the growth of the edited matrices,
    all at the last checkpoint (the last edit of a finished run; a run in progress has made more
    edits since)."""
    import pandas as pd

    rows = []
    for ds, _ in runs.values():
        last, first = ds.isel(ckpt=-1), ds.isel(ckpt=0)
        rows.append({
            "editor": _label(ds), "edits": int(last["ckpt"]),
            "ES": float(last["es"]), "PS": float(last["ps"]), "NS": float(last["ns"]),
            "S": harmonic_mean(float(last["es"]), float(last["ps"]), float(last["ns"])),
            "GE": float(last["gen_entropy_mean"]), "GE unedited": float(first["gen_entropy_mean"]),
            "tasks": float(last["task_mean_acc"]), "tasks unedited": float(first["task_mean_acc"]),
            "recall": float(last["recall"]), "recall unedited": float(first["recall"]),
            "ppl": float(last["perplexity"]), "ppl unedited": float(first["perplexity"]),
            "growth": growth_at(ds, int(last["ckpt"])),  # at the same count as the scores
        })
    return pd.DataFrame(rows).set_index("editor")
