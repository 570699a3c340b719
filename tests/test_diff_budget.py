"""scripts/diff_budget.py: a series of commits counted as a submission counts it."""
from __future__ import annotations

import importlib.util
import os
import subprocess

from repro.core.paths import ROOT

spec = importlib.util.spec_from_file_location("diff_budget", ROOT / "scripts" / "diff_budget.py")
diff_budget = importlib.util.module_from_spec(spec)
spec.loader.exec_module(diff_budget)


def _repo(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True,
                       env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True,
                              text=True).stdout.strip()
    git("init", "-q")
    monkeypatch.chdir(tmp_path)
    return git


def test_each_commit_of_a_binary_file_counts_again(tmp_path, monkeypatch, capsys):
    git = _repo(tmp_path, monkeypatch)
    (tmp_path / "notes.txt").write_text("a\n")
    base = (git("add", "-A"), git("commit", "-qm", "base"))[1]
    state = tmp_path / "run.state.pt"
    state.write_bytes(os.urandom(3000))
    git("add", "-A"), git("commit", "-qm", "add")  # counts 3,000
    state.write_bytes(os.urandom(5000))
    git("add", "-A"), git("commit", "-qm", "modify")  # counts 3,000 + 5,000
    state.unlink()
    head = (git("add", "-A"), git("commit", "-qm", "delete"))[1]  # counts 5,000
    costs = [dict(diff_budget.commit_cost(c)) for c in
             subprocess.run(["git", "rev-list", "--reverse", f"{base}..{head}"], capture_output=True,
                            text=True).stdout.split()]
    assert costs == [{"run.state.pt": 3000}, {"run.state.pt": 8000}, {"run.state.pt": 5000}]
    assert diff_budget.main(["--since", base, "--diffs-mib", "1"]) == 0
    assert diff_budget.main(["--since", base, "--diffs-mib", str(15000 / 2**20)]) == 1  # 16,000 > 15,000
    assert "OVER A LIMIT" in capsys.readouterr().err


def test_a_text_file_counts_its_diff_not_its_size(tmp_path, monkeypatch):
    git = _repo(tmp_path, monkeypatch)
    big = "".join(f"line {i}\n" for i in range(5000))
    (tmp_path / "a.txt").write_text(big)
    base = (git("add", "-A"), git("commit", "-qm", "base"))[1]
    (tmp_path / "a.txt").write_text(big.replace("line 7\n", "line seven\n"))
    head = (git("add", "-A"), git("commit", "-qm", "edit"))[1]
    ((path, size),) = diff_budget.commit_cost(head)
    assert path == "a.txt" and 0 < size < 1000 < len(big)
    assert base != head
