"""Edit quality at a checkpoint of a sequential run: CounterFact's efficacy, paraphrase and
neighborhood scores of the facts edited so far (so that forgetting of early edits shows), and
their harmonic mean.

With thousands of edits, scoring every edited fact at every checkpoint would cost more than the
edits; :func:`quality_sample` then picks a fixed-size, seeded sample of them: the first ``first``
edits (to follow the fate of early edits) plus ``sample`` drawn at random from the rest. The
means reported are estimates for *all* facts edited so far: each part of the sample is weighted by
the number of edited facts it stands for.
"""
from __future__ import annotations

import random

import numpy as np
import xarray as xr

from repro.core.models import LoadedModel
from repro.measure.rewrite import harmonic_mean, record_scores

QUALITY = ("es", "ps", "ns")


def quality_sample(n_done: int, first: int = 0, sample: int = 0, seed: int = 0) -> np.ndarray:
    """0-based positions of the edited facts to score after ``n_done`` edits.

    ``first == sample == 0``, or no more than ``first + sample`` facts edited: all of them.
    Otherwise the first ``first`` positions plus ``sample`` positions drawn without replacement from
    ``first .. n_done-1`` by a generator seeded with (``seed``, ``n_done``), sorted.
    """
    if min(n_done, first, sample) < 0:
        raise ValueError(f"n_done, first and sample must be >= 0, got {n_done}, {first}, {sample}")
    if (first == 0 and sample == 0) or n_done <= first + sample:
        return np.arange(n_done)
    head = list(range(first))
    rest = random.Random(f"quality|{seed}|{n_done}").sample(range(first, n_done), sample)
    return np.array(head + sorted(rest), dtype=int)


def estimate(values: np.ndarray, n_done: int, first: int) -> float:
    """Mean over all ``n_done`` edited facts estimated from the scored ones (``values`` over the
    run's positions, NaN where not scored): the first-``first`` block and the random rest each
    weighted by how many facts they stand for. Equals the plain mean when every fact was scored."""
    vals = np.asarray(values, dtype=float)[:n_done]
    scored = ~np.isnan(vals)
    if not scored.any():
        return float("nan")
    if scored.all():
        return float(vals.mean())
    head, rest = vals[:first], vals[first:]
    parts = [(len(head), np.nanmean(head)) if len(head) and (~np.isnan(head)).any() else (0, 0.0),
             (len(rest), np.nanmean(rest)) if (~np.isnan(rest)).any() else (0, 0.0)]
    weight = sum(w for w, _ in parts)
    return float(sum(w * m for w, m in parts) / weight)


def edit_quality(lm: LoadedModel, records: list, n_done: int, first: int = 0, sample: int = 0,
                 seed: int = 0) -> xr.Dataset:
    """Scores of the facts edited so far, ``records[:n_done]`` (all of them, or the
    :func:`quality_sample` given ``first``/``sample``), on the current model.

    Returns per-fact scores ``fact_es``/``fact_ps``/``fact_ns`` over dim ``edit`` (1-based position
    in the run, NaN for facts not edited yet or not in the sample), their estimated means over all
    edited facts ``es``/``ps``/``ns`` (see :func:`estimate`), the harmonic mean ``score`` (NaN
    before the first edit) and ``quality_n`` (facts scored).
    """
    if not 0 <= n_done <= len(records):
        raise ValueError(f"n_done must be in [0, {len(records)}], got {n_done}")
    per = {k: np.full(len(records), np.nan) for k in QUALITY}
    picked = quality_sample(n_done, first, sample, seed)
    if len(picked):
        got = record_scores(lm, [records[i] for i in picked])
        for k in QUALITY:
            per[k][picked] = got[k]
    means = {k: estimate(per[k], n_done, first) if n_done else np.nan for k in QUALITY}
    score = harmonic_mean(*means.values()) if n_done else np.nan
    edit = np.arange(1, len(records) + 1)
    data = {f"fact_{k}": ("edit", per[k]) for k in QUALITY}
    data.update({k: ((), means[k]) for k in QUALITY})
    data["score"] = ((), score)
    data["quality_n"] = ((), len(picked))
    ds = xr.Dataset(data, coords={"edit": edit})
    over = ("all facts edited so far" if not (first or sample) else
            f"all facts edited so far, estimated from the first {first} and a seeded random {sample} of the "
            f"rest (each part weighted by the facts it stands for)")
    ds["es"].attrs["long_name"] = f"efficacy: share of edited facts whose rewrite prompt prefers the new object ({over})"
    ds["ps"].attrs["long_name"] = f"paraphrase: mean share of paraphrase prompts preferring the new object ({over})"
    ds["ns"].attrs["long_name"] = f"neighborhood: mean share of neighborhood prompts still preferring the true object ({over})"
    ds["score"].attrs["long_name"] = "S: harmonic mean of es, ps and ns"
    ds["quality_n"].attrs["long_name"] = "edited facts scored at this checkpoint (the rest are NaN in fact_*)"
    return ds
