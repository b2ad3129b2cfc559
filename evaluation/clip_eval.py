"""CLIP metrics of the Textual Inversion paper: reconstruction (image similarity) and editability (text
similarity), as the official `evaluation/clip_eval.py` (rinongal/textual_inversion @ 424192de).

Definitions [PRESERVE], with every feature L2-normalised:

* image similarity `img_to_img_similarity(src, gen)` = mean of the full |src| x |gen| matrix of cosines
  between the training images and the generated images ("reconstruction");
* text similarity `txt_to_img_similarity(text, gen)` = mean over the generated images of the cosine between
  the image and the prompt ("editability"); the evaluators pass the prompt with every `*` deleted (only
  that character, as the reference: "A photo of * on the moon" -> "A photo of  on the moon", the tokenizer
  collapses the double space).

Both are RAW cosine similarities in [-1, 1] (the paper reports text similarity around 0.26 for LDM). They
are not CLIPScore, which is 2.5 * max(cos, 0) (used e.g. by Custom Diffusion), so multiply by 2.5 before
comparing with CLIPScore tables.

Paper defaults: CLIP ViT-B/32, 64 samples per prompt, 50 DDIM steps, guidance scale 5.0, eta 0.

Local changes: CLIP comes from Hugging Face transformers (`CLIPModel` + `CLIPTokenizer`, a hub id such as
"openai/clip-vit-base-patch32" or a local folder; the OpenAI names "ViT-B/32" etc. are mapped to their
hub ids) instead of the OpenAI `clip` package; it runs in float32 unless a dtype is given (the reference ran
fp16 weights on CUDA, see docs/DIFFERENCES.md#clip-float32); the image preprocessing is
`evaluation.preprocess` (PIL path by default, the
reference's tensor path on request); the guidance scale, batch size and sampling generator are arguments;
`n_samples` need not be a multiple of the batch size; the latent shape comes from the model instead of
the hard-coded LDM [4, 32, 32]; per-sample similarities are available for confidence intervals.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from evaluation.preprocess import CLIP_IMAGE_SIZE, PREPROCESS_MODES, preprocess_pil, preprocess_tensor

logger = logging.getLogger(__name__)

#: The OpenAI `clip.load` names used by the reference, mapped to the same weights on the Hugging Face hub.
OPENAI_CLIP_NAMES = {
    "ViT-B/32": "openai/clip-vit-base-patch32",
    "ViT-B/16": "openai/clip-vit-base-patch16",
    "ViT-L/14": "openai/clip-vit-large-patch14",
    "ViT-L/14@336px": "openai/clip-vit-large-patch14-336",
}
DEFAULT_CLIP_MODEL = "ViT-B/32"
PLACEHOLDER = "*"
METRIC_NOTE = (
    "raw cosine similarity of L2-normalised CLIP features (not CLIPScore, which is 2.5 * max(cos, 0))"
)


def remove_placeholder(text: str, placeholder: str = PLACEHOLDER) -> str:
    """The prompt the text similarity is measured against: every `placeholder` character deleted."""
    return text.replace(placeholder, "")


_OFFLINE_HINT = (
    "Pass a local folder holding config.json, the weights, vocab.json and merges.txt, or make the hub id "
    "available offline (e.g. `hf download openai/clip-vit-base-patch32`)."
)


def load_clip_model(name_or_path: str):
    """A `CLIPModel` from a hub id, an OpenAI name ("ViT-B/32") or a local folder."""
    from transformers import CLIPModel

    source = OPENAI_CLIP_NAMES.get(name_or_path, name_or_path)
    try:
        return CLIPModel.from_pretrained(source)
    except OSError as e:
        raise FileNotFoundError(f"cannot load CLIP from '{source}': {e}. {_OFFLINE_HINT}") from e


def load_clip_tokenizer(name_or_path: str):
    """A `CLIPTokenizer` from a hub id, an OpenAI name or a local folder; an empty vocabulary is an error."""
    from transformers import CLIPTokenizer

    source = OPENAI_CLIP_NAMES.get(name_or_path, name_or_path)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source)
    except OSError as e:
        raise FileNotFoundError(
            f"cannot load the CLIP tokenizer from '{source}': {e}. {_OFFLINE_HINT}"
        ) from e
    # transformers 5 returns a tokenizer of special tokens only when the vocabulary files are missing.
    if len(tokenizer.get_vocab()) <= len(set(tokenizer.all_special_tokens)):
        raise FileNotFoundError(f"the CLIP tokenizer from '{source}' has no vocabulary (vocab.json missing?)")
    return tokenizer


def load_clip(name_or_path: str, tokenizer: str | None = None):
    """(CLIPModel, CLIPTokenizer); the tokenizer from `tokenizer` if given, else from the model's source."""
    return load_clip_model(name_or_path), load_clip_tokenizer(tokenizer or name_or_path)


def _features(output) -> torch.Tensor:
    """transformers < 5 returns the projected features; 5.x a model output whose pooler_output they are."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def normalize(features: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm (float32)."""
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True)


def image_similarity_per_sample(src_features: torch.Tensor, gen_features: torch.Tensor) -> torch.Tensor:
    """[S, d] and [G, d] normalised features -> [G]: each generated image's mean cosine to the sources.

    Their mean is the official image similarity (the mean of the full S x G matrix).
    """
    return (src_features @ gen_features.T).mean(dim=0)


def text_similarity_per_sample(text_features: torch.Tensor, gen_features: torch.Tensor) -> torch.Tensor:
    """[T, d] (T = 1 in the metrics) and [G, d] normalised features -> [G]: mean cosine to the text(s)."""
    return (text_features @ gen_features.T).mean(dim=0)


@dataclass
class Similarities:
    """The two metrics of one (prompt, image set) pair, with their per-image values."""

    image_similarity: float
    text_similarity: float
    text: str  # the prompt the text similarity was measured against (placeholder removed)
    image_per_sample: list[float] = field(default_factory=list)
    text_per_sample: list[float] = field(default_factory=list)


class CLIPEvaluator:
    """CLIP features and the two similarity metrics.

    Args:
        device: where CLIP runs.
        clip_model: hub id, OpenAI name ("ViT-B/32", the reference's default), local folder, or a
            ready model exposing `get_text_features` / `get_image_features` (e.g. a `CLIPModel`).
        tokenizer: a tokenizer object or where to load it from (default: from `clip_model`).
        image_size: CLIP input side; default: the model's `config.vision_config.image_size` (224).
        preprocess: "pil" (default) or "tensor" for generated tensors; see `evaluation.preprocess`.
        dtype: CLIP's weight dtype (float32 by default; the reference used fp16 on CUDA).
        batch_size: images per CLIP forward pass.

    Images are a float tensor [B, 3, H, W] in [-1, 1] (generator output), or a sequence of PIL images.
    """

    def __init__(
        self,
        device="cpu",
        clip_model=DEFAULT_CLIP_MODEL,
        tokenizer=None,
        image_size: int | None = None,
        preprocess: str = "pil",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ):
        if preprocess not in PREPROCESS_MODES:
            raise ValueError(
                f"preprocess={preprocess!r} is not supported; choose one of {list(PREPROCESS_MODES)}"
            )
        if isinstance(clip_model, (str, os.PathLike)):
            self.model_name = str(clip_model)
            model = load_clip_model(str(clip_model))
            tokenizer = str(clip_model) if tokenizer is None else tokenizer
        else:
            self.model_name = type(clip_model).__name__
            model = clip_model
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_clip_tokenizer(str(tokenizer))
        if tokenizer is None:
            raise ValueError("a tokenizer is needed when clip_model is a model object")
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(self.device, dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        config = getattr(model, "config", None)
        self.image_size = image_size or (
            config.vision_config.image_size if config is not None else CLIP_IMAGE_SIZE
        )
        self.context_length = config.text_config.max_position_embeddings if config is not None else 77
        self.preprocess_mode = preprocess
        self.batch_size = batch_size

    # -- features --------------------------------------------------------------------------------------

    def tokenize(self, strings: str | Sequence[str]) -> torch.Tensor:
        """Token ids [n, context_length]: start, tokens, end, padding. Too long: ValueError."""
        strings = [strings] if isinstance(strings, str) else list(strings)
        ids = self.tokenizer(
            strings,
            padding="max_length",
            max_length=self.context_length,
            truncation=False,
            return_tensors=None,
        )["input_ids"]
        for text, row in zip(strings, ids, strict=True):
            if len(row) > self.context_length:
                raise ValueError(f"Input {text!r} is too long for context length {self.context_length}")
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def encode_text(self, text: str | Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Projected (unnormalised) text features [n, d] of strings or of token ids from `tokenize`."""
        tokens = text if isinstance(text, torch.Tensor) else self.tokenize(text)
        return _features(self.model.get_text_features(input_ids=tokens.to(self.device))).float()

    def preprocess(self, images) -> torch.Tensor:
        """CLIP pixel values [B, 3, S, S] of a tensor in [-1, 1] or a sequence of PIL images."""
        if isinstance(images, torch.Tensor):
            pixels = preprocess_tensor(images, self.image_size, self.preprocess_mode)
        else:
            pixels = preprocess_pil(list(images), self.image_size)
        return pixels.to(self.device, self.dtype)

    @torch.no_grad()
    def encode_images(self, images) -> torch.Tensor:
        """Projected (unnormalised) image features [B, d], `batch_size` images per forward pass."""
        if isinstance(images, Image.Image):
            images = [images]
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.preprocess(images[start : start + self.batch_size])
            out.append(_features(self.model.get_image_features(pixel_values=pixels)).float())
        if not out:
            raise ValueError("no images to encode")
        return torch.cat(out)

    def get_text_features(self, text, norm: bool = True) -> torch.Tensor:
        features = self.encode_text(text)
        return normalize(features) if norm else features

    def get_image_features(self, img, norm: bool = True) -> torch.Tensor:
        features = self.encode_images(img)
        return normalize(features) if norm else features

    # -- metrics (raw cosine) --------------------------------------------------------------------------

    def img_to_img_similarity(self, src_images, generated_images) -> torch.Tensor:
        """Mean cosine over all (source, generated) pairs (0-d tensor): reconstruction."""
        src = self.get_image_features(src_images)
        gen = self.get_image_features(generated_images)
        return (src @ gen.T).mean()

    def txt_to_img_similarity(self, text: str, generated_images) -> torch.Tensor:
        """Mean cosine between `text` (used as given) and each generated image (0-d tensor): editability."""
        text_features = self.get_text_features(text)
        gen = self.get_image_features(generated_images)
        return (text_features @ gen.T).mean()

    def similarities(
        self,
        generated_images,
        src_images,
        target_text: str,
        src_features: torch.Tensor | None = None,
        placeholder: str = PLACEHOLDER,
    ) -> Similarities:
        """Both metrics for one prompt, the placeholder removed from `target_text`, with per-image values.

        `src_features` (normalised) may be passed to avoid re-encoding the training images.
        """
        if src_features is None:
            src_features = self.get_image_features(src_images)
        gen = self.get_image_features(generated_images)
        text = remove_placeholder(target_text, placeholder)
        image_values = image_similarity_per_sample(src_features, gen)
        text_values = text_similarity_per_sample(self.get_text_features(text), gen)
        return Similarities(
            image_values.mean().item(),
            text_values.mean().item(),
            text,
            image_values.tolist(),
            text_values.tolist(),
        )


class ImageDirEvaluator(CLIPEvaluator):
    """The metrics for images generated elsewhere (a tensor, PIL images or a folder of image files)."""

    def evaluate(self, gen_samples, src_images, target_text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(image similarity to `src_images`, text similarity to `target_text` without `*`), 0-d tensors."""
        gen_samples, src_images = load_images(gen_samples), load_images(src_images)
        sim_img = self.img_to_img_similarity(src_images, gen_samples)
        sim_txt = self.txt_to_img_similarity(remove_placeholder(target_text), gen_samples)
        return sim_img, sim_txt


def load_images(images):
    """A folder path -> its image files as RGB PIL images (sorted, EXIF orientation applied); else as is."""
    if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
        from ldm.data.image_folder import list_image_files, load_rgb

        return [load_rgb(p) for p in list_image_files(images)]
    return images


def load_training_images(data_root: str | os.PathLike, size: int | None = 256) -> torch.Tensor:
    """The training images as the reference's `evaluate_model.py` reads them: `PersonalizedBase(data_root,
    size=size, flip_p=0.0)` items (bicubic resize to size x size, no crop), stacked as [N, 3, size, size] in
    [-1, 1]. Its own RNG is used, so the global generators are not touched."""
    import random

    from ldm.data.personalized import PersonalizedBase

    data = PersonalizedBase(data_root, size=size, flip_p=0.0, set="val", rng=random.Random(0))
    return torch.stack([torch.from_numpy(data[i]["image"]).permute(2, 0, 1) for i in range(data.num_images)])


class LDMCLIPEvaluator(CLIPEvaluator):
    """Sample a latent-diffusion model with DDIM + classifier-free guidance, then measure the metrics."""

    @torch.no_grad()
    def generate(
        self,
        model,
        prompt: str,
        n_samples: int = 64,
        n_steps: int = 50,
        scale: float = 5.0,
        batch_size: int = 8,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """`n_samples` images [n, 3, H, W] in [-1, 1] (on the CPU) of `prompt`.

        As the reference: the unconditional conditioning (`batch_size` x "") is encoded once, each batch of
        `batch_size` prompts is sampled with DDIM (`n_steps`, `eta`) and guidance `scale` under the model's
        EMA scope, decoded and clamped to [-1, 1]. `generator` (on the model's device) drives every noise
        draw; None uses the global RNG, as the reference.
        """
        from ldm.models.diffusion.ddim import DDIMSampler

        if n_samples < 1 or batch_size < 1:
            raise ValueError(f"n_samples and batch_size must be >= 1, got {n_samples} and {batch_size}")
        sampler = DDIMSampler(model)
        shape = (model.channels, model.image_size, model.image_size)
        batches = [min(batch_size, n_samples - start) for start in range(0, n_samples, batch_size)]
        samples = []
        with model.ema_scope():
            uc = model.get_learned_conditioning(batch_size * [""]) if scale != 1.0 else None
            for n in tqdm(batches, desc=f"Sampling '{prompt}'", disable=not progress, leave=False):
                c = model.get_learned_conditioning(n * [prompt])
                z, _ = sampler.sample(
                    S=n_steps,
                    conditioning=c,
                    batch_size=n,
                    shape=shape,
                    verbose=False,
                    unconditional_guidance_scale=scale,
                    unconditional_conditioning=None if uc is None else uc[:n],
                    eta=eta,
                    generator=generator,
                )
                samples.append(model.decode_first_stage(z).clamp(-1.0, 1.0).float().cpu())
        return torch.cat(samples)

    def measure(
        self,
        model,
        src_images,
        target_text: str,
        n_samples: int = 64,
        n_steps: int = 50,
        scale: float = 5.0,
        batch_size: int = 8,
        generator: torch.Generator | None = None,
        progress: bool = True,
    ) -> tuple[Similarities, torch.Tensor]:
        """Generate and score; returns (similarities with per-sample values, the samples)."""
        samples = self.generate(
            model, target_text, n_samples, n_steps, scale, batch_size, generator=generator, progress=progress
        )
        return self.similarities(samples, src_images, target_text), samples

    def evaluate(
        self,
        model,
        src_images,
        target_text: str,
        n_samples: int = 64,
        n_steps: int = 50,
        scale: float = 5.0,
        batch_size: int = 8,
        generator: torch.Generator | None = None,
    ):
        """The reference's entry point: (image similarity, text similarity) as 0-d tensors (raw cosine)."""
        sims, _ = self.measure(
            model, src_images, target_text, n_samples, n_steps, scale, batch_size, generator
        )
        return torch.tensor(sims.image_similarity), torch.tensor(sims.text_similarity)
