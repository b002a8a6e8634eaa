"""The one way a model is run over data: a model, a data source and a reducer in, one result out.

A *reducer* says which model outputs a pass fetches, turns the outputs of one
batch into a partial result, and merges two partial results. An executor runs
the model over every batch of the data and merges the partials.

Results never depend on how the work was split. The unit of work is the
batch, fixed by the data (its seeded sample order and batch size); whatever
the backend, every batch's partial result is computed the same way and the
partials are merged strictly left to right in batch order. So a pass on two
Ray workers returns the very same bits as the same pass in process, even for
floating-point statistics whose merge is not associative.

Backends:

- :class:`LocalExecutor` (default): in this process, one session per model.
- :class:`RayExecutor` (the ``ray`` extra): actors that each hold a session
  with the op library registered. Data that can be reopened from a path
  (:class:`DataSpec`) is read by the workers themselves; other data is sent
  batch by batch from the driver. Contiguous runs of batches ("shards") go to
  the workers; a worker that dies is restarted and its shard run again, which
  gives the same partials. :meth:`Executor.map` runs several passes (e.g. the
  rows of a sweep) concurrently.

A *lockstep* job (``Job.lockstep``) runs several models on each batch, one
after the other, and hands the reducer all their outputs: how a scoring pass
compares every model with a reference sample by sample without keeping outputs.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import onnx

from nbsmt_onnx import io
from nbsmt_onnx.calibration.data import (
    CalibrationData,
    Feed,
    feed_samples,
    model_inputs,
    open_calibration_data,
)
from nbsmt_onnx.config import ImagePreprocessing
from nbsmt_onnx.errors import ConfigError, DataError, InternalError
from nbsmt_onnx.ops import schema
from nbsmt_onnx.runtime.session import SessionOptions, create_session

log = logging.getLogger(__name__)

P = TypeVar("P")

#: Environment variables a Ray worker must see as the driver does (library path, kernel ISA).
FORWARDED_ENV = ("NBSMT_ONNX_LIBRARY", "NBSMT_KERNEL_ISA")


class Reducer(Protocol[P]):
    """What a pass computes. Must be picklable (a module-level class) to run on Ray."""

    @property
    def outputs(self) -> Sequence[Any]:
        """Model outputs to fetch, in the order ``reduce`` receives them.

        Names (``str``); for a lockstep job (``Job.lockstep``), one sequence of
        names per model.
        """
        ...

    def reduce(self, outputs: Sequence[Any], batch: Feed, first_sample: int) -> P:
        """The partial result of one batch; ``first_sample`` is its position in the pass.

        ``outputs``: one array per name of :attr:`outputs`; for a lockstep job,
        one :class:`ModelRun` per model.
        """
        ...

    def merge(self, left: P, right: P) -> P:
        """Combine the partials of two consecutive runs of batches (left comes first)."""
        ...


class BatchSource(Protocol):
    """Re-iterable batches: what a job runs over (:class:`CalibrationData`, :class:`FeedStream`)."""

    @property
    def batch_size(self) -> int: ...

    @property
    def num_batches(self) -> int | None:
        """None when the count is only known after a read (feed iterables)."""
        ...

    def batches(self, start: int = 0, stop: int | None = None) -> Iterator[Feed]: ...

    def samples_in(self, feed: Feed) -> int: ...


@dataclass(frozen=True)
class FeedStream:
    """Data given as a callable that returns the feed dicts afresh on every call.

    For callers of the library API that hold their own batches (an iterable
    cannot be read twice, so a pass calls ``feeds()`` again). The feeds are
    used as given: no validation, no re-batching.
    """

    feeds: Callable[[], Iterable[Mapping[str, np.ndarray]]]
    #: unknown for a stream; positions are counted from the feeds (see ``samples_in``)
    batch_size: int = 0
    num_batches: int | None = None

    def batches(self, start: int = 0, stop: int | None = None) -> Iterator[Feed]:
        if not callable(self.feeds):
            raise ConfigError(
                "calibration data must be a callable returning an iterable of feed dicts "
                "(it is read once per pass)"
            )
        count = 0
        for index, feed in enumerate(self.feeds()):
            if stop is not None and index >= stop:
                break
            count += 1
            if index >= start:
                yield dict(feed)
        if count == 0:
            raise DataError(
                "the data yielded no batches; pass a callable that returns a fresh iterator each "
                "time (every pass reads the data again)"
            )

    def samples_in(self, feed: Feed) -> int:
        """The feeds' common batch dimension (1 when the inputs have none)."""
        return feed_samples(feed) or 1


@dataclass(frozen=True)
class DataSpec:
    """Data a worker can open itself: the arguments of :func:`open_calibration_data`.

    ``data`` is a path (``.npz``/``.npy``, a folder of arrays or images) or
    ``"random"``; the seeded draw makes every opener see the same samples in
    the same batches.
    """

    data: str
    num_samples: int
    batch_size: int
    seed: int = 0
    images: ImagePreprocessing | None = None

    def open(self, model: onnx.ModelProto) -> CalibrationData:
        return open_calibration_data(
            self.data,
            model_inputs(model),
            num_samples=self.num_samples,
            batch_size=self.batch_size,
            seed=self.seed,
            images=self.images,
        )


@dataclass(frozen=True)
class Job(Generic[P]):
    """One pass: run ``model`` over ``data`` and reduce with ``reducer``."""

    model: onnx.ModelProto
    data: BatchSource | DataSpec
    reducer: Reducer[P]
    session: SessionOptions = field(default_factory=SessionOptions)
    #: Only the first ``max_batches`` batches (None: all), e.g. a one-batch check run.
    max_batches: int | None = None
    #: Start at this batch (with ``max_batches``: batches ``start`` .. ``max_batches - 1``).
    start: int = 0
    #: How errors name the model ("float model", "simulation model", ...).
    what: str | None = None
    #: Further models run on every batch right after ``model``, in this order: a lockstep
    #: pass. Its reducer's ``outputs`` then names each model's outputs (one sequence per
    #: model) and ``reduce`` receives one :class:`ModelRun` per model, all of the same batch.
    lockstep: tuple[onnx.ModelProto, ...] = ()

    @property
    def models(self) -> tuple[onnx.ModelProto, ...]:
        return (self.model, *self.lockstep)


@dataclass(frozen=True)
class ModelRun:
    """One model's outputs on one batch of a lockstep job, and the seconds its run took."""

    values: list[np.ndarray]
    seconds: float


class _Sessions:
    """The sessions of one job's models; ``run`` runs them all on one batch."""

    def __init__(self, sessions: Sequence[Any], lockstep: bool) -> None:
        self.sessions = list(sessions)
        self.lockstep = lockstep

    def run(self, names: Sequence[Any], feed: Feed) -> Any:
        if not self.lockstep:
            return self.sessions[0].run(list(names), feed)
        runs = []
        for session, wanted in zip(self.sessions, names, strict=True):
            start = time.perf_counter()
            values = session.run(list(wanted), feed)
            runs.append(ModelRun(values, time.perf_counter() - start))
        return runs


ProgressFn = Callable[[int, int | None], None]


def fold(reducer: Reducer[P], partials: Sequence[P]) -> P:
    """Merge partials strictly left to right (the one merge order every backend uses)."""
    if not partials:
        raise DataError("the data yielded no batches")
    result = partials[0]
    for part in partials[1:]:
        result = reducer.merge(result, part)
    return result


def _session_options(
    job: Job[Any], model: onnx.ModelProto, default_threads: int = 0
) -> SessionOptions:
    """The job's options for ``model``; the op library is registered only for models using it."""
    uses_library = any(op.domain == schema.DOMAIN for op in model.opset_import)
    return replace(
        job.session,
        intra_op_threads=job.session.intra_op_threads or default_threads,
        register_library=job.session.register_library and uses_library,
    )


class _Folder(Generic[P]):
    """Merges partials as they arrive, strictly left to right, holding only those out of order.

    ``fold`` over the same partials gives the same bits: the merges happen in
    the same order, only earlier (so a pass holds one partial result, not one
    per batch).
    """

    def __init__(self, reducer: Reducer[P]) -> None:
        self._reducer = reducer
        self._result: list[P] = []  # empty until the first partial
        self._next = 0
        self._waiting: dict[int, list[P]] = {}

    def add(self, index: int, parts: Sequence[P]) -> None:
        """Partials of consecutive batches; ``index`` orders the runs (0, 1, 2, ...)."""
        self._waiting[index] = list(parts)
        while self._next in self._waiting:
            for part in self._waiting.pop(self._next):
                if self._result:
                    self._result[0] = self._reducer.merge(self._result[0], part)
                else:
                    self._result.append(part)
            self._next += 1

    def result(self) -> P:
        if self._waiting:
            raise InternalError(
                f"partials of runs {sorted(self._waiting)} came before earlier ones"
            )
        if not self._result:
            raise DataError("the data yielded no batches")
        return self._result[0]


def _first_sample(data: BatchSource, start: int) -> int:
    """Position of batch ``start``'s first sample in the pass."""
    if start == 0:
        return 0
    if data.num_batches is not None:  # indexed: every batch before the last is full
        return start * data.batch_size
    return sum(data.samples_in(feed) for feed in data.batches(0, start))


def _batch_partials(
    session: Any, data: BatchSource, reducer: Reducer[P], start: int, stop: int | None
) -> Iterator[P]:
    """Partials of batches ``start`` .. ``stop`` (exclusive; None = to the end)."""
    names = list(reducer.outputs)
    first = _first_sample(data, start)
    for feed in data.batches(start, stop):
        outputs = session.run(names, feed)
        yield reducer.reduce(outputs, feed, first)
        first += data.samples_in(feed)


class Executor:
    """Runs passes. Use as a context manager: backends may hold processes."""

    def run(self, job: Job[P], progress: ProgressFn | None = None) -> P:
        """The reduced result of one pass."""
        return self.map([job], progress)[0]

    def map(self, jobs: Sequence[Job[Any]], progress: ProgressFn | None = None) -> list[Any]:
        """The results of several independent passes, in the order given."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend holds."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalExecutor(Executor):
    """In this process, one job after the other, batches in order."""

    def map(self, jobs: Sequence[Job[Any]], progress: ProgressFn | None = None) -> list[Any]:
        results = []
        for job in jobs:
            data = job.data.open(job.model) if isinstance(job.data, DataSpec) else job.data
            sessions = []
            for model in job.models:
                with io.session_source(model) as source:
                    options = _session_options(job, model)
                    sessions.append(create_session(source, options, what=job.what))
            session = _Sessions(sessions, bool(job.lockstep))
            merged: _Folder[Any] = _Folder(job.reducer)
            stop = data.num_batches
            if stop is not None and job.max_batches is not None:
                stop = min(stop, job.max_batches)
            for index, part in enumerate(
                _batch_partials(session, data, job.reducer, job.start, job.max_batches)
            ):
                merged.add(index, [part])
                if progress is not None:
                    progress(index + 1, None if stop is None else stop - job.start)
            results.append(merged.result())
        return results


# --------------------------------------------------------------------------- Ray


def _require_ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise ConfigError(
            "--executor ray needs Ray: pip install 'nbsmt-onnx[ray]' (or use --executor local)"
        ) from err
    return ray


class _ShardWorker:
    """Body of the Ray actor: one session per model (the last few kept), shards on request."""

    def __init__(self, keep: int = 2) -> None:
        self._sessions: dict[str, Any] = {}
        self._keep = keep

    def _session(
        self, key: str, model_bytes: bytes, options: SessionOptions, what: str | None
    ) -> Any:
        session = self._sessions.pop(key, None)
        if session is None:
            session = create_session(model_bytes, options, what=what)
        self._sessions[key] = session  # most recently used last
        while len(self._sessions) > self._keep:
            self._sessions.pop(next(iter(self._sessions)))
        return session

    def run_shard(
        self,
        keys: tuple[str, ...],
        options: tuple[SessionOptions, ...],
        what: str | None,
        data: DataSpec | tuple[list[Feed], list[int]],
        reducer: Reducer[Any],
        batches: tuple[int, int],
        first_sample: int,
        *model_bytes: bytes,
    ) -> list[Any]:
        """Partials of batches ``batches[0]`` .. ``batches[1] - 1`` of the pass, in order.

        ``data``: a spec the worker opens, or the shard's feeds with their sample counts.
        ``keys`` / ``options`` / ``model_bytes``: one per model of the job (more than one:
        a lockstep job).
        """
        self._keep = max(self._keep, len(keys))
        session = _Sessions(
            [
                self._session(key, blob, option, what)
                for key, option, blob in zip(keys, options, model_bytes, strict=True)
            ],
            len(keys) > 1,
        )
        if isinstance(data, DataSpec):
            opened = data.open(onnx.load_from_string(model_bytes[0]))
            return list(_batch_partials(session, opened, reducer, *batches))
        names = list(reducer.outputs)
        out, first = [], first_sample
        for feed, size in zip(*data, strict=True):
            out.append(reducer.reduce(session.run(names, feed), feed, first))
            first += size
        return out


@dataclass(frozen=True)
class _Shard:
    job: int  # index into the jobs
    index: int  # index into the job's shards


def plan_shards(num_batches: int, workers: int, per_worker: int = 4) -> list[tuple[int, int]]:
    """Contiguous batch ranges: about ``per_worker`` per worker, so a slow worker delays less."""
    if num_batches <= 0:
        return []
    count = max(1, min(num_batches, workers * per_worker))
    bounds = np.linspace(0, num_batches, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]


class RayExecutor(Executor):
    """Ray actors, each holding one session per model; shards of batches as tasks.

    ``address=None`` starts a private Ray instance for the lifetime of the
    executor (bound to 127.0.0.1) and stops it on :meth:`close`; otherwise it
    connects to the running cluster at ``address``. Workers need nbsmt-onnx
    installed (the same version) on every node.
    """

    def __init__(
        self,
        workers: int = 2,
        address: str | None = None,
        *,
        threads_per_worker: int = 1,
        max_retries: int = 3,
    ) -> None:
        if workers < 1:
            raise ConfigError(f"--workers must be >= 1; got {workers}")
        ray = _require_ray()
        self._ray = ray
        self._started = False
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        if not ray.is_initialized():
            if address is None:
                ray.init(
                    num_cpus=workers,
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    log_to_driver=False,
                    configure_logging=False,
                    runtime_env={"env_vars": env} if env else None,
                )
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            self._started = True
        actor = ray.remote(num_cpus=1, max_restarts=max_retries, max_task_retries=max_retries)(
            _ShardWorker
        )
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        self._actors = [actor.remote() for _ in range(workers)]

    def map(self, jobs: Sequence[Job[Any]], progress: ProgressFn | None = None) -> list[Any]:
        ray = self._ray
        pending: dict[Any, _Shard] = {}
        folders: list[_Folder[Any]] = []
        total = 0
        for j, job in enumerate(jobs):
            keys, options, model_refs = [], [], []
            for model in job.models:
                model_bytes = model.SerializeToString()
                keys.append(hashlib.blake2b(model_bytes, digest_size=16).hexdigest())
                options.append(_session_options(job, model, self.threads_per_worker))
                model_refs.append(ray.put(model_bytes))
            reducer_ref = ray.put(job.reducer)  # shipped once, not with every shard
            folders.append(_Folder(job.reducer))
            for s, (bounds, payload, first) in enumerate(self._shards(job)):
                actor = self._actors[total % self.workers]
                ref = actor.run_shard.remote(
                    tuple(keys), tuple(options), job.what, payload, reducer_ref, bounds, first,
                    *model_refs,
                )  # fmt: skip
                pending[ref] = _Shard(j, s)
                total += 1
        done = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            shard = pending.pop(ready[0])
            folders[shard.job].add(shard.index, ray.get(ready[0]))
            done += 1
            if progress is not None:
                progress(done, total)
        return [folder.result() for folder in folders]

    def _shards(self, job: Job[Any]) -> Iterator[tuple[tuple[int, int], Any, int]]:
        """(batch range, payload, first sample) of each shard of ``job``, in batch order.

        Data the workers can open (:class:`DataSpec`) is sent as the spec. Other
        data is read here and sent shard by shard as each fills, so the driver
        holds one shard's batches at a time; a stream whose batch count is
        unknown is counted by reading it once first.
        """
        ray = self._ray
        start = job.start
        if isinstance(job.data, DataSpec):
            opened = job.data.open(job.model)
            count = opened.num_batches or 0
            if job.max_batches is not None:
                count = min(count, job.max_batches)
            for a, b in plan_shards(count - start, self.workers):
                yield (a + start, b + start), job.data, (a + start) * opened.batch_size
            return
        data = job.data
        known = data.num_batches
        if known is None:
            known = sum(1 for _ in data.batches(0, job.max_batches))
        elif job.max_batches is not None:
            known = min(known, job.max_batches)
        shards = [(a + start, b + start) for a, b in plan_shards(known - start, self.workers)]
        feeds = data.batches(start, known)
        first = _first_sample(data, start)
        for a, b in shards:
            batches = [feed for _, feed in zip(range(b - a), feeds, strict=False)]
            if len(batches) != b - a:
                raise DataError(
                    f"the data yielded {a + len(batches)} batches, fewer than the {known} it "
                    "held when counted; use a deterministic data source"
                )
            counts = [data.samples_in(feed) for feed in batches]
            yield (a, b), ray.put((batches, counts)), first
            first += sum(counts)

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
        if self._started:
            self._ray.shutdown()
            self._started = False


def create_executor(kind: str = "local", workers: int = 2, address: str | None = None) -> Executor:
    """The executor for ``--executor KIND`` (``local`` or ``ray``)."""
    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(workers, address)
    raise ConfigError(f"--executor must be 'local' or 'ray'; got {kind!r}")
