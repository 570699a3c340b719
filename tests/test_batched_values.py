"""The joint value optimisation of the batch editors (``locate.optimize_values`` with several
requests) gives what optimising each request alone gives, on the tiny random model.

The tiny model's random logits are nearly flat (every NLL ≈ log V), so they are scaled ×10 while
these tests run; with prompts that end at the subject the requests then reach the stopping criteria
at different steps (one never does), which exercises the freezing of finished requests.
"""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from repro.data.counterfact import EditRequest
from repro.editors import make_editor
from repro.editors.locate import ValueRequest, optimize_values
from repro.core.models import get_module

FACTS = [("Tourists in Paris visit {}", "the Eiffel Tower", "daily"),
         ("The films of {}", "Danielle Darrieux", "English"),
         ("Fans cheered for {}", "Michael Jordan", "again"),
         ("Few people travel to {}", "France", "Berlin")]
TEMPLATES = ["{}", "Yesterday it rained. {}", "The cat sat on the mat and then. {}"]
LAYER = 1
KW = dict(steps=8, lr=0.1, weight_decay=0.5, kl_factor=0.0625, clamp_norm_factor=4.0)
STOP = {"nll": 6.7, "mpes": 0.0}  # nll: between the requests' NLLs after 1-3 steps (6.5-6.9) and the
# last one's minimum (7.3): they stop at steps 2, 3, 2 and never; mpes: 2, 3, 3 and never
TOL = 1e-5  # |v*| agreement, absolute (v* entries are O(0.1-1); one more Adam step moves them ~1e-1)


@contextmanager
def _sharpened(lm, factor: float = 10.0):
    """Logits ×``factor`` (a hook on the unembedding) while the context is open."""
    handle = get_module(lm.model, lm.spec.unembed).register_forward_hook(lambda m, a, out: out * factor)
    try:
        yield lm
    finally:
        handle.remove()


@pytest.fixture
def sharp(tiny_lm, monkeypatch, tmp_path):
    """tiny_lm with sharpened logits and its statistics cached in a fresh folder; every weight
    restored afterwards."""
    monkeypatch.setenv("NORMGROWTH_CACHE", str(tmp_path))
    saved = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    with _sharpened(tiny_lm):
        yield tiny_lm
    with torch.no_grad():
        for n, p in tiny_lm.model.named_parameters():
            p.copy_(saved[n])


def _requests():
    return [ValueRequest([t.replace("{}", p) for t in TEMPLATES], s, tgt) for p, s, tgt in FACTS]


def _run(lm, reqs, early_stop, **extra):
    module = lm.spec.layer_modules(lm.model)[LAYER]  # as the batch editors: δ on the layer's output
    return optimize_values(lm, LAYER, "mlp_down", reqs, module=module, early_stop=early_stop,
                           nll_stop=STOP[early_stop], **KW, **extra)


def _gaps(one, joint):
    """Largest |v*| difference per request between one-by-one and joint results."""
    return [float((a.v_star - b.v_star).abs().max()) for a, b in zip(one, joint, strict=True)]


@pytest.mark.parametrize("early_stop", ["nll", "mpes"])
@pytest.mark.parametrize("reuse_prefix", [False, True])
@pytest.mark.parametrize("drop_finished", [True, False])
def test_joint_values_equal_one_by_one(sharp, early_stop, reuse_prefix, drop_finished):
    reqs = _requests()
    one = [_run(sharp, [r], early_stop, reuse_prefix=reuse_prefix)[0] for r in reqs]
    joint = _run(sharp, reqs, early_stop, reuse_prefix=reuse_prefix, drop_finished=drop_finished)
    steps = [r.steps for r in one]
    # the requests stop at different steps, and one runs to the end: the freezing is exercised
    assert len(set(steps)) >= 3 and max(steps) == KW["steps"], steps
    assert [r.steps for r in joint] == steps
    for a, b in zip(one, joint):
        assert torch.allclose(a.v_init, b.v_init, atol=1e-6)
        assert abs(a.nll_first - b.nll_first) < 1e-4 and abs(a.nll_last - b.nll_last) < 1e-4
    assert max(_gaps(one, joint)) < TOL
    # the tolerance is tight: one more Adam step on an early-stopped request moves it far beyond it
    early = [i for i, s in enumerate(steps) if s < KW["steps"]]
    for i in early:
        more = optimize_values(sharp, LAYER, "mlp_down", [reqs[i]], module=sharp.spec.layer_modules(sharp.model)[LAYER],
                               early_stop="nll", nll_stop=float("-inf"), **{**KW, "steps": steps[i]})[0]
        assert float((more.v_star - one[i].v_star).abs().max()) > 1000 * TOL
    # the model is left as it was: no stand-ins, no weight made trainable
    assert all(type(m).__name__ != "_Replay" for m in sharp.spec.layer_modules(sharp.model))
    assert not any(p.requires_grad for p in sharp.model.parameters())


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_joint_values_on_each_family(make_tiny, family):
    """The same on tiny models of each family, δ on decoder layer 2's output, the layers below
    replayed and narrowed to the remaining rows as requests finish."""
    lm = make_tiny(family)
    reqs = _requests()
    kw = dict(KW, module=lm.spec.layer_modules(lm.model)[2], reuse_prefix=True, early_stop="nll")
    run = lambda rs, stop, **o: optimize_values(lm, 2, lm.spec.mlp_out, rs, nll_stop=stop, **{**kw, **o})  # noqa: E731
    with _sharpened(lm):
        # the NLL of each request after one step: a threshold in the widest gap between them makes
        # some stop after one step and the others later or never
        after_one = sorted(run([r], float("-inf"), steps=2)[0].nll_last for r in reqs)
        gap = max(range(len(after_one) - 1), key=lambda i: after_one[i + 1] - after_one[i])
        stop = (after_one[gap] + after_one[gap + 1]) / 2
        one = [run([r], stop)[0] for r in reqs]
        joint = run(reqs, stop)
    steps = [r.steps for r in one]
    assert len(set(steps)) >= 2, steps
    assert [r.steps for r in joint] == steps
    assert max(_gaps(one, joint)) < TOL
    assert max(float((r.v_star - r.v_init).abs().max()) for r in one) > 1000 * TOL


class _ZeroGradAdam(torch.optim.Adam):
    """Adam that hands a stopped request a zero gradient instead of none: its momentum keeps
    moving the δ row (the bug the freezing prevents)."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        return super().step(closure)


@pytest.mark.parametrize("drop_finished", [True, False])
def test_an_unfrozen_row_would_be_caught(sharp, monkeypatch, drop_finished):
    """The comparison above fails when a finished request's δ keeps moving."""
    reqs = _requests()
    one = [_run(sharp, [r], "nll")[0] for r in reqs]
    monkeypatch.setattr(torch.optim, "Adam", _ZeroGradAdam)
    joint = _run(sharp, reqs, "nll", drop_finished=drop_finished)
    gaps = _gaps(one, joint)
    assert [r.steps for r in joint] == [r.steps for r in one]  # the stopping itself is unaffected
    assert max(gaps) > 1000 * TOL
    assert gaps[-1] < TOL  # the request that never stopped is unaffected


def test_groups_and_trainable_weights(sharp):
    """``max_requests`` splits the requests into groups (same results); a weight that was
    trainable before is trainable again afterwards, and does not change the result."""
    reqs = _requests()
    whole = _run(sharp, reqs, "nll")
    W = sharp.spec.weight(sharp.model, 3, "mlp_down")
    W.requires_grad_(True)
    try:
        grouped = _run(sharp, reqs, "nll", max_requests=3)
        assert W.requires_grad and W.grad is None
    finally:
        W.requires_grad_(False)
    assert [r.steps for r in grouped] == [r.steps for r in whole]
    assert max(_gaps(whole, grouped)) < TOL


@pytest.mark.parametrize("early_stop", ["nll", "mpes"])
@pytest.mark.parametrize("reuse_prefix", [False, True])
def test_memit_update_with_joint_values_equals_one_by_one(sharp, early_stop, reuse_prefix):
    """A MEMIT call with ``batch_values: true`` (the default on accelerators) makes the same ΔW as with
    ``batch_values: false``, and reports the same steps and losses per request."""
    reqs = [EditRequest(prompt=p, subject=s, target_new=t, target_true="Paris", case_id=i)
            for i, (p, s, t) in enumerate(FACTS)]
    hp = dict(layers=[1, 2], stats_tokens=3000, n_prefix_short=2, n_prefix_long=1, v_steps=KW["steps"],
              v_lr=KW["lr"], clamp_norm_factor=KW["clamp_norm_factor"], nll_stop=STOP[early_stop],
              early_stop=early_stop, mpes_extra_steps=0, reuse_prefix=reuse_prefix, mom2_weight=10.0)
    saved = {l: sharp.spec.weight(sharp.model, l, "mlp_down").clone() for l in (1, 2)}
    results = {}
    for batch_values in (False, True):
        results[batch_values] = make_editor("memit", sharp, batch_values=batch_values, **hp).apply(reqs)
        with torch.no_grad():
            for l, w in saved.items():
                sharp.spec.weight(sharp.model, l, "mlp_down").copy_(w)
    one, joint = results[False], results[True]
    steps = [i["v_steps"] for i in one.info]
    assert len(set(steps)) >= 3, steps
    assert [i["v_steps"] for i in joint.info] == steps
    for a, b in zip(one.info, joint.info):
        assert abs(a["nll_last"] - b["nll_last"]) < 1e-4
        assert abs(a["z_shift_norm"] - b["z_shift_norm"]) < 1e-5 * a["z_shift_norm"]
    for key, delta in one.deltas.items():
        scale = float(delta.abs().max())
        assert scale > 0.1
        assert float((joint.deltas[key] - delta).abs().max()) < 1e-5 * scale, key


def test_batch_values_auto_is_joint_on_accelerators_only(sharp, monkeypatch):
    import repro.editors.memit as memit_mod

    calls = []
    real = memit_mod.optimize_values
    monkeypatch.setattr(memit_mod, "optimize_values", lambda lm, l, m, reqs, **kw: calls.append(len(reqs)) or real(lm, l, m, reqs, **kw))
    reqs = [EditRequest(case_id=i, prompt=p, subject=s, target_new=t, target_true="x") for i, (p, s, t) in enumerate(FACTS[:2])]
    hp = dict(layers=[1, 2], stats_tokens=2000, v_steps=2, n_prefix_short=1, n_prefix_long=1)
    make_editor("memit", sharp, **hp).values(reqs)  # "auto" on the CPU: one request at a time
    assert calls == [1, 1]
    with pytest.raises(ValueError, match="batch_values"):
        make_editor("memit", sharp, batch_values="yes", **hp).values(reqs)
