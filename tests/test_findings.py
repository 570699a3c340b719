"""The generated "What the runs show" text follows the data: on small hand-made run files each
sentence names the runs its stated rule picks, with the files' numbers, and changing the data
changes the sentence."""
from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from repro.reporting import findings as F

CKPT = np.array([0, 5, 10])
SITES = ["resid", "attn", "mlp"]


def run(editor: str = "rome", growth: float = 1.2, layers=(0,), n: int = 10, ppl=(10.0, 10.1, 10.2),
        acc=(0.8, 0.8, 0.8), recall=(1.0, 1.0, 1.0), es=(np.nan, 1.0, 1.0), ns=(np.nan, 0.9, 0.9),
        ge=(5.0, 5.0, 5.0), resid=(1.0, 1.0, 1.0), mlp=(1.0, 1.0, 1.0), overlap=(1.0, 0.99, 0.98),
        cka=(1.0, 0.99, 0.98), efficacy=1.0, delta=10.0, v_steps=10.0, seconds=5.0):
    """A 3-layer model whose ``layers`` have their mlp_down edited, growing from 10 to 10·growth,
    with checkpoint measurements at 0, 5 and 10 edits (activation ratios the same at every layer)."""
    steps = np.arange(0, n + 1)
    norms = np.full((len(steps), 3, 1), 12.0)
    edited = np.zeros((3, 1), dtype=np.int8)
    for l in layers:
        norms[:, l, 0] = 10.0 * growth ** (steps / n)
        edited[l, 0] = 1
    act = np.ones((3, 3, 3))
    act[:, 0, :] = np.asarray(resid)[:, None]
    act[:, 2, :] = np.asarray(mlp)[:, None]
    same = lambda v: np.broadcast_to(np.asarray(v, float)[:, None, None], (3, 3, 3)).copy()  # noqa: E731
    ds = xr.Dataset(
        {"weight_norm": (("step", "layer", "matrix"), norms), "edited": (("layer", "matrix"), edited),
         "efficacy": ("edit", np.full(n, efficacy)), "efficacy_final": ("edit", np.full(n, efficacy)),
         "delta_norm": ("edit", np.full(n, delta)), "v_steps": ("edit", np.full(n, v_steps)),
         "edit_seconds": ("edit", np.full(n, seconds)),
         "perplexity": ("ckpt", np.asarray(ppl, float)), "task_mean_acc": ("ckpt", np.asarray(acc, float)),
         "task_acc": (("ckpt", "task"), np.stack([acc, acc], axis=1).astype(float)),
         "recall": ("ckpt", np.asarray(recall, float)), "es": ("ckpt", np.asarray(es, float)),
         "ps": ("ckpt", np.asarray(es, float)), "ns": ("ckpt", np.asarray(ns, float)),
         "gen_entropy_mean": ("ckpt", np.asarray(ge, float)),
         "act_norm": (("ckpt", "site", "layer"), act),
         "subspace_overlap": (("ckpt", "site", "layer"), same(overlap)), "cka": (("ckpt", "site", "layer"), same(cka)),
         "act_cosine": (("ckpt", "site", "layer"), same(cka))},
        coords={"step": steps, "layer": [0, 1, 2], "matrix": ["mlp_down"], "edit": np.arange(1, n + 1),
                "ckpt": CKPT, "site": SITES, "task": ["sentiment", "news_topic"]},
        attrs={"editor": editor, "params": json.dumps({"n_edits": n, "batch_size": 1}),
               "measure_params": json.dumps({"n_gen": 8, "gen_tokens": 100})})
    return ds, None


def line(text: str, start: str) -> str:
    hits = [l for l in text.splitlines() if l.startswith(start)]
    assert hits, f"no line starting {start!r} in\n{text}"
    return hits[0]


def test_join_and_edited_label():
    assert F.join([]) == "none" and F.join(["a"]) == "a" and F.join(["a", "b", "c"]) == "a, b and c"
    assert F.edited_label(run(layers=(0, 1, 2))[0]) == "layers 0–2 mlp_down"
    assert F.edited_label(run(layers=(0, 2))[0]) == "layers 0, 2 mlp_down"
    assert F.edited_label(run()[0]) == "layer 0 mlp_down"


def test_measurement_note_reads_the_checkpoints():
    assert F.measurement_note({"a": run(), "b": run("memit")}) == (
        "The 2 runs of 10 edits are measured before the first edit and after 5 and 10 edits.")


def test_downstream_damage_follows_the_rule_and_the_data():
    healthy, broken = run("rome"), run("mend", growth=2.0, ppl=(10, 20, 40), recall=(1, 0.8, 0.5))
    text = F.downstream_findings({"a": healthy, "b": broken})
    dmg = line(text, "- **Damaging**")
    assert "(1 of 2 runs): MEND: perplexity 40.0 (10.0, ×4.00), recall 0.50 (1.00)" in dmg
    assert "by perplexity and recall" in dmg and "ROME" not in dmg
    assert "ROME: perplexity 10.2" in line(text, "- **Within the rule's bounds**")
    # the same ROME run with a perplexity 6 % up is damaging by the rule
    text = F.downstream_findings({"a": run("rome", ppl=(10, 10.3, 10.6)), "b": broken})
    assert "(2 of 2 runs)" in line(text, "- **Damaging**")
    assert "(0 of 2): none" in line(text, "- **Within the rule's bounds**")
    assert "MEND (10.0, 20.0, 40.0) and ROME (10.0, 10.3, 10.6)" in line(text, "- **Perplexity rises at every checkpoint**")


def test_downstream_growth_order_within_runs_on_the_same_matrices():
    same = F.downstream_findings({"a": run("rome", growth=1.3, ppl=(10, 10, 11)),
                                  "b": run("r-rome", growth=1.1, ppl=(10, 10, 10.5))})
    assert "(the same order)" in line(same, "- **Growth against")
    flipped = F.downstream_findings({"a": run("rome", growth=1.3, ppl=(10, 10, 10.5)),
                                     "b": run("r-rome", growth=1.1, ppl=(10, 10, 11))})
    assert "ρ = -1.00" in line(flipped, "- **Growth against")
    # runs on different matrices are not compared
    apart = F.downstream_findings({"a": run("rome"), "b": run("memit", layers=(1, 2))})
    assert "- **Growth against" not in apart


def test_edit_quality_forgetting_rule():
    kept, forgot = run("rome"), run("ft-m", es=(np.nan, 1.0, 0.9), ns=(np.nan, 0.9, 0.7), ge=(5.0, 3.0, 4.0))
    text = F.edit_quality_findings({"a": kept, "b": forgot})
    assert "(1 of 2 runs): FT-M ES 1.00 → 0.90" in line(text, "- **Earlier edits forgotten**")
    assert "ROME ES 1.00 → 1.00" in line(text, "- **Efficacy holds")
    assert "from the first checkpoint after editing began (5 edits) to the last (10)" in text
    assert "FT-M 4.00 (3.00 after 5 edits), ROME 5.00." in line(text, "- **Generation entropy**")
    # a fall just under the threshold is not forgetting
    text = F.edit_quality_findings({"b": run("ft-m", es=(np.nan, 1.0, 0.96))})
    assert "(0 of 1 runs): none" in line(text, "- **Earlier edits forgotten**")
    assert F.generation_note(kept[0]) == "each checkpoint's generation entropy is a mean over 8 continuations of 100 tokens"


def test_activation_norms_fall_rise_or_stay():
    runs = {"a": run("ft-m", resid=(1, 0.99, 0.98)), "b": run("rome"), "c": run("mend", resid=(1, 1.1, 1.2), mlp=(1, 2, 3))}
    text = F.activation_norm_findings(runs)
    assert "(1 of 3 runs): FT-M 0.980 (lower at 3 of 3 layers" in line(text, "- **Fall**")
    assert "ROME 1.000" in line(text, "- **Within 1 %")
    rise = line(text, "- **Rise**")
    assert "MEND 1.200" in rise and "MLP output up to ×3.00" in rise
    assert "in 1 of 3 runs (×1.000 to ×3.000)" in line(text, "- The **MLP output**")
    # the same FT-M run at 0.995 is within the band, not a fall
    text = F.activation_norm_findings({"a": run("ft-m", resid=(1, 1, 0.995))})
    assert "(0 of 1 runs): none" in line(text, "- **Fall**")


def test_subspaces_rule_and_steadiness():
    runs = {"a": run("rome", overlap=(1, 0.95, 0.9), cka=(1, 0.9, 0.8)),
            "b": run("lora", overlap=(1, 0.97, 0.96), cka=(1, 0.5, 0.7)),
            "c": run("encore", layers=(1, 2), overlap=(1, 0.99, 0.99), cka=(1, 0.99, 0.95))}
    table = F.subspace_frame(runs)
    assert list(table.index) == ["ENCORE", "ROME", "LoRA"]  # by mean CKA, highest first
    assert table.loc["ROME", "overlap"] == pytest.approx(0.9)
    text = F.subspace_findings(runs)
    assert line(text, "- **Moved by that rule**").startswith("- **Moved by that rule** (1 of 3 runs): ROME (0.900)")
    steady = line(text, "- **Mean CKA falls at every checkpoint**")
    assert "for ENCORE and ROME; not for LoRA (CKA 0.50, 0.70 after 5, 10 edits" in steady
    assert "most moved**: LoRA (0.700)" in line(text, "- **Least moved**")
    assert "layer 0 mlp_down: ROME 0.800, LoRA 0.700" in line(text, "- **Runs that edit the same matrices**")


def test_remedy_compares_the_two_runs():
    memit = run("memit", growth=1.03, layers=(1, 2), delta=25.0, v_steps=16, seconds=13.0, efficacy=0.97,
                ge=(5.7, 5, 4.6), cka=(1, 0.99, 0.97))
    encore = run("encore", growth=1.01, layers=(1, 2), delta=15.0, v_steps=10, seconds=8.0, efficacy=0.92,
                 ge=(5.7, 5.5, 5.8), cka=(1, 0.995, 0.99))
    text = F.remedy_findings(memit[0], encore[0])
    assert "ENCORE's edited matrices end within 1.0 %" in text and "MEMIT's within 3.0 %" in text
    assert "14.6" not in text and "15.0 for ENCORE against 25.0 for MEMIT" in text
    assert "so ENCORE is the faster editor" in text
    assert "0.92 of ENCORE's edits hold right after their batch against MEMIT's 0.97 (MEMIT ahead)" in text
    assert ("ENCORE ends closer to the unedited model on 2 of 6 (generation entropy and residual CKA), MEMIT on 0 "
            "(none), equal on perplexity, recall of never-edited facts, mean task accuracy and residual-stream norm "
            "ratio.") in text
    assert "generation entropy 5.80 vs 4.60 (5.70)" in text
    slow = run("encore", growth=1.01, layers=(1, 2), seconds=20.0, efficacy=0.99)
    text = F.remedy_findings(memit[0], slow[0])
    assert "so MEMIT is the faster editor" in text and "(ENCORE ahead)" in text
    worse = run("encore", growth=1.01, layers=(1, 2), ppl=(10, 11, 12))  # ENCORE's perplexity now rises more
    assert "MEMIT on 1 (perplexity)" in F.remedy_findings(memit[0], worse[0])


def eff_run(editor: str, es, ps=None, ns=None):
    n = len(es)
    ds = xr.Dataset({"es": ("fact", np.asarray(es, float)), "ps": ("fact", np.asarray(ps if ps is not None else es, float)),
                     "ns": ("fact", np.asarray(ns if ns is not None else np.ones(n), float)),
                     "edit_seconds": ("fact", np.ones(n))}, coords={"fact": np.arange(n)}, attrs={"editor": editor})
    return ds, None


def test_single_edit_expected_level_follows_the_scores():
    runs = {"a": eff_run("rome", [1, 1, 1, 1]), "b": eff_run("r-rome", [1, 1, 1, 0]), "c": eff_run("mend", [1, 1, 1, 1], ns=[0, 0, 0, 1])}
    text = F.single_edit_findings(runs, held=("rome", "r-rome"))
    assert text.startswith("1 of the 2 editors expected to reach ES ≥ 0.90 do: ROME (ES 1.00). 1 do not")
    assert "**r-ROME, ES 0.75**" in text and "MEND ES 1.00, paraphrase PS 1.00, neighborhood NS 0.25" in text
    runs["b"] = eff_run("r-rome", [1] * 10 + [0])  # 10 of 11: 0.91, above the expected level
    assert F.single_edit_findings(runs, held=("rome", "r-rome")).startswith("2 of the 2 editors")


def key_file(opens, differs, cosine, es):
    ka = xr.Dataset({"subject_opens": ("fact", np.asarray(opens, np.int8)), "last_token_differs": ("fact", np.asarray(differs, np.int8)),
                     "cosine": ("fact", np.asarray(cosine, float)), "share": ("fact", np.asarray(cosine, float))},
                    attrs={"es_editors": json.dumps(list(es))})
    for e, v in es.items():
        ka[f"es_{e}"] = ("fact", np.asarray(v, float))
    return ka


def test_key_agreement_text_follows_the_misses():
    opens, differs, cos = [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0.1, 0.8, 0.95, 0.97, 0.99]
    ka = key_file(opens, differs, cos, {"r-rome": [0, 0, 1, 1, 1], "rome": [1, 1, 1, 1, 1]})
    first, second = F.key_agreement_findings(ka)
    assert "Every miss of the 1 editors" in first and "on the 2 facts with the subject inside the prompt they reach ES 1.00" in first
    assert first.endswith("missed by ROME.")
    assert second.startswith("1 of the 3 subjects opening the prompt have a last token that changes without the leading "
                             "space; r-ROME misses 1 of them (key cosine 0.10, 10 % of the update")
    assert "Its other 1 misses have key cosines 0.80, 0 of them below the median of the opening subjects (0.80;" in second
    # a miss inside the prompt changes the first sentence
    ka = key_file(opens, differs, cos, {"r-rome": [0, 0, 1, 0, 1], "rome": [1, 1, 1, 1, 1]})
    assert "r-ROME 1 are on facts with the subject inside the prompt" in F.key_agreement_findings(ka)[0]


def tuning_run(editor, es, overrides=None, cases=(1, 2, 3, 4), steps=(5, 6, 7, 8), model="smollm2-135m"):
    return xr.Dataset({"es": ("fact", np.asarray(es, float)), "case_id": ("fact", np.asarray(cases)),
                       "v_steps": ("fact", np.asarray(steps, float))},
                      attrs={"editor": editor, "model": model, "params": json.dumps({"hparams": overrides or {}})})


def test_tuning_text_compares_the_missed_facts():
    files = {"base": tuning_run("encore", [1, 0, 0, 1]), "nw5": tuning_run("encore", [1, 0, 0, 1], {"norm_weight": 5}),
             "memit": tuning_run("memit", [1, 0, 1, 1])}
    text = F.tuning_findings(files)
    assert "ENCORE (defaults) ES 0.50; ENCORE (norm_weight 5) ES 0.50; MEMIT (defaults) ES 0.75" in text
    assert "miss the same 2 facts (case ids 2, 3); the first stops its value optimisation on them after 6-7 steps" in text
    assert "MEMIT (defaults) misses 1 of them" in text
    files["nw5"] = tuning_run("encore", [1, 1, 0, 1], {"norm_weight": 5})
    assert "miss the same" not in F.tuning_findings(files)


def test_tuning_text_keeps_models_apart():
    """Checks on another model form their own item, named by the model, even on equal case ids."""
    files = {"a": tuning_run("memit", [1, 0, 1, 1]),
             "g": tuning_run("memit", [1, 1, 1, 1], {"post_norm_targets": False}, model="gemma3-270m")}
    items = F.tuning_findings(files).splitlines()
    assert len(items) == 2
    assert items[0].startswith("- 4 facts of SmolLM2-135M (`a`)") and "ES 0.75" in items[0]
    assert items[1].startswith("- 4 facts of Gemma-3-270M (`g`)") and "MEMIT (post_norm_targets off) ES 1.00" in items[1]


def post_run(ratio: float, wd: float = 0.0, lr: float = 1e-4, intervention: str = "full_ft", shrink_b: bool = False):
    """Two layers × two matrix types, every matrix trained; norms from 10 to 10·ratio (type "b" to
    10/ratio when ``shrink_b``), ΔW orthogonal-ish (‖ΔW‖ = 0.1), 3 recording steps."""
    steps = np.array([0, 10, 20])
    w = np.ones((3, 2, 2)) * 10.0
    w *= np.linspace(1.0, ratio, 3)[:, None, None]
    if shrink_b:
        w[:, :, 1] = 10.0 / np.linspace(1.0, ratio, 3)[:, None]
    d = np.zeros((3, 2, 2))
    d[1:] = 0.1
    ds = xr.Dataset({"weight_norm": (("step", "layer", "matrix"), w), "delta_norm": (("step", "layer", "matrix"), d),
                     "trained": (("layer", "matrix"), np.ones((2, 2), dtype=np.int8)),
                     "train_loss": ("opt_step", np.linspace(3, 1, 20)), "lr": ("opt_step", np.full(20, lr)),
                     "eval_ppl": ("eval_step", [40.0, 50.0]), "task_acc": ("eval_step", [0.0, 0.8])},
                    coords={"step": steps, "layer": [0, 1], "matrix": ["attn_q", "mlp_up"]},
                    attrs={"intervention": intervention, "device": "cpu",
                           "params": json.dumps({"intervention": intervention, "weight_decay": wd, "lr": lr, "seq_len": 64})})
    return ds, None


def test_post_training_text_follows_the_rule_and_the_settings():
    runs = {"ref": post_run(1.001), "fast": post_run(1.003, lr=3e-4), "decay": post_run(0.998, wd=0.1)}
    text = F.post_training_findings(runs)
    assert text.startswith("3 runs of 20 optimizer steps each (device: cpu).")
    free = line(text, "- **Without weight decay**")
    assert "2 of 2 runs grow their matrices" in free and "growth +0.1000 %, 100% of the matrices grown" in free
    variants = line(text, "- **Variants")
    assert "learning rate 0.0003 against 0.0001: ‖ΔW‖/‖W_0‖ ×1.0, growth − 1 ×3.0" in variants
    assert "weight decay 0.1 against 0: ‖ΔW‖/‖W_0‖ ×1.0 (growth -0.2000 % against +0.1000 %)" in variants
    decay = line(text, "- **Weight decay 0.1**")
    assert "×0.99800" in decay and "(1 − lr_t·wd) over the 20 steps, ×0.99980" in decay and decay.endswith("it does not grow.")
    assert "(64 tokens) 40.0 → 50.0 (0.00 → 0.80)" in line(text, "- **Held-out")
    # half the matrices shrinking: growth ~1 and 50 % grown -> the rule's boundary; a type that shrinks is named
    mixed = F.post_training_findings({"m": post_run(1.01, shrink_b=True)})
    assert "shrank on average: up" in mixed


def test_bounded_update_note_reads_the_bound_and_the_run():
    bounded, free = run("ft-l", growth=1.001, efficacy=0.3), run("rome", growth=1.5)
    bounded[0].attrs["hparams"] = json.dumps({"norm_constraint": 5e-4})
    text = F.bounded_update_findings({"a": bounded, "b": free})
    assert text.startswith("FT-L bounds every weight's change by ε = 0.0005 (L∞): its edited matrices grow ×1.0010 and "
                           "0.30 of its edits succeed")
    assert text.endswith("The largest growth here is ×1.50 (ROME), after 10 edits.")
    assert "bounds" not in F.bounded_update_findings({"b": free})


def test_layer_choice_note_checks_the_edited_layer():
    runs = {"a": run("rome", layers=(1,)), "b": run("r-rome", layers=(1,)), "c": run("memit", layers=(1, 2))}
    assert F.layer_choice_note(1, runs) == "The sequential runs of ROME and r-ROME edit layer 1, as their files record."
    assert F.layer_choice_note(2, runs) == "The sequential runs of ROME (layer 1) and r-ROME (layer 1) edit another layer than the best by S."
    assert F.layer_choice_note(1, {"c": runs["c"]}) == ""


# -- at length --------------------------------------------------------------------------------
def long_run(status="in progress", collapse=-1, **kw):
    ds, _ = run(**kw)
    ds.attrs.update({"model": "smollm2-135m", "stop_reason": status})
    ds["collapse_edit"] = ((), collapse)
    ds["probe_ppl"] = ("edit", np.linspace(12.0, 24.0, ds.sizes["edit"]))
    ds["probe_ppl"].attrs["unedited"] = 12.0
    return ds, None


def test_long_run_findings_follow_the_files():
    calm = {"a": long_run(editor="rome", growth=1.01)}
    text = F.long_run_findings(calm)
    item = line(text, "- **ROME**")
    assert "SmolLM2-135M, 10 of 10 edits, in progress" in item and "growth ×1.01" in item
    assert "no edited matrix passes the largest unedited one" in item  # 10.1 stays below the unedited 12
    assert "the collapse rule has not held (probe perplexity ×2.00" in item
    assert "does not damage the model" in item and "keeps them" in item
    assert "does not fall" in item and "not moved" in item
    assert "1 of the 1 runs are still going" in text
    assert line(text, "Over the 1 long run").startswith("Over the 1 long run with checkpoints: 0 of 1 damage")

    # the same run grown past the unedited matrices, damaged, forgetting, its activations changed, collapsed
    worse = {"a": long_run(editor="rome", growth=2.0, status="collapsed", collapse=7, ppl=(10.0, 11.0, 30.0),
                           es=(np.nan, 1.0, 0.5), resid=(1.0, 0.9, 0.8), overlap=(1.0, 0.9, 0.5))}
    text = F.long_run_findings(worse)
    item = line(text, "- **ROME**")
    assert "collapsed" in item and "the collapse rule first held at edit 7" in item
    assert "passes every unedited matrix of its type after edit" in item
    assert "damages the model (perplexity)" in item and "forgets earlier edits" in item
    assert "×0.800: falls" in item and "subspace overlap 0.50: moved" in item
    assert "runs are still going" not in text
    assert "1 of 1 damage the model and 1 of 1 forget" in text and "held in 1 of 1 runs" in text


def test_long_run_findings_without_runs_or_checkpoints():
    assert F.long_run_findings({}) == "No long run has started yet."
    ds, _ = long_run()
    early = ds.isel(ckpt=slice(0, 1))
    text = F.long_run_findings({"a": (early, None)})
    assert "no checkpoint after editing began yet" in text and "Over the" not in text


def test_remedy_at_length_pairs_runs_and_compares_them_over_the_edits_both_made():
    from repro.reporting.tables import remedy_pairs

    def long_pair_run(editor, n, status, collapse=-1, **kw):
        ds, _ = long_run(editor=editor, n=n, status=status, collapse=collapse, **kw)
        return ds.assign_attrs(params=json.dumps({"n_edits": 10, "batch_size": 1})), None

    # MEMIT collapsed after 5 of 10 planned edits, ENCORE still going at 10: compared at 5
    memit = long_pair_run("memit", 5, "collapsed", collapse=4, growth=1.2 ** 0.5, efficacy=0.9,
                          ppl=(10.0, 30.0, 30.0))
    encore = long_pair_run("encore", 10, "in progress", growth=1.21, efficacy=0.5, ppl=(10.0, 10.5, 11.0))
    memit[0]["ckpt"] = CKPT  # checkpoints 0 and 5 made; the 10 one is cut off below
    memit = (memit[0].isel(ckpt=slice(0, 2)), None)
    other = long_pair_run("encore", 10, "in progress")
    other[0].attrs["params"] = json.dumps({"n_edits": 10, "batch_size": 2})  # another batch size: no partner
    pairs = remedy_pairs({"m": memit, "e": encore, "o": other, "r": long_run(editor="rome")})
    assert [label for label, _ in pairs] == ["SmolLM2-135M: 10 edits in batches of 1"]
    assert pairs[0][1]["encore"] is encore and pairs[0][1]["memit"] is memit

    text = F.remedy_at_length_findings(encore[0], memit[0])
    assert text.startswith("MEMIT stopped after 5 edits (collapsed), the collapse rule first held at edit 4; "
                           "ENCORE is still going at 10 of 10 edits, the collapse rule never held.")
    assert "Over the 5 edits both have made, ENCORE's edited matrices grew ×1.100 against MEMIT's ×1.095" in text
    assert "efficacy right after each batch averages 0.50 against 0.90" in text
    # the probe rises from 12 to 24 over each run's own edits: ENCORE's 5th of 10, MEMIT's last of 5
    assert f"×{np.linspace(12, 24, 10)[4] / 12:.2f} of the unedited model's perplexity against ×2.00" in text
    done = F.remedy_at_length_findings(encore[0].assign_attrs(stop_reason="completed"), memit[0])
    assert "; ENCORE made all 10 edits, the collapse rule never held." in done
    assert "after 5 edits (ENCORE against MEMIT): perplexity 10.5 against 30.0 (unedited 10.0)" in text
    # both fixtures score 1.0 over the facts edited so far at checkpoint 5: only the efficacy right after differs
    assert ("right after each batch ENCORE is 0.40 below MEMIT (the remedy's rule judges this one); over the facts "
            "edited so far, at 5 edits, it is level with MEMIT.") in text
    assert "less firmly" not in text


def test_efficacy_tradeoff_names_which_side_each_efficacy_favours():
    text = F.efficacy_tradeoff(-0.08, 0.2, 1000)
    assert "ENCORE is 0.08 below MEMIT" in text and "at 1,000 edits, it is 0.20 above MEMIT" in text
    assert "less firmly but keeps more of the earlier edits" in text
    assert "more firmly but keeps fewer" in F.efficacy_tradeoff(0.1, -0.1, 10)
    both = F.efficacy_tradeoff(0.1, 0.1, 10)
    assert "0.10 above MEMIT (the remedy" in both and "firmly" not in both and "both counts" not in both
    below = F.efficacy_tradeoff(-0.15, -0.09, 1000)
    assert "at 1,000 edits, it is 0.09 below MEMIT" in below and "below MEMIT on both counts" in below
    assert "less firmly but keeps more" not in below and "more firmly but" not in below
