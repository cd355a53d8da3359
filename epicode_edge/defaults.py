"""The method's decoding defaults and where they come from (every layer reads them from here)."""

DEFAULT_ALPHA = 0.1  # the paper's plausibility threshold (Tao et al. 2025; Li et al. 2023 before them)
# Not tuned: the paper tunes lambda per task on dev (`epicode-edge tune` does). On the shipped families tune
# chose 0 (SmolLM2: no lambda beat the extrapolated model alone on dev; CD-only chose 1) and 0.1 (the tiny demo
# family): neither is evidence for a general value, so the default stays mid-range in the paper's grid and
# every bundle carries its own tuned lambda (tune writes it into the manifest).
DEFAULT_LAMBDA = 0.5

# The largest lambda accepted anywhere (CLI, chat, batch lines, serve bodies, manifests). The paper's best lambda
# is about 1/(k-1), large only when the amateur's error is barely larger than the expert's (k = 1.000001 gives
# 1e6). Up to it, the scores (1 + lambda) * le - lambda * la of float32 logits stay finite in float64 and the
# picks are those of the exact formula (decoding/contrastive.py, tests/test_hostile_round2.py).
MAX_LAMBDA = 1e6
