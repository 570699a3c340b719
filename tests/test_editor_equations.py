"""The editors the reference wheel lacks (r-ROME, EMMET, AlphaEdit, ENCORE, and MEMIT and EMMET with
earlier keys), checked on their full editor path against their papers' equations, written out here
independently of ``repro.editors.linalg`` (explicit inverses where the package solves).

Each batch editor runs two batches in sequence on a tiny random model; its ``update`` is watched to
record the residuals R and keys K each layer received and the ΔW it returned, and the ΔW of the
second batch is recomputed from the equation with the earlier keys K_p of the first batch as the
test recorded them (so the kept Gram matrix is checked too). The line-by-line comparison with the
authors' code is ``docs/editor_fidelity.md``.
"""
from __future__ import annotations

import pytest
import torch

from repro.data.counterfact import EditRequest
from repro.editors import make_editor
from repro.editors.linalg import threshold_from_spectrum

TINY = {"layers": [1, 2], "stats_tokens": 3000, "v_steps": 3}
BATCHES = [
    [EditRequest(case_id=1, prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome", target_true="Paris"),
     EditRequest(case_id=2, prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English",
                 target_true="French")],
    [EditRequest(case_id=3, prompt="{} plays the sport of", subject="LeBron James", target_new="football",
                 target_true="basketball"),
     EditRequest(case_id=4, prompt="The capital of {} is", subject="Norway", target_new="Lisbon", target_true="Oslo")],
]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """One statistics cache for the module (the tiny model's C of each layer is collected once)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NORMGROWTH_CACHE", str(tmp_path_factory.mktemp("equations-cache")))
        yield


@pytest.fixture
def tiny(tiny_lm, tiny_cache):
    saved = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    yield tiny_lm
    with torch.no_grad():
        for n, p in tiny_lm.model.named_parameters():
            p.copy_(saved[n])


def watch(editor):
    """Record (layer, R, K, ΔW) of every call of ``editor.update``."""
    calls = []
    real = editor.update

    def update(layer, R, K):
        delta = real(layer, R, K)
        calls.append((layer, R.double().clone(), K.double().clone(), delta.double().clone()))
        return delta

    editor.update = update
    return calls


def two_batches(tiny, name, **hp):
    editor = make_editor(name, tiny, **TINY, **hp)
    calls = watch(editor)
    editor.apply(BATCHES[0])
    first = {layer: K for layer, _, K, _ in calls}
    calls.clear()
    editor.apply(BATCHES[1])
    return editor, first, calls


def close(ours, expected, what, tol=1e-8):
    rel = float((ours - expected).norm() / expected.norm())
    assert expected.norm() > 0 and rel < tol, f"{what}: relative difference {rel:.2e}"


def inv(A):
    return torch.linalg.inv(A.double())


@pytest.mark.parametrize("prev_keys", [False, True])
def test_memit_update_is_the_papers(tiny, prev_keys):
    """MEMIT (Meng et al. 2023, eq. 14): ΔW = R Kᵀ (λC + KKᵀ)⁻¹; with earlier keys, as ENCORE's
    repository runs it in sequence: (λC + K_pK_pᵀ + KKᵀ)⁻¹."""
    editor, first, calls = two_batches(tiny, "memit", mom2_weight=50.0, prev_keys=prev_keys)
    for layer, R, K, delta in calls:
        A = 50.0 * editor.C(layer) + K @ K.T + (first[layer] @ first[layer].T if prev_keys else 0)
        close(delta, R @ K.T @ inv(A), f"MEMIT layer {layer}")


@pytest.mark.parametrize("prev_keys", [False, True])
def test_emmet_update_is_the_papers(tiny, prev_keys):
    """EMMET (Gupta et al. 2024): with A = λC (+ K_pK_pᵀ), ΔW = R (Kᵀ A⁻¹ K + ηI)⁻¹ Kᵀ A⁻¹; λ reaches
    the update (a different λ gives a different ΔW when η > 0)."""
    editor, first, calls = two_batches(tiny, "emmet", mom2_weight=50.0, eta=0.1, prev_keys=prev_keys)
    for layer, R, K, delta in calls:
        A = 50.0 * editor.C(layer) + (first[layer] @ first[layer].T if prev_keys else 0)
        Ai = inv(A)
        D = K.T @ Ai @ K + 0.1 * torch.eye(K.shape[1], dtype=torch.float64)
        close(delta, R @ inv(D) @ K.T @ Ai, f"EMMET layer {layer}")
    layer, R, K, delta = calls[0]
    other = make_editor("emmet", tiny, **TINY, mom2_weight=5000.0, eta=0.1, prev_keys=prev_keys)
    other.prev_gram = editor.prev_gram
    assert (other.update(layer, R, K) - delta).norm() > 1e-6 * delta.norm()


def test_emmet_single_edit_has_no_ridge(tiny):
    """η enters only for batches of more than one edit (the authors' emmet_main): one edit is the
    exact equality-constrained solution, (W + ΔW) k = v at the key."""
    editor = make_editor("emmet", tiny, **TINY, mom2_weight=50.0, eta=0.1)
    calls = watch(editor)
    editor.apply(BATCHES[0][:1])
    for layer, R, K, delta in calls:
        close(delta @ K, R, f"EMMET single edit, layer {layer}")


def test_alphaedit_update_is_the_papers(tiny):
    """AlphaEdit (Fang et al. 2025, eq. 18 with the kept keys): P projects on the eigenvectors of C
    with eigenvalues below the threshold; ΔW = R Kᵀ P (K_pK_pᵀ P + KKᵀ P + αI)⁻¹."""
    editor, first, calls = two_batches(tiny, "alphaedit", l2=10.0, null_energy=0.3)
    for layer, R, K, delta in calls:
        evals, evecs = torch.linalg.eigh(editor.C(layer).double())
        U = evecs[:, evals < threshold_from_spectrum(evals, 0.3)]  # the package's choice of threshold
        P = U @ U.T
        assert 0 < U.shape[1] < U.shape[0]
        S = first[layer] @ first[layer].T + K @ K.T
        close(delta, R @ K.T @ P @ inv(S @ P + 10.0 * torch.eye(P.shape[0], dtype=torch.float64)),
              f"AlphaEdit layer {layer}")
        # the projector is onto eigenvectors of C: it commutes with C and is idempotent
        C = editor.C(layer).double()
        assert torch.allclose(P @ P, P, atol=1e-8) and torch.allclose(P @ C, C @ P, atol=1e-6 * float(C.norm()))


@pytest.mark.parametrize("prev_keys", [True, False])
def test_encore_update_is_the_papers(tiny, prev_keys):
    """ENCORE (Gupta et al. 2025): ΔW = R Kᵀ (λC + λ_n I + K_pK_pᵀ + KKᵀ)⁻¹, earlier keys unscaled."""
    editor, first, calls = two_batches(tiny, "encore", mom2_weight=50.0, norm_weight=3.0, prev_keys=prev_keys)
    for layer, R, K, delta in calls:
        C = editor.C(layer).double()
        A = 50.0 * C + 3.0 * torch.eye(C.shape[0], dtype=torch.float64) + K @ K.T
        if prev_keys:
            A = A + first[layer] @ first[layer].T
        close(delta, R @ K.T @ inv(A), f"ENCORE layer {layer}")


@pytest.mark.parametrize("name", ["rome", "r-rome"])
def test_rome_family_update_is_the_papers(tiny, name):
    """ROME (Meng et al. 2022, eq. 2): ΔW = (v* − W k − b)(C⁻¹k̄)ᵀ / ((C⁻¹k̄)ᵀ k) with k the plain
    prompt's key; r-ROME (Gupta et al. 2024) puts k̄, the flat mean over every template (the plain
    one included), in place of k. Either way the edited matrix maps that key to v*."""
    editor = make_editor(name, tiny, layer=1, stats_tokens=3000, v_steps=3)
    W = tiny.spec.weight(tiny.model, 1, editor.mtype)
    W0 = W.detach().double().clone()
    result = editor.apply(BATCHES[0][:1])
    info = result.info[0]
    from repro.editors.locate import subject_keys

    req = BATCHES[0][0]
    prompts = [t.replace("{}", req.prompt) for t in editor.templates]
    with torch.no_grad():
        W.copy_(W0.to(W.dtype))  # the keys under the unedited weights
        keys = subject_keys(tiny, 1, editor.mtype, prompts, req.subject).double()
    k_avg = keys.mean(0)
    k = k_avg if name == "r-rome" else keys[0]
    u = inv(editor.C) @ k_avg
    expected = torch.outer(info["v_star"].double() - W0 @ k, u) / (u @ k)
    close(result.deltas[f"1:{editor.mtype}"].double(), expected, name, tol=1e-6)  # applied in float32
    close((W0 + expected) @ k, info["v_star"].double(), f"{name} maps its key to v*")


def test_memit_keys_are_averaged_per_kind_of_template(tiny):
    """MEMIT's compute_ks: a key is the mean over the kinds of template of each kind's mean key,
    i.e. ½ k(plain) + ½ mean(k(prefixed)) with the published templates; ``key_average: flat`` is one
    mean over all. Templates that do not match the settings' counts are refused, not averaged."""
    from repro.editors.locate import subject_keys

    editor = make_editor("memit", tiny, **TINY)  # "{}" + 5 prefixes of ≤10 tokens
    assert len(editor.templates) == 6 and editor.template_groups() == [(0, 1), (1, 6)]
    req = BATCHES[0][0]
    prompts = [t.replace("{}", req.prompt) for t in editor.templates]
    keys = subject_keys(tiny, 1, editor.mtype, prompts, req.subject).double()
    close(editor._keys(1, [req])[:, 0], 0.5 * keys[0] + 0.5 * keys[1:].mean(0), "per kind")
    flat = make_editor("memit", tiny, **TINY, key_average="flat")
    flat._templates = editor.templates
    close(flat._keys(1, [req])[:, 0], keys.mean(0), "flat")
    editor._templates = editor.templates[:3]
    with pytest.raises(ValueError, match="3 context templates do not match"):
        editor._keys(1, [req])
