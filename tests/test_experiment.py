"""The sequential run: what it records, parameter checks, resume after an interruption."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import xarray as xr

from repro.runs import sequential as experiment
from repro.data import splits
from repro.runs.sequential import SequentialParams, run_sequential
from repro.data.splits import select_requests
from repro.data.counterfact import load_records
from repro.core.paths import from_root

CHEAP = {"v_steps": 3, "stats_tokens": 4000, "n_prefix_short": 1, "n_prefix_long": 1}


def params(tmp_path, **kw):
    base = dict(editor="r-rome", n_edits=3, checkpoint_every=1, measure_every=0, output=str(tmp_path / "run.nc"), hparams=CHEAP)
    base.update(kw)
    return SequentialParams(**base)


@pytest.mark.parametrize("field,value", [("n_edits", 0), ("batch_size", -1), ("split", "test"), ("output", "x.txt"),
                                         ("measure_every", -1)])
def test_bad_parameters_are_rejected(tmp_path, field, value):
    with pytest.raises(ValueError, match=field if field != "output" else "nc"):
        run_sequential(dataclasses.replace(params(tmp_path), **{field: value}))


def test_a_batch_larger_than_the_run_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"batch_size \(5\) must not exceed n_edits \(3\)"):
        run_sequential(params(tmp_path, batch_size=5))


def test_facts_errors_come_before_the_model_loads(tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the facts were checked")

    monkeypatch.setattr(experiment, "load_model", no_model)
    with pytest.raises(ValueError, match=r"smollm2-135m\.json: only \d+ distinct-subject facts .*n_edits=99999"):
        run_sequential(params(tmp_path, n_edits=99999))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="empty.json: holds no records"):
        run_sequential(params(tmp_path, facts=str(empty)))
    with pytest.raises(ValueError, match="unknown editor 'romee'"):
        run_sequential(params(tmp_path, editor="romee"))
    with pytest.raises(ValueError, match=r"unknown r-rome hyperparameters \['v_stpes'\]"):
        run_sequential(params(tmp_path, hparams={"v_stpes": 3}))


def test_selection_is_seeded_and_split_disjoint():
    records = load_records(from_root("data/facts/smollm2-135m.json"))
    a = select_requests(records, 30, seed=1)
    assert [r.case_id for r in a] == [r.case_id for r in select_requests(records, 30, seed=1)]
    assert [r.case_id for r in a] != [r.case_id for r in select_requests(records, 30, seed=2)]
    train = {r.case_id for r in select_requests(records, 30, seed=1, split="train")}
    assert train.isdisjoint(r.case_id for r in a)
    assert len({r.subject for r in a}) == 30
    with pytest.raises(ValueError, match="distinct-subject"):
        select_requests(records, 10**6, seed=0)


def test_measure_options_need_measure_every(tmp_path):
    with pytest.raises(ValueError, match="measure_every is 0"):
        run_sequential(params(tmp_path, measure={"n_recall": 5}))


def test_held_out_facts_are_never_edited():
    records = load_records(from_root("data/facts/smollm2-135m.json"))
    chosen = splits.select_records(records, 40, seed=3)
    held = splits.held_out_records(records, chosen, 50, seed=3)
    assert len(held) == 50 and held == splits.held_out_records(records, chosen, 50, seed=3)
    assert {r.case_id for r in held}.isdisjoint(r.case_id for r in chosen)
    assert {r.requested_rewrite.subject for r in held}.isdisjoint(r.requested_rewrite.subject for r in chosen)
    assert all(splits.split_of(r) == "eval" for r in held)
    with pytest.raises(ValueError, match="unedited facts"):
        splits.held_out_records(records, chosen, 10**6, seed=3)


@pytest.mark.parametrize("done,batch,every,expected", [
    (10, 10, 10, True), (20, 10, 20, True), (10, 10, 20, False), (3, 1, 1, True), (25, 10, 20, True),
    (15, 10, 20, False), (7, 7, 5, True), (9, 2, 5, False)])
def test_crossed_multiple(done, batch, every, expected):
    assert experiment._crossed(done, batch, every) is expected


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted 3-edit run (each run loads its own copy of the model)."""
    p = params(tmp_path_factory.mktemp("full"))
    return p, run_sequential(p, progress=False)


def test_run_records_norms_and_edits(finished):
    p, ds = finished
    assert ds.sizes["edit"] == 3 and list(ds["step"].values) == [0, 1, 2, 3]
    assert ds["edited"].sum() == 1
    layer = int(ds["layer"][ds["edited"].any("matrix")].item())
    edited = ds["weight_norm"].sel(layer=layer, matrix="mlp_down")
    assert (edited.diff("step") != 0).all()  # every edit changes the edited matrix
    untouched = ds["weight_norm"].where(ds["edited"] == 0)
    assert float(abs(untouched - untouched.isel(step=0)).max()) == 0.0  # and nothing else
    assert (ds["delta_norm"] > 0).all()
    drift = ds["drift_norm"].isel(edited_matrix=0)
    assert float(drift[0]) == 0.0 and (drift[1:] > 0).all()
    # one single-matrix edit: how far the matrix moved is the norm of that edit's update
    np.testing.assert_allclose(float(drift[1]), float(ds["delta_norm"][0]), rtol=1e-4)
    assert set(ds["efficacy"].values) <= {0, 1}
    assert ds.attrs["editor"] == "r-rome" and "v_steps" in ds.attrs["hparams"]
    assert float(ds.attrs["wall_time_s"]) > 0


def test_finished_run_is_reused_not_redone(finished, monkeypatch):
    p, ds = finished
    monkeypatch.setattr(experiment, "load_model", lambda *a, **k: pytest.fail("reloaded"))
    xr.testing.assert_equal(run_sequential(p), ds)
    with pytest.raises(FileExistsError):
        run_sequential(dataclasses.replace(p, seed=5))


def test_interrupted_run_resumes_to_the_same_result(tmp_path, finished, monkeypatch, interrupt_at):
    _, full = finished
    p = params(tmp_path)
    real = interrupt_at(experiment, 2)
    with pytest.raises(KeyboardInterrupt):
        run_sequential(p, progress=False)
    assert not (tmp_path / "run.nc").exists()
    assert (tmp_path / "run.nc.state.pt").exists()
    monkeypatch.setattr(experiment, "make_editor", real)
    resumed = run_sequential(p, progress=False)  # loads a fresh model, restores the checkpoint
    assert not (tmp_path / "run.nc.state.pt").exists()
    np.testing.assert_allclose(resumed["weight_norm"], full["weight_norm"], rtol=1e-6)
    np.testing.assert_array_equal(resumed["case_id"], full["case_id"])


def test_compare_targets_fast_path_matches_teacher_forcing(tiny_lm):
    from repro.measure.rewrite import compare_targets, target_nll

    texts = ["The capital of France is", "Paris is in", "The language of Spain is", "Rome is the capital of"]
    new = ["Berlin", "Mozambique and Zimbabwe", "Dutch", "Italy"]
    true = ["Paris", "France", "Portuguese language of Brazil", "Germany"]
    got_new, got_true = compare_targets(tiny_lm, texts, new, true, batch_size=3)
    want = target_nll(tiny_lm, texts + texts, new + true)
    np.testing.assert_allclose(got_new, want[:4], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_true, want[4:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="texts"):
        compare_targets(tiny_lm, texts, new[:2], true)
