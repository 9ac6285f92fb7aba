"""DeltaNet's per-chunk WY/UT factors in PyTorch: the part of the chunked delta rule that is parallel over chunks.

Shared by the reference (`methods/deltanet.py`, whose docstring derives the
form) and the Triton kernel (`methods/kernels/deltanet_chunk.py`, which walks
the chunks sequentially with these factors), so both compute the same
factors. Host-side PyTorch, no Triton: the reference imports it without a GPU
stack.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["wy_factors"]


def wy_factors(
    k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-chunk WY/UT factors, all chunks at once: `(k, w, u)`, each `(B, H, n_chunks, C, d)`.

    The sequence is zero-padded to a multiple of C; a padded token has k = v = beta = 0, so it changes
    neither the factors of the real tokens nor the state. `w = A^{-1} diag(beta) K`, `u = A^{-1} diag(beta) V`
    with `A = I + tril(diag(beta) K K^T, -1)`: A is unit lower-triangular, so one batched triangular solve
    gives both (this is the UT transform; fla computes the same inverse by forward substitution).
    """
    b, h, n, d_k = k.shape
    d_v = v.shape[-1]
    pad = (-n) % chunk_size
    if pad:
        k, v, beta = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad)), F.pad(beta, (0, pad))
    n_chunks = (n + pad) // chunk_size
    k = k.reshape(b, h, n_chunks, chunk_size, d_k)
    v = v.reshape(b, h, n_chunks, chunk_size, d_v)
    beta = beta.reshape(b, h, n_chunks, chunk_size, 1)
    k_beta = k * beta
    # Strictly lower part only: unitriangular=True takes the diagonal as 1 and never reads it.
    a = torch.tril(k_beta @ k.transpose(-1, -2), diagonal=-1)
    wu = torch.linalg.solve_triangular(a, torch.cat([k_beta, v * beta], dim=-1), upper=False, unitriangular=True)
    return k, wu[..., :d_k], wu[..., d_k:]
