"""The BIG-bench source package, fetched with pip and read with ``tarfile``.

BIG-bench 1.0.0 (Apache-2.0) ships its task data inside the PyPI source distribution. The package
itself is never installed (its dependencies are heavy): ``pip download --no-deps`` saves the
358 MB tarball under ``$NORMGROWTH_CACHE/sources/`` and members are read straight from it. Members
read once are cached next to it, so later reads skip the scan of the compressed archive.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import tarfile
from pathlib import Path

log = logging.getLogger(__name__)

BIGBENCH_VERSION = "1.0.0"
TARBALL_NAME = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
TASKS_PREFIX = "bigbench/benchmark_tasks/"  # member names below are relative to this folder


def sources_dir() -> Path:
    """``$NORMGROWTH_CACHE/sources`` (created)."""
    from repro.models import cache_dir

    path = cache_dir() / "sources"
    path.mkdir(parents=True, exist_ok=True)
    return path


def download_bigbench(dest: Path) -> Path:
    """``pip download`` the BIG-bench source tarball into ``dest``; returns its path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        f"bigbench=={BIGBENCH_VERSION}", "-d", str(dest),
    ]
    log.info("downloading BIG-bench %s (358 MB): %s", BIGBENCH_VERSION, " ".join(cmd))
    subprocess.run(cmd, check=True)
    path = dest / TARBALL_NAME
    if not path.exists():
        raise FileNotFoundError(f"pip download finished but {path} is missing")
    return path


def bigbench_tarball(path: str | Path | None = None) -> Path:
    """The tarball: ``path`` when given (must exist), else the cached copy, downloaded if missing."""
    if path is not None:
        tarball = Path(path).expanduser()
        if not tarball.is_file():
            raise FileNotFoundError(f"BIG-bench tarball not found: {tarball}")
        return tarball
    cached = sources_dir() / TARBALL_NAME
    return cached if cached.is_file() else download_bigbench(cached.parent)


def _member_cache(name: str) -> Path:
    return sources_dir() / "bigbench" / name


def read_members(names: list[str], tarball: str | Path | None = None) -> dict[str, bytes]:
    """Bytes of task files, by name relative to ``benchmark_tasks/`` (e.g. ``qa_wikidata/task.json``).

    One pass over the archive reads every member not cached yet. ``KeyError`` names the missing ones.
    """
    found = {n: _member_cache(n).read_bytes() for n in names if _member_cache(n).is_file()}
    wanted = {TASKS_PREFIX + n: n for n in names if n not in found}
    if wanted:
        found.update(_scan(bigbench_tarball(tarball), wanted))
    missing = [n for n in names if n not in found]
    if missing:
        raise KeyError(f"not in the BIG-bench tarball: {missing}")
    return {n: found[n] for n in names}


def _scan(tarball: Path, wanted: dict[str, str]) -> dict[str, bytes]:
    """Read the ``wanted`` members (full suffix -> short name) and cache them."""
    out: dict[str, bytes] = {}
    log.info("reading %d member(s) from %s", len(wanted), tarball)
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            rest = member.name.partition("/")[2]  # drop the "bigbench-1.0.0/" folder
            short = wanted.get(rest)
            if short is None or not member.isfile():
                continue
            fh = tar.extractfile(member)
            assert fh is not None
            out[short] = data = fh.read()
            cache = _member_cache(short)
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(cache.suffix + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(cache)
            if len(out) == len(wanted):
                break
    return out


def read_member(name: str, tarball: str | Path | None = None) -> bytes:
    """Bytes of one task file (see :func:`read_members`)."""
    return read_members([name], tarball)[name]
