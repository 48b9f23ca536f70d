"""The U-Net family behind one registry: `build_network`, `save_checkpoint`, `load_model`.

Modules: `registry` (name -> builder and config defaults, `register_network`, `build_network`),
`presets` (`network_config`: a network's config in a preset of `configs/networks.yaml`),
`checkpoint` (`save_checkpoint`, `read_checkpoint`, `load_model`), `common` (the contract base class
`SegmentationNetwork`), `precision` (fp32 / bf16 / fp16) and one file per network.

Networks (one file each, written from the papers):
    "unet"    U-Net, Ronneberger et al. 2015           (`pipeline.networks.unet.UNet`)
    "unetpp"  UNet++, Zhou et al. 2018                 (`pipeline.networks.unetpp.UNetPlusPlus`)
    "u2net"   U2-Net, Qin et al. 2020, full (44.0 M)   (`pipeline.networks.u2net.U2Net`)
    "u2netp"  U2-Net-lite (1.13 M)                     (`pipeline.networks.u2net.U2Net(lite=True)`)

A built-in network is its file plus one line in the registry table; `register_network` adds a
network at run time (e.g. one defined in a user's code). Everything downstream reads the contract
below, never a network's name.

Config keys (defaults = the papers' settings; `configs/networks.yaml` holds the presets, and a
network a preset does not list runs with its defaults):
    unet:   padding ("valid"|"same"), base_width, depth, batch_norm, dropout,
            upsampling ("transposed"|"bilinear"), widths (null or one width per level)
    unetpp: base_width, depth, batch_norm, dropout, deep_supervision, mode ("accurate"|"fast"),
            prune_level (1..depth, default depth), widths (null or one width per level)
    u2net, u2netp: none (Table 1 fixes them)

Output contract (all networks; 2D, input (N, in_channels, H, W)):
    * train() mode: forward returns `(main_logits, [aux_logits, ...])`, every tensor
      (N, out_channels, H_out, W_out). aux is empty for U-Net, the deep-supervision heads
      X^{0,1}..X^{0,p-1} for UNet++ (main = X^{0,p}), the six side outputs S1..S6 for U2-Net
      (main = the fused output).
    * eval() mode: forward returns the main logits tensor only, (N, out_channels, H_out, W_out);
      for UNet++ after the mode choice ("fast": head X^{0,p}; "accurate": the heads' probabilities
      averaged, returned as logits: logit(mean sigmoid) for one channel, log(mean softmax) for more).
    * Logits, never probabilities: the loss / post-processing applies sigmoid (1 channel) or
      softmax (more).
    * Sizes per spatial axis: H_out = `net.output_size(H)`; `net.padding` is "valid" (U-Net paper,
      H_out = H - 2 * net.halo) or "same" (H_out = H, halo 0); `net.input_size(H_out)` inverts it
      and `net.valid_output_size(n)` rounds n up to a reachable output size. Sizes the network
      cannot take raise SegpipeError.
    * Heads: `net.head_names()` names the train() outputs (main first),
      `net.deep_supervision_mode` says how the loss combines them ("mean" or "sum") and
      `net.head_views()` gives the networks whose outputs `segpipe evaluate` scores per head.
    * Load-time settings: `net.load_overrides` names the config keys `load_model(path, **overrides)`
      may change on a trained network (UNet++: mode, prune_level; none for the others) and
      `net.with_overrides(**overrides)` applies them.

Checkpoints (`save_checkpoint` / `load_model`, format "segpipe-checkpoint/1") describe themselves:
loading rebuilds the network from the file alone, with `torch.load(weights_only=True)` (see
`pipeline.networks.checkpoint`).
"""

from __future__ import annotations

from pipeline.networks.checkpoint import (
    CHECKPOINT_FORMAT,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from pipeline.networks.common import HeadView, SegmentationNetwork
from pipeline.networks.presets import network_config
from pipeline.networks.registry import (
    build_network,
    config_keys,
    network_names,
    register_network,
)
from pipeline.networks.u2net import U2Net
from pipeline.networks.unet import (
    UNet,
    unet_halo,
    unet_input_size,
    unet_output_size,
    unet_valid_output_size,
)
from pipeline.networks.unetpp import UNetPlusPlus, average_heads

__all__ = [
    "CHECKPOINT_FORMAT",
    "HeadView",
    "SegmentationNetwork",
    "U2Net",
    "UNet",
    "UNetPlusPlus",
    "average_heads",
    "build_network",
    "config_keys",
    "load_model",
    "network_config",
    "network_names",
    "read_checkpoint",
    "register_network",
    "save_checkpoint",
    "unet_halo",
    "unet_input_size",
    "unet_output_size",
    "unet_valid_output_size",
]
