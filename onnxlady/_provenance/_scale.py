"""Scale-out of index builds on a Dask cluster (the ``scale`` extra: ``dask[distributed]``, ``fsspec``).

Why Dask rather than Ray:

- *weight*: ``dask[distributed]`` is pure Python (a few MB, one wheel for every platform);
  Ray's wheel is tens of megabytes of native code per platform and brings grpcio with it;
- *start-up*: a Dask ``LocalCluster`` is a scheduler and worker processes started in about a
  second; ``ray.init`` starts a raylet, a GCS server, a dashboard and an object store (shared
  memory sized to a third of RAM) before the first task;
- *fit*: the work is a bag of independent files, each returning a few kilobytes (a
  fingerprint, never the model): a task scheduler with futures is all it needs; Ray's actors
  and object store bring nothing here;
- *reach*: the same ``Client`` talks to a local cluster, to ``dask scheduler`` + ``dask
  worker`` processes on any machines, or to Kubernetes/YARN/SLURM/cloud clusters
  (dask-kubernetes, dask-jobqueue, Coiled) without changing the call.

Running on several machines: install ``onnxlady[scale]`` (plus the fsspec backend of the store,
e.g. ``s3fs``) on every node; start ``dask scheduler`` on one node and ``dask worker
tcp://SCHEDULER:8786`` on the others; then build with ``engine="dask",
scheduler="tcp://SCHEDULER:8786"``. Workers read local paths (which must be the same on every
node: a shared file system) or object-store URLs (``s3://bucket/models/``) through fsspec; the
index itself is written by the calling process only (SQLite has one writer), as results
arrive. The local process pool stays the default engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from onnxlady._errors import OnnxladyError
from onnxlady._provenance._read import FileFingerprint, fingerprint_files

__all__ = ["dask_available", "fingerprint_with_dask"]


def dask_available() -> bool:
    """Whether ``dask.distributed`` can be imported (the ``scale`` extra is installed)."""
    try:
        import dask.distributed  # ruff: ignore[unused-import]
    except ImportError:
        return False
    return True


def fingerprint_with_dask(
    batches: list[list[str]], digests: list[list[bool]], *, workers: int, scheduler: Any = None
) -> Iterator[tuple[int, list[FileFingerprint]]]:
    """Fingerprint batches of files on a Dask cluster, yielding results as batches complete.

    Args:
        batches: lists of local paths (visible to every worker) or fsspec URLs; each list is one
            task (:func:`~onnxlady._provenance._read.fingerprint_files`).
        digests: per batch, per path: whether to compute its sha256.
        workers: worker processes of the LocalCluster started when ``scheduler`` is None.
        scheduler: a ``distributed.Client``, a scheduler address (``"tcp://host:8786"``), or
            None to start (and stop after the build) a LocalCluster of ``workers`` processes
            with one thread each.

    Yields:
        (batch number, one :class:`FileFingerprint` per path of that batch), in completion order.

    Raises:
        OnnxladyError: dask.distributed is not installed, or the scheduler cannot be reached.
    """
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError as exc:
        raise OnnxladyError("engine 'dask' needs dask.distributed: pip install 'onnxlady[scale]'") from exc
    cluster = None
    own_client = not isinstance(scheduler, Client)
    try:
        if scheduler is None:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
            client = Client(cluster)
        elif isinstance(scheduler, Client):
            client = scheduler
        else:
            client = Client(scheduler, timeout="30s")
    except (OSError, TimeoutError, ValueError) as exc:
        if cluster is not None:
            cluster.close()
        raise OnnxladyError(f"cannot reach the Dask scheduler {scheduler!r} ({exc})") from exc
    try:
        futures = client.map(_fingerprint_batch, batches, digests, pure=False)
        numbers = {future.key: number for number, future in enumerate(futures)}
        for future in as_completed(futures):
            yield numbers[future.key], future.result()
            future.release()
    finally:
        if own_client:
            client.close()
        if cluster is not None:
            cluster.close()


def _fingerprint_batch(paths: list[str], digests: list[bool]) -> list[FileFingerprint]:
    return fingerprint_files(paths, digest=digests)
