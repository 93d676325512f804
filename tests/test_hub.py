"""Hugging Face Hub ids as sources, resolved by the real huggingface_hub code with no network:
a Hub cache built in tmp_path in the layout huggingface_hub reads (HF_HUB_OFFLINE=1), and a
fake Hub served on 127.0.0.1 (HF_ENDPOINT) for downloads."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import threading
import urllib.parse
from pathlib import Path

import huggingface_hub.constants
import onnxruntime as ort
import pytest

import shardex
from shardex._commands.export import zoo_options
from shardex._source import resolve_source
from shardex._zoo import load_zoo
from tests import models
from tests.cli_support import error_lines
from tests.cli_support import shardex as run_shardex

REPO = "tiny-org/tiny-llama"
COMMIT_A = hashlib.sha1(b"first").hexdigest()
COMMIT_B = hashlib.sha1(b"second").hexdigest()
# Files an export must never fetch: other weight formats and anything below the top level.
DECOYS = {
    "pytorch_model.bin": b"\0" * (4 << 20),
    "flax_model.msgpack": b"\0" * (1 << 20),
    "original/consolidated.safetensors": b"not a safetensors file",
    "README.md": b"# tiny\n",
}


def checkpoint_files(directory: Path, *, layers: int) -> dict[str, bytes]:
    """A tiny Llama's files as a Hub repository holds them, with a tokenizer file and the decoys."""
    models.make_llama(directory, layers=layers)
    files = {p.name: p.read_bytes() for p in sorted(directory.iterdir())}
    return files | {"tokenizer.json": b'{"version": "1.0"}'} | DECOYS


def add_snapshot(
    cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs=(), missing=()
) -> Path:
    """Store `files` as a huggingface_hub download does: content in blobs/, the snapshot
    directory of symlinks into it, refs/<branch> holding the commit. `missing` files are links
    to blobs that are not there (so any read of them fails)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if name not in missing:
            blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """An empty HF cache under tmp_path, offline; tests add snapshots or go online to a fake Hub."""
    monkeypatch.setenv("HF_HOME", os.fspath(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf" / "hub"


@pytest.fixture
def cached_repo(tmp_path, hub_env):
    """REPO in the cache: main -> a 2-layer Llama (decoys present but unreadable), v2 -> 3 layers."""
    first = checkpoint_files(tmp_path / "first", layers=2)
    add_snapshot(hub_env, REPO, COMMIT_A, first, refs=["main"], missing=DECOYS)
    add_snapshot(hub_env, REPO, COMMIT_B, checkpoint_files(tmp_path / "second", layers=3), refs=["v2"])
    return hub_env


@pytest.mark.slow  # export, then verify again: about 45 s here (the zero-copy test below is the quick one)
@pytest.mark.usefixtures("ray_local")
def test_hub_id_exports_offline_and_verifies(cached_repo, tmp_path):
    out = tmp_path / "out"
    shardex.export(REPO, out, max_shard_size="200KB")

    manifest = json.loads((out / "manifest.json").read_text())
    snapshot = cached_repo / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT_A
    assert manifest["status"] == "complete" and manifest["verification"]["passed"]
    assert manifest["source"]["hub"] == {"repo_id": REPO, "commit": COMMIT_A}
    assert manifest["source"]["location"] == os.fspath(snapshot)
    assert manifest["source"]["files"] == [os.fspath(snapshot / "model.safetensors")]  # read in place
    assert sum(len(g["members"]) for g in manifest["plan"]["groups"]) == 2
    # verify resolves the recorded commit again, from the cache
    assert shardex.verify(out).passed


@pytest.mark.usefixtures("ray_local")
def test_zero_copy_links_the_blob_not_the_snapshot_symlink(cached_repo, tmp_path):
    out = tmp_path / "out"
    shardex.export(REPO, out, zero_copy=True)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["hub"] == {"repo_id": REPO, "commit": COMMIT_A}
    (linked,) = [s["file"] for s in manifest["shards"] if s["file"].endswith(".safetensors")]
    snapshot_file = (
        cached_repo / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT_A / "model.safetensors"
    )
    assert snapshot_file.is_symlink() and not (out / linked).is_symlink()
    assert os.stat(out / linked).st_ino == os.stat(snapshot_file.resolve()).st_ino
    assert manifest["verification"]["passed"]
    ort.InferenceSession(os.fspath(out / "model.onnx"), providers=["CPUExecutionProvider"])


def test_revision_picks_a_snapshot(cached_repo):
    main = resolve_source(REPO)
    tagged = resolve_source(REPO, revision="v2")
    pinned = resolve_source(REPO, revision=COMMIT_A)

    assert (main.hub["commit"], tagged.hub["commit"], pinned.hub["commit"]) == (COMMIT_A, COMMIT_B, COMMIT_A)
    assert tagged.location.endswith(f"snapshots/{COMMIT_B}")
    assert json.loads(Path(tagged.location, "config.json").read_text())["num_hidden_layers"] == 3
    assert tagged.describe()["hub"] == {"repo_id": REPO, "commit": COMMIT_B}


def test_local_directory_wins_over_hub_id(cached_repo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    models.make_llama(tmp_path / REPO, layers=1)

    source = resolve_source(REPO)
    assert source.hub is None and source.location == os.fspath(tmp_path / REPO)
    with pytest.raises(shardex.SourceError, match="a local path wins over a Hub id"):
        resolve_source(REPO, revision="v2")


def test_partly_cached_commit_offline_is_named(hub_env, tmp_path):
    """An earlier AutoConfig call may have cached only config.json of a commit."""
    files = checkpoint_files(tmp_path / "ckpt", layers=2)
    add_snapshot(hub_env, REPO, COMMIT_A, {"config.json": files["config.json"]}, refs=["main"])

    with pytest.raises(shardex.SourceError, match="only partly in the cache") as error:
        resolve_source(REPO, revision=COMMIT_A)
    assert "\n" not in str(error.value)


@pytest.mark.slow  # a whole export in a new process (its own Ray): about a minute here
@pytest.mark.usefixtures("cached_repo")
def test_cli_revision_exports_the_second_snapshot(tmp_path):
    out = tmp_path / "out"
    result = run_shardex("export", REPO, out, "--revision", "v2", "--no-verify")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"exported {REPO}@{COMMIT_B[:12]} -> {out} (complete)"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["hub"] == {"repo_id": REPO, "commit": COMMIT_B}
    assert manifest["options"]["revision"] == "v2"
    assert sum(len(g["members"]) for g in manifest["plan"]["groups"]) == 3


@pytest.mark.usefixtures("cached_repo")
@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["nobody/nothing"], ["'nobody/nothing' is not a local path", "HF_HUB_OFFLINE is set"]),
        ([REPO, "--revision", "v9"], ["revision 'v9' of Hub model", "cached revisions: main, v2"]),
        ([REPO, "--revision", "f" * 40], [f"revision '{'f' * 40}'", "is not in the cache"]),
    ],
    ids=["missing id", "missing branch", "missing commit"],
)
def test_cli_missing_id_or_revision_is_one_line_and_exit_2(argv, fragments, tmp_path):
    result = run_shardex("export", *argv, tmp_path / "out")

    assert result.returncode == 2
    (line,) = error_lines(result)
    assert line.startswith("shardex: error: ") and all(f in line for f in fragments), line
    assert not (tmp_path / "out").exists()


def test_zoo_entry_keeps_a_hub_id(tmp_path):
    (tmp_path / "zoo.toml").write_text(
        f'[[model]]\nname = "tiny"\nsource = "{REPO}"\nrevision = "v2"\n'
        '[[model]]\nname = "local"\nsource = "ckpts/llama"\n'
    )
    (tmp_path / "ckpts" / "llama").mkdir(parents=True)

    hub, local = load_zoo(os.fspath(tmp_path / "zoo.toml"), zoo_options())
    assert hub.source == REPO and hub.export_flags() == ["--revision", "v2"]
    assert local.source == os.fspath(tmp_path / "ckpts" / "llama")  # an existing path stays a path


def test_help_says_local_directory_wins():
    result = run_shardex("export", "--help")
    assert "--revision REV" in result.stdout
    assert "meta-llama/Llama-3.1-8B" in result.stdout and "local directory wins" in result.stdout


class FakeHub(http.server.ThreadingHTTPServer):
    """The few Hub endpoints snapshot_download calls: revision info, tree listing, file resolve.
    `repos` maps id -> ({ref: commit}, {commit: {path: bytes}}); a repo in `private` answers 401
    without the right token. Every request path is recorded in `requests`."""

    def __init__(self, repos: dict, private: dict[str, str] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _FakeHubHandler)
        self.repos, self.private, self.requests = repos, private or {}, []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join()


class _FakeHubHandler(http.server.BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, format, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, *, body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        self.server.requests.append(path)
        api = path.startswith("/api/models/")
        parts = path.removeprefix("/api/models/" if api else "/").split("/")
        repo_id = "/".join(parts[:2])
        if repo_id not in self.server.repos or not self._authorized(repo_id):
            return self._error(401 if repo_id in self.server.repos else 404, "RepoNotFound")
        refs, commits = self.server.repos[repo_id]
        revision = parts[3] if len(parts) > 3 else "main"
        commit = refs.get(revision, revision)
        if commit not in commits:
            return self._error(404, "RevisionNotFound")
        files = commits[commit]
        if api and parts[2] == "revision":
            return self._send(json.dumps({"id": repo_id, "sha": commit}).encode(), commit, body)
        if api and parts[2] == "tree":
            listing = [
                {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for name, data in files.items()
            ]
            return self._send(json.dumps(listing).encode(), commit, body)
        name = "/".join(parts[4:])
        if parts[2] != "resolve" or name not in files:
            return self._error(404, "EntryNotFound")
        data = files[name]
        self._send(data, commit, body, etag=hashlib.sha256(data).hexdigest())

    def _authorized(self, repo_id: str) -> bool:
        token = self.server.private.get(repo_id)
        return token is None or self.headers.get("authorization") == f"Bearer {token}"

    def _send(self, data: bytes, commit: str, body: bool, etag: str | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{etag or hashlib.sha1(data).hexdigest()}"')
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str) -> None:
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def fake_hub(tmp_path, hub_env, monkeypatch):
    files = checkpoint_files(tmp_path / "served", layers=2)
    hub = FakeHub(
        {
            REPO: ({"main": COMMIT_A}, {COMMIT_A: files}),
            "acme/secret": ({"main": COMMIT_B}, {COMMIT_B: files}),
        },
        private={"acme/secret": "hf_test_token"},
    )
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import, which may have happened under an
    # offline test (or an offline CI environment): online, as a process started now would be.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield hub
    hub.close()


def test_download_fetches_only_checkpoint_files_with_a_progress_bar(fake_hub, hub_env, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="shardex"):
        source = resolve_source(REPO)

    fetched = {p.split(f"/resolve/{COMMIT_A}/", 1)[1] for p in fake_hub.requests if "/resolve/" in p}
    assert fetched == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}
    snapshot = Path(source.location)
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(fetched)
    assert snapshot == hub_env / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT_A
    assert source.hub == {"repo_id": REPO, "commit": COMMIT_A}
    assert (hub_env / "models--tiny-org--tiny-llama" / "refs" / "main").read_text() == COMMIT_A
    assert "Fetching 4 files" in capsys.readouterr().err  # the bar, since shardex's progress log is on

    # A commit is looked up in the cache first: no request at all, and no bar when the log is off.
    fake_hub.requests.clear()
    assert resolve_source(REPO, revision=COMMIT_A).location == source.location
    assert fake_hub.requests == [] and capsys.readouterr().err == ""


def test_download_progress_bar_follows_the_progress_log(fake_hub, capsys):
    resolve_source(REPO)  # logger "shardex" at its default (WARNING): the CLI's --quiet or redirected
    assert "Fetching" not in capsys.readouterr().err


def test_online_errors_are_one_line(fake_hub):
    with pytest.raises(
        shardex.SourceError, match="neither a local directory nor a model on the Hugging Face Hub"
    ):
        resolve_source("nobody/nothing")
    with pytest.raises(
        shardex.SourceError, match="revision 'v9' of Hub model 'tiny-org/tiny-llama' does not"
    ):
        resolve_source(REPO, revision="v9")
    with pytest.raises(shardex.SourceError, match="HF_TOKEN") as error:
        resolve_source("acme/secret")
    assert "\n" not in str(error.value)


def test_token_from_hf_token(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert resolve_source("acme/secret").hub["commit"] == COMMIT_B
