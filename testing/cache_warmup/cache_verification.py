"""Check the project cache against its manifest, load each model offline, time the loads.

The manifest (``<cache root>/manifest.json``) is written by test_cache_warmup.py. Each item
has ``kind`` (model or dataset), ``name``, ``path`` (relative to the cache root), ``size``,
``sha256`` and ``repair`` (the command that downloads or rebuilds the file).

    python testing/cache_warmup/cache_verification.py [--cache-dir DIR] [--quick] [--models NAMES]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import constants  # noqa: E402
from testing import report  # noqa: E402

MANIFEST_VERSION = 1
WARMUP = "python testing/cache_warmup/test_cache_warmup.py"

# --- files and the manifest (test_cache_warmup.py imports these) --------------


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    """sha256 of a file's bytes (a symlink is followed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def human(size: float) -> str:
    """Bytes as text: ``1.5 GB``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def folder_size(folder: Path) -> int:
    """Bytes of the regular files under ``folder`` (symlinks not followed, so hub blobs count once)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def manifest_item(path: Path, root: Path, kind: str, name: str, repair: str, sha256: str | None = None) -> dict:
    """One manifest entry for a file under ``root``."""
    return {
        "kind": kind, "name": name, "path": path.relative_to(root).as_posix(), "size": path.stat().st_size,
        "sha256": sha256 or sha256_file(path), "repair": repair,
    }


def read_manifest(paths: constants.CachePaths) -> dict:
    """The manifest; a clear error with the warm-up command when it is missing."""
    if not paths.manifest.is_file():
        raise FileNotFoundError(
            f"No manifest at {paths.manifest}. Create it with: {WARMUP} --cache-dir {paths.root} "
            f"(add --offline without network)"
        )
    manifest = json.loads(paths.manifest.read_text())
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{paths.manifest} has version {manifest.get('version')}, expected {MANIFEST_VERSION}. "
                         f"Rewrite it with: {WARMUP} --cache-dir {paths.root}")
    return manifest


def update_manifest(paths: constants.CachePaths, name: str, items: list[dict]) -> Path:
    """Replace the entries of ``name`` with ``items`` (atomic write)."""
    manifest = read_manifest(paths) if paths.manifest.is_file() else {"version": MANIFEST_VERSION, "items": []}
    kept = [item for item in manifest["items"] if item["name"] != name]
    manifest.update(root=str(paths.root), updated=time.strftime("%Y-%m-%d %H:%M:%S"),
                    items=sorted(kept + items, key=lambda i: (i["kind"], i["name"], i["path"])))
    paths.manifest.parent.mkdir(parents=True, exist_ok=True)
    tmp = paths.manifest.with_name(f".{paths.manifest.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, paths.manifest)
    return paths.manifest


def item_problem(item: dict, root: Path, hash_files: bool = True) -> str | None:
    """Why a manifest item does not match the file on disk, or None."""
    path = root / item["path"]
    if not path.is_file():
        return f"{item['path']}: missing"
    size = path.stat().st_size
    if size != item["size"]:
        return f"{item['path']}: size {size} != {item['size']} in the manifest"
    if hash_files and sha256_file(path) != item["sha256"]:
        return f"{item['path']}: sha256 differs from the manifest (file changed or damaged)"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (header and tensor offsets), or None."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            return f"{path.name}: shorter than a safetensors header"
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(size - 8, 100 << 20):
            return f"{path.name}: header length {header_len} does not fit the file"
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return f"{path.name}: unreadable safetensors header ({err})"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    if not ends:
        return f"{path.name}: no tensors in the header"
    if 8 + header_len + max(ends) != size:
        return f"{path.name}: tensors end at byte {8 + header_len + max(ends)} but the file has {size} bytes"
    return None


# --- what is in the cache --------------------------------------------------------


def cached_models(paths: constants.CachePaths) -> dict[str, Path]:
    """Model name -> folder: embedded models and hub snapshots (``org/name``)."""
    found = {p.name: p for p in sorted(paths.models.glob("*")) if (p / "config.json").is_file()}
    for repo in sorted(paths.hub.glob("models--*")):
        found[repo.name[len("models--"):].replace("--", "/")] = repo
    return found


def cached_datasets(paths: constants.CachePaths) -> list[Path]:
    """Dataset sample files (``<cache>/datasets/<name>/<split>.feather``)."""
    return sorted(paths.datasets.glob("*/*.feather"))


def build_sections(args: argparse.Namespace, paths: constants.CachePaths) -> dict[str, list]:
    """The report sections; per-model checks are made from the manifest."""

    def check_root() -> None:
        """Cache root and free disk space"""
        assert paths.root.is_dir(), f"The cache root {paths.root} does not exist. Run {WARMUP} --cache-dir {paths.root}"
        usage = shutil.disk_usage(paths.root)
        report.note(f"root: {paths.root}")
        report.note(f"disk: {human(usage.free)} free of {human(usage.total)}")
        if usage.free < 20e9:
            report.warn(f"only {human(usage.free)} free under {paths.root} (a 3B model needs about 7 GB)")

    def check_listing() -> None:
        """Cached models and dataset samples (sizes)"""
        models, samples = cached_models(paths), cached_datasets(paths)
        assert models or samples, f"Nothing is cached under {paths.root}. Run {WARMUP} --cache-dir {paths.root}"
        listed = {item["name"] for item in read_manifest(paths)["items"]} if paths.manifest.is_file() else set()
        total = 0
        for name, folder in models.items():
            size = folder_size(folder)
            total += size
            report.note(f"model    {name:<40} {human(size):>9}  {folder}")
        for sample in samples:
            size = sample.stat().st_size
            total += size
            report.note(f"dataset  {sample.parent.name + '/' + sample.stem:<40} {human(size):>9}  {sample}")
        report.note(f"total    {human(total)}")
        unlisted = [name for name in models if name not in listed]
        if unlisted:
            report.warn(f"not in the manifest (not verified): {', '.join(unlisted)}")

    def check_manifest() -> None:
        """Manifest present and readable"""
        manifest = read_manifest(paths)
        report.note(f"{paths.manifest}: {len(manifest['items'])} files, updated {manifest.get('updated')}")

    def file_check(name: str, items: list[dict]):
        def check() -> None:
            problems = [(p, item["repair"]) for item in items if (p := item_problem(item, paths.root, not args.quick))]
            size = sum(item["size"] for item in items)
            count = f"{len(items)} file" + ("s" if len(items) != 1 else "")
            report.note(f"{count}, {human(size)}" + (" (sizes only, --quick)" if args.quick else ""))
            if problems:
                lines = [f"{problem}\n  repair: {repair}" for problem, repair in problems]
                raise AssertionError(f"{len(problems)} of {len(items)} files bad:\n" + "\n".join(lines))
        check.__doc__ = f"{items[0]['kind']} {name}: files match the manifest"
        return check

    def load_check(name: str):
        def check() -> None:
            from transformers import AutoConfig

            import utils

            source = utils.resolve_model_source(name, paths)
            config = AutoConfig.from_pretrained(source, cache_dir=paths.hub, local_files_only=True)
            tokenizer = utils.load_tokenizer(name, str(paths.root))
            ids = tokenizer("The capital of France is", add_special_tokens=False).input_ids
            assert tokenizer.decode(ids) == "The capital of France is", "tokenizer round trip changed the text"
            report.note(f"{config.model_type}, {config.num_hidden_layers} layers, vocab {len(tokenizer)}")
        check.__doc__ = f"{name}: config and tokenizer load offline"
        return check

    def time_check(name: str):
        def check() -> None:
            import gc

            import torch
            from transformers import AutoModelForCausalLM

            import utils

            device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
            source = utils.resolve_model_source(name, paths)
            seconds = []
            for _ in range(2):
                start = time.perf_counter()
                model, info = AutoModelForCausalLM.from_pretrained(
                    source, cache_dir=paths.hub, local_files_only=True, output_loading_info=True,
                    torch_dtype=utils.resolve_dtype("auto", device))
                model.to(device)
                seconds.append(time.perf_counter() - start)
                del model
                gc.collect()
            bad = {key: value for key, value in info.items() if value}  # missing, unexpected, mismatched keys
            assert not bad, f"the weights do not match the model: {bad}. Repair the files (see the manifest check above)."
            report.note(f"cold {seconds[0]:.2f} s, warm {seconds[1]:.2f} s on {device} "
                        "(cold = first load in this process; the OS may already hold the files in memory)")
        check.__doc__ = f"{name}: weights load completely; load time (cold, warm)"
        return check

    sections: dict[str, list] = {"Cache": [check_root, check_listing, check_manifest]}
    if not paths.manifest.is_file():
        return sections
    groups: dict[str, list[dict]] = {}
    for item in read_manifest(paths)["items"]:
        groups.setdefault(item["name"], []).append(item)
    models = [n for n, items in groups.items() if items[0]["kind"] == "model" and (not args.models or n in args.models)]
    sections["Files against the manifest"] = [file_check(n, items) for n, items in groups.items()
                                              if items[0]["kind"] != "model" or n in models]
    sections["Offline loading"] = [load_check(n) for n in models]
    if not args.skip_load_time:
        sections["Model load time"] = [time_check(n) for n in models]
    return sections


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", help="cache root (default: $SELF_ENSEMBLE_CACHE, the cluster folder, or ~/.cache/self-ensemble)")
    parser.add_argument("--quick", action="store_true", help="compare sizes only (no sha256; fast on big models)")
    parser.add_argument("--models", type=lambda s: s.split(","), help="comma list: check and load only these models")
    parser.add_argument("--skip-load-time", action="store_true", help="do not time model loading")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="device for the load-time check")
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: check what is cached, download nothing
    paths = constants.configure_cache(args.cache_dir)
    print(f"Cache verification: {paths.root}")
    return report.run(build_sections(args, paths))


if __name__ == "__main__":
    sys.exit(main())
