"""Feature maps phi(x) of the linear-attention family: softmax's exp(q.k) replaced by phi(q).phi(k).

Every map takes `(..., n, head_dim)` and returns `(..., n, feature_dim)` in at
least fp32 (fp64 stays fp64, so the naive oracles can reuse the very same
map): the exponentials and squares of Performer and Based lose too much in
16-bit, and the map is a small share of the cost. The method casts the
features to the input dtype before the chunked core, which is what a 16-bit
model feeds its kernel.

Maps with parameters (Performer's random projection, Based's projection) are
drawn from a `seed`, so two builds with the same params are the same function.
`head_dim` is known only at the first call; pass it to create the parameters
eagerly (needed before building an optimizer for Based's trainable projection),
or leave it None and they are created lazily, deterministically, on first use.
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import compute_dtype

__all__ = [
    "CosformerFeatureMap",
    "EluFeatureMap",
    "FeatureMap",
    "PerformerFeatureMap",
    "SiluFeatureMap",
    "TaylorFeatureMap",
    "orthogonal_random_features",
]


class FeatureMap(nn.Module, abc.ABC):
    """phi: `(..., n, head_dim) -> (..., n, feature_dim)`; `is_query` lets a map treat queries differently."""

    @abc.abstractmethod
    def feature_dim(self, head_dim: int) -> int:
        """Width of phi(x) for inputs of `head_dim`: it sizes the recurrent state."""

    @abc.abstractmethod
    def flops(self, n_tokens: int, head_dim: int) -> int:
        """FLOPs to map `n_tokens` vectors (an estimate: elementwise ops count 1, exp/max count 1)."""

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        """phi(x)."""


class EluFeatureMap(FeatureMap):
    """elu(x) + 1 (Katharopoulos et al. 2020): positive, so the normaliser phi(q).z never vanishes."""

    def feature_dim(self, head_dim: int) -> int:
        return head_dim

    def flops(self, n_tokens: int, head_dim: int) -> int:
        return 3 * n_tokens * head_dim  # exp on the negative side, select, +1

    def forward(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        return F.elu(x.to(compute_dtype(x.dtype))) + 1.0


class SiluFeatureMap(FeatureMap):
    """SiLU on q and k, as TransNormerLLM applies before lightning attention (not positive: no normaliser there)."""

    def feature_dim(self, head_dim: int) -> int:
        return head_dim

    def flops(self, n_tokens: int, head_dim: int) -> int:
        return 4 * n_tokens * head_dim  # exp, add, divide, multiply

    def forward(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        return F.silu(x.to(compute_dtype(x.dtype)))


class CosformerFeatureMap(FeatureMap):
    """cosFormer: ReLU features re-weighted by cos(pi/2 * (i - j) / M), split into cos and sin halves.

    cos(a - b) = cos(a)cos(b) + sin(a)sin(b), so with theta_i = pi/2 * i / M
    the features [relu(x) cos(theta_i), relu(x) sin(theta_i)] give
    phi(q_i).phi(k_j) = relu(q_i).relu(k_j) * cos(theta_i - theta_j), which a
    linear-time recurrence can carry. Positions must lie in [0, M] so that
    theta stays in [0, pi/2] and both halves stay non-negative (the normaliser
    then never changes sign).
    """

    def feature_dim(self, head_dim: int) -> int:
        return 2 * head_dim

    def flops(self, n_tokens: int, head_dim: int) -> int:
        return 3 * n_tokens * head_dim + 2 * n_tokens  # relu, two re-weightings; cos and sin per token

    def forward(
        self, x: torch.Tensor, is_query: bool, positions: torch.Tensor | None = None, max_len: int | None = None
    ) -> torch.Tensor:
        """`positions`: `(n,)` absolute token positions (bottom-right aligned for causal queries); `max_len`: M."""
        if positions is None or max_len is None:
            raise ValueError("cosformer features need token positions and max_len (M)")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if positions.numel() and int(positions.max()) > max_len:
            raise ValueError(
                f"position {int(positions.max())} exceeds cosformer max_len {max_len}: the cos re-weighting would turn "
                "negative; raise max_len"
            )
        dtype = compute_dtype(x.dtype)
        relu = F.relu(x.to(dtype))
        theta = (math.pi / 2) * positions.to(device=x.device, dtype=dtype) / max_len
        return torch.cat([relu * torch.cos(theta)[:, None], relu * torch.sin(theta)[:, None]], dim=-1)


def orthogonal_random_features(nb_features: int, dim: int, seed: int) -> torch.Tensor:
    """FAVOR+'s projection `(nb_features, dim)`: stacked Haar-orthogonal blocks, rows rescaled by chi(dim) norms.

    Orthogonal rows lower the estimator's variance (Choromanski et al. 2021,
    Thm. 2); the chi-distributed norms make each row marginally N(0, I), so the
    estimate of exp(q.k) stays unbiased. Drawn on CPU in fp64 from `seed`, so
    the same seed gives the same matrix on every device.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    blocks = []
    for _ in range(math.ceil(nb_features / dim)):
        q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1.0)  # Haar, not QR's sign choice
        blocks.append(q.T)
    rows = torch.cat(blocks)[:nb_features]
    norms = torch.randn(nb_features, dim, generator=gen, dtype=torch.float64).norm(dim=1)
    return (norms[:, None] * rows).float()


class PerformerFeatureMap(FeatureMap):
    """FAVOR+ positive random features: phi(x) = exp(w.x' - |x'|^2 / 2) / sqrt(m), x' = x / d^(1/4).

    E[phi(q).phi(k)] = exp(q.k / sqrt(d)), softmax's kernel, with positive
    features (so the normaliser is positive). Queries subtract their own
    row max before the exp: a per-query constant cancels in the normalisation
    and keeps exp() finite for peaked queries. Keys get no data-dependent
    stabiliser (performer-pytorch takes a max over all keys) because the
    decode state must not depend on tokens that have not arrived yet; in fp32
    the key exponent is bounded by |w|^2 / 2 ~ d / 2, far from overflow.
    """

    def __init__(self, nb_features: int, seed: int, head_dim: int | None = None):
        super().__init__()
        self.nb_features, self.seed = nb_features, seed
        self.register_buffer("projection", None)
        if head_dim is not None:
            self.projection = orthogonal_random_features(nb_features, head_dim, seed)

    def feature_dim(self, head_dim: int) -> int:
        return self.nb_features

    def flops(self, n_tokens: int, head_dim: int) -> int:
        m = self.nb_features
        return n_tokens * (2 * head_dim * m + 3 * head_dim + 4 * m)  # projection, |x|^2, max, subtract, exp, scale

    def _projection_for(self, x: torch.Tensor) -> torch.Tensor:
        head_dim = x.shape[-1]
        if self.projection is None or self.projection.shape[1] != head_dim:
            # Lazy creation: deterministic from the seed, so it is the matrix an eager build would have drawn.
            self.projection = orthogonal_random_features(self.nb_features, head_dim, self.seed).to(x.device)
        return self.projection.to(device=x.device, dtype=compute_dtype(x.dtype))

    def forward(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        w = self._projection_for(x)
        x = x.to(compute_dtype(x.dtype)) * x.shape[-1] ** -0.25
        u = x @ w.T
        u = u - (x * x).sum(-1, keepdim=True) / 2
        if is_query:
            u = u - u.amax(-1, keepdim=True).detach()
        return torch.exp(u) * self.nb_features**-0.5


class TaylorFeatureMap(FeatureMap):
    """Based's 2nd-order Taylor map on a small projected dim f: phi(a).phi(b) = 1 + a.b/sqrt(f) + (a.b)^2/(2f).

    q and k are first projected from head_dim to f (default 16) by a seeded
    matrix initialised as Based's `nn.Linear` is (U(-1/sqrt(d), 1/sqrt(d))),
    a trainable parameter. The quadratic term uses the symmetric half of the
    outer product (diagonal / sqrt(2), off-diagonal once), so the feature dim
    is 1 + f + f(f+1)/2 (153 at f = 16) instead of Zoology's 1 + f + f^2 (273),
    with the same inner products. 1 + s + s^2/2 > 0 for every s, so the
    normaliser is positive.
    """

    def __init__(self, feature_dim: int, seed: int, head_dim: int | None = None):
        super().__init__()
        self.proj_dim, self.seed = feature_dim, seed
        self.register_parameter("projection", None)
        if head_dim is not None:
            self.projection = nn.Parameter(self._draw(head_dim))
        rows, cols = torch.triu_indices(self.proj_dim, self.proj_dim, offset=1)
        self.register_buffer("_off_rows", rows, persistent=False)
        self.register_buffer("_off_cols", cols, persistent=False)

    def _draw(self, head_dim: int) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        bound = 1.0 / math.sqrt(head_dim)
        return (torch.rand(head_dim, self.proj_dim, generator=gen) * 2 - 1) * bound

    def feature_dim(self, head_dim: int) -> int:
        f = self.proj_dim
        return 1 + f + f * (f + 1) // 2

    def flops(self, n_tokens: int, head_dim: int) -> int:
        f = self.proj_dim
        return n_tokens * (2 * head_dim * f + f + 2 * f * (f + 1) // 2)  # projection, linear scale, products+scale

    def project(self, x: torch.Tensor) -> torch.Tensor:
        head_dim = x.shape[-1]
        if self.projection is None or self.projection.shape[0] != head_dim:
            with torch.no_grad():
                self.projection = nn.Parameter(self._draw(head_dim).to(x.device))
        return x.to(compute_dtype(x.dtype)) @ self.projection.to(device=x.device, dtype=compute_dtype(x.dtype))

    def forward(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        y = self.project(x)
        f = self.proj_dim
        ones = torch.ones_like(y[..., :1])
        diag = y * y / math.sqrt(2 * f)
        rows, cols = self._off_rows.to(y.device), self._off_cols.to(y.device)
        off = y[..., rows] * y[..., cols] / math.sqrt(f)
        return torch.cat([ones, y / f**0.25, diag, off], dim=-1)
