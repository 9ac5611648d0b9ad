"""A local stand-in for the Hugging Face Hub, for tests: the HTTP API that huggingface_hub uses to create a repo,
read its info, make a branch, upload (preupload, LFS batch API with the basic transfer, NDJSON commit) and
download files (resolve/). Point HF_ENDPOINT at `HubServer.url`.

Xet storage is not offered: nothing here answers its token routes, so clients must upload over LFS
(huggingface_hub 2.x uses Xet whenever hf_xet is installed unless HF_HUB_DISABLE_XET=1).

File contents live in a directory (LFS objects by sha256, regular files by git blob id); repos, branches
and commits in memory. `drop(kind, nth, when)` makes the server break the connection on the nth request
of a kind: "before" reads half the body and hangs up without acting on it, "after" acts on the request
and hangs up without answering (a commit made whose answer is lost).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".png", ".jpg", ".npy", ".zip")
LFS_THRESHOLD = 10 * 2**20  # bytes; larger files go to LFS whatever they are
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()

_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
ROUTES = [  # (method, pattern on the raw path, kind)
    ("POST", r"/api/repos/create", "create"),
    ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "info"),
    ("POST", rf"/api/models/{_REPO}/branch/(?P<rev>[^/]+)", "branch"),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs-batch"),
    ("PUT", rf"/lfs/{_REPO}/(?P<oid>[0-9a-f]{{64}})", "lfs-upload"),
    ("POST", rf"/lfs/{_REPO}/(?P<oid>[0-9a-f]{{64}})/verify", "lfs-verify"),
    ("POST", r"/api/validate-yaml", "validate-yaml"),
    ("GET", r"/api/whoami-v2", "whoami-v2"),
    ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]


class HubError(Exception):
    """An HTTP error answer: status, message and the Hub's X-Error-Code."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None,
                 url: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.commit, self.url = status, message, code, commit, url


def git_blob_id(data: bytes) -> str:
    """The git object id of a file's content, which the Hub reports for regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """A threaded HTTP server speaking the Hub API; `tokens` maps each valid token to its user name."""

    def __init__(self, root: Path, tokens: dict[str, str]) -> None:
        self.root, self.tokens = Path(root), dict(tokens)
        self.read_only: set[str] = set()  # users whose tokens whoami-v2 reports as read-only
        (self.root / "lfs").mkdir(parents=True, exist_ok=True)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, str]] = []  # (kind, method, path) in order of arrival
        self.counts: Counter[str] = Counter()  # requests per kind
        self.stored: Counter[str] = Counter()  # complete LFS uploads per sha256
        self.drops: dict[tuple[str, int], str] = {}
        self.lock = threading.RLock()
        self.secret = secrets.token_hex(16)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.hub = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def drop(self, kind: str, nth: int = 1, when: str = "before") -> None:
        """Break the connection of the nth request of `kind` (counted from now on), "before" or "after" acting."""
        assert when in ("before", "after")
        self.drops[(kind, self.counts[kind] + nth)] = when

    # ---- what tests read back

    def head(self, repo: str, revision: str = "main") -> str:
        return self.repos[repo]["branches"][revision]

    def files(self, repo: str, revision: str = "main") -> dict[str, bytes]:
        """Path -> content of every file of a repo at a branch or commit."""
        entries = self._commit(repo, revision)["files"]
        return {path: self._content(entry) for path, entry in entries.items()}

    def history(self, repo: str, revision: str = "main") -> list[str]:
        """Commit messages from the branch head back to the repo's first commit."""
        sha, messages = self.head(repo, revision), []
        while sha is not None:
            commit = self.repos[repo]["commits"][sha]
            messages.append(commit["message"])
            sha = commit["parent"]
        return messages

    # ---- state

    def _commit(self, repo: str, revision: str) -> dict[str, Any]:
        state = self.repos[repo]
        sha = state["branches"].get(revision, revision)
        if sha not in state["commits"]:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return state["commits"][sha]

    def _content(self, entry: dict[str, Any]) -> bytes:
        folder = "lfs" if entry["lfs"] else "blobs"
        return (self.root / folder / (entry["sha256"] if entry["lfs"] else entry["blob"])).read_bytes()

    def _store_blob(self, data: bytes) -> dict[str, Any]:
        blob = git_blob_id(data)
        (self.root / "blobs" / blob).write_bytes(data)
        return {"lfs": False, "blob": blob, "size": len(data)}

    def _new_commit(self, repo: str, branch: str, message: str, files: dict[str, Any]) -> str:
        state = self.repos[repo]
        parent = state["branches"].get(branch)
        sha = hashlib.sha1(json.dumps([parent, message, files, len(state["commits"])], sort_keys=True).encode())
        state["commits"][sha.hexdigest()] = {"parent": parent, "message": message, "files": files}
        state["branches"][branch] = sha.hexdigest()
        return sha.hexdigest()

    def _ticket(self, repo: str, oid: str) -> str:
        """What a presigned upload URL carries instead of the token."""
        return hashlib.sha256(f"{self.secret}/{repo}/{oid}".encode()).hexdigest()[:32]

    def _readable(self, repo: str, user: str | None) -> dict[str, Any]:
        state = self.repos.get(repo)
        if state is None or (state["private"] and user != state["owner"]):
            raise HubError(404 if user else 401, "Repository not found", "RepoNotFound")
        return state

    def _writable(self, repo: str, user: str | None) -> dict[str, Any]:
        state = self._readable(repo, user)
        if user != state["owner"]:
            raise HubError(403, f"You don't have write access to {repo}")
        return state

    # ---- the API, one method per kind: (user, route groups, request body) -> JSON answer

    def create(self, user: str | None, groups: dict[str, str], body: bytes) -> dict[str, Any]:
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        payload = json.loads(body)
        namespace = payload.get("organization") or user
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace}")
        repo = f"{namespace}/{payload['name']}"
        answer = {"url": f"{self.url}/{repo}", "name": repo, "id": repo}
        if repo in self.repos:
            raise HubError(409, "You already created this model repo", url=answer["url"])
        private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
        self.repos[repo] = {"owner": user, "private": private, "branches": {}, "commits": {}}
        attributes = {".gitattributes": self._store_blob(GITATTRIBUTES)}
        self._new_commit(repo, "main", "initial commit", attributes)
        return answer

    def info(self, user: str | None, groups: dict[str, str], body: bytes) -> dict[str, Any]:
        state = self._readable(groups["repo"], user)
        revision = groups.get("rev") or "main"
        commit = self._commit(groups["repo"], revision)
        sha = state["branches"].get(revision, revision)
        return {"id": groups["repo"], "modelId": groups["repo"], "author": state["owner"], "sha": sha,
                "private": state["private"], "tags": [], "siblings": [{"rfilename": p} for p in commit["files"]]}

    def branch(self, user: str | None, groups: dict[str, str], body: bytes) -> dict[str, Any]:
        state = self._writable(groups["repo"], user)
        if groups["rev"] in state["branches"]:
            raise HubError(409, "Reference already exists")
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        self._commit(groups["repo"], start)  # must exist
        state["branches"][groups["rev"]] = state["branches"].get(start, start)
        return {}

    def preupload(self, user: str | None, groups: dict[str, str], body: bytes) -> dict[str, Any]:
        self._writable(groups["repo"], user)
        existing = self._commit(groups["repo"], groups["rev"])["files"]
        answer = []
        for file in json.loads(body)["files"]:
            sample = base64.b64decode(file["sample"])
            lfs = file["size"] > 0 and (file["path"].endswith(LFS_SUFFIXES) or b"\0" in sample
                                        or file["size"] >= LFS_THRESHOLD)
            entry = existing.get(file["path"])
            oid = None if entry is None else entry["sha256"] if entry["lfs"] else entry["blob"]
            answer.append({"path": file["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                           "oid": oid})
        return {"files": answer, "commitOid": self.head(groups["repo"], groups["rev"])}

    def lfs_batch(self, user: str | None, groups: dict[str, str], body: bytes) -> dict[str, Any]:
        repo = groups["repo"]
        self._writable(repo, user)
        objects = []
        for item in json.loads(body)["objects"]:
            answer = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            path = self.root / "lfs" / item["oid"]
            if not (path.exists() and path.stat().st_size == item["size"]):
                href = f"{self.url}/lfs/{repo}/{item['oid']}"
                answer["actions"] = {"upload": {"href": f"{href}?ticket={self._ticket(repo, item['oid'])}"},
                                     "verify": {"href": f"{href}/verify"}}
            objects.append(answer)
        return {"transfer": "basic", "objects": objects}

    def lfs_upload(self, user: str | None, groups: dict[str, str], body: bytes, ticket: str = "") -> dict[str, Any]:
        if ticket != self._ticket(groups["repo"], groups["oid"]):
            raise HubError(403, "bad upload ticket")
        if hashlib.sha256(body).hexdigest() != groups["oid"]:
            raise HubError(400, "content does not match its sha256")
        tmp = self.root / "lfs" / f"{groups['oid']}.{threading.get_ident()}.tmp"
        tmp.write_bytes(body)
        tmp.replace(self.root / "lfs" / groups["oid"])
        with self.lock:
            self.stored[groups["oid"]] += 1
        return {}

    def lfs_verify(self, user: str | None, groups: dict[str, str], body: bytes) -> dict[str, Any]:
        self._writable(groups["repo"], user)
        path = self.root / "lfs" / groups["oid"]
        if not path.exists() or path.stat().st_size != json.loads(body)["size"]:
            raise HubError(404, "object not found")
        return {}

    def commit(self, user: str | None, groups: dict[str, str], body: bytes) -> dict[str, Any]:
        repo, branch = groups["repo"], groups["rev"]
        state = self._writable(repo, user)
        if branch not in state["branches"]:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "the commit must start with a header line")
        header = lines[0]["value"]
        if header.get("parentCommit") not in (None, state["branches"][branch]):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(self._commit(repo, branch)["files"])
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = self._store_blob(base64.b64decode(value["content"]))
            elif line["key"] == "lfsFile":
                path = self.root / "lfs" / value["oid"]
                if not path.exists():
                    raise HubError(422, f"Your push was rejected because an LFS pointer pointed to a file that "
                                        f"does not exist: {value['path']}")
                files[value["path"]] = {"lfs": True, "sha256": value["oid"], "size": path.stat().st_size}
            elif line["key"] == "deletedFile":
                files.pop(value["path"])
            else:
                raise HubError(400, f"unsupported commit operation {line['key']}")
        sha = self._new_commit(repo, branch, header["summary"], files)
        return {"success": True, "commitOid": sha, "commitUrl": f"{self.url}/{repo}/commit/{sha}", "hookOutput": ""}

    def whoami_v2(self, user: str | None, groups: dict[str, str], body: bytes) -> dict[str, Any]:
        """Who the token belongs to, and whether it may write (the tokens of users in `read_only` may not)."""
        if user is None:
            raise HubError(401, "You must be authenticated to call whoami")
        role = "read" if user in self.read_only else "write"
        return {"type": "user", "name": user, "auth": {"type": "access_token", "accessToken": {"role": role}}}

    def validate_yaml(self, user: str | None, groups: dict[str, str], body: bytes) -> dict[str, Any]:
        content = json.loads(body)["content"]
        match = re.match(r"---\n(.*?)\n---\n", content, re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as error:
            raise HubError(400, f"invalid YAML in README.md: {error}") from error
        if not isinstance(metadata, dict):
            raise HubError(400, "README.md metadata must be a mapping")
        return {"errors": [], "warnings": []}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's client expects

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read `HubServer.requests` instead."""

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def _read_body(self, limit: int | None = None) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
                if size == 0 or (limit is not None and sum(map(len, chunks)) >= limit):
                    return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length if limit is None else min(limit, length))

    def _hang_up(self) -> None:
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                content_type: str = "application/json") -> None:
        self.send_response(status)
        for key, value in {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self, method: str) -> None:
        hub: HubServer = self.server.hub
        url = urlsplit(self.path)
        route = next(((kind, m.groupdict()) for verb, pattern, kind in ROUTES
                      if verb == method and (m := re.fullmatch(pattern, url.path))), None)
        kind, groups = route if route else ("unknown", {})
        groups = {key: unquote(value) for key, value in groups.items() if value is not None}
        with hub.lock:
            hub.requests.append((kind, method, url.path))
            hub.counts[kind] += 1
            when = hub.drops.pop((kind, hub.counts[kind]), None)
        if when == "before":
            self._read_body(limit=max(int(self.headers.get("Content-Length") or 2) // 2, 1))
            return self._hang_up()
        body = self._read_body() if method in ("POST", "PUT") else b""
        try:
            user = self._user(hub)
            if route is None:
                raise HubError(404, f"no route for {method} {url.path}")
            if kind == "resolve":
                with hub.lock:
                    return self._resolve(hub, user, groups, when)
            if kind == "lfs-upload":  # no lock while hashing and writing: uploads run side by side
                answer = hub.lfs_upload(user, groups, body, ticket=parse_qs(url.query).get("ticket", [""])[0])
            else:
                with hub.lock:
                    answer = getattr(hub, kind.replace("-", "_"))(user, groups, body)
        except HubError as error:
            headers = {"X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            if error.commit:
                headers["X-Repo-Commit"] = error.commit
            if error.status == 401 and "authorization" in self.headers:
                headers["X-Error-Message"] = "Invalid credentials in Authorization header"
            answer = {"error": error.message} | ({"url": error.url} if error.url else {})
            return self._answer(error.status, json.dumps(answer).encode(), headers)
        if when == "after":
            return self._hang_up()
        self._answer(200, json.dumps(answer).encode())

    def _user(self, hub: HubServer) -> str | None:
        """The user of the bearer token; None without one; a 401 for a token the server does not know."""
        authorization = self.headers.get("authorization")
        if authorization is None:
            return None
        user = hub.tokens.get(authorization.removeprefix("Bearer ").strip())
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _resolve(self, hub: HubServer, user: str | None, groups: dict[str, str], when: str | None) -> None:
        state = hub._readable(groups["repo"], user)
        sha = state["branches"].get(groups["rev"], groups["rev"])
        entry = hub._commit(groups["repo"], groups["rev"])["files"].get(groups["path"])
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", commit=sha)
        data = hub._content(entry)
        etag = entry["sha256"] if entry["lfs"] else entry["blob"]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        status, ranged = 200, re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if ranged:
            start = int(ranged.group(1))
            status, headers["Content-Range"] = 206, f"bytes {start}-{len(data) - 1}/{len(data)}"
            data = data[start:]
        if when == "after":
            return self._hang_up()
        self._answer(status, data, headers, content_type="application/octet-stream")
