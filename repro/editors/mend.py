"""MEND (Mitchell et al., 2022, "Fast Model Editing at Scale"): a meta-trained hypernetwork that
turns the fine-tuning gradient of an edit into a weight update.

For a linear map W (out, in) and a loss over tokens t, the gradient is a sum of rank-one terms,
∇W = Σ_t δ_t x_tᵀ, with x_t the matrix input and δ_t the gradient of the loss w.r.t. the matrix
output at token t. MEND never forms ∇W: it feeds each token's pair u_t = [x_t; δ_t] through a small
network g and rebuilds the update from the transformed factors,

    [x̃_t; δ̃_t] = g_l(standardise_l(u_t)),        ΔW_l = −α_l Σ_t δ̃_t x̃_tᵀ,

so ΔW has rank at most the number of tokens. Here

* ``standardise_l`` subtracts a running mean and divides by a running standard deviation of u,
  one set of statistics per edited matrix, updated during meta-training and frozen when editing;
* ``g`` is shared by all edited matrices of one shape (as in MEND) and is a stack of residual
  blocks ``z + U relu(s_l ⊙ (V z + b) + o_l)`` with a low-rank bottleneck (V: rank × D, U: D × rank)
  and a learned per-matrix scale s_l and shift o_l; U starts at zero, so the untrained g is the
  identity and the untrained update is a (standardised) gradient step;
* ``α_l`` is a learned step size per edited matrix.

:mod:`repro.runs.mend_training` meta-trains the network; :class:`MEND` loads the trained weights of
a model and applies edits in place (each call reads the current weights, so edits can be chained).
"""
from __future__ import annotations

import dataclasses
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repro.core.hooks import capture, edit_output
from repro.core.models import LoadedModel
from repro.core.paths import from_root
from repro.core.scoring import PromptBatch, encode_rows, logprobs_at, row_nll
from repro.editors.base import Editor, EditResult, Request

NOTEBOOK = "notebooks/train_mend.ipynb"
# hyperparameters that fix the network's shape and what it edits: a weights file is only valid
# for an editor with the same values
ARCH_FIELDS = ("layers", "mtypes", "rank", "n_blocks")


@dataclass
class MENDHyperParams:
    layers: list[int] = field(default_factory=lambda: [-3, -2, -1])  # negative: from the last layer
    # matrix types; the aliases "mlp_out" / "mlp_in" mean the family's MLP output / input matrices
    mtypes: list[str] = field(default_factory=lambda: ["mlp_out"])
    rank: int = 64  # bottleneck width of each residual block of g
    n_blocks: int = 2
    alpha_init: float = 1e-4  # initial step size α_l
    weights: str | None = None  # trained weights; None: the packaged repro/editors/weights/mend_<model>.pt
    eps: float = 1e-10  # added to the variance when standardising (δ variances are ~1e-6)

    def arch(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ARCH_FIELDS}


# --------------------------------------------------------------------------------------------
# Which matrices, and their gradient factors
# --------------------------------------------------------------------------------------------
def resolve_matrices(lm: LoadedModel, hp: MENDHyperParams) -> list[tuple[int, str]]:
    """(layer, matrix type) of every edited matrix, layers counted from the end when negative."""
    n = lm.n_layers
    types: list[str] = []
    for name in hp.mtypes:
        if name in lm.spec.matrices:
            types.append(name)
        elif name == "mlp_out":
            types.append(lm.spec.mlp_out)
        elif name == "mlp_in":
            types.extend(lm.spec.mlp_in)
        else:
            raise KeyError(f"{lm.spec.family} has no matrix type {name!r}; known: {sorted(lm.spec.matrices)}")
    out = []
    for layer in hp.layers:
        idx = layer + n if layer < 0 else layer
        if not 0 <= idx < n:
            raise ValueError(f"layer {layer} outside the {n} layers of {lm.name}")
        out += [(idx, t) for t in dict.fromkeys(types)]
    if len(set(out)) != len(out):
        raise ValueError(f"matrices listed twice: {out}")
    return out


def matrix_key(layer: int, mtype: str) -> str:
    return f"{layer}:{mtype}"


def target_batch(lm: LoadedModel, requests: list[Request]) -> PromptBatch:
    """Rewrite prompts teacher-forced on the new target: the fine-tuning loss of the edit."""
    return encode_rows(lm, [r.prompt.format(r.subject) for r in requests], [r.target_new for r in requests])


def gradient_factors(
    lm: LoadedModel, matrices: list[tuple[int, str]], batch: PromptBatch, rows: int | None = None
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    """Rank-one factors of the fine-tuning gradient of every matrix, with the current weights.

    The loss is the sum over the first ``rows`` rows (default all) of the mean token NLL of each
    row's target. A forward hook keeps each matrix's input x and adds a zero tensor that requires
    grad to its output; the gradient w.r.t. that tensor is δ. Returns ``{key: (x, δ)}`` with
    (N, in) and (N, out) rows for the N real (unpadded) tokens of those rows — so that
    ∇W = δᵀ x — and the log-probs at the loss positions of every row (detached) and the rows' NLL.
    """
    rows = batch.input_ids.shape[0] if rows is None else rows
    modules = {matrix_key(l, m): lm.spec.matrix_module(lm.model, l, m) for l, m in matrices}
    probes: dict[str, torch.Tensor] = {}

    def add_probe(key: str):
        def fn(out):
            probes[key] = torch.zeros_like(out, requires_grad=True)
            return out + probes[key]
        return fn

    with ExitStack() as stack, torch.enable_grad():
        inputs = stack.enter_context(capture(modules, what="input"))
        for key, module in modules.items():
            stack.enter_context(edit_output(module, add_probe(key)))
        logp = logprobs_at(lm, batch, batch.loss_pos)
        nll = row_nll(logp, batch.labels, batch.label_mask)
        deltas = torch.autograd.grad(nll[:rows].sum(), [probes[k] for k in modules])
    mask = batch.attention_mask[:rows].bool()
    factors = {
        key: (inputs[key].detach()[:rows][mask].float(), d[:rows][mask].float())
        for key, d in zip(modules, deltas)
    }
    return factors, logp.detach(), nll.detach()


# --------------------------------------------------------------------------------------------
# The hypernetwork
# --------------------------------------------------------------------------------------------
class Standardizer(nn.Module):
    """Running per-feature mean and variance (Welford, over every token seen while training)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @property
    def var(self) -> torch.Tensor:
        if self.count < 2:
            return torch.ones_like(self.m2)
        return self.m2 / (self.count - 1)

    @torch.no_grad()
    def update(self, u: torch.Tensor) -> None:
        """Fold the rows of ``u`` (N, dim) into the statistics (Chan et al.'s parallel update)."""
        u = u.detach().double()
        n = u.shape[0]
        if n == 0:
            return
        mean_b = u.mean(0)
        m2_b = ((u - mean_b) ** 2).sum(0)
        total = self.count + n
        diff = mean_b - self.mean
        self.mean += diff * n / total
        self.m2 += m2_b + diff**2 * self.count * n / total
        self.count.fill_(total)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(u.dtype), (self.var + self.eps).sqrt().to(u.dtype)
        return (u - mean) / std


class GradientNet(nn.Module):
    """g for one matrix shape: residual low-rank blocks with a scale and shift per edited matrix."""

    def __init__(self, dim: int, n_matrices: int, rank: int, n_blocks: int):
        super().__init__()
        self.down = nn.ModuleList(nn.Linear(dim, rank) for _ in range(n_blocks))
        self.up = nn.ModuleList(nn.Linear(rank, dim, bias=False) for _ in range(n_blocks))
        for up in self.up:
            nn.init.zeros_(up.weight)  # g starts as the identity
        self.scale = nn.Parameter(torch.ones(n_matrices, n_blocks, rank))
        self.shift = nn.Parameter(torch.zeros(n_matrices, n_blocks, rank))

    def forward(self, z: torch.Tensor, idx: int) -> torch.Tensor:
        for b, (down, up) in enumerate(zip(self.down, self.up)):
            z = z + up(torch.relu(self.scale[idx, b] * down(z) + self.shift[idx, b]))
        return z


class MENDNet(nn.Module):
    """All of MEND's learned parts for one model: a :class:`GradientNet` per matrix shape, and per
    edited matrix a :class:`Standardizer` and a step size α."""

    def __init__(self, shapes: dict[str, tuple[int, int]], hp: MENDHyperParams):
        super().__init__()
        self.keys = list(shapes)
        self.shapes = dict(shapes)
        by_shape: dict[tuple[int, int], list[str]] = {}
        for key, shape in shapes.items():
            by_shape.setdefault(tuple(shape), []).append(key)
        self.net_of = {}
        self.index_of = {}
        nets = {}
        for (d_out, d_in), keys in by_shape.items():
            name = f"{d_out}x{d_in}"
            nets[name] = GradientNet(d_in + d_out, len(keys), hp.rank, hp.n_blocks)
            for i, key in enumerate(keys):
                self.net_of[key], self.index_of[key] = name, i
        self.nets = nn.ModuleDict(nets)
        self.norms = nn.ModuleDict({_safe(k): Standardizer(sum(shapes[k]), hp.eps) for k in self.keys})
        self.alpha = nn.ParameterDict({_safe(k): nn.Parameter(torch.tensor(float(hp.alpha_init))) for k in self.keys})

    @classmethod
    def for_model(cls, lm: LoadedModel, hp: MENDHyperParams) -> "MENDNet":
        shapes = {matrix_key(l, m): tuple(lm.spec.weight(lm.model, l, m).shape) for l, m in resolve_matrices(lm, hp)}
        return cls(shapes, hp).to(lm.device)

    def update_stats(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for key, (x, d) in factors.items():
            self.norms[_safe(key)].update(torch.cat([x, d], dim=1))

    def transform(self, key: str, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̃, δ̃): the standardised factors passed through g."""
        u = self.norms[_safe(key)](torch.cat([x, delta], dim=1))
        out = self.nets[self.net_of[key]](u, self.index_of[key])
        return out[:, : x.shape[1]], out[:, x.shape[1] :]

    def update(self, key: str, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """ΔW = −α Σ_t δ̃_t x̃_tᵀ (out, in)."""
        xt, dt = self.transform(key, x, delta)
        return -self.alpha[_safe(key)] * dt.T @ xt

    def updates(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {key: self.update(key, x, d) for key, (x, d) in factors.items()}

    def alphas(self) -> dict[str, float]:
        return {k: float(self.alpha[_safe(k)].detach()) for k in self.keys}


def _safe(key: str) -> str:
    """Module-dict names may not contain dots; ours never do, but say so loudly if one does."""
    if "." in key:
        raise ValueError(f"matrix key {key!r} contains a dot")
    return key


# --------------------------------------------------------------------------------------------
# Weights files
# --------------------------------------------------------------------------------------------
def packaged_weights(model_name: str) -> Path:
    """Where the trained weights of a model ship inside the package."""
    return Path(str(resources.files(__package__).joinpath("weights", f"mend_{model_name}.pt")))


def save_mend(path: str | Path, net: MENDNet, hp: MENDHyperParams, model_name: str, **meta) -> Path:
    """Save the network (parameters and standardisation statistics) with its hyperparameters."""
    import os

    path = from_root(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": "normgrowth-mend-1",
        "model": model_name,
        "hparams": dataclasses.asdict(hp),
        "shapes": net.shapes,
        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        "meta": meta,
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path


def load_mend(path: str | Path, lm: LoadedModel, hp: MENDHyperParams | None = None) -> tuple[MENDNet, dict]:
    """The network stored at ``path`` for ``lm``; with ``hp`` its architecture must match."""
    path = from_root(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no trained MEND weights at {path} for model {lm.name!r}: meta-train them by running "
            f"{NOTEBOOK} (papermill) with model={lm.name!r}, or pass weights=<file>"
        )
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if blob.get("model") != lm.name:
        raise ValueError(f"{path} holds MEND weights for {blob.get('model')!r}, not {lm.name!r}")
    saved = MENDHyperParams(**blob["hparams"])
    if hp is not None and saved.arch() != hp.arch():
        raise ValueError(f"{path} was trained with {saved.arch()}, the editor asks for {hp.arch()}")
    net = MENDNet.for_model(lm, saved)
    if net.shapes != {k: tuple(v) for k, v in blob["shapes"].items()}:
        raise ValueError(f"{path}: matrix shapes {blob['shapes']} differ from the model's {net.shapes}")
    net.load_state_dict(blob["state_dict"])
    return net.to(lm.device), blob


# --------------------------------------------------------------------------------------------
# The editor
# --------------------------------------------------------------------------------------------
class MEND(Editor):
    """Edits with a trained MEND network. A batch of requests shares one update (their gradients
    are pooled token by token, as in MEND's batched edits)."""

    name = "mend"
    hparams_class = MENDHyperParams

    def __init__(self, lm: LoadedModel, hparams: MENDHyperParams, net: MENDNet | None = None):
        super().__init__(lm, hparams)
        self.matrices = resolve_matrices(lm, hparams)
        if net is None:
            net, _ = load_mend(hparams.weights or packaged_weights(lm.name), lm, hparams)
        if set(net.keys) != {matrix_key(l, m) for l, m in self.matrices}:
            raise ValueError(f"network edits {net.keys}, hyperparameters say {self.matrices}")
        self.net = net.eval().requires_grad_(False)

    def edited_matrices(self) -> list[tuple[int, str]]:
        return list(self.matrices)

    def compute_updates(self, requests: list[Request]) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict]:
        """ΔW for every edited matrix from the current weights (nothing is changed)."""
        batch = target_batch(self.lm, requests)
        factors, _, nll = gradient_factors(self.lm, self.matrices, batch)
        with torch.no_grad():
            deltas = self.net.updates(factors)
        return deltas, nll, factors

    def apply(self, requests: list[Request]) -> EditResult:
        lm = self.lm
        deltas, nll, factors = self.compute_updates(list(requests))
        out = {}
        with torch.no_grad():
            for layer, mtype in self.matrices:
                key = matrix_key(layer, mtype)
                W = lm.spec.weight(lm.model, layer, mtype)
                delta = deltas[key].to(W.dtype)
                W.add_(delta)
                out[key] = delta
        n_tokens = next(iter(factors.values()))[0].shape[0]
        info = [{"nll_before": float(v), "n_tokens": n_tokens, "batch_size": len(requests)} for v in nll]
        return EditResult(deltas=out, info=info)
