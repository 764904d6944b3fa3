"""Vision pipelines: decode each image (Pillow), pre-process it as the backbone states
(BackboneInfo.image), submit, and turn the executor's output into the client's answer (numpy
only; no torch).

    pre-process   RGB; resize the shortest edge to `resize` (the long edge to
                  int(resize * long / short)) with the stated filter, center-crop size x size
                  (top = (h - size) // 2, left = (w - size) // 2); or, with resize 0, resize to
                  size x size; then x / 255, (x - mean) / std per channel, (3, size, size) float32
                  (transformers' BitImageProcessor / ViTImageProcessor with the same settings)
    image-classification   softmax over the head's logits, top-k     -> labels [[{label, score}]]
    image-embedding        pooled rows, L2-normalised                -> embeddings (n, D)
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from ipc.errors import ErrorCode, FmplexError
from ipc.messages import BackboneInfo, ImageInfo, InferImages, InferReply, Result, SubmitImages
from ipc.spec import Pipeline, TaskSpec
from tasklets.pipelines.post import labelled, normalize

FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def preprocess(image: Image.Image, info: ImageInfo) -> np.ndarray:
    """One decoded image -> (3, size, size) float32, as the module docstring states."""
    img = image.convert("RGB")
    size, resample = info.size, FILTERS[info.resample]
    if info.resize:
        w, h = img.size
        short, long = min(w, h), max(w, h)
        new_short, new_long = info.resize, int(info.resize * long / short)
        img = img.resize((new_short, new_long) if w <= h else (new_long, new_short), resample)
        w, h = img.size
        top, left = (h - size) // 2, (w - size) // 2
        img = img.crop((left, top, left + size, top + size))
    else:
        img = img.resize((size, size), resample)
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(info.mean, np.float32)) / np.asarray(info.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def decode(data: bytes, index: int) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise FmplexError(ErrorCode.INVALID_INPUT, f"image {index}: cannot decode it ({e})") from None
    return img


class ImagePipeline:
    """InferImages -> decode + pre-process -> SubmitImages -> Result -> InferReply."""

    accepts = frozenset({InferImages})

    def __init__(self, spec: TaskSpec, info: BackboneInfo, prompt_tokens: int = 0):
        if info.image is None:
            raise FmplexError(ErrorCode.INVALID_INPUT, f"backbone {info.name} takes no images")
        self.spec, self.image = spec, info.image

    def encode(self, images: list[bytes]) -> np.ndarray:
        """(n, 3, size, size) float32 pixels of the encoded images."""
        return np.stack([preprocess(decode(b, i), self.image) for i, b in enumerate(images)])

    async def serve(self, msg: InferImages, call, send, deadline_ms: int) -> InferReply:
        result: Result = await call.request(SubmitImages, output=self.spec.pipeline.output,
                                            pixels=self.encode(msg.images),
                                            deadline_ms=deadline_ms)
        return self.reply(msg.ref, call.task, result.version, result.data,
                          msg.top_k or self.spec.top_k)

    def reply(self, ref: int, task: str, version: int, data: np.ndarray, top_k: int) -> InferReply:
        common = {"ref": ref, "task": task, "version": version, "truncated": [False] * len(data)}
        if self.spec.pipeline is Pipeline.IMAGE_CLASSIFICATION:
            return InferReply(labels=labelled(data, self.spec.labels, top_k), **common)
        return InferReply(embeddings=normalize(data), **common)
