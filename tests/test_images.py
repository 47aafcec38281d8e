"""Images for the model: size limits, JPEG drafts, http(s) URLs, pixels and the threaded loader.

The URL tests talk only to a server of their own on 127.0.0.1.
"""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import capcli.data.images as images
from capcli.infer.captioner import Captioner
from capcli.data.images import ImageError, image_batches, load_image
from capcli.data.listing import expand_paths
from conftest import shape_image

LIMIT = images.MAX_IMAGE_PIXELS


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def fake_size_png(path: Path, width: int, height: int) -> Path:
    """A real 8x8 PNG whose IHDR (with a correct CRC) claims width x height pixels."""
    from PIL import Image

    data = bytearray(png_bytes(Image.new("RGB", (8, 8), (200, 30, 30))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def no_decoding(monkeypatch) -> list:
    """Make every decode fail, recording the size of the image it was asked to decode."""
    from PIL import ImageFile

    sizes = []

    def load(self, *a, **k):
        sizes.append(self.size)
        raise OSError("decoding stopped by the test")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return sizes


# --------------------------------------------------------------------------- size limits

@pytest.fixture(scope="module")
def phone_photo(tmp_path_factory) -> Path:
    """A real 12000x9000 (108 MP) JPEG: above Pillow's warning limit (89 MP), below its hard one."""
    path = tmp_path_factory.mktemp("photo") / "phone.jpg"
    shape_image("red", "circle", size=64).resize((12000, 9000)).save(path, quality=10)
    return path


def test_a_108_megapixel_photo_loads_drafted_to_the_size_needed(phone_photo):
    img = load_image(phone_photo, draft_size=64)
    # Decoded at 1/8 scale, still at least 64 px a side: never the 324 MB full picture.
    assert img.mode == "RGB" and img.size == (1500, 1125)
    r, g, b = img.getpixel((750, 562))  # the middle of the red circle
    assert r > 180 and g < 80 and b < 80


def test_a_108_megapixel_photo_is_captioned(phone_photo, trained_model):
    result = Captioner.load(trained_model, "cpu").caption(phone_photo)
    assert result.ok, result.error
    assert result.path == str(phone_photo) and result.caption


def test_jpeg_in_an_mpo_file_is_drafted_too(tmp_path):
    """Phone cameras write MPO (a JPEG with extra pictures after it); Pillow names its format MPO."""
    from PIL import Image

    path = tmp_path / "camera.jpg"
    Image.new("RGB", (2000, 1000), (10, 200, 10)).save(path, "MPO", save_all=True,
                                                       append_images=[Image.new("RGB", (2000, 1000))])
    with Image.open(path) as raw:
        assert raw.format == "MPO"
    img = load_image(path, draft_size=64)
    assert img.size == (250, 125) and img.getpixel((5, 5))[1] > 180


def test_a_header_over_the_limit_is_refused_undecoded(tmp_path, no_decoding):
    with pytest.raises(ImageError) as e:
        load_image(fake_size_png(tmp_path / "bomb.png", 100_000, 100_000))
    assert str(e.value) == (f"image too large (100000x100000 pixels, more than the limit of {LIMIT}; "
                            f"see --max-image-pixels)")
    with pytest.raises(ImageError, match=r"^image too large \(13380x13380 pixels"):
        load_image(fake_size_png(tmp_path / "just-over.png", 13_380, 13_380))  # 179,024,400 pixels
    assert no_decoding == []


def test_max_pixels_is_the_callers_to_lower_or_lift(tmp_path, no_decoding):
    from PIL import Image

    small = tmp_path / "small.png"
    Image.new("RGB", (40, 40), (1, 2, 3)).save(small)
    with pytest.raises(ImageError, match=r"^image too large \(40x40 pixels, more than the limit of 1000; see --max-image-pixels\)$"):
        load_image(small, max_pixels=1000)
    assert no_decoding == []
    # Over Pillow's own hard limit, yet not refused when the caller lifts the limit: decoding starts.
    big = fake_size_png(tmp_path / "big.png", 20_000, 10_000)
    for max_pixels in (0, 200_000_000):
        with pytest.raises(ImageError, match="decoding stopped by the test"):
            load_image(big, max_pixels=max_pixels)
    assert no_decoding == [(20_000, 10_000)] * 2
    with pytest.raises(ImageError, match="more than the limit of 199999999;"):
        load_image(big, max_pixels=199_999_999)


def test_max_pixels_reaches_the_loader_threads_and_the_api(tmp_path, trained_model):
    from PIL import Image

    small = tmp_path / "small.png"
    Image.new("RGB", (40, 40), (1, 2, 3)).save(small)
    [[(_, refused)]] = image_batches([small], 8, batch_size=1, max_pixels=1000)
    assert isinstance(refused, ImageError) and "more than the limit of 1000" in str(refused)
    [[(_, pixels)]] = image_batches([small], 8, batch_size=1, max_pixels=0)
    assert pixels.shape == (8, 8, 3)
    cap = Captioner.load(trained_model, "cpu")
    assert "more than the limit of 1000" in cap.caption(small, max_pixels=1000).error
    assert [r.ok for r in cap.caption_stream([small], max_pixels=1000)] == [False]
    assert cap.caption(small, max_pixels=0).ok


# --------------------------------------------------------------------------- URLs

BIG = b"\xff\xd8\xff" + bytes(300_000)  # refused before anyone looks inside


class Handler(BaseHTTPRequestHandler):
    image = b""
    agents: list[str] = []

    def do_GET(self):
        Handler.agents.append(self.headers.get("User-Agent", ""))
        if self.path.startswith("/shape.png"):
            self.reply(200, self.image, "image/png")
        elif self.path == "/text":
            self.reply(200, b"<html>not a picture</html>", "text/html")
        elif self.path == "/slow-headers":
            time.sleep(2)
            self.reply(200, self.image, "image/png")
        elif self.path == "/slow-body":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(self.image[:100])
            self.wfile.flush()
            time.sleep(2)
        elif self.path == "/big":
            self.reply(200, BIG, "image/jpeg")
        elif self.path == "/big-unsized":  # no Content-Length: the size shows only while reading
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(BIG)
        else:
            self.reply(404, b"gone", "text/plain")

    def reply(self, code: int, body: bytes, kind: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """http://127.0.0.1:PORT serving a shape image (also saved as a file, for comparison)."""
    img = shape_image("blue", "square", size=64)
    Handler.image = png_bytes(img)
    file = tmp_path_factory.mktemp("served") / "shape.png"
    file.write_bytes(Handler.image)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}", file
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


def test_url_loads_like_the_file(server):
    base, file = server
    img = load_image(f"{base}/shape.png")
    assert img.mode == "RGB" and img.tobytes() == load_image(file).tobytes()
    assert Handler.agents[-1].startswith("capcli/")


@pytest.mark.parametrize("path,reason", [
    ("/missing.jpg", "HTTP 404 Not Found"),
    ("/text", "not an image (unrecognised format)"),
])
def test_url_errors_are_one_line_reasons(server, path, reason):
    base, _ = server
    with pytest.raises(ImageError) as e:
        load_image(base + path)
    assert str(e.value) == reason


@pytest.mark.parametrize("path", ["/slow-headers", "/slow-body"])
def test_url_timeout(server, monkeypatch, path):
    base, _ = server
    monkeypatch.setattr(images, "URL_TIMEOUT", 0.5)
    start = time.monotonic()
    with pytest.raises(ImageError, match=r"^timed out after 0.5 s$"):
        load_image(base + path)
    assert time.monotonic() - start < 1.8


@pytest.mark.parametrize("path", ["/big", "/big-unsized"])
def test_url_too_large(server, monkeypatch, path):
    base, _ = server
    monkeypatch.setattr(images, "URL_MAX_BYTES", 2**18)
    with pytest.raises(ImageError, match=r"^larger than 0.25 MB$"):
        load_image(base + path)
    monkeypatch.setattr(images, "URL_MAX_BYTES", 2**19)  # read in full, then found to be no image
    with pytest.raises(ImageError, match=r"^truncated or corrupt image data$"):
        load_image(base + path)


def test_url_connection_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free, and nobody listens once it is closed
    with pytest.raises(ImageError, match=r"^cannot connect: connection refused$"):
        load_image(f"http://127.0.0.1:{port}/a.jpg")


@pytest.mark.parametrize("url,scheme", [("ftp://127.0.0.1/a.jpg", "ftp"), ("s3://bucket/a.jpg", "s3")])
def test_other_url_schemes_are_refused(url, scheme):
    with pytest.raises(ImageError) as e:
        load_image(url)
    assert str(e.value) == f"unsupported URL scheme {scheme}:// (http and https only)"


def test_expand_paths_keeps_urls_as_they_are(tmp_path):
    urls = ["https://example.com/a//b.jpg?x=1", "http://example.com/c.png", "s3://bucket/d.jpg"]
    (tmp_path / "e.png").write_bytes(b"")
    found = list(expand_paths([urls[0], str(tmp_path), *urls[1:]]))
    assert found == [urls[0], str(tmp_path / "e.png"), *urls[1:]]
    assert all(type(u) is str for u in found)


def test_urls_through_the_loader_and_the_api(server, trained_model):
    base, file = server
    url = f"{base}/shape.png?size=64&x=//y"
    [[(item, pixels), (_, error)]] = image_batches([url, f"{base}/nope"], 64, batch_size=2)
    assert item == url and pixels.shape == (64, 64, 3)
    assert str(error) == "HTTP 404 Not Found"
    cap = Captioner.load(trained_model, "cpu")
    from_url, missing, from_file = cap.caption([url, f"{base}/nope", file])
    assert from_url.path == url and from_url.ok
    assert from_url.caption == from_file.caption
    assert missing.path == f"{base}/nope" and missing.error == "HTTP 404 Not Found"


# --------------------------------------------------------------------------- pixels and the loader

def test_pixels_are_normalised_channel_by_channel_into_channels_last_memory():
    import torch
    from PIL import Image

    from capcli.data.images import image_to_pixels, image_to_tensor, normalize_pixels

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    img = Image.new("RGB", (10, 6), (255, 128, 0))
    pixels = image_to_pixels(img, 4)
    assert pixels.dtype == torch.uint8 and pixels.shape == (4, 4, 3)
    assert pixels.reshape(-1, 3).tolist() == [[255, 128, 0]] * 16
    x = normalize_pixels(torch.stack([pixels, 255 - pixels]), mean, std)  # (2, 3, 4, 4)
    assert x.shape == (2, 3, 4, 4) and x.is_contiguous(memory_format=torch.channels_last)
    for b, rgb in enumerate([(255, 128, 0), (0, 127, 255)]):
        for c in range(3):
            want = (rgb[c] / 255 - mean[c]) / std[c]
            torch.testing.assert_close(x[b, c], torch.full((4, 4), want), rtol=0, atol=1e-6)
    assert torch.equal(image_to_tensor(img, 4, mean, std), x[0])


@pytest.mark.parametrize("overlap", [False, True])
def test_image_batches_keep_order_and_errors_in_place_and_load_at_most_one_batch_ahead(tmp_path, monkeypatch, overlap):
    """overlap=False (the CPU): nothing loads while the caller works on a batch; overlap=True (a
    GPU): the next batch, and no more, loads meanwhile."""
    from PIL import Image

    paths = []
    for k in range(8):
        paths.append(tmp_path / f"{k}.png")
        if k != 3:  # 3.png is missing
            Image.new("RGB", (9, 7), (k * 30, 0, 0)).save(paths[-1])
    loaded, lock = [], threading.Lock()
    real_load = images.load_image

    def counting_load(path, **kw):
        with lock:
            loaded.append(Path(path).name)
        return real_load(path, **kw)

    monkeypatch.setattr(images, "load_image", counting_load)
    batches = images.image_batches(iter(paths), 5, batch_size=3, workers=2, overlap=overlap)
    first = next(batches)
    deadline = time.time() + 5
    while overlap and len(loaded) < 6 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # anything else that were to load would have started by now
    assert len(loaded) == (6 if overlap else 3)
    rest = list(batches)
    assert [len(b) for b in [first, *rest]] == [3, 3, 2]
    items = [item for b in [first, *rest] for item in b]
    assert [p for p, _ in items] == paths
    for k, (_, item) in enumerate(items):
        if k == 3:
            assert isinstance(item, ImageError) and "no such file" in str(item)
        else:
            assert item.shape == (5, 5, 3) and item[..., 0].unique().tolist() == [k * 30]
