"""What one checkpoint measurement of a sequential run costs (repro.measure.checkpoint), part by
part, and what share of a run's time the measurements take at a given checkpoint interval.

    python benchmarks/checkpoint_cost.py                          # SmolLM2-135M, default sizes
    python benchmarks/checkpoint_cost.py --n-edits 100 --every 10 20 25 --seconds-per-edit 15

Edit quality is measured over the facts edited so far, so its cost grows along a run; the table
shows it for the first checkpoint with edits and for the last (all ``--n-edits`` facts). The
projection assumes that cost grows linearly in between. Run it alone on the machine: concurrent
jobs distort the timings.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--editor", default="memit", help="whose edited matrices are probed (no edit is made)")
    ap.add_argument("--n-edits", type=int, default=100)
    ap.add_argument("--every", type=int, nargs="*", default=[10, 20, 25, 50])
    ap.add_argument("--seconds-per-edit", type=float, default=15.0,
                    help="editing time per fact for the projection (see benchmarks/edit_speed.py)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from repro.data.counterfact import load_records
    from repro.editors import make_editor
    from repro.experiment import held_out_records, select_records
    from repro.measure.checkpoint import PARTS, MeasureParams, Measurer
    from repro.models import load_model

    lm = load_model(args.model)
    records = select_records(load_records(ROOT / "data/facts/smollm2-135m.json"), args.n_edits, args.seed)
    held = held_out_records(load_records(ROOT / "data/facts/smollm2-135m.json"), records, MeasureParams().n_recall,
                            args.seed)
    edited = make_editor(args.editor, lm).edited_matrices()
    m = Measurer(lm, records, held, edited, MeasureParams(), seed=args.seed)
    t = time.perf_counter()
    m.set_reference()
    ref_s = time.perf_counter() - t
    m.measure(1)  # warm-up (task prefixes, allocator)
    rows = {}
    for n in (1, args.n_edits):
        ds = m.measure(n)
        rows[n] = {p: float(ds["measure_seconds"].sel(part=p).item()) for p in PARTS}

    print(f"model {args.model}, {torch.get_num_threads()} threads, device {lm.device}; "
          f"edited matrices of {args.editor}: {len(edited)}; reference activations: {ref_s:.1f} s (once per run)")
    print(f"{'part':<12} {'s, 1 fact edited':>17} {'s, %d edited' % args.n_edits:>15}")
    for p in PARTS:
        print(f"{p:<12} {rows[1][p]:>17.1f} {rows[args.n_edits][p]:>15.1f}")
    first, last = sum(rows[1].values()), sum(rows[args.n_edits].values())
    print(f"{'total':<12} {first:>17.1f} {last:>15.1f}")
    print()
    edit_s = args.n_edits * args.seconds_per_edit
    print(f"projection for {args.n_edits} edits at {args.seconds_per_edit:.1f} s per edit ({edit_s:.0f} s of editing):")
    print(f"{'every':>6} {'checkpoints':>11} {'measure s':>10} {'share of run':>13}")
    q1, qn = rows[1]["quality"], rows[args.n_edits]["quality"]
    fixed = first - q1
    for k in args.every:
        steps = sorted({0, *range(k, args.n_edits + 1, k), args.n_edits})
        cost = ref_s + sum(fixed + (q1 + (qn - q1) * (s - 1) / max(args.n_edits - 1, 1) if s else 0.0) for s in steps)
        print(f"{k:>6} {len(steps):>11} {cost:>10.0f} {cost / (cost + edit_s):>13.0%}")


if __name__ == "__main__":
    main()
