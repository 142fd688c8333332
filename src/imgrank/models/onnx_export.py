"""``imgrank export``: write a backbone (and an adapter) as ONNX graphs, checked against torch.

The folder an export writes holds everything :mod:`imgrank.models.onnx_runtime`
needs to sort without torch:

* ``image_encoder.onnx``: ``pixels`` (N, 3, S, S) -> ``pooled`` (N, E) and,
  when the tower has them, ``tokens`` (N, P, D), the adapter's visual tokens;
* ``text_encoder.onnx``: ``input_ids`` (N, L) int64 -> ``pooled`` (N, E) and
  ``tokens`` (N, L, W), every context position after ``ln_final``;
* with an adapter, ``adapter_head.onnx``: ``image_tokens`` (N, P, D) and
  ``text_tokens`` (1 or N, L, D) -> ``scores`` (N,), the regression head;
* with a linear/MLP head, ``head.onnx``: ``embeddings`` (N, E), the
  L2-normalised pooled embeddings -> ``scores`` (N,);
* ``tokenizer.json``: open_clip's CLIP BPE tokenizer for the ``tokenizers``
  library (built here from open_clip's vocabulary and checked to give the
  same ids);
* ``imgrank-onnx.json``: the manifest: preprocessing, temperature, context
  length, file digests and the measured drift.

Every graph has a dynamic batch axis, passes ``onnx.checker``, and is run
with onnxruntime on random inputs against the torch path (the very methods
``imgrank sort`` uses); an export that drifts more than 1e-4 relative is
refused and nothing is left behind.

torch and open_clip are needed here (this is the one ONNX module that imports
them), inside functions.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgrank import __version__
from imgrank.errors import ModelError, UsageError
from imgrank.models.onnx_runtime import (
    ADAPTER_FILE,
    DEFAULT_OPSET,
    FORMAT_NAME,
    FORMAT_VERSION,
    HEAD_GRAPH_FILE,
    IMAGE_FILE,
    MANIFEST_NAME,
    TEXT_FILE,
    TOKENIZER_FILE,
    ClipTokenizer,
    check_external_data,
)

if TYPE_CHECKING:
    import torch

    from imgrank.models.clip.towers import Backbone
    from imgrank.models.ranking_model import TorchRankingModel

#: Largest relative drift between onnxruntime and torch that an export accepts.
DEFAULT_TOLERANCE = 1e-4

START_TOKEN = "<start_of_text>"
END_TOKEN = "<end_of_text>"

#: open_clip's pre-tokenizer pattern (its special tokens first), matched on cleaned text.
_CLIP_SPLIT_PATTERN = (
    START_TOKEN
    + "|"
    + END_TOKEN
    + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)

#: Texts whose token ids the export compares with open_clip's before it accepts the tokenizer.
TOKENIZER_PROBES = (
    "image quality",
    "a photo of high image quality.",
    "a photo of low image quality.",
    "Rank the numbers of horse.",
    "aesthetic score of the photo",
    "  Sharp   FOCUS,\tgood light\n",
    "don't, won't, I'LL, we've, she'd, it's",
    "3.14159 apples & 42 pears; 100% (maybe) #1 @home",
    "café naïve résumé Ærø Straße",
    "日本語のテキスト 中文 한국어 Ελληνικά русский",
    "emoji 😀🎉👍🏽 and symbols ©®™ ±×÷",
    "“curly quotes” and ‘single’ ones",
    "&amp; &lt;b&gt;html&lt;/b&gt; entities",
    "ﬁne ligatures and ＦＵＬＬＷＩＤＴＨ text",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "word " * 120,
    "",
    "<start_of_text> literal special tokens <end_of_text>",
)


@dataclass
class ExportResult:
    """What an export wrote and how closely it matches torch.

    Attributes:
        folder: The export folder.
        files: Files written, relative to ``folder``.
        drift: Largest relative difference to torch, per graph and output
            (e.g. ``{"image.pooled": 3e-7}``).
        manifest: The manifest as written.
    """

    folder: Path
    files: list[str]
    drift: dict[str, float] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- tokenizer


def build_clip_tokenizer(context_length: int = 77) -> Any:
    """open_clip's ``SimpleTokenizer`` as a ``tokenizers.Tokenizer``.

    The vocabulary and merges come from the BPE file open_clip ships, laid
    out as open_clip lays them out (256 byte symbols, the same with ``</w>``,
    one entry per merge, then the start and end tokens), so every id matches.
    The normalizer collapses whitespace, straightens curly quotes (as ftfy
    does) and lower-cases; the pre-tokenizer is open_clip's regular
    expression followed by the GPT-2 byte-to-unicode mapping; words end with
    ``</w>``; sequences get the start and end tokens, are truncated to
    ``context_length`` and padded with id 0.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    with gzip.open(default_bpe()) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    # The first line is a header; open_clip keeps exactly 49152 - 256 - 2 merges.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += [START_TOKEN, END_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}

    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", fuse_unk=False)
    )
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.NFC(),
            normalizers.Replace(Regex("[\u02bc\u2018-\u201b]"), "'"),
            normalizers.Replace(Regex("[\u201c-\u201f]"), '"'),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
            normalizers.Lowercase(),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # invert=True keeps the matches (the words) and drops what lies between them.
            pre_tokenizers.Split(Regex(_CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (START_TOKEN, END_TOKEN)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{START_TOKEN} $A {END_TOKEN}",
        special_tokens=[(START_TOKEN, vocab[START_TOKEN]), (END_TOKEN, vocab[END_TOKEN])],
    )
    tokenizer.enable_truncation(context_length)
    # Id 0 pads, as in open_clip; the pad token's text only shows when decoding.
    tokenizer.enable_padding(length=context_length, pad_id=0, pad_token=symbols[0])
    return tokenizer


# --------------------------------------------------------------------------- torch modules


def _image_module(backbone: Backbone) -> tuple[torch.nn.Module, bool]:
    """A module computing what ``Backbone.encode_images`` computes (the same forward function).

    Returns:
        The module and whether it outputs visual tokens.
    """
    import torch

    from imgrank.models.clip.towers import image_tower_forward

    size = backbone.preprocess.image_size
    # A probe: does this tower give tokens? (It also builds an image tower left lazy.)
    probe = backbone.encode_images(torch.zeros(1, 3, size, size), tokens=True)
    has_tokens = probe.tokens is not None
    visual = backbone.model.visual

    class ImageTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = visual

        def forward(self, pixels: torch.Tensor) -> Any:
            pooled, tokens = image_tower_forward(self.visual, pixels, tokens=has_tokens)
            return (pooled, tokens) if has_tokens else pooled

    return ImageTower().eval(), has_tokens


def _text_module(backbone: Backbone) -> torch.nn.Module:
    """A module computing what ``Backbone.encode_token_ids`` computes."""
    import torch

    from imgrank.models.clip.towers import text_tower_forward

    model = backbone.model
    if not hasattr(model, "token_embedding"):
        raise ModelError(
            f"{backbone.name}: only open_clip's built-in text transformer can be exported to "
            "ONNX (this model uses a Hugging Face text tower)"
        )

    class TextTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return text_tower_forward(self.model, input_ids)

    return TextTower().eval()


def _adapter_module(adapter: Any) -> torch.nn.Module:
    """The adapter's regression head as a graph: scores (N,) from image and text tokens."""
    import torch

    class AdapterHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.adapter = adapter

        def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
            return self.adapter.score(image_tokens, text_tokens).reshape(-1)

    return AdapterHead().eval()


def _head_module(head: Any) -> torch.nn.Module:
    """A linear/MLP head as a graph: scores (N,) from normalised embeddings (N, E)."""
    import torch

    class HeadGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = head

        def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
            return self.head(embeddings).reshape(-1)

    return HeadGraph().eval()


def _export_graph(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    *,
    inputs: dict[str, dict[int, str]],
    outputs: dict[str, dict[int, str]],
    opset: int,
) -> None:
    """Trace ``module`` to ``path`` with dynamic axes and check the result with onnx.checker."""
    import onnx
    import torch

    dynamic_axes = {name: axes for name, axes in {**inputs, **outputs}.items() if axes}
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
        # onnxscript and is much slower to trace; it still exports these plain graphs exactly.
        warnings.simplefilter("ignore")
        fast_path = getattr(torch.backends, "mha", None)
        previous = fast_path.get_fastpath_enabled() if fast_path is not None else None
        if fast_path is not None:
            # The fused inference kernel of nn.MultiheadAttention has no ONNX form.
            fast_path.set_fastpath_enabled(False)
        try:
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=list(inputs),
                output_names=list(outputs),
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        except Exception as exc:  # noqa: BLE001 - exporter errors are many and deep
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"cannot export {path.name} to ONNX: {message}") from None
        finally:
            if fast_path is not None and previous is not None:
                fast_path.set_fastpath_enabled(previous)
    try:
        # The path form also checks models whose weights live in external-data files.
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises ValidationError and others
        raise ModelError(f"the exported {path.name} fails onnx.checker: {exc}") from None


# --------------------------------------------------------------------------- parity


def relative_drift(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference, relative to the largest magnitude of ``expected``.

    Relative to the whole output rather than element by element, so entries
    close to zero do not turn float32 rounding into huge ratios.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        return float("inf")
    if not np.all(np.isfinite(actual)) or not np.all(np.isfinite(expected)):
        return float("inf")
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-12)
    return float(np.max(np.abs(actual - expected), initial=0.0)) / scale


def _check_drift(graph: str, measured: dict[str, float], tolerance: float) -> None:
    worst_name, worst = max(measured.items(), key=lambda item: item[1])
    if not worst <= tolerance:
        detail = ", ".join(f"{name} {value:.2e}" for name, value in measured.items())
        raise ModelError(
            f"the ONNX {graph} drifts from torch by {worst:.2e} relative on {worst_name} "
            f"(limit {tolerance:.0e}; measured: {detail}); refusing the export. Try another "
            "--opset, or report the model name."
        )


def _random_token_ids(rng: np.random.Generator, count: int, context_length: int) -> np.ndarray:
    """Start token, random BPE ids, end token, zero padding; lengths vary per row."""
    ids = np.zeros((count, context_length), dtype=np.int64)
    for row in range(count):
        length = int(rng.integers(1, context_length - 1))
        ids[row, 0] = 49406
        ids[row, 1 : length + 1] = rng.integers(0, 49406, size=length)
        ids[row, length + 1] = 49407
    return ids


# --------------------------------------------------------------------------- export


def _file_digest(path: Path) -> str:
    """SHA-256 of a graph and of the external-data files it names."""
    digest = hashlib.sha256()
    files = [path] + sorted(check_external_data(path))
    for name in files:
        digest.update(name.name.encode() + b"\0")
        with open(name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def check_export_folder(out: Path) -> None:
    """Refuse an ``--out`` that holds anything, or whose parent folder is missing."""
    _check_out(out.expanduser())


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that holds anything, or whose folder is missing, before any work."""
    from imgrank.files.atomic import check_new_folder

    check_new_folder(out, what="--out")
    if not out.expanduser().absolute().parent.is_dir():
        raise UsageError(f"--out {out}: the folder {out.expanduser().parent} does not exist")


def export_backbone(
    backbone: Backbone,
    out: Path,
    *,
    adapter: Any = None,
    adapter_info: dict[str, Any] | None = None,
    head: Any = None,
    head_info: dict[str, Any] | None = None,
    opset: int = DEFAULT_OPSET,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export a loaded float32 CPU backbone (and optionally an adapter) into a new folder.

    Args:
        backbone: a backbone loaded on the CPU (``load_backbone(..., device="cpu")``).
        out: a new or empty folder.
        adapter: a ``RankingAdapter`` in eval mode, or None.
        adapter_info: what the manifest records about the adapter (name, source...).
        head: a linear/MLP head module (:mod:`imgrank.models.heads`) in eval mode, or None.
        head_info: what the manifest records about the head.
        opset: ONNX operator set.
        tolerance: largest accepted relative drift from torch.
        seed: seed of the random parity inputs.
        progress: called with a short line before each step.

    Raises:
        UnsafeOperationError: ``out`` holds files.
        ModelError: the model cannot be exported, fails the checker, or drifts.
    """
    import torch

    say = progress or (lambda _line: None)
    if backbone.device != "cpu" or backbone.dtype != torch.float32:
        raise ModelError(
            "export needs the backbone in float32 on the CPU (load it with device='cpu')"
        )
    if backbone.config.get("text_cfg", {}).get("hf_tokenizer_name"):
        raise ModelError(
            f"{backbone.name} uses a Hugging Face tokenizer; imgrank exports only models with "
            "open_clip's CLIP tokenizer"
        )
    from imgrank.files.atomic import atomic_folder

    _check_out(out)
    # Written into a fresh folder beside --out that takes its name only when complete.
    with atomic_folder(out, what="--out") as work:
        result = _export_into(
            backbone,
            work,
            adapter=adapter,
            adapter_info=adapter_info,
            head=head,
            head_info=head_info,
            opset=opset,
            tolerance=tolerance,
            seed=seed,
            say=say,
        )
    result.folder = out.expanduser()
    return result


def _export_into(
    backbone: Backbone,
    work: Path,
    *,
    adapter: Any,
    adapter_info: dict[str, Any] | None,
    head: Any,
    head_info: dict[str, Any] | None,
    opset: int,
    tolerance: float,
    seed: int,
    say: Callable[[str], None],
) -> ExportResult:
    import onnxruntime as ort
    import torch

    from imgrank.versions import check_onnxruntime

    check_onnxruntime(ort)
    rng = np.random.default_rng(seed)
    size = backbone.preprocess.image_size
    context_length = backbone.context_length
    drift: dict[str, float] = {}

    def session(path: Path) -> Any:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )

    # Tokenizer first: it is quick, and a mismatch makes every later check meaningless.
    say("tokenizer")
    tokenizer_path = work / TOKENIZER_FILE
    build_clip_tokenizer(context_length).save(str(tokenizer_path))
    exported = ClipTokenizer(tokenizer_path, context_length)
    probes = list(TOKENIZER_PROBES)
    ours = exported(probes)
    theirs = backbone.tokenize(probes).numpy()
    for text, a, b in zip(probes, ours, theirs, strict=True):
        if not np.array_equal(a, b):
            raise ModelError(
                f"the exported tokenizer disagrees with open_clip's on {text[:40]!r}; "
                "this open_clip version changed its tokenizer: please report it"
            )

    # Image tower: exported with batch 2, checked with batch 3 to prove the batch axis is free.
    say("image encoder")
    image_module, has_tokens = _image_module(backbone)
    image_outputs: dict[str, dict[int, str]] = {"pooled": {0: "batch"}}
    if has_tokens:
        image_outputs["tokens"] = {0: "batch"}
    image_path = work / IMAGE_FILE
    _export_graph(
        image_module,
        (torch.randn(2, 3, size, size),),
        image_path,
        inputs={"pixels": {0: "batch"}},
        outputs=image_outputs,
        opset=opset,
    )
    pixels = rng.standard_normal((3, 3, size, size)).astype(np.float32)
    reference = backbone.encode_images(torch.from_numpy(pixels), tokens=has_tokens)
    got = session(image_path).run(list(image_outputs), {"pixels": pixels})
    measured = {"image.pooled": relative_drift(got[0], reference.pooled.numpy())}
    if has_tokens:
        assert reference.tokens is not None
        measured["image.tokens"] = relative_drift(got[1], reference.tokens.numpy())
    _check_drift("image encoder", measured, tolerance)
    drift.update(measured)

    say("text encoder")
    text_path = work / TEXT_FILE
    example_ids = backbone.tokenize(["a photo of high image quality.", "image quality"])
    _export_graph(
        _text_module(backbone),
        (example_ids,),
        text_path,
        inputs={"input_ids": {0: "batch"}},
        outputs={"pooled": {0: "batch"}, "tokens": {0: "batch"}},
        opset=opset,
    )
    ids = np.concatenate([ours[:4], _random_token_ids(rng, 3, context_length)])
    text_ref = backbone.encode_token_ids(torch.from_numpy(ids))
    pooled, tokens = session(text_path).run(["pooled", "tokens"], {"input_ids": ids})
    measured = {
        "text.pooled": relative_drift(pooled, text_ref.pooled.numpy()),
        "text.tokens": relative_drift(tokens, text_ref.tokens.numpy()),
    }
    _check_drift("text encoder", measured, tolerance)
    drift.update(measured)

    files = {
        "image": {
            "path": IMAGE_FILE,
            "sha256": _file_digest(image_path),
            "inputs": ["pixels"],
            "outputs": list(image_outputs),
        },
        "text": {
            "path": TEXT_FILE,
            "sha256": _file_digest(text_path),
            "inputs": ["input_ids"],
            "outputs": ["pooled", "tokens"],
        },
        "tokenizer": TOKENIZER_FILE,
    }

    if adapter is not None:
        if not has_tokens:
            raise ModelError(
                f"{backbone.name}'s image tower pools its features, so it has no visual tokens "
                "for an adapter"
            )
        say("adapter head")
        adapter = adapter.eval()
        adapter_path = work / ADAPTER_FILE
        image_tokens = reference.tokens
        assert image_tokens is not None
        prompt_tokens = text_ref.tokens[:1]
        _export_graph(
            _adapter_module(adapter),
            (image_tokens[:2].contiguous(), prompt_tokens.contiguous()),
            adapter_path,
            # One prompt for the whole batch (1, L, D) or one per image (N, L, D).
            inputs={"image_tokens": {0: "batch"}, "text_tokens": {0: "prompts"}},
            outputs={"scores": {0: "batch"}},
            opset=opset,
        )
        adapter_session = session(adapter_path)
        measured = {}
        # Real tokens of the random pixels and of a prompt, then random tokens of the same scale.
        noisy_image = image_tokens + torch.randn_like(image_tokens) * image_tokens.std()
        for label, img in (("adapter.scores", image_tokens), ("adapter.scores_noise", noisy_image)):
            with torch.no_grad():
                expected = adapter.score(img, prompt_tokens).reshape(-1).numpy()
            (scores,) = adapter_session.run(
                ["scores"],
                {
                    "image_tokens": img.numpy().astype(np.float32),
                    "text_tokens": prompt_tokens.numpy(),
                },
            )
            measured[label] = relative_drift(scores, expected)
        _check_drift("adapter head", measured, tolerance)
        drift.update(measured)
        files["adapter"] = {
            "path": ADAPTER_FILE,
            "sha256": _file_digest(adapter_path),
            "inputs": ["image_tokens", "text_tokens"],
            "outputs": ["scores"],
        }

    if head is not None:
        say("head")
        head = head.eval()
        head_path = work / HEAD_GRAPH_FILE
        pooled_ref = reference.pooled.float()
        normalized = pooled_ref / pooled_ref.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        _export_graph(
            _head_module(head),
            (normalized[:2].contiguous(),),
            head_path,
            inputs={"embeddings": {0: "batch"}},
            outputs={"scores": {0: "batch"}},
            opset=opset,
        )
        runner = session(head_path)
        noise = torch.randn_like(normalized)
        noise = noise / noise.norm(dim=-1, keepdim=True)
        measured = {}
        for label, rows in (("head.scores", normalized), ("head.scores_noise", noise)):
            with torch.no_grad():
                expected = head(rows).reshape(-1).numpy()
            (scores,) = runner.run(["scores"], {"embeddings": rows.numpy().astype(np.float32)})
            measured[label] = relative_drift(scores, expected)
        _check_drift("head", measured, tolerance)
        drift.update(measured)
        files["head"] = {
            "path": HEAD_GRAPH_FILE,
            "sha256": _file_digest(head_path),
            "inputs": ["embeddings"],
            "outputs": ["scores"],
        }

    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "imgrank_version": __version__,
        "model": {
            "name": backbone.name,
            "pretrained": backbone.pretrained,
            "weights_id": backbone.weights_id,
            "config": backbone.config,
            "torch_fingerprint": backbone.fingerprint,
        },
        "preprocess": backbone.preprocess.to_dict(),
        "logit_scale": float(backbone.model.logit_scale.exp().item()),
        "context_length": context_length,
        "image_tokens": has_tokens,
        "files": files,
        "adapter": adapter_info if adapter is not None else None,
        "head": head_info if head is not None else None,
        "opset": opset,
        "parity": {"tolerance": tolerance, "drift": drift},
    }
    (work / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    written = sorted(p.name for p in work.iterdir())
    return ExportResult(folder=work, files=written, drift=drift, manifest=manifest)


def export_ranking_model(
    ranking: TorchRankingModel,
    out: Path,
    *,
    opset: int = DEFAULT_OPSET,
    tolerance: float = DEFAULT_TOLERANCE,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export a torch ranking model (its backbone and any adapter or head).

    ``imgrank export`` loads the model with :func:`imgrank.models.loading.load_model`,
    exactly as ``imgrank sort`` chooses it (so an export cannot pair an adapter
    with a backbone it was not trained on), on the CPU in float32; the automatic
    export (:mod:`imgrank.models.auto_export`) passes the model a sort would run.

    Args:
        ranking: A torch ranking model on the CPU in float32 (loaded now if it was not).
        out: A new or empty folder.
        opset: ONNX operator set.
        tolerance: Largest accepted relative drift from torch.
        progress: Called with a short line before each step.
    """
    out = out.expanduser()
    _check_out(out)  # refuse a busy --out before minutes of loading
    backbone = ranking.backbone()
    folder = ranking.folder
    if folder is None:
        return export_backbone(backbone, out, opset=opset, tolerance=tolerance, progress=progress)
    if folder.head is not None:
        from imgrank.models.checkpoints import load_head

        head_info = {
            "name": folder.path.name,
            "kind": folder.head.kind,
            "input_dim": folder.head.input_dim,
            "backbone": folder.backbone_spec.model,
            "source": folder.source,
        }
        return export_backbone(
            backbone,
            out,
            head=load_head(folder),
            head_info=head_info,
            opset=opset,
            tolerance=tolerance,
            progress=progress,
        )
    from imgrank.models.checkpoints import load_adapter

    info = {
        "name": folder.path.name,
        "variant": folder.variant,
        "backbone": folder.backbone_spec.model,
        "prompt_format": folder.prompt_format,
        "target_range": list(folder.target_range) if folder.target_range else None,
        "config": folder.adapter_config.to_dict(),
        "source": folder.source,
    }
    return export_backbone(
        backbone,
        out,
        adapter=load_adapter(folder, device="cpu"),
        adapter_info=info,
        opset=opset,
        tolerance=tolerance,
        progress=progress,
    )
