"""The artifact bundle: the ONLY module that knows its file names. Format described in docs/ARTIFACTS.md.

artifacts/
  CURRENT                         the active bundle id (one line)
  bundles/<id>/                   immutable once renamed into place
    manifest.json                 written last: schema, provenance, configs, stats, metrics, sha256 of every file
    lora/...                      peft adapter dir (optional)
    pca.safetensors               fitted PCA (optional)
    adapter.safetensors           Eq. 6 adapter weights + config (optional)
    srs/<backbone>.safetensors    SRS backbone weights (optional) + srs/<backbone>.json (its config)
    tables/<name>.safetensors     llm / pca / item tables, tensor "weight" (n_items + 1, dim), row 0 padding
    items.jsonl                   {"row": i, "id": external id, "attributes": {...}} per row; row 0 padding

path = save_bundle(Path("artifacts"), parts)     # temp dir -> fsync -> manifest -> rename -> CURRENT
b = load_bundle(Path("artifacts"))               # follows CURRENT; checks every sha256 first
item = b.table("item")                           # (n_items + 1, d)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticSerializationError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.adapter import Adapter, AdapterConfig
from models.io import TABLE_KEY, atomic_write_text, fsync_dir, fsync_file, sha256_file
from models.pca import PCA

SCHEMA_VERSION = 1  # bump when a reader of the previous version would misread a bundle

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
BUNDLES_DIR = "bundles"
OVERLAYS_DIR = (
    "overlays"  # artifacts/overlays/<bundle_id>/items.jsonl: the service's append-only registrations
)
LORA_DIR = "lora"
PCA_FILE = "pca.safetensors"
ADAPTER_FILE = "adapter.safetensors"
SRS_DIR = "srs"
TABLES_DIR = "tables"
ITEMS_FILE = "items.jsonl"
TABLE_NAMES = ("llm", "pca", "item")  # the conventional tables; other lowercase names are allowed

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")  # table and backbone names become file names
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # no '/', never hidden (temp dirs start with '.')


class BundleError(RuntimeError):
    """A bundle cannot be written or read; the message names the file and what is wrong."""


# --- manifest (pydantic: it is a file on disk) --------------------------------------------------------------


class FileEntry(BaseModel):
    sha256: str
    bytes: int


class BaseLLM(BaseModel):
    source: str  # a local dir, a GGUF file, or the shipped default's package name + version
    sha256: str | None = None  # of the weights file, when there is a single one
    hidden_size: int


class TableInfo(BaseModel):
    rows: int  # n_items + 1 (row 0 = padding)
    dim: int
    dtype: str


class Manifest(BaseModel):
    """manifest.json. Unknown keys are kept (a same-version writer may add optional information)."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    bundle_id: str
    created: datetime  # UTC
    git_sha: str | None = None  # "-dirty" suffix when the working tree had uncommitted changes
    # python, torch, transformers, peft, safetensors, numpy, llmemb (None = not installed)
    versions: dict[str, str | None] = Field(default_factory=dict)
    base_llm: BaseLLM | None = None
    n_items: int
    tables: dict[str, TableInfo] = Field(default_factory=dict)
    srs_backbone: str | None = None
    # component name -> its config: prompt, llm, lora, pca, adapter, srs, training, ...
    configs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    dataset: dict[str, Any] = Field(default_factory=dict)  # dataset stats
    metrics: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, FileEntry] = Field(default_factory=dict)  # every file but manifest.json, '/' separated


# --- writing --------------------------------------------------------------------------------------------------


@dataclass
class BundleParts:
    """The in-memory pieces of a bundle. Everything but `items` is optional; tables share one row count."""

    items: list[tuple[str, dict[str, Any]]]  # (external id, attributes) for rows 1..n_items, in row order
    tables: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (n_items + 1, dim)
    pca: PCA | None = None
    adapter_state: dict[str, torch.Tensor] | None = None
    adapter_config: AdapterConfig | None = None
    srs_backbone: str | None = None  # e.g. "sasrec"
    srs_state: dict[str, torch.Tensor] | None = None
    srs_config: dict[str, Any] | None = None
    lora_dir: Path | None = None  # a peft adapter dir, copied in
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    base_llm: BaseLLM | dict[str, Any] | None = None
    git_sha: str | None = None  # None -> read from the repository, if there is one


def untrained_parts(
    items: list[tuple[str, dict[str, Any]]],
    llm: torch.Tensor,
    *,
    pca_k: int,
    srs_config: Any,
    configs: dict[str, dict[str, Any]],
    lora_dir: Path | None = None,
    **fields: Any,
) -> BundleParts:
    """A complete bundle around a catalog's LLM table (n_items + 1, d) with untrained heads: the PCA fitted on the
    table, a freshly initialised Eq. 6 adapter to ``srs_config.hidden`` and an untrained SASRec over the frozen item
    table. For benchmarks and tests, which need the real shapes and code paths, not trained weights; ``fields`` go
    to ``BundleParts`` (dataset, metrics, base_llm, git_sha)."""
    from models.srs import build_backbone
    from models.srs.base import FrozenTableEncoder

    n = llm.shape[0] - 1
    pca = PCA.fit(llm[1:], k=pca_k)
    pca_table = torch.zeros(n + 1, pca_k)
    pca_table[1:] = pca.transform(llm[1:])
    adapter_cfg = AdapterConfig(d_in=pca_k, d_out=srs_config.hidden)
    adapter = Adapter(adapter_cfg).eval()
    with torch.no_grad():
        item = adapter(pca_table)
    item[0] = 0
    backbone = build_backbone("sasrec", srs_config, FrozenTableEncoder(item)).eval()
    return BundleParts(
        items=items,
        tables={"llm": llm, "pca": pca_table, "item": item},
        pca=pca,
        adapter_state=adapter.state_dict(),
        adapter_config=adapter_cfg,
        srs_backbone="sasrec",
        srs_state=backbone.state_dict(),
        srs_config=dataclasses.asdict(srs_config),
        lora_dir=lora_dir,
        configs=configs,
        **fields,
    )


def save_bundle(
    root: str | os.PathLike, parts: BundleParts, bundle_id: str | None = None, set_current: bool = True
) -> Path:
    """Write `parts` as the immutable bundle `root/bundles/<id>` and (by default) make it CURRENT.

    Files go to a hidden temp dir beside the final one, are fsynced and hashed, the manifest is written last,
    and the dir is renamed into place: a crash leaves either no bundle or a complete one. An existing id is
    refused (bundles are immutable). The default id is `<UTC yyyymmddThhmmssZ>-<8 hex of the content hash>`.
    """
    root = Path(root)
    bundles = root / BUNDLES_DIR
    if bundle_id is not None:
        _check_id(bundle_id)
        if (bundles / bundle_id).exists():
            raise BundleError(f"bundle {bundle_id!r} already exists in {bundles}: bundles are immutable")
    n_items = _check_parts(parts)
    created = datetime.now(timezone.utc).replace(microsecond=0)
    manifest = _manifest_for(parts, n_items, created)
    try:  # fail on an unserialisable config now, before writing gigabytes of tables
        manifest.model_dump_json()
    except PydanticSerializationError as e:
        raise BundleError(f"{MANIFEST}: configs, stats or metrics are not JSON-serialisable: {e}") from e

    bundles.mkdir(parents=True, exist_ok=True)
    tmp = bundles / f".tmp-{created:%Y%m%dT%H%M%SZ}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _write_parts(tmp, parts)
        manifest.files = _hash_tree(tmp)
        if bundle_id is None:
            content = hashlib.sha256(
                "".join(f"{p}:{e.sha256}\n" for p, e in sorted(manifest.files.items())).encode()
            ).hexdigest()
            bundle_id = f"{created:%Y%m%dT%H%M%SZ}-{content[:8]}"
        manifest.bundle_id = bundle_id
        _write_manifest(tmp, manifest)
        for d, _, _ in os.walk(tmp):
            fsync_dir(d)
        final = bundles / bundle_id
        if final.exists():
            raise BundleError(f"bundle {bundle_id!r} already exists in {bundles}: bundles are immutable")
        try:
            os.rename(tmp, final)  # atomic; fails if another writer created a non-empty `final` meanwhile
        except OSError as e:
            raise BundleError(f"bundle {bundle_id!r} could not be renamed into place: {e}") from e
        fsync_dir(bundles)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if set_current:
        set_current_bundle(root, bundle_id)
    return final


def set_current_bundle(root: str | os.PathLike, bundle_id: str) -> None:
    """Point `root/CURRENT` at an existing bundle, atomically."""
    _check_id(bundle_id)
    if not (Path(root) / BUNDLES_DIR / bundle_id / MANIFEST).is_file():
        raise BundleError(
            f"cannot make {bundle_id!r} current: {Path(root) / BUNDLES_DIR / bundle_id} is not a bundle"
        )
    atomic_write_text(Path(root) / CURRENT, bundle_id + "\n")


def current_bundle_id(root: str | os.PathLike) -> str | None:
    """The id named by `root/CURRENT`, or None if there is no CURRENT file."""
    p = Path(root) / CURRENT
    if not p.is_file():
        return None
    return p.read_text(encoding="utf-8").strip() or None


def list_bundles(root: str | os.PathLike) -> list[str]:
    """Ids of the complete bundles under `root/bundles`, sorted (default ids sort by creation time)."""
    d = Path(root) / BUNDLES_DIR
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if _ID_RE.match(p.name) and (p / MANIFEST).is_file())


def _check_id(bundle_id: str) -> None:
    if not _ID_RE.match(bundle_id):
        raise BundleError(
            f"invalid bundle id {bundle_id!r}: use 1-128 characters from [A-Za-z0-9._-], not starting with '.' or '-'"
        )


def _check_parts(parts: BundleParts) -> int:
    """Validate shapes and names before anything is written; returns n_items."""
    n_items = len(parts.items)
    if n_items < 1:
        raise BundleError("a bundle needs at least one item")
    for name, t in parts.tables.items():
        if not _NAME_RE.match(name):
            raise BundleError(f"invalid table name {name!r}: use lowercase [a-z0-9_], e.g. {TABLE_NAMES}")
        if t.ndim != 2 or t.shape[0] != n_items + 1:
            raise BundleError(
                f"table {name!r} has shape {tuple(t.shape)}, expected ({n_items + 1}, dim): "
                f"one row per item plus padding row 0"
            )
    if (parts.adapter_state is None) != (parts.adapter_config is None):
        raise BundleError("adapter_state and adapter_config go together: give both or neither")
    if (parts.srs_backbone is None) != (parts.srs_state is None):
        raise BundleError("srs_backbone and srs_state go together: give both or neither")
    if parts.srs_backbone is not None and not _NAME_RE.match(parts.srs_backbone):
        raise BundleError(f"invalid backbone name {parts.srs_backbone!r}: use lowercase [a-z0-9_]")
    if parts.lora_dir is not None and not Path(parts.lora_dir).is_dir():
        raise BundleError(f"lora_dir {parts.lora_dir} is not a directory")
    ids = [str(i) for i, _ in parts.items]
    if len(set(ids)) != len(ids):
        raise BundleError("item ids must be unique")
    return n_items


def _manifest_for(parts: BundleParts, n_items: int, created: datetime) -> Manifest:
    configs = {k: dict(v) for k, v in parts.configs.items()}
    # What is in the files wins over what the caller remembers; the caller's extra keys are kept.
    if parts.pca is not None:
        configs["pca"] = {**configs.get("pca", {}), "k": parts.pca.k, "d": parts.pca.d}
    if parts.adapter_config is not None:
        configs["adapter"] = {**configs.get("adapter", {}), **dataclasses.asdict(parts.adapter_config)}
    if parts.srs_backbone is not None:
        configs["srs"] = {
            **configs.get("srs", {}),
            **(parts.srs_config or {}),
            "backbone": parts.srs_backbone,
        }
    base = parts.base_llm
    return Manifest(
        bundle_id="pending",
        created=created,
        git_sha=parts.git_sha if parts.git_sha is not None else _git_sha(),
        versions=_versions(),
        base_llm=BaseLLM.model_validate(base) if isinstance(base, dict) else base,
        n_items=n_items,
        tables={
            n: TableInfo(rows=t.shape[0], dim=t.shape[1], dtype=str(t.dtype).removeprefix("torch."))
            for n, t in parts.tables.items()
        },
        srs_backbone=parts.srs_backbone,
        configs=configs,
        dataset=dict(parts.dataset),
        metrics=dict(parts.metrics),
    )


def _write_parts(d: Path, parts: BundleParts) -> None:
    """Write every file but the manifest into `d` (plain writes: atomicity comes from the final dir rename)."""
    if parts.tables:
        (d / TABLES_DIR).mkdir()
    for name, t in parts.tables.items():
        _write_safetensors(
            d / TABLES_DIR / f"{name}.safetensors",
            {TABLE_KEY: t.detach().cpu().contiguous()},
            {"table": name, "rows": str(t.shape[0]), "dim": str(t.shape[1]), "padding_row": "0"},
        )
    if parts.pca is not None:
        parts.pca.save(d / PCA_FILE)
    if parts.adapter_state is not None:
        cfg = json.dumps(dataclasses.asdict(parts.adapter_config))
        _write_safetensors(d / ADAPTER_FILE, _state_for_file(parts.adapter_state), {"config": cfg})
    if parts.srs_backbone is not None:
        (d / SRS_DIR).mkdir()
        _write_safetensors(
            d / SRS_DIR / f"{parts.srs_backbone}.safetensors",
            _state_for_file(parts.srs_state),
            {"backbone": parts.srs_backbone},
        )
        (d / SRS_DIR / f"{parts.srs_backbone}.json").write_text(
            json.dumps(parts.srs_config or {}, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
        )
    if parts.lora_dir is not None:
        shutil.copytree(parts.lora_dir, d / LORA_DIR, symlinks=False)
    _write_items(d / ITEMS_FILE, parts.items)


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata=metadata)


def _write_items(path: Path, items: list[tuple[str, dict[str, Any]]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"row": 0, "id": None, "attributes": {}}) + "\n")  # padding row
        for row, (item_id, attrs) in enumerate(items, start=1):
            line = {"row": row, "id": str(item_id), "attributes": attrs}
            f.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")


def _write_manifest(d: Path, manifest: Manifest) -> None:
    (d / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    fsync_file(d / MANIFEST)


def _state_for_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Clone: safetensors refuses tensors that share storage (tied weights); state dicts here are small.
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def _hash_tree(d: Path) -> dict[str, FileEntry]:
    """fsync and hash every file under `d` (the manifest is not written yet)."""
    out = {}
    for p in sorted(_files_under(d)):
        fsync_file(d / p)
        out[p] = FileEntry(sha256=sha256_file(d / p), bytes=(d / p).stat().st_size)
    return out


def _files_under(d: Path) -> list[str]:
    """Relative '/'-separated paths of every non-directory entry under `d`, symlinks included (not followed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(d):
        for name in filenames + [n for n in dirnames if os.path.islink(os.path.join(dirpath, n))]:
            out.append(Path(dirpath, name).relative_to(d).as_posix())
    return out


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "safetensors", "numpy", "llmemb"):
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            out[dist] = None
    if out["llmemb"] is None:  # running from a checkout that was never pip-installed
        from models import __version__

        out["llmemb"] = __version__
    return out


def _git_sha() -> str | None:
    """HEAD of the repository this code runs from, with '-dirty' for uncommitted changes; None outside git."""
    cwd = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "") if sha else None


# --- reading --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BundleItem:
    row: int
    id: str | None  # None for the padding row 0
    attributes: dict[str, Any]


def verify_bundle(path: str | os.PathLike) -> list[str]:
    """Every integrity problem of the bundle dir `path` (empty list = sound): manifest readable and not newer
    than this code, every listed file present with its size and sha256, no file that the manifest does not list.
    """
    d = Path(path)
    if not d.is_dir():
        return [f"{d}: not a directory"]
    try:
        raw = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [f"{MANIFEST}: missing: {d} is not a bundle (or an unfinished one)"]
    except (OSError, ValueError) as e:
        return [f"{MANIFEST}: unreadable ({e}): the bundle is corrupt; re-export it"]
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if not isinstance(version, int):
        return [f"{MANIFEST}: no integer schema_version: not an llmemb bundle manifest"]
    if version > SCHEMA_VERSION:
        return [
            f"{MANIFEST}: schema_version {version} is newer than this llmemb supports ({SCHEMA_VERSION}): "
            f"upgrade llmemb to load this bundle"
        ]
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        return [f"{MANIFEST}: invalid: {e.error_count()} error(s): {_short_errors(e)}"]

    problems = []
    on_disk = set(_files_under(d)) - {MANIFEST}
    for rel in sorted(on_disk - manifest.files.keys()):
        problems.append(f"{rel}: not listed in the manifest (stray file): remove it or re-export the bundle")
    for rel, entry in sorted(manifest.files.items()):
        p = d / rel
        if rel not in on_disk:
            problems.append(
                f"{rel}: listed in the manifest but missing: the bundle is incomplete; re-export it"
            )
        elif p.is_symlink() or not p.is_file():
            problems.append(
                f"{rel}: not a regular file (symlink or special file); bundles hold plain files only"
            )
        elif (size := p.stat().st_size) != entry.bytes:
            problems.append(
                f"{rel}: size mismatch (expected {entry.bytes} bytes, got {size}): the bundle is corrupt; re-export it"
            )
        elif (sha := sha256_file(p)) != entry.sha256:
            problems.append(
                f"{rel}: sha256 mismatch (expected {entry.sha256[:12]}…, got {sha[:12]}…): "
                f"the bundle is corrupt; re-export it"
            )
    return problems


def load_bundle(path_or_root: str | os.PathLike) -> Bundle:
    """Open a bundle dir, or an artifacts root (then the bundle named by its CURRENT file), after verifying it.

    Raises `BundleError` listing every problem `verify_bundle` finds. Tensors are read lazily on first access.
    """
    p = Path(path_or_root)
    if not (p / MANIFEST).exists():
        if (p / CURRENT).is_file():
            bundle_id = current_bundle_id(p)
            if bundle_id is None:
                raise BundleError(f"{p / CURRENT} is empty: set it to a bundle id under {p / BUNDLES_DIR}")
            p = p / BUNDLES_DIR / bundle_id
            if not p.is_dir():
                raise BundleError(f"{path_or_root}/{CURRENT} names {bundle_id!r}, but {p} does not exist")
        elif (p / BUNDLES_DIR).is_dir():
            raise BundleError(f"{p} has bundles but no {CURRENT} file: load a bundle dir or write {CURRENT}")
        elif not p.exists():
            raise BundleError(f"{p} does not exist")
    problems = verify_bundle(p)
    if problems:
        raise BundleError(f"bundle {p} failed verification:\n  " + "\n  ".join(problems))
    manifest = Manifest.model_validate_json((p / MANIFEST).read_text(encoding="utf-8"))
    return Bundle(p, manifest)


class Bundle:
    """A verified bundle on disk. Tensors load on first access (CPU) and are then cached."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest
        self._tables: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"Bundle({self.manifest.bundle_id!r}, n_items={self.n_items}, tables={self.table_names})"

    @property
    def bundle_id(self) -> str:
        return self.manifest.bundle_id

    @property
    def n_items(self) -> int:
        return self.manifest.n_items

    @property
    def table_names(self) -> list[str]:
        return sorted(self.manifest.tables)

    def table_path(self, name: str) -> Path:
        """The safetensors file of table `name` (the service streams it as is)."""
        if name not in self.manifest.tables:
            raise KeyError(f"bundle {self.bundle_id} has no table {name!r}; it has {self.table_names}")
        return self.path / TABLES_DIR / f"{name}.safetensors"

    def table(self, name: str) -> torch.Tensor:
        """Table `name`, (n_items + 1, dim), row 0 padding."""
        if name not in self._tables:
            t = load_file(str(self.table_path(name)))[TABLE_KEY]
            info = self.manifest.tables[name]
            if (t.shape[0], t.shape[1]) != (info.rows, info.dim):
                raise BundleError(f"{TABLES_DIR}/{name}.safetensors: shape {tuple(t.shape)} != manifest's")
            self._tables[name] = t
        return self._tables[name]

    @property
    def tables(self) -> dict[str, torch.Tensor]:
        """Every table (loads them all)."""
        return {n: self.table(n) for n in self.table_names}

    @cached_property
    def pca(self) -> PCA | None:
        p = self.path / PCA_FILE
        return PCA.load(p) if p.is_file() else None

    @cached_property
    def _adapter(self) -> tuple[dict[str, torch.Tensor], AdapterConfig] | None:
        p = self.path / ADAPTER_FILE
        if not p.is_file():
            return None
        with safe_open(str(p), framework="pt") as f:
            cfg = json.loads((f.metadata() or {})["config"])
        return load_file(str(p)), AdapterConfig(**cfg)

    @property
    def adapter_state(self) -> dict[str, torch.Tensor] | None:
        return self._adapter[0] if self._adapter else None

    @property
    def adapter_config(self) -> AdapterConfig | None:
        return self._adapter[1] if self._adapter else None

    def adapter(self) -> Adapter | None:
        """A fresh `Adapter` with the bundle's weights, in eval mode (None if the bundle has none)."""
        if self._adapter is None:
            return None
        state, cfg = self._adapter
        a = Adapter(cfg)
        a.load_state_dict(state)
        return a.eval()

    @property
    def srs_backbone(self) -> str | None:
        return self.manifest.srs_backbone

    @cached_property
    def srs_state(self) -> dict[str, torch.Tensor] | None:
        if self.srs_backbone is None:
            return None
        return load_file(str(self.path / SRS_DIR / f"{self.srs_backbone}.safetensors"))

    @cached_property
    def srs_config(self) -> dict[str, Any] | None:
        if self.srs_backbone is None:
            return None
        return json.loads((self.path / SRS_DIR / f"{self.srs_backbone}.json").read_text(encoding="utf-8"))

    @property
    def lora_dir(self) -> Path | None:
        p = self.path / LORA_DIR
        return p if p.is_dir() else None

    @cached_property
    def items(self) -> list[BundleItem]:
        """One entry per row, row 0 (padding) included, so `items[row]` is that row's item."""
        out = []
        with open(self.path / ITEMS_FILE, encoding="utf-8") as f:
            for i, line in enumerate(f):
                obj = json.loads(line)
                if obj.get("row") != i:
                    raise BundleError(f"{ITEMS_FILE}: line {i + 1} has row {obj.get('row')!r}, expected {i}")
                out.append(BundleItem(row=i, id=obj["id"], attributes=obj.get("attributes") or {}))
        if len(out) != self.n_items + 1:
            raise BundleError(f"{ITEMS_FILE}: {len(out)} rows, expected n_items + 1 = {self.n_items + 1}")
        return out

    @cached_property
    def id_to_row(self) -> dict[str, int]:
        """External item id -> row (1..n_items)."""
        return {it.id: it.row for it in self.items[1:]}


def _short_errors(e: ValidationError, limit: int = 3) -> str:
    errs = e.errors()
    parts = [f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in errs[:limit]]
    if len(errs) > limit:
        parts.append(f"... and {len(errs) - limit} more")
    return "; ".join(parts)
