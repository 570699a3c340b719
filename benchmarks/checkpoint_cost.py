"""What one checkpoint measurement of a sequential run costs (repro.measure.checkpoint), part by
part, as the number of facts edited so far grows, with edit quality scored over every edited fact
or over the fixed-size sample long runs use (the first ``--quality-first`` edits plus a seeded
``--quality-sample`` of the rest); and what share of a run the measurements take.

    python benchmarks/checkpoint_cost.py                                   # SmolLM2-135M, long-run facts
    python benchmarks/checkpoint_cost.py --counts 1 100 --every 10 20 --n-edits 100   # a 100-edit run

No edit is made: the cost of a measurement depends on how many facts it scores, not on what the
edits did. Scoring every edited fact is measured up to ``--all-up-to`` facts and projected
linearly beyond (marked ``~``). Run it alone on the machine: concurrent jobs distort the timings
(the output says how many torch threads it had).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def schedule(n_edits: int, every: int = 0, at=()) -> list[int]:
    """The checkpoints of a run: 0, multiples of ``every``, the counts ``at``, and the last edit."""
    steps = {0, n_edits, *[m for m in at if m <= n_edits]}
    if every:
        steps |= set(range(every, n_edits + 1, every))
    return sorted(steps)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--facts", default="data/facts/smollm2-135m-long.json")
    ap.add_argument("--editor", default="memit", help="whose edited matrices are probed (no edit is made)")
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 100, 300, 1000, 3000],
                    help="facts edited so far at the measured checkpoints")
    ap.add_argument("--quality-first", type=int, default=100)
    ap.add_argument("--quality-sample", type=int, default=200)
    ap.add_argument("--all-up-to", type=int, default=300, help="measure all-facts quality up to this count")
    ap.add_argument("--n-edits", type=int, default=3000, help="run length for the projection")
    ap.add_argument("--every", type=int, nargs="*", default=[20, 100],
                    help="regular checkpoint intervals to project (besides the log-spaced schedule)")
    ap.add_argument("--at", type=int, nargs="*", default=[50, 100, 250, 500, 1000, 2000, 3000],
                    help="the log-spaced schedule to project")
    ap.add_argument("--seconds-per-edit", type=float, default=8.0,
                    help="editing time per fact for the projection (see the run files' edit_seconds)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from repro.data.counterfact import load_records
    from repro.editors import make_editor
    from repro.data.splits import held_out_records, select_records
    from repro.measure.checkpoint import PARTS, MeasureParams, Measurer
    from repro.measure.quality import edit_quality
    from repro.core.models import load_model

    lm = load_model(args.model)
    facts = load_records(ROOT / args.facts)
    n_max = max(max(args.counts), args.n_edits)
    records = select_records(facts, n_max, args.seed)
    mp = MeasureParams(quality_first=args.quality_first, quality_sample=args.quality_sample)
    held = held_out_records(facts, records, mp.n_recall, args.seed)
    edited = make_editor(args.editor, lm).edited_matrices()
    m = Measurer(lm, records, held, edited, mp, seed=args.seed)
    t = time.perf_counter()
    m.set_reference()
    ref_s = time.perf_counter() - t
    m.measure(1)  # warm-up (task prefixes, allocator)
    rows = {}
    for n in args.counts:
        ds = m.measure(n)
        rows[n] = {p: float(ds["measure_seconds"].sel(part=p).item()) for p in PARTS}
        rows[n]["scored"] = int(ds["quality_n"].item())
        if n <= args.all_up_to:
            t = time.perf_counter()
            edit_quality(lm, records, n)
            rows[n]["all"] = time.perf_counter() - t
    measured_all = sorted((n, r["all"]) for n, r in rows.items() if "all" in r)
    per_fact = measured_all[-1][1] / measured_all[-1][0] if measured_all else float("nan")

    print(f"model {args.model}, {torch.get_num_threads()} torch threads, device {lm.device}; facts {args.facts}; "
          f"edited matrices of {args.editor}: {len(edited)}; reference activations {ref_s:.1f} s (once per run)")
    print(f"edit quality sample: first {args.quality_first} + seeded {args.quality_sample} of the rest")
    head = f"{'edited':>7} {'scored':>7} " + " ".join(f"{p:>12}" for p in PARTS) + f" {'total s':>8} {'quality, all facts':>19}"
    print(head)
    for n in args.counts:
        r = rows[n]
        allq = f"{r['all']:.1f}" if "all" in r else f"~{per_fact * n:.0f}"
        print(f"{n:>7} {r['scored']:>7} " + " ".join(f"{r[p]:>12.1f}" for p in PARTS)
              + f" {sum(r[p] for p in PARTS):>8.1f} {allq:>19}")
    print()

    # projection: fixed parts from the mean over the measured counts, quality interpolated
    fixed = float(np.mean([sum(r[p] for p in PARTS if p != "quality") for r in rows.values()]))
    counts = sorted(rows)
    qs = [rows[n]["quality"] for n in counts]

    def cost(steps, sampled=True):
        total = ref_s
        for s in steps:
            q = 0.0 if s == 0 else (float(np.interp(s, counts, qs)) if sampled else per_fact * s)
            total += fixed + q
        return total

    edit_s = args.n_edits * args.seconds_per_edit
    print(f"projection for {args.n_edits} edits at {args.seconds_per_edit:.1f} s per edit ({edit_s / 3600:.1f} h of editing):")
    print(f"{'schedule':<28} {'checkpoints':>11} {'sampled: h':>11} {'share':>6} {'all facts: h':>13} {'share':>6}")
    plans = [(f"log-spaced {args.at}"[:28], schedule(args.n_edits, 0, args.at))]
    plans += [(f"every {k}", schedule(args.n_edits, k)) for k in args.every]
    for name, steps in plans:
        a, b = cost(steps), cost(steps, sampled=False)
        print(f"{name:<28} {len(steps):>11} {a / 3600:>11.2f} {a / (a + edit_s):>6.0%} {b / 3600:>13.2f} {b / (b + edit_s):>6.0%}")


if __name__ == "__main__":
    main()
