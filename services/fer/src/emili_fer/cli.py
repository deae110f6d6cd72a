"""``emili fer ...``: analyse images and evaluate the model from the command line."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from emili.fer.v1 import fer_pb2, fer_pb2_grpc
from emili_core.errors import EmiliError
from emili_core.grpc_client import make_channel
from emili_core.settings import load_settings
from emili_fer.engine import FerEngine, FrameInput, Reading
from emili_fer.evaluation import evaluate_crops
from emili_fer.model import OnnxClassifier
from emili_fer.preprocess import Preprocessor
from emili_fer.settings import FerSettings

app = typer.Typer(help="Facial emotion recognition.", no_args_is_help=True)


def _cli_token(settings: FerSettings) -> str:
    from emili_core.cli import CliSettings, client_token

    return client_token(load_settings(CliSettings), "fer")


async def _analyze_remote(settings: FerSettings, target: str, paths: list[Path]) -> list[dict[str, object]]:
    async with make_channel(target, _cli_token(settings), tls=settings.tls, timeout=30) as channel:
        stub = fer_pb2_grpc.FerServiceStub(channel)
        request = fer_pb2.AnalyzeBatchRequest(frames=[fer_pb2.Frame(data=p.read_bytes()) for p in paths])
        response = await stub.AnalyzeBatch(request)
    from google.protobuf.json_format import MessageToDict

    return [
        {
            "image": str(p),
            **MessageToDict(item, preserving_proto_field_name=True, always_print_fields_with_no_presence=True),
        }
        for p, item in zip(paths, response.items, strict=True)
    ]


@app.command()
def analyze(
    images: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, help="JPEG or PNG files.")],
    local: Annotated[bool, typer.Option(help="Run the model in this process instead of calling the server.")] = False,
    target: Annotated[str | None, typer.Option(help="FER server address (default from settings).")] = None,
) -> None:
    """Print one JSON reading per image."""
    settings = load_settings(FerSettings)
    if local:
        engine = FerEngine(settings.fer, settings.artifacts_dir)
        engine.load()
        results = engine.analyze_sync([FrameInput(p.read_bytes()) for p in images])
        out: list[dict[str, object]] = [
            {"image": str(p), **(r.to_json() if isinstance(r, Reading) else {"error": str(r)})}
            for p, r in zip(images, results, strict=True)
        ]
    else:
        out = asyncio.run(_analyze_remote(settings, target or settings.grpc_target(), images))
    print(json.dumps(out, indent=2))


@app.command("eval")
def eval_crops(
    npz: Annotated[Path, typer.Option("--npz", exists=True, dir_okay=False, help="`images` (N,H,W) uint8, `labels`.")],
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
) -> None:
    """Classify labelled face crops (no detection) and print accuracy and per-class recall as JSON."""
    settings = load_settings(FerSettings)
    engine = FerEngine(settings.fer, settings.artifacts_dir)
    classifier = OnnxClassifier(engine.manifest, settings.fer.device, settings.fer.intra_op_threads)
    preprocess = Preprocessor(engine.manifest)
    with np.load(npz) as data:
        if "images" not in data or "labels" not in data:
            raise typer.BadParameter(f"{npz} needs arrays `images` and `labels`; it has {list(data)}")
        images, labels = data["images"], data["labels"]
    try:
        result = evaluate_crops(lambda b: classifier(preprocess.batch(b)).probabilities, images, labels, batch_size)
    except (ValueError, EmiliError) as exc:
        raise typer.BadParameter(str(exc)) from None
    print(json.dumps({**result, "model_id": engine.manifest.id}))
