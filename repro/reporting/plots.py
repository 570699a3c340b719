"""Figures of the study, drawn from run Datasets only (never from a live model)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
import xarray as xr

from repro.reporting.tables import (INTERVENTION_LABELS, display_name, edited_labels, edited_norms, edited_type,
                                    relative_norms, short_matrix, training_setting, unedited_norms)


def plot_edited_norm_growth(ds: xr.Dataset, ax=None, title: str | None = None):
    """F2: ‖W‖_F of each edited matrix vs number of edits, the same matrix type of every unedited
    layer in grey for contrast."""
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    en = edited_norms(ds)
    steps = ds["step"].values
    for mtype in sorted({name.split(":")[1] for name in en["edited"].values}):
        unedited = unedited_norms(ds, mtype, drop=True)
        for layer in unedited["layer"].values:
            ax.plot(steps, unedited.sel(layer=layer).values, color="0.75", lw=0.8, zorder=1)
    palette = sns.color_palette("rocket", n_colors=max(1, en.sizes["edited"]))
    for color, name in zip(palette, en["edited"].values):
        ax.plot(steps, en.sel(edited=name).values, color=color, lw=2, label=f"edited layer {name.split(':')[0]}", zorder=2)
    ax.plot([], [], color="0.75", lw=0.8, label="unedited layers")
    ax.set_xlabel("number of edits")
    ax.set_ylabel("Frobenius norm ‖W‖")
    ax.set_title(title or f"{ds.attrs.get('editor', '')} on {ds.attrs.get('model', '')}")
    ax.legend(frameon=False, fontsize=8)
    return ax


def plot_norm_by_layer(ds: xr.Dataset, ax=None, title: str | None = None):
    """F3: ‖W‖_F of the edited matrix type per layer, before editing, after N/2 and N edits."""
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    mtype = edited_type(ds)
    norms = ds["weight_norm"].sel(matrix=mtype)
    steps = ds["step"].values
    picks = [steps[0], steps[np.argmin(np.abs(steps - steps[-1] / 2))], steps[-1]]
    for step, color in zip(picks, sns.color_palette("mako", 3)):
        ax.plot(norms["layer"], norms.sel(step=step), marker="o", ms=3, color=color, label=f"after {step} edits")
    for name in edited_labels(ds):
        ax.axvline(int(name.split(":")[0]), color="crimson", ls=":", lw=1)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"‖W‖ of {mtype}")
    ax.set_title(title or f"{ds.attrs.get('editor', '')}: {mtype} norm per layer (dotted: edited)")
    ax.legend(frameon=False, fontsize=8)
    return ax


def plot_layer_sweep(ds: xr.Dataset, ax=None):
    """Mean ES, PS, NS and their harmonic mean S of single edits, per edited layer."""
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    for name, label in (("es", "efficacy"), ("ps", "paraphrase"), ("ns", "neighborhood")):
        ax.plot(ds["layer"], ds[name].mean("fact"), marker="o", ms=3, label=label)
    ax.plot(ds["layer"], ds["score"], marker="s", color="k", label="S (harmonic mean)")
    ax.set_xlabel("edited layer")
    ax.set_ylabel("score of single edits")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{ds.attrs.get('editor', '')} layer sweep on {ds.attrs.get('model', '')}")
    ax.legend(frameon=False, fontsize=8)
    return ax


# --------------------------------------------------------------------------------------------
# F1: post-training interventions (repro.runs.post_training runs)
# --------------------------------------------------------------------------------------------
MATRIX_COLORS = dict(zip(("attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down"),
                         sns.color_palette("tab10", 7)))


def plot_relative_norms(ds: xr.Dataset, ax=None, title: str | None = None):
    """F1 (a-c): ‖W_t‖_F / ‖W_0‖_F vs optimizer step, one line per matrix type, averaged over the
    layers (for LoRA: of the effective W0 + (α/r)BA; untrained types dashed grey)."""
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    rel = relative_norms(ds)
    steps = ds["step"].values
    for m in ds["matrix"].values:
        trained = bool(ds["trained"].sel(matrix=m).any())
        style = dict(color=MATRIX_COLORS.get(str(m)), lw=1.6) if trained else dict(color="0.6", lw=0.8, ls="--")
        ax.plot(steps, rel.sel(matrix=m).mean("layer").values, label=short_matrix(m), **style)
    ax.axhline(1.0, color="k", lw=0.6, zorder=0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("‖W_t‖ / ‖W_0‖ (mean over layers)")
    ax.set_title(title or INTERVENTION_LABELS.get(ds.attrs.get("intervention"), ""))
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.legend(frameon=False, fontsize=7, ncol=2)
    return ax


def plot_relative_heatmap(ds: xr.Dataset, ax=None, title: str | None = None, vmax: float | None = None):
    """F1 heatmap: ‖W_t‖/‖W_0‖ − 1 (per cent) of every (layer, matrix type) at the last step,
    diverging around no change (red: grew, blue: shrank); untrained matrices blank."""
    from matplotlib.colors import TwoSlopeNorm

    ax = ax or plt.subplots(figsize=(3.2, 5))[1]
    pct = 100 * (relative_norms(ds).isel(step=-1) - 1).where(ds["trained"] == 1)
    vals = pct.transpose("layer", "matrix").values
    lim = vmax or float(np.nanmax(np.abs(vals))) or 1e-9
    im = ax.imshow(vals, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -lim, lim), interpolation="nearest")
    ax.set_xticks(range(ds.sizes["matrix"]), [short_matrix(m) for m in ds["matrix"].values], fontsize=7, rotation=90)
    ax.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_ylabel("layer")
    ax.set_title(title or f"step {int(ds['step'][-1])}", fontsize=9)
    plt.colorbar(im, ax=ax, label="‖W_t‖/‖W_0‖ − 1 (%)", fraction=0.08, pad=0.03)
    return ax


def plot_setting_comparison(runs: dict, ax=None, title: str = ""):
    """‖W_t‖/‖W_0‖ averaged over every trained matrix vs step, one line per run (``{label: ds}``):
    e.g. the same intervention at two weight decays or learning rates."""
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    for label, ds in runs.items():
        rel = relative_norms(ds).where(ds["trained"] == 1)
        ax.plot(ds["step"].values, rel.mean(("layer", "matrix")).values, lw=1.6, label=label)
    ax.axhline(1.0, color="k", lw=0.6, zorder=0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("‖W_t‖ / ‖W_0‖ (mean, trained matrices)")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=7)
    return ax


def plot_training_curves(ds: xr.Dataset, axes=None):
    """Training loss per step (and its running mean) and held-out perplexity / task answer NLL."""
    if axes is None:
        axes = plt.subplots(1, 2, figsize=(9, 3))[1]
    loss = ds["train_loss"]
    axes[0].plot(loss["opt_step"], loss, color="0.7", lw=0.8, label="per step")
    k = max(1, min(20, loss.sizes["opt_step"] // 10))
    axes[0].plot(loss["opt_step"], loss.rolling(opt_step=k, min_periods=1).mean(), color="k", lw=1.5,
                 label=f"running mean ({k})")
    axes[0].set_xlabel("optimizer step")
    axes[0].set_ylabel("training loss (token NLL)")
    axes[0].legend(frameon=False, fontsize=7)
    axes[0].set_title(training_setting(ds), fontsize=8)
    ax = axes[1]
    ax.plot(ds["eval_step"], ds["eval_ppl"], marker="o", ms=3, color="C0")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out Wikipedia perplexity", color="C0")
    twin = ax.twinx()
    twin.plot(ds["eval_step"], ds["task_loss"], marker="s", ms=3, color="C3")
    twin.set_ylabel("held-out task answer NLL", color="C3")
    return axes


# --------------------------------------------------------------------------------------------
# The book's style, and F2/F3 across editors
# --------------------------------------------------------------------------------------------
BOOK_WIDTH = 7.2  # inches: figures drawn at the book's text width keep their text at its size


def use_book_style() -> None:
    """Text of at least 9 pt at the book's width (figures no wider than ``BOOK_WIDTH``)."""
    plt.rcParams.update({"font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10, "legend.fontsize": 9,
                         "xtick.labelsize": 9, "ytick.labelsize": 9, "figure.dpi": 100})


def _mean_edited(ds: xr.Dataset) -> xr.DataArray:
    return edited_norms(ds).mean("edited")


def _unedited_range(runs: dict) -> tuple[float, float]:
    """Smallest and largest unedited matrix (of each run's edited type) before the first edit."""
    lo, hi = np.inf, -np.inf
    for ds, _ in runs.values():
        mtype = edited_type(ds)
        unedited = unedited_norms(ds, mtype).isel(step=0)
        lo, hi = min(lo, float(unedited.min())), max(hi, float(unedited.max()))
    return lo, hi


def plot_norm_growth_overview(runs: dict, axes=None, zoom: tuple[float, float] | None = None):
    """F2: the mean ‖W‖_F of each run's edited matrices vs number of edits, one line per editor in
    its colour; the range of the unedited matrices of the same type as a grey band. With ``zoom``
    (y limits) a second panel repeats the figure at that range; one legend, outside the data."""
    from repro.reporting.figures import editor_colors  # the one colour per editor

    n = 2 if zoom else 1
    if axes is None:
        _, axes = plt.subplots(n, 1, figsize=(BOOK_WIDTH, 3.2 * n), sharex=True, squeeze=False)
        axes = axes[:, 0]
    colors = editor_colors(runs)
    lo, hi = _unedited_range(runs)
    for i, ax in enumerate(axes):
        ax.axhspan(lo, hi, color="0.85", zorder=0, label="unedited matrices (range)")
        for ds, _ in runs.values():
            name = display_name(str(ds.attrs.get("editor")))
            ax.plot(ds["step"].values, _mean_edited(ds).values, color=colors[str(ds.attrs.get("editor"))], lw=1.8,
                    label=name)
        ax.set_ylabel("mean ‖W‖ of edited matrices")
        if i == 1:
            ax.set_ylim(*zoom)
            ax.set_title(f"the same, ‖W‖ from {zoom[0]:g} to {zoom[1]:g}", loc="left")
    axes[-1].set_xlabel("number of edits")
    axes[0].legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return axes


def plot_layer_ratios(runs: dict, ax=None):
    """F3: ‖W_N‖/‖W_0‖ of the edited matrix type at every layer after the whole sequence, one row per
    run (a heat map on a log colour scale, white = unchanged); the layers each editor edited are
    outlined and carry their ratio."""
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    labels, rows, edited = [], [], []
    for ds, _ in runs.values():
        mtype = edited_type(ds)
        norms = ds["weight_norm"].sel(matrix=mtype)
        rows.append((norms.isel(step=-1) / norms.isel(step=0)).values)
        labels.append(display_name(str(ds.attrs.get("editor"))))
        edited.append([list(norms["layer"].values).index(int(n.split(":")[0])) for n in edited_labels(ds)])
    vals = np.array(rows)
    ax = ax or plt.subplots(figsize=(BOOK_WIDTH, 0.42 * len(rows) + 1.4))[1]
    top = max(float(np.nanmax(vals)), 1.01)
    im = ax.imshow(vals, aspect="auto", cmap="RdBu_r", interpolation="nearest",
                   norm=LogNorm(vmin=1 / top, vmax=top))
    from matplotlib.ticker import FixedLocator, NullFormatter

    for r, cols in enumerate(edited):
        for c in cols:
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="k", lw=1.2))
        best = max(cols, key=lambda c: vals[r, c])
        ax.text(1.01, r, f"×{vals[r, best]:.2f} (layer {best})", transform=ax.get_yaxis_transform(),
                va="center", ha="left", fontsize=9)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("layer (outlined: edited; right: the largest ratio)")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    bar = plt.colorbar(im, ax=ax, label="‖W_N‖ / ‖W_0‖", fraction=0.04, pad=0.22)
    ticks = [t for t in (0.5, 0.8, 1.0, 1.25, 2.0, 3.0) if 1 / top <= t <= top]
    bar.ax.yaxis.set_major_locator(FixedLocator(ticks))
    bar.ax.yaxis.set_minor_formatter(NullFormatter())
    bar.ax.set_yticklabels([f"{t:g}" for t in ticks])
    return ax
