"""Why the averaged-key editors miss some single edits: for every fact of a single-edit efficacy run,
compare the key of the plain rewrite prompt with the key averaged over r-ROME's context prefixes.

    python scripts/key_agreement.py [--run data/runs/efficacy_r-rome_smollm2-135m.nc]
                                    [--output data/runs/key_agreement_r-rome_smollm2-135m.nc] [--overwrite]

Writes a NetCDF file (dim ``fact``: cosine, share of the update the plain prompt receives, whether
the subject opens the prompt, whether its last token changes without the leading space, and ES of every
single-edit run of the profile on the same facts) that the book's efficacy page reads; the run
itself is :func:`repro.runs.efficacy.run_key_agreement`.
"""
from __future__ import annotations

import argparse

from repro.runs.efficacy import KeyAgreementParams, key_agreement_table, run_key_agreement


def main() -> None:
    defaults = KeyAgreementParams()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=defaults.run)
    ap.add_argument("--editor", default=defaults.editor, help="a ROME-type editor whose prefixes and C are used")
    ap.add_argument("--output", default=defaults.output)
    ap.add_argument("--overwrite", action="store_true", help="replace a finished file made with other parameters")
    args = ap.parse_args()
    params = KeyAgreementParams(run=args.run, editor=args.editor, output=args.output)
    ds = run_key_agreement(params, overwrite=args.overwrite)
    print(key_agreement_table(ds))
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
