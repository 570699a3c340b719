"""Plain-text summaries of run files (what notebooks print and the book quotes)."""
from __future__ import annotations

import numpy as np
import xarray as xr


def edited_norms(ds: xr.Dataset) -> xr.DataArray:
    """‖W‖_F over steps of each edited matrix, dims ("step", "edited"), labelled "layer:matrix"."""
    pairs = [(int(l), int(m)) for l, m in zip(*np.nonzero(ds["edited"].values))]
    layers = ds["layer"].values
    mats = ds["matrix"].values
    cols = [ds["weight_norm"].sel(layer=layers[l], matrix=mats[m]).values for l, m in pairs]
    return xr.DataArray(
        np.stack(cols, axis=1), dims=("step", "edited"),
        coords={"step": ds["step"].values, "edited": [f"{layers[l]}:{mats[m]}" for l, m in pairs]},
    )


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
    for name in en["edited"].values:
        series = en.sel(edited=name).values
        layer, mtype = name.split(":")
        others = ds["weight_norm"].sel(matrix=mtype).where(ds["edited"].sel(matrix=mtype) == 0)
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
            f"{int(e['efficacy']):>3} {e['delta_norm'].item():>7.{decimals}f}"
        )
    return "\n".join(rows)


def provenance_lines(ds: xr.Dataset, path) -> str:
    """Which file and which parameters made a figure: printed under every figure of the book."""
    import json
    from pathlib import Path

    from .paths import ROOT

    path = Path(path)
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    params = json.loads(ds.attrs.get("params", "{}"))
    return "\n".join([
        f"file: {shown}",
        f"parameters: {json.dumps(params, sort_keys=True)}",
        f"git: {ds.attrs.get('git_sha', '?')}  device: {ds.attrs.get('device', '?')}  "
        f"created: {ds.attrs.get('created_utc', '?')}  wall time: {ds.attrs.get('wall_time_s', '?')} s",
    ])


EDITOR_NAMES = {
    "rome": "ROME", "r-rome": "r-ROME", "memit": "MEMIT", "emmet": "EMMET", "alphaedit": "AlphaEdit",
    "encore": "ENCORE", "ft-l": "FT-L", "ft-m": "FT-M", "lora": "LoRA", "mend": "MEND",
}


def display_name(editor: str) -> str:
    return EDITOR_NAMES.get(editor, editor)


def profile_runs(notebook: str, profile: str = "default") -> tuple[dict, list[str]]:
    """The finished runs of ``profile`` made by ``notebook`` as {run id: (Dataset, path)}, and the
    ids of those not run yet (the book lists them rather than silently leaving them out)."""
    from .store import read_netcdf
    from .study import load_profile

    done, missing = {}, []
    for run in load_profile(profile):
        if run.notebook != notebook:
            continue
        if run.output.exists():
            done[run.id] = (read_netcdf(run.output), run.output)
        else:
            missing.append(run.id)
    return done, missing


def norm_growth_table(runs: dict) -> str:
    """Per run: edits, batch, edited matrices, mean ‖W‖ of the edited matrices before → after and
    the ratio, the largest per-layer ratio, the share of measurement steps after which an edited
    matrix's norm was higher than before, the largest unedited matrix of that type, efficacy right
    after and at the end."""
    import json

    head = (f"{'editor':<10} {'edits':>5} {'batch':>5} {'edited':<22} {'norm before':>11} {'after':>8} "
            f"{'ratio':>6} {'max ratio':>9} {'rises':>5} {'max unedited':>12} {'ES now':>6} {'ES end':>6}")
    rows = [head]
    for ds, _ in runs.values():
        en = edited_norms(ds)
        mtype = str(en["edited"].values[0]).split(":")[1]
        unedited = ds["weight_norm"].sel(matrix=mtype).where(ds["edited"].sel(matrix=mtype) == 0)
        layers = ",".join(str(x).split(":")[0] for x in en["edited"].values)
        params = json.loads(ds.attrs.get("params", "{}"))
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
