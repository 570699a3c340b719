"""The BIG-bench source package, fetched with pip and read with ``tarfile``.

BIG-bench 1.0.0 (Apache-2.0) ships its task data inside the PyPI source distribution. The package
itself is never installed (its dependencies are heavy): the 358 MB tarball is fetched from the
package index's simple page (PEP 503; ``$NORMGROWTH_PYPI_INDEX``, default https://pypi.org/simple),
checked against its published sha256 and saved under ``$NORMGROWTH_CACHE/sources/``; members are
read straight from it. (``pip download`` cannot fetch it: recent pip versions reject the package's
metadata, which declares a direct-URL dependency.) Members read once are cached next to it, so
later reads skip the scan of the compressed archive.
"""
from __future__ import annotations

import logging
import hashlib
import os
import re
import tarfile
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

BIGBENCH_VERSION = "1.0.0"
TARBALL_NAME = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
TARBALL_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"  # as published on PyPI
TASKS_PREFIX = "bigbench/benchmark_tasks/"  # member names below are relative to this folder


def sources_dir() -> Path:
    """``$NORMGROWTH_CACHE/sources`` (created)."""
    from repro.core.models import cache_dir

    path = cache_dir() / "sources"
    path.mkdir(parents=True, exist_ok=True)
    return path


def tarball_url(index: str | None = None) -> str:
    """The tarball's download link, read from the index's simple page for ``bigbench``."""
    index = (index or os.environ.get("NORMGROWTH_PYPI_INDEX") or "https://pypi.org/simple").rstrip("/")
    with urllib.request.urlopen(f"{index}/bigbench/", timeout=60) as resp:
        page = resp.read().decode("utf-8", "replace")
    for href in re.findall(r'href="([^"]+)"', page):
        if href.split("#")[0].endswith("/" + TARBALL_NAME) or href.split("#")[0] == TARBALL_NAME:
            return urllib.request.urljoin(f"{index}/bigbench/", href.split("#")[0])
    raise FileNotFoundError(f"{TARBALL_NAME} is not listed on {index}/bigbench/")


def download_bigbench(dest: Path, url: str | None = None) -> Path:
    """Download the BIG-bench source tarball into ``dest``, verify its sha256; returns its path."""
    url = url or tarball_url()
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / TARBALL_NAME
    tmp = dest / f".{TARBALL_NAME}.{os.getpid()}.part"
    log.info("downloading BIG-bench %s (358 MB) from %s", BIGBENCH_VERSION, url)
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=120) as resp, open(tmp, "wb") as fh:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                fh.write(chunk)
        if digest.hexdigest() != TARBALL_SHA256:
            raise ValueError(f"{url}: sha256 {digest.hexdigest()} differs from the published {TARBALL_SHA256}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
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
