"""A fitted PCA kept as plain tensors (method step 4): e_LLM (n, d_token) -> ē (n, d_m).

The fit is saved with the bundle so that a new item embedded online goes through exactly the transform the
catalog went through (the reference code discarded it). No whitening: the paper projects, it does not rescale.

    pca = PCA.fit(e_llm, k=1536)          # any device; computed in float64, stored in float32
    z = pca.transform(e_llm)              # (n, 1536)
    pca.save("pca.safetensors"); PCA.load("pca.safetensors")
"""

from __future__ import annotations

import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from models.io import atomic_write_bytes

FORMAT = "llmemb.pca"
FORMAT_VERSION = "1"
_CHUNK_ROWS = 65536  # rows per float64 chunk while accumulating the covariance: bounds memory at N = millions


class PCA:
    """Principal components: `mean` (d,), `components` (k, d) with orthonormal rows, `explained_variance` (k,).

    Components are sorted by decreasing variance and their signs are fixed (the entry of largest magnitude in each
    component is positive), so two fits on the same data give the same transform.
    """

    def __init__(
        self,
        mean: torch.Tensor,
        components: torch.Tensor,
        explained_variance: torch.Tensor,
        total_variance: float | None = None,
        n_samples: int | None = None,
    ) -> None:
        if mean.ndim != 1 or components.ndim != 2 or explained_variance.ndim != 1:
            raise ValueError("PCA needs mean (d,), components (k, d), explained_variance (k,)")
        k, d = components.shape
        if mean.shape[0] != d or explained_variance.shape[0] != k:
            raise ValueError(
                f"PCA shapes disagree: mean {tuple(mean.shape)}, components {tuple(components.shape)}, "
                f"explained_variance {tuple(explained_variance.shape)}"
            )
        self.mean = mean
        self.components = components
        self.explained_variance = explained_variance
        self.total_variance = total_variance  # sum of all d variances, for explained_variance_ratio
        self.n_samples = n_samples

    @property
    def k(self) -> int:
        return self.components.shape[0]

    @property
    def d(self) -> int:
        return self.components.shape[1]

    @property
    def device(self) -> torch.device:
        return self.components.device

    @property
    def explained_variance_ratio(self) -> torch.Tensor | None:
        """Share of the total variance each component keeps, (k,); None if the total is unknown."""
        if not self.total_variance:
            return None
        return self.explained_variance / self.total_variance

    def __repr__(self) -> str:
        ratio = self.explained_variance_ratio
        kept = f", keeps {float(ratio.sum()):.1%} of variance" if ratio is not None else ""
        return f"PCA(d={self.d}, k={self.k}, device={self.device}{kept})"

    @classmethod
    def fit(
        cls,
        x: torch.Tensor,
        k: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        out_dtype: torch.dtype = torch.float32,
    ) -> PCA:
        """Fit on `x` (N, d); compute on `device` (default: x's device) in `dtype`, store in `out_dtype`.

        N >= d: eigh of the d x d covariance, accumulated in chunks (cost O(N d^2 + d^3), memory O(d^2)).
        N < d: thin SVD of the centred data (cost O(N^2 d)), cheaper when there are fewer items than dims.
        """
        if x.ndim != 2:
            raise ValueError(f"PCA.fit needs a 2-D tensor (N, d), got shape {tuple(x.shape)}")
        n, d = x.shape
        if n < 1 or d < 1:
            raise ValueError(f"PCA.fit needs a non-empty input, got shape {tuple(x.shape)}")
        if not 1 <= k <= min(n, d):
            raise ValueError(
                f"PCA k={k} is out of range: it must be in [1, min(N, d)] = [1, {min(n, d)}] "
                f"for an input of {n} rows x {d} dims; lower k (the paper's d_m) or embed more items"
            )
        if not x.dtype.is_floating_point:
            raise ValueError(f"PCA.fit needs a floating-point tensor, got {x.dtype}")
        dev = torch.device(device) if device is not None else x.device
        if not bool(torch.isfinite(x).all()):
            raise ValueError("PCA.fit input contains NaN or inf: check the embedding step")

        mean = torch.zeros(d, dtype=dtype, device=dev)
        for i in range(0, n, _CHUNK_ROWS):
            mean += x[i : i + _CHUNK_ROWS].to(dev, dtype).sum(0)
        mean /= n
        denom = max(n - 1, 1)  # unbiased variance, like sklearn; N = 1 gives zero variance, not a crash

        if n >= d:
            cov = torch.zeros(d, d, dtype=dtype, device=dev)
            for i in range(0, n, _CHUNK_ROWS):
                c = x[i : i + _CHUNK_ROWS].to(dev, dtype) - mean  # (chunk, d)
                cov.addmm_(c.T, c)
            cov /= denom
            evals, evecs = torch.linalg.eigh(cov)  # ascending; columns are eigenvectors
            var = evals.flip(0)[:k].clamp_min(0)
            comps = evecs.flip(1)[:, :k].T  # (k, d)
            total = float(torch.diagonal(cov).sum())
        else:
            xc = x.to(dev, dtype) - mean  # (N, d), N < d so this is small next to a d x d covariance
            _, s, vh = torch.linalg.svd(xc, full_matrices=False)  # s descending; vh (N, d)
            var = (s[:k] ** 2) / denom
            comps = vh[:k]
            total = float((xc**2).sum() / denom)

        comps = _fix_signs(comps.contiguous())
        return cls(
            mean.to(out_dtype),
            comps.to(out_dtype).contiguous(),
            var.to(out_dtype),
            total_variance=total,
            n_samples=n,
        )

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., k), on x's device, in the wider of x's and the PCA's float dtype."""
        dt = torch.promote_types(x.dtype, self.components.dtype)
        c = self.components.to(x.device, dt)
        return (x.to(dt) - self.mean.to(x.device, dt)) @ c.T

    def inverse_transform(self, z: torch.Tensor) -> torch.Tensor:
        """(..., k) -> (..., d): the reconstruction in the original space (exact on the kept subspace)."""
        dt = torch.promote_types(z.dtype, self.components.dtype)
        return z.to(dt) @ self.components.to(z.device, dt) + self.mean.to(z.device, dt)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PCA:
        """A copy on `device` / in `dtype` (tensors shared if nothing changes)."""

        def mv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)

        return PCA(
            mv(self.mean),
            mv(self.components),
            mv(self.explained_variance),
            total_variance=self.total_variance,
            n_samples=self.n_samples,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file (tensors mean, components, explained_variance + string metadata), atomically."""
        tensors = {
            "mean": self.mean.detach().cpu().contiguous(),
            "components": self.components.detach().cpu().contiguous(),
            "explained_variance": self.explained_variance.detach().cpu().contiguous(),
        }
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "k": str(self.k), "d": str(self.d)}
        if self.total_variance is not None:
            meta["total_variance"] = repr(float(self.total_variance))
        if self.n_samples is not None:
            meta["n_samples"] = str(self.n_samples)
        atomic_write_bytes(path, st_save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> PCA:
        """Read a file written by `save`; checks the stored k and d against the tensors."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not an llmemb PCA file (metadata format={meta.get('format')!r})")
        t = load_file(str(path), device=str(device))
        missing = {"mean", "components", "explained_variance"} - t.keys()
        if missing:
            raise ValueError(f"{path}: PCA file lacks tensors {sorted(missing)}")
        pca = cls(
            t["mean"],
            t["components"],
            t["explained_variance"],
            total_variance=float(meta["total_variance"]) if "total_variance" in meta else None,
            n_samples=int(meta["n_samples"]) if "n_samples" in meta else None,
        )
        if (str(pca.k), str(pca.d)) != (meta.get("k"), meta.get("d")):
            raise ValueError(
                f"{path}: metadata says k={meta.get('k')}, d={meta.get('d')} "
                f"but tensors are k={pca.k}, d={pca.d}"
            )
        return pca


def _fix_signs(components: torch.Tensor) -> torch.Tensor:
    """Flip each row so that its entry of largest magnitude is positive (first such entry on ties)."""
    idx = components.abs().argmax(dim=1)  # (k,)
    signs = torch.sign(components.gather(1, idx[:, None]))  # (k, 1)
    signs[signs == 0] = 1
    return components * signs
