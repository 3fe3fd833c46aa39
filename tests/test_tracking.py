"""Tracking during training (lorafft.tracking, lorafft.integrations.transformers) against independent references:
a post-hoc ``lorafft.scan`` of the adapter a real MiniLM LoRA run saved at the same step, and fp64 LAPACK SVDs of
the weights PEFT's ``merge_and_unload`` produces (DoRA, rsLoRA) or of a plain model's snapshot and current weights.
"""

import copy
import json
import os
import threading

import pytest
import torch

import lorafft
from lorafft import analysis, linalg
from lorafft.cache import build_base_cache
from lorafft.errors import InputError
from lorafft.report import MatrixRow

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lorafft.integrations.transformers import IntruderCallback  # noqa: E402
from lorafft.tracking import Tracker  # noqa: E402

BASIS_FP32 = 1e-6  # max|cos| error of an fp32 explicit base basis (2.6e-7 seen on these MiniLM matrices)

QUERY_VALUE = [r"attention\.self\.(query|value)\.weight$"]
K = 10


def lora_model(minilm_dir, seed=0, **config):
    """MiniLM for sequence classification with a PEFT LoRA adapter (r = 8 on query and value by default)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    settings = dict(r=8, lora_alpha=16, target_modules=["query", "value"])
    return peft.get_peft_model(model, peft.LoraConfig(**{**settings, **config}))


def dataset(count=24, length=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (count, length), generator=g)
    labels = torch.randint(0, 2, (count,), generator=g)
    return [{"input_ids": i, "attention_mask": torch.ones(length, dtype=torch.long), "labels": y}
            for i, y in zip(ids, labels)]


class Kill(transformers.TrainerCallback):
    """Stands for a killed process: raises at ``step``, so no end-of-training code runs."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("killed")


def trainer(model, output_dir, callbacks, max_steps=6):
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=5e-3,
        logging_steps=1, save_steps=2, save_only_model=False, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        lr_scheduler_type="constant")
    return transformers.Trainer(model=model, args=args, train_dataset=dataset(), callbacks=callbacks)


def assert_rows_match(tracked, scanned):
    """Same matrices, same counts, max|cos| and singular values within the certified error bounds of both."""
    assert sorted(r.name for r in tracked) == sorted(r.name for r in scanned)
    by_name = {r.name: r for r in scanned}
    compared = 0
    for row in tracked:
        other = by_name[row.name]
        assert (row.layer, row.module, row.shape, row.side, row.k, row.base_rank, row.undetermined) == (
            other.layer, other.module, other.shape, other.side, other.k, other.base_rank, other.undetermined)
        assert row.delta_magnitude is not None and (row.delta_magnitude, row.delta_direction) == pytest.approx(
            (other.delta_magnitude, other.delta_direction), rel=1e-9, abs=1e-12)
        assert row.counts == other.counts or any(row.near_threshold)
        for a, b, e1, e2 in zip(row.max_cos, other.max_cos, row.error_bound, other.error_bound):
            if e1 + e2 < 1e-3:  # the tracker holds each basis in fp32, as a base cache does: up to ~1e-6 more
                assert abs(a - b) <= e1 + e2 + BASIS_FP32
                compared += 1
        torch.testing.assert_close(torch.tensor(row.singular_values), torch.tensor(other.singular_values),
                                   rtol=1e-6, atol=1e-7)
    assert compared >= len(tracked) * K // 2  # most vectors are certified, so the comparison means something


def test_callback_matches_posthoc_scan_and_resumes(minilm_dir, tmp_path):
    """A real MiniLM LoRA run under ``Trainer``: killed at step 5 it leaves a readable journal of steps 2 and 4;
    resumed from checkpoint-4 it appends step 6; every tracked step equals a scan of the adapter saved then."""
    cache = tmp_path / "cache"
    build_base_cache(minilm_dir, cache, include=QUERY_VALUE)
    out = tmp_path / "run"
    options = dict(every_n_steps=2, eps=(0.5, 0.7), base_cache=cache)
    with pytest.raises(KeyboardInterrupt):  # B starts random (not PEFT's zeros): intruders from the first step
        trainer(lora_model(minilm_dir, init_lora_weights=False), out, [IntruderCallback(**options), Kill(5)]).train()
    journal = out / "lorafft-trajectory.json.journal"
    assert not (out / "lorafft-trajectory.json").exists()
    lines = journal.read_text().splitlines()
    partial = [MatrixRow.from_dict(json.loads(line)) for line in lines[1:]]
    assert sorted({row.checkpoint for row in partial}) == [2, 4] and len(partial) == 2 * 12

    callback = IntruderCallback(**options)
    resumed = trainer(lora_model(minilm_dir, init_lora_weights=False), out, [callback])
    callback.attach(resumed)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    assert not journal.exists()
    report = lorafft.Report.from_dict(json.loads((out / "lorafft-trajectory.json").read_text()))
    assert report.checkpoints == ["step 2", "step 4", "step 6"]
    for index, step in enumerate((2, 4, 6)):
        scanned = lorafft.scan(minilm_dir, out / f"checkpoint-{step}", eps=(0.5, 0.7), include=QUERY_VALUE)
        assert_rows_match([r for r in report.rows if r.checkpoint == index], scanned.rows)
    logged = [entry for entry in resumed.state.log_history if "intruders/eps=0.5" in entry]
    assert [entry["step"] for entry in logged] == [2, 4, 6]  # the checkpoint's history, then this run's
    for index, entry in enumerate(logged):
        assert entry["intruders/eps=0.5"] == report.totals(checkpoint=index)["0.5"]
        assert entry["intruders/eps=0.5/query"] + entry["intruders/eps=0.5/value"] == entry["intruders/eps=0.5"]
    assert report.totals(checkpoint=2)["0.5"] > 0


def test_steps_analysed_in_base_coordinates_equal_posthoc_scans(minilm_dir, tmp_path):
    """Without a base cache a tracker holds its bases in fp64 and analyses each step's LoRA update in their
    coordinates, started from the previous step's vectors (lorafft.updating): every tracked step of a real run
    equals a scan of the adapter saved then (which takes the same path from scratch), and it was that path that
    answered."""
    out = tmp_path / "run"
    callback = IntruderCallback(every_n_steps=2, eps=(0.5, 0.7), include=QUERY_VALUE)
    trainer(lora_model(minilm_dir, init_lora_weights=False), out, [callback], max_steps=4).train()
    report = lorafft.Report.from_dict(json.loads((out / "lorafft-trajectory.json").read_text()))
    for index, step in enumerate((2, 4)):
        scanned = lorafft.scan(minilm_dir, out / f"checkpoint-{step}", eps=(0.5, 0.7), include=QUERY_VALUE)
        rows = [r for r in report.rows if r.checkpoint == index]
        assert rows and all(r.method == "update" for r in rows) and all(r.method == "update" for r in scanned.rows)
        assert_rows_match(rows, scanned.rows)
    assert_cosines_between_steps(report, minilm_dir, [out / f"checkpoint-{step}" for step in (2, 4)])


def merged_left_vectors(minilm_dir, adapter_dir, name, k=K):
    """Top-k left singular vectors ``[m, k]`` (and σ) of W0 + s·B·A in fp64, W0 from the MiniLM file, the factors
    from a saved adapter, by LAPACK."""
    from safetensors.torch import load_file

    base = load_file(os.path.join(minilm_dir, "model.safetensors"))
    factors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    module = "base_model.model.bert." + name.removesuffix(".weight")
    A, B = (factors[f"{module}.lora_{x}.weight"].double() for x in "AB")
    U, S, _ = torch.linalg.svd(base[name].double() + config["lora_alpha"] / config["r"] * B @ A)
    return U[:, :k], S[:k]


def assert_cosines_between_steps(report, minilm_dir, adapters):
    """Each row of the second tracked step carries ``cos_previous``, the cosines of the first step's top-k vectors
    with its own: equal in absolute value (a singular vector's sign is arbitrary) to those of fp64 SVDs of the two
    saved adapters' merged weights, for vectors separated from their neighbours (where a vector is determined)."""
    compared = 0
    for row in (r for r in report.rows if r.checkpoint == 1):
        first = next(r for r in report.rows if r.checkpoint == 0 and r.name == row.name and r.side == row.side)
        assert first.cos_previous is None and len(row.cos_previous) == len(row.cos_previous[0]) == row.k
        (Y0, S0), (Y1, S1) = (merged_left_vectors(minilm_dir, adapter, row.name) for adapter in adapters)
        reference = (Y0.T @ Y1).abs()
        separated = [[bool(b0 < 1e-6 and b1 < 1e-6) for b1 in row.error_bound] for b0 in first.error_bound]
        for i in range(row.k):
            for j in range(row.k):
                if separated[i][j]:
                    assert abs(abs(row.cos_previous[i][j]) - float(reference[i, j])) < 1e-5, (row.name, i, j)
                    compared += 1
    assert compared >= 4 * K * K // 2


def test_background_tracking_equals_tracking_in_step(minilm_dir, tmp_path, monkeypatch):
    """``background=True`` computes the base bases and analyses copies of the weights in a worker thread: the same
    rows as tracking in the training step, and the counts logged later with ``intruders/step`` naming the step they
    describe."""
    reports, histories, threads = [], [], []

    base_basis = linalg.base_basis

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return base_basis(*args, **kwargs)

    monkeypatch.setattr(linalg, "base_basis", spy)
    for background in (False, True):
        out = tmp_path / f"background-{background}"
        callback = IntruderCallback(every_n_steps=2, include=[r"layer\.[01]\."], background=background)
        run = trainer(lora_model(minilm_dir, init_lora_weights=False), out, [callback], max_steps=4)
        threads.clear()
        run.train()
        assert threads and all(name.startswith("lorafft-track") == background for name in threads), threads
        reports.append(json.loads((out / "lorafft-trajectory.json").read_text()))
        histories.append([entry for entry in run.state.log_history if "intruders/eps=0.5" in entry])
    assert reports[0]["matrices"] == reports[1]["matrices"]
    assert reports[1]["inputs"]["tuned"] == ["step 2", "step 4"]
    assert [entry["intruders/step"] for entry in histories[1]] == [2, 4]
    assert [e["intruders/eps=0.5"] for e in histories[0]] == [e["intruders/eps=0.5"] for e in histories[1]]


def reference_max_cos(W0, Wt, k=K):
    """max_i |<y_j, x_i>| of the top-k left singular vectors of Wt against all of W0's, by fp64 LAPACK SVDs."""
    X = torch.linalg.svd(W0.double(), full_matrices=False)[0]
    Y = torch.linalg.svd(Wt.double(), full_matrices=False)[0][:, :k]
    return (X.T @ Y).abs().amax(dim=0)


def assert_matches_reference(rows, base, tuned):
    for row in rows:
        expected = reference_max_cos(base[row.name], tuned[row.name])
        bound = torch.tensor(row.error_bound).clamp(max=1.0) + 1e-5
        assert ((torch.tensor(row.max_cos, dtype=torch.float64) - expected).abs() <= bound).all(), row.name


def test_dora_rslora_equal_peft_merge(minilm_dir):
    """DoRA and rsLoRA factors read from the live modules: equal to PEFT's own merge_and_unload weights."""
    model = lora_model(minilm_dir, use_dora=True, use_rslora=True, init_lora_weights=False)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.3 * torch.rand_like(parameter))
    tracker = Tracker(model, include=[r"layer\.[01]\."])
    rows = tracker.step(0)
    assert len(rows) == 4 and {r.name.split(".")[0] for r in rows} == {"encoder"}  # the MiniLM file's names
    base = {n.replace("base_layer.", "").removeprefix("base_model.model.bert."): p.detach()
            for n, p in model.named_parameters()}
    merged = {n.removeprefix("bert."): p.detach()
              for n, p in copy.deepcopy(model).merge_and_unload().named_parameters()}
    assert not torch.equal(base[rows[0].name], merged[rows[0].name])
    assert_matches_reference(rows, base, merged)


def test_gpt2_conv1d_fan_in_fan_out():
    """GPT-2's Conv1D stores W0 as [in, out]: tracked as [out, in], equal to PEFT's merge (a small random GPT-2)."""
    torch.manual_seed(4)
    config = transformers.GPT2Config(n_embd=96, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    model = peft.get_peft_model(transformers.GPT2LMHeadModel(config), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False))
    rows = Tracker(model).step(0)
    assert {(r.module, r.shape) for r in rows} == {("attn.c_attn", (288, 96)), ("mlp.c_fc", (384, 96))}
    base = {n.replace("base_layer.", "").removeprefix("base_model.model."): p.detach().mT
            for n, p in model.named_parameters() if p.dim() == 2}
    merged = {n: p.detach().mT for n, p in copy.deepcopy(model).merge_and_unload().named_parameters() if p.dim() == 2}
    assert_matches_reference(rows, base, merged)


def test_plain_model_snapshot(minilm_dir):
    """Without PEFT the weights at creation are the base; a later step compares the live weights with them."""
    model = transformers.AutoModel.from_pretrained(minilm_dir)
    tracker = Tracker(model, include=[r"layer\.0\.attention\.self\.(query|key)"], eps=(0.5, 0.9))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in ("encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.key.weight"):
                u, v = torch.randn(384, 2, generator=g), torch.randn(2, 384, generator=g)
                parameter.add_(0.5 * u @ v / 384**0.5)
    first = tracker.step(0)
    second = tracker.step(1)
    assert [r.name for r in second] == ["encoder.layer.0.attention.self.query.weight",
                                        "encoder.layer.0.attention.self.key.weight"]
    current = {n: p.detach() for n, p in model.named_parameters()}
    assert_matches_reference(second, base, current)
    assert sum(r.counts["0.9"] for r in second) > 0  # the rank-2 perturbations are new directions
    assert_matches_reference(first, base, current)  # cold, then warm-started from those vectors
    report = tracker.report()
    assert report.checkpoints == ["step 0", "step 1"] and report.inputs["tuned_kind"] == ["full", "full"]
    pytest.importorskip("matplotlib")
    figure = report.plot_checkpoint_totals()  # what `lorafft plot` draws for a run: one group of bars per step
    assert [label.get_text() for label in figure.axes[0].get_xticklabels()] == ["full: step 0", "full: step 1"]


def test_cosines_between_steps_across_the_two_ways_a_step_is_analysed(minilm_dir, monkeypatch):
    """A step analysed in the base's coordinates, then one the scan's way (here forced: the update path declines),
    then in coordinates again: each step's cos_previous equals |Y_beforeᵀ Y_now| of fp64 SVDs of PEFT's merged
    weights, for vectors separated from their neighbours."""
    model = lora_model(minilm_dir, init_lora_weights=False)
    include = [r"layer\.0\.attention\.self\.query"]
    tracker = Tracker(model, include=include, k=6)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    merged, rows = [], []
    generator = torch.Generator().manual_seed(7)
    for step, declined in ((0, False), (1, True), (2, False)):
        with torch.no_grad():
            layer.lora_B["default"].weight.add_(0.02 * torch.randn(layer.lora_B["default"].weight.shape,
                                                                  generator=generator))
        with monkeypatch.context() as patch:
            if declined:
                patch.setattr(analysis, "_update_path", lambda *args, **kwargs: None)
            (row,) = tracker.step(step)
        assert row.method == ("dense" if declined else "update")
        merged.append(copy.deepcopy(model).merge_and_unload().bert.encoder.layer[0].attention.self.query.weight)
        rows.append(row)
    assert rows[0].cos_previous is None
    for index in (1, 2):
        U = [torch.linalg.svd(W.detach().double())[0][:, :6] for W in merged[index - 1 : index + 1]]
        reference = (U[0].T @ U[1]).abs()
        separated = [[rows[index - 1].error_bound[i] < 1e-6 and rows[index].error_bound[j] < 1e-6
                      for j in range(6)] for i in range(6)]
        checked = [(i, j) for i in range(6) for j in range(6) if separated[i][j]]
        assert len(checked) >= 18
        for i, j in checked:
            assert abs(abs(rows[index].cos_previous[i][j]) - float(reference[i, j])) < 1e-5, (index, i, j)


def test_tracked_names_are_the_names_a_scan_of_the_saved_adapter_gives(minilm_dir, tmp_path):
    """One name per matrix: a scan of a PEFT adapter names its rows by the base checkpoint's tensor names, and so
    does the tracker: ``encoder.layer.0...`` when the model was loaded from the MiniLM file (a BertModel checkpoint),
    ``bert.encoder.layer.0...`` when it was loaded from a saved BertForSequenceClassification (the base saved too).
    The tracked rows equal a scan of ``model.save_pretrained(dir)`` either way."""
    saved_base = tmp_path / "base"
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2).save_pretrained(
        saved_base)
    include = [r"layer\.0\.attention\.self\.query"]
    for source, prefix in ((minilm_dir, ""), (saved_base, "bert.")):
        model = lora_model(source, init_lora_weights=False)
        rows = Tracker(model, include=include, eps=(0.5, 0.7)).step(0)
        adapter = tmp_path / f"adapter-{prefix or 'minilm'}"
        model.save_pretrained(adapter)
        scanned = lorafft.scan(tuned=adapter, include=include, eps=(0.5, 0.7))  # the base its config names
        assert scanned.inputs["base"] == str(source)
        assert [r.name for r in rows] == [r.name for r in scanned.rows] == \
            [f"{prefix}encoder.layer.0.attention.self.query.weight"]
        assert_rows_match(rows, scanned.rows)


def test_bad_use_is_one_line_input_error(minilm_dir):
    with pytest.raises(InputError, match="no weight matrix in scope"):
        Tracker(torch.nn.Sequential(torch.nn.ReLU()))
    with pytest.raises(InputError, match="no weight matrix in scope"):
        Tracker(lora_model(minilm_dir), include=["no-such-module"])
    with torch.device("meta"):
        unmaterialized = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(InputError, match="no base snapshot possible"):
        Tracker(unmaterialized)
    for every in (0, -3, 1.5):
        with pytest.raises(InputError, match="every_n_steps") as error:
            IntruderCallback(every_n_steps=every)
        assert "\n" not in str(error.value)


def test_fresh_run_refuses_an_old_journal(minilm_dir, tmp_path):
    (tmp_path / "lorafft-trajectory.json.journal").write_text('{"lorafft_journal": 1}\n')
    run = trainer(lora_model(minilm_dir), tmp_path, [IntruderCallback(every_n_steps=1, include=[r"layer\.0\."])],
                  max_steps=1)
    with pytest.raises(InputError, match="earlier training run"):
        run.train()
    assert os.path.getsize(tmp_path / "lorafft-trajectory.json.journal") > 0
