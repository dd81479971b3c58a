"""The REST transport on raw sockets: HTTP/1.1 parsing (no smuggling, chunked bodies), limits,
timeouts, the connection cap, protocol errors as JSON, SIGTERM drain, and a seeded fuzz run."""

from __future__ import annotations

import contextlib
import json
import random
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest

from serving.core import DataPlane
from serving.manager import ModelManager
from serving.rest_server import RestApi, RestServer
from tests.model_fixtures import write_tf2
from tests.server_process import ServerProcess, running_server
from training.multiworker import free_ports

MAX_BODY = 100_000
FUZZ_REQUESTS, FUZZ_SECONDS = 6000, 50  # whichever comes first
BODY = b'{"instances": [[1.0], [2.0]]}'
PREDICTIONS = {"predictions": [[2.5], [3.0]]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("rest-transport")
    write_tf2(root / "model" / "1")
    with running_server([f"--model_base_path={root / 'model'}", f"--max_request_bytes={MAX_BODY}"],
                        root / "server.log", ["default"]) as process:
        yield process


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def parse_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Every (status, headers, body) in `data`, bodies framed by Content-Length."""
    responses = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", 0))
        responses.append((int(lines[0].split()[1]), headers, rest[:length]))
        data = rest[length:]
    return responses


def exchange(port: int, raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Sends `raw` on a new connection; the responses until the server closes it."""
    with connect(port) as sock:
        sock.sendall(raw)
        return parse_responses(read_until_closed(sock))


def request(method: str, path: str, body: bytes = b"", headers: str = "", close: bool = True) -> bytes:
    framing = f"Content-Length: {len(body)}\r\n" if body else ""
    return (f"{method} {path} HTTP/1.1\r\nHost: t\r\n{framing}{headers}"
            f"{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n").encode() + body


def chunked(body: bytes, size: int = 7) -> bytes:
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def assert_json_error(response, status: int, says: str = "") -> None:
    code, headers, body = response
    assert code == status, (code, body)
    assert headers["content-type"] == "application/json"
    error = json.loads(body)
    assert set(error) == {"error"} and says in error["error"], error


def test_a_get_body_is_read_as_its_body_never_run_as_a_second_request(server):
    smuggled = request("GET", "/v1/models/default/metadata", close=False)
    raw = (request("GET", "/v1/models/default", smuggled, close=False)
           + request("GET", "/v1/models/nope"))  # the last one closes the connection
    responses = exchange(server.rest_port, raw)
    assert [r[0] for r in responses] == [200, 404]
    assert "model_version_status" in json.loads(responses[0][2])


def test_chunked_bodies_are_decoded(server):
    raw = request("POST", "/v1/models/default:predict", headers="Transfer-Encoding: chunked\r\n") + chunked(BODY)
    [(status, _, body)] = exchange(server.rest_port, raw)
    assert status == 200 and json.loads(body) == PREDICTIONS


def test_keep_alive_serves_requests_in_turn_on_one_connection(server):
    one = request("POST", "/v1/models/default:predict", BODY, close=False)
    responses = exchange(server.rest_port, one * 3 + request("GET", "/v1/models/default"))
    assert [r[0] for r in responses] == [200] * 4
    assert all(json.loads(r[2]) == PREDICTIONS for r in responses[:3])


@pytest.mark.parametrize("case, raw, status, says", [
    ("declared body over the limit", b"POST /v1/models/default:predict HTTP/1.1\r\nHost: t\r\n"
     b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1), 413, "exceeds the limit of 100000 bytes"),
    ("chunked body over the limit", b"POST /v1/models/default:predict HTTP/1.1\r\nHost: t\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n" + chunked(b"a" * (MAX_BODY + 10), 40_000), 413, "exceeds the limit"),
    ("request line too long", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414, "request line"),
    ("header too long", b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, "header"),
    ("Content-Length abc", b"POST /v1/models/default:predict HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
     400, "Content-Length"),
    ("Content-Length -5", b"POST /v1/models/default:predict HTTP/1.1\r\nHost: t\r\nContent-Length: -5\r\n\r\n",
     400, "Content-Length"),
    ("bad chunk size", b"POST /v1/models/default:predict HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"zz\r\nabc\r\n0\r\n\r\n", 400, "chunk"),
    ("Content-Length and chunked", b"POST /v1/models/default:predict HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "Transfer-Encoding"),
    ("unknown method token", b"FROB /v1/models/default HTTP/1.1\r\nHost: t\r\n\r\n", 400, "method"),
    ("not HTTP", b"\x16\x03\x01\x02\x00\x01\x00\r\n\r\n", 400, "Malformed HTTP request"),
    # TF Serving's handler answers any other method under /v1/ with 400 "Malformed request"
    # (http_rest_api_handler.cc, ProcessRequest); outside /v1/ nothing is served: 404.
    ("PUT under /v1/", request("PUT", "/v1/models/default"), 400, "Malformed request: PUT /v1/models/default"),
    ("DELETE elsewhere", request("DELETE", "/other"), 404, "Not found: DELETE /other"),
    ("version above int64", request("GET", "/v1/models/default/versions/99999999999999999999"), 400,
     "Failed to convert version: 99999999999999999999 to numeric."),
    ("lone UTF-16 surrogate", request("POST", "/v1/models/default:predict", b'{"instances": ["\\ud800"]}'), 400,
     "JSON Parse error"),
    ("JSON nested 1,100 deep", request("POST", "/v1/models/default:predict",
                                       b'{"instances": ' + b"[" * 1100 + b"]" * 1100 + b"}"), 400, "nested too deeply"),
    ("instances nested 900 deep", request("POST", "/v1/models/default:predict",
                                          b'{"instances": ' + b"[" * 900 + b"1" + b"]" * 900 + b"}"), 400, "nested"),
])
def test_protocol_errors_are_json_with_their_status(server, case, raw, status, says):
    responses = exchange(server.rest_port, raw)
    assert len(responses) == 1, responses
    assert_json_error(responses[0], status, says)


def test_server_header_does_not_name_python(server):
    [(status, headers, _)] = exchange(server.rest_port, request("GET", "/v1/models/default"))
    assert status == 200 and "python" not in headers["server"].lower()


@contextlib.contextmanager
def rest_server(**limits):
    """An in-process REST server over an empty model manager: the transport alone."""
    rest = RestServer(RestApi(DataPlane(ModelManager()), None, 5.0), "127.0.0.1", 0, MAX_BODY, 2, **limits)
    rest.start()
    try:
        yield rest
    finally:
        rest.stop(1.0)


def test_idle_connections_are_closed_after_the_idle_timeout():
    with rest_server(idle_timeout=0.5) as rest, connect(rest.port) as never_speaks, \
            connect(rest.port) as keep_alive:
        keep_alive.sendall(request("GET", "/v1/models/x", close=False))
        assert keep_alive.recv(65536).startswith(b"HTTP/1.1 404")
        assert read_until_closed(never_speaks) == b""  # closed by the server, not by our 10 s timeout
        assert read_until_closed(keep_alive) == b""


def test_a_body_that_stops_arriving_is_408_json():
    with rest_server(body_timeout=0.5) as rest:
        raw = request("POST", "/v1/models/x:predict", BODY)
        [response] = exchange(rest.port, raw[:-5])
        assert_json_error(response, 408, "did not arrive within 0.5 s")


def test_over_the_connection_cap_idle_connections_make_room_for_real_requests():
    with rest_server(max_connections=20) as rest, contextlib.ExitStack() as stack:
        idle = [stack.enter_context(connect(rest.port)) for _ in range(60)]
        responses = exchange(rest.port, request("GET", "/v1/models/x"))
        assert_json_error(responses[0], 404, "x")
        closed = sum(1 for sock in idle[:40] if read_until_closed(sock) == b"")
        assert closed == 40  # the oldest idle ones were closed to stay at the cap


@contextlib.contextmanager
def file_limit(soft: int):
    """Children started inside inherit a soft RLIMIT_NOFILE of `soft`."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


@pytest.mark.slow
def test_more_idle_connections_than_the_file_limit_do_not_starve_requests_or_the_poller(tmp_path):
    write_tf2(tmp_path / "model" / "1")
    with file_limit(256):
        process = ServerProcess([f"--model_base_path={tmp_path / 'model'}"], tmp_path / "server.log")
    try:
        process.wait_available(["default"])
        with contextlib.ExitStack() as stack:
            for _ in range(400):  # more than the server's 256 descriptors
                stack.enter_context(connect(process.rest_port))
            write_tf2(tmp_path / "model" / "2")  # the poller must still open files
            [(status, _, body)] = exchange(process.rest_port, request("POST", "/v1/models/default:predict", BODY))
            assert status == 200 and json.loads(body) == PREDICTIONS
            deadline = time.monotonic() + 30
            while "version 2" not in process.log_text() and time.monotonic() < deadline:
                time.sleep(0.2)
        assert "Successfully loaded servable version {name: default version: 2}" in process.log_text()
        assert "Too many open files" not in process.log_text()
    finally:
        process.stop()


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight_closes_idle_connections_and_refuses_new_ones(tmp_path):
    write_tf2(tmp_path / "model" / "1")
    process = ServerProcess([f"--model_base_path={tmp_path / 'model'}"], tmp_path / "server.log")
    try:
        process.wait_available(["default"])
        idle, in_flight = connect(process.rest_port), connect(process.rest_port)
        idle.sendall(request("GET", "/v1/models/default", close=False))
        assert idle.recv(65536).startswith(b"HTTP/1.1 200")
        head = request("POST", "/v1/models/default:predict", BODY, close=False)
        in_flight.sendall(head[:-10])  # headers and part of the body: the request is running
        time.sleep(0.5)  # let the server start it before the signal
        process.proc.send_signal(signal.SIGTERM)
        assert read_until_closed(idle) == b""  # an idle keep-alive connection is closed
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the listener closes: new connections are refused
            try:
                connect(process.rest_port, 1).close()
                time.sleep(0.1)
            except ConnectionRefusedError:
                break
        else:
            pytest.fail("the REST port still accepts connections after SIGTERM")
        in_flight.sendall(head[-10:])
        [(status, headers, body)] = parse_responses(read_until_closed(in_flight))
        assert status == 200 and json.loads(body) == PREDICTIONS and headers["connection"] == "close"
        assert process.proc.wait(30) == 0
    finally:
        process.stop()


def fuzz_request(rng: random.Random) -> tuple[bytes, bool]:
    """A random request and whether it is valid: mostly mistakes a client can make."""
    if rng.random() < 0.15:
        return request("POST", "/v1/models/default:predict", BODY), True
    path = rng.choice(["/v1/models/default:predict", "/v1/models/default", "/v1/models/default/metadata",
                       "/v1/models/default/versions/1:predict", "/v1/models/nope:predict", "/v1/models//x",
                       "/v1/models/default/versions/" + "9" * rng.randint(1, 40), "/v1/models/default:regress",
                       "/v1/models/default/labels/" + "x" * rng.randint(0, 30) + ":predict", "/" + "z" * 50, "/"])
    body = rng.choice([BODY, b"", b"{", b"[]", b"null", b'{"instances": []}', b'{"inputs": {"x": [[1]]}}',
                       b'{"instances": [["a"]]}', b'{"instances": [[1e400]]}', b'{"instances": [[NaN]]}',
                       b'{"instances": [{"b64": "!!"}]}', b'{"signature_name": 5, "instances": [[1.0]]}',
                       b'{"instances": ["\\udc00"]}', b"[" * rng.randint(1, 1500), rng.randbytes(rng.randint(1, 200)),
                       b'{"examples": [{"x": [1, "a"]}]}', b'{"instances": ' + b"[" * 70 + b"1" + b"]" * 70 + b"}"])
    method = rng.choice(["POST", "POST", "GET", "PUT", "DELETE", "OPTIONS", "PATCH", "HEAD"])
    kind = rng.random()
    if kind < 0.6:
        valid = method == "POST" and path == "/v1/models/default:predict" and body == BODY
        return request(method, path, body), valid
    if kind < 0.75:
        return request(method, path, headers="Transfer-Encoding: chunked\r\n") + chunked(body, rng.randint(1, 9)), False
    broken = rng.choice([
        b"POST " + path.encode() + b" HTTP/1.1\r\nContent-Length: " + rng.choice([b"abc", b"-1", b"1e3", b" "]) + b"\r\n\r\n",
        b"GET " + path.encode() + b" HTTP/9.9\r\n\r\n",
        rng.randbytes(rng.randint(1, 100)) + b"\r\n\r\n",
        b"GET /" + b"a" * rng.randint(8200, 9000) + b" HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X: " + b"b" * 8300 + b"\r\n\r\n",
        b"POST " + path.encode() + b" HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + rng.randbytes(8) + b"\r\n\r\n",
    ])
    return broken, False


def rss_mib(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.slow
def test_seeded_fuzz_of_the_rest_front_end(server):
    rng = random.Random(13)
    valid = request("POST", "/v1/models/default:predict", BODY)
    before = exchange(server.rest_port, valid)[0][2]
    counts, started, rss = {}, time.monotonic(), []
    for i in range(FUZZ_REQUESTS):
        if i == FUZZ_REQUESTS // 5 or time.monotonic() - started > FUZZ_SECONDS:
            rss.append(rss_mib(server.proc.pid))
        if time.monotonic() - started > FUZZ_SECONDS:
            break
        raw, is_valid = fuzz_request(rng)
        try:
            responses = exchange(server.rest_port, raw)
        except (ConnectionResetError, BrokenPipeError):
            continue  # the server closed on an error before reading all we sent; never for valid ones
        assert responses, raw[:200]
        status, headers, body = responses[0]
        counts[status] = counts.get(status, 0) + 1
        assert status < 500, (raw[:300], body)
        if status >= 400 and not raw.startswith(b"HEAD"):
            assert headers["content-type"] == "application/json" and set(json.loads(body)) == {"error"}, body
        if is_valid:
            assert status == 200 and body == before
    assert server.proc.poll() is None
    assert exchange(server.rest_port, valid)[0][2] == before
    assert counts.get(200, 0) > 300 and sum(v for k, v in counts.items() if k >= 400) > 1000, counts
    rss.append(rss_mib(server.proc.pid))
    assert rss[-1] < rss[0] * 1.2, rss


@pytest.mark.slow
@pytest.mark.parametrize("port, says", [(70000, "is out of range: give 1-65535"),
                                        ("busy", "cannot listen on 0.0.0.0:{port}: Address already in use")])
def test_a_rest_port_in_use_or_out_of_range_is_one_line_and_exit_1(tmp_path, port, says):
    write_tf2(tmp_path / "model" / "1")
    grpc_port, free = free_ports(2)
    with socket.create_server(("0.0.0.0", free)) as busy:
        port = busy.getsockname()[1] if port == "busy" else port
        result = subprocess.run([sys.executable, "-m", "aekit_cli", "serve", f"--port={grpc_port}",
                                 f"--rest_api_port={port}", f"--model_base_path={tmp_path / 'model'}"],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"aekit serve: --rest_api_port={port}") and says.format(port=port) in last, result.stderr
    assert "Traceback" not in result.stderr
