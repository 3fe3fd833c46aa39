"""The lorafft command: summaries, report files, and bad input (exit 2, one line naming the file, no report)."""

import importlib
import json
import os
import re
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from lorafft.cli import build_parser, main


def _run(capsys, *argv):
    """``main(argv)``'s exit status whether it returns (InputError) or argparse exits, its stdout and stderr."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_scan_writes_report_and_prints_summary(trio, tmp_path, capsys):
    out = tmp_path / "report.json"
    code, stdout, _ = _run(capsys, "scan", trio.base, trio.lora, "--eps", "0.5", "0.9", "--out", out, "--quiet")
    assert code == 0
    report = json.loads(out.read_text())
    assert "intruders" in stdout and "ε=0.5" in stdout
    assert str(report["totals"]["0.5"]) in stdout
    assert len(report["matrices"]) == 14


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_without_cuda_exits_2(trio, tmp_path, capsys):
    out = tmp_path / "report.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["scan", str(trio.base), str(trio.lora), "--device", "cuda", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not out.exists()


def test_help_is_readable(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["scan", "--help"])
    assert exit_info.value.code == 0
    assert "PEFT adapter" in capsys.readouterr().out


def _small_checkpoint(directory, **overrides):
    generator = torch.Generator().manual_seed(0)
    tensors = {"layers.0.q.weight": torch.randn(24, 16, generator=generator),
               "layers.0.k.weight": torch.randn(24, 16, generator=generator)}
    tensors.update(overrides)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors")
    return directory


def _break_truncated(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-100])
    return path / "model.safetensors"


def _break_header_offsets(path):
    file = path / "model.safetensors"
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    name = next(n for n in header if n != "__metadata__")
    header[name]["data_offsets"] = [header[name]["data_offsets"][0], header[name]["data_offsets"][1] + 10**9]
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])
    return file


def _break_header_json(path):
    file = path / "model.safetensors"
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    file.write_bytes(data[:8] + b"{" * length + data[8 + length :])
    return file


def _break_absurd_header(path):
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    return file


def _break_missing_shard(path):
    index = {"metadata": {}, "weight_map": {"layers.0.q.weight": "model-00001-of-00002.safetensors"}}
    (path / "model.safetensors").unlink()
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path / "model.safetensors.index.json"


def _break_tensor_missing_from_shard(path):
    shutil.move(path / "model.safetensors", path / "model-00001-of-00001.safetensors")
    weight_map = {"layers.0.q.weight": "model-00001-of-00001.safetensors",
                  "layers.0.v.weight": "model-00001-of-00001.safetensors"}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path / "model-00001-of-00001.safetensors"


def _nan_weight(path):
    bad = torch.randn(24, 16)
    bad[3, 4] = float("nan")
    _small_checkpoint(path, **{"layers.0.q.weight": bad})
    return path / "model.safetensors"


BROKEN_TUNED = {
    "truncated safetensors": (_break_truncated, "truncated"),
    "offsets outside the file": (_break_header_offsets, ""),
    "bad header JSON": (_break_header_json, ""),
    "absurd header length": (_break_absurd_header, ""),
    "index names a missing shard": (_break_missing_shard, "does not exist"),
    "tensor missing from its shard": (_break_tensor_missing_from_shard, "layers.0.v.weight"),
    "NaN in a weight": (_nan_weight, "NaN"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_TUNED))
def test_broken_tuned_checkpoint_exits_2_without_report(case, tmp_path, capsys):
    base = _small_checkpoint(tmp_path / "base")
    tuned = _small_checkpoint(tmp_path / "tuned")
    breaker, words = BROKEN_TUNED[case]
    named = breaker(tuned)
    out = tmp_path / "report.json"
    code, stdout, stderr = _run(capsys, "scan", base, tuned, "--out", out, "--quiet")
    assert code == 2
    assert not out.exists() and not list(tmp_path.glob(".lorafft-*"))
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert str(named) in stderr and words in stderr


def _adapter(directory, config, tensors):
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, directory / "adapter_model.safetensors")
    return directory


def test_input_problems_exit_2_naming_the_file(tmp_path, capsys):
    base = _small_checkpoint(tmp_path / "base")
    empty = tmp_path / "empty"
    empty.mkdir()
    other = _small_checkpoint(tmp_path / "other")
    save_file({"unrelated.weight": torch.randn(3, 3)}, other / "model.safetensors")
    lora = {"base_model.model.layers.0.nothere.lora_A.weight": torch.randn(2, 16),
            "base_model.model.layers.0.nothere.lora_B.weight": torch.randn(24, 2)}
    stray = _adapter(tmp_path / "stray", {"peft_type": "LORA", "r": 2, "lora_alpha": 4}, lora)
    lora_ok = {k.replace("nothere", "q"): v for k, v in lora.items()}
    no_rank = _adapter(tmp_path / "norank", {"peft_type": "LORA", "lora_alpha": 4}, lora_ok)
    cases = [
        (tmp_path / "missing", tmp_path / "missing"),
        (empty, empty),
        (other, other),
        (stray, stray / "adapter_model.safetensors"),
        (no_rank, no_rank / "adapter_config.json"),
    ]
    for tuned, named in cases:
        out = tmp_path / "report.json"
        code, _, stderr = _run(capsys, "scan", base, tuned, "--out", out, "--quiet")
        assert code == 2, tuned
        assert not out.exists()
        assert len(stderr.strip().splitlines()) == 1 and str(named) in stderr, stderr


def test_shape_mismatch_warns_or_fails_with_strict(tmp_path, capsys):
    base = _small_checkpoint(tmp_path / "base")
    tuned = _small_checkpoint(tmp_path / "tuned", **{"layers.0.k.weight": torch.randn(20, 16)})
    code, stdout, stderr = _run(capsys, "scan", base, tuned, "--quiet")
    assert code == 0 and "warning" in stderr and "layers.0.k.weight" in stderr and "1 matrix," in stdout
    code, _, stderr = _run(capsys, "scan", base, tuned, "--strict", "--quiet")
    assert code == 2 and "shape" in stderr


# ---------------------------------------------------------------------------------------------------------------
# Arguments checked before any work: one line, exit 2, nothing written


BAD_SCAN_ARGUMENTS = {
    "k zero": (["--k", "0"], "--k"),
    "k negative": (["--k", "-3"], "--k"),
    "k not an integer": (["--k", "2.5"], "--k"),
    "eps above 1": (["--eps", "1.5"], "--eps"),
    "eps zero": (["--eps", "0"], "--eps"),
    "eps negative": (["--eps", "-1"], "--eps"),
    "eps nan": (["--eps", "0.5", "nan"], "--eps"),
    "eps inf": (["--eps", "inf"], "--eps"),
    "include not a regex": (["--include", "("], "--include"),
    "exclude not a regex": (["--exclude", "mlp", "[a"], "--exclude"),
    "tol zero": (["--tol", "0"], "--tol"),
    "batch bytes negative": (["--max-batch-bytes", "-1"], "--max-batch-bytes"),
    "batch bytes below one byte": (["--max-batch-bytes", "1e-12"], "--max-batch-bytes"),
    "seed too large for torch": (["--seed", "99999999999999999999999"], "--seed"),
    "seed negative": (["--seed", "-1"], "--seed"),
    "device unknown": (["--device", "tpu"], "--device"),
}


@pytest.mark.parametrize("case", sorted(BAD_SCAN_ARGUMENTS))
def test_bad_scan_argument_exits_2_before_any_work(trio, case, tmp_path, capsys):
    extra, named = BAD_SCAN_ARGUMENTS[case]
    out = tmp_path / "report.json"
    code, _, stderr = _run(capsys, "scan", trio.base, trio.lora, "--out", out, "--quiet", *extra)
    assert code == 2
    (line,) = stderr.splitlines()
    assert line.startswith("lorafft: error: ") and named in line
    assert os.listdir(tmp_path) == []  # no report, no journal


def test_bad_output_paths_exit_2_naming_them(trio, tmp_path, capsys):
    directory = tmp_path / "existing.json"
    directory.mkdir()
    (tmp_path / "a-file").write_text("mine")
    cases = [
        (["--out", directory], f"{directory}: is a directory"),
        (["--out", tmp_path / "missing" / "r.json"], "does not exist"),
        (["--out", tmp_path / "r.txt"], "must end in .json or .csv"),
        (["--out", tmp_path / "r"], "must end in .json or .csv"),
        (["--resume"], "--resume: needs the journal"),
        (["--out", tmp_path / "r.json", "--journal", tmp_path / "missing" / "j"], f"{tmp_path / 'missing' / 'j'}: "),
        (["--write-base-cache", tmp_path / "a-file"], "exists and is not a directory"),
    ]
    for extra, words in cases:
        code, _, stderr = _run(capsys, "scan", trio.base, trio.lora, "--quiet", *extra)
        assert code == 2, extra
        (line,) = stderr.splitlines()
        assert line.startswith("lorafft: error: ") and words in line, line
        assert sorted(os.listdir(tmp_path)) == ["a-file", "existing.json"] and os.listdir(directory) == []


def test_other_commands_check_their_outputs_first(trio, tmp_path, capsys):
    report = tmp_path / "r.json"
    (tmp_path / "a-file").write_text("mine")
    cases = [
        (["cache", "build", trio.base, "--out", tmp_path / "a-file"], "exists and is not a directory"),
        (["cache", "build", trio.base, "--out", tmp_path / "no" / "cache"], "does not exist"),
        (["cache", "build", trio.base, "--out", tmp_path / "c", "--include", "("], "--include"),
        (["plot", report, "--out", tmp_path / "a-file"], "exists and is not a directory"),
        (["plot", report, "--out", tmp_path / "figures", "--eps", "nan"], "--eps"),
        (["report", report, "--html", tmp_path / "page.pdf"], "must end in .html or .htm"),
        (["report", report, "--html", tmp_path / "no" / "page.html"], "does not exist"),
        (["intervene", trio.base, trio.lora, "--lambda", "0.5", "--out", tmp_path / "a-file"], "not a directory"),
        (["intervene", trio.base, trio.lora, "--lambda", "0.5", "--out", tmp_path / "o", "--k", "0"], "--k"),
        (["intervene", trio.base, trio.lora, "--lambda", "nan", "--out", tmp_path / "o"], "--lambda"),
        (["demo", "--dir", tmp_path / "no" / "demo"], "does not exist"),
        (["demo", "--dir", tmp_path], "holds 'a-file'"),  # never into a checkpoint or other directory
    ]
    for argv, words in cases:
        code, _, stderr = _run(capsys, *argv)
        assert code == 2, argv
        (line,) = stderr.splitlines()
        assert line.startswith("lorafft: error: ") and words in line, line
        assert os.listdir(tmp_path) == ["a-file"]


def test_parser_accepts_exactly_the_valid_values(capsys):
    parser = build_parser()
    for text in ["-2", "0", "1", "5", "2.5", "x", "1e3"]:
        valid = text.isdigit() and int(text) >= 1
        try:
            assert parser.parse_args(["scan", "a", "b", "--k", text]).k == int(text) and valid, text
        except SystemExit as exit_info:
            assert exit_info.code == 2 and not valid, text
    for text in ["-1", "0", "1e-300", "0.5", "1", "1.0000001", "nan", "inf", "-inf", "abc"]:
        try:
            number = float(text)
        except ValueError:
            number = None
        valid = number is not None and 0 < number <= 1  # NaN compares False
        try:
            assert parser.parse_args(["scan", "a", "b", "--eps", "0.9", text]).eps == [0.9, number] and valid, text
        except SystemExit as exit_info:
            assert exit_info.code == 2 and not valid, text
    for pattern in ["layers\\.0\\.", "(", "[a-", "a{2,1}", "q|k"]:
        try:
            re.compile(pattern)
            valid = True
        except re.error:
            valid = False
        try:
            assert parser.parse_args(["cache", "build", "a", "--out", "c", "--include", pattern]).include == [pattern]
            assert valid, pattern
        except SystemExit as exit_info:
            assert exit_info.code == 2 and not valid, pattern
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------------------------
# What a user can still do wrong after the arguments parse: one line, exit 2, no output left behind


def test_every_name_in_common_differs_in_shape_is_one_line(tmp_path, capsys):
    base = _small_checkpoint(tmp_path / "base")
    tuned = _small_checkpoint(tmp_path / "tuned", **{name: torch.randn(3, 3) for name in
                                                     ("layers.0.q.weight", "layers.0.k.weight")})
    code, _, stderr = _run(capsys, "scan", base, tuned, "--quiet")
    (line,) = stderr.splitlines()
    assert code == 2 and "the 2 in common with it are empty, ambiguous or differ in shape" in line


def test_report_over_an_input_file_is_refused(trio, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(trio.base, base)
    config = (base / "config.json").read_text()
    code, _, stderr = _run(capsys, "scan", base, trio.full, "--out", base / "config.json", "--quiet")
    (line,) = stderr.splitlines()
    assert code == 2 and "is a file of the input" in line and (base / "config.json").read_text() == config


def test_interrupt_is_one_line_and_keeps_the_journal(trio, tmp_path, capsys, monkeypatch):
    scan_module = importlib.import_module("lorafft.scan")  # (the package's ``scan`` attribute is the function)

    def interrupted(*args, journal=None, **kwargs):
        with open(journal, "w") as handle:  # what a scan has journaled by the time Ctrl-C arrives
            handle.write("{}\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(scan_module, "scan", interrupted)
    out = tmp_path / "r.json"
    code, _, stderr = _run(capsys, "scan", trio.base, trio.full, "--out", out, "--quiet")
    assert code == 130 and stderr.splitlines() == [
        f"lorafft: the finished matrices are in {out}.journal: the same command with --resume continues",
        "lorafft: interrupted"]


def test_triton_backend_on_the_cpu_needs_the_interpreter(trio, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pytest.importorskip("triton")
    code, _, stderr = _run(capsys, "scan", trio.base, trio.lora, "--backend", "triton", "--out",
                           tmp_path / "r.json", "--quiet")
    (line,) = stderr.splitlines()
    assert code == 2 and "runs on CUDA tensors" in line and os.listdir(tmp_path) == []


def test_base_cache_of_another_model_is_not_overwritten(trio, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["cache", "build", str(trio.base), "--out", str(cache), "--quiet"]) == 0
    capsys.readouterr()
    index = (cache / "lorafft-base-cache.json").read_text()
    code, _, stderr = _run(capsys, "scan", trio.full, trio.base, "--write-base-cache", cache, "--quiet")
    (line,) = stderr.splitlines()
    assert code == 2 and "another base model" in line and (cache / "lorafft-base-cache.json").read_text() == index


def test_failed_cache_build_leaves_no_directory(tmp_path, capsys):
    base = _nan_weight(tmp_path / "base")
    code, _, stderr = _run(capsys, "cache", "build", base, "--out", tmp_path / "cache", "--quiet")
    assert code == 2 and len(stderr.splitlines()) == 1 and not (tmp_path / "cache").exists()
