"""A stand-in Hugging Face hub on 127.0.0.1 for tests: the endpoints the real ``huggingface_hub`` client
calls to resolve a revision and download files, nothing more.

``GET /api/models/<repo>[/revision/<rev>][?blobs=True]``
    the model's info: ``id``, ``sha`` (the commit) and ``siblings`` (``rfilename``; with ``blobs``:
    ``size``, ``blobId`` = git blob SHA-1, ``lfs`` = {size, sha256, pointerSize} for LFS files).
``HEAD|GET /<repo>/resolve/<rev>/<file>``
    the file, with ``X-Repo-Commit``, ``ETag`` (git blob SHA-1; LFS files: ``X-Linked-Etag`` = SHA-256 and
    ``X-Linked-Size``) and ``Content-Length``; ``Range: bytes=N-`` answers 206 with the rest.

Unknown repos, revisions and files answer 404 with the hub's ``X-Error-Code``. Faults, one request each:
``drop_once(file, after)`` sends ``after`` bytes of the file's next GET and closes the connection;
``stall_once(file, after)`` sends ``after`` bytes and then nothing until the server stops. Every request is
logged as (method, path, Range header).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")


@dataclass
class Repo:
    files: dict[str, bytes]
    sha: str  # the commit main points at

    def sibling(self, name: str, blobs: bool) -> dict:
        data = self.files[name]
        out = {"rfilename": name}
        if blobs:
            out.update(size=len(data), blobId=git_blob_sha1(data))
            if name.endswith(LFS_SUFFIXES):
                out["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
        return out


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@dataclass
class StandInHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    log: list[tuple[str, str, str | None]] = field(default_factory=list)
    faults: dict[str, tuple[str, int]] = field(default_factory=dict)  # file -> (drop | stall, after bytes)
    stalled: threading.Event = field(default_factory=threading.Event)  # set once a stall has begun
    _server: ThreadingHTTPServer | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add_repo(self, repo_id: str, folder: Path) -> Repo:
        files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        files["README.md"] = b"# a stand-in repo: prefetch leaves this file alone\n"
        sha = hashlib.sha1(b"".join(hashlib.sha256(files[n]).digest() for n in sorted(files))).hexdigest()
        self.repos[repo_id] = Repo(files, sha)
        return self.repos[repo_id]

    def drop_once(self, name: str, after: int) -> None:
        self.faults[name] = ("drop", after)

    def stall_once(self, name: str, after: int) -> None:
        self.faults[name] = ("stall", after)

    def requests(self, method: str | None = None, contains: str = "") -> list[tuple[str, str, str | None]]:
        return [r for r in self.log if (method is None or r[0] == method) and contains in r[1]]

    def start(self) -> "StandInHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # the hub's own log is hub.log
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # ------------------------------------------------------------------ answers

    def _send(self, handler, status: int, headers: dict, payload: bytes, body: bool) -> None:
        handler.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(payload))}.items():
            handler.send_header(name, value)
        handler.end_headers()
        if body:
            handler.wfile.write(payload)

    def _error(self, handler, code: str, body: bool) -> None:
        self._send(handler, 404, {"X-Error-Code": code, "Content-Type": "application/json"},
                   json.dumps({"error": code}).encode(), body)

    def _answer(self, handler, body: bool) -> None:
        url = urlsplit(handler.path)
        path = unquote(url.path)
        self.log.append((handler.command, path, handler.headers.get("Range")))
        if path.startswith("/api/models/"):
            rest = path.removeprefix("/api/models/")
            repo_id, _, revision = rest.partition("/revision/")
            repo = self.repos.get(repo_id)
            if repo is None:
                return self._error(handler, "RepoNotFound", body)
            if revision not in ("", "main", repo.sha):
                return self._error(handler, "RevisionNotFound", body)
            blobs = "blobs=" in (url.query or "")
            info = {"id": repo_id, "sha": repo.sha, "siblings": [repo.sibling(n, blobs) for n in sorted(repo.files)]}
            return self._send(handler, 200, {"Content-Type": "application/json"}, json.dumps(info).encode(), body)
        if "/resolve/" in path:
            repo_id, _, rest = path.lstrip("/").partition("/resolve/")
            revision, _, name = rest.partition("/")
            repo = self.repos.get(repo_id)
            if repo is None:
                return self._error(handler, "RepoNotFound", body)
            if revision not in ("main", repo.sha):
                return self._error(handler, "RevisionNotFound", body)
            if name not in repo.files:
                return self._error(handler, "EntryNotFound", body)
            return self._file(handler, repo, name, body)
        return self._error(handler, "RepoNotFound", body)

    def _file(self, handler, repo: Repo, name: str, body: bool) -> None:
        data = repo.files[name]
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if name.endswith(LFS_SUFFIXES):
            headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))})
        start, status = 0, 200
        wanted = handler.headers.get("Range")
        if wanted and wanted.startswith("bytes="):
            start = int(wanted.removeprefix("bytes=").split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        payload = data[start:]
        fault = self.faults.pop(name, None) if body else None
        if fault is None:
            return self._send(handler, status, headers, payload, body)
        kind, after = fault
        handler.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(payload))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(payload[:after])
        handler.wfile.flush()
        if kind == "stall":
            self.stalled.set()
            while not self._stop.wait(0.2):
                pass
        handler.close_connection = True
        time.sleep(0.05)
        handler.connection.shutdown(2)  # mid-file: the client sees the connection end early
