"""Report on this machine: system, packages against the pins, CUDA devices, small benchmarks.

    python testing/environment/environment_report.py --output /tmp/env_report.md

--output writes the report as Markdown and, next to it, as JSON (same name, .json).
Benchmarks are small (a few seconds): matmul GFLOP/s (float32, bfloat16), SDPA against
eager FlexAttention (and compiled FlexAttention on CUDA), host <-> device copy speed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import constants  # noqa: E402
from testing import report  # noqa: E402
from testing.environment.test_environment import pins  # noqa: E402

SEQ_LENS = (256, 512, 1024)


def timed(fn, device, min_seconds: float = 0.2, max_runs: int = 50) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    runs: list[float] = []
    while sum(runs) < min_seconds and len(runs) < max_runs:
        start = time.perf_counter()
        fn()
        sync()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def devices() -> list:
    import torch

    return [torch.device("cpu")] + [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]


def meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in bytes (Linux)."""
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":")
        fields[key] = int(value.split()[0]) * 1024
    return fields


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def gib(size: float) -> float:
    return round(size / 2**30, 1)


def build_sections(data: dict, paths: constants.CachePaths) -> dict[str, list]:
    """Checks that fill ``data`` (the JSON report) and print what they find."""

    def check_system() -> None:
        """Operating system, CPU, memory, disk, Python"""
        system = data["system"] = {
            "os": platform.platform(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": sys.version.split()[0], "python_executable": sys.executable,
            "conda_env": os.environ.get("CONDA_DEFAULT_ENV"), "cache_root": str(paths.root),
        }
        if Path("/proc/meminfo").is_file():
            mem = meminfo()
            system.update(ram_total_gib=gib(mem["MemTotal"]), ram_available_gib=gib(mem.get("MemAvailable", 0)))
        disk_path = paths.root if paths.root.exists() else Path.home()
        usage = shutil.disk_usage(disk_path)
        system.update(disk_path=str(disk_path), disk_free_gib=gib(usage.free), disk_total_gib=gib(usage.total))
        for key, value in system.items():
            report.note(f"{key:<18} {value}")

    def check_packages() -> None:
        """Package versions against requirements.txt"""
        rows, differ = [], []
        for dist, pinned in pins().items():
            try:
                installed = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                installed = None
            ok = installed is not None and installed.split("+")[0] == pinned
            rows.append({"package": dist, "installed": installed, "pinned": pinned, "ok": ok})
            report.note(f"{dist:<20} {str(installed):<14} pin {pinned}{'' if ok else '   <- differs'}")
            if not ok:
                differ.append(f"{dist} {installed} (pin {pinned})")
        data["packages"] = rows
        if differ:
            report.warn(f"differ from the pins: {', '.join(differ)}. Install the pins: pip install -r requirements.txt")

    def check_cuda() -> None:
        """CUDA devices, memory, FlexAttention compile"""
        import torch

        data["cuda"] = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda, "devices": []}
        if not torch.cuda.is_available():
            report.skip(f"CUDA is not available (torch {torch.__version__} built for CUDA {torch.version.cuda})")
        for device in devices()[1:]:
            props = torch.cuda.get_device_properties(device)
            free, total = torch.cuda.mem_get_info(device)
            info = {"device": str(device), "name": props.name, "capability": f"{props.major}.{props.minor}",
                    "memory_gib": gib(total), "free_gib": gib(free), "bf16": torch.cuda.is_bf16_supported(),
                    "flex_compile": flex_compile_status(device)}
            data["cuda"]["devices"].append(info)
            report.note(", ".join(f"{k} {v}" for k, v in info.items()))

    def check_matmul() -> None:
        """Matmul speed (GFLOP/s)"""
        import torch

        rows = []
        for device in devices():
            for dtype in (torch.float32, torch.bfloat16):
                n = 1024 if device.type == "cpu" else 4096
                a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
                seconds = timed(lambda: a @ b, device)
                rows.append({"device": str(device), "dtype": str(dtype).split(".")[-1], "n": n,
                             "gflops": round(2 * n**3 / seconds / 1e9, 1)})
                report.note(f"{device} {rows[-1]['dtype']:<8} {n}x{n}: {rows[-1]['gflops']} GFLOP/s")
        data.setdefault("benchmarks", {})["matmul"] = rows

    def check_attention() -> None:
        """SDPA vs eager FlexAttention (causal, 8 heads, head size 64)"""
        import torch
        import torch.nn.functional as F
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        rows = []
        for device in devices():
            compiled = torch.compile(flex_attention) if device.type == "cuda" else None
            for length in SEQ_LENS:
                q, k, v = (torch.randn(1, 8, length, 64, device=device) for _ in range(3))
                mask = create_block_mask(lambda b, h, qi, kv: qi >= kv, None, None, length, length, device=str(device))
                row = {"device": str(device), "seq_len": length,
                       "sdpa_ms": timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), device) * 1e3,
                       "flex_eager_ms": timed(lambda: flex_attention(q, k, v, block_mask=mask), device) * 1e3}
                if compiled is not None:
                    row["flex_compiled_ms"] = timed(lambda: compiled(q, k, v, block_mask=mask), device) * 1e3
                rows.append({key: round(value, 2) if isinstance(value, float) else value for key, value in row.items()})
                report.note(", ".join(f"{key} {value}" for key, value in rows[-1].items()))
        data.setdefault("benchmarks", {})["attention"] = rows

    def check_copy() -> None:
        """Host <-> device copy speed (pinned memory, 256 MiB)"""
        import torch

        if not torch.cuda.is_available():
            report.skip("CUDA is not available")
        rows = []
        for device in devices()[1:]:
            host = torch.empty(64 * 2**20, dtype=torch.float32).pin_memory()
            gpu = torch.empty_like(host, device=device)
            size_gb = host.numel() * 4 / 1e9
            to_device = timed(lambda: gpu.copy_(host, non_blocking=True), device)
            to_host = timed(lambda: host.copy_(gpu, non_blocking=True), device)
            rows.append({"device": str(device), "host_to_device_gbs": round(size_gb / to_device, 1),
                         "device_to_host_gbs": round(size_gb / to_host, 1)})
            report.note(", ".join(f"{key} {value}" for key, value in rows[-1].items()))
        data.setdefault("benchmarks", {})["copy"] = rows

    return {
        "System": [check_system], "Packages": [check_packages], "CUDA": [check_cuda],
        "Benchmarks": [check_matmul, check_attention, check_copy],
    }


def flex_compile_status(device) -> str:
    """``ok (N s)`` when torch.compile(flex_attention) runs on ``device``, else the error."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q = torch.randn(1, 2, 256, 64, device=device)
    mask = create_block_mask(lambda b, h, qi, kv: qi >= kv, None, None, 256, 256, device=str(device))
    start = time.perf_counter()
    try:
        torch.compile(flex_attention)(q, q, q, block_mask=mask)
        torch.cuda.synchronize(device)
    except Exception as err:  # the answer to "can it compile here?" is this error; it is reported
        return f"fails: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return f"ok ({time.perf_counter() - start:.0f} s)"


def to_markdown(data: dict) -> str:
    """The JSON report as Markdown tables."""

    def table(rows: list[dict]) -> list[str]:
        if not rows:
            return ["(none)", ""]
        keys = list(rows[0])
        return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] + [
            "| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows] + [""]

    lines = [f"# Environment report ({data['created']})", ""]
    if "system" in data:
        lines += ["## System", ""] + table([{"item": k, "value": v} for k, v in data["system"].items()])
    lines += ["## Packages", ""] + table(data.get("packages", []))
    cuda = data.get("cuda", {})
    lines += ["## CUDA", "", f"available: {cuda.get('available')}, torch built for CUDA {cuda.get('torch_cuda')}", ""]
    lines += table(cuda.get("devices", []))
    for name, rows in data.get("benchmarks", {}).items():
        lines += [f"## Benchmark: {name}", ""] + table(rows)
    lines += ["## Checks", ""] + table(data.get("checks", []))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", help="Markdown file; the JSON goes next to it (default: print only)")
    parser.add_argument("--cache-dir", help="cache root whose disk is reported")
    args = parser.parse_args(argv)
    paths = constants.configure_cache(args.cache_dir)
    data: dict = {"created": time.strftime("%Y-%m-%d %H:%M:%S")}
    print("Environment report")
    sections = build_sections(data, paths)
    data["checks"] = []
    code = report.run(sections, results=data["checks"])
    if args.output:
        markdown = Path(args.output).with_suffix(".md")
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(to_markdown(data))
        markdown.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
        print(f"  written: {markdown} and {markdown.with_suffix('.json')}")
    else:
        print("  (use --output FILE.md to save the report as Markdown and JSON)")
    return code


if __name__ == "__main__":
    sys.exit(main())
