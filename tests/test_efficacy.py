"""Single-edit efficacy runs and batch sequential runs, end to end on a tiny model saved to disk
(fast), including resuming after an interruption."""
from __future__ import annotations

import json

import numpy as np
import pytest

from repro.runs import efficacy, sequential as experiment
from repro.runs.efficacy import EfficacyParams, run_efficacy, summarize
from repro.runs.sequential import SequentialParams, run_sequential

TINY_ROME = {"layer": 1, "v_steps": 3, "stats_tokens": 2000, "n_prefix_short": 1, "n_prefix_long": 1}
TINY_ENCORE = {"layers": [1, 2], "v_steps": 3, "stats_tokens": 2000, "n_prefix_short": 1, "n_prefix_long": 1}


@pytest.fixture(autouse=True)
def own_cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("NORMGROWTH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_efficacy_scores_each_fact_on_the_unedited_model(tiny_dir, tmp_path):
    p = EfficacyParams(model=tiny_dir, editor="rome", n_facts=3, output=str(tmp_path / "e.nc"),
                       hparams=TINY_ROME, save_every=1)
    ds = run_efficacy(p, progress=False)
    assert ds.sizes["fact"] == 3
    for name in ("es", "ps", "ns"):
        assert ((ds[name] >= 0) & (ds[name] <= 1)).all()
    assert (ds["delta_norm"] > 0).all()
    s = summarize(ds)
    assert set(s) == {"n", "ES", "PS", "NS", "S", "seconds"} and s["n"] == 3
    # every edit was undone: a second run on a fresh model gives the same first-fact delta norm
    p2 = EfficacyParams(**{**p.__dict__, "n_facts": 1, "output": str(tmp_path / "e1.nc")})
    np.testing.assert_allclose(run_efficacy(p2, progress=False)["delta_norm"][0], ds["delta_norm"][0], rtol=1e-5)


def test_efficacy_resumes_after_interruption(tiny_dir, tmp_path, monkeypatch, interrupt_at):
    base = EfficacyParams(model=tiny_dir, editor="rome", n_facts=3, hparams=TINY_ROME, save_every=1,
                          output=str(tmp_path / "full.nc"))
    full = run_efficacy(base, progress=False)
    p = EfficacyParams(**{**base.__dict__, "output": str(tmp_path / "cut.nc")})
    real = interrupt_at(efficacy, 2)
    with pytest.raises(KeyboardInterrupt):
        run_efficacy(p, progress=False)
    assert (tmp_path / "cut.nc.state.pt").exists() and not (tmp_path / "cut.nc").exists()
    monkeypatch.setattr(efficacy, "make_editor", real)
    resumed = run_efficacy(p, progress=False)
    np.testing.assert_allclose(resumed["delta_norm"], full["delta_norm"], rtol=1e-5)
    np.testing.assert_array_equal(resumed["case_id"], full["case_id"])


def test_bad_efficacy_parameters(tmp_path):
    with pytest.raises(ValueError, match="n_facts"):
        run_efficacy(EfficacyParams(n_facts=0, output=str(tmp_path / "x.nc")))
    with pytest.raises(ValueError, match=".nc"):
        run_efficacy(EfficacyParams(output=str(tmp_path / "x.txt")))


def test_batch_run_with_carried_keys_resumes_to_the_same_result(tiny_dir, tmp_path, monkeypatch, interrupt_at):
    """ENCORE in batches of 2: the earlier edits' keys are checkpointed with the weights, so a run
    interrupted after the first batch ends exactly where the uninterrupted one does."""
    kw = dict(model=tiny_dir, editor="encore", n_edits=4, batch_size=2, checkpoint_every=1, measure_every=0,
              hparams=TINY_ENCORE)
    full = run_sequential(SequentialParams(output=str(tmp_path / "full.nc"), **kw), progress=False)
    assert full.sizes["edit"] == 4 and list(full["step"].values) == [0, 2, 4]
    assert int(full["edited"].sum()) == 2
    real = interrupt_at(experiment, 2)
    p = SequentialParams(output=str(tmp_path / "cut.nc"), **kw)
    with pytest.raises(KeyboardInterrupt):
        run_sequential(p, progress=False)
    monkeypatch.setattr(experiment, "make_editor", real)
    resumed = run_sequential(p, progress=False)
    np.testing.assert_allclose(resumed["weight_norm"], full["weight_norm"], rtol=1e-6)


def test_key_agreement_is_the_share_of_the_update_the_plain_prompt_gets(tiny_lm):
    """r-ROME's update moves the plain prompt's matrix output by exactly ``share`` times what it
    moves the averaged key's output; with the plain prompt as the only template both keys agree."""
    import torch

    from repro.data.counterfact import Record, Rewrite
    from repro.editors import make_editor
    from repro.data.counterfact import to_request
    from repro.editors.locate import subject_keys

    record = Record(0, Rewrite("{} is located in the city of", "Kuwait", "Rome", "Paris"), [], [], [])
    editor = make_editor("r-rome", tiny_lm, **TINY_ROME)
    agree = efficacy.key_agreement(tiny_lm, editor, record)
    assert -1.0 <= agree["cosine"] <= 1.0 and agree["cosine"] < 1 - 1e-6
    req = record.requested_rewrite
    prompts = [t.replace("{}", req.prompt) for t in editor.templates]
    keys = subject_keys(tiny_lm, editor.hp.layer, editor.mtype, prompts, req.subject).double()
    W = tiny_lm.spec.weight(tiny_lm.model, editor.hp.layer, editor.mtype)
    saved = W.detach().clone()
    try:
        result = editor.apply([to_request(record)])
    finally:
        with torch.no_grad():
            W.copy_(saved)
    delta = next(iter(result.deltas.values())).double()
    moved_plain, moved_avg = delta @ keys[0], delta @ keys.mean(0)
    torch.testing.assert_close(moved_plain, agree["share"] * moved_avg, rtol=1e-4, atol=1e-6)
    editor._templates = ["{}"]
    same = efficacy.key_agreement(tiny_lm, editor, record)
    assert same["cosine"] == pytest.approx(1.0) and same["share"] == pytest.approx(1.0)


def test_key_agreement_table_splits_by_subject_position():
    import json

    import xarray as xr

    ka = xr.Dataset(
        {"subject_opens": ("fact", np.array([1, 1, 0, 0, 0], dtype=np.int8)),
         "cosine": ("fact", np.array([0.1, 0.5, 0.9, 0.95, 1.0])),
         "share": ("fact", np.array([0.2, 0.4, 1.0, 1.0, 0.9])),
         "es_a": ("fact", np.array([0.0, 1.0, 1.0, 1.0, 1.0])),
         "es_b": ("fact", np.array([1.0, 1.0, 1.0, 0.0, 1.0]))},
        attrs={"es_editors": json.dumps(["a", "b"])},
    )
    lines = efficacy.key_agreement_table(ka, label=str.upper).splitlines()
    assert lines[0].split()[-2:] == ["A", "B"]
    opens, inside = lines[1].split(), lines[2].split()
    # label words, then n, median cosine, median share, ES of a and b
    assert opens[-5:] == ["2", "0.300", "0.30", "0.50", "1.00"]
    assert inside[-5:] == ["3", "0.950", "1.00", "1.00", "0.67"]


def _tuning_script():
    import importlib.util

    from repro.core.paths import ROOT

    spec = importlib.util.spec_from_file_location("tuning_script", ROOT / "scripts" / "tuning.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_settings_checks_name_committed_facts_and_reproduce_their_selection():
    """Every settings check under data/runs/tuning/ is declared by scripts/tuning.py with a facts file
    in the repository; the committed opening-subject selection is what the script would write, and
    each committed file edited exactly the facts its declared parameters select."""
    import xarray as xr

    from repro.core.paths import from_root
    from repro.data.counterfact import load_records
    from repro.data.splits import select_records, split_of

    tuning = _tuning_script()
    opening = load_records(from_root(tuning.OPENING))
    assert [r.case_id for r in opening] == [r.case_id for r in tuning.opening_records()]
    assert opening and all(split_of(r) == "train" and r.requested_rewrite.prompt.startswith("{}") for r in opening)
    files = sorted(p.stem for p in from_root("data/runs/tuning").glob("*.nc"))
    assert files == sorted(tuning.CHECKS)
    for name in tuning.CHECKS:
        p = tuning.check_params(name)
        ds = xr.open_dataset(from_root(p.output), engine="netcdf4")
        chosen = select_records(load_records(from_root(p.facts)), p.n_facts, p.seed, p.split)
        assert [int(c) for c in ds["case_id"].values] == [r.case_id for r in chosen], name
        assert json.loads(ds.attrs["params"])["facts"] == p.facts, name  # a file the repository holds
    with pytest.raises(KeyError, match="unknown settings check"):
        tuning.check_params("r-rome_l99")
