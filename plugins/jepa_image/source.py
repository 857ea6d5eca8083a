"""Image source: decode JPEG/PNG/... bytes, random-resized-crop at train time, normalise.

The crop draws its randomness only from the per-sample RNG it is given, so a sample's view is a
function of (run seed, epoch, sample index). I-JEPA uses no flips, colour jitter or blur.
"""

from __future__ import annotations

import io
import math
import random
import struct
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, field_validator

from jepa import ComponentConfig, SampleError, Source

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


class ImageSourceConfig(ComponentConfig):
    crop_size: int | tuple[int, int] = Field(224, description="Output size: one int (square) or [height, width].")
    crop_scale: tuple[float, float] = Field((0.3, 1.0), description="RandomResizedCrop area range (I-JEPA: 0.3-1.0).")
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="RandomResizedCrop aspect-ratio range.")
    mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="Per-channel mean for normalisation.")
    std: tuple[float, float, float] = Field(IMAGENET_STD, description="Per-channel std for normalisation.")
    eval_crop_ratio: float = Field(0.875, gt=0, le=1, description="Evaluation: resize the short side to crop/ratio, centre crop.")
    interpolation: Literal["bilinear", "bicubic"] = Field("bicubic", description="Resampling filter for crops and resizes.")
    max_pixels: int = Field(64_000_000, gt=0, description="Larger images are skipped as decompression bombs.")

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, v):
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError("must satisfy 0 < low <= high <= 1")
        return v

    @field_validator("crop_ratio")
    @classmethod
    def _ratio(cls, v):
        if not 0 < v[0] <= v[1]:
            raise ValueError("must satisfy 0 < low <= high")
        return v

    @field_validator("crop_size")
    @classmethod
    def _size(cls, v):
        if any(c <= 0 for c in ((v, v) if isinstance(v, int) else v)):
            raise ValueError("crop sizes must be positive")
        return v

    @property
    def size_hw(self) -> tuple[int, int]:
        c = self.crop_size
        return (c, c) if isinstance(c, int) else tuple(c)


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                            rng: random.Random) -> tuple[int, int, int, int]:
    """The (left, top, w, h) box of torchvision's RandomResizedCrop, drawn from ``rng``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    # Fallback: the largest centre crop within the ratio range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


#: magic numbers of common non-image files found where an image was expected
_OTHER_FORMATS = ((b"RIFF", "a RIFF (WAV/AVI) file"), (b"fLaC", "a FLAC file"), (b"OggS", "an Ogg file"),
                  (b"ID3", "an MP3 file"), (b"%PDF", "a PDF file"), (b"PK\x03\x04", "a zip file"),
                  (b"\x1f\x8b", "a gzip file"), (b"\x93NUMPY", "a NumPy array"), (b"\x7fELF", "an executable"))


def sniff_other_format(data: bytes) -> str | None:
    """Name the kind of a well-known non-image file (``wrong_format``), or None when unknown (``corrupt``)."""
    for magic, name in _OTHER_FORMATS:
        if data.startswith(magic):
            return f"{name}, not an image"
    return None


class ImageSource(Source):
    Config = ImageSourceConfig
    summary = "Images (jpg, png, webp, ...) from WebDataset shards or folders; RandomResizedCrop + normalise"
    extensions = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "gif")

    def __init__(self, cfg: ImageSourceConfig):
        super().__init__(cfg)
        self._mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self._std = torch.tensor(cfg.std).view(3, 1, 1)

    def sample_shape(self) -> tuple[int, int, int]:
        return (3, *self.cfg.size_hw)

    def resized(self, size) -> ImageSource:
        """The same source producing ``size`` (an int, or (height, width)) images."""
        return ImageSource(self.cfg.model_copy(update={"crop_size": size if isinstance(size, int) else tuple(size)}))

    def open(self, data: bytes) -> Image.Image:
        """Decode bytes to an RGB image, turning every failure into a categorised SampleError."""
        if not data:
            raise SampleError("empty", "zero-byte image")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                if img.width * img.height > self.cfg.max_pixels:
                    raise SampleError("too_large", f"{img.width}x{img.height} pixels")
                img.load()
        except SampleError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise SampleError("too_large", str(e)) from None
        except Image.UnidentifiedImageError as e:
            other = sniff_other_format(data)
            raise SampleError("wrong_format" if other else "corrupt", other or str(e)) from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, ZeroDivisionError) as e:
            # Pillow's decoders report damaged files with any of these.
            reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
            raise SampleError(reason, f"{type(e).__name__}: {e}") from None
        try:
            return img.convert("RGB")
        except (OSError, ValueError) as e:
            raise SampleError("corrupt", f"{type(e).__name__}: {e}") from None

    def render(self, x: torch.Tensor) -> np.ndarray:
        """Undo the normalisation: the ``[3, H, W]`` tensor as the ``[H, W, 3]`` picture in [0, 1]."""
        img = x.detach().float().cpu() * self._std + self._mean
        return img.clamp(0, 1).permute(1, 2, 0).numpy()

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self._mean) / self._std

    def decode(self, sample: dict[str, Any], rng: random.Random, train: bool) -> torch.Tensor:
        ext = next((e for e in self.extensions if e in sample), None)
        if ext is None:
            raise SampleError("no_image", f"no image member among {sorted(sample)}")
        img = self.open(sample[ext])
        return self.train_view(img, rng) if train else self.eval_view(img)

    def train_view(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        h, w = self.cfg.size_hw
        left, top, cw, ch = random_resized_crop_box(img.width, img.height, self.cfg.crop_scale, self.cfg.crop_ratio, rng)
        out = img.resize((w, h), _RESAMPLE[self.cfg.interpolation], box=(left, top, left + cw, top + ch))
        return self.to_tensor(out)

    def eval_view(self, img: Image.Image) -> torch.Tensor:
        """Resize so the crop covers ``eval_crop_ratio`` of the short side, then centre crop."""
        h, w = self.cfg.size_hw
        r = self.cfg.eval_crop_ratio
        scale = max(h / r / img.height, w / r / img.width)
        rw, rh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
        img = img.resize((rw, rh), _RESAMPLE[self.cfg.interpolation])
        left, top = (rw - w) // 2, (rh - h) // 2
        return self.to_tensor(img.crop((left, top, left + w, top + h)))

    def preprocess(self, raw: Any) -> torch.Tensor:
        """Evaluation transform of a path, bytes, a PIL image, or a uint8 ``[C, H, W]`` / ``[H, W, C]`` array."""
        if isinstance(raw, (str, Path)):
            raw = Path(raw).read_bytes()
        if isinstance(raw, (bytes, bytearray)):
            img = self.open(bytes(raw))
        elif isinstance(raw, Image.Image):
            img = raw.convert("RGB")
        else:
            arr = raw.numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
            if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
                arr = arr.transpose(1, 2, 0)
            img = Image.fromarray(arr.astype(np.uint8).squeeze()).convert("RGB")
        return self.eval_view(img)
