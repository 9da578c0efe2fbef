"""Fused capture on real HF architectures vs eager attention with output_attentions."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import distill.attention.capture as capture_mod
from distill.attention import AttentionCapture, install

T, N = 40, 9


def _llama():
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, attention_dropout=0.0,
    )
    return LlamaForCausalLM(cfg)


def _qwen2():
    cfg = Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=4096, attention_dropout=0.0,
    )
    return Qwen2ForCausalLM(cfg)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, 30:] = 0  # right padding
    mask[2, 25:] = 0
    vis = torch.stack([torch.arange(2, 2 + N), torch.arange(15, 15 + N), torch.arange(N)])  # sample 2: no image
    valid = torch.tensor([True, True, False])
    return ids, mask, vis, valid


def _eager_maps(model, ids, mask, vis, layers):
    out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    maps = []
    for i in layers:
        a = out.attentions[i].mean(1)  # (B, T, T) head-averaged
        b = a.shape[0]
        rows = a.gather(1, vis[:, :, None].expand(b, N, a.shape[2]))
        maps.append(rows.gather(2, vis[:, None, :].expand(b, N, N)))
    return torch.stack(maps)  # (L, B, n, n)


def _weights():
    return torch.randn(2, 3, N, N, generator=torch.Generator().manual_seed(5))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("make", [_llama, _qwen2])
@pytest.mark.parametrize("backend,key_len", [("cpu_flash", None), ("cpu_flash", 15 + N)]
                         + ([("auto", None)] if torch.cuda.is_available() else []))
def test_capture_matches_eager(make, backend, key_len):
    torch.manual_seed(0)
    model = make().float()
    ref = copy.deepcopy(model)
    ref.config._attn_implementation = "eager"
    ids, mask, vis, valid = _batch()
    layers = [2, 0]
    w = _weights()

    ref_maps = _eager_maps(ref, ids, mask, vis, layers)
    (ref_maps * w).sum().backward()

    install(model, backend=backend)
    cap = AttentionCapture(model, layers, chunk_size=4, impl="torch" if key_len else "auto")
    with cap.record(vis, valid, key_len=key_len) as rec:  # key_len: the last visual position + 1
        out = model(input_ids=ids, attention_mask=mask)
    maps = rec.maps
    assert maps.shape == (2, 3, N, N)
    torch.testing.assert_close(maps, ref_maps, atol=2e-6, rtol=1e-5)
    (maps * w).sum().backward()
    g, rg = _grads(model), _grads(ref)
    assert g.keys() == rg.keys() and len(g) > 0
    for name in g:
        torch.testing.assert_close(g[name], rg[name], atol=1e-5, rtol=1e-4, msg=name)
    # logits of valid positions equal the eager model's
    ref_logits = ref(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(out.logits[keep], ref_logits[keep], atol=1e-5, rtol=1e-5)


def test_checkpointing_recompute_collects_once(monkeypatch):
    torch.manual_seed(0)
    base = _llama()
    ids, mask, vis, valid = _batch()
    w = _weights()
    calls = []
    real = capture_mod.visual_attention_probs

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(capture_mod, "visual_attention_probs", counting)
    results = []
    # backward after the record block closed, and inside it (a recompute with the session open)
    for ckpt, inside in ((False, False), (True, False), (True, True)):
        model = copy.deepcopy(base)
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        install(model, "cpu_flash")
        cap = AttentionCapture(model, [1, 2])
        calls.clear()
        with cap.record(vis, valid) as rec:
            out = model(input_ids=ids, attention_mask=mask)
            maps = rec.maps
            loss = (maps * w).sum() + out.logits.float().square().mean()
            if inside:
                loss.backward()
        if not inside:
            loss.backward()  # outside the record block: the recompute must still run the capture ops
        assert len(calls) == (4 if ckpt else 2)  # checkpoint recompute re-ran the capture path
        assert rec.maps is maps and len(rec._session.maps) == 0  # the recompute delivered nothing new
        results.append((maps.detach(), _grads(model)))
    (m0, g0), *rest = results
    for m1, g1 in rest:
        torch.testing.assert_close(m0, m1)
        for name in g0:
            torch.testing.assert_close(g0[name], g1[name], atol=1e-6, rtol=1e-5, msg=name)


def test_no_capture_outside_record_and_errors():
    model = _llama()
    with pytest.raises(ValueError, match="impl"):
        AttentionCapture(model, [0], impl="cuda_magic")
    ids, mask, vis, valid = _batch()
    cap = AttentionCapture(model, [0])
    with pytest.raises(RuntimeError, match="install"):
        with cap.record(vis, valid):
            pass
    install(model, "cpu_flash")
    with cap.record(vis, valid) as rec:
        pass
    with pytest.raises(RuntimeError, match="no visual attention was captured"):
        rec.maps
    with pytest.raises(ValueError, match="capture layers"):
        AttentionCapture(model, [3])
    left = torch.ones(3, T, dtype=torch.long)
    left[1, :5] = 0  # left padding
    with pytest.raises(ValueError, match="right-pad"):
        with cap.record(vis, valid):
            model(input_ids=ids, attention_mask=left)


def test_general_mask_path_matches_eager_without_capture():
    """Left padding (generation-style) falls back to an explicit mask and stays exact."""
    torch.manual_seed(0)
    model = _qwen2()
    ref = copy.deepcopy(model)
    ref.config._attn_implementation = "eager"
    install(model, "cpu_flash")
    ids = torch.randint(0, 97, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0
    keep = mask.bool()
    a = model(input_ids=ids, attention_mask=mask).logits[keep]
    b = ref(input_ids=ids, attention_mask=mask).logits[keep]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class _NoSquareAlloc(TorchDispatchMode):
    """Fails on any op producing a tensor with T*T or more elements."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if t.numel() >= self.limit:
                    raise AssertionError(f"{func} produced {tuple(t.shape)} (>= T*T elements)")
        return out


@pytest.mark.parametrize("backend", ["cpu_flash", "eager"])
def test_no_txt_allocation(backend):
    long_t, n = 4096, 64
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=long_t,
    )
    model = LlamaForCausalLM(cfg)
    install(model, backend)
    cap = AttentionCapture(model, [0, 1], chunk_size=16)
    ids = torch.randint(0, 64, (1, long_t))
    vis = torch.arange(100, 100 + n)[None]
    guard = _NoSquareAlloc(long_t * long_t)
    if backend == "eager":  # the guard is real: the reference backend does build T x T scores
        with pytest.raises(AssertionError, match="T\\*T"), guard:
            model(input_ids=ids)
        return
    with guard:
        with cap.record(vis) as rec:
            out = model(input_ids=ids, logits_to_keep=1)
        (rec.maps.sum() + out.logits.sum()).backward()
    assert guard.largest < long_t * long_t // 8
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_right_padded_declaration_skips_the_mask_sync_and_changes_nothing():
    """Under ``right_padded()`` the model forward reads no tensor value on the host (the padding
    check is what synced); the logits equal those of the checked path."""
    from _host_reads import HostReads

    from distill.attention import right_padded

    torch.manual_seed(0)
    model = _llama().eval()
    install(model, "cpu_flash")
    ids, mask, _, _ = _batch()
    with torch.no_grad():
        with HostReads() as checked:
            ref = model(input_ids=ids, attention_mask=mask).logits
        with right_padded(), HostReads() as declared:
            out = model(input_ids=ids, attention_mask=mask).logits
    assert checked.n > 0  # the check does read the mask on the host
    assert declared.n == 0
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
