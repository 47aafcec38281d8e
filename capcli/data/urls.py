"""Downloading an http(s) URL into memory, bounded in size and in time for the whole download.

A socket timeout bounds each read, never their sum, so a server that sends a byte at a time could
hold a download for ever: here a timer shuts the download's sockets at its deadline instead. The
limits are the caller's (data.images sets those for images).
"""

from __future__ import annotations

import re
import socket
import threading
import time

from capcli.version import __version__

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")  # two letters at least: C:// is a Windows drive


class DownloadError(Exception):
    """A URL could not be downloaded; the message says why in a few words ("HTTP 404 Not Found")."""


def is_url(item) -> bool:
    """A string that starts with a scheme (https://...); Path objects are always files."""
    return isinstance(item, str) and _URL.match(item) is not None


def fetch_url(url: str, timeout: float, max_bytes: int) -> bytes:
    """Download an http(s) URL into memory: at most ``max_bytes``, within ``timeout`` seconds in all."""
    import http.client
    import urllib.error
    import urllib.request

    scheme = url.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise DownloadError(f"unsupported URL scheme {scheme}:// (http and https only)")
    too_large = DownloadError(f"larger than {max_bytes / 2**20:g} MB")
    timed_out = DownloadError(f"timed out after {timeout:g} s")
    request = urllib.request.Request(url, headers={"User-Agent": f"capcli/{__version__}"})
    deadline = _Deadline(timeout)
    try:
        with _opener(deadline).open(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise too_large
            chunks, total = [], 0
            while chunk := response.read1(1 << 16):  # what has come, not a wait for 64 KB of it
                total += len(chunk)
                if total > max_bytes:
                    raise too_large
                chunks.append(chunk)
        if deadline.expired:  # the connection was shut mid-way: what came is not the whole
            raise timed_out
    except DownloadError:
        raise
    except Exception as e:
        if deadline.expired or isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError):
            raise timed_out from None
        if isinstance(e, urllib.error.HTTPError):
            raise DownloadError(f"HTTP {e.code} {e.reason}") from None
        if isinstance(e, urllib.error.URLError):  # refused, unknown host, TLS: no response at all
            reason = getattr(e.reason, "strerror", None) or str(e.reason)
            raise DownloadError(f"cannot connect: {reason[:1].lower() + reason[1:]}") from None
        if isinstance(e, (http.client.InvalidURL, ValueError)):  # spaces, a bad port
            raise DownloadError(f"invalid URL ({e})") from None
        if isinstance(e, (http.client.HTTPException, OSError)):  # cut off mid-way
            raise DownloadError(f"download failed ({e.__class__.__name__}: {e})") from None
        raise
    finally:
        deadline.close()
    if not chunks:
        raise DownloadError("empty response")
    return b"".join(chunks)


class _Deadline:
    """Ends one download at a fixed time, whatever it is waiting for: the connection, TLS, headers,
    or a body that comes a byte at a time (a socket timeout bounds each read, never their sum). At
    the deadline every socket of the download is shut down, so its blocked read returns at once."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def connect(self, address, timeout=None, source_address=None) -> socket.socket:
        """socket.create_connection for http.client, with the connection watched."""
        sock = socket.create_connection(address, max(self.end - time.monotonic(), 0.001), source_address)
        with self._lock:
            # TLS takes this socket's descriptor over; a duplicate shuts the same connection down.
            self._sockets.append(sock.dup())
            if self.expired:
                self._sockets[-1].shutdown(socket.SHUT_RDWR)
        return sock

    def connection(self, kind):
        """An http.client connection class (HTTPConnection, HTTPSConnection) whose sockets this watches."""
        def make(*args, **kwargs):
            conn = kind(*args, **kwargs)
            conn._create_connection = self.connect  # http.client's hook for making its socket
            return conn
        return make

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # already closed by the other end
                    pass

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()


def _opener(deadline: _Deadline):
    """urllib's opener (proxies and redirects as urlopen's) with its connections watched by ``deadline``."""
    import http.client
    import urllib.request

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(deadline.connection(http.client.HTTPConnection), req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):  # http.client's default context: certificates and host names checked
            return self.do_open(deadline.connection(http.client.HTTPSConnection), req)

    handlers = [HTTPHandler] + ([HTTPSHandler] if hasattr(http.client, "HTTPSConnection") else [])
    return urllib.request.build_opener(*handlers)
