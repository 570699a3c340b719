"""Edit quality at a checkpoint of a sequential run: CounterFact's efficacy, paraphrase and
neighborhood scores of every fact edited so far (so that forgetting of early edits shows), and
their harmonic mean."""
from __future__ import annotations

import numpy as np
import xarray as xr

from ..models import LoadedModel
from .rewrite import harmonic_mean, record_scores

QUALITY = ("es", "ps", "ns")


def edit_quality(lm: LoadedModel, records: list, n_done: int) -> xr.Dataset:
    """Scores of ``records[:n_done]`` (the facts edited so far) on the current model.

    Returns per-fact scores ``fact_es``/``fact_ps``/``fact_ns`` over dim ``edit`` (1-based position
    in the run, NaN for facts not edited yet) and their means ``es``/``ps``/``ns`` with the
    harmonic mean ``score`` (NaN before the first edit).
    """
    if not 0 <= n_done <= len(records):
        raise ValueError(f"n_done must be in [0, {len(records)}], got {n_done}")
    per = {k: np.full(len(records), np.nan) for k in QUALITY}
    if n_done:
        got = record_scores(lm, records[:n_done])
        for k in QUALITY:
            per[k][:n_done] = got[k]
    means = {k: float(np.nanmean(per[k][:n_done])) if n_done else np.nan for k in QUALITY}
    score = harmonic_mean(*means.values()) if n_done else np.nan
    edit = np.arange(1, len(records) + 1)
    data = {f"fact_{k}": ("edit", per[k]) for k in QUALITY}
    data.update({k: ((), means[k]) for k in QUALITY})
    data["score"] = ((), score)
    ds = xr.Dataset(data, coords={"edit": edit})
    ds["es"].attrs["long_name"] = "efficacy: share of edited facts whose rewrite prompt prefers the new object"
    ds["ps"].attrs["long_name"] = "paraphrase: mean share of paraphrase prompts preferring the new object"
    ds["ns"].attrs["long_name"] = "neighborhood: mean share of neighborhood prompts still preferring the true object"
    ds["score"].attrs["long_name"] = "S: harmonic mean of es, ps and ns"
    return ds
