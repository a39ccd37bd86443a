"""The single-device models: shapes, gradients, document masking, presets, FLOP count, optimizer groups."""

import math

import pytest
import torch

from foxdist.config import ModelConfig, model_dims
from foxdist.model import FoxLM, document_cu_seqlens, preset
from foxdist.optim import lr_at, param_groups
from foxdist.config import ScheduleConfig

PRO = dict(token_shift=True, qk_norm=True, output_gate=True, output_norm=True)
PLAIN = dict(token_shift=False, qk_norm=False, output_gate=False, output_norm=False)


@pytest.mark.parametrize("arch,opts", [("fox", PRO), ("fox", PLAIN), ("transformer", PLAIN)])
def test_forward_backward(arch, opts):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, **opts)
    m = FoxLM(cfg).double()
    tok = torch.randint(0, 257, (3, 37))
    logits = m(tok)
    assert logits.shape == (3, 37, model_dims(cfg).padded_vocab) and logits.dtype == torch.float64
    loss = m(tok[:, :-1], tok[:, 1:])
    assert abs(loss.item() - math.log(320)) < 0.2  # near-uniform at init over the padded vocab
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_causality_and_token_shift_prefix():
    """Changing token t never changes outputs before t (token shift included)."""
    torch.manual_seed(1)
    m = FoxLM(ModelConfig(d_model=32, n_layers=2, n_heads=2, **PRO)).double()
    tok = torch.randint(0, 257, (1, 20))
    tok2 = tok.clone()
    tok2[0, 12] = (tok[0, 12] + 1) % 257
    a, b = m(tok), m(tok2)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-6


@pytest.mark.parametrize("arch", ["fox", "transformer"])
def test_document_masking_equals_separate_documents(arch):
    torch.manual_seed(2)
    opts = PRO if arch == "fox" else PLAIN
    m = FoxLM(ModelConfig(arch=arch, d_model=32, n_layers=2, n_heads=2, token_shift=False, **{k: v for k, v in opts.items() if k != "token_shift"})).double()
    eos = 256
    tok = torch.randint(0, 200, (2, 24))
    tok[0, 9] = eos
    tok[1, 15] = eos
    cu = document_cu_seqlens(tok, eos)
    assert cu.tolist() == [0, 10, 24, 40, 48]
    out = m(tok, cu_seqlens=cu)
    for r, s, e in [(0, 0, 10), (0, 10, 24), (1, 0, 16), (1, 16, 24)]:
        alone = m(tok[r:r + 1, s:e])
        # RoPE is relative, so a document's offset in the row cancels up to its fp32 angle tables
        torch.testing.assert_close(out[r:r + 1, s:e], alone, rtol=0, atol=1e-10 if arch == "fox" else 1e-6)


def test_acp_in_model_uses_qknorm_bound():
    torch.manual_seed(3)
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, **PRO)
    dense = FoxLM(cfg).double()
    pruned = FoxLM(cfg, acp_eps=math.exp(-10)).double()
    pruned.load_state_dict(dense.state_dict())
    with torch.no_grad():  # make one head forget fast so there is something to prune
        for m in (dense, pruned):
            m.blocks[0].attn.fgate_proj.bias.copy_(torch.tensor([-6.0, 8.0]))
    tok = torch.randint(0, 257, (1, 400))
    a, b = dense(tok), pruned(tok)
    assert pruned.acp_stats.tiles_pruned > 0
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_presets_match_paper_sizes():
    for name, nominal in [("fox-pro-125m", 125e6), ("fox-pro-360m", 360e6), ("fox-pro-760m", 760e6)]:
        with torch.device("meta"):
            m = FoxLM(preset(name))
        n = m.num_params(embedding=False)
        assert abs(n - nominal) / nominal < 0.02, (name, n)
    c = preset("fox-pro-760m")
    assert (c.n_layers, c.d_model, c.n_heads, model_dims(c).head_dim) == (24, 1536, 24, 64)
    with pytest.raises(ValueError, match="valid presets"):
        preset("fox-pro-7b")


def test_flops_per_token_counts_attention():
    with torch.device("meta"):
        m = FoxLM(preset("fox-pro-760m"))
    linear = sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2 and "norm" not in n and "embed" not in n)
    f = m.flops_per_token(16384)
    assert f == 3 * (2 * linear + 24 * 2 * 16384 * 24 * 64)


def test_no_weight_decay_on_norms_and_biases():
    m = FoxLM(ModelConfig(d_model=32, n_layers=1, n_heads=2, **PRO))
    decay, plain = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert "blocks.0.attn.fgate_proj.bias" in plain_names and "blocks.0.attn.q_norm.weight" in plain_names
    assert "blocks.0.attn.fgate_proj.weight" not in plain_names
    assert all(not names[id(p)].endswith("bias") and "norm" not in names[id(p)] for p in decay["params"])


def test_schedules():
    s = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, 1.0, s) == pytest.approx(0.1) and lr_at(9, 100, 1.0, s) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, s) == pytest.approx(0.1) and lr_at(55, 100, 1.0, s) == pytest.approx(0.55)
    w = ScheduleConfig(kind="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_at(50, 100, 1.0, w) == 1.0 and lr_at(79, 100, 1.0, w) == 1.0 and lr_at(99, 100, 1.0, w) == pytest.approx(0.0)


def test_activation_checkpointing_same_loss_and_grads():
    torch.manual_seed(4)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, **PRO)
    a = FoxLM(cfg).double()
    cfg_ckpt = ModelConfig(d_model=32, n_layers=2, n_heads=2, activation_checkpointing=True, **PRO)
    b = FoxLM(cfg_ckpt).double()
    b.load_state_dict(a.state_dict())
    tok = torch.randint(0, 257, (2, 33))
    la, lb = a(tok[:, :-1], tok[:, 1:]), b(tok[:, :-1], tok[:, 1:])
    la.backward()
    lb.backward()
    assert la.item() == lb.item()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=0, atol=1e-13, msg=n)


def test_compiled_blocks_match_eager():
    """``train.compile``: torch.compile around each block (attention excluded) computes the same loss."""
    torch.manual_seed(5)
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, **PRO)
    eager = FoxLM(cfg)
    compiled = FoxLM(cfg)
    compiled.load_state_dict(eager.state_dict())
    for blk in compiled.blocks:
        blk.compile()
    tok = torch.randint(0, 257, (1, 40))
    a, b = eager(tok[:, :-1], tok[:, 1:]), compiled(tok[:, :-1], tok[:, 1:])
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for pa, pb in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6)
