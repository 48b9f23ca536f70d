"""An inference-only graph of a contract network (see `pipeline.networks`).

What helps on CPU (`segpipe bench infer` measures it; docs/benchmarks.md has the figures): batch norm
folded into the preceding convolution (eval-mode BN is an affine map per channel, so it merges into the conv's weights:
W' = W * gamma / sqrt(var + eps), b' = (b - mean) * gamma / sqrt(var + eps) + beta), channels-last
tensors (oneDNN's native NHWC layout: no reorders around every conv), in-place ReLU after a conv
(one activation tensor less to allocate and fill per layer), explicit thread settings,
optionally `torch.compile` (inductor, fixed shapes, with inductor's `freezing`: the weights become
constants, pre-packed into oneDNN's blocked layout and folded, instead of being re-laid out on every
call). The forward runs in the `precision` asked for
(`pipeline.networks.precision`: fp32, or bf16/fp16 autocast) and returns fp32 logits.
The contract facts the tiler needs (padding, halo, sizes, channels) are kept beside the graph.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pipeline.errors import SegpipeError
from pipeline.networks.precision import autocast, check_precision

if TYPE_CHECKING:
    from pipeline.inference.settings import InferenceSettings

ModelLike = nn.Module | str | os.PathLike[str]


def _first_leaf(module: nn.Module) -> tuple[nn.Module, nn.Module | None, str | None]:
    """The first module a Sequential runs, with its parent and name (the module itself otherwise)."""
    parent, name = None, None
    while isinstance(module, nn.Sequential) and len(module) > 0:
        parent, name = module, next(iter(module._modules))
        module = module._modules[name]  # type: ignore[assignment]
    return module, parent, name


def _last_leaf(module: nn.Module) -> tuple[nn.Module, nn.Module | None, str | None]:
    """The last module a Sequential runs, with its parent and name (the module itself otherwise)."""
    parent, name = None, None
    while isinstance(module, nn.Sequential) and len(module) > 0:
        parent, name = module, list(module._modules)[-1]
        module = module._modules[name]  # type: ignore[assignment]
    return module, parent, name


def fold_batch_norm(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d into that conv, in place.

    "Directly follows" means consecutive in an `nn.Sequential` (possibly nested, as in MONAI's
    `Convolution` = Sequential(conv, ADN(N, D, A))), so the conv's output feeds the BN and nothing
    else. The BN becomes an Identity. Returns the number of BN layers folded.
    """
    folded = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for left, right in zip(names, names[1:]):
            conv, conv_parent, conv_name = _last_leaf(seq._modules[left])  # type: ignore[arg-type]
            bn, bn_parent, bn_name = _first_leaf(seq._modules[right])  # type: ignore[arg-type]
            if not (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d):
                continue
            if not bn.track_running_stats or bn.running_mean is None:
                continue
            fused = fuse_conv_bn_eval(conv.eval(), bn.eval())
            (conv_parent or seq)._modules[conv_name or left] = fused
            (bn_parent or seq)._modules[bn_name or right] = nn.Identity()
            folded += 1
    return folded


_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout2d)
"""Modules that return their input itself in eval mode."""
_CREATORS = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)
"""Modules that return a new tensor."""


def _leaves(seq: nn.Sequential) -> list[nn.Module]:
    """The modules a Sequential runs, in order, nested Sequentials flattened."""
    out: list[nn.Module] = []
    for child in seq:
        out.extend(_leaves(child) if isinstance(child, nn.Sequential) else [child])
    return out


def inplace_activations(model: nn.Module) -> int:
    """Make ReLU / LeakyReLU in-place where that is safe, in place; returns how many.

    Safe: inside a chain of Sequentials the activation's input is the fresh output of the conv or
    batch norm just before it (skipping eval-mode pass-throughs), which nothing else holds. An
    activation whose input might be the chain's own input, or a view made by other code, is left.
    """
    nested = {id(c) for m in model.modules() if isinstance(m, nn.Sequential) for c in m.children()}
    changed = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential) or id(seq) in nested:
            continue
        leaves = _leaves(seq)
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, (nn.ReLU, nn.LeakyReLU)) or leaf.inplace:
                continue
            j = i - 1
            while j >= 0 and isinstance(leaves[j], _PASS_THROUGH):
                j -= 1
            if j >= 0 and isinstance(leaves[j], _CREATORS):
                leaf.inplace = True
                changed += 1
    return changed


def count_batch_norm(model: nn.Module) -> int:
    """Number of BatchNorm layers left in `model`."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def resolve_model(model: ModelLike) -> nn.Module:
    """A contract network from a module or a checkpoint path (`pipeline.networks.load_model`)."""
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, (str, os.PathLike)):
        from pipeline.networks import load_model

        return load_model(Path(model))
    raise SegpipeError(f"model must be a torch module or a checkpoint path, got {type(model).__name__}")


def recorded_preprocessing(model: ModelLike) -> dict[str, Any] | None:
    """The training preprocessing a checkpoint path records (its `augment` dict, see
    `pipeline.inference.readers.preprocessed`); None for a module or a checkpoint without one."""
    return _checkpoint_facts(model)[0]


def _checkpoint_facts(
    model: ModelLike,
) -> tuple[dict[str, Any] | None, list[str] | None, dict[str, Any] | None, dict[str, Any] | None]:
    """A checkpoint path's recorded preprocessing (`augment`), class names, validation thresholds and
    instance settings (None: a module, or not recorded)."""
    if not isinstance(model, (str, os.PathLike)):
        return None, None, None, None
    from pipeline.networks import read_checkpoint

    record = read_checkpoint(Path(model))
    augment, names, thresholds = record.get("augment"), record.get("class_names"), record.get("thresholds")
    instances = record.get("instances")
    return (
        dict(augment) if isinstance(augment, dict) else None,
        [str(n) for n in names] if isinstance(names, (list, tuple)) else None,
        dict(thresholds) if isinstance(thresholds, dict) else None,
        dict(instances) if isinstance(instances, dict) else None,
    )


@dataclass
class InferenceNetwork:
    """An eval-only copy of a contract network, optimised for inference, plus its contract facts.

    Call it with a batch (N, in_channels, H, W) float32 on any device; it returns float32 logits
    (N, out_channels, H_out, W_out) on the CPU. `padding`, `halo`, `output_size`, `input_size` and
    `valid_output_size` are the original network's (see `pipeline.networks`).
    """

    module: nn.Module
    padding: str
    halo: int
    in_channels: int
    out_channels: int
    output_size: Callable[[int], int]
    input_size: Callable[[int], int]
    valid_output_size: Callable[[int], int]
    device: torch.device
    channels_last: bool
    precision: str
    """fp32, bf16 or fp16: the forward runs under that autocast (`pipeline.networks.precision`)."""
    fixed_batch: bool
    """True when compiled: every batch is padded to the same size so the graph never recompiles, and
    calls run under inductor's `freezing` (set per call, as it compiles lazily: never process-wide,
    where it would freeze a training graph's weights too)."""
    notes: list[str] = field(default_factory=list)
    """What was done to the graph, for the summary line."""
    augment: dict[str, Any] | None = None
    """The checkpoint's recorded training preprocessing (None: a module, or no record)."""
    source: Path | None = None
    """The checkpoint file the network came from (None: a module)."""
    class_names: list[str] | None = None
    """The names of the label values the checkpoint (or ONNX metadata) records (None: not recorded)."""
    thresholds: dict[str, Any] | None = None
    """The validation thresholds the checkpoint (or ONNX metadata) records (None: not recorded; see
    `pipeline.inference.settings.resolve_threshold`)."""
    instances: dict[str, Any] | None = None
    """The instance settings chosen on validation the checkpoint (or ONNX metadata) records
    (`pipeline.training.instance_output`; None: not recorded)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.precision, self.device), _freezing(self.fixed_batch):
            out = self.module(x)
        if not isinstance(out, torch.Tensor):
            raise SegpipeError(
                f"the network returned {type(out).__name__} in eval() mode; the contract is a logits tensor"
            )
        return out.float().cpu().contiguous()


def _freezing(compiled: bool) -> ContextManager[object]:
    """Inductor's `freezing` while a compiled inference graph runs (and compiles on its first call)."""
    if not compiled:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True)


def optimize_network(
    model: ModelLike | InferenceNetwork,
    device: str | torch.device = "cpu",
    *,
    fold_bn: bool = True,
    inplace_act: bool = True,
    channels_last: bool = True,
    compile: bool = False,
    threads: int | None = None,
    precision: str = "fp32",
) -> InferenceNetwork:
    """Build the inference graph of `model` (a module, a checkpoint path, or already built).

    The caller's module is never modified (a deep copy is optimised). `threads` sets torch's
    intra-op threads (None keeps torch's default: one per physical core). A checkpoint's recorded
    training preprocessing is kept as `augment`.
    """
    if isinstance(model, InferenceNetwork):
        return model
    net = resolve_model(model)
    augment, class_names, thresholds, instances = _checkpoint_facts(model)
    for attr in ("padding", "halo", "in_channels", "out_channels", "output_size", "input_size", "valid_output_size"):
        if not hasattr(net, attr):
            raise SegpipeError(
                f"{type(net).__name__} lacks `{attr}`: inference needs a network of the "
                "pipeline.networks contract (padding, halo, in/out channels, size helpers)"
            )
    if net.padding not in ("same", "valid"):
        raise SegpipeError(f"{type(net).__name__}: padding must be 'same' or 'valid', got {net.padding!r}")
    if threads is not None:
        torch.set_num_threads(int(threads))
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SegpipeError("device 'cuda' requested but torch sees no CUDA device")
    check_precision(precision, dev, "inference settings")
    module = copy.deepcopy(net).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    notes: list[str] = []
    if fold_bn:
        n = fold_batch_norm(module)
        left = count_batch_norm(module)
        if n or left:
            notes.append(f"bn folded {n}/{n + left}")
    if inplace_act:
        n = inplace_activations(module)
        if n:
            notes.append(f"{n} in-place activations")
    module = module.to(dev)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
        notes.append("channels-last")
    if compile:
        module = torch.compile(module, dynamic=False)  # type: ignore[assignment]
        notes.append("torch.compile")
    if precision != "fp32":
        notes.append(f"{precision} autocast")
    notes.append(f"{torch.get_num_threads()} threads")
    return InferenceNetwork(
        module=module,
        padding=net.padding,
        halo=int(net.halo),
        in_channels=int(net.in_channels),
        out_channels=int(net.out_channels),
        output_size=net.output_size,
        input_size=net.input_size,
        valid_output_size=net.valid_output_size,
        device=dev,
        channels_last=channels_last,
        precision=precision,
        fixed_batch=compile,
        notes=notes,
        augment=augment,
        source=Path(model) if isinstance(model, (str, os.PathLike)) else None,
        class_names=class_names,
        thresholds=thresholds,
        instances=instances,
    )


def torch_network(model: ModelLike | InferenceNetwork, settings: InferenceSettings) -> InferenceNetwork:
    """The torch backend: `optimize_network` with the graph settings of `settings` (an
    InferenceNetwork passes through). A .onnx file runs on ONNX Runtime (`backends.select`)."""
    if isinstance(model, (str, os.PathLike)) and Path(model).suffix.lower() == ".onnx":
        raise SegpipeError(
            f"{model}: an ONNX model runs on ONNX Runtime; build it with "
            "pipeline.inference.inference_network(path, settings)"
        )
    return optimize_network(
        model,
        settings.device,
        fold_bn=settings.fold_batch_norm,
        inplace_act=settings.inplace_activations,
        channels_last=settings.channels_last,
        compile=settings.compile,
        threads=settings.threads,
        precision=settings.precision,
    )
