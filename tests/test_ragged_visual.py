"""Ragged visual tokens (issue 15): -1-padded vis_pos, per-sample and per-image blocks in the
alignment loss, vs a plain per-sample / per-image Python-loop reference running the original
single-block loss on each sliced block."""

import pytest
import torch

from distill.losses import attention_alignment_loss

KINDS = ["filtered_cosine", "cosine", "kl"]


def _maps(seed, l, b, n, pad_value=0.0):
    """Causal row-stochastic-ish maps (each row sums to < 1: text keys take the rest)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(l, b, n, n, generator=g, dtype=torch.float64).tril()
    return (a / (a.sum(-1, keepdim=True) * 1.5)).float()


def _pad(maps, ids, value):
    """Write ``value`` on padding rows/cols (ids == -1): padding must never enter."""
    pad = ids < 0  # (B, n)
    m = maps.clone()
    m = m.masked_fill(pad[None, :, :, None] | pad[None, :, None, :], value)
    return m


def _reference(s, t, ids, valid, kind):
    """Loop: sample b, image k -> slice the block of k's tokens, original loss on [L, 1, n_k, n_k];
    a sample's term = mean over its images; sum over counted samples (valid, >= 1 token)."""
    total = s.new_zeros(()).double()
    count = 0
    for b in range(s.shape[1]):
        if not bool(valid[b]):
            continue
        imgs = sorted({int(i) for i in ids[b].tolist() if i >= 0})
        if not imgs:
            continue
        count += 1
        terms = []
        for k in imgs:
            idx = (ids[b] == k).nonzero().flatten()
            sb = s[:, b][:, idx][:, :, idx][:, None]
            tb = t[:, b][:, idx][:, :, idx][:, None]
            terms.append(attention_alignment_loss(sb, tb, kind=kind, reduction="sum"))
        total = total + torch.stack(terms).mean()
    return total, count


def _ids_from_counts(counts, n):
    pos = torch.arange(n)
    return torch.where(pos[None] < torch.tensor(counts)[:, None], 0, -1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pad_value", [0.0, 0.7])
def test_per_sample_blocks_match_loop_reference(kind, pad_value):
    counts = [5, 9, 0, 1, 3]  # n_max 9; a sample with no visual tokens; a 1-token block (NaN std)
    n, l = 9, 3
    ids = _ids_from_counts(counts, n)
    valid = torch.tensor([True, True, False, True, True])
    s0 = _pad(_maps(0, l, 5, n), ids, pad_value)
    t = _pad(_maps(1, l, 5, n), ids, pad_value)
    s = s0.clone().requires_grad_()
    s_ref = s0.clone().requires_grad_()
    for arg in ({"counts": torch.tensor(counts)}, {"vis_mask": ids >= 0}, {"image_ids": ids}):
        s.grad = None
        got = attention_alignment_loss(s, t, valid, kind=kind, reduction="sum", **arg)
        assert torch.isfinite(got)
        ref, cnt = _reference(s_ref, t, ids, valid, kind)
        torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-5)
        mean = attention_alignment_loss(s.detach(), t, valid, kind=kind, **arg)
        torch.testing.assert_close(mean.double(), ref.detach() / cnt, atol=1e-6, rtol=1e-5)
        got.backward()
        s_ref.grad = None
        ref.backward()
        assert torch.isfinite(s.grad).all()
        torch.testing.assert_close(s.grad, s_ref.grad.float(), atol=1e-6, rtol=1e-5)
        pad = ids < 0
        padmask = (pad[:, :, None] | pad[:, None, :]).expand_as(s.grad)
        assert (s.grad[padmask] == 0).all()  # padding never receives gradient
        assert (s.grad[:, 2] == 0).all()  # invalid sample


@pytest.mark.parametrize("kind", KINDS)
def test_full_blocks_equal_original(kind):
    l, b, n = 2, 3, 7
    s0, t = _maps(2, l, b, n), _maps(3, l, b, n)
    valid = torch.tensor([True, False, True])
    s = s0.clone().requires_grad_()
    plain = attention_alignment_loss(s, t, valid, kind=kind)
    plain.backward()
    g_plain = s.grad.clone()
    for arg in ({"counts": torch.full((b,), n)}, {"vis_mask": torch.ones(b, n, dtype=torch.bool)},
                {"image_ids": torch.zeros(b, n, dtype=torch.long)}):
        s.grad = None
        out = attention_alignment_loss(s, t, valid, kind=kind, **arg)
        out.backward()
        torch.testing.assert_close(out, plain, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(s.grad, g_plain, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_multi_image_blocks_are_averaged(kind):
    # sample 0: images of 4 and 3 tokens then padding; sample 1: one image of 6; sample 2: 3 images
    # of 2, 3, 1 tokens (non-contiguous ids allowed); sample 3: all padding
    ids = torch.tensor([
        [0, 0, 0, 0, 1, 1, 1, -1],
        [0, 0, 0, 0, 0, 0, -1, -1],
        [0, 0, 1, 2, 1, 1, -1, -1],
        [-1] * 8,
    ])
    l, n = 2, 8
    s0 = _pad(_maps(4, l, 4, n), ids, 0.3)
    t = _pad(_maps(5, l, 4, n), ids, 0.3)
    valid = torch.ones(4, dtype=torch.bool)
    s, s_ref = s0.clone().requires_grad_(), s0.clone().requires_grad_()
    got = attention_alignment_loss(s, t, valid, image_ids=ids, kind=kind, reduction="sum")
    ref, cnt = _reference(s_ref, t, ids, valid, kind)
    assert cnt == 3
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-5)
    got.backward()
    ref.backward()
    torch.testing.assert_close(s.grad, s_ref.grad.float(), atol=1e-6, rtol=1e-5)
    # cross-image entries (image 1 queries on image 0 keys) never enter
    assert (s.grad[:, 0, 4:7, :4] == 0).all()
    mean = attention_alignment_loss(s0, t, valid, image_ids=ids, kind=kind)
    torch.testing.assert_close(mean.double(), ref.detach() / 3, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_vis_mask_anywhere_equals_image_ids_and_reference(kind):
    """A real-token mask with holes (not only tail padding): the single-block path, the general
    per-image path with one id, and the loop reference agree."""
    mask = torch.tensor([[1, 1, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    ids = torch.where(mask, 0, -1)
    s0, t = _pad(_maps(6, 2, 3, 7), ids, 0.2), _pad(_maps(7, 2, 3, 7), ids, 0.2)
    valid = torch.ones(3, dtype=torch.bool)
    a = attention_alignment_loss(s0, t, valid, vis_mask=mask, kind=kind, reduction="sum")
    g = attention_alignment_loss(s0, t, valid, image_ids=ids, kind=kind, reduction="sum")
    ref, _ = _reference(s0, t, ids, valid, kind)
    torch.testing.assert_close(a, g, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.double(), ref, atol=1e-6, rtol=1e-5)


def test_ragged_args_validation():
    s = _maps(0, 1, 2, 4)
    with pytest.raises(ValueError, match="at most one"):
        attention_alignment_loss(s, s, counts=torch.tensor([4, 4]), image_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="counts must be"):
        attention_alignment_loss(s, s, counts=torch.tensor([4]))
    with pytest.raises(ValueError, match="vis_mask must be"):
        attention_alignment_loss(s, s, vis_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="image_ids must be"):
        attention_alignment_loss(s, s, image_ids=torch.zeros(2, 3, dtype=torch.long))
    # nothing real anywhere: 0, finite
    out = attention_alignment_loss(s, s * 0.5, counts=torch.tensor([0, 0]))
    assert out == 0 and torch.isfinite(out)


@pytest.mark.parametrize("kind", KINDS)
def test_no_host_reads(kind):
    """The ragged paths (forward and backward) read no tensor value on the host."""
    from _host_reads import HostReads

    ids = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, -1, -1]])
    s = _maps(8, 2, 2, 6).requires_grad_()
    t = _maps(9, 2, 2, 6)
    valid = torch.ones(2, dtype=torch.bool)
    for arg in ({"counts": torch.tensor([6, 4])}, {"vis_mask": ids >= 0}, {"image_ids": ids}):
        with HostReads() as reads:
            out = attention_alignment_loss(s, t, valid, kind=kind, **arg)
            out.backward()
        assert reads.n == 0, arg
