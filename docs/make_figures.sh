#!/usr/bin/env bash
# Regenerate every picture of the README's "Pictures" section from the demo checkpoints, with the README's commands.
#
#   docs/make_figures.sh [WORKDIR]     (WORKDIR default: a new temporary directory; about two minutes on 2 cores)
#
# The checkpoints, reports and all figures stay in WORKDIR; the ones the README shows are copied to docs/images/.
set -euo pipefail

IMAGES="$(cd "$(dirname "$0")" && pwd)/images"
WORK="${1:-$(mktemp -d -t lorafft-demo-XXXXXX)}"
mkdir -p "$IMAGES" "$WORK"
cd "$WORK"
set -x

lorafft demo --dir . --quiet                  # base/, full/, lora/ (rank-1 PEFT adapter) and run/ (its mock run)

# A LoRA fine-tune and a full one, against the base (paper Figures 1-4)
lorafft scan base lora --eps 0.5 0.6 0.7 0.8 0.9 --out lora.json --quiet
lorafft scan base full --eps 0.5 0.6 0.7 0.8 0.9 --out full.json --quiet
lorafft plot lora.json full.json --out figures --spectra 1
lorafft plot lora.json --out zoom --heatmap-size 100 --spectra 0

# The whole spectrum (paper Figure 15): k = min(m, n) = 256 here
lorafft scan base lora --k 256 --out lora-k256.json --quiet
lorafft plot lora-k256.json --out deep --spectra 0 --heatmaps 0

# A training run (paper Figure 5): the demo adapter's update grown as t * s*B*A, t = 0.25, 0.5, 0.75, 1 (run/)
lorafft scan base run/step-0.25 run/step-0.5 run/step-0.75 run/step-1 --out run.json --quiet
lorafft plot run.json --out run-figures --spectra 0 --heatmaps 0

cp figures/lora-similarity-model.layers.0.mlp.gate_proj.weight.png "$IMAGES/similarity-lora.png"
cp figures/full-similarity-*.png "$IMAGES/similarity-full.png"
cp zoom/similarity-model.layers.0.mlp.gate_proj.weight.png "$IMAGES/similarity-lora-n100.png"
cp figures/counts_vs_eps.png "$IMAGES/counts-vs-eps.png"
cp run-figures/counts_vs_eps.png "$IMAGES/counts-vs-eps-run.png"
cp deep/counts_vs_k.png "$IMAGES/counts-vs-k.png"
cp figures/lora-layer_bars.png "$IMAGES/layer-bars.png"
cp figures/lora-spectrum-model.layers.0.mlp.gate_proj.weight.png "$IMAGES/spectrum-lora.png"
cp run-figures/trajectory-model.layers.0.mlp.gate_proj.weight.png "$IMAGES/trajectory.png"
ls -l "$IMAGES"
