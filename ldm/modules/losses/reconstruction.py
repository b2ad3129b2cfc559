"""Training loss for the KL autoencoder without a perceptual network or a discriminator.

latent-diffusion trains its autoencoders with LPIPS + a patch discriminator (`LPIPSWithDiscriminator`),
which needs pretrained VGG weights. The bundled toy world's images are small and flat, so a pixel loss and
the KL term suffice: loss = mean |x - x_rec| (or squared) + kl_weight * KL(q(z|x) || N(0, I)) / batch.
"""

from __future__ import annotations

from torch import nn


class KLReconstructionLoss(nn.Module):
    def __init__(self, kl_weight: float = 1e-6, pixel_loss: str = "l1"):
        super().__init__()
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"pixel_loss must be 'l1' or 'l2', got '{pixel_loss}'")
        self.kl_weight = kl_weight
        self.pixel_loss = pixel_loss

    def forward(self, inputs, reconstructions, posteriors, split: str = "train"):
        diff = inputs - reconstructions
        rec = (diff.abs() if self.pixel_loss == "l1" else diff.pow(2)).mean()
        kl = posteriors.kl().mean()
        loss = rec + self.kl_weight * kl
        return loss, {f"{split}/rec_loss": rec.detach(), f"{split}/kl_loss": kl.detach(),
                      f"{split}/total_loss": loss.detach()}
