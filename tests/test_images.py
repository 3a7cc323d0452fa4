"""Image kinds over real HTTP: the service decodes each one as documented in ``service/preprocess.py``.

Every test builds the RGB image it expects with Pillow in the test process, runs
torchvision's extractor on it, and compares the served features with the result.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from torchvision.models import ResNet18_Weights

from .conftest import as_array, multipart
from .reference import extract, preprocess_all
from .reference import RESNET_NODES

LAYERS = ("layer4", "pooled")
LAYER_SHAPES = {"layer4": (512, 7, 7), "pooled": (512,)}


def serve(client, path) -> dict[str, np.ndarray]:
    """Post one image file to /extract on resnet18 and return its features by layer."""
    response = client.post("/extract", params={"model": "resnet18", "layers": ",".join(LAYERS)}, files=multipart([path]))
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    return {layer: as_array(result[layer]) for layer in LAYERS}


def reference(model, image: Image.Image) -> dict[str, np.ndarray]:
    """Run torchvision's extractor on an RGB image with the resnet18 weights' preprocessing."""
    assert image.mode == "RGB"
    batch = preprocess_all(ResNet18_Weights.IMAGENET1K_V1.transforms(), [image])
    outputs = extract(model, [RESNET_NODES[layer] for layer in LAYERS], batch)
    return {layer: outputs[RESNET_NODES[layer]][0].numpy() for layer in LAYERS}


def assert_features_equal(served: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    for layer in LAYERS:
        assert served[layer].shape == LAYER_SHAPES[layer]
        np.testing.assert_allclose(served[layer], expected[layer], rtol=1e-5, atol=1e-5, err_msg=f"layer {layer}")


def assert_features_differ(served: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> None:
    assert not np.allclose(served["pooled"], other["pooled"], rtol=1e-3, atol=1e-3)


def open_converted(path, frame: int = 0) -> Image.Image:
    """Decode one frame of a file with Pillow's plain ``convert("RGB")`` and no other step."""
    with Image.open(path) as image:
        image.seek(frame)
        return image.convert("RGB")


def load_photo(path, size: tuple[int, int] | None = None) -> Image.Image:
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    return rgb.resize(size, Image.Resampling.BILINEAR) if size else rgb


@pytest.mark.parametrize(("orientation", "transpose"), [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)], ids=["orientation6", "orientation8"])
def test_jpeg_exif_orientation_applied(client, photos, reference_resnet18, tmp_path, orientation, transpose):
    # coffee.jpg is 600 x 400, so a rotation changes which part survives the center crop.
    exif = Image.Exif()
    exif[0x0112] = orientation  # the EXIF Orientation tag
    path = tmp_path / f"rotated{orientation}.jpg"
    load_photo(photos["coffee.jpg"]).save(path, "JPEG", quality=90, exif=exif)
    stored = open_converted(path)

    served = serve(client, path)

    assert_features_equal(served, reference(reference_resnet18, stored.transpose(transpose)))
    assert_features_differ(served, reference(reference_resnet18, stored))


def test_jpeg_cmyk_decoded(client, photos, reference_resnet18, tmp_path):
    path = tmp_path / "cmyk.jpg"
    load_photo(photos["rocket.jpg"]).convert("CMYK").save(path, "JPEG", quality=90)
    with Image.open(path) as stored:
        assert stored.mode == "CMYK"

    served = serve(client, path)

    assert_features_equal(served, reference(reference_resnet18, open_converted(path)))


def test_png_16bit_gray_scaled(client, photos, reference_resnet18, tmp_path):
    # Spread the samples over the whole 16-bit range, including values that are not multiples of 257.
    gray = np.asarray(load_photo(photos["chelsea.png"]).convert("L"), dtype=np.int64)
    offsets = np.random.default_rng(5).integers(0, 257, size=gray.shape)
    samples = np.clip(gray * 257 + offsets, 0, 65535).astype(np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(samples).save(path, "PNG")
    with Image.open(path) as stored:
        assert stored.mode == "I;16"

    served = serve(client, path)

    # The documented mapping: 0..65535 to 0..255 by integer division by 257.
    expected = Image.fromarray((samples // 257).astype(np.uint8)).convert("RGB")
    assert_features_equal(served, reference(reference_resnet18, expected))
    # Pillow's own I;16 to RGB conversion clips at 255, so nearly every pixel would be white.
    assert_features_differ(served, reference(reference_resnet18, open_converted(path)))


def test_png_grayscale_decoded(client, photos, reference_resnet18, tmp_path):
    path = tmp_path / "gray.png"
    load_photo(photos["astronaut.jpg"]).convert("L").save(path, "PNG")

    served = serve(client, path)

    assert_features_equal(served, reference(reference_resnet18, open_converted(path)))


def test_png_palette_transparency_decoded(client, photos, reference_resnet18, tmp_path):
    palette_image = load_photo(photos["chelsea.png"]).quantize(colors=32)
    used_index = int(np.asarray(palette_image)[0, 0])
    path = tmp_path / "palette.png"
    palette_image.save(path, "PNG", transparency=used_index)
    with Image.open(path) as stored:
        assert stored.mode == "P"
        assert stored.info.get("transparency") == used_index

    served = serve(client, path)

    # Transparent pixels keep their palette colour, as in the output of Image.convert("RGB").
    assert_features_equal(served, reference(reference_resnet18, open_converted(path)))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_png_alpha_dropped(client, photos, reference_resnet18, tmp_path, mode):
    base = load_photo(photos["coffee.jpg"]).convert(mode[:-1])
    width, height = base.size
    # A horizontal ramp from transparent to opaque, so any blending with a background would change the pixels.
    ramp = np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))
    base.putalpha(Image.fromarray(ramp))
    path = tmp_path / f"{mode.lower()}.png"
    base.save(path, "PNG")
    with Image.open(path) as stored:
        assert stored.mode == mode

    served = serve(client, path)

    assert_features_equal(served, reference(reference_resnet18, open_converted(path)))


def test_gif_animated_first_frame(client, photos, reference_resnet18, tmp_path):
    size = (320, 240)
    frames = [load_photo(photos[name], size) for name in ("astronaut.jpg", "rocket.jpg", "coffee.jpg")]
    path = tmp_path / "animated.gif"
    frames[0].save(path, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as stored:
        assert stored.n_frames == 3

    served = serve(client, path)

    assert_features_equal(served, reference(reference_resnet18, open_converted(path, frame=0)))
    assert_features_differ(served, reference(reference_resnet18, open_converted(path, frame=1)))


def test_tiff_multipage_first_page(client, photos, reference_resnet18, tmp_path):
    size = (300, 260)
    pages = [load_photo(photos[name], size) for name in ("chelsea.png", "astronaut.jpg")]
    path = tmp_path / "pages.tiff"
    pages[0].save(path, "TIFF", save_all=True, append_images=pages[1:])
    with Image.open(path) as stored:
        assert stored.n_frames == 2

    served = serve(client, path)

    assert_features_equal(served, reference(reference_resnet18, open_converted(path, frame=0)))
    assert_features_differ(served, reference(reference_resnet18, open_converted(path, frame=1)))


def test_webp_decoded(client, photos, reference_resnet18, tmp_path):
    path = tmp_path / "photo.webp"
    load_photo(photos["rocket.jpg"]).save(path, "WEBP", quality=80)

    served = serve(client, path)

    assert_features_equal(served, reference(reference_resnet18, open_converted(path)))


def test_image_single_pixel_accepted(client, reference_resnet18, tmp_path):
    path = tmp_path / "pixel.png"
    Image.new("RGB", (1, 1), (200, 30, 90)).save(path, "PNG")

    served = serve(client, path)

    assert_features_equal(served, reference(reference_resnet18, open_converted(path)))


def test_image_4000x8_strip_accepted(client, reference_resnet18, tmp_path):
    # The shorter side (8) is resized to 256, so the longer side becomes 128,000 before the crop.
    strip = np.random.default_rng(11).integers(0, 256, size=(8, 4000, 3), dtype=np.uint8)
    path = tmp_path / "strip.png"
    Image.fromarray(strip).save(path, "PNG")

    served = serve(client, path)

    assert_features_equal(served, reference(reference_resnet18, open_converted(path)))
