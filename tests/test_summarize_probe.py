"""`scripts/summarize_probe.py` on a synthetic probe folder (the JSON `scripts/bench.py` writes)."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import summarize_probe  # noqa: E402


def _run(path, argv, times_us, anchor=None):
    rows = []
    for t, us in times_us.items():
        row = dict(tokens=t, ours=dict(median=2 * us * 1e-6), ours_graph=dict(median=us * 1e-6))
        if anchor and t in anchor:
            row["anchor"] = {k: dict(time=dict(median=v * 1e-6)) for k, v in anchor[t].items()}
        rows.append(row)
    with open(path, "w") as f:
        json.dump(dict(card="NVIDIA H200", argv=argv, rows=rows), f)


def test_table_and_kernel_lines(tmp_path, capsys):
    common = ["--preset", "dsv3", "--routing", "uniform", "--no-baseline", "--iters", "20", "--tokens", "4096",
              "128", "--json", "x.json", "--out", "o"]
    _run(tmp_path / "new.json", common + ["--anchor", "deepgemm"], {4096: 5000.0, 128: 2000.0},
         anchor={4096: {"fp8": 5600.0, "fp8xfp4": 8400.0}})
    _run(tmp_path / "new2.json", common + ["--anchor", "none", "--lane-k"], {4096: 4500.0, 128: 1900.0})
    _run(tmp_path / "new5.json", common + ["--anchor", "none", "--decode-ahead", "--l1-prefill-promote", "2"],
         {4096: 4000.0})
    (tmp_path / "bg_dec.log").write_text("noise\n    l1 streamed (mxfp4_lane) on the Gluon kernel: 1.0 us\n")
    assert summarize_probe.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "card: NVIDIA H200" in out
    # graph medians, the ratio to the defaults at the same T, the anchor and target on the defaults' row
    assert "| 4096 | new | defaults | 5000.0 | 1.000 | 5600.0 | 8400.0 | 4000 |" in out
    assert "| 4096 | new2 | --lane-k | 4500.0 | 0.900 |" in out
    assert "| 128 | new2 | --lane-k | 1900.0 | 0.950 |" in out
    assert "| 4096 | new5 | --decode-ahead --l1-prefill-promote 2 | 4000.0 | 0.800 |" in out
    assert "[bg_dec.log]     l1 streamed (mxfp4_lane) on the Gluon kernel" in out and "noise" not in out


def test_empty_folder(tmp_path, capsys):
    assert summarize_probe.main([str(tmp_path)]) == 0
    assert "no run JSON found" in capsys.readouterr().out
