"""Sorting with onnxruntime from a folder written by ``imgrank export``: no torch at all.

The folder holds ONNX graphs (image encoder, text encoder and, with an
adapter, the adapter's scoring head), the CLIP tokenizer as a ``tokenizers``
``tokenizer.json``, and a manifest (:data:`MANIFEST_NAME`) with the
preprocessing settings and what the graphs expect. This module turns it into
the objects the pipeline already knows:

* :class:`OnnxImageEncoder` follows :class:`imgrank.features.stream.ImageEncoder`
  (``preprocess``, ``fingerprint``, ``encode_pixels``), so the decode pool, the
  cache and the writers run unchanged;
* :func:`zero_shot_scorer` builds the numpy-only
  :class:`imgrank.models.scoring.ZeroShotScorer` from the ONNX text encoder;
* :class:`OnnxAdapterScorer` scores visual tokens with the exported adapter head;
  both read a prompt's text features from the prompt cache
  (:mod:`imgrank.features.prompts`) when it was used before, under the text
  graph's fingerprint (:attr:`OnnxModel.text_fingerprint`), so the text session
  is then never built;
* :meth:`OnnxModel.run_head` runs an exported linear/MLP head on pooled embeddings.

:func:`imgrank.models.loading.load_model` wraps these in a ranking model.

Nothing here imports torch or open_clip, directly or through another imgrank
module: a machine with only the ``onnx`` extra's packages can sort (a test runs
a sort with torch made unimportable). onnxruntime, onnx and tokenizers are
imported inside functions so importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import html
import json
import mmap
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgrank.errors import ModelError, UsageError
from imgrank.models.clip.config import PreprocessConfig
from imgrank.models.scoring import FeatureBatch, ZeroShotScorer, antonym_pair

if TYPE_CHECKING:
    import onnxruntime

    from imgrank.features.cache import EmbeddingCache, PromptFeatures


#: The manifest every exported folder carries; its presence marks an imgrank export.
MANIFEST_NAME = "imgrank-onnx.json"
#: Bumped when the folder layout changes in a way older readers cannot follow.
FORMAT_VERSION = 1
#: ONNX operator set of imgrank's exports: 17 has LayerNormalization as one op, and
#: onnxruntime >= 1.14 runs it (here, not in onnx_export, so the automatic export's key
#: is computed without importing the exporter).
DEFAULT_OPSET = 17
FORMAT_NAME = "imgrank-onnx"

IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
ADAPTER_FILE = "adapter_head.onnx"
HEAD_GRAPH_FILE = "head.onnx"
TOKENIZER_FILE = "tokenizer.json"

#: CLIP caps its temperature at 100; the torch path does the same.
MAX_LOGIT_SCALE = 100.0

#: Short names accepted by ``--providers`` for onnxruntime's execution providers.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "directml": "DmlExecutionProvider",
    "dml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}


def _missing_runtime(package: str) -> ModelError:
    return ModelError(
        f"the ONNX runtime path needs the Python package {package!r}, which is not installed. "
        "Install it with `pip install 'imgrank[onnx]'` (CPU) or `pip install 'imgrank[gpu]'` "
        "(NVIDIA GPUs), or sort with --runtime torch."
    )


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise _missing_runtime("onnxruntime") from None
    from imgrank.versions import check_onnxruntime

    check_onnxruntime(onnxruntime)
    return onnxruntime


# --------------------------------------------------------------------------- text


_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Clean a prompt exactly as open_clip's default tokenizer does before BPE.

    ftfy repairs mojibake and straightens quotes, HTML entities are unescaped
    twice, whitespace runs collapse to one space and the text is lower-cased.
    The exported ``tokenizer.json`` repeats the whitespace, quote and
    lower-casing steps in its normalizer (so other programs that only read
    the JSON get nearly the same ids), but ftfy and HTML unescaping cannot be
    expressed there, so they run here. When ftfy is missing (it comes with the
    ``onnx`` extra) only the rare texts ftfy would change tokenize differently.
    """
    try:
        import ftfy
    except ImportError:
        pass
    else:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """The exported CLIP BPE tokenizer, read with the ``tokenizers`` library.

    Produces the same ids as open_clip's ``SimpleTokenizer``: start token,
    BPE tokens, end token, truncated to the context length (the last kept
    position becomes the end token) and padded with 0.
    """

    def __init__(self, path: Path, context_length: int) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise _missing_runtime("tokenizers") from None
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any failure means an unusable file
            raise ModelError(
                f"cannot read the tokenizer {path}: {exc}. Export the model again with "
                "`imgrank export`."
            ) from None
        self.context_length = context_length
        # The padding and truncation saved in the file already say this; setting them again
        # guards against a hand-edited tokenizer.json producing ids of the wrong length.
        self._tokenizer.enable_truncation(context_length)
        self._tokenizer.enable_padding(length=context_length, pad_id=0, pad_token="!")

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """(N, context_length) int64 token ids."""
        encodings = self._tokenizer.encode_batch([clean_text(t) for t in texts])
        return np.asarray([e.ids for e in encodings], dtype=np.int64)


# --------------------------------------------------------------------------- folder safety


def _iter_all_tensors(message: Any) -> Iterator[Any]:
    """Every TensorProto anywhere in an ONNX message, found by walking all its fields.

    Not a list of the places tensors are known to live (initializers, node
    attributes, subgraphs): function bodies, sparse tensors in attributes,
    training info and any field a later ONNX version adds are reached too.
    """
    import onnx
    from google.protobuf.message import Message

    stack = [message]
    while stack:
        current = stack.pop()
        if isinstance(current, onnx.TensorProto):
            yield current
        for field, value in current.ListFields():
            if field.type != field.TYPE_MESSAGE:
                continue
            if isinstance(value, Message):
                stack.append(value)
            else:  # a repeated field (protobuf 5 dropped FieldDescriptor.label)
                stack.extend(value)


def _inside(folder: Path, relative: str, *, what: str, source: Path) -> Path:
    """Resolve ``relative`` against ``folder`` and refuse any path that leaves it."""
    if not relative or os.path.isabs(relative) or re.match(r"^[A-Za-z]:", relative):
        raise ModelError(
            f"{source}: {what} {relative!r} is not a path relative to its folder; refusing to "
            "read it (an ONNX model must keep its files inside its own folder)"
        )
    root = folder.resolve()
    target = (folder / relative).resolve()  # follows symbolic links, so links out are caught too
    if target != root and root not in target.parents:
        raise ModelError(
            f"{source}: {what} {relative!r} points outside {folder} (to {target}); refusing "
            "to read it. Only use ONNX folders written by `imgrank export` or from people you "
            "trust."
        )
    return target


def _mentions_location(path: Path) -> bool:
    """Whether the bytes ``location`` occur anywhere in a file (memory-mapped, no parsing)."""
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                return False
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return data.find(b"location") != -1
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None


def check_external_data(model_path: Path) -> list[Path]:
    """Refuse an ONNX file whose external-data tensors live outside its folder.

    ONNX files above 2 GB keep weights in side files named inside the model;
    a crafted name (absolute, ``../``, or a symbolic link out) would make the
    runtime read any file on the machine. Only the graph structure is parsed
    here (``load_external_data=False``), not the side files.

    Returns:
        The external-data files the model refers to (all inside its folder).

    Raises:
        ModelError: the file cannot be parsed, or a location leaves the folder.
    """
    if not _mentions_location(model_path):
        # Every external-data reference names its file under the key "location"; a file
        # without those bytes anywhere refers to no other file, and parsing a large graph
        # (a second or more for ViT-B-32) is not needed to know it.
        return []
    try:
        import onnx
    except ImportError:
        raise _missing_runtime("onnx") from None
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf errors mean a broken file
        raise ModelError(
            f"{model_path} is not a readable ONNX model ({type(exc).__name__}: {exc}); "
            "export it again with `imgrank export`"
        ) from None
    folder = model_path.parent
    found: dict[Path, None] = {}
    for tensor in _iter_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        target = _inside(folder, location, what="external-data location", source=model_path)
        found[target] = None
    return list(found)


# --------------------------------------------------------------------------- providers


def resolve_providers(requested: str | Sequence[str] | None = None) -> list[str]:
    """Choose onnxruntime execution providers, in order of preference.

    Args:
        requested: ``None`` or ``"auto"`` for CUDA when this onnxruntime build
            offers it, else CPU; otherwise provider names, comma-separated or
            as a list, either onnxruntime's (``CUDAExecutionProvider``) or short
            (``cuda``, ``cpu``, ``tensorrt``, ``coreml``, ``directml``...).

    Raises:
        UsageError: a name is unknown or not offered by the installed onnxruntime.
    """
    ort = _import_onnxruntime()
    available = list(ort.get_available_providers())
    if requested is None or (
        isinstance(requested, str) and requested.strip().lower() in ("", "auto")
    ):
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
    names = requested.split(",") if isinstance(requested, str) else list(requested)
    chosen: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            hint = ""
            if full == "CUDAExecutionProvider":
                hint = (
                    " For NVIDIA GPUs install the gpu extra (`pip install 'imgrank[gpu]'`, "
                    "which brings onnxruntime-gpu instead of onnxruntime)."
                )
            raise UsageError(
                f"--providers {name}: this onnxruntime does not offer {full}; available here: "
                f"{', '.join(available)}.{hint}"
            )
        if full not in chosen:
            chosen.append(full)
    if not chosen:
        raise UsageError("--providers: give at least one provider, e.g. cpu or cuda,cpu")
    return chosen


# --------------------------------------------------------------------------- the exported folder


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class GraphFile:
    """One ONNX graph of an export, as the manifest describes it."""

    path: Path
    sha256: str


class OnnxModel:
    """An exported folder: its manifest, tokenizer and onnxruntime sessions (built lazily).

    Args:
        folder: a folder written by ``imgrank export``.
        providers: see :func:`resolve_providers`.
        intra_op_threads: threads per session; 0 lets onnxruntime use every core.

    Raises:
        ModelError: not an export, a newer format, missing or unsafe files.
        UsageError: a provider that this onnxruntime does not offer.
    """

    def __init__(
        self,
        folder: Path,
        *,
        providers: str | Sequence[str] | None = None,
        intra_op_threads: int = 0,
    ) -> None:
        self.folder = Path(folder).expanduser()
        self.manifest = read_manifest(self.folder)
        self._explicit_providers = not (
            providers is None
            or (isinstance(providers, str) and providers.strip().lower() in ("", "auto"))
        )
        # Providers the user named are checked now; the default is looked up when a
        # session starts (importing onnxruntime costs a re-sort served from the cache).
        self._providers: list[str] | None = (
            resolve_providers(providers) if self._explicit_providers else None
        )
        self._threads = intra_op_threads
        self._sessions: dict[str, onnxruntime.InferenceSession] = {}
        #: Sessions being loaded in the background (:meth:`start_session`).
        self._loading: dict[str, tuple[Any, dict[str, Any]]] = {}
        self._tokenizer: ClipTokenizer | None = None
        try:
            self._read_graphs()
            self.preprocess = _checked_preprocess(self.manifest["preprocess"])
            float(self.manifest["logit_scale"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelError(
                f"{self.manifest_path} is malformed ({type(exc).__name__}: {exc}); export the "
                "model again with `imgrank export`"
            ) from None

    @property
    def requested_providers(self) -> list[str]:
        """The execution providers sessions ask for, in order (see :func:`resolve_providers`)."""
        if self._providers is None:
            self._providers = resolve_providers(None)
        return self._providers

    def _read_graphs(self) -> None:
        files = self.manifest["files"]
        self.graphs: dict[str, GraphFile] = {}
        for kind in ("image", "text", "adapter", "head"):
            entry = files.get(kind)
            if entry is None:
                continue
            path = _inside(
                self.folder, entry["path"], what=f"{kind} graph", source=self.manifest_path
            )
            if not path.is_file():
                raise ModelError(
                    f"{self.folder} lacks {entry['path']} (named in {MANIFEST_NAME}); the export "
                    "is incomplete: run `imgrank export` again"
                )
            self.graphs[kind] = GraphFile(path=path, sha256=str(entry.get("sha256", "")))
        for kind in ("image", "text"):
            if kind not in self.graphs:
                raise ModelError(f"{self.manifest_path} names no {kind} encoder; export again")

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST_NAME

    @property
    def has_adapter(self) -> bool:
        return "adapter" in self.graphs

    @property
    def has_head(self) -> bool:
        """Whether the export carries a linear/MLP head on the pooled embedding."""
        return "head" in self.graphs

    def run_head(self, normalized: np.ndarray) -> np.ndarray:
        """(N,) scores of the exported head for L2-normalised pooled embeddings (N, E)."""
        feed = {"embeddings": np.ascontiguousarray(normalized, dtype=np.float32)}
        (scores,) = self.session("head").run(["scores"], feed)
        return np.asarray(scores, dtype=np.float64).reshape(-1)

    @property
    def has_image_tokens(self) -> bool:
        return bool(self.manifest.get("image_tokens", False))

    @property
    def context_length(self) -> int:
        return int(self.manifest.get("context_length", 77))

    @property
    def logit_scale(self) -> float:
        return min(float(self.manifest["logit_scale"]), MAX_LOGIT_SCALE)

    @property
    def tokenizer(self) -> ClipTokenizer:
        if self._tokenizer is None:
            relative = self.manifest["files"].get("tokenizer", TOKENIZER_FILE)
            path = _inside(self.folder, relative, what="tokenizer", source=self.manifest_path)
            if not path.is_file():
                raise ModelError(f"{self.folder} lacks its tokenizer {relative}; export again")
            self._tokenizer = ClipTokenizer(path, self.context_length)
        return self._tokenizer

    def start_session(self, kind: str) -> None:
        """Start loading a graph's session in a background thread; :meth:`session` waits for it.

        onnxruntime releases the GIL while it loads and optimises a graph (about half a
        second for ViT-B-32's image tower here), so a cold sort loads the image
        tower while the prompt is encoded and the first photos are decoded.
        """
        if kind in self._sessions or kind in self._loading or kind not in self.graphs:
            return
        import threading

        outcome: dict[str, Any] = {}

        def load() -> None:
            try:
                outcome["session"] = self._load_session(kind)
            except BaseException as exc:  # noqa: BLE001 - handed to the thread that asks
                outcome["error"] = exc

        thread = threading.Thread(target=load, name=f"imgrank-onnx-{kind}", daemon=True)
        self._loading[kind] = (thread, outcome)
        thread.start()

    def session(self, kind: str) -> onnxruntime.InferenceSession:
        """The onnxruntime session of one graph (``image``, ``text``, ``adapter`` or ``head``)."""
        if kind in self._sessions:
            return self._sessions[kind]
        if kind in self._loading:
            thread, outcome = self._loading.pop(kind)
            thread.join()
            if "error" in outcome:
                raise outcome["error"]
            self._sessions[kind] = outcome["session"]
            return self._sessions[kind]
        self._sessions[kind] = self._load_session(kind)
        return self._sessions[kind]

    def _load_session(self, kind: str) -> onnxruntime.InferenceSession:
        graph = self.graphs.get(kind)
        if graph is None:
            raise ModelError(f"{self.folder} holds no {kind} graph")
        check_external_data(graph.path)
        ort = _import_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        # Errors reach the user as ModelError; onnxruntime's own warnings (e.g. about
        # nodes placed on the CPU) would only clutter the output.
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(
                str(graph.path), sess_options=options, providers=self.requested_providers
            )
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelError(
                f"onnxruntime cannot load {graph.path}: {str(exc).strip().splitlines()[0]}"
            ) from None
        active = session.get_providers()
        missing = [p for p in self.requested_providers if p not in active]
        if missing and self._explicit_providers:
            raise ModelError(
                f"onnxruntime could not start {', '.join(missing)} for {graph.path.name} (it "
                f"runs on {', '.join(active)}); check the GPU driver and the CUDA/cuDNN libraries "
                "onnxruntime-gpu needs, or pass --providers cpu"
            )
        return session

    @property
    def active_providers(self) -> list[str]:
        """Providers the image session actually runs on (after any fallback)."""
        return list(self.session("image").get_providers())

    def image_encoder(self) -> OnnxImageEncoder:
        return OnnxImageEncoder(self)

    def encode_text(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(pooled (N, E), tokens (N, L, W))`` of prompts, float32."""
        ids = self.tokenizer(texts)
        pooled, tokens = self.session("text").run(["pooled", "tokens"], {"input_ids": ids})
        return np.asarray(pooled, dtype=np.float32), np.asarray(tokens, dtype=np.float32)

    @property
    def text_fingerprint(self) -> str:
        """Identifies the text features: the text graph, the tokenizer and the temperature.

        Read from the manifest and two stats, so a re-sort by a prompt used
        before builds no session. Size and modification time of both files are
        added, as for the image graph, so files replaced by hand never reuse
        features cached for the old ones.
        """
        graph = self.graphs["text"]
        relative = self.manifest["files"].get("tokenizer", TOKENIZER_FILE)
        tokenizer = _inside(self.folder, relative, what="tokenizer", source=self.manifest_path)
        parts: dict[str, Any] = {
            "runtime": "onnx",
            "text_graph": graph.sha256 or _sha256_file(graph.path),
            "logit_scale": self.logit_scale,
            "context_length": self.context_length,
        }
        for name, path in (("graph", graph.path), ("tokenizer", tokenizer)):
            try:
                stat = path.stat()
            except OSError:
                continue  # a missing tokenizer is reported when it is needed
            parts[name] = [stat.st_size, stat.st_mtime_ns]
        blob = json.dumps(parts, sort_keys=True).encode()
        return "text:" + hashlib.sha256(blob).hexdigest()[:20]

    def prompt_features(self, texts: list[str], *, tokens: bool = False) -> list[PromptFeatures]:
        """Text features as the prompt cache stores them (the text session runs)."""
        from imgrank.features.cache import PromptFeatures

        pooled, grid = self.encode_text(texts)
        return [
            PromptFeatures(pooled[i], self.logit_scale, grid[i] if tokens else None)
            for i in range(len(texts))
        ]

    def text_features(
        self, texts: list[str], *, tokens: bool = False, cache: EmbeddingCache | None = None
    ) -> list[PromptFeatures]:
        """Features of texts, from the prompt cache when stored there (see the module doc)."""
        from imgrank.features.prompts import prompt_features

        return prompt_features(
            texts,
            self.prompt_features,
            fingerprint=self.text_fingerprint,
            cache=cache,
            tokens=tokens,
        )


def read_manifest(folder: Path) -> dict[str, Any]:
    """Read and validate an export's manifest.

    Raises:
        ModelError: the folder is not an imgrank ONNX export, or one this version cannot read.
    """
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ModelError(
            f"--onnx {folder}: no such folder; create one with `imgrank export --out {folder}`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(
            f"{folder} is not an imgrank ONNX export (it has no {MANIFEST_NAME}); create one with "
            f"`imgrank export --out DIR`"
        ) from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} cannot be read: {exc}; export the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ModelError(f"{path} is not an imgrank ONNX manifest; export the model again")
    version = manifest.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelError(
            f"{path} has format version {version!r}, newer than this imgrank reads "
            f"({FORMAT_VERSION}); upgrade imgrank or export again with this version"
        )
    for key in ("files", "preprocess", "logit_scale"):
        if key not in manifest:
            raise ModelError(f"{path} lacks {key!r}; export the model again")
    return manifest


def _checked_preprocess(data: dict[str, Any]) -> PreprocessConfig:
    """The manifest's preprocessing, refusing values the decoder would misread."""
    config = PreprocessConfig.from_dict(data)
    if not isinstance(config.image_size, int) or isinstance(config.image_size, bool):
        raise ValueError(f"image_size must be an integer, not {config.image_size!r}")
    if config.image_size < 1:
        raise ValueError(f"image_size must be positive, not {config.image_size}")
    if config.resize_mode not in ("crop", "squash"):
        raise ValueError(f"resize_mode must be crop or squash, not {config.resize_mode!r}")
    if config.interpolation not in ("bicubic", "bilinear"):
        raise ValueError(f"interpolation must be bicubic or bilinear, not {config.interpolation!r}")
    if len(config.mean) != 3 or len(config.std) != 3 or min(config.std) <= 0:
        raise ValueError("mean and std need 3 values each, std above 0")
    return config


# --------------------------------------------------------------------------- pipeline objects


class OnnxImageEncoder:
    """The exported image tower, following :class:`imgrank.features.stream.ImageEncoder`."""

    def __init__(self, model: OnnxModel) -> None:
        self.model = model
        self.preprocess: PreprocessConfig = model.preprocess
        self._fingerprint: str | None = None

    @property
    def provides_tokens(self) -> bool:
        """Whether the graph has a visual-token output (the cache stores tokens only then)."""
        return self.model.has_image_tokens

    @property
    def description(self) -> str:
        """Shown by ``imgrank cache info``: the exported model and where it lives."""
        info = self.model.manifest.get("model", {})
        return f"ONNX {info.get('name', '?')} / {info.get('pretrained', '?')} ({self.model.folder})"

    @property
    def fingerprint(self) -> str:
        """Identifies the features: the exported image graph's bytes and the preprocessing.

        The digest the export recorded stands for the bytes; the file's size
        and modification time are added so a graph replaced by hand (without
        a new manifest) never reuses features cached for the old one.
        """
        if self._fingerprint is None:
            graph = self.model.graphs["image"]
            digest = graph.sha256
            if not digest:  # a hand-written manifest: hash the bytes ourselves
                digest = _sha256_file(graph.path)
            stat = graph.path.stat()
            blob = json.dumps(
                {
                    "runtime": "onnx",
                    "image_graph": digest,
                    "size": stat.st_size,
                    "mtime_ns": stat.st_mtime_ns,
                    "pp": self.preprocess.to_dict(),
                },
                sort_keys=True,
            ).encode()
            self._fingerprint = hashlib.sha256(blob).hexdigest()[:20]
        return self._fingerprint

    def encode_pixels(self, pixels: np.ndarray, *, tokens: bool = False) -> FeatureBatch:
        """Features of normalised pixels (N, 3, S, S), as float32 numpy arrays."""
        if tokens and not self.model.has_image_tokens:
            raise ModelError(
                f"the image encoder in {self.model.folder} has no visual-token output, which "
                "adapters need (its model pools its features internally)"
            )
        session = self.model.session("image")
        feed = {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)}
        if tokens:
            pooled, grid = session.run(["pooled", "tokens"], feed)
            return FeatureBatch(
                pooled=np.asarray(pooled, dtype=np.float32),
                tokens=np.asarray(grid, dtype=np.float32),
            )
        (pooled,) = session.run(["pooled"], feed)
        return FeatureBatch(pooled=np.asarray(pooled, dtype=np.float32))


def zero_shot_scorer(
    model: OnnxModel,
    prompt: str,
    against: str | None = None,
    *,
    cache: EmbeddingCache | None = None,
) -> ZeroShotScorer:
    """The zero-shot antonym-pair scorer, its texts encoded by the ONNX text tower
    (or read from the prompt cache of ``cache``)."""
    positive, negative = antonym_pair(prompt, against)
    features = model.text_features([positive, negative], cache=cache)
    return ZeroShotScorer.from_prompt_features(features, positive, negative)


class OnnxAdapterScorer:
    """Scores images with the exported ranking-aware adapter head for one prompt.

    The prompt's text tokens are computed once with the ONNX text tower (or read
    from the prompt cache); each batch of visual tokens then goes through the
    head, whose ``scores`` output is the adapter's per-image regression score.
    """

    needs_tokens = True
    #: The key its scores are cached under (set by the ranking model, as for torch).
    cache_key: str | None = None

    def __init__(
        self, model: OnnxModel, prompt: str, *, cache: EmbeddingCache | None = None
    ) -> None:
        if not model.has_adapter:
            raise UsageError(
                f"{model.folder} was exported without an adapter; export with "
                "`imgrank export --adapter DIR` or sort zero-shot"
            )
        if not prompt.strip():
            raise UsageError("the prompt is empty: say what to sort by, e.g. --by 'image quality'")
        self.model = model
        adapter = model.manifest.get("adapter") or {}
        # The model folder's prompt format travels in the manifest, so both runtimes feed the
        # text tower the same text.
        self.prompt = str(adapter.get("prompt_format") or "{}").replace("{}", prompt)
        self.name = (
            f"ranking adapter {adapter.get('name', 'adapter')} ({adapter.get('variant', 'full')}) "
            f"on {adapter.get('backbone', model.manifest['model'].get('name', '?'))}, onnxruntime"
        )
        (features,) = model.text_features([self.prompt], tokens=True, cache=cache)
        assert features.tokens is not None
        self._text_tokens = np.ascontiguousarray(features.tokens[None], dtype=np.float32)

    def score(self, batch: FeatureBatch) -> np.ndarray:
        if batch.tokens is None:
            raise ModelError("the adapter needs visual tokens, but the batch carries none")
        (scores,) = self.model.session("adapter").run(
            ["scores"],
            {
                "image_tokens": np.ascontiguousarray(batch.tokens, dtype=np.float32),
                "text_tokens": self._text_tokens,
            },
        )
        return np.asarray(scores, dtype=np.float64).reshape(-1)
