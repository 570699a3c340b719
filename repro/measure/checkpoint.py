"""What a sequential run measures at its checkpoints (every ``measure_every`` edits, before the
first and after the last): edit quality of the facts edited so far, generation entropy, downstream
abilities, activation norms and how far the activations moved from the unedited model's.

:class:`Measurer` is built once per run, takes the unedited model's activations as its reference
(:meth:`Measurer.set_reference`, called while the original weights are in place), then
:meth:`Measurer.measure` returns one checkpoint as an :class:`xarray.Dataset` with a length-1
``ckpt`` dimension (the number of edits made so far); the run concatenates them along ``ckpt``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import xarray as xr

from repro.data.tasks import load_task
from repro.data.text import load_text
from repro.core.models import LoadedModel
from repro.measure.activations import activation_norms, collect_activations, compare_activations, prepare_reference, probe_texts
from repro.measure.downstream import fact_recall, few_shot_accuracy, perplexity
from repro.measure.generation import generation_entropy
from repro.measure.quality import edit_quality

PARTS = ("quality", "generation", "downstream", "activations")


@dataclass
class MeasureParams:
    """Sizes of one checkpoint measurement (defaults: the study's runs; see
    ``benchmarks/checkpoint_cost.py`` for what each costs)."""

    tasks: tuple[str, ...] = ("sentiment", "news_topic")  # data/tasks/<name>.json
    n_test: int = 100  # test examples per task
    n_recall: int = 50  # facts never edited, for recall
    ppl_tokens: int = 2048  # held-out Wikipedia tokens for perplexity
    ppl_ctx: int = 256
    n_gen: int = 8  # generation prompts (of the first edited facts) for generation entropy
    gen_tokens: int = 100
    probe_edit: int = 32  # probe texts: rewrite prompts of edited facts ...
    probe_general: int = 16  # ... and Wikipedia paragraphs
    probe_max_length: int = 32  # tokens per probe text
    k: int = 10  # principal subspace dimension
    pca_points: int = 128  # probe tokens in the 2-D PCA picture
    # edit quality over a sample of the facts edited so far (repro.measure.quality.quality_sample):
    # the first `quality_first` edits plus a seeded random `quality_sample` of the rest; 0 and 0: all
    quality_first: int = 0
    quality_sample: int = 0
    parts: tuple[str, ...] = PARTS  # which parts to measure

    def __post_init__(self):
        self.tasks = tuple(self.tasks)
        self.parts = tuple(self.parts)
        unknown = set(self.parts) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown measurement parts {sorted(unknown)}; known: {PARTS}")
        for name in ("n_test", "n_recall", "ppl_tokens", "ppl_ctx", "n_gen", "gen_tokens", "probe_edit",
                     "probe_max_length", "k", "pca_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("quality_first", "quality_sample"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 and 0: score every edited fact), got {getattr(self, name)}")
        if self.probe_general < 0:
            raise ValueError(f"probe_general must be >= 0, got {self.probe_general}")


class Measurer:
    """The checkpoint measurements of one run (see the module docstring)."""

    def __init__(self, lm: LoadedModel, records: list, held_out: list, edited: list[tuple[int, str]],
                 params: MeasureParams | None = None, seed: int = 0):
        self.lm, self.records, self.held_out, self.edited = lm, list(records), list(held_out), list(edited)
        self.params = mp = params or MeasureParams()
        self.seed = seed
        self.tasks = [load_task(name) for name in mp.tasks] if "downstream" in mp.parts else []
        self.ppl_texts = load_text("test") if "downstream" in mp.parts else []
        self.gen_prompts = [r.generation_prompts[0] for r in self.records if r.generation_prompts][: mp.n_gen]
        self.probe = probe_texts(self.records, load_text("test"), mp.probe_edit, mp.probe_general, seed)
        self.reference = None

    def _collect(self):
        mp = self.params
        return collect_activations(self.lm, self.probe, self.edited, max_length=mp.probe_max_length)

    def set_reference(self) -> None:
        """Take the current (unedited) model's activations as the reference."""
        if "activations" in self.params.parts:
            self.reference = prepare_reference(self._collect(), self.params.k, self.params.pca_points)

    def measure(self, n_done: int) -> xr.Dataset:
        """All parts at one checkpoint, after ``n_done`` edits (``records[:n_done]`` edited)."""
        mp, lm = self.params, self.lm
        pieces, seconds = [], {}

        def timed(part, fn):
            t = time.perf_counter()
            pieces.append(fn())
            seconds[part] = time.perf_counter() - t

        if "quality" in mp.parts:
            timed("quality", lambda: edit_quality(lm, self.records, n_done, mp.quality_first,
                                                   mp.quality_sample, self.seed))
        if "generation" in mp.parts:
            timed("generation", self._generation)
        if "downstream" in mp.parts:
            timed("downstream", self._downstream)
        if "activations" in mp.parts:
            if self.reference is None:
                raise RuntimeError("set_reference() must run on the unedited model before measuring activations")
            timed("activations", self._activations)
        ds = xr.merge(pieces, combine_attrs="drop") if pieces else xr.Dataset()
        parts = [p for p in PARTS if p in seconds]
        ds["measure_seconds"] = ("part", np.array([seconds[p] for p in parts]))
        ds = ds.assign_coords(part=parts)
        ckpt_vars = [v for v in ds.data_vars if v not in ("task_chance", "pca_ref")]
        out = ds[ckpt_vars].expand_dims(ckpt=[n_done])
        for v in ("task_chance", "pca_ref"):
            if v in ds:
                out[v] = ds[v]
        return out

    # -- parts ------------------------------------------------------------------------------
    def _generation(self) -> xr.Dataset:
        mp = self.params
        ent = generation_entropy(self.lm, self.gen_prompts, mp.gen_tokens) if self.gen_prompts else np.zeros(0)
        ds = xr.Dataset({"gen_entropy": ("gen_prompt", ent),
                         "gen_entropy_mean": ((), float(ent.mean()) if ent.size else np.nan)},
                        coords={"gen_prompt": np.arange(len(ent))})
        ds["gen_entropy"].attrs["long_name"] = "weighted bi/tri-gram entropy (bits) of a greedy continuation"
        return ds

    def _downstream(self) -> xr.Dataset:
        mp, lm = self.params, self.lm
        acc, f1, acc_raw, f1_raw, chance = [], [], [], [], []
        for task in self.tasks:
            got = few_shot_accuracy(lm, task, mp.n_test)
            acc.append(got["accuracy"])
            f1.append(got["macro_f1"])
            acc_raw.append(got["accuracy_raw"])
            f1_raw.append(got["macro_f1_raw"])
            chance.append(got["chance"])
        recall = fact_recall(lm, self.held_out) if self.held_out else {"recall": np.nan, "true_nll": np.nan}
        ppl = perplexity(lm, self.ppl_texts, mp.ppl_tokens, mp.ppl_ctx)
        ds = xr.Dataset(
            {
                "task_acc": ("task", np.array(acc, dtype=float)),
                "task_f1": ("task", np.array(f1, dtype=float)),
                "task_acc_raw": ("task", np.array(acc_raw, dtype=float)),
                "task_f1_raw": ("task", np.array(f1_raw, dtype=float)),
                "task_chance": ("task", np.array(chance, dtype=float)),
                "task_mean_acc": ((), float(np.mean(acc)) if acc else np.nan),
                "recall": ((), float(recall["recall"])),
                "recall_true_nll": ((), float(recall["true_nll"])),
                "perplexity": ((), float(ppl)),
            },
            coords={"task": [t.name for t in self.tasks]},
        )
        ds["task_acc"].attrs["long_name"] = ("few-shot accuracy on the task's held-out test examples, "
                                             "batch-calibrated (label prior of the scored examples removed)")
        ds["task_f1"].attrs["long_name"] = "macro-F1 of the batch-calibrated predictions"
        ds["task_acc_raw"].attrs["long_name"] = "few-shot accuracy of the plain argmax label (no calibration)"
        ds["task_f1_raw"].attrs["long_name"] = "macro-F1 of the plain argmax label (no calibration)"
        ds["recall"].attrs["long_name"] = "share of never-edited facts whose true object beats the counterfactual"
        ds["perplexity"].attrs["long_name"] = "perplexity on held-out Wikipedia text"
        return ds

    def _activations(self) -> xr.Dataset:
        acts = self._collect()
        norms = activation_norms(acts).rename({"norm": "act_norm", "share": "act_share"})
        cmp = compare_activations(self.reference, acts)
        cmp = cmp.rename({"angles": "principal_angle", "overlap": "subspace_overlap", "cosine": "act_cosine"})
        for v in ("pca", "pca_ref"):
            cmp[v] = cmp[v].astype(np.float32)
        return xr.merge([norms, cmp], combine_attrs="drop")

