import pytest
import torch

from models.adapter import AdaptedTableEncoder, Adapter, AdapterConfig, adapt_rows
from models.srs.base import FrozenTableEncoder, ItemEncoder


def make_encoder(n_items: int = 20, d_in: int = 16, d_out: int = 8, trainable_table: bool = False):
    torch.manual_seed(0)
    table = torch.randn(n_items + 1, d_in)
    return AdaptedTableEncoder(table, AdapterConfig(d_in=d_in, d_out=d_out), trainable_table=trainable_table)


def test_config_defaults_and_validation():
    assert AdapterConfig(d_in=1536, d_out=128).d_hidden == 768  # the paper's d_m / 2
    assert AdapterConfig(d_in=16, d_out=8, d_hidden=4).d_hidden == 4
    for bad in (dict(d_in=0, d_out=8), dict(d_in=8, d_out=8, d_hidden=0), dict(d_in=8, d_out=8, dropout=1.0)):
        with pytest.raises(ValueError):
            AdapterConfig(**bad)


def test_adapter_shapes():
    a = Adapter(AdapterConfig(d_in=16, d_out=8))
    assert a(torch.randn(5, 16)).shape == (5, 8)
    assert a(torch.randn(2, 3, 16)).shape == (2, 3, 8)
    assert a.w2.weight.shape == (8, 16) and a.w1.weight.shape == (8, 8)  # W2: d_m/2 x d_m, W1: d x d_m/2


def test_adapter_has_no_activation():
    a = Adapter(AdapterConfig(d_in=16, d_out=8)).eval()
    x, y = torch.randn(4, 16), torch.randn(4, 16)
    f0 = a(torch.zeros(4, 16))
    torch.testing.assert_close(a(x + y) - f0, (a(x) - f0) + (a(y) - f0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a(3 * x) - f0, 3 * (a(x) - f0), atol=1e-5, rtol=1e-5)


def test_encoder_is_an_item_encoder_with_zero_padding():
    enc = make_encoder()
    assert isinstance(enc, ItemEncoder) and enc.n_items == 20 and enc.dim == 8
    t = enc.table()
    assert t.shape == (21, 8)
    assert torch.all(t[0] == 0)
    ids = torch.tensor([[0, 0, 3, 7], [1, 2, 3, 20]])
    out = enc(ids)
    assert out.shape == (2, 4, 8)
    assert torch.all(out[0, :2] == 0)


def test_forward_equals_table_lookup():
    enc = make_encoder().eval()
    ids = torch.randint(0, 21, (6, 9))
    torch.testing.assert_close(enc(ids), enc.table()[ids], atol=1e-6, rtol=1e-6)


def test_forward_runs_the_adapter_only_on_distinct_ids():
    enc = make_encoder(n_items=1000)
    seen = []
    enc.adapter.w2.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    enc(torch.tensor([[0, 0, 5, 5, 7], [5, 7, 7, 9, 0]]))
    assert seen == [4]  # {0, 5, 7, 9}, not 10 positions and not 1001 rows


def test_per_position_path_gives_the_deduplicated_vectors():
    # Accelerators skip the dedupe (torch.unique syncs with the device); the vectors must not change.
    enc = make_encoder(n_items=50).eval()
    ids = torch.tensor([[0, 0, 5, 5, 7], [5, 7, 7, 9, 0]])
    once = adapt_rows(enc.adapter, enc.weight, ids, dedupe=True)
    every = adapt_rows(enc.adapter, enc.weight, ids, dedupe=False)
    torch.testing.assert_close(every, once, rtol=1e-6, atol=1e-6)
    assert every.shape == (2, 5, enc.dim) and every[ids == 0].abs().sum() == 0


def test_frozen_table_gets_no_grad_adapter_does():
    enc = make_encoder()
    assert "weight" in dict(enc.named_buffers()) and "weight" not in dict(enc.named_parameters())
    enc(torch.tensor([[1, 2, 3]])).sum().backward()
    assert not enc.weight.requires_grad and enc.weight.grad is None
    assert enc.adapter.w1.weight.grad is not None and enc.adapter.w2.weight.grad is not None


def test_trainable_table_variant_gets_grad():
    enc = make_encoder(trainable_table=True)
    assert "weight" in dict(enc.named_parameters())
    enc(torch.tensor([[1, 2, 3]])).sum().backward()
    assert enc.weight.grad is not None
    assert enc.weight.grad[1:4].abs().sum() > 0 and torch.all(enc.weight.grad[4:] == 0)
    # state dicts of the frozen and trainable variants are interchangeable
    frozen = make_encoder()
    frozen.load_state_dict(enc.state_dict())


def test_table_rejects_wrong_dim():
    with pytest.raises(ValueError, match="d_in"):
        AdaptedTableEncoder(torch.randn(5, 10), AdapterConfig(d_in=16, d_out=8))


def test_to_frozen_caches_the_adapted_table():
    enc = make_encoder()
    frozen = enc.to_frozen()
    assert isinstance(frozen, FrozenTableEncoder)
    ids = torch.tensor([[0, 4, 9]])
    torch.testing.assert_close(frozen(ids), enc(ids), atol=1e-6, rtol=1e-6)
    assert enc.training  # mode restored
