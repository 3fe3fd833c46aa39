"""Hub ids and adapter-only scans (lorafft.io.hub), offline against a Hub cache laid out on disk.

The cache is built as huggingface_hub lays it out (``models--ORG--NAME/blobs/<hash>``, ``snapshots/<commit>/<file>``
links to the blobs, ``refs/main`` holding the commit), with ``HF_HUB_OFFLINE=1``: nothing reaches a network. A scan
by ids must give exactly the rows of the scan of the same files by path (which the rest of the suite checks against
fp64), a cache build and an intervention by ids exactly the files written from the paths, and every bad input is
one line, exit 2, nothing written.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pathlib

import pytest
import torch
from safetensors.torch import load_file

from lorafft import synthetic
from lorafft.cache import INDEX, BaseCache, build_base_cache
from lorafft.cli import main
from lorafft.errors import InputError
from lorafft.intervene import RECORD, intervene
from lorafft.scan import scan

constants = pytest.importorskip("huggingface_hub.constants")

ROOT = pathlib.Path(__file__).resolve().parents[1]  # this checkout, for the subprocess
REV1, REV2 = "1" * 40, "2" * 40
SMALL = dict(hidden=32, intermediate=48, layers=1, heads=2, kv_heads=1, vocab=64)


def _add_snapshot(cache, repo_id: str, revision: str, folder, *, ref: str | None = "main"):
    """Copy ``folder``'s files into ``cache`` as huggingface_hub stores a snapshot of ``repo_id`` at ``revision``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for name in sorted(os.listdir(folder)):
        data = (folder / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(revision)


def _adapter_naming(folder, destination, base_name):
    """A copy of the adapter ``folder`` whose adapter_config.json names ``base_name`` as its base."""
    shutil.copytree(folder, destination)
    config = json.loads((destination / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_name
    (destination / "adapter_config.json").write_text(json.dumps(config))
    return destination


@pytest.fixture(scope="module")
def trios(tmp_path_factory):
    """Two synthetic trios of one shape (seeds 0 and 1): the second base is 'another revision'."""
    root = tmp_path_factory.mktemp("trios")
    return synthetic.write_trio(root / "a", seed=0, **SMALL), synthetic.write_trio(root / "b", seed=1, **SMALL)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, trios):
    """A Hub cache with acme/base (main = REV1 = trio a's base, REV2 = trio b's base), acme/lora (trio a's adapter
    naming acme/base) and acme/configs (a config.json, no weights), selected through HF_HUB_CACHE, offline.
    huggingface_hub reads its environment once, at import, so the already imported module's constants are set as
    well (a subprocess reads the variables)."""
    cache = tmp_path / "hub"
    _add_snapshot(cache, "acme/base", REV1, trios[0].base)
    _add_snapshot(cache, "acme/base", REV2, trios[1].base, ref=None)
    _add_snapshot(cache, "acme/lora", REV1, _adapter_naming(trios[0].lora, tmp_path / "lora-src", "acme/base"))
    configs = tmp_path / "configs-only"  # as another program caches a repository it read only the config of
    configs.mkdir()
    shutil.copy(trios[0].base / "config.json", configs)
    _add_snapshot(cache, "acme/configs", REV1, configs)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local folder named acme/...
    return cache


def _rows(report) -> list:
    return report.to_dict()["matrices"]


def _scan(*args, **kwargs):
    return scan(*args, k=4, eps=(0.5, 0.9), **kwargs)


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_ids_scan_as_their_paths(hub_cache, trios):
    by_path = _scan(trios[0].base, trios[0].lora)
    by_id = _scan("acme/base", "acme/lora")
    assert _rows(by_id) == _rows(by_path) and by_path.rows
    snapshot = hub_cache / "models--acme--base" / "snapshots" / REV1
    assert by_id.inputs["base"] == str(snapshot)
    assert by_id.inputs["hub"] == {"base": {"id": "acme/base", "revision": REV1},
                                   "tuned": [{"id": "acme/lora", "revision": REV1}]}
    assert list(by_path.inputs) == ["base", "tuned", "tuned_kind"]  # local paths: inputs as before


def test_revision_picks_another_snapshot(hub_cache, trios):
    other = _scan("acme/base", trios[0].lora, revision=REV2)
    assert _rows(other) == _rows(_scan(trios[1].base, trios[0].lora))
    assert _rows(other) != _rows(_scan("acme/base", trios[0].lora))
    assert other.inputs["hub"] == {"base": {"id": "acme/base", "revision": REV2}}


def test_local_path_wins_over_an_id(hub_cache, trios, tmp_path):
    shutil.copytree(trios[1].base, tmp_path / "acme" / "base")  # cwd is tmp_path: ./acme/base exists
    report = _scan("acme/base", trios[0].lora)
    assert _rows(report) == _rows(_scan(trios[1].base, trios[0].lora))
    assert "hub" not in report.inputs and report.inputs["base"] == "acme/base"


def test_adapter_alone_scans_against_the_base_it_names(hub_cache, trios, tmp_path):
    both = _scan("acme/base", "acme/lora")
    alone = _scan(tuned="acme/lora")
    assert _rows(alone) == _rows(both)
    assert alone.inputs["base_from"] == "adapter_config.json" and alone.inputs["hub"] == both.inputs["hub"]
    # a local adapter naming a local base, from the command line; two adapters naming the same base: one report
    out = tmp_path / "alone.json"
    assert main(["scan", str(trios[0].lora), str(trios[0].lora), "--k", "4", "--eps", "0.5", "0.9", "--quiet",
                 "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    expected = _rows(_scan(trios[0].base, [trios[0].lora, trios[0].lora]))
    assert saved["matrices"] == expected and saved["inputs"]["base"] == str(trios[0].base)


def test_cli_reads_the_cache_named_by_hf_home(hub_cache, trios, tmp_path):
    """A fresh process: huggingface_hub takes HF_HOME (cache in HF_HOME/hub) and HF_HUB_OFFLINE from the
    environment, as it always does."""
    home = tmp_path / "home"
    shutil.copytree(hub_cache, home / "hub", symlinks=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "ids.json"
    done = subprocess.run([sys.executable, "-m", "lorafft", "scan", "acme/lora", "--k", "4", "--eps", "0.5", "0.9",
                           "--quiet", "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    saved = json.loads(out.read_text())
    assert saved["matrices"] == _rows(_scan(trios[0].base, trios[0].lora))
    assert saved["inputs"]["hub"]["base"] == {"id": "acme/base", "revision": REV1}


@pytest.mark.parametrize("arguments, names", [
    (["acme/missing", "{lora}"], ["acme/missing", "HF_HUB_OFFLINE"]),
    (["acme/base", "{lora}", "--revision", "v9"], ["acme/base", "'v9'", "HF_HUB_OFFLINE"]),
    (["acme/configs", "{lora}"], ["acme/configs", "weights are not in the Hugging Face Hub cache"]),
    (["{base}", "{lora}", "--revision", "v1"], ["revision", "no input is a Hugging Face Hub id"]),
    (["{full}"], ["{full}", "not a PEFT adapter", "give the base first"]),
])
def test_bad_ids_are_one_line(hub_cache, trios, tmp_path, capsys, arguments, names):
    paths = {"base": trios[0].base, "lora": trios[0].lora, "full": trios[0].full}
    out = tmp_path / "out.json"
    assert main(["scan", *(a.format(**paths) for a in arguments), "--quiet", "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert all(name.format(**paths) in line for name in names), line
    assert not out.exists() and not (tmp_path / "out.json.journal").exists()


@pytest.mark.parametrize("named, problem", [
    (None, "names no base model"),
    ("", "names no base model"),
    ("acme/gone", "acme/gone: no such file or directory, and its weights are not in the Hugging Face Hub cache"),
    ("/nowhere/base", "/nowhere/base: no such file or directory"),
])
def test_adapter_naming_no_usable_base(hub_cache, trios, tmp_path, capsys, named, problem):
    adapter = _adapter_naming(trios[0].lora, tmp_path / "adapter", named)
    out = tmp_path / "out.json"
    assert main(["scan", str(adapter), "--quiet", "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"lorafft: error: {adapter / 'adapter_config.json'}: ") and problem in line, line
    assert not out.exists()


def test_adapters_naming_different_bases(hub_cache, trios, tmp_path, capsys):
    first = _adapter_naming(trios[0].lora, tmp_path / "a1", str(trios[0].base))
    second = _adapter_naming(trios[0].lora, tmp_path / "a2", str(trios[1].base))
    assert main(["scan", str(first), str(second), "--quiet", "--out", str(tmp_path / "out.json")]) == 2
    line = _error_line(capsys)
    assert "the adapters name different bases" in line and str(trios[1].base) in line
    assert not (tmp_path / "out.json").exists()


def test_without_huggingface_hub_an_id_is_a_missing_path(hub_cache, trios, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import huggingface_hub raises ImportError
    with pytest.raises(InputError, match=r"^acme/base: no such file or directory \(.*pip install 'lorafft\[hub\]'"):
        scan("acme/base", trios[0].lora)


def test_online_id_not_cached_and_hub_unreachable(hub_cache, trios, tmp_path, monkeypatch, capsys):
    """Online, an id that is not cached (or cached without weights: configs only) is downloaded; with the Hub at
    an address that refuses connections (the loopback: nothing leaves the machine) that is one line, exit 2."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for repo_id, problem in (("acme/missing", "could not be downloaded"), ("acme/configs", "no weights")):
        assert main(["scan", repo_id, str(trios[0].lora), "--quiet", "--out", str(tmp_path / "out.json")]) == 2
        line = _error_line(capsys)
        assert line.startswith(f"lorafft: error: {repo_id}: ") and problem in line, line
    assert not (tmp_path / "out.json").exists()
    assert _rows(_scan("acme/base", trios[0].lora)) == _rows(_scan(trios[0].base, trios[0].lora))  # cached: no call


# cache build and intervene: the same ids, read the same way


def _tensors(directory) -> dict:
    """Every tensor of every safetensors file in ``directory``, by (file, name)."""
    return {(file.name, name): tensor for file in sorted(directory.glob("*.safetensors"))
            for name, tensor in load_file(file).items()}


def _assert_same_tensors(mine, theirs):
    mine, theirs = _tensors(mine), _tensors(theirs)
    assert mine.keys() == theirs.keys() and mine
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key


def test_cache_build_by_id_as_by_path(hub_cache, trios, tmp_path, capsys):
    assert main(["cache", "build", str(trios[0].base), "--out", "by-path", "--quiet"]) == 0
    assert main(["cache", "build", "acme/base", "--out", "by-id", "--quiet"]) == 0
    by_path, by_id = (json.loads((tmp_path / name / INDEX).read_text()) for name in ("by-path", "by-id"))
    assert by_id["entries"] == by_path["entries"] and by_id["hub"] == {"id": "acme/base", "revision": REV1}
    assert "hub" not in by_path
    _assert_same_tensors(tmp_path / "by-id", tmp_path / "by-path")
    other = build_base_cache("acme/base", tmp_path / "rev2", revision=REV2)
    assert other.entries == build_base_cache(trios[1].base, tmp_path / "b").entries
    assert list(other.entries.values()) != by_id["entries"]
    assert BaseCache(tmp_path / "rev2").hub == {"id": "acme/base", "revision": REV2}
    # a scan's --write-base-cache writes the same entries, and records the id the same way
    assert main(["scan", "acme/base", "acme/lora", "--write-base-cache", "by-scan", "--quiet"]) == 0
    by_scan = json.loads((tmp_path / "by-scan" / INDEX).read_text())
    assert by_scan["hub"] == by_id["hub"] and by_scan["entries"]
    assert all(entry in by_id["entries"] for entry in by_scan["entries"])


def test_intervene_by_id_as_by_path(hub_cache, trios, tmp_path):
    by_path = intervene(trios[0].base, trios[0].lora, tmp_path / "by-path", lam=0.5, k=4)
    by_id = intervene("acme/base", "acme/lora", tmp_path / "by-id", lam=0.5, k=4)
    assert by_id.rescaled == by_path.rescaled > 0 and by_id.matrices == by_path.matrices
    _assert_same_tensors(tmp_path / "by-id", tmp_path / "by-path")
    assert by_id.inputs == {"hub": {"base": {"id": "acme/base", "revision": REV1},
                                    "tuned": [{"id": "acme/lora", "revision": REV1}]}}
    assert by_path.inputs == {} and by_id.tuned == str(hub_cache / "models--acme--lora" / "snapshots" / REV1)
    # the adapter alone, from the command line: the base its adapter_config.json names
    assert main(["intervene", "acme/lora", "--lambda", "0.5", "--k", "4", "--out", "alone", "--quiet"]) == 0
    _assert_same_tensors(tmp_path / "alone", tmp_path / "by-path")
    record = json.loads((tmp_path / "alone" / RECORD).read_text())
    assert record["inputs"] == {"base_from": "adapter_config.json", **by_id.inputs}
    assert record["matrices"] == json.loads((tmp_path / "by-path" / RECORD).read_text())["matrices"]


def test_intervene_full_finetune_by_id_and_revision(hub_cache, trios, tmp_path):
    _add_snapshot(hub_cache, "acme/full", REV2, trios[1].full, ref=None)
    options = ["--lambda", "0", "--eps", "1", "--k", "4", "--quiet"]
    assert main(["intervene", str(trios[1].base), str(trios[1].full), *options, "--out", "by-path"]) == 0
    assert main(["intervene", "acme/base", "acme/full", "--revision", REV2, *options, "--out", "by-id"]) == 0
    _assert_same_tensors(tmp_path / "by-id", tmp_path / "by-path")
    assert sorted(os.listdir("by-id")) == sorted(os.listdir("by-path"))
    assert not any(os.path.islink(tmp_path / "by-id" / name) for name in os.listdir("by-id"))  # copies, not links
    by_path, by_id = (json.loads((tmp_path / name / RECORD).read_text()) for name in ("by-path", "by-id"))
    assert by_id["matrices"] == by_path["matrices"] and by_id["rescaled_total"] > 0
    assert by_id["inputs"]["hub"] == {"base": {"id": "acme/base", "revision": REV2},
                                      "tuned": [{"id": "acme/full", "revision": REV2}]}


@pytest.mark.parametrize("arguments, names", [
    (["cache", "build", "acme/missing"], ["acme/missing", "HF_HUB_OFFLINE"]),
    (["cache", "build", "acme/base", "--revision", "v9"], ["acme/base", "'v9'", "HF_HUB_OFFLINE"]),
    (["cache", "build", "{base}", "--revision", "v1"], ["revision", "no input is a Hugging Face Hub id"]),
    (["intervene", "acme/missing", "{lora}", "--lambda", "0.5"], ["acme/missing", "HF_HUB_OFFLINE"]),
    (["intervene", "{base}", "acme/missing", "--lambda", "0.5"], ["acme/missing", "HF_HUB_OFFLINE"]),
    (["intervene", "{base}", "{lora}", "--lambda", "0.5", "--revision", "v1"], ["no input is a Hugging Face Hub id"]),
    (["intervene", "{full}", "--lambda", "0.5"], ["{full}", "not a PEFT adapter", "give the base first"]),
])
def test_bad_ids_of_cache_build_and_intervene_are_one_line(hub_cache, trios, tmp_path, capsys, arguments, names):
    paths = {"base": trios[0].base, "lora": trios[0].lora, "full": trios[0].full}
    out = tmp_path / "out"
    assert main([*(a.format(**paths) for a in arguments), "--quiet", "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert line.startswith("lorafft: error: ") and all(name.format(**paths) in line for name in names), line
    assert not out.exists() and not [name for name in os.listdir(tmp_path) if name.startswith(".out")]


def test_cached_finds_what_the_hub_cache_holds_and_downloads_nothing(hub_cache, trios, monkeypatch):
    """hub.cached: an existing path as it is, a cached id's snapshot folder, None for an id not cached (or cached
    without weights) and for a missing path; the network is never asked (snapshot_download must not be called
    without local_files_only)."""
    import huggingface_hub

    from lorafft.io import hub

    original = huggingface_hub.snapshot_download

    def local_only(*args, **kwargs):
        assert kwargs.get("local_files_only") is True
        return original(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", local_only)
    assert hub.cached(str(trios[0].base)) == str(trios[0].base)
    assert hub.cached("acme/base") == str(hub_cache / "models--acme--base" / "snapshots" / REV1)
    assert hub.cached("acme/base", revision=REV2).endswith(REV2)
    assert hub.cached("acme/configs") is None and hub.cached("acme/nothing") is None
    assert hub.cached("./no/such/dir") is None


def test_a_tracked_model_loaded_from_a_hub_id_takes_the_names_of_that_checkpoint(hub_cache, trios):
    """A model whose ``name_or_path`` is a cached Hub id (as transformers sets it) is tracked under the names of that
    checkpoint, as a scan against it names the rows; one from an id not cached keeps its own names."""
    from lorafft.io import open_checkpoint
    from lorafft.tracking import Tracker

    with open_checkpoint(trios[0].base) as base:
        weights = {name: base.get(name) for name in base.names() if "layers.0.self_attn.q_proj" in name}
    for source, names in (("acme/base", list(weights)), ("acme/nothing", [f"wrapper.{n}" for n in weights])):
        model = torch.nn.Module()
        for name, tensor in weights.items():
            module = model
            for part in f"wrapper.{name}".split(".")[:-1]:
                if not hasattr(module, part):
                    module.add_module(part, torch.nn.Module())
                module = getattr(module, part)
            module.register_parameter("weight", torch.nn.Parameter(tensor.clone()))
        model.name_or_path = source
        assert [row.name for row in Tracker(model, k=4).step(0)] == names
