"""Measurements at the checkpoints of a sequential run (tiny random model: shapes, bookkeeping,
resume; the metrics themselves are tested in test_downstream and test_measure_activations)."""
from __future__ import annotations


import numpy as np
import pytest

from repro.runs import sequential as experiment
from repro.runs.sequential import SequentialParams, run_sequential
from repro.measure.checkpoint import MeasureParams

CHEAP = {"layer": 1, "v_steps": 2, "stats_tokens": 2000, "n_prefix_short": 1, "n_prefix_long": 1}
SMALL = {"n_test": 4, "n_recall": 6, "ppl_tokens": 256, "ppl_ctx": 64, "n_gen": 2, "gen_tokens": 8,
         "probe_edit": 3, "probe_general": 2, "probe_max_length": 12, "k": 3, "pca_points": 10}


def params(tmp_path, tiny_dir, **kw):
    base = dict(model=tiny_dir, editor="r-rome", n_edits=3, measure_every=2, measure=SMALL,
                checkpoint_every=1, output=str(tmp_path / "run.nc"), hparams=CHEAP)
    base.update(kw)
    return SequentialParams(**base)


@pytest.fixture(scope="module")
def measured(tmp_path_factory, tiny_dir):
    p = params(tmp_path_factory.mktemp("measured"), tiny_dir)
    return p, run_sequential(p, progress=False)


def test_checkpoints_before_every_k_and_after_the_last(measured):
    _, ds = measured
    assert list(ds["ckpt"].values) == [0, 2, 3]
    assert list(ds["part"].values) == ["quality", "generation", "downstream", "activations"]
    assert (ds["measure_seconds"] > 0).all()
    assert float(ds.attrs["measure_time_s"]) > 0


def test_edit_quality_covers_the_facts_edited_so_far(measured):
    _, ds = measured
    es = ds["fact_es"]
    assert es.sel(ckpt=0).isnull().all() and np.isnan(float(ds["es"].sel(ckpt=0)))
    assert es.sel(ckpt=2).notnull().sum() == 2 and es.sel(ckpt=3).notnull().sum() == 3
    for name in ("es", "ps", "ns", "score"):
        assert 0 <= float(ds[name].sel(ckpt=3)) <= 1


def test_downstream_and_generation_are_recorded(measured):
    _, ds = measured
    assert list(ds["task"].values) == list(MeasureParams().tasks)
    assert ds["task_acc"].dims == ("ckpt", "task") and ds["task_chance"].dims == ("task",)
    assert ((ds["task_acc"] >= 0) & (ds["task_acc"] <= 1)).all()
    assert (ds["perplexity"] > 1).all() and ds["recall"].notnull().all()
    assert ds["gen_entropy"].sizes["gen_prompt"] == 2 and (ds["gen_entropy"] >= 0).all()


def test_activations_start_identical_to_the_reference(measured):
    _, ds = measured
    first = ds.sel(ckpt=0)
    np.testing.assert_allclose(first["cka"].sel(site=["resid", "attn", "mlp"]), 1.0, atol=1e-6)
    np.testing.assert_allclose(first["principal_angle"].sel(site="resid"), 0.0, atol=1e-3)
    np.testing.assert_allclose(first["pca"], ds["pca_ref"], atol=1e-4)
    assert ds["act_norm"].dims == ("ckpt", "site", "layer") and ds["act_share"].dims == ("ckpt", "block", "layer")
    # the edited matrix's input and output are collected at its layer only
    layer = int(ds["layer"][ds["edited"].any("matrix")].item())
    out = ds["act_norm"].sel(site="mlp_down_out")
    assert out.sel(layer=layer).notnull().all() and out.drop_sel(layer=layer).isnull().all()
    # after edits the edited layer's MLP output has moved
    assert float(ds["act_cosine"].sel(ckpt=3, site="mlp", layer=layer)) < 1 - 1e-6


def test_bad_measure_parameters_are_rejected():
    with pytest.raises(ValueError, match="n_test"):
        MeasureParams(n_test=0)
    with pytest.raises(ValueError, match="unknown measurement parts"):
        MeasureParams(parts=("quality", "vibes"))


def test_interrupted_measured_run_resumes_to_the_same_result(tmp_path, tiny_dir, measured, monkeypatch, interrupt_at):
    _, full = measured
    p = params(tmp_path, tiny_dir)
    real = interrupt_at(experiment, 3)
    with pytest.raises(KeyboardInterrupt):
        run_sequential(p, progress=False)
    monkeypatch.setattr(experiment, "make_editor", real)
    resumed = run_sequential(p, progress=False)
    # the reference is rebuilt from the original weights: the later checkpoints agree too
    for name in ("cka", "act_norm", "subspace_overlap", "task_acc", "perplexity", "fact_es"):
        np.testing.assert_allclose(resumed[name], full[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_figures_and_table_draw_from_a_measured_run(measured):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from repro.reporting import figures as M

    p, ds = measured
    runs = {"tiny": (ds, p.output)}
    table = M.summary_frame(runs)
    assert list(table.columns[:5]) == ["edits", "ES", "PS", "NS", "S"] and list(table.index) == ["r-ROME"]
    assert table.loc["r-ROME", "edits"] == 3 and table.loc["r-ROME", "ES"] == pytest.approx(float(ds["es"][-1]))
    rel = M.relative_activation_norms(ds)
    np.testing.assert_allclose(rel.isel(ckpt=0), 1.0)
    axes = M.plot_downstream(runs)
    assert len(axes) == ds.sizes["task"] + 3 and len(axes[0].lines) == 2  # one run + chance
    M.plot_edit_quality(runs)
    M.plot_activation_norms(runs)
    M.plot_activation_norm_layers(ds)
    M.plot_subspaces(runs)
    M.plot_subspace_layers(runs)
    M.plot_pca(ds, layer=1)
    plt.close("all")


def test_off_scale_runs_picks_only_a_run_far_above_the_rest():
    from repro.reporting.figures import off_scale_runs

    def runs(*peaks):
        return {f"r{i}": ({"ppl": np.array([14.0, p])}, None) for i, p in enumerate(peaks)}

    value = lambda ds: ds["ppl"]  # noqa: E731
    out, lo, hi = off_scale_runs(runs(15.0, 16.4, 466.0), value)
    assert out == ["r2"] and (lo, hi) == (14.0, 16.4)
    # nothing is clipped when the largest is within the factor of the next
    assert off_scale_runs(runs(15.0, 16.4, 40.0), value)[0] == []
    # two runs far above the rest are both set aside, the larger first
    assert off_scale_runs(runs(15.0, 100.0, 466.0), value)[0] == ["r2", "r1"]
