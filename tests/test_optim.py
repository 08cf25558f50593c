"""Our AdamW (one formula, both backends) equals torch.optim.AdamW; clipping equals torch's."""

import mlx.core as mx
import numpy as np
import torch

from twintune.backends.base import clip_factor
from twintune.optimizers import adamw_update


def test_adamw_matches_torch_on_both_array_types():
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(5, 7)).astype(np.float32)
    grads = [rng.normal(size=(5, 7)).astype(np.float32) * 10 ** -i for i in range(6)]
    lrs = [1e-3, 2e-3, 5e-4, 1e-3, 3e-3, 1e-4]
    kw = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    ref = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = torch.optim.AdamW([ref], lr=1e-3, foreach=False, **kw)
    for g, lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = lr
        ref.grad = torch.from_numpy(g)
        opt.step()

    for lib, to, sqrt in ((torch, torch.from_numpy, torch.sqrt), (mx, mx.array, mx.sqrt)):
        p, m, v = to(p0.copy()), to(np.zeros_like(p0)), to(np.zeros_like(p0))
        for step, (g, lr) in enumerate(zip(grads, lrs), start=1):
            p, m, v = adamw_update(p, to(g), m, v, step, lr, sqrt=sqrt, **kw)
        assert np.allclose(np.array(p), ref.detach().numpy(), rtol=1e-6, atol=1e-7), lib.__name__


def test_clip_factor_matches_torch():
    g = torch.ones(10) * 3.0
    p = torch.nn.Parameter(torch.zeros(10))
    p.grad = g.clone()
    norm = torch.nn.utils.clip_grad_norm_([p], max_norm=1.0).item()
    assert np.allclose(p.grad.numpy(), g.numpy() * clip_factor(norm, 1.0))
    assert clip_factor(0.5, 1.0) == 1.0
    assert clip_factor(5.0, 0.0) == 1.0


def test_torch_in_place_adamw_gives_the_shared_formulas_bits():
    import torch

    from twintune.backends.torch.backend import adamw_update_

    rng = np.random.default_rng(3)
    for dtype in (torch.float32, torch.float64):
        p, g, m, v = (torch.from_numpy(rng.normal(size=(37, 19))).to(dtype) for _ in range(4))
        v = v.abs()
        kw = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        for factor in (1.0, 0.37):  # the clipping factor, applied to the gradient in place first
            expected = adamw_update(p.clone(), g * factor, m.clone(), v.clone(), 3, 2e-3, sqrt=torch.sqrt, **kw)
            for chunk in (100, 37 * 19, 2**20):  # chunks that split rows, the whole array, and more
                got = [t.clone() for t in (p, g, m, v)]
                adamw_update_(*got, 3, 2e-3, grad_factor=factor, chunk=chunk, **kw)
                for value, want in zip((got[0], got[2], got[3]), expected):
                    assert torch.equal(value, want), (factor, chunk)
                assert torch.equal(got[1], g * factor)


def test_torch_in_place_adamw_takes_strided_arrays():
    """A gradient can come strided (LoReFT's rotation is used transposed); so can a parameter."""
    from twintune.backends.torch.backend import adamw_update_

    rng = np.random.default_rng(4)
    p, g, m, v = (torch.from_numpy(rng.normal(size=(19, 37)).astype(np.float32)) for _ in range(4))
    v = v.abs()
    kw = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    expected = adamw_update(p.clone(), g * 0.5, m.clone(), v.clone(), 3, 2e-3, sqrt=torch.sqrt, **kw)
    got = [p.clone(), g.T.contiguous().T, m.clone(), v.clone()]  # the gradient strided
    adamw_update_(*got, 3, 2e-3, grad_factor=0.5, chunk=100, **kw)
    for value, want in zip((got[0], got[2], got[3]), expected):
        assert torch.equal(value, want)
    got = [t.T.contiguous().T for t in (p, g, m, v)]  # every array strided: the whole arrays at once
    adamw_update_(*got, 3, 2e-3, grad_factor=0.5, chunk=100, **kw)
    for value, want in zip((got[0], got[2], got[3]), expected):
        assert torch.equal(value, want)
