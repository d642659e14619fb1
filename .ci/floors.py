"""Print pip constraints that pin every ``name>=X`` in setup.py's install_requires to ``name==X``.

    python .ci/floors.py > floors.txt && pip install "torch==2.13.0" -c floors.txt -e ".[dev]"
    python .ci/floors.py --check      # in that venv: each package is at its floor

`make test-floors` installs these into a second virtualenv and runs the unit tests and a 2-rank
run, so the floors setup.py states are versions the code was shown to work with. torch is left
out: the only CPU build pip can get on CI's machine is 2.13.0 (any other release from PyPI is a
multi-GB CUDA build); its floor is exercised on the GPU machine instead (see README, Tests).
"""

import ast
import re
import sys
from pathlib import Path

UNPINNED = {"torch"}


def install_requires(setup_py: Path) -> list[str]:
    for node in ast.walk(ast.parse(setup_py.read_text(encoding="utf-8"))):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return [ast.literal_eval(e) for e in node.value.elts]
    raise SystemExit(f"{setup_py}: no install_requires list")


def floors() -> dict[str, str]:
    """``{name: floor}`` of every ``name>=X`` requirement in setup.py."""
    setup_py = Path(__file__).resolve().parents[1] / "setup.py"
    out = {}
    for req in install_requires(setup_py):
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][A-Za-z0-9.]*)", req)
        if m:
            out[m[1]] = m[2]
    return out


def check() -> None:
    """In the floors venv: every pinned package is installed at its floor; print what was tested."""
    from importlib.metadata import version

    from packaging.version import Version

    wrong, seen = [], []
    for name, floor in floors().items():
        have = version(name)
        seen.append(f"{name} {have}")
        if name not in UNPINNED and Version(have) != Version(floor):
            wrong.append(f"{name} {have} (floor {floor})")
    print(f"floors venv: {', '.join(seen)}")
    if wrong:
        raise SystemExit(f"not at the floor: {', '.join(wrong)}")


def main() -> None:
    if sys.argv[1:] == ["--check"]:
        return check()
    for name, floor in floors().items():
        if name not in UNPINNED:
            print(f"{name}=={floor}")


if __name__ == "__main__":
    main()
