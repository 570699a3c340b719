"""Batch locate-and-edit editors that spread an edit over several consecutive MLP output matrices:
MEMIT (Meng et al., 2023), EMMET (Gupta et al., 2024), AlphaEdit (Fang et al., 2025) and ENCORE
(Gupta et al., 2025).

All four share one procedure and differ only in the closed-form update of each layer
(:mod:`repro.editors.linalg`):

1. For each request, find the residual-stream vector z the *last* edited layer L should output at
   the subject's last token (δ added to the decoder layer's output, optimised as in ROME; the
   weight decay and norm clamp are relative to ‖h_L‖). By default all requests of a call are
   optimised jointly, one forward/backward pass per step (``batch_values``); each request's z is
   the one it would get alone, up to float rounding.
2. For each edited layer l in order: the keys K (matrix input at the subject's last token,
   averaged within each kind of template, then over the kinds) under the current weights, the
   current output h_L on the plain prompts, the residual R = (z − h_L) / (number of layers left), and ΔW_l from (R, K) and the
   layer's statistics; ΔW_l is applied before the next layer's keys are read.

   Where the family normalises the MLP's output before adding it to the residual stream (Gemma 2
   and 3: ``post_feedforward_layernorm``), the matrix's output does not reach the residual stream
   as it is, so R is first carried back through that norm (``post_norm_targets``): the target of
   the matrix's output is the preimage under the norm of (its current normed output + R), found by
   Levenberg-Marquardt steps (:func:`norm_preimage`). Without this, MEMIT's single-edit updates on
   Gemma-3-270M had norms of 390-2,900 against 1.2-2.8 with it (``data/runs/tuning/gemma_memit_*.nc``).

State carried between sequential calls lives on the editor object and is saved with
:meth:`state_dict`. AlphaEdit, ENCORE, and MEMIT and EMMET with ``prev_keys``, need earlier edits'
keys K_p only through their Gram matrix K_p K_pᵀ, so that is what they keep: a running float64
sum over calls (``prev_gram``), of constant size (d_in² per edited matrix) however many edits
came before, saved as its upper triangle. It equals the product of all kept keys up to float64 summation order. States written
when the keys themselves were kept (``prev_keys``) load into it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from repro.core.hooks import StopForward, capture
from repro.core.models import LoadedModel, get_module
from repro.editors.stats import second_moments
from repro.editors.base import Editor, EditResult, Request
from repro.editors.linalg import (alphaedit_update, emmet_update, memit_update, null_space_projector, pack_symmetric,
                                  threshold_from_spectrum, unpack_symmetric)
from repro.core.scoring import encode_rows, fill
from repro.editors.locate import (SampledPrefixes, ValueRequest, ValueResult, optimize_values, subject_keys,
                                  value_options)


@dataclass
class MEMITHyperParams:
    layers: list[int]
    mtype: str | None = None  # default: the family's MLP output matrix
    mom2_weight: float = 15000.0  # λ: weight of the preserved second moment C (see memit.yaml)
    v_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 0.75  # relative to ‖h_L‖ (the residual stream), not ‖v‖ as in ROME
    # the value optimisation's stopping rule and forms (locate.optimize_values): the defaults are the
    # authors' compute_z; "nll", "squared" and "former" are this package's first forms, kept as options
    early_stop: str = "loss"  # "loss" (total loss < loss_stop, published), "nll" or "mpes"
    loss_stop: float = 0.05
    nll_stop: float = 0.05  # threshold of early_stop="nll"
    v_weight_decay_form: str = "norm"  # ‖δ‖/‖h‖² (published) or "squared": ‖δ‖²/‖h‖²
    kl_form: str = "published"  # KL(current‖initial) at the subject's last token, or "former"
    mpes_extra_steps: int = 0
    mpes_rows: str = "prefixed"  # MPES counts the prefixed templates (ENCORE's code) or "all"
    reuse_prefix: bool = True  # compute the frozen layers below the edit once per optimisation
    # optimise the z of all requests of a call jointly, one forward/backward pass per step (same
    # results up to float rounding; locate.optimize_values); False: one request after another;
    # "auto": jointly on accelerators only. On a CPU the joint pass measured 0.73-0.97x the speed of
    # one-by-one (the step is compute-bound and the joint batch pads every prompt to the longest:
    # benchmarks/results/edit_speed_batched_smollm2-135m.txt)
    batch_values: bool | str = "auto"
    batch_values_max: int = 16  # requests per joint pass at most (activations: ~0.4 GB each on SmolLM2-135M)
    # context templates: "{}" and 5 prefixes of ≤10 generated tokens (MEMIT's get_context_templates)
    n_prefix_short: int = 0
    n_prefix_long: int = 5
    # a key is averaged within each kind of template, then over the kinds (MEMIT's compute_ks:
    # ½ plain + ½ mean of the prefixed); "flat": one mean over all templates (this package's first form)
    key_average: str = "by_type"
    # add earlier edits' keys K_p K_pᵀ to the preserved term, as ENCORE's repository runs MEMIT and
    # EMMET in sequence (add_prev_edits); off in the original MEMIT and EMMET
    prev_keys: bool = False
    stats_corpus: str = "wiki_train"
    stats_tokens: int = 100_000
    seed: int = 0
    # carry each layer's residual R back through the family's MLP post-norm, where it has one (no
    # effect on families without one); False: use R as the matrix's output change, as published
    post_norm_targets: bool = True


@dataclass
class EMMETHyperParams(MEMITHyperParams):
    # η (the authors' emmet_lambda): ridge on D = Kᵀ (λ C)⁻¹ K, added for batches of more than one edit
    eta: float = 0.1


@dataclass
class AlphaEditHyperParams(MEMITHyperParams):
    null_energy: float = 0.01  # share of C's trace allowed in the null space (sets the threshold)
    # an absolute threshold on C's eigenvalues instead (the published 2e-2 for GPT2-XL, GPT-J and
    # Llama-3-8B, on C = E[k kᵀ] as here); None: set from null_energy
    null_threshold: float | None = None
    l2: float = 10.0  # α: ridge on the projected normal equations


@dataclass
class ENCOREHyperParams(MEMITHyperParams):
    norm_weight: float = 1.0  # λ_n: penalty λ_n ‖ΔW‖² on every update
    early_stop: str = "mpes"
    mpes_extra_steps: int = 2
    prev_keys: bool = True  # ENCORE's repository keeps earlier edits' keys (add_prev_edits)


def norm_preimage(norm: torch.nn.Module, x0: torch.Tensor, target: torch.Tensor, steps: int = 30,
                  rtol: float = 1e-5) -> torch.Tensor:
    """An input x near ``x0`` with ``norm(x)`` as close to ``target`` as the norm allows (vectors of
    one width, (d,)), by Levenberg-Marquardt steps from ``x0`` on ‖norm(x) − target‖²: the damping
    shrinks after a step that brings the output closer and grows after one that does not, so output
    coordinates that a near-zero gain of the norm cannot move are not chased with huge steps (a
    target off the norm's reachable set is approached, not hit). Stops when the output is within
    ``rtol`` of the target's norm or after ``steps`` trial steps."""
    x = x0.detach().to(torch.float32)
    goal = target.detach().to(torch.float32)
    with torch.no_grad():
        r = (goal - norm(x)).double()
        err = float(r.norm())
        J = mu = None
        for _ in range(steps):
            if err <= rtol * float(goal.norm()):
                break
            if J is None:
                with torch.enable_grad():
                    J = torch.func.jacrev(norm)(x).double()
                JtJ, Jtr = J.T @ J, J.T @ r
                if mu is None:
                    mu = 1e-3 * float(JtJ.diagonal().max())
            dx = torch.linalg.solve(JtJ + mu * torch.eye(len(x), dtype=JtJ.dtype, device=JtJ.device), Jtr)
            trial = x + dx.to(torch.float32)
            r_trial = (goal - norm(trial)).double()
            if float(r_trial.norm()) < err:
                x, r, err, J, mu = trial, r_trial, float(r_trial.norm()), None, mu / 3
            else:
                mu *= 4
    return x


class MEMIT(SampledPrefixes, Editor):
    """MEMIT: ΔW_l = R Kᵀ (λ C + K Kᵀ)⁻¹ on each edited layer."""

    name = "memit"
    hparams_class = MEMITHyperParams

    @property
    def keeps_keys(self) -> bool:
        """Whether earlier edits' keys are carried into later updates (``prev_keys``)."""
        return bool(self.hp.prev_keys)

    def __init__(self, lm: LoadedModel, hparams: MEMITHyperParams):
        super().__init__(lm, hparams)
        layers = list(hparams.layers)
        if not layers or any(not 0 <= l < lm.n_layers for l in layers):
            raise ValueError(f"layers {layers} must be non-empty and within 0..{lm.n_layers - 1}")
        if layers != sorted(set(layers)):
            raise ValueError(f"layers must be strictly increasing, got {layers}")
        self.layers = layers
        self.mtype = hparams.mtype or lm.spec.mlp_out
        self._C: dict[int, torch.Tensor] | None = None
        self.prev_gram: dict[int, torch.Tensor] = {}  # layer -> K_p K_pᵀ (d_in, d_in), float64
        self.n_prev_keys = 0  # how many earlier edits' keys the Gram matrices hold

    def edited_matrices(self) -> list[tuple[int, str]]:
        return [(l, self.mtype) for l in self.layers]

    # -- state carried between calls (the context prefixes: SampledPrefixes) ------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.keeps_keys:
            state["prev_gram"] = {l: pack_symmetric(g.cpu()) for l, g in self.prev_gram.items()}
            state["n_prev_keys"] = self.n_prev_keys
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        if self.keeps_keys:
            gram = {int(l): unpack_symmetric(g) for l, g in state.pop("prev_gram", {}).items()}
            n_prev = int(state.pop("n_prev_keys", 0))
            keys = state.pop("prev_keys", None)  # states written when the keys themselves were kept
            if keys:
                if gram:
                    raise ValueError("state holds both prev_keys and prev_gram")
                keys = {int(l): k.double() for l, k in keys.items()}
                gram = {l: k @ k.T for l, k in keys.items()}
                n_prev = {k.shape[1] for k in keys.values()}.pop()
            self.prev_gram = {l: g.to(self.lm.device) for l, g in gram.items()}
            self.n_prev_keys = n_prev
        super().load_state_dict(state)  # the prefixes; anything else is an error

    def prepare(self) -> None:
        self.C(self.layers[0])
        self.templates  # noqa: B018 (computed and cached)

    # -- shared pieces ----------------------------------------------------------------------
    def C(self, layer: int) -> torch.Tensor:
        if self._C is None:
            hp = self.hp
            self._C = second_moments(self.lm, self.layers, self.mtype, hp.stats_corpus, hp.stats_tokens)
        return self._C[layer]

    def _layer_module(self, layer: int) -> torch.nn.Module:
        return get_module(self.lm.model, self.lm.spec.submodule_path(layer, "layer"))

    @torch.no_grad()
    def _output_at_subject(self, module: torch.nn.Module, requests: list[Request]) -> torch.Tensor:
        """Output of ``module`` at each plain prompt's subject last token, (n, d), in the model's
        precision; the forward pass stops right after the module."""
        filled = [fill(r.prompt, r.subject) for r in requests]
        batch = encode_rows(self.lm, [f[0] for f in filled], [None] * len(filled), [f[1] for f in filled])
        with capture({"out": module}, stop_after="out") as got:
            try:
                self.lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            except StopForward:
                pass
        rows = torch.arange(len(requests), device=self.lm.device)
        return got["out"][rows, batch.subject_idx]

    def _hidden_at_subject(self, layer: int, requests: list[Request]) -> torch.Tensor:
        """Output of decoder layer ``layer`` at each plain prompt's subject last token, (d, n)."""
        return self._output_at_subject(self._layer_module(layer), requests).double().T

    def _post_norm(self, layer: int) -> torch.nn.Module | None:
        """The norm between the edited matrix's output and the residual stream, if any is to be
        inverted (``post_norm_targets``, the family's MLP output matrix, a family with a post-norm)."""
        spec = self.lm.spec
        if not self.hp.post_norm_targets or self.mtype != spec.mlp_out or not spec.mlp_write:
            return None
        return get_module(self.lm.model, spec.residual_write_path(layer, "mlp"))

    @torch.no_grad()
    def _through_post_norm(self, layer: int, requests: list[Request], R: torch.Tensor,
                           norm: torch.nn.Module) -> torch.Tensor:
        """R (d, n), a wanted change of what ``layer``'s MLP adds to the residual stream at each
        plain prompt's subject last token, as the change of the edited matrix's output that makes
        it (through ``norm``), (d, n) float64."""
        X = self._output_at_subject(self.lm.spec.matrix_module(self.lm.model, layer, self.mtype), requests)
        cols = []
        for i in range(len(requests)):
            goal = norm(X[i]).double() + R[:, i]
            cols.append(norm_preimage(norm, X[i], goal).double() - X[i].double())
        return torch.stack(cols, 1)

    def _keys(self, layer: int, requests: list[Request]) -> torch.Tensor:
        """Prefix-averaged keys of the edited matrix at ``layer``, (d_in, n): by default averaged
        within each kind of template, then over the kinds, as MEMIT's ``compute_ks`` (``key_average``)."""
        groups = self.template_groups() if self.hp.key_average == "by_type" else [(0, len(self.templates))]
        cols = []
        for req in requests:
            prompts = [t.replace("{}", req.prompt) for t in self.templates]
            keys = subject_keys(self.lm, layer, self.mtype, prompts, req.subject).double()
            cols.append(torch.stack([keys[a:b].mean(0) for a, b in groups]).mean(0))
        return torch.stack(cols, 1)

    def _remember(self, layer: int, K: torch.Tensor) -> None:
        if self.keeps_keys:
            K64 = K.double()
            old = self.prev_gram.get(layer)
            self.prev_gram[layer] = K64 @ K64.T if old is None else old + K64 @ K64.T

    def update(self, layer: int, R: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        """The closed-form ΔW of one layer (d_out, d_in), float64: R Kᵀ (λ C [+ K_p K_pᵀ] + K Kᵀ)⁻¹."""
        return memit_update(R, K, self.C(layer), self.hp.mom2_weight, extra=self.prev_gram.get(layer))

    def values(self, requests: list[Request]) -> list[ValueResult]:
        """Step 1: the z (v*) of each request at the last edited layer, all requests optimised
        jointly (``batch_values``, in groups of at most ``batch_values_max``) or one after another;
        the results agree up to float rounding."""
        hp, lm = self.hp, self.lm
        last = self.layers[-1]
        value_reqs = [ValueRequest([p.replace("{}", r.prompt) for p in self.templates], r.subject, r.target_new)
                      for r in requests]
        options = dict(value_options(hp), reuse_prefix=hp.reuse_prefix, module=self._layer_module(last))
        joint = hp.batch_values
        if joint == "auto":
            joint = lm.device.type != "cpu"
        elif not isinstance(joint, bool):
            raise ValueError(f"batch_values must be true, false or 'auto', got {joint!r}")
        if joint:
            return optimize_values(lm, last, self.mtype, value_reqs, max_requests=hp.batch_values_max or None,
                                   **options)
        return [optimize_values(lm, last, self.mtype, [vr], **options)[0] for vr in value_reqs]

    # -- the edit -----------------------------------------------------------------------------
    def apply(self, requests: list[Request]) -> EditResult:
        if not requests:
            raise ValueError("no requests to edit")
        lm = self.lm
        last = self.layers[-1]
        z_cols, result = [], EditResult(deltas={})
        t = time.perf_counter()
        vals = self.values(requests)
        for val in vals:
            z_cols.append(val.v_star.double())
            result.info.append({"v_steps": val.steps, "nll_first": val.nll_first, "nll_last": val.nll_last,
                                "z_shift_norm": float((val.v_star - val.v_init).norm())})
        Z = torch.stack(z_cols, 1)
        result.add_time("value", time.perf_counter() - t)
        for i, layer in enumerate(self.layers):
            t = time.perf_counter()
            K = self._keys(layer, requests)
            R = (Z - self._hidden_at_subject(last, requests)) / (len(self.layers) - i)
            norm = self._post_norm(layer)
            if norm is not None:
                R = self._through_post_norm(layer, requests, R, norm)
            result.add_time("keys", time.perf_counter() - t)
            t = time.perf_counter()
            W = lm.spec.weight(lm.model, layer, self.mtype)
            with torch.no_grad():
                delta = self.update(layer, R, K).to(W.dtype)
                W.add_(delta)
            result.add_time("update", time.perf_counter() - t)
            self._remember(layer, K)
            result.deltas[f"{layer}:{self.mtype}"] = delta
        if self.keeps_keys:
            self.n_prev_keys += len(requests)
        return result


class EMMET(MEMIT):
    """EMMET: equality-constrained batch update ΔW_l = R (Kᵀ A⁻¹ K + η I)⁻¹ Kᵀ A⁻¹ with
    A = λ C [+ K_p K_pᵀ], η only for batches of more than one edit (the authors' emmet_main)."""

    name = "emmet"
    hparams_class = EMMETHyperParams

    def update(self, layer, R, K):
        A = self.hp.mom2_weight * self.C(layer).double()
        prev = self.prev_gram.get(layer)
        if prev is not None:
            A = A + prev
        return emmet_update(R, K, A, self.hp.eta if K.shape[1] > 1 else 0.0)


class AlphaEdit(MEMIT):
    """AlphaEdit: the update projected onto the null space of the preserved keys (eigenvectors of
    C with eigenvalues below a threshold chosen from C's spectrum), earlier edits' keys kept."""

    name = "alphaedit"
    hparams_class = AlphaEditHyperParams
    keeps_keys = True  # part of the algorithm (its K_p K_pᵀ term), whatever ``prev_keys`` says

    def __init__(self, lm, hparams):
        super().__init__(lm, hparams)
        self._P: dict[int, torch.Tensor] = {}
        self.null_dims: dict[int, int] = {}

    def projector(self, layer: int) -> torch.Tensor:
        if layer not in self._P:
            C = self.C(layer)
            tau = (self.hp.null_threshold if self.hp.null_threshold is not None
                   else threshold_from_spectrum(torch.linalg.eigvalsh(C), self.hp.null_energy))
            P, _ = null_space_projector(C, tau)
            self._P[layer] = P
            self.null_dims[layer] = int(round(float(torch.trace(P))))
        return self._P[layer]

    def update(self, layer, R, K):
        return alphaedit_update(R, K, self.projector(layer), self.hp.l2, gram_prev=self.prev_gram.get(layer))


class ENCORE(MEMIT):
    """ENCORE: MEMIT with most-probable early stopping of the z optimisation and a norm penalty
    λ_n I added to the preserved term, which also keeps earlier edits' keys (``prev_keys``, on by
    default as in ENCORE's repository): ΔW_l = R Kᵀ (λ C + K_p K_pᵀ + λ_n I + K Kᵀ)⁻¹."""

    name = "encore"
    hparams_class = ENCOREHyperParams

    def update(self, layer, R, K):
        C = self.C(layer)
        extra = self.hp.norm_weight * torch.eye(C.shape[0], dtype=torch.float64, device=C.device)
        prev = self.prev_gram.get(layer)
        if prev is not None:
            extra = extra + prev
        return memit_update(R, K, C, self.hp.mom2_weight, extra=extra)
