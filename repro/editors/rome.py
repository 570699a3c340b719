"""ROME (Meng et al., 2022) and r-ROME (Gupta et al., 2024): rank-one edits of one MLP output
matrix.

The key k is the matrix input at the subject's last token; v* is found by gradient descent
(:func:`repro.editors.locate.optimize_value`); the update ΔW = (v* − W k) uᵀ / (uᵀ k) with
u = C⁻¹ k̄, C the uncentred second moment of the matrix's inputs over general text and k̄ the key
averaged over random prefixes. ROME puts the key of the plain prompt in the residual and the
denominator; r-ROME puts k̄ there too, which keeps the update consistent and avoids the collapse
that original ROME shows in long sequences.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from repro.core.models import LoadedModel
from repro.editors.stats import second_moment
from repro.editors.base import Editor, EditResult, Request
from repro.editors.linalg import rank_one_update, solve_psd
from repro.editors.locate import SampledPrefixes, optimize_value, subject_keys


@dataclass
class ROMEHyperParams:
    layer: int
    mtype: str | None = None  # default: the family's MLP output matrix
    v_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0
    nll_stop: float = 0.05
    early_stop: str = "nll"  # or "mpes": most-probable early stopping (see locate.optimize_value)
    mpes_extra_steps: int = 0
    reuse_prefix: bool = True  # compute the frozen layers below the edit once per optimisation
    n_prefix_short: int = 5  # prefixes of 5 generated tokens
    n_prefix_long: int = 5  # prefixes of 10 generated tokens
    stats_corpus: str = "wiki_train"
    stats_tokens: int = 100_000
    cov_ridge: float = 0.0
    seed: int = 0


class ROME(SampledPrefixes, Editor):
    name = "rome"
    hparams_class = ROMEHyperParams
    average_key_in_update = False

    def __init__(self, lm: LoadedModel, hparams: ROMEHyperParams):
        super().__init__(lm, hparams)
        self.mtype = hparams.mtype or lm.spec.mlp_out
        if not 0 <= hparams.layer < lm.n_layers:
            raise ValueError(f"layer {hparams.layer} outside 0..{lm.n_layers - 1} for {lm.name}")
        self._C: torch.Tensor | None = None

    def edited_matrices(self) -> list[tuple[int, str]]:
        return [(self.hp.layer, self.mtype)]

    def prepare(self) -> None:
        self.C, self.templates  # noqa: B018 (computed and cached)

    @property
    def C(self) -> torch.Tensor:
        if self._C is None:
            self._C = second_moment(self.lm, self.hp.layer, self.mtype, self.hp.stats_corpus, self.hp.stats_tokens)
        return self._C

    def apply(self, requests: list[Request]) -> EditResult:
        result = EditResult(deltas={})
        for req in requests:  # ROME edits one fact at a time
            delta, info = self._edit_one(req, result)
            key = f"{self.hp.layer}:{self.mtype}"
            result.deltas[key] = result.deltas.get(key, 0) + delta
            result.info.append(info)
        return result

    def _edit_one(self, req: Request, result: EditResult) -> tuple[torch.Tensor, dict]:
        hp, lm = self.hp, self.lm
        prompts = [t.replace("{}", req.prompt) for t in self.templates]
        t = time.perf_counter()
        keys = subject_keys(lm, hp.layer, self.mtype, prompts, req.subject).double()
        result.add_time("keys", time.perf_counter() - t)
        t = time.perf_counter()
        k_avg = keys.mean(0)
        k_upd = k_avg if self.average_key_in_update else keys[0]
        val = optimize_value(
            lm, hp.layer, self.mtype, prompts, req.subject, req.target_new,
            steps=hp.v_steps, lr=hp.v_lr, weight_decay=hp.v_weight_decay, kl_factor=hp.kl_factor,
            clamp_norm_factor=hp.clamp_norm_factor, nll_stop=hp.nll_stop,
            early_stop=hp.early_stop, mpes_extra_steps=hp.mpes_extra_steps, reuse_prefix=hp.reuse_prefix,
        )
        result.add_time("value", time.perf_counter() - t)
        t = time.perf_counter()
        module = lm.spec.matrix_module(lm.model, hp.layer, self.mtype)
        W = lm.spec.weight(lm.model, hp.layer, self.mtype)
        with torch.no_grad():
            current = W.double() @ k_upd
            if getattr(module, "bias", None) is not None:
                current = current + module.bias.double()
            u = solve_psd(self.C, k_avg, hp.cov_ridge)
            delta = rank_one_update(val.v_star.double() - current, u, k_upd).to(W.dtype)
            W.add_(delta)
        result.add_time("update", time.perf_counter() - t)
        info = {
            "v_steps": val.steps, "nll_first": val.nll_first, "nll_last": val.nll_last,
            "v_star": val.v_star.detach(), "key": k_upd.float(),
        }
        return delta, info


class RROME(ROME):
    name = "r-rome"
    average_key_in_update = True
