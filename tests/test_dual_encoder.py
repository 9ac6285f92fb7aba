"""The two-tower retrieval model: one shared body, LRA's [u, v, u*v, u-v] combination, pair layouts the
trainer can slice unchanged, and it learns a tiny pair task through `tasks.trainer` in seconds."""

from __future__ import annotations

import pytest
import torch
from helpers import attention_factory

from tasks.model import DualEncoderClassifier, MixerModel, ModelConfig
from tasks.trainer import TrainConfig, Trainer


def tiny(seed: int = 0, **kw) -> DualEncoderClassifier:
    torch.manual_seed(seed)
    base = dict(vocab=9, max_len=8, d_model=32, n_layers=1, n_heads=2, causal=False, head="classify",
                n_classes=2, pooling="cls", mlp_ratio=2)
    return DualEncoderClassifier(ModelConfig(**{**base, **kw}), attention_factory("softmax"))


def pairs(n: int, seed: int, length: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 2, L) pairs of tokens 1-8; label 1 when both documents start with the same token (half do)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 9, (n, 2, length), generator=gen)
    same = torch.rand(n, generator=gen) < 0.5
    x[same, 1, 0] = x[same, 0, 0]
    return x, (x[:, 0, 0] == x[:, 1, 0]).long()


def test_logits_shape_and_every_layout_agrees():
    model = tiny().eval()
    x, _ = pairs(5, seed=0)
    logits = model(x)
    assert logits.shape == (5, 2)
    assert torch.allclose(model(torch.cat([x[:, 0], x[:, 1]], dim=1)), logits, atol=1e-6)  # (B, 2L)
    assert torch.allclose(model((x[:, 0], x[:, 1])), logits, atol=1e-6)  # a pair
    with pytest.raises(ValueError, match="pair batch"):
        model(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="causal=False"):
        tiny(causal=True, pooling="mean")


def test_one_body_shared_by_both_towers():
    model = tiny(pooling="mean", pad_id=0).eval()
    assert sum(isinstance(m, MixerModel) for m in model.modules()) == 1
    assert isinstance(model.body.head.proj, torch.nn.Identity)  # the body pools, holds no unused classifier
    d, hidden = 32, 64
    mlp = 4 * d * hidden + hidden + hidden * 2 + 2
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in model.body.parameters()) + mlp
    x, _ = pairs(4, seed=1)
    u, v = model.encode(x[:, 0]), model.encode(x[:, 1])
    swapped = model.classifier(torch.cat([v, u, v * u, v - u], dim=-1))
    assert torch.allclose(model(x.flip(1)), swapped, atol=1e-5)  # swapping documents swaps u and v only
    x[:, 1] = x[:, 0]
    out = model.encode(torch.cat([x[:, 0], x[:, 1]]))
    assert torch.allclose(out[:4], out[4:])  # the same document encodes the same in either tower
    model.train()
    model(x).sum().backward()
    assert model.body.tok.weight.grad is not None  # both towers train the one embedding


def test_learns_a_pair_task_with_the_trainer():
    x, y = pairs(512, seed=2)
    xv, yv = pairs(256, seed=3)
    model = tiny(seed=0)
    cfg = TrainConfig(lr=3e-3, steps=150, batch_size=32, eval_every=50, seed=0, progress=False, weight_decay=0.0)
    result = Trainer(cfg).fit(model, (x, y), (xv, yv))
    majority = max(float(yv.float().mean()), 1 - float(yv.float().mean()))
    assert result.best["accuracy"] > majority + 0.2, (result.best, majority)
