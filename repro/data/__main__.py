"""Command line: ``python -m repro.data build-facts|build-text|build-tasks``."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _parser() -> argparse.ArgumentParser:
    from repro.core.models import DEFAULT_MODEL
    from repro.data.build_facts import PRESETS

    parser = argparse.ArgumentParser(prog="python -m repro.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    facts = sub.add_parser("build-facts", help="build CounterFact-format records checked against a model")
    facts.add_argument("--model", default=DEFAULT_MODEL, help=f"the model the facts are checked against (default: {DEFAULT_MODEL})")
    facts.add_argument("--preset", default="default", choices=sorted(PRESETS),
                       help="default: data/facts/<model>.json (1,500 facts checked per relation); long: "
                            "every fact checked, more cities and relations, higher caps, distinct "
                            "subjects -> data/facts/<model>-long.json")
    facts.add_argument("--bigbench", type=Path,
                       help="BIG-bench tarball (default: cache, downloaded if missing)")
    facts.add_argument("--out", type=Path, help="output JSON (default: data/facts/<model>[-long].json)")
    facts.add_argument("--seed", type=int, default=0)
    facts.add_argument("--max-checked", type=int, help="facts checked per relation (default: the preset's)")
    facts.add_argument("--max-records", type=int, help="records per relation (default: the preset's)")
    facts.add_argument("--max-per-object", type=int,
                       help="records per relation and true object (default: the preset's)")
    facts.add_argument("--min-city-population", type=int,
                       help="smallest city of the city -> country facts (default: the preset's)")
    facts.add_argument("--batch-size", type=int, default=48)
    text = sub.add_parser("build-text", help="regenerate data/text/wiki_{train,test}.txt")
    text.add_argument("--bigbench", type=Path)
    text.add_argument("--out-dir", type=Path, help="default: data/text")
    tasks = sub.add_parser("build-tasks", help="regenerate the few-shot task files data/tasks/*.json")
    tasks.add_argument("--bigbench", type=Path)
    tasks.add_argument("--out-dir", type=Path, help="default: data/tasks")
    tasks.add_argument("--seed", type=int, default=0)
    tasks.add_argument("--only", nargs="+", help="build only these tasks")
    return parser


def _print_summary(summary: dict[str, dict[str, int]]) -> None:
    """The counts table of a build (facts, checked, known, kept %, records per relation)."""
    from repro.data.build_facts import RELATIONS

    print(f"{'relation':<32}{'facts':>7}{'checked':>9}{'known':>7}{'kept%':>7}{'records':>9}")
    for rid, row in summary.items():
        share = 100 * row["known"] / max(row["checked"], 1)
        name = f"{rid} {RELATIONS[rid].name}"
        counts = f"{row['facts']:>7}{row['checked']:>9}{row['known']:>7}"
        print(f"{name:<32}{counts}{share:>6.0f}%{row['records']:>9}")
    print(f"{'total':<32}{'':>30}{sum(r['records'] for r in summary.values()):>9}")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.time()
    if args.command == "build-facts":
        from repro.data.build_facts import build_facts, resolve_preset

        preset = resolve_preset(args.preset, max_records=args.max_records, max_per_object=args.max_per_object,
                                min_city_population=args.min_city_population)
        out = args.out or REPO / "data" / "facts" / f"{args.model}{preset.suffix}.json"
        summary = build_facts(args.model, out, args.bigbench, args.seed, args.max_checked, args.batch_size,
                              preset)
        _print_summary(summary)
        print(f"wrote {out} in {time.time() - start:.0f} s")
    elif args.command == "build-text":
        from repro.data.text import build_text

        counts = build_text(args.bigbench, args.out_dir)
        print(f"paragraphs: {counts} ({time.time() - start:.0f} s)")
    else:
        from repro.data.tasks import build_tasks

        for name, task in build_tasks(args.bigbench, args.out_dir, args.seed, args.only).items():
            print(f"{name}: {len(task.labels)} labels, {task.k} demonstrations, {len(task.test)} test "
                  f"examples, chance {task.chance:.2f}")
        print(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
