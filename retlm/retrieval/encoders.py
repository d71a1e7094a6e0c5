"""Embed backends: the encoder forward pass behind ``Embedder``, one per name of ``EMBED_BACKENDS``.

- ``torch``: the HF model in float32 (on CUDA when there is one): the reference.
- ``openvino`` (the default on a CPU): the model exported once to ONNX and compiled by OpenVINO for the
  CPU, float32: the same vectors as torch (cosine >= 0.99999) and the fastest of these that keeps the
  neighbors (docs/benchmarks.md).
- ``onnx``: the exported model with its BERT graph fused by ONNX Runtime's transformer optimizer
  (attention, layer norms, GELU), run by ONNX Runtime on the CPU. Same float32 numbers.
- ``onnx-int8``: the fused graph with int8 dynamic quantisation (per-channel int8 weights, uint8
  activations quantised per batch) of the products listed in ``INT8_NODES``. Quantising every product
  moved MiniLM's top-2 neighbor sets too far from the float32 ones (mean Jaccard 0.81 on the bundled
  corpus); only the attention products stay within 0.9 (docs/benchmarks.md).

The exported model is built on first use from the local model folder (never fetched), checked against
the torch model on probe sentences, and cached under ``$RETLM_HOME/embedders/`` (default
``~/.cache/retlm``), keyed by the sha256 of the model's config and weights, the backend, and the
versions of torch and onnxruntime that built it. It is written to a temporary folder and renamed into
place (a killed export leaves nothing half-written), and every load compares its sha256 with the one
recorded beside it (a mismatch rebuilds it, with a warning). Pooling is not part of the graph: every
backend returns the last hidden states and ``retlm.retrieval.embedding.pool`` pools them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retlm.checksums import CorruptFileError, sha256_file, verify_folder, write_folder_checksums
from retlm.compat import FAST_EMBED_BACKENDS_TRACE, FAST_EMBED_MIN_TRANSFORMERS
from retlm.errors import OptionError
from retlm.retrieval.config import EMBED_BACKENDS
from retlm.tokenization import resolve_model_path
from retlm.utils import retlm_home

CPU_DEFAULT_BACKEND = "openvino"
RECIPE_VERSION = 1  # bump when the export or quantisation recipe changes: old cache entries are ignored
MODEL_FILE = "model.onnx"
INFO_FILE = "export.json"
# The products quantised to int8 by onnx-int8 (see docs/benchmarks.md for the agreement of each choice).
INT8_NODES = ("attention", "attention-output")
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # integers, floats or strings",
    "Retrieval-enhanced transformers read neighboring chunks from a database of text.",
    "x",
)
PROBE_MIN_COSINE = {"onnx": 0.9999, "onnx-int8": 0.98, "openvino": 0.9999}


def default_backend(device: str | None = None) -> str:
    """``torch`` on a CUDA device, else the fast CPU backend."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") or not FAST_EMBED_BACKENDS_TRACE:
        return "torch"
    return CPU_DEFAULT_BACKEND


def check_backend(backend: Any) -> str:
    if backend not in EMBED_BACKENDS:
        raise OptionError(f"embed backend must be one of {EMBED_BACKENDS}, got {str(backend)[:40]!r}")
    return backend


class TorchEncoder:
    """The HF model in float32: ``(batch, seq)`` int64 ids and mask -> ``(batch, seq, dim)`` hidden states."""

    backend = "torch"

    def __init__(self, name: str, device: str):
        from transformers import AutoModel

        self.device = device
        self.model = AutoModel.from_pretrained(resolve_model_path(name)).eval().requires_grad_(False)
        self.model.to(device)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class OnnxEncoder:
    """An exported model run by ONNX Runtime on the CPU, with as many threads as torch uses."""

    def __init__(self, name: str, backend: str):
        import onnxruntime as ort

        self.backend = backend
        self.device = "cpu"
        self.path = cached_export(name, backend)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        feed = {
            "input_ids": np.ascontiguousarray(input_ids.cpu().numpy(), dtype=np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask.cpu().numpy(), dtype=np.int64),
        }
        return torch.from_numpy(self.session.run(None, feed)[0])


class OpenVinoEncoder:
    """The exported model compiled by OpenVINO for the CPU, with as many threads as torch uses."""

    backend = "openvino"

    def __init__(self, name: str):
        import openvino

        self.device = "cpu"
        self.path = cached_export(name, self.backend)
        threads = {"INFERENCE_NUM_THREADS": torch.get_num_threads()}
        self.model = openvino.Core().compile_model(str(self.path), "CPU", threads)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        feed = {
            "input_ids": np.ascontiguousarray(input_ids.cpu().numpy(), dtype=np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask.cpu().numpy(), dtype=np.int64),
        }
        return torch.from_numpy(np.array(self.model(feed)[0]))


@lru_cache(maxsize=4)
def load_encoder(name: str, backend: str, device: str) -> TorchEncoder | OnnxEncoder:
    """The encoder of model ``name`` (a folder or a bundled name) for ``backend`` (cached per process)."""
    check_backend(backend)
    if backend == "torch":
        return TorchEncoder(name, device)
    if str(device).startswith("cuda"):
        raise OptionError(f"embed backend {backend!r} runs on the CPU; use embed backend 'torch' on a GPU")
    if not FAST_EMBED_BACKENDS_TRACE:
        raise OptionError(
            f"embed backend {backend!r} needs transformers>={FAST_EMBED_MIN_TRANSFORMERS} (its export traces "
            "the encoder); use embed backend 'torch' or upgrade transformers"
        )
    if backend == "openvino":
        return OpenVinoEncoder(name)
    return OnnxEncoder(name, backend)


# ------------------------------------------------------------------------------------------- the export
def _source_files(folder: Path) -> list[Path]:
    files = [folder / "config.json", *sorted(folder.glob("*.safetensors")), *sorted(folder.glob("*.bin"))]
    return [f for f in files if f.is_file()]


def cache_folder(name: str, backend: str) -> Path:
    """Where the export of model ``name`` for ``backend`` lives: keyed by the sha256 of the model's config
    and weights, the recipe and the versions of the exporting libraries."""
    import onnxruntime

    folder = Path(resolve_model_path(name))
    digest = hashlib.sha256()
    for file in _source_files(folder):
        digest.update(f"{file.name}:{sha256_file(file)}".encode())
    digest.update(f"{backend}:{RECIPE_VERSION}:{torch.__version__}:{onnxruntime.__version__}".encode())
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in folder.name)[:40] or "model"
    return retlm_home() / "embedders" / f"{slug}-{digest.hexdigest()[:16]}" / backend


def cached_export(name: str, backend: str) -> Path:
    """The checked ``model.onnx`` of ``name`` for ``backend``, exported (once) when missing or corrupt."""
    target = cache_folder(name, backend)
    if (target / MODEL_FILE).is_file():
        try:
            if verify_folder(target, [MODEL_FILE]):
                return target / MODEL_FILE
        except CorruptFileError as err:
            warnings.warn(f"rebuilding the cached {backend} export: {err}", stacklevel=3)
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{backend}-"))
    try:
        export(name, backend, tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same export first: keep its copy
            if not (target / MODEL_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target / MODEL_FILE


def export(name: str, backend: str, out: Path) -> None:
    """Export ``name`` to ``out/model.onnx`` for ``backend`` (fused; int8 for ``onnx-int8``), check it on
    the probe sentences against the torch model, and record its sha256 and provenance."""
    from transformers import AutoConfig, AutoModel

    folder = resolve_model_path(name)
    config = AutoConfig.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    raw = out / "raw.onnx"
    _torch_export(model, raw)
    fused = out / "fused.onnx"
    if backend == "openvino":
        os.replace(raw, out / MODEL_FILE)  # OpenVINO fuses it itself (it cannot read ORT's fused ops)
    else:
        _fuse(raw, fused, config)
    if backend == "onnx-int8":
        _quantize(fused, out / MODEL_FILE)
    elif backend == "onnx":
        os.replace(fused, out / MODEL_FILE)
    for file in (raw, fused):
        file.unlink(missing_ok=True)
    cosine = _probe_agreement(model, name, out / MODEL_FILE)
    if cosine < PROBE_MIN_COSINE[backend]:
        raise RuntimeError(
            f"the {backend} export of {folder} disagrees with the torch model (cosine {cosine:.4f} on "
            f"probe sentences, at least {PROBE_MIN_COSINE[backend]} needed); use embed backend 'torch'"
        )
    import onnxruntime

    info = {
        "source": str(folder),
        "backend": backend,
        "recipe_version": RECIPE_VERSION,
        "int8_nodes": list(INT8_NODES) if backend == "onnx-int8" else [],
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "probe_min_cosine": cosine,
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    write_folder_checksums(out, [MODEL_FILE, INFO_FILE])


class _LastHidden(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _torch_export(model: torch.nn.Module, path: Path) -> None:
    """Trace ``model`` to ONNX with dynamic batch and length; the example batch holds padding, so the
    traced graph is the general (masked) one."""
    input_ids = torch.arange(1000, 1048, dtype=torch.long).reshape(3, 16)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    attention_mask[2, 4:] = 0
    axes = {0: "batch", 1: "seq"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's and the legacy exporter's notices
        torch.onnx.export(
            _LastHidden(model).eval(),
            (input_ids, attention_mask),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
            opset_version=17,
            dynamo=False,
        )


def _fuse(path: Path, out: Path, config) -> None:
    """ONNX Runtime's BERT fusions (attention, embedding + layer norm, skip layer norm, bias GELU)."""
    from onnxruntime.transformers import optimizer

    heads, hidden = getattr(config, "num_attention_heads", 0), getattr(config, "hidden_size", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = optimizer.optimize_model(
            str(path), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=1
        )
    fused.save_model_to_file(str(out))


def int8_node_names(model) -> list[str]:
    """The names of the products ``INT8_NODES`` selects in a fused BERT graph: ``attention`` (the fused
    q/k/v projection with its attention), ``attention-output``, ``intermediate`` (the first feed-forward
    product), ``output`` (the second)."""
    groups: dict[str, list[str]] = {"attention": [], "attention-output": [], "intermediate": [], "output": []}
    for node in model.graph.node:
        if node.op_type == "Attention":
            groups["attention"].append(node.name)
        elif node.op_type == "MatMul" and "/attention/output/dense" in node.name:
            groups["attention-output"].append(node.name)
        elif node.op_type == "MatMul" and "/intermediate/dense" in node.name:
            groups["intermediate"].append(node.name)
        elif node.op_type == "MatMul" and "/output/dense" in node.name:
            groups["output"].append(node.name)
    return [name for group in INT8_NODES for name in groups[group]]


def _quantize(path: Path, out: Path) -> None:
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = int8_node_names(onnx.load(str(path), load_external_data=False))
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process (shape inference) first
    try:
        quantize_dynamic(
            str(path),
            str(out),
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_quantize=nodes or None,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        logging.getLogger().setLevel(level)


def _probe_agreement(model: torch.nn.Module, name: str, path: Path) -> float:
    """The lowest cosine between the torch model's and the export's mean-pooled probe vectors."""
    import onnxruntime as ort

    from retlm.tokenization import load_embedder_tokenizer

    batch = load_embedder_tokenizer(name)(list(PROBE_TEXTS), padding=True, return_tensors="np")
    ids, mask = batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)
    with torch.inference_mode():
        reference = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]

    def pooled(hidden: np.ndarray) -> np.ndarray:
        vectors = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    return float((pooled(reference.last_hidden_state.numpy()) * pooled(exported)).sum(1).min())
