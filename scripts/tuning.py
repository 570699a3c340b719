"""The settings checks behind r-ROME's and ENCORE's hyperparameters, and MEMIT's and ENCORE's on
Gemma-3-270M: single-edit efficacy runs on training-split facts (never the evaluation facts the study reports), one file each under
``data/runs/tuning/`` (its README tabulates them; the book's efficacy page reads them).

    python scripts/tuning.py [--only NAME ...] [--overwrite] [--list]

The checks on ENCORE and MEMIT edit only facts whose rewrite prompt opens with the subject (where
the averaged-key editors miss): that selection of the training split is written first, to
``data/runs/tuning/train_opening.json``, so the files name a committed facts file.
"""
from __future__ import annotations

import argparse
import sys
from typing import NamedTuple

from repro.core.models import DEFAULT_MODEL
from repro.core.paths import from_root
from repro.data.counterfact import load_records, save_records
from repro.data.splits import split_of
from repro.runs.efficacy import EfficacyParams, run_efficacy

FACTS = "data/facts/smollm2-135m.json"
OPENING = "data/runs/tuning/train_opening.json"
GEMMA_FACTS = "data/facts/gemma3-270m-long.json"
N_FACTS, SEED = 24, 0


class Check(NamedTuple):
    editor: str
    facts: str
    hparams: dict  # overriding the editor's yaml for this model
    model: str = DEFAULT_MODEL


CHECKS: dict[str, Check] = {
    "r-rome_base": Check("r-rome", FACTS, {}),
    "r-rome_l7": Check("r-rome", FACTS, {"layer": 7}),
    "r-rome_steps40": Check("r-rome", FACTS, {"v_steps": 40, "nll_stop": 0.01}),
    "open_encore_base": Check("encore", OPENING, {}),
    "open_encore_nw5": Check("encore", OPENING, {"norm_weight": 5.0}),
    "open_memit_base": Check("memit", OPENING, {}),
    # Gemma-3-270M's MEMIT and ENCORE settings (layers 1-5, λ 1900 scaled from GPT-J's 15000 by key
    # width), on the training split of the file its long runs edit; "published": each layer's
    # residual used as the matrix's output change as published, not carried back through Gemma's
    # MLP post-norm.
    "gemma_memit_base": Check("memit", GEMMA_FACTS, {}, "gemma3-270m"),
    "gemma_memit_published": Check("memit", GEMMA_FACTS, {"post_norm_targets": False}, "gemma3-270m"),
    "gemma_encore_base": Check("encore", GEMMA_FACTS, {}, "gemma3-270m"),
}


def opening_records(facts: str = FACTS) -> list:
    """The training-split records of ``facts`` whose rewrite prompt opens with the subject."""
    return [r for r in load_records(from_root(facts))
            if split_of(r) == "train" and r.requested_rewrite.prompt.startswith("{}")]


def check_params(name: str) -> EfficacyParams:
    """The efficacy parameters of the settings check ``name`` (a key of :data:`CHECKS`)."""
    if name not in CHECKS:
        raise KeyError(f"unknown settings check {name!r}; known: {', '.join(CHECKS)}")
    c = CHECKS[name]
    return EfficacyParams(model=c.model, editor=c.editor, n_facts=N_FACTS, seed=SEED, facts=c.facts,
                          split="train", output=f"data/runs/tuning/{name}.nc", hparams=dict(c.hparams))


def write_opening(path: str = OPENING) -> int:
    """Write the opening-subject selection (unchanged when already there); the number of records."""
    records = opening_records()
    target = from_root(path)
    if not target.exists():
        save_records(records, target)
    elif [r.case_id for r in load_records(target)] != [r.case_id for r in records]:
        raise ValueError(f"{path} differs from the selection of {FACTS}; remove it to rebuild")
    return len(records)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="checks to run (default: all)")
    ap.add_argument("--overwrite", action="store_true", help="replace finished files (a rerun)")
    ap.add_argument("--list", action="store_true", help="list the checks and their files")
    args = ap.parse_args(argv)
    names = args.only or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:  # before anything runs
        ap.error(f"unknown settings check(s) {', '.join(unknown)}; known: {', '.join(CHECKS)}")
    if args.list:
        for name in names:
            p = check_params(name)
            done = "done" if from_root(p.output).exists() else "missing"
            print(f"{name:<22} {done:<8} {p.model:<13} {p.editor:<7} {p.facts}  {p.hparams or 'defaults'}")
        return
    print(f"{write_opening()} training-split facts open with their subject ({OPENING})")
    for name in names:
        ds = run_efficacy(check_params(name), overwrite=args.overwrite)
        print(f"{name}: ES {float(ds['es'].mean()):.2f}  PS {float(ds['ps'].mean()):.2f}  "
              f"NS {float(ds['ns'].mean()):.2f}")


if __name__ == "__main__":
    sys.exit(main())
