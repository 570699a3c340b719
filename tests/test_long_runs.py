"""What long sequential runs need: edit quality over a fixed-size sample of the edited facts,
checkpoints at chosen edit counts, and the collapse rule (recorded, and stopping the run cleanly).
Runs use the tiny random model (``tiny_dir``); the rules themselves are tested on plain arrays."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from repro.runs import sequential as experiment
from repro.runs.sequential import SequentialParams, run_sequential
from repro.measure.collapse import CollapseParams, collapsed_for, first_collapse
from repro.measure.quality import estimate, quality_sample

CHEAP = {"layer": 1, "v_steps": 2, "stats_tokens": 2000, "n_prefix_short": 1, "n_prefix_long": 1}
SMALL = {"n_test": 4, "n_recall": 6, "ppl_tokens": 256, "ppl_ctx": 64, "n_gen": 2, "gen_tokens": 8,
         "probe_edit": 3, "probe_general": 2, "probe_max_length": 12, "k": 3, "pca_points": 10}


def params(tmp_path, tiny_dir, **kw):
    base = dict(model=tiny_dir, editor="r-rome", n_edits=5, measure_every=0, checkpoint_every=1,
                output=str(tmp_path / "run.nc"), hparams=CHEAP)
    base.update(kw)
    return SequentialParams(**base)


# -- the quality sample -------------------------------------------------------------------------
def test_quality_sample_is_all_facts_until_the_budget_then_first_plus_seeded_rest():
    assert list(quality_sample(7)) == list(range(7))  # no sample asked: every fact
    assert list(quality_sample(5, first=3, sample=2)) == [0, 1, 2, 3, 4]  # within budget: all
    got = quality_sample(1000, first=100, sample=200, seed=4)
    assert len(got) == 300 and len(set(got)) == 300
    assert list(got[:100]) == list(range(100)) and got.max() < 1000 and (np.diff(got) > 0).all()
    np.testing.assert_array_equal(got, quality_sample(1000, first=100, sample=200, seed=4))
    assert not np.array_equal(got, quality_sample(1000, first=100, sample=200, seed=5))
    with pytest.raises(ValueError):
        quality_sample(10, first=-1)


def test_estimate_weights_each_part_by_the_facts_it_stands_for():
    vals = np.full(10, np.nan)
    vals[:2] = 1.0  # first block: 2 facts, all succeed
    vals[[4, 7]] = [0.0, 0.0]  # 2 sampled of the 8 others, both fail
    assert estimate(vals, 10, first=2) == pytest.approx(0.2)  # (2*1 + 8*0) / 10, not the plain 0.5
    full = np.array([1.0, 0.0, 1.0, 1.0])
    assert estimate(full, 4, first=2) == pytest.approx(0.75)  # every fact scored: the plain mean


# -- the collapse rule -------------------------------------------------------------------------------
def test_first_collapse_and_streak_length():
    done = np.array([10, 20, 30, 40, 50])
    assert first_collapse(done, [0, 0, 0, 0, 0]) == -1
    assert first_collapse(done, [0, 1, 0, 1, 1]) == 20
    assert collapsed_for(done, [0, 1, 0, 1, 1]) == 10  # collapsed again since 40, last probe 50
    assert collapsed_for(done, [1, 1, 1, 1, 1]) == 40
    assert collapsed_for(done, [1, 1, 1, 1, 0]) is None
    assert "10x" in CollapseParams().rule()
    for bad in ({"factor": 1.0}, {"factor": float("inf")}, {"probe_tokens": 2}, {"patience": -1}):
        with pytest.raises(ValueError):
            CollapseParams(**bad)


# -- runs ----------------------------------------------------------------------------------------
def test_checkpoints_at_chosen_counts_with_a_sampled_quality(tmp_path, tiny_dir):
    p = params(tmp_path, tiny_dir, measure_at=[1, 4],
               measure=dict(SMALL, parts=["quality"], quality_first=1, quality_sample=1))
    ds = run_sequential(p, progress=False)
    assert list(ds["ckpt"].values) == [0, 1, 4, 5]
    scored = ds["fact_es"].notnull().sum("edit")
    assert list(scored.values) == [0, 1, 2, 2] and list(ds["quality_n"].values) == [0, 1, 2, 2]
    assert bool(ds["fact_es"].sel(ckpt=4, edit=1).notnull())  # the first edit is always followed
    assert ds.attrs["stop_reason"] == "completed" and int(ds["collapse_edit"]) == -1
    assert ds["probe_ppl"].notnull().all() and float(ds["probe_ppl"].attrs["unedited"]) > 0


@pytest.mark.parametrize("bad", [[0], [6], [2.5]])
def test_measure_at_outside_the_run_is_rejected(tmp_path, tiny_dir, bad):
    with pytest.raises(ValueError, match="measure_at"):
        run_sequential(params(tmp_path, tiny_dir, measure_at=bad))


def _sabotage(monkeypatch, at_call: int, how):
    """Make the editor's ``at_call``-th apply damage the model after editing."""
    real = experiment.make_editor

    def wrapped(*a, **k):
        editor = real(*a, **k)
        apply, calls = editor.apply, []

        def damaged(reqs):
            out = apply(reqs)
            calls.append(1)
            if len(calls) == at_call:
                how(editor.lm)
            return out

        editor.apply = damaged
        return editor

    monkeypatch.setattr(experiment, "make_editor", wrapped)


def test_non_finite_weights_stop_the_run_with_its_file_written(tmp_path, tiny_dir, monkeypatch):
    def poison(lm):
        with torch.no_grad():
            lm.spec.weight(lm.model, 1, lm.spec.mlp_out)[0, 0] = float("nan")

    _sabotage(monkeypatch, 2, poison)
    p = params(tmp_path, tiny_dir, measure_at=[1, 3], measure=dict(SMALL, parts=["quality"]))
    ds = run_sequential(p, progress=False)
    assert ds.attrs["stop_reason"] == "non-finite" and int(ds.attrs["n_edits_done"]) == 2
    assert ds.sizes["edit"] == 2 and int(ds["collapse_edit"]) == 2
    assert list(ds["collapsed"].values) == [0, 1]
    # the metrics of the non-finite model are missing, never numbers computed from NaN
    assert np.isnan(float(ds["nll_new"][1])) and np.isnan(float(ds["efficacy"][1]))
    assert bool(ds["efficacy_final"].isnull().all()) and float(ds["efficacy"][0]) in (0.0, 1.0)
    assert list(ds["ckpt"].values) == [0, 1]  # no measurement of the broken model
    assert not (tmp_path / "run.nc.state.pt").exists()


def test_collapsed_model_stops_after_the_patience(tmp_path, tiny_dir, monkeypatch):
    def sharpen(lm):  # confident, wrong logits: the probe perplexity explodes
        with torch.no_grad():
            lm.model.model.norm.weight.mul_(50.0)

    _sabotage(monkeypatch, 2, sharpen)
    p = params(tmp_path, tiny_dir, n_edits=8, collapse={"patience": 2})
    ds = run_sequential(p, progress=False)
    assert int(ds["collapse_edit"]) == 2 and ds.attrs["stop_reason"] == "collapsed"
    assert ds.sizes["edit"] == 4  # collapsed at edit 2, still collapsed 2 edits later
    ref = float(ds["probe_ppl"].attrs["unedited"])
    assert float(ds["probe_ppl"][0]) < 10 * ref < float(ds["probe_ppl"][1])
    assert "patience" not in ds.attrs["collapse_rule"] and "2 edits" in ds.attrs["collapse_rule"]


def test_resume_state_from_before_a_new_parameter_still_resumes():
    current = SequentialParams(n_edits=7).as_dict()
    older = {k: v for k, v in current.items() if k not in ("measure_at", "collapse")}
    assert experiment.same_params(older, current)  # new parameters at their defaults
    assert not experiment.same_params(older, dict(current, measure_at=[5]))
    assert not experiment.same_params(dict(older, n_edits=8), current)


def test_a_run_whose_output_is_being_written_is_refused(tmp_path, tiny_dir):
    from repro.core import store

    p = params(tmp_path, tiny_dir)
    with store.RunLock(p.output):  # as if another process were writing this run
        with pytest.raises(RuntimeError, match="being written by pid"):
            run_sequential(p, progress=False)
    with pytest.raises(ValueError, match="overwrite"):
        run_sequential(p, overwrite="flase", progress=False)


def test_a_damaged_state_file_is_set_aside_and_the_run_starts_over(tmp_path, tiny_dir, caplog):
    from repro.core import store

    p = params(tmp_path, tiny_dir, n_edits=2)
    state = store.state_path(p.output)
    state.write_bytes(b"PK\x03\x04 truncated")
    with caplog.at_level("WARNING"):
        ds = run_sequential(p, progress=False)
    assert ds.sizes["edit"] == 2 and ds.attrs["stop_reason"] == "completed"
    aside = state.with_name(state.name + ".damaged")
    assert aside.read_bytes() == b"PK\x03\x04 truncated" and not state.exists()
    assert any("run.nc.state.pt cannot be read" in r.message and "moved aside" in r.message for r in caplog.records)


def test_crossing_edit_is_where_an_edited_matrix_passes_the_largest_unedited_one():
    import xarray as xr

    from repro.reporting.tables import crossing_edit

    norms = np.zeros((4, 3, 1))
    norms[:, 0, 0] = [10.0, 11.0, 12.0, 13.0]  # edited layer 0
    norms[:, 1, 0] = 11.5  # the largest unedited layer
    norms[:, 2, 0] = 9.0
    ds = xr.Dataset({"weight_norm": (("step", "layer", "matrix"), norms),
                     "edited": (("layer", "matrix"), np.array([[1], [0], [0]], dtype=np.int8))},
                    coords={"step": [0, 10, 100, 1000], "layer": [0, 1, 2], "matrix": ["mlp_down"]})
    assert crossing_edit(ds) == 100
    ds["weight_norm"][:, 1, 0] = 20.0
    assert crossing_edit(ds) == -1


def test_long_growth_figure_marks_crossing_and_collapse():
    import json

    import matplotlib

    matplotlib.use("Agg")
    import xarray as xr

    from repro.reporting.figures import long_runs, plot_long_norm_growth

    def run(editor, n, growth, collapse):
        steps = np.array([0, 10, 100, 1000][: 2 + (n >= 1000) * 2])
        norms = np.ones((len(steps), 2, 1)) * 10.0
        norms[:, 0, 0] = 10.0 * growth ** (steps / steps[-1])
        ds = xr.Dataset({"weight_norm": (("step", "layer", "matrix"), norms),
                         "edited": (("layer", "matrix"), np.array([[1], [0]], dtype=np.int8)),
                         "collapse_edit": ((), collapse)},
                        coords={"step": steps, "layer": [0, 1], "matrix": ["mlp_down"]},
                        attrs={"editor": editor, "params": json.dumps({"n_edits": n, "batch_size": 1})})
        return ds, None

    runs = {"a": run("rome", 1000, 3.0, 100), "b": run("memit", 1000, 1.0, -1), "c": run("ft-m", 10, 2.0, -1)}
    assert set(long_runs(runs)) == {"a", "b"}
    ax = plot_long_norm_growth(long_runs(runs))
    marks = [line for line in ax.lines if line.get_marker() in ("o", "X") and len(line.get_xdata())]
    assert sorted((line.get_marker(), float(line.get_xdata()[0])) for line in marks) == [("X", 100.0), ("o", 10.0)]
    assert ax.get_xscale() == "log"


def test_snapshot_of_an_interrupted_run_shows_its_progress_and_is_not_taken_for_done(tmp_path, tiny_dir,
                                                                                     monkeypatch, interrupt_at):
    from repro.runs.sequential import progress_path, snapshot
    from repro.core.store import read_netcdf

    p = params(tmp_path, tiny_dir, n_edits=4, measure_at=[2],
               measure=dict(SMALL, parts=["quality"]))
    assert snapshot(p.output) is None  # nothing started: no view
    real = interrupt_at(experiment, 4)
    with pytest.raises(KeyboardInterrupt):
        run_sequential(p, progress=False)
    monkeypatch.setattr(experiment, "make_editor", real)
    view = snapshot(p.output)
    path = progress_path(p.output)
    assert path.exists() and path != experiment.from_root(p.output) and not experiment.from_root(p.output).exists()
    assert view.attrs["stop_reason"] == "in progress" and view.attrs["n_edits_done"] == 3
    assert view.sizes["edit"] == 3 and list(view["step"].values) == [0, 1, 2, 3]
    assert list(view["ckpt"].values) == [0, 2] and view["efficacy_final"].isnull().all()
    full = run_sequential(p, progress=False)  # the run resumes and finishes unaffected by the view
    assert full.attrs["stop_reason"] == "completed" and full.sizes["edit"] == 4
    np.testing.assert_allclose(read_netcdf(path)["weight_norm"].values, full["weight_norm"].values[:4], rtol=1e-6)
    np.testing.assert_array_equal(view["nll_new"].values, full["nll_new"].values[:3])


def _long_file(editor, n_done, planned, growth, batch=1, stop="completed", probe_last=13.0):
    """A hand-made long-run file: one edited matrix growing geometrically, one unedited at 12."""
    import json

    import xarray as xr

    steps = np.arange(0, n_done + 1, batch)
    norms = np.ones((len(steps), 2, 1)) * 12.0
    norms[:, 0, 0] = 10.0 * growth ** (steps / n_done)
    probe = np.full(n_done, 13.0)
    probe[-1] = probe_last
    ds = xr.Dataset({"weight_norm": (("step", "layer", "matrix"), norms),
                     "edited": (("layer", "matrix"), np.array([[1], [0]], dtype=np.int8)),
                     "edit_seconds": ("edit", np.full(n_done, 2.5)),
                     "probe_ppl": ("edit", probe), "collapse_edit": ((), -1)},
                    coords={"step": steps, "layer": [0, 1], "matrix": ["mlp_down"], "edit": np.arange(1, n_done + 1)},
                    attrs={"editor": editor, "stop_reason": stop, "devices_by_segment": '["cpu"]',
                           "segment_starts": "[0]", "params": json.dumps({"n_edits": planned, "batch_size": batch})})
    ds["probe_ppl"].attrs["unedited"] = 13.0
    return ds, None


def test_long_run_table_reads_growth_crossing_and_status_from_the_files():
    import pandas as pd

    from repro.reporting.tables import growth_at, long_run_table

    runs = {"a": _long_file("rome", 1000, 3000, 4.0, stop="in progress", probe_last=130.0),
            "b": _long_file("memit", 3000, 3000, 1.1, batch=10)}
    assert growth_at(runs["a"][0], 1000) == pytest.approx(4.0)
    assert np.isnan(growth_at(runs["a"][0], 3000))  # not reached yet
    table = long_run_table(runs)
    a, b = table.loc["ROME"], table.loc["MEMIT, batches of 10"]
    assert a["status"] == "in progress" and a["edits"] == "1,000/3,000" and b["status"] == "completed"
    assert a["growth @1,000"] == pytest.approx(4.0) and np.isnan(a["growth @3,000"])
    assert b["growth @3,000"] == pytest.approx(1.1) and b["growth now"] == pytest.approx(1.1)
    # 10 * 4**(k/1000) > 12 first at k = 132 (log(1.2)/log(4) = 0.1315); memit's 11 never passes 12
    assert a["passes unedited"] == 132 and b["passes unedited"] is pd.NA
    assert a["collapse"] is pd.NA and str(table["collapse"].dtype) == "Int64"
    assert a["probe ×"] == pytest.approx(10.0) and b["probe ×"] == pytest.approx(1.0)
    assert a["s/edit CPU"] == pytest.approx(2.5) and np.isnan(a["s/edit GPU"])  # all its stretches on a CPU


def test_each_edit_is_put_on_the_device_of_its_stretch():
    import json

    from repro.reporting.tables import edit_devices, long_run_table, provenance_lines, stretch_table

    ds, _ = _long_file("rome", 10, 3000, 2.0)
    assert set(edit_devices(ds)) == {"cpu"}
    del ds.attrs["devices_by_segment"]
    assert set(edit_devices(ds)) == {"unknown"}  # a file from before stretches were recorded
    ds.attrs.update(devices_by_segment=json.dumps(["cpu", "cpu", "cuda:0", "cpu"]),
                    segment_starts=json.dumps([-1, -1, 4, 7]))
    assert list(edit_devices(ds)) == ["cpu"] * 4 + ["cuda"] * 3 + ["cpu"] * 3
    ds.attrs["devices_by_segment"] = json.dumps(["cpu", "cuda", "cuda", "cpu"])  # early stretches disagree
    assert list(edit_devices(ds)[:4]) == ["unknown"] * 4
    ds.attrs["devices_by_segment"] = json.dumps(["cpu", "cpu", "cuda:0", "cpu"])
    ds["edit_seconds"].values[4:7] = 0.5
    row = long_run_table({"a": (ds, None)}).iloc[0]
    assert row["s/edit CPU"] == pytest.approx(2.5) and row["s/edit GPU"] == pytest.approx(0.5)
    ds.attrs["git_shas_by_segment"] = json.dumps(["a", "b", "c", "d"])
    table = stretch_table({"a": (ds, None)})
    assert list(table["edits"]) == ["1–4", "5–7", "8–10"] and list(table["device"]) == ["cpu", "cuda", "cpu"]
    assert list(table["commits"]) == ["a, b", "c", "d"] and list(table["s/edit"]) == pytest.approx([2.5, 0.5, 2.5])
    assert list(table["threads"]) == ["–"] * 3  # files from before thread counts were recorded
    assert provenance_lines(ds, "x.nc").endswith("stretches (from edit, device, git): ?, cpu, a; ?, cpu, b; "
                                                 "5, cuda:0, c; 8, cpu, d")
    ds.attrs["threads_by_segment"] = json.dumps([-1, -1, 4, 1])
    assert list(stretch_table({"a": (ds, None)})["threads"]) == ["–", "4", "1"]
    assert provenance_lines(ds, "x.nc").endswith("5, cuda:0 (4 threads), c; 8, cpu (1 thread), d")
    ds.attrs["threads_by_segment"] = json.dumps([2, 1, 4, 1])  # early stretches on different counts
    assert list(stretch_table({"a": (ds, None)})["threads"]) == ["–", "4", "1"]


def test_probe_figure_draws_ratios_and_the_threshold():
    import matplotlib

    matplotlib.use("Agg")
    from repro.reporting.figures import plot_probe

    ax = plot_probe({"a": _long_file("rome", 100, 3000, 2.0, probe_last=65.0)}, factor=10.0)
    line = next(l for l in ax.lines if l.get_label() == "ROME")
    assert line.get_ydata()[-1] == pytest.approx(5.0) and line.get_ydata()[0] == pytest.approx(1.0)
    assert any(l.get_label().startswith("collapse threshold") and l.get_ydata()[0] == 10.0 for l in ax.lines)


def test_a_blown_up_fine_tuning_is_recorded_not_written_as_success(tmp_path, tiny_dir):
    """FT-M with an absurd learning rate: the probe sees it; no metric is computed from NaN."""
    p = params(tmp_path, tiny_dir, editor="ft-m", n_edits=3,
               hparams={"layer": 1, "lr": 1e30, "steps": 3}, collapse={"patience": 1})
    ds = run_sequential(p, progress=False)
    # the tiny random model's perplexity is that of a uniform guess before and after: only the
    # matrix's norm (×1e32) tells, and the rule's max_growth catches it
    assert ds.attrs["stop_reason"] == "collapsed" and int(ds["collapse_edit"]) == 1
    assert ds.sizes["edit"] == 2 and ds["collapsed"].values.tolist() == [1, 1]
    assert "1000x its unedited norm" in ds.attrs["collapse_rule"]


def test_f2_overview_and_f3_layer_ratios_draw_the_files_values():
    import matplotlib

    matplotlib.use("Agg")
    from repro.reporting.plots import plot_layer_ratios, plot_norm_growth_overview
    from repro.reporting.tables import norm_growth_frame

    runs = {"a": _long_file("rome", 10, 10, 1.5), "b": _long_file("memit", 10, 10, 1.1)}
    for ds, _ in runs.values():
        ds["efficacy"] = ("edit", np.ones(10))
        ds["efficacy_final"] = ("edit", np.ones(10))
    axes = plot_norm_growth_overview(runs, zoom=(9, 13))
    rome = next(l for l in axes[0].lines if l.get_label() == "ROME")
    assert rome.get_ydata()[-1] == pytest.approx(15.0) and axes[1].get_ylim() == (9, 13)
    ax = plot_layer_ratios(runs)
    heat = ax.images[0].get_array()
    assert heat[0, 0] == pytest.approx(1.5) and heat[1, 0] == pytest.approx(1.1) and heat[0, 1] == pytest.approx(1.0)
    table = norm_growth_frame(runs)
    assert table.loc["ROME", "growth"] == pytest.approx(1.5) and table.loc["MEMIT", "rises"] == 1.0


def test_long_runs_are_drawn_per_model_and_batch_sizes_stay_apart():
    import json

    import xarray as xr

    from repro.reporting import figures as M
    from repro.reporting.tables import model_name

    def run(editor, model, batch):
        return xr.Dataset(attrs={"editor": editor, "model": model,
                                 "params": json.dumps({"n_edits": 1000, "batch_size": batch})}), None

    runs = {"a": run("memit", "smollm2-135m", 10), "b": run("rome", "gemma3-270m", 1),
            "c": run("memit", "smollm2-135m", 100)}
    groups = M.by_model(runs)
    assert list(groups) == ["smollm2-135m", "gemma3-270m"]
    assert list(groups["smollm2-135m"]) == ["a", "c"] and list(groups["gemma3-270m"]) == ["b"]
    # MEMIT in batches of 10 and of 100 get different names and line styles in one figure
    assert M._label(runs["a"][0]) == "MEMIT" and M._label(runs["c"][0]) == "MEMIT (batches of 100)"
    assert (M._style(runs["a"][0]), M._style(runs["c"][0])) == ("-", "--")
    assert model_name("gemma3-270m") == "Gemma-3-270M" and model_name("gpt2-xl") == "gpt2-xl"


def test_a_run_past_its_deadline_pauses_with_its_state_and_resumes_to_the_same_result(tmp_path, tiny_dir,
                                                                                      monkeypatch):
    import time

    from repro.core.store import state_path

    full = run_sequential(params(tmp_path / "a", tiny_dir, n_edits=4, checkpoint_every=2), progress=False)
    p = params(tmp_path / "b", tiny_dir, n_edits=4, checkpoint_every=2)
    with pytest.raises(experiment.Paused, match="after 1 of 4"):  # a deadline already past: one edit, then saved
        run_sequential(p, progress=False, stop_at=time.time() - 1)
    state = torch.load(state_path(experiment.from_root(p.output)), weights_only=False)
    assert state["done"] == 1 and state["devices"] == ["cpu"] and state["segment_starts"] == [0]
    monkeypatch.setenv("NORMGROWTH_STOP_AT", str(time.time() - 1))  # the same through the environment
    with pytest.raises(experiment.Paused, match="after 2 of 4"):
        run_sequential(p, progress=False)
    monkeypatch.setenv("NORMGROWTH_STOP_AT", "soon")
    with pytest.raises(ValueError, match="NORMGROWTH_STOP_AT"):
        run_sequential(p, progress=False)
    monkeypatch.delenv("NORMGROWTH_STOP_AT")
    resumed = run_sequential(p, progress=False, stop_at=time.time() + 3600)  # a deadline not reached
    np.testing.assert_allclose(resumed["weight_norm"], full["weight_norm"], rtol=1e-6)
    np.testing.assert_array_equal(resumed["nll_new"], full["nll_new"])
    assert json.loads(resumed.attrs["segment_starts"]) == [0, 1, 2]
    assert json.loads(resumed.attrs["devices_by_segment"]) == ["cpu"] * 3
    assert json.loads(resumed.attrs["threads_by_segment"]) == [torch.get_num_threads()] * 3
    assert len(json.loads(resumed.attrs["git_shas_by_segment"])) == 3
    assert json.loads(full.attrs["segment_starts"]) == [0]


def interrupted(p, at: int, interrupt_at, monkeypatch):
    """Run ``p`` until its ``at``-th editor call is interrupted (the state saved before it stays);
    return the state file and the state, with the real editor back in place to resume."""
    from repro.core.store import load_state, state_path

    real = interrupt_at(experiment, at)
    with pytest.raises(KeyboardInterrupt):
        run_sequential(p, progress=False)
    monkeypatch.setattr(experiment, "make_editor", real)
    path = state_path(experiment.from_root(p.output))
    return path, load_state(path)


def test_a_state_from_before_segments_were_recorded_keeps_its_stretches_apart(tmp_path, tiny_dir, interrupt_at,
                                                                              monkeypatch):
    from repro.core.store import save_state

    p = params(tmp_path, tiny_dir, n_edits=3)
    path, old = interrupted(p, 2, interrupt_at, monkeypatch)
    for key in ("devices", "segment_starts", "threads"):  # as states saved by earlier versions of the package
        old.pop(key)
    save_state(path, old)
    ds = run_sequential(p, progress=False)
    assert json.loads(ds.attrs["devices_by_segment"]) == ["cpu", "cpu"]
    assert json.loads(ds.attrs["threads_by_segment"]) == [-1, torch.get_num_threads()]
    assert json.loads(ds.attrs["segment_starts"]) == [-1, 1]


@pytest.mark.parametrize("editor,hp", [("rome", CHEAP), ("memit", {"layers": [1], "v_steps": 2, "stats_tokens": 2000,
                                                                   "n_prefix_short": 1, "n_prefix_long": 1})])
def test_a_resumed_run_keeps_the_context_prefixes_it_started_with(tmp_path, tiny_dir, interrupt_at, monkeypatch,
                                                                 editor, hp):
    """Prefixes are sampled with the device's random stream: a run resumed on another device must
    not draw new ones. The state carries them; the file names them."""
    from repro.core.store import save_state

    p = params(tmp_path, tiny_dir, editor=editor, n_edits=3, hparams=hp)
    path, state = interrupted(p, 2, interrupt_at, monkeypatch)
    drawn = state["editor"]["templates"]
    assert drawn[0] == "{}" and len(drawn) == 3
    other = ["{}", "Elsewhere. {}", "Meanwhile, far away. {}"]  # as if drawn by another device's stream
    state["editor"]["templates"] = other
    save_state(path, state)
    ds = run_sequential(p, progress=False)
    assert json.loads(ds.attrs["context_templates"]) == other
    with pytest.raises(ValueError, match="keeps no state|got keys"):
        experiment.make_editor(editor, experiment.load_model(tiny_dir), **hp).load_state_dict(
            {"templates": drawn, "other": 1})


def test_measurements_are_kept_portably_and_older_states_still_resume(tmp_path, tiny_dir, interrupt_at, monkeypatch):
    """A checkpoint's measurements are kept in the state as plain dicts of numpy arrays (a pickled
    Dataset would carry pandas index types that differ between machines); states saved with
    Datasets still resume to the same file."""
    import pickle

    from repro.core.store import save_state

    kw = dict(n_edits=3, measure_at=[1, 2], measure=dict(SMALL, parts=["quality"]))
    full = run_sequential(params(tmp_path / "a", tiny_dir, **kw), progress=False)
    p = params(tmp_path / "b", tiny_dir, **kw)
    path, state = interrupted(p, 3, interrupt_at, monkeypatch)
    assert len(state["measures"]) == 3 and all(isinstance(m, dict) for m in state["measures"])
    assert b"pandas" not in pickle.dumps(state["measures"])
    state["measures"] = [experiment.from_portable(m) for m in state["measures"]]  # as older states kept them
    save_state(path, state)
    resumed = run_sequential(p, progress=False)
    for name in ("es", "fact_es", "weight_norm"):
        np.testing.assert_allclose(resumed[name].values, full[name].values, rtol=1e-6)


def test_the_file_names_the_commit_its_last_stretch_ran_not_where_the_checkout_moved(tmp_path, tiny_dir,
                                                                                   interrupt_at, monkeypatch):
    """A long run's code is loaded when its stretch starts; if the checkout moves to another commit
    while it runs, the finished file still names the commit that made the edits (as progress views do)."""
    from repro.core import store

    p = params(tmp_path, tiny_dir, n_edits=4)
    monkeypatch.setenv("NORMGROWTH_GIT_SHA", "a" * 40)
    interrupted(p, 3, interrupt_at, monkeypatch)
    monkeypatch.setenv("NORMGROWTH_GIT_SHA", "b" * 40)  # the next stretch starts from commit b
    real_sha = store.git_sha
    calls = []

    def moved_after_start(cwd=None):  # the stretch's first look at git sees b; later looks see c
        calls.append(cwd)
        return real_sha(cwd) if len(calls) == 1 else "c" * 40
    monkeypatch.setattr(store, "git_sha", moved_after_start)
    ds = run_sequential(p, progress=False)
    assert len(calls) >= 2  # the file's write looked at git again: without the stretch's record it would say c
    assert json.loads(ds.attrs["git_shas_by_segment"]) == ["a" * 40, "b" * 40]
    assert ds.attrs["git_sha"] == "b" * 40


def test_a_run_resumed_from_a_packed_state_ends_exactly_where_the_uninterrupted_one_does(tmp_path, tiny_dir,
                                                                                        interrupt_at, monkeypatch):
    """States are saved with their floating-point tensors packed (here every one of them, down to
    the tiny model's): what the run saved (the edited weights, ENCORE's float64 Gram of earlier
    keys, ...) loads back bit for bit, and the resumed run ends on the uninterrupted one's numbers."""
    import copy

    from repro.core import store

    monkeypatch.setattr(store, "PACK_MIN_BYTES", 1)
    saved, real_save = [], store.save_state

    def keep_a_copy(path, state):
        saved.append(copy.deepcopy(state))
        real_save(path, state)
    monkeypatch.setattr(store, "save_state", keep_a_copy)
    hp = {"layers": [1], "v_steps": 2, "stats_tokens": 2000, "n_prefix_short": 1, "n_prefix_long": 1}
    kw = dict(editor="encore", n_edits=4, batch_size=2, hparams=hp)
    full = run_sequential(params(tmp_path / "a", tiny_dir, **kw), progress=False)
    p = params(tmp_path / "b", tiny_dir, **kw)
    saved.clear()
    path, state = interrupted(p, 2, interrupt_at, monkeypatch)
    raw = torch.load(path, weights_only=False)
    assert all(store.PACKED in w for w in raw["weights"])
    assert all(store.PACKED in g for g in raw["editor"]["prev_gram"].values())

    def same(got, want):
        if isinstance(want, dict):
            return got.keys() == want.keys() and all(same(got[k], want[k]) for k in want)
        if isinstance(want, (list, tuple)):
            return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want))
        if isinstance(want, torch.Tensor):
            return (got.dtype == want.dtype and got.shape == want.shape
                    and torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)))
        return True  # parameters, strings, numbers: stored as they are

    assert same(state, saved[-1]) and state["editor"]["prev_gram"][1].dtype == torch.float64
    snap = experiment.snapshot(p.output, write=False)  # the progress view reads packed states too
    done = snap.sizes["edit"]
    assert done == state["done"] == 2
    np.testing.assert_array_equal(snap["weight_norm"].values, full["weight_norm"].values[:done])
    resumed = run_sequential(p, progress=False)
    for name in ("weight_norm", "nll_new", "efficacy"):
        np.testing.assert_array_equal(resumed[name].values, full[name].values)


def _two_edited(first_start: float, second: list[float], unedited: float = 12.0):
    """Edited layers 0 (growing ×1.1 from ``first_start``) and 1 (``second`` over the steps), unedited layer 2."""
    import xarray as xr

    norms = np.zeros((4, 3, 1))
    norms[:, 0, 0] = first_start * np.linspace(1.0, 1.1, 4)
    norms[:, 1, 0] = second
    norms[:, 2, 0] = unedited
    return xr.Dataset({"weight_norm": (("step", "layer", "matrix"), norms),
                       "edited": (("layer", "matrix"), np.array([[1], [1], [0]], dtype=np.int8))},
                      coords={"step": [0, 10, 100, 1000], "layer": [0, 1, 2], "matrix": ["mlp_down"]})


def test_an_edited_matrix_above_the_unedited_ones_before_editing_does_not_count_as_passing_them():
    """On Gemma-3-270M, MEMIT's edited layer 5 starts above every unedited ``mlp_down``: it did not
    pass them by editing. Crossing and ending above are judged on the edited matrices that started
    at or below the largest unedited one; with none such, there is nothing to judge (None)."""
    from repro.reporting.tables import crossing_edit, ends_above, started_above

    ds = _two_edited(12.5, [10.0, 10.5, 11.0, 11.5])  # layer 0 above from the start, layer 1 never passes
    assert started_above(ds) == ["0:mlp_down"]
    assert crossing_edit(ds) == -1 and ends_above(ds) is False
    ds = _two_edited(12.5, [10.0, 11.0, 12.5, 13.0])  # layer 1 passes 12 after 100 edits
    assert crossing_edit(ds) == 100 and ends_above(ds) is True
    ds = _two_edited(10.0, [10.0, 12.5, 11.0, 11.5])  # passes at 10, falls back below by the end
    assert started_above(ds) == [] and crossing_edit(ds) == 10 and ends_above(ds) is False
    ds = _two_edited(12.5, [13.0, 13.0, 13.0, 13.0])  # both above before any edit
    assert started_above(ds) == ["0:mlp_down", "1:mlp_down"]
    assert crossing_edit(ds) == -1 and ends_above(ds) is None


def test_the_unedited_matrices_of_the_edited_type_are_those_the_run_left_alone():
    """The reference every "beyond the unedited matrices" reading uses: the edited type comes from
    the ``edited`` mask, the unedited norms leave the edited layers out (NaN, or dropped)."""
    import xarray as xr

    from repro.reporting.tables import edited_type, unedited_norms

    ds = _two_edited(10.0, [11.0, 12.0, 13.0, 14.0], unedited=12.0)
    assert edited_type(ds) == "mlp_down"
    kept = unedited_norms(ds, "mlp_down")
    assert np.isnan(kept.sel(layer=[0, 1]).values).all() and (kept.sel(layer=2).values == 12.0).all()
    assert list(unedited_norms(ds, "mlp_down", drop=True)["layer"].values) == [2]
    nothing = xr.Dataset({"edited": (("layer", "matrix"), np.zeros((2, 1), dtype=np.int8))},
                         coords={"layer": [0, 1], "matrix": ["mlp_down"]}, attrs={"run_id": "empty"})
    with pytest.raises(ValueError, match="empty marks no matrix as edited"):
        edited_type(nothing)
