"""One small sequence model whose token mixer is the cell's attention method, with a pluggable head.

Trained tasks (MQAR now, LRA and perplexity next) share one model recipe so
that a quality difference between two rows is the mixer's and nothing else's.
Zoology's and Based's synthetic models and LRA's small encoders are all this
shape: token embedding (+ learned positions), `n_layers` pre-norm blocks of
[optional short conv] -> mixer -> [optional MLP], a final norm, and a head:

- `head="lm"`: next-token logits at every position (`LMHead`). MQAR reads them
  at its labelled positions only.
- `head="classify"`: one label per sequence from pooled hidden states
  (`PooledClassifierHead`): `pooling="mean"` over the tokens (ignoring `pad_id`
  when one is set) or `pooling="cls"`, the first token's state (the task puts
  a CLS token there), as LRA's encoders do.

The mixer gets q, k, v of shape (batch, heads, seq, head_dim) from one linear
projection and its output goes through an output projection, so a method only
has to be an `Attention`. `causal` is passed to every mixer call: a language
model is causal, LRA's encoders are bidirectional (`causal=False`).

The model never builds a method itself: it takes the runner's factory
(`make_attention()`, one call per layer), so the cell's method, implementation
and parameters are exactly those the row names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Attention, Capabilities, Unsupported
from tasks.base import AttentionFactory, RunContext

POSITIONS = ("learned", "none")
HEADS = ("lm", "classify")
POOLINGS = ("mean", "cls")
INITS = ("default", "gpt2")
IGNORE_INDEX = -100  # a label that is not a target (torch's cross-entropy default)
TRAIN_DTYPE = "float32"  # trained tasks train in float32; the mixer must support it


@dataclass
class ModelConfig:
    vocab: int
    max_len: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 1
    mlp_ratio: int = 0  # 0: no MLP (Zoology's MQAR models); else hidden = mlp_ratio * d_model
    positions: str = "learned"  # learned | none
    conv_kernel: int = 0  # 0: no short conv; 3-4: the depthwise conv of Zoology/Based hybrids
    causal: bool = True  # False: a bidirectional encoder (LRA); the mixer and the short conv see both sides
    head: str = "lm"  # lm | classify
    n_classes: int = 0  # classify only
    pooling: str = "mean"  # classify only: mean | cls
    pad_id: int | None = None  # classify + mean only: tokens with this id are left out of the mean
    # nanoGPT's knobs (the `lm` task sets them; the defaults leave the other tasks' models as they were):
    dropout: float = 0.0  # after the embedding and on each residual branch (not inside the method)
    bias: bool = True  # biases in the linear layers and LayerNorms (nanoGPT: False)
    tie_embeddings: bool = False  # lm head: the output projection is the token embedding (nanoGPT: True)
    init: str = "default"  # default (PyTorch's) | gpt2: N(0, 0.02), residual projections / sqrt(2 n_layers)

    def __post_init__(self) -> None:
        for key in ("vocab", "max_len", "d_model", "n_layers", "n_heads"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.mlp_ratio < 0 or self.conv_kernel < 0:
            raise ValueError(f"mlp_ratio and conv_kernel must be >= 0, got {self.mlp_ratio}, {self.conv_kernel}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; choose from: {', '.join(INITS)}")
        if self.tie_embeddings and self.head != "lm":
            raise ValueError("tie_embeddings needs head='lm' (the output projection is over the vocabulary)")
        if self.positions not in POSITIONS:
            raise ValueError(f"unknown positions {self.positions!r}; choose from: {', '.join(POSITIONS)}")
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; choose from: {', '.join(HEADS)}")
        if self.head == "classify":
            if self.n_classes < 2:
                raise ValueError(f"a classify head needs n_classes >= 2, got {self.n_classes}")
            if self.pooling not in POOLINGS:
                raise ValueError(f"unknown pooling {self.pooling!r}; choose from: {', '.join(POOLINGS)}")
            if self.pooling == "cls" and self.causal:
                # Under a causal mask the first token sees only itself: its state says nothing about the sequence.
                raise ValueError("pooling='cls' needs causal=False (a causal first token sees only itself)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def as_dict(self) -> dict:
        return asdict(self)


def forward_latency(model: nn.Module, batch: torch.Tensor, ctx: RunContext) -> dict:
    """Latency columns of the trained model's forward pass on one batch (the cost axis of a trained task's
    Pareto plot), in eval mode and without autograd, as a user would run it."""
    from bench.measure.checks import measure_call  # the measurement layer, only when a cell measures

    model.eval()
    batch = batch.to(ctx.device)
    timed = measure_call(torch.no_grad()(lambda: model(batch)), ctx.device, ctx.timing, measure_memory=False)
    return {k: v for k, v in timed.items() if k.startswith("latency") or k in ("repeats", "threads")}


def check_trainable(capabilities: Capabilities, label: str, causal: bool = True) -> None:
    """Raise `Unsupported` when a method cannot be trained in this model (no backward, wrong pattern, no fp32).

    Called by a task before it makes any data or model, from the registry's
    capabilities, so an untrainable cell costs nothing; the model checks each
    built instance again.
    """
    try:
        capabilities.check(causal=causal, cross=False, mode="fwd_bwd", dtype=TRAIN_DTYPE)
    except Unsupported as err:
        raise Unsupported(f"{label} cannot be trained: {err}") from None


def _has_lazy_state(module: nn.Module) -> bool:
    """Whether a parameter or buffer is registered but not created yet (it is made on the first call).

    nn.Module keeps such a slot as None in `_parameters` / `_buffers`, and `named_parameters()` skips it,
    so these private dicts are the only place it shows.
    """
    return any(
        any(p is None for p in m._parameters.values()) or any(b is None for b in m._buffers.values())
        for m in module.modules()
    )


def materialise(attn: Attention, n_heads: int, seq_len: int, head_dim: int, causal: bool) -> None:
    """Run one untracked call so that parameters a method creates on its first call exist now.

    Based's and DeltaNet's weights and Performer's projection are sized from the
    first input when the factory was not told `head_dim`; the optimizer must see
    them and a checkpoint must hold them, so they are created at build time.
    Their initialisation is seeded by the method, and the probe input comes from
    a private generator, so this changes no random stream.
    """
    if not _has_lazy_state(attn):
        return
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n_heads, seq_len, head_dim, generator=gen) for _ in range(3))
    with torch.no_grad():
        attn(q, k, v, causal=causal)


class ShortConv(nn.Module):
    """Depthwise convolution over the sequence (Zoology/Based hybrids put it before the mixer).

    Causal: left padding only, so a token sees its last `kernel` tokens and never
    the next one. Bidirectional (`causal=False`): centred ("same") padding, so a
    token sees (kernel-1)//2 tokens before it and the rest after it; a
    left-only conv inside a bidirectional encoder would be an arbitrary
    asymmetry, and a centred odd kernel is exactly symmetric.
    """

    def __init__(self, d_model: int, kernel: int, causal: bool = True):
        super().__init__()
        self.pad = (kernel - 1, 0) if causal else ((kernel - 1) // 2, kernel - 1 - (kernel - 1) // 2)
        self.conv = nn.Conv1d(d_model, d_model, kernel, groups=d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        return self.conv(F.pad(x.transpose(1, 2), self.pad)).transpose(1, 2)


class MixerLayer(nn.Module):
    """Linear q, k, v -> the method -> output projection."""

    def __init__(self, cfg: ModelConfig, attn: Attention):
        super().__init__()
        self.n_heads, self.head_dim, self.causal = cfg.n_heads, cfg.head_dim, cfg.causal
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.attn = attn
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = self.attn(q, k, v, causal=self.causal)  # (B, H, N, hd)
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    """Pre-norm residual block: [short conv] -> mixer -> [MLP], dropout on each residual branch (nanoGPT's)."""

    def __init__(self, cfg: ModelConfig, attn: Attention):
        super().__init__()
        self.conv = ShortConv(cfg.d_model, cfg.conv_kernel, cfg.causal) if cfg.conv_kernel > 0 else None
        self.norm1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mixer = MixerLayer(cfg, attn)
        self.drop = nn.Dropout(cfg.dropout)
        self.mlp = None
        if cfg.mlp_ratio > 0:
            hidden = cfg.mlp_ratio * cfg.d_model
            self.norm2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
            self.mlp = nn.Sequential(nn.Linear(cfg.d_model, hidden, bias=cfg.bias), nn.GELU(),
                                     nn.Linear(hidden, cfg.d_model, bias=cfg.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if self.conv is not None:
            h = self.conv(h)
        x = x + self.drop(self.mixer(h))
        if self.mlp is not None:
            x = x + self.drop(self.mlp(self.norm2(x)))
        return x

    def residual_projections(self) -> list[nn.Linear]:
        """The layers that write into the residual stream (GPT-2 scales their init by 1/sqrt(2 n_layers))."""
        return [self.mixer.out] + ([self.mlp[2]] if self.mlp is not None else [])


class LMHead(nn.Module):
    """Next-token logits over the vocabulary at every position; labels are per token (IGNORE_INDEX: none)."""

    def __init__(self, d_model: int, vocab: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(d_model, vocab, bias=bias)

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)  # (B, N, vocab)

    def labelled(
        self, hidden: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets at the labelled positions only: recall tasks label a few positions per
        sequence, and running the projection there alone saves most of its cost at a large vocabulary."""
        mask = labels != IGNORE_INDEX
        return self.proj(hidden[mask]), labels[mask]


class PooledClassifierHead(nn.Module):
    """One label per sequence from its pooled hidden states (LRA's classifier); labels have shape (B,)."""

    def __init__(self, d_model: int, n_classes: int, pooling: str = "mean", pad_id: int | None = None):
        super().__init__()
        self.pooling, self.pad_id = pooling, pad_id
        self.proj = nn.Linear(d_model, n_classes)

    def pool(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pad_id is None:
            return hidden.mean(dim=1)
        keep = (tokens != self.pad_id).unsqueeze(-1).to(hidden.dtype)
        return (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(hidden, tokens))  # (B, n_classes)

    def labelled(
        self, hidden: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward(hidden, tokens), labels


class MixerModel(nn.Module):
    """Token (+ position) embedding, blocks with the cell's mixer, final norm, head.

    `MixerModel(cfg, make_attention)` calls `make_attention()` once per layer,
    so layers never share a mixer's parameters or state.
    """

    def __init__(self, cfg: ModelConfig, make_attention: AttentionFactory):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        blocks = []
        for _ in range(cfg.n_layers):
            attn = make_attention()
            check_trainable(attn.capabilities, f"{attn.method}/{attn.impl}", cfg.causal)
            materialise(attn, cfg.n_heads, cfg.max_len, cfg.head_dim, cfg.causal)
            blocks.append(Block(cfg, attn))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        if cfg.head == "lm":
            # nanoGPT's head has no bias; a tied head shares the embedding, so a bias would be its only own weight
            bias = cfg.bias and not cfg.tie_embeddings
            self.head: LMHead | PooledClassifierHead = LMHead(cfg.d_model, cfg.vocab, bias=bias)
            if cfg.tie_embeddings:
                self.head.proj.weight = self.tok.weight
        else:
            self.head = PooledClassifierHead(cfg.d_model, cfg.n_classes, cfg.pooling, cfg.pad_id)
        if cfg.init == "gpt2":
            self._init_gpt2()

    def _init_gpt2(self) -> None:
        """GPT-2's (and nanoGPT's) init, on the model's own layers only: a method's internal weights keep the
        method's init (they are part of what the method is)."""
        own = [self.tok, self.pos, self.head.proj] + [m for b in self.blocks for m in (b.mixer.qkv, b.mixer.out)]
        own += [m for b in self.blocks if b.mlp is not None for m in b.mlp if isinstance(m, nn.Linear)]
        for module in own:
            if module is None:
                continue
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in block.residual_projections():
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / (2 * self.cfg.n_layers) ** 0.5)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states (B, N, D)."""
        n = tokens.shape[1]
        if n > self.cfg.max_len:
            raise ValueError(f"sequence of {n} tokens is longer than max_len {self.cfg.max_len}")
        x = self.tok(tokens)
        if self.pos is not None:
            x = x + self.pos(torch.arange(n, device=tokens.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The head's logits: (B, N, vocab) for `lm`, (B, n_classes) for `classify`."""
        return self.head(self.hidden(tokens), tokens)

    def labelled_logits(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (M, C), targets (M,)) over the M targets of the batch: what the trainer's loss and
        evaluation read, whatever the head (labelled positions for `lm`, one per sequence for `classify`)."""
        return self.head.labelled(self.hidden(tokens), tokens, labels)

    def mixers(self) -> list[Attention]:
        return [block.mixer.attn for block in self.blocks]

    def state_bytes(self, context: int, dtype: torch.dtype = torch.float32) -> int:
        """The decoder state of every mixer at `context` tokens, batch 1 (Based's recall-vs-state x axis)."""
        cfg = self.cfg
        return int(sum(m.state_bytes(1, cfg.n_heads, context, cfg.head_dim, dtype) for m in self.mixers()))


class DualEncoderClassifier(nn.Module):
    """Two-tower pair classifier (LRA Retrieval): one shared encoder reads both documents, then
    [u, v, u*v, u-v] -> MLP -> n_classes, as LRA's dual encoder combines its two pooled encodings.

    The towers are one `MixerModel` body (`cfg.head="classify"`, `causal=False`), called once per document,
    so they share every weight by construction; its head keeps the pooling (mean over non-pad tokens or
    CLS) and its projection is replaced by Identity, so the body returns the pooled vector and holds no
    unused parameters. The classifier is LRA's: Linear(4d, hidden) -> ReLU -> Linear(hidden, n_classes),
    `hidden` = the blocks' MLP width (mlp_ratio * d_model) or d_model when there is no MLP.

    Input layout, so that `tasks.trainer` can slice batches from one tensor unchanged:
    (B, 2, L) (`LRAPairData.stacked()`), or (B, 2L) (`LRAPairData.concatenated()`, split in the middle;
    with it the trainer's tokens/s, batch * shape[1], counts both documents), or a pair (x1, x2).
    `cfg.max_len` is the length of one document.
    """

    def __init__(self, cfg: ModelConfig, make_attention: AttentionFactory, hidden: int | None = None):
        super().__init__()
        if cfg.head != "classify" or cfg.causal:
            raise ValueError("DualEncoderClassifier needs ModelConfig(head='classify', causal=False, ...)")
        self.cfg = cfg
        self.body = MixerModel(cfg, make_attention)
        self.body.head.proj = nn.Identity()  # the body pools; the pair MLP classifies
        hidden = hidden or (cfg.mlp_ratio * cfg.d_model if cfg.mlp_ratio > 0 else cfg.d_model)
        self.classifier = nn.Sequential(
            nn.Linear(4 * cfg.d_model, hidden), nn.ReLU(), nn.Linear(hidden, cfg.n_classes)
        )

    @staticmethod
    def split_pair(x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x1, x2) from a pair, a (B, 2, L) tensor or a (B, 2L) tensor."""
        if isinstance(x, (tuple, list)):
            x1, x2 = x
            return x1, x2
        if x.dim() == 3 and x.shape[1] == 2:
            return x[:, 0], x[:, 1]
        if x.dim() == 2 and x.shape[1] % 2 == 0:
            half = x.shape[1] // 2
            return x[:, :half], x[:, half:]
        raise ValueError(f"a pair batch is (B, 2, L), (B, 2L) or (x1, x2); got shape {tuple(x.shape)}")

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pooled encoding (B, d_model) of one document per row."""
        return self.body(tokens)

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(B, n_classes) logits for the pairs of `x`."""
        x1, x2 = self.split_pair(x)
        u, v = self.encode(torch.cat([x1, x2])).chunk(2)  # one body call for both towers: same weights, one pass
        return self.classifier(torch.cat([u, v, u * v, u - v], dim=-1))

    def labelled_logits(
        self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, n_classes), labels (B,)): the trainer's loss and evaluation read these."""
        return self.forward(x), labels

    def mixers(self) -> list[Attention]:
        return self.body.mixers()
