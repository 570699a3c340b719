"""Run files: xarray Datasets written as compressed NetCDF (netcdf4 engine), atomically, with
provenance attributes (parameters, git sha, package versions, device, wall time)."""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import zlib
from collections import OrderedDict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import xarray as xr

log = logging.getLogger(__name__)

PROVENANCE_PACKAGES = ("torch", "transformers", "peft", "xarray", "netCDF4", "numpy", "normgrowth")

# What runs write (result files, resume states, executed notebooks, and the book's TOC, which the
# study runner rewrites to list the executed notebooks): changes there are products of the code, not
# changes to it, so they do not make a commit "dirty".
RUN_OUTPUTS = ("data/runs", "book/runs", "book/_toc.yml")


def git_sha(cwd: str | Path | None = None) -> str:
    """The commit of the working tree, with ``-dirty`` when tracked files outside the run outputs
    (:data:`RUN_OUTPUTS`) have uncommitted changes. A long run rewrites its committed resume state
    as it goes; that alone leaves the code it runs unchanged. ``$NORMGROWTH_GIT_SHA``, when set,
    is taken instead: whoever copies a clean checkout to another machine (where git metadata may be
    missing, or stale) sets it to this function's value in that checkout. Else "unknown"."""
    named = os.environ.get("NORMGROWTH_GIT_SHA", "").strip()
    if named:
        return named
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=cwd, capture_output=True, text=True,
                             check=True).stdout.strip()
        excluded = [f":(exclude){p}" for p in RUN_OUTPUTS]
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded],
                               cwd=top, capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def threads_note(threads: int) -> str:
    """How a stretch's recorded torch CPU thread count reads after its device: " (1 thread)",
    " (2 threads)"; empty for -1 (not recorded)."""
    return f" ({threads} thread{'' if threads == 1 else 's'})" if threads > 0 else ""


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PROVENANCE_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def provenance(params: dict, device: str, **extra) -> dict[str, str | int | float]:
    """NetCDF-safe attrs (strings and numbers only; dicts as JSON)."""
    attrs = {
        "params": json.dumps(params, sort_keys=True, default=str),
        "git_sha": git_sha(),
        "packages": json.dumps(package_versions(), sort_keys=True),
        "device": device,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host_platform": platform.platform(),
    }
    for key, value in extra.items():
        attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value, default=str)
    return attrs


def state_path(output: str | Path) -> Path:
    """Where an interrupted run keeps its resume state: ``<output>.state.pt`` beside the run file."""
    output = Path(output)
    return output.with_name(output.name + ".state.pt")


# Resume states of long runs are committed as they advance, and each commit of a changed binary
# file carries it whole. Their large floating-point tensors (edited weights, float64 Gram matrices)
# are therefore stored packed: the bytes of each element regrouped by position (all first bytes,
# then all second bytes, ...: sign and exponent bytes repeat a lot, mantissa bytes hardly) and
# deflated. That is exact, bit for bit, and makes such states 10-15 % smaller.
PACKED = "__normgrowth_packed__"  # the key that marks a packed tensor in a saved state
PACK_MIN_BYTES = 1 << 16  # smaller tensors are stored as they are


def pack_tensor(t) -> dict:
    """A floating-point tensor as a picklable record {PACKED, dtype, shape, data}, exact."""
    import numpy as np
    import torch

    t = t.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().reshape(-1, t.element_size())
    planes = np.ascontiguousarray(raw.T).tobytes()
    return {PACKED: "byte-planes+zlib", "dtype": str(t.dtype).removeprefix("torch."),
            # a uint8 tensor, not bytes: torch.save writes tensors raw, pickled bytes grow by half
            "shape": list(t.shape), "data": torch.frombuffer(bytearray(zlib.compress(planes, 6)), dtype=torch.uint8)}


def unpack_tensor(record: dict):
    """The tensor :func:`pack_tensor` stored, bit for bit."""
    import numpy as np
    import torch

    if record.get(PACKED) != "byte-planes+zlib":
        raise ValueError(f"unknown packed tensor format {record.get(PACKED)!r}")
    dtype = getattr(torch, record["dtype"])
    size = dtype.itemsize
    planes = np.frombuffer(zlib.decompress(record["data"].numpy().tobytes()), dtype=np.uint8).reshape(size, -1)
    raw = torch.from_numpy(np.ascontiguousarray(planes.T)).reshape(-1)
    return raw.view(dtype).reshape(record["shape"])


def _map_state(obj, leaf):
    """``obj`` with ``leaf`` applied to every value inside its dicts, lists and tuples."""
    if isinstance(obj, dict) and PACKED not in obj:
        out = {k: _map_state(v, leaf) for k, v in obj.items()}
        return OrderedDict(out) if isinstance(obj, OrderedDict) else out  # module state dicts stay ordered
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):  # not a named tuple
        return type(obj)(_map_state(v, leaf) for v in obj)
    return leaf(obj)


def pack_state(state: dict) -> dict:
    """``state`` with its large floating-point tensors packed (:func:`pack_tensor`)."""
    import torch

    def leaf(v):
        if (isinstance(v, torch.Tensor) and v.is_floating_point() and v.layout == torch.strided
                and v.numel() * v.element_size() >= PACK_MIN_BYTES):
            return pack_tensor(v)
        return v

    return _map_state(state, leaf)


def unpack_state(state: dict) -> dict:
    """``state`` with every packed tensor restored; states saved before packing pass unchanged."""
    return _map_state(state, lambda v: unpack_tensor(v) if isinstance(v, dict) and PACKED in v else v)


def save_state(path: str | Path, state: dict) -> None:
    """``torch.save`` the resume state, its large tensors packed (:func:`pack_state`), via a
    temporary file and a rename (never half written)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(pack_state(state), tmp)
    os.replace(tmp, path)


def load_state(path: str | Path) -> dict | None:
    """The resume state at ``path``, or None when there is none. A file that cannot be read (a
    truncated or corrupt save) is moved aside to ``<name>.damaged`` with a warning naming both
    paths, and None returned: the run starts over instead of staying blocked."""
    import torch

    path = Path(path)
    if not path.exists():
        return None
    try:
        return unpack_state(torch.load(path, map_location="cpu", weights_only=False))
    except Exception as err:
        aside = path.with_name(path.name + ".damaged")
        os.replace(path, aside)
        log.warning("the resume state %s cannot be read (%s: %s); moved aside to %s, the run starts over",
                    path, type(err).__name__, err, aside.name)
        return None


def peek_state(path: str | Path) -> dict | None:
    """The resume state at ``path`` for reading only (None when there is none). Unlike
    :func:`load_state`, an unreadable file is left where it is and the error raised, so that a
    look at a run (``python -m repro.study --list``) never changes it."""
    import torch

    path = Path(path)
    if not path.exists():
        return None
    return unpack_state(torch.load(path, map_location="cpu", weights_only=False, mmap=True))


def write_netcdf(ds: xr.Dataset, path: str | Path) -> Path:
    """Write ``ds`` to ``path`` via a temporary file and a rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoding = {
        name: {"zlib": True, "complevel": 4}
        for name, var in ds.data_vars.items()
        if var.dtype.kind in "fiub"
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        ds.to_netcdf(tmp, engine="netcdf4", encoding=encoding)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_netcdf(path: str | Path) -> xr.Dataset:
    """Load a run file fully into memory (and close it), so that it can be rewritten later."""
    try:
        with xr.open_dataset(path, engine="netcdf4") as ds:
            return ds.load()
    except FileNotFoundError:
        raise
    except (OSError, RuntimeError, ValueError) as err:  # e.g. "NetCDF: HDF error" on a damaged file
        raise OSError(f"{path} cannot be read as a NetCDF run file ({type(err).__name__}: {err}); "
                      f"rerun the run that makes it, or restore it (git checkout -- {Path(path).name})") from err


def run_params(ds: xr.Dataset, missing_ok: bool = False) -> dict:
    """The parameters a run file was made with. Every file a run writes carries them; a Dataset
    built by hand (a test's, a partial view's) may not, and with ``missing_ok`` reads as ``{}``
    instead of raising ``KeyError``."""
    if missing_ok and "params" not in ds.attrs:
        return {}
    return json.loads(ds.attrs["params"])


def existing_run(path: str | Path, params: dict, overwrite: bool = False) -> xr.Dataset | None:
    """The finished run at ``path`` when it was made with ``params`` (None when absent or when
    ``overwrite``); a run made with other parameters is an error rather than silently replaced."""
    path = Path(path)
    if overwrite or not path.exists():
        return None
    done = read_netcdf(path)
    if run_params(done) != json.loads(json.dumps(params, sort_keys=True, default=str)):
        raise FileExistsError(f"{path} exists with other parameters; pass overwrite=True to replace it")
    return done


def parse_bool(value, name: str) -> bool:
    """A boolean parameter given as a bool or as text ("true"/"false", "yes"/"no", "1"/"0", any
    case: papermill's ``-p flag false`` arrives as a string); anything else is an error, never
    truthy."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "no", "0"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def lock_path(output: str | Path) -> Path:
    """The lock a run holds on its output while writing: ``<output>.lock`` beside it."""
    output = Path(output)
    return output.with_name(output.name + ".lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive right to write one run's output (and its resume state), held as a lock file with
    the owner's pid, host and start time. A second writer fails at once, naming the owner; a lock
    left by a process that no longer runs on this host is stale and taken over."""

    def __init__(self, output: str | Path):
        self.path = lock_path(output)
        self.held = False

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = json.dumps({"pid": os.getpid(), "host": platform.node(),
                         "since": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                status, owner = self.holder()
                if status == "stale":
                    self.path.unlink(missing_ok=True)  # its process is gone
                    continue
                if status == "free":  # released between our try and our look: try again
                    continue
                who = (f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('since')}"
                       if owner else "an unknown process (unreadable lock)")
                raise RuntimeError(
                    f"{self.path.name[:-5]} is being written by {who}; wait for it to finish, or remove "
                    f"{self.path} if that process is gone") from None
            with os.fdopen(fd, "w") as fh:
                fh.write(me)
            self.held = True
            return self
        raise RuntimeError(f"could not take the lock {self.path}")

    def holder(self) -> tuple[str, dict | None]:
        """Who holds the lock, without taking it: ``("free", None)`` when there is no lock file;
        ``("alive", owner)`` when its process runs on this host, or runs on another host (which
        cannot be checked from here, so it counts as alive); ``("stale", owner)`` when its process
        on this host is gone; ``("unknown", None)`` when the lock file cannot be read."""
        if not self.path.exists():
            return "free", None
        try:
            owner = json.loads(self.path.read_text())
        except FileNotFoundError:
            return "free", None
        except (OSError, ValueError):
            return "unknown", None
        if not isinstance(owner, dict):
            return "unknown", None
        if owner.get("host") != platform.node():
            return "alive", owner
        try:
            pid = int(owner.get("pid", -1))
        except (TypeError, ValueError):
            return "unknown", owner
        return ("alive" if pid > 0 and _alive(pid) else "stale"), owner

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
