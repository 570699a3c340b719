"""Why the averaged-key editors miss some single edits: for every fact of a single-edit efficacy run,
compare the key of the plain rewrite prompt with the key averaged over r-ROME's context prefixes.

    python scripts/key_agreement.py [--run data/runs/efficacy_r-rome_smollm2-135m.nc]
                                    [--output data/runs/key_agreement_r-rome_smollm2-135m.nc]

Writes a NetCDF file (dim ``fact``: cosine, share of the update the plain prompt receives, whether
the subject opens the prompt, whether its last token changes without the leading space, and ES of every
single-edit run of the profile on the same facts) that the book's efficacy page reads.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import xarray as xr
from tqdm import tqdm

from repro import store
from repro.data.counterfact import load_records
from repro.editors import make_editor
from repro.efficacy import key_agreement, key_agreement_table, subject_opens_prompt
from repro.experiment import select_records
from repro.models import load_model
from repro.paths import from_root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="data/runs/efficacy_r-rome_smollm2-135m.nc")
    ap.add_argument("--editor", default="r-rome", help="a ROME-type editor whose prefixes and C are used")
    ap.add_argument("--output", default="data/runs/key_agreement_r-rome_smollm2-135m.nc")
    args = ap.parse_args()
    t0 = time.perf_counter()
    run = store.read_netcdf(from_root(args.run))
    p = store.run_params(run)
    records = select_records(load_records(from_root(p["facts"])), p["n_facts"], p["seed"], p["split"])
    if [r.case_id for r in records] != [int(c) for c in run["case_id"].values]:
        raise ValueError(f"{args.run}: its facts cannot be re-selected from {p['facts']} (file changed?)")
    lm = load_model(p["model"])
    editor = make_editor(args.editor, lm, **p.get("hparams", {}))
    rows = [key_agreement(lm, editor, r) for r in tqdm(records, desc="keys")]
    tok = lm.tokenizer
    ds = xr.Dataset(
        {
            "cosine": ("fact", np.array([r["cosine"] for r in rows])),
            "share": ("fact", np.array([r["share"] for r in rows])),
            "subject_opens": ("fact", np.array([subject_opens_prompt(r) for r in records], dtype=np.int8)),
            "last_token_differs": ("fact", np.array([tok.tokenize(r.requested_rewrite.subject)[-1]
                                                     != tok.tokenize(" " + r.requested_rewrite.subject)[-1]
                                                     for r in records], dtype=np.int8)),
            "case_id": ("fact", run["case_id"].values),
        },
        coords={"fact": run["fact"].values},
    )
    ds["cosine"].attrs["long_name"] = "cosine of the plain prompt's key and the key averaged over the prefixes"
    ds["last_token_differs"].attrs["long_name"] = "the subject's last token differs with and without a leading space"
    ds["share"].attrs["long_name"] = "u^T k / u^T k_avg, u = C^-1 k_avg: share of r-ROME's update the plain prompt gets"
    editors = []
    for path in sorted(Path(from_root("data/runs")).glob(f"efficacy_*_{p['model']}.nc")):
        other = store.read_netcdf(path)
        if [int(c) for c in other["case_id"].values] == [r.case_id for r in records]:
            ds[f"es_{other.attrs['editor']}"] = ("fact", other["es"].values)
            editors.append(other.attrs["editor"])
    ds.attrs.update(store.provenance(
        {"run": args.run, "editor": args.editor, "output": args.output}, str(lm.device),
        run_id=Path(args.output).stem, model=p["model"], editor=args.editor, source_run=args.run,
        hparams=dataclasses.asdict(editor.hp), templates=json.dumps(editor.templates),
        es_editors=json.dumps(editors), wall_time_s=round(time.perf_counter() - t0, 2),
    ))
    store.write_netcdf(ds, from_root(args.output))
    print(key_agreement_table(ds))
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
