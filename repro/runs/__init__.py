"""Runs: the one run lifecycle and the kinds of run (sequential editing, single-edit efficacy, layer sweep, post-training, MEND meta-training, key agreement)."""
