"""Where a scan's time and memory went (``lorafft scan --profile``, the report's ``profile``): every stage timed,
the memory model's prediction recorded beside the batches it cut, kept in the report file, printed by the CLI."""

import json

import lorafft
from lorafft import profiling
from lorafft.cli import main


def test_profiled_scan_records_stages_and_memory(trio, tmp_path):
    out = tmp_path / "r.json"
    report = lorafft.scan(trio.base, trio.lora, out=out, profile=True, max_batch_bytes=1 << 20)
    profile = report.profile
    assert set(profile["stages"]) == set(profiling.STAGES)
    assert profile["wall_seconds"] > 0 and profile["stages"]["tuned_topk"] > 0 and profile["stages"]["read"] > 0
    busy = sum(profile["stages"].values())
    assert 0.5 * profile["wall_seconds"] < busy  # the stages account for the run
    memory = profile["memory"]
    assert memory["device"] == "cpu" and "peak_allocated_bytes" not in memory  # the allocator's peak: CUDA only
    assert memory["predicted_peak_bytes"] > 0
    assert lorafft.Report.load(out).profile == profile  # kept in the file, which the schema admits
    whole = lorafft.scan(trio.base, trio.lora, profile=True).profile["memory"]  # the default budget: 4 GiB
    assert whole["batches"] < memory["batches"] and whole["predicted_peak_bytes"] > memory["predicted_peak_bytes"]
    assert "profile" not in json.loads(lorafft.scan(trio.base, trio.lora).to_json())


def test_cli_profile_prints_the_table(trio, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["scan", str(trio.base), str(trio.full), "--profile", "--quiet", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "profile:" in err and "tuned_topk" in err and "memory on cpu:" in err and "batches" in err
    assert json.loads(out.read_text())["profile"]["memory"]["batches"] >= 1
