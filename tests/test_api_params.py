"""Query parameters, headers and body forms that clients get subtly wrong."""

from __future__ import annotations

import base64
import socket

import numpy as np

from .conftest import as_array, multipart
from .reference import assert_same, resnet_reference


def test_params_unknown_name_rejected(client, photos):
    # /embed spells it "layer"; on /extract it would otherwise be ignored silently.
    response = client.post("/extract", params={"model": "resnet18", "layer": "layer3"}, files=multipart([photos["coffee.jpg"]]))

    assert response.status_code == 422
    assert "'layer'" in response.json()["error"]["message"]
    assert "did you mean 'layers'" in response.json()["error"]["message"]


def test_params_embed_rejects_extract_options(client, photos):
    response = client.post("/embed", params={"model": "resnet18", "pool": "max"}, files=multipart([photos["coffee.jpg"]]))

    assert response.status_code == 422
    assert "'pool'" in response.json()["error"]["message"]


def test_params_repeated_layers_rejected(client, photos):
    response = client.post("/extract?model=resnet18&layers=layer3&layers=layer4", files=multipart([photos["coffee.jpg"]]))

    assert response.status_code == 422
    assert "more than once" in response.json()["error"]["message"]


def test_params_long_value_truncated_in_message(client, photos):
    response = client.post("/extract", params={"model": "resnet18", "layers": "x" * 20000}, files=multipart([photos["coffee.jpg"]]))

    assert response.status_code == 422
    assert len(response.json()["error"]["message"]) < 1000
    assert "20000 characters" in response.json()["error"]["message"]


def test_params_newline_in_model_not_forged_in_log(live_server, client, photos):
    forged = "FORGED-LINE CRITICAL service.api: fake"
    client.post("/extract", params={"model": f"nope\n{forged}"}, files=multipart([photos["coffee.jpg"]]))

    log_lines = live_server.process.log().splitlines()
    assert not any(line.startswith(forged) for line in log_lines)
    assert any(forged in line for line in log_lines), "the rejection is still logged, escaped"


def test_accept_prefers_json_by_quality(client, photos):
    response = client.post(
        "/extract",
        params={"model": "resnet18", "layers": "pooled"},
        files=multipart([photos["coffee.jpg"]]),
        headers={"Accept": "application/vnd.safetensors;q=0.5, application/json"},
    )

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"


def test_json_body_mime_base64_with_line_breaks(client, photos, reference_resnet18):
    path = photos["chelsea.png"]
    wrapped = base64.encodebytes(path.read_bytes()).decode()
    assert "\n" in wrapped

    response = client.post("/extract", params={"model": "resnet18", "layers": "pooled"}, json={"images": [wrapped]})

    assert response.status_code == 200, response.text
    assert_same(as_array(response.json()["results"][0]["pooled"]), resnet_reference(reference_resnet18, [path], ["pooled"])["pooled"][0])


def test_json_body_wrong_key_named(client, photos):
    response = client.post("/extract", params={"model": "resnet18"}, json={"image": [base64.b64encode(b"x").decode()]})

    assert response.status_code == 400
    assert "'image'" in response.json()["error"]["message"]


def test_head_probes_answer(client):
    for path in ("/healthz", "/readyz", "/metrics"):
        response = client.head(path)
        assert response.status_code == 200, path


def test_rejections_counted_by_reason(client, photos, tmp_path):
    from PIL import Image
    from prometheus_client.parser import text_string_to_metric_families

    def image_too_large_count() -> float:
        for family in text_string_to_metric_families(client.get("/metrics").text):
            for sample in family.samples:
                if sample.name == "fxserve_rejected_requests_total" and sample.labels == {"model": "resnet18", "reason": "image_too_large"}:
                    return sample.value
        return 0.0

    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((2100, 2100, 3), dtype=np.uint8)).save(big)
    before = image_too_large_count()

    response = client.post("/extract", params={"model": "resnet18"}, files=multipart([big]))

    assert response.status_code == 413
    assert image_too_large_count() == before + 1


def rejected_count(client, reason: str, model: str = "") -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "fxserve_rejected_requests_total" and sample.labels == {"model": model, "reason": reason}:
                return sample.value
    return 0.0


def declared_length_status(base_url: str, length: int) -> int:
    """Send only headers that declare a huge body, on a raw socket, and return the status."""
    host, port = base_url.removeprefix("http://").split(":")
    request = (
        f"POST /extract?model=resnet18 HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(request)
        status_line = connection.recv(4096).split(b"\r\n", 1)[0]
    return int(status_line.split()[1])


def test_rejections_outside_handlers_counted(live_server, client, photos):
    before_method = rejected_count(client, "method_not_allowed")
    before_validation = rejected_count(client, "invalid_parameter", model="resnet18")
    before_body = rejected_count(client, "body_too_large", model="resnet18")

    method = client.get("/extract")
    validation = client.post("/extract", params={"model": "resnet18", "normalize": "maybe"}, files=multipart([photos["coffee.jpg"]]))
    body_status = declared_length_status(live_server.base_url, 10**12)

    assert method.status_code == 405
    assert validation.status_code == 422
    assert body_status == 413
    assert rejected_count(client, "method_not_allowed") == before_method + 1
    assert rejected_count(client, "invalid_parameter", model="resnet18") == before_validation + 1
    assert rejected_count(client, "body_too_large", model="resnet18") == before_body + 1
