"""The model-collapse rule of a sequential run, checked after every editor call with a cheap probe.

**Rule.** After ``n`` edits the model has *collapsed* when

* any edited weight, or any logit of the probe text, is not finite, or
* the perplexity of the probe text (the first ``probe_tokens`` tokens of the held-out Wikipedia
  text, one forward pass) exceeds ``factor`` times its perplexity on the unedited model
  (default ×10), or
* an edited matrix has blown up: its Frobenius norm exceeds ``max_growth`` times its unedited
  norm (default ×1000), a model no longer to be trusted even where its perplexity still looks
  sane (a normalised residual stream can hide a matrix of 1e30).

The first edit count at which the rule holds is the run's *collapse edit*. A non-finite model is
final: the run stops at once and writes its file with the metrics of that editor call left as
missing values. A model whose perplexity has collapsed may recover: the run goes on, and stops
early only once the rule has held at every probe for ``patience`` edits in a row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from repro.core.models import LoadedModel
from repro.measure.downstream import text_chunks

NONFINITE = "non-finite"
PERPLEXITY = "perplexity"
BLOWN_UP = "blown-up"


@dataclass
class CollapseParams:
    factor: float = 10.0  # collapse: probe perplexity above factor x the unedited model's
    probe_tokens: int = 256  # tokens of held-out text in the probe (one window)
    patience: int = 100  # stop once collapsed for this many edits in a row (0: never stop early)
    max_growth: float = 1000.0  # collapse: an edited matrix's norm above this x its unedited norm

    def __post_init__(self):
        if not (isinstance(self.factor, (int, float)) and math.isfinite(self.factor) and self.factor > 1):
            raise ValueError(f"collapse factor must be a finite number > 1, got {self.factor!r}")
        if not isinstance(self.probe_tokens, int) or self.probe_tokens < 8:
            raise ValueError(f"collapse probe_tokens must be an integer >= 8, got {self.probe_tokens!r}")
        if not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError(f"collapse patience must be an integer >= 0, got {self.patience!r}")
        if not (isinstance(self.max_growth, (int, float)) and math.isfinite(self.max_growth) and self.max_growth > 1):
            raise ValueError(f"collapse max_growth must be a finite number > 1, got {self.max_growth!r}")

    def rule(self) -> str:
        """The rule in words, as stored in run files."""
        stop = (f"; the run stops once the rule has held for {self.patience} edits in a row"
                if self.patience else "")
        return (f"collapsed when an edited weight or a probe logit is not finite, or the perplexity of "
                f"the first {self.probe_tokens} held-out Wikipedia tokens exceeds {self.factor:g}x the "
                f"unedited model's, or an edited matrix's norm exceeds {self.max_growth:g}x its unedited "
                f"norm{stop}; non-finite stops the run at once")


class CollapseProbe:
    """Checks the collapse rule on a live model (see the module docstring)."""

    def __init__(self, lm: LoadedModel, texts: list[str], edited: list[tuple[int, str]],
                 params: CollapseParams | None = None):
        self.lm, self.edited = lm, list(edited)
        self.params = params or CollapseParams()
        tokens = self.params.probe_tokens
        self.ids = text_chunks(lm.tokenizer, texts, tokens, tokens)[:1]
        self.reference: float | None = None
        # made on the freshly loaded (unedited) model, also when a run resumes
        self.norms0 = self.edited_norms()

    @torch.no_grad()
    def perplexity(self) -> float:
        """Probe perplexity of the current model; NaN when a logit is not finite."""
        ids = self.ids.to(self.lm.device)
        logits = self.lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        logits = logits[:, :-1].float()
        if not bool(torch.isfinite(logits).all()):
            return float("nan")
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        return float(torch.exp(nll))

    @torch.no_grad()
    def edited_norms(self) -> list[float]:
        return [float(torch.linalg.vector_norm(self.lm.spec.weight(self.lm.model, l, m).double()))
                for l, m in self.edited]

    def weights_finite(self) -> bool:
        return all(bool(torch.isfinite(self.lm.spec.weight(self.lm.model, l, m)).all()) for l, m in self.edited)

    def set_reference(self, ppl: float | None = None) -> float:
        """Take the current (unedited) model's probe perplexity as the reference (or ``ppl``)."""
        self.reference = self.perplexity() if ppl is None else float(ppl)
        if not math.isfinite(self.reference):
            raise ValueError(f"the unedited model's probe perplexity is not finite ({self.reference})")
        return self.reference

    def check(self) -> tuple[float, str | None]:
        """(probe perplexity, why the model counts as collapsed or None)."""
        if self.reference is None:
            raise RuntimeError("set_reference() must run on the unedited model first")
        if not self.weights_finite():
            return float("nan"), NONFINITE
        ppl = self.perplexity()
        if not math.isfinite(ppl):
            return ppl, NONFINITE
        if any(n > self.params.max_growth * n0 for n, n0 in zip(self.edited_norms(), self.norms0)):
            return ppl, BLOWN_UP
        return ppl, (PERPLEXITY if ppl > self.params.factor * self.reference else None)


def first_collapse(done: np.ndarray, collapsed: np.ndarray) -> int:
    """The first edit count at which ``collapsed`` holds (-1: never)."""
    hits = np.flatnonzero(np.asarray(collapsed, dtype=bool))
    return int(np.asarray(done)[hits[0]]) if hits.size else -1


def collapsed_for(done: np.ndarray, collapsed: np.ndarray) -> int | None:
    """For how many edits the model has stayed collapsed at the last probe: edits from the first
    probe of the final uninterrupted collapsed streak to the last probe (0 when the streak starts at
    the last probe); None when the last probe is not collapsed."""
    done, collapsed = np.asarray(done), np.asarray(collapsed, dtype=bool)
    if not collapsed.size or not collapsed[-1]:
        return None
    healthy = np.flatnonzero(~collapsed)
    first = healthy[-1] + 1 if healthy.size else 0
    return int(done[-1]) - int(done[first])
