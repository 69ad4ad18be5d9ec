"""Calibration: observers against numpy ground truth, every data source on real models and
real images, every bad input, and collect_stats against a brute-force ONNX Runtime run."""

from __future__ import annotations

import os
import pathlib
import tracemalloc

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxopt.calibration import ImageSpec, collect_stats, load_calibration_data, make_observer
from onnxopt.calibration import collect as collect_mod
from onnxopt.errors import OnnxoptError
from onnxopt.model_io import load_model
from onnxopt.testing import real_models as rm

HIST_METHODS = ("percentile", "entropy", "mse")


# ---------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------


def _real(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except rm.RealModelUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def cls_path() -> pathlib.Path:
    return _real(rm.ppocr_model, "cls")


@pytest.fixture(scope="module")
def cls_model(cls_path):
    return load_model(cls_path)


@pytest.fixture(scope="module")
def det_model():
    return load_model(_real(rm.ppocr_model, "det"))


@pytest.fixture(scope="module")
def calib_images():
    return _real(rm.images, "calib", 4)


@pytest.fixture(scope="module")
def cls_feeds(calib_images):
    return [{"x": rm.cls_preprocess(img)} for _, img in calib_images]


@pytest.fixture(scope="module")
def cls_all_tensors(cls_model):
    """Every float tensor produced by a node of the cls model (Constants excluded)."""
    names = []
    for node in cls_model.graph:
        if node.op_type == "Constant":
            continue
        for v in node.outputs:
            if v.name and v.dtype in (None, onnx.TensorProto.FLOAT) or (v.dtype is not None and v.dtype.name == "FLOAT"):
                names.append(v.name)
    return names


@pytest.fixture(scope="module")
def brute_force(cls_path, cls_feeds, cls_all_tensors):
    """All intermediate tensors of the cls model for every feed, from a plain protobuf edit
    and a fresh ORT session: an independent path to the same numbers."""
    proto = onnx.load(str(cls_path))
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {vi.name: vi for vi in inferred.graph.value_info}
    existing = {o.name for o in proto.graph.output}
    for name in cls_all_tensors:
        if name in existing:
            continue
        vi = types.get(name) or onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        proto.graph.output.append(vi)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out = {n: [] for n in cls_all_tensors}
    for feed in cls_feeds:
        for name, arr in zip(cls_all_tensors, sess.run(cls_all_tensors, feed)):
            out[name].append(arr)
    return out


# ---------------------------------------------------------------------------------------
# observers
# ---------------------------------------------------------------------------------------


def _batches(rng, n=6, size=(4, 64, 257)):
    return [(rng.standard_t(4, size=size) * (1 + i)).astype(np.float32) for i in range(n)]


def test_minmax_is_exact():
    rng = np.random.default_rng(1)
    batches = _batches(rng)
    obs = make_observer("minmax")
    for b in batches:
        obs.update(b)
    allv = np.concatenate([b.ravel() for b in batches])
    assert obs.range() == (float(allv.min()), float(allv.max()))
    assert obs.count == allv.size and obs.finite and not obs.saturated


@pytest.mark.parametrize("q", [99.0, 99.9, 99.99])
def test_percentile_within_one_bin_of_numpy(q):
    rng = np.random.default_rng(2)
    batches = [rng.standard_normal((32, 1000)).astype(np.float32) * 3 + 1,
               rng.standard_t(3, size=(32, 1000)).astype(np.float32),
               rng.exponential(2.0, size=(32, 1000)).astype(np.float32)]
    obs = make_observer("percentile", percentile=q)
    for b in batches:
        obs.update(b)
    allv = np.concatenate([b.ravel() for b in batches])
    counts, edges = obs.histogram()
    width = edges[1] - edges[0]
    assert counts.sum() == allv.size
    assert obs.num_bins <= counts.size <= 2 * obs.num_bins  # resolution kept while the range grew
    lo, hi = obs.range()

    def near(value, p):
        # numpy interpolates between two order statistics; in a sparse tail they can be
        # bins apart, so "within a bin" means within a bin of the interval they span.
        a = np.percentile(allv, p, method="lower")
        b = np.percentile(allv, p, method="higher")
        return a - width <= value <= b + width

    assert near(hi, q) and near(lo, 100 - q)
    for p in (1, 25, 50, 75, 99):
        assert abs(obs.percentile_value(p) - np.percentile(allv, p)) <= width  # dense: tight


def test_histogram_counts_match_numpy_histogram():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(200_000).astype(np.float32) * 5
    obs = make_observer("percentile", num_bins=256)
    obs.update(x[:1000])  # small first batch: the range then grows several times
    obs.update(x[1000:])
    counts, edges = obs.histogram()
    ref, _ = np.histogram(x.astype(np.float64), bins=edges)
    ref[-1] -= np.count_nonzero(x.astype(np.float64) == edges[-1])  # numpy's last bin is closed
    assert np.array_equal(counts, ref)


def _edge_values(rng, w):
    """Random values plus the awkward ones for a grid of width w: exact bin edges, the
    values just below and above them, +-0, signed tiny values, runs of one value."""
    x = rng.standard_normal(150_000).astype(np.float32) * 7
    edges = (np.arange(-40, 41, dtype=np.float64) * w).astype(np.float32)
    near = np.concatenate([np.nextafter(edges, np.float32(-np.inf)), np.nextafter(edges, np.float32(np.inf))])
    tiny = np.array([0.0, -0.0, 1e-30, -1e-30, 1e-45, -1e-45], dtype=np.float32)
    run = np.full(70_000, np.float32(3 * w))  # one bin hit many times in a row (> one block)
    return np.concatenate([x, edges, near, tiny, run, edges[::-1]])


@pytest.mark.parametrize("fast_add_at", (True, False))
def test_histogram_binning_equals_exact_reference_on_edge_values(monkeypatch, fast_add_at):
    """The block-wise float32 binning (add.at, or bincount on numpy < 2) equals floor(x / w)
    computed in float64, and np.histogram on the same edges, value for value."""
    from onnxopt.calibration import observers as obs_mod

    monkeypatch.setattr(obs_mod, "_FAST_ADD_AT", fast_add_at)
    rng = np.random.default_rng(11)
    x = _edge_values(rng, 2.0**-3)
    obs = make_observer("percentile", num_bins=512)
    obs.update(x[:5000])  # the grid then grows (rebins) on the rest
    for part in np.array_split(x[5000:], 3):
        obs.update(rng.permutation(part) if part.size < 100_000 else part)
    counts, edges = obs.histogram()
    w = edges[1] - edges[0]
    g = np.floor(x.astype(np.float64) / w).astype(np.int64)  # w is a power of two: exact
    ref = np.bincount(g - g.min())
    assert np.array_equal(counts, ref)
    x64 = x.astype(np.float64)
    ref_np, _ = np.histogram(x64, bins=edges)
    ref_np[-1] -= np.count_nonzero(x64 == edges[-1])  # numpy's last bin is closed
    assert np.array_equal(counts, ref_np)
    assert counts.sum() == x.size


@pytest.mark.parametrize("dtype", (np.float16, np.float64, np.int32, np.int64))
def test_histogram_other_dtypes_count_every_value(dtype):
    rng = np.random.default_rng(12)
    if np.dtype(dtype).kind == "i":
        big = (2**24 + 1) if dtype == np.int32 else 2**40 + 1  # not exact in float32
        x = np.concatenate([rng.integers(-1000, 1000, 50_000), [big, -big, big - 1]]).astype(dtype)
        obs = make_observer("percentile", outlier_abs=1e13)
    else:
        x = (rng.standard_normal(50_000) * 100).astype(dtype)
        obs = make_observer("percentile")
    obs.update(x)
    obs.update(x[::-1].copy())
    counts, edges = obs.histogram()
    assert counts.sum() == 2 * x.size  # nothing lost off either end of the grid
    w = edges[1] - edges[0]  # ints beyond 2**24 are binned as float32: within a bin
    assert edges[0] - w <= float(x.min()) and float(x.max()) <= edges[-1] + w


@pytest.mark.parametrize("method", ("minmax", *HIST_METHODS))
def test_merge_equals_observing_both(method):
    rng = np.random.default_rng(4)
    a = [rng.standard_normal((8, 500)).astype(np.float32) * 0.1 for _ in range(3)]
    b = [rng.standard_t(2, size=(8, 500)).astype(np.float32) * 50 + 3 for _ in range(3)]
    both = make_observer(method)
    for x in a + b:
        both.update(x)
    oa, ob = make_observer(method), make_observer(method)
    for x in a:
        oa.update(x)
    for x in b:
        ob.update(x)
    merged = oa.merge(ob)
    assert merged.range() == both.range()
    assert ob.merge(oa).range() == both.range()
    assert merged.count == both.count
    if method != "minmax":
        for got, want in zip(merged.histogram(), both.histogram()):
            assert np.array_equal(got, want)
        reverse = make_observer(method)  # batch order does not matter either
        for x in reversed(a + b):
            reverse.update(x)
        assert reverse.range() == both.range()
    assert oa.count == sum(x.size for x in a)  # merge leaves its inputs alone


@pytest.mark.parametrize("symmetric", (False, True))
def test_kl_clips_heavy_tails(symmetric):
    rng = np.random.default_rng(5)
    x = rng.standard_t(2, size=400_000).astype(np.float32)
    obs = make_observer("entropy", symmetric=symmetric)
    obs.update(x)
    lo, hi = obs.range()
    assert x.min() <= lo < 0 < hi <= x.max()
    assert hi < 0.5 * x.max() and lo > 0.5 * x.min()  # the far tails are clipped
    assert hi > np.percentile(x, 90) and lo < np.percentile(x, 10)  # ...but not the bulk
    if symmetric:
        assert lo == -hi


def _fake_quant_mse(x, lo, hi, symmetric):
    if symmetric:
        s = hi / 127.0
        q = np.clip(np.round(x / s), -127, 127) * s
    else:
        s = (hi - lo) / 255.0
        z = np.round(-lo / s)
        q = (np.clip(np.round(x / s) + z, 0, 255) - z) * s
    return float(np.mean((q - x) ** 2))


@pytest.mark.parametrize("symmetric", (False, True))
@pytest.mark.parametrize("df", (2, 4))
def test_mse_range_is_near_optimal_by_brute_force(symmetric, df):
    rng = np.random.default_rng(5)
    x = (rng.standard_t(df, size=100_000) + 0.3).astype(np.float32)
    obs = make_observer("mse", symmetric=symmetric)
    obs.update(x)
    lo, hi = obs.range()
    if symmetric:
        assert lo == -hi and 0 < hi < np.abs(x).max()
    else:
        assert x.min() <= lo < 0 < hi < x.max()
    x64 = x.astype(np.float64)
    ours = _fake_quant_mse(x64, lo, hi, symmetric)
    if symmetric:
        amax = float(np.abs(x64).max())
        grid = [_fake_quant_mse(x64, -t, t, True) for t in np.linspace(0.5, amax, 200)]
        full = _fake_quant_mse(x64, -amax, amax, True)
    else:
        grid = [_fake_quant_mse(x64, a, b, False) for a in np.linspace(x.min(), -0.5, 30)
                for b in np.linspace(0.5, x.max(), 30)]
        full = _fake_quant_mse(x64, float(x.min()), float(x.max()), False)
    assert ours <= 1.05 * min(grid)  # as good as an exhaustive search on the real error
    assert ours < full  # and better than not clipping


@pytest.mark.parametrize("method", HIST_METHODS)
def test_one_sided_tensor_gets_one_sided_range(method):
    rng = np.random.default_rng(6)
    x = np.maximum(rng.standard_t(3, size=300_000), 0).astype(np.float32)  # ReLU output
    obs = make_observer(method)
    obs.update(x)
    lo, hi = obs.range()
    assert 0 < hi <= x.max()
    # entropy / mse search [0, max] only; percentile's low end is the 0.01th percentile,
    # which lies in the first bin (half the values are exactly 0)
    assert lo == 0.0 if method != "percentile" else 0.0 <= lo <= obs.histogram()[1][1]


@pytest.mark.parametrize("method", ("minmax", *HIST_METHODS))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, -1e9, -3.4e38])
def test_non_finite_and_mask_values_are_flagged_not_fatal(method, bad):
    rng = np.random.default_rng(7)
    clean = rng.standard_normal((2, 4, 64, 64)).astype(np.float32)
    masked = clean.copy()
    masked[:, :, :, 48:] = bad  # an additive attention mask on a quarter of the scores
    obs, ref = make_observer(method), make_observer(method)
    obs.update(masked)
    obs.update(clean)
    ref.update(clean[:, :, :, :48])
    ref.update(clean)
    lo, hi = obs.range()
    assert np.isfinite(lo) and np.isfinite(hi)
    # The masked values do not touch the histogram: same range as the clean values alone.
    assert (lo, hi) == ref.range()
    n_bad = masked[:, :, :, 48:].size
    if np.isnan(bad) or np.isinf(bad):
        assert not obs.finite and obs.nonfinite_count == n_bad
    else:
        assert obs.finite and obs.saturated and obs.outlier_count == n_bad
    if np.isnan(bad):
        assert (obs.observed_min, obs.observed_max) == (float(clean.min()), float(clean.max()))
    elif bad > 0:
        assert (obs.observed_min, obs.observed_max) == (float(clean.min()), float(np.float32(bad)))
    else:  # raw extremes are reported as seen, so the quantizer knows why it must stay float
        assert (obs.observed_min, obs.observed_max) == (float(np.float32(bad)), float(clean.max()))
    assert obs.count == masked.size + clean.size


def test_all_non_finite_and_constant_tensors():
    obs = make_observer("percentile")
    obs.update(np.full((3, 3), np.nan, dtype=np.float32))
    assert obs.range() == (0.0, 0.0) and not obs.finite
    for method in ("minmax", *HIST_METHODS):
        o = make_observer(method)
        o.update(np.zeros((10, 10), np.float32))
        assert o.range() == (0.0, 0.0)
        o.update(np.linspace(-2, 6, 1000, dtype=np.float32))  # grows from a zero-width range
        lo, hi = o.range()
        assert -2 <= lo <= 0 < hi <= 6


def test_integer_half_and_bool_inputs():
    for arr in (np.arange(-50, 50, dtype=np.int64).reshape(10, 10), np.linspace(-1, 3, 100).astype(np.float16),
                np.array([True, False, True])):
        for method in ("minmax", "percentile"):
            o = make_observer(method, percentile=100.0)
            o.update(arr)
            assert o.range() == (float(arr.min()), float(arr.max()))


def test_observer_options_are_checked():
    with pytest.raises(OnnxoptError, match="unknown calibration method 'foo'"):
        make_observer("foo")
    with pytest.raises(OnnxoptError, match="percentile must be in"):
        make_observer("percentile", percentile=20)
    assert make_observer("kl").method == "entropy"


# ---------------------------------------------------------------------------------------
# data sources
# ---------------------------------------------------------------------------------------


def _same(a, b):
    assert len(a) == len(b)
    for fa, fb in zip(a, b):
        assert fa.keys() == fb.keys()
        for k in fa:
            np.testing.assert_array_equal(fa[k], fb[k])


def test_npz_folder(tmp_path, cls_model, cls_feeds):
    for i, f in enumerate(cls_feeds):
        np.savez(tmp_path / f"s{i:02d}.npz", **f)
    data = load_calibration_data(tmp_path, cls_model)
    assert len(data) == 4 and not data.is_random and "4 .npz files" in data.description
    _same(list(data), cls_feeds)
    _same(list(data), cls_feeds)  # re-iterable
    _same(list(load_calibration_data(str(tmp_path), cls_model, samples=2)), cls_feeds[:2])


@pytest.mark.parametrize("extra_axis", (False, True))
@pytest.mark.parametrize("compress", (False, True))
def test_stacked_npz(tmp_path, cls_model, cls_feeds, extra_axis, compress):
    stacked = np.stack([f["x"] for f in cls_feeds]) if extra_axis else np.concatenate([f["x"] for f in cls_feeds])
    path = tmp_path / "calib.npz"
    (np.savez_compressed if compress else np.savez)(path, x=stacked)
    data = load_calibration_data(path, cls_model)
    assert len(data) == 4
    feeds = list(data)
    assert feeds[0]["x"].shape == (1, 3, 48, 192)
    _same(feeds, cls_feeds)
    _same(list(load_calibration_data(path, cls_model, samples=3)), cls_feeds[:3])


def _write_pngs(folder: pathlib.Path, images):
    from PIL import Image

    folder.mkdir(exist_ok=True)
    for name, img in images:
        Image.fromarray(img).save(folder / (pathlib.Path(name).stem + ".png"))


def test_image_folder_matches_reference_preprocessing(tmp_path, det_model, calib_images):
    _write_pngs(tmp_path / "imgs", calib_images)
    spec = ImageSpec.parse("64x64,mean=0.5,std=0.5,bgr,nchw")
    data = load_calibration_data(tmp_path / "imgs", det_model, image_spec=spec)
    assert len(data) == 4 and "4 images" in data.description and "64x64" in data.description
    ref = [rm.det_preprocess(img, size=64) for _, img in sorted(calib_images, key=lambda t: pathlib.Path(t[0]).stem)]
    for got, want in zip(data, ref):
        assert got["x"].dtype == np.float32 and got["x"].shape == (1, 3, 64, 64)
        np.testing.assert_allclose(got["x"], want, atol=1e-6)


def test_image_spec_parse_and_layouts(tmp_path, det_model, calib_images):
    spec = ImageSpec.parse("32x64,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,rgb,nhwc,scale=1/255")
    assert spec.size == (32, 64) and spec.layout == "NHWC" and spec.mean == (0.485, 0.456, 0.406)
    assert abs(spec.scale - 1 / 255) < 1e-12
    assert ImageSpec.parse("640").size == (640, 640)
    with pytest.raises(OnnxoptError, match="unknown key 'foo'"):
        ImageSpec.parse("640x640,foo=1")
    with pytest.raises(OnnxoptError, match="cannot read 'purple'"):
        ImageSpec.parse("640x640,purple")
    _write_pngs(tmp_path / "i", calib_images[:1])
    # NHWC into an NCHW model -> a clear error, not a shape crash in ORT
    with pytest.raises(OnnxoptError, match=r"input 'x' \[\?, 3, \?, \?\] has a fixed height of 3 in layout NHWC"):
        load_calibration_data(tmp_path / "i", det_model, image_spec=ImageSpec.parse("64x64,nhwc"))
    with pytest.raises(OnnxoptError, match="dynamic height/width; give the image size"):
        load_calibration_data(tmp_path / "i", det_model)


def test_iterables_generators_and_readers(cls_model, cls_feeds):
    data = load_calibration_data(cls_feeds, cls_model)
    _same(list(data), cls_feeds)
    gen = load_calibration_data((dict(f) for f in cls_feeds), cls_model)
    _same(list(gen), cls_feeds)
    _same(list(gen), cls_feeds)  # one-shot source, replayed from the disk cache
    assert len(gen) == 4

    class Rewindable:
        def __init__(self):
            self.i, self.rewinds = 0, 0

        def get_next(self):
            self.i += 1
            return cls_feeds[self.i - 1] if self.i <= len(cls_feeds) else None

        def rewind(self):
            self.i = 0
            self.rewinds += 1

    r = Rewindable()
    data = load_calibration_data(r, cls_model, samples=3)
    _same(list(data), cls_feeds[:3])
    _same(list(data), cls_feeds[:3])
    # first-sample check, one counting pass (list() asks len() first), two passes
    assert r.rewinds == 4


def test_ort_reader_without_rewind_is_streamed_not_materialised(cls_model):
    from onnxruntime.quantization import CalibrationDataReader

    n = 150
    shape = (1, 3, 48, 192)  # 110 KB per feed, 16.6 MB for all of them

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.calls = 0

        def get_next(self):
            self.calls += 1
            if self.calls > n:
                return None
            return {"x": np.full(shape, self.calls, dtype=np.float32)}

    reader = Reader()
    tracemalloc.start()
    try:
        data = load_calibration_data(reader, cls_model)
        seen = [float(f["x"][0, 0, 0, 0]) for f in data]
        again = [float(f["x"][0, 0, 0, 0]) for f in data]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == again == [float(i) for i in range(1, n + 1)]
    assert reader.calls == n + 1  # drained once; the second pass came from disk
    assert len(data) == n
    assert peak < 4 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB: the reader was materialised"
    stats = collect_stats(cls_model, data, ["x"], progress=False)
    assert (stats["x"].min, stats["x"].max) == (1.0, float(n))
    data.close()


def test_random_is_labelled(cls_model):
    data = load_calibration_data("random", cls_model, samples=3, shapes={"x": (1, 3, 48, 192)})
    assert data.is_random and "smoke test" in data.description and len(data) == 3
    feeds = list(data)
    assert feeds[0]["x"].shape == (1, 3, 48, 192) and not np.array_equal(feeds[0]["x"], feeds[1]["x"])
    _same(feeds, list(data))


# ---------------------------------------------------------------------------------------
# bad input: one clear OnnxoptError each
# ---------------------------------------------------------------------------------------


def test_bad_inputs(tmp_path, cls_model, cls_feeds):
    x = cls_feeds[0]["x"]
    cases = [
        ([{"x": x, "y": x}], "unknown input name 'y'"),
        ([{"image": x}], "unknown input name 'image'"),
        ([{}], "missing input 'x'"),
        ([{"x": x[:, :2]}], r"input 'x' has shape \(1, 2, 48, 192\), the model expects \[-1, 3, \?, \?\]"),
        ([{"x": x[0]}], "input 'x' has shape .* expects rank 4"),
        ([{"x": x.astype(np.float64)}], "input 'x' has dtype float64, the model expects float32"),
        ([{"x": x[:0]}], "input 'x' has an empty batch"),
        ([x], "expected a dict of input name -> array"),
        (tmp_path / "nope", "no such file or folder"),
        (42, "cannot read calibration data from a int"),
    ]
    for spec, msg in cases:
        with pytest.raises(OnnxoptError, match=msg):
            load_calibration_data(spec, cls_model)
    with pytest.raises(OnnxoptError, match="samples must be at least 1, got 0"):
        load_calibration_data(cls_feeds, cls_model, samples=0)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OnnxoptError, match="calibration data folder is empty"):
        load_calibration_data(empty, cls_model)
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(OnnxoptError, match="holds no .npz files or images"):
        load_calibration_data(empty, cls_model)

    fake = tmp_path / "fake.npz"
    fake.write_text("this is not a zip file")
    with pytest.raises(OnnxoptError, match="fake.npz: not a readable .npz file"):
        load_calibration_data(fake, cls_model)
    folder = tmp_path / "npzs"
    folder.mkdir()
    np.savez(folder / "a.npz", x=x)
    (folder / "b.npz").write_bytes(b"garbage")
    data = load_calibration_data(folder, cls_model)  # the first file is fine...
    with pytest.raises(OnnxoptError, match="b.npz: not a readable .npz file"):
        list(data)  # ...the second fails, by name, as it streams

    bad = tmp_path / "stack.npz"
    np.savez(bad, x=np.zeros((3, 1, 1, 3, 48, 192), np.float32))
    with pytest.raises(OnnxoptError, match="expected rank 4 .* or 5"):
        load_calibration_data(bad, cls_model)
    np.savez(bad, y=np.zeros((3, 3, 48, 192), np.float32))
    with pytest.raises(OnnxoptError, match="unknown input name 'y'"):
        load_calibration_data(bad, cls_model)


def test_undecodable_image_is_named(tmp_path, det_model, calib_images):
    folder = tmp_path / "imgs"
    _write_pngs(folder, calib_images[:2])
    (folder / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    data = load_calibration_data(folder, det_model, image_spec=ImageSpec(size=(64, 64)))
    with pytest.raises(OnnxoptError, match="zz_broken.png: cannot decode image"):
        list(data)
    with pytest.raises(OnnxoptError, match="aa_broken.jpg: cannot decode image"):
        (folder / "aa_broken.jpg").write_bytes(b"\xff\xd8 nope")
        load_calibration_data(folder, det_model, image_spec=ImageSpec(size=(64, 64)))  # first file: at load time


def test_every_sample_is_validated_as_it_streams(cls_model, cls_feeds):
    feeds = list(cls_feeds) + [{"x": np.zeros((1, 3, 48, 192), np.int32)}]
    data = load_calibration_data(feeds, cls_model)  # the first is fine
    with pytest.raises(OnnxoptError, match="feed 4: input 'x' has dtype int32"):
        list(data)


# ---------------------------------------------------------------------------------------
# collect_stats on the real classifier
# ---------------------------------------------------------------------------------------


def test_collect_minmax_equals_brute_force(monkeypatch, cls_model, cls_feeds, cls_all_tensors, brute_force):
    data = load_calibration_data(cls_feeds, cls_model)
    seen = {}
    real = collect_mod._augmented

    def spy(model, names, reduced=None):
        seen["full"], seen["reduced"] = list(names), dict(reduced or {})
        return real(model, names, reduced)

    monkeypatch.setattr(collect_mod, "_augmented", spy)
    stats = collect_stats(cls_model, data, ["x", *cls_all_tensors], progress=False)
    # min-max runs as reductions inside ORT (the model has no value_info: types were inferred)
    assert len(seen["reduced"]) == len(cls_all_tensors) and not seen["full"]
    assert list(stats) == ["x", *cls_all_tensors]
    for name in cls_all_tensors:
        arrs = brute_force[name]
        st = stats[name]
        # min-max reductions run in an ORT-optimised session (NCHWc convolutions sum in
        # another order), the brute force in the graph as written: equal to float rounding
        want = (float(min(a.min() for a in arrs)), float(max(a.max() for a in arrs)))
        assert (st.min, st.max) == pytest.approx(want, rel=1e-5, abs=1e-6), name
        assert st.count == sum(a.size for a in arrs)
        assert st.finite and not st.saturated
    xs = np.concatenate([f["x"] for f in cls_feeds])
    assert (stats["x"].min, stats["x"].max) == (float(xs.min()), float(xs.max()))


def test_grouping_gives_identical_stats(monkeypatch, cls_model, cls_feeds, cls_all_tensors):
    """Tensors fetched in groups are computed the same way in every group: each group's
    session is a cut of one ORT-optimised base; without a base (large models), the graph
    as written. Either way the stats do not depend on the grouping, and the two ways agree
    to float rounding."""
    data = load_calibration_data(cls_feeds, cls_model)
    names = cls_all_tensors[::3]
    cuts = []
    real = collect_mod._group_model

    def counting(base, group_names):
        cuts.append(len(group_names))
        return real(base, group_names)

    monkeypatch.setattr(collect_mod, "_group_model", counting)
    one = collect_stats(cls_model, data, names, method="percentile", progress=False)
    assert cuts == [len(names)]
    many = collect_stats(cls_model, data, names, method="percentile", progress=False, max_group_bytes=600_000)
    assert len(cuts) > 5 and sum(cuts[1:]) == len(names)
    for name in names:
        a, b = one[name], many[name]
        assert (a.min, a.max, a.count, a.observed_min, a.observed_max) == (
            b.min, b.max, b.count, b.observed_min, b.observed_max), name

    monkeypatch.setattr(collect_mod, "_optimized_base", lambda *a: None)
    sessions = []
    real_aug = collect_mod._augmented
    monkeypatch.setattr(collect_mod, "_augmented", lambda m, n, r=None: sessions.append(len(n)) or real_aug(m, n, r))
    plain_one = collect_stats(cls_model, data, names, method="percentile", progress=False)
    assert sessions == [len(names)] and len(cuts) > 5  # no new cuts: the graph as written
    plain_many = collect_stats(cls_model, data, names, method="percentile", progress=False, max_group_bytes=600_000)
    assert len(sessions) > 5 and sum(sessions[1:]) == len(names)
    for name in names:
        a, b, c = plain_one[name], plain_many[name], one[name]
        assert (a.min, a.max, a.count, a.observed_min, a.observed_max) == (
            b.min, b.max, b.count, b.observed_min, b.observed_max), name
        assert (c.observed_min, c.observed_max) == pytest.approx((a.observed_min, a.observed_max), rel=1e-5, abs=1e-5)
        assert c.count == a.count


def test_channel_absmax_and_mean(cls_model, cls_feeds, cls_all_tensors, brute_force):
    conv_out = next(n.outputs[0].name for n in cls_model.graph if n.op_type == "Conv")
    last = cls_all_tensors[-1]
    weight = next(n.inputs[1].name for n in cls_model.graph if n.op_type == "Conv")
    data = load_calibration_data(cls_feeds, cls_model)
    stats = collect_stats(
        cls_model, data, [conv_out], channel_absmax_for=[conv_out, last], mean_for=[conv_out, "x"], progress=False
    )
    ref = np.concatenate(brute_force[conv_out])
    np.testing.assert_allclose(stats[conv_out].channel_absmax, np.abs(ref).max(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(stats[conv_out].mean_per_channel, ref.mean(axis=(0, 2, 3), dtype=np.float64), rtol=1e-5)
    assert stats[last].channel_absmax is not None and stats[last].mean_per_channel is None
    xs = np.concatenate([f["x"] for f in cls_feeds])
    np.testing.assert_allclose(stats["x"].mean_per_channel, xs.mean(axis=(0, 2, 3), dtype=np.float64), rtol=1e-6)
    # an initializer is observed from its value
    w = collect_stats(cls_model, data, [weight], progress=False)[weight]
    wv = cls_model.graph.initializers[weight].const_value.numpy() if weight in cls_model.graph.initializers else None
    if wv is not None:
        assert (w.min, w.max) == (float(wv.min()), float(wv.max()))


def test_per_tensor_methods_and_channel_extremes_in_one_pass(cls_model, cls_feeds, cls_all_tensors, brute_force):
    data = load_calibration_data(cls_feeds, cls_model)
    a, b = cls_all_tensors[2], cls_all_tensors[5]
    mixed = collect_stats(cls_model, data, [a, b], method_for={b: "mse"}, channel_absmax_for=[a], progress=False)
    alone = collect_stats(cls_model, data, [b], method="mse", progress=False)
    assert mixed[a].method == "minmax" and mixed[b].method == "mse"
    assert (mixed[b].min, mixed[b].max) == (alone[b].min, alone[b].max)
    ref = np.concatenate(brute_force[a])
    flat = ref.reshape(-1, ref.shape[-1])
    # observed in ORT's optimised graph, the brute force in the graph as written: float rounding
    tol = dict(rtol=1e-5, atol=1e-5 * float(np.abs(flat).max()))
    np.testing.assert_allclose(mixed[a].channel_min, flat.min(axis=0), **tol)
    np.testing.assert_allclose(mixed[a].channel_max, flat.max(axis=0), **tol)
    np.testing.assert_allclose(mixed[a].channel_absmax, np.abs(flat).max(axis=0), **tol)


@pytest.mark.parametrize("method", HIST_METHODS)
def test_histogram_methods_on_real_model(cls_model, cls_feeds, cls_all_tensors, method):
    data = load_calibration_data(cls_feeds, cls_model)
    names = cls_all_tensors[:40]
    stats = collect_stats(cls_model, data, names, method=method, progress=False)
    clipped = 0
    for st in stats.values():
        assert st.observed_min <= st.min <= st.max <= st.observed_max
        clipped += st.max < st.observed_max
    assert clipped > 0


def test_collect_errors(cls_model, cls_feeds):
    data = load_calibration_data(cls_feeds, cls_model)
    with pytest.raises(OnnxoptError, match="no tensor named 'nope'"):
        collect_stats(cls_model, data, ["nope"], progress=False)
    with pytest.raises(OnnxoptError, match="unknown calibration method"):
        collect_stats(cls_model, data, ["x"], method="median", progress=False)


def test_original_model_untouched(cls_model, cls_feeds, cls_all_tensors):
    before = [v.name for v in cls_model.graph.outputs]
    collect_stats(cls_model, load_calibration_data(cls_feeds[:1], cls_model), cls_all_tensors[:5], progress=False)
    assert [v.name for v in cls_model.graph.outputs] == before


def test_minilm_attention_mask_is_flagged_not_fatal(monkeypatch):
    """The issue's crash: ORT's Percentile/Entropy fail with 'range not finite' on MiniLM.

    Two independent paths must agree: percentile fetches every tensor's values; minmax
    reduces inside ORT and switches a tensor whose min/max/sum come back non-finite or
    huge to fetching its values, from the batch where that happened."""
    path = _real(rm.minilm_model)
    model = load_model(path)
    feeds = _real(rm.encode_sentences, _real(rm.sentences, "calib", 4), seq_len=32)
    batches = [{k: v[i : i + 1] for k, v in feeds.items()} for i in range(4)]
    names = [v.name for n in model.graph if n.op_type in ("Add", "Where", "Softmax", "MatMul") for v in n.outputs]
    data = load_calibration_data(batches, model)
    sessions = []
    real = collect_mod._augmented
    monkeypatch.setattr(collect_mod, "_augmented", lambda m, n, r=None: sessions.append(len(n)) or real(m, n, r))
    pct = collect_stats(model, data, names, method="percentile", progress=False)
    # ONNX shape inference loses MiniLM's batch dim; the sizes probed from ORT put all
    # ~300 tensors (a few MB per batch) in one group instead of 16 MB guesses each
    assert sessions == [len(names)]
    mm = collect_stats(model, data, names, method="minmax", progress=False)
    flagged = [s for s in pct.values() if not s.finite or s.saturated]
    assert flagged, "the additive attention mask should be seen as non-finite or saturating"
    for name in names:
        a, b = pct[name], mm[name]
        assert np.isfinite(a.min) and np.isfinite(a.max) and np.isfinite(b.min) and np.isfinite(b.max)
        assert (a.count, a.finite, a.saturated) == (b.count, b.finite, b.saturated), name
        # (minmax's first session is ORT-optimised, percentile's is not: float rounding)
        assert (b.observed_min, b.observed_max) == pytest.approx((a.observed_min, a.observed_max), rel=1e-5, abs=1e-5)
        assert (b.min, b.max) == pytest.approx(a.observer.core_range(), rel=1e-5, abs=1e-5), name
    for st in flagged:
        assert st.observed_min < -1e6 and st.min > -1e6


def test_external_data_model_and_plain_iterable(tmp_path, cls_model, cls_feeds, cls_all_tensors):
    """A model whose weights live in external data (the >2 GB case) goes through a temporary
    folder, not one protobuf; the result matches the embedded model's, and the caller's
    files are untouched."""
    from onnxopt.model_io import save_model

    ext_path = tmp_path / "cls_ext.onnx"
    save_model(cls_model.clone(), ext_path, external_data=True)
    assert (tmp_path / "cls_ext.onnx.data").is_file()
    ext = load_model(ext_path)
    names = cls_all_tensors[::5]
    before = sorted(p.name for p in tmp_path.iterdir())
    got = collect_stats(ext, cls_feeds, names, method="percentile", mean_for=names[:2], progress=False)
    want = collect_stats(cls_model, cls_feeds, names, method="percentile", mean_for=names[:2], progress=False)
    for name in names:
        assert (got[name].min, got[name].max, got[name].count) == (want[name].min, want[name].max, want[name].count)
    np.testing.assert_array_equal(got[names[0]].mean_per_channel, want[names[0]].mean_per_channel)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_progress_bar_goes_to_stderr(capsys, cls_model, cls_feeds):
    stats = collect_stats(cls_model, cls_feeds[:2], ["x"], progress=True)
    out = capsys.readouterr()
    assert out.out == "" and stats["x"].count == 2 * cls_feeds[0]["x"].size


def test_minmax_reduction_path_catches_nan(cls_model, cls_feeds, cls_all_tensors):
    """ORT's ReduceMin/ReduceMax skip NaN except in the first element (checked on ORT 1.32),
    so the in-graph path also sums each tensor: a NaN anywhere must flag the tensor."""
    bad = cls_feeds[1]["x"].copy()
    bad[0, 1, 20, 30] = np.nan  # one pixel: a few hundred NaNs downstream
    feeds = [cls_feeds[0], {"x": bad}, cls_feeds[2]]
    names = cls_all_tensors[:12]
    mm = collect_stats(cls_model, feeds, names, method="minmax", progress=False)
    ref = collect_stats(cls_model, feeds, names, method="percentile", progress=False)  # fetches values
    assert any(not s.finite for s in mm.values())
    for name in names:
        a, b = mm[name], ref[name]
        assert (a.finite, a.nonfinite_count, a.count) == (b.finite, b.nonfinite_count, b.count), name
        assert (a.min, a.max) == pytest.approx(b.observer.core_range(), rel=1e-5, abs=1e-6), name


def test_samples_limit_never_pulls_more(cls_model, cls_feeds):
    class Reader:
        def __init__(self):
            self.calls = 0

        def get_next(self):
            self.calls += 1
            return dict(cls_feeds[self.calls % len(cls_feeds)])

    reader = Reader()  # endless, no rewind
    data = load_calibration_data(reader, cls_model, samples=5)
    assert len(data) == 5 and len(list(data)) == 5 and len(list(data)) == 5
    assert reader.calls == 5


def test_prefetch_stays_at_most_two_feeds_ahead_and_stops():
    import time

    pulled = []

    class Source:
        def __iter__(self):
            for i in range(50):
                pulled.append(i)
                yield {"i": i}

    with collect_mod._prefetched(Source()) as feeds:
        for k, feed in enumerate(feeds):
            assert feed == {"i": k}  # in order
            time.sleep(0.01)  # a slow consumer: the loader must wait, not run ahead
            assert len(pulled) <= k + 3  # this feed, one queued, one being read
            if k == 5:
                break
    n = len(pulled)
    time.sleep(0.05)
    assert len(pulled) == n <= 8  # joined on exit: the source is not read any more


def test_prefetch_raises_errors_in_order():
    class Source:
        def __iter__(self):
            yield from ({"i": i} for i in range(3))
            raise OnnxoptError("feed 3: broken")

    got = []
    with pytest.raises(OnnxoptError, match="feed 3: broken"):
        with collect_mod._prefetched(Source()) as feeds:
            for feed in feeds:
                got.append(feed["i"])
    assert got == [0, 1, 2]


def test_concurrency_policy():
    mb = 1024 * 1024
    assert collect_mod._concurrency(1, 0, 512 * mb) == (1, 1)
    assert collect_mod._concurrency(2, 0, 512 * mb) == (2, 1)  # reductions only: runs side by side
    assert collect_mod._concurrency(16, 0, 512 * mb) == (collect_mod._MAX_INFLIGHT, 16 // collect_mod._MAX_INFLIGHT)
    assert collect_mod._concurrency(2, 174 * mb, 512 * mb) == (2, 1)  # two batches of outputs fit
    assert collect_mod._concurrency(2, 300 * mb, 512 * mb) == (1, 2)  # one fills the budget


@pytest.mark.parametrize("method", ("minmax", "percentile"))
def test_runs_in_flight_give_identical_stats(monkeypatch, cls_model, cls_feeds, cls_all_tensors, method):
    """Runs in flight change only when ORT computes a feed, not what the observers see:
    they process the results in feed order, in one thread. Also through the switch of a
    NaN-carrying tensor from the reductions to fetched values (runs in flight on the old
    session are re-run)."""
    bad = cls_feeds[1]["x"].copy()
    bad[0, 1, 20, 30] = np.nan
    feeds = [*cls_feeds, {"x": bad}, *cls_feeds]
    names = ["x", *cls_all_tensors[:30]]
    got = {}
    for inflight in (1, 3):
        monkeypatch.setattr(collect_mod, "_concurrency", lambda threads, gb, budget, k=inflight: (k, 1))
        got[inflight] = collect_stats(cls_model, feeds, names, method=method, mean_for=names[1:4], progress=False)
    assert any(not s.finite for s in got[1].values())
    for name in names:
        a, b = got[1][name], got[3][name]
        assert (a.min, a.max, a.count, a.nonfinite_count, a.observed_min, a.observed_max) == (
            b.min, b.max, b.count, b.nonfinite_count, b.observed_min, b.observed_max), name
        if a.mean_per_channel is not None:
            assert np.array_equal(a.mean_per_channel, b.mean_per_channel)


def test_minmax_through_the_base_equals_an_optimised_session(monkeypatch, cls_model, cls_feeds, cls_all_tensors):
    """Reductions-only sessions are cut from the saved, ORT-optimised base and run with
    optimizations off: bit for bit what a session built with optimizations on computes."""
    data = load_calibration_data(cls_feeds, cls_model)
    via_base = collect_stats(cls_model, data, cls_all_tensors, progress=False)
    monkeypatch.setattr(collect_mod, "_optimized_base", lambda *a: None)
    direct = collect_stats(cls_model, data, cls_all_tensors, progress=False)
    for name in cls_all_tensors:
        a, b = via_base[name], direct[name]
        assert (a.min, a.max, a.count, a.finite) == (b.min, b.max, b.count, b.finite), name


def test_image_preprocessing_for_data_that_is_not_images_is_refused(capsys, tiny_model_path, tmp_path):
    """--image-size with .npz (or random) calibration used to be ignored without a word."""
    from onnxopt.cli import main

    def _run_cli(capsys, *args):
        code = main([str(a) for a in args])
        return code, capsys.readouterr().err

    npz = tmp_path / "calib.npz"
    np.savez(npz, x=np.ones((4, 4), np.float32))
    out = tmp_path / "q.onnx"
    for calib in (npz, "random"):
        code, err = _run_cli(capsys, "quantize", tiny_model_path, "-o", out, "--calib", calib, "--shape", "x:1x4",
                         "--image-size", "8x8")
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, err
        assert "image preprocessing (--image-size/--image-spec) is for image calibration data" in lines[0]
        assert not out.exists()


def test_a_nan_in_a_calibration_sample_is_refused_by_name(tmp_path):
    """One NaN pixel made quantize's ranges unusable ('nothing to quantize') and prune's
    refit weights NaN (written, exit 0). Now the sample is named; -inf (masks) stays allowed."""
    from onnxopt.pruning import prune
    from onnxopt.quantization import quantize
    from tests.test_pruning import _block_net

    import onnx_ir as ir

    model = ir.from_proto(_block_net())
    x = model.graph.inputs[0]
    shape = [d if isinstance(d, int) else 1 for d in x.shape]
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        arr = rng.standard_normal(shape).astype(np.float32)
        if i == 3:
            arr.flat[5] = np.nan
        np.savez(folder / f"s{i}.npz", **{x.name: arr})
    for run in (lambda: prune(model, ratio=0.5, calib=folder, progress=False),
                lambda: quantize(model, folder, progress=False)):
        with pytest.raises(OnnxoptError, match=r"s3\.npz: input '.*' holds 1 NaN value\(s\)"):
            run()


def test_prune_never_writes_a_non_finite_refit(tmp_path):
    """+inf is a legal input value (masks), but a least-squares fit through it is not finite:
    the fit leaves out the sampled rows holding NaN/inf (it used to skip the layer, or write
    NaN weights before that)."""
    import onnx_ir as ir

    from onnxopt.pruning import prune
    from tests.test_pruning import _block_net

    model = ir.from_proto(_block_net())
    x = model.graph.inputs[0]
    shape = [d if isinstance(d, int) else 1 for d in x.shape]
    rng = np.random.default_rng(0)
    feeds = [{x.name: rng.standard_normal(shape).astype(np.float32)} for _ in range(8)]
    feeds[2][x.name].flat[7] = np.inf
    result = prune(model, ratio=0.5, calib=feeds, progress=False)
    for value in result.model.graph.initializers.values():
        arr = value.const_value.numpy()
        assert arr.dtype.kind != "f" or np.all(np.isfinite(arr)), value.name
    assert not any("no finite" in why for why in result.report["refit_skipped"].values())
    assert result.report["refit_layers"]


def test_quantize_names_the_sample_whose_inf_pixel_made_every_range_unusable():
    import onnx_ir as ir

    from onnxopt.quantization import quantize
    from tests.test_pruning import _block_net

    model = ir.from_proto(_block_net())
    x = model.graph.inputs[0]
    rng = np.random.default_rng(0)
    feeds = [{x.name: rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(6)]
    feeds[2][x.name].flat[7] = np.inf
    with pytest.raises(OnnxoptError, match=r"nothing to quantize: .*feed 2: input 'x' holds inf values"):
        quantize(model, feeds, progress=False)


def test_calibration_data_the_model_cannot_run_on_is_one_clear_error():
    """PP-OCR det at 300x300 (its FPN needs multiples of 32) failed deep inside: an internal
    error in prune, "the opset 13 upgrade changes this model's outputs" in quantize."""
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from onnxopt.pruning import prune
    from onnxopt.quantization import quantize

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Resize", ["p", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Add", ["x", "up"], ["s"]),  # odd sizes: 15 against 14
        helper.make_node("Conv", ["s", "w", "b"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "fpn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, "h", "w"])],
        [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
         numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    feeds = [{"x": rng.standard_normal((1, 3, 15, 15)).astype(np.float32)} for _ in range(4)]
    for run in (lambda: quantize(model, feeds, progress=False), lambda: prune(model, ratio=0.5, calib=feeds, progress=False)):
        with pytest.raises(OnnxoptError, match=r"the model does not run on the first calibration sample \(x 1x3x15x15\)"):
            run()
