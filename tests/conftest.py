"""Shared fixtures. The real default model is loaded once per session (seconds from the cache;
the first load on a fresh machine dequantizes the packaged GGUF, about half a minute)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def test_cache(tmp_path_factory):
    """Point ``NORMGROWTH_CACHE`` at a per-session folder. The packaged models' weights, GGUF files,
    source downloads and statistics are linked in from the user's cache (they depend only on the
    model's name); statistics of the tests' tiny random models and temporary model folders go to
    the session folder, so they never outlive it nor leak into the user's cache. Tests that set
    their own cache still do."""
    from repro.core.models import PACKAGED, cache_dir

    real = cache_dir()
    root = tmp_path_factory.mktemp("normgrowth-cache")
    for sub in ("models", "gguf", "sources"):
        (real / sub).mkdir(exist_ok=True)
        (root / sub).symlink_to(real / sub, target_is_directory=True)
    (root / "stats").mkdir()
    for name in PACKAGED:  # the packaged models' statistics depend only on their name
        (real / "stats" / name).mkdir(parents=True, exist_ok=True)
        (root / "stats" / name).symlink_to(real / "stats" / name, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NORMGROWTH_CACHE", str(root))
        yield Path(root)


@pytest.fixture(scope="session")
def smollm():
    from repro.core.models import load_model

    torch.manual_seed(0)
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture
def restore_weights(smollm):
    """Snapshot every weight the test may edit and put it back afterwards."""
    saved = {n: p.detach().clone() for n, p in smollm.model.named_parameters() if "mlp" in n}
    yield
    with torch.no_grad():
        params = dict(smollm.model.named_parameters())
        for name, value in saved.items():
            params[name].copy_(value)


@pytest.fixture(scope="session")
def tiny_lm():
    """A tiny randomly initialised llama-family model with the real SmolLM2 tokenizer: fast enough
    to exercise editor plumbing end to end (its edits mean nothing, its shapes and code paths do)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from repro.core.models import LoadedModel, cache_dir, load_model, spec_for

    src = cache_dir() / "models" / "smollm2-135m"
    if not (src / "tokenizer_config.json").exists():
        load_model("smollm2-135m", device="cpu")
    tok = AutoTokenizer.from_pretrained(src)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.requires_grad_(False)
    return LoadedModel(name="tiny-llama", model=model, tokenizer=tok, spec=spec_for(model),
                       device=torch.device("cpu"))


@pytest.fixture(scope="session")
def make_tiny(tiny_lm):
    """Factory of tiny random models of other families (llama, gemma3, gpt2) sharing ``tiny_lm``'s
    tokenizer: ``make_tiny(family, n_layers=4, sliding_window=4, n_positions=128)``."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig

    from repro.core.models import LoadedModel, spec_for

    def make(family: str, n_layers: int = 4, sliding_window: int = 4, n_positions: int = 128) -> LoadedModel:
        tok = tiny_lm.tokenizer
        common = dict(vocab_size=len(tok))
        heads = dict(num_attention_heads=4, num_key_value_heads=2)
        if family == "llama":
            cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, **heads, **common)
        elif family == "gemma3":
            cfg = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, head_dim=8,
                                   sliding_window=sliding_window, **heads, **common)
        elif family == "gpt2":
            cfg = GPT2Config(n_embd=32, n_layer=n_layers, n_head=4, n_positions=n_positions, **common)
        else:
            raise ValueError(f"no tiny config for family {family!r}")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        model.requires_grad_(False)
        return LoadedModel(name=f"tiny-{family}", model=model, tokenizer=tok, spec=spec_for(model),
                           device=torch.device("cpu"))

    return make


@pytest.fixture(scope="session")
def tiny_dir(tiny_lm, tmp_path_factory):
    """``tiny_lm`` saved as a local model directory, loadable by path wherever a model name goes."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_lm.model.save_pretrained(path)
    tiny_lm.tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def interrupt_at(monkeypatch):
    """``interrupt_at(module, n)``: ``module.make_editor`` then builds editors whose ``n``-th
    ``apply`` raises KeyboardInterrupt (as a kill mid-run would); returns the real make_editor, to
    put back with ``monkeypatch.setattr``."""
    def patch(module, n: int):
        real = module.make_editor

        def flaky(*a, **k):
            editor = real(*a, **k)
            apply, calls = editor.apply, []

            def apply_or_fail(reqs):
                calls.append(1)
                if len(calls) == n:
                    raise KeyboardInterrupt
                return apply(reqs)

            editor.apply = apply_or_fail
            return editor

        monkeypatch.setattr(module, "make_editor", flaky)
        return real

    return patch
