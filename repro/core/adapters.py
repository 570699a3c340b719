"""LoRA adapters (``peft``) wrapped in place around matrices of a loaded model: the one place that
builds the peft configuration, for the LoRA editor and the LoRA post-training runs."""
from __future__ import annotations

import warnings

import torch

from repro.core.models import LoadedModel


def add_lora(
    lm: LoadedModel,
    matrices: list[tuple[int, str]],
    *,
    rank: int,
    alpha: float,
    dropout: float,
    seed: int,
    adapter: str,
):
    """Wrap a LoRA adapter named ``adapter`` (rank ``rank``, scale ``alpha / rank``, no bias) around
    each (layer, matrix type) of ``matrices``, in place: the injected layers live in ``lm.model``.

    The adapters' random initialisation (A; B starts at zero) is drawn under ``torch.manual_seed(seed)``
    in a forked RNG, so it is a function of ``seed`` and the global RNG is left as it was. Returns
    peft's wrapper model (keep it to merge or unload the adapters). The matrices must all be stored
    the same way round ((out, in), or (in, out) as in GPT-2's Conv1D).
    """
    from peft import LoraConfig, get_peft_model

    spec = lm.spec
    transposed = {mtype in spec.transposed for _, mtype in matrices}
    if len(transposed) != 1:
        raise ValueError("lora_targets mix (out, in) and (in, out) matrices; train them in separate runs"
                         if transposed else "no matrices to adapt")
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
        target_modules=[spec.matrix_path(l, t) for l, t in matrices], fan_in_fan_out=transposed.pop(),
    )
    devices = [lm.device] if lm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(lm.model, config, adapter_name=adapter)
