"""The labelling page's HTTP server: the standard library's ThreadingHTTPServer, no framework.

    GET  /                      the page (static/index.html)
    GET  /static/NAME           its script and style sheet (served from this package: no CDN)
    GET  /api/state             the next pair, the pair after it, the progress (JSON)
    POST /api/label             {"left": ID, "right": ID, "outcome": "left|right|tie|skip"}
    POST /api/undo              {} : an undo record for the last label
    GET  /media/ID              a candidate's image or video (Range requests for video)
    GET  /media/ID/N            frame N of a candidate stored as a folder of frames

POSTs must be `Content-Type: application/json` (a page on another site cannot send that without
a CORS preflight, which this server never grants). Errors: a status and {"error": one line}; a
409 also carries the current state, so the page moves on to the pair that is due.
"""

from __future__ import annotations

import json
import mimetypes
import re
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from sipo_plugin.pairs.label.session import VIDEO_SUFFIXES, LabelSession, RequestError

STATIC = Path(__file__).with_name("static")
MAX_BODY = 16 * 1024
_MEDIA = re.compile(r"^/media/([^/]+)(?:/(\d+))?$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class LabelServer(ThreadingHTTPServer):
    """A threading HTTP server that carries the session its handlers use."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], session: LabelSession):
        super().__init__(address, LabelHandler)
        self.session = session


class LabelHandler(BaseHTTPRequestHandler):
    server: LabelServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        """No Nagle delay: headers and body go out as written (else ~40 ms per answer)."""
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Quiet: a line only for server errors (the page shows the rest)."""
        if isinstance(code, int) and code >= 500:
            super().log_request(code, size)

    # --- routing -----------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send_file(STATIC / "index.html", cache=False)
        elif path.startswith("/static/"):
            name = path[len("/static/"):]
            allowed = {p.name for p in STATIC.iterdir()}
            if name in allowed:
                self._send_file(STATIC / name, cache=False)
            else:
                self._send_json(404, {"error": f"no static file {name!r}"})
        elif path == "/api/state":
            self._send_json(200, self.server.session.state())
        elif match := _MEDIA.match(path):
            frame = int(match.group(2)) if match.group(2) is not None else None
            file = self.server.session.media_path(match.group(1), frame)
            if file is None:
                self._send_json(404, {"error": f"no media at {path} (file deleted?)"})
            else:
                self._send_file(file, cache=True)
        else:
            self._send_json(404, {"error": f"no page at {path}"})

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        try:
            body = self._read_json()
            if path == "/api/label":
                state = self.server.session.label(body.get("left"), body.get("right"),
                                                  body.get("outcome"))
            elif path == "/api/undo":
                state = self.server.session.undo()
            else:
                raise RequestError(404, f"no endpoint {path}")
        except RequestError as err:
            payload = {"error": str(err)}
            if err.status == 409:
                payload["state"] = self.server.session.state()
            self._send_json(err.status, payload)
            return
        except OSError as err:  # the labels file could not be written: say so, keep serving
            self._send_json(500, {"error": f"could not write the labels file: {err}"})
            return
        self._send_json(200, state)

    # --- helpers -----------------------------------------------------------------------------
    def _read_json(self) -> dict:
        if self.headers.get_content_type() != "application/json":
            raise RequestError(415, "send JSON with Content-Type: application/json")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError(411, "Content-Length required") from None
        if not 0 <= length <= MAX_BODY:
            raise RequestError(413, f"body over {MAX_BODY} bytes")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw.decode("utf-8") or "{}")
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RequestError(400, f"body is not JSON ({err})") from None
        if not isinstance(body, dict):
            raise RequestError(400, "body must be a JSON object")
        return body

    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def _send_file(self, path: Path, cache: bool) -> None:
        """The file, whole or the one byte range asked for (browsers seek videos that way)."""
        data = path.read_bytes()
        content_type = VIDEO_SUFFIXES.get(path.suffix.lower()) or (
            mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        if content_type.startswith("text/") or content_type.endswith("javascript"):
            content_type += "; charset=utf-8"
        start, end, status = 0, len(data) - 1, 200
        match = _RANGE.match(self.headers.get("Range", ""))
        if match and data and (match.group(1) or match.group(2)):
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), end) if match.group(2) else end
            else:  # a suffix range: the last N bytes
                start = max(len(data) - int(match.group(2)), 0)
            if start > end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Cache-Control", "private, max-age=3600" if cache else "no-cache")
        self.end_headers()
        self.wfile.write(data[start:end + 1])


def make_server(session: LabelSession, host: str = "127.0.0.1", port: int = 0) -> LabelServer:
    """A server bound to (host, port); port 0 takes a free one (`server.server_address[1]`)."""
    return LabelServer((host, port), session)

