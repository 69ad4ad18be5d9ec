"""Checks of onnxopt.testing.real_models against the real models and data.

Every test that needs an optional package skips with RealModelUnavailable's reason.
The MiniLM export (~10 s the first time) is cached in cache_dir(); later runs reuse it.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from onnxopt.testing import real_models as rm


def _session(path):
    ort = pytest.importorskip("onnxruntime")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2  # the CI boxes have 2 cores
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ppocr_session(name):
    try:
        return _session(rm.ppocr_model(name))
    except rm.RealModelUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def det_session():
    return _ppocr_session("det")


@pytest.fixture(scope="session")
def eval_images():
    try:
        return dict(rm.images("eval"))
    except rm.RealModelUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def calib_images():
    try:
        return dict(rm.images("calib"))
    except rm.RealModelUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def minilm_path():
    try:
        start = time.perf_counter()
        path = rm.minilm_model()
        print(f"minilm_model(): {time.perf_counter() - start:.1f} s")
        return path
    except rm.RealModelUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def minilm_session(minilm_path):
    return _session(minilm_path)


# ---------------------------------------------------------------------------- PP-OCR


def test_ppocr_model_files():
    try:
        paths = {name: rm.ppocr_model(name) for name in ("det", "rec", "cls")}
    except rm.RealModelUnavailable as exc:
        pytest.skip(str(exc))
    for path in paths.values():
        assert path.is_file() and path.suffix == ".onnx" and path.parent.name == "models"
    assert paths["det"].name == "ch_PP-OCRv4_det_infer.onnx"
    with pytest.raises(ValueError):
        rm.ppocr_model("ocr")


def test_det_preprocess_layout():
    img = np.zeros((50, 70, 3), np.uint8)
    img[..., 0] = 255  # pure red
    x = rm.det_preprocess(img, size=64)
    assert x.shape == (1, 3, 64, 64) and x.dtype == np.float32 and x.flags.c_contiguous
    # BGR order like PaddleOCR: red lands in channel 2; 255 -> 1, 0 -> -1
    np.testing.assert_allclose(x[0, 2], 1.0)
    np.testing.assert_allclose(x[0, 0], -1.0)
    grey = rm.det_preprocess(np.full((10, 10), 128, np.uint8), size=32)
    np.testing.assert_allclose(grey, (128 / 255 - 0.5) / 0.5, atol=1e-6)
    with pytest.raises(ValueError):
        rm.det_preprocess(img, size=100)


def test_det_finds_text_on_real_images(det_session, eval_images, calib_images):
    counts = {}
    for name, img in {**eval_images, "text.png": calib_images["text.png"]}.items():
        out = det_session.run(None, {"x": rm.det_preprocess(img)})[0]
        assert out.shape == (1, 1, 640, 640) and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0
        counts[name] = int((out > 0.3).sum())
    print("det text pixels:", counts)
    # printed text lines and handwriting are found
    assert counts["page.png"] > 20000
    assert counts["text.png"] > 5000
    # the promise made in the module docstring: eval has >= 3 text images
    assert sum(counts[name] >= 500 for name in eval_images) >= 3
    # a grass texture is not text
    assert counts["grass.png"] < 500


def test_rec_and_cls_on_a_real_text_line(eval_images):
    rec = _ppocr_session("rec")
    cls = _ppocr_session("cls")
    title = eval_images["page.png"][8:38, 5:300]  # "Region-based segmentation"
    x = rm.rec_preprocess(title)
    assert x.shape == (1, 3, 48, 320) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    probs = rec.run(None, {"x": x})[0]
    assert probs.shape[0] == 1 and probs.shape[2] == 6625
    assert rm.rec_decode(probs) == ["Region-based segmentation"]

    upright = cls.run(None, {"x": rm.cls_preprocess(title)})[0]
    flipped = cls.run(None, {"x": rm.cls_preprocess(title[::-1, ::-1])})[0]
    assert upright.shape == (1, 2) and rm.cls_preprocess(title).shape == (1, 3, 48, 192)
    assert upright[0, 0] > 0.9 and flipped[0, 1] > 0.9  # labels are 0 and 180 degrees


def test_text_line_preprocess_pads_right():
    line = np.full((20, 40, 3), 255, np.uint8)  # ratio 2 -> 96 px wide at height 48
    x = rm.rec_preprocess(line)
    np.testing.assert_allclose(x[..., :96], 1.0)
    np.testing.assert_allclose(x[..., 96:], 0.0)
    wide = rm.cls_preprocess(np.zeros((10, 1000), np.uint8))  # capped at 192, no padding
    assert wide.shape == (1, 3, 48, 192)
    np.testing.assert_allclose(wide, -1.0)


def test_det_mask_iou_known_numbers():
    a_ref = np.zeros((4, 4), np.float32)
    a_ref[0, :4] = 0.9  # 4 text pixels
    a_test = np.zeros((4, 4), np.float32)
    a_test[0, 2:] = 0.8
    a_test[1, :2] = 0.5  # 2 shared, 2 extra -> IoU 2/6
    b = np.full((4, 4), 0.3, np.float32)  # exactly at threshold: not text (> 0.3 rule)
    c_ref = np.zeros((4, 4), np.float32)
    c_ref[3, :2] = 1.0  # 2 pixels, missed by the test model -> IoU 0/2
    c_test = np.zeros((4, 4), np.float32)

    res = rm.det_mask_iou([a_ref, b, c_ref], [a_test, b, c_test], min_text_pixels=3)
    assert res["mean_iou"] == pytest.approx(2 / 8)  # (2 + 0 + 0) / (6 + 0 + 2)
    assert res["min_iou"] == pytest.approx(2 / 6)  # only image a has >= 3 ref pixels
    assert res["n_images"] == 3 and res["n_text_images"] == 1
    assert res["per_image_iou"] == pytest.approx([2 / 6, 1.0, 0.0])

    # [N, 1, H, W] arrays, lower min_text_pixels: c counts now and is the minimum
    stacked = rm.det_mask_iou(
        np.stack([a_ref, b, c_ref])[:, None], np.stack([a_test, b, c_test])[:, None], min_text_pixels=2
    )
    assert stacked["min_iou"] == 0.0 and stacked["n_text_images"] == 2
    assert stacked["mean_iou"] == pytest.approx(0.25)

    empty = rm.det_mask_iou([b], [b])
    assert empty["mean_iou"] == 1.0 and math.isnan(empty["min_iou"]) and empty["n_text_images"] == 0
    with pytest.raises(ValueError):
        rm.det_mask_iou([a_ref], [a_ref, b])


# ---------------------------------------------------------------------------- data splits


def test_sentence_splits_disjoint_and_deterministic():
    calib, evals = rm.sentences("calib"), rm.sentences("eval")
    assert len(calib) >= 1000 and len(evals) >= 300
    assert not set(calib) & set(evals)
    assert len(set(calib)) == len(calib) and len(set(evals)) == len(evals)
    # recomputed from scratch (bypassing the cache) gives the same list
    assert rm._all_sentences.__wrapped__() == rm._all_sentences()
    assert rm.sentences("eval", 5) == evals[:5]
    for s in calib + evals:
        assert 6 <= len(s.split()) <= 60
        assert s == s.strip() and "  " not in s and "\n" not in s
        assert ">>>" not in s and "::=" not in s and not s.endswith(" .")
        assert not rm._EMPHASIS.search(s)  # *emphasis* markup was stripped
    with pytest.raises(ValueError):
        rm.sentences("train")
    with pytest.raises(ValueError):
        rm.sentences("eval", len(evals) + 1)


def test_image_splits(calib_images, eval_images):
    assert not set(calib_images) & set(eval_images)
    assert list(eval_images) == sorted(eval_images) == list(rm.EVAL_IMAGES)
    assert list(calib_images) == sorted(calib_images) == list(rm.CALIB_IMAGES)
    assert "page.png" in eval_images and "text.png" in calib_images
    for img in (*calib_images.values(), *eval_images.values()):
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    again = rm.images("eval", 2)
    assert [n for n, _ in again] == list(rm.EVAL_IMAGES[:2])
    assert np.array_equal(again[0][1], eval_images[again[0][0]])


# ---------------------------------------------------------------------------- MiniLM


def test_encode_sentences():
    try:
        feed = rm.encode_sentences(["Hello world.", "word " * 300], seq_len=16)
    except rm.RealModelUnavailable as exc:
        pytest.skip(str(exc))
    assert set(feed) == set(rm.MINILM_INPUT_NAMES)
    for arr in feed.values():
        assert arr.dtype == np.int64 and arr.shape == (2, 16)
    ids, mask = feed["input_ids"], feed["attention_mask"]
    # [CLS] hello world . [SEP], then [PAD] = 0
    assert ids[0, 0] == 101 and ids[0, 4] == 102
    assert mask[0].sum() == 5 and (ids[0, 5:] == 0).all() and (mask[0, 5:] == 0).all()
    assert mask[1].all() and ids[1, -1] == 102  # truncated, still ends with [SEP]
    assert (feed["token_type_ids"] == 0).all()
    with pytest.raises(TypeError):
        rm.encode_sentences("not a list")


def test_sentence_embeddings_and_agreement_math():
    hidden = np.zeros((2, 3, 2), np.float32)
    hidden[0] = [[3, 0], [1, 0], [100, 100]]  # last token is padding
    hidden[1] = [[0, 2], [0, 4], [0, 6]]
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    emb = rm.sentence_embeddings(hidden, mask)
    np.testing.assert_allclose(emb, [[1, 0], [0, 1]], atol=1e-7)

    ref = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.9, 0.1]])
    same = rm.embedding_agreement(ref, ref * 3.0)  # scale does not matter
    assert same == pytest.approx({"cosine_mean": 1.0, "cosine_min": 1.0, "nn_agreement": 1.0, "n": 4})
    swapped = ref.copy()
    swapped[1] = [0.1, 1.0, 0.5]  # sentence 1 moves next to 3
    res = rm.embedding_agreement(ref, swapped)
    assert res["cosine_min"] == pytest.approx(
        float(ref[1] @ swapped[1] / np.linalg.norm(ref[1]) / np.linalg.norm(swapped[1]))
    )
    # nearest other: ref 0->1, 1->0, 2->3, 3->2; test 0->1, 1->3, 2->3, 3->2
    assert res["nn_agreement"] == 0.75


def test_minilm_export_file(minilm_path):
    onnx = pytest.importorskip("onnx")
    assert minilm_path.name == "minilm-l6-v2-opset17.onnx"
    assert minilm_path.stat().st_size > 80e6  # all 22 M weights embedded
    assert not list(minilm_path.parent.glob(f".{minilm_path.stem}.*.tmp"))  # no leftovers
    start = time.perf_counter()
    assert rm.minilm_model() == minilm_path
    assert time.perf_counter() - start < 1.0  # cached

    proto = onnx.load(str(minilm_path), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    onnx.checker.check_model(str(minilm_path))
    assert {o.domain: o.version for o in proto.opset_import}.get("", None) == 17
    assert 600 <= len(proto.graph.node) <= 700
    assert [i.name for i in proto.graph.input] == list(rm.MINILM_INPUT_NAMES)
    for inp in proto.graph.input:
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", "sequence"]
    (out,) = proto.graph.output
    dims = out.type.tensor_type.shape.dim
    assert out.name == "last_hidden_state"
    assert [dims[0].dim_param, dims[1].dim_param, dims[2].dim_value] == ["batch", "sequence", 384]


def test_minilm_onnx_matches_torch(minilm_session):
    try:
        torch = pytest.importorskip("torch")
        model = rm.minilm_torch_model()
    except rm.RealModelUnavailable as exc:
        pytest.skip(str(exc))
    # shapes other than the export's dummy (2 x 16), with real padding
    for batch, seq_len in ((3, 24), (1, 7)):
        feed = rm.encode_sentences(rm.sentences("eval", batch), seq_len=seq_len)
        assert feed["attention_mask"].min() == 0 or seq_len == 7
        (onnx_out,) = minilm_session.run(None, feed)
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
        assert onnx_out.shape == (batch, seq_len, 384)
        assert np.abs(onnx_out - ref).max() < 1e-4


def test_minilm_embeddings_make_sense(minilm_session):
    texts = [
        "A man is playing a guitar on stage.",
        "Someone performs music with a guitar.",
        "The central bank raised interest rates again.",
        "Interest rates were increased by the central bank.",
    ]
    feed = rm.encode_sentences(texts, seq_len=32)
    (hidden,) = minilm_session.run(None, feed)
    emb = rm.sentence_embeddings(hidden, feed["attention_mask"])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[0, 3] + 0.3
    assert sim[2, 3] > sim[2, 0] + 0.3 and sim[2, 3] > sim[2, 1] + 0.3
    # the fp32 model agrees with itself on held-out sentences
    eval_feed = rm.encode_sentences(rm.sentences("eval", 16), seq_len=64)
    (eval_hidden,) = minilm_session.run(None, eval_feed)
    eval_emb = rm.sentence_embeddings(eval_hidden, eval_feed["attention_mask"])
    agree = rm.embedding_agreement(eval_emb, eval_emb)
    assert agree["cosine_min"] > 0.9999 and agree["nn_agreement"] == 1.0 and agree["n"] == 16


def test_missing_package_raises_with_install_hint(monkeypatch):
    real_find_spec = rm.importlib.util.find_spec
    monkeypatch.setattr(
        rm.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "rapidocr_onnxruntime" else real_find_spec(name, *a),
    )
    with pytest.raises(rm.RealModelUnavailable, match="pip install --no-deps rapidocr-onnxruntime==1.4.4"):
        rm.ppocr_model("det")


def test_failed_export_leaves_no_file(monkeypatch, tmp_path):
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    monkeypatch.setattr(rm, "minilm_torch_model", lambda *a, **k: torch.nn.Identity())

    def half_export(model, args, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\x08\x07half a model")
        raise RuntimeError("export killed")

    monkeypatch.setattr(torch.onnx, "export", half_export)
    with pytest.raises(RuntimeError, match="export killed"):
        rm.minilm_model(opset=13)
    assert list(tmp_path.iterdir()) == []
