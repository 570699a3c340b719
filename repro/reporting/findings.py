"""The "What the runs show" text of the book's figure pages, generated from the run files.

Every function here is pure: it takes loaded run Datasets (``runs``: ``{run_id: (Dataset, path)}``
as returned by :func:`repro.reporting.figures.measured_runs`, or single Datasets) and returns Markdown (or a
pandas DataFrame). No number is typed: each one is computed from the files, and each qualitative
word follows from a rule stated in the text itself. The rules reuse the thresholds of
:mod:`repro.reporting.claims`, so a page and the claims page never judge the same runs differently, and
*growth* is :func:`repro.reporting.claims.growth` (the book's one definition: mean ‖W_N‖ over mean ‖W_0‖ of
the edited matrices).
"""
from __future__ import annotations

import json

import numpy as np
import xarray as xr

from repro.core.store import run_params
from repro.reporting.claims import ACC_DROP, ES_DROP, NORM_FALL, OVERLAP, PPL_RISE, growth
from repro.reporting.tables import edited_labels


# -- small helpers -----------------------------------------------------------------------------
def _name(ds: xr.Dataset) -> str:
    from repro.reporting.tables import display_name

    return display_name(str(ds.attrs.get("editor")))


def join(items) -> str:
    """"a", "a and b", "a, b and c"; "none" for no items."""
    items = [str(i) for i in items]
    if not items:
        return "none"
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def edited_label(ds: xr.Dataset) -> str:
    """The matrices a run edits, e.g. "layer 1 mlp_down" or "layers 3–7 mlp_down"."""
    cols = edited_labels(ds)
    layers = sorted({int(c.split(":")[0]) for c in cols})
    types = sorted({c.split(":")[1] for c in cols})
    if len(layers) == 1:
        where = f"layer {layers[0]}"
    elif layers == list(range(layers[0], layers[-1] + 1)):
        where = f"layers {layers[0]}–{layers[-1]}"
    else:
        where = "layers " + ", ".join(map(str, layers))
    return f"{where} {'/'.join(types)}"


def _ckpt(ds: xr.Dataset, i: int) -> int:
    return int(ds["ckpt"].values[i])


def _spearman(x, y) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic) if len(x) >= 2 else float("nan")


def measurement_note(runs: dict) -> str:
    """Which runs are measured and when, e.g. "The 10 runs of 100 edits are measured before the
    first edit and after 20, 40, 60, 80 and 100 edits (checkpoint measurements of the run files)."""
    if not runs:
        return "No run has checkpoint measurements yet."
    lengths = sorted({_ckpt(ds, -1) for ds, _ in runs.values()})
    schedules = {tuple(int(c) for c in ds["ckpt"].values) for ds, _ in runs.values()}
    what = f"The {len(runs)} runs of {join(f'{n:,}' for n in lengths)} edits are measured"
    if len(schedules) == 1:
        (sched,) = schedules
        after = [c for c in sched if c > 0]
        return what + f" before the first edit and after {join(f'{c:,}' for c in after)} edits."
    return what + " at their checkpoints (before the first edit and every few edits)."


# -- F4: downstream abilities -------------------------------------------------------------------
def damage(r: dict) -> list[str]:
    """What damages the model by claim 3's rule, from a row with ``ppl0``/``ppl``, ``acc0``/``acc``
    and ``recall0``/``recall`` (unedited / after the edits): perplexity ×PPL_RISE or more, a fall of
    ACC_DROP or more in mean task accuracy or in recall. Empty when nothing does."""
    tests = (("perplexity", r["ppl"] / r["ppl0"] >= PPL_RISE), ("task accuracy", r["acc0"] - r["acc"] >= ACC_DROP),
             ("recall", r["recall0"] - r["recall"] >= ACC_DROP))
    return [w for w, hit in tests if hit]


def downstream_rows(runs: dict) -> list[dict]:
    """Per run, after the last edit and before the first: perplexity, per-task and mean accuracy,
    recall of never-edited facts, growth, and whether the run damages the model by claim 3's rule."""
    rows = []
    for ds, _ in runs.values():
        first, last = ds.isel(ckpt=0), ds.isel(ckpt=-1)
        tasks = [str(t) for t in ds["task"].values] if "task" in ds.dims else []
        r = {
            "editor": _name(ds), "matrices": edited_label(ds), "growth": growth(ds),
            "ppl0": float(first["perplexity"]), "ppl": float(last["perplexity"]),
            "ppl series": [float(v) for v in ds["perplexity"].values],
            "acc0": float(first["task_mean_acc"]), "acc": float(last["task_mean_acc"]),
            "tasks": {t: (float(first["task_acc"].sel(task=t)), float(last["task_acc"].sel(task=t))) for t in tasks},
            "recall0": float(first["recall"]), "recall": float(last["recall"]),
        }
        r["ppl ×"] = r["ppl"] / r["ppl0"]
        r["why"] = damage(r)
        rows.append(r)
    return rows


def downstream_findings(runs: dict) -> str:
    """F4's "What the runs show": which runs damage the model (claim 3's rule), each run's values
    against the unedited model's, the runs whose perplexity rises at every checkpoint, and, within
    each group of runs that edit the same matrices, whether growth orders the perplexity rise."""
    rows = downstream_rows(runs)
    if not rows:
        return "No run has checkpoint measurements yet."
    rows.sort(key=lambda r: -r["ppl ×"])
    damaging = [r for r in rows if r["why"]]
    intact = [r for r in rows if not r["why"]]
    out = [measurement_note(runs) + " Numbers are after the last edit, the unedited model's (checkpoint 0) in "
           "brackets; growth is the mean norm of the edited matrices after the last edit over before the first. "
           f"A run counts as **damaging** when, by the rule of claim 3, its perplexity ends ×{PPL_RISE:g} or more "
           f"above the unedited model's, or its mean task accuracy or its recall of never-edited facts falls by "
           f"{ACC_DROP:g} or more. Runs are listed by perplexity rise, largest first.", ""]

    def detail(r, tasks: bool) -> str:
        s = (f"{r['editor']}: perplexity {r['ppl']:.1f} ({r['ppl0']:.1f}, ×{r['ppl ×']:.2f}), recall "
             f"{r['recall']:.2f} ({r['recall0']:.2f}), mean task accuracy {r['acc']:.3f} ({r['acc0']:.3f})")
        if tasks and r["tasks"]:
            s += " [" + ", ".join(f"{t} {b:.2f} ({a:.2f})" for t, (a, b) in r["tasks"].items()) + "]"
        return s + f", growth ×{r['growth']:.3f}"

    out.append(f"- **Damaging** ({len(damaging)} of {len(rows)} runs): "
               + ("; ".join(detail(r, True) + f" — by {join(r['why'])}" for r in damaging) if damaging else "none")
               + ".")
    out.append(f"- **Within the rule's bounds** ({len(intact)} of {len(rows)}): "
               + ("; ".join(detail(r, False) for r in intact) if intact else "none") + ".")
    rising = [r for r in rows if len(r["ppl series"]) > 2 and np.all(np.diff(r["ppl series"]) > 0)]
    out.append("- **Perplexity rises at every checkpoint** for "
               + (join(f"{r['editor']} ({', '.join(f'{v:.1f}' for v in r['ppl series'])})" for r in rising)
                  if rising else "no run") + ".")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["matrices"], []).append(r)
    shared = {k: sorted(v, key=lambda r: -r["growth"]) for k, v in groups.items() if len(v) >= 2}
    if shared:
        parts = []
        for where, g in shared.items():
            rho = _spearman([r["growth"] for r in g], [r["ppl"] - r["ppl0"] for r in g])
            order = "the same order" if np.isclose(rho, 1.0) else f"ρ = {rho:.2f}"
            parts.append(f"on {where}, " + ", ".join(f"{r['editor']} ×{r['growth']:.3f} → {r['ppl'] - r['ppl0']:+.2f}"
                                                      for r in g) + f" ({order})")
        rho_all = _spearman([r["growth"] for r in rows], [r["ppl"] - r["ppl0"] for r in rows])
        out.append("- **Growth against perplexity rise, among runs that edit the same matrices** (growth → "
                   "perplexity change; rank correlation ρ, 1 when growth orders the rise exactly): "
                   + "; ".join(parts) + f". Across all {len(rows)} runs ρ = {rho_all:.2f}.")
    return "\n".join(out)


# -- F5: edit quality ---------------------------------------------------------------------------
def edit_quality_findings(runs: dict) -> str:
    """F5's text: which runs forget earlier edits (claim 3's editing rule: efficacy over the facts
    edited so far falls by ES_DROP or more from the first checkpoint after editing to the last),
    paraphrase and neighborhood success, and generation entropy at the end against the unedited
    model's (with the lowest checkpoint value where it is lower than the end)."""
    if not runs:
        return "No run has checkpoint measurements yet."
    rows = []
    for ds, _ in runs.values():
        if ds.sizes["ckpt"] < 3:
            continue
        a, z = ds.isel(ckpt=1), ds.isel(ckpt=-1)
        ge = ds["gen_entropy_mean"].values
        low = int(np.nanargmin(ge))
        rows.append({"editor": _name(ds), "k1": _ckpt(ds, 1), "n": _ckpt(ds, -1),
                     "es1": float(a["es"]), "es": float(z["es"]), "ps": float(z["ps"]),
                     "ns1": float(a["ns"]), "ns": float(z["ns"]), "ge0": float(ge[0]), "ge": float(ge[-1]),
                     "ge low": float(ge[low]), "ge low at": _ckpt(ds, low)})
    if not rows:
        return "No run has checkpoints after its first edits yet."
    k1 = join(sorted({r["k1"] for r in rows}))
    n = join(sorted({r["n"] for r in rows}))
    forget = sorted([r for r in rows if r["es1"] - r["es"] >= ES_DROP], key=lambda r: r["es"])
    keep = sorted([r for r in rows if r["es1"] - r["es"] < ES_DROP], key=lambda r: -r["es"])
    out = [measurement_note(runs) + f" By the editing rule of claim 3, a run **forgets earlier edits** when "
           f"efficacy over all facts edited so far falls by {ES_DROP:g} or more from the first checkpoint after "
           f"editing began ({k1} edits) to the last ({n}).", ""]
    out.append(f"- **Earlier edits forgotten** ({len(forget)} of {len(rows)} runs): "
               + ("; ".join(f"{r['editor']} ES {r['es1']:.2f} → {r['es']:.2f}, paraphrase PS {r['ps']:.2f}, "
                            f"neighborhood NS {r['ns1']:.2f} → {r['ns']:.2f}" for r in forget) if forget else "none")
               + ".")
    if keep:
        out.append(f"- **Efficacy holds within {ES_DROP:g}** ({len(keep)} of {len(rows)}): "
                   + "; ".join(f"{r['editor']} ES {r['es1']:.2f} → {r['es']:.2f}, PS {r['ps']:.2f}, "
                               f"NS {r['ns1']:.2f} → {r['ns']:.2f}" for r in keep) + ".")
        fell = [r for r in keep if r["ns1"] - r["ns"] >= ES_DROP]
        out.append(f"- **Neighborhood success** (prompts about other subjects keep their true object) falls by "
                   f"{ES_DROP:g} or more among the runs whose efficacy holds in {len(fell)} of {len(keep)}"
                   + (f" ({join(r['editor'] for r in fell)})" if fell else "") + ".")
    ge0 = sorted({round(r["ge0"], 2) for r in rows})
    by_ge = sorted(rows, key=lambda r: r["ge"])
    out.append(f"- **Generation entropy** (unedited model: {join(f'{g:.2f}' for g in ge0)} bits), after the last edit, "
               "lowest first, with the lowest checkpoint value where it was lower than the end: "
               + ", ".join(f"{r['editor']} {r['ge']:.2f}"
                           + (f" ({r['ge low']:.2f} after {r['ge low at']} edits)" if r["ge low"] < r["ge"] - 0.005 else "")
                           for r in by_ge) + ".")
    return "\n".join(out)


def generation_note(ds: xr.Dataset) -> str:
    """How generation entropy is measured, from the run's ``measure_params``: "a mean over 8
    continuations of 100 tokens" (empty when the file does not record it)."""
    p = json.loads(ds.attrs.get("measure_params", "{}"))
    if "n_gen" not in p or "gen_tokens" not in p:
        return ""
    return f"each checkpoint's generation entropy is a mean over {p['n_gen']} continuations of {p['gen_tokens']} tokens"


# -- F6: activation norms -----------------------------------------------------------------------
def activation_rows(runs: dict) -> list[dict]:
    from repro.reporting.figures import activation_ratio_by_layer, relative_activation_norms

    rows = []
    for ds, _ in runs.values():
        rel = relative_activation_norms(ds, ("resid", "attn", "mlp")).isel(ckpt=-1)
        per = activation_ratio_by_layer(ds, "resid")
        mlp = activation_ratio_by_layer(ds, "mlp")
        layers = ds["layer"].values
        lo, hi, mhi = int(np.nanargmin(per)), int(np.nanargmax(per)), int(np.nanargmax(mlp))
        rows.append({"editor": _name(ds), "resid": float(rel.sel(site="resid")), "attn": float(rel.sel(site="attn")),
                     "mlp": float(rel.sel(site="mlp")), "lower": int(np.sum(per < 1)), "layers": int(np.sum(np.isfinite(per))),
                     "min": float(per[lo]), "min at": int(layers[lo]), "max": float(per[hi]), "max at": int(layers[hi]),
                     "mlp max": float(mlp[mhi]), "mlp max at": int(layers[mhi]), "matrices": edited_label(ds)})
    return rows


def activation_norm_findings(runs: dict) -> str:
    """F6's text: the residual stream's mean norm after the last edit relative to the unedited
    model, per run, sorted into falls (claim 4's rule: at or below NORM_FALL), rises (at or above
    1/NORM_FALL) and unchanged within that band; and the attention and MLP outputs' means."""
    rows = sorted(activation_rows(runs), key=lambda r: r["resid"])
    if not rows:
        return "No run has checkpoint measurements yet."
    up = 1 / NORM_FALL
    fall = [r for r in rows if r["resid"] <= NORM_FALL]
    rise = [r for r in rows if r["resid"] >= up]
    same = [r for r in rows if NORM_FALL < r["resid"] < up]
    band = f"{100 * (1 - NORM_FALL):g} %"
    out = [measurement_note(runs) + " The residual stream's mean norm after the last edit, relative to the unedited "
           f"model's on the same probe texts and averaged over layers; by the rule of claim 4 the norms **fall** when "
           f"that ratio is at or below {NORM_FALL:g}, and here they **rise** when it is at or above {up:.4f} (the same "
           f"{band} the other way).", ""]
    out.append(f"- **Fall** ({len(fall)} of {len(rows)} runs): "
               + ("; ".join(f"{r['editor']} {r['resid']:.3f} (lower at {r['lower']} of {r['layers']} layers, lowest "
                            f"{r['min']:.3f} at layer {r['min at']})" for r in fall) if fall else "none") + ".")
    out.append(f"- **Within {band} of the unedited model** ({len(same)} of {len(rows)}): "
               + ("; ".join(f"{r['editor']} {r['resid']:.3f} (lower at {r['lower']} of {r['layers']} layers)" for r in same)
                  if same else "none") + ".")
    out.append(f"- **Rise** ({len(rise)} of {len(rows)}): "
               + ("; ".join(f"{r['editor']} {r['resid']:.3f} (highest ×{r['max']:.2f} at layer {r['max at']}; MLP output "
                            f"up to ×{r['mlp max']:.2f}, at layer {r['mlp max at']}; edits {r['matrices']})" for r in rise)
                  if rise else "none") + ".")
    for site, what in (("attn", "attention output"), ("mlp", "MLP output")):
        above = [r for r in rows if r[site] > 1]
        out.append(f"- The **{what}**, mean over layers, ends above the unedited model's in {len(above)} of {len(rows)} "
                   f"runs (×{min(r[site] for r in rows):.3f} to ×{max(r[site] for r in rows):.3f}).")
    return "\n".join(out)


# -- F7: subspaces ------------------------------------------------------------------------------
def subspace_frame(runs: dict, site: str = "resid"):
    """Per run after the last edit: the edited matrices, mean over layers of the top-k subspace
    overlap, linear CKA and mean cosine against the unedited model, and the lowest layer's CKA and
    its layer; sorted by mean CKA, highest first. A pandas DataFrame indexed by editor."""
    import pandas as pd

    rows = []
    for ds, _ in runs.values():
        last = ds.isel(ckpt=-1)
        cka = last["cka"].sel(site=site)
        low = int(np.nanargmin(cka.values))
        rows.append({"editor": _name(ds), "edits": edited_label(ds),
                     "overlap": float(last["subspace_overlap"].sel(site=site).mean("layer")),
                     "CKA": float(cka.mean("layer")), "cosine": float(last["act_cosine"].sel(site=site).mean("layer")),
                     "lowest CKA": float(cka.values[low]), "at layer": int(ds["layer"].values[low])})
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).set_index("editor").sort_values("CKA", ascending=False)


def subspace_findings(runs: dict, site: str = "resid") -> str:
    """F7's text: claim 4's subspace rule (mean top-k overlap below OVERLAP) per run; which runs'
    mean CKA falls at every checkpoint and the series of those whose does not; the runs that moved
    least and most; the spread of CKA among runs that edit the same matrices."""
    table = subspace_frame(runs, site)
    if not len(table):
        return "No run has checkpoint measurements yet."
    series = {_name(ds): ds["cka"].sel(site=site).mean("layer").values for ds, _ in runs.values()}
    overlaps = {_name(ds): ds["subspace_overlap"].sel(site=site).mean("layer").values for ds, _ in runs.values()}
    ckpts = {_name(ds): [int(c) for c in ds["ckpt"].values] for ds, _ in runs.values()}
    moved = table[table["overlap"] < OVERLAP].index.tolist()
    stayed = table[table["overlap"] >= OVERLAP].index.tolist()
    out = [measurement_note(runs) + f" By the rule of claim 4 the activations **move into other subspaces** when "
           f"the mean top-10 principal-subspace overlap of the residual stream ends below {OVERLAP:g}.", ""]
    out.append(f"- **Moved by that rule** ({len(moved)} of {len(table)} runs): "
               + (join(f"{e} ({table.loc[e, 'overlap']:.3f})" for e in moved)) + "; overlap at or above "
               f"{OVERLAP:g}: " + join(f"{e} ({table.loc[e, 'overlap']:.3f})" for e in stayed) + ".")
    steady = [e for e in table.index if np.all(np.diff(series[e]) < 0)]
    erratic = [e for e in table.index if e not in steady]
    out.append("- **Mean CKA falls at every checkpoint** for " + join(steady) + "; not for "
               + join(f"{e} (CKA {', '.join(f'{v:.2f}' for v in series[e][1:])} after "
                      f"{', '.join(map(str, ckpts[e][1:]))} edits; overlap {overlaps[e][1]:.2f} → {overlaps[e][-1]:.2f})"
                      for e in erratic) + ".")
    most, least = table["CKA"].idxmin(), table["CKA"].idxmax()
    low = table["lowest CKA"].idxmin()
    out.append(f"- **Least moved** (highest mean CKA): {least} ({table.loc[least, 'CKA']:.3f}); **most moved**: "
               f"{most} ({table.loc[most, 'CKA']:.3f}); the lowest single layer: {low}'s layer "
               f"{int(table.loc[low, 'at layer'])} (CKA {table.loc[low, 'lowest CKA']:.3f}).")
    groups = table.groupby("edits")["CKA"]
    shared = [(k, g) for k, g in groups if len(g) >= 2]
    if shared:
        out.append("- **Runs that edit the same matrices**, mean CKA: "
                   + "; ".join(f"{k}: " + ", ".join(f"{e} {v:.3f}" for e, v in g.sort_values(ascending=False).items())
                               for k, g in shared) + ".")
    return "\n".join(out)


# -- F8: the remedy -----------------------------------------------------------------------------
def _layer_ratios(ds: xr.Dataset):
    from repro.reporting.tables import edited_norms

    en = edited_norms(ds)
    return {str(c).split(":")[0]: float(en.sel(edited=c).isel(step=-1) / en.sel(edited=c).isel(step=0))
            for c in en["edited"].values}


def remedy_findings(memit: xr.Dataset, encore: xr.Dataset) -> str:
    """F8's text, ENCORE against MEMIT on the same facts: how far each run's edited matrices moved
    from their original norm (largest per-layer |ratio − 1|), the mean ‖ΔW‖ per editor call, the
    value-optimisation steps and seconds per fact, efficacy right after each batch and at the end,
    and, when both files hold checkpoint measurements, which of the two ends closer to the unedited
    model on each measured axis."""
    runs = {"ENCORE": encore, "MEMIT": memit}
    out = []
    moved = {}
    for name, ds in runs.items():
        ratios = _layer_ratios(ds)
        layer = max(ratios, key=lambda l: abs(ratios[l] - 1))
        moved[name] = (abs(ratios[layer] - 1), layer, growth(ds))
    e, m = moved["ENCORE"], moved["MEMIT"]
    out.append(f"Norms: ENCORE's edited matrices end within {100 * e[0]:.1f} % of their original norm (largest change "
               f"at layer {e[1]}; growth ×{e[2]:.4f}), MEMIT's within {100 * m[0]:.1f} % (largest at layer {m[1]}; growth "
               f"×{m[2]:.4f}). The mean ‖ΔW‖ of an editor call (one batch) is "
               f"{np.nanmean(encore['delta_norm'].values):.1f} for ENCORE against {np.nanmean(memit['delta_norm'].values):.1f} "
               f"for MEMIT.")
    steps = {n: float(np.nanmean(ds["v_steps"].values)) for n, ds in runs.items() if "v_steps" in ds}
    secs = {n: float(np.nanmean(ds["edit_seconds"].values)) for n, ds in runs.items() if "edit_seconds" in ds}
    if len(steps) == 2 and len(secs) == 2:
        faster = min(secs, key=secs.get)
        out.append(f"Cost: the value optimisation takes {steps['ENCORE']:.1f} steps per fact on average for ENCORE and "
                   f"{steps['MEMIT']:.1f} for MEMIT; {secs['ENCORE']:.1f} against {secs['MEMIT']:.1f} seconds per "
                   f"fact, so {faster} is the faster editor in these runs (wall-clock times of the machine that made "
                   f"them, comparable with each other only).")
    es = {n: (float(ds["efficacy"].mean()), float(ds["efficacy_final"].mean())) for n, ds in runs.items()}
    gap_now, gap_end = es["MEMIT"][0] - es["ENCORE"][0], es["MEMIT"][1] - es["ENCORE"][1]

    def who(gap):
        return "MEMIT ahead" if gap > 0 else ("ENCORE ahead" if gap < 0 else "level")

    out.append(f"Efficacy: {es['ENCORE'][0]:.2f} of ENCORE's edits hold right after their batch against MEMIT's "
               f"{es['MEMIT'][0]:.2f} ({who(gap_now)}), and {es['ENCORE'][1]:.2f} against {es['MEMIT'][1]:.2f} after "
               f"the whole sequence ({who(gap_end)}).")
    if all("ckpt" in ds.dims for ds in runs.values()):
        from repro.reporting.figures import relative_activation_norms

        def axes(ds):
            first, last = ds.isel(ckpt=0), ds.isel(ckpt=-1)
            return {
                "perplexity": (float(last["perplexity"]), float(first["perplexity"]), "{:.2f}"),
                "recall of never-edited facts": (float(last["recall"]), float(first["recall"]), "{:.2f}"),
                "mean task accuracy": (float(last["task_mean_acc"]), float(first["task_mean_acc"]), "{:.3f}"),
                "generation entropy": (float(last["gen_entropy_mean"]), float(first["gen_entropy_mean"]), "{:.2f}"),
                "residual-stream norm ratio": (float(relative_activation_norms(ds, ("resid",)).isel(ckpt=-1).sel(site="resid")),
                                               1.0, "{:.3f}"),
                "residual CKA": (float(last["cka"].sel(site="resid").mean("layer")), 1.0, "{:.3f}"),
            }

        ae, am = axes(encore), axes(memit)
        closer = {"ENCORE": [], "MEMIT": [], "tie": []}
        parts = []
        for k, (ve, ref, fmt) in ae.items():
            vm, refm = am[k][0], am[k][1]
            de, dm = abs(ve - ref), abs(vm - refm)
            key = "tie" if np.isclose(de, dm, rtol=0, atol=1e-9) else ("ENCORE" if de < dm else "MEMIT")
            closer[key].append(k)
            unedited = "" if k.startswith("residual") else f" ({fmt.format(ref)})"
            parts.append(f"{k} {fmt.format(ve)} vs {fmt.format(vm)}{unedited}")
        n = _ckpt(encore, -1)
        out.append(f"On the measured axes after {n} edits (ENCORE vs MEMIT, the unedited model in brackets; the "
                   f"activation ratios are 1 when unchanged): " + "; ".join(parts) + f". ENCORE ends closer to the "
                   f"unedited model on {len(closer['ENCORE'])} of {len(ae)} ({join(closer['ENCORE'])}), MEMIT on "
                   f"{len(closer['MEMIT'])} ({join(closer['MEMIT'])})"
                   + (f", equal on {join(closer['tie'])}" if closer["tie"] else "") + ".")
    return "\n\n".join(out)


def remedy_at_length_findings(encore: xr.Dataset, memit: xr.Dataset) -> str:
    """F8 at length, ENCORE against MEMIT on the same long sequence: growth, efficacy and collapse
    probe over the edits both made (:func:`repro.reporting.tables.remedy_pair`), how each run
    stands, and the downstream measurements at the last checkpoint both reached."""
    from repro.reporting.tables import remedy_pair

    pair = remedy_pair(encore, memit)
    at, e, m = pair["edits"], pair["ENCORE"], pair["MEMIT"]

    def stands(name, r):
        how = {"in progress": f"is still going at {r['done']:,} of {pair['planned']:,} edits",
               "completed": f"made all {r['done']:,} edits"}.get(
                   r["status"], f"stopped after {r['done']:,} edits ({r['status']})")
        held = (f", the collapse rule first held at edit {r['collapse']:,}" if r["collapse"] > 0
                else ", the collapse rule never held")
        return f"{name} {how}{held}"

    out = [f"{stands('MEMIT', m)}; {stands('ENCORE', e)}. Over the {at:,} edits both have made, ENCORE's edited "
           f"matrices grew ×{e['growth']:.3f} against MEMIT's ×{m['growth']:.3f}; efficacy right after each batch "
           f"averages {e['efficacy']:.2f} against {m['efficacy']:.2f}; the collapse probe stands at ×{e['probe']:.2f} "
           f"of the unedited model's perplexity against ×{m['probe']:.2f}."]
    if "ckpt" in encore.dims and "ckpt" in memit.dims:
        both = sorted(set(int(c) for c in encore["ckpt"].values) & set(int(c) for c in memit["ckpt"].values))
        if both and both[-1] > 0:
            c = both[-1]

            def at_ckpt(ds, var):
                return float(ds[var].sel(ckpt=c)), float(ds[var].isel(ckpt=0))

            parts = []
            for var, label, fmt in (("perplexity", "perplexity", "{:.1f}"), ("task_mean_acc", "mean task accuracy", "{:.3f}"),
                                    ("recall", "recall of never-edited facts", "{:.2f}"),
                                    ("es", "efficacy over the facts edited so far", "{:.2f}")):
                (ve, ref), (vm, _) = at_ckpt(encore, var), at_ckpt(memit, var)
                unedited = "" if var == "es" else f" (unedited {fmt.format(ref)})"
                parts.append(f"{label} {fmt.format(ve)} against {fmt.format(vm)}{unedited}")
            out.append(f"At the last checkpoint both reached, after {c:,} edits (ENCORE against MEMIT): "
                       + "; ".join(parts) + ".")
            out.append(efficacy_tradeoff(e["efficacy"] - m["efficacy"], at_ckpt(encore, "es")[0] - at_ckpt(memit, "es")[0], c))
    return "\n\n".join(out)


def efficacy_tradeoff(now_gap: float, kept_gap: float, at: int) -> str:
    """The two efficacies of a remedy pair side by side: ``now_gap`` is ENCORE's mean efficacy right
    after each batch minus MEMIT's, ``kept_gap`` its efficacy over the facts edited so far at
    checkpoint ``at`` minus MEMIT's. The remedy's rule judges the first; the second says which run
    keeps its earlier edits."""
    def sign(gap):  # 0 where the gap rounds to 0.00
        return 0 if abs(gap) < 0.005 else (1 if gap > 0 else -1)

    def side(gap):
        return "level with" if sign(gap) == 0 else f"{abs(gap):.2f} {'above' if gap > 0 else 'below'}"

    text = (f"The two efficacies: right after each batch ENCORE is {side(now_gap)} MEMIT (the remedy's rule judges "
            f"this one); over the facts edited so far, at {at:,} edits, it is {side(kept_gap)} MEMIT.")
    if (sign(now_gap), sign(kept_gap)) == (-1, 1):
        text += (" ENCORE writes each batch less firmly but keeps more of the earlier edits: the companion paper's "
                 "efficacy after 10,000 edits is of the second kind.")
    elif (sign(now_gap), sign(kept_gap)) == (1, -1):
        text += " ENCORE writes each batch more firmly but keeps fewer of the earlier edits."
    elif (sign(now_gap), sign(kept_gap)) == (-1, -1):
        text += (" ENCORE is below MEMIT on both counts: it writes each batch less firmly and, by this point, "
                 "keeps fewer of the earlier edits too.")
    return text


# -- single edits -------------------------------------------------------------------------------
# the editors the study expects to reach ES >= EXPECTED_ES on single edits (their papers' level)
EXPECTED_ES = 0.9
EXPECTED_EDITORS = ("rome", "r-rome", "memit", "emmet", "alphaedit", "encore", "ft-m")
# the editors that write the new value at a key averaged over context prefixes
AVERAGED_KEY = ("r-rome", "memit", "emmet", "alphaedit", "encore")


def single_edit_findings(runs: dict, held=EXPECTED_EDITORS, level: float = EXPECTED_ES) -> str:
    """Which of the editors expected to reach mean ES >= ``level`` on single edits do, which do not,
    and the scores of the editors with no expected level (``runs``: single-edit efficacy runs)."""
    from repro.runs.efficacy import summarize

    s = {str(ds.attrs["editor"]): (summarize(ds), _name(ds)) for ds, _ in runs.values()}
    judged = [e for e in held if e in s]
    if not judged:
        return "No single-edit run of the editors with an expected level has a file yet."
    reach = [e for e in judged if s[e][0]["ES"] >= level]
    miss = [e for e in judged if e not in reach]
    out = [f"{len(reach)} of the {len(judged)} editors expected to reach ES ≥ {level:.2f} do"
           + (": " + join(f"{s[e][1]} (ES {s[e][0]['ES']:.2f})" for e in reach) if reach else "")
           + (f". {len(miss)} do not, at their current settings: " + join(f"**{s[e][1]}, ES {s[e][0]['ES']:.2f}**" for e in miss)
              if miss else "") + "."]
    others = [e for e in s if e not in held]
    if others:
        out.append("The editors with no expected level: " + "; ".join(
            f"{s[e][1]} ES {s[e][0]['ES']:.2f}, paraphrase PS {s[e][0]['PS']:.2f}, neighborhood NS {s[e][0]['NS']:.2f}"
            for e in others) + ".")
    return " ".join(out)


def key_agreement_findings(ka: xr.Dataset, averaged=AVERAGED_KEY, focus: str = "r-rome") -> tuple[str, str]:
    """Two paragraphs from the key agreement file (scripts/key_agreement.py): (1) where the misses of
    the editors that write at an averaged key fall (subject opening the prompt or inside it), and
    which editors miss no fact at all on opening subjects; (2) for ``focus``: the subjects whose last
    token changes without the leading space, how many of them it misses, their key cosines and update
    shares, and the cosines of its other misses against the median of all opening subjects."""
    from repro.reporting.tables import display_name

    opens = ka["subject_opens"].values.astype(bool)
    differs = ka["last_token_differs"].values.astype(bool)
    editors = json.loads(ka.attrs.get("es_editors", "[]"))
    avg = [e for e in averaged if e in editors]
    missed = {e: ka[f"es_{e}"].values < 1 for e in editors}
    inside_misses = {e: int((missed[e] & ~opens).sum()) for e in avg}
    names = join(display_name(e) for e in avg)
    if not any(inside_misses.values()):
        es_in = sorted({round(float(ka[f"es_{e}"].values[~opens].mean()), 2) for e in avg})
        first = (f"Every miss of the {len(avg)} editors that write the value at an averaged key ({names}) is on a fact "
                 f"whose subject **opens** the rewrite prompt (\"{{}} is located in\"); on the {int((~opens).sum())} facts "
                 f"with the subject inside the prompt they reach ES {join(f'{v:.2f}' for v in es_in)}.")
    else:
        first = (f"Of the misses of the {len(avg)} editors that write the value at an averaged key ({names}), "
                 + join(f"{display_name(e)} {inside_misses[e]}" for e in avg if inside_misses[e])
                 + f" are on facts with the subject inside the prompt ({int((~opens).sum())} such facts).")
    clean = [e for e in editors if not (missed[e] & opens).any()]
    first += (" No fact whose subject opens the prompt is missed by " + join(display_name(e) for e in clean) + "."
              if clean else " Every editor misses some fact whose subject opens the prompt.")
    if f"es_{focus}" not in ka:
        return first, ""
    m = missed[focus]
    hit = differs & opens & m
    cos, share = ka["cosine"].values, ka["share"].values

    def rng(v, fmt="{:.2f}"):
        v = np.sort(v)
        return fmt.format(v[0]) if len(v) == 1 else f"{fmt.format(v[0])}-{fmt.format(v[-1])}"

    second = (f"{int((differs & opens).sum())} of the {int(opens.sum())} subjects opening the prompt have a last token "
              f"that changes without the leading space; {display_name(focus)} misses {int(hit.sum())} of them")
    if hit.any():
        second += (f" (key cosine {rng(cos[hit])}, {rng(100 * share[hit], '{:.0f}')} % of the update reaching the plain "
                   f"prompt)")
    rest = m & ~hit
    med_open = float(np.median(cos[opens])) if opens.any() else float("nan")
    med_in = float(np.median(cos[~opens])) if (~opens).any() else float("nan")
    if rest.any():
        second += (f". Its other {int(rest.sum())} misses have key cosines {rng(cos[rest])}, {int((cos[rest] < med_open).sum())} "
                   f"of them below the median of the opening subjects ({med_open:.2f}; inside the prompt {med_in:.2f})")
    return first, second + "."


def tuning_findings(tuning: dict) -> str:
    """The settings checks (``{file stem: Dataset}`` of single-edit runs on training-split facts),
    grouped by the model and the facts they edit (same case ids): per run, the editor, its overrides of the
    editor's defaults and its ES; within a group, which runs miss the same facts, and the value
    optimisation steps on the missed facts. A Markdown list, one item per group of facts."""
    from repro.reporting.tables import display_name, model_name

    groups: dict[tuple, list] = {}
    for stem, ds in tuning.items():
        key = (str(ds.attrs.get("model", "")), tuple(int(c) for c in ds["case_id"].values))
        groups.setdefault(key, []).append((stem, ds))
    items = []
    for (model, cases), members in groups.items():
        parts, misses = [], {}
        for stem, ds in members:
            over = run_params(ds, missing_ok=True).get("hparams", {}) or {}
            setting = ", ".join(f"{k} {('on' if v else 'off') if isinstance(v, bool) else format(v, 'g') if isinstance(v, (int, float)) else v}"
                                for k, v in over.items()) or "defaults"
            missed = [int(c) for c, es in zip(ds["case_id"].values, ds["es"].values) if es < 1]
            label = f"{display_name(str(ds.attrs['editor']))} ({setting})"
            misses[label] = (set(missed), ds)
            parts.append(f"{label} ES {float(ds['es'].mean()):.2f}")
        of = f" of {model_name(model)}" if model else ""
        line = f"{len(cases)} facts{of} (" + ", ".join(f"`{s}`" for s, _ in members) + "): " + "; ".join(parts) + "."
        labels = list(misses)
        same = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]
                if misses[a][0] and misses[a][0] == misses[b][0]]
        for a, b in same:
            steps = misses[a][1]["v_steps"].values[np.isin(misses[a][1]["case_id"].values, list(misses[a][0]))]
            k = len(misses[a][0])
            line += (f" {a} and {b} miss the same {f'{k} facts' if k > 1 else 'fact'} (case id{'s' if k > 1 else ''} "
                     f"{', '.join(map(str, sorted(misses[a][0])))})")
            if len(steps):
                lo, hi = int(np.nanmin(steps)), int(np.nanmax(steps))
                line += (f"; the first stops its value optimisation on {'them' if k > 1 else 'it'} after "
                         f"{lo if lo == hi else f'{lo}-{hi}'} steps")
            line += "."
            for c in labels:
                if c not in (a, b) and misses[c][0] < misses[a][0]:
                    line += f" {c} misses {len(misses[c][0])} of them."
        items.append("- " + line)
    return "\n".join(items)


# -- F1: post-training ----------------------------------------------------------------------------
def post_training_rows(runs: dict) -> list[dict]:
    """Per post-training run: its setting, intervention, learning rate and weight decay, growth
    (:func:`repro.reporting.claims.post_growth`), the share of trained matrices grown and of recording
    intervals over which the mean relative norm rose, ‖ΔW‖/‖W_0‖, the orthogonal-update prediction,
    the median cosine of the update with W_0, the matrix types whose mean shrank, the product of the
    decay factors (1 − lr_t·wd), and held-out perplexity and task exact match, first and last."""
    from repro.reporting.claims import GROWN_SHARE, post_growth
    from repro.reporting.tables import relative_norm_frame, short_matrix

    table = relative_norm_frame(runs)
    rows = []
    for (rid, (ds, _)), (label, r) in zip(runs.items(), table.iterrows()):
        p = run_params(ds, missing_ok=True)
        g = post_growth(ds)
        types = [short_matrix(m) for m in ds["matrix"].values]
        rows.append({
            "run": label, "intervention": p.get("intervention", ds.attrs.get("intervention")), "lr": float(p.get("lr", np.nan)),
            "wd": float(p.get("weight_decay", 0.0)), "steps": int(r["steps"]), "growth": g, "grown": float(r["grown"]),
            "rising": float(r["rising"]), "moved": float(r["‖ΔW‖/‖W0‖"]), "orthogonal %": float(r["if ⟂ %"]),
            "observed %": float(r["all %"]), "cosine": float(r["cos(W0, ΔW)"]),
            "shrank": [t for t in types if f"{t} %" in r and np.isfinite(r[f"{t} %"]) and r[f"{t} %"] < 0],
            "grew": [t for t in types if f"{t} %" in r and np.isfinite(r[f"{t} %"]) and r[f"{t} %"] > 0],
            "decay alone": float(np.prod(1 - ds["lr"].values * float(p.get("weight_decay", 0.0)))) if "lr" in ds else np.nan,
            "ppl first": float(r["ppl first"]), "ppl last": float(r["ppl last"]), "seq_len": p.get("seq_len"),
            "em first": float(ds["task_acc"].values[0]) if "task_acc" in ds else np.nan,
            "em last": float(ds["task_acc"].values[-1]) if "task_acc" in ds else np.nan,
            "grows": g > 1 and float(r["grown"]) >= GROWN_SHARE,
        })
    return rows


def post_training_findings(runs: dict) -> str:
    """F1's text: which post-training runs grow their matrices by claim 1's rule, by how much,
    how far the matrices moved and how the observed growth compares with an orthogonal update's;
    each weight-decay or learning-rate variant against the reference run of its intervention; the
    weight-decay runs against the shrinkage of the decay alone; held-out perplexity."""
    from repro.reporting.claims import GROWN_SHARE
    from repro.reporting.tables import INTERVENTION_LABELS

    rows = post_training_rows(runs)
    if not rows:
        return "No post-training run has a file yet."
    steps = join(sorted({r["steps"] for r in rows}))
    devices = join(sorted({str(ds.attrs.get("device", "?")) for ds, _ in runs.values()}))
    out = [f"{len(rows)} runs of {steps} optimizer steps each (device: {devices}). By the rule of claim 1 a run "
           f"**grows** its trained matrices when their growth (mean norm after the last step over before the first) "
           f"is above 1 and at least {GROWN_SHARE:.0%} of them end above their start.", ""]
    free = [r for r in rows if r["wd"] == 0]
    if free:
        k = sum(r["grows"] for r in free)
        out.append(f"- **Without weight decay**, {k} of {len(free)} runs grow their matrices: "
                   + "; ".join(f"{r['run']}: growth {100 * (r['growth'] - 1):+.4f} %, {r['grown']:.0%} of the matrices "
                               f"grown, the mean rising over {r['rising']:.0%} of the recording intervals, "
                               f"‖ΔW‖/‖W_0‖ {100 * r['moved']:.2f} %"
                               + (f"; shrank on average: {join(r['shrank'])}" if r["shrank"] and r["grew"] else "")
                               for r in free) + ".")
        cos = [r["cosine"] for r in free]
        sign = ("negative in all of them" if max(cos) < 0 else "positive in all of them" if min(cos) > 0
                else "of both signs")
        out.append(f"- **Observed against orthogonal growth.** The median cosine of the update with W_0 ranges from "
                   f"{min(cos):+.4f} to {max(cos):+.4f} over these runs ({sign}). The observed mean change over the "
                   f"trained matrices, as a share of the orthogonal-update prediction √(1 + ‖ΔW‖²/‖W_0‖²) − 1: "
                   + "; ".join(f"{r['run']} {r['observed %'] / r['orthogonal %']:.0%}" for r in free) + ".")
    ref: dict[str, dict] = {}
    for r in rows:
        ref.setdefault(r["intervention"], r)
    pairs = []
    for r in rows:
        b = ref[r["intervention"]]
        if r is b:
            continue
        what = []
        if r["lr"] != b["lr"]:
            what.append(f"learning rate {r['lr']:g} against {b['lr']:g}")
        if r["wd"] != b["wd"]:
            what.append(f"weight decay {r['wd']:g} against {b['wd']:g}")
        same_sign = (r["growth"] - 1) * (b["growth"] - 1) > 0
        grow = f", growth − 1 ×{(r['growth'] - 1) / (b['growth'] - 1):.1f}" if same_sign else ""
        pairs.append(f"{INTERVENTION_LABELS.get(r['intervention'], r['intervention'])}, {' and '.join(what)}: "
                     f"‖ΔW‖/‖W_0‖ ×{r['moved'] / b['moved']:.1f}{grow} "
                     f"(growth {100 * (r['growth'] - 1):+.4f} % against {100 * (b['growth'] - 1):+.4f} %)")
    if pairs:
        out.append("- **Variants against the reference run of the same intervention**: " + "; ".join(pairs) + ".")
    decayed = [r for r in rows if r["wd"] > 0]
    for r in decayed:
        out.append(f"- **Weight decay {r['wd']:g}** ({r['run']}): the decoupled decay alone shrinks every matrix by the "
                   f"product of (1 − lr_t·wd) over the {r['steps']} steps, ×{r['decay alone']:.5f}; the run ends at "
                   f"growth ×{r['growth']:.5f}, with {r['grown']:.0%} of its matrices above their start and the update's "
                   f"median cosine with W_0 {r['cosine']:+.2f}; by claim 1's rule it "
                   + ("grows." if r["grows"] else "does not grow."))
    out.append("- **Held-out Wikipedia perplexity**, first → last, on chunks of the run's sequence length (so "
               "comparable between runs of the same length only; the held-out task's exact match in brackets): "
               + "; ".join(f"{r['run']} ({r['seq_len']} tokens) {r['ppl first']:.1f} → {r['ppl last']:.1f}"
                           + (f" ({r['em first']:.2f} → {r['em last']:.2f})" if np.isfinite(r["em last"]) else "")
                           for r in rows) + ".")
    return "\n".join(out)


# -- F2: bounded editors and the length of the runs -----------------------------------------------
def bounded_update_findings(runs: dict) -> str:
    """For every run whose editor bounds each weight's change (``norm_constraint`` in its hparams,
    the L∞ radius of FT-L): the bound, its growth and its efficacy right after each edit; then the
    largest growth of all runs and the length of the runs."""
    out = []
    for ds, _ in runs.values():
        hp = json.loads(ds.attrs.get("hparams", "{}") or "{}")
        eps = hp.get("norm_constraint")
        if eps:
            out.append(f"{_name(ds)} bounds every weight's change by ε = {eps:g} (L∞): its edited matrices grow "
                       f"×{growth(ds):.4f} and {float(ds['efficacy'].mean()):.2f} of its edits succeed right after "
                       f"they are made.")
    if runs:
        g = {_name(ds): growth(ds) for ds, _ in runs.values()}
        top = max(g, key=g.get)
        lengths = join(sorted({int(ds.sizes["edit"]) for ds, _ in runs.values()}))
        out.append(f"The largest growth here is ×{g[top]:.2f} ({top}), after {lengths} edits.")
    return " ".join(out)


# -- layer choice -----------------------------------------------------------------------------------
def layer_choice_note(best: int, runs: dict, editors=("rome", "r-rome")) -> str:
    """Whether the sequential runs of the single-layer editors edit the sweep's best layer, from the
    edited layers their files record (``runs``: sequential runs)."""
    used = {}
    for ds, _ in runs.values():
        if str(ds.attrs.get("editor")) in editors:
            used.setdefault(_name(ds), set()).update(int(c.split(":")[0]) for c in edited_labels(ds))
    if not used:
        return ""
    same = [e for e, layers in used.items() if layers == {int(best)}]
    other = [f"{e} (layer {', '.join(map(str, sorted(l)))})" for e, l in used.items() if l != {int(best)}]
    out = f"The sequential runs of {join(same)} edit layer {best}, as their files record." if same else ""
    if other:
        out += (" " if out else "") + f"The sequential runs of {join(other)} edit another layer than the best by S."
    return out


# -- at length: the long runs, finished or in progress -------------------------------------------
def long_run_rows(runs: dict) -> list[dict]:
    """Per long run: model, edits made of those planned, status, growth after the last edit made,
    the edit where an edited matrix first passes every unedited one of its type, the collapse edit
    and the last probe ratio; and at its last checkpoint after editing began (if any), perplexity,
    mean task accuracy and recall against the unedited model's, efficacy over the facts edited so far
    against the first checkpoint's, the residual-stream norm ratio and subspace overlap, each judged
    by the rules of claims 3 and 4."""
    from repro.reporting.tables import (collapse_edit, crossing_edit, growth_at, model_name, probe_ratio, run_status,
                                        started_above)

    rows = []
    for ds, _ in runs.values():
        p = run_params(ds, missing_ok=True)
        batch = int(p.get("batch_size", 1))
        r = {"editor": _name(ds) + (f" in batches of {batch}" if batch > 1 else ""),
             "model": model_name(str(ds.attrs.get("model"))), "done": int(ds.sizes["edit"]),
             "planned": int(p.get("n_edits", ds.sizes["edit"])), "status": run_status(ds),
             "growth": growth_at(ds, int(ds["step"].values[-1])), "cross": crossing_edit(ds), "above": started_above(ds),
             "collapse": collapse_edit(ds), "probe ×": probe_ratio(ds),
             "factor": float(json.loads(ds.attrs.get("collapse_params", "{}")).get("factor", 10.0)),
             "ckpt": None}
        if "ckpt" in ds.dims and ds.sizes["ckpt"] >= 2:
            first, last, early = ds.isel(ckpt=0), ds.isel(ckpt=-1), ds.isel(ckpt=1)
            norm = ds["act_norm"].sel(site="resid")
            r.update({
                "ckpt": _ckpt(ds, -1), "early": _ckpt(ds, 1),
                "ppl0": float(first["perplexity"]), "ppl": float(last["perplexity"]),
                "acc0": float(first["task_mean_acc"]), "acc": float(last["task_mean_acc"]),
                "recall0": float(first["recall"]), "recall": float(last["recall"]),
                "es1": float(early["es"]), "es": float(last["es"]),
                "resid ×": float((norm.isel(ckpt=-1) / norm.isel(ckpt=0)).mean("layer")),
                "overlap": float(ds["subspace_overlap"].sel(site="resid").isel(ckpt=-1).mean("layer")),
            })
            r["why"] = damage(r)
            r["forgets"] = r["ckpt"] > r["early"] and r["es1"] - r["es"] >= ES_DROP
            r["norms fall"] = r["resid ×"] <= NORM_FALL
            r["moves"] = r["overlap"] < OVERLAP
        rows.append(r)
    return rows


def _matrix_names(names: list[str]) -> list[str]:
    """"5:mlp_down" -> "layer 5 mlp_down"."""
    return [f"layer {n.split(':')[0]} {n.split(':')[1]}" for n in names]


def long_run_findings(runs: dict) -> str:
    """The at-length page's text: one item per long run (what its norms, its collapse probe and its
    last checkpoint show), then the counts by the rules of claims 3 and 4. A run still going is
    reported as far as it has come; the claims page judges finished runs only."""
    rows = long_run_rows(runs)
    if not rows:
        return "No long run has started yet."
    going = [r for r in rows if r["status"] == "in progress"]
    out = ["Numbers are read from the run files (a run still going: from its progress view) and judged by "
           f"the rules of the claims page: a run **damages the model** when its perplexity ends ×{PPL_RISE:g} or "
           f"more above the unedited model's or its mean task accuracy or recall of never-edited facts falls by "
           f"{ACC_DROP:g} or more; it **forgets earlier edits** when efficacy over the facts edited so far falls by "
           f"{ES_DROP:g} or more from its first checkpoint; its **activation norms fall** when the residual stream's "
           f"norm ends at or below ×{NORM_FALL:g} of the unedited model's; its **activations move** when their "
           f"top-10 subspace overlap with the unedited model's ends below {OVERLAP:g}. Unedited values in brackets."
           + (f" {len(going)} of the {len(rows)} runs are still going; the claims page counts finished runs only."
              if going else ""), ""]
    for r in rows:
        head = (f"- **{r['editor']}** ({r['model']}, {r['done']:,} of {r['planned']:,} edits"
                + (", in progress" if r["status"] == "in progress" else f", {r['status']}") + "): "
                f"growth ×{r['growth']:.2f}; "
                + (f"the edited {join(_matrix_names(r['above']))} {'was' if len(r['above']) == 1 else 'were'} "
                   f"above every unedited matrix of its type before any edit; " if r["above"] else "")
                + (f"an edited matrix passes every unedited matrix of its type after edit {r['cross']:,}; "
                   if r["cross"] > 0 else f"no {'other ' if r['above'] else ''}edited matrix passes the largest "
                   f"unedited one; ")
                + (f"the collapse rule first held at edit {r['collapse']:,}" if r["collapse"] > 0 else
                   f"the collapse rule has not held (probe perplexity ×{r['probe ×']:.2f} of the unedited "
                   f"model's, threshold ×{r['factor']:g})"))
        if r["ckpt"] is None:
            out.append(head + "; no checkpoint after editing began yet.")
            continue
        out.append(head + f". After {r['ckpt']:,} edits: perplexity {r['ppl']:.1f} ({r['ppl0']:.1f}), task accuracy "
                   f"{r['acc']:.3f} ({r['acc0']:.3f}), recall {r['recall']:.2f} ({r['recall0']:.2f}): "
                   + (f"damages the model ({join(r['why'])})" if r["why"] else "does not damage the model")
                   + f"; efficacy over the edited facts {r['es']:.2f} ({r['es1']:.2f} after {r['early']:,}): "
                   + ("forgets earlier edits" if r["forgets"] else "keeps them")
                   + f"; residual-stream norm ×{r['resid ×']:.3f}: " + ("falls" if r["norms fall"] else "does not fall")
                   + f"; subspace overlap {r['overlap']:.2f}: " + ("moved" if r["moves"] else "not moved") + ".")
    judged = [r for r in rows if r["ckpt"] is not None]
    if judged:
        n = len(judged)
        out.append("")
        out.append(f"Over the {n} long run{'s' if n > 1 else ''} with checkpoints: "
                   f"{sum(bool(r['why']) for r in judged)} of {n} damage the model and "
                   f"{sum(r['forgets'] for r in judged)} of {n} forget earlier edits (claim 3); activation norms "
                   f"fall in {sum(r['norms fall'] for r in judged)} of {n} and activations move in "
                   f"{sum(r['moves'] for r in judged)} of {n} (claim 4). The collapse rule has held in "
                   f"{sum(r['collapse'] > 0 for r in rows)} of {len(rows)} runs.")
    return "\n".join(out)
