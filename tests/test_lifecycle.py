"""The one run lifecycle (repro.runs.lifecycle) on a toy run kind, and the run kinds that joined it last
(layer sweep, key agreement) end to end on a tiny model."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import xarray as xr

from repro.runs import efficacy, layer_sweep

from repro.core import store
from repro.runs.lifecycle import Run, execute


@dataclass
class CountParams:
    n: int = 5
    output: str = "count.nc"

    def validate(self) -> None:
        if self.n < 1:
            raise ValueError("n must be >= 1")


def count(params: CountParams, stop_at: int | None = None, calls: list | None = None) -> xr.Dataset:
    """A toy run kind: squares 1..n one at a time, saving its state after each, and "killed" at
    ``stop_at``."""
    def body(run: Run) -> xr.Dataset:
        calls is not None and calls.append(1)
        state = run.resume() or {"values": []}
        while len(state["values"]) < params.n:
            if stop_at is not None and len(state["values"]) == stop_at:
                raise KeyboardInterrupt
            state["values"].append((len(state["values"]) + 1) ** 2)
            run.save(state)
        return run.finish(xr.Dataset({"square": ("i", np.array(state["values"]))}), "cpu", kind="count")

    return execute(params, body)


def test_a_run_resumes_reuses_and_records_provenance(tmp_path):
    p = CountParams(output=str(tmp_path / "c.nc"))
    with pytest.raises(KeyboardInterrupt):
        count(p, stop_at=3)
    state = torch_load(tmp_path / "c.nc.state.pt")
    assert state["values"] == [1, 4, 9] and state["params"] == {"n": 5, "output": p.output}
    assert state["elapsed"] >= 0 and not (tmp_path / "c.nc").exists()
    ds = count(p)
    assert ds["square"].values.tolist() == [1, 4, 9, 16, 25]
    assert not (tmp_path / "c.nc.state.pt").exists() and not (tmp_path / "c.nc.lock").exists()
    back = store.read_netcdf(tmp_path / "c.nc")
    assert json.loads(back.attrs["params"]) == {"n": 5, "output": p.output}
    assert back.attrs["run_id"] == "c" and back.attrs["kind"] == "count" and back.attrs["device"] == "cpu"
    assert back.attrs["wall_time_s"] >= 0 and back.attrs["git_sha"]
    calls = []
    xr.testing.assert_identical(count(p, calls=calls), back)  # reused, not recomputed
    assert calls == []
    with pytest.raises(FileExistsError, match="other parameters"):
        count(CountParams(n=4, output=p.output))


def test_a_state_saved_with_other_parameters_is_not_resumed(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        count(CountParams(n=5, output=str(tmp_path / "c.nc")), stop_at=2)
    ds = count(CountParams(n=3, output=str(tmp_path / "c.nc")))  # starts over
    assert ds["square"].values.tolist() == [1, 4, 9]


def test_parameters_are_checked_before_the_body_runs(tmp_path):
    calls = []
    with pytest.raises(ValueError, match="n must be"):
        count(CountParams(n=0, output=str(tmp_path / "c.nc")), calls=calls)
    with pytest.raises(ValueError, match="n must be an integer"):
        count(CountParams(n="5", output=str(tmp_path / "c.nc")), calls=calls)
    assert calls == []


def test_a_running_run_holds_its_lock(tmp_path):
    p = CountParams(output=str(tmp_path / "c.nc"))

    def body(run: Run) -> xr.Dataset:
        with pytest.raises(RuntimeError, match="is being written"):
            count(p)  # a second writer of the same run
        return run.finish(xr.Dataset(), "cpu")

    execute(p, body)


def torch_load(path):
    import torch

    return torch.load(path, weights_only=False)


TINY_ROME = {"v_steps": 3, "stats_tokens": 2000, "n_prefix_short": 1, "n_prefix_long": 1}


@pytest.fixture
def own_cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("NORMGROWTH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_layer_sweep_run_resumes_to_the_same_scores(tiny_dir, tmp_path, monkeypatch, interrupt_at, own_cache):
    base = layer_sweep.LayerSweepParams(model=tiny_dir, layers=[0, 1], n_facts=2, hparams=TINY_ROME,
                                        output=str(tmp_path / "full.nc"))
    full = layer_sweep.run_layer_sweep(base, progress=False)
    assert full.sizes == {"layer": 2, "fact": 2} and json.loads(full.attrs["params"]) == base.as_dict()
    assert layer_sweep.best_layer(full) in (0, 1)
    p = layer_sweep.LayerSweepParams(**{**base.__dict__, "output": str(tmp_path / "cut.nc")})
    real = interrupt_at(layer_sweep, 2)  # the first layer's second fact: resumed inside a layer
    with pytest.raises(KeyboardInterrupt):
        layer_sweep.run_layer_sweep(p, progress=False)
    monkeypatch.setattr(layer_sweep, "make_editor", real)
    assert torch_load(tmp_path / "cut.nc.state.pt")["done"] == 1
    resumed = layer_sweep.run_layer_sweep(p, progress=False)
    for name in ("es", "ps", "ns", "score", "case_id"):
        np.testing.assert_array_equal(resumed[name], full[name])


def test_key_agreement_run_reads_the_facts_of_a_single_edit_run(tiny_dir, tmp_path, own_cache):
    hp = {**TINY_ROME, "layer": 1}
    source = efficacy.run_efficacy(efficacy.EfficacyParams(
        model=tiny_dir, editor="r-rome", n_facts=2, hparams=hp, output=str(tmp_path / "efficacy_r-rome_tiny.nc")),
        progress=False)
    params = efficacy.KeyAgreementParams(run=str(tmp_path / "efficacy_r-rome_tiny.nc"),
                                         output=str(tmp_path / "ka.nc"))
    ka = efficacy.run_key_agreement(params, progress=False)
    assert ka["case_id"].values.tolist() == source["case_id"].values.tolist()
    assert ((ka["cosine"] >= -1) & (ka["cosine"] <= 1 + 1e-9)).all()
    assert json.loads(ka.attrs["es_editors"]) == ["r-rome"]
    np.testing.assert_array_equal(ka["es_r-rome"], source["es"])
    assert json.loads(ka.attrs["params"]) == {"run": params.run, "editor": "r-rome", "output": params.output}
