"""MEND: the update's algebra, its reduction to a gradient step, meta-training, weights files."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from repro.data.counterfact import load_records, to_request
from repro.editors.base import load_hparams
from repro.core.scoring import logprobs_at
from repro.editors.mend import (
    MEND, MENDHyperParams, MENDNet, Standardizer, gradient_factors, load_mend, matrix_key,
    resolve_matrices, save_mend, target_batch,
)
from repro.runs.mend_training import (
    MENDTrainParams, meta_loss, sample_step, split_training_records, train_mend,
)
from repro.data.splits import select_records, split_of
from repro.runs.lifecycle import Run
from repro.core.paths import from_root

FACTS = from_root("data/facts/smollm2-135m.json")
# both MLP input matrices (one shared g for gate and up) and the output matrix of the last 2 layers
TINY = {"layers": [-2, -1], "mtypes": ["mlp_in", "mlp_out"], "rank": 8, "n_blocks": 2}


@pytest.fixture(scope="module")
def records():
    return load_records(FACTS)


@pytest.fixture(scope="module")
def train_records(records):
    return [r for r in records if split_of(r) == "train"]


@pytest.fixture
def tiny(tiny_lm):
    """The tiny model, with every MLP weight put back after the test."""
    saved = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters() if "mlp" in n}
    yield tiny_lm
    with torch.no_grad():
        params = dict(tiny_lm.model.named_parameters())
        for name, value in saved.items():
            params[name].copy_(value)


def tiny_hp(lm, **extra) -> MENDHyperParams:
    return load_hparams(MENDHyperParams, "mend", lm, {**TINY, **extra})


def scrambled_net(lm, hp, seed=0) -> MENDNet:
    """A network far from its initial identity: random U, scales, shifts, α and statistics."""
    gen = torch.Generator().manual_seed(seed)
    net = MENDNet.for_model(lm, hp)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "alpha" not in name else 1e-3) + (1 if "scale" in name else 0))
    for key in net.keys:
        d = sum(net.shapes[key])
        net.norms[key].update(torch.randn(50, d, generator=gen) * torch.rand(d, generator=gen) * 3 + 1)
    return net


def autograd_weight_grad(lm, layer, mtype, batch) -> torch.Tensor:
    """d(sum of rows' mean target NLL)/dW of one matrix, (out, in), by plain autograd."""
    param = lm.spec.matrix_module(lm.model, layer, mtype).weight
    param.requires_grad_(True)
    try:
        lp = logprobs_at(lm, batch, batch.loss_pos).gather(-1, batch.labels.unsqueeze(-1)).squeeze(-1)
        loss = (-(lp * batch.label_mask).sum(1) / batch.label_mask.sum(1)).sum()
        (grad,) = torch.autograd.grad(loss, param)
    finally:
        param.requires_grad_(False)
    return grad.T if mtype in lm.spec.transposed else grad


def test_matrices_resolve_from_the_spec(tiny_lm):
    hp = tiny_hp(tiny_lm)
    spec = tiny_lm.spec
    assert resolve_matrices(tiny_lm, hp) == [(l, t) for l in (2, 3) for t in (*spec.mlp_in, spec.mlp_out)]
    default = load_hparams(MENDHyperParams, "mend", tiny_lm)
    assert resolve_matrices(tiny_lm, default) == [(1, spec.mlp_out), (2, spec.mlp_out), (3, spec.mlp_out)]
    with pytest.raises(ValueError):
        resolve_matrices(tiny_lm, tiny_hp(tiny_lm, layers=[4]))


def test_standardizer_matches_batch_statistics():
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(300, 7, generator=gen) * torch.arange(1, 8) + 5
    norm = Standardizer(7, eps=0.0)
    for chunk in data.split([1, 40, 100, 159]):
        norm.update(chunk)
    assert torch.allclose(norm.mean, data.double().mean(0), atol=1e-10)
    assert torch.allclose(norm.var, data.double().var(0), rtol=1e-10)
    z = norm(data)
    assert torch.allclose(z.mean(0), torch.zeros(7), atol=1e-5) and torch.allclose(z.std(0), torch.ones(7), atol=1e-5)


def test_update_is_minus_alpha_sum_of_outer_products(tiny, records):
    hp = tiny_hp(tiny)
    net = scrambled_net(tiny, hp)
    reqs = [to_request(r) for r in select_records(records, 2, seed=3, split="train")]
    factors, _, _ = gradient_factors(tiny, resolve_matrices(tiny, hp), target_batch(tiny, reqs))
    for key, (x, d) in factors.items():
        n_tokens = x.shape[0]
        assert n_tokens == int(target_batch(tiny, reqs).attention_mask.sum())
        xt, dt = net.transform(key, x, d)
        alpha = net.alpha[key]
        expected = -alpha * sum(torch.outer(dt[t], xt[t]) for t in range(n_tokens))
        delta = net.update(key, x, d).detach()
        assert delta.shape == tuple(net.shapes[key])
        assert torch.allclose(delta, expected.detach(), rtol=1e-4, atol=1e-7 * expected.abs().max().item())
        assert n_tokens < min(delta.shape)  # otherwise the rank bound says nothing
        assert torch.linalg.matrix_rank(delta.double(), rtol=1e-5) <= n_tokens  # fp32 noise aside
        # g is not the identity here, so the factors really were transformed
        assert not torch.allclose(xt, x, atol=1e-3)


def test_identity_network_gives_a_gradient_step(tiny, records):
    """Untrained g (zero last layers) with identity standardisation: ΔW = −α ∇W exactly, for every
    edited matrix — earlier layers' δ must include the paths through later edited matrices."""
    hp = tiny_hp(tiny, alpha_init=3e-3)
    net = MENDNet.for_model(tiny, hp)  # no statistics yet: mean 0, variance 1
    reqs = [to_request(r) for r in select_records(records, 2, seed=4, split="train")]
    batch = target_batch(tiny, reqs)
    factors, _, _ = gradient_factors(tiny, resolve_matrices(tiny, hp), batch)
    with torch.no_grad():
        updates = net.updates(factors)
    for layer, mtype in resolve_matrices(tiny, hp):
        grad = autograd_weight_grad(tiny, layer, mtype, batch)
        assert grad.abs().max() > 0
        torch.testing.assert_close(updates[matrix_key(layer, mtype)], -3e-3 * grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item())


def test_editor_applies_its_update_in_place_and_chains(tiny, records, tmp_path):
    hp = tiny_hp(tiny)
    path = save_mend(tmp_path / "mend_tiny.pt", scrambled_net(tiny, hp), hp, tiny.name)
    editor = MEND.from_name(tiny, weights=str(path), **TINY)
    reqs = [to_request(r) for r in select_records(records, 2, seed=5, split="train")]
    mats = editor.edited_matrices()
    w0 = {k: tiny.spec.weight(tiny.model, *k).clone() for k in mats}
    from_original, _, _ = editor.compute_updates([reqs[1]])
    first = editor.apply([reqs[0]])
    second = editor.apply([reqs[1]])
    for k in mats:
        key = matrix_key(*k)
        after = tiny.spec.weight(tiny.model, *k)
        torch.testing.assert_close(after, w0[k] + first.deltas[key] + second.deltas[key])
        assert first.deltas[key].abs().max() > 0
    # the second edit's update was computed on the weights the first edit left
    assert any(not torch.allclose(second.deltas[matrix_key(*k)], from_original[matrix_key(*k)]) for k in mats)
    assert len(second.info) == 1 and second.info[0]["n_tokens"] > 0


def test_save_load_roundtrip_gives_identical_updates(tiny, records, tmp_path):
    hp = tiny_hp(tiny)
    net = scrambled_net(tiny, hp, seed=7)
    path = save_mend(tmp_path / "w.pt", net, hp, tiny.name)
    loaded, blob = load_mend(path, tiny, hp)
    assert blob["hparams"] == dataclasses.asdict(hp)
    reqs = [to_request(r) for r in select_records(records, 1, seed=6, split="train")]
    factors, _, _ = gradient_factors(tiny, resolve_matrices(tiny, hp), target_batch(tiny, reqs))
    with torch.no_grad():
        a, b = net.updates(factors), loaded.updates(factors)
    for key in a:
        assert torch.equal(a[key], b[key])
    # a file for another architecture is refused
    with pytest.raises(ValueError, match="trained with"):
        load_mend(path, tiny, tiny_hp(tiny, rank=4))


def test_missing_weights_name_the_training_notebook(tiny_lm, tmp_path):
    with pytest.raises(FileNotFoundError, match="train_mend.ipynb"):
        MEND.from_name(tiny_lm)  # nothing is packaged for the tiny model
    with pytest.raises(FileNotFoundError, match="train_mend.ipynb"):
        MEND.from_name(tiny_lm, weights=str(tmp_path / "absent.pt"))


def test_training_split_only(records):
    train, val = split_training_records(records, 10, seed=0)
    assert all(split_of(r) == "train" for r in train + val)
    assert {r.requested_rewrite.subject for r in train}.isdisjoint(r.requested_rewrite.subject for r in val)
    cfg = MENDTrainParams(n_loc_prompts=3, loc_text_words=5)
    edits, loc = sample_step(0, train, ["one two three four five six seven"], cfg)
    assert edits[0] in train and len(loc) == 4 and loc[-1] == "one two three four five"
    assert sample_step(0, train, ["a b"], cfg)[0] == edits  # batches depend only on (seed, step)
    related = [r for r in train if r.relation_id == edits[0].relation_id and r is not edits[0]]
    assert any(p in r.neighborhood_prompts for r in related for p in loc[:2])
    own_cfg = dataclasses.replace(cfg, n_loc_own=2, loc_text_words=0)
    edits2, loc2 = sample_step(0, train, [], own_cfg)
    assert len(loc2) == 5 and set(loc2[-2:]) <= set(edits2[0].neighborhood_prompts)


def test_meta_training_reduces_the_meta_loss_on_a_fixed_batch(tiny, train_records):
    hp = tiny_hp(tiny)
    cfg = MENDTrainParams(c_edit=0.1, n_paraphrases=2)
    torch.manual_seed(0)
    net = MENDNet.for_model(tiny, hp)
    edits, loc = sample_step(0, train_records, ["The river flows through the old town towards the sea."],
                             dataclasses.replace(cfg, edits_per_step=2, n_loc_prompts=2))
    mats = resolve_matrices(tiny, hp)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for step in range(12):
        opt.zero_grad()
        out = meta_loss(tiny, net, mats, edits, loc, cfg, update_stats=step < 3)
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    net.eval()
    with torch.no_grad():
        final = float(meta_loss(tiny, net, mats, edits, loc, cfg)["loss"])
    assert np.isfinite(losses).all()
    # compared once the statistics are frozen (step 3); the random tiny model is nearly insensitive
    # to its MLPs (NLL ≈ log vocab), so the possible gain is small but must be there
    assert final < 0.995 * losses[3], losses + [final]
    assert any(a != hp.alpha_init for a in net.alphas().values())


def test_train_mend_is_seeded_and_reuses_its_checkpoint(tiny, records, tmp_path):
    hp = tiny_hp(tiny)
    cfg = MENDTrainParams(steps=3, n_val=2, val_every=2, checkpoint_every=1, stats_warmup=2,
                          n_loc_prompts=1, loc_text_words=8, lr=1e-3)
    texts = ["Wikipedia is a free online encyclopedia written by volunteers around the world."]
    net1, h1 = train_mend(tiny, hp, records, cfg, texts=texts, progress=False)
    assert len(h1["loss"]) == 3 and h1["val_step"] == [0, 2, 3]
    run = Run(tmp_path / "train.nc", cfg.as_dict())
    net2, h2 = train_mend(tiny, hp, records, cfg, run=run, texts=texts, progress=False)
    assert h2["loss"] == h1["loss"]  # seeded: same batches, same initialisation
    assert run.state_file.exists()
    run = Run(tmp_path / "train.nc", cfg.as_dict())
    net3, h3 = train_mend(tiny, hp, records, cfg, run=run, texts=texts, progress=False)
    assert h3["loss"] == h1["loss"] and len(h3["seconds"]) == 3  # resumed at the end: nothing redone
    for (n, a), (_, b) in zip(net2.state_dict().items(), net3.state_dict().items()):
        assert torch.equal(a, b), n


# --------------------------------------------------------------------------------------------
# The packaged, meta-trained network for SmolLM2-135M
# --------------------------------------------------------------------------------------------
def test_packaged_weights_fit_the_default_hparams(smollm):
    from repro.editors.mend import packaged_weights

    path = packaged_weights(smollm.name)
    assert path.is_file() and path.stat().st_size < 5e6
    hp = load_hparams(MENDHyperParams, "mend", smollm)
    net, blob = load_mend(path, smollm, hp)
    assert blob["meta"]["train_params"]["steps"] >= 100
    assert all(norm.count > 100 for norm in net.norms.values())  # statistics were gathered
    assert any(up.weight.abs().max() > 0 for g in net.nets.values() for up in g.up)  # g was trained


def test_trained_network_beats_the_untrained_one_on_eval_facts(smollm, records):
    """10 evaluation-split facts (never seen in meta-training), each edited alone: the trained
    network must make the new object win on the rewrite prompt and most paraphrases, far more
    often than the network it started from."""
    from repro.editors.mend import packaged_weights
    from repro.runs.mend_training import edit_efficacy, initial_network

    editor = MEND.from_name(smollm)
    recs = select_records(records, 10, seed=123, split="eval")
    trained = edit_efficacy(smollm, editor, recs)
    blob = torch.load(packaged_weights(smollm.name), weights_only=False)
    cfg = MENDTrainParams(**blob["meta"]["train_params"])
    untrained = edit_efficacy(smollm, MEND(smollm, editor.hp, net=initial_network(smollm, editor.hp, records, cfg)), recs)
    print({k: (float(untrained[k].mean()), float(trained[k].mean())) for k in trained})
    assert trained["es"].mean() >= 0.9 and trained["ps"].mean() >= 0.7
    assert trained["es"].mean() >= untrained["es"].mean() + 0.5
