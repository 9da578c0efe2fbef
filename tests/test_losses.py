"""Pure losses: limits, edge cases, chunked == plain, hand-checked filtered cosine, layer matching."""

import math

import pytest
import torch
import torch.nn.functional as F

from distill.losses import attention_alignment_loss, logit_kd_loss, match_layers


def _logits(seed=0, b=2, t=5, v=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2


def _labels(b=2, t=5):
    lab = torch.arange(b * t).view(b, t) % 7
    lab[0, 0] = -100
    lab[1, 3:] = -100
    return lab


def _manual_kl(p_logits, q_logits, temp=1.0):
    lp, lq = F.log_softmax(p_logits / temp, -1), F.log_softmax(q_logits / temp, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_identical_inputs_give_zero(kind):
    s = _logits()
    assert logit_kd_loss(s, s.clone(), _labels(), kind=kind).abs() < 1e-6


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_all_ignored_gives_zero_no_nan(kind):
    s = _logits().requires_grad_()
    loss = logit_kd_loss(s, _logits(1), torch.full((2, 5), -100), kind=kind)
    assert loss == 0
    loss.backward()
    assert torch.isfinite(s.grad).all() and (s.grad == 0).all()


def test_forward_reverse_values_and_temperature():
    s, t, lab = _logits(0), _logits(1), _labels()
    keep = lab != -100
    for temp in (1.0, 2.5):
        fwd = _manual_kl(t, s, temp)[keep].mean() * temp**2
        rev = _manual_kl(s, t, temp)[keep].mean() * temp**2
        torch.testing.assert_close(logit_kd_loss(s, t, lab, "forward_kl", temp).double(), fwd, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logit_kd_loss(s, t, lab, "reverse_kl", temp).double(), rev, rtol=1e-5, atol=1e-6)
    total = logit_kd_loss(s, t, lab, reduction="sum")
    torch.testing.assert_close(total / keep.sum(), logit_kd_loss(s, t, lab))


def test_jsd_limits_and_symmetry():
    s, t, lab = _logits(0), _logits(1), _labels()
    fwd = logit_kd_loss(s, t, lab, "forward_kl")
    rev = logit_kd_loss(s, t, lab, "reverse_kl")
    torch.testing.assert_close(logit_kd_loss(s, t, lab, "jsd", beta=0.0), fwd)
    torch.testing.assert_close(logit_kd_loss(s, t, lab, "jsd", beta=1.0), rev)
    # continuity towards the endpoints, from the interior formula: JSD_beta / (1-beta)... -> scaled limits
    b = 1e-4
    near0 = logit_kd_loss(s, t, lab, "jsd", beta=b)
    near1 = logit_kd_loss(s, t, lab, "jsd", beta=1 - b)
    assert near0 < fwd and near1 < rev  # the mixture pulls both terms below the pure KLs
    torch.testing.assert_close(near0, fwd, rtol=5e-2, atol=1e-3)
    torch.testing.assert_close(near1, rev, rtol=5e-2, atol=1e-3)
    half = logit_kd_loss(s, t, lab, "jsd", beta=0.5)
    torch.testing.assert_close(half, logit_kd_loss(t, s, lab, "jsd", beta=0.5))
    assert 0 < half < math.log(2)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_chunked_equals_plain(kind, chunk):
    s1 = _logits(0).float().requires_grad_()
    s2 = s1.detach().clone().requires_grad_()
    t, lab = _logits(1).float(), _labels()
    a = logit_kd_loss(s1, t, lab, kind, temperature=2.0)
    b = logit_kd_loss(s2, t, lab, kind, temperature=2.0, chunk_size=chunk)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    a.backward()
    b.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-6, atol=1e-7)


def test_bf16_is_upcast():
    s, t, lab = _logits(0), _logits(1), _labels()
    ref = logit_kd_loss(s, t, lab)
    got = logit_kd_loss(s.bfloat16(), t.bfloat16(), lab)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref.double(), rtol=3e-2, atol=3e-2)


def test_vocab_padding_slice_and_mismatch():
    s, t, lab = _logits(0, v=11), _logits(1, v=11), _labels()
    padded = torch.cat([t, torch.randn(2, 5, 5, dtype=t.dtype) * 50], -1)  # 5 padding columns
    torch.testing.assert_close(logit_kd_loss(s, padded, lab), logit_kd_loss(s, t, lab))
    with pytest.raises(ValueError, match="smaller than the student"):
        logit_kd_loss(_logits(0, v=12), t, lab)
    with pytest.raises(ValueError, match="mismatch"):
        logit_kd_loss(s, t[:, :4], lab)
    with pytest.raises(ValueError, match="kd kind"):
        logit_kd_loss(s, t, lab, kind="kl")


# ----------------------------------------------------------------------------- attention alignment


def test_filtered_cosine_hand_example():
    # n = 3; student / teacher lower-triangular maps
    s = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]])
    t = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0.1, 0.1, 0.8]])
    # stats over all 9 entries: student mean 3/9, teacher mean 3/9; std (unbiased)
    ms, ss = s.mean(), s.flatten().std()
    mt, st = t.mean(), t.flatten().std()
    assert ms + ss < 1.0 and mt + st < 0.8  # so the 1.0 diagonal entries and teacher 0.8/0.9 are filtered out
    thr_s, thr_t = float(ms + ss), float(mt + st)
    assert 0.5 <= thr_s and 0.5 < thr_t < 0.8  # 0.5 kept for the student, 0.8/0.9 dropped for the teacher
    # kept (teacher != 0, both under threshold): (2,0) s=.2 t=.1; (1,1) s=.5 t=.1; (2,1) s=.3 t=.1
    # dropped: (0,0) both 1.0; (1,0) teacher .9; (2,2) teacher .8
    prof_s = torch.tensor([0.2, (0.5 + 0.3) / 2, 0.0])
    prof_t = torch.tensor([0.1, 0.1, 0.0])
    expected = 1 - F.cosine_similarity(prof_s, prof_t, dim=0)
    got = attention_alignment_loss(s[None, None], t[None, None])
    torch.testing.assert_close(got, expected)


def _maps(seed, l=2, b=3, n=6):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(l, b, n, n, generator=g).tril()
    return a / a.sum(-1, keepdim=True)


@pytest.mark.parametrize("kind", ["filtered_cosine", "cosine", "kl"])
def test_alignment_identical_zero_valid_and_grad(kind):
    s = _maps(0)
    assert attention_alignment_loss(s, s.clone(), kind=kind).abs() < 1e-6
    t = _maps(1)
    sr = s.clone().requires_grad_()
    valid = torch.tensor([True, False, True])
    loss = attention_alignment_loss(sr, t, valid, kind=kind)
    # dropping sample 1 == computing on samples 0 and 2 only
    sub = attention_alignment_loss(s[:, [0, 2]], t[:, [0, 2]], kind=kind)
    torch.testing.assert_close(loss, sub)
    summed = attention_alignment_loss(s, t, valid, kind=kind, reduction="sum")
    torch.testing.assert_close(summed / 2, loss)
    loss.backward()
    assert (sr.grad[:, 1] == 0).all() and sr.grad.abs().sum() > 0
    none = attention_alignment_loss(s, t, torch.zeros(3, dtype=torch.bool), kind=kind)
    assert none == 0 and torch.isfinite(none)


def test_alignment_plain_cosine_reference():
    s, t = _maps(0), _maps(1)
    n = s.shape[-1]
    count = torch.arange(n, 0, -1, dtype=torch.float32)  # rows i >= j per column j
    ps, pt = s.sum(-2) / count, t.sum(-2) / count
    exp = (1 - F.cosine_similarity(ps, pt, dim=-1)).sum() / 3
    torch.testing.assert_close(attention_alignment_loss(s, t, kind="cosine"), exp)


def test_alignment_bad_shapes():
    with pytest.raises(ValueError, match="L, B, n, n"):
        attention_alignment_loss(_maps(0), _maps(1, n=5))
    with pytest.raises(ValueError, match="valid"):
        attention_alignment_loss(_maps(0), _maps(1), torch.ones(2, dtype=torch.bool))


# ----------------------------------------------------------------------------- layer matching


def test_match_layers_defaults():
    s, w = match_layers(4, 6)
    assert s == [1] and w == [[1, 2]]  # window round(6/4)=2 centred on 1.75
    s, w = match_layers(24, 32)
    assert s == [8, 9, 10, 11, 12, 13]
    assert all(len(x) == 1 for x in w) and [x[0] for x in w] == [11, 12, 14, 15, 16, 18]
    s, w = match_layers(12, 24)  # window 2, proportional
    assert s == [4, 5, 6] and w == [[8, 9], [10, 11], [12, 13]]
    s, w = match_layers(1, 1)
    assert s == [0] and w == [[0]]
    s, w = match_layers(8, 8, num_layers=8)
    assert s == list(range(8)) and w == [[i] for i in range(8)]


def test_match_layers_explicit_and_validation():
    assert match_layers(4, 6, student_layers=[3, 1], teacher_layers=[5, [2, 3]]) == ([3, 1], [[5], [2, 3]])
    s, w = match_layers(4, 6, student_layers=[0, 3], window=3)
    assert w == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="out of range"):
        match_layers(4, 6, student_layers=[4])
    with pytest.raises(ValueError, match="teacher_layers has 1 entries"):
        match_layers(4, 6, student_layers=[1, 2], teacher_layers=[3])
    with pytest.raises(ValueError, match="out of range"):
        match_layers(4, 6, student_layers=[1], teacher_layers=[6])
    with pytest.raises(ValueError, match="window"):
        match_layers(4, 6, window=7)
    with pytest.raises(ValueError, match="num_layers"):
        match_layers(4, 6, num_layers=5)
    with pytest.raises(ValueError, match="distinct"):
        match_layers(4, 6, student_layers=[1, 1])
    with pytest.raises(ValueError, match="student_depth"):
        match_layers(0, 6)
