"""How big a series of commits is, as a submission would count it: the diffs of every commit added
up, and the objects packed.

    python scripts/diff_budget.py --since REV [--diffs-mib 256] [--pack-mib 512]

Long runs commit resume states of tens of MB (AlphaEdit's and ENCORE's hold five 1,536² float64
Gram matrices, ~68 MB on SmolLM2-135M before packing). Each commit of such a file counts again, so advancing two of
them and committing each twice can pass a limit that one commit of each stays under. Run this before
pushing a series; it exits 1 when a limit is passed.

Sizes are counted conservatively, per commit and file against the commit's first parent: an added
file counts its new size, a deleted one its old size, a modified binary file old plus new (a binary
diff carries both ways), a modified text file the length of its unified diff. The pack size is that
of ``git pack-objects`` over the objects the series adds.
"""
from __future__ import annotations

import argparse
import subprocess
import sys


def git(*args: str, input: bytes | None = None) -> bytes:
    return subprocess.run(["git", *args], input=input, capture_output=True, check=True).stdout


def blob_size(sha: str) -> int:
    return 0 if set(sha) == {"0"} else int(git("cat-file", "-s", sha))


def commit_cost(commit: str) -> list[tuple[str, int]]:
    """(path, counted bytes) for every file the commit changes against its first parent."""
    parents = git("rev-list", "--parents", "-n", "1", commit).decode().split()[1:]
    base = parents[0] if parents else git("hash-object", "-t", "tree", "/dev/null").decode().strip()
    binary = set()
    for line in git("diff", "--numstat", "--no-renames", base, commit).decode().splitlines():
        added, deleted, path = line.split("\t", 2)
        if added == "-" and deleted == "-":
            binary.add(path)
    out = []
    raw = git("diff", "--raw", "--no-renames", "--no-abbrev", "-z", base, commit).split(b"\0")
    for meta, path in zip(raw[0::2], raw[1::2]):
        if not meta:
            continue
        _, _, old, new, status = meta.decode().split()
        path = path.decode()
        if status == "A":
            size = blob_size(new)
        elif status == "D":
            size = blob_size(old)
        elif path in binary:
            size = blob_size(old) + blob_size(new)
        else:
            size = len(git("diff", base, commit, "--", path))
        out.append((path, size))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--since", required=True, help="the last commit already submitted (excluded)")
    ap.add_argument("--until", default="HEAD")
    ap.add_argument("--diffs-mib", type=float, default=256.0)
    ap.add_argument("--pack-mib", type=float, default=512.0)
    ap.add_argument("--top", type=int, default=8, help="list this many of the largest files")
    args = ap.parse_args(argv)
    commits = git("rev-list", "--reverse", f"{args.since}..{args.until}").decode().split()
    if not commits:
        print(f"no commits in {args.since}..{args.until}")
        return 0
    total, files = 0, []
    for c in commits:
        cost = commit_cost(c)
        total += sum(s for _, s in cost)
        files += [(s, c[:7], p) for p, s in cost]
    objects = git("rev-list", "--objects", args.until, f"^{args.since}")
    pack = len(git("pack-objects", "--stdout", "-q", input=objects))
    mib = 1 << 20
    print(f"{len(commits)} commits {args.since[:7]}..{args.until}")
    print(f"{'diffs (conservative)':<22} {total / mib:9.1f} MiB   limit {args.diffs_mib:.0f}")
    print(f"{'pack':<22} {pack / mib:9.1f} MiB   limit {args.pack_mib:.0f}")
    print("largest:")
    for size, c, path in sorted(files, reverse=True)[: args.top]:
        print(f"  {size / mib:8.1f} MiB  {c}  {path}")
    over = total > args.diffs_mib * mib or pack > args.pack_mib * mib
    if over:
        print("OVER A LIMIT: squash the commits of each large file, or commit fewer of them", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
