"""Verdicts on the study's claims, computed from the run files by stated rules.

Each claim is judged per run (or per editor) by a rule on named metrics with a named threshold;
the claim's verdict follows from how many of the judged runs satisfy it:

* **holds**: every judged run satisfies the rule;
* **holds in part**: some do, some do not;
* **not reproduced**: none does;
* **not tested here**: no run file measures it.

The rules and thresholds are the constants below; :func:`verdicts` returns one :class:`Verdict`
per claim with its per-run evidence table (a pandas DataFrame), so a page can show why.

**Growth** is defined once, for every claim: the mean Frobenius norm of the edited (or trained)
matrices after the sequence over its value before it, ``mean ‖W_N‖ / mean ‖W_0‖``
(:func:`repro.reporting.tables.growth_at` for editing runs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from repro.reporting.tables import (crossing_edit, display_name, edited_norms, ends_above, former_values, growth_at,
                                    is_default_model, model_name, remedy_pair, remedy_pairs, run_batch, run_model,
                                    started_above)

HOLDS, PART, NOT_REPRODUCED, NOT_TESTED = "holds", "holds in part", "not reproduced", "not tested here"

# claim 1: a post-training run grows its trained matrices when their mean norm rises and at least
# half of them end above their start
GROWN_SHARE = 0.5
# claim 2: an editor's matrices grow "with every edit" when the mean edited norm rose over at least
# this share of the measured steps, and "far beyond" when an edited matrix that started at or below
# the largest unedited matrix of the same type ends above it (one already above before any edit
# cannot pass it: it is reported, not counted; a run all of whose edited matrices started above is
# judged on its growth alone)
RISES_SHARE = 0.9
# claim 3: degradation is a perplexity rise of 5 % or more, or a fall of 0.05 or more in mean task
# accuracy or in recall of unedited facts; editing degrades when efficacy over the facts edited so
# far falls by 0.05 or more from the first checkpoint after editing began to the last
PPL_RISE = 1.05
ACC_DROP = 0.05
ES_DROP = 0.05
# claim 4: activation norms fall when the residual stream's mean norm (over layers, relative to the
# unedited model) ends at least 1 % lower; they move into other subspaces when the mean top-10
# principal-subspace overlap of the residual stream ends below 0.95
NORM_FALL = 0.99
OVERLAP = 0.95
# the remedy: ENCORE's growth (minus 1) at most half of MEMIT's, for runs of the same planned length
# and batch size compared over the edits both made, with efficacy right after each edit no more than
# 0.05 below MEMIT's
REMEDY_SHARE = 0.5
REMEDY_ES = 0.05


@dataclass
class Verdict:
    claim: str  # "1".."4" or "remedy"
    statement: str
    verdict: str
    rule: str
    evidence: object = None  # pandas DataFrame, one row per judged run
    summary: str = ""  # one sentence of effect sizes, generated from the evidence
    figures: list[str] = field(default_factory=list)
    precision: int = 3  # decimals of the evidence table


def _verdict(passes: list[bool]) -> str:
    if not passes:
        return NOT_TESTED
    return HOLDS if all(passes) else (NOT_REPRODUCED if not any(passes) else PART)


def _frame(rows: list[dict], tests: tuple[str, ...] = ()):
    """Rows as a DataFrame indexed by a short label of each run; yes/no for the rule's tests (its
    boolean columns and ``tests``, where None, "–", is a test that does not apply to the run)."""
    import pandas as pd

    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows).set_index("run")
    for col in table.columns:
        values = [r[col] for r in rows]
        if col in tests or all(isinstance(v, bool) for v in values):
            table[col] = [{True: "yes", False: "no", None: "–"}[v] for v in values]
    return table


FORMER_MARK = "†"  # after the label of a run made with the former value optimisation


def run_label(ds: xr.Dataset) -> str:
    """A short name of an editing run: editor, edits, batch size when above 1 (e.g. "MEMIT 100×10"),
    the model when it is not the default one (e.g. "ROME 1,000, Gemma-3-270M"), and
    :data:`FORMER_MARK` when its editor optimised its values in the package's former form."""
    batch = run_batch(ds, missing_ok=True)
    model = run_model(ds)
    return (f"{_editor(ds)} {int(ds.sizes['edit']):,}" + (f"×{batch}" if batch > 1 else "")
            + ("" if is_default_model(model) else f", {model_name(model)}")
            + (FORMER_MARK if former_values(ds) else ""))


def former_note(runs: dict) -> str:
    """Which of ``runs`` (id -> (Dataset, path)) were made with the former value optimisation,
    as a sentence for the pages that judge or draw them ("" when none)."""
    from repro.editors.locate import FORMER_VALUES

    former = [run_label(ds) for ds, _ in runs.values() if former_values(ds)]
    if not former:
        return ""
    return (f"{FORMER_MARK} {len(former)} of these {len(runs)} runs were made with {FORMER_VALUES}, "
            f"not the authors' form that the editors now use by default: {', '.join(former)}. "
            "Their numbers stand for that variant until each is rerun.")


def growth(ds: xr.Dataset) -> float:
    """The growth of an editing run: mean ‖W‖ of its edited matrices after the sequence over before."""
    return growth_at(ds, int(ds["step"].values[-1]))


def post_growth(ds: xr.Dataset) -> float:
    """The growth of a post-training run: mean ‖W‖ of its trained matrices after the last step over
    before the first."""
    w = ds["weight_norm"].where(ds["trained"] == 1)
    return float(w.isel(step=-1).mean() / w.isel(step=0).mean())


def rises_share(ds: xr.Dataset) -> float:
    """Share of measured steps after which the mean edited norm is above the step before."""
    mean = edited_norms(ds).mean("edited").values
    return float((np.diff(mean) > 0).mean()) if len(mean) > 1 else float("nan")


def _editor(ds: xr.Dataset) -> str:
    return display_name(str(ds.attrs.get("editor")))


def _count(rows: list[dict], key: str) -> str:
    return f"{sum(bool(r[key]) for r in rows)} of {len(rows)}"


# -- claim 1 ------------------------------------------------------------------------------------
def claim_post_training(runs: dict) -> Verdict:
    rows = []
    for rid, (ds, _) in runs.items():
        trained = ds["trained"] == 1
        w = ds["weight_norm"].where(trained)
        ratio = post_growth(ds)
        grown = float(((w.isel(step=-1) > w.isel(step=0)).where(trained)).mean())
        from repro.reporting.tables import training_setting

        rows.append({"run": training_setting(ds), "growth": ratio,
                     "share grown": grown, "grows": ratio > 1 and grown >= GROWN_SHARE})
    ev = _frame(rows)
    summary = ""
    if rows:
        lo, hi = min(r["growth"] for r in rows), max(r["growth"] for r in rows)
        summary = (f"{_count(rows, 'grows')} post-training runs grow their trained matrices; "
                   f"growth ranges from ×{lo:.5f} to ×{hi:.5f}.")
    return Verdict("1", "Post-training (continued pre-training, full and LoRA fine-tuning) increases the "
                   "Frobenius norm of the updated matrices.", _verdict([r["grows"] for r in rows]),
                   f"per post-training run: growth > 1 and at least {GROWN_SHARE:.0%} of the trained matrices "
                   f"end above their start", ev, summary, ["figures/f1_post_training"], precision=5)


# -- claim 2 ------------------------------------------------------------------------------------
def claim_norm_growth(runs: dict) -> Verdict:
    rows = []
    for rid, (ds, _) in runs.items():
        g, r, cross, ends = growth(ds), rises_share(ds), crossing_edit(ds), ends_above(ds)
        rows.append({"run": run_label(ds), "growth": g,
                     "rises": r, "passes unedited at": cross if cross > 0 else None,
                     "above before editing": ", ".join(started_above(ds)),
                     "grows every edit": g > 1 and r >= RISES_SHARE, "far beyond": ends})
    for row in rows:
        row["holds"] = row["grows every edit"] and row["far beyond"] is not False
    already = [f"{x['run']} ({x['above before editing']})" for x in rows if x["above before editing"]]
    ev = _frame(rows, tests=("far beyond",))
    summary = ""
    if rows:
        best = max(rows, key=lambda x: x["growth"])
        summary = (f"The edited matrices grow with (nearly) every edit in {_count(rows, 'grows every edit')} runs "
                   f"and end above every unedited matrix of their type in {_count(rows, 'far beyond')}; growth "
                   f"ranges from ×{min(x['growth'] for x in rows):.3f} to ×{best['growth']:.3f} ({best['run']}).")
        if already:
            summary += (f" Before any edit, an edited matrix was already above every unedited one in "
                        f"{len(already)} run{'s' if len(already) > 1 else ''}, not counted as passing them: "
                        f"{'; '.join(already)}.")
    return Verdict("2", "Under sequential editing, with every family of editor, the norm of the edited matrix "
                   "grows with every edit, far beyond the unedited matrices.", _verdict([r["holds"] for r in rows]),
                   f"per run: growth > 1, the mean edited norm rising over at least {RISES_SHARE:.0%} of the "
                   f"measured steps, and an edited matrix that started at or below the largest unedited "
                   f"matrix of its type ending above it (one already above before any edit is reported, not "
                   f"counted)", ev, summary, ["figures/f2_f3_norm_growth", "figures/at_length"])


# -- claim 3 ------------------------------------------------------------------------------------
def _after_first_edits(ds: xr.Dataset) -> xr.Dataset:
    return ds.isel(ckpt=slice(1, None))


def claim_degradation(runs: dict) -> Verdict:
    rows = []
    for rid, (ds, _) in runs.items():
        first, last = ds.isel(ckpt=0), ds.isel(ckpt=-1)
        ppl = float(last["perplexity"] / first["perplexity"])
        acc = float(first["task_mean_acc"] - last["task_mean_acc"])
        recall = float(first["recall"] - last["recall"])
        edited = _after_first_edits(ds)
        es_drop = float(edited["es"].isel(ckpt=0) - edited["es"].isel(ckpt=-1)) if edited.sizes["ckpt"] > 1 else np.nan
        down = ppl >= PPL_RISE or acc >= ACC_DROP or recall >= ACC_DROP
        editing = bool(es_drop >= ES_DROP)
        rows.append({"run": run_label(ds), "growth": growth(ds), "perplexity ×": ppl,
                     "task acc drop": acc, "recall drop": recall, "ES drop": es_drop,
                     "abilities degrade": down, "editing degrades": editing, "holds": down and editing})
    ev = _frame(rows)
    summary = ""
    if len(rows) >= 3:
        from scipy.stats import spearmanr

        rho = spearmanr([r["growth"] for r in rows], [r["perplexity ×"] for r in rows]).statistic
        summary = (f"Abilities degrade in {_count(rows, 'abilities degrade')} runs and editing itself in "
                   f"{_count(rows, 'editing degrades')}; across runs the rank correlation of growth with the "
                   f"perplexity rise is ρ = {rho:.2f}.")
    verdict = _verdict([r["holds"] for r in rows])
    if verdict == NOT_REPRODUCED and any(r["abilities degrade"] or r["editing degrades"] for r in rows):
        verdict = PART  # one half of the claim holds somewhere
    return Verdict("3", "The growth unbalances the model: downstream abilities degrade, and editing itself "
                   "degrades.", verdict,
                   f"per measured run: abilities degrade (perplexity ×{PPL_RISE:g} or more, or a fall of "
                   f"{ACC_DROP:g} or more in mean task accuracy or recall of unedited facts) and editing "
                   f"degrades (efficacy over the facts edited so far falls {ES_DROP:g} or more from the first "
                   f"checkpoint after editing to the last); in part when only some runs, or only one half, do",
                   ev, summary, ["figures/f4_downstream", "figures/f5_edit_quality", "figures/t1_summary"])


# -- claim 4 ------------------------------------------------------------------------------------
def claim_activations(runs: dict) -> Verdict:
    rows = []
    for rid, (ds, _) in runs.items():
        norm = ds["act_norm"].sel(site="resid")
        rel = float((norm.isel(ckpt=-1) / norm.isel(ckpt=0)).mean("layer"))
        overlap = float(ds["subspace_overlap"].sel(site="resid").isel(ckpt=-1).mean("layer"))
        rows.append({"run": run_label(ds), "residual norm ×": rel, "subspace overlap": overlap,
                     "norms fall": rel <= NORM_FALL, "subspaces move": overlap < OVERLAP})
    for row in rows:
        row["holds"] = row["norms fall"] and row["subspaces move"]
    ev = _frame(rows)
    summary = ""
    if rows:
        summary = (f"Residual-stream norms fall by 1 % or more in {_count(rows, 'norms fall')} runs (ratios "
                   f"{min(r['residual norm ×'] for r in rows):.3f} to {max(r['residual norm ×'] for r in rows):.3f}); "
                   f"the activations move into other subspaces in {_count(rows, 'subspaces move')} (overlap "
                   f"{min(r['subspace overlap'] for r in rows):.3f} to {max(r['subspace overlap'] for r in rows):.3f}).")
    verdict = _verdict([r["holds"] for r in rows])
    if verdict == NOT_REPRODUCED and any(r["norms fall"] or r["subspaces move"] for r in rows):
        verdict = PART
    return Verdict("4", "Internal activations change: their norms fall and they move into other subspaces "
                   "than those of the unedited model.", verdict,
                   f"per measured run: the residual stream's norm (mean over layers, relative to the unedited "
                   f"model) ends at or below {NORM_FALL:g}, and its top-10 principal-subspace overlap with the "
                   f"unedited model (mean over layers) ends below {OVERLAP:g}; in part when only some runs, or "
                   f"only one half, do", ev, summary, ["figures/f6_activation_norms", "figures/f7_subspaces"])


# -- the remedy ---------------------------------------------------------------------------------
def claim_remedy(runs: dict) -> Verdict:
    """ENCORE against MEMIT, runs of the same model, planned length and batch size
    (:func:`~repro.reporting.tables.remedy_pairs`), compared over the edits both made (where MEMIT
    collapsed and stopped early, up to there)."""
    rows, on = [], []  # on: " on <model>" for a pair not on the default model
    for _, pair in remedy_pairs(runs):
        (ds, _), (mds, _) = pair["encore"], pair["memit"]
        r = remedy_pair(ds, mds)
        e, m = r["ENCORE"], r["MEMIT"]
        model = run_model(ds)
        on.append("" if is_default_model(model) else f" on {model_name(model)}")
        rows.append({"run": run_label(ds), "model": model_name(model),
                     "edits": r["edits"], "batch": r["batch"],
                     "MEMIT stopped": m["status"] if m["done"] < r["planned"] else "",
                     "ENCORE growth": e["growth"], "MEMIT growth": m["growth"],
                     "ENCORE ES": e["efficacy"], "MEMIT ES": m["efficacy"],
                     "holds": ((e["growth"] - 1) <= REMEDY_SHARE * (m["growth"] - 1)
                               and e["efficacy"] >= m["efficacy"] - REMEDY_ES)})
    ev = _frame(rows)

    def where(r, on):
        return (f"{r['edits']:,} edits in batches of {r['batch']}{on}"
                + (f" (where MEMIT stopped, {r['MEMIT stopped']})" if r["MEMIT stopped"] else ""))

    summary = "; ".join(f"{where(r, o)}: ENCORE ×{r['ENCORE growth']:.4f} against MEMIT ×{r['MEMIT growth']:.4f}, "
                        f"efficacy {r['ENCORE ES']:.2f} against {r['MEMIT ES']:.2f}" for r, o in zip(rows, on))
    return Verdict("remedy", "Norm-constrained editing (ENCORE: early stopping and a norm penalty) keeps the "
                   "edited matrices' growth down without giving up the edits.", _verdict([r["holds"] for r in rows]),
                   f"per pair of ENCORE and MEMIT runs of the same planned length and batch size, over the edits "
                   f"both made: ENCORE's growth − 1 is at most {REMEDY_SHARE:.0%} of MEMIT's, and its efficacy right "
                   f"after each edit at most {REMEDY_ES:g} below MEMIT's", ev, (summary + ".") if summary else "",
                   ["figures/f8_remedy"])


def verdicts(profile: str = "default") -> list[Verdict]:
    """Every claim's verdict from the finished runs of ``profile``: post-training runs for claim 1,
    the sequential runs for claim 2 and the remedy, their checkpoint measurements for claims 3-4."""
    from repro.reporting.figures import measured_runs
    from repro.reporting.tables import profile_runs

    post, _ = profile_runs("notebooks/post_training.ipynb", profile)
    seq, _ = profile_runs("notebooks/sequential_editing.ipynb", profile, length="all")
    measured, _ = measured_runs(profile, length="all")
    return [claim_post_training(post), claim_norm_growth(seq), claim_degradation(measured),
            claim_activations(measured), claim_remedy(seq)]


def verdict_table(items: list[Verdict]):
    """Claim, statement, verdict and summary, one row per claim (a pandas DataFrame)."""
    import pandas as pd

    return pd.DataFrame([{"claim": v.claim, "statement": v.statement, "verdict": v.verdict, "effect sizes": v.summary}
                         for v in items]).set_index("claim")


README_START, README_END = "<!-- claims:start (python -m repro.reporting.claims --readme) -->", "<!-- claims:end -->"


def markdown(items: list[Verdict]) -> str:
    """The verdicts as a Markdown table (what the README shows between its claims markers)."""
    rows = ["| claim | verdict | effect sizes | rule |", "|---|---|---|---|"]
    for v in items:
        rows.append(f"| {v.claim}: {v.statement} | **{v.verdict}** | {v.summary} | {v.rule} |")
    return "\n".join(rows)


def readme_block(items: list[Verdict]) -> str:
    return f"{README_START}\n{markdown(items)}\n{README_END}"


def sync_readme(path, items: list[Verdict] | None = None) -> bool:
    """Rewrite the block between the README's claims markers from the run files; True if it changed."""
    from pathlib import Path

    path = Path(path)
    text = path.read_text()
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    new = text[:start] + readme_block(items if items is not None else verdicts()) + text[end:]
    if new != text:
        path.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    import argparse

    from repro.core.paths import ROOT

    ap = argparse.ArgumentParser(prog="python -m repro.reporting.claims", description="the claims' verdicts from the run files")
    ap.add_argument("--readme", action="store_true", help="rewrite the README's results block")
    args = ap.parse_args(argv)
    items = verdicts()
    if args.readme:
        print("README.md", "updated" if sync_readme(ROOT / "README.md", items) else "already up to date")
    else:
        print(markdown(items))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
