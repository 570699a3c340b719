"""Activation, subspace and generation-entropy measurements on cases with known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import xarray as xr

from repro.data import Record, Rewrite
from repro.measure.activations import (
    ProbeSet,
    activation_norms,
    collect_activations,
    compare_activations,
    prepare_reference,
    probe_texts,
)
from repro.measure.generation import generate_greedy, generation_entropy, ngram_entropy, word_tokenize
from repro.measure.subspace import (
    Reference,
    linear_cka,
    mean_cosine,
    pca_basis,
    principal_angles,
    project,
    subspace_overlap,
)
from repro.core.models import LoadedModel, get_module, spec_for

TEXTS = [
    "The mother tongue of Danielle Darrieux is",
    "Paris is the capital and most populous city of France, with an estimated population of two million.",
    "Hi",
    "The Eiffel Tower was built for the 1889 World's Fair.",
]


def rng(seed=0):
    return np.random.default_rng(seed)


def orthogonal(d, seed=0):
    q, r = np.linalg.qr(rng(seed).standard_normal((d, d)))
    return q * np.sign(np.diag(r))


# --------------------------------------------------------------------------------------------
# Linear CKA
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,d", [(200, 16), (12, 40)])  # feature-space and kernel-space paths
def test_cka_of_a_matrix_with_itself_rotations_and_scalings_is_one(n, d):
    X = rng().standard_normal((n, d)) * np.linspace(3, 0.1, d)
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X, X @ orthogonal(d)) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(X, 7.5 * X + 3.0) == pytest.approx(1.0, abs=1e-12)  # scale and shift


def test_cka_is_symmetric_and_scale_invariant_on_unrelated_data():
    X, Y = rng(1).standard_normal((100, 8)), rng(2).standard_normal((100, 5)) ** 3
    c = linear_cka(X, Y)
    assert linear_cka(Y, X) == pytest.approx(c, rel=1e-12)
    assert linear_cka(0.01 * X, 40 * Y) == pytest.approx(c, rel=1e-12)


def test_cka_of_independent_random_matrices_is_small():
    X, Y = rng(1).standard_normal((2000, 10)), rng(2).standard_normal((2000, 10))
    assert linear_cka(X, Y) < 0.03  # expectation about d/n = 0.005


def test_cka_known_value_for_half_of_an_isotropic_pair():
    """Two orthogonal, equal-norm, centred columns against the first alone: CKA = 1/√2."""
    # orthonormalise against the constant vector: an orthonormal, mean-zero pair of columns
    ones = np.ones((50, 1)) / math.sqrt(50)
    basis, _ = np.linalg.qr(np.hstack([ones, rng(3).standard_normal((50, 2))]))
    X = basis[:, 1:3]
    assert abs(X.mean(0)).max() < 1e-12
    assert linear_cka(X, X[:, :1]) == pytest.approx(1 / math.sqrt(2), abs=1e-12)


def test_cka_matches_the_hsic_formula_with_a_centring_matrix():
    for n, dx, dy in [(30, 4, 6), (6, 30, 20)]:
        X, Y = rng(n).standard_normal((n, dx)), rng(n + 1).standard_normal((n, dy))
        H = np.eye(n) - 1 / n
        K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H
        expected = np.sum(K * L) / math.sqrt(np.sum(K * K) * np.sum(L * L))
        assert linear_cka(X, Y) == pytest.approx(expected, rel=1e-10)


def test_cka_accepts_torch_float32():
    X = torch.randn(64, 8)
    assert linear_cka(X, X @ torch.tensor(orthogonal(8), dtype=torch.float32)) == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------------------------
# Principal angles, cosines, PCA
# --------------------------------------------------------------------------------------------
def _cloud_in(basis: np.ndarray, n=300, seed=0, scales=None):
    """n points whose centred span is the column span of ``basis`` (d, k)."""
    k = basis.shape[1]
    coef = rng(seed).standard_normal((n, k)) * (np.ones(k) if scales is None else np.asarray(scales))
    return coef @ basis.T + rng(seed + 1).standard_normal(basis.shape[0])  # plus a fixed offset


@pytest.mark.parametrize("n,d,k", [(300, 10, 3), (8, 50, 3)])
def test_principal_angles_of_a_subspace_with_itself_are_zero(n, d, k):
    X = rng().standard_normal((n, d)) * np.linspace(4, 0.2, d)
    ang = principal_angles(X, X, k)
    assert ang.shape == (k,)
    np.testing.assert_allclose(ang, 0, atol=1e-7)
    # a different cloud with the same principal subspace (rescaled, shifted): still 0
    np.testing.assert_allclose(principal_angles(X, -3 * X + 1, k), 0, atol=1e-7)
    assert subspace_overlap(X, X, k) == pytest.approx(1.0, abs=1e-12)


def test_principal_angles_of_orthogonal_subspaces_are_right_angles():
    E = np.eye(10)
    X, Y = _cloud_in(E[:, :3], seed=0), _cloud_in(E[:, 3:6], seed=5)
    np.testing.assert_allclose(principal_angles(X, Y, 3), math.pi / 2, atol=1e-10)
    assert subspace_overlap(X, Y, 3) == pytest.approx(0.0, abs=1e-12)


def test_principal_angles_between_two_planes_tilted_by_a_known_angle():
    t = 0.3
    E = np.eye(6)
    A = E[:, [0, 1]]
    B = np.stack([E[:, 0], math.cos(t) * E[:, 1] + math.sin(t) * E[:, 2]], axis=1)
    X, Y = _cloud_in(A, seed=0, scales=[3, 2]), _cloud_in(B, seed=9, scales=[1, 4])
    ang = principal_angles(X, Y, 2)
    np.testing.assert_allclose(ang, [0.0, t], atol=1e-10)  # ascending
    assert subspace_overlap(X, Y, 2) == pytest.approx((1 + math.cos(t) ** 2) / 2, abs=1e-12)


def test_principal_angles_reject_k_beyond_the_rank_of_centred_data():
    with pytest.raises(ValueError):
        principal_angles(rng().standard_normal((5, 20)), rng(1).standard_normal((5, 20)), 5)


def test_reference_compare_agrees_with_the_standalone_functions():
    X = rng().standard_normal((120, 9)) * np.linspace(3, 0.5, 9)
    Y = X + 0.5 * rng(1).standard_normal((120, 9))
    res = Reference.of(X, 4).compare(Y)
    np.testing.assert_allclose(res["angles"], principal_angles(X, Y, 4), atol=1e-10)
    assert res["cka"] == pytest.approx(linear_cka(X, Y), rel=1e-12)
    assert res["cosine"] == pytest.approx(mean_cosine(X, Y), rel=1e-12)
    assert res["overlap"] == pytest.approx(subspace_overlap(X, Y, 4), rel=1e-12)


def test_mean_cosine_known_values():
    X = rng().standard_normal((20, 7))
    assert mean_cosine(X, X) == pytest.approx(1.0, abs=1e-12)
    assert mean_cosine(X, -X) == pytest.approx(-1.0, abs=1e-12)
    assert mean_cosine(X, 5 * X) == pytest.approx(1.0, abs=1e-12)
    assert mean_cosine([[1.0, 0.0], [1.0, 1.0]], [[0.0, 2.0], [1.0, 1.0]]) == pytest.approx(0.5)


def test_pca_projection_of_a_known_planar_set():
    """A cross stretched along x (variance 2 on x, 0.5 on y), shifted and embedded in 3-D."""
    P = np.array([[-2.0, 0], [2, 0], [0, -1], [0, 1]])
    X = np.hstack([P, np.zeros((4, 1))]) + [5.0, -1.0, 2.0]
    mean, comps = pca_basis(X, 2)
    np.testing.assert_allclose(mean, [5, -1, 2])
    np.testing.assert_allclose(comps, [[1, 0, 0], [0, 1, 0]], atol=1e-12)
    np.testing.assert_allclose(project(X, mean, comps), P, atol=1e-12)
    # a rotated copy of the same set has the same coordinates in its own basis (up to the fixed sign)
    R = orthogonal(3, seed=4)
    m2, c2 = pca_basis(X @ R, 2)
    np.testing.assert_allclose(np.abs(project(X @ R, m2, c2)), np.abs(P), atol=1e-10)


# --------------------------------------------------------------------------------------------
# n-gram entropy
# --------------------------------------------------------------------------------------------
def test_word_tokenize_follows_treebank_conventions():
    assert word_tokenize("I don't know, said Mr. Smith's dog.") == [
        "I", "do", "n't", "know", ",", "said", "Mr.", "Smith", "'s", "dog", "."]
    assert word_tokenize("It cost $1,000; wow! (Really?)") == [
        "It", "cost", "$", "1,000", ";", "wow", "!", "(", "Really", "?", ")"]
    # an initial keeps its period, the text's final period is split off
    assert word_tokenize("J. R. R. Tolkien wrote it. He saw the U.S.") == [
        "J.", "R.", "R.", "Tolkien", "wrote", "it", ".", "He", "saw", "the", "U.S", "."]


def test_ngram_entropy_by_hand():
    # words: the cat the cat the -> bigrams {the cat: 2, cat the: 2}: H2 = 1 bit;
    # trigrams {the cat the: 2, cat the cat: 1}: H3 = log2(3) - 2/3 bits
    h2, h3 = 1.0, math.log2(3) - 2 / 3
    assert ngram_entropy("the cat the cat the") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2, abs=1e-12)
    # all-distinct words: H_n = log2(number of n-grams)
    words = "one two three four five six seven eight nine ten".split()
    expected = (2 / 3 * math.log2(9) + 4 / 3 * math.log2(8)) / 2
    assert ngram_entropy(words) == pytest.approx(expected, abs=1e-12)
    assert ngram_entropy(" ".join(words)) == pytest.approx(expected, abs=1e-12)
    # a loop on one word has no entropy; too short a text counts as 0
    assert ngram_entropy("la la la la la la") == 0.0
    assert ngram_entropy("hello") == 0.0
    # punctuation tokens count: the cat . the cat . -> bigrams {the cat: 2, cat .: 2, . the: 1},
    # trigrams {the cat .: 2, cat . the: 1, . the cat: 1}
    assert ngram_entropy("the cat. the cat.") == pytest.approx(
        (2 / 3 * (-(2 * 0.4 * math.log2(0.4)) - 0.2 * math.log2(0.2))
         + 4 / 3 * (-(1 / 4 * math.log2(1 / 4)) * 2 - 0.5 * math.log2(0.5))) / 2, abs=1e-12)


# --------------------------------------------------------------------------------------------
# Collection on tiny models
# --------------------------------------------------------------------------------------------
def _tiny_family(tokenizer, family: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, GPTJConfig, LlamaConfig

    v = len(tokenizer)
    cfg = {
        "llama": lambda: LlamaConfig(vocab_size=v, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2),
        "gemma3": lambda: Gemma3TextConfig(vocab_size=v, hidden_size=32, intermediate_size=48,
                                           num_hidden_layers=3, num_attention_heads=4,
                                           num_key_value_heads=2, head_dim=8),
        "gpt2": lambda: GPT2Config(vocab_size=v, n_embd=32, n_layer=3, n_head=4, n_positions=128),
        "gptj": lambda: GPTJConfig(vocab_size=v, n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_positions=128),
    }[family]()
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.requires_grad_(False)
    # the post-norms of a fresh Gemma are all-zero-weight identities; make them do something
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    return LoadedModel(family, model, tokenizer, spec_for(model), torch.device("cpu"))


def _hidden_states(lm: LoadedModel, text: str):
    enc = lm.tokenizer(text, return_tensors="pt")
    return lm.model(**enc, output_hidden_states=True).hidden_states, enc["input_ids"].shape[1]


def test_collected_shapes_and_token_bookkeeping(tiny_lm):
    acts = collect_activations(tiny_lm, TEXTS, edited=[(1, "mlp_down"), (2, "attn_o")], batch_size=3)
    lens = [len(tiny_lm.tokenizer(t)["input_ids"]) for t in TEXTS]
    assert lens[2] == 1  # "Hi": nothing left once its first token is skipped
    n = sum(lens) - len(TEXTS)  # the first token of each text is skipped
    L, d = 4, 32
    assert acts.n_tokens == n and acts.n_layers == L
    for site in ("resid", "attn", "mlp"):
        assert acts.streams[site].shape == (L, n, d) and acts.streams[site].dtype == torch.float32
    assert acts.matrices[(1, "mlp_down")]["in"].shape == (n, 64)
    assert acts.matrices[(1, "mlp_down")]["out"].shape == (n, d)
    assert acts.matrices[(2, "attn_o")]["in"].shape == (n, d)
    assert acts.sites == ["resid", "attn", "mlp", "attn_o_in", "attn_o_out", "mlp_down_in", "mlp_down_out"]
    assert acts.get("mlp_down_in", 0) is None
    assert list(np.bincount(acts.text_index, minlength=len(TEXTS))) == [m - 1 for m in lens]
    assert acts.position.min() == 1
    full = collect_activations(tiny_lm, TEXTS, skip_first=False)
    assert full.n_tokens == sum(lens) and (full.position == 0).sum() == len(TEXTS)


def test_residual_stream_is_the_models_hidden_state(tiny_lm):
    acts = collect_activations(tiny_lm, TEXTS, skip_first=False)
    hs, T = _hidden_states(tiny_lm, TEXTS[1])
    rows = acts.text_index == 1
    L = acts.n_layers
    for layer in range(L - 1):
        torch.testing.assert_close(acts.streams["resid"][layer][rows], hs[layer + 1][0], atol=1e-5, rtol=1e-5)
    # Hugging Face reports the last layer after the final norm
    final_norm = get_module(tiny_lm.model, tiny_lm.spec.final_norm)
    torch.testing.assert_close(final_norm(acts.streams["resid"][L - 1][rows]), hs[L][0], atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_activations(tiny_lm):
    batched = collect_activations(tiny_lm, TEXTS, edited=[(1, "mlp_down")], batch_size=4)
    single = collect_activations(tiny_lm, TEXTS, edited=[(1, "mlp_down")], batch_size=1)
    for site in batched.sites:
        for layer in range(batched.n_layers):
            a, b = batched.get(site, layer), single.get(site, layer)
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "gptj"])
def test_residual_stream_is_the_sum_of_the_block_outputs(tiny_lm, family):
    lm = tiny_lm if family == "llama" else _tiny_family(tiny_lm.tokenizer, family)
    acts = collect_activations(lm, TEXTS, skip_first=False)
    hs, _ = _hidden_states(lm, TEXTS[1])
    rows = acts.text_index == 1
    prev = hs[0][0]  # the embeddings (scaled, for Gemma)
    for layer in range(acts.n_layers):
        resid, attn, mlp = (acts.streams[s][layer][rows] for s in ("resid", "attn", "mlp"))
        torch.testing.assert_close(resid, prev + attn + mlp, atol=1e-5, rtol=1e-5)
        assert attn.norm() > 0 and mlp.norm() > 0
        prev = resid


@pytest.mark.parametrize("family,mtype", [("llama", "mlp_down"), ("llama", "attn_q"), ("gpt2", "mlp_out")])
def test_edited_matrix_output_is_its_weight_applied_to_its_input(tiny_lm, family, mtype):
    lm = tiny_lm if family == "llama" else _tiny_family(tiny_lm.tokenizer, family)
    acts = collect_activations(lm, TEXTS, edited=[(1, mtype)])
    x, y = acts.matrices[(1, mtype)]["in"], acts.matrices[(1, mtype)]["out"]
    W = lm.spec.weight(lm.model, 1, mtype)  # (out, in) for every family
    bias = getattr(lm.spec.matrix_module(lm.model, 1, mtype), "bias", None)
    expected = x @ W.T + (0 if bias is None else bias)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_activation_norms(tiny_lm):
    acts = collect_activations(tiny_lm, TEXTS, edited=[(2, "mlp_down")])
    ds = activation_norms(acts)
    assert ds["norm"].dims == ("site", "layer") and ds["share"].dims == ("block", "layer")
    r = acts.streams["resid"][3].double().norm(dim=-1)
    assert ds["norm"].sel(site="resid", layer=3).item() == pytest.approx(r.mean().item(), rel=1e-12)
    m = acts.streams["mlp"][3].double().norm(dim=-1)
    assert ds["share"].sel(block="mlp", layer=3).item() == pytest.approx((m / r).mean().item(), rel=1e-12)
    din = ds["norm"].sel(site="mlp_down_in")
    assert np.isnan(din.sel(layer=1)) and np.isfinite(din.sel(layer=2))
    assert np.isfinite(ds["norm"].sel(site=["resid", "attn", "mlp"])).all()


def test_compare_with_itself_gives_cka_one_and_zero_angles(tiny_lm):
    acts = collect_activations(tiny_lm, TEXTS, edited=[(1, "mlp_down")])
    ds = compare_activations(acts, acts, k=4, pca_subset=10)
    assert ds["angles"].dims == ("site", "layer", "angle")
    assert ds["pca"].dims == ("site", "layer", "point", "pc") and ds.sizes["point"] == 10 and ds.sizes["pc"] == 2
    streams = ds.sel(site=["resid", "attn", "mlp"])
    np.testing.assert_allclose(streams["cka"], 1, atol=1e-9)
    np.testing.assert_allclose(streams["angles"], 0, atol=1e-6)
    np.testing.assert_allclose(streams["overlap"], 1, atol=1e-9)
    np.testing.assert_allclose(streams["cosine"], 1, atol=1e-9)
    np.testing.assert_allclose(streams["pca"], streams["pca_ref"], atol=1e-9)
    edited = ds.sel(site="mlp_down_out")
    assert np.isfinite(edited["cka"].sel(layer=1)) and np.isnan(edited["cka"].sel(layer=0))


def test_compare_sees_a_change_only_from_the_changed_layer_on(tiny_lm, tmp_path):
    spec, model = tiny_lm.spec, tiny_lm.model
    probe = ProbeSet(tuple(TEXTS), ("edit", "general", "general", "general"))
    ref = prepare_reference(collect_activations(tiny_lm, probe, edited=[(2, "mlp_down")]), k=3, pca_subset=12)
    W = spec.weight(model, 2, "mlp_down")
    saved = W.clone()
    steps = []
    try:
        for scale in (1.0, 3.0):
            with torch.no_grad():
                W.copy_(saved * scale)
            steps.append(compare_activations(ref, collect_activations(tiny_lm, probe, edited=[(2, "mlp_down")])))
    finally:
        with torch.no_grad():
            W.copy_(saved)
    ds = steps[1]
    np.testing.assert_allclose(ds["cka"].sel(site="resid", layer=[0, 1]), 1, atol=1e-9)
    np.testing.assert_allclose(ds["cka"].sel(site="mlp_down_in", layer=2), 1, atol=1e-9)  # its input is unchanged
    assert (ds["cka"].sel(site="resid", layer=[2, 3]) < 1 - 1e-4).all()
    # mlp_down's output is scaled 3x: same subspace, CKA 1 and cosine 1 (both scale invariant)
    assert ds["cka"].sel(site="mlp_down_out", layer=2) == pytest.approx(1, abs=1e-9)
    assert ds["cosine"].sel(site="mlp_down_out", layer=2) == pytest.approx(1, abs=1e-9)
    # stacked over checkpoints it round-trips through NetCDF
    stacked = xr.concat(steps, dim="step").assign_coords(step=[0, 10])
    path = tmp_path / "acts.nc"
    stacked.to_netcdf(path, engine="netcdf4")
    back = xr.load_dataset(path, engine="netcdf4")
    np.testing.assert_allclose(back["cka"], stacked["cka"])
    assert list(back["point_kind"].values) == list(stacked["point_kind"].values)
    assert set(back["point_kind"].values) <= {"edit", "general"}


def test_compare_rejects_other_probe_tokens(tiny_lm):
    a = collect_activations(tiny_lm, TEXTS[:2])
    b = collect_activations(tiny_lm, TEXTS[1:3])
    with pytest.raises(ValueError):
        compare_activations(a, b, k=2, pca_subset=4)


def test_probe_texts():
    recs = [
        Record(i, Rewrite("The capital of {} is", f"Country{i}", "Rome", "Paris"), [], [], [])
        for i in range(10)
    ]
    wiki = [f"Paragraph {i} " + "word " * 200 for i in range(30)]
    probe = probe_texts(recs, wiki, n_edit=4, n_general=3, seed=1, max_chars=50)
    assert probe.kinds == ("edit",) * 4 + ("general",) * 3
    assert all(t.startswith("The capital of Country") and t.endswith(" is") for t in probe.texts[:4])
    assert all(len(t) <= 50 and t.startswith("Paragraph") for t in probe.texts[4:])
    assert probe == probe_texts(recs, wiki, n_edit=4, n_general=3, seed=1, max_chars=50)
    assert len(probe_texts(recs[:2], wiki, n_edit=4, n_general=3)) == 5


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
def test_generation_is_deterministic_and_padding_free(tiny_lm):
    prompts = ["The mother tongue of Danielle Darrieux is", "Hi", "Paris is the capital of"]
    a, texts = generation_entropy(tiny_lm, prompts, max_new_tokens=12, batch_size=3, return_texts=True)
    b = generation_entropy(tiny_lm, prompts, max_new_tokens=12, batch_size=3)
    assert a.shape == (3,) and np.isfinite(a).all() and (a >= 0).all()
    np.testing.assert_array_equal(a, b)
    assert all(t.startswith(p) for t, p in zip(texts, prompts))
    # left padding must not change a greedy continuation
    assert generate_greedy(tiny_lm, prompts, 12, batch_size=3) == generate_greedy(tiny_lm, prompts, 12, batch_size=1)
    assert tiny_lm.tokenizer.padding_side == "right"  # restored
