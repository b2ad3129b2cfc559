"""Vector quantiser used by `VQModel` / `VQModelInterface` (the inherited VQ first-stage configs).

Written for this repository as a small equivalent of taming-transformers' `VectorQuantizer2`
(`taming/modules/vqvae/quantize.py`), which CompVis/latent-diffusion@5a6571e imports as
`from taming.modules.vqvae.quantize import VectorQuantizer2 as VectorQuantizer`. Same constructor
arguments, parameter name (`embedding.weight`, [n_e, e_dim]), loss and return values, so VQ checkpoints load.

Local changes (vs. taming):
- `remap` (index remapping through a `.npy` file of used codes) is not ported and raises
  `NotImplementedError`; no text-to-image config uses it. This removes the taming dependency.
- No einops; Gumbel/temperature arguments (`temp`, `rescale_logits`, `return_logits`) are accepted and
  must be left at their defaults, as in taming.
"""

from __future__ import annotations

import torch
from torch import nn


class VectorQuantizer2(nn.Module):
    """Nearest-codebook quantisation with a straight-through gradient (van den Oord et al. 2017, eq. 3).

    z: [B, e_dim, H, W] -> z_q of the same shape, where each spatial vector is replaced by its nearest
    (squared Euclidean) row of `embedding.weight`. Loss = ||sg[z_q] - z||^2 + beta * ||z_q - sg[z]||^2
    with `legacy=True` (taming's default, which puts beta on the codebook term, the reverse of the paper);
    `legacy=False` puts beta on the commitment term.
    """

    def __init__(
        self,
        n_e: int,
        e_dim: int,
        beta: float = 0.25,
        remap: str | None = None,
        unknown_index: str | int = "random",
        sane_index_shape: bool = False,
        legacy: bool = True,
    ):
        super().__init__()
        if remap is not None:
            raise NotImplementedError("VectorQuantizer2: index remapping (remap=...) is not supported")
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.remap = remap
        self.unknown_index = unknown_index
        self.re_embed = n_e
        self.sane_index_shape = sane_index_shape

        self.embedding = nn.Embedding(self.n_e, self.e_dim)
        self.embedding.weight.data.uniform_(-1.0 / self.n_e, 1.0 / self.n_e)

    def forward(self, z: torch.Tensor, temp=None, rescale_logits: bool = False, return_logits: bool = False):
        """Return (z_q [B, e_dim, H, W], loss scalar, (perplexity=None, min_encodings=None, indices)).

        indices: [B*H*W] int64, or [B, H, W] with `sane_index_shape`.
        """
        if temp not in (None, 1.0) or rescale_logits or return_logits:
            raise ValueError(
                "VectorQuantizer2 is not a Gumbel quantiser: temp/rescale_logits/return_logits are unused"
            )
        z = z.permute(0, 2, 3, 1).contiguous()  # [B, H, W, e_dim]
        z_flat = z.view(-1, self.e_dim)
        codebook = self.embedding.weight
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e, for every (position, code) pair: [B*H*W, n_e]
        d = (
            torch.sum(z_flat**2, dim=1, keepdim=True)
            + torch.sum(codebook**2, dim=1)
            - 2 * torch.einsum("bd,dn->bn", z_flat, codebook.t())
        )
        min_encoding_indices = torch.argmin(d, dim=1)
        z_q = self.embedding(min_encoding_indices).view(z.shape)

        if self.legacy:
            loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        else:
            loss = self.beta * torch.mean((z_q.detach() - z) ** 2) + torch.mean((z_q - z.detach()) ** 2)

        z_q = z + (z_q - z).detach()  # straight-through estimator: forward z_q, gradient of identity
        z_q = z_q.permute(0, 3, 1, 2).contiguous()

        if self.sane_index_shape:
            min_encoding_indices = min_encoding_indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (None, None, min_encoding_indices)

    def get_codebook_entry(
        self, indices: torch.Tensor, shape: tuple[int, int, int, int] | None
    ) -> torch.Tensor:
        """Look up code vectors; with `shape` = (B, H, W, e_dim) return them as [B, e_dim, H, W]."""
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q


# taming's module exports both names; latent-diffusion imports it under the shorter one.
VectorQuantizer = VectorQuantizer2
