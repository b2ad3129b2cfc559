"""Training with human-written captions (the paper's "human captions" setup).

The reference shipped this experiment only as bytecode without source (`personalized_detailed_text`): a
hard-coded folder and one hand-written caption per image ("A photo of * on a grey bed", ...). Here the
captions come from a user file, and everything else is `ldm.data.personalized.PersonalizedBase`.

Captions file: a JSON object `{"image file name": "caption", ...}`, or a text file with one
`file name<TAB>caption` per line. A file name may be given with or without its extension. Each caption
marks the concept with `caption_placeholder` ("*"), which is replaced by the dataset's placeholder string
(its `placeholder_token`, prefixed by `coarse_class_text` when set), so `main.py --placeholder_string`
keeps working.

Use it from a config or the command line:

    data.params.train.target=evaluation.caption_data.CaptionedPersonalizedBase
    data.params.train.params.captions_file=captions.json
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ldm.data.personalized import PersonalizedBase

logger = logging.getLogger(__name__)


def read_captions(path: str | os.PathLike) -> dict[str, str]:
    """{file name: caption} from a JSON object or a tab-separated text file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"{path}: expected a JSON object mapping image file names to caption strings")
        return {str(k): v.strip() for k, v in data.items()}
    captions = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "\t" not in line:
            raise ValueError(f"{path}:{number}: expected 'file name<TAB>caption'")
        name, caption = line.split("\t", 1)
        captions[name.strip()] = caption.strip()
    return captions


class CaptionedPersonalizedBase(PersonalizedBase):
    """`PersonalizedBase` whose image i is always captioned with its human-written caption.

    Extra args:
        captions_file: see the module docstring (required).
        caption_placeholder: the string that stands for the concept in the file's captions.

    Every image needs a caption containing `caption_placeholder`; `per_image_tokens` is not supported.
    Random draws: only the flip (one draw per item, as the base class); no template is drawn.
    """

    def __init__(
        self,
        data_root,
        captions_file: str | os.PathLike | None = None,
        caption_placeholder: str = "*",
        **kwargs,
    ):
        if captions_file is None:
            raise ValueError("CaptionedPersonalizedBase needs captions_file (image file name -> caption)")
        if kwargs.get("per_image_tokens"):
            raise ValueError("CaptionedPersonalizedBase does not support per_image_tokens")
        super().__init__(data_root, **kwargs)
        table = read_captions(captions_file)
        self.caption_placeholder = caption_placeholder
        self.captions = []
        missing = []
        for image_path in self.image_paths:
            name = os.path.basename(image_path)
            caption = table.get(name, table.get(os.path.splitext(name)[0]))
            if caption is None:
                missing.append(name)
            elif caption_placeholder not in caption:
                raise ValueError(
                    f"{captions_file}: the caption of {name} ({caption!r}) does not contain the "
                    f"placeholder {caption_placeholder!r}"
                )
            self.captions.append(caption)
        if missing:
            raise ValueError(f"{captions_file}: no caption for {', '.join(missing)}")
        used = {os.path.basename(p) for p in self.image_paths} | {
            os.path.splitext(os.path.basename(p))[0] for p in self.image_paths
        }
        unused = sorted(set(table) - used)
        if unused:
            logger.warning(
                "%s: captions for files not in %s are ignored: %s",
                captions_file,
                data_root,
                ", ".join(unused),
            )

    def caption(self, index: int) -> str:
        return self.captions[index].replace(self.caption_placeholder, self.placeholder_string)
