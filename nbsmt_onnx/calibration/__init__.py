"""Calibration: data sources, activation ranges, BN statistics and recalibration.

- :mod:`.data` — where calibration samples come from, sampling, batching, validation;
- :mod:`.ranges` — activation ranges on the float model (quantization scales);
- :mod:`.statistics` — streaming, mergeable per-channel statistics;
- :mod:`.recalibrate` — BatchNorm recalibration strategies (docs/spec.md §4-§5).
"""
