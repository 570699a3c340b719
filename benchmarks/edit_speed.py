"""Seconds per edit and peak memory of every editor on one model, with and without early stopping,
and where each edit's time goes (value optimisation vs keys vs closed-form update).

Each configuration runs in its own subprocess so that its peak resident memory is its own.
A warm-up edit first fills the caches every run shares (second-moment statistics, context
prefixes, AlphaEdit's projector), then ``--edits`` held-out facts are timed one call each.

    python benchmarks/edit_speed.py                 # all editors, SmolLM2-135M, 3 edits each
    python benchmarks/edit_speed.py --editors rome memit --edits 5
    python benchmarks/edit_speed.py --micro         # also the two plumbing micro-benchmarks
    python benchmarks/edit_speed.py --batched 10 100:6   # joint vs one-by-one value optimisation of
                                                    # MEMIT batches of 10 (and 100, steps capped at 6)

Run it alone on the machine: concurrent jobs on the same cores distort the timings several-fold.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# editors whose value optimisation can stop early (MPES); the others have a single setting
VALUE_OPTIMISING = {"rome", "r-rome", "memit", "emmet", "alphaedit", "encore"}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _dtype():
    """The model precision of this benchmark (``--dtype``, passed to the per-configuration children
    through ``NORMGROWTH_DTYPE``)."""
    from repro.core.models import DTYPES

    return DTYPES[os.environ.get("NORMGROWTH_DTYPE", "float32")]


def one_config(model: str, editor: str, early_stop: str | None, n_edits: int, seed: int) -> dict:
    """Time ``n_edits`` single-fact calls of one editor configuration (in this process)."""
    import torch

    from repro.data.counterfact import load_records
    from repro.editors import make_editor
    from repro.data.splits import select_requests
    from repro.core.models import load_model

    lm = load_model(model, dtype=_dtype())
    rss_model = _rss_mib()
    overrides = {"early_stop": early_stop} if early_stop else {}
    ed = make_editor(editor, lm, **overrides)
    reqs = select_requests(load_records(ROOT / "data/facts/smollm2-135m.json"), n_edits + 1, seed)
    mats = ed.edited_matrices()
    w0 = [lm.spec.weight(lm.model, l, m).detach().clone() for l, m in mats]

    def restore():
        ed.load_state_dict({})
        with torch.no_grad():
            for (l, m), w in zip(mats, w0):
                lm.spec.weight(lm.model, l, m).copy_(w)

    ed.apply(reqs[:1])  # warm-up: statistics, prefixes, projectors
    restore()
    phases: dict[str, float] = {}
    steps, total = [], 0.0
    for req in reqs[1:]:
        t = time.perf_counter()
        res = ed.apply([req])
        total += time.perf_counter() - t
        for k, v in res.timings.items():
            phases[k] = phases.get(k, 0.0) + v
        steps += [i.get("v_steps", i.get("steps")) for i in res.info]
        restore()
    return {
        "editor": editor, "early_stop": early_stop or "default", "edits": n_edits,
        "s_per_edit": total / n_edits,
        "phase_share": {k: v / total for k, v in phases.items()},
        "mean_steps": (sum(s for s in steps if s is not None) / len([s for s in steps if s is not None]))
        if any(s is not None for s in steps) else None,
        "peak_rss_mib": _rss_mib(), "rss_after_load_mib": rss_model,
        "threads": torch.get_num_threads(), "device": str(lm.device),
    }


def values_config(model: str, editor: str, joint: bool, n: int, steps: int | None, early_stop: str | None,
                  seed: int, out: Path) -> dict:
    """Time the value optimisation (step 1 of a batch editor's call) of ``n`` requests, jointly or one
    after another (in this process); the z found are saved to ``out`` for the comparison."""
    import torch

    from repro.data.counterfact import load_records
    from repro.editors import make_editor
    from repro.data.splits import select_requests
    from repro.core.models import load_model

    lm = load_model(model, dtype=_dtype())
    rss_model = _rss_mib()
    overrides = {"batch_values": joint}
    if steps:
        overrides["v_steps"] = steps
    if early_stop:
        overrides["early_stop"] = early_stop
    ed = make_editor(editor, lm, **overrides)
    reqs = select_requests(load_records(ROOT / "data/facts/smollm2-135m.json"), n + 1, seed)
    ed.templates  # noqa: B018 (context prefixes generated before the clock starts)
    steps_set, ed.hp.v_steps = ed.hp.v_steps, 1
    ed.values(reqs[:1])  # warm-up: one step of one request
    ed.hp.v_steps = steps_set
    load0 = os.getloadavg()[0]
    t, cpu = time.perf_counter(), time.process_time()
    vals = ed.values(reqs[1:])
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    torch.save({"z": torch.stack([v.v_star for v in vals]), "v": torch.stack([v.v_init for v in vals]),
                "steps": [v.steps for v in vals]}, out)
    return {"joint": joint, "n": n, "s_per_fact": seconds / n, "seconds": seconds, "cpu_per_fact": cpu / n,
            "mean_steps": sum(v.steps for v in vals) / n, "v_steps": ed.hp.v_steps,
            "early_stop": ed.hp.early_stop, "group": ed.hp.batch_values_max if joint else 1,
            "peak_rss_mib": _rss_mib(), "over_model_mib": _rss_mib() - rss_model,
            "load": [load0, os.getloadavg()[0]], "threads": torch.get_num_threads()}


def batched(model: str, editor: str, specs: list[str], early_stop: str | None, seed: int) -> list[dict]:
    """Joint vs one-by-one value optimisation for each ``SIZE[:STEPS]`` of ``specs``, each in its own
    subprocess (peak memory of its own); rows with the largest |z| difference between the two."""
    import tempfile

    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            n, _, steps = spec.partition(":")
            got = {}
            for joint in (False, True):
                out = Path(tmp) / f"{n}-{joint}.pt"
                cmd = [sys.executable, __file__, "--model", model, "--seed", str(seed), "--_values",
                       f"{editor},{int(joint)},{n},{steps or 0},{early_stop or 'default'},{out}"]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
                if proc.returncode != 0:
                    raise RuntimeError(f"{spec} joint={joint} failed:\n{proc.stderr[-2000:]}")
                got[joint] = (json.loads(proc.stdout.strip().splitlines()[-1]), torch.load(out))
                print(f"  done {n} requests {'joint' if joint else 'one by one'}: "
                      f"{got[joint][0]['s_per_fact']:.2f} s/fact", file=sys.stderr)
            (one, z1), (joint, z2) = got[False], got[True]
            rows.append({"n": int(n), "one": one, "joint": joint,
                         "max_dz": float((z1["z"] - z2["z"]).abs().max()),
                         "max_shift": float((z1["z"] - z1["v"]).abs().max()),
                         "same_steps": z1["steps"] == z2["steps"]})
    return rows


def micro(model: str) -> list[dict]:
    """Two plumbing choices, measured: log-probs only at the loss positions instead of the full
    vocabulary at every position, and stopping the forward pass after the key layer."""
    import torch

    from repro.editors.locate import context_templates, subject_keys
    from repro.core.scoring import make_batch
    from repro.core.scoring import logprobs_at
    from repro.core.hooks import capture, edit_output
    from repro.core.models import load_model

    lm = load_model(model, dtype=_dtype())
    templates = [t.replace("{}", "{} plays the") for t in context_templates(lm, 0)]
    batch = make_batch(lm, templates, "Michael Jordan", "sport of basketball")
    layer, mtype = 1, lm.spec.mlp_out
    out = []

    def timeit(fn, reps=5):
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps

    # as in the value optimisation: a vector added to the edited matrix's output is what gets a gradient
    delta = torch.zeros(lm.spec.weight(lm.model, layer, mtype).shape[0], requires_grad=True)
    module = lm.spec.matrix_module(lm.model, layer, mtype)

    def full():
        with edit_output(module, lambda o: o + delta):
            logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        lp = torch.log_softmax(logits.float(), -1)
        picked = lp.gather(1, batch.loss_pos.unsqueeze(-1).expand(-1, -1, lp.shape[-1]))
        picked.mean().backward()

    def picked():
        with edit_output(module, lambda o: o + delta):
            lp = logprobs_at(lm, batch, batch.loss_pos)
        lp.mean().backward()

    a, b = timeit(full), timeit(picked)
    out.append({"change": "log-probs only at loss positions (forward+backward)", "before_s": a, "after_s": b})

    def keys_full():
        module = lm.spec.matrix_module(lm.model, layer, mtype)
        with torch.no_grad(), capture({"k": module}, what="input"):
            lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)

    def keys_stop():
        subject_keys(lm, layer, mtype, templates, "Michael Jordan")

    a, b = timeit(keys_full), timeit(keys_stop)
    out.append({"change": f"forward stopped after the key layer ({layer})", "before_s": a, "after_s": b})

    from repro.editors.locate import optimize_value

    kw = dict(steps=5, lr=0.5, weight_decay=0.5, kl_factor=0.0625, clamp_norm_factor=4.0, nll_stop=0.0)
    for where in (1, 7):  # ROME's layer (δ inside the layer) and MEMIT's last layer (δ on its output)
        whole = where == 7
        mod = lm.spec.layer_modules(lm.model)[where] if whole else None
        run = lambda reuse: optimize_value(lm, where, mtype, templates, "Michael Jordan",  # noqa: E731
                                           "sport of basketball", module=mod, reuse_prefix=reuse, **kw)
        a, b = timeit(lambda: run(False), reps=2), timeit(lambda: run(True), reps=2)
        out.append({"change": f"layers below {where} computed once per value optimisation (5 steps)",
                    "before_s": a, "after_s": b})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--editors", nargs="*", default=None, help="default: every registered editor")
    ap.add_argument("--edits", type=int, default=3)
    ap.add_argument("--seed", type=int, default=99)
    ap.add_argument("--micro", action="store_true", help="also run the plumbing micro-benchmarks")
    ap.add_argument("--batched", nargs="+", default=None, metavar="SIZE[:STEPS]",
                    help="only compare joint and one-by-one value optimisation of batches of SIZE requests "
                         "(value phase only; STEPS caps the Adam steps)")
    ap.add_argument("--batched-editor", default="memit")
    ap.add_argument("--early-stop", default=None, help="for --batched: nll or mpes (default: the editor's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="model precision (default float32)")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_values", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._values:  # child process: one value-optimisation timing
        editor, joint, n, steps, early, out = args._values.split(",", 5)
        print(json.dumps(values_config(args.model, editor, bool(int(joint)), int(n), int(steps) or None,
                                       None if early == "default" else early, args.seed, Path(out))))
        return
    if args.batched:
        rows = batched(args.model, args.batched_editor, args.batched, args.early_stop, args.seed)
        r0 = rows[0]["one"]
        print(f"\nModel {args.model}, {args.batched_editor} value optimisation (step 1 of a call) only, "
              f"{r0['threads']} thread(s), stopping {r0['early_stop']}; held-out facts (seed {args.seed}); "
              f"a warm-up request first; one-by-one = batch_values false, joint = true. CPU s/fact is the "
              f"process's CPU time (time.process_time), which other jobs' time slices do not inflate; "
              f"wall s/fact with the load average over the run beside it.\n")
        print("| requests | max steps | joint group | one-by-one CPU s/fact | joint CPU s/fact | speed-up (CPU) | "
              "wall s/fact (one / joint) | load avg (one / joint) | mean steps | max abs dz (max abs z-v) | "
              "same steps | peak RSS over model MiB (one / joint) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            o, j = r["one"], r["joint"]
            print(f"| {r['n']} | {o['v_steps']} | {min(j['group'], r['n'])} | {o['cpu_per_fact']:.2f} | "
                  f"{j['cpu_per_fact']:.2f} | {o['cpu_per_fact'] / j['cpu_per_fact']:.2f}x | "
                  f"{o['s_per_fact']:.2f} / {j['s_per_fact']:.2f} | "
                  f"{o['load'][0]:.1f}-{o['load'][1]:.1f} / {j['load'][0]:.1f}-{j['load'][1]:.1f} | "
                  f"{o['mean_steps']:.1f} | {r['max_dz']:.1e} ({r['max_shift']:.1f}) | "
                  f"{'yes' if r['same_steps'] else 'no'} | {o['over_model_mib']:.0f} / {j['over_model_mib']:.0f} |")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=1))
        return

    if args.dtype:
        os.environ["NORMGROWTH_DTYPE"] = args.dtype  # the children inherit it
    if args._one:  # child process: one configuration, result as JSON on stdout's last line
        editor, early = args._one.split(",")
        print(json.dumps(one_config(args.model, editor, None if early == "default" else early,
                                    args.edits, args.seed)))
        return

    from repro.editors import EDITORS

    editors = args.editors or list(EDITORS)
    unknown = set(editors) - set(EDITORS)
    if unknown:
        ap.error(f"unknown editors {sorted(unknown)}; known: {sorted(EDITORS)}")
    rows = []
    for editor in editors:
        settings = ["nll", "mpes"] if editor in VALUE_OPTIMISING else ["default"]
        for early in settings:
            cmd = [sys.executable, __file__, "--model", args.model, "--edits", str(args.edits),
                   "--seed", str(args.seed), "--_one", f"{editor},{early}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if proc.returncode != 0:
                print(f"{editor} ({early}) failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  done {editor:10s} {early:8s} {row['s_per_edit']:.2f} s/edit", file=sys.stderr)

    print(f"\nModel {args.model}, {args.edits} single-fact edits per row, "
          f"{rows[0]['threads'] if rows else '?'} threads, device {rows[0]['device'] if rows else '?'}\n")
    print("| editor | stopping | s/edit | mean steps | value opt. | keys | update | other | peak RSS MiB | over model MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ph = r["phase_share"]
        other = max(0.0, 1 - sum(ph.values()))
        fmt = lambda k: f"{100 * ph[k]:.0f} %" if k in ph else "–"  # noqa: E731
        steps = f"{r['mean_steps']:.1f}" if r["mean_steps"] is not None else "–"
        print(f"| {r['editor']} | {r['early_stop']} | {r['s_per_edit']:.2f} | {steps} | {fmt('value')} | "
              f"{fmt('keys')} | {fmt('update')} | {100 * other:.0f} % | {r['peak_rss_mib']:.0f} | "
              f"{r['peak_rss_mib'] - r['rss_after_load_mib']:.0f} |")
    if args.micro:
        m = micro(args.model)
        print("\n| plumbing change | before s | after s | speed-up |\n|---|---|---|---|")
        for r in m:
            print(f"| {r['change']} | {r['before_s']:.3f} | {r['after_s']:.3f} | {r['before_s'] / r['after_s']:.1f}× |")
        rows.append({"micro": m})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
