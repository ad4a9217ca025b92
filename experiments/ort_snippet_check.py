"""The README's ONNX Runtime snippet, run without vss, gives ``vss.predict``'s masks (issue 24).

1. tiny random-weight checkpoints (MRCFA causal, MRCFA with a reference after the target: lookahead 1);
2. a 30-frame mp4 of moving shapes at twice the export size (so the frames are resized, and the logits upsampled);
3. ``python -m vss.export format=onnx``; ``python -m vss.predict backend=eager`` (the checkpoint) and
   ``backend=onnx`` (the export);
4. the snippet after ``<!-- onnx-snippet -->`` in README.md, run by ``--venv``'s python (a venv holding only
   onnxruntime, numpy and opencv-python-headless; made when missing), its masks saved as .npy;
5. the masks compared: pixels that differ per frame, frames equal.

Usage::

    python experiments/ort_snippet_check.py [--venv /tmp/ortvenv] [--frames 30] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
HEIGHT, WIDTH = 64, 128  # the export size; the video is twice as large
MODELS = {
    "mrcfa": ["model=mrcfa"],
    "mrcfa_lookahead": ["model=mrcfa", "model.offsets=[-2,1]", "model.start=clamp"],
}
RUNNER = """
import sys, numpy as np
exec(open(sys.argv[1]).read())
out = dict((f"{i:06d}", ids.astype(np.uint8)) for i, ids in segment(sys.argv[2], sys.argv[3]))
np.savez(sys.argv[4], **out)
import onnxruntime, cv2
print("snippet ran with onnxruntime", onnxruntime.__version__, "opencv", cv2.__version__, "numpy", np.__version__)
"""


def make_venv(venv: Path) -> None:
    """A fresh venv with only onnxruntime, numpy and opencv-python-headless."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    packages = ["onnxruntime", "numpy", "opencv-python-headless"]
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *packages], check=True)


def write_video(path: Path, frames: int) -> None:
    from test_predict import moving_shapes

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (2 * WIDTH, 2 * HEIGHT))
    for f in moving_shapes(frames, (2 * HEIGHT, 2 * WIDTH)):
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()


def vss(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "offline"}
    print("$ python -m", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", *args, "hydra.run.dir=" + tempfile.mkdtemp()], check=True, env=env)


def masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted(folder.glob("*.png"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=Path("/tmp/ortvenv"))
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    from test_export import write_tiny_checkpoints

    work = args.work or Path(tempfile.mkdtemp(prefix="ort-snippet-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (args.venv / "bin" / "python").exists():
        make_venv(args.venv)
    pip = subprocess.run([str(args.venv / "bin" / "pip"), "list", "--format=freeze"], capture_output=True, text=True)
    print("venv", args.venv, "holds:", " ".join(pip.stdout.split()))
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"<!-- onnx-snippet -->\s*```python\n(.*?)```", readme, re.S)
    assert snippet, "README.md: no snippet after <!-- onnx-snippet -->"
    (work / "snippet.py").write_text(snippet.group(1))
    print(f"README snippet: {len(snippet.group(1).strip().splitlines())} lines")
    (work / "runner.py").write_text(RUNNER)
    video = work / "clip.mp4"
    write_video(video, args.frames)
    (work / "ckpts").mkdir(exist_ok=True)
    ckpts = write_tiny_checkpoints(work / "ckpts", MODELS, max(HEIGHT, WIDTH))
    failures = 0
    for name, ckpt in ckpts.items():
        out = work / name
        size = [f"height={HEIGHT}", f"width={WIDTH}"]
        vss("vss.export", f"ckpt_path={ckpt}", "format=onnx", *size, f"output={out}/onnx")
        vss("vss.predict", f"ckpt_path={ckpt}", f"source={video}", f"output={out}/eager", "progress=false")
        vss(
            "vss.predict",
            "backend=onnx",
            f"export={out}/onnx",
            f"source={video}",
            f"output={out}/ort",
            "progress=false",
        )
        ran = subprocess.run(
            [str(args.venv / "bin" / "python"), str(work / "runner.py"), str(work / "snippet.py"), f"{out}/onnx",
             str(video), str(out / "snippet.npz")],
            capture_output=True, text=True, env={"PATH": os.environ.get("PATH", "")},
        )  # fmt: skip
        print(ran.stdout.strip(), ran.stderr.strip()[-2000:])
        if ran.returncode:
            failures += 1
            continue
        eager, ort = masks(out / "eager" / "masks"), masks(out / "ort" / "masks")
        got = dict(np.load(out / "snippet.npz"))
        diff = [int((got[k] != eager[k]).sum()) for k in sorted(eager)] if sorted(got) == sorted(eager) else None
        diff_ort = [int((ort[k] != eager[k]).sum()) for k in sorted(eager)]
        pixels = next(iter(eager.values())).size
        equal = diff is not None and not any(diff)
        failures += not equal
        print(
            f"{name}: {len(eager)} frames of {pixels} pixels; snippet vs vss.predict backend=eager: "
            f"{'frames ' + str(sorted(got)) + ' vs ' + str(sorted(eager)) if diff is None else sum(diff)} pixels "
            f"differ ({'EQUAL' if equal else 'DIFFERENT'}); backend=onnx vs eager: {sum(diff_ort)} pixels differ",
            flush=True,
        )
    print("all masks equal" if not failures else f"{failures} model(s) differ", f"(work dir {work})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
