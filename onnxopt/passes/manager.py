"""The pass manager: runs a pipeline with statistics and the safety net.

Statistics, per pass: runs and wall time (all of them: runs discarded by a rollback, the
re-run without a culprit and the bisection's count too), rewrites (the pass's ``self.rewrites`` where it
sets one, otherwise the node delta of each run that reports "modified", at least one)
and node counts: ``nodes_removed`` is what the pass itself removed over all its runs;
``nodes_before``/``nodes_after`` are the counts around its first round plus every later
round in which it changed the model, summed, so ``nodes_before - nodes_after ==
nodes_removed`` (the real counts around it when it did all its work in one round).
A pass named twice in a pipeline gets a row of its own (``name#2``).

Safety net: the original model's outputs on the sample inputs are the reference.
- ``verify="final"`` (default): the pipeline runs, then the result is checked
  (ONNX checker, ORT loads it, outputs within tolerance). If it fails, the culprit
  is found by bisection over pipeline prefixes from the pristine original, removed,
  reported by name, and the pipeline runs again without it.
- ``verify="each"`` (``--verify``): the model is checked after every pass that changed
  it (reported "modified" or rewrites, or changed the node count); a pass that breaks it
  is rolled back to the snapshot taken just before it. The result is then checked as in
  "final", since a pass may change the model without reporting it.
- ``verify="off"``: no numeric checks (the structural check still runs at save).
A pass that raises is rolled back and reported in every mode. Without a verifier only
``verify="off"`` is accepted: :func:`onnxopt.optimize` builds one from sample inputs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence

import onnx_ir as ir

from onnxopt.errors import OnnxoptError, VerificationError
from onnxopt.graph import count_nodes
from onnxopt.model_io import load_model
from onnxopt.passes.registry import PassInfo, find_registered, get_pass
from onnxopt.verify import Verifier, release_mappings

logger = logging.getLogger("onnxopt")

FIXED_POINT_CAP = 10
PIPELINE_ITERATION_CAP = 5


@dataclasses.dataclass
class PassStat:
    name: str
    runs: int = 0
    seconds: float = 0.0
    # Around its first round and every later round that changed the model, summed:
    # nodes_before - nodes_after == nodes_removed.
    nodes_before: int = 0
    nodes_after: int = 0
    rewrites: int = 0
    status: str = "ok"  # ok | rolled back: <reason> (it broke the model, or raised: "raised ...")
    nodes_removed: int = 0  # by this pass itself, summed over its runs (negative: it added nodes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PipelineResult:
    model: ir.Model
    stats: list[PassStat]
    rolled_back: dict[str, str]  # pass name -> reason
    nodes_before: int
    nodes_after: int
    seconds: float
    verified: bool
    warnings: list[str] = dataclasses.field(default_factory=list)
    rtol: float | None = None  # the safety net's tolerances (set by onnxopt.optimize)
    atol: float | None = None

    def as_dict(self) -> dict:
        return {
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "seconds": self.seconds,
            "verified": self.verified,
            "rtol": self.rtol,
            "atol": self.atol,
            "rolled_back": self.rolled_back,
            "warnings": self.warnings,
            "passes": [s.as_dict() for s in self.stats],
        }


PassSpec = str | ir.passes.PassBase | PassInfo


def resolve_passes(specs: Sequence[PassSpec]) -> list[PassInfo]:
    """Names, registry entries or pass instances/classes into PassInfo entries."""
    infos = []
    for spec in specs:
        if isinstance(spec, PassInfo):
            infos.append(spec)
        elif isinstance(spec, str):
            infos.append(get_pass(spec))
        elif isinstance(spec, ir.passes.PassBase):
            known = find_registered(type(spec))
            if known is not None:  # the name the CLI and `onnxopt passes` show for it
                infos.append(dataclasses.replace(known, factory=lambda s=spec: s))
            else:
                infos.append(PassInfo(type(spec).__name__, (type(spec).__doc__ or "").strip().split("\n")[0], lambda s=spec: s, source="user"))
        elif isinstance(spec, type) and issubclass(spec, ir.passes.PassBase):
            infos.append(
                find_registered(spec) or PassInfo(spec.__name__, (spec.__doc__ or "").strip().split("\n")[0], spec, source="user")
            )
        else:
            raise OnnxoptError(f"not a pass: {spec!r}")
    return infos


def _unique_names(infos: list[PassInfo]) -> list[PassInfo]:
    """Repeats of a name become ``name#2``, ``name#3``: stats and rollbacks are keyed by name."""
    used = {i.name for i in infos}
    seen: set[str] = set()
    out = []
    for info in infos:
        if info.name in seen:
            n = 2
            while f"{info.name}#{n}" in used:
                n += 1
            used.add(f"{info.name}#{n}")
            info = dataclasses.replace(info, name=f"{info.name}#{n}")
        seen.add(info.name)
        out.append(info)
    return out


def _clone(model: ir.Model) -> ir.Model:
    """An independent copy of the graph structure that shares tensor data.

    Cheap even for models over 2 GB (no tensor is read or copied). Passes replace tensors
    (``value.const_value = new``) rather than writing into them, so the pristine copy
    stays intact.
    """
    clone = model.clone()
    if "onnxopt.source_path" in model.meta:
        clone.meta["onnxopt.source_path"] = model.meta["onnxopt.source_path"]
    return clone


def _tensors(model: ir.Model):
    """Every constant tensor: initializers and Constant/attribute tensors, subgraphs too."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value
        for node in graph:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                    yield attr.value
                elif attr.type == ir.AttributeType.TENSORS:
                    yield from (t for t in attr.value or () if t is not None)


def _freeze_tensors(model: ir.Model) -> list:
    """Make the caller's in-memory weight arrays read-only while passes run; returns them.

    The working copies share tensor data with the caller's model (see _clone): a pass
    that wrote into ``value.const_value.numpy()`` in place would change the caller's model
    and the pristine copy that rollbacks and the check start from. Read-only, such a write
    raises inside the pass, which is then rolled back like any pass that raises. Weights
    read from a file are mapped read-only already.
    """
    import numpy as np

    frozen = []
    for tensor in _tensors(model):
        raw = getattr(tensor, "raw", None)
        if isinstance(raw, np.ndarray) and raw.flags.writeable:
            raw.flags.writeable = False
            frozen.append(raw)
    return frozen


def _run_one(info: PassInfo, model: ir.Model, stat: PassStat) -> tuple[ir.Model, bool]:
    """Run one pass (to its fixed point if it asks), updating its statistics.

    Returns the model and whether the pass changed it: it reported "modified" or
    rewrites, or the node count moved (any of them, since passes under-report).
    """
    cap = FIXED_POINT_CAP if info.fixed_point else 1
    first = stat.runs == 0
    start_nodes = nodes = count_nodes(model)
    changed = False
    for i in range(cap):
        pass_ = info.factory()
        stat.runs += 1  # a run that raises counts too: its time was spent
        start = time.perf_counter()
        try:
            result = pass_(model)
        finally:
            stat.seconds += time.perf_counter() - start
        model = result.model
        after = count_nodes(model)
        rewrites = getattr(pass_, "rewrites", None)
        if rewrites is None:
            rewrites = max(abs(nodes - after), 1) if result.modified else 0
        stat.rewrites += int(rewrites)
        changed = changed or result.modified or rewrites > 0 or after != nodes
        nodes = after
        if not result.modified:
            break
        if info.fixed_point and i == cap - 1:
            logger.warning("pass %s did not reach a fixed point in %d iterations", info.name, cap)
    if first or changed:
        # A round that changed nothing moved no node, so the sums still reconcile.
        stat.nodes_before += start_nodes
        stat.nodes_after += nodes
    stat.nodes_removed += start_nodes - nodes
    return model, changed


def _restore_counts(stat: PassStat, saved: PassStat) -> None:
    """Undo a rolled-back round's counts (its runs and time stay: they were spent)."""
    stat.nodes_before, stat.nodes_after = saved.nodes_before, saved.nodes_after
    stat.nodes_removed, stat.rewrites = saved.nodes_removed, saved.rewrites


class PassManager:
    """Runs a list of passes with statistics and the safety net."""

    def __init__(
        self,
        passes: Sequence[PassSpec],
        *,
        verifier: Verifier | None = None,
        verify: str = "final",
        iterate: bool = True,
        progress: Callable[[str], None] | None = None,
    ):
        if verify not in ("final", "each", "off"):
            raise OnnxoptError(f"verify must be 'final', 'each' or 'off', not {verify!r}")
        if verify != "off" and verifier is None:
            # Silently skipping the check would label an unchecked model verified.
            raise OnnxoptError(
                f"verify={verify!r} needs a verifier: pass verifier=Verifier.from_model(model, feeds) or "
                "verify='off', or use onnxopt.optimize(model, passes=[...]), which builds the verifier"
            )
        self.infos = _unique_names(resolve_passes(passes))
        self.verifier = verifier
        self.verify = verify
        self.iterate = iterate
        self.progress = progress or (lambda _msg: None)
        self._spent: dict[str, list] = {}  # pass name -> [runs, seconds] over every pipeline run

    def run(self, model: ir.Model | str | os.PathLike) -> PipelineResult:
        """Run the pipeline on a model (or the path of one); the caller's model is never modified."""
        if isinstance(model, (str, os.PathLike)):
            model = load_model(model)
        elif not isinstance(model, ir.Model):
            raise OnnxoptError(f"PassManager.run takes an onnx_ir.Model or a path, not {type(model).__name__}")
        frozen = _freeze_tensors(model)
        self._spent = {}
        try:
            return self._run(model)
        finally:
            for arr in frozen:
                arr.flags.writeable = True

    def _run(self, model: ir.Model) -> PipelineResult:
        start = time.perf_counter()
        nodes_before = count_nodes(model)
        # The pristine copy also serves rollbacks.
        pristine = _clone(model)
        # Left out of every re-run: passes that raised without a snapshot or that bisection
        # blamed. Rollbacks by "each" hold for one run only: they may have been blamed for a
        # change an earlier, unreported pass made, so a re-run without the culprit retries them.
        blamed: dict[str, str] = {}
        while True:
            work = _clone(pristine)
            warnings: list[str] = []  # a discarded run's warnings do not describe the result
            try:
                work, stats, failures = self._run_pipeline(work, blamed, warnings)
            except _Restart as restart:
                blamed.update(restart.failures)
                continue
            excluded = {**blamed, **failures}
            if self.verify == "off":
                break
            # In "each" mode too: a pass may change the model without reporting it.
            try:
                # The pristine copy shares its tensors with the caller's model; weights a
                # pass replaced stay mapped through it unless released before ORT maps them.
                release_mappings(pristine)
                self.progress("verifying against the original")
                self.verifier.verify(work)
                break
            except VerificationError as e:
                culprit = self._bisect(pristine, blamed)
                if culprit is None:
                    # The combination broke it but no prefix alone: give up on all passes.
                    excluded = {i.name: f"pipeline result failed verification: {e}" for i in self.infos}
                    work = _clone(pristine)
                    warnings = []
                    stats = [PassStat(i.name) for i in self.infos]
                    break
                blamed[culprit[0]] = culprit[1]
                logger.warning("pass %s broke the model (%s); rolled back", culprit[0], culprit[1])
        for stat in stats:
            if stat.name in excluded and stat.status == "ok":
                stat.status = f"rolled back: {excluded[stat.name]}"
            # Runs and time: all of them, including runs discarded by a rollback, a re-run
            # without a culprit and the bisection (a slow pass's row showed 2 runs, 4 s, of 42 s).
            stat.runs, stat.seconds = self._spent.get(stat.name, (0, 0.0))
        return PipelineResult(
            model=work,
            stats=stats,
            rolled_back=excluded,
            nodes_before=nodes_before,
            nodes_after=count_nodes(work),
            seconds=time.perf_counter() - start,
            verified=self.verify != "off",
            warnings=warnings,
        )

    def _run_pipeline(
        self, model: ir.Model, excluded: dict[str, str], warnings: list[str], limit: int | None = None
    ) -> tuple[ir.Model, list[PassStat], dict[str, str]]:
        """One pipeline run (iterated to a fixed point); returns model, stats, new failures."""
        infos = [i for i in self.infos[:limit] if i.name not in excluded]
        stats = {i.name: PassStat(i.name) for i in self.infos[:limit]}
        failures: dict[str, str] = {}
        rounds = PIPELINE_ITERATION_CAP if self.iterate else 1
        for round_ in range(rounds):
            changed = False
            for info in infos:
                if info.name in failures:
                    continue
                self.progress(info.name)
                stat = stats[info.name]
                # (run() sets the status of a failed pass, the same text in every mode)
                snapshot = (_clone(model), dataclasses.replace(stat)) if self.verify == "each" else None
                runs_before, seconds_before = stat.runs, stat.seconds
                try:
                    try:
                        model, pass_changed = _run_one(info, model, stat)
                    finally:  # every run is accounted, re-runs and bisection included
                        spent = self._spent.setdefault(info.name, [0, 0.0])
                        spent[0] += stat.runs - runs_before
                        spent[1] += stat.seconds - seconds_before
                except (Exception, SystemExit) as e:  # a crashing (or exiting) pass must not take the run down
                    reason = f"raised {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
                    failures[info.name] = reason
                    logger.warning("pass %s %s; rolled back", info.name, reason)
                    if snapshot is None:
                        # Without a snapshot the model may be half-rewritten: start over without it.
                        raise _Restart(failures) from None
                    model = snapshot[0]
                    _restore_counts(stat, snapshot[1])
                    continue
                if snapshot is not None and pass_changed:
                    try:
                        self.verifier.verify(model)
                    except VerificationError as e:
                        failures[info.name] = str(e)
                        logger.warning("pass %s broke the model (%s); rolled back", info.name, e)
                        model = snapshot[0]
                        _restore_counts(stat, snapshot[1])
                        continue
                changed = changed or pass_changed
            if not changed:
                break
            if round_ == rounds - 1 and rounds > 1:
                warnings.append(f"pipeline still changing the model after {rounds} rounds; stopped there")
        return model, list(stats.values()), failures

    def _bisect(self, pristine: ir.Model, excluded: dict[str, str]) -> tuple[str, str] | None:
        """Smallest pipeline prefix whose result fails verification; its last pass is the culprit."""
        candidates = [i for i in range(len(self.infos)) if self.infos[i].name not in excluded]
        if not candidates:
            # Nothing left to blame: the unmodified model itself fails the check
            # (a nondeterministic op such as RandomNormal, or a tolerance of 0 or less).
            return None
        lo, hi = 0, len(candidates)  # invariant: prefix of lo candidates passes, of hi fails
        reason = ""
        # The full pipeline just failed; re-check it so a flaky failure does not blame a pass.
        ok, reason_full = self._prefix_ok(pristine, excluded, candidates[-1] + 1 if candidates else 0)
        if ok:
            return None
        reason = reason_full
        while hi - lo > 1:
            mid = (lo + hi) // 2
            ok, why = self._prefix_ok(pristine, excluded, candidates[mid - 1] + 1)
            if ok:
                lo = mid
            else:
                hi, reason = mid, why
        return self.infos[candidates[hi - 1]].name, reason

    def _prefix_ok(self, pristine: ir.Model, excluded: dict[str, str], limit: int) -> tuple[bool, str]:
        work = _clone(pristine)
        try:
            work, _, failures = self._run_pipeline(work, excluded, [], limit=limit)
        except _Restart as restart:
            excluded.update(restart.failures)
            return self._prefix_ok(pristine, excluded, limit)
        try:
            self.verifier.verify(work)
            return True, ""
        except VerificationError as e:
            return False, str(e)


class _Restart(Exception):
    def __init__(self, failures: dict[str, str]):
        super().__init__("restart")
        self.failures = failures
