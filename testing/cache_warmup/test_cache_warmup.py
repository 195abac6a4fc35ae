"""Warm the project cache: download a model and dataset samples, verify them, write the manifest.

    python testing/cache_warmup/test_cache_warmup.py [--model Qwen/Qwen2.5-3B-Instruct] [--num-samples 10]
    python testing/cache_warmup/test_cache_warmup.py --offline     # no network: embedded model + fixtures

Online, every file of the model snapshot is checked against the size and sha256 the
hub lists, and each safetensors header is read. Without network the script says so in
one line and exits 2 (unless --offline). The manifest it writes is what
cache_verification.py checks later.

Under pytest this file tests the download path without the internet: a small hub on
127.0.0.1 serves an embedded model, the script downloads it for real, and a changed
byte in the cached weights must be found.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

import constants  # noqa: E402
from testing import report  # noqa: E402
from testing.cache_warmup import cache_verification as cv  # noqa: E402

SCRIPT = Path(__file__).resolve()
DATASET_SPLITS = {"webqa": ("train", "test"), "myriadlama": ("train",)}
FIXTURE_SPLITS = {
    ("webqa", "train"): constants.FIXTURE_WEBQA_TRAIN,
    ("webqa", "test"): constants.FIXTURE_FILES["webqa"],
    ("myriadlama", "train"): constants.FIXTURE_FILES["myriadlama"],
}

# --- command line ---------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=constants.MODELS[constants.DEFAULT_MODEL],
                        help="hub id or registry name to download (default: %(default)s)")
    parser.add_argument("--num-samples", type=int, default=10, help="rows kept of each dataset split (default: 10)")
    parser.add_argument("--cache-dir", help="cache root (default: $SELF_ENSEMBLE_CACHE, the cluster folder, or ~/.cache/self-ensemble)")
    parser.add_argument("--offline", action="store_true",
                        help="no network: build the embedded models and copy the fixture datasets instead")
    parser.add_argument("--force", action="store_true", help="download (or rebuild) even what is cached; repairs damaged files")
    parser.add_argument("--only", choices=("all", "model", "datasets"), default="all", help="what to warm (default: all)")
    return parser


def cache_source(cache_dir: str | None) -> str:
    """Where the cache root came from, in words."""
    if cache_dir:
        return "--cache-dir"
    if os.environ.get(constants.CACHE_ENV):
        return f"${constants.CACHE_ENV}"
    if constants.resolve_cache_root() == constants.CLUSTER_CACHE:
        return "the cluster folder"
    return "the home default (no --cache-dir, no $SELF_ENSEMBLE_CACHE, no cluster folder)"


def hub_unreachable() -> str | None:
    """None when the hub endpoint answers; else one line that says why not."""
    from huggingface_hub import constants as hub_constants

    if hub_constants.HF_HUB_OFFLINE:
        return "No network: HF_HUB_OFFLINE=1 is set, so nothing was downloaded. Unset it, or pass --offline."
    import requests

    try:
        requests.head(hub_constants.ENDPOINT, timeout=5)
    except (requests.ConnectionError, requests.Timeout) as err:
        return (f"No network: cannot reach {hub_constants.ENDPOINT} ({type(err).__name__}), so nothing was "
                f"downloaded. Pass --offline to warm the embedded model and the fixture datasets instead.")
    return None


def repair_command(args: argparse.Namespace, paths: constants.CachePaths, what: str) -> str:
    mode = " --offline" if args.offline else ""
    model = "" if args.offline or what == "datasets" else f" --model {args.model}"
    samples = f" --num-samples {args.num_samples}" if what == "datasets" else ""
    return f"{cv.WARMUP}{mode}{model} --only {what}{samples} --force --cache-dir {paths.root}"


# --- model: hub download or embedded build --------------------------------------


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file (the hub's ``blobId`` and ETag for files not in LFS)."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    digest.update(path.read_bytes())
    return digest.hexdigest()


def download_snapshot(repo_id: str, paths: constants.CachePaths, force: bool) -> Path:
    """``snapshot_download`` into the project hub cache; the snapshot folder."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, cache_dir=paths.hub, force_download=force))


def hub_files(repo_id: str, revision: str) -> list:
    """The hub's file list at ``revision`` with sizes, blob ids and LFS sha256 (``RepoSibling``)."""
    from huggingface_hub import HfApi

    return HfApi().model_info(repo_id, revision=revision, files_metadata=True).siblings


def hub_file_problem(path: Path, sibling) -> tuple[str | None, str | None]:
    """``(problem, sha256)`` of a downloaded file against the hub's metadata."""
    if not path.is_file():
        return f"{sibling.rfilename}: missing from the snapshot", None
    size = path.stat().st_size
    expected = sibling.lfs.size if sibling.lfs else sibling.size
    if expected is not None and size != expected:
        return f"{sibling.rfilename}: size {size} != {expected} on the hub", None
    sha256 = cv.sha256_file(path)
    if sibling.lfs and sha256 != sibling.lfs.sha256:
        return f"{sibling.rfilename}: sha256 {sha256[:12]}... != {sibling.lfs.sha256[:12]}... on the hub", sha256
    if not sibling.lfs and sibling.blob_id and git_blob_sha1(path) != sibling.blob_id:
        return f"{sibling.rfilename}: git blob id differs from the hub", sha256
    if path.suffix == ".safetensors" and (problem := cv.safetensors_problem(path)):
        return problem, sha256
    return None, sha256


def model_checks(args: argparse.Namespace, paths: constants.CachePaths) -> list:
    repo_id = constants.resolve_model_id(args.model)
    repair = repair_command(args, paths, "model")

    def check_download(snapshot: Path) -> None:
        """Model snapshot downloaded into the hub cache"""
        files = [p for p in snapshot.rglob("*") if p.is_file()]
        report.note(f"{repo_id} -> {snapshot}")
        report.note(f"{len(files)} files, {cv.human(sum(p.stat().st_size for p in files))}")

    def check_hub_integrity(snapshot: Path) -> None:
        """Every file has the size and sha256 the hub lists; safetensors headers read"""
        problems, items, siblings = [], [], hub_files(repo_id, revision=snapshot.name)  # the folder is the commit
        for sibling in siblings:
            path = snapshot / sibling.rfilename
            problem, sha256 = hub_file_problem(path, sibling)
            if problem:
                problems.append(problem)
            else:
                items.append(cv.manifest_item(path, paths.root, "model", repo_id, repair, sha256))
        lfs = sum(1 for s in siblings if s.lfs)
        report.note(f"{len(siblings)} files on the hub ({lfs} in LFS, checked by sha256; others by size and git blob id)")
        assert not problems, "\n".join(problems + [f"repair: {repair}"])
        report.note(f"manifest updated: {cv.update_manifest(paths, repo_id, items)}")

    return [check_download, check_hub_integrity]


def embedded_checks(args: argparse.Namespace, paths: constants.CachePaths) -> list:
    repair = repair_command(args, paths, "model")

    def make(name: str):
        def check() -> None:
            import utils

            folder = paths.models / name
            if args.force and folder.exists():
                shutil.rmtree(folder)
            folder = utils.ensure_embedded_model(name, paths)
            json.loads((folder / "config.json").read_text())
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            bad = [p for f in files if f.suffix == ".safetensors" and (p := cv.safetensors_problem(f))]
            assert not bad, "\n".join(bad + [f"repair: {repair}"])
            report.note(f"{folder}: {len(files)} files, {cv.human(sum(f.stat().st_size for f in files))}")
            recorded = [] if args.force or not paths.manifest.is_file() else [
                item for item in cv.read_manifest(paths)["items"] if item["name"] == name]
            if recorded:
                problems = [p for item in recorded if (p := cv.item_problem(item, paths.root))]
                assert not problems, "\n".join(problems + [f"repair: {repair}"])
                report.note(f"matches the {len(recorded)} files recorded in the manifest")
                return
            items = [cv.manifest_item(f, paths.root, "model", name, repair) for f in files]
            cv.update_manifest(paths, name, items)
            report.note("first record in the manifest: later runs and cache_verification.py compare against it")
        check.__doc__ = f"Embedded model {name}: built, safetensors readable, recorded"
        return check

    return [make(name) for name in constants.EMBEDDED_MODELS]


# --- datasets ------------------------------------------------------------------------


def fetch_sample(dataset: str, split: str, n: int, paths: constants.CachePaths):
    """First ``n`` rows of a hub split, streamed (the whole dataset is not downloaded)."""
    import datasets
    import pandas as pd

    stream = datasets.load_dataset(constants.DATASETS[dataset], split=split, streaming=True,
                                   cache_dir=str(paths.hf_datasets))
    return pd.DataFrame(list(itertools.islice(stream, n)))


def dataset_checks(args: argparse.Namespace, paths: constants.CachePaths) -> list:
    repair = repair_command(args, paths, "datasets")

    def make(dataset: str, split: str):
        def check() -> None:
            import dataset as ds
            import utils

            if args.offline:
                source = FIXTURE_SPLITS[dataset, split]
                df = ds.read_table(source).head(args.num_samples)
            else:
                source = f"{constants.DATASETS[dataset]} ({split}, streamed)"
                df = fetch_sample(dataset, split, args.num_samples, paths)
            ds.validate_columns(df, constants.DATASET_COLUMNS[dataset], str(source))
            target = utils.write_feather_atomic(df, paths.datasets / dataset / f"{split}.feather")
            saved = ds.read_table(target)
            ds.validate_columns(saved, constants.DATASET_COLUMNS[dataset], str(target))
            assert len(saved) == len(df), f"{target} has {len(saved)} rows, {len(df)} were written"
            if len(saved) < args.num_samples:
                report.warn(f"{len(saved)} rows, fewer than --num-samples {args.num_samples} (the source has no more)")
            report.note(f"{source} -> {target}: {len(saved)} rows, {cv.human(target.stat().st_size)}")
            cv.update_manifest(paths, f"{dataset}/{split}", [cv.manifest_item(target, paths.root, "dataset",
                                                                              f"{dataset}/{split}", repair)])
        check.__doc__ = f"Dataset {dataset}/{split}: first {args.num_samples} rows, hub columns"
        return check

    return [make(d, s) for d, splits in DATASET_SPLITS.items() for s in splits]


def location_check(paths: constants.CachePaths, source: str):
    def check() -> None:
        """Everything in the manifest is under the cache root"""
        root = paths.root.resolve()
        items = cv.read_manifest(paths)["items"]
        outside = [i["path"] for i in items if not (paths.root / i["path"]).resolve().is_relative_to(root)]
        report.note(f"cache root: {paths.root} (from {source})")
        report.note(f"manifest:   {paths.manifest} ({len(items)} files, {cv.human(sum(i['size'] for i in items))})")
        assert not outside, f"outside {root}: {outside}"
    return check


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source = cache_source(args.cache_dir)
    paths = constants.configure_cache(args.cache_dir)
    if not args.offline and args.model in constants.EMBEDDED_MODELS:
        print(f"{args.model} is an embedded model (not on the hub). Warm it with --offline.")
        return 2
    if not args.offline and (problem := hub_unreachable()):
        print(problem)
        return 2
    mode = "offline: embedded models and fixture datasets" if args.offline else f"hub: {args.model}"
    print(f"Cache warm-up ({mode})\nCache root: {paths.root} (from {source})")
    sections: dict[str, list] = {}
    if args.only in ("all", "model"):
        sections["Model"] = embedded_checks(args, paths) if args.offline else model_checks(args, paths)
    if args.only in ("all", "datasets"):
        sections["Datasets"] = dataset_checks(args, paths)
    sections["Cache location"] = [location_check(paths, source)]
    repo_id = constants.resolve_model_id(args.model)
    return report.run(sections, {"snapshot": lambda: download_snapshot(repo_id, paths, args.force)})


# --- pytest: the download path against a hub on 127.0.0.1 -----------------------------

LOOPBACK_REPO = "self-ensemble/tiny-llama-loopback"
LOOPBACK_MODEL = "tiny_llama"  # embedded; small, so each download takes a second


class LoopbackHub:
    """A read-only hub for one model repo, served on 127.0.0.1 (the endpoints huggingface_hub 0.34 uses)."""

    def __init__(self, repo_id: str, folder: Path):
        self.repo_id, self.requests = repo_id, []
        self.files: dict[str, dict] = {}
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            lfs = path.suffix == ".safetensors"
            etag = cv.sha256_file(path) if lfs else git_blob_sha1(path)
            self.files[path.name] = {"path": path, "size": path.stat().st_size, "lfs": lfs, "etag": etag}
        self.sha = hashlib.sha1("".join(f"{n}{f['etag']}" for n, f in self.files.items()).encode()).hexdigest()

    def model_info(self) -> dict:
        siblings = [{"rfilename": name, "size": f["size"], "blobId": git_blob_sha1(f["path"]),
                     **({"lfs": {"sha256": f["etag"], "size": f["size"], "pointerSize": 134}} if f["lfs"] else {})}
                    for name, f in self.files.items()]
        return {"id": self.repo_id, "modelId": self.repo_id, "sha": self.sha, "private": False, "siblings": siblings}

    def __enter__(self) -> "LoopbackHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet; requests are kept in hub.requests
                pass

            def do_HEAD(self) -> None:
                self.answer(body=False)

            def do_GET(self) -> None:
                self.answer(body=True)

            def reply(self, status: int, headers: dict, body: bytes | Path | None) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, str(value))
                self.end_headers()
                if isinstance(body, Path):
                    with open(body, "rb") as handle:
                        shutil.copyfileobj(handle, self.wfile)
                elif body:
                    self.wfile.write(body)

            def answer(self, body: bool) -> None:
                path = unquote(urlparse(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                api, resolve = f"/api/models/{hub.repo_id}", f"/{hub.repo_id}/resolve/"
                if path == api or path.startswith(api + "/revision/"):
                    data = json.dumps(hub.model_info()).encode()
                    return self.reply(200, {"Content-Type": "application/json", "Content-Length": len(data)},
                                      data if body else None)
                if path.startswith(resolve):
                    revision, _, name = path[len(resolve):].partition("/")
                    entry = hub.files.get(name)
                    if revision in ("main", hub.sha) and entry:
                        headers = {"X-Repo-Commit": hub.sha, "ETag": f'"{entry["etag"]}"',
                                   "Content-Length": entry["size"], "Content-Type": "application/octet-stream"}
                        if entry["lfs"]:
                            headers.update({"X-Linked-Etag": f'"{entry["etag"]}"', "X-Linked-Size": entry["size"]})
                        return self.reply(200, headers, entry["path"] if body else None)
                    code = "EntryNotFound" if revision in ("main", hub.sha) else "RevisionNotFound"
                    return self.reply(404, {"X-Error-Code": code, "Content-Length": 0}, None)
                self.reply(404, {"Content-Length": 0}, None)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def run_script(script: Path, args: list[str], endpoint: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run a script like a user does; ``endpoint`` sets HF_ENDPOINT and turns the hub on."""
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if endpoint:
        env.update(HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0")
    return subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def hub():
    import utils

    with LoopbackHub(LOOPBACK_REPO, utils.ensure_embedded_model(LOOPBACK_MODEL)) as server:
        yield server


def download(hub: LoopbackHub, cache: Path) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, ["--model", hub.repo_id, "--only", "model", "--cache-dir", str(cache)], hub.url)


def test_loopback_download(hub: LoopbackHub, tmp_path: Path) -> None:
    """snapshot_download from the loopback hub: cache layout, blobs named by hash, manifest sha256."""
    result = download(hub, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"GET /api/models/{hub.repo_id}/revision/main" in hub.requests  # snapshot_download's file list
    assert f"GET /api/models/{hub.repo_id}/revision/{hub.sha}" in hub.requests  # the sizes and sha256 checked
    assert f"GET /{hub.repo_id}/resolve/{hub.sha}/model.safetensors" in hub.requests
    repo = tmp_path / "huggingface" / "hub" / ("models--" + hub.repo_id.replace("/", "--"))
    assert (repo / "refs" / "main").read_text() == hub.sha
    manifest = {i["path"]: i for i in json.loads((tmp_path / "manifest.json").read_text())["items"]}
    for name, entry in hub.files.items():
        cached = repo / "snapshots" / hub.sha / name
        assert cached.is_symlink() and cached.resolve() == (repo / "blobs" / entry["etag"]).resolve(), name
        expected = hashlib.sha256(entry["path"].read_bytes()).hexdigest()  # reference: the served file itself
        item = manifest[cached.relative_to(tmp_path).as_posix()]
        assert (item["sha256"], item["size"]) == (expected, entry["path"].stat().st_size), name


def test_tampered_weights_are_found_and_repaired(hub: LoopbackHub, tmp_path: Path) -> None:
    """One changed byte in the cached weights: both verifications FAIL naming the file; --force repairs it."""
    assert download(hub, tmp_path).returncode == 0
    repo = tmp_path / "huggingface" / "hub" / ("models--" + hub.repo_id.replace("/", "--"))
    weights = repo / "snapshots" / hub.sha / "model.safetensors"
    blob = weights.resolve()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(data)

    verify = run_script(SCRIPT.with_name("cache_verification.py"), ["--cache-dir", str(tmp_path), "--skip-load-time"])
    assert verify.returncode == 1, verify.stdout + verify.stderr
    fails = [line for line in verify.stdout.splitlines() if line.startswith("  FAIL")]
    named = [line for line in verify.stdout.splitlines() if "model.safetensors: sha256 differs" in line]
    assert len(fails) == 1 and "files match the manifest" in fails[0] and named, verify.stdout
    assert f"--model {hub.repo_id} --only model --force --cache-dir {tmp_path}" in verify.stdout

    again = download(hub, tmp_path)
    assert again.returncode == 1 and "model.safetensors: sha256" in again.stdout, again.stdout + again.stderr

    repaired = run_script(SCRIPT, ["--model", hub.repo_id, "--only", "model", "--force", "--cache-dir", str(tmp_path)], hub.url)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert cv.sha256_file(weights) == hub.files["model.safetensors"]["etag"]


def test_no_network_is_one_line(tmp_path: Path) -> None:
    """Without a reachable hub: one clear line, nothing downloaded, exit code 2."""
    with socket.socket() as sock:  # a port on which nothing listens
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    result = run_script(SCRIPT, ["--cache-dir", str(tmp_path)], closed)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("No network"), lines
    assert not (tmp_path / "huggingface" / "hub").exists() and not (tmp_path / "manifest.json").exists()


def test_offline_warmup(tmp_path: Path) -> None:
    """--offline: embedded models and fixture datasets land in the cache and are recorded and verified."""
    import pandas as pd

    import utils

    def link(source: str, target: str) -> None:  # a hard link when possible: no copy of 500 MB
        same_disk = os.stat(source).st_dev == os.stat(Path(target).parent).st_dev
        os.link(source, target) if same_disk else shutil.copy2(source, target)

    for name in constants.EMBEDDED_MODELS:  # no 20 s rebuild, and the paths stay under the temp root
        shutil.copytree(utils.ensure_embedded_model(name), tmp_path / "models" / name, copy_function=link)
    args = ["--offline", "--num-samples", "5", "--cache-dir", str(tmp_path)]
    for attempt in ("records", "verifies"):
        result = run_script(SCRIPT, args)
        assert result.returncode == 0, f"{attempt}: " + result.stdout + result.stderr
    manifest = json.loads((tmp_path / "manifest.json").read_text())["items"]
    weights = tmp_path / "models" / "smollm2_135m_it" / "model.safetensors"
    item = next(i for i in manifest if i["path"] == "models/smollm2_135m_it/model.safetensors")
    assert item["size"] == weights.stat().st_size
    for (dataset, split), fixture in FIXTURE_SPLITS.items():
        sample = pd.read_feather(tmp_path / "datasets" / dataset / f"{split}.feather")
        reference = pd.read_json(fixture, lines=True).head(5)
        as_records = lambda df: json.loads(df.to_json(orient="records"))  # noqa: E731 (lists, not arrays)
        assert as_records(sample) == as_records(reference), (dataset, split)
    verify = run_script(SCRIPT.with_name("cache_verification.py"), ["--cache-dir", str(tmp_path), "--skip-load-time"])
    assert verify.returncode == 0, verify.stdout + verify.stderr


if __name__ == "__main__":
    sys.exit(main())
