"""Post-training runs (repro.runs.post_training) on a tiny random llama: what the recorder tracks, the LoRA
effective matrix, determinism, resume, parameter checks."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from repro.runs import post_training as training
from repro.data.counterfact import load_records
from repro.measure.norms import weight_norms
from repro.core.models import load_model
from repro.core.paths import from_root
from repro.runs.post_training import (
    NormRecorder, TrainParams, effective_weight, lora_delta, prepare_model, run_training, task_examples,
)


def params(tmp_path, name="run.nc", **kw) -> TrainParams:
    base = dict(model=kw.pop("model"), steps=2, lr=1e-2, batch_size=2, seq_len=24, record_every=1,
                eval_every=1, eval_chunks=2, eval_examples=4, checkpoint_every=1, output=str(tmp_path / name))
    base.update(kw)
    return TrainParams(**base)


def layer_matrices(model, spec) -> dict[str, tuple[int, ...]]:
    """Every 2-D weight inside the decoder layers, by module path (LoRA wrappers seen through)."""
    out = {}
    for name, p in model.named_parameters():
        if p.ndim == 2 and name.startswith(spec.layers + ".") and "lora_" not in name:
            path = name.removesuffix(".weight").replace(".base_layer", "")
            out[path] = tuple(p.shape)
    return out


@pytest.mark.parametrize("intervention", ["full_ft", "lora"])
def test_recorder_tracks_exactly_the_layer_matrices(tiny_dir, intervention):
    lm = load_model(tiny_dir, device="cpu")
    prepare_model(lm, TrainParams(intervention=intervention, model=tiny_dir))
    rec = NormRecorder(lm)
    expected = layer_matrices(lm.model, lm.spec)
    assert sorted(rec.paths) == sorted(expected)
    assert len(rec.matrices) == lm.n_layers * len(lm.spec.matrices)
    for (layer, mtype), path in zip(rec.matrices, rec.paths):
        assert effective_weight(lm, layer, mtype).shape == expected[path]  # (out, in) as nn.Linear stores it
    got = rec.measure()
    assert got["weight_norm"].shape == (lm.n_layers, len(lm.spec.matrices))
    for layer, mtype in rec.matrices:
        w = lm.spec.matrix_module(lm.model, layer, mtype)
        w = getattr(w, "base_layer", w).weight.detach()
        j = rec.types.index(mtype)
        assert got["weight_norm"][layer, j] == pytest.approx(float(torch.linalg.norm(w.double())), rel=1e-12)
    assert not got["delta_norm"].any()  # nothing has moved yet (LoRA: B = 0)


def test_lora_effective_matrix_equals_the_merged_weight(tiny_dir):
    lm = load_model(tiny_dir, device="cpu")
    prepare_model(lm, TrainParams(intervention="lora", model=tiny_dir, lora_r=4, lora_alpha=8.0))
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero: give every adapter a non-trivial update
        for module in lm.model.modules():
            if hasattr(module, "lora_B"):
                for lin in module.lora_B.values():
                    lin.weight.normal_(0, 0.05)
    rec = NormRecorder(lm)
    got = rec.measure()
    effective = {key: effective_weight(lm, *key) for key in rec.matrices}
    adapters = {}
    for layer, mtype in rec.matrices:
        module = lm.spec.matrix_module(lm.model, layer, mtype)
        a, b = module.lora_A["post"].weight.detach().double(), module.lora_B["post"].weight.detach().double()
        adapters[(layer, mtype)] = float(torch.linalg.norm(2.0 * b @ a))  # α/r = 8/4
        np.testing.assert_allclose(lora_delta(module).numpy(), (2.0 * b @ a).numpy(), rtol=1e-12)
    merged = lm.peft_model.merge_and_unload()
    assert merged is lm.model
    for layer, mtype in rec.matrices:
        w = lm.spec.weight(lm.model, layer, mtype)
        torch.testing.assert_close(effective[(layer, mtype)].float(), w, rtol=1e-5, atol=1e-6)
        j = rec.types.index(mtype)
        assert got["weight_norm"][layer, j] == pytest.approx(float(torch.linalg.norm(w.double())), rel=1e-6)
        assert got["delta_norm"][layer, j] == pytest.approx(adapters[(layer, mtype)], rel=1e-12)
        assert got["delta_norm"][layer, j] > 0


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    """One uninterrupted two-step run per intervention."""
    tmp = tmp_path_factory.mktemp("runs")
    out = {}
    for iv in training.INTERVENTIONS:
        p = params(tmp, f"{iv}.nc", model=tiny_dir, intervention=iv, lora_targets=["attn_q", "mlp_down"])
        out[iv] = (p, run_training(p, progress=False))
    return out


@pytest.mark.parametrize("intervention", training.INTERVENTIONS)
def test_step_zero_is_the_untouched_model_and_a_step_changes_it(runs, tiny_dir, intervention):
    p, ds = runs[intervention]
    fresh = weight_norms(load_model(tiny_dir, device="cpu"))
    np.testing.assert_allclose(ds["weight_norm"].isel(step=0).values, fresh.values, rtol=1e-12)
    assert list(ds["step"].values) == [0, 1, 2] and list(ds["opt_step"].values) == [1, 2]
    assert list(ds["eval_step"].values) == [0, 1, 2]
    moved = ds["weight_norm"].isel(step=1) != ds["weight_norm"].isel(step=0)
    trained = ds["trained"].astype(bool)
    assert bool(moved.where(trained, True).all())  # every trained matrix changed after one step
    assert not bool(moved.where(~trained, False).any())  # and no other one
    assert bool((ds["delta_norm"].isel(step=1) > 0).where(trained, True).all())
    if intervention == "lora":
        assert list(ds["trained"].any("layer").values) == [m in ("attn_q", "mlp_down") for m in ds["matrix"].values]
    assert np.isfinite(ds["train_loss"]).all() and np.isfinite(ds["eval_ppl"]).all()
    assert ds.attrs["intervention"] == intervention and float(ds.attrs["wall_time_s"]) > 0


def test_zero_learning_rate_changes_nothing(tiny_dir, tmp_path):
    ds = run_training(params(tmp_path, model=tiny_dir, intervention="full_ft", lr=0.0, weight_decay=0.1,
                             steps=1, eval_chunks=0, eval_examples=0), progress=False)
    np.testing.assert_array_equal(ds["weight_norm"].isel(step=-1), ds["weight_norm"].isel(step=0))


def test_same_seed_same_numbers(runs, tiny_dir, tmp_path):
    p, ds = runs["cpt"]
    again = run_training(dataclasses.replace(p, output=str(tmp_path / "again.nc")), progress=False)
    for name in ("weight_norm", "delta_norm", "train_loss", "eval_ppl", "task_loss"):
        np.testing.assert_array_equal(again[name].values, ds[name].values, err_msg=name)
    other = run_training(dataclasses.replace(p, seed=1, output=str(tmp_path / "other.nc")), progress=False)
    assert not np.array_equal(other["train_loss"].values, ds["train_loss"].values)  # another data order


@pytest.mark.parametrize("intervention", ["full_ft", "lora"])
def test_interrupted_run_resumes_to_the_same_result(runs, tmp_path, monkeypatch, intervention):
    p, full = runs[intervention]
    p = dataclasses.replace(p, output=str(tmp_path / "run.nc"))
    real, calls = training.train_step, []

    def fail_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(training, "train_step", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_training(p, progress=False)
    assert not (tmp_path / "run.nc").exists() and (tmp_path / "run.nc.state.pt").exists()
    monkeypatch.setattr(training, "train_step", real)
    resumed = run_training(p, progress=False)  # a fresh model, restored from the checkpoint
    assert not (tmp_path / "run.nc.state.pt").exists()
    for name in ("weight_norm", "delta_norm", "train_loss", "grad_norm", "eval_ppl", "task_acc"):
        np.testing.assert_array_equal(resumed[name].values, full[name].values, err_msg=name)


def test_finished_run_is_reused(runs, monkeypatch):
    p, ds = runs["full_ft"]
    monkeypatch.setattr(training, "load_model", lambda *a, **k: pytest.fail("reloaded"))
    assert run_training(p)["weight_norm"].equals(ds["weight_norm"])
    with pytest.raises(FileExistsError):
        run_training(dataclasses.replace(p, lr=1e-3))


@pytest.mark.parametrize("field,value", [
    ("intervention", "rlhf"), ("steps", 0), ("batch_size", -1), ("grad_accum", 0), ("seq_len", 4),
    ("lr", -1e-4), ("weight_decay", -0.1), ("lr", float("nan")), ("lora_r", 0), ("lora_alpha", 0.0),
    ("lora_dropout", 1.0), ("lora_targets", []), ("record_every", 0), ("eval_chunks", -1),
    ("output", "run.txt"),
])
def test_bad_parameters_are_rejected(tmp_path, field, value):
    p = dataclasses.replace(TrainParams(output=str(tmp_path / "x.nc")), **{field: value})
    with pytest.raises(ValueError, match=field if field != "output" else r"\.nc"):
        run_training(p)


def test_unknown_lora_target_is_rejected(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="mlp_in"):
        run_training(params(tmp_path, model=tiny_dir, intervention="lora", lora_targets=["mlp_in"]))


def test_task_split_and_encoding(tiny_lm):
    records = load_records(from_root("data/facts/smollm2-135m.json"))
    train, test = task_examples(records, "train"), task_examples(records, "test")
    assert len(train) > 3 * len(test) > 0
    assert not {p for p, _ in train} & {p for p, _ in test}
    test_prompts = {p for p, _ in test}
    for rec in records:  # every example of a subject lies on the side its subject is assigned to
        rw = rec.requested_rewrite
        text = training.TASK_TEMPLATE.format(prompt=rw.prompt.format(rw.subject))
        assert (text in test_prompts) == training.heldout_subject(rw.subject)
    prompt, answer = train[0]
    assert prompt.startswith("Complete the sentence: ") and prompt.endswith("\nAnswer:")
    tok = tiny_lm.tokenizer
    task = training.encode_task(tok, train[:3], max_len=64)
    batch = training.collate_task(task, [0, 1, 2], tok.pad_token_id, "cpu")
    for b in range(3):
        n = int(batch.mask[b].sum())
        want = tok(" " + train[b][1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert batch.labels[b, :n].tolist() == want
        pos = batch.positions[b, :n]
        # each answer token is predicted from the position before it: teacher forcing, prompt masked
        assert batch.input_ids[b, pos[1:]].tolist() == want[:-1]
    short = training.encode_task(tok, train[:1], max_len=8)
    assert len(short.prompts[0]) + len(short.answers[0]) <= 8


def test_batches_are_a_function_of_seed_and_step():
    p = TrainParams(batch_size=4, grad_accum=2, seed=3)
    epoch = np.concatenate([training.example_indices(16, s, m, p) for s in range(2) for m in range(2)])
    assert sorted(epoch) == list(range(16))  # one epoch sees every example once
    np.testing.assert_array_equal(training.example_indices(16, 1, 1, p), training.example_indices(16, 1, 1, p))
    assert not np.array_equal(training.example_indices(16, 0, 0, p),
                              training.example_indices(16, 0, 0, dataclasses.replace(p, seed=4)))


def test_growth_decomposition_on_known_matrices():
    """Norm changes of hand-made W_t = W_0 + ΔW: the recovered cosine is cos(W_0, ΔW), and the
    orthogonal part equals the observed change exactly when ΔW ⟂ W_0."""
    import xarray as xr

    from repro.reporting.tables import growth_decomposition

    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((6, 5))
    ortho = rng.standard_normal((6, 5))
    ortho -= (ortho * w0).sum() / (w0 * w0).sum() * w0  # ⟂ W_0
    deltas = [np.zeros_like(w0), 0.1 * ortho, -0.05 * w0, 0.1 * ortho + 0.02 * w0]
    norms = [np.linalg.norm(w0 + d) for d in deltas]
    ds = xr.Dataset(
        {"weight_norm": (("step", "layer", "matrix"), np.array(norms).reshape(4, 1, 1)),
         "delta_norm": (("step", "layer", "matrix"), np.array([np.linalg.norm(d) for d in deltas]).reshape(4, 1, 1))},
        coords={"step": [0, 1, 2, 3], "layer": [0], "matrix": ["m"]},
    )
    g = growth_decomposition(ds).squeeze()
    assert np.isnan(float(g.cosine[0])) and float(g.observed[0]) == 0.0
    np.testing.assert_allclose(float(g.cosine[1]), 0.0, atol=1e-12)
    np.testing.assert_allclose(float(g.observed[1]), float(g.orthogonal[1]), rtol=1e-12)
    np.testing.assert_allclose(float(g.cosine[2]), -1.0, atol=1e-12)
    np.testing.assert_allclose(float(g.observed[2]), -0.05, atol=1e-12)
    d3 = deltas[3]
    expect = (w0 * d3).sum() / (np.linalg.norm(w0) * np.linalg.norm(d3))
    np.testing.assert_allclose(float(g.cosine[3]), expect, rtol=1e-10)
    assert float(g.observed[3]) > float(g.orthogonal[3]) > 0  # a component along W_0 adds growth
