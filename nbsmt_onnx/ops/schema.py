"""Schema of the NB-SMT operators (docs/spec.md §3): the single source of truth.

Names, inputs, attributes and defaults of ``NbSmtConv`` and ``NbSmtMatMul``
live here; the rewrite pass, the NumPy reference and the ONNX shape-inference
registration all read them from this module. The C++ library implements the
same contract (custom_ops/src/ort).
"""

from __future__ import annotations

from dataclasses import dataclass

DOMAIN = "nbsmt"
OPSET_VERSION = 1

CONV = "NbSmtConv"
MATMUL = "NbSmtMatMul"
OP_TYPES = (CONV, MATMUL)

THREADS_CHOICES = (1, 2, 4)
MAPPING_CHOICES = ("channel", "interleave")
REDUCE_CHOICES = ("activations", "weights")

#: Integer range of quantized activations, by signedness (docs/spec.md §2).
ACT_RANGE = {False: (0, 255), True: (-127, 127)}
#: Integer range of quantized weights.
WEIGHT_RANGE = (-127, 127)
#: Largest reduction length K for which the int32 accumulator is exact.
MAX_REDUCTION_LENGTH = 65793  # K * 32640 (255 x reduced weight -128) < 2**31

#: Order of the counters in the optional ``stats`` output (docs/spec.md §3.4).
STATS_FIELDS = ("groups", "active_slots", "collisions", "reduced_operands")


@dataclass(frozen=True)
class SmtAttributes:
    """The NB-SMT attributes shared by both operators, validated on construction."""

    threads: int = 2
    mapping: str = "channel"
    reduce: str = "activations"
    act_signed: int = 0

    def __post_init__(self) -> None:
        if self.threads not in THREADS_CHOICES:
            raise ValueError(f"threads must be one of {THREADS_CHOICES}, got {self.threads!r}")
        if self.mapping not in MAPPING_CHOICES:
            raise ValueError(f"mapping must be one of {MAPPING_CHOICES}, got {self.mapping!r}")
        if self.reduce not in REDUCE_CHOICES:
            raise ValueError(f"reduce must be one of {REDUCE_CHOICES}, got {self.reduce!r}")
        if self.act_signed not in (0, 1):
            raise ValueError(f"act_signed must be 0 or 1, got {self.act_signed!r}")

    def as_node_attributes(self) -> dict[str, object]:
        return {
            "threads": self.threads,
            "mapping": self.mapping,
            "reduce": self.reduce,
            "act_signed": self.act_signed,
        }


#: ONNX Conv attributes carried over unchanged (ONNX semantics and defaults).
CONV_ATTRIBUTES = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")
AUTO_PAD_CHOICES = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")

CONV_INPUTS = ("X", "Wq", "x_scale", "w_scale", "B")
MATMUL_INPUTS = ("A", "Bq", "a_scale", "b_scale", "bias")
OUTPUTS = ("Y", "stats")
