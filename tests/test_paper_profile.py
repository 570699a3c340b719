"""The ``paper`` profile: GPT2-XL, GPT-J-6B and Llama-3-8B with the published settings. It cannot run
here (no hub, no GPU), so its code paths run on tiny random models of the three families with the
real models' layer counts: every (editor, model) cell of the profile loads its published
hyperparameters for that architecture, and one short run per family goes through the sequential
editing notebook itself."""
from __future__ import annotations

import json

import pytest
import torch

from repro import study
from repro.editors import make_editor
from repro.core.models import LoadedModel, spec_for

# the papers' models: (family, layers) of the real ones
PAPER_MODELS = {"gpt2-xl": ("gpt2", 48), "EleutherAI/gpt-j-6b": ("gptj", 28), "meta-llama/Meta-Llama-3-8B": ("llama", 32)}
TINY = {"v_steps": 2, "stats_tokens": 1000, "n_prefix_short": 1, "n_prefix_long": 1}


def tiny(tokenizer, family: str, n_layers: int, name: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, GPT2Config, GPTJConfig, LlamaConfig

    common = dict(vocab_size=len(tokenizer))
    if family == "gpt2":
        cfg = GPT2Config(n_embd=16, n_layer=n_layers, n_head=2, n_positions=512, **common)
    elif family == "gptj":
        cfg = GPTJConfig(n_embd=16, n_layer=n_layers, n_head=2, rotary_dim=4, n_positions=512, **common)
    else:
        cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=n_layers, num_attention_heads=2,
                          num_key_value_heads=1, max_position_embeddings=512, **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, spec=spec_for(model), device=torch.device("cpu"))


@pytest.fixture(scope="module")
def paper_runs():
    return study.load_profile("paper")


def test_the_paper_profile_expands_and_only_waits_for_the_data_sets(paper_runs):
    assert len(paper_runs) == 75 and len({r.id for r in paper_runs}) == 75
    problems = study.invalid_runs(paper_runs)
    assert problems and all("data/counterfact/" in p and "does not exist" in p for p in problems)
    editors = {r.parameters.get("editor") for r in paper_runs} - {None}
    assert editors == {"rome", "r-rome", "ft-l", "ft-m", "mend", "memit", "emmet", "alphaedit", "encore"}
    mend = next(r for r in paper_runs if r.id == "mend_llama-3-8b_n3000_s0")
    assert mend.parameters["hparams"] == {"weights": "data/runs/paper/mend_llama-3-8b.pt"}
    assert not any(r.id.startswith("encore_gpt-j") for r in paper_runs)  # no published setting


@pytest.mark.parametrize("model", sorted(PAPER_MODELS))
def test_every_cell_loads_its_published_settings_on_the_architecture(tiny_lm, paper_runs, model):
    family, n_layers = PAPER_MODELS[model]
    lm = tiny(tiny_lm.tokenizer, family, n_layers, model)
    editors = sorted({r.parameters["editor"] for r in paper_runs
                      if r.parameters.get("model") == model and r.parameters.get("editor") not in (None, "mend")})
    made = {e: make_editor(e, lm) for e in editors}
    assert all(made[e].edited_matrices() for e in editors)
    published = {  # spot checks against the cited files
        "gpt2-xl": {"rome": [("layer", 17), ("n_prefix_short", 10), ("n_prefix_long", 10)],
                    "memit": [("mom2_weight", 20000.0), ("prev_keys", False), ("n_prefix_long", 5)],
                    "encore": [("norm_weight", 10.0), ("prev_keys", True)],
                    "emmet": [("mom2_weight", 10000.0), ("prev_keys", True)],
                    "alphaedit": [("null_threshold", 0.02)], "ft-l": [("norm_constraint", 5e-4)],
                    "ft-m": [("norm_constraint", 5e-4)]},
        "EleutherAI/gpt-j-6b": {"rome": [("layer", 5)], "emmet": [("mom2_weight", 100000.0), ("prev_keys", True)],
                                "ft-l": [("norm_constraint", 5e-5)], "ft-m": [("norm_constraint", None)]},
        "meta-llama/Meta-Llama-3-8B": {"rome": [("v_weight_decay", 0.001), ("mom2_adjustment", False)],
                                       "encore": [("mpes_extra_steps", 1)], "alphaedit": [("v_lr", 0.1)],
                                       "memit": [("prev_keys", True)]},
    }[model]
    for editor, checks in published.items():
        for field, value in checks:
            assert getattr(made[editor].hp, field) == value, (model, editor, field)
        # every value optimisation in the profile is the published one
        if hasattr(made[editor].hp, "v_weight_decay_form"):
            hp = made[editor].hp
            assert (hp.v_weight_decay_form, hp.kl_form) == ("norm", "published"), (model, editor)


@pytest.mark.parametrize("model", sorted(PAPER_MODELS))
def test_a_short_run_per_family_goes_through_the_notebook(tiny_lm, tmp_path, model):
    """ROME (one matrix) and MEMIT (batches over five or six layers) with the model's published
    layers, on the tiny model saved under the paper model's name, through papermill."""
    import papermill as pm

    from repro.core.paths import ROOT
    from repro.core.store import read_netcdf

    family, n_layers = PAPER_MODELS[model]
    lm = tiny(tiny_lm.tokenizer, family, n_layers, model)
    path = tmp_path / "model"
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    layers = make_editor("memit", lm).hp.layers  # the published layers, read for this name
    for editor, hp in (("rome", dict(TINY, layer=make_editor("rome", lm).hp.layer)),
                       ("memit", dict(TINY, layers=layers))):
        out = tmp_path / f"{editor}.nc"
        params = dict(model=str(path), editor=editor, n_edits=2, batch_size=2 if editor == "memit" else 1,
                      measure_every=0, hparams=hp, output=str(out))
        pm.execute_notebook(str(ROOT / "notebooks" / "sequential_editing.ipynb"), str(tmp_path / f"{editor}.ipynb"),
                            parameters=params, cwd=str(ROOT), kernel_name="python3", progress_bar=False)
        ds = read_netcdf(out)
        assert ds.sizes["edit"] == 2 and ds.attrs["stop_reason"] == "completed"
        assert json.loads(ds.attrs["edited_matrices"]) == [f"{l}:{lm.spec.mlp_out}" for l in hp.get("layers", [hp.get("layer")])]
