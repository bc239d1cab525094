"""Fuzzing the command line (issue 13, items 5 and 6): whatever the arguments, exit 0, 1 or 2.

Three generators, all through the real parser and public API:

* **argument vectors** for every subcommand: each option given a valid value or an odd one
  (negative, huge, NaN, infinite, malformed, a missing or wrong file, an output that is an input
  or sits in a missing folder), options dropped or repeated, unknown flags added;
* **mutated models**: small random CNNs and MLPs built with :class:`onnxlady.testing.GraphBuilder`,
  then broken one way (an input dropped, wrong dims, a random attribute, an initializer removed
  or reshaped, an unknown operator, a wrong element type, no outputs...), each given to a random
  subcommand;
* a **subprocess sample** through ``python -m onnxlady``, the real entry point.

The invariant, checked after every case: the exit code is 0, 1 or 2; exit 2 prints exactly one
non-empty line on stderr; no ``Traceback`` anywhere; no partial output (no temporary left, no
file at all after exit 2 unless the message names it as kept, every model written loads); the
input files keep their bytes and mtime. Hostile *files* and *keys* (corrupted bytes, tampered
key schemas, output-path tricks, kills) are fuzzed in the reliability suite of issue 14
(``tests/test_reliability.py`` and ``tests/test_fuzz_files.py``); here keys are only picked,
valid or not, as arguments.

Hypothesis runs derandomized (the same cases on every run, so CI is reproducible) with no
example database; the case counts are :data:`ARGV_EXAMPLES` per subcommand and
:data:`MODEL_EXAMPLES` mutated models.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
import tempfile
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from fixtures.dynamic import build_dynamic_detector, build_vad_like
from onnxlady.cli import main
from onnxlady.testing import GraphBuilder, conv_bn_relu

REPO = Path(__file__).resolve().parents[1]
#: Generated argument vectors per subcommand (13 of them).
ARGV_EXAMPLES = 65
#: Generated mutated models.
MODEL_EXAMPLES = 150
#: Argument vectors run through ``python -m onnxlady``.
SUBPROCESS_EXAMPLES = 5

FUZZ_SETTINGS: dict[str, Any] = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}


# -- the models and files every argument vector picks from -------------------------------------
def _tiny_cnn(seed: int = 0) -> onnx.ModelProto:
    b = GraphBuilder("tiny_cnn", seed=seed)
    x = b.input("input", [1, 3, 8, 8])
    y = b.relu(b.conv(x, 8, 3, name="c1"))
    y = b.relu(b.conv(y, 8, 3, stride=2, name="c2"))
    return b.build(b.gemm(b.flatten(b.global_avg_pool(y)), 4, name="fc"))


def _tiny_mlp(seed: int = 0) -> onnx.ModelProto:
    b = GraphBuilder("tiny_mlp", seed=seed)
    x = b.input("x", [2, 6])
    return b.build(b.matmul(b.relu(b.matmul(x, 8, name="m1")), 3, name="m2"))


@dataclass(frozen=True)
class Pool:
    """The folder of inputs every case reads (never writes), and its fingerprint."""

    folder: Path

    def fingerprint(self) -> dict[str, tuple[str, int]]:
        """sha256 and mtime of every file under the folder: a case must leave both alone."""
        found = {}
        for path in sorted(self.folder.rglob("*")):
            if path.is_file():
                found[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        return found


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Pool:
    folder = tmp_path_factory.mktemp("fuzz_pool")
    models = {
        "cnn": _tiny_cnn(0), "cnn_other": _tiny_cnn(1), "mlp": _tiny_mlp(0),
        "dyn": build_dynamic_detector(0), "vad": build_vad_like(0),
    }  # fmt: skip
    for name, model in models.items():
        onnx.save(model, str(folder / f"{name}.onnx"))
    cnn = str(folder / "cnn.onnx")
    with _captured():
        assert main(["permute", cnn, "-o", str(folder / "cnn_p.onnx"), "--seed", "3", "--quiet"]) == 0
        assert main(["watermark", "embed", cnn, "--layer", "c2", "--bits", "16", "-o", str(folder / "cnn_wm.onnx"),
                     "--key-out", str(folder / "wm.npz"), "--quiet"]) == 0  # fmt: skip
        assert main(["index", "build", cnn, str(folder / "mlp.onnx"), "-o", str(folder / "reg.idx"),
                     "--workers", "1", "--quiet"]) == 0  # fmt: skip
    (folder / "perms.json").write_text('{"g0": [1, 0, 2, 3, 4, 5, 6, 7]}')
    (folder / "bad_perms.json").write_text('{"g0": [0, 0, 1]}')
    (folder / "garbage.onnx").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)))
    (folder / "empty.onnx").write_bytes(b"")
    (folder / "notes.txt").write_text("not a model\n")
    np.savez(folder / "feeds.npz", input=np.random.default_rng(0).uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32))
    np.savez(folder / "wrong_feeds.npz", input=np.zeros((1, 5), np.float32))
    (folder / "loader.py").write_text(
        "import numpy as np\n\n"
        "def load_data():\n"
        "    for seed in range(2):\n"
        "        yield {'input': np.random.default_rng(seed).uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)}\n\n"
        "def broken():\n"
        "    raise RuntimeError('the loader fails')\n\n"
        "def nothing():\n"
        "    return 42\n"
    )
    (folder / "sub").mkdir()
    return Pool(folder)


# -- running one case ------------------------------------------------------------------------
@dataclass
class Outcome:
    code: int
    out: str
    err: str


@contextlib.contextmanager
def _captured() -> Generator[tuple[io.StringIO, io.StringIO], None, None]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield out, err


def run_in_process(argv: list[str]) -> Outcome:
    """``onnxlady.cli.main(argv)`` with stdout and stderr captured; argparse's exits become codes."""
    with _captured() as (out, err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: usage errors, --help, --version
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return Outcome(int(code), out.getvalue(), err.getvalue())


def run_module(argv: list[str], cwd: Path) -> Outcome:
    env = {k: v for k, v in os.environ.items() if k != "ONNXLADY_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "onnxlady", *argv],
        check=False, capture_output=True, text=True, cwd=cwd, env=env, timeout=300,
    )  # fmt: skip
    return Outcome(done.returncode, done.stdout, done.stderr)


def check_invariant(argv: list[str], outcome: Outcome, out_dir: Path, before: dict, after: dict) -> None:
    """Exit 0/1/2, one stderr line on exit 2, no traceback, no partial output, inputs unchanged."""
    context = f"\nargv: {argv}\nexit {outcome.code}\nstderr: {outcome.err!r}\nstdout: {outcome.out[-400:]!r}"
    assert outcome.code in (0, 1, 2), "exit code outside 0/1/2" + context
    assert "Traceback" not in outcome.err + outcome.out, "a traceback was printed" + context
    if outcome.code == 2:
        lines = outcome.err.splitlines()
        assert len(lines) == 1 and lines[0].strip(), "exit 2 must print exactly one line on stderr" + context
    left = [path for path in out_dir.rglob("*") if path.is_file()]
    temporaries = [path.name for path in left if path.name.startswith(".") or path.name.endswith(".tmp")]
    assert not temporaries, f"temporary files left: {temporaries}" + context
    if outcome.code == 2:
        stray = [path.name for path in left if str(path) not in outcome.err]
        assert not stray, f"exit 2 left outputs it does not name: {stray}" + context
    writes_models = argv[0] != "index"  # index build's -o is the index, not a model
    models = {argv[i + 1] for i, token in enumerate(argv[:-1]) if token in MODEL_OUTPUT_FLAGS and writes_models}
    others = {argv[i + 1] for i, token in enumerate(argv[:-1]) if token in OUTPUT_FLAGS - MODEL_OUTPUT_FLAGS}
    for path in left:
        if str(path) in models - others and path.suffix == ".onnx":
            onnx.load(str(path))  # written whole: it parses (with its external data, if any)
    assert after == before, "an input file was changed" + context


def run_case(argv_template: list[str], pool: Pool, *, subprocess_run: bool = False) -> None:
    with tempfile.TemporaryDirectory(dir=pool.folder.parent, prefix="fuzz_out_") as temporary:
        out_dir = Path(temporary)
        argv = [arg.replace("@POOL@", str(pool.folder)).replace("@OUT@", str(out_dir)) for arg in argv_template]
        before = pool.fingerprint()
        outcome = run_module(argv, out_dir) if subprocess_run else run_in_process(argv)
        check_invariant(argv, outcome, out_dir, before, pool.fingerprint())


# -- argument values, valid and odd ------------------------------------------------------------
#: Half the cases use only valid values (so they reach the commands' work, not just their checks);
#: the other half mix in odd ones. Shared within one case: every option of it follows the same draw.
VALID_CASE = st.shared(st.booleans(), key="valid-case")


def choose(
    valid: Sequence[str] | st.SearchStrategy[str], odd: Sequence[str] | st.SearchStrategy[str]
) -> st.SearchStrategy[str]:
    """A valid value in a valid case; otherwise valid twice as often as odd."""
    good = valid if isinstance(valid, st.SearchStrategy) else st.sampled_from(list(valid))
    bad = odd if isinstance(odd, st.SearchStrategy) else st.sampled_from(list(odd))
    return VALID_CASE.flatmap(lambda only_valid: good if only_valid else st.one_of(good, good, bad))


ODD_TEXT = ["", "abc", "nan", "inf", "-inf", "1e3", "0x10", "--", "-", " 7", "1_000", "٣", "None", "[]", "{}"]
MODELS = choose(
    ["@POOL@/cnn.onnx"] * 6 + ["@POOL@/mlp.onnx", "@POOL@/dyn.onnx", "@POOL@/vad.onnx", "@POOL@/cnn_p.onnx",
                               "@POOL@/cnn_wm.onnx", "@POOL@/cnn_other.onnx"],
    ["@POOL@/garbage.onnx", "@POOL@/empty.onnx", "@POOL@/notes.txt", "@POOL@/missing.onnx", "@POOL@",
     "@POOL@/cnn_p.onnx.key.json"],
)  # fmt: skip
OUTPUTS = choose(
    ["@OUT@/o.onnx"],
    ["@OUT@/missing/o.onnx", "@OUT@", "@POOL@/cnn.onnx", "@POOL@/sub", "@OUT@/" + "x" * 300 + ".onnx", "@OUT@/o.txt"],
)
KEY_OUTS = choose(["@OUT@/k.json"], ["@OUT@/o.onnx", "@OUT@/missing/k.json", "@POOL@/cnn_p.onnx.key.json", "@OUT@"])
PERM_KEYS = choose(
    ["@POOL@/cnn_p.onnx.key.json", "@POOL@/cnn_p.onnx.key.json", "@POOL@/perms.json"],
    [
        "@POOL@/bad_perms.json",
        "@POOL@/wm.npz",
        "@POOL@/garbage.onnx",
        "@POOL@/missing.json",
        "@POOL@/cnn.onnx",
        "@POOL@",
    ],
)
WATERMARK_KEYS = choose(["@POOL@/wm.npz"], ["@POOL@/cnn_p.onnx.key.json", "@POOL@/feeds.npz", "@POOL@/missing.npz"])
REPORTS = choose(["@OUT@/r.html", "@OUT@/r.md", "@OUT@/c.onnx"], ["@OUT@/missing/r.html", "@POOL@/cnn.onnx", "@OUT@"])
TENSORS = choose(["c1", "c2", "stem.conv", "down.conv", "head"], ["fc", "m1", "input", "x", "nope", "", "c1.weight"])
GROUPS = choose(["g0", "g1"], ["g2", "g3", "g9", "g-1", "", "0", "c1.weight", "fc.weight", "G0"])
ONLY = choose(["g0", "g1", "c1.weight", "c2.weight", "fc.weight"], ["g9", "nope", "", "c1.bias", "input"])
INPUT_FILES = choose(["@POOL@/feeds.npz"], ["@POOL@/wrong_feeds.npz", "@POOL@/notes.txt", "@POOL@/missing.npz",
                                            "@POOL@/cnn.onnx"])  # fmt: skip
LOADER_SCRIPTS = choose(
    ["@POOL@/loader.py", "@POOL@/loader.py:load_data"],
    ["@POOL@/loader.py:broken", "@POOL@/loader.py:nothing", "@POOL@/loader.py:absent", "@POOL@/missing.py",
     "@POOL@/notes.txt"],
)  # fmt: skip
#: Shapes each pool model accepts (those of other models are wrong for it: refused or failing).
GOOD_SHAPES = ["input:1x3x8x8", "input:[1,3,8,8]", "x:2x6", "images:1x3x32x32", "images:2x3x64x96", "audio:1x512"]
INPUT_NAMES = ["input", "x", "images", "audio", "nope", ""]


def whole_numbers(low: int, high: int) -> st.SearchStrategy[str]:
    """In ``[low, high]``, or (odd) anywhere: negative, past 2**63, not a number."""
    odd = st.one_of(
        st.integers(-(2**70), 2**70).map(str),
        st.sampled_from([str(2**32), str(2**63 - 1), str(2**63), str(-(2**63)), "-1", "-0", "+3"]),
        st.sampled_from(ODD_TEXT),
    )
    return choose(st.integers(low, high).map(str), odd)


def real_numbers(low: float, high: float) -> st.SearchStrategy[str]:
    """In ``[low, high]``, or (odd) any float (NaN, infinities, 1e308) or not a number."""
    odd = st.one_of(
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.sampled_from(["1e400", "-1e400", "-0.0", "1e-320", "0", "-1"]),
        st.sampled_from(ODD_TEXT),
    )
    return choose(st.floats(low, high).map(repr), odd)


@st.composite
def odd_shape_specs(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(INPUT_NAMES))
    dims = draw(st.lists(st.sampled_from([0, 1, 1, 2, 3, 3, 6, 8, 8, 16, 32, 256, 512, -1]), max_size=5))
    text = draw(st.sampled_from(["x", ",", "x"])).join(map(str, dims))
    return draw(st.sampled_from([f"{name}:{text}", f"{name}:[{text}]", text, f"{name}:{text}x", f"{name}::{text}"]))


@st.composite
def odd_value_ranges(draw: st.DrawFn) -> str:
    low, high = draw(real_numbers(-5, 5)), draw(real_numbers(-5, 5))
    name = draw(st.sampled_from(INPUT_NAMES))
    forms = [f"{name}:[{low},{high}]", f"[{low},{high}]", f"{name}:{low},{high}", f"{name}:[{low}]"]
    return draw(st.sampled_from(forms))


SHAPES = choose(GOOD_SHAPES, odd_shape_specs())
VALUE_RANGES = choose(["[-1,1]", "[0,1]", "input:[-2,2]", "x:[0,0.5]"], odd_value_ranges())


def option(flag: str, values: st.SearchStrategy[str], *, repeat: int = 1) -> st.SearchStrategy[list[str]]:
    """``[]`` or ``[flag, value]`` (up to ``repeat`` times)."""
    pairs = st.lists(values.map(lambda value: [flag, value]), max_size=repeat)
    return st.one_of(st.just([]), pairs.map(lambda items: [token for pair in items for token in pair]))


def flag(name: str) -> st.SearchStrategy[list[str]]:
    return st.sampled_from([[], [name]])


def positional(values: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    return values.map(lambda value: [value])


def check_options() -> list[st.SearchStrategy[list[str]]]:
    """The equivalence check's options (verify, permute --verify)."""
    return [
        option("--provider", choose(["cpu"], ["cuda", "tpu", ""])),
        option("--atol", real_numbers(0, 1)),
        option("--rtol", real_numbers(0, 1)),
        option("--iterations", choose(st.integers(1, 3).map(str), ["0", "-1", "-2", "1e3", "nan", ""])),
        option("--input-seed", whole_numbers(0, 100)),
        option("--shape", SHAPES, repeat=2),
        option("--add-output", TENSORS, repeat=2),
        option("--val-range", VALUE_RANGES, repeat=2),
        option("--load-inputs", INPUT_FILES),
        option("--data-loader-script", LOADER_SCRIPTS),
        flag("--no-squash-inputs"),
    ]


def output_options() -> list[st.SearchStrategy[list[str]]]:
    return [OUTPUTS.map(lambda path: ["-o", path]), flag("--external-data"), flag("--overwrite-input")]


#: Each subcommand: its fixed words, positional arguments, then option strategies.
# fmt: off
COMMANDS: dict[str, tuple[list[str], list[st.SearchStrategy[list[str]]]]] = {
    "demo": (["demo"], [
        # A valid seed runs the whole demo (seconds): tests/test_cli.py covers it; here only odd ones.
        st.one_of(st.integers(-(2**70), -1), st.integers(2**63, 2**70)).map(lambda s: ["--seed", str(s)]),
        option("--workdir", st.sampled_from(["@OUT@/demo", "@POOL@/cnn.onnx"])),
    ]),
    "inspect": (["inspect"], [
        positional(MODELS),
        option("--dot", choose(["@OUT@/g.dot"], ["@OUT@/missing/g.dot", "@POOL@/cnn.onnx", "@OUT@"])),
        flag("--members"),
    ]),
    "permute": (["permute"], [
        positional(MODELS),
        *output_options(),
        option("--seed", whole_numbers(0, 50)),
        option("--key-out", KEY_OUTS),
        option("--group", GROUPS, repeat=2),
        option("--perms", PERM_KEYS),
        flag("--verify"),
        *check_options(),
    ]),
    "unpermute": (["unpermute"], [
        positional(choose(["@POOL@/cnn_p.onnx"] * 3 + ["@POOL@/cnn.onnx"], MODELS)),
        PERM_KEYS.map(lambda key: ["--key", key]),
        *output_options(),
    ]),
    "resync": (["resync"], [
        positional(MODELS),
        positional(MODELS),
        *output_options(),
        option("--key-out", KEY_OUTS),
        option("--true-key", PERM_KEYS),
        option("--method", choose(["hungarian", "argmax"], ["greedy", ""])),
        flag("--refine"),
    ]),
    "match": (["match"], [positional(MODELS), positional(MODELS)]),
    "audit": (["audit"], [
        positional(MODELS),
        positional(MODELS),
        option("--rtol", real_numbers(0, 1e-3)),
        option("--method", choose(["hungarian", "argmax"], ["greedy"])),
        flag("--refine"),
        option("--html", REPORTS),
        option("--markdown", REPORTS),
        option("--canonicalize", REPORTS),
    ]),
    "watermark embed": (["watermark", "embed"], [
        positional(MODELS),
        TENSORS.map(lambda layer: ["--layer", layer]),
        option("--bits", whole_numbers(1, 24)),
        option("--seed", whole_numbers(0, 50)),
        option("--shape", SHAPES),
        choose(["@OUT@/wm.npz"], ["@OUT@/o.onnx", "@POOL@/wm.npz", "@OUT@"]).map(lambda key: ["--key-out", key]),
        *output_options(),
    ]),
    "watermark extract": (["watermark", "extract"], [positional(MODELS), option("--key", WATERMARK_KEYS)]),
    "perturb": (["perturb"], [
        positional(MODELS),
        *output_options(),
        real_numbers(0, 2).map(lambda omega: ["--noise", omega]),
        option("--quantize", whole_numbers(1, 16)),
        option("--prune", real_numbers(0, 100)),
        option("--seed", whole_numbers(0, 50)),
        option("--only", ONLY, repeat=2),
    ]),
    "index build": (["index", "build"], [
        st.lists(MODELS, min_size=0, max_size=3),
        choose(["@OUT@/r.idx"], ["@POOL@/reg.idx", "@OUT@/missing/r.idx", "@POOL@/cnn.onnx"]).map(lambda p: ["-o", p]),
        # More than one worker starts a process pool (seconds per case): 1, or values to refuse.
        choose(["1"], ["0", "-1", "abc", "1.5", ""]).map(lambda n: ["--workers", n]),
        option("--engine", choose(["process"], ["spark", ""])),  # dask starts a cluster: seconds
    ]),
    "find": (["find"], [
        st.lists(MODELS, max_size=1),
        option("--index", choose(["@POOL@/reg.idx"], ["@POOL@/cnn.onnx", "@POOL@/missing.idx"])),
        option("--top", whole_numbers(1, 5)),
        option("--threshold", real_numbers(0.01, 2)),
        flag("--confirm"),
        flag("--all-pairs"),
    ]),
    "verify": (["verify"], [positional(MODELS), positional(MODELS), *check_options()]),
}
# fmt: on
#: Options whose value is a file the command writes, and those among them that write a model.
OUTPUT_FLAGS = {"-o", "--key-out", "--dot", "--html", "--markdown", "--canonicalize", "--workdir"}
MODEL_OUTPUT_FLAGS = {"-o", "--canonicalize"}
ODD_TOKENS = ["--no-such-flag", "-x", "--seed", "extra.onnx", "--", "--json=1", "-o"]


@st.composite
def argument_vectors(draw: st.DrawFn, command: str) -> list[str]:
    words, parts = COMMANDS[command]
    argv = list(words)
    for part in parts:
        argv += draw(part)
    # An output may name an input of the same command (it must be refused), never another file of
    # the pool: that would be a legitimate overwrite, and the pool must stay as it is for later cases.
    inputs = {token for i, token in enumerate(argv) if not (i and argv[i - 1] in OUTPUT_FLAGS)}
    for i, token in enumerate(argv):
        if i and argv[i - 1] in OUTPUT_FLAGS and token.startswith("@POOL@/") and token not in inputs:
            argv[i] = "@OUT@/taken" + Path(token).suffix
    # --overwrite-input lets an output replace an input: allowed, but then the inputs may change.
    if "--overwrite-input" in argv and any(
        token.startswith("@POOL@/") and argv[i - 1] in OUTPUT_FLAGS for i, token in enumerate(argv)
    ):
        argv.remove("--overwrite-input")
    argv += draw(st.sampled_from([[], [], ["--json"], ["--quiet"]]))
    if draw(VALID_CASE):
        return argv
    tail = draw(st.sampled_from(["none"] * 5 + ["odd", "drop", "shuffle"]))
    if tail == "odd":
        argv.insert(draw(st.integers(len(words), len(argv))), draw(st.sampled_from(ODD_TOKENS)))
    elif tail == "drop" and len(argv) > len(words):
        del argv[draw(st.integers(len(words), len(argv) - 1))]
    elif tail == "shuffle":
        argv = list(words) + draw(st.permutations(argv[len(words) :]))
    return argv


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_argument_vectors(pool: Pool, command: str) -> None:
    """Random argument vectors for one subcommand keep the invariant."""

    @settings(max_examples=ARGV_EXAMPLES, **FUZZ_SETTINGS)
    @given(argv=argument_vectors(command))
    def run(argv: list[str]) -> None:
        run_case(argv, pool)

    run()


# -- mutated models --------------------------------------------------------------------------
@st.composite
def random_models(draw: st.DrawFn) -> onnx.ModelProto:
    """A small CNN or MLP, built by GraphBuilder with drawn sizes (valid and runnable)."""
    seed = draw(st.integers(0, 1000))
    b = GraphBuilder("fuzzed", seed=seed)
    if draw(st.booleans()):
        size = draw(st.sampled_from([4, 6, 8]))
        y = b.input("input", [1, draw(st.integers(1, 3)), size, size])
        for index in range(draw(st.integers(1, 3))):
            width, kernel = draw(st.integers(1, 6)), draw(st.sampled_from([1, 3]))
            if draw(st.booleans()):
                y = conv_bn_relu(b, y, width, kernel, name=f"block{index}")
            else:
                y = b.relu(b.conv(y, width, kernel, name=f"conv{index}"))
        if draw(st.booleans()):
            y = b.sigmoid(b.conv(y, 2, 1, name="head"))
        else:
            y = b.gemm(b.flatten(b.global_avg_pool(y)), draw(st.integers(1, 4)), name="fc")
    else:
        y = b.input("input", [draw(st.integers(1, 3)), draw(st.integers(1, 6))])
        for index in range(draw(st.integers(1, 3))):
            y = b.relu(b.matmul(y, draw(st.integers(1, 8)), name=f"fc{index}"))
        y = b.matmul(y, draw(st.integers(1, 3)), name="out")
    return b.build(y)


def _random_attribute(draw: st.DrawFn, name: str) -> onnx.AttributeProto:
    value = draw(st.one_of(
        st.integers(-3, 9), st.lists(st.integers(-2, 5), max_size=5), st.floats(allow_nan=True, width=32),
        st.sampled_from(["NOTSET", "same", "", "é"]), st.lists(st.floats(-2, 2, width=32), min_size=1, max_size=3),
    ))  # fmt: skip
    return helper.make_attribute(name, value)


MUTATIONS = [
    "none", "drop_input", "wrong_dims", "dynamic_dims", "attribute", "drop_initializer", "reshape_initializer",
    "dangling_output", "unknown_op", "custom_domain", "input_dtype", "duplicate_node", "no_outputs", "opset",
    "drop_node", "swap_inputs",
]  # fmt: skip


@st.composite
def mutated_models(draw: st.DrawFn) -> tuple[onnx.ModelProto, str]:
    """A random model with one mutation applied, and the mutation's name."""
    model = draw(random_models())
    graph = model.graph
    mutation = draw(st.sampled_from(MUTATIONS))
    nodes = list(graph.node)
    node = nodes[draw(st.integers(0, len(nodes) - 1))]
    if mutation == "drop_input":
        del graph.input[0]
    elif mutation in ("wrong_dims", "dynamic_dims"):
        dims = graph.input[0].type.tensor_type.shape.dim
        dim = dims[draw(st.integers(0, len(dims) - 1))]
        if mutation == "dynamic_dims":
            dim.ClearField("dim_value")
            dim.dim_param = draw(st.sampled_from(["N", "height", "?", ""]))
        else:
            dim.dim_value = draw(st.sampled_from([0, 1, 2, 5, 7, 2**31]))
        if draw(st.booleans()):
            dims.add().dim_value = 1  # a rank the graph does not expect
    elif mutation == "attribute":
        name = draw(st.sampled_from(["axis", "group", "kernel_shape", "strides", "pads", "dilations", "perm",
                                     "alpha", "transB", "epsilon", "auto_pad", "unknown_attr"]))  # fmt: skip
        kept = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend([*kept, _random_attribute(draw, name)])
    elif mutation == "drop_initializer" and len(graph.initializer):
        del graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
    elif mutation == "reshape_initializer" and len(graph.initializer):
        tensor = graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
        dims = list(tensor.dims) or [1]
        dims[draw(st.integers(0, len(dims) - 1))] = draw(st.sampled_from([0, 1, 3, 1000]))
        del tensor.dims[:]
        tensor.dims.extend(dims)
    elif mutation == "dangling_output":
        node.output[0] = "dangling"
    elif mutation == "unknown_op":
        node.op_type = draw(st.sampled_from(["Frobnicate", "Relu", "Conv", "Gemm", "Concat", "If", "Loop", "Softmax"]))
    elif mutation == "custom_domain":
        node.domain = "com.example"
        model.opset_import.add(domain="com.example", version=1)
    elif mutation == "input_dtype":
        graph.input[0].type.tensor_type.elem_type = draw(st.sampled_from(
            [TensorProto.INT64, TensorProto.STRING, TensorProto.BOOL, TensorProto.FLOAT16, TensorProto.UINT8, 0]
        ))  # fmt: skip
    elif mutation == "duplicate_node":
        graph.node.append(onnx.NodeProto.FromString(node.SerializeToString()))
    elif mutation == "no_outputs":
        del graph.output[:]
    elif mutation == "opset":
        model.opset_import[0].version = draw(st.sampled_from([1, 6, 11, 99]))
    elif mutation == "drop_node":
        graph.node.remove(node)
    elif mutation == "swap_inputs" and len(node.input) > 1:
        node.input[0], node.input[1] = node.input[1], node.input[0]
    return model, mutation


#: Each subcommand a mutated model meets, as an argument template (``@M@`` is the model).
MODEL_COMMANDS = [
    ["inspect", "@M@", "--members"],
    ["permute", "@M@", "-o", "@OUT@/p.onnx"],
    ["permute", "@M@", "-o", "@OUT@/p.onnx", "--verify", "--provider", "cpu"],
    ["verify", "@M@", "@M@", "--provider", "cpu"],
    ["verify", "@POOL@/cnn.onnx", "@M@", "--provider", "cpu"],
    ["perturb", "@M@", "-o", "@OUT@/n.onnx", "--noise", "0.1", "--quantize", "4"],
    ["watermark", "embed", "@M@", "--layer", "conv0", "--bits", "4", "-o", "@OUT@/w.onnx", "--key-out", "@OUT@/w.npz"],
    ["watermark", "extract", "@M@", "--key", "@POOL@/wm.npz"],
    ["resync", "@M@", "@M@", "-o", "@OUT@/r.onnx"],
    ["match", "@M@", "@POOL@/cnn.onnx"],
    ["audit", "@M@", "@M@"],
    ["unpermute", "@M@", "--key", "@POOL@/cnn_p.onnx.key.json", "-o", "@OUT@/u.onnx"],
]


@settings(max_examples=MODEL_EXAMPLES, **FUZZ_SETTINGS)
@given(case=mutated_models(), command=st.sampled_from(MODEL_COMMANDS))
def test_mutated_models(pool: Pool, case: tuple[onnx.ModelProto, str], command: list[str]) -> None:
    """Random small models, each broken one way, given to a random subcommand, keep the invariant."""
    model, _ = case
    with tempfile.TemporaryDirectory(dir=pool.folder.parent, prefix="fuzz_model_") as folder:
        path = Path(folder) / "m.onnx"
        path.write_bytes(model.SerializeToString())
        before = path.read_bytes()
        run_case([arg.replace("@M@", str(path)) for arg in command], pool)
        assert path.read_bytes() == before, f"the model was changed by {command}"


# -- the real entry point ---------------------------------------------------------------------
@settings(max_examples=SUBPROCESS_EXAMPLES, **FUZZ_SETTINGS)
@given(argv=st.sampled_from(sorted(COMMANDS)).flatmap(argument_vectors))
def test_entry_point_sample(pool: Pool, argv: list[str]) -> None:
    """A sample of the argument vectors through ``python -m onnxlady``: the same invariant."""
    run_case(argv, pool, subprocess_run=True)


# -- the cases issue 13 names ------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["permute", "@POOL@/cnn.onnx", "-o", "@OUT@/p.onnx", "--seed", "-1"],
        ["permute", "@POOL@/cnn.onnx", "-o", "@OUT@/p.onnx", "--seed", str(2**64)],
        [
            "watermark",
            "embed",
            "@POOL@/cnn.onnx",
            "--layer",
            "c2",
            "--seed",
            "-1",
            "-o",
            "@OUT@/w.onnx",
            "--key-out",
            "@OUT@/w.npz",
        ],
        [
            "watermark",
            "embed",
            "@POOL@/cnn.onnx",
            "--layer",
            "c2",
            "--seed",
            str(10**23),
            "-o",
            "@OUT@/w.onnx",
            "--key-out",
            "@OUT@/w.npz",
        ],
        ["perturb", "@POOL@/cnn.onnx", "-o", "@OUT@/n.onnx", "--noise", "0.1", "--seed", str(2**63)],
        ["verify", "@POOL@/cnn.onnx", "@POOL@/cnn.onnx", "--input-seed", str(2**63)],
        ["verify", "@POOL@/cnn.onnx", "@POOL@/cnn.onnx", "--atol", "inf"],
        ["audit", "@POOL@/cnn.onnx", "@POOL@/cnn.onnx", "--rtol", "inf"],
        ["audit", "@POOL@/cnn.onnx", "@POOL@/cnn.onnx", "--rtol", "nan"],
        ["demo", "--seed", "-1"],
        ["verify", "@POOL@/dyn.onnx", "@POOL@/dyn.onnx", "--shape", "images:1x3x100000x100000"],
        # The check cannot run (the loader fails): the model, its .data file and key are kept, all named.
        [
            "permute",
            "@POOL@/cnn.onnx",
            "-o",
            "@OUT@/o.onnx",
            "--external-data",
            "--verify",
            "--data-loader-script",
            "@POOL@/loader.py:broken",
        ],
    ],
    ids=lambda argv: " ".join(a.replace("@POOL@/", "") for a in argv[:1] + argv[-2:]),
)
def test_named_cases_exit_2(pool: Pool, argv: list[str]) -> None:
    """Each was an internal error (exit 3), accepted a value it should refuse, or left a file unnamed."""
    with tempfile.TemporaryDirectory(dir=pool.folder.parent, prefix="fuzz_out_") as temporary:
        out_dir = Path(temporary)
        concrete = [arg.replace("@POOL@", str(pool.folder)).replace("@OUT@", str(out_dir)) for arg in argv]
        before = pool.fingerprint()
        outcome = run_in_process(concrete)
        check_invariant(concrete, outcome, out_dir, before, pool.fingerprint())
        assert outcome.code == 2, outcome.err


def test_pool_is_what_the_cases_expect(pool: Pool) -> None:
    """The valid picks really are valid: the generated cases reach past argument checking."""
    for argv in (
        ["permute", "@POOL@/cnn.onnx", "-o", "@OUT@/p.onnx", "--verify", "--provider", "cpu",
         "--load-inputs", "@POOL@/feeds.npz"],
        ["verify", "@POOL@/cnn.onnx", "@POOL@/cnn_p.onnx", "--provider", "cpu",
         "--data-loader-script", "@POOL@/loader.py"],
        ["unpermute", "@POOL@/cnn_p.onnx", "--key", "@POOL@/cnn_p.onnx.key.json", "-o", "@OUT@/u.onnx"],
        ["watermark", "extract", "@POOL@/cnn_wm.onnx", "--key", "@POOL@/wm.npz"],
        ["perturb", "@POOL@/cnn.onnx", "-o", "@OUT@/n.onnx", "--noise", "0.1", "--only", "g0"],
        ["find", "@POOL@/cnn_p.onnx", "--index", "@POOL@/reg.idx"],
    ):  # fmt: skip
        with tempfile.TemporaryDirectory(dir=pool.folder.parent) as temporary:
            concrete = [a.replace("@POOL@", str(pool.folder)).replace("@OUT@", temporary) for a in argv]
            outcome = run_in_process(concrete)
            assert outcome.code in (0, 1), (argv, outcome.err)
