"""PASS / WARN / FAIL / SKIP reports for the testing scripts.

A check is a plain function. It passes when it returns and fails when it raises.
Inside a check, ``skip(reason)`` skips it, ``warn(message)`` marks a problem that is
not a failure, and ``note(message)`` adds a detail line to the report.

pytest runs the same functions as tests (a warning shows in pytest's summary). A
script runs them with ``run(sections, fixtures)``, which prints one line per check,
a summary, and returns the exit code: 0 only when nothing failed.

Fixtures: a check's arguments are filled by name. Under pytest they are pytest
fixtures; under ``run`` they come from ``fixtures`` (name -> zero-argument
function, called once, on first use). ``tmp_path`` is always available.
"""

from __future__ import annotations

import inspect
import shutil
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Iterable

import pytest

STATUSES = ("PASS", "WARN", "FAIL", "SKIP")
_notes: list[str] | None = None  # collects note() lines while run() executes a check


class CheckWarning(UserWarning):
    """A problem worth reading that does not fail the check."""


def warn(message: str) -> None:
    """Mark the running check as WARN (a pytest warning under pytest)."""
    warnings.warn(message, CheckWarning, stacklevel=2)


def skip(reason: str) -> None:
    """Stop the running check and mark it SKIP with ``reason``."""
    __tracebackhide__ = True  # pytest names the check, not this line
    pytest.skip(reason)


def note(message: str) -> None:
    """A detail line under the check in the report (printed, so pytest -s shows it)."""
    if _notes is None:
        print(message)
    else:
        _notes.append(message)


def title(check: Callable) -> str:
    """The first docstring line, else the function name."""
    doc = (check.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else check.__name__


def _where(err: BaseException) -> str:
    frame = traceback.extract_tb(err.__traceback__)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}"


class _Fixtures:
    """Lazy fixture values; a failing fixture fails each check that uses it."""

    def __init__(self, factories: dict[str, Callable[[], object]]):
        self.factories = factories
        self.values: dict[str, object] = {}
        self.errors: dict[str, BaseException] = {}

    def get(self, name: str, tmp_dirs: list[Path]) -> object:
        if name == "tmp_path":
            tmp_dirs.append(Path(tempfile.mkdtemp(prefix="check-")))
            return tmp_dirs[-1]
        if name not in self.factories:
            raise RuntimeError(f"The report runner has no fixture {name!r}.")
        if name in self.errors:
            raise RuntimeError(f"fixture {name!r} failed earlier: {self.errors[name]}")
        if name not in self.values:
            try:
                self.values[name] = self.factories[name]()
            except Exception as err:  # remembered and re-raised for every check that needs it
                self.errors[name] = err
                raise
        return self.values[name]


def run_check(check: Callable, fixtures: _Fixtures) -> tuple[str, str, list[str], float]:
    """Run one check: ``(status, message, notes, seconds)``."""
    global _notes
    _notes, tmp_dirs, start = [], [], time.perf_counter()
    warned: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always", CheckWarning)
        show_other = warnings.showwarning

        def show(message, category, *args, **kwargs):  # collect ours, print the others as usual
            if issubclass(category, CheckWarning):
                warned.append(str(message))
            else:
                show_other(message, category, *args, **kwargs)

        warnings.showwarning = show
        try:
            kwargs = {name: fixtures.get(name, tmp_dirs) for name in inspect.signature(check).parameters}
            check(**kwargs)
            status, message = "PASS", ""
        except pytest.skip.Exception as err:
            status, message = "SKIP", err.msg
        except Exception as err:  # a failing check is reported, not hidden
            lines = (str(err).strip() or type(err).__name__).splitlines()
            lines[0] += f"  [{type(err).__name__} at {_where(err)}]"
            status, message = "FAIL", "\n".join(lines)
        finally:
            notes, _notes = _notes, None
            for folder in tmp_dirs:
                shutil.rmtree(folder, ignore_errors=True)
    if warned and status == "PASS":
        status, message = "WARN", warned.pop(0)
    notes += [f"WARN: {w}" for w in warned]
    return status, message, notes, time.perf_counter() - start


def run(sections: dict[str, Iterable[Callable]], fixtures: dict[str, Callable[[], object]] | None = None,
        budget_s: float = 120.0, results: list[dict] | None = None) -> int:
    """Print every check of every section, then a summary. Returns the exit code.

    ``results``, when given, receives one dict per check (section, check, status, message, seconds).
    """
    start = time.perf_counter()
    counts = dict.fromkeys(STATUSES, 0)
    failed: list[str] = []
    lazy = _Fixtures(fixtures or {})
    for section, checks in sections.items():
        print(f"\n== {section} ==", flush=True)
        for check in checks:
            status, message, notes, seconds = run_check(check, lazy)
            counts[status] += 1
            if results is not None:
                results.append({"section": section, "check": title(check), "status": status,
                                "message": message, "seconds": round(seconds, 2)})
            if status == "FAIL":
                failed.append(title(check))
            head, *rest = message.splitlines() or [""]
            print(f"  {status}  {title(check)} ({seconds:.1f} s)" + (f": {head}" if head else ""), flush=True)
            for extra in rest + notes:
                for part in extra.splitlines():
                    print(f"        {part}")
    total = time.perf_counter() - start
    code = 1 if counts["FAIL"] else 0
    print("\n== Summary ==\n  " + ", ".join(f"{counts[s]} {s}" for s in STATUSES) + f" in {total:.1f} s")
    if total > budget_s:
        print(f"  WARN  took {total:.0f} s, more than the {budget_s:.0f} s budget")
    for name in failed:
        print(f"  failed: {name}")
    print(f"  exit code {code}")
    return code
