"""Frame sampling of a video whose presentation times do not advance (issue 25,
item 5): the old loop kept the first frame and decoded the whole file looking
for the next sampling time."""
from __future__ import annotations

import av
import numpy as np
import pytest

from sharding.eval_sets.video import extract_frames


def _video(path, frames: int, pts) -> str:
    """An mpeg4 .mkv of `frames` 32x32 frames at 25 fps whose packets get pts(i) in
    milliseconds (None: the encoder's)."""
    from fractions import Fraction

    out = av.open(str(path), "w")
    stream = out.add_stream("mpeg4", rate=25)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    packets = []
    for i in range(frames):
        frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), (i * 7) % 256, np.uint8), format="rgb24")
        frame.pts = i
        packets += stream.encode(frame)
    packets += stream.encode()
    for i, packet in enumerate(packets):
        if pts is not None:
            packet.time_base = Fraction(1, 1000)
            packet.pts = packet.dts = pts(i)
        out.mux(packet)
    out.close()
    return str(path)


def test_frozen_timestamps_fall_back_to_the_frame_rate(tmp_path):
    path = _video(tmp_path / "frozen.mkv", 300, lambda i: 0)
    frames = extract_frames(path, fps=1.0, max_frames=4)
    assert [index for index, _ in frames] == [0, 25, 50, 75]


def test_a_video_with_good_timestamps_is_sampled_as_before(tmp_path):
    path = _video(tmp_path / "good.mkv", 120, None)
    assert [index for index, _ in extract_frames(path, fps=1.0, max_frames=3)] == [0, 25, 50]


def test_times_that_crawl_stop_the_decode_with_a_named_error(tmp_path):
    # Times advance 1 ms a frame (mkv counts in ms), 40x slower than the 25 fps rate: the 2nd sample
    # would be frame 1000.
    path = _video(tmp_path / "slow.mkv", 400, lambda i: i)
    with pytest.raises(ValueError, match=r"frames decoded for 1 of 4 samples at 1 fps: its presentation times"):
        extract_frames(path, fps=1.0, max_frames=4)


def _hang(args):  # stands in for a decoder stuck in C code
    import time

    time.sleep(60)


def test_a_hanging_video_stops_the_scan_naming_it_instead_of_waiting(tmp_path, monkeypatch):
    import time

    from sharding.eval_sets import video

    for name in ("a", "b"):
        (tmp_path / "src" / "real").mkdir(parents=True, exist_ok=True)
        _video(tmp_path / "src" / "real" / f"{name}.mp4", 5, None)
    monkeypatch.setattr(video, "_job", _hang)  # the forked workers run it
    t0 = time.monotonic()
    with pytest.raises(video.VideoTimeout, match=r"real/a.mp4: no frames after 1 s"):
        video.scan_video(str(tmp_path / "src"), "b", str(tmp_path / "out"), workers=2, progress=False,
                         video_timeout_s=1.0)
    assert time.monotonic() - t0 < 30  # the stuck workers were ended, not joined after their sleep
