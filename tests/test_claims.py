"""The claims' verdicts follow the data: on hand-made run files each rule gives "holds" when every
run satisfies it, "holds in part" when some do, "not reproduced" when none does, and "not tested
here" without runs; changing the data flips the verdict."""
from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from repro.reporting import claims
from repro.reporting.claims import HOLDS, NOT_REPRODUCED, NOT_TESTED, PART


def post_run(ratio: float, wd: float = 0.0):
    steps = np.array([0, 10, 20])
    w = np.ones((3, 2, 2)) * 10.0
    w[:, :, :] *= np.linspace(1.0, ratio, 3)[:, None, None]
    return xr.Dataset({"weight_norm": (("step", "layer", "matrix"), w),
                       "trained": (("layer", "matrix"), np.ones((2, 2), dtype=np.int8))},
                      coords={"step": steps, "layer": [0, 1], "matrix": ["a", "b"]},
                      attrs={"params": json.dumps({"intervention": "cpt", "weight_decay": wd, "lr": 1e-4})}), None


def edit_run(editor: str, growth: float, unedited: float = 12.0, n: int = 10, batch: int = 1,
             efficacy: float = 1.0, **measures):
    """One edited matrix (layer 0) growing geometrically from 10 to 10·growth, one unedited."""
    steps = np.arange(0, n + 1, batch)
    norms = np.ones((len(steps), 2, 1)) * unedited
    norms[:, 0, 0] = 10.0 * growth ** (steps / n)
    ds = xr.Dataset({"weight_norm": (("step", "layer", "matrix"), norms),
                     "edited": (("layer", "matrix"), np.array([[1], [0]], dtype=np.int8)),
                     "efficacy": ("edit", np.full(n, efficacy))},
                    coords={"step": steps, "layer": [0, 1], "matrix": ["mlp_down"], "edit": np.arange(1, n + 1)},
                    attrs={"editor": editor, "params": json.dumps({"n_edits": n, "batch_size": batch})})
    if measures:
        ckpt = np.array([0, n // 2, n])
        m = {k: np.asarray(v, dtype=float) for k, v in measures.items()}
        ds = ds.assign_coords(ckpt=ckpt, site=["resid"], layer=[0, 1])
        for name in ("perplexity", "task_mean_acc", "recall", "es"):
            ds[name] = ("ckpt", m[name])
        ds["act_norm"] = (("ckpt", "site", "layer"), np.broadcast_to(m["act_norm"][:, None, None], (3, 1, 2)).copy())
        ds["subspace_overlap"] = (("ckpt", "site", "layer"),
                                  np.broadcast_to(m["overlap"][:, None, None], (3, 1, 2)).copy())
    return ds, None


HEALTHY = dict(perplexity=[10, 10.1, 10.2], task_mean_acc=[0.8, 0.8, 0.8], recall=[1, 1, 1], es=[np.nan, 1.0, 1.0],
               act_norm=[5.0, 5.0, 5.0], overlap=[1.0, 0.99, 0.99])
BROKEN = dict(perplexity=[10, 20, 40], task_mean_acc=[0.8, 0.7, 0.5], recall=[1, 0.8, 0.6], es=[np.nan, 1.0, 0.7],
              act_norm=[5.0, 4.5, 4.0], overlap=[1.0, 0.8, 0.6])


def test_no_runs_is_not_tested():
    for judge in (claims.claim_post_training, claims.claim_norm_growth, claims.claim_degradation,
                  claims.claim_activations, claims.claim_remedy):
        assert judge({}).verdict == NOT_TESTED


def test_post_training_verdict_flips_with_the_data():
    assert claims.claim_post_training({"a": post_run(1.01), "b": post_run(1.001)}).verdict == HOLDS
    assert claims.claim_post_training({"a": post_run(1.01), "b": post_run(0.99, wd=0.1)}).verdict == PART
    v = claims.claim_post_training({"a": post_run(0.99)})
    assert v.verdict == NOT_REPRODUCED and v.evidence["growth"].iloc[0] == pytest.approx(0.99)
    assert v.evidence["grows"].iloc[0] == "no"


def test_norm_growth_needs_growth_and_passing_the_unedited_matrices():
    big = edit_run("rome", 1.5)  # 10 -> 15 passes the unedited 12
    small = edit_run("memit", 1.1)  # 10 -> 11 grows but stays below 12
    assert claims.claim_norm_growth({"a": big}).verdict == HOLDS
    v = claims.claim_norm_growth({"a": big, "b": small})
    assert v.verdict == PART and v.evidence.loc["MEMIT 10", "grows every edit"] == "yes"
    assert v.evidence.loc["MEMIT 10", "far beyond"] == "no"
    assert v.evidence.loc["ROME 10", "passes unedited at"] == 5  # 10·1.5^(k/10) > 12 first at k = 5
    assert claims.claim_norm_growth({"b": small, "c": edit_run("ft-m", 0.9)}).verdict == NOT_REPRODUCED
    assert "×1.500" in v.summary


def test_degradation_needs_abilities_and_editing_to_degrade():
    broken, healthy = edit_run("mend", 2.0, **BROKEN), edit_run("memit", 1.01, **HEALTHY)
    assert claims.claim_degradation({"a": broken}).verdict == HOLDS
    v = claims.claim_degradation({"a": broken, "b": healthy})
    assert v.verdict == PART and v.evidence.loc["MEND 10", "perplexity ×"] == pytest.approx(4.0)
    assert v.evidence.loc["MEND 10", "ES drop"] == pytest.approx(0.3)  # from the first checkpoint after editing
    assert claims.claim_degradation({"b": healthy}).verdict == NOT_REPRODUCED
    half = dict(HEALTHY, perplexity=[10, 12, 14])  # abilities degrade, the edits hold
    assert claims.claim_degradation({"c": edit_run("rome", 1.2, **half)}).verdict == PART


def test_activation_verdict_flips_with_norms_and_overlap():
    assert claims.claim_activations({"a": edit_run("ft-m", 1.1, **BROKEN)}).verdict == HOLDS
    assert claims.claim_activations({"b": edit_run("memit", 1.0, **HEALTHY)}).verdict == NOT_REPRODUCED
    moved = dict(HEALTHY, overlap=[1.0, 0.9, 0.8])  # subspaces move, norms do not fall
    v = claims.claim_activations({"c": edit_run("rome", 1.1, **moved)})
    assert v.verdict == PART and v.evidence.loc["ROME 10", "subspace overlap"] == pytest.approx(0.8)


def test_remedy_compares_encore_with_memit_at_the_same_length_and_batch():
    memit = edit_run("memit", 1.2, batch=5)
    good = edit_run("encore", 1.05, batch=5)
    assert claims.claim_remedy({"m": memit, "e": good}).verdict == HOLDS
    assert claims.claim_remedy({"m": memit, "e": edit_run("encore", 1.15, batch=5)}).verdict == NOT_REPRODUCED
    assert claims.claim_remedy({"m": memit, "e": edit_run("encore", 1.05, batch=5, efficacy=0.5)}).verdict == NOT_REPRODUCED
    assert claims.claim_remedy({"m": memit, "e": edit_run("encore", 1.05, batch=1)}).verdict == NOT_TESTED


def test_remedy_compares_a_pair_where_memit_stopped_early_over_the_edits_both_made():
    def planned(run, n):
        ds, path = run
        return ds.assign_attrs(params=json.dumps({**json.loads(ds.attrs["params"]), "n_edits": n})), path

    # MEMIT collapsed after 40 of 100 planned edits; ENCORE made all 100 and grew more in its last 60
    memit = planned(edit_run("memit", 1.2, n=40, batch=5), 100)
    memit[0].attrs["stop_reason"] = "collapsed"
    encore = edit_run("encore", 1.5, n=100, batch=5)  # ×1.5 at 100 edits, ×1.5^0.4 ≈ 1.176 at 40
    v = claims.claim_remedy({"m": memit, "e": encore})
    row = v.evidence.iloc[0]
    assert row["edits"] == 40 and row["MEMIT stopped"] == "collapsed"
    assert row["ENCORE growth"] == pytest.approx(1.5 ** 0.4) and row["MEMIT growth"] == pytest.approx(1.2)
    assert v.verdict == NOT_REPRODUCED  # 0.176 > half of 0.2
    assert "40 edits in batches of 5 (where MEMIT stopped, collapsed)" in v.summary
    slow = edit_run("encore", 1.05 ** 2.5, n=100, batch=5)  # ×1.05 at 40 edits: within half of MEMIT's 0.2
    assert claims.claim_remedy({"m": memit, "e": slow}).verdict == HOLDS
    # efficacy counts the edits both made only: ENCORE's edits after the 40th do not enter
    late = slow[0].copy()
    late["efficacy"] = late["efficacy"].where(late["edit"] <= 40, 0.0)
    assert claims.claim_remedy({"m": memit, "e": (late, None)}).verdict == HOLDS
    early = slow[0].copy()
    early["efficacy"] = early["efficacy"].where(early["edit"] > 40, 0.5)
    assert claims.claim_remedy({"m": memit, "e": (early, None)}).verdict == NOT_REPRODUCED
    # another planned length is no pair
    assert claims.claim_remedy({"m": planned(memit, 200), "e": slow}).verdict == NOT_TESTED


def test_a_run_of_another_model_than_the_default_is_named_with_its_model():
    smol, gemma = edit_run("rome", 1.5), edit_run("rome", 3.0)
    smol[0].attrs["model"], gemma[0].attrs["model"] = "smollm2-135m", "gemma3-270m"
    assert claims.run_label(smol[0]) == "ROME 10"
    assert claims.run_label(gemma[0]) == "ROME 10, Gemma-3-270M"
    assert "(ROME 10, Gemma-3-270M)" in claims.claim_norm_growth({"s": smol, "g": gemma}).summary
    pairs = {}
    for model in ("smollm2-135m", "gemma3-270m"):
        for editor, g in (("memit", 1.2), ("encore", 1.05)):
            ds, path = edit_run(editor, g, batch=5)
            pairs[editor + model] = (ds.assign_attrs(model=model), path)
    summary = claims.claim_remedy(pairs).summary
    assert "10 edits in batches of 5 on Gemma-3-270M: ENCORE" in summary
    assert "; 10 edits in batches of 5: ENCORE" in summary  # the default model goes unnamed


def test_the_committed_runs_give_a_verdict_for_every_claim():
    items = claims.verdicts()
    assert [v.claim for v in items] == ["1", "2", "3", "4", "remedy"]
    assert all(v.verdict in (HOLDS, PART, NOT_REPRODUCED, NOT_TESTED) and v.rule for v in items)
    table = claims.verdict_table(items)
    assert list(table.columns) == ["statement", "verdict", "effect sizes"]


def test_the_readme_results_are_the_generated_verdicts():
    from repro.core.paths import ROOT

    text = (ROOT / "README.md").read_text()
    assert claims.readme_block(claims.verdicts()) in text, "README results drifted: python -m repro.reporting.claims --readme"


def _with_second_edited(run, start: float, growth: float):
    """``run`` with its unedited layer 1 turned into an edited one going from ``start`` to start·growth,
    and a new unedited layer 2 at 12."""
    ds, _ = run
    n = int(ds.sizes["edit"])
    norms = np.concatenate([ds["weight_norm"].values, np.full((ds.sizes["step"], 1, 1), 12.0)], axis=1)
    norms[:, 1, 0] = start * growth ** (ds["step"].values / n)
    out = ds.drop_vars(["weight_norm", "edited"]).assign_coords(layer=[0, 1, 2])
    out["weight_norm"] = (("step", "layer", "matrix"), norms)
    out["edited"] = (("layer", "matrix"), np.array([[1], [1], [0]], dtype=np.int8))
    return out, None


def test_a_matrix_above_the_unedited_ones_before_editing_is_reported_not_counted_as_passing_them():
    grows_below = _with_second_edited(edit_run("memit", 1.1), 13.0, 1.1)  # layer 0: 10 -> 11, layer 1: 13 -> 14.3
    v = claims.claim_norm_growth({"a": grows_below})
    row = v.evidence.loc["MEMIT 10"]
    assert row["above before editing"] == "1:mlp_down" and row["far beyond"] == "no" and row["holds"] == "no"
    assert v.verdict == NOT_REPRODUCED and "above every unedited one in 1 run, not counted as passing them: MEMIT 10 (1:mlp_down)." in v.summary
    passes = _with_second_edited(edit_run("memit", 1.5), 13.0, 1.1)  # layer 0: 10 -> 15 passes 12
    v = claims.claim_norm_growth({"a": passes})
    assert v.verdict == HOLDS and v.evidence.loc["MEMIT 10", "passes unedited at"] == 5
    all_above = _with_second_edited(edit_run("memit", 1.1, unedited=9.0), 13.0, 1.1)  # 10 and 13 over 9 and 12
    all_above[0]["weight_norm"][:, 2, 0] = 9.0
    v = claims.claim_norm_growth({"a": all_above})
    row = v.evidence.loc["MEMIT 10"]
    assert row["above before editing"] == "0:mlp_down, 1:mlp_down" and row["far beyond"] == "–"
    assert v.verdict == HOLDS  # nothing to pass: judged on its growth alone
    plain = claims.claim_norm_growth({"a": edit_run("rome", 1.5)})
    assert plain.evidence.loc["ROME 10", "above before editing"] == "" and "before any edit" not in plain.summary
