"""Predict characters in arbitrary images with a trained checkpoint.

    python training/predict.py MODEL IMAGE [IMAGE ...] [--k 5] [--json]
    python training/predict.py MODEL --read LINE.png [--lexicon english|none|FILE] [--json]

MODEL is a checkpoint file or a folder: an experiment folder gives its delivered model
(final/model.pt, see search/final.py), else its best.pt; a training run's folder its best.pt.

`Predictor` is shared by this CLI, the dashboard and the search's final report, so an
image is always prepared the same way (training/preprocess.py: EMNIST's own recipe).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from training.checkpoint import CheckpointError, build_from_checkpoint, load_checkpoint
from training.ensemble import one_view
from training.inference import predict_logits, resolve_device, use_bf16
from training.ink import ImageError, load_image
from training.lexicon import LexiconError, load_lexicon
from training.preprocess import NoCharacterFound, preprocess
from training.reading import Reading, describe, read_line


@dataclass
class Prediction:
    top: list[tuple[str, float]] = field(default_factory=list)  # (character, probability), best first
    image: np.ndarray | None = None  # the 28x28 uint8 image the model saw
    message: str = ""  # why there is no prediction (e.g. "no character found: ...")

    @property
    def found(self) -> bool:
        return bool(self.top)

    def to_dict(self) -> dict:
        return {"top": [{"char": c, "prob": p} for c, p in self.top], "message": self.message}


# What a folder stands for, first match wins: an experiment's delivered model, then its (or a
# training run's) best checkpoint.
DEFAULT_MODELS = ("final/model.pt", "best.pt")


def resolve_model(path: str | Path) -> Path:
    """The model file a path names: itself, or for a folder the first of DEFAULT_MODELS in it."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in DEFAULT_MODELS:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"{path} holds no model: looked for {', '.join(DEFAULT_MODELS)} "
                          "(a search writes them when it ends; search/final.py makes final/model.pt)")


class Predictor:
    def __init__(self, model: torch.nn.Module, classes: list[str], config: dict, device: torch.device):
        # channels-last weights and inputs: oneDNN's convolutions run ~1.4x faster that way on the CPU (the vgg in
        # fp32, reading lines), and the probabilities differ by float rounding only (1e-7)
        self.channels_last = device.type in ("cpu", "cuda")
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model, self.classes, self.config, self.device = model.eval(), list(classes), config, device

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> Predictor:
        """From a checkpoint file, or a folder (see resolve_model): an ensemble file gives the
        members averaged in probability space."""
        path = resolve_model(path)
        ckpt = load_checkpoint(path)
        dev = resolve_device(device)
        return cls(build_from_checkpoint(ckpt, dev, where=str(path)), ckpt["classes"], ckpt["config"], dev)

    def probabilities(self, images: torch.Tensor | np.ndarray, model: torch.nn.Module | None = None,
                      precision: str = "fp32") -> torch.Tensor:
        """Class probabilities for already-prepared uint8 images (N, 28, 28), upright (by `model`, one pass of
        this predictor's model, when given). fp32 by default: exact probabilities, the same on every CPU."""
        x = torch.as_tensor(np.asarray(images, dtype=np.uint8)).to(self.device)
        return predict_logits(self.model if model is None else model, x, batch_size=512,
                              channels_last=self.channels_last, precision=precision).softmax(1).cpu()

    def predict(self, images, k: int = 5) -> list[Prediction]:
        """Top-k characters for each image (PIL images or arrays of any size, mode and polarity).
        A single image may be passed instead of a list."""
        if not isinstance(images, list | tuple):
            images = [images]
        results: list[Prediction] = []
        prepared: list[np.ndarray] = []
        for image in images:
            try:
                x = preprocess(image)
            except (NoCharacterFound, ImageError) as e:
                results.append(Prediction(message=str(e)))
                continue
            results.append(Prediction(image=x))
            prepared.append(x)
        if prepared:
            probs = self.probabilities(np.stack(prepared))
            values, idx = probs.topk(min(k, len(self.classes)), dim=1)
            it = iter(zip(values.tolist(), idx.tolist(), strict=True))
            for r in results:
                if r.image is not None:
                    v, i = next(it)
                    r.top = [(self.classes[j], float(p)) for p, j in zip(v, i, strict=True)]
        return results

    def read(self, image, lexicon=None, k: int = 3) -> Reading:
        """Read a line of writing (training/reading.py): every candidate character prepared as one character
        is and classified in one batch. lexicon: None or "none" (the model alone), "english", a word-list file,
        or a loaded training.lexicon.Lexicon. A bad image gives a Reading with a message; a bad lexicon raises
        LexiconError."""
        # the line's candidates are screened by one pass (a TTA's identity view, an ensemble's first member), in
        # bf16 where the CPU or GPU has it natively (~4x faster on a CPU with AMX); the characters read are then
        # scored by the whole model in fp32 (training/reading.py)
        single = one_view(self.model)
        screen = None
        if single is not None or use_bf16(self.device, "auto", self.model):
            screen = lambda x: self.probabilities(x, single, precision="auto").numpy()  # noqa: E731
        return read_line(image, lambda x: self.probabilities(x).numpy(), self.classes, load_lexicon(lexicon), k=k,
                         screen=screen)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Top-k characters for image files, with a trained checkpoint.")
    p.add_argument("checkpoint", type=Path, help="checkpoint file, or an experiment folder (its final model)")
    p.add_argument("images", type=Path, nargs="*", help="images of one character each")
    p.add_argument("--read", type=Path, metavar="LINE", help="an image of a line of writing: read it whole")
    p.add_argument("--lexicon", default="english",
                   help="with --read: 'english' (the default), 'none' (the model alone) or a file of words")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    args = p.parse_args(argv)
    if not args.images and args.read is None:
        p.error("give images of characters, or --read LINE for a line of writing")
    if args.images and args.read is not None:
        p.error("give images of characters or --read LINE, not both")
    if args.k < 1:
        p.error("--k must be 1 or more")
    try:
        lexicon = load_lexicon(args.lexicon) if args.read is not None else None
        predictor = Predictor.from_checkpoint(args.checkpoint, args.device)
    except (CheckpointError, LexiconError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.read is not None:
        return _read(predictor, args.read, lexicon, args.json)
    failed = 0
    for path in args.images:
        try:
            result = predictor.predict(load_image(path), k=args.k)[0]
        except (ImageError, OSError) as e:
            result = Prediction(message=f"error: {e}")
        failed += not result.found
        if args.json:
            print(json.dumps({"file": str(path), **result.to_dict()}))
        elif result.found:
            print(f"{path}: " + "  ".join(f"{c} {p:.3f}" for c, p in result.top))
        else:
            print(f"{path}: {result.message}")
    return 1 if failed else 0


def _read(predictor: Predictor, path: Path, lexicon, as_json: bool) -> int:
    try:
        reading = predictor.read(load_image(path), lexicon=lexicon)
    except (ImageError, OSError) as e:
        reading = Reading("", "", message=f"error: {e}")
    if as_json:
        print(json.dumps({"file": str(path), **reading.to_json()}))
    elif reading.found:
        print(describe(reading))
    else:
        print(f"{path}: {reading.message}")
    return 0 if reading.found else 1


if __name__ == "__main__":
    sys.exit(main())
