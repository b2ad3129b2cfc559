"""Denoising diffusion models: pixel-space `DDPM` and `LatentDiffusion` (Rombach et al. 2022).

Ported from CompVis/latent-diffusion@5a6571e with the Textual Inversion changes of
rinongal/textual_inversion@424192d. Class names, constructor arguments and buffer names
are kept (configs and checkpoints use them). Local changes:
- the schedule table lives in `ddpm_schedule.py`, the Textual Inversion delta in `textual_inversion.py`;
- `personalization_config` is optional (vanilla ldm configs build again,
  docs/DIFFERENCES.md#personalization-optional);
- checkpoints load strictly through `ldm.checkpoint` (no silent `strict=False`,
  docs/DIFFERENCES.md#strict-checkpoint-loading); what the constructor's checkpoint fills is built on the
  meta device and filled tensor by tensor (docs/DIFFERENCES.md#lean-checkpoint-loading);
- `logvar` is a non-persistent buffer, so it follows the device (docs/DIFFERENCES.md#logvar-buffer);
- randomness is injectable: `t`, `noise` and the posterior noise can be passed in;
- logging instead of print; the patch-wise (split-input) paths are left out: no text-to-image config or
  Textual Inversion script uses them;
- ancestral sampling (`p_sample_loop`, `sample_log(ddim=False)`) also takes x0 and v models, a
  `generator`, and classifier-free guidance (docs/DIFFERENCES.md#ddpm-ancestral-sampler).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from tqdm import tqdm

from ldm.checkpoint import CheckpointError, check_finite, load_state_dict_into, open_checkpoint
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.diffusion.ddpm_schedule import (
    PARAMETERIZATIONS,
    SCHEDULE_BUFFERS,
    lvlb_weights,
    schedule_table,
)
from ldm.models.diffusion.first_stage_release import (
    FirstStageRelease,
    distinct_images,
    loaders,
    padded_batches,
    stack_images,
    with_decoder,
)
from ldm.models.diffusion.latent_cache import LatentCache
from ldm.models.diffusion.sampling import guided_output
from ldm.models.diffusion.textual_inversion import (
    PROGRESSIVE_COUNTER_KEY,
    REG_FORMS,
    build_embedding_manager,
    complete_state_dict,
    embedding_regularization,
    freeze,
    make_optimizer,
    save_embedding_files,
    slim_state_dict,
)
from ldm.modules.attention import check_attention
from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule, noise_like
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.modules.frozen_weights import DTYPES as STORAGE_DTYPES
from ldm.modules.frozen_weights import check_frozen_weights, store_frozen_weights, use_small_gemm
from ldm.modules.saved_activations import check_saved_activations, saved_activations
from ldm.util import (
    count_params,
    default,
    images_from_batch,
    instantiate_from_config,
    log_txt_as_img,
    with_params,
)

logger = logging.getLogger(__name__)

__conditioning_keys__ = {"concat": "c_concat", "crossattn": "c_crossattn", "adm": "y"}

#: Key prefixes of what is built on the meta device when the constructor's checkpoint fills it (`model_ema.`
#: copies `model.`).
META_BUILT = ("model.", "model_ema.", "first_stage_model.", "cond_stage_model.")


def checkpoint_fills(ckpt_path, ignore_keys=(), load_only_unet: bool = False) -> bool:
    """Whether the constructor's checkpoint fills every weight of META_BUILT: it is loaded whole and no
    `ignore_keys` entry reaches into them (the model keeps its own, random, values for those)."""
    reaches = any(str(k).startswith(p) or p.startswith(str(k)) for k in ignore_keys for p in META_BUILT)
    return ckpt_path is not None and not load_only_unet and not reaches


def kernel_options(attention: str = "math", gradient_checkpointing: bool = False) -> dict:
    """The speed options that differ from the official kernels, as constructor arguments of the UNet and
    the text encoder (left out at their defaults, so denoisers and encoders without them still build)."""
    options = {}
    if attention != "math":
        options["attention"] = check_attention(attention)
    if gradient_checkpointing:
        options["gradient_checkpointing"] = True
    return options


class DDPM(pl.LightningModule):
    """Gaussian diffusion with a denoiser `self.model` (a `DiffusionWrapper` around the UNet).

    Speed and memory options (config keys under `model.params`; the defaults are the official kernels and
    storage):
    `attention` "math" | "sdpa" (the kernel of the UNet's and the BERT encoder's attention, same maths),
    `gradient_checkpointing` (recompute UNet activations in backward: less memory, same numbers),
    `frozen_weights` "fp32" | "fp16" | "bf16" (storage of the frozen weights, see `ldm/modules/frozen_weights.py`),
    `channels_last` (the UNet's weights and activations in NHWC: float-tolerance equal, faster convolutions
    on CPU), `saved_activations` "fp32" | "fp16" | "bf16" (storage of the activations a training step keeps
    for backward, see `ldm/modules/saved_activations.py`), `small_gemm` (the UNet's frozen layers on few
    positions as `W @ X^T` products, and wide linear layers of the UNet and the text encoder in blocks of
    output features, see `ldm/modules/small_gemm.py`: float-tolerance equal, faster on CPU)
    and, for `LatentDiffusion`, `cache_first_stage` (exact; on by default for textual inversion).

    With a `ckpt_path` that fills them (`checkpoint_fills`), the UNet and the two stages are built on the meta
    device, without memory or random init, and get their storage as the checkpoint fills them, tensor by
    tensor (`ldm.checkpoint.load_state_dict_into`): loading peaks near one copy of the weights.
    """

    #: Build on the meta device? None: decide from the checkpoint arguments (`checkpoint_fills`). A subclass
    #: may force it; `LatentDiffusion`, which loads its checkpoint itself, sets it before `DDPM.__init__`.
    meta_init: bool | None = None

    def __init__(
        self,
        unet_config,
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        loss_type: str = "l2",
        ckpt_path: str | None = None,
        ignore_keys=(),
        load_only_unet: bool = False,
        monitor: str | None = "val/loss",
        use_ema: bool = True,
        first_stage_key: str = "image",
        image_size: int = 256,
        channels: int = 3,
        log_every_t: int = 100,
        clip_denoised: bool = True,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        given_betas=None,
        original_elbo_weight: float = 0.0,
        embedding_reg_weight: float = 0.0,
        embedding_reg_form: str = "gram",
        unfreeze_model: bool = False,
        model_lr: float = 0.0,
        freeze_embedding: bool = False,
        v_posterior: float = 0.0,
        l_simple_weight: float = 1.0,
        conditioning_key: str | None = None,
        parameterization: str = "eps",
        scheduler_config=None,
        use_positional_encodings: bool = False,
        learn_logvar: bool = False,
        logvar_init: float = 0.0,
        frozen_weights: str = "fp32",
        attention: str = "math",
        gradient_checkpointing: bool = False,
        channels_last: bool = False,
        saved_activations: str = "fp32",
        small_gemm: bool = False,
    ):
        super().__init__()
        if self.meta_init is None:
            self.meta_init = checkpoint_fills(ckpt_path, ignore_keys, load_only_unet)
        check_frozen_weights(frozen_weights, unfreeze_model)
        check_saved_activations(saved_activations)
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got '{parameterization}'")
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"loss_type must be 'l1' or 'l2', got '{loss_type}'")
        if use_positional_encodings:
            raise NotImplementedError("use_positional_encodings is not supported")
        self.parameterization = parameterization
        logger.info("%s: Running in %s-prediction mode", type(self).__name__, parameterization)
        self.cond_stage_model = None
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.use_positional_encodings = use_positional_encodings
        unet_config = with_params(unet_config, kernel_options(attention, gradient_checkpointing))
        with self.weights_device():
            self.model = DiffusionWrapper(unet_config, conditioning_key)
        count_params(self.model, verbose=True)
        self.frozen_weights = frozen_weights
        self.saved_activations = saved_activations
        self.store_if_frozen(self.model)
        self.small_gemm = bool(small_gemm)
        if self.small_gemm:
            use_small_gemm(self.model)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model)
        self.use_scheduler = scheduler_config is not None
        self.scheduler_config = scheduler_config
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        self.embedding_reg_weight = embedding_reg_weight
        if embedding_reg_form not in REG_FORMS:
            raise ValueError(f"embedding_reg_form must be one of {REG_FORMS}, got '{embedding_reg_form}'")
        self.embedding_reg_form = embedding_reg_form
        self.unfreeze_model = unfreeze_model
        self.model_lr = model_lr
        # Pivotal tuning, stage 2 (Appendix E): the learned word stays at its pivot, only the UNet trains.
        self.freeze_embedding = freeze_embedding
        if monitor is not None:
            self.monitor = monitor
        self.loss_type = loss_type
        self.register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self.learn_logvar = learn_logvar
        logvar = torch.full((self.num_timesteps,), fill_value=logvar_init)
        if learn_logvar:
            self.logvar = nn.Parameter(logvar, requires_grad=True)
        else:
            self.register_buffer("logvar", logvar, persistent=False)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=load_only_unet)
            self.check_filled(ckpt_path)
        self.channels_last = bool(channels_last)
        self.apply_memory_format()

    def apply_memory_format(self) -> None:
        """With `channels_last`, store the UNet's 4-D weights channels-last (NHWC), after any load that
        assigned contiguous tensors; its convolutions then run, and hand on their outputs, in that layout."""
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def weights_device(self):
        """The context the big submodules are built in: the meta device with `meta_init`, else as usual."""
        return torch.device("meta") if self.meta_init else nullcontext()

    def check_filled(self, ckpt_path) -> None:
        """After the constructor's load: nothing built on the meta device may be left unfilled."""
        left = [k for k, v in self.state_dict(keep_vars=True).items() if v.is_meta]
        left += [k for k, v in self.named_buffers() if v.is_meta and k not in left]
        if left:
            raise CheckpointError(f"{ckpt_path} left {len(left)} tensors of {type(self).__name__} without "
                                  f"values (built on the meta device): {', '.join(left[:5])}")

    def check_trainable(self) -> None:
        """A model whose weights are all stored frozen has nothing to train: say so before training."""
        if self.frozen_weights != "fp32" and getattr(self, "embedding_manager", None) is None:
            raise ValueError(f"frozen_weights={self.frozen_weights} freezes the whole model; only a textual "
                             "inversion config (model.params.personalization_config) has vectors to train")

    def store_if_frozen(self, module: nn.Module) -> None:
        """With `frozen_weights` other than fp32 (textual inversion only), freeze `module` and store its
        weights in that dtype right after it is built, so the float32 copies of the frozen model never all
        exist at once (the loaded checkpoint is rounded on copy; see ldm/modules/frozen_weights.py)."""
        if self.frozen_weights != "fp32" and isinstance(module, nn.Module):
            freeze(module)
            store_frozen_weights(module, STORAGE_DTYPES[self.frozen_weights])

    # -- schedule ------------------------------------------------------------------------------------

    def register_schedule(self, given_betas=None, beta_schedule="linear", timesteps=1000,
                          linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3):
        betas = given_betas if given_betas is not None else make_beta_schedule(
            beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s
        )
        betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = int(betas.shape[0])
        self.linear_start, self.linear_end = linear_start, linear_end
        table = schedule_table(betas, self.v_posterior)
        for name in SCHEDULE_BUFFERS:
            self.register_buffer(name, torch.tensor(table[name], dtype=torch.float32))
        weights = lvlb_weights({n: getattr(self, n) for n in SCHEDULE_BUFFERS}, self.parameterization)
        self.register_buffer("lvlb_weights", weights, persistent=False)

    # -- checkpoints and EMA -------------------------------------------------------------------------

    def init_from_ckpt(self, path, ignore_keys=(), only_model=False):
        """Load a checkpoint strictly (see `ldm.checkpoint`); embedding-manager keys may be missing."""
        if only_model:
            ckpt = open_checkpoint(path)
            ckpt.tensors = {k[len("model."):]: v for k, v in ckpt.tensors.items() if k.startswith("model.")}
            return load_state_dict_into(self.model, ckpt, ignore_keys=ignore_keys)
        return load_state_dict_into(self, path, ignore_keys=ignore_keys)

    @contextmanager
    def ema_scope(self, context: str | None = None):
        """Run the block with the EMA weights of `self.model` (a no-op when `use_ema` is false)."""
        if self.use_ema:
            self.model_ema.store(self.model.parameters())
            self.model_ema.copy_to(self.model)
            if context is not None:
                logger.info("%s: Switched to EMA weights", context)
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.model.parameters())
                if context is not None:
                    logger.info("%s: Restored training weights", context)

    def on_train_batch_end(self, *args, **kwargs):
        if self.use_ema:
            self.model_ema(self.model)

    # -- forward process -----------------------------------------------------------------------------

    def q_mean_variance(self, x_start, t):
        mean = extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def predict_start_from_noise(self, x_t, t, noise):
        return (extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    def get_v(self, x_start, noise, t):
        """The v-prediction target (Salimans & Ho 2022): sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * noise
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * x_start)

    def training_target(self, x_start, noise, t):
        """What the network learns to output at (x_t, t): eps, x_0 or v, by `parameterization`."""
        if self.parameterization == "eps":
            return noise
        return x_start if self.parameterization == "x0" else self.get_v(x_start, noise, t)

    def eps_from_output(self, x_t, t, output):
        """The noise estimate implied by a network output at (x_t, t), whatever the parameterization.

        The samplers work in eps; for eps models this is the identity (the reference's samplers assumed it).
        """
        if self.parameterization == "eps":
            return output
        sqrt_a = extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape)
        sqrt_one_minus_a = extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
        if self.parameterization == "x0":
            return (x_t - sqrt_a * output) / sqrt_one_minus_a
        return sqrt_a * output + sqrt_one_minus_a * x_t

    def q_posterior(self, x_start, x_t, t):
        mean = (extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        variance = extract_into_tensor(self.posterior_variance, t, x_t.shape)
        log_variance = extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        noise = default(noise, lambda: torch.randn_like(x_start))
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def get_loss(self, pred, target, mean=True):
        if self.loss_type == "l1":
            loss = (target - pred).abs()
            return loss.mean() if mean else loss
        return torch.nn.functional.mse_loss(target, pred, reduction="mean" if mean else "none")

    def sample_timesteps(self, batch_size: int) -> torch.Tensor:
        """Uniform t in [0, T) per sample, on the model's device (the reference's draw)."""
        return torch.randint(0, self.num_timesteps, (batch_size,), device=self.device).long()

    def diffusion_loss(self, model_output, target, t, prefix):
        """The ldm objective from the per-element error; returns (loss, loss_dict)."""
        loss_dict = {}
        per_sample = self.get_loss(model_output, target, mean=False).mean(dim=list(range(1, target.ndim)))
        loss_dict[f"{prefix}/loss_simple"] = per_sample.mean()
        logvar_t = self.logvar[t]
        loss = per_sample / torch.exp(logvar_t) + logvar_t
        if self.learn_logvar:
            loss_dict[f"{prefix}/loss_gamma"] = loss.mean()
            loss_dict["logvar"] = self.logvar.data.mean()
        loss = self.l_simple_weight * loss.mean()
        loss_vlb = (self.lvlb_weights[t] * per_sample).mean()
        loss_dict[f"{prefix}/loss_vlb"] = loss_vlb
        loss = loss + self.original_elbo_weight * loss_vlb
        loss_dict[f"{prefix}/loss"] = loss
        return loss, loss_dict

    def p_losses(self, x_start, t, noise=None):
        noise = default(noise, lambda: torch.randn_like(x_start))
        model_out = self.model(self.q_sample(x_start, t, noise), t)
        target = self.training_target(x_start, noise, t)
        return self.diffusion_loss(model_out, target, t, "train" if self.training else "val")

    def forward(self, x, *args, t=None, noise=None, **kwargs):
        t = default(t, lambda: self.sample_timesteps(x.shape[0]))
        return self.p_losses(x, t, *args, noise=noise, **kwargs)

    # -- ancestral sampling (Ho et al. 2020, algorithm 2) ---------------------------------------------

    def x0_from_output(self, x_t, t, output):
        """The x_0 estimate implied by a network output at (x_t, t): for eps the reference's
        `predict_start_from_noise`, for x0 the output itself, for v sqrt(abar_t) x_t - sqrt(1 - abar_t) v
        (SD 2.x's `predict_start_from_z_and_v`)."""
        if self.parameterization == "eps":
            return self.predict_start_from_noise(x_t, t=t, noise=output)
        if self.parameterization == "x0":
            return output
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * output)

    def posterior_from_output(self, x, t, model_out, clip_denoised: bool):
        """(mean, variance, log_variance, x0) of p(x_{t-1} | x_t): the posterior q(x_{t-1} | x_t, x0) at the
        network's x0 estimate, clamped in place to [-1, 1] with `clip_denoised` (as the reference)."""
        x_recon = self.x0_from_output(x, t, model_out)
        if clip_denoised:
            x_recon.clamp_(-1.0, 1.0)
        mean, variance, log_variance = self.q_posterior(x_start=x_recon, x_t=x, t=t)
        return mean, variance, log_variance, x_recon

    @staticmethod
    def posterior_draw(mean, log_variance, t, noise=None, generator=None, repeat_noise=False, temperature=1.0,
                       noise_dropout=0.0):
        """mean + exp(0.5 log_variance) * noise, without noise where t == 0. Unless `noise` is given, one
        standard normal draw of mean's shape per call (also at t == 0, keeping the reference's RNG stream),
        from `generator` or the global RNG."""
        if noise is None:
            noise = noise_like(mean.shape, mean.device, repeat_noise, generator=generator)
        noise = noise * temperature
        if noise_dropout > 0.0:
            noise = torch.nn.functional.dropout(noise, p=noise_dropout)
        nonzero_mask = (1 - (t == 0).float()).reshape(mean.shape[0], *((1,) * (mean.ndim - 1)))
        return mean + nonzero_mask * (0.5 * log_variance).exp() * noise

    def p_mean_variance(self, x, t, clip_denoised: bool):
        model_out = self.model(x, t)
        mean, variance, log_variance, _ = self.posterior_from_output(x, t, model_out, clip_denoised)
        return mean, variance, log_variance

    @torch.no_grad()
    def p_sample(self, x, t, clip_denoised=True, repeat_noise=False, noise=None, generator=None):
        """One ancestral step x_t -> x_{t-1}; `noise` (or `generator`) replaces the global-RNG draw."""
        mean, _, log_variance = self.p_mean_variance(x=x, t=t, clip_denoised=clip_denoised)
        return self.posterior_draw(mean, log_variance, t, noise, generator, repeat_noise)

    @torch.no_grad()
    def p_sample_loop(self, shape, return_intermediates=False, x_T=None, verbose=True, generator=None):
        """From x_T ~ N(0, I) (or `x_T`) through t = T-1, ..., 0; intermediates every `log_every_t`."""
        device = self.betas.device
        b = shape[0]
        img = torch.randn(shape, device=device, generator=generator) if x_T is None else x_T.to(device)
        intermediates = [img]
        for i in tqdm(reversed(range(0, self.num_timesteps)), desc="Sampling t", total=self.num_timesteps,
                      disable=not verbose):
            img = self.p_sample(img, torch.full((b,), i, device=device, dtype=torch.long),
                                clip_denoised=self.clip_denoised, generator=generator)
            if i % self.log_every_t == 0 or i == self.num_timesteps - 1:
                intermediates.append(img)
        if return_intermediates:
            return img, intermediates
        return img

    @torch.no_grad()
    def sample(self, batch_size=16, return_intermediates=False, **kwargs):
        """`batch_size` ancestral samples of shape (channels, image_size, image_size)."""
        shape = (batch_size, self.channels, self.image_size, self.image_size)
        return self.p_sample_loop(shape, return_intermediates=return_intermediates, **kwargs)

    # -- Lightning -----------------------------------------------------------------------------------

    def get_input(self, batch, k):
        """Batch images [B, H, W, C] (channel-last, as the datasets give) -> [B, C, H, W] float."""
        return images_from_batch(batch, k)

    def shared_step(self, batch, **kwargs):
        return self(self.get_input(batch, self.first_stage_key), **kwargs)

    def training_step(self, batch, batch_idx):
        with self.saved_activations_scope():
            loss, loss_dict = self.shared_step(batch)
        self.log_dict(loss_dict, prog_bar=True, logger=True, on_step=True, on_epoch=True)
        self.log("global_step", float(self.global_step), prog_bar=True, logger=True, on_step=True, on_epoch=False)
        return loss

    def saved_activations_scope(self):
        """The forward of a training step: what autograd saves for backward is stored as the
        `saved_activations` option says (ldm/modules/saved_activations.py)."""
        return saved_activations(STORAGE_DTYPES[self.saved_activations], self)

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        _, loss_dict = self.shared_step(batch)
        with self.ema_scope():
            _, loss_dict_ema = self.shared_step(batch)
        loss_dict_ema = {f"{k}_ema": v for k, v in loss_dict_ema.items()}
        self.log_dict(loss_dict, prog_bar=False, logger=True, on_step=False, on_epoch=True)
        self.log_dict(loss_dict_ema, prog_bar=False, logger=True, on_step=False, on_epoch=True)

    def configure_optimizers(self):
        self.check_trainable()
        params = list(self.model.parameters())
        if self.learn_logvar:
            params.append(self.logvar)
        return self.with_scheduler(torch.optim.AdamW(params, lr=self.learning_rate))

    def with_scheduler(self, optimizer):
        """The optimizer, with the `scheduler_config` schedule (a per-step LR multiplier) when one is set."""
        if not self.use_scheduler:
            return optimizer
        schedule = instantiate_from_config(self.scheduler_config)
        if getattr(schedule, "lr_max_decay_steps", 0) is None:  # "the run's length"
            max_steps = self.trainer.max_steps if self._trainer is not None else -1
            if max_steps is None or max_steps < 1:
                raise ValueError("scheduler_config: max_decay_steps is null but the run sets no max_steps")
            schedule.set_decay_steps(max_steps)
        logger.info("Setting up LambdaLR scheduler...")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule.schedule)
        return [optimizer], [{"scheduler": scheduler, "interval": "step", "frequency": 1}]


class LatentDiffusion(DDPM):
    """Diffusion in the latent space of a frozen first stage, conditioned by a text encoder.

    With a `personalization_config` (Textual Inversion), the UNet and the text encoder are frozen and an
    embedding manager supplies the trainable pseudo-word vectors (`textual_inversion.py`).
    `release_first_stage` (training only, off by default): at train start the latents of every training and
    validation image are cached, then the autoencoder is freed; its decoder is read back from `ckpt_path`
    while previews are drawn (`first_stage_release.py`).
    """

    def __init__(
        self,
        first_stage_config,
        cond_stage_config,
        personalization_config=None,
        num_timesteps_cond=None,
        cond_stage_key="image",
        cond_stage_trainable=False,
        concat_mode=True,
        cond_stage_forward=None,
        conditioning_key=None,
        scale_factor=1.0,
        scale_by_std=False,
        cache_first_stage=None,
        release_first_stage=False,
        *args,
        **kwargs,
    ):
        self.num_timesteps_cond = default(num_timesteps_cond, 1)
        self.scale_by_std = scale_by_std
        timesteps = kwargs.get("timesteps", 1000)
        if self.num_timesteps_cond > timesteps:
            raise ValueError(f"num_timesteps_cond ({self.num_timesteps_cond}) exceeds timesteps ({timesteps})")
        if self.num_timesteps_cond > 1:
            raise NotImplementedError("num_timesteps_cond > 1 (shortened conditioning schedule) is not supported")
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__":
            conditioning_key = None
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", ())
        if self.meta_init is None:  # set before nn.Module.__init__, as num_timesteps_cond above
            self.meta_init = checkpoint_fills(ckpt_path, ignore_keys)
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        try:
            self.num_downs = len(first_stage_config.params.ddconfig.ch_mult) - 1
        except (AttributeError, KeyError):
            self.num_downs = 0
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        else:
            self.scale_factor = scale_factor
        text_options = kernel_options(kwargs.get("attention", "math"))
        with self.weights_device():
            self.instantiate_first_stage(first_stage_config)
            self.instantiate_cond_stage(with_params(cond_stage_config, text_options, only_if_accepted=True))
        self.store_if_frozen(self.first_stage_model)
        self.store_if_frozen(self.cond_stage_model)
        text_encoder = self.cond_stage_model not in (None, self.first_stage_model)  # compared by identity
        if self.small_gemm and text_encoder:
            use_small_gemm(self.cond_stage_model)  # the text encoder's wide products (BERT's feed-forward)
        self.cond_stage_forward = cond_stage_forward
        self.clip_denoised = False
        self.restarted_from_ckpt = False
        # Posterior moments of the (few) training images are cached: exact, see latent_cache.py. None: on
        # for textual inversion, off otherwise (a large dataset would rarely hit).
        if cache_first_stage is None:
            cache_first_stage = personalization_config is not None
        self.latent_cache = LatentCache() if cache_first_stage else None
        self.first_stage_release = None
        if release_first_stage:
            if self.latent_cache is None or not isinstance(self.first_stage_model, AutoencoderKL):
                raise ValueError("release_first_stage needs an AutoencoderKL first stage and the latent "
                                 "cache (model.params.cache_first_stage)")
            if ckpt_path is None or self.cond_stage_model is self.first_stage_model:
                raise ValueError("release_first_stage reads the freed autoencoder back from "
                                 "model.params.ckpt_path (set it) and needs a text encoder of its own")
            self.first_stage_release = FirstStageRelease(ckpt_path)
        self.embedding_manager = None
        manager_state = {}
        if ckpt_path is not None:
            manager_state = self.init_from_ckpt(ckpt_path, ignore_keys)
            self.check_filled(ckpt_path)
            self.restarted_from_ckpt = True
            self.apply_memory_format()

        if personalization_config is not None:
            # Textual Inversion: the manager is built after the weights are loaded, so its initial vectors
            # come from the loaded text encoder (the reference's order of construction).
            if not self.unfreeze_model:
                freeze(self.cond_stage_model)
                freeze(self.model)
            self.embedding_manager = build_embedding_manager(personalization_config, self.cond_stage_model)
            if manager_state:
                load_state_dict_into(self.embedding_manager, manager_state, allow_missing=("initial_embeddings.",),
                                     source_name=f"{ckpt_path} (embedding_manager.*)")
            if self.freeze_embedding:  # pivotal tuning: the word and the text encoder stay fixed
                freeze(self.cond_stage_model)
                for p in self.embedding_manager.embedding_parameters():
                    p.requires_grad = False
        elif manager_state:
            logger.info("ignored %d embedding_manager.* tensors of %s: no personalization_config",
                        len(manager_state), ckpt_path)

    def init_from_ckpt(self, path, ignore_keys=(), only_model=False):
        """Load everything but the embedding manager strictly; return the manager's tensors (prefix
        stripped), which can only be loaded once the manager exists."""
        if only_model:
            super().init_from_ckpt(path, ignore_keys, only_model=True)
            return {}
        ckpt = open_checkpoint(path)
        prefix = "embedding_manager."
        manager_keys = [k for k in ckpt.tensors if k.startswith(prefix)]
        check_finite({k: ckpt.tensors[k] for k in manager_keys}, str(path))
        manager_state = {k[len(prefix):]: ckpt.tensors.pop(k) for k in manager_keys}
        load_state_dict_into(self, ckpt, ignore_keys=ignore_keys)
        return manager_state

    @torch.no_grad()
    def on_train_batch_start(self, batch, batch_idx):
        """With `scale_by_std`, set scale_factor = 1 / std(z) from the very first training batch, so the
        latents the UNet sees have unit variance (Rombach et al., section 4.3.2)."""
        if self.scale_by_std and self.global_step == 0 and batch_idx == 0 and not self.restarted_from_ckpt:
            x = DDPM.get_input(self, batch, self.first_stage_key).to(self.device)
            z = self.encode_first_stage(x).sample()
            self.scale_factor.copy_(1.0 / z.flatten().std())
            logger.info("setting scale_factor to %.5f (1 / std of the first batch's latents)", self.scale_factor)

    # -- stages --------------------------------------------------------------------------------------

    def instantiate_first_stage(self, config):
        self.first_stage_model = instantiate_from_config(config)
        freeze(self.first_stage_model)

    def instantiate_cond_stage(self, config):
        if self.cond_stage_trainable:
            # Trainable: the text encoder runs inside the autograd graph in forward(), so the gradient
            # reaches the embedding vectors through it (freezing is done by textual_inversion.freeze).
            self.cond_stage_model = instantiate_from_config(config)
            return
        if config == "__is_first_stage__":
            self.cond_stage_model = self.first_stage_model
        elif config == "__is_unconditional__":
            self.cond_stage_model = None
        else:
            self.cond_stage_model = instantiate_from_config(config)
            freeze(self.cond_stage_model)

    # -- first stage ---------------------------------------------------------------------------------

    def get_first_stage_encoding(self, encoder_posterior, noise=None):
        """scale_factor * z, with z sampled from the posterior (CPU-drawn noise unless given)."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(noise=noise)
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise NotImplementedError(f"encoder_posterior of type '{type(encoder_posterior)}' not yet implemented")
        return self.scale_factor * z

    @torch.no_grad()
    def encode_first_stage(self, x):
        if self.latent_cache is not None and isinstance(self.first_stage_model, AutoencoderKL):
            return DiagonalGaussianDistribution(self.latent_cache.moments(x, self.first_stage_moments))
        return self.first_stage_model.encode(x)

    def first_stage_moments(self, x):
        """Posterior moments [B, 2 * embed_dim, h, w] of images x from the autoencoder (what the cache
        holds)."""
        return self.first_stage_model.encode(x).parameters

    def differentiable_decode_first_stage(self, z, predict_cids=False, force_not_quantize=False):
        if predict_cids:
            raise NotImplementedError("predict_cids is not supported")
        z = (1.0 / self.scale_factor) * z  # multiply by the reciprocal, as the reference (1-ulp exact)
        if hasattr(self.first_stage_model, "quantize"):
            return self.first_stage_model.decode(z, force_not_quantize=force_not_quantize)
        return self.first_stage_model.decode(z)

    @torch.no_grad()
    def decode_first_stage(self, z, predict_cids=False, force_not_quantize=False):
        return self.differentiable_decode_first_stage(z, predict_cids, force_not_quantize)

    # -- release_first_stage (first_stage_release.py) ------------------------------------------------

    def on_train_start(self):
        """With `release_first_stage`: cache the latents of every image the train and validation loaders can
        yield, then free the encoder and the decoder."""
        if self.first_stage_release is None:
            return
        self.cache_and_release([(distinct_images(getattr(loader, "dataset", loader), split),
                                 getattr(loader, "batch_size", None) or 1) for split, loader in loaders(self.trainer)])

    def cache_and_release(self, groups) -> None:
        """Cache the latents of every (images, batch size) group, then free the autoencoder's encoder and
        decoder (`release_first_stage`; training does it at train start)."""
        added = sum(self.cache_images(arrays, batch_size) for arrays, batch_size in groups)
        self.first_stage_release.free(self.first_stage_model, "encoder", "decoder")
        left = sum(p.numel() for p in self.first_stage_model.parameters())
        logger.info("release_first_stage: %d latents cached (%d in all); autoencoder freed, %d of its "
                    "parameters left", added, len(self.latent_cache), left)

    @torch.no_grad()
    def cache_images(self, arrays, batch_size: int) -> int:
        """Put the latent moments of `arrays` (images [H, W, C] as a dataset yields them) in the latent cache:
        those not cached yet, encoded `batch_size` at a time (the last batch filled up with others), as
        training batches of that size encode them. Returns how many were added."""
        if not len(arrays):
            return 0
        images = DDPM.get_input(self, {self.first_stage_key: stack_images(arrays)}, self.first_stage_key)
        new, seen = [], set()
        for i, x in enumerate(images):
            key = LatentCache.key(x)
            if key not in self.latent_cache and key not in seen:
                seen.add(key)
                new.append(i)
        for group in padded_batches(len(new), batch_size):
            batch = images[[new[i] for i in group]].to(self.device)
            self.latent_cache.moments(batch, self.first_stage_moments)
        return len(new)

    def restore_first_stage(self) -> None:
        """Read back from `ckpt_path` what `release_first_stage` freed (a no-op when nothing is freed)."""
        if self.first_stage_release is not None:
            self.first_stage_release.restore(self.first_stage_model, self.device)

    # -- conditioning --------------------------------------------------------------------------------

    def get_learned_conditioning(self, c):
        """Encode conditioning (e.g. a list of prompts); every encode goes through the embedding manager."""
        if self.embedding_manager is not None and isinstance(c, (list, tuple)):
            self.embedding_manager.warn_unmatched(c)
        if self.cond_stage_forward is None:
            if callable(getattr(self.cond_stage_model, "encode", None)):
                c = self.cond_stage_model.encode(c, embedding_manager=self.embedding_manager)
                if isinstance(c, DiagonalGaussianDistribution):
                    c = c.mode()
                return c
            return self.cond_stage_model(c)
        return getattr(self.cond_stage_model, self.cond_stage_forward)(c)

    @torch.no_grad()
    def get_input(self, batch, k, return_first_stage_outputs=False, force_c_encode=False, cond_key=None,
                  return_original_cond=False, bs=None, posterior_noise=None):
        """Return [z, c] (+ x, decoded z, original cond when asked) for a batch; no gradients.

        With a trainable cond stage (every TI config) `c` stays raw text, encoded later with grad.
        """
        x = super().get_input(batch, k)
        if bs is not None:
            x = x[:bs]
        x = x.to(self.device)
        z = self.get_first_stage_encoding(self.encode_first_stage(x), noise=posterior_noise).detach()

        c = xc = None
        if self.model.conditioning_key is not None:
            cond_key = default(cond_key, self.cond_stage_key)
            if cond_key != self.first_stage_key:
                if cond_key in ("caption", "coordinates_bbox", "txt"):
                    xc = batch[cond_key]
                elif cond_key == "class_label":
                    xc = batch
                else:
                    xc = super().get_input(batch, cond_key).to(self.device)
            else:
                xc = x
            c = xc
            if not self.cond_stage_trainable or force_c_encode:
                c = self.get_learned_conditioning(xc if isinstance(xc, (dict, list)) else xc.to(self.device))
            if bs is not None:
                c = c[:bs]
        out = [z, c]
        if return_first_stage_outputs:
            out.extend([x, self.decode_first_stage(z)])
        if return_original_cond:
            out.append(xc)
        return out

    def shared_step(self, batch, posterior_noise=None, **kwargs):
        x, c = self.get_input(batch, self.first_stage_key, posterior_noise=posterior_noise)
        return self(x, c, **kwargs)

    def forward(self, x, c, *args, t=None, noise=None, **kwargs):
        t = default(t, lambda: self.sample_timesteps(x.shape[0]))
        if self.model.conditioning_key is not None:
            if c is None:
                raise ValueError("conditioning is required for a conditional model")
            if self.cond_stage_trainable:
                c = self.get_learned_conditioning(c)
        return self.p_losses(x, c, t, *args, noise=noise, **kwargs)

    # -- denoiser and loss ---------------------------------------------------------------------------

    def apply_model(self, x_noisy, t, cond, return_ids=False):
        """eps_theta(x_t, t, cond); a bare tensor or list cond goes under c_concat or c_crossattn."""
        if return_ids:
            raise NotImplementedError("return_ids is not supported")
        if not isinstance(cond, dict):
            if not isinstance(cond, list):
                cond = [cond]
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        out = self.model(x_noisy, t, **cond)
        return out[0] if isinstance(out, tuple) else out

    def p_losses(self, x_start, cond, t, noise=None):
        """The ldm objective plus the optional embedding regulariser of Textual Inversion."""
        noise = default(noise, lambda: torch.randn_like(x_start))
        model_output = self.apply_model(self.q_sample(x_start, t, noise), t, cond)
        target = self.training_target(x_start, noise, t)
        prefix = "train" if self.training else "val"
        loss, loss_dict = self.diffusion_loss(model_output, target, t, prefix)
        if self.embedding_reg_weight > 0 and self.embedding_manager is not None:
            reg = embedding_regularization(self.embedding_manager, self.embedding_reg_form)
            loss_dict[f"{prefix}/loss_emb_reg"] = reg
            loss = loss + self.embedding_reg_weight * reg
            loss_dict[f"{prefix}/loss"] = loss
        return loss, loss_dict

    # -- sampling and preview images ------------------------------------------------------------------

    @torch.no_grad()
    def p_mean_variance(self, x, c, t, clip_denoised: bool, return_codebook_ids=False,
                        quantize_denoised=False, return_x0=False, score_corrector=None, corrector_kwargs=None,
                        unconditional_guidance_scale=1.0, unconditional_conditioning=None):
        """Posterior (mean, variance, log_variance[, x0]) at the denoiser's x0 estimate for cond `c`.

        Guidance (`unconditional_*`, as the DDIM sampler's; docs/DIFFERENCES.md#ddpm-ancestral-sampler)
        mixes the raw outputs before the conversion to x0; the default is the reference's plain call.
        """
        if return_codebook_ids:
            raise NotImplementedError("return_codebook_ids is not supported (dropped upstream)")
        model_out = guided_output(self, x, t, c, unconditional_guidance_scale, unconditional_conditioning)
        if score_corrector is not None:
            if self.parameterization != "eps":
                raise ValueError("score_corrector needs an eps-prediction model")
            model_out = score_corrector.modify_score(self, model_out, x, t, c, **(corrector_kwargs or {}))
        model_mean, posterior_variance, posterior_log_variance, x_recon = self.posterior_from_output(
            x, t, model_out, clip_denoised)
        if quantize_denoised:
            x_recon = self.first_stage_model.quantize(x_recon)[0]
            model_mean, posterior_variance, posterior_log_variance = self.q_posterior(
                x_start=x_recon, x_t=x, t=t)
        if return_x0:
            return model_mean, posterior_variance, posterior_log_variance, x_recon
        return model_mean, posterior_variance, posterior_log_variance

    @torch.no_grad()
    def p_sample(self, x, c, t, clip_denoised=False, repeat_noise=False, return_codebook_ids=False,
                 quantize_denoised=False, return_x0=False, temperature=1.0, noise_dropout=0.0,
                 score_corrector=None, corrector_kwargs=None, unconditional_guidance_scale=1.0,
                 unconditional_conditioning=None, noise=None, generator=None):
        """One ancestral step x_t -> x_{t-1} (no noise at t == 0); `noise` (or `generator`) replaces the
        global-RNG draw. Returns x_{t-1}, or (x_{t-1}, x0) with `return_x0`."""
        outputs = self.p_mean_variance(x=x, c=c, t=t, clip_denoised=clip_denoised,
                                       return_codebook_ids=return_codebook_ids,
                                       quantize_denoised=quantize_denoised, return_x0=True,
                                       score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
                                       unconditional_guidance_scale=unconditional_guidance_scale,
                                       unconditional_conditioning=unconditional_conditioning)
        model_mean, _, model_log_variance, x0 = outputs
        x_prev = self.posterior_draw(model_mean, model_log_variance, t, noise, generator, repeat_noise,
                                     temperature, noise_dropout)
        return (x_prev, x0) if return_x0 else x_prev

    @torch.no_grad()
    def p_sample_loop(self, cond, shape, return_intermediates=False, x_T=None, verbose=True, callback=None,
                      timesteps=None, quantize_denoised=False, mask=None, x0=None, img_callback=None,
                      start_T=None, log_every_t=None, generator=None, unconditional_guidance_scale=1.0,
                      unconditional_conditioning=None):
        """Ancestral sampling from x_T ~ N(0, I) (or `x_T`) through t = timesteps-1, ..., 0 (timesteps
        defaults to T, capped by `start_T`); intermediates every `log_every_t` (default the model's), as
        the reference. `generator` drives x_T, every step's noise and the masked q_sample."""
        if not log_every_t:
            log_every_t = self.log_every_t
        device = self.betas.device
        b = shape[0]
        img = torch.randn(shape, device=device, generator=generator) if x_T is None else x_T.to(device)
        intermediates = [img]
        if timesteps is None:
            timesteps = self.num_timesteps
        if start_T is not None:
            timesteps = min(timesteps, start_T)
        if mask is not None and (x0 is None or x0.shape[2:3] != mask.shape[2:3]):
            raise ValueError("mask needs x0 of the same spatial size")
        iterator = tqdm(reversed(range(0, timesteps)), desc="Sampling t", total=timesteps,
                        disable=not verbose)
        for i in iterator:
            ts = torch.full((b,), i, device=device, dtype=torch.long)
            img = self.p_sample(img, cond, ts, clip_denoised=self.clip_denoised,
                                quantize_denoised=quantize_denoised,
                                unconditional_guidance_scale=unconditional_guidance_scale,
                                unconditional_conditioning=unconditional_conditioning, generator=generator)
            if mask is not None:
                q_noise = None if generator is None else torch.randn(
                    x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
                img_orig = self.q_sample(x0, ts, noise=q_noise)
                img = img_orig * mask + (1.0 - mask) * img
            if i % log_every_t == 0 or i == timesteps - 1:
                intermediates.append(img)
            if callback:
                callback(i)
            if img_callback:
                img_callback(img, i)
        if return_intermediates:
            return img, intermediates
        return img

    @torch.no_grad()
    def sample(self, cond, batch_size=16, return_intermediates=False, x_T=None, verbose=True, timesteps=None,
               quantize_denoised=False, mask=None, x0=None, shape=None, **kwargs):
        """`batch_size` ancestral samples (latents of shape (channels, image_size, image_size) unless
        `shape`); `cond` is cut to the batch size. Further keywords go to `p_sample_loop` (generator,
        guidance, callbacks...)."""
        if shape is None:
            shape = (batch_size, self.channels, self.image_size, self.image_size)
        if cond is not None:
            if isinstance(cond, dict):
                cond = {key: cond[key][:batch_size] if not isinstance(cond[key], list)
                        else [x[:batch_size] for x in cond[key]] for key in cond}
            else:
                cond = [c[:batch_size] for c in cond] if isinstance(cond, list) else cond[:batch_size]
        return self.p_sample_loop(cond, shape, return_intermediates=return_intermediates, x_T=x_T,
                                  verbose=verbose, timesteps=timesteps, quantize_denoised=quantize_denoised,
                                  mask=mask, x0=x0, **kwargs)

    @torch.no_grad()
    def sample_log(self, cond, batch_size, ddim=True, ddim_steps=200, **kwargs):
        """Samples of latent shape (channels, image_size, image_size); returns (samples, intermediates).

        ddim=True: the DDIM sampler in `ddim_steps` steps (intermediates a dict). ddim=False: ancestral
        sampling through all T steps (`sample`, intermediates a list); `ddim_steps` and `eta` are DDIM
        settings and are ignored there, as in the reference.
        """
        if not ddim:
            kwargs.pop("eta", None)
            return self.sample(cond=cond, batch_size=batch_size, return_intermediates=True, **kwargs)
        from ldm.models.diffusion.ddim import DDIMSampler

        shape = (self.channels, self.image_size, self.image_size)
        return DDIMSampler(self).sample(ddim_steps, batch_size, shape, cond, verbose=False, **kwargs)

    @torch.no_grad()
    @with_decoder
    def log_images(self, batch, N=8, n_row=4, sample=True, ddim_steps=200, ddim_eta=1.0, return_keys=None,
                   quantize_denoised=True, inpaint=False, plot_denoise_rows=False, plot_progressive_rows=False,
                   plot_diffusion_rows=False, unconditional_guidance_scale=5.0, split=None, ddim=None):
        """Preview panels in [-1, 1], as the reference: inputs, reconstruction, conditioning (captions as
        images), samples (DDIM, eta 1, no guidance) and samples_scaled (same with guidance 5, the TI
        addition).
        As the reference, `ddim_steps=None` samples ancestrally (all T steps) instead of with DDIM; `ddim`
        (True/False) overrides that choice. `split` ("train"/"val", passed by the ImageLogger) does not
        change the panels."""
        use_ddim = ddim_steps is not None if ddim is None else bool(ddim)
        if inpaint or plot_denoise_rows or plot_progressive_rows or plot_diffusion_rows:
            raise NotImplementedError("inpaint and denoise/progressive/diffusion rows are not supported")
        z, c, x, xrec, xc = self.get_input(batch, self.first_stage_key, return_first_stage_outputs=True,
                                           force_c_encode=True, return_original_cond=True, bs=N)
        n = min(x.shape[0], N)
        log = {"inputs": x, "reconstruction": xrec}
        if self.model.conditioning_key is not None and self.cond_stage_key in ("caption", "txt"):
            log["conditioning"] = log_txt_as_img((x.shape[2], x.shape[3]), list(xc)[:n]).to(x)
        if sample:
            with self.ema_scope("Plotting"):
                samples, _ = self.sample_log(c, n, ddim=use_ddim, ddim_steps=ddim_steps, eta=ddim_eta)
            log["samples"] = self.decode_first_stage(samples)
            if self.cond_stage_model is not None and self.cond_stage_key in ("caption", "txt"):
                uc = self.get_learned_conditioning(n * [""])
                with self.ema_scope("Plotting"):
                    samples, _ = self.sample_log(c, n, ddim=use_ddim, ddim_steps=ddim_steps, eta=ddim_eta,
                                                 unconditional_guidance_scale=unconditional_guidance_scale,
                                                 unconditional_conditioning=uc)
                log["samples_scaled"] = self.decode_first_stage(samples)
        if return_keys:
            log = {k: v for k, v in log.items() if k in return_keys} or log
        return log

    # -- optimisation --------------------------------------------------------------------------------

    def configure_optimizers(self):
        self.check_trainable()
        if self.embedding_manager is None:
            params = list(self.model.parameters())
            if self.cond_stage_trainable:
                params += list(self.cond_stage_model.parameters())
            if self.learn_logvar:
                params.append(self.logvar)
            return self.with_scheduler(torch.optim.AdamW(params, lr=self.learning_rate))
        if self.freeze_embedding:  # pivotal tuning, stage 2: the UNet alone, at model_lr
            if not self.unfreeze_model:
                raise ValueError("freeze_embedding with unfreeze_model false leaves nothing to train; set "
                                 "model.params.unfreeze_model=true (pivotal tuning trains the UNet)")
            return self.with_scheduler(torch.optim.AdamW(self.model.parameters(), lr=self.model_lr))
        extra = None
        if self.unfreeze_model:
            extra = list(self.cond_stage_model.parameters()) + list(self.model.parameters())
        return self.with_scheduler(make_optimizer(self.embedding_manager, self.learning_rate, extra, self.model_lr))

    # -- checkpoints (Textual Inversion) -------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint):
        release = self.first_stage_release
        if release is not None and release.freed and (self.embedding_manager is None or self.unfreeze_model):
            # A full checkpoint gets the freed weights, read back (a slim one holds no frozen weights).
            checkpoint["state_dict"].update(release.freed_state_dict(self.first_stage_model, self.device))
        if self.embedding_manager is None:
            return
        # The progressive-words schedule position, so --resume continues it (the reference restarted it,
        # docs/DIFFERENCES.md#progressive-counter-resumed). Kept outside the state dict, whose keys stay
        # the official ones.
        checkpoint[PROGRESSIVE_COUNTER_KEY] = int(self.embedding_manager.progressive_counter)
        if not self.unfreeze_model:
            checkpoint["state_dict"] = slim_state_dict(checkpoint["state_dict"])
            checkpoint["textual_inversion_slim"] = True
        trainer = self._trainer
        dirpath = getattr(getattr(trainer, "checkpoint_callback", None), "dirpath", None)
        if trainer is not None and trainer.is_global_zero and dirpath and os.path.isdir(dirpath):
            save_embedding_files(self.embedding_manager, dirpath, self.global_step)

    def on_load_checkpoint(self, checkpoint):
        self.restore_first_stage()  # load into the whole model
        if checkpoint.pop("textual_inversion_slim", False):
            checkpoint["state_dict"] = complete_state_dict(checkpoint["state_dict"], self.state_dict())
        if self.embedding_manager is not None and PROGRESSIVE_COUNTER_KEY in checkpoint:  # absent in older files
            self.embedding_manager.progressive_counter = int(checkpoint[PROGRESSIVE_COUNTER_KEY])


class DiffusionWrapper(pl.LightningModule):
    """Holds the UNet as `diffusion_model` (checkpoint keys `model.diffusion_model.*`) and routes the
    conditioning by `conditioning_key`."""

    def __init__(self, diff_model_config, conditioning_key):
        super().__init__()
        if conditioning_key not in (None, "concat", "crossattn", "hybrid", "adm"):
            raise ValueError(f"unknown conditioning_key '{conditioning_key}'")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_concat: list | None = None, c_crossattn: list | None = None) -> Any:
        key = self.conditioning_key
        if key is None:
            return self.diffusion_model(x, t)
        if key == "concat":
            return self.diffusion_model(torch.cat([x, *c_concat], dim=1), t)
        if key == "crossattn":
            return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))
        if key == "hybrid":
            return self.diffusion_model(torch.cat([x, *c_concat], dim=1), t, context=torch.cat(c_crossattn, 1))
        return self.diffusion_model(x, t, y=c_crossattn[0])
