"""A small loopback server speaking the part of the Hub's HTTP API that `huggingface_hub` uses to create, commit to
and read model repos. It stands in for the network only: the real client (`create_repo`, `upload_folder`,
`push_to_hub`, `hf_hub_download`, `snapshot_download`, `from_pretrained`) runs against it via `HF_ENDPOINT`.

Repos live in memory as a list of commits (path → bytes); every upload is "regular" (inline, base64 in the NDJSON
commit). To test how pushes fail: `fail_commits` makes the next commits fail with `fail_status`; `drop_commits` makes
them close the connection without an answer; after `dead_after_commits` commits the server answers nothing more.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse


@dataclass
class Repo:
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)

    def files(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        if revision == "main":
            return self.commits[-1]
        return next((c for c in self.commits if c[0] == revision), None)


def _oid(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


class HubState:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.fail_commits = 0
        self.fail_status = 500
        self.drop_commits = 0
        self.dead_after_commits: int | None = None
        self.commits = 0
        self.lock = threading.Lock()

    @property
    def dead(self) -> bool:
        return self.dead_after_commits is not None and self.commits >= self.dead_after_commits


class _Handler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    # -- plumbing -----------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None):
        body = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str):
        self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _repo(self, repo_id: str) -> Repo | None:
        return self.state.repos.get(repo_id)

    def _commit_at(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """The commit a revision names, or None after answering 404."""
        repo = self._repo(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        commit = repo.files(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Revision {revision} not found")
        return commit

    def _hang_up(self) -> None:
        """Close the connection without an answer, as a dropped connection or a dead server does."""
        self.close_connection = True
        self.connection.close()

    # -- routes -------------------------------------------------------------------------------------------------
    def do_POST(self):
        if self.state.dead:
            return self._hang_up()
        path = urlparse(self.path).path
        if path == "/api/repos/create":
            return self._create(json.loads(self._body()))
        if path == "/api/validate-yaml":
            self._body()
            return self._send(200, {"errors": [], "warnings": []})
        if m := re.fullmatch(r"/api/models/(.+)/preupload/([^/]+)", path):
            files = json.loads(self._body())["files"]
            answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
            return self._send(200, {"files": answer})
        if m := re.fullmatch(r"/api/models/(.+)/commit/([^/]+)", path):
            return self._commit(unquote(m.group(1)), unquote(m.group(2)), self._body())
        self._error(404, "NotFound", f"no route POST {path}")

    def do_DELETE(self):
        if self.state.dead:
            return self._hang_up()
        if urlparse(self.path).path != "/api/repos/delete":
            return self._error(404, "NotFound", f"no route DELETE {self.path}")
        payload = json.loads(self._body())
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        with self.state.lock:
            if self.state.repos.pop(repo_id, None) is None:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        self._send(200, {})

    def do_GET(self):
        self._read()

    def do_HEAD(self):
        self._read()

    def _read(self):
        if self.state.dead:
            return self._hang_up()
        url = urlparse(self.path)
        path = url.path
        if path == "/api/agent-harnesses":
            return self._send(200, [])
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            return self._info(m.group(1), unquote(m.group(2) or "main"))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
            recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
            return self._tree(m.group(1), unquote(m.group(2)), unquote((m.group(3) or "/")[1:]), recursive)
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._resolve(m.group(1), unquote(m.group(2)), unquote(m.group(3)))
        self._error(404, "NotFound", f"no route GET {path}")

    def _create(self, payload: dict):
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        with self.state.lock:
            if repo_id in self.state.repos:  # the Hub's 409 names the existing repo's url
                message = "You already created this model repo"
                return self._send(
                    409,
                    {"error": message, "url": f"http://{self.headers['Host']}/{repo_id}"},
                    {"X-Error-Code": "RepoExists", "X-Error-Message": message},
                )
            attributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            self.state.repos[repo_id] = Repo([(_oid(repo_id.encode()), {".gitattributes": attributes})])
        self._send(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})

    def _commit(self, repo_id: str, revision: str, body: bytes):
        with self.state.lock:
            repo = self._repo(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            if self.state.fail_commits > 0:
                self.state.fail_commits -= 1
                return self._error(self.state.fail_status, "ServerError", "commit failed on the server")
            if self.state.drop_commits > 0:
                self.state.drop_commits -= 1
                return self._hang_up()
            _, files = repo.commits[-1]
            files = dict(files)
            for line in body.splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "deletedFile":
                    files.pop(value["path"], None)
                elif item["key"] == "deletedFolder":
                    files = {p: d for p, d in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                elif item["key"] != "header":
                    return self._error(400, "BadRequest", f"unsupported commit operation {item['key']}")
            oid = _oid(
                json.dumps(sorted((p, _oid(d)) for p, d in files.items())).encode() + repo.commits[-1][0].encode()
            )
            repo.commits.append((oid, files))
            self.state.commits += 1
        host = self.headers["Host"]
        self._send(
            200, {"commitUrl": f"http://{host}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
        )

    def _info(self, repo_id: str, revision: str):
        if (commit := self._commit_at(repo_id, revision)) is None:
            return
        oid, files = commit
        siblings = [{"rfilename": p, "size": len(d), "blobId": _oid(d)} for p, d in sorted(files.items())]
        self._send(
            200,
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": oid,
                "private": False,
                "disabled": False,
                "siblings": siblings,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "lastModified": "2026-01-01T00:00:00.000Z",
                "createdAt": "2026-01-01T00:00:00.000Z",
            },
        )

    def _tree(self, repo_id: str, revision: str, folder: str, recursive: bool):
        if (commit := self._commit_at(repo_id, revision)) is None:
            return
        prefix = folder.rstrip("/") + "/" if folder else ""
        entries = []
        for path, data in sorted(commit[1].items()):
            if path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :]):
                entries.append({"type": "file", "path": path, "size": len(data), "oid": _oid(data)})
        self._send(200, entries)

    def _resolve(self, repo_id: str, revision: str, path: str):
        if (commit := self._commit_at(repo_id, revision)) is None:
            return
        oid, files = commit
        if path not in files:
            return self._error(404, "EntryNotFound", f"{path} does not exist in {repo_id}@{revision}")
        data = files[path]
        self._send(200, raw=data, headers={"X-Repo-Commit": oid, "ETag": f'"{_oid(data)}"'})


class HubServer:
    """Runs the server on a free loopback port in a thread; `url` is what `HF_ENDPOINT` takes."""

    def __init__(self):
        self.state = HubState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def files(self, repo_id: str) -> dict[str, bytes]:
        return dict(self.state.repos[repo_id].commits[-1][1])
