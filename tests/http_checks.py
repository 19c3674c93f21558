"""Raw-socket checks shared by the tests of every HTTP port: exact bytes in, status and body out,
over IPv4 and IPv6, for the hostile inputs no HTTP client library would send."""

from __future__ import annotations

import json
import socket

from support import wait_for

FAMILIES = ["127.0.0.1", "::1"]
REPLY_TIMEOUT_S = 60  # a guard against a hang, never a measure


def exchange(host: str, port: int, data: bytes, *, until_closed: bool = False) -> tuple[int | None, dict, bytes]:
    """Send raw bytes; the reply's status, headers and body (status None: closed without a reply).
    With `until_closed`, read until the server closes the connection."""
    with socket.create_connection((host, port), timeout=REPLY_TIMEOUT_S) as sock:
        if data:
            sock.sendall(data)
        received = b""
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
            head, _, body = received.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            if not until_closed and length is not None and len(body) >= length:
                break
    if not received:
        return None, {}, b""
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


def request(path: str, body: bytes, *, token: str | None = None, content_type: str = "application/json",
            headers: bytes = b"") -> bytes:
    auth = f"Authorization: Bearer {token}\r\n".encode() if token else b""
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n".encode() + auth + headers + b"\r\n" + body)


def error_of(status: int | None, body: bytes) -> str:
    """The message of an error reply in vLLM's shape (and that it has the shape)."""
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status, error
    return error["message"]


def check_slow_clients_are_cut_off(host: str, port: int, path: str, token: str | None = None) -> None:
    """An idle connection, one whose headers stop halfway, and one whose body does: closed
    (the body with 408); before, each stayed open for an hour."""
    assert exchange(host, port, b"", until_closed=True)[0] is None
    assert exchange(host, port, f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Ty".encode(),
                    until_closed=True)[0] is None
    started = request(path, b"", token=token).replace(b"Content-Length: 0", b"Content-Length: 100")
    status, _, body = exchange(host, port, started + b'{"item', until_closed=True)
    assert status == 408 and "http_body_timeout_s" in error_of(408, body)


def check_no_token_leaks(host: str, port: int, token: str, path: str, log) -> None:
    """The CRLF of a token file (curl -H "Authorization: Bearer $(cat token)") and a header
    over 8190 bytes: a 400 that says what is wrong, and the token neither in it nor in the log."""
    start = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n".encode()
    for line, what in [(f"Authorization: Bearer {token}\r\r\n", "malformed request header"),
                       (f"Authorization: Bearer {token}{'x' * 9000}\r\n", "longer than 8190 bytes")]:
        status, _, body = exchange(host, port, start + line.encode() + b"\r\n")
        assert status == 400 and what in error_of(400, body) and token.encode() not in body
    wait_for(lambda: "longer than 8190 bytes" in log.read_text(), what="the refusal's log line")
    assert token not in log.read_text()
