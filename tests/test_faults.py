"""Trust under faults (issue 24): no silent wrong count, nothing of the user's lost, one line for every failure.

Each test here failed on the code before it (wrong rows, a file of the user's removed or overwritten, a traceback, a
hang, 40 GB allocated) and states what happens now. Checkpoints are small synthetic ones (``lorafft.synthetic``).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorafft
from lorafft import analysis, cache, linalg, synthetic
from lorafft.cli import main
from lorafft.io import writer
from lorafft.io.writer import write_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(capsys, *argv):
    """``main(argv)``'s exit status (argparse's exits included), stdout and stderr."""
    try:
        code = main([os.fspath(a) for a in argv])
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line(code, err, *fragments):
    """Exit 2 and one line on stderr holding every fragment, no traceback."""
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def _rows(report):
    return [(r.name, r.checkpoint, r.side, r.counts, r.argmax) for r in report.rows]


def _same_rows(first, second, tolerance=1e-5):
    assert _rows(first) == _rows(second)
    for mine, theirs in zip(first.rows, second.rows):
        assert mine.max_cos == pytest.approx(theirs.max_cos, abs=tolerance)


def _snapshot(directory) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes."""
    found = {}
    for folder, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, directory)] = handle.read()
    return found


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A GPT-2-shaped base (Conv1D weights stored ``[in, out]``: a square ``attn.c_proj`` and ``mlp.c_fc``
    ``[d, 4d]``) and a ``fan_in_fan_out`` PEFT adapter with strong updates on both."""
    directory = tmp_path_factory.mktemp("gpt2")
    d, r = 48, 2
    generator = torch.Generator().manual_seed(3)
    base, modules = {}, {}
    for layer in range(2):
        base[f"h.{layer}.attn.c_proj.weight"] = synthetic.random_weight(d, d, generator=generator)
        base[f"h.{layer}.mlp.c_fc.weight"] = synthetic.random_weight(d, 4 * d, generator=generator)  # [in, out]
        modules[f"h.{layer}.attn.c_proj"] = synthetic.lora_update(d, d, r, generator=generator, lora_alpha=2 * r,
                                                                  sigma=8.0)
        modules[f"h.{layer}.mlp.c_fc"] = synthetic.lora_update(4 * d, d, r, generator=generator, lora_alpha=2 * r,
                                                               sigma=8.0)
    write_checkpoint(base, directory / "base")
    adapter = synthetic.write_peft_adapter(directory / "lora", modules, r=r, lora_alpha=2 * r,
                                           target_modules=["c_proj", "c_fc"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["fan_in_fan_out"] = True
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return directory / "base", adapter


# --- 1. the base cache answers for exactly one matrix -------------------------------------------------------------

def test_cache_of_conv1d_weights_is_bound_to_the_orientation(gpt2, tmp_path, capsys):
    """``cache build`` stores the bases of the stored ``[in, out]`` weights; a scan of a ``fan_in_fan_out``
    adapter analyses ``[out, in]``. The square ``c_proj`` has the same shape both ways: it must be a miss (and get an
    entry of its own orientation with --write-base-cache), never the other orientation's basis."""
    base, lora = gpt2
    built = tmp_path / "cache"
    assert _run(capsys, "cache", "build", base, "--out", built, "--quiet")[0] == 0
    fresh = lorafft.scan(base, lora, eps=(0.5, 0.7, 0.9), side="both")
    assert fresh.totals()["0.5"] > 0
    cached = lorafft.scan(base, lora, eps=(0.5, 0.7, 0.9), side="both", base_cache=built, write_base_cache=built)
    _same_rows(cached, fresh)
    entries = cache.BaseCache(built).entries
    assert {orientation for _, orientation in entries} == {"stored", "transposed"}
    assert len(entries) == 8 and len({entry["file"] for entry in entries.values()}) == 8
    again = lorafft.scan(base, lora, eps=(0.5, 0.7, 0.9), side="both", base_cache=built)  # now read, both ways
    _same_rows(again, fresh)


def test_intervention_with_a_conv1d_cache_rescales_the_right_vectors(gpt2, tmp_path):
    base, lora = gpt2
    built = tmp_path / "cache"
    cache.build_base_cache(base, built)
    plain = lorafft.intervene.intervene(base, lora, tmp_path / "plain", lam=0.5)
    cached = lorafft.intervene.intervene(base, lora, tmp_path / "cached", lam=0.5, base_cache=built)
    assert plain.rescaled > 0

    def rescaled(summary):
        return [(m.name, m.intruders, [d.rank for d in m.rescaled]) for m in summary.matrices]

    assert rescaled(cached) == rescaled(plain)
    cosines = [[d.max_cos for d in m.rescaled] for m in cached.matrices]
    assert cosines == [pytest.approx([d.max_cos for d in m.rescaled], abs=1e-5) for m in plain.matrices]


def test_names_that_read_alike_get_their_own_entries(tmp_path):
    """``blk/q.weight`` and ``blk_q.weight`` once shared one entry file: the second overwrote the first."""
    generator = torch.Generator().manual_seed(5)
    base = {name: synthetic.random_weight(40, 40, generator=generator) for name in ("blk/q.weight", "blk_q.weight")}
    tuned = {}
    for name, weight in base.items():
        lora_a, lora_b = synthetic.lora_update(40, 40, 2, generator=generator, lora_alpha=2, sigma=6.0)
        tuned[name] = weight + lora_b @ lora_a
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    built = tmp_path / "cache"
    cache.build_base_cache(tmp_path / "base.safetensors", built)
    files = [entry["file"] for entry in cache.BaseCache(built).entries.values()]
    assert len(set(files)) == 2
    fresh = lorafft.scan(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", eps=(0.5, 0.9))
    _same_rows(lorafft.scan(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", eps=(0.5, 0.9),
                            base_cache=built), fresh)


def test_entry_file_names_are_bounded_for_long_tensor_names(tmp_path, capsys):
    name = "model." + ".".join(["a_very_long_module_name_indeed"] * 10) + ".weight"  # 322 characters
    assert len(name) == 322
    generator = torch.Generator().manual_seed(1)
    save_file({name: synthetic.random_weight(24, 32, generator=generator)}, tmp_path / "base.safetensors")
    save_file({name: synthetic.random_weight(24, 32, generator=generator)}, tmp_path / "tuned.safetensors")
    built = tmp_path / "cache"
    assert _run(capsys, "cache", "build", tmp_path / "base.safetensors", "--out", built, "--quiet")[0] == 0
    assert all(len(file) <= 120 for file in os.listdir(built))
    code, _, err = _run(capsys, "scan", tmp_path / "base.safetensors", tmp_path / "tuned.safetensors",
                        "--base-cache", built, "--write-base-cache", tmp_path / "written", "--quiet")
    assert code == 0, err


def test_a_cache_entry_that_does_not_answer_for_its_matrix_is_refused(trio, tmp_path, capsys):
    """An entry file holding another basis (here the square q_proj's other side) is caught by the check of its top
    vectors against W0: one line naming the entry file, no report."""
    built = tmp_path / "cache"
    include = [r"layers\.0\.self_attn\.q_proj"]
    cache.build_base_cache(trio.base, built, include=include)
    (entry,) = cache.BaseCache(built).entries.values()
    with lorafft.io.open_checkpoint(trio.base) as base:
        W0 = base.get("model.layers.0.self_attn.q_proj.weight").double()
    _, sigma, Vh = torch.linalg.svd(W0)
    save_file({"basis": Vh.T.float().contiguous(), "sigma": sigma, "row_norms": (W0**2).sum(dim=1)},
              built / entry["file"])  # the right side's basis, filed under the left side's
    out = tmp_path / "r.json"
    code, _, err = _run(capsys, "scan", trio.base, trio.lora, "--include", *include, "--base-cache", built,
                        "--out", out, "--quiet")
    _one_line(code, err, entry["file"], "does not hold the singular vectors")
    assert not out.exists()


def test_a_max_cos_above_one_is_an_internal_error_never_a_row():
    generator = torch.Generator().manual_seed(2)
    W0 = synthetic.random_weight(32, 48, generator=generator)[None]
    Wt = W0 + 0.01 * torch.randn(1, 32, 48, generator=generator)
    basis = linalg.base_basis(W0)
    lying = cache.cached_basis(W0, (basis.small_basis_fp32 * 57.7, basis.sigma, basis.base_rows()))
    lying.verified = True  # a check that let it through: the max|cos| check still stops it
    with pytest.raises(lorafft.errors.InternalError, match="above 1"):
        analysis.analyze(W0, Wt, basis=lying)
    assert not lying.verify().any()
    assert cache.cached_basis(W0, (basis.small_basis_fp32, basis.sigma, basis.base_rows())).verify().all()


# --- 2, 3. two outputs, or an output and an input, are never one file ---------------------------------------------

def test_out_and_journal_as_one_file_is_refused(trio, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, _, err = _run(capsys, "scan", trio.base, trio.lora, "--out", out, "--journal", out, "--quiet")
    _one_line(code, err, str(out), "both")
    assert os.listdir(tmp_path) == []


def test_out_over_a_base_cache_file_is_refused(trio, tmp_path, capsys):
    built = tmp_path / "cache"
    include = [r"layers\.0\.self_attn\.q_proj"]
    cache.build_base_cache(trio.base, built, include=include)
    before = _snapshot(built)
    for target in (built / "lorafft-base-cache.json", built / "new.json"):
        target_is_index = target.name == "lorafft-base-cache.json"
        code, _, err = _run(capsys, "scan", trio.base, trio.lora, "--include", *include, "--base-cache", built,
                            "--out", target, "--quiet")
        if target_is_index:
            _one_line(code, err, "base cache")
        else:
            assert code == 0, err  # a report beside the cache's files is fine
    assert {k: v for k, v in _snapshot(built).items() if k != "new.json"} == before


# --- 4. the demo replaces only what a demo wrote ------------------------------------------------------------------

def test_demo_never_overwrites_a_users_checkpoints_named_like_its_own(tmp_path, capsys):
    mine = tmp_path / "work"
    synthetic.write_trio(mine, hidden=32, intermediate=64, vocab=32, layers=1)
    os.remove(mine / "full" / "config.json")  # the user's own: base/ and lora/ with their files
    before = _snapshot(mine)
    code, _, err = _run(capsys, "demo", "--dir", mine, "--quiet")
    _one_line(code, err, str(mine), "did not write")
    assert _snapshot(mine) == before
    demo = tmp_path / "demo"
    assert _run(capsys, "demo", "--dir", demo, "--quiet")[0] == 0
    assert _run(capsys, "demo", "--dir", demo, "--quiet")[0] == 0  # an earlier demo's: replaced


# --- 6. λ that would overflow ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lora", "full"])
def test_a_lambda_that_overflows_is_refused_naming_the_limit(trio, tmp_path, capsys, kind):
    out = tmp_path / "out"
    code, _, err = _run(capsys, "intervene", trio.base, getattr(trio, kind), "--lambda", "1e300", "--out", out,
                        "--include", r"layers\.0\.self_attn\.q_proj", "--eps", "1", "--quiet")  # every one
    _one_line(code, err, "lambda", "must stay below")
    assert not out.exists() and os.listdir(tmp_path) == []


# --- 7. a finished journal is not an interrupted one ----------------------------------------------------------------

def test_a_scan_with_a_journal_and_no_out_runs_twice(trio, tmp_path, capsys):
    journal = tmp_path / "j.journal"
    argv = ("scan", trio.base, trio.full, "--include", r"layers\.0\.self_attn", "--journal", journal, "--quiet")
    code, first, err = _run(capsys, *argv)
    assert code == 0, err
    code, second, err = _run(capsys, *argv)
    assert code == 0 and second == first, err
    assert "read back" in err and "interrupted" not in err


# --- 8, 9. resources: tensors that lie about their size, files that are not files ---------------------------------

def test_an_expanded_tensor_in_a_bin_file_is_refused_before_it_is_read(tmp_path, capsys):
    """1.5 KB on disk, 40 GB once materialised: refused from its storage size, at once."""
    torch.save({"w.weight": torch.zeros(1).expand(100_000, 100_000)}, tmp_path / "tuned.bin")
    save_file({"w.weight": torch.zeros(8, 8)}, tmp_path / "base.safetensors")
    assert os.path.getsize(tmp_path / "tuned.bin") < 4096
    start = time.perf_counter()
    code, _, err = _run(capsys, "scan", tmp_path / "base.safetensors", tmp_path / "tuned.bin", "--quiet")
    _one_line(code, err, "tuned.bin", "storage")
    assert time.perf_counter() - start < 30


def test_a_fifo_as_weights_and_a_device_as_journal_are_refused(trio, tmp_path, capsys):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    code, _, err = _run(capsys, "scan", trio.base, fifo, "--quiet")  # would block forever in open()
    _one_line(code, err, str(fifo), "not a regular file")
    code, _, err = _run(capsys, "scan", trio.base, trio.full, "--journal", os.devnull, "--quiet")
    _one_line(code, err, os.devnull, "not a regular file")


# --- 10. concurrent runs --------------------------------------------------------------------------------------------

def test_a_journal_another_process_writes_is_refused_naming_it(trio, tmp_path, capsys):
    out = tmp_path / "r.json"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from lorafft.io.writer import FileLock; "
                               "lock = FileLock(sys.argv[1], 'journal').__enter__(); print('held', flush=True); "
                               "sys.stdin.read()", f"{out}.journal"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["--resume"]):
            code, _, err = _run(capsys, "scan", trio.base, trio.full, "--out", out, "--quiet", *extra)
            _one_line(code, err, f"{out}.journal", f"another lorafft (pid {holder.pid}) is writing")
        assert not out.exists()
    finally:
        holder.communicate("")
    assert _run(capsys, "scan", trio.base, trio.full, "--include", r"layers\.0\.self_attn\.q", "--out", out,
                "--quiet")[0] == 0
    assert sorted(os.listdir(tmp_path)) == ["r.json"]  # no journal, no lock file left


def test_two_writers_of_one_base_cache_keep_each_others_entries(trio, tmp_path):
    """Both open the cache before either writes (two concurrent scans with --write-base-cache): the index merges."""
    directory = tmp_path / "cache"
    first, second = (cache.BaseCache(directory, writable=True) for _ in range(2))
    with lorafft.io.open_checkpoint(trio.base) as base:
        for writer_cache, module in ((first, "q_proj"), (second, "k_proj")):
            name = f"model.layers.0.self_attn.{module}.weight"
            W0 = base.get(name)
            pair = lorafft.pairing.Pair(name, name, tuple(W0.shape))
            writer_cache.store([pair], [W0], linalg.base_basis(W0[None]))
    assert cache.BaseCache(directory).names == {"model.layers.0.self_attn.q_proj.weight",
                                                "model.layers.0.self_attn.k_proj.weight"}
    assert sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")) == sorted(
        entry["file"] for entry in cache.BaseCache(directory).entries.values())  # nothing orphaned


def test_concurrent_cache_builds_into_one_directory(trio, tmp_path):
    directory = tmp_path / "cache"
    builds = [subprocess.Popen([sys.executable, "-m", "lorafft", "cache", "build", str(trio.base), "--out",
                                str(directory), "--include", pattern, "--quiet"],
                               env=dict(os.environ, PYTHONPATH=ROOT), stderr=subprocess.PIPE, text=True)
              for pattern in (r"self_attn", r"mlp")]
    for build in builds:
        assert build.wait(timeout=300) == 0, build.stderr.read()
    assert len(cache.BaseCache(directory).entries) == 14


# --- 11, 12. full disks and vanishing directories -------------------------------------------------------------------

def _full_disk(monkeypatch, fail):
    """Make ``os.fsync`` in the writer fail with ENOSPC when ``fail(path written)`` says so."""
    real = os.fsync

    def fsync(fd):
        if fail(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(writer.os, "fsync", fsync)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to tell which file is written")
@pytest.mark.parametrize("when", ["start", "mid-scan", "report"])
def test_a_full_disk_is_one_line_and_keeps_the_rows(trio, tmp_path, capsys, monkeypatch, when):
    out, journal = tmp_path / "r.json", tmp_path / "r.json.journal"
    argv = ("scan", trio.base, trio.full, "--include", r"layers\.0\.self_attn", "--out", out, "--quiet")
    appended = []

    def fail(path):
        if path.endswith(".journal"):
            appended.append(path)
        return {"start": path.endswith(".journal"), "mid-scan": path.endswith(".journal") and len(appended) >= 3,
                "report": path.endswith(".tmp")}[when]

    _full_disk(monkeypatch, fail)
    code, _, err = _run(capsys, *argv)
    named = journal if when != "report" else out
    _one_line(code, err, str(named), "no space left on device")
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    if when == "start":
        assert not journal.exists()  # nothing empty left behind
        return
    assert journal.exists() and journal.read_text().count("\n") >= 2  # the header and the finished rows
    monkeypatch.undo()
    code, _, err = _run(capsys, *argv, "--resume")
    assert code == 0 and out.exists() and not journal.exists(), err


def test_the_output_directory_removed_mid_scan_is_one_line(trio, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "results"
    folder.mkdir()
    real = lorafft.journal.Journal.append

    def append(self, row):
        real(self, row)
        if folder.exists():
            import shutil
            shutil.rmtree(folder)

    monkeypatch.setattr(lorafft.journal.Journal, "append", append)
    code, _, err = _run(capsys, "scan", trio.base, trio.full, "--include", r"layers\.0\.self_attn",
                        "--out", folder / "r.json", "--quiet")
    _one_line(code, err, str(folder / "r.json"), "no such file or directory")


# --- 13. degenerate weights: say which matrix and why ---------------------------------------------------------------

def test_a_dora_row_that_sums_to_zero_names_the_module_and_row(tmp_path, capsys):
    generator = torch.Generator().manual_seed(4)
    lora_a, lora_b = torch.randn(2, 12, generator=generator), torch.randn(16, 2, generator=generator)
    W0 = torch.randn(16, 12, generator=generator)
    W0[5] = -(lora_b @ lora_a)[5]  # s = 1: row 5 of W0 + s·B·A is zero
    save_file({"layers.0.proj.weight": W0}, tmp_path / "base.safetensors")
    adapter = synthetic.write_peft_adapter(tmp_path / "dora", {"layers.0.proj": (lora_a, lora_b)}, r=2,
                                           lora_alpha=2, target_modules=["proj"])
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.layers.0.proj.lora_magnitude_vector"] = torch.ones(16)
    save_file(tensors, adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    code, _, err = _run(capsys, "scan", tmp_path / "base.safetensors", adapter, "--quiet")
    _one_line(code, err, "layers.0.proj.weight", "row 5", "zero")


def test_tracking_weights_that_turned_nan_names_the_matrix():
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Linear(16, 8))
    tracker = lorafft.Tracker(model, k=4)
    tracker.step(0)
    with torch.no_grad():
        model[1].weight[3, 2] = float("nan")
    with pytest.raises(lorafft.InputError, match=r"^1\.weight: .*NaN"):
        tracker.step(1)


# --- 16. temporaries and Ctrl-C -------------------------------------------------------------------------------------

def test_an_interrupt_just_after_the_temporary_is_made_leaves_nothing(tmp_path, monkeypatch):
    real = writer.os.open

    def interrupted(*args, **kwargs):
        os.close(real(*args, **kwargs))
        raise KeyboardInterrupt

    monkeypatch.setattr(writer.os, "open", interrupted)
    with pytest.raises(KeyboardInterrupt):
        writer.write_atomic(tmp_path / "r.json", "{}")
    assert os.listdir(tmp_path) == []


def test_temporaries_of_dead_processes_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = os.path.basename(writer.temporary_path(str(tmp_path)))
    host, pid = mine.split("-")[1], mine.split("-")[2]
    assert pid == str(os.getpid())
    stale_file, stale_dir = f".lorafft-{host}-{dead.pid}-0123abcd.tmp", f".lorafft-{host}-{dead.pid}-4567abcd.tmp"
    live, foreign, legacy = f".lorafft-{host}-{os.getpid()}-89abcdef.tmp", f".lorafft-00000000-{dead.pid}-0123abcd.tmp", ".out.tmp-1234abcd"
    for name in (stale_file, live, foreign):
        (tmp_path / name).write_text("partial")
    for name in (stale_dir, legacy):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_model.safetensors").write_bytes(b"gigabytes")
    writer.write_atomic(tmp_path / "r.json", "{}")
    assert sorted(os.listdir(tmp_path)) == sorted([live, foreign, legacy, "r.json"])


SITECUSTOMIZE = textwrap.dedent("""
    import os, signal, sys
    def hook(event, args):
        if event == "import" and args[0] == os.environ["LORAFFT_TEST_INTERRUPT_AT"]:
            os.kill(os.getpid(), signal.SIGINT)
    sys.addaudithook(hook)
""")


@pytest.mark.parametrize("module", ["argparse", "lorafft.cli.scan", "torch"])
def test_ctrl_c_at_any_moment_of_start_up_is_one_line(trio, tmp_path, module):
    """SIGINT delivered while the command imports its modules (argparse, its own, torch): ``lorafft:
    interrupted`` and status 130, never a KeyboardInterrupt traceback."""
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]), LORAFFT_TEST_INTERRUPT_AT=module)
    done = subprocess.run([sys.executable, "-m", "lorafft", "scan", str(trio.base), str(trio.full), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert (done.returncode, done.stderr) == (130, "lorafft: interrupted\n")


# --- decided and documented --------------------------------------------------------------------------------------

def test_a_tensor_named_twice_in_a_safetensors_header_is_refused(tmp_path, capsys):
    from lorafft_fixtures.bad_files import write_raw_safetensors

    entry = '{"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}'
    header = f'{{"w.weight": {entry}, "w.weight": {entry}}}'.encode()
    write_raw_safetensors(tmp_path / "tuned.safetensors", header, bytes(16))
    save_file({"w.weight": torch.eye(2)}, tmp_path / "base.safetensors")
    code, _, err = _run(capsys, "scan", tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", "--quiet")
    _one_line(code, err, "tuned.safetensors", "'w.weight' appears twice")


def test_integer_and_bool_matrices_are_skipped_with_a_reason(tmp_path):
    generator = torch.Generator().manual_seed(6)
    weight = synthetic.random_weight(16, 12, generator=generator)
    base = {"q.weight": weight, "q8.weight": torch.randint(-127, 127, (16, 12), dtype=torch.int8),
            "mask.weight": torch.ones(16, 12, dtype=torch.bool)}
    save_file(base, tmp_path / "base.safetensors")
    save_file({**base, "q.weight": weight + 0.01}, tmp_path / "tuned.safetensors")
    report = lorafft.scan(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors")
    assert [row.name for row in report.rows] == ["q.weight"]
    assert {entry["name"]: entry["reason"].split(":")[0] for entry in report.skipped} == {
        "q8.weight": "int8 tensor", "mask.weight": "bool tensor"}


def test_an_adapter_key_matching_a_tensor_in_every_layer_says_so(trio, tmp_path, capsys):
    generator = torch.Generator().manual_seed(7)
    adapter = synthetic.write_peft_adapter(tmp_path / "lora", {"self_attn.q_proj": synthetic.lora_update(
        256, 256, 1, generator=generator, lora_alpha=2, sigma=5.0)}, r=1, lora_alpha=2, target_modules=["q_proj"])
    code, _, err = _run(capsys, "scan", trio.base, adapter, "--quiet")
    _one_line(code, err, "'self_attn.q_proj' matches 2 base tensors", "ambiguous")


def test_repeated_eps_and_include_options_add_up(trio, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, _, err = _run(capsys, "scan", trio.base, trio.lora, "--eps", "0.5", "--eps", "0.7", "--include",
                        r"layers\.0\.self_attn\.q", "--include", r"layers\.1\.mlp\.up", "--out", out, "--quiet")
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["options"]["eps"] == [0.5, 0.7]
    assert {row["name"] for row in report["matrices"]} == {"model.layers.0.self_attn.q_proj.weight",
                                                          "model.layers.1.mlp.up_proj.weight"}


def test_an_all_zero_tuned_matrix_has_undetermined_vectors_not_intruders(tmp_path):
    generator = torch.Generator().manual_seed(8)
    base = {"q.weight": synthetic.random_weight(24, 16, generator=generator)}
    save_file(base, tmp_path / "base.safetensors")
    save_file({"q.weight": torch.zeros(24, 16)}, tmp_path / "tuned.safetensors")
    report = lorafft.scan(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", eps=(0.5, 0.9))
    (row,) = report.rows
    assert row.counts == {"0.5": 0, "0.9": 0} and row.intruders(0.5) == 0
    below = {e: sum(c < float(e) for c in row.max_cos) for e in ("0.5", "0.9")}
    assert row.undetermined == below and row.outside == [1.0] * 10


def test_an_adapter_in_a_directory_not_named_in_utf8_says_why(trio, tmp_path, capsys):
    import shutil

    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/lora\xff")
    shutil.copytree(trio.lora, odd)
    code, _, err = _run(capsys, "scan", trio.base, odd, "--quiet")
    _one_line(code, err, "valid UTF-8")


def test_names_no_terminal_can_encode_print_escaped(tmp_path):
    """A report named with a non-UTF-8 byte and a tensor name with a lone surrogate (a pickle allows it), printed to
    a strict UTF-8 stdout: escaped, never a UnicodeEncodeError after the work is done."""
    generator = torch.Generator().manual_seed(9)
    weight = synthetic.random_weight(16, 12, generator=generator)
    torch.save({"w\ud800.weight": weight}, tmp_path / "base.bin")
    lora_a, lora_b = synthetic.lora_update(16, 12, 1, generator=generator, lora_alpha=1, sigma=20.0)
    torch.save({"w\ud800.weight": weight + lora_b @ lora_a}, tmp_path / "tuned.bin")  # an intruder: named
    out = os.fsencode(str(tmp_path)) + b"/r\xff.json"
    done = subprocess.run([sys.executable, "-m", "lorafft", "scan", str(tmp_path / "base.bin"),
                           str(tmp_path / "tuned.bin"), "--eps", "0.9", "--out", os.fsdecode(out), "--quiet"],
                          env=dict(os.environ, PYTHONPATH=ROOT, PYTHONIOENCODING="utf-8:strict"),
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert b"w\\ud800.weight" in done.stdout and b"r\\udcff.json" in done.stdout
    assert os.path.exists(out)
