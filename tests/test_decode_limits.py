"""Decode limits that hold in native code (issue 17, points 6 and 7): scan bombs rejected
before decoding, decodes past the time limit killed in their child process, 16-bit
conversion without float64, and the decode a row keeps for the models reduced."""

import io
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from manifests.schema import BYTES, Reason
from pipeline.testdata import hostile, images
from manifests.config import ValidateConfig
from stages import decode_pool, webp
from manifests.rejects import reject_rows
from stages.validate import (decode_webp_reduced, jpeg_scans, reduce_image, to_rgb, validate_batch_decodes,
                             validate_image)

ROOT = Path(__file__).resolve().parent.parent
CHILD = "stages.validate:decode_in_child"
IN_PROCESS = ValidateConfig(isolate_over_s=1e9, timeout_s=0)  # every decode in this process


def _table(blobs: list[bytes]) -> pa.Table:
    ids = [f"r{i}" for i in range(len(blobs))]
    return reject_rows(pa.table({"id": ids, "uri": ids, BYTES: pa.array(blobs, pa.binary())}), "ingest",
                       [None] * len(blobs))


def _rows(table: pa.Table) -> list[dict]:
    return table.select(["reason", "detail", "decode_ms", "format"]).to_pylist()


def _with_thumbnail(jpeg: bytes, thumb: bytes) -> bytes:
    """``jpeg`` with an APP1 segment holding another JPEG, as an EXIF thumbnail is stored."""
    payload = b"Exif\0\0" + thumb
    return jpeg[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def test_scan_bomb_is_rejected_before_decoding_and_the_batch_completes(good, photos):
    bomb = hostile.progressive_jpeg(4096, 4096, 883)  # ~110 KB; 5-9 s of libjpeg without the bound
    progressive = images.encode(Image.fromarray(photos["china"]), "JPEG", quality=90, progressive=True)
    assert jpeg_scans(bomb) == 883 and jpeg_scans(progressive) == 10
    thumb = images.encode(Image.fromarray(photos["rocket"]).resize((160, 120)), "JPEG")
    assert jpeg_scans(_with_thumbnail(progressive, thumb)) == 10  # the thumbnail's scan is not counted
    out, decodes = validate_batch_decodes(_table([good["astronaut.jpg"], bomb, progressive, good["coffee.png"]]),
                                          ValidateConfig(), cover=224)
    rows = _rows(out)
    assert [r["reason"] for r in rows] == [None, Reason.DECOMPRESSION_BOMB, None, None], rows
    assert rows[1]["detail"] == "progressive JPEG with 883 scans > validate.max_jpeg_scans 100"
    assert rows[1]["decode_ms"] < 1000, rows[1]  # counted from the bytes, never decoded
    assert decodes[1] is None and all(decodes[i] is not None for i in (0, 2, 3))


def test_decode_stuck_in_native_code_is_killed_and_the_next_rows_decode(good):
    # 883 scans over 8192x8192: ~20 s inside one simplejpeg call, which no Python-level
    # deadline can interrupt; allowed here (max_jpeg_scans) so that only the time limit acts.
    stuck = hostile.progressive_jpeg(8192, 8192, 883)
    cfg = ValidateConfig(timeout_s=0.5, max_jpeg_scans=1000)
    child = decode_pool.shared(CHILD)
    assert validate_image(good["rocket.tiff"], cfg).reason is None  # a TIFF always decodes in the child: started
    started = child.started
    blobs = [good["astronaut.jpg"], stuck, good["rocket.tiff"], good["coffee.png"]]
    t0 = time.perf_counter()
    out, decodes = validate_batch_decodes(_table(blobs), cfg, cover=224)
    took = time.perf_counter() - t0
    rows = _rows(out)
    assert [r["reason"] for r in rows] == [None, Reason.DECODE_TIMEOUT, None, None], rows
    assert "decode process killed" in rows[1]["detail"]
    assert rows[1]["decode_ms"] < (cfg.timeout_s + 3) * 1000, rows[1]
    assert rows[2]["format"] == "TIFF" and decodes[2] is not None  # decoded by the replacement child
    assert child.started == started + 1 and child.pid is not None
    assert took < 60, took  # the batch did not wait for the stuck decode


def _cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _kill_once_busy(pid: int, busy_s: float = 0.3, limit_s: float = 50.0) -> None:
    """SIGKILL ``pid`` once it has spent ``busy_s`` of CPU since now (it is decoding)."""
    start, t0 = _cpu_s(pid), time.monotonic()
    while _cpu_s(pid) - start < busy_s and time.monotonic() - t0 < limit_s:
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def test_decode_process_killed_from_outside_is_a_reject_not_a_dead_worker(good):
    """What the kernel's OOM killer does to a decode: the row is rejected, the batch goes on."""
    stuck = hostile.progressive_jpeg(8192, 8192, 883)
    cfg = ValidateConfig(timeout_s=60, max_jpeg_scans=1000)
    child = decode_pool.shared(CHILD)
    assert validate_image(good["rocket.tiff"], cfg).reason is None  # started and ready
    killer = threading.Thread(target=_kill_once_busy, args=(child.pid,))  # not a timer: a loaded
    killer.start()  # machine may start the batch late, and the kill must hit the decode
    out, _ = validate_batch_decodes(_table([stuck, good["rocket.tiff"]]), cfg)
    killer.join()
    rows = _rows(out)
    assert [r["reason"] for r in rows] == [Reason.CORRUPT, None], rows
    assert "decode process died (signal 9" in rows[0]["detail"]


def test_16bit_gray_converts_exactly_with_integer_arithmetic():
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    got = np.asarray(to_rgb(Image.fromarray(every)))
    assert got.shape == (256, 256, 3)
    assert np.array_equal(got[..., 0], np.rint(every / 257.0).astype(np.uint8))
    assert np.array_equal(got[..., 0], got[..., 2])


def test_16bit_png_is_converted_without_float64_temporaries():
    w, h = 3000, 2000
    data = hostile.large_png(w, h, "I;16")
    tracemalloc.start()
    try:
        info = validate_image(data, IN_PROCESS, cover=224)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.reason is None and info.mode == "I;16", info.detail
    assert peak / (w * h) < 2.0, peak / (w * h)  # bytes per pixel; float64 alone would be 8
    src = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float64) / 257.0
    ref = np.asarray(Image.fromarray(np.rint(src).astype(np.uint8)).resize(info.image.shape[1::-1],
                                                                          Image.Resampling.BOX), float)
    assert np.abs(info.image[..., 0].astype(float) - ref).mean() < 2.0


def test_kept_decode_is_reduced_to_what_the_models_need(photos):
    big = Image.fromarray(photos["coffee"]).resize((4000, 3000), Image.Resampling.BILINEAR)
    png = images.encode(big, "PNG", compress_level=1)
    rgba = images.encode(big.convert("RGBA").resize((2400, 1800)), "PNG", compress_level=1)
    for cfg in (ValidateConfig(), IN_PROCESS):  # in the child (12 MP PNG) and in this process
        out, decodes = validate_batch_decodes(_table([png, rgba]), cfg, cover=224)
        assert out.column("reason").to_pylist() == [None, None]
        for d in decodes:
            # short side in [2, 4) x 256 (validate's side covers the 224 px model input)
            assert 512 <= min(d.shape[:2]) < 1024 and d.dtype == np.uint8, d.shape
            assert d.nbytes <= 1024 * 1024 * 4 // 3 * 3, d.nbytes  # the full decode: 36 MB
    assert out.column("width").to_pylist() == [4000, 2400]


_PARENT = """
import os, sys
from manifests.config import ValidateConfig
from stages import decode_pool
from stages.validate import validate_image
data = open(sys.argv[1], "rb").read()
assert validate_image(data, ValidateConfig()).reason is None
print(decode_pool.shared("stages.validate:decode_in_child").pid, flush=True)
os.kill(os.getpid(), 9)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def test_decode_process_does_not_outlive_a_killed_parent(good, tmp_path):
    tiff = tmp_path / "rocket.tiff"
    tiff.write_bytes(good["rocket.tiff"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _PARENT, str(tiff)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    pid = int(done.stdout.strip())
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), f"decode process {pid} outlived its parent"


def _reference_reduction(data: bytes, short: int) -> np.ndarray:
    """Pillow's full decode reduced by the integer factor (:func:`reduce_image`): the pixels
    the scaled decode must reproduce."""
    return np.asarray(reduce_image(Image.open(io.BytesIO(data)), short))


def test_webp_decoded_scaled_matches_the_full_decode_reduced(photos):
    big = Image.fromarray(photos["coffee"]).resize((2400, 1600), Image.Resampling.BICUBIC)
    alpha = big.convert("RGBA")
    alpha.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 2400, dtype=np.uint8), (1600, 1))))
    cases = [(images.encode(big, "WEBP", lossless=True, quality=0, method=0), 1.0, 0.2),
             (images.encode(alpha, "WEBP", lossless=True, quality=0, method=0), 1.0, 0.2),
             (images.encode(big, "WEBP", quality=80), 40.0, 1.5)]  # lossy: libwebp scales in YUV
    for data, max_diff, mean_diff in cases:
        assert webp.features(data)[:2] == (2400, 1600)
        got = decode_webp_reduced(data, 448)  # 1600 // 448 = 3: 533 x 800 (the last partial box dropped)
        ref = _reference_reduction(data, 448)
        assert got.shape == (533, 800, 3) and ref.shape == (534, 800, 3), (got.shape, ref.shape)
        diff = np.abs(got.astype(int) - ref[:533].astype(int))
        assert diff.max() <= max_diff and diff.mean() <= mean_diff, (diff.max(), diff.mean())


_WEBP_PEAK = """
import resource, sys
import numpy as np
from stages.validate import decode_webp_reduced
data = open(sys.argv[1], "rb").read()
decode_webp_reduced(data[:1000], 448)  # libraries loaded, buffers of a failed decode returned
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = decode_webp_reduced(data, 448)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(out.shape[0], out.shape[1], (after - before) * 1024)
"""


def test_lossless_webp_decode_peaks_near_libwebps_own_plane(tmp_path):
    """libwebp's lossless decoder keeps its ARGB plane (4 bytes per pixel) whatever the
    output; the full-size RGB array of a decode-then-reduce (3 more) is never made."""
    w, h = 4096, 3072
    path = tmp_path / "big.webp"
    path.write_bytes(hostile.large_webp(w, h))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _WEBP_PEAK, str(path)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    out_h, out_w, grown = map(int, done.stdout.split())
    assert grown / (w * h) < 5.0, grown / (w * h)  # bytes per pixel (4.0 measured); decode-then-reduce: 7.0
    assert (out_w, out_h) == (w // 6, h // 6)


def test_animated_webp_keeps_its_first_frame_and_a_truncated_one_is_rejected(photos):
    first, second = Image.new("RGB", (1200, 900), (200, 30, 40)), Image.new("RGB", (1200, 900), (10, 220, 90))
    animated = images.encode(first, "WEBP", save_all=True, append_images=[second], lossless=True, duration=100)
    assert webp.features(animated)[3]  # animated: libwebp's still decoder refuses it, OpenCV decodes frame 0
    got = decode_webp_reduced(animated, 448)
    assert got.shape == (450, 600, 3) and np.abs(got.astype(int) - (200, 30, 40)).max() <= 1
    still = images.encode(Image.fromarray(photos["chelsea"]), "WEBP", lossless=True)
    assert decode_webp_reduced(hostile.truncated(still), 128) is None
    assert validate_image(hostile.truncated(still), IN_PROCESS).reason == Reason.CORRUPT


def test_a_decode_that_was_not_scheduled_is_not_a_timeout(good, monkeypatch):
    """A wall-clock limit alone rejects good images on an overloaded node (a thread not
    scheduled for timeout_s). A decode past its limit that used little of this thread's CPU
    time was stalled, not slow: it gets a second try in the decode child. One that was
    working is a timeout."""
    import stages.validate as v

    real = v._decode
    cfg = ValidateConfig(timeout_s=1.0)

    def paused(*args):  # the thread is descheduled: wall time passes, no CPU time
        time.sleep(1.5)
        return real(*args)

    monkeypatch.setattr(v, "_decode", paused)
    info = validate_image(good["astronaut.jpg"], cfg, cover=224)
    assert info.reason is None and info.decoded is not None, info.detail  # decoded by the child
    assert (info.width, info.height) == (512, 512) and info.format == "JPEG"
    assert info.decode_ms < 1500, info.decode_ms  # the retry's time, not the stall's

    def working(*args):  # a decoder burning CPU past the limit
        t = time.thread_time()
        while time.thread_time() - t < 5:
            pass
        return real(*args)

    monkeypatch.setattr(v, "_decode", working)
    info = validate_image(good["astronaut.jpg"], cfg, cover=224)
    assert info.reason == Reason.DECODE_TIMEOUT and info.detail == "decode took longer than timeout_s 1.0", info
