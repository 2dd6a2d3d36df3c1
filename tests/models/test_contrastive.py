import math

import pytest
import torch

from models.contrastive import Temperature, first_occurrence, info_nce


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def test_two_by_two_by_hand():
    eye = torch.eye(2)  # logits = I / t with t = 1: positive 1, negative 0
    # infonce, each row of each side: -log(e / (e + 1)) = log(1 + 1/e)
    assert info_nce(eye, eye, 1.0).item() == pytest.approx(2 * math.log(1 + math.exp(-1)), abs=1e-6)
    # paper (Eq. 4): -log(e / e^0) = -1 per row, per side
    assert info_nce(eye, eye, 1.0, form="paper").item() == pytest.approx(-2.0, abs=1e-6)


def test_three_by_three_by_hand_raw_inner_product():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # logits = a b^T / 0.5 = [[4, 0, 2], [0, 4, 0], [4, 2, 2]]; b -> a uses the transpose
    a_to_b = [(-4 + lse(4, 0, 2)), (-4 + lse(0, 4, 0)), (-2 + lse(4, 2, 2))]
    b_to_a = [(-4 + lse(4, 0, 4)), (-4 + lse(0, 4, 2)), (-2 + lse(2, 0, 2))]
    expected = sum(a_to_b) / 3 + sum(b_to_a) / 3
    assert info_nce(a, b, 0.5, normalize=False).item() == pytest.approx(expected, abs=1e-5)
    a_to_b = [(-4 + lse(0, 2)), (-4 + lse(0, 0)), (-2 + lse(4, 2))]
    b_to_a = [(-4 + lse(0, 4)), (-4 + lse(0, 2)), (-2 + lse(2, 0))]
    expected = sum(a_to_b) / 3 + sum(b_to_a) / 3
    assert info_nce(a, b, 0.5, form="paper", normalize=False).item() == pytest.approx(expected, abs=1e-5)


def test_normalize_makes_the_loss_scale_free():
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    for form in ("infonce", "paper"):
        torch.testing.assert_close(info_nce(a, b, 0.1, form), info_nce(3 * a, 0.5 * b, 0.1, form))
        assert not torch.allclose(info_nce(a, b, 0.1, form, False), info_nce(3 * a, b, 0.1, form, False))


@pytest.mark.parametrize("form", ["infonce", "paper"])
def test_symmetric(form):
    torch.manual_seed(1)
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    torch.testing.assert_close(info_nce(a, b, 0.07, form), info_nce(b, a, 0.07, form))


def test_identical_vectors_stay_finite():
    x = torch.ones(4, 3, requires_grad=True)  # every row the same: positives tie with every negative
    paper = info_nce(x, x, 0.01, form="paper")
    infonce = info_nce(x, x, 0.01)
    # paper: -s + log((B - 1) e^s) = log(B - 1) per side; infonce: log(B) per side
    assert paper.item() == pytest.approx(2 * math.log(3), abs=1e-4)
    assert infonce.item() == pytest.approx(2 * math.log(4), abs=1e-4)
    (paper + infonce).backward()
    assert torch.isfinite(x.grad).all()
    zeros = torch.zeros(3, 5)
    for form in ("infonce", "paper"):
        assert torch.isfinite(info_nce(zeros, zeros, 0.01, form))


def test_paper_form_is_bounded_on_normalised_vectors():
    # Perfect separation with B = 2: positive cosine 1, negative -1 -> each side reaches -2 / t + log(B - 1)
    a = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    t = 0.01
    assert info_nce(a, a, t, form="paper").item() == pytest.approx(2 * (-2 / t), rel=1e-5)
    assert info_nce(10 * a, 10 * a, t, form="paper").item() == pytest.approx(2 * (-2 / t), rel=1e-5)
    # ... while the raw inner product (the paper's) keeps going down as the vectors grow
    raw = info_nce(10 * a, 10 * a, t, form="paper", normalize=False).item()
    assert raw == pytest.approx(100 * 2 * (-2 / t), rel=1e-5)  # |x|^2 = 100 times lower: no floor
    assert info_nce(a, a, t).item() >= 0


def test_low_precision_inputs_computed_in_fp32():
    torch.manual_seed(2)
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    for dtype in (torch.bfloat16, torch.float16):
        low = info_nce(a.to(dtype), b.to(dtype), 0.01, form="paper")
        assert low.dtype == torch.float32 and torch.isfinite(low)
        ref = info_nce(a.to(dtype).float(), b.to(dtype).float(), 0.01, form="paper")
        torch.testing.assert_close(low, ref)


def test_gradient_reaches_temperature_and_inputs():
    torch.manual_seed(3)
    temp = Temperature(init=0.05)
    a = torch.randn(6, 4, requires_grad=True)
    b = torch.randn(6, 4)
    for form in ("infonce", "paper"):
        temp.zero_grad()
        a.grad = None
        info_nce(a, b, temp(), form).backward()
        assert temp.log_t.grad is not None and temp.log_t.grad.abs().item() > 0
        assert a.grad.abs().sum().item() > 0


def test_temperature_is_log_parameterised_and_clamped():
    temp = Temperature(init=0.05, min_value=0.01, max_value=1.0)
    assert temp().item() == pytest.approx(0.05, rel=1e-6)
    assert temp.log_t.item() == pytest.approx(math.log(0.05), rel=1e-6)
    with torch.no_grad():
        temp.log_t.fill_(math.log(1e-4))
    assert temp().item() == pytest.approx(0.01, rel=1e-6)  # forward clamps
    temp.clamp_()  # and the raw parameter is pulled back, so its gradient is alive again
    assert temp.log_t.item() == pytest.approx(math.log(0.01), rel=1e-6)
    temp().backward()
    assert temp.log_t.grad.item() == pytest.approx(0.01, rel=1e-5)  # d exp(x) / dx at the edge
    with torch.no_grad():
        temp.log_t.fill_(5.0)
    assert temp().item() == pytest.approx(1.0)
    fixed = Temperature(init=0.1, learnable=False)
    assert not fixed.log_t.requires_grad
    with pytest.raises(ValueError):
        Temperature(init=0.001, min_value=0.01)
    with pytest.raises(ValueError):
        Temperature(init=0.1, min_value=0.0)


def test_first_occurrence():
    assert first_occurrence(torch.tensor([3, 1, 3, 2, 1])).tolist() == [0, 1, 3]
    assert first_occurrence(torch.tensor([4, 4, 4])).tolist() == [0]
    assert first_occurrence(torch.tensor([7])).tolist() == [0]


@pytest.mark.parametrize("form", ["infonce", "paper"])
def test_dedupe_by_ids_keeps_first_occurrence(form):
    torch.manual_seed(4)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    a_dup = torch.cat([a, a[:1], a[1:2]])  # items 10, 11, 12, 10, 11
    b_dup = torch.cat([b, b[:1], b[1:2]])
    ids = torch.tensor([10, 11, 12, 10, 11])
    torch.testing.assert_close(info_nce(a_dup, b_dup, 0.1, form, ids=ids), info_nce(a, b, 0.1, form))
    # without dedupe the duplicates are their own negatives and the loss differs
    assert not torch.allclose(info_nce(a_dup, b_dup, 0.1, form), info_nce(a, b, 0.1, form))


def test_fewer_than_two_rows_is_a_zero_that_backpropagates():
    a = torch.randn(2, 4, requires_grad=True)
    loss = info_nce(a, a.detach() + 1, 0.1, form="paper", ids=torch.tensor([5, 5]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(a.grad, torch.zeros_like(a))


def test_bad_arguments():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="form"):
        info_nce(x, x, 0.1, form="cosine")
    with pytest.raises(ValueError, match="shape"):
        info_nce(x, x[:2], 0.1)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(x, x, 0.0)
    with pytest.raises(ValueError, match="ids"):
        info_nce(x, x, 0.1, ids=torch.tensor([1, 2]))
