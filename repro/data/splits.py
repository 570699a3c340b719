"""Splits and fact selection: which facts a run edits, and which it keeps unedited to measure.

Every fifth case (by case id) belongs to the training split, kept for meta-learned editors (MEND)
and never evaluated on; the rest form the evaluation split that runs edit. A sequence edits at
most one fact per subject (editing the same subject twice would overwrite rather than add).
"""
from __future__ import annotations

import random

from repro.data.counterfact import EditRequest, Record, to_request

SPLITS = ("eval", "train")


def split_of(record: Record) -> str:
    """Fixed split by case id: every fifth case is for training (meta-learned editors)."""
    return "train" if record.case_id % 5 == 0 else "eval"


def select_records(records: list[Record], n: int, seed: int, split: str = "eval") -> list[Record]:
    """``n`` records of ``split`` in a seeded random order, at most one per subject (editing the
    same subject twice in a sequence would overwrite rather than add)."""
    pool = [r for r in records if split_of(r) == split]
    random.Random(seed).shuffle(pool)
    chosen, subjects = [], set()
    for rec in pool:
        subj = rec.requested_rewrite.subject
        if subj not in subjects:
            subjects.add(subj)
            chosen.append(rec)
        if len(chosen) == n:
            return chosen
    raise ValueError(f"only {len(chosen)} distinct-subject facts in split {split!r}, {n} requested")


def select_requests(records: list[Record], n: int, seed: int, split: str = "eval") -> list[EditRequest]:
    """The edit requests of :func:`select_records`."""
    return [to_request(r) for r in select_records(records, n, seed, split)]


def held_out_records(records: list[Record], chosen: list[Record], n: int, seed: int,
                     split: str = "eval") -> list[Record]:
    """``n`` records of ``split`` that a run never edits (no chosen case and no chosen subject), in a
    seeded order: the unedited facts whose recall a run measures."""
    cases = {r.case_id for r in chosen}
    subjects = {r.requested_rewrite.subject for r in chosen}
    pool = [r for r in records if split_of(r) == split and r.case_id not in cases
            and r.requested_rewrite.subject not in subjects]
    random.Random(f"held-out-{seed}").shuffle(pool)
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} unedited facts in split {split!r}, {n} requested")
    return pool[:n]
