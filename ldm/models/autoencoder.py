"""First-stage autoencoders: the KL-regularised `AutoencoderKL` used by every text-to-image config, and the
VQ interface classes that the inherited configs reference.

Ported from CompVis/latent-diffusion@5a6571e, `ldm/models/autoencoder.py` (unchanged in
rinongal/textual_inversion). Module names are the `first_stage_model.*` checkpoint keys and are kept.

Local changes:
- `AutoencoderKL` trains with a single optimizer and a loss `(inputs, reconstructions, posterior, split)
  -> (loss, log)` such as `ldm.modules.losses.KLReconstructionLoss` (the bundled toy model); the
  two-optimizer GAN schedule of `LPIPSWithDiscriminator` is not ported (it needs pretrained VGG weights).
  The VQ model's training code, EMA and batch-resizing are not ported: `VQModel(use_ema=True)` and
  `batch_resize_range` raise `NotImplementedError` instead of being ignored.
- `VQModel` uses the local `ldm.modules.vqvae.quantize.VectorQuantizer2` instead of importing
  taming-transformers.
- Checkpoints are loaded through `ldm.checkpoint.load_state_dict_into` (one loader for the repository).
- `ignore_keys` defaults to an immutable tuple; `double_z` is checked with a message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.vqvae.quantize import VectorQuantizer2 as VectorQuantizer
from ldm.util import images_from_batch, instantiate_from_config


class _FirstStageBase(pl.LightningModule):
    """Checkpoint loading and input conversion shared by the KL and VQ autoencoders."""

    image_key: str

    def _init_common(self, image_key: str, colorize_nlabels: int | None, monitor: str | None) -> None:
        self.image_key = image_key
        if colorize_nlabels is not None:
            if not isinstance(colorize_nlabels, int):
                raise TypeError(f"colorize_nlabels must be an int, got {type(colorize_nlabels).__name__}")
            # Random projection of segmentation maps to RGB for logging; a buffer, so it is in checkpoints.
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor

    def init_from_ckpt(self, path: str, ignore_keys: Iterable[str] = ()) -> None:
        """Load weights from `path` (`.ckpt`/`.safetensors`), dropping keys starting with `ignore_keys`."""
        # Imported here so that building a first stage does not need the checkpoint module.
        from ldm.checkpoint import load_state_dict_into

        load_state_dict_into(self, path, ignore_keys=ignore_keys)

    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        return images_from_batch(batch, k)


class AutoencoderKL(_FirstStageBase):
    """KL-regularised autoencoder: image [B, 3, R, R] in [-1, 1] <-> latent [B, embed_dim, R/f, R/f].

    `encode` returns the posterior q(z|x) as a `DiagonalGaussianDistribution` over `embed_dim` channels;
    `decode` maps a latent back to an image. The diffusion model's `scale_factor` is applied by the caller.
    """

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any],
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: Iterable[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
    ):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError(
                "AutoencoderKL needs ddconfig.double_z=True: the encoder must output mean and logvar"
            )
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim
        self._init_common(image_key, colorize_nlabels, monitor)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """x: [B, in_channels, R, R] -> posterior with mean/std of shape [B, embed_dim, R/f, R/f]."""
        moments = self.quant_conv(self.encoder(x))
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, embed_dim, r, r] (unscaled latent) -> image [B, out_ch, r*f, r*f]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, input: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct `input` through a posterior sample (or its mode): (reconstruction, posterior)."""
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior


    # -- training (single optimizer; see the module docstring) ----------------------------------------

    def _step(self, batch, split: str):
        if isinstance(self.loss, nn.Identity):
            raise NotImplementedError("this first stage has lossconfig torch.nn.Identity: it cannot be trained")
        inputs = self.get_input(batch, self.image_key)
        reconstructions, posterior = self(inputs)
        return self.loss(inputs, reconstructions, posterior, split=split)

    def training_step(self, batch, batch_idx):
        loss, log = self._step(batch, "train")
        self.log_dict(log, prog_bar=False, logger=True, on_step=True, on_epoch=True)
        self.log("train/loss", loss, prog_bar=True, logger=True, on_step=True, on_epoch=False)
        return loss

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        _, log = self._step(batch, "val")
        self.log_dict(log, logger=True, on_step=False, on_epoch=True)

    def configure_optimizers(self):
        params = [*self.encoder.parameters(), *self.decoder.parameters(), *self.quant_conv.parameters(),
                  *self.post_quant_conv.parameters()]
        return torch.optim.Adam(params, lr=self.learning_rate, betas=(0.5, 0.9))

    @torch.no_grad()
    def log_images(self, batch, N: int = 8, split: str | None = None) -> dict[str, torch.Tensor]:
        """inputs, reconstructions and decodes of random latents, in [-1, 1]."""
        x = self.get_input(batch, self.image_key)[:N].to(self.device)
        rec, posterior = self(x)
        return {"inputs": x, "reconstructions": rec,
                "samples": self.decode(torch.randn_like(posterior.sample()))}


class VQModel(_FirstStageBase):
    """Vector-quantised autoencoder (inherited VQ configs): encode -> quantise -> decode."""

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any],
        n_embed: int,
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: Iterable[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        batch_resize_range: tuple[int, int] | None = None,
        scheduler_config: Mapping[str, Any] | None = None,
        lr_g_factor: float = 1.0,
        remap: str | None = None,
        sane_index_shape: bool = False,
        use_ema: bool = False,
    ):
        super().__init__()
        if use_ema:
            raise NotImplementedError("VQModel(use_ema=True) is not ported: EMA only matters for VQ training")
        if batch_resize_range is not None:
            raise NotImplementedError("VQModel(batch_resize_range=...) is a training option; not ported")
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quantize = VectorQuantizer(
            n_embed, embed_dim, beta=0.25, remap=remap, sane_index_shape=sane_index_shape
        )
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.batch_resize_range = batch_resize_range
        self.scheduler_config = scheduler_config
        self.lr_g_factor = lr_g_factor
        self.use_ema = use_ema
        self._init_common(image_key, colorize_nlabels, monitor)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def encode(self, x: torch.Tensor):
        """x -> (quant [B, embed_dim, r, r], codebook loss, (perplexity, min_encodings, indices))."""
        h = self.quant_conv(self.encoder(x))
        return self.quantize(h)

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(
        self, code_b: torch.Tensor, shape: tuple[int, int, int, int] | None = None
    ) -> torch.Tensor:
        """Decode codebook indices; `shape` = (B, H, W, embed_dim) when `code_b` is flat."""
        return self.decode(self.quantize.get_codebook_entry(code_b, shape))

    def forward(self, input: torch.Tensor, return_pred_indices: bool = False):
        quant, diff, (_, _, ind) = self.encode(input)
        dec = self.decode(quant)
        if return_pred_indices:
            return dec, diff, ind
        return dec, diff


class VQModelInterface(VQModel):
    """VQ first stage as latent diffusion uses it: latents are the *pre*-quantisation features.

    `encode` skips quantisation; `decode` quantises (unless `force_not_quantize`) before decoding.
    """

    def __init__(self, embed_dim: int, *args: Any, **kwargs: Any):
        super().__init__(*args, embed_dim=embed_dim, **kwargs)
        self.embed_dim = embed_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, R, R] -> [B, embed_dim, r, r] (not quantised)."""
        return self.quant_conv(self.encoder(x))

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))


class IdentityFirstStage(nn.Module):
    """No first stage (diffusion in pixel space): encode, decode and forward return their input.

    With `vq_interface=True`, `quantize(x)` mimics the quantiser's return value: (x, None, [None]*3).
    """

    def __init__(self, *args: Any, vq_interface: bool = False, **kwargs: Any):
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def decode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def quantize(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        if self.vq_interface:
            return x, None, [None, None, None]
        return x

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x
