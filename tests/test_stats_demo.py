"""Statistics dumps, their CLI reader and heat map, and the demo end to end."""
import json
import struct
import subprocess
import sys
import zlib

import pytest
import torch

from mega_moe_layer import stats


def test_dump_load_table(tmp_path):
    path = tmp_path / "dump.json"
    layers = {"layer0": torch.tensor([4, 0, 2, 2]), "layer1": [1, 1, 1, 5]}
    stats.dump_stats(str(path), layers, meta={"ranks": 2})
    loaded = stats.load_stats(str(path))
    assert loaded == {"layer0": [4, 0, 2, 2], "layer1": [1, 1, 1, 5]}
    table = stats.format_table(loaded)
    assert "| layer0 | 8 | 0 | 2.00 | 4 | 2.00 |" in table
    assert "| layer1 | 8 | 1 | 2.00 | 5 | 2.50 |" in table
    assert "| 3 | 2 | 5 |" in table                               # per-expert row


def test_load_rejects_foreign_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"layers": {"a": [1]}}))
    with pytest.raises(ValueError, match="not a"):
        stats.load_stats(str(p))
    p.write_text(json.dumps({"format": stats.DUMP_FORMAT, "layers": {"a": [1], "b": [1, 2]}}))
    with pytest.raises(ValueError, match="different expert counts"):
        stats.load_stats(str(p))


def test_cli_and_png(tmp_path):
    dump, png = tmp_path / "d.json", tmp_path / "h.png"
    stats.dump_stats(str(dump), {"l0": [0, 3, 6], "l1": [6, 0, 0]})
    out = subprocess.run([sys.executable, "-m", "mega_moe_layer.stats", str(dump), "--png", str(png)],
                         capture_output=True, text=True, check=True).stdout
    assert "| l0 | 9 | 0 | 3.00 | 6 | 2.00 |" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    assert (w, h) == (3 * 8, 2 * 8)
    idat_len = struct.unpack(">I", data[33:37])[0]
    raw = zlib.decompress(data[41:41 + idat_len])
    row0 = raw[1:1 + 3 * w]
    assert row0[:3] == b"\xff\xff\xff"                            # count 0 -> white
    assert row0[2 * 8 * 3:2 * 8 * 3 + 3] == bytes([160, 0, 0])   # the maximum -> dark red


def test_expert_load_stats_record():
    s = stats.ExpertLoadStats(3)
    s.record(torch.tensor([1, 2, 3], dtype=torch.int32))
    ptr = s.cumulative.data_ptr()
    s.record(torch.tensor([0, 1, 0], dtype=torch.int32))
    assert s.cumulative.tolist() == [1, 3, 3] and s.last.tolist() == [0, 1, 0]
    assert s.cumulative.data_ptr() == ptr                         # in place: graph-safe address


def test_demo_runs_and_meets_bound():
    out = subprocess.run([sys.executable, "-m", "mega_moe_layer", "--ranks", "2", "--iters", "2",
                          "--tokens", "16"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "rel-RMSE" in out.stdout and ": OK" in out.stdout
    assert "| moe | " in out.stdout and "time per forward" in out.stdout
