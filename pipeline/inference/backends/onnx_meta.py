"""The segpipe metadata of an exported ONNX model: what the .onnx file alone tells the pipeline.

`segpipe export` (`pipeline.inference.backends.onnx_export`) writes it into the model's `metadata_props`, one JSON
value per key; `pipeline.inference.backends.onnx_runtime` reads it back (ONNX Runtime shows `metadata_props`
as the session's custom metadata map):

    segpipe.format       "segpipe-onnx/1"
    segpipe.network      {"name": "unet", "config": {...}}: build_network(name, in, out, **config)
    segpipe.contract     {"padding": "same", "halo": 0, "in_channels": 3, "out_channels": 2,
                          "smallest_output": 16, "output_step": 16}: see `SizeRule`
    segpipe.augment      the checkpoint's training preprocessing record (its configs/augment.yaml
                         section: channels, clahe, normalize), or null
    segpipe.class_names  the checkpoint's class names, or null
    segpipe.precision    the precision the network was trained in (fp32, bf16, fp16), or null; the
                         graph itself is always fp32
    segpipe.checkpoint   {"file": "best.pt", "sha256": ..., and the checkpoint's scalar facts:
                         dataset, network_key, profile, epoch, val_dice, ...}, or null (a module)
    segpipe.export       {"exporter": ..., "torch": ..., "opset": ..., "input": "input",
                         "output": "logits", "graph": ...}
    segpipe.thresholds   the checkpoint's validation thresholds {"best_f1", "best_dice", "val_f1",
                         "val_dice", "cases"} (`segpipe infer --threshold val`); optional: written
                         only when the checkpoint records them, absent reads as null
    segpipe.instances    the instance settings chosen on validation {"settings": {...}, "val_seg",
                         "candidates"} (`pipeline.training.instance_output`; `segpipe infer` writes
                         NAME_inst.* with them); optional like thresholds

Sizes per spatial axis (`SizeRule`): the reachable outputs are smallest_output + k * output_step
(k >= 0) and input = output + 2 * halo. Every network of the registry follows it: "same" padding
has outputs = inputs = multiples of 2**depth (U-Net), of 2**prune_level (UNet++) or any size
(U2-Net: step 1, smallest 1); the "valid" U-Net has outputs `unet_valid_output_size(1)` + k * 2**depth.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from pipeline.config import check_int
from pipeline.errors import SegpipeError

FORMAT = "segpipe-onnx/1"
PREFIX = "segpipe."
KEYS = (
    "format",
    "network",
    "contract",
    "augment",
    "class_names",
    "precision",
    "checkpoint",
    "export",
    "thresholds",
    "instances",
)
"""The metadata keys, each stored as PREFIX + key."""
OPTIONAL = ("thresholds", "instances")
"""Keys written only when not null (added after the format's first version): absent reads as null."""


@dataclass(frozen=True)
class SizeRule:
    """A network's size helpers from its lattice of sizes: outputs smallest + k * step, inputs + 2 * halo.

    `output_size`, `input_size` and `valid_output_size` behave as the network's own (see
    `pipeline.networks`): sizes off the lattice raise SegpipeError naming `owner`.
    """

    owner: str
    halo: int
    smallest: int
    step: int

    @classmethod
    def of(cls, net: Any, owner: str) -> "SizeRule":
        """The rule of a contract network, checked against its own helpers on the first sizes;
        SegpipeError if its sizes are not such a lattice (then no metadata can describe them)."""
        smallest = int(net.valid_output_size(1))
        rule = cls(owner, int(net.halo), smallest, int(net.valid_output_size(smallest + 1)) - smallest)
        for n in range(1, smallest + 2 * rule.halo + 4 * rule.step):
            if _or_none(net.output_size, n) != _or_none(rule.output_size, n):
                raise SegpipeError(
                    f"{owner}: its sizes are not outputs {smallest} + k * {rule.step} from inputs "
                    f"+ 2 * halo {rule.halo} (input {n}); the ONNX metadata cannot describe them"
                )
            if n <= smallest + 3 * rule.step and net.valid_output_size(n) != rule.valid_output_size(n):
                raise SegpipeError(
                    f"{owner}: valid_output_size({n}) disagrees with outputs {smallest} + k * {rule.step}"
                )
        return rule

    def valid_output_size(self, at_least: int) -> int:
        """The smallest reachable output size >= `at_least`."""
        check_int(at_least, "at_least", self.owner, minimum=0)
        return self.smallest + max(0, -(-(at_least - self.smallest) // self.step)) * self.step

    def input_size(self, output_size: int) -> int:
        """The input size giving `output_size`; SegpipeError if that output is not reachable."""
        check_int(output_size, "output size", self.owner, minimum=1)
        if output_size < self.smallest or (output_size - self.smallest) % self.step:
            raise SegpipeError(
                f"{self.owner}: output size {output_size} is not reachable; reachable sizes are {self.smallest} + "
                f"k * {self.step}, e.g. {self.valid_output_size(output_size)}"
            )
        return output_size + 2 * self.halo

    def output_size(self, input_size: int) -> int:
        """The output size of `input_size`; SegpipeError naming the nearest valid inputs otherwise."""
        check_int(input_size, "input size", self.owner, minimum=1)
        out = input_size - 2 * self.halo
        if out >= self.smallest and (out - self.smallest) % self.step == 0:
            return out
        high = self.valid_output_size(out) + 2 * self.halo
        nearest = f"{high - self.step} or {high}" if high - self.step - 2 * self.halo >= self.smallest else f"{high}"
        raise SegpipeError(
            f"{self.owner}: input size {input_size} does not suit this network (inputs are "
            f"{self.smallest + 2 * self.halo} + k * {self.step}); nearest valid inputs: {nearest}"
        )


def _or_none(size: Any, n: int) -> int | None:
    """`size(n)`, or None where it raises SegpipeError."""
    try:
        return int(size(n))
    except SegpipeError:
        return None


@dataclass(frozen=True)
class OnnxMeta:
    """The segpipe metadata of an ONNX model (see the module docstring for the keys)."""

    network: str
    config: dict[str, Any]
    padding: str
    in_channels: int
    out_channels: int
    rule: SizeRule
    augment: dict[str, Any] | None = None
    class_names: list[str] | None = None
    precision: str | None = None
    checkpoint: dict[str, Any] | None = None
    export: dict[str, Any] | None = None
    thresholds: dict[str, Any] | None = None
    instances: dict[str, Any] | None = None

    def props(self) -> dict[str, str]:
        """The metadata_props entries: PREFIX + key -> JSON (`OPTIONAL` keys only when not None)."""
        contract = {
            "padding": self.padding,
            "halo": self.rule.halo,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "smallest_output": self.rule.smallest,
            "output_step": self.rule.step,
        }
        values = {
            "format": FORMAT,
            "network": {"name": self.network, "config": self.config},
            "contract": contract,
            "augment": self.augment,
            "class_names": self.class_names,
            "precision": self.precision,
            "checkpoint": self.checkpoint,
            "export": self.export,
            "thresholds": self.thresholds,
            "instances": self.instances,
        }
        return {
            PREFIX + key: json.dumps(values[key], sort_keys=True)
            for key in KEYS
            if key not in OPTIONAL or values[key] is not None
        }


def read_meta(props: Mapping[str, str], where: str) -> OnnxMeta:
    """The metadata of `props` (a model's metadata_props as a dict); SegpipeError naming `where` if
    it is not a segpipe export or a value is malformed."""
    if PREFIX + "format" not in props:
        raise SegpipeError(f"{where}: an ONNX model without segpipe metadata; export checkpoints with `segpipe export`")
    try:
        values = {
            key: json.loads(props.get(PREFIX + key, "null") if key in OPTIONAL else props[PREFIX + key]) for key in KEYS
        }
        if values["format"] != FORMAT:
            raise SegpipeError(f"format {values['format']!r}, expected {FORMAT!r}")
        network, contract = values["network"], values["contract"]
        padding = contract["padding"]
        if padding not in ("same", "valid"):
            raise SegpipeError(f"contract padding must be 'same' or 'valid', got {padding!r}")
        ints = {
            k: check_int(contract[k], k, "contract", minimum=1)
            for k in ("in_channels", "out_channels", "smallest_output", "output_step")
        }
        halo = check_int(contract["halo"], "halo", "contract", minimum=0)
        if padding == "same" and halo:
            raise SegpipeError(f"contract halo must be 0 for same padding, got {halo}")
        for key in ("thresholds", "instances"):
            if not isinstance(values[key], (dict, type(None))):
                raise SegpipeError(f"{key} must be an object or null, got {values[key]!r}")
        name = str(network["name"])
        return OnnxMeta(
            name,
            dict(network["config"]),
            padding,
            ints["in_channels"],
            ints["out_channels"],
            SizeRule(name, halo, ints["smallest_output"], ints["output_step"]),
            values["augment"],
            values["class_names"],
            values["precision"],
            values["checkpoint"],
            values["export"],
            values["thresholds"],
            values["instances"],
        )
    except (KeyError, TypeError, ValueError, AttributeError, SegpipeError) as exc:
        raise SegpipeError(f"{where}: malformed segpipe metadata ({type(exc).__name__}: {exc})") from exc


__all__ = ["FORMAT", "KEYS", "OPTIONAL", "PREFIX", "OnnxMeta", "SizeRule", "read_meta"]
