"""A student's CPU forms: ONNX (fp32) and ONNX int8 (dynamic quantization), run with onnxruntime.

    forms = export_student(spec, checkpoint, out_dir, rows, multi_label)  # {"onnx": {...}, "int8": {...}}
    session = load_session(path, sha256)                                # refused if cut short or altered

The graph is the fold model's own forward pass to its logits (`torch.onnx.export`, dynamic batch and
sequence axes); tokenizing stays the HF tokenizer's, as in every other form, so the rows are encoded
exactly as the student was trained on them (nikl_ray/encode.py). int8 is onnxruntime's dynamic
quantization: weights of every MatMul stored as int8, activations quantized per batch at run time.
Each form is checked on `rows` against the fp32 student when it is made: the largest difference of
any probability is kept with it (what the serving side reports, and the tests bound).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from nikl_ray.artifacts import sha256_file

if TYPE_CHECKING:  # the CLI reads FORMS when it builds its parser: this module imports light
    import numpy as np

    from nikl_ray.backbones import BackboneSpec
    from nikl_ray.data import TextRows

log = logging.getLogger(__name__)
FORMS = ("fp32", "int8", "onnx")  # what `--student` and Predictor.load(student=…) take
FILES = {"onnx": "student.onnx", "int8": "student.int8.onnx"}


class ExportError(ValueError):
    """An export file that is missing, cut short, altered or not a model onnxruntime can run."""


def input_names(tokenizer, spec: BackboneSpec) -> list[str]:
    """The tensors the tokenizer gives a row (input_ids, attention_mask, token_type_ids where it has them)."""
    from nikl_ray.data import TextRows
    from nikl_ray.encode import encode

    return list(encode(tokenizer, spec, TextRows(["a"], [None], [None])))


def export_student(spec: BackboneSpec, checkpoint: str | Path, out: Path, rows: TextRows, multi_label: bool,
                   num_labels: int) -> dict[str, dict]:
    """Write the student at `checkpoint` as ONNX and int8 ONNX into `out`; per form its file (relative
    to `out`'s parent), checksum and largest probability difference from the fp32 student on `rows`."""
    import numpy as np
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from nikl_ray.backbones import load_trained
    from nikl_ray.members import embed

    tokenizer, model = load_trained(spec, checkpoint, num_labels, multi_label)
    if hasattr(model, "merge_and_unload"):  # a LoRA student: its adapter folded into the weights
        model = model.merge_and_unload()
    names = input_names(tokenizer, spec)

    class Logits(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, *tensors):
            return self.net(**dict(zip(names, tensors))).logits

    out.mkdir(parents=True, exist_ok=True)
    sample = batch_of(tokenizer, spec, rows.take(range(min(4, len(rows)))), names)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    paths = {form: out / name for form, name in FILES.items()}
    with exporters_quiet():
        program = torch.onnx.export(Logits(model).eval(), tuple(torch.tensor(sample[k]) for k in names),
                                    input_names=names, output_names=["logits"],
                                    dynamic_shapes=(({0: batch, 1: seq},) * len(names),), dynamo=True,
                                    external_data=False, verbose=False)
        program.save(str(paths["onnx"]))
        quantize_dynamic(str(paths["onnx"]), str(paths["int8"]), weight_type=QuantType.QInt8)
    reference = embed(spec, tokenizer, model, rows, multi_label)[1]
    forms = {}
    for form, path in paths.items():
        digest = sha256_file(path)
        probs = onnx_probs(load_session(path, digest), tokenizer, spec, rows, multi_label)
        forms[form] = {"file": path.relative_to(out.parent).as_posix(), "sha256": digest, "bytes": path.stat().st_size,
                       "max_abs_diff": float(np.abs(probs - reference).max()) if len(rows) else 0.0}
        log.info("distill: %s form %s (%.1f MB), probabilities within %.2g of the fp32 student on %d rows", form, path.name,
                 path.stat().st_size / 2**20, forms[form]["max_abs_diff"], len(rows))
    return forms


@contextlib.contextmanager
def exporters_quiet():
    """torch.onnx's notes on renamed axes and onnxruntime's advice to pre-process before quantizing
    (root-logger warnings) say nothing a user can act on about this graph."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def load_session(path: Path, sha256: str):
    """An onnxruntime session of an export file, after its checksum matches the one it was made with."""
    import onnxruntime as ort

    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path} is missing: distill the student again (`nikl-ray distill`)")
    if sha256_file(path) != sha256:
        raise ExportError(f"{path} was truncated or altered since it was exported (its checksum differs); "
                          "distill the student again")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # its own warnings about graph fusions are not the user's to act on
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for a file it cannot read
        raise ExportError(f"{path} is not a model onnxruntime can run: {e}") from None


def batch_of(tokenizer, spec: BackboneSpec, rows: TextRows, names: list[str]) -> dict[str, np.ndarray]:
    """Rows encoded as training encoded them, padded into one int64 batch."""
    import numpy as np

    from nikl_ray.encode import encode

    enc = encode(tokenizer, spec, rows)
    padded = tokenizer.pad({k: enc[k] for k in names}, return_tensors="np")
    return {k: padded[k].astype(np.int64) for k in names}


def onnx_probs(session, tokenizer, spec: BackboneSpec, rows: TextRows, multi_label: bool,
               batch_size: int = 64) -> np.ndarray:
    """Probabilities of rows from an export's session, in the rows' order; batches of similar lengths."""
    import numpy as np

    from nikl_ray.encode import encode
    from nikl_ray.metrics import to_probs

    names = [i.name for i in session.get_inputs()]
    out = None
    if not len(rows):
        return np.zeros((0, 0), np.float32)
    lengths = np.array([len(ids) for ids in encode(tokenizer, spec, rows)["input_ids"]])
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        logits = session.run(["logits"], batch_of(tokenizer, spec, rows.take(idx), names))[0]
        probs = to_probs(logits.astype(np.float64), multi_label).astype(np.float32)
        out = np.zeros((len(rows), probs.shape[1]), np.float32) if out is None else out
        out[idx] = probs
    return out
