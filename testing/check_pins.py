"""Check the pinned environment: installed torch/transformers and requirements.txt == environment.yml.

Run: python testing/check_pins.py   (exit 1 on a mismatch; `make install` runs it)
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PINNED = {"torch": "2.5.1", "transformers": "4.55.2"}
PIN = re.compile(r"^\s*(?:-\s+)?([A-Za-z0-9_.\-]+)(?:==|=)([0-9][A-Za-z0-9_.]*)\s*$")


def read_pins(path: Path) -> dict[str, str]:
    """``name -> version`` for every ``name==version`` (pip) or ``- name=version`` (conda) line."""
    pins = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line.split("#")[0])
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    pins["torch"] = pins.pop("pytorch", pins.get("torch"))
    pins.pop("python", None)
    pins.pop("pytorch-cuda", None)
    return {k: v for k, v in pins.items() if v}


def pin_problems(root: Path = ROOT) -> list[str]:
    """Differences between requirements.txt and environment.yml, and wrong installed versions."""
    req, env = read_pins(root / "requirements.txt"), read_pins(root / "environment.yml")
    problems = [f"{name}: requirements.txt has {req.get(name)}, environment.yml has {env.get(name)}"
                for name in sorted(set(req) | set(env)) if req.get(name) != env.get(name)]
    for name, version in PINNED.items():
        if req.get(name) != version:
            problems.append(f"requirements.txt must pin {name}=={version}")
        installed = metadata.version(name)
        if installed.split("+")[0] != version:
            problems.append(f"{name} {installed} is installed, the project needs {version}: "
                            f"pip install {name}=={version} (another package may have upgraded it)")
    return problems


def main() -> int:
    problems = pin_problems()
    for p in problems:
        print(f"FAIL {p}")
    if not problems:
        print(f"PASS pins: torch {metadata.version('torch')}, transformers {metadata.version('transformers')}, "
              "requirements.txt == environment.yml")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
