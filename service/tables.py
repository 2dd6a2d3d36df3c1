"""Writing an embedding table for download, in chunks: the bundle's rows (read slice by slice from its safetensors
file) followed by the rows of registered items, as ``npy``, ``safetensors`` or ``parquet``.

Every format holds float32 rows ``0..rows-1``, row 0 padding, row r = the item with id ``ids[r]``:
  npy          a (rows, dim) little-endian float32 array (``numpy.load``);
  safetensors  one tensor ``weight`` (rows, dim) F32 + string metadata (table, rows, dim, padding_row, bundle_id,
               catalog_version) - the layout of the bundle's own table files;
  parquet      columns ``row`` int64, ``id`` string (null for row 0), ``embedding`` fixed_size_list<float32>[dim].
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from safetensors import safe_open

from models.io import TABLE_KEY, atomic_open, sha256_file

FORMATS = {
    "npy": ("application/octet-stream", ".npy"),
    "safetensors": ("application/octet-stream", ".safetensors"),
    "parquet": ("application/vnd.apache.parquet", ".parquet"),
}
_CHUNK_ROWS = 16384


def iter_rows(bundle_file: Path, bundle_rows: int, extra: np.ndarray | None) -> Iterator[np.ndarray]:
    """Float32 chunks of the table: bundle rows [0, bundle_rows) from the file, then ``extra`` rows."""
    with safe_open(str(bundle_file), framework="pt") as f:
        sl = f.get_slice(TABLE_KEY)
        for a in range(0, bundle_rows, _CHUNK_ROWS):
            yield sl[a : min(a + _CHUNK_ROWS, bundle_rows)].float().numpy()
    if extra is not None and len(extra):
        yield np.ascontiguousarray(extra, dtype=np.float32)


def write_table(
    path: Path,
    fmt: str,
    bundle_file: Path,
    bundle_rows: int,
    dim: int,
    extra: np.ndarray | None,
    ids: Sequence[str | None],
    metadata: dict[str, str],
) -> tuple[str, int]:
    """Write the table atomically to ``path``; return (sha256, size in bytes)."""
    rows = bundle_rows + (0 if extra is None else len(extra))
    if len(ids) != rows:
        raise ValueError(f"{len(ids)} ids for {rows} rows")
    chunks = iter_rows(bundle_file, bundle_rows, extra)
    if fmt == "npy":
        with atomic_open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)}
            )
            for c in chunks:
                f.write(c.astype("<f4", copy=False).tobytes())
    elif fmt == "safetensors":
        header = {
            TABLE_KEY: {"dtype": "F32", "shape": [rows, dim], "data_offsets": [0, rows * dim * 4]},
            "__metadata__": {k: str(v) for k, v in metadata.items()},
        }
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        with atomic_open(path, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for c in chunks:
                f.write(c.astype("<f4", copy=False).tobytes())
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema(
            [("row", pa.int64()), ("id", pa.string()), ("embedding", pa.list_(pa.float32(), dim))],
            metadata={k.encode(): str(v).encode() for k, v in metadata.items()},
        )
        with atomic_open(path, "wb") as f:
            with pq.ParquetWriter(f, schema) as writer:
                start = 0
                for c in chunks:
                    n = len(c)
                    emb = pa.FixedSizeListArray.from_arrays(pa.array(c.reshape(-1), type=pa.float32()), dim)
                    batch = pa.record_batch(
                        [
                            pa.array(np.arange(start, start + n, dtype=np.int64)),
                            pa.array(list(ids[start : start + n]), type=pa.string()),
                            emb,
                        ],
                        schema=schema,
                    )
                    writer.write_batch(batch)
                    start += n
    else:
        raise ValueError(f"unknown format {fmt!r}; use one of {sorted(FORMATS)}")
    return sha256_file(path), os.path.getsize(path)
