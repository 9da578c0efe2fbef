"""Fused chunked LM + KD from hidden states (distill.losses.fused_lm_kd_loss) and the objective's
labelled-only path: equal to the plain full-logits losses (values and gradients), no [B, T, V]."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from distill.losses import KD_KINDS, fused_lm_kd_loss, logit_kd_loss
from distill.models import load_vlm
from distill.objective import DistillObjective, LossConfig

CASES = [(k, t, b) for k in KD_KINDS for t in (1.0, 2.0) for b in ((0.5, 0.2) if k == "jsd" else (0.5,))]
CASES += [("jsd", 1.0, 0.0), ("jsd", 1.0, 1.0)]


def _setup(n=37, hs=16, ht=24, v=50, vt=64, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, hs, generator=g, dtype=torch.float64).requires_grad_()
    h_t = torch.randn(n, ht, generator=g, dtype=torch.float64)
    s_head = torch.nn.Linear(hs, v, bias=bias).double()
    t_head = torch.nn.Linear(ht, vt, bias=False).double()  # vt > v: padded teacher vocabulary
    with torch.no_grad():
        for p in list(s_head.parameters()) + list(t_head.parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    tgt = torch.randint(0, v, (n,), generator=g)
    tgt[::3] = -100  # ignored rows
    return h_s, s_head, h_t, t_head, tgt


def _plain(h_s, s_head, h_t, t_head, tgt, kind, temp, beta, lm_w, kd_w):
    s = s_head(h_s)
    lm = F.cross_entropy(s, tgt, ignore_index=-100, reduction="sum")
    kd = logit_kd_loss(s[None], t_head(h_t)[None], tgt[None], kind, temp, beta=beta, reduction="sum")
    return lm_w * lm + kd_w * kd, lm, kd


@pytest.mark.parametrize("kind,temp,beta", CASES)
@pytest.mark.parametrize("chunk", [8, 1000])  # 8 does not divide 37 rows; 1000 = one chunk
def test_fused_equals_plain_values_and_grads(kind, temp, beta, chunk):
    h_s, s_head, h_t, t_head, tgt = _setup(bias=chunk == 8)
    loss, lm, kd = fused_lm_kd_loss(h_s, s_head, tgt, h_t, t_head, kind=kind, temperature=temp, beta=beta,
                                    lm_weight=0.7, kd_weight=1.3, chunk_size=chunk)
    ref, ref_lm, ref_kd = _plain(h_s, s_head, h_t, t_head, tgt, kind, temp, beta, 0.7, 1.3)
    assert loss.dtype == torch.float32 and not lm.requires_grad and not kd.requires_grad
    torch.testing.assert_close(lm.double(), ref_lm.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd.double(), ref_kd.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), ref.double(), rtol=1e-5, atol=1e-5)
    params = [h_s] + list(s_head.parameters())
    got = torch.autograd.grad(loss * 3.0, params)  # upstream gradient scales the stored ones
    want = torch.autograd.grad(ref * 3.0, params)
    for a, b in zip(got, want):  # fp32 math inside both: tolerance relative to the gradient's scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_fused_lm_only_and_frozen_head():
    h_s, s_head, _, _, tgt = _setup()
    s_head.requires_grad_(False)
    loss, lm, kd = fused_lm_kd_loss(h_s, s_head, tgt, chunk_size=5)
    ref = F.cross_entropy(s_head(h_s), tgt, ignore_index=-100, reduction="sum")
    assert kd == 0
    torch.testing.assert_close(lm.double(), ref, rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(loss, [h_s])
    want = torch.autograd.grad(ref, [h_s])[0]
    torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_zero_labelled_rows_give_zero_and_zero_grads():
    h_s, s_head, h_t, t_head, tgt = _setup()
    for hs, ht, tg in ((h_s[:0], h_t[:0], tgt[:0]), (h_s, h_t, torch.full_like(tgt, -100))):
        s_head.zero_grad()
        h_s.grad = None
        loss, lm, kd = fused_lm_kd_loss(hs, s_head, tg, ht, t_head, chunk_size=4)
        assert loss == 0 and lm == 0 and kd == 0
        loss.backward()  # connected to the graph: every rank still runs the backward
        assert s_head.weight.grad is not None and not s_head.weight.grad.any()
        assert h_s.grad is not None and not h_s.grad.any()


def test_fused_validates_inputs():
    h_s, s_head, h_t, t_head, tgt = _setup()
    with pytest.raises(ValueError, match="teacher vocabulary"):
        fused_lm_kd_loss(h_s, t_head, tgt, h_s, s_head)  # teacher V smaller than student's
    with pytest.raises(ValueError, match="chunk_size"):
        fused_lm_kd_loss(h_s, s_head, tgt, chunk_size=0)
    with pytest.raises(ValueError, match="kd kind"):
        fused_lm_kd_loss(h_s, s_head, tgt, h_t, t_head, kind="kl")
    with pytest.raises(TypeError, match="lm_head"):
        fused_lm_kd_loss(h_s, torch.nn.ReLU(), tgt)


# ----------------------------------------------------------------------------- objective on the tiny pair


@pytest.fixture(scope="module")
def pair(tiny_models):
    torch.manual_seed(0)
    return load_vlm(tiny_models.student), load_vlm(tiny_models.teacher)


def _batch(model, t_len=90, n_img=64):
    from test_objective import _batch as make

    return make(model, t_len)


def test_captured_hidden_state_is_what_lm_head_consumes(pair):
    """The base-model output the objective takes, through lm_head, gives the model's own logits."""
    from distill.objective import _HiddenCapture

    batch = _batch(pair[0])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    for model in pair:
        cap = _HiddenCapture(model)
        with torch.no_grad():
            with cap.record():
                small = model(**inputs, logits_to_keep=1).logits
            h = cap.take()
            full = model(**inputs).logits
        assert small.shape[1] == 1 and h.shape == full.shape[:2] + (model.config.text_config.hidden_size,)
        torch.testing.assert_close(model.lm_head(h), full, rtol=1e-5, atol=1e-5)


def _old_objective(cfg, student, teacher, batch):
    """The objective before the fused path (commit 4d847d3): full logits, fp32 copies."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    s_logits = student(**inputs).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(**inputs).logits[:, :-1]
    tgt = batch["labels"][:, 1:]
    n = (tgt != -100).sum().clamp(min=1)
    v = s_logits.shape[-1]
    lm = F.cross_entropy(s_logits.float().reshape(-1, v), tgt.reshape(-1), ignore_index=-100, reduction="sum") / n
    kd = logit_kd_loss(s_logits, t_logits, tgt, cfg.kd_kind, cfg.kd_temperature, beta=cfg.kd_beta,
                       reduction="sum") / n
    return cfg.lm_weight * lm + cfg.kd_weight * kd, lm, kd


@pytest.mark.parametrize("kind,temp,beta", [("forward_kl", 1.0, 0.5), ("reverse_kl", 2.0, 0.5), ("jsd", 1.5, 0.3)])
def test_objective_equals_old_full_logits_objective(pair, kind, temp, beta):
    student0, teacher = pair
    s_new, s_old = copy.deepcopy(student0), copy.deepcopy(student0)
    cfg = LossConfig(lm_weight=0.8, kd_weight=1.2, kd_kind=kind, kd_temperature=temp, kd_beta=beta,
                     logits_chunk_size=7, backend="cpu_flash")
    batch = _batch(student0)
    batch["num_targets"] = int((batch["labels"][:, 1:] != -100).sum())
    out = DistillObjective(cfg, s_new, teacher)(s_new, teacher, batch)
    ref, ref_lm, ref_kd = _old_objective(cfg, s_old, teacher, batch)
    torch.testing.assert_close(out["lm"], ref_lm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["kd"], ref_kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-5, atol=1e-6)
    out["loss"].backward()
    ref.backward()
    new_g = {n: p.grad for n, p in s_new.named_parameters() if p.grad is not None}
    old_g = {n: p.grad for n, p in s_old.named_parameters() if p.grad is not None}
    assert new_g.keys() == old_g.keys() and "lm_head.weight" in new_g
    for name in new_g:
        torch.testing.assert_close(new_g[name], old_g[name], rtol=1e-4, atol=2e-6, msg=name)


class _Largest(TorchDispatchMode):
    """Largest tensor (numel) any op returns while active, and the most rows of any tensor whose
    last dimension is at least ``vocab`` (logits-like: rows x vocabulary), leaving out the
    ``[H, V]`` transposes of the lm_head weights (``weight_rows``: the hidden sizes)."""

    def __init__(self, vocab: int, weight_rows=()):
        super().__init__()
        self.vocab = vocab
        self.weight_rows = set(weight_rows)
        self.largest = 0
        self.vocab_rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                rows = t.numel() // t.shape[-1] if t.dim() and t.shape[-1] else 0
                if t.dim() and t.shape[-1] >= self.vocab and not (t.dim() == 2 and rows in self.weight_rows):
                    self.vocab_rows = max(self.vocab_rows, rows)
        return out


def test_objective_forms_no_full_logits(pair):
    """Forward and backward never make a tensor as large as [B, T, V]; the largest is one chunk."""
    student0, teacher = pair
    student = copy.deepcopy(student0)
    chunk = 8
    cfg = LossConfig(kd_weight=1.0, logits_chunk_size=chunk, backend="cpu_flash")
    obj = DistillObjective(cfg, student, teacher)
    batch = _batch(student0)
    b, t = batch["input_ids"].shape
    v_t = teacher.config.text_config.vocab_size
    v_s = student.config.text_config.vocab_size
    hidden = {student.config.text_config.hidden_size, teacher.config.text_config.hidden_size}
    n_rows = int((batch["labels"][:, 1:] != -100).sum())
    assert n_rows > chunk and n_rows not in hidden
    with _Largest(min(v_s, v_t), weight_rows=hidden) as mode:
        obj(student, teacher, batch)["loss"].backward()
    # vocabulary-wide tensors hold one chunk of rows (or the B rows of logits_to_keep=1), never the
    # labelled rows at once, let alone B*T; nothing reaches B*T*V
    assert 0 < mode.vocab_rows <= max(chunk, b) < n_rows, (mode.vocab_rows, chunk, n_rows)
    assert mode.largest < b * t * v_t // 2, (mode.largest, b * t * v_t)


def test_num_targets_count_is_checked(pair):
    student, teacher = pair
    obj = DistillObjective(LossConfig(kd_weight=1.0, backend="cpu_flash"), student, teacher)
    batch = _batch(student)
    n = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        a = obj(student, teacher, batch)
        b = obj(student, teacher, dict(batch, num_targets=n))
        assert a["loss"] == b["loss"]
        with pytest.raises(RuntimeError):
            obj(student, teacher, dict(batch, num_targets=n - 1))


def test_collate_counts_shifted_labelled_positions():
    from distill.data.collate import collate
    from distill.data.encode import Encoded

    def enc(ids, labels):
        return Encoded(input_ids=torch.tensor(ids), labels=torch.tensor(labels), pixel_values=None)

    a = enc([5, 6, 7, 8], [5, -100, 7, 8])  # shifted: [-100, 7, 8] -> 2
    b = enc([5, 6], [5, 6])  # shifted: [6] -> 1 (padding adds -100)
    out = collate([a, b], pad_token_id=0, image_token_id=1)
    assert out["num_targets"] == 3 == int((out["labels"][:, 1:] != -100).sum())


def test_no_grad_mode_gives_values_only():
    h_s, s_head, h_t, t_head, tgt = _setup()
    with torch.no_grad():
        loss, lm, kd = fused_lm_kd_loss(h_s, s_head, tgt, h_t, t_head, chunk_size=8)
    ref, ref_lm, ref_kd = _plain(h_s, s_head, h_t, t_head, tgt, "forward_kl", 1.0, 0.5, 1.0, 1.0)
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), ref.double().detach(), rtol=1e-5, atol=1e-5)
