"""Image decoding and preprocessing: bytes in, a normalised CHW float tensor out.

Runs in the decode thread pool, never on the event loop. Decoding follows Pillow;
the tensor pipeline performs the same steps, in the same order, as torchvision's
``ImageClassification`` preset so outputs equal ``weights.transforms()`` exactly.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from .errors import InvalidImageError, PayloadTooLargeError

__all__ = ["ImageLimits", "Preprocessor", "decode_image", "check_resized_size", "preprocessor_from_config", "preprocessor_from_weights", "describe_image"]

# A truncated file must fail instead of decoding as a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# decode_image compares width x height with FXSERVE_MAX_IMAGE_PIXELS before any
# pixel is decoded, so Pillow's own, coarser bomb check would only hide the size.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    max_resized_pixels: int


@dataclass(frozen=True)
class Preprocessor:
    """Resize (shorter side, or to [h, w]), center crop, scale to [0, 1], normalise."""

    resize: tuple[int, ...]
    crop: tuple[int, ...] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    antialias: bool
    source: str

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """Return (width, height) after the resize step, computed as torchvision does."""
        if len(self.resize) == 2:
            return self.resize[1], self.resize[0]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize[0], int(self.resize[0] * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        mode = InterpolationMode(self.interpolation)
        image = F.resize(image, list(self.resize), interpolation=mode, antialias=self.antialias)
        if self.crop is not None:
            image = F.center_crop(image, list(self.crop))
        tensor = F.pil_to_tensor(image)
        tensor = F.convert_image_dtype(tensor, torch.float)
        return F.normalize(tensor, mean=list(self.mean), std=list(self.std))

    @property
    def output_size(self) -> tuple[int, int]:
        size = self.crop if self.crop is not None else self.resize
        return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])

    def describe(self) -> dict[str, Any]:
        """Return the parameters a client needs to reproduce the input tensor."""
        described = asdict(self)
        described["resize"] = list(self.resize)
        described["crop"] = list(self.crop) if self.crop is not None else None
        described["mean"] = list(self.mean)
        described["std"] = list(self.std)
        return described


def _as_size(value: int | tuple[int, ...] | list[int] | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def preprocessor_from_config(config: Any) -> Preprocessor:
    """Build the pipeline from a ``preprocess`` mapping in models.yaml."""
    return Preprocessor(
        resize=_as_size(config.resize),
        crop=_as_size(config.crop),
        mean=tuple(config.mean),
        std=tuple(config.std),
        interpolation=config.interpolation,
        antialias=config.antialias,
        source="config",
    )


def preprocessor_from_weights(weights: Enum) -> Preprocessor:
    """Copy the parameters of ``weights.transforms()``; raise ValueError if it has no fixed size."""
    preset = weights.transforms()
    crop = getattr(preset, "crop_size", None)
    resize = getattr(preset, "resize_size", None)
    if crop is None or resize is None:
        raise ValueError(
            f"the transforms of {type(weights).__name__}.{weights.name} ({type(preset).__name__}) "
            "have no fixed resize and crop, so images of different sizes cannot be batched"
        )
    return Preprocessor(
        resize=_as_size(resize),
        crop=_as_size(crop),
        mean=tuple(preset.mean),
        std=tuple(preset.std),
        interpolation=InterpolationMode(preset.interpolation).value,
        antialias=bool(getattr(preset, "antialias", True)),
        source=f"{type(weights).__name__}.{weights.name}.transforms()",
    )


def describe_image(index: int, filename: str | None) -> str:
    return f"image {index}" + (f" ({filename!r})" if filename else "")


def decode_image(data: bytes, index: int, filename: str | None, limits: ImageLimits) -> Image.Image:
    """Decode bytes into an RGB image with EXIF orientation applied.

    Animated and multi-page files yield their first frame. Alpha is dropped, as
    ``Image.convert("RGB")`` does. Raises InvalidImageError or PayloadTooLargeError
    with the image's index and file name.
    """
    label = describe_image(index, filename)
    if not data:
        raise InvalidImageError(f"{label} is empty (0 bytes); send the image file's contents")
    if len(data) > limits.max_bytes:
        raise PayloadTooLargeError(
            f"{label} is {len(data)} bytes, more than the limit of {limits.max_bytes} bytes "
            "(FXSERVE_MAX_IMAGE_BYTES); downscale or recompress it",
            reason="image_too_large",
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = _open(data, label, limits)
        _check_pixels(image, label, limits)
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise InvalidImageError(f"{label} is truncated or corrupt ({exc}); send the complete file") from None
    image = _apply_exif_orientation(image)
    return to_rgb(image)


def check_resized_size(image: Image.Image, preprocessor: Preprocessor, index: int, filename: str | None, limits: ImageLimits) -> None:
    """Reject an image whose resized copy would exceed the pixel limit.

    Resizing the shorter side of a thin strip builds a huge image before the center
    crop discards most of it: 4000x1 resized to a shorter side of 256 is 1,024,000x256.
    """
    width, height = preprocessor.resized_size(*image.size)
    if width * height > limits.max_resized_pixels:
        raise PayloadTooLargeError(
            f"{describe_image(index, filename)} is {image.width}x{image.height}; resizing it gives {width}x{height} = "
            f"{width * height} pixels, more than the limit of {limits.max_resized_pixels} (FXSERVE_MAX_RESIZED_PIXELS); "
            "crop it to a less extreme aspect ratio",
            reason="image_too_large",
        )


def _open(data: bytes, label: str, limits: ImageLimits) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise PayloadTooLargeError(f"{label} has more pixels than the limit of {limits.max_pixels} (FXSERVE_MAX_IMAGE_PIXELS); downscale it", reason="image_too_large") from None
    except UnidentifiedImageError:
        raise InvalidImageError(f"{label} is not an image Pillow can read (the first bytes are {data[:8]!r}); send a JPEG, PNG, WebP, TIFF, GIF or BMP file") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"{label} has a corrupt header ({exc}); send a valid image file") from None


def _check_pixels(image: Image.Image, label: str, limits: ImageLimits) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"{label} has an invalid size {width}x{height}")
    if width * height > limits.max_pixels:
        raise PayloadTooLargeError(
            f"{label} is {width}x{height} = {width * height} pixels, more than the limit of "
            f"{limits.max_pixels} (FXSERVE_MAX_IMAGE_PIXELS); downscale it",
            reason="image_too_large",
        )


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):
        # A malformed EXIF block should not reject an otherwise readable image.
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, scaling 16- and 32-bit data down."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in {"I", "F"}:
        return _high_bit_depth_to_rgb(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    array = np.asarray(image)
    if image.mode == "F":
        scaled = np.clip(array, 0.0, 1.0) * 255.0 if float(np.nanmax(array, initial=0.0)) <= 1.0 else np.clip(array, 0, 255)
        eight_bit = np.nan_to_num(scaled).round().astype(np.uint8)
    else:
        # 16-bit samples (also what Pillow's mode "I" holds for 16-bit PNGs): map 0..65535 to 0..255.
        eight_bit = (np.clip(array.astype(np.int64), 0, 65535) // 257).astype(np.uint8)
    return Image.fromarray(eight_bit).convert("RGB")
