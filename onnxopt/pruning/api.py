"""Structured channel pruning: remove a fraction of the channels of every prunable channel
space (:mod:`.groups`), so every runtime runs a smaller model, not a sparse one.

Pipeline (:func:`prune`):

1. The float ``default`` optimize pipeline (BatchNorm and per-channel affines folded into
   the convs), so the channel structure is what the convs hold.
2. Channel spaces (:func:`.groups.find_channel_spaces`). A space is pruned when nothing pins
   it, some Conv/Gemm/MatMul produces it and some Conv/Gemm/MatMul reads it; ``exclude`` pins the spaces
   a named node (or op type) produces.
3. How many channels stay: ``ceil(C * (1 - ratio))`` rounded up to a multiple of
   ``multiple`` (8: SIMD-friendly widths; 1: exact), never all of them.
4. Which: each channel's contribution to the layers that read it, ``||W_read[:, c]|| *
   rms(x_c)`` (the reader's weight column times the channel's root-mean-square activation on
   the calibration data), normalised per reader and summed over the readers. Without
   calibration data the activation term is the producers' filter norm ``||W_prod[c]||``
   instead (data-free magnitude ranking, Li et al. 2017).
5. Every tensor that holds the channels is cut: producers' filters and biases, depthwise
   filters (and their ``group``), per-channel constants, readers' input columns.
6. With calibration data, each reader whose input lost channels is refit by least squares
   (He et al. 2017, "Channel Pruning for Accelerating Very Deep Neural Networks"), in graph
   order, on the input the pruned model gives it, against the original layer's output on
   the original input at the same sampled im2col positions (rows for a MatMul/Gemm):
   ``[W', db] = argmin E[(W' x' + db - W x)^2]``, solved from second moments (ridge 1e-5 of
   the mean diagonal), where there are at least 4 sampled rows per unknown (not for a conv
   after a global pool with few samples). Rows of a ``[batch, sequence, features]`` input
   are the real tokens of the model's integer mask input when it has one. No retraining:
   good for moderate ratios.
7. The ONNX checker, an ONNX Runtime session, and the outputs against the original model on
   evaluation feeds (cosine and max abs per output), all in the report.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import time
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.atomic import write_json_atomic
from onnxopt.errors import OnnxoptError
from onnxopt.pruning.groups import ChannelSpace, Use, _const, find_channel_spaces
from onnxopt.quantization.qdq import _initializer, _unique

__all__ = ["PruneResult", "prune", "prune_file"]

_MAX_LS_FEATURES = 4608  # a reader's im2col width (C * kh * kw) above which it is only cut
_RIDGE = 1e-5
_MIN_SAMPLES_PER_FEATURE = 4  # least-squares rows per unknown, else no refit
# An output whose values are all below this, in the original and the pruned model alike,
# has no direction to compare: its cosine is noise (a detector's map on an input with no
# text is ~1e-4 everywhere), so it is reported as not meaningful and the max abs error,
# below this too, says all there is.
_NEAR_ZERO = 1e-3


@dataclasses.dataclass
class PruneResult:
    model: ir.Model
    report: dict


def _say(progress, msg: str) -> None:
    if progress:
        import sys

        print(f"onnxopt prune: {msg}", file=sys.stderr, flush=True)


def _data_label(data) -> str:
    """What the calibration samples are, for progress and the report: random ones are a smoke test."""
    return "random smoke-test samples" if getattr(data, "is_random", False) else "calibration samples"


def _keep_count(channels: int, ratio: float, multiple: int) -> int:
    keep = math.ceil(channels * (1.0 - ratio))
    if multiple > 1:
        keep = math.ceil(keep / multiple) * multiple
    return max(1, min(channels, keep))


def _segment_offset(use: Use, space: ChannelSpace) -> list[tuple[int, int]]:
    return [(s.offset, s.size) for s in use.layout if s.space.root() is space]


def _column_norms(arr: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(np.asarray(arr, np.float64), axis, 0)
    return np.sqrt((moved.reshape(moved.shape[0], -1) ** 2).sum(axis=1))


def _prunable(space: ChannelSpace) -> str | None:
    if space.pinned:
        return space.pinned[0]
    if not space.producers:
        return "no conv produces it"
    if not space.consumers:
        return "no conv or matmul reads it"
    return None


def _channel_scores(space: ChannelSpace, rms: Mapping[str, np.ndarray] | None) -> np.ndarray:
    """Importance of each of ``space``'s channels (see the module docstring, step 4)."""
    c = space.channels
    score = np.zeros(c)
    prod = np.zeros(c)
    for use in space.uses:
        if use.kind == "produce" and use.index == 1:
            n = _column_norms(_const(use.node.inputs[1]), use.axis)
            prod += n / max(n.mean(), 1e-30)
    for use in space.uses:
        if use.kind != "consume":
            continue
        w = _const(use.node.inputs[use.index])
        norms = _column_norms(w, use.axis)
        x_name = use.node.inputs[0].name
        for off, size in _segment_offset(use, space):
            col = norms[off:off + size]
            act = rms[x_name][off:off + size] if rms is not None and x_name in rms else None
            contrib = col * (prod if act is None else np.where(np.isfinite(act), act, prod))
            score += contrib / max(contrib.mean(), 1e-30)
    return score


def _rows(a: np.ndarray, axis: int, mask: np.ndarray | None) -> np.ndarray:
    """``a`` as [channels, samples] along ``axis``; of a ``[batch, sequence, features]``
    tensor only the real tokens of ``mask`` (padding rows would dominate the statistics)."""
    a = np.asarray(a, np.float64)
    if mask is not None and a.ndim == 3 and mask.shape == a.shape[:2] and axis in (2, -1):
        return a[mask != 0].T
    a = np.moveaxis(a, axis, 0)
    return a.reshape(a.shape[0], -1)


def _channel_rms(model: ir.Model, feeds, tensors: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Per-channel root-mean-square of ``tensors`` ({name: channel axis}) over ``feeds``, one pass."""
    from onnxopt.quantization.qdq import with_outputs
    from onnxopt.verify import make_session

    sess = make_session(with_outputs(model, sorted(tensors)))
    sq: dict[str, np.ndarray] = {}
    cnt: dict[str, np.ndarray] = {}
    try:
        for feed in feeds:
            out = sess.run(dict(feed))
            mask = _token_mask(feed)
            for t, axis in tensors.items():
                a = _rows(out[t], axis, mask)
                # Only finite values count: one inf pixel in one sample (inf - inf = NaN
                # through a conv) would otherwise make every score NaN and the ranking arbitrary.
                finite = np.isfinite(a)
                sq[t] = sq.get(t, 0) + (np.where(finite, a, 0.0) ** 2).sum(axis=1)
                cnt[t] = cnt.get(t, 0) + finite.sum(axis=1)
    finally:
        sess.close()
    # A channel never finite gets NaN: _channel_scores ranks it on its weights alone.
    return {t: np.where(cnt[t] > 0, np.sqrt(sq[t] / np.maximum(cnt[t], 1)), np.nan) for t in sq}


def _features(node: ir.Node, x: np.ndarray, geo, max_positions: int, seed: int,
              mask: np.ndarray | None = None) -> np.ndarray:
    """The layer's input features, [D, P]: im2col patches of a Conv at ``max_positions``
    positions drawn with ``seed`` (the same positions for the same spatial size), rows of a
    Gemm/MatMul input (of a ``[batch, sequence, features]`` input: the rows ``mask`` keeps)."""
    from onnxopt.quantization.rounding import im2col_sample

    if node.op_type == "Conv":
        cols = im2col_sample(x, geo, max_positions, np.random.default_rng(seed))  # C K P
        return cols.reshape(-1, cols.shape[-1])
    return _rows(x, -1, mask)


def _token_mask(feed: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """A transformer's ``[batch, sequence]`` integer attention mask among the inputs, if any."""
    for name, arr in feed.items():
        a = np.asarray(arr)
        if "mask" in name.lower() and a.ndim == 2 and a.dtype.kind in "iub":
            return a
    return None


def _gemm_trans_b(node: ir.Node) -> bool:
    return node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))


def _add_output_shift(model: ir.Model, node: ir.Node, shift: np.ndarray, taken: set[str]) -> None:
    """``MatMul`` output += ``shift`` (per output feature): into the constant of the bias Add
    that is its only reader, else by a new Add."""
    out = node.outputs[0]
    users = list(out.uses())
    if len(users) == 1 and not out.is_graph_output():
        add, idx = users[0]
        other = add.inputs[1 - idx] if add.op_type == "Add" and len(add.inputs) == 2 else None
        c = _const(other)
        if c is not None and c.ndim >= 1 and c.shape[-1] == shift.shape[0] and c.size == shift.shape[0]:
            _set_initializer(model, add, 1 - idx, (c + shift.reshape(c.shape)).astype(c.dtype), taken)
            return
    name = _unique(f"{out.name}_prune_shift", taken)
    shifted = ir.Value(name=name, type=out.type, shape=out.shape)
    const = _initializer(model.graph, _unique(f"{name}_value", taken), shift)
    was_output = out.is_graph_output()
    out.replace_all_uses_with(shifted, replace_graph_outputs=True)
    model.graph.insert_after(node, ir.node("Add", [out, const], outputs=[shifted], name=f"{node.name}_prune_shift"))
    if was_output:  # the graph output keeps its name
        shifted.name, out.name = out.name, _unique(f"{name}_unshifted", taken)


def _why(reason: str) -> str:
    """The gist of a refit skip reason, for the one-line progress summary."""
    return "too few calibration rows to fit them" if "unknowns" in reason else "no finite fit"


def _refit_sequential(original: ir.Model, model: ir.Model, nodes: Sequence[ir.Node], targets, out_index,
                      feeds, max_positions: int, taken: set[str], progress) -> tuple[list[str], dict[str, str]]:
    """Refit each of ``nodes`` (in graph order) by least squares on the input the pruned
    ``model`` gives it, against the original layer's output on the original input at the
    same im2col positions: ``min E[(W' x' + db - W x)^2]``. Later layers see the earlier
    refits, so the error does not pile up through the network.

    Returns the refit layers and ``{layer: why}`` for those that kept their cut weights."""
    from onnxopt.quantization.qdq import with_outputs
    from onnxopt.quantization.rounding import _conv_geometry
    from onnxopt.verify import make_session

    feeds = list(feeds)
    # The original inputs of every layer come from one session (kept for all steps: holding
    # every layer's input of every feed would take GBs on a detector at 640x640).
    orig_sess = make_session(with_outputs(original, sorted({n.inputs[0].name for n in nodes})))
    done: list[str] = []
    skipped: dict[str, str] = {}
    try:
        for step, node in enumerate(nodes):
            if step and step % 10 == 0:
                _say(progress, f"  refit {step}/{len(nodes)} layers"
                     + (f" ({len(skipped)} of them kept their cut weights)" if skipped else ""))
            w_full = targets[node.name]
            x_name = node.inputs[0].name
            conv = node.op_type == "Conv"
            geo = _conv_geometry(node, w_full.shape) if conv else None
            sess = make_session(with_outputs(model, [x_name]))
            hp = cpo = mp = mo = 0.0
            count = 0
            try:
                for i, feed in enumerate(feeds):
                    mask = _token_mask(feed)
                    fo = _features(node, orig_sess.run(dict(feed))[x_name], geo, max_positions, 1000 * step + i, mask)
                    fp = _features(node, sess.run(dict(feed))[x_name], geo, max_positions, 1000 * step + i, mask)
                    finite = np.isfinite(fo).all(axis=0) & np.isfinite(fp).all(axis=0)
                    if not finite.all():  # a NaN/inf row would make the whole fit non-finite
                        fo, fp = fo[:, finite], fp[:, finite]
                    hp = hp + fp @ fp.T
                    cpo = cpo + fp @ fo.T
                    mp = mp + fp.sum(axis=1)
                    mo = mo + fo.sum(axis=1)
                    count += fp.shape[1]
            finally:
                sess.close()
            # The target: the original weight as [O, D], its output rows cut as in the model.
            if conv:
                w2 = w_full.reshape(w_full.shape[0], -1)
            else:
                w2 = w_full if _gemm_trans_b(node) else w_full.T
            w2 = np.asarray(w2, np.float64)
            rows = out_index.get(node.name)
            if rows is not None:
                w2 = w2[rows]
            d = hp.shape[0]
            if count < _MIN_SAMPLES_PER_FEATURE * (d + 1):
                # Too few samples to fit d weights (a conv after a global pool, or small inputs): keep the cut.
                skipped[node.name] = f"{count} sampled rows for {d + 1} unknowns (needs {_MIN_SAMPLES_PER_FEATURE} per unknown)"
                continue
            hp, cpo, mp, mo = hp / count, cpo / count, mp / count, mo / count
            # Unknowns [W'; db]: the input features plus a constant 1 (the bias shift).
            a = np.zeros((d + 1, d + 1))
            a[:d, :d] = hp
            a[:d, d] = a[d, :d] = mp
            a[d, d] = 1.0
            rhs = np.vstack([cpo @ w2.T, mo @ w2.T])
            a += _RIDGE * max(float(np.mean(np.diag(hp))), 1e-12) * np.eye(a.shape[0])
            try:
                sol = np.linalg.solve(a, rhs)
            except np.linalg.LinAlgError:
                sol = None
            if sol is None or not np.all(np.isfinite(sol)):
                # Infinite activations (or a singular system) give no usable fit: never write it.
                skipped[node.name] = "no finite least-squares solution (non-finite activations)"
                continue
            cur = _const(node.inputs[1])
            w_new = sol[:d].T  # O' x D'
            if conv:
                w_new = w_new.reshape(cur.shape)
            elif not _gemm_trans_b(node):
                w_new = w_new.T
            _set_initializer(model, node, 1, w_new.astype(cur.dtype), taken)
            db = sol[d]
            if node.op_type == "MatMul":  # no bias input: the shift goes into the Add after it
                _add_output_shift(model, node, db.astype(cur.dtype), taken)
            else:
                has_c = len(node.inputs) > 2 and node.inputs[2] is not None
                if node.op_type == "Gemm":  # Y = alpha A B + beta C: the shift goes in as alpha db / beta
                    alpha = node.attributes.get_float("alpha", 1.0)
                    beta = node.attributes.get_float("beta", 1.0) if has_c else 0.0
                    if beta == 0.0:
                        node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
                        beta, has_c = 1.0, False
                    db = db * alpha / beta
                b_cur = _const(node.inputs[2]) if has_c else None
                base = np.zeros(len(db)) if b_cur is None else np.broadcast_to(np.asarray(b_cur, np.float64).reshape(-1), (len(db),))
                _set_initializer(model, node, 2, (base + db).astype(cur.dtype), taken)
            done.append(node.name)
        _say(progress, f"  refit {len(nodes)}/{len(nodes)} layers: {len(done)} refit"
             + (f", {len(skipped)} kept their cut weights ({'; '.join(sorted(set(_why(w) for w in skipped.values())))})"
                if skipped else ""))
    finally:
        orig_sess.close()
    return done, skipped


def _taken_names(model: ir.Model) -> set[str]:
    names = set(model.graph.initializers)
    for n in model.graph:
        names.update(v.name for v in n.outputs if v.name)
    names.update(v.name for v in model.graph.inputs)
    return names


def _set_initializer(model: ir.Model, node: ir.Node, index: int, array: np.ndarray, taken: set[str]) -> None:
    old = node.inputs[index] if index < len(node.inputs) else None
    base = (old.name if old is not None and old.name else f"{node.name}_in{index}") + "_pruned"
    value = _initializer(model.graph, _unique(base, taken), np.ascontiguousarray(array))
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)


def _index_list(use: Use, kept: Mapping[int, np.ndarray]) -> np.ndarray:
    parts = []
    for seg in use.layout:
        k = kept.get(id(seg.space.root()))
        parts.append(seg.offset + (k if k is not None else np.arange(seg.size)))
    return np.concatenate(parts)


def _prune_at(base: ir.Model, ratio: float, multiple: int, excluded: set[str], data, reconstruct: bool,
              max_positions: int, rms_cache: dict[str, np.ndarray], progress) -> tuple[ir.Model, dict]:
    """``base`` (the optimized float model, not modified) with ``ratio`` of every free space's
    channels removed (steps 2-6 of the module docstring)."""
    from onnxopt.verify import check_model

    model = base.clone()
    spaces = find_channel_spaces(model)
    for s in spaces:
        for p in s.producers:
            if p.name in excluded or p.op_type in excluded:
                s.pin(f"--exclude {p.name if p.name in excluded else p.op_type}")
        for u in s.uses:
            # A weight several layers share (tied layers, a TorchScript export of cloned
            # layers) would be cut into a copy per layer: the model grew (116% kept, measured).
            w = u.node.inputs[u.index] if u.index < len(u.node.inputs) else None
            if u.kind != "shape" and u.index == 1 and w is not None and len({id(n) for n, _ in w.uses()}) > 1:
                s.pin(f"weight {w.name} is shared by several layers")
                break
    chosen = [s for s in spaces if _prunable(s) is None and _keep_count(s.channels, ratio, multiple) < s.channels]
    if not chosen:
        reasons = sorted({_prunable(s) or "rounding keeps every channel" for s in spaces})[:3]
        if not reasons:
            convs = sum(1 for n in model.graph if n.op_type in ("Conv", "ConvTranspose"))
            reasons = [f"none of its {convs} convs has a constant weight (a weight that is a graph input "
                       "can be fed at run time)" if convs else "no conv, Gemm or MatMul layer with a constant weight"]
        raise OnnxoptError(f"nothing to prune: no channel space can lose channels ({'; '.join(reasons)})")

    readers = list({id(u.node): u.node for s in chosen for u in s.uses if u.kind == "consume"}.values())
    rms = None
    ls_nodes: list[ir.Node] = []
    if data is not None:
        if reconstruct:
            from onnxopt.quantization.rounding import _conv_geometry

            for node in readers:
                w = _const(node.inputs[1])
                if node.op_type == "Conv":
                    geo = _conv_geometry(node, w.shape)
                    if geo is not None and geo["group"] == 1 and w[0].size <= _MAX_LS_FEATURES:
                        ls_nodes.append(node)
                elif node.op_type in ("Gemm", "MatMul") and w.ndim == 2 and max(w.shape) <= _MAX_LS_FEATURES:
                    ls_nodes.append(node)
        _say(progress, f"activation statistics on {len(data)} {_data_label(data)}"
             + (f" ({len(ls_nodes)} layers to refit)" if ls_nodes else ""))
        wanted = {u.node.inputs[0].name: u.act_axis for s in chosen for u in s.uses if u.kind == "consume"}
        missing = {k: v for k, v in wanted.items() if k not in rms_cache}
        if missing:
            rms_cache.update(_channel_rms(model, data, missing))
        rms = {k: rms_cache[k] for k in wanted}

    kept: dict[int, np.ndarray] = {}
    space_rows = []
    for s in spaces:
        why = _prunable(s)
        row = {"channels": s.channels, "producers": [p.name for p in s.producers][:4]}
        if s in chosen:
            k = _keep_count(s.channels, ratio, multiple)
            score = _channel_scores(s, rms)
            kept[id(s)] = np.sort(np.argsort(-score, kind="stable")[:k])
            row["kept"] = k
        else:
            row["kept"] = s.channels
            row["why_kept"] = why or "rounding keeps every channel"
        if s.producers:
            space_rows.append(row)

    # The original weights the refit aims at, before anything is cut (``base`` stays uncut).
    targets = {node.name: np.asarray(_const(node.inputs[1])) for node in ls_nodes}
    out_index: dict[str, np.ndarray] = {}

    # Cut every use: (node, input index) -> the array as cut so far.
    arrays: dict[tuple[int, int], tuple[ir.Node, int, np.ndarray]] = {}
    uses = list({id(u): u for s in chosen for u in s.uses}.values())
    for use in uses:
        key = (id(use.node), use.index)
        arr = arrays[key][2] if key in arrays else np.asarray(_const(use.node.inputs[use.index]))
        idx = _index_list(use, kept)
        if use.kind == "shape":  # a Reshape's [-1, C]: the new channel count, not a slice
            arrays[key] = (use.node, use.index, np.array([arr[0], len(idx)], dtype=arr.dtype))
            continue
        arrays[key] = (use.node, use.index, np.take(arr, idx, axis=use.axis))
        if use.kind == "produce" and use.index == 1:
            out_index[use.node.name] = idx
    taken = _taken_names(model)
    for node, index, arr in arrays.values():
        _set_initializer(model, node, index, arr, taken)
    for use in uses:
        if use.kind == "depthwise" and use.index == 1:
            use.node.attributes["group"] = ir.AttrInt64("group", int(arrays[(id(use.node), 1)][2].shape[0]))
    for s in chosen:
        for v in s.values:
            if not v.is_graph_output():
                v.shape = None
    refit, refit_skipped = [], {}
    if ls_nodes:
        _say(progress, f"least-squares refit of {len(ls_nodes)} layers on {len(data)} {_data_label(data)}")
        refit, refit_skipped = _refit_sequential(base, model, ls_nodes, targets, out_index, data, max_positions, taken,
                                                 progress)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    check_model(model)

    info = {"chosen": chosen, "kept": kept, "space_rows": space_rows, "refit": refit, "refit_skipped": refit_skipped,
            "refit_candidates": len(ls_nodes), "rms": rms}
    return model, info


def _ranking_label(activation_aware: bool, data) -> str:
    if not activation_aware:
        return "weight magnitude (no calibration data)"
    return f"activation-aware ({'random data: a smoke test' if getattr(data, 'is_random', False) else 'calibration data'})"


def _near_zero(arr) -> bool:
    """Every finite value below ``_NEAR_ZERO`` (an all-NaN output, on a sample with an inf
    pixel, counts too: it has no cosine worth reporting either)."""
    a = np.asarray(arr)
    if a.dtype.kind not in "fiub":
        return False
    a = a[np.isfinite(a)] if a.dtype.kind == "f" else a
    return a.size == 0 or float(np.max(np.abs(a))) < _NEAR_ZERO


def _output_agreement(refs: Sequence[Mapping[str, np.ndarray]], news: Sequence[Mapping[str, np.ndarray]]) -> dict[str, dict]:
    """Per output: the smallest cosine and the largest abs error over the evaluation feeds.

    A feed on which both models' output is ~0 (every value below ``_NEAR_ZERO``) has no
    cosine worth reporting: it is left out of the minimum, ``cosine_min`` is None when every
    feed is such, and ``cosine_feeds`` says over how many of the ``feeds`` it was taken.
    """
    from onnxopt.verify import compare_outputs

    diffs = [{d.name: d for d in compare_outputs(ref, new, rtol=0.0, atol=0.0)} for ref, new in zip(refs, news)]
    outputs = {}
    for name in diffs[0]:
        cosines = [d[name].cosine for d, ref, new in zip(diffs, refs, news)
                   if not (_near_zero(ref[name]) and name in new and _near_zero(new[name]))]
        outputs[name] = {"cosine_min": min(cosines) if cosines else None,
                         "cosine_feeds": len(cosines), "feeds": len(diffs),
                         "max_abs": max(d[name].max_abs for d in diffs)}
        # [batch, classes] scores: cosine of two 2-class softmaxes is >= 0.707 whatever they
        # say, so also the share of rows whose top class is unchanged.
        pairs = [(np.asarray(r[name]), np.asarray(n[name])) for r, n in zip(refs, news) if name in n]
        if pairs and all(a.ndim == 2 and a.shape == b.shape and a.shape[1] >= 2 for a, b in pairs):
            same = sum(int((a.argmax(1) == b.argmax(1)).sum()) for a, b in pairs)
            outputs[name]["top1_agreement"] = same / sum(a.shape[0] for a, _ in pairs)
    return outputs


def prune(
    model_or_path,
    *,
    ratio: float,
    calib=None,
    samples: int | None = None,
    image_spec=None,
    shapes=None,
    exclude: Sequence[str] = (),
    multiple: int = 8,
    reconstruct: bool = True,
    max_positions: int = 2048,
    max_drop: float | None = None,
    report: str | os.PathLike | None = None,
    progress: bool = True,
) -> PruneResult:
    """Remove ``ratio`` of the channels of every prunable channel space; see the module docstring.

    ``calib``: calibration data (anything :func:`onnxopt.calibration.load_calibration_data`
    takes) for the activation-aware ranking and the least-squares refit; without it the
    ranking is by weight magnitude and nothing is refit. ``multiple``: kept channel counts are
    rounded up to a multiple of it. ``exclude``: node names or op types whose output channels
    stay. ``max_drop``: instead of ``ratio`` itself, the largest ratio on a grid of 1/16 up
    to ``ratio`` whose outputs stay within ``1 - cosine <= max_drop`` of the original's
    (pooled per output over held-out calibration samples: the last fifth, at most 16, which
    the ranking and refit do not see); needs ``calib``. ``report``: also write the report as JSON.
    """
    from onnxopt.graph import parameter_stats
    from onnxopt.model_io import check_side_output
    from onnxopt.optimize import optimize, sample_feeds
    from onnxopt.quantization import analysis
    from onnxopt.quantization.api import _cosine_drop, _Slice
    from onnxopt.quantization.sensitivity import run_all

    from onnxopt import arguments as arg

    t0 = time.perf_counter()
    ratio = arg.number("ratio", ratio)
    multiple = arg.number("multiple", multiple, integer=True)
    max_positions = arg.number("max_positions", max_positions, low=1, integer=True)
    samples = arg.number("samples", samples, low=1, integer=True, optional=True)
    max_drop = arg.number("max_drop", max_drop, optional=True)
    exclude = arg.names("exclude", exclude)
    arg.flag("reconstruct", reconstruct)
    arg.flag("progress", progress)
    if calib is None and (samples is not None or image_spec is not None):
        raise OnnxoptError("samples/image_spec need calib: without calibration data nothing reads them")
    if not (0.0 < ratio < 1.0):
        raise OnnxoptError(f"--ratio {ratio}: must be between 0 and 1 (the fraction of channels to remove)")
    if multiple < 1:
        raise OnnxoptError(f"--multiple {multiple}: must be >= 1")
    if max_drop is not None and not (0 < max_drop < 1):
        raise OnnxoptError(f"--max-drop {max_drop}: must be between 0 and 1 (a drop in cosine similarity)")
    if max_drop is not None and calib is None:
        raise OnnxoptError("--max-drop needs --calib: the drop is measured on held-out calibration samples")
    if report is not None:
        check_side_output(report, "--report", inputs=[model_or_path] if isinstance(model_or_path, (str, os.PathLike)) else [])
    src = analysis.load_float_model(model_or_path, exclude, "prune")
    data = None
    if calib is not None:
        from onnxopt.calibration import load_calibration_data

        data = load_calibration_data(calib, src, samples=samples, image_spec=image_spec, shapes=shapes, reject_nan=True)
        if len(data) == 0:
            raise OnnxoptError("the calibration data holds no samples")
        from onnxopt.verify import check_runs_on

        check_runs_on(src, data.first(), "the first calibration sample")

    _say(progress, "float optimize pipeline")
    model = optimize(src, verify="final", shapes=shapes).model
    ir.passes.common.NameFixPass()(model)
    params_input = parameter_stats(src, constants=True)[0]  # the user's file (Constant-node weights too)
    params_before = parameter_stats(model)[0]  # after the float pipeline (BatchNorm folded)

    fit_data, held = data, []
    if max_drop is not None:
        n = len(data)
        h = min(16, max(1, n // 5))
        if n < 2:
            raise OnnxoptError("--max-drop needs at least 2 calibration samples (some are held out to measure the drop)")
        fit_data, held = _Slice(data, 0, n - h), [f for i, f in enumerate(data) if i >= n - h]
    rms_cache: dict[str, np.ndarray] = {}
    excluded = set(exclude)

    def attempt(r: float):
        return _prune_at(model, r, multiple, excluded, fit_data, reconstruct, max_positions, rms_cache, progress)

    search = None
    if max_drop is None:
        pruned, info = attempt(ratio)
    else:
        refs = run_all(src, held)
        grid = [k / 16 for k in range(1, 16) if k / 16 <= ratio + 1e-12] or [ratio]
        lo, hi, best, search = 0, len(grid) - 1, None, []
        while lo <= hi:  # the largest grid ratio whose drop is within max_drop (drops grow with the ratio)
            mid = (lo + hi) // 2
            _say(progress, f"--max-drop: trying ratio {grid[mid]:.4g}")
            try:
                cand, cinfo = attempt(grid[mid])
            except OnnxoptError as e:
                if not str(e).startswith("nothing to prune"):
                    raise
                search.append({"ratio": grid[mid], "drop": 0.0, "note": "nothing to prune"})
                lo = mid + 1
                continue
            drop = _cosine_drop(refs, run_all(cand, held))[0]
            search.append({"ratio": grid[mid], "drop": drop})
            if drop <= max_drop:
                best, lo = (grid[mid], cand, cinfo), mid + 1
            else:
                hi = mid - 1
        if best is None:
            smallest = min(search, key=lambda x: x["ratio"])
            raise OnnxoptError(f"--max-drop {max_drop}: even ratio {smallest['ratio']:.4g} drops the outputs by "
                               f"{smallest['drop']:.4g} (1 - cosine on {len(held)} held-out calibration samples)")
        ratio, pruned, info = best
    model = pruned

    if held:
        feeds, evaluated_on = held, f"{len(held)} held-out {_data_label(data)}"
    elif data is not None:
        feeds = [f for _, f in zip(range(8), data)]
        # The ranking and the refit were fitted on these: say so (on cls, 0.92 here against
        # 0.48 on held-out images); --max-drop holds samples out.
        evaluated_on = f"{len(feeds)} {_data_label(data)} the fit also used: optimistic, --max-drop holds some out"
    else:
        feeds = sample_feeds(src, shapes=shapes, count=2)
        evaluated_on = f"{len(feeds)} generated inputs"
    # One session per model (the held-out references are the search's, when it ran).
    refs_eval = refs if held else run_all(src, feeds)
    outputs = _output_agreement(refs_eval, run_all(model, feeds))
    params_after = parameter_stats(model)[0]
    rep = {
        "ratio": ratio,
        "multiple": multiple,
        "ranking": _ranking_label(info["rms"] is not None, data),
        "calibration": getattr(data, "description", None),
        "calibration_is_random": bool(getattr(data, "is_random", False)),
        "spaces_pruned": len(info["chosen"]),
        "spaces_kept": len([r for r in info["space_rows"] if "why_kept" in r]),
        "channels_before": sum(s.channels for s in info["chosen"]),
        "channels_after": sum(len(info["kept"][id(s)]) for s in info["chosen"]),
        "params_input": params_input,
        "params_before": params_before,
        "params_after": params_after,
        "refit_layers": info["refit"],
        "refit_candidates": info["refit_candidates"],
        "refit_skipped": info["refit_skipped"],
        "outputs_vs_original": outputs,
        "evaluated_on": evaluated_on,
        "spaces": info["space_rows"],
        "max_drop_search": search,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if report is not None:
        write_json_atomic(report, rep)
    return PruneResult(model, rep)


def prune_file(input_path, output_path, **kwargs) -> PruneResult:
    """Load, prune and atomically save; options as in :func:`prune`."""
    from onnxopt.model_io import check_output_path, check_side_output, save_model

    check_output_path(output_path, input_path)
    report = kwargs.pop("report", None)
    if report is not None:  # a report path naming the input or the output fails before any work
        check_side_output(report, "--report", inputs=[input_path], outputs=[output_path])
    result = prune(input_path, **kwargs)
    save_model(result.model, pathlib.Path(output_path))
    if report is not None:  # after the model: a failed save must not leave a report behind
        write_json_atomic(report, result.report)
    return result
