"""flash-attn detection by capability: stub packages on sys.path that mimic each layout (FA2
``flash_attn``, FA3 ``flash_attn_interface``, FA4 ``flash_attn.cute`` without a top-level
``flash_attn/__init__.py``, and a namespace ``flash_attn`` with nothing callable). The stubs compute
plain attention on CPU in flash-attn's (B, T, H, D) layout, so the call convention and the LSE
handling of each version are checked against the eager reference too."""
import sys
import textwrap

import pytest
import torch

from distill.attention import kernels as K

_EAGER = '''
import torch


def _attn(q, k, v, softmax_scale, causal):
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    k = k.repeat_interleave(g, dim=2)
    v = v.repeat_interleave(g, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q.float(), k.float()) * softmax_scale
    if causal:
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), v.float()).to(q.dtype)
    return out, lse
'''

LAYOUTS = {
    "fa2": {"flash_attn/__init__.py": _EAGER + '''
def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    return_attn_probs=False):
    out, lse = _attn(q, k, v, softmax_scale, causal)
    return (out, lse, None) if return_attn_probs else out
'''},
    "fa3": {"flash_attn_interface.py": _EAGER + '''
def flash_attn_func(q, k, v, softmax_scale=None, causal=False, return_attn_probs=False):
    out, lse = _attn(q, k, v, softmax_scale, causal)
    return (out, lse) if return_attn_probs else out
'''},
    "fa4": {"flash_attn/cute/__init__.py": _EAGER + '''
def flash_attn_func(q, k, v, qv=None, softmax_scale=None, causal=False, return_lse=False):
    out, lse = _attn(q, k, v, softmax_scale, causal)
    return out, (lse if return_lse else None)
'''},
    "namespace": {"flash_attn/cute/README": "nothing importable with a flash_attn_func\n"},
}


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """Install stub layouts by name; returns a function(names...) that makes them importable."""
    def install(*names):
        for name in names:
            for rel, text in LAYOUTS[name].items():
                f = tmp_path / rel
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(textwrap.dedent(text))
        monkeypatch.syspath_prepend(str(tmp_path))
        for mod in [m for m in sys.modules if m == "flash_attn_interface" or m.split(".")[0] == "flash_attn"]:
            monkeypatch.delitem(sys.modules, mod)
        K.flash_attn_variants.cache_clear()
        K._flash_variant.cache_clear()
    yield install
    K.flash_attn_variants.cache_clear()
    K._flash_variant.cache_clear()


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend a CUDA device of a given compute capability (only the capability query is faked)."""
    def set_major(major):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
        K._flash_variant.cache_clear()
    return set_major


CUDA = torch.device("cuda")


def test_namespace_flash_attn_is_not_fa2(layout, fake_gpu):
    layout("namespace")
    assert K.flash_attn_variants() == ()
    fake_gpu(9)
    assert K.resolve_backend("auto", CUDA, torch.bfloat16, 128) == "sdpa_flash"
    with pytest.raises(ValueError, match="no usable flash-attn.*pip install flash-attn-4"):
        K.resolve_backend("flash_attn", CUDA, torch.bfloat16, 128)


@pytest.mark.parametrize("name,version", [("fa2", 2), ("fa3", 3), ("fa4", 4)])
def test_each_layout_is_detected(layout, fake_gpu, name, version):
    layout(name)
    assert [v.version for v in K.flash_attn_variants()] == [version]
    fake_gpu(9)
    assert K.resolve_backend("auto", CUDA, torch.bfloat16, 128) == "flash_attn"
    assert K.resolve_backend("auto", CUDA, torch.float32, 128) == "sdpa_efficient"  # flash-attn is 16-bit only


def test_preference_and_capability(layout, fake_gpu):
    layout("fa2", "fa3", "fa4")
    assert [v.version for v in K.flash_attn_variants()] == [3, 4, 2]
    fake_gpu(9)  # Hopper: FA3 first
    assert K._flash_variant(CUDA, torch.bfloat16, 128)[0].version == 3
    fake_gpu(10)  # Blackwell: only FA4 runs there
    assert K._flash_variant(CUDA, torch.bfloat16, 128)[0].version == 4
    assert K.resolve_backend("auto", CUDA, torch.bfloat16, 256) == "sdpa_flash"  # FA4 on sm100: head dim <= 128
    with pytest.raises(ValueError, match=r"FA4 \(flash_attn.cute\) head dim 256 unsupported"):
        K.resolve_backend("flash_attn", CUDA, torch.bfloat16, 256)
    fake_gpu(8)  # Ampere: FA2
    assert K._flash_variant(CUDA, torch.float16, 64)[0].version == 2
    fake_gpu(7)
    assert K.resolve_backend("auto", CUDA, torch.float16, 64) == "sdpa_flash"
    with pytest.raises(ValueError, match="compute capability 7"):
        K.resolve_backend("flash_attn", CUDA, torch.float16, 64)


@pytest.mark.parametrize("name", ["fa2", "fa3", "fa4"])
def test_call_convention_and_lse_match_eager(layout, monkeypatch, name):
    """``_flash_attn`` passes each version its arguments and returns out [B,T,Hq,D] and the LSE in
    our convention (checked on CPU through the stubs: only the device check is bypassed)."""
    layout(name)
    monkeypatch.setattr(K.FlashVariant, "supports", lambda self, device, dtype, head_dim: None)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64)
    out, lse = K._flash_attn(q, k, v, 0.4, True)
    ref_out, ref_lse = K._eager(q, k, v, 0.4, True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)  # the stubs accumulate in fp32
    torch.testing.assert_close(K._normalise_lse(lse), ref_lse.float(), atol=1e-5, rtol=1e-5)


def test_lse_normalisation_marks_empty_rows_plus_inf():
    lse = torch.tensor([[[0.5, float("-inf"), float("nan")]]])
    assert K._normalise_lse(lse).tolist() == [[[0.5, float("inf"), float("inf")]]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs in the GPU check)")
def test_real_flash_attn_matches_eager_on_cuda():
    variants = K.flash_attn_variants()
    if not variants:
        pytest.skip("no flash-attn installed on this CUDA machine")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 300, 128, generator=g).cuda().bfloat16().requires_grad_()
    k = torch.randn(2, 2, 300, 128, generator=g).cuda().bfloat16().requires_grad_()
    v = torch.randn(2, 2, 300, 128, generator=g).cuda().bfloat16().requires_grad_()
    out, lse = K.attention_with_lse(q, k, v, scale=0.09, backend="flash_attn")
    ref_out, ref_lse = K.attention_with_lse(q.double(), k.double(), v.double(), scale=0.09, backend="eager")
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=2e-2)
    w = torch.randn(out.shape, generator=g).cuda()
    for a, b in zip(torch.autograd.grad((out.float() * w).sum(), (q, k, v)),
                    torch.autograd.grad((ref_out * w.double()).sum(), (q, k, v))):
        torch.testing.assert_close(a.double(), b, atol=5e-2, rtol=5e-2)
