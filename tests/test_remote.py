"""Image and manifest URLs read over a real HTTP server on 127.0.0.1 that misbehaves on purpose:
what is tried again (timeouts, cut bodies, 503, 429), what fails at once (404, not an image), how
many requests each URL costs, the per-host limit on requests in flight, and how a row that failed
for a transient reason is tried again by the next run, fresh or resumed, without redoing the
others."""

from __future__ import annotations

import io
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import noise_image

from lregions_core import index, remote
from lregions_core.batch import new_state, run_all
from lregions_core.config import run_config
from lregions_core.images import ImageLoadError, TransientImageError, read_source
from lregions_core.manifest import ManifestError, read_manifest
from lregions_core.store import Store

READ_TIMEOUT = 0.4  # seconds: LREGIONS_HTTP_TIMEOUT in these tests
CONFIG = run_config("tiny", None, ["num_anchors=2", "iterations=1"])


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    noise_image(48, 40, seed).save(buffer, "PNG")
    return buffer.getvalue()


class Faults:
    """What the server does: for each path, a list of faults for its first requests (then
    ``ok``), and what it saw: requests per path, their start times, the most in flight at once.
    Faults: ``ok``, ``503``, ``429`` (Retry-After: 1), ``404``, ``cut`` (Content-Length of the
    whole body, half of it sent, connection closed), ``stall`` (half the body, then nothing for
    three read timeouts), ``slow`` (the whole body after 0.3 s), ``text`` (a 200 that is not an
    image), ``503:VALUE`` or ``429:VALUE`` (that status with ``Retry-After: VALUE``), ``trickle``
    (one byte of the body every 0.1 s, until the client leaves or the test ends) and
    ``unsized`` (the body without Content-Length, ended by closing the connection)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bodies: dict[str, bytes] = {}
        self.plans: dict[str, list[str]] = {}
        self.requests: dict[str, int] = defaultdict(int)
        self.started: dict[str, list[float]] = defaultdict(list)
        self.in_flight = 0
        self.most_in_flight = 0
        self.stop = threading.Event()

    def serve(self, path: str, body: bytes, *plan: str) -> None:
        self.bodies[path], self.plans[path] = body, list(plan)

    def next_fault(self, path: str) -> str:
        with self.lock:
            n = self.requests[path]
            self.requests[path] += 1
            self.started[path].append(time.monotonic())
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        plan = self.plans.get(path)
        if plan is None:
            return "404"
        return plan[n] if n < len(plan) else "ok"

    def done(self) -> None:
        with self.lock:
            self.in_flight -= 1


def handler(faults: Faults) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            path = self.path
            fault = faults.next_fault(path)
            self.counted = True
            try:
                self.answer(path, fault)
            finally:
                self.leave()

        def leave(self) -> None:
            """The request is no longer in flight (once per request). Called before a whole
            body's last write: the client can end the request, and start another, only once
            that write has happened, so the count never lags behind the client's."""
            if self.counted:
                self.counted = False
                faults.done()

        def answer(self, path: str, fault: str) -> None:
            body = faults.bodies.get(path, b"")
            status, _, retry_after = fault.partition(":")
            if status in ("503", "404", "429"):
                self.send_response(int(status))
                if fault == "429" or retry_after:
                    self.send_header("Retry-After", retry_after or "1")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if fault == "text":
                body = b"<html>not an image</html>"
            if fault == "slow":
                faults.stop.wait(0.3)
            self.send_response(200)
            self.send_header("Content-Type", "text/html" if fault == "text" else "image/png")
            if fault != "unsized":
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if fault == "trickle":
                self.close_connection = True
                for n in range(len(body)):
                    if faults.stop.wait(0.1):
                        return
                    try:
                        self.wfile.write(body[n : n + 1])
                        self.wfile.flush()
                    except OSError:  # the client gave up
                        return
                return
            if fault in ("cut", "stall"):
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                if fault == "stall":
                    faults.stop.wait(3 * READ_TIMEOUT)
                self.close_connection = True
                return
            self.leave()
            self.wfile.write(body)

    return Handler


@pytest.fixture
def server() -> Iterator[tuple[str, Faults]]:
    """A threaded HTTP server on 127.0.0.1 (a free port) for one test; stopped afterwards."""
    faults = Faults()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler(faults))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", faults
    finally:
        faults.stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def quick_http(monkeypatch):
    """Small timeouts and backoff so that every retry in these tests costs little."""
    monkeypatch.setenv("LREGIONS_HTTP_TIMEOUT", str(READ_TIMEOUT))
    monkeypatch.setenv("LREGIONS_HTTP_CONNECT_TIMEOUT", "2")
    monkeypatch.setenv("LREGIONS_HTTP_BACKOFF", "0.05")
    monkeypatch.setenv("LREGIONS_HTTP_RETRIES", "4")
    monkeypatch.setenv("LREGIONS_HTTP_PER_HOST", "4")


def serve_one_fault_each(faults: Faults) -> None:
    """503 twice, a cut body, a stall, a 429 and a text body, each then fine (pngs 1 to 4)."""
    faults.serve("/flaky.png", png(1), "503", "503")
    faults.serve("/cut.png", png(2), "cut")
    faults.serve("/stall.png", png(3), "stall")
    faults.serve("/busy.png", png(4), "429")
    faults.serve("/text.png", b"", "text")


def test_each_fault_is_retried_or_failed_as_it_should(server):
    base, faults = server
    serve_one_fault_each(faults)

    for path, seed, requests in [("/flaky.png", 1, 3), ("/cut.png", 2, 2), ("/stall.png", 3, 2),
                                 ("/busy.png", 4, 2)]:
        assert read_source(base + path) == png(seed), path
        assert faults.requests[path] == requests, path
    first, second = faults.started["/busy.png"]
    assert second - first >= 0.95  # Retry-After: 1 was honoured

    with pytest.raises(ImageLoadError) as missing:
        read_source(base + "/missing.png")
    assert not isinstance(missing.value, TransientImageError)
    assert str(missing.value) == (f"cannot read image {base}/missing.png: HTTP 404 Not Found "
                                  "(1 try)")
    assert faults.requests["/missing.png"] == 1
    assert read_source(base + "/text.png").startswith(b"<html>")  # decoding judges it
    assert faults.requests["/text.png"] == 1


def test_a_fault_that_persists_is_transient_and_names_url_status_and_tries(server, monkeypatch):
    base, faults = server
    monkeypatch.setenv("LREGIONS_HTTP_RETRIES", "2")
    faults.serve("/down.png", png(1), *["503"] * 10)
    faults.serve("/hangs.png", png(2), *["stall"] * 10)
    with pytest.raises(TransientImageError) as down:
        read_source(base + "/down.png")
    assert str(down.value) == (f"cannot read image {base}/down.png: HTTP 503 Service "
                               "Unavailable (3 tries; transient: the next run tries again)")
    with pytest.raises(TransientImageError) as hangs:
        read_source(base + "/hangs.png")
    assert f"no data for {READ_TIMEOUT:g} s (read timed out) (3 tries;" in str(hangs.value)
    assert faults.requests["/down.png"] == 3 and faults.requests["/hangs.png"] == 3
    assert remote.error_kind(down.value) == "transient"

    # nothing listens on a closed port: refused at once, tried again, then transient
    with pytest.raises(remote.FetchError) as refused:
        remote.fetch("http://127.0.0.1:9/x.png")
    assert refused.value.transient and refused.value.tries == 3
    assert "cannot connect" in str(refused.value)


def test_manifest_url_is_read_with_retries(server):
    base, faults = server
    faults.serve("/m.csv", b"id,image,prompt\na,pics/a.png,a red hat\n", "503", "cut")
    rows = read_manifest(base + "/m.csv")
    assert [(r.id, r.image, r.error) for r in rows] == [("a", base + "/pics/a.png", None)]
    assert faults.requests["/m.csv"] == 3
    with pytest.raises(ManifestError, match=r"absent\.csv: cannot read: HTTP 404 Not Found"):
        read_manifest(base + "/absent.csv")


def test_a_malformed_retry_after_falls_back_to_the_backoff(server, monkeypatch):
    base, faults = server
    faults.serve("/odd.png", png(5), "503:soon", "429:1.5")
    assert read_source(base + "/odd.png") == png(5)
    assert faults.requests["/odd.png"] == 3
    first, _, third = faults.started["/odd.png"]
    assert third - first < 0.9  # neither value was read as a wait

    monkeypatch.setenv("LREGIONS_HTTP_RETRIES", "2")
    faults.serve("/odd-down.png", png(5), *["503:1.5"] * 10)
    with pytest.raises(TransientImageError) as down:
        read_source(base + "/odd-down.png")
    assert str(down.value).endswith(
        "HTTP 503 Service Unavailable (3 tries; transient: the next run tries again)")
    assert faults.requests["/odd-down.png"] == 3
    assert remote._Retry().parse_retry_after("7") == 7


def test_a_fetch_ends_within_its_total_time(server, monkeypatch):
    """A body that trickles in (each byte well within the read timeout) and a server that keeps
    asking to come back later both end as transient failures once LREGIONS_HTTP_TOTAL_TIMEOUT
    has passed, without another try."""
    base, faults = server
    monkeypatch.setenv("LREGIONS_HTTP_TOTAL_TIMEOUT", "1")
    faults.serve("/trickle.png", png(6), *["trickle"] * 10)
    start = time.monotonic()
    with pytest.raises(remote.FetchError) as slow:
        remote.fetch(base + "/trickle.png")
    assert time.monotonic() - start < 1 + READ_TIMEOUT + 0.5
    assert slow.value.transient and slow.value.tries == 1
    assert "body not read within 1 s (LREGIONS_HTTP_TOTAL_TIMEOUT;" in str(slow.value)
    assert faults.requests["/trickle.png"] == 1

    monkeypatch.setenv("LREGIONS_HTTP_TOTAL_TIMEOUT", "1.5")
    faults.serve("/busy.png", png(6), *["429"] * 10)  # Retry-After: 1: a third try is too late
    with pytest.raises(TransientImageError) as busy:
        read_source(base + "/busy.png")
    assert str(busy.value).endswith(
        "HTTP 429 Too Many Requests; no time left to try again within 1.5 s "
        "(LREGIONS_HTTP_TOTAL_TIMEOUT) (2 tries; transient: the next run tries again)")
    assert faults.requests["/busy.png"] == 2


def test_a_body_over_the_size_limit_fails_at_once(server, monkeypatch):
    base, faults = server
    monkeypatch.setenv("LREGIONS_HTTP_MAX_BYTES", "1000")
    faults.serve("/big.png", png(7))
    faults.serve("/big-unsized.png", png(7), "unsized")
    faults.serve("/small.png", b"x" * 1000, "unsized")
    with pytest.raises(ImageLoadError) as big:
        read_source(base + "/big.png")
    assert not isinstance(big.value, TransientImageError)
    assert f"body of {len(png(7))} bytes (Content-Length) is larger than 1000 bytes" in str(
        big.value)
    with pytest.raises(remote.FetchError) as unsized:
        remote.fetch(base + "/big-unsized.png")
    assert str(unsized.value) == (f"cannot fetch {base}/big-unsized.png: body larger than 1000 "
                                  "bytes (LREGIONS_HTTP_MAX_BYTES) (1 try)")
    assert remote.error_kind(unsized.value) == "data"
    assert faults.requests["/big.png"] == faults.requests["/big-unsized.png"] == 1
    assert remote.fetch(base + "/small.png") == b"x" * 1000


def test_tls_errors_are_permanent_only_for_a_certificate_that_fails_verification():
    from urllib3.exceptions import MaxRetryError, SSLError
    from urllib3.util.ssl_match_hostname import CertificateError

    settings = remote.HttpSettings()
    untrusted = SSLError(ssl.SSLCertVerificationError(1, "certificate verify failed"))
    wrong_host = SSLError(CertificateError("hostname 'a' doesn't match 'b'"))
    cut_short = SSLError(ssl.SSLEOFError(8, "EOF occurred in violation of protocol"))
    reset = SSLError(ConnectionResetError(104, "Connection reset by peer"))
    for error, transient in [(untrusted, False), (wrong_host, False), (cut_short, True),
                             (reset, True)]:
        problem, kind = remote._error_text(error, settings)
        assert problem.startswith("TLS error: ") and kind is transient, error
    retry = remote._Retry(total=None, other=5)
    with pytest.raises(MaxRetryError):  # not tried again
        retry.increment("GET", "https://example.org/x.png", error=untrusted)
    assert retry.increment("GET", "https://example.org/x.png", error=cut_short).other == 4


@pytest.mark.parametrize("url", ["http://h:99999/x.png", "http://h:abc/x", "http://[::1/x",
                                 "http:///x.png", "ftp://h/x.png"])
def test_a_malformed_url_fails_at_once_naming_it(url):
    with pytest.raises(remote.FetchError) as bad:
        remote.fetch(url)
    assert not bad.value.transient and bad.value.tries == 0
    assert str(bad.value).startswith(f"cannot fetch {url}: malformed URL (")
    assert str(bad.value).endswith("(no request made)")


def test_settings_name_a_bad_variable_and_hosts_share_a_default_port(monkeypatch):
    assert remote.check_settings().total_timeout == 300
    monkeypatch.setenv("LREGIONS_HTTP_MAX_BYTES", "1.5")
    with pytest.raises(remote.SettingsError,
                       match=r"^LREGIONS_HTTP_MAX_BYTES must be an integer > 0, got '1.5'$"):
        remote.check_settings()
    monkeypatch.setenv("LREGIONS_HTTP_MAX_BYTES", "2048")
    monkeypatch.setenv("LREGIONS_HTTP_TOTAL_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="LREGIONS_HTTP_TOTAL_TIMEOUT must be a number > 0"):
        remote.fetch("http://127.0.0.1:9/x.png")
    assert remote._host_key("HTTP://Example.ORG/x") == remote._host_key("http://example.org:80/y")
    assert remote._host_key("https://example.org/x") == "https://example.org:443"


@pytest.mark.parametrize("limit", [2, 3])
def test_requests_in_flight_per_host_stay_within_the_limit(server, monkeypatch, limit):
    base, faults = server
    monkeypatch.setenv("LREGIONS_HTTP_PER_HOST", str(limit))
    for n in range(8):
        faults.serve(f"/{n}.png", png(n), "slow")
    threads = [threading.Thread(target=read_source, args=(f"{base}/{n}.png",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sum(faults.requests.values()) == 8
    assert faults.most_in_flight == limit  # reached (8 threads at once), never passed


def run_batch(out, manifest, *, kill_before_merge: bool = False):
    """What ``lregions edit`` does for chunks of 3 rows, without Prefect: begin (or resume) the
    run, run every chunk whose part is not done, write its part, then merge unless the run is
    "killed" first. Returns the run id and the rows' index records by id."""
    rows = read_manifest(str(manifest))
    store = Store(str(out))
    run_id, done = index.begin_run(store, "", index.fingerprint(rows, CONFIG, chunk_size=3))
    for chunk, start in enumerate(range(0, len(rows), 3)):
        if f"{chunk:06d}" in done:
            continue
        states = run_all([new_state(r) for r in rows[start:start + 3]], CONFIG, store)
        index.write_part(store, "", run_id, f"{chunk:06d}", states, CONFIG)
    if not kill_before_merge:
        index.merge(store, "", run_id)
    return run_id, index.read_index(store).set_index("id")


def write_manifest(tmp_path, base: str, names: list[str]):
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,image,prompt\n" + "".join(
        f"{name},{base}/{name}.png,a red hat\n" for name in names))
    return manifest


def test_batch_rows_over_a_faulty_server(server, tmp_path):
    base, faults = server
    serve_one_fault_each(faults)
    names = ["flaky", "cut", "stall", "busy", "missing", "text"]
    _, table = run_batch(tmp_path / "out", write_manifest(tmp_path, base, names))
    assert table.loc[["flaky", "cut", "stall", "busy"], "status"].eq("ok").all(), table["error"]
    assert table.loc[["flaky", "cut", "stall", "busy"], "error_kind"].isna().all()
    assert table.loc["missing", "error"] == (
        f"ingest: cannot read image {base}/missing.png: HTTP 404 Not Found (1 try)")
    assert table.loc["text", "error"] == (
        f"ingest: cannot read image {base}/text.png: not an image file (unrecognised format)")
    assert table.loc[["missing", "text"], "error_kind"].eq("data").all()
    assert {f"/{n}.png": faults.requests[f"/{n}.png"] for n in names} == {
        "/flaky.png": 3, "/cut.png": 2, "/stall.png": 2, "/busy.png": 2, "/missing.png": 1,
        "/text.png": 1}


@pytest.mark.parametrize("resumed", [False, True], ids=["fresh-rerun", "resumed-run"])
def test_transient_row_is_tried_again_by_the_next_run_alone(server, tmp_path, monkeypatch,
                                                             resumed):
    base, faults = server
    monkeypatch.setenv("LREGIONS_HTTP_RETRIES", "1")
    names = ["a", "b", "down", "c", "missing"]  # chunks of 3: [a, b, down], [c, missing]
    for n, name in enumerate(names):
        faults.serve(f"/{name}.png", png(n))
    faults.serve("/down.png", png(2), *["503"] * 100)
    faults.plans.pop("/missing.png")
    manifest, out = write_manifest(tmp_path, base, names), tmp_path / "out"

    first_run, first = run_batch(out, manifest, kill_before_merge=resumed)
    assert first.loc["down", "status"] == "error"
    assert first.loc["down", "error_kind"] == "transient"
    assert first.loc["down", "error"].startswith(
        f"ingest: cannot read image {base}/down.png: HTTP 503 Service Unavailable (2 tries; "
        "transient")
    assert first.loc["missing", "error_kind"] == "data"
    assert first.loc[["a", "b", "c"], "status"].eq("ok").all()

    faults.plans["/down.png"] = []  # the server is fixed
    seen = dict(faults.requests)
    second_run, second = run_batch(out, manifest)
    assert (second_run == first_run) is resumed  # the killed run was resumed, the merged not
    assert second.loc["down", "status"] == "ok" and not second.loc["down", "reused"]
    assert faults.requests["/down.png"] == seen["/down.png"] + 1
    assert second.loc[["a", "b"], "reused"].all()  # its chunk ran again: reused, not redone
    assert second.loc["missing", "error_kind"] == "data"
    if resumed:  # the chunk without a transient failure was done: not run, not fetched again
        assert faults.requests["/c.png"] == seen["/c.png"]
        assert faults.requests["/missing.png"] == seen["/missing.png"]
        assert not second.loc["c", "reused"]  # its record is the first run's
    else:  # a fresh run tries every row; finished ones are reused
        assert second.loc["c", "reused"]
        assert faults.requests["/missing.png"] == seen["/missing.png"] + 1
    assert not (out / "index-parts").exists()


def test_shard_rerun_tries_its_transient_rows_again(prefect_server, server, tmp_path,
                                                     monkeypatch):
    """The coordinator's path: a shard run writes its parts; the same shard run again (the
    coordinator resuming the batch) runs the chunk with the transient row and skips the other."""
    from flows.shard import edit_shard

    base, faults = server
    monkeypatch.setenv("LREGIONS_HTTP_RETRIES", "1")
    names = ["a", "down", "b", "c"]  # chunks of 2: [a, down], [b, c]
    for n, name in enumerate(names):
        faults.serve(f"/{name}.png", png(n))
    faults.serve("/down.png", png(1), *["503"] * 100)
    rows = read_manifest(str(write_manifest(tmp_path, base, names)))
    out, sets = tmp_path / "out", ["num_anchors=2", "iterations=1"]
    store = Store(str(out))
    fingerprint = index.fingerprint(rows, CONFIG, chunk_size=2, shard_size=4, evaluate=False)
    run_id, _ = index.begin_run(store, "", fingerprint)
    records = [r.to_record() for r in rows]

    def shard() -> dict:
        return edit_shard(records, str(out), run_id, 0, preset="tiny", sets=sets, chunk_size=2,
                          evaluate=False)

    assert shard()["failed"] == 1
    assert index.read_index(store).set_index("id").loc["down", "error_kind"] == "transient"
    assert index.begin_run(store, "", fingerprint) == (run_id, {"s000000-000001"})

    faults.plans["/down.png"] = []
    seen = dict(faults.requests)
    summary = shard()
    assert (summary["rows"], summary["ok"], summary["failed"]) == (4, 4, 0)
    table = index.read_index(store).set_index("id")
    assert table["status"].eq("ok").all()
    assert table.loc["a", "reused"] and not table.loc["down", "reused"]
    assert faults.requests["/b.png"] == seen["/b.png"]  # its chunk was done: not run again
    assert not (out / "index-parts" / f"run={run_id}" / "s000000-000000.retry.json").exists()
    assert index.begin_run(store, "", fingerprint)[1] == {"s000000-000000", "s000000-000001"}


def test_one_batch_keeps_to_the_per_host_limit(prefect_server, server, tmp_path, monkeypatch):
    """``lregions edit`` with chunks of one row: up to 4 task threads fetch at once, but the
    server never sees more than LREGIONS_HTTP_PER_HOST=2 requests in flight."""
    from flows.cli import main

    base, faults = server
    monkeypatch.setenv("LREGIONS_HTTP_PER_HOST", "2")
    names = [f"p{n}" for n in range(6)]
    for n, name in enumerate(names):
        faults.serve(f"/{name}.png", png(n), "slow")
    out = tmp_path / "out"
    assert main(["edit", str(write_manifest(tmp_path, base, names)), "--out", str(out),
                 "--preset", "tiny", "--chunk-size", "1", "--set", "num_anchors=2",
                 "--set", "iterations=1"]) == 0
    assert sum(faults.requests.values()) == 6
    assert faults.most_in_flight <= 2
