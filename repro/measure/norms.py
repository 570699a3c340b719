"""Frobenius norms of every weight matrix the architecture spec names, as an xarray DataArray."""
from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from repro.core.models import LoadedModel


@torch.no_grad()
def weight_norms(lm: LoadedModel) -> xr.DataArray:
    """‖W‖_F of each (layer, matrix type), float64, dims ("layer", "matrix")."""
    spec, model = lm.spec, lm.model
    mtypes = list(spec.matrices)
    out = np.zeros((lm.n_layers, len(mtypes)))
    for layer in range(lm.n_layers):
        for j, mtype in enumerate(mtypes):
            out[layer, j] = torch.linalg.vector_norm(spec.weight(model, layer, mtype).double()).item()
    return xr.DataArray(
        out, dims=("layer", "matrix"), coords={"layer": np.arange(lm.n_layers), "matrix": mtypes},
        name="weight_norm", attrs={"long_name": "Frobenius norm of the weight matrix"},
    )
