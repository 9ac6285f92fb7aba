"""A small causal language model whose token mixer is any registered attention method.

Trained tasks (MQAR, and later LRA and perplexity) need one model recipe so
that a quality difference is the mixer's and nothing else's. Zoology's and
Based's synthetic models are this shape: embedding (+ learned positions),
n pre-norm blocks of [optional short conv] -> mixer -> [optional MLP], a final
norm and a tied-free LM head. The mixer gets q, k, v of shape (batch, heads,
seq, head_dim) from one linear projection and its output goes through an
output projection, so a method only has to be an `Attention`.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from methods import build, get_impl
from methods.base import Attention, Unsupported

POSITIONS = ("learned", "none")


@dataclass
class ModelConfig:
    vocab: int
    max_len: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 1
    mlp_ratio: int = 0  # 0: no MLP (Zoology's MQAR models); else hidden = mlp_ratio * d_model
    positions: str = "learned"  # learned | none
    conv_kernel: int = 0  # 0: no short conv; 3-4: the depthwise causal conv of Zoology/Based hybrids
    method: str = "softmax"
    impl: str = "reference"
    method_params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.positions not in POSITIONS:
            raise ValueError(f"unknown positions {self.positions!r}; choose from: {', '.join(POSITIONS)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def as_dict(self) -> dict:
        return asdict(self)


def build_mixer(cfg: ModelConfig) -> Attention:
    """One layer's attention, checked for a backward pass (training needs gradients through it).

    Methods whose parameters are created lazily on the first call (Based's and
    Performer's projections, DeltaNet's beta) get `head_dim` up front, so the
    optimizer sees them.
    """
    spec = get_impl(cfg.method, cfg.impl)
    if not spec.capabilities.backward:
        note = f" ({spec.capabilities.note})" if spec.capabilities.note else ""
        raise Unsupported(f"{cfg.method}/{cfg.impl} has no backward, so it cannot be trained{note}")
    params = dict(cfg.method_params)
    if "head_dim" in inspect.signature(spec.factory).parameters and params.get("head_dim") is None:
        params["head_dim"] = cfg.head_dim
    return build(cfg.method, impl=cfg.impl, **params)


class ShortConv(nn.Module):
    """Depthwise causal convolution over the sequence: each channel sees its last `kernel` tokens."""

    def __init__(self, d_model: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(d_model, d_model, kernel, groups=d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        x = F.pad(x.transpose(1, 2), (self.kernel - 1, 0))  # left pad only: no peeking ahead
        return self.conv(x).transpose(1, 2)


class MixerLayer(nn.Module):
    """Linear q, k, v -> the method (causal) -> output projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.attn = build_mixer(cfg)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = self.attn(q, k, v, causal=True)  # (B, H, N, hd)
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    """Pre-norm residual block: [short conv] -> mixer -> [MLP]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.conv = ShortConv(cfg.d_model, cfg.conv_kernel) if cfg.conv_kernel > 0 else None
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.mixer = MixerLayer(cfg)
        self.mlp = None
        if cfg.mlp_ratio > 0:
            hidden = cfg.mlp_ratio * cfg.d_model
            self.norm2 = nn.LayerNorm(cfg.d_model)
            self.mlp = nn.Sequential(nn.Linear(cfg.d_model, hidden), nn.GELU(), nn.Linear(hidden, cfg.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if self.conv is not None:
            h = self.conv(h)
        x = x + self.mixer(h)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


class TinyLM(nn.Module):
    """Token (+ position) embedding, blocks, final norm, LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model) if cfg.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states (B, N, D); the head is applied separately so a loss can pick positions."""
        n = tokens.shape[1]
        if n > self.cfg.max_len:
            raise ValueError(f"sequence of {n} tokens is longer than max_len {self.cfg.max_len}")
        x = self.tok(tokens)
        if self.pos is not None:
            x = x + self.pos(torch.arange(n, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, N, vocab)."""
        return self.head(self.hidden(tokens))

    def labelled_logits(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets at the labelled positions only (label != -100).

        Recall tasks label a few positions per sequence; running the head there
        alone saves most of its cost at a large vocabulary.
        """
        mask = labels != -100
        return self.head(self.hidden(tokens)[mask]), labels[mask]

    def mixers(self) -> list[Attention]:
        return [block.mixer.attn for block in self.blocks]

    def state_bytes(self, context: int, dtype: torch.dtype = torch.float32) -> int:
        """The decoder state of every mixer at `context` tokens, batch 1 (Based's recall-vs-state x axis)."""
        cfg = self.cfg
        return int(sum(m.state_bytes(1, cfg.n_heads, context, cfg.head_dim, dtype) for m in self.mixers()))
