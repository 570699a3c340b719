"""The contract every registered editor keeps, checked on the tiny random model for each entry of
the registry (a new editor is picked up automatically, and fails here until it has cheap settings
in CHEAP): an edit changes only the matrices ``edited_matrices()`` names, its ``state_dict``
survives a save/load into a fresh editor, and a sequence resumed from saved weights and state
ends where the uninterrupted one does."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from repro.data.counterfact import EditRequest
from repro.editors import REGISTRY, make_editor
from repro.editors.base import load_hparams
from repro.editors.mend import MEND, MENDNet, save_mend

PREFIXES = {"n_prefix_short": 2, "n_prefix_long": 1}
# Cheap settings per registry key: a few optimisation steps, a rough C, few context prefixes.
CHEAP = {
    "rome": {"layer": 1, "v_steps": 2, "stats_tokens": 2000, **PREFIXES},
    "r-rome": {"layer": 1, "v_steps": 2, "stats_tokens": 2000, **PREFIXES},
    "memit": {"layers": [1, 2], "v_steps": 2, "stats_tokens": 2000, **PREFIXES},
    "emmet": {"layers": [1, 2], "v_steps": 2, "stats_tokens": 2000, **PREFIXES},
    "alphaedit": {"layers": [1, 2], "v_steps": 2, "stats_tokens": 2000, **PREFIXES},
    "encore": {"layers": [1, 2], "v_steps": 2, "stats_tokens": 2000, **PREFIXES},
    "ft-l": {"layer": 1, "steps": 2, "lr": 1e-2},
    "ft-m": {"layer": 1, "steps": 2, "lr": 1e-2},
    "lora": {"layers": [1], "steps": 2, "lr": 1e-2, "loss_stop": 0.0},
    "mend": {"layers": [-2, -1], "mtypes": ["mlp_in", "mlp_out"], "rank": 4, "n_blocks": 1},
}
# Resumed (a) and uninterrupted (b) weights may differ by float rounding only: per edited matrix
# ‖a − b‖ ≤ RTOL · ‖b − W₀‖, relative to the sequence's whole change from the unedited W₀ (not to
# ‖W₀‖: edits of the tiny model are 1e-5-1e-3 of it, so a lost state would hide in that).
RTOL = 1e-6

REQUESTS = [
    EditRequest(case_id=1, prompt="{} is located in", subject="The Eiffel Tower",
                target_new="Rome", target_true="Paris"),
    EditRequest(case_id=2, prompt="The mother tongue of {} is", subject="Danielle Darrieux",
                target_new="English", target_true="French"),
    EditRequest(case_id=3, prompt="{} plays the", subject="Miles Davis",
                target_new="piano", target_true="trumpet"),
]


@pytest.fixture
def fresh(tiny_lm, monkeypatch, tmp_path):
    """A factory of independent copies of the unedited tiny model (statistics cached in a fresh
    folder); the session's ``tiny_lm`` itself is never edited."""
    monkeypatch.setenv("NORMGROWTH_CACHE", str(tmp_path / "cache"))
    return lambda: dataclasses.replace(tiny_lm, model=copy.deepcopy(tiny_lm.model))


def settings(key: str, lm, tmp_path) -> dict:
    assert key in CHEAP, f"add cheap tiny-model settings for the new editor {key!r} to CHEAP"
    out = dict(CHEAP[key])
    if key == "mend":  # a freshly initialised network (g = identity, α = 1e-2), saved as weights
        path = tmp_path / "mend_tiny.pt"
        if not path.exists():
            hp = load_hparams(MEND.hparams_class, "mend", lm, {**out, "alpha_init": 1e-2})
            save_mend(path, MENDNet.for_model(lm, hp), hp, lm.name)
        out["weights"] = str(path)
    return out


def build(key: str, lm, tmp_path):
    return make_editor(key, lm, **settings(key, lm, tmp_path))


def edited_weights(editor) -> list[torch.Tensor]:
    lm = editor.lm
    return [lm.spec.weight(lm.model, l, m).detach().clone() for l, m in editor.edited_matrices()]


def same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same_state, a, b))
    return a == b


KEYS = list(REGISTRY)


@pytest.mark.parametrize("key", KEYS)
def test_apply_changes_only_the_edited_matrices(key, fresh, tmp_path):
    lm = fresh()
    editor = build(key, lm, tmp_path)
    edited = {lm.spec.weight(lm.model, l, m).data_ptr() for l, m in editor.edited_matrices()}
    before = {n: t.clone() for n, t in lm.model.state_dict().items()}
    result = editor.apply(REQUESTS[:2])
    after = lm.model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, f"{key} changed no weight"
    for name in changed:
        assert after[name].data_ptr() in edited, f"{key} changed {name}, not in edited_matrices()"
    touched = {after[n].data_ptr() for n in changed}
    assert touched == edited, f"{key}: matrices named but left unchanged"
    assert set(result.deltas) == {f"{l}:{m}" for l, m in editor.edited_matrices()}


@pytest.mark.parametrize("key", KEYS)
def test_state_dict_round_trip(key, fresh, tmp_path):
    lm = fresh()
    editor = build(key, lm, tmp_path)
    for request in REQUESTS[:2]:
        editor.apply([request])
    state = editor.state_dict()
    torch.save(state, tmp_path / "state.pt")  # as a run's resume file carries it
    other = build(key, fresh(), tmp_path)
    other.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    assert same_state(other.state_dict(), state)


@pytest.mark.parametrize("key", KEYS)
def test_resume_ends_where_the_uninterrupted_sequence_does(key, fresh, tmp_path):
    straight = build(key, fresh(), tmp_path)
    unedited = edited_weights(straight)
    for request in REQUESTS:
        straight.apply([request])

    first = build(key, fresh(), tmp_path)
    for request in REQUESTS[:2]:
        first.apply([request])
    torch.save({"weights": edited_weights(first), "editor": first.state_dict()}, tmp_path / "resume.pt")
    saved = torch.load(tmp_path / "resume.pt", weights_only=False)

    # as repro.runs.sequential resumes: a fresh editor on the unedited model prepares its statistics,
    # then the saved edited matrices and editor state are put back
    lm = fresh()
    resumed = build(key, lm, tmp_path)
    resumed.prepare()
    with torch.no_grad():
        for (l, m), w in zip(resumed.edited_matrices(), saved["weights"]):
            lm.spec.weight(lm.model, l, m).copy_(w)
    resumed.load_state_dict(saved["editor"])
    resumed.apply([REQUESTS[2]])

    for (l, m), a, b, w0 in zip(straight.edited_matrices(), edited_weights(resumed), edited_weights(straight), unedited):
        gap = float(torch.linalg.vector_norm((a - b).double()))
        change = float(torch.linalg.vector_norm((b - w0).double()))
        assert change > 0, f"{key} left {l}:{m} unchanged"
        assert gap <= RTOL * change, f"{key} {l}:{m}: resumed differs by {gap} (change {change})"
