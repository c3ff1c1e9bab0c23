"""A loopback HTTP reverse proxy that adds a fixed delay to every request, like a real object
store's 20-50 ms per GET, which a loopback S3 server (moto) would otherwise hide."""

from __future__ import annotations

import collections
import http.client
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te",
               "upgrade", "trailer", "content-length"}


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # many concurrent clients connect at once
    daemon_threads = True


#: GET this path on the proxy for its counters (JSON), without delay or forwarding.
STATS_PATH = "/__latency_proxy__/stats"


class LatencyProxy:
    """`with LatencyProxy("http://127.0.0.1:PORT", latency_ms=20) as url:` -> the proxy's URL.

    It counts what passes: requests by method, range requests and response body bytes
    (`stats()`, or GET `STATS_PATH` when it runs in its own process). `rewrite(method, path,
    body) -> body`, if given, changes a response body on its way back (tests spoil responses
    with it)."""

    def __init__(self, upstream: str, latency_ms: float = 20.0, rewrite=None):
        self.upstream = urlsplit(upstream)
        self.latency = latency_ms / 1000.0
        self.rewrite = rewrite
        self.requests: collections.Counter[str] = collections.Counter()
        self.ranged = 0
        self.bytes_out = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as clients of real stores use

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                if self.path == STATS_PATH:
                    return self._stats()
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                time.sleep(proxy.latency)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in HOP_HEADERS}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                status, resp_headers, data = proxy._send(self.command, self.path, body, headers)
                if proxy.rewrite is not None:
                    data = proxy.rewrite(self.command, self.path, data)
                # Counted before the reply goes out: a client that has its answer must find
                # the request in the counters already.
                with proxy._lock:
                    proxy.requests[self.command] += 1
                    proxy.ranged += "Range" in self.headers
                    proxy.bytes_out += len(data) if self.command != "HEAD" else 0
                self.send_response(status)
                for k, v in resp_headers:
                    if k.lower() not in HOP_HEADERS:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)) if self.command != "HEAD"
                                 else dict((k.lower(), v) for k, v in resp_headers).get(
                                     "content-length", "0"))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _stats(self):
                data = json.dumps(proxy.stats()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _send(self, method, path, body, headers):
        for attempt in range(2):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port,
                                                  timeout=60)
                self._local.conn = conn
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, resp.getheaders(), data
            except (http.client.HTTPException, OSError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def stats(self) -> dict:
        """Counters since start: requests by method, range requests, response body bytes."""
        with self._lock:
            return {"requests": dict(self.requests), "ranged": self.ranged,
                    "bytes_out": self.bytes_out}

    def __enter__(self) -> str:
        self._thread.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def main() -> None:
    """Run standalone (its own process, so its threads never share a GIL with the client):
    `python latency_proxy.py --upstream http://127.0.0.1:5000 --latency-ms 20 --port 0`;
    prints the proxy URL on the first line of stdout."""
    import argparse
    import signal

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--upstream", required=True)
    p.add_argument("--latency-ms", type=float, default=20.0)
    args = p.parse_args()
    # Block the stop signals before any thread starts, so only sigwait below receives them.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    with LatencyProxy(args.upstream, args.latency_ms) as url:
        print(url, flush=True)
        signal.sigwait({signal.SIGTERM, signal.SIGINT})


if __name__ == "__main__":
    main()
