"""Single-edit quality of an editor: each held-out fact edited alone on the unedited model (the
edit undone before the next), scored by CounterFact's efficacy, paraphrase and neighborhood
success. This is the "does the editor work at all on this model" table, before any sequence.

Interrupted runs resume: the per-fact rows are saved to ``<output>.state.pt`` every few facts.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from tqdm import tqdm

from repro.core import store
from repro.runs.lifecycle import Run, execute
from repro.data.counterfact import Record, load_records, to_request
from repro.editors import make_editor
from repro.data.splits import SPLITS, select_records
from repro.measure.rewrite import harmonic_mean, record_scores
from repro.core.models import DEFAULT_MODEL, copy_weights, load_model, put_weights
from repro.core.paths import from_root


@dataclass
class EfficacyParams:
    model: str = DEFAULT_MODEL
    editor: str = "rome"
    n_facts: int = 50
    seed: int = 11
    facts: str = "data/facts/smollm2-135m.json"
    split: str = "eval"
    output: str = "data/runs/efficacy.nc"
    device: str | None = None
    hparams: dict = field(default_factory=dict)
    save_every: int = 5

    def validate(self) -> None:
        if self.n_facts < 1 or self.save_every < 1:
            raise ValueError("n_facts and save_every must be >= 1")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if not str(self.output).endswith(".nc"):
            raise ValueError(f"output must be a .nc file, got {self.output!r}")


def run_efficacy(params: EfficacyParams, overwrite: bool = False, progress: bool = True) -> xr.Dataset:
    """Edit each of ``n_facts`` held-out facts alone and score it; return (and store) the Dataset."""
    return execute(params, lambda run: _run(params, run, progress), overwrite)


def _run(params: EfficacyParams, run: Run, progress: bool) -> xr.Dataset:
    lm = load_model(params.model, device=params.device)
    records: list[Record] = select_records(load_records(from_root(params.facts)), params.n_facts,
                                           params.seed, params.split)
    editor = make_editor(params.editor, lm, **params.hparams)
    matrices = editor.edited_matrices()
    originals = copy_weights(lm, matrices)
    state = run.resume() or {"rows": []}
    base = record_scores(lm, records)
    bar = tqdm(total=len(records), initial=len(state["rows"]), desc=f"{params.editor} single edits",
               disable=not progress)
    for rec in records[len(state["rows"]):]:
        editor.load_state_dict({})  # no carried state: every fact is edited on the unedited model
        t = time.perf_counter()
        result = editor.apply([to_request(rec)])
        seconds = time.perf_counter() - t
        s = record_scores(lm, [rec])
        info = result.info[0] if result.info else {}
        state["rows"].append({"es": s["es"][0], "ps": s["ps"][0], "ns": s["ns"][0], "seconds": seconds,
                              "v_steps": float(info.get("v_steps", info.get("steps", np.nan))),
                              "delta_norm": float(np.sqrt(sum(float(d.double().pow(2).sum())
                                                              for d in result.deltas.values())))})
        put_weights(lm, matrices, originals)
        bar.update()
        if len(state["rows"]) % params.save_every == 0:
            run.save(state)
    bar.close()
    rows = state["rows"]
    col = lambda k: np.array([r[k] for r in rows], dtype=float)  # noqa: E731
    ds = xr.Dataset(
        {
            "es": ("fact", col("es")), "ps": ("fact", col("ps")), "ns": ("fact", col("ns")),
            "edit_seconds": ("fact", col("seconds")), "v_steps": ("fact", col("v_steps")),
            "delta_norm": ("fact", col("delta_norm")),
            "es_unedited": ("fact", base["es"]), "ps_unedited": ("fact", base["ps"]),
            "ns_unedited": ("fact", base["ns"]),
            "case_id": ("fact", np.array([r.case_id for r in records], dtype=np.int64)),
        },
        coords={"fact": np.arange(len(records))},
    )
    ds["es"].attrs["long_name"] = "rewrite prompt prefers the new object after the edit"
    ds["ps"].attrs["long_name"] = "share of paraphrase prompts preferring the new object"
    ds["ns"].attrs["long_name"] = "share of neighborhood prompts still preferring the true object"
    ds["v_steps"].attrs["long_name"] = "optimisation steps the editor took (NaN where it has none)"
    return run.finish(
        ds, str(lm.device), model=params.model, editor=params.editor,
        edited_matrices=[f"{l}:{m}" for l, m in matrices], facts_file=params.facts,
        hparams=dataclasses.asdict(editor.hp) if dataclasses.is_dataclass(editor.hp) else {},
    )


def summarize(ds: xr.Dataset) -> dict[str, float]:
    """Mean ES, PS, NS, their harmonic mean S, and mean seconds per edit."""
    es, ps, ns = (float(ds[k].mean()) for k in ("es", "ps", "ns"))
    return {"n": int(ds.sizes["fact"]), "ES": es, "PS": ps, "NS": ns, "S": harmonic_mean(es, ps, ns),
            "seconds": float(ds["edit_seconds"].mean())}


def subject_opens_prompt(record: Record) -> bool:
    """Whether the rewrite prompt starts with the subject ("{} is located in"). There the subject
    is tokenized without the leading space it has after the editors' context prefixes
    ("<prefix>. {}"), so its last token, and the key read there, can differ from theirs."""
    return record.requested_rewrite.prompt.lstrip().startswith("{}")


def key_agreement_table(ka: xr.Dataset, label=lambda editor: editor) -> str:
    """The key agreement file (scripts/key_agreement.py) as a text table: for facts whose subject
    opens the prompt and those with the subject inside it, their number, the medians of the key
    cosine and of the update share, and each editor's mean ES (columns named by ``label``)."""
    editors = json.loads(ka.attrs["es_editors"])
    opens = ka["subject_opens"].values.astype(bool)
    lines = [f"{'facts':<24} {'n':>3} {'cosine':>7} {'share':>6}  "
             + " ".join(f"{label(e):>9}" for e in editors)]
    for name, m in (("subject opens prompt", opens), ("subject inside prompt", ~opens)):
        def stat(f, var, m=m):  # NaN for an empty group
            return float(f(ka[var].values[m])) if m.any() else float("nan")
        es = " ".join(f"{stat(np.mean, f'es_{e}'):>9.2f}" for e in editors)
        lines.append(f"{name:<24} {int(m.sum()):>3} {stat(np.median, 'cosine'):>7.3f} "
                     f"{stat(np.median, 'share'):>6.2f}  {es}")
    lines.append("(cosine and share: medians; editor columns: ES)")
    return "\n".join(lines)


@dataclass
class KeyAgreementParams:
    """Parameters of a key agreement run (``scripts/key_agreement.py``): the single-edit run whose
    facts are examined, the ROME-type editor whose context prefixes and statistics are used."""

    run: str = "data/runs/efficacy_r-rome_smollm2-135m.nc"
    editor: str = "r-rome"
    output: str = "data/runs/key_agreement_r-rome_smollm2-135m.nc"

    def validate(self) -> None:
        for name in ("run", "output"):
            if not str(getattr(self, name)).endswith(".nc"):
                raise ValueError(f"{name} must be a .nc file, got {getattr(self, name)!r}")


def run_key_agreement(params: KeyAgreementParams, overwrite: bool = False, progress: bool = True) -> xr.Dataset:
    """For every fact of a single-edit run, compare the key of the plain rewrite prompt with the
    key averaged over the editor's context prefixes (:func:`key_agreement`); store (dim ``fact``)
    the cosine, the share of the update the plain prompt receives, whether the subject opens the
    prompt, whether its last token changes without the leading space, and the ES of every
    single-edit run of the same model on the same facts."""
    def body(run: Run) -> xr.Dataset:
        source = store.read_netcdf(from_root(params.run))
        p = store.run_params(source)
        records = select_records(load_records(from_root(p["facts"])), p["n_facts"], p["seed"], p["split"])
        if [r.case_id for r in records] != [int(c) for c in source["case_id"].values]:
            raise ValueError(f"{params.run}: its facts cannot be re-selected from {p['facts']} (file changed?)")
        lm = load_model(p["model"])
        editor = make_editor(params.editor, lm, **p.get("hparams", {}))
        rows = [key_agreement(lm, editor, r) for r in tqdm(records, desc="keys", disable=not progress)]
        tok = lm.tokenizer
        ds = xr.Dataset(
            {
                "cosine": ("fact", np.array([r["cosine"] for r in rows])),
                "share": ("fact", np.array([r["share"] for r in rows])),
                "subject_opens": ("fact", np.array([subject_opens_prompt(r) for r in records], dtype=np.int8)),
                "last_token_differs": ("fact", np.array([tok.tokenize(r.requested_rewrite.subject)[-1]
                                                         != tok.tokenize(" " + r.requested_rewrite.subject)[-1]
                                                         for r in records], dtype=np.int8)),
                "case_id": ("fact", source["case_id"].values),
            },
            coords={"fact": source["fact"].values},
        )
        ds["cosine"].attrs["long_name"] = "cosine of the plain prompt's key and the key averaged over the prefixes"
        ds["last_token_differs"].attrs["long_name"] = "the subject's last token differs with and without a leading space"
        ds["share"].attrs["long_name"] = "u^T k / u^T k_avg, u = C^-1 k_avg: share of r-ROME's update the plain prompt gets"
        editors = []
        for path in sorted(Path(from_root(params.run)).parent.glob("efficacy_*.nc")):
            other = store.read_netcdf(path)
            if (other.attrs.get("model") == p["model"]
                    and [int(c) for c in other["case_id"].values] == [r.case_id for r in records]):
                ds[f"es_{other.attrs['editor']}"] = ("fact", other["es"].values)
                editors.append(other.attrs["editor"])
        return run.finish(
            ds, str(lm.device), model=p["model"], editor=params.editor, source_run=params.run,
            hparams=dataclasses.asdict(editor.hp), templates=json.dumps(editor.templates),
            es_editors=json.dumps(editors),
        )

    return execute(params, body, overwrite)


def key_agreement(lm, editor, record: Record) -> dict[str, float]:
    """How well the key of the plain rewrite prompt agrees with the key averaged over the editor's
    context prefixes (what r-ROME writes the value at): their cosine, and the share
    uᵀk / uᵀk̄ (u = C⁻¹k̄) of the rank-one update that the plain prompt receives (1 under ROME,
    which puts the plain key in the update). Needs a ROME-type editor (``layer``, ``mtype``,
    ``templates``, ``C``)."""
    from repro.editors.linalg import solve_psd
    from repro.editors.locate import subject_keys

    req = to_request(record)
    prompts = [t.replace("{}", req.prompt) for t in editor.templates]
    if prompts[0] != req.prompt:
        raise ValueError("the editor's first context template must be the plain prompt '{}'")
    with torch.no_grad():
        keys = subject_keys(lm, editor.hp.layer, editor.mtype, prompts, req.subject).double()
        k, k_avg = keys[0], keys.mean(0)
        u = solve_psd(editor.C, k_avg, getattr(editor.hp, "cov_ridge", 0.0))
    return {"cosine": float(k @ k_avg / (k.norm() * k_avg.norm())), "share": float(u @ k / (u @ k_avg))}
