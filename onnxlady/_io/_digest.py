"""A file's sha256 computed in a thread of its own, while its caller goes on working.

A command that records its input's sha256 (permute's key) used to wait for it while loading:
the load of a model whose large weights stay views of the file takes a millisecond, the hash a
read of every byte. Started before the load and awaited only where the digest is used, the
hash runs beside the load and the analysis instead (reading and hashing release the GIL); a
command that fails first does not wait for it.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

from onnxlady._errors import OnnxladyError
from onnxlady._io._files import file_sha256

__all__ = ["PendingDigest"]


class PendingDigest:
    """The sha256 of a regular file, being computed; :meth:`result` waits for it."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._digest: str | None = None
        self._error: BaseException | None = None
        # A daemon: a command that fails before it needs the digest exits without waiting for it.
        self._thread = threading.Thread(target=self._run, name="onnxlady-sha256", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, path: str | os.PathLike[str]) -> PendingDigest | None:
        """Start hashing ``path``; ``None`` when it is not a regular file (a FIFO would block the reader).

        The caller's load then reports such a path as it would have (nothing is read here).
        """
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                return None
        except (OSError, ValueError):
            return None
        return cls(Path(path))

    def _run(self) -> None:
        try:
            self._digest = file_sha256(self._path)
        except BaseException as exc:  # handed to the thread that asks for the digest
            self._error = exc

    def result(self) -> str:
        """The file's sha256, once it is computed.

        Raises:
            OnnxladyError: the file could not be read (as the load says it).
        """
        self._thread.join()
        if isinstance(self._error, OSError):
            raise OnnxladyError(f"{self._path}: cannot read ({self._error.strerror or self._error})") from self._error
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return self._digest
