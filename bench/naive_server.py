"""The baseline a user writes by hand: FastAPI, one request at a time, the full
model with a forward hook on the layer of interest, JSON through ``tolist()``.

Run: python -m bench.naive_server ARCH LAYER PORT
"""

from __future__ import annotations

import io
import sys
import threading

import torch
import uvicorn
from fastapi import FastAPI, File, UploadFile
from PIL import Image
from torchvision import transforms as T
from torchvision.models import get_model


def build_app(architecture: str, layer: str) -> FastAPI:
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    model = get_model(architecture, weights=None).eval()
    captured: dict[str, torch.Tensor] = {}
    model.get_submodule(layer).register_forward_hook(lambda module, inputs, output: captured.__setitem__("features", output))
    transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    lock = threading.Lock()
    app = FastAPI()

    @app.post("/embed")
    def embed(images: list[UploadFile] = File(...)) -> dict:
        batch = torch.stack([transform(Image.open(io.BytesIO(image.file.read())).convert("RGB")) for image in images])
        with lock, torch.no_grad():
            model(batch)
            features = captured["features"].mean(dim=(2, 3))
            features = torch.nn.functional.normalize(features, dim=1)
        return {"embeddings": features.tolist()}

    return app


if __name__ == "__main__":
    architecture, layer, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    uvicorn.run(build_app(architecture, layer), host="127.0.0.1", port=port, log_level="warning")
