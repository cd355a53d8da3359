"""The method's decoding defaults and where they come from (every layer reads them from here)."""

DEFAULT_ALPHA = 0.1  # the paper's plausibility threshold (Tao et al. 2025; Li et al. 2023 before them)
# Not tuned: the paper tunes lambda per task on dev (`epicode-edge tune` does). On the shipped families tune
# chose 0 (SmolLM2: no lambda beat the extrapolated model alone on dev; CD-only chose 1) and 0.1 (the tiny demo
# family): neither is evidence for a general value, so the default stays mid-range in the paper's grid and
# every bundle carries its own tuned lambda (tune writes it into the manifest).
DEFAULT_LAMBDA = 0.5
