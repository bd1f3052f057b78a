"""Every image mode PIL opens becomes the picture it shows; everything else is refused in one InputError.

Each image is built with PIL in ``tmp_path`` and the decoded pixels are checked by value: a wrong
conversion (16-bit gray clipped to white, alpha dropped, EXIF ignored, a later animation frame) shows up
as a wrong colour or size, and a refusal must be an ``InputError`` so datasets skip the image.
"""

from __future__ import annotations

import io
import os
import socket
import stat
import struct
import tempfile
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedlens.errors import InputError
from embedlens.images import BACKGROUND, load_image, to_rgb


def pixels(image: Image.Image) -> np.ndarray:
    """``(H, W, 3)`` int array of an RGB image (signed, so differences do not wrap)."""
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def assert_colour(image: Image.Image, expected: tuple[int, int, int], tolerance: int = 0) -> None:
    """Every pixel of ``image`` is ``expected`` within ``tolerance`` per channel."""
    diff = np.abs(pixels(image) - np.array(expected))
    assert diff.max() <= tolerance, f"expected {expected}, got {np.unique(pixels(image).reshape(-1, 3), axis=0)}"


def saved(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def png_header_only_huge(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of ``width`` x ``height`` black pixels, a few kB thanks to compression."""
    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row * 1000) for _ in range(height // 1000)) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


class TestWideModes:
    """16-bit and float images are scaled by their value range; PIL's own conversion clips them to white."""

    def test_16_bit_png_gray_is_mid_gray(self, tmp_path):
        path = saved(Image.fromarray(np.full((8, 8), 32768, np.uint16)), tmp_path / "g16.png")
        assert Image.open(path).mode == "I;16"
        assert_colour(load_image(path), (128, 128, 128), tolerance=1)

    def test_16_bit_range_ends_and_middle(self, tmp_path):
        values = np.array([[0, 257, 65535, 12850]], np.uint16)  # 12850 = 50 * 257
        image = load_image(saved(Image.fromarray(values), tmp_path / "ramp.png"))
        assert pixels(image)[0, :, 0].tolist() == [0, 1, 255, 50]

    @pytest.mark.parametrize("mode", ["I;16B", "I;16L", "I;16N"])
    def test_16_bit_byte_orders(self, mode):
        dtype = {"I;16B": ">u2", "I;16L": "<u2", "I;16N": "=u2"}[mode]
        image = Image.frombytes(mode, (2, 1), np.array([32768, 65535], dtype).tobytes())
        assert pixels(load_image(image))[0, :, 0].tolist() == [128, 255]

    def test_16_bit_tiff_big_endian(self, tmp_path):
        image = Image.frombytes("I;16B", (3, 1), np.array([0, 32768, 65535], ">u2").tobytes())
        path = saved(image, tmp_path / "g16b.tiff")
        assert pixels(load_image(path))[0, :, 0].tolist() == [0, 128, 255]

    def test_32_bit_integers_in_the_16_bit_range(self):
        image = Image.fromarray(np.array([[0, 32768, 65535, -5]], np.int32))
        assert image.mode == "I"
        assert pixels(load_image(image))[0, :, 0].tolist() == [0, 128, 255, 0]

    def test_32_bit_integers_beyond_16_bits_are_stretched_by_their_maximum(self):
        image = Image.fromarray(np.array([[0, 500_000, 1_000_000]], np.int32))
        assert pixels(load_image(image))[0, :, 0].tolist() == [0, 128, 255]

    def test_float_in_0_to_1(self):
        image = Image.fromarray(np.array([[0.0, 0.5, 1.0, -0.25, np.nan]], np.float32))
        assert image.mode == "F"
        assert pixels(load_image(image))[0, :, 0].tolist() == [0, 128, 255, 0, 0]

    def test_float_in_0_to_255_is_clipped(self):
        image = Image.fromarray(np.array([[0.0, 100.4, 255.0, 300.0, np.inf]], np.float32))
        assert pixels(load_image(image))[0, :, 0].tolist() == [0, 100, 255, 255, 255]

    def test_float_tiff_file(self, tmp_path):
        path = saved(Image.fromarray(np.full((4, 4), 0.25, np.float32)), tmp_path / "f.tiff")
        assert_colour(load_image(path), (64, 64, 64), tolerance=1)

    def test_16_bit_gray_with_a_transparent_value(self, tmp_path):
        path = saved(Image.fromarray(np.array([[0, 32768]], np.uint16)), tmp_path / "t16.png", transparency=0)
        assert Image.open(path).info.get("transparency") == 0
        assert pixels(load_image(path))[0].tolist() == [list(BACKGROUND), [128, 128, 128]]


class TestEightBitModes:
    """PIL's conversions of the 8-bit modes keep the colour (checked on a pure colour each)."""

    @pytest.mark.parametrize(
        ("mode", "value", "expected", "tolerance"),
        [
            ("1", 1, (255, 255, 255), 0),
            ("L", 77, (77, 77, 77), 0),
            ("RGB", (12, 34, 56), (12, 34, 56), 0),
            ("RGBX", (12, 34, 56, 0), (12, 34, 56), 0),
            ("CMYK", (0, 255, 255, 0), (255, 0, 0), 0),
            ("YCbCr", (76, 85, 255), (255, 0, 0), 1),
            ("HSV", (85, 255, 255), (0, 255, 0), 0),
            ("LAB", (136, 208, 195), (255, 0, 0), 12),
        ],
    )
    def test_mode(self, mode, value, expected, tolerance):
        assert_colour(load_image(Image.new(mode, (3, 2), value)), expected, tolerance)

    def test_palette_without_transparency(self, tmp_path):
        image = Image.new("P", (4, 4), 1)
        image.putpalette([0, 0, 0, 10, 200, 30])
        assert_colour(load_image(saved(image, tmp_path / "p.png")), (10, 200, 30))

    def test_cmyk_jpeg_file(self, tmp_path):
        path = saved(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=100)
        assert Image.open(path).mode == "CMYK"
        assert_colour(load_image(path), (255, 0, 0), tolerance=3)

    def test_result_is_detached_from_the_file(self, tmp_path):
        path = saved(Image.new("RGB", (4, 4), (1, 2, 3)), tmp_path / "x.png")
        image = load_image(path)
        path.unlink()
        assert_colour(image, (1, 2, 3))

    def test_in_memory_image_is_not_modified(self):
        source = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
        load_image(source)
        assert source.mode == "RGBA" and source.getpixel((0, 0)) == (255, 0, 0, 0)


class TestTransparency:
    """Alpha is composited onto white (``BACKGROUND``), not dropped."""

    def test_half_transparent_red_rgba(self, tmp_path):
        path = saved(Image.new("RGBA", (4, 4), (255, 0, 0, 128)), tmp_path / "half.png")
        # 255 * (1 - 128/255) = 127 on green and blue
        assert_colour(load_image(path), (255, 127, 127), tolerance=1)

    def test_fully_transparent_is_background_whatever_the_colour(self):
        assert_colour(load_image(Image.new("RGBA", (2, 2), (0, 0, 0, 0))), BACKGROUND)

    def test_opaque_rgba_keeps_its_colour(self):
        assert_colour(load_image(Image.new("RGBA", (2, 2), (10, 20, 30, 255))), (10, 20, 30))

    def test_gray_with_alpha(self, tmp_path):
        path = saved(Image.new("LA", (2, 2), (0, 64)), tmp_path / "la.png")
        # black at alpha 64 over white: 255 * (1 - 64/255) = 191
        assert_colour(load_image(path), (191, 191, 191), tolerance=1)

    def test_premultiplied_modes(self):
        assert_colour(load_image(Image.new("La", (2, 2), (0, 0))), BACKGROUND)
        assert_colour(load_image(Image.new("RGBa", (2, 2), (0, 0, 0, 0))), BACKGROUND)

    def test_palette_with_transparent_index_gif(self, tmp_path):
        image = Image.new("P", (4, 2), 0)
        image.putpalette([0, 0, 0, 255, 0, 0])
        image.paste(1, (2, 0, 4, 2))
        path = saved(image, tmp_path / "t.gif", transparency=0)
        decoded = pixels(load_image(path))
        assert decoded[:, :2].reshape(-1, 3).tolist() == [list(BACKGROUND)] * 4
        assert decoded[:, 2:].reshape(-1, 3).tolist() == [[255, 0, 0]] * 4

    def test_palette_with_alpha_png(self, tmp_path):
        image = Image.new("P", (2, 2), 0)
        image.putpalette([0, 0, 255])
        path = saved(image, tmp_path / "pa.png", transparency=bytes([128]))
        # blue at alpha 128 over white: red and green 127, blue 255
        assert_colour(load_image(path), (127, 127, 255), tolerance=1)

    def test_pa_mode(self):
        image = Image.new("PA", (2, 2), (0, 0))
        image.putpalette([0, 255, 0])
        assert_colour(load_image(image), BACKGROUND)

    def test_rgb_with_transparent_colour(self, tmp_path):
        image = Image.new("RGB", (2, 1), (9, 9, 9))
        image.putpixel((1, 0), (200, 100, 50))
        path = saved(image, tmp_path / "trns.png", transparency=(9, 9, 9))
        assert pixels(load_image(path))[0].tolist() == [list(BACKGROUND), [200, 100, 50]]


class TestOrientationAndFrames:
    """EXIF orientation is applied; an animated file gives its first frame."""

    @staticmethod
    def _halves() -> Image.Image:
        image = Image.new("RGB", (40, 20), (255, 0, 0))
        image.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
        return image

    @pytest.mark.parametrize("suffix", [".png", ".jpg"])
    def test_exif_rotation_swaps_the_size(self, tmp_path, suffix):
        exif = Image.Exif()
        exif[0x0112] = 6  # displayed turned 90 degrees clockwise
        path = saved(self._halves(), tmp_path / f"turned{suffix}", exif=exif)
        assert Image.open(path).size == (40, 20)
        image = load_image(path)
        assert image.size == (20, 40)
        top, bottom = pixels(image)[5, 10], pixels(image)[35, 10]
        assert np.abs(top - [255, 0, 0]).max() <= 8 and np.abs(bottom - [0, 0, 255]).max() <= 8

    def test_exif_rotation_of_an_in_memory_image(self, tmp_path):
        exif = Image.Exif()
        exif[0x0112] = 8  # turned 90 degrees counter-clockwise
        path = saved(self._halves(), tmp_path / "turned.png", exif=exif)
        with Image.open(path) as opened:
            image = load_image(opened)
        assert image.size == (20, 40)
        assert pixels(image)[5, 10].tolist() == [0, 0, 255]

    def test_no_exif_keeps_the_size(self, tmp_path):
        assert load_image(saved(self._halves(), tmp_path / "plain.png")).size == (40, 20)

    @pytest.mark.parametrize("suffix", [".gif", ".png", ".webp"])
    def test_animation_gives_the_first_frame(self, tmp_path, suffix):
        frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
        path = tmp_path / f"anim{suffix}"
        options = {"lossless": True} if suffix == ".webp" else {}
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0, **options)
        assert getattr(Image.open(path), "n_frames", 1) == 3
        assert_colour(load_image(path), (255, 0, 0), tolerance=2)


class TestSize:
    """Over ``PIL.Image.MAX_IMAGE_PIXELS``: refused before decoding, except JPEG, which is drafted down."""

    def test_20000_square_png_is_refused_in_one_input_error(self, tmp_path):
        path = png_header_only_huge(tmp_path / "bomb.png", 20000, 20000)
        assert path.stat().st_size < 200_000
        with pytest.raises(InputError, match=r"20000 x 20000 pixels \(400 megapixels\).*limit") as caught:
            load_image(path)
        assert "\n" not in str(caught.value)

    def test_over_the_limit_png_without_warnings(self, tmp_path, monkeypatch):
        path = saved(Image.new("RGB", (120, 100)), tmp_path / "big.png")  # 12000 pixels: between 1x and 2x
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(InputError, match="120 x 100 pixels"):
                load_image(path)

    def test_at_the_limit_is_accepted(self, tmp_path, monkeypatch):
        path = saved(Image.new("RGB", (100, 100), (5, 6, 7)), tmp_path / "edge.png")
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
        assert_colour(load_image(path), (5, 6, 7))

    @pytest.mark.parametrize(("size", "expected"), [((120, 120), (60, 60)), ((400, 400), (100, 100))])
    def test_jpeg_is_decoded_at_a_reduced_scale(self, tmp_path, monkeypatch, size, expected):
        path = saved(Image.new("RGB", size, (0, 128, 255)), tmp_path / "big.jpg", quality=95)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
        image = load_image(path)
        assert image.size == expected
        assert_colour(image, (0, 128, 255), tolerance=4)

    def test_jpeg_too_big_even_at_one_eighth_is_refused(self, tmp_path, monkeypatch):
        path = saved(Image.new("RGB", (400, 400)), tmp_path / "huge.jpg")
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
        with pytest.raises(InputError, match="400 x 400"):
            load_image(path)

    def test_no_limit_when_pil_has_none(self, tmp_path, monkeypatch):
        path = saved(Image.new("RGB", (120, 100)), tmp_path / "big.png")
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
        assert load_image(path).size == (120, 100)

    def test_zero_size_in_memory_image(self):
        with pytest.raises(InputError, match="no pixels"):
            load_image(Image.new("RGB", (0, 3)))


def _refuses_quickly(path: Path | str, match: str) -> None:
    """``load_image(path)`` raises an ``InputError`` matching ``match`` within 10 s (no hang)."""
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            load_image(path)
            outcome.append(None)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), f"load_image({path}) hangs"
    assert isinstance(outcome[0], InputError), outcome[0]
    assert "\n" not in str(outcome[0])
    assert match in str(outcome[0])


class TestFiles:
    """Only regular, readable image files are opened; each problem is one InputError."""

    def test_missing(self, tmp_path):
        _refuses_quickly(tmp_path / "nope.png", "image not found")

    def test_directory(self, tmp_path):
        _refuses_quickly(tmp_path, "directory")

    def test_fifo_does_not_hang(self, tmp_path):
        fifo = tmp_path / "pipe.png"
        os.mkfifo(fifo)
        _refuses_quickly(fifo, "FIFO")

    def test_symlink_to_a_fifo(self, tmp_path):
        fifo = tmp_path / "pipe"
        os.mkfifo(fifo)
        (tmp_path / "link.png").symlink_to(fifo)
        _refuses_quickly(tmp_path / "link.png", "FIFO")

    def test_character_device(self):
        assert stat.S_ISCHR(os.stat("/dev/zero").st_mode)
        _refuses_quickly("/dev/zero", "device")

    def test_socket(self):
        with tempfile.TemporaryDirectory(dir="/tmp") as folder:
            where = Path(folder) / "s.png"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
                server.bind(str(where))
                _refuses_quickly(where, "socket")

    def test_zero_bytes(self, tmp_path):
        (tmp_path / "empty.png").write_bytes(b"")
        _refuses_quickly(tmp_path / "empty.png", "not a valid or complete image")

    def test_not_an_image(self, tmp_path):
        (tmp_path / "text.jpg").write_text("hello")
        _refuses_quickly(tmp_path / "text.jpg", "not a valid or complete image")

    @pytest.mark.parametrize("suffix", [".png", ".jpg", ".gif"])
    def test_truncated(self, tmp_path, suffix):
        buffer = io.BytesIO()
        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(buffer, format=Image.registered_extensions()[suffix])
        (tmp_path / f"cut{suffix}").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        _refuses_quickly(tmp_path / f"cut{suffix}", "not a valid or complete image")

    def test_unreadable_file(self, tmp_path, monkeypatch):
        """A file the process may not read (``chmod 0`` does not stop root, so the refusal is simulated)."""
        path = saved(Image.new("RGB", (2, 2)), tmp_path / "locked.png")
        real_open = Path.open

        def denied(self, *args, **kwargs):
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return real_open(self, *args, **kwargs)

        monkeypatch.setattr(Path, "open", denied)
        _refuses_quickly(path, f"cannot open image {path}: Permission denied")


def test_to_rgb_is_public_and_matches_load_image():
    image = Image.fromarray(np.array([[1000, 60000]], np.uint16))
    assert pixels(to_rgb(image)).tolist() == pixels(load_image(image)).tolist() == [[[4, 4, 4], [233, 233, 233]]]
