"""Make the Keras reference outputs that test the ONNX conversion of the FER mini-Xception model.

THIS SCRIPT IMPORTS TENSORFLOW. It is run only by hand, in a throw-away virtualenv
(see services/fer/tests/data/README.md); TensorFlow is not a dependency of the
project and nothing else in the repository imports it.

It builds 32 deterministic synthetic 64x64 grayscale images (seeded noise, smooth
gradients and simple drawn shapes -- no dataset images, so the result may be
committed), normalises them exactly like the `fer` package does
(uint8 -> float32 / 255, then (x - 0.5) * 2, i.e. [-1, 1]), runs the ORIGINAL
Keras model on them (NHWC) and saves `inputs` (N, 64, 64) float32 and
`outputs` (N, 7) float32 to an .npz file.

    /tmp/tfenv/bin/python services/fer/tools/make_reference_outputs.py \
        --model var/artifacts/fer/emotion_model.hdf5 \
        --out services/fer/tests/data/mini_xception_reference.npz
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

SIZE = 64


def _grid() -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    return yy / (SIZE - 1), xx / (SIZE - 1)  # both in [0, 1]


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _noise_images(rng: np.random.Generator) -> list[np.ndarray]:
    images = [rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8) for _ in range(4)]
    # Blurred noise (box-filtered on a coarse grid, then upsampled) is more image-like.
    for cells in (4, 8, 16, 32):
        coarse = rng.random((cells, cells))
        images.append(_to_uint8(np.kron(coarse, np.ones((SIZE // cells, SIZE // cells)))))
    for _ in range(4):
        images.append(_to_uint8(np.clip(rng.normal(0.5, 0.15, (SIZE, SIZE)), 0.0, 1.0)))
    return images


def _gradient_images() -> list[np.ndarray]:
    y, x = _grid()
    radial = np.hypot(y - 0.5, x - 0.5) / np.hypot(0.5, 0.5)
    return [
        _to_uint8(np.zeros((SIZE, SIZE))),
        _to_uint8(np.ones((SIZE, SIZE))),
        _to_uint8(np.full((SIZE, SIZE), 0.5)),
        _to_uint8(x),
        _to_uint8(y),
        _to_uint8(1.0 - (x + y) / 2.0),
        _to_uint8(radial),
        _to_uint8(1.0 - radial),
        _to_uint8(0.5 + 0.5 * np.sin(2 * np.pi * 3 * x)),
        _to_uint8(0.5 + 0.5 * np.sin(2 * np.pi * (2 * x + 3 * y))),
    ]


def _ellipse(y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def _cartoon_face(mouth_curve: float, brow_tilt: float, mouth_open: float) -> np.ndarray:
    y, x = _grid()
    img = np.full((SIZE, SIZE), 0.15)
    img[_ellipse(y, x, 0.5, 0.5, 0.45, 0.36)] = 0.75  # head
    for cx in (0.35, 0.65):
        img[_ellipse(y, x, 0.4, cx, 0.05, 0.07)] = 0.1  # eyes
        # Brows: a thin band whose height varies linearly across the eye.
        side = 1.0 if cx < 0.5 else -1.0
        brow_y = 0.3 + side * brow_tilt * (x - cx)
        img[(np.abs(y - brow_y) < 0.015) & (np.abs(x - cx) < 0.09)] = 0.1
    # Mouth: a parabola band; positive curve lowers the centre = smile (corners up).
    mouth_y = 0.72 + mouth_curve * (1.0 - ((x - 0.5) / 0.15) ** 2) * 0.5
    in_mouth = np.abs(x - 0.5) < 0.15
    img[in_mouth & (np.abs(y - mouth_y) < 0.015 + mouth_open)] = 0.1
    return _to_uint8(img)


def _shape_images() -> list[np.ndarray]:
    y, x = _grid()
    images = []
    disc = np.where(_ellipse(y, x, 0.5, 0.5, 0.3, 0.3), 1.0, 0.0)
    images.append(_to_uint8(disc))
    square = np.zeros((SIZE, SIZE))
    square[16:48, 16:48] = 1.0
    images.append(_to_uint8(square))
    images.append(_to_uint8(np.where(np.abs(x - y) < 0.05, 0.9, 0.2)))  # diagonal line
    checker = ((np.arange(SIZE)[:, None] // 8 + np.arange(SIZE)[None, :] // 8) % 2).astype(np.float64)
    images.append(_to_uint8(checker))
    for mouth_curve, brow_tilt, mouth_open in (
        (0.12, 0.0, 0.0),  # smile
        (0.15, 0.0, 0.03),  # open smile
        (-0.1, 0.6, 0.0),  # frown, slanted brows
        (0.0, 0.0, 0.08),  # open "o" mouth
        (-0.05, -0.6, 0.0),
        (0.0, 0.0, 0.0),  # neutral
    ):
        images.append(_cartoon_face(mouth_curve, brow_tilt, mouth_open))
    return images


def make_inputs() -> np.ndarray:
    """32 synthetic inputs, normalised as the fer package does: (N, 64, 64) float32 in [-1, 1]."""
    rng = np.random.default_rng(0)
    images = np.stack(_noise_images(rng) + _gradient_images() + _shape_images())
    assert images.shape == (32, SIZE, SIZE) and images.dtype == np.uint8
    x = images.astype(np.float32) / np.float32(255.0)
    return (x - np.float32(0.5)) * np.float32(2.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="Keras emotion_model.hdf5")
    parser.add_argument("--out", type=Path, required=True, help="output .npz")
    args = parser.parse_args()

    import tensorflow as tf  # deliberately local: only this tool needs it

    model = tf.keras.models.load_model(args.model, compile=False)
    inputs = make_inputs()
    outputs = model.predict(inputs[..., None], batch_size=len(inputs), verbose=0).astype(np.float32)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        inputs=inputs,
        outputs=outputs,
        tensorflow_version=np.array(tf.__version__),
        model_sha256=np.array(hashlib.sha256(args.model.read_bytes()).hexdigest()),
    )
    print(f"tensorflow {tf.__version__}: wrote {args.out} inputs {inputs.shape} outputs {outputs.shape}")
    print("argmax per input:", outputs.argmax(axis=1).tolist())


if __name__ == "__main__":
    main()
