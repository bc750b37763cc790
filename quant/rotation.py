"""The orthonormal rotation keys (values) are stored in with ``MixedPrecisionKVCache(rotate_keys=True)``
(``rotate_values=True``).

Why rotate: keys are quantized per channel (KIVI) with min-max codes, so each channel's levels are
spent on its own distribution's extremes. Multiplying each head's keys by an orthonormal Hadamard
matrix (QuaRot, QuIP#) mixes every channel into all of them before quantizing; the product with its
transpose undoes it exactly when the keys are read, so attention sees keys in their own basis and
nothing outside the cache changes. Rotation costs no stored bytes.

Whether it helps is measured, not assumed. On the embedded model's passkey prompts (fp16 sinks,
2-bit keys) it raised gold log-likelihood by +1.72 nats [+0.98, +2.46] on 48 pool rows (results README,
issue 15), although the keys' own mean squared error rises about 10% and the attention logits' about
4% (one prompt, all layers): the gain is not a smaller average error. It can also hurt: a rare massive
entry (one token, one channel) is spread over every channel of its token. Keep attention sinks in
fp16 (``sink_tokens``) when rotating; they are stored unrotated, outside the quantized runs. Rotating
the values too (``rotate_values``) gave the token selector nothing on the same rows (-0.02 nats) and
fixed K3V2 +0.55 nats (results README, section 11).

A head dimension that is a power of two gets the Sylvester Hadamard matrix scaled by ``1/sqrt(n)``
(exact in any float type for n = 64: every entry is ±1/8). Any other head dimension gets a fixed
random orthonormal matrix (QR of a Gaussian drawn from seed 0), the same on every machine and run.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["rotation_matrix"]


def rotation_matrix(head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[head_dim, head_dim]`` float32 orthonormal matrix R: keys (values) are stored as ``k @ R``, read as
    ``(k @ R) @ R.T``. The same tensor every call for a size and device: do not modify it."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive integer, got {head_dim!r}")
    return _on_device(head_dim, torch.device(device))


@functools.lru_cache(maxsize=32)
def _on_device(n: int, device: torch.device) -> torch.Tensor:
    """Kept per device: every commit and read asks for it, and a GPU copy each time would be a transfer."""
    return _rotation(n).to(device)


@functools.lru_cache(maxsize=16)
def _rotation(n: int) -> torch.Tensor:
    if n & (n - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return (h / n**0.5).float()
    gaussian = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))).float()  # signs fixed: QR's output is unique
