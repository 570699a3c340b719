"""Architecture specs on tiny randomly initialised models of each family, and model loading errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTJConfig, LlamaConfig

from repro.core.models import (
    PACKAGED, SPECS, LoadedModel, copy_weights, load_model, put_weights, resolve_device, spec_for,
)


def tiny_configs():
    from transformers import Gemma3TextConfig

    common = dict(vocab_size=97)
    return {
        "llama": LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, **common),
        "gemma3": Gemma3TextConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   final_logit_softcapping=30.0, **common),
        "gpt2": GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64, **common),
        "gptj": GPTJConfig(n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_positions=64, **common),
    }


@pytest.fixture(params=sorted(SPECS))
def tiny(request):
    torch.manual_seed(0)
    cfg = tiny_configs()[request.param]
    return request.param, AutoModelForCausalLM.from_config(cfg).eval()


def test_family_is_detected(tiny):
    family, model = tiny
    assert spec_for(model).family == family


def test_every_matrix_resolves_with_out_in_shape(tiny):
    family, model = tiny
    spec = spec_for(model)
    d = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    assert spec.n_layers(model) == 3
    for layer in range(3):
        for mtype in spec.matrices:
            w = spec.weight(model, layer, mtype)
            assert w.ndim == 2
        # the MLP output matrix writes to the residual stream: (d_model, d_ff)
        assert spec.weight(model, layer, spec.mlp_out).shape[0] == d
        for mtype in spec.mlp_in:
            assert spec.weight(model, layer, mtype).shape[1] == d
        assert spec.weight(model, layer, spec.attn_out).shape[0] == d


def test_weight_view_shares_storage(tiny):
    """Editing the (out, in) view must edit the model (GPT-2's Conv1D is stored transposed)."""
    _, model = tiny
    spec = spec_for(model)
    x = torch.randn(2, 5, spec.weight(model, 1, spec.mlp_out).shape[1])
    module = spec.matrix_module(model, 1, spec.mlp_out)
    before = module(x)
    with torch.no_grad():
        spec.weight(model, 1, spec.mlp_out)[0, 0] += 1.0
    after = module(x)
    assert torch.allclose(after[..., 0] - before[..., 0], x[..., 0], atol=1e-5)
    assert torch.allclose(after[..., 1:], before[..., 1:])


def test_weights_copied_out_and_put_back(tiny):
    """copy_weights takes detached copies of (out, in) views (also of GPT-2's transposed Conv1D);
    put_weights restores them in place, leaving every other weight alone."""
    _, model = tiny
    spec = spec_for(model)
    lm = LoadedModel(name="tiny", model=model, tokenizer=None, spec=spec, device=torch.device("cpu"))
    matrices = [(0, spec.mlp_out), (2, spec.attn_out)]
    before = {n: t.clone() for n, t in model.state_dict().items()}
    saved, on_cpu = copy_weights(lm, matrices), copy_weights(lm, matrices, cpu=True)
    with torch.no_grad():
        for layer, mtype in matrices:
            spec.weight(model, layer, mtype).mul_(2.0)
    assert all(torch.equal(a, spec.weight(model, l, m) / 2.0) for (l, m), a in zip(matrices, saved))
    put_weights(lm, matrices, on_cpu)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    with pytest.raises(ValueError):  # one weight per matrix
        put_weights(lm, matrices, saved[:1])


def test_logits_from_base_match_full_forward(tiny):
    _, model = tiny
    spec = spec_for(model)
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        hidden = spec.base_model(model)(input_ids=ids).last_hidden_state
        assert torch.allclose(spec.logits(model, hidden), full, atol=1e-5)


def test_submodule_paths(tiny):
    _, model = tiny
    spec = spec_for(model)
    for which in ("mlp", "attn", "layer"):
        assert model.get_submodule(spec.submodule_path(2, which)) is not None
    assert model.get_submodule(spec.final_norm) is not None


def test_unknown_matrix_type_is_a_clear_error(tiny):
    _, model = tiny
    with pytest.raises(KeyError, match="known"):
        spec_for(model).matrix_path(0, "nope")


def test_unknown_model_name_lists_known_ones(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as err:
        load_model("no-such-model-anywhere")
    for name in PACKAGED:
        assert name in str(err.value)


def test_an_unknown_name_fails_at_once_without_hub_retries(monkeypatch):
    import time

    from repro.core import models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=2.0: False)  # as on a machine without a hub
    t = time.perf_counter()
    with pytest.raises(ValueError, match="not reachable") as err:
        models.model_source("someone/no-such-model")
    assert time.perf_counter() - t < 1.0 and "smollm2-135m" in str(err.value)
    monkeypatch.setattr(models, "_hub_cached", lambda repo_id: repo_id == "someone/cached")
    assert models.model_source("someone/cached") == "someone/cached"  # a cached hub id is still fine


def test_unsupported_architecture_is_a_clear_error():
    model = torch.nn.Linear(2, 2)
    model.config = type("C", (), {"model_type": "bert"})()
    with pytest.raises(ValueError, match="no architecture spec"):
        spec_for(model)


def test_device_choice(monkeypatch):
    monkeypatch.delenv("NORMGROWTH_DEVICE", raising=False)
    assert resolve_device("cpu").type == "cpu"
    monkeypatch.setenv("NORMGROWTH_DEVICE", "cpu")
    assert resolve_device().type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")


def test_packaged_model_loads_with_spec(smollm):
    assert smollm.spec.family == "llama"
    assert smollm.n_layers == 30
    assert smollm.spec.weight(smollm.model, 0, "mlp_down").shape == (576, 1536)
    assert not any(p.requires_grad for p in smollm.model.parameters())


def test_auto_placement_loads_through_accelerate_and_edits_the_same(tiny_dir, monkeypatch, tmp_path):
    """``device="auto"`` goes through accelerate's device_map placement. Here, with one device, the
    placement is trivial, so a ROME edit must give the same update as on a plainly loaded model
    (what this cannot show is a model split over several GPUs: that needs the hardware)."""
    from repro.data.counterfact import EditRequest
    from repro.editors import make_editor

    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("NORMGROWTH_CACHE", str(tmp_path / "cache"))
    seen, real = [], AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: seen.append(k.get("device_map")) or real(*a, **k))
    placed = load_model(tiny_dir, device="auto")
    plain = load_model(tiny_dir, device="cpu")
    assert seen == ["auto", None]
    assert placed.device == placed.model.get_input_embeddings().weight.device
    req = EditRequest(case_id=0, prompt="{} is located in", subject="Paris", target_new="Rome", target_true="France")
    hp = {"layer": 1, "v_steps": 3, "stats_tokens": 2000, "n_prefix_short": 1, "n_prefix_long": 1}
    deltas = [next(iter(make_editor("rome", lm, **hp).apply([req]).deltas.values())) for lm in (placed, plain)]
    torch.testing.assert_close(deltas[0], deltas[1], rtol=1e-5, atol=1e-7)


class _FakeSaved:
    """Stands in for a dequantized model or tokenizer: save_pretrained writes one file."""

    def __init__(self, fname):
        self.fname, self.config, self.hf_quantizer = fname, object(), None

    def save_pretrained(self, d):
        (d / self.fname).write_text("{}")


def _race(tmp_path, monkeypatch, winner_files):
    import types

    import transformers

    from repro.core import models

    target = tmp_path / "cache" / "m"
    target.mkdir(parents=True)
    for f in winner_files:  # what the other process put in place first
        (target / f).write_text("winner")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: _FakeSaved("config.json"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: _FakeSaved("tokenizer.json"))
    monkeypatch.setitem(models.PACKAGED, "m", types.SimpleNamespace(gguf_path=lambda: tmp_path / "w.gguf"))
    return models, target


def test_a_cache_finished_by_another_process_is_used(tmp_path, monkeypatch):
    """Two runs started together both dequantize the packaged model; the one that renames its copy
    into place second finds the target taken and uses the winner's copy instead of failing."""
    models, target = _race(tmp_path, monkeypatch, ["config.json", "model.safetensors"])
    models._dequantize_to_cache("m", target)
    assert (target / "config.json").read_text() == "winner"
    assert list(target.parent.iterdir()) == [target]  # no temporary copy left behind


def test_a_half_written_cache_in_the_way_is_an_error(tmp_path, monkeypatch):
    models, target = _race(tmp_path, monkeypatch, ["model.safetensors"])  # no config.json: not a cache
    with pytest.raises(OSError):
        models._dequantize_to_cache("m", target)
    assert list(target.parent.iterdir()) == [target]


def test_the_kv_cache_goes_under_the_name_the_model_takes():
    from types import SimpleNamespace

    import torch

    from repro.core.models import cache_kwargs, returned_cache

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=False):
            return input_ids

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, use_cache=False):
            return input_ids

    marker = object()
    assert cache_kwargs(Old(), marker) == {"past_key_values": marker}
    assert cache_kwargs(New(), marker) == {"cache": marker}
    assert returned_cache(SimpleNamespace(past_key_values=marker)) is marker
    assert returned_cache(SimpleNamespace(cache=marker, past_key_values=None)) is marker


def _fake_assemble(calls, content=b"whole file", fail=False):
    """Stands in for a weights package's ``assemble(path)``: checks a file that is there, else
    writes it block by block (as the real one does) and checks it."""

    def assemble(path):
        path = Path(path)
        calls.append(path)
        if path.exists():
            if path.read_bytes() != content:
                raise FileExistsError(f"{path} already exists with an unexpected sha256")
            return path
        with path.open("wb") as f:
            f.write(content[:4])  # a reader arriving now would see a half-written file
            if fail:
                raise ValueError("checksum did not match")
            f.write(content[4:])
        return path

    return assemble


def test_assembled_weights_appear_whole_or_not_at_all(tmp_path):
    """Two runs starting side by side on a fresh machine both assemble the chunked GGUF. The file
    is written under a private name and renamed into place, so the target never holds half a file."""
    from repro.core import models

    target = tmp_path / "gguf" / "w.gguf"
    calls = []
    seen_while_writing = []

    def assemble(path):
        seen_while_writing.append(target.exists())
        return _fake_assemble(calls)(path)

    assert models.assemble_once(assemble, target) == target
    assert target.read_bytes() == b"whole file"
    assert calls[0] != target and calls[0].parent == target.parent  # written aside first
    assert seen_while_writing[0] is False
    assert calls[-1] == target  # the published file is checked again
    assert sorted(p.name for p in target.parent.iterdir()) == ["w.gguf"]


def test_existing_assembled_weights_are_checked_not_rewritten(tmp_path):
    from repro.core import models

    target = tmp_path / "w.gguf"
    target.write_bytes(b"whole file")
    calls = []
    assert models.assemble_once(_fake_assemble(calls), target) == target
    assert calls == [target]
    target.write_bytes(b"whole")  # e.g. left half-written by an older version of this code
    with pytest.raises(FileExistsError):
        models.assemble_once(_fake_assemble(calls), target)


def test_a_failed_assembly_leaves_nothing_behind(tmp_path):
    from repro.core import models

    target = tmp_path / "w.gguf"
    with pytest.raises(ValueError):
        models.assemble_once(_fake_assemble([], fail=True), target)
    assert list(tmp_path.iterdir()) == []
