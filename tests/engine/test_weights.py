"""Weights manager: verified, resumable, cancellable downloads against a local HTTP server (127.0.0.1)."""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import threading
from pathlib import Path

import pytest

from engine import weights
from engine.records import EngineError, GenerationCancelled


class Server:
    """Serves ``files`` (name -> bytes) with Range support; ``cut_after[name] = n`` makes the *next* response for
    that file close the connection after n body bytes (while announcing the full length)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut_after: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                outer.requests.append((name, rng))
                if name not in outer.files:
                    self.send_error(404)
                    return
                data = outer.files[name]
                start = 0
                if rng:
                    start = int(re.match(r"bytes=(\d+)-", rng).group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = outer.cut_after.pop(name, None)
                self.wfile.write(body if cut is None else body[:cut])
                self.wfile.flush()
                if cut is not None:
                    self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    s = Server()
    yield s
    s.close()


def payload(n: int, seed: int = 0) -> bytes:
    # Deterministic pseudo-random bytes (no repetition that could hide an offset error).
    out, h = bytearray(), hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        h = hashlib.sha256(h).digest()
        out += h
    return bytes(out[:n])


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture(autouse=True)
def online(monkeypatch):
    monkeypatch.delenv("SHAP_E_OFFLINE", raising=False)


def test_good_download_with_progress(server, tmp_path):
    data = payload(3 * weights.CHUNK + 12345)
    server.files["a.bin"] = data
    seen = []
    dest = weights.download(server.url("a.bin"), tmp_path / "a.bin", sha256=sha(data),
                            progress=lambda done, total: seen.append((done, total)))
    assert dest.read_bytes() == data
    assert not (tmp_path / "a.bin.part").exists()
    assert seen[-1] == (len(data), len(data)) and all(t == len(data) for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_tqdm_like_progress(server, tmp_path):
    data = payload(5000)
    server.files["t.bin"] = data

    class Bar:
        total, n = None, 0

        def update(self, k):
            self.n += k

    bar = Bar()
    weights.download(server.url("t.bin"), tmp_path / "t.bin", sha256=sha(data), progress=bar)
    assert bar.n == len(data) and bar.total == len(data)


def test_wrong_hash_leaves_nothing(server, tmp_path):
    data = payload(100_000)
    server.files["b.bin"] = data
    with pytest.raises(EngineError, match="SHA-256") as err:
        weights.download(server.url("b.bin"), tmp_path / "b.bin", sha256="0" * 64)
    assert "deleted" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_then_resumed(server, tmp_path):
    data = payload(2 * weights.CHUNK + 777, seed=1)
    server.files["c.bin"] = data
    server.cut_after["c.bin"] = 300_000
    dest = tmp_path / "c.bin"
    with pytest.raises(EngineError, match="interrupted") as err:
        weights.download(server.url("c.bin"), dest, sha256=sha(data), retries=0)
    assert "resumes" in err.value.hint
    part = tmp_path / "c.bin.part"
    assert not dest.exists() and part.stat().st_size == 300_000
    weights.download(server.url("c.bin"), dest, sha256=sha(data))
    assert dest.read_bytes() == data and not part.exists()
    assert server.requests[-1] == ("c.bin", "bytes=300000-")  # resumed, not restarted


def test_automatic_retry_resumes(server, tmp_path):
    data = payload(500_000, seed=2)
    server.files["d.bin"] = data
    server.cut_after["d.bin"] = 123_456
    weights.download(server.url("d.bin"), tmp_path / "d.bin", sha256=sha(data), retries=1)
    assert (tmp_path / "d.bin").read_bytes() == data
    assert [r for _, r in server.requests] == [None, "bytes=123456-"]


def test_complete_part_file_is_verified_and_kept(server, tmp_path):
    data = payload(4096, seed=3)
    server.files["e.bin"] = data
    (tmp_path / "e.bin.part").write_bytes(data)  # a previous run got everything but stopped before the rename
    weights.download(server.url("e.bin"), tmp_path / "e.bin", sha256=sha(data))
    assert (tmp_path / "e.bin").read_bytes() == data


def test_cancel_keeps_part_for_resume(server, tmp_path):
    data = payload(3 * weights.CHUNK, seed=4)
    server.files["f.bin"] = data
    calls = []

    def should_cancel():
        calls.append(1)
        return len(calls) > 2  # cancel after two chunks

    with pytest.raises(GenerationCancelled):
        weights.download(server.url("f.bin"), tmp_path / "f.bin", sha256=sha(data), should_cancel=should_cancel)
    assert not (tmp_path / "f.bin").exists()
    assert (tmp_path / "f.bin.part").stat().st_size == 2 * weights.CHUNK
    weights.download(server.url("f.bin"), tmp_path / "f.bin", sha256=sha(data))
    assert (tmp_path / "f.bin").read_bytes() == data


def test_offline_gives_manual_instructions(server, tmp_path, monkeypatch):
    data = payload(10)
    server.files["g.bin"] = data
    for kwargs, env in (({"offline": True}, None), ({}, "1")):
        if env:
            monkeypatch.setenv("SHAP_E_OFFLINE", env)
        with pytest.raises(EngineError, match="offline") as err:
            weights.download(server.url("g.bin"), tmp_path / "g.bin", sha256=sha(data), **kwargs)
        assert server.url("g.bin") in err.value.hint and sha(data) in err.value.hint
        assert str(tmp_path / "g.bin") in err.value.hint
    assert server.requests == [] and list(tmp_path.iterdir()) == []


def test_http_error_and_no_server(server, tmp_path):
    with pytest.raises(EngineError, match="404"):
        weights.download(server.url("missing.bin"), tmp_path / "x.bin", sha256="0" * 64)
    with pytest.raises(EngineError, match="could not connect"):
        weights.download("http://127.0.0.1:9/x.bin", tmp_path / "x.bin", sha256="0" * 64, timeout=2)


def test_ensure_file_uses_registry_and_verifies(server, tmp_path, monkeypatch):
    data = payload(2048, seed=5)
    server.files["text_cond.pt"] = data
    entry = weights.WeightFile("text_cond.pt", server.url("text_cond.pt"), sha(data), len(data), "text300M", "t")
    monkeypatch.setitem(weights.REGISTRY, "text_cond.pt", entry)
    monkeypatch.setenv("SHAP_E_CACHE", str(tmp_path))
    assert weights.cache_dir() == tmp_path
    path = weights.ensure_file("text300M")
    assert path == tmp_path / "text_cond.pt" and path.read_bytes() == data
    n = len(server.requests)
    assert weights.ensure_file("text_cond.pt", offline=True) == path  # present: no network, offline is fine
    assert len(server.requests) == n
    path.write_bytes(b"x" + data[1:])  # damaged copy
    with pytest.raises(EngineError, match="SHA-256"):
        weights.ensure_file("text_cond.pt")
    assert path.exists()  # never deletes what it did not download


def test_registry_and_cache_dir(monkeypatch, tmp_path):
    assert set(weights.REGISTRY) == {"text_cond.pt", "image_cond.pt", "vector_decoder.pt", "transmitter.pt",
                                     "ViT-L-14.pt"}
    assert weights.REGISTRY["transmitter.pt"].sha256 == \
        "af02a0b85a8abdfb3919584b63c540ba175f6ad4790f574a7fef4617e5acdc3b"
    clip = weights.resolve("clip")
    assert clip.sha256 in clip.url and clip.url.endswith("/ViT-L-14.pt")
    assert all(re.fullmatch(r"[0-9a-f]{64}", e.sha256) for e in weights.REGISTRY.values())
    with pytest.raises(EngineError, match="unknown weights file"):
        weights.resolve("nope")
    monkeypatch.delenv("SHAP_E_CACHE", raising=False)
    monkeypatch.delenv("SHAP_E_MODELS_DIR", raising=False)
    monkeypatch.setattr(weights.sys, "platform", "linux")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert weights.cache_dir() == Path.home() / ".cache" / "shap_e_blender"
    monkeypatch.setattr(weights.sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path))
    assert weights.cache_dir() == tmp_path / "shap_e_blender"
    monkeypatch.setattr(weights.sys, "platform", "darwin")
    assert weights.cache_dir() == Path.home() / "Library" / "Caches" / "shap_e_blender"
    monkeypatch.setenv("SHAP_E_MODELS_DIR", str(tmp_path / "addon"))
    assert weights.cache_dir() == tmp_path / "addon"
    monkeypatch.setenv("SHAP_E_CACHE", str(tmp_path / "env"))
    assert weights.cache_dir() == tmp_path / "env"


def test_ensure_files_for_offline_lists_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("SHAP_E_CACHE", str(tmp_path))
    with pytest.raises(EngineError) as err:
        weights.ensure_files_for("text300M", offline=True)
    assert "text_cond.pt" in str(err.value)
    assert weights.REGISTRY["text_cond.pt"].url in err.value.hint
    assert os.listdir(tmp_path) == []
