"""The README's command examples run as written: the demo directory it starts from, then its training-run example
(the run/step-* adapters come from ``lorafft demo --dir``, not from a script elsewhere)."""

import pathlib
import re
import shlex

import pytest

from lorafft import cli, synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bash_block(after: str) -> list[str]:
    """The commands of the first ```bash block of the README after the text ``after`` (``&&`` splits them)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text[text.index(after):], re.S).group(1)
    return [command.strip() for line in block.splitlines() for command in line.split("&&") if command.strip()]


def _run(commands: list[str], monkeypatch, capsys) -> str:
    """Run ``lorafft ...`` commands in-process and ``cd``; every one must succeed. Returns their stdout."""
    out = []
    for command in commands:
        argv = shlex.split(command)
        if argv[0] == "cd":
            monkeypatch.chdir(argv[1])
            continue
        assert argv[0] == "lorafft", command
        assert cli.main(argv[1:]) == 0, command
        out.append(capsys.readouterr().out)
    return "".join(out)


def test_the_training_run_example_runs_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    start = _bash_block("Every picture below comes from the `lorafft demo` checkpoints")
    assert start[0] == "lorafft demo --dir demo" and start[1] == "cd demo"
    said = _run([*start[:2]], monkeypatch, capsys)
    assert sorted(p.name for p in (tmp_path / "demo" / "run").iterdir()) == [
        f"step-{t:g}" for t in synthetic.RUN_FRACTIONS]
    assert "a mock training run of the LoRA adapter" in said
    run = _bash_block("**A training run** (Figure 5)")
    assert run[0].startswith("lorafft scan base run/step-0.25")
    said = _run(run, monkeypatch, capsys)
    figures = sorted(p.name for p in (tmp_path / "demo" / "run-figures").iterdir())
    assert "trajectory-model.layers.0.mlp.gate_proj.weight.png" in figures and "counts_vs_eps.png" in figures
    assert "per checkpoint" in said
