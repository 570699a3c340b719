"""Figures of the study, drawn from run Datasets only (never from a live model)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
import xarray as xr

from .report import edited_norms


def plot_edited_norm_growth(ds: xr.Dataset, ax=None, title: str | None = None):
    """F2: ‖W‖_F of each edited matrix vs number of edits, the same matrix type of every unedited
    layer in grey for contrast."""
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    en = edited_norms(ds)
    steps = ds["step"].values
    for mtype in sorted({name.split(":")[1] for name in en["edited"].values}):
        unedited = ds["weight_norm"].sel(matrix=mtype).where(ds["edited"].sel(matrix=mtype) == 0, drop=True)
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
    en = edited_norms(ds)
    mtype = en["edited"].values[0].split(":")[1]
    norms = ds["weight_norm"].sel(matrix=mtype)
    steps = ds["step"].values
    picks = [steps[0], steps[np.argmin(np.abs(steps - steps[-1] / 2))], steps[-1]]
    for step, color in zip(picks, sns.color_palette("mako", 3)):
        ax.plot(norms["layer"], norms.sel(step=step), marker="o", ms=3, color=color, label=f"after {step} edits")
    for name in en["edited"].values:
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
