import numpy as np
import pytest
import torch

from models.pca import PCA


def low_rank(n: int = 300, d: int = 24, rank: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=g, dtype=torch.float64)
    coef = torch.randn(n, rank, generator=g, dtype=torch.float64) * torch.linspace(
        5, 1, rank, dtype=torch.float64
    )
    return (coef @ basis + 3.0).float()  # (n, d), offset so the mean matters


@pytest.mark.parametrize("n", [300, 12])  # N >= d: eigh of the covariance; N < d: SVD of the data
def test_round_trip_on_low_rank_data(n):
    x = low_rank(n=n, d=24, rank=5)
    pca = PCA.fit(x, k=5)
    z = pca.transform(x)
    assert z.shape == (n, 5) and z.dtype == torch.float32
    torch.testing.assert_close(pca.inverse_transform(z), x, atol=1e-4, rtol=1e-4)
    # the variance beyond the rank is ~0, so the kept components explain everything
    assert float(pca.explained_variance_ratio.sum()) == pytest.approx(1.0, abs=1e-6)
    assert torch.all(pca.explained_variance[:-1] >= pca.explained_variance[1:])


def test_components_orthonormal():
    x = torch.randn(200, 16)
    pca = PCA.fit(x, k=10)
    c = pca.components.double()
    torch.testing.assert_close(c @ c.T, torch.eye(10, dtype=torch.float64), atol=1e-6, rtol=0)


def test_deterministic_sign_convention():
    x = torch.randn(100, 12)
    a, b = PCA.fit(x, k=6), PCA.fit(x.clone(), k=6)
    assert torch.equal(a.components, b.components)
    idx = a.components.abs().argmax(dim=1)
    assert torch.all(a.components.gather(1, idx[:, None]) > 0)
    # the SVD route follows the same convention
    small = x[:8]
    s = PCA.fit(small, k=4)
    idx = s.components.abs().argmax(dim=1)
    assert torch.all(s.components.gather(1, idx[:, None]) > 0)


@pytest.mark.parametrize("n,d", [(200, 10), (6, 20)])
def test_matches_numpy_svd_up_to_sign(n, d):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    k = min(n, d) - 1
    pca = PCA.fit(x, k=k)
    xn = x.numpy()
    xc = xn - xn.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    ref = xc @ vt[:k].T  # (n, k)
    got = pca.transform(x).numpy()
    signs = np.sign((ref * got).sum(0))
    np.testing.assert_allclose(got * signs, ref, atol=1e-5)
    np.testing.assert_allclose(pca.explained_variance.numpy(), (s[:k] ** 2) / (n - 1), rtol=1e-5)


def test_k_out_of_range_raises():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="k=5 is out of range"):
        PCA.fit(x, k=5)
    with pytest.raises(ValueError, match="out of range"):
        PCA.fit(torch.randn(3, 8), k=4)  # min(N, d) = 3
    with pytest.raises(ValueError, match="out of range"):
        PCA.fit(x, k=0)


def test_rejects_non_finite_input():
    x = torch.randn(10, 4)
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        PCA.fit(x, k=2)


def test_save_load_identical(tmp_path):
    pca = PCA.fit(torch.randn(50, 8), k=3)
    p = tmp_path / "pca.safetensors"
    pca.save(p)
    back = PCA.load(p)
    for name in ("mean", "components", "explained_variance"):
        assert torch.equal(getattr(back, name), getattr(pca, name))
    assert back.total_variance == pca.total_variance and back.n_samples == 50
    x = torch.randn(4, 8)
    assert torch.equal(back.transform(x), pca.transform(x))
    assert [q.name for q in tmp_path.iterdir()] == ["pca.safetensors"]  # atomic write left no temp file


def test_load_rejects_a_foreign_file(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "x.safetensors"
    save_file({"mean": torch.zeros(3)}, str(p))
    with pytest.raises(ValueError, match="not an llmemb PCA file"):
        PCA.load(p)


def test_transform_batched_and_low_precision_input():
    pca = PCA.fit(torch.randn(64, 8), k=4)
    x = torch.randn(2, 3, 8)
    z = pca.transform(x)
    assert z.shape == (2, 3, 4)
    torch.testing.assert_close(z[1, 2], pca.transform(x[1, 2][None])[0])
    assert pca.transform(x.bfloat16()).dtype == torch.float32
    assert pca.to(dtype=torch.float64).transform(x).dtype == torch.float64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_gpu_matches_cpu():
    x = low_rank(n=500, d=32, rank=8)
    cpu = PCA.fit(x, k=8)
    gpu = PCA.fit(x.cuda(), k=8)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.components.cpu(), cpu.components, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gpu.to("cpu").transform(x), cpu.transform(x), atol=1e-4, rtol=1e-4)
