"""Bad requests over real HTTP: each gets the right status and a JSON error that names the cause.

The live server runs with the limits in ``conftest.SERVER_ENV``: 8 images per
request, 3,000,000 bytes and 4,000,000 pixels per image.
"""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from .conftest import SERVER_ENV, as_array, multipart
from .reference import assert_same, resnet_reference

MAX_IMAGES = int(SERVER_ENV["FXSERVE_MAX_IMAGES_PER_REQUEST"])
MAX_IMAGE_BYTES = int(SERVER_ENV["FXSERVE_MAX_IMAGE_BYTES"])
MAX_IMAGE_PIXELS = int(SERVER_ENV["FXSERVE_MAX_IMAGE_PIXELS"])
CONFIGURED_MODELS = ("resnet18", "resnet18_cl", "mobilenet", "fpn")
RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4", "pooled")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_error(response: httpx.Response, status: int, code: str, *fragments: str) -> str:
    """Check the status and the JSON error body; return the message for further checks."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code
    assert error["request_id"], "every error carries a request id"
    assert error["request_id"] == response.headers["x-request-id"]
    for fragment in fragments:
        assert fragment in error["message"], f"{fragment!r} is missing from the message {error['message']!r}"
    return error["message"]


def post_files(client: httpx.Client, paths: list[Path], **params: str) -> httpx.Response:
    return client.post("/extract", params={"model": "resnet18", **params}, files=multipart(paths))


def save_png(path: Path, image: Image.Image) -> Path:
    image.save(path, "PNG")
    return path


def small_png(folder: Path, name: str = "small.png") -> Path:
    return save_png(folder / name, Image.new("RGB", (40, 30), (120, 60, 200)))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk: length, type, payload and the CRC-32 of type and payload."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def write_bilevel_bomb(path: Path, width: int, height: int) -> Path:
    """Write an all-black 1-bit grayscale PNG of ``width`` x ``height`` without holding it in memory.

    Pillow stores mode "1" with one byte per pixel (900 MB at 30000 x 30000), so
    the rows are deflated one at a time instead. Each row is a filter-type byte (0)
    and ``ceil(width / 8)`` zero bytes, which zlib compresses about 1000:1.
    """
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale, no interlace
    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)
    compressed = [compressor.compress(row) for _ in range(height)]
    compressed.append(compressor.flush())
    path.write_bytes(PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", b"".join(compressed)) + png_chunk(b"IEND", b""))
    return path


def test_upload_empty_file_rejected(client, tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")

    response = post_files(client, [empty])

    assert_error(response, 400, "invalid_image", "image 0 ('empty.jpg')", "empty (0 bytes)")


def test_upload_truncated_jpeg_rejected(client, photos, tmp_path):
    whole = photos["astronaut.jpg"].read_bytes()
    half = tmp_path / "half.jpg"
    half.write_bytes(whole[: len(whole) // 2])

    response = post_files(client, [half])

    assert_error(response, 400, "invalid_image", "image 0 ('half.jpg')", "truncated")


def test_upload_text_named_jpg_rejected(client, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("shopping list: milk, eggs, bread\n")

    response = post_files(client, [text])

    assert_error(response, 400, "invalid_image", "image 0 ('notes.jpg')", "not an image")


def test_upload_png_signature_then_noise_rejected(client, tmp_path):
    noise = tmp_path / "noise.png"
    noise.write_bytes(PNG_SIGNATURE + np.random.default_rng(7).bytes(4096))

    response = post_files(client, [noise])

    message = assert_error(response, 400, "invalid_image", "image 0 ('noise.png')")
    # Pillow 13 reports these bytes as an unknown format. A different Pillow could report a corrupt header instead.
    assert "not an image" in message or "corrupt" in message, message


def test_upload_too_many_pixels_rejected(client, tmp_path):
    large = save_png(tmp_path / "large.png", Image.new("RGB", (2500, 2000), (10, 20, 30)))

    response = post_files(client, [large])

    assert_error(response, 413, "payload_too_large", "image 0 ('large.png')", "2500x2000", f"limit of {MAX_IMAGE_PIXELS}")


def test_upload_decompression_bomb_rejected(client, tmp_path):
    bomb = write_bilevel_bomb(tmp_path / "bomb.png", 30_000, 30_000)
    assert bomb.stat().st_size < 200_000, "the bomb must be small on the wire to test the pixel limit, not the byte limit"

    response = post_files(client, [bomb])

    assert_error(response, 413, "payload_too_large", "image 0 ('bomb.png')", "30000x30000", f"limit of {MAX_IMAGE_PIXELS}")


def test_upload_bomb_under_pillow_limit_rejected(client, tmp_path):
    # 100,000,000 pixels is under Pillow's own DecompressionBombError threshold
    # (2 x Image.MAX_IMAGE_PIXELS, about 179 million in Pillow 13), so the service's check must catch it.
    bomb = write_bilevel_bomb(tmp_path / "tall.png", 10_000, 10_000)

    response = post_files(client, [bomb])

    assert_error(response, 413, "payload_too_large", "image 0 ('tall.png')", "10000x10000", f"limit of {MAX_IMAGE_PIXELS}")


def test_upload_over_byte_limit_rejected(client, tmp_path):
    # Random pixels do not compress, so 1100 x 1000 RGB is about 3.3 MB as PNG but only 1.1 million pixels.
    pixels = np.random.default_rng(3).integers(0, 256, size=(1000, 1100, 3), dtype=np.uint8)
    heavy = save_png(tmp_path / "heavy.png", Image.fromarray(pixels))
    size = heavy.stat().st_size
    assert size > MAX_IMAGE_BYTES

    response = post_files(client, [heavy])

    assert_error(response, 413, "payload_too_large", "image 0 ('heavy.png')", f"{size} bytes", f"limit of {MAX_IMAGE_BYTES} bytes")


def test_request_too_many_images_rejected(client, tmp_path):
    image = small_png(tmp_path)

    response = post_files(client, [image] * (MAX_IMAGES + 1))

    assert_error(response, 413, "payload_too_large", f"{MAX_IMAGES + 1} images", f"limit of {MAX_IMAGES}")


def test_request_no_images_rejected(client):
    response = client.post("/extract", params={"model": "resnet18"}, json={"images": []})

    assert_error(response, 422, "invalid_parameter", "no images")


def test_extract_unknown_model_rejected(client, tmp_path):
    response = client.post("/extract", params={"model": "resnet19"}, files=multipart([small_png(tmp_path)]))

    assert_error(response, 404, "model_not_found", "'resnet19'", *CONFIGURED_MODELS)


def test_extract_unknown_layer_rejected(client, tmp_path):
    response = post_files(client, [small_png(tmp_path)], layers="layer4,layer9")

    message = assert_error(response, 422, "invalid_parameter", "'layer9'", *RESNET_LAYERS)
    assert "'layer4'" not in message, "only the unknown layer is reported"


def test_extract_unknown_pool_rejected(client, tmp_path):
    response = post_files(client, [small_png(tmp_path)], pool="median")

    assert_error(response, 422, "invalid_parameter", "'median'", "none, avg, max, gem")


def test_extract_unknown_encoding_rejected(client, tmp_path):
    response = post_files(client, [small_png(tmp_path)], encoding="msgpack")

    assert_error(response, 422, "invalid_parameter", "'msgpack'", "json, base64")


def test_extract_unknown_dtype_rejected(client, tmp_path):
    response = post_files(client, [small_png(tmp_path)], dtype="int8")

    assert_error(response, 422, "invalid_parameter", "'int8'", "float32, float16")


def test_extract_unsupported_content_type_rejected(client):
    response = client.post("/extract", params={"model": "resnet18"}, content=b"hello", headers={"Content-Type": "text/plain"})

    assert_error(response, 415, "unsupported_media_type", "'text/plain'", "multipart/form-data", "application/json", "image/*")


def test_json_invalid_base64_rejected(client, tmp_path):
    good = base64.b64encode(small_png(tmp_path).read_bytes()).decode()

    response = client.post("/extract", params={"model": "resnet18"}, json={"images": [good, "not*base64!"]})

    message = assert_error(response, 400, "invalid_image", "image 1", "base64")
    assert "image 0" not in message


def test_json_non_string_image_rejected(client):
    response = client.post("/extract", params={"model": "resnet18"}, json={"images": [42]})

    assert_error(response, 400, "invalid_image", "image 0", "int", "base64 string")


def test_json_without_images_rejected(client, tmp_path):
    good = base64.b64encode(small_png(tmp_path).read_bytes()).decode()

    response = client.post("/extract", params={"model": "resnet18"}, json={"pictures": [good]})

    assert_error(response, 400, "bad_request", '{"images": [')


def test_json_malformed_body_rejected(client):
    response = client.post("/extract", params={"model": "resnet18"}, content=b'{"images": [', headers={"Content-Type": "application/json"})

    assert_error(response, 400, "bad_request", "not valid JSON")


def test_multipart_without_images_field_rejected(client, tmp_path):
    image = small_png(tmp_path)

    response = client.post("/extract", params={"model": "resnet18"}, files=[("photo", (image.name, image.read_bytes(), "image/png"))])

    assert_error(response, 400, "bad_request", "no field 'images'", "fields present: photo")


def test_raw_body_corrupt_image_names_filename(client, photos):
    whole = photos["coffee.jpg"].read_bytes()

    response = client.post(
        "/extract",
        params={"model": "resnet18"},
        content=whole[: len(whole) // 3],
        headers={"Content-Type": "image/jpeg", "X-Filename": "cup.jpg"},
    )

    assert_error(response, 400, "invalid_image", "image 0 ('cup.jpg')", "truncated")


def test_request_one_bad_image_fails_whole(client, photos, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("this is not a JPEG")

    response = post_files(client, [photos["coffee.jpg"], bad])

    message = assert_error(response, 400, "invalid_image", "image 1 ('bad.jpg')")
    assert "image 0" not in message
    assert "results" not in response.json(), "no partial results for the good image"


def test_embed_bad_image_rejected(client, photos, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(PNG_SIGNATURE)

    response = client.post("/embed", params={"model": "resnet18"}, files=multipart([photos["rocket.jpg"], photos["chelsea.png"], bad]))

    assert_error(response, 400, "invalid_image", "image 2 ('bad.png')")


def test_extract_model_omitted_rejected(client, tmp_path):
    response = client.post("/extract", files=multipart([small_png(tmp_path)]))

    assert_error(response, 422, "invalid_parameter", "'model' is required", *CONFIGURED_MODELS)


def test_timeout_header_not_number_rejected(client, tmp_path):
    response = client.post("/extract", params={"model": "resnet18"}, files=multipart([small_png(tmp_path)]), headers={"X-Request-Timeout": "soon"})

    assert_error(response, 422, "invalid_parameter", "X-Request-Timeout", "'soon'", "number of seconds")


def test_timeout_header_negative_rejected(client, tmp_path):
    response = client.post("/extract", params={"model": "resnet18"}, files=multipart([small_png(tmp_path)]), headers={"X-Request-Timeout": "-1"})

    assert_error(response, 422, "invalid_parameter", "X-Request-Timeout", "'-1'", "positive")


def test_error_request_id_echoes_client_id(client, tmp_path):
    response = client.post("/extract", params={"model": "resnet19"}, files=multipart([small_png(tmp_path)]), headers={"X-Request-ID": "client-trace-42"})

    assert response.status_code == 404
    assert response.json()["error"]["request_id"] == "client-trace-42"
    assert response.headers["x-request-id"] == "client-trace-42"


def test_service_serves_after_bad_inputs(client, photos, reference_resnet18, tmp_path):
    whole = photos["astronaut.jpg"].read_bytes()
    half = tmp_path / "half.jpg"
    half.write_bytes(whole[: len(whole) // 2])
    bomb = write_bilevel_bomb(tmp_path / "bomb.png", 30_000, 30_000)
    assert post_files(client, [half]).status_code == 400
    assert post_files(client, [bomb]).status_code == 413
    assert post_files(client, [photos["coffee.jpg"], half]).status_code == 400

    paths = [photos["astronaut.jpg"], photos["coffee.jpg"]]
    response = post_files(client, paths, layers="layer3,pooled")

    assert response.status_code == 200, response.text
    expected = resnet_reference(reference_resnet18, paths, ["layer3", "pooled"])
    results = response.json()["results"]
    assert len(results) == len(paths)
    for index, result in enumerate(results):
        assert_same(as_array(result["layer3"]), expected["layer3"][index])
        assert_same(as_array(result["pooled"]), expected["pooled"][index])


def test_upload_far_too_many_images_rejected(client, photos):
    # Twelve files pass the multipart parser's own file limit (9 here), so the
    # rejection must still be a 413 about the image count, not a parse error.
    response = client.post("/extract", params={"model": "resnet18"}, files=multipart([photos["coffee.jpg"]] * 12))

    assert_error(response, 413, "payload_too_large", "more than 8 images")


def test_upload_thin_strip_rejected_before_resize(client, tmp_path):
    # 4000x1 resized to a shorter side of 256 would be a 1,024,000x256 image.
    strip = save_png(tmp_path / "strip.png", Image.new("RGB", (4000, 1), (40, 90, 160)))

    response = post_files(client, [strip])

    assert_error(response, 413, "payload_too_large", "image 0 ('strip.png')", "4000x1", "1024000x256", "FXSERVE_MAX_RESIZED_PIXELS")
