"""A small stand-in for the Hub on 127.0.0.1, answering the endpoints huggingface_hub's upload
uses when hf_xet is disabled (HF_HUB_DISABLE_XET=1), as huggingface_hub 2.x calls them
(hf_api.py create_repo / create_branch / _validate_yaml, _commit_api.py _fetch_upload_modes /
_send_commit, lfs.py post_lfs_batch_info / lfs_upload):

  POST /api/repos/create                              {name, organization, visibility?} -> {url}; 409 if it exists
  POST /api/models/{repo}/branch/{branch}             -> 200; 409 if it exists
  POST /api/validate-yaml                             {content, repoType} -> {errors: [], warnings: []}
  POST /api/models/{repo}/preupload/{revision}        {files: [{path, sample, size}]} -> {files: [{path, uploadMode, shouldIgnore}]}
  POST /{repo}.git/info/lfs/objects/batch             {operation, objects: [{oid, size}], ref} -> upload + verify actions
  PUT  /lfs/{oid}                                     the file's bytes (sha256 checked against oid)
  POST /lfs/verify                                    {oid, size}
  POST /api/models/{repo}/commit/{revision}           ndjson: header, file (base64), lfsFile (oid) -> {commitUrl, commitOid}

Every request but the LFS PUT (a presigned storage URL on the real Hub) must carry
`Authorization: Bearer <token>`; the repos (branches -> path -> bytes)
and a log of (method, path) are kept for the test to inspect."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.lfs: dict[str, bytes] = {}  # oid -> bytes received by PUT
        self.log: list[tuple[str, str]] = []
        self.unauthorized: list[str] = []
        self.commits: list[dict] = []  # {"repo", "branch", "summary", "files": {path: "regular"|"lfs"}}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo]["branches"][branch]

    # ---- request handling -------------------------------------------------------------

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def reply(self, status: int, payload=None):
                data = json.dumps(payload if payload is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def handle_any(self, method: str):
                path = urlparse(self.path).path
                data = self.body()
                with hub.lock:
                    hub.log.append((method, path))
                presigned = method == "PUT" and path.startswith("/lfs/")  # like S3: the URL is the credential
                if not presigned and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    hub.unauthorized.append(path)
                    return self.reply(401, {"error": "Invalid credentials in Authorization header"})
                try:
                    status, payload = hub.route(method, path, data, self.headers)
                except Exception as e:  # noqa: BLE001 - a bug in the fake shows as a 500 with its message
                    status, payload = 500, {"error": f"fake hub: {type(e).__name__}: {e}"}
                self.reply(status, payload)

            def do_POST(self):
                self.handle_any("POST")

            def do_PUT(self):
                self.handle_any("PUT")

            def do_GET(self):
                self.handle_any("GET")

        return Handler

    def route(self, method: str, path: str, data: bytes, headers) -> tuple[int, dict]:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if method == "POST" and path == "/api/repos/create":
            body = json.loads(data)
            repo = f"{body['organization']}/{body['name']}"
            url = f"{self.url}/{repo}"
            with self.lock:
                if repo in self.repos:
                    return 409, {"error": "You already created this model repo", "url": url}
                self.repos[repo] = {"private": body.get("visibility") == "private", "branches": {"main": {}}}
            return 200, {"url": url}
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        if method == "POST" and parts[:2] == ["api", "models"] and len(parts) == 6:
            repo, action, rev = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
            if repo not in self.repos:
                return 404, {"error": "Repository not found"}
            branches = self.repos[repo]["branches"]
            if action == "branch":
                if rev in branches:
                    return 409, {"error": "Reference already exists"}
                branches[rev] = dict(branches["main"])
                return 200, {}
            if rev not in branches:
                return 404, {"error": f"Invalid rev id: {rev}"}
            if action == "preupload":
                files = json.loads(data)["files"]
                return 200, {"files": [{"path": f["path"], "shouldIgnore": False,
                                        "uploadMode": "lfs" if self.is_lfs(f) else "regular"} for f in files]}
            if action == "commit":
                return self.commit(repo, rev, data)
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            body = json.loads(data)
            return 200, {"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"], "authenticated": True,
                 "actions": {"upload": {"href": f"{self.url}/lfs/{o['oid']}"},
                             "verify": {"href": f"{self.url}/lfs/verify"}}}
                for o in body["objects"]]}
        if method == "PUT" and parts[0] == "lfs" and len(parts) == 2:
            if hashlib.sha256(data).hexdigest() != parts[1]:
                return 400, {"error": "sha256 does not match the oid"}
            self.lfs[parts[1]] = data
            return 200, {}
        if method == "POST" and path == "/lfs/verify":
            body = json.loads(data)
            ok = body["oid"] in self.lfs and len(self.lfs[body["oid"]]) == body["size"]
            return (200, {}) if ok else (404, {"error": "object not uploaded"})
        return 404, {"error": f"fake hub: no route for {method} {path}"}

    @staticmethod
    def is_lfs(f: dict) -> bool:
        """As the Hub decides: binary content (a NUL byte in the sample) or larger than 10 MB."""
        return f["size"] > 10_000_000 or b"\x00" in base64.b64decode(f["sample"])

    def commit(self, repo: str, branch: str, data: bytes) -> tuple[int, dict]:
        lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
        header = lines[0]
        assert header["key"] == "header", header
        files, kinds = {}, {}
        for item in lines[1:]:
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                kinds[value["path"]] = "regular"
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    return 422, {"error": f"LFS object {value['oid']} was never uploaded"}
                files[value["path"]] = self.lfs[value["oid"]]
                kinds[value["path"]] = "lfs"
            else:
                return 400, {"error": f"fake hub: unsupported operation {item['key']}"}
        with self.lock:
            self.repos[repo]["branches"][branch].update(files)
            self.commits.append({"repo": repo, "branch": branch, "summary": header["value"]["summary"],
                                 "files": kinds})
            oid = hashlib.sha1(json.dumps([repo, branch, len(self.commits)]).encode()).hexdigest()
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid, "success": True}
