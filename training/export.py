"""Export a trained model for deployment: one self-contained ONNX file that runs without this
project (and without PyTorch), e.g. with onnxruntime + numpy.

    python -m training.export MODEL.pt --onnx model.onnx [--torchscript model.ts] [--dynamo] [--opset 18]

MODEL.pt is any checkpoint this project writes: a trial's or an experiment's best.pt, or the
delivered `results/<name>/final/model.pt`, which may be an ensemble (training/ensemble.py).
It is read only through `load_checkpoint` (weights only: a file carrying pickled objects is refused).

The exported graph holds everything between the prepared image and the probabilities:

- input  "image": float32 (N, 1, 28, 28) in [0, 1], white ink on black, upright: the 28x28
  uint8 image training/preprocess.py makes from a user's picture, divided by 255;
- the normalisation of training.data.normalize and, for an ensemble, every member and the
  averaging in probability space;
- output "probs": float32 (N, num_classes), each row summing to 1, in the order of the class list.

The batch size is dynamic. The class list, the training config and the members' configs are
stored in the ONNX metadata (metadata_props: "classes", "config", "members", ... as JSON).

Exporters: the TorchScript-based ONNX exporter (`dynamo=False`) by default: it needs only the
`onnx` package, writes opset 18 (onnxruntime >= 1.14 and most other runtimes read it) and takes
well under a second; `--dynamo` uses torch's torch.export-based exporter (needs `onnxscript`
too). Both give the same graph to within float rounding; the tests check both against PyTorch.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import io
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.checkpoint import CheckpointError, build_from_checkpoint, load_checkpoint
from training.data import PIXEL_MEAN, PIXEL_STD, normalize
from training.fileio import write_atomic

INPUT, OUTPUT = "image", "probs"
DEFAULT_OPSET = 18
# Parity the exported graph must reach against PyTorch (max abs difference of probabilities).
TOLERANCE = 1e-4
INPUT_DOC = ("float32 (N, 1, 28, 28) in [0, 1]: white ink on black, upright, framed like EMNIST "
             "(the 28x28 image emnist-tune's training/preprocess.py makes, divided by 255)")
OUTPUT_DOC = "float32 (N, num_classes): class probabilities, each row sums to 1, in the order of 'classes'"


class ExportError(RuntimeError):
    """The export cannot be done here (a package missing, an unusable output path)."""


class Deployable(nn.Module):
    """Prepared images in [0, 1] -> class probabilities: normalisation and softmax built in, so
    the exported graph needs nothing from this project. An ensemble outputs the log of its mean
    probabilities (training/ensemble.py), so the softmax gives the mean probabilities back."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(normalize(image)).float().softmax(1)


def deployable(ckpt: dict, where: str = "checkpoint") -> Deployable:
    """The model of a loaded checkpoint (one model or an ensemble), on the CPU, ready to export."""
    return Deployable(build_from_checkpoint(ckpt, "cpu", where=where)).eval()


def member_configs(ckpt: dict) -> list[dict]:
    return [m["config"] for m in ckpt["members"]] if "members" in ckpt else [ckpt["config"]]


def _json(value: Any) -> str:
    def default(o: Any) -> Any:
        return o.tolist() if hasattr(o, "tolist") else str(o)

    return json.dumps(value, default=default, sort_keys=True)


def metadata(ckpt: dict, source: str | Path) -> dict[str, str]:
    """What the exported file says about itself (ONNX metadata_props; TorchScript extra files)."""
    meta = {
        "classes": _json(list(ckpt["classes"])),
        "config": _json(ckpt["config"]),
        "members": _json(member_configs(ckpt)),
        "epoch": str(ckpt["epoch"]),
        "input": INPUT_DOC,
        "output": OUTPUT_DOC,
        "normalization": _json({"mean": PIXEL_MEAN, "std": PIXEL_STD, "built_in": True}),
        "source_checkpoint": Path(source).name,
        "producer": f"emnist-tune training.export (torch {torch.__version__})",
    }
    if "split" in ckpt or "split" in ckpt["config"]:
        meta["split"] = str(ckpt.get("split", ckpt["config"].get("split")))
    for key in ("metrics", "final"):
        if ckpt.get(key):
            meta[key] = _json(ckpt[key])
    return meta


def onnx_packages(dynamo: bool) -> tuple[str, ...]:
    return ("onnx", "onnxscript") if dynamo else ("onnx",)


def require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"ONNX export needs the package(s) {', '.join(missing)}, which are not installed: "
                          f"pip install {' '.join(missing)} (or, in this repository, pip install -e '.[export]')")


def _check_output(path: Path) -> None:
    if path.is_dir():
        raise ExportError(f"output {path} is a directory; give a file name, e.g. {path / 'model.onnx'}")


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same path, or through symlinks, `..` or a hard link."""
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:  # (one of them does not exist yet)
        pass
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):
        return False


def check_outputs(source: Path, outputs: list[Path]) -> None:
    """Refuse an output that would overwrite the checkpoint it is made from (the model would be gone, replaced
    by a file no loader reads) or another output of the same command."""
    for i, out in enumerate(outputs):
        _check_output(out)
        if _same_file(out, source):
            raise ExportError(f"output {out} is the checkpoint being exported ({source}): writing it would destroy "
                              "the model; give another file name, e.g. model.onnx")
        if any(_same_file(out, other) for other in outputs[:i]):
            raise ExportError(f"--onnx and --torchscript name the same file {out}; give two file names")


def _example() -> torch.Tensor:
    # batch 2, not 1: the tracer must not take the batch size for a constant
    return torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def to_onnx(model: Deployable, *, dynamo: bool = False, opset: int = DEFAULT_OPSET):
    """The model as an onnx.ModelProto with a dynamic batch size (no metadata yet)."""
    require(*onnx_packages(dynamo))
    import onnx

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter's notice
        warnings.simplefilter("ignore", FutureWarning)
        if dynamo:
            program = torch.onnx.export(
                model, (_example(),), None, dynamo=True, verbose=False, opset_version=opset,
                input_names=[INPUT], output_names=[OUTPUT], external_data=False,
                dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
            )
            proto = program.model_proto
        else:
            buf = io.BytesIO()
            # torch >= 2.5 defaults to dynamo=True; older releases have no such argument
            legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
            torch.onnx.export(
                model, (_example(),), buf, **legacy, opset_version=opset,
                input_names=[INPUT], output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            )
            proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    return proto


def opset_of(proto) -> int:
    return max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)


def export_onnx(ckpt: dict, path: str | Path, source: str | Path = "checkpoint", *, dynamo: bool = False,
                opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Write the checkpoint's model as one self-contained ONNX file (atomically; missing folders
    are created). Returns what was written: path, bytes, opset, and the parity check's result."""
    path = Path(path)
    _check_output(path)
    model = deployable(ckpt, where=str(source))
    proto = to_onnx(model, dynamo=dynamo, opset=opset)
    import onnx

    onnx.helper.set_model_props(proto, metadata(ckpt, source))
    proto.doc_string = (f"emnist-tune character classifier. input '{INPUT}': {INPUT_DOC}. "
                        f"output '{OUTPUT}': {OUTPUT_DOC}")
    data = proto.SerializeToString()
    write_atomic(path, lambda f: f.write(data))
    return {"path": path, "bytes": len(data), "opset": opset_of(proto), "check": verify(model, data)}


def verify(model: Deployable, onnx_bytes: bytes, n: int = 16) -> dict[str, Any] | None:
    """Run the exported graph in onnxruntime (when installed) on batches of 1 and n images and
    compare with PyTorch. None: onnxruntime is not installed."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(n, 1, 28, 28, generator=g) * (torch.rand(n, 1, 28, 28, generator=g) > 0.7)).float()
    with torch.no_grad():
        want = model(x).numpy()
    got = session.run([OUTPUT], {INPUT: x.numpy()})[0]
    one = session.run([OUTPUT], {INPUT: x[:1].numpy()})[0]
    diff = max(float(abs(got - want).max()), float(abs(one - want[:1]).max()))
    return {"max_abs_diff": diff, "images": n, "onnxruntime": ort.__version__}


def export_torchscript(ckpt: dict, path: str | Path, source: str | Path = "checkpoint") -> dict[str, Any]:
    """The same graph as a traced TorchScript module (for libtorch / torch.jit.load); the metadata
    travels as extra files ("classes.json", "metadata.json"). TorchScript is deprecated in recent
    torch releases; ONNX is the format to deploy."""
    path = Path(path)
    _check_output(path)
    model = deployable(ckpt, where=str(source))
    meta = metadata(ckpt, source)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.* deprecation notices
        traced = torch.jit.trace(model, (_example(),))
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={"classes.json": meta["classes"], "metadata.json": _json(meta)})
    data = buf.getvalue()
    write_atomic(path, lambda f: f.write(data))
    return {"path": path, "bytes": len(data)}


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def describe(ckpt: dict) -> str:
    configs = member_configs(ckpt)
    names = [str(c.get("model", "?")) for c in configs]
    if len(configs) == 1:
        return f"{names[0]} (epoch {ckpt['epoch']})"
    return f"ensemble of {len(configs)}: {', '.join(names)}"


def summary(ckpt: dict, onnx_info: dict | None, ts_info: dict | None, dynamo: bool) -> str:
    classes = ckpt["classes"]
    shown = " ".join(classes) if len(classes) <= 64 else " ".join(classes[:64]) + " ..."
    lines = []
    if onnx_info:
        exporter = "torch.export-based (dynamo)" if dynamo else "TorchScript-based"
        lines.append(f"wrote {onnx_info['path']} ({_size(onnx_info['bytes'])}, ONNX opset {onnx_info['opset']}, "
                     f"{exporter} exporter)")
    if ts_info:
        lines.append(f"wrote {ts_info['path']} ({_size(ts_info['bytes'])}, TorchScript)")
    lines += [
        f"  model:   {describe(ckpt)}",
        f"  classes: {len(classes)}: {shown}",
        f"  input:   '{INPUT}' float32 (N, 1, 28, 28) in [0, 1], white ink on black, upright; normalisation built in",
        f"  output:  '{OUTPUT}' float32 (N, {len(classes)}), rows sum to 1; class list in the metadata ('classes')",
    ]
    check = onnx_info and onnx_info.get("check")
    if check:
        lines.append(f"  checked with onnxruntime {check['onnxruntime']}: max |p_onnx - p_torch| = "
                     f"{check['max_abs_diff']:.1e} on {check['images']} images")
    elif onnx_info:
        lines.append("  not checked: onnxruntime is not installed (pip install onnxruntime)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.export",
        description="Export a trained checkpoint (one model or an ensemble) as a self-contained ONNX file: "
                    "input float32 (N, 1, 28, 28) in [0, 1], output class probabilities.")
    p.add_argument("checkpoint", type=Path, help="best.pt, last.pt or a delivered final/model.pt")
    p.add_argument("--onnx", type=Path, metavar="OUT.onnx", help="write the ONNX file here")
    p.add_argument("--torchscript", type=Path, metavar="OUT.pt", help="also write a traced TorchScript module")
    p.add_argument("--dynamo", action="store_true", help="use torch's torch.export-based ONNX exporter "
                   "(needs onnxscript) instead of the TorchScript-based one")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    args = p.parse_args(argv)
    if args.onnx is None and args.torchscript is None:
        p.error("nothing to write: give --onnx OUT.onnx (and/or --torchscript OUT.pt)")
    try:
        check_outputs(args.checkpoint, [out for out in (args.onnx, args.torchscript) if out is not None])
        if args.onnx is not None:
            require(*onnx_packages(args.dynamo))
        ckpt = load_checkpoint(args.checkpoint)
        onnx_info = ts_info = None
        if args.onnx is not None:
            onnx_info = export_onnx(ckpt, args.onnx, args.checkpoint, dynamo=args.dynamo, opset=args.opset)
        if args.torchscript is not None:
            ts_info = export_torchscript(ckpt, args.torchscript, args.checkpoint)
    except (CheckpointError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write the output: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the exporters fail in many ways; say which, in one line
        first = (str(e).strip().splitlines() or [""])[0][:300]
        hint = ("; try " + ("without --dynamo" if args.dynamo else "with --dynamo")) if args.onnx is not None else ""
        print(f"error: export failed ({type(e).__name__}: {first}){hint}", file=sys.stderr)
        return 1
    print(summary(ckpt, onnx_info, ts_info, args.dynamo))
    check = onnx_info and onnx_info.get("check")
    if check and check["max_abs_diff"] > TOLERANCE:
        print(f"error: the exported graph differs from the PyTorch model by {check['max_abs_diff']:.1e} "
              f"(more than {TOLERANCE:g})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
