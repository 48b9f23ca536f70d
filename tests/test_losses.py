"""Losses: U-Net eq. 1 against a hand loop, soft Dice by hand and against MONAI, deep supervision."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.losses import DiceLoss

from pipeline.errors import SegpipeError
from pipeline.networks import build_network
from pipeline.training.losses import LOSS_DEFAULTS, SegmentationLoss, SoftDiceLoss, weighted_cross_entropy
from pipeline.training.supervision import DeepSupervisionLoss, build_loss

torch.set_num_threads(1)


def _data(n: int = 2, c: int = 3, h: int = 4, w: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, max(c, 2), (n, 1, h, w), generator=g)
    weight = 1 + 9 * torch.rand(n, 1, h, w, generator=g, dtype=torch.float64)
    mask = torch.rand(n, 1, h, w, generator=g) > 0.3
    return logits, target, weight, mask


def _eq1_hand(logits, target, weight, mask, normalization):
    """U-Net eq. 1 pixel by pixel: E = -sum w(x) log p_l(x)(x), then normalised."""
    n, c, h, w = logits.shape
    energy = weights = pixels = 0.0
    for i in range(n):
        for y in range(h):
            for x in range(w):
                if mask is not None and not mask[i, 0, y, x]:
                    continue
                z = [float(logits[i, k, y, x]) for k in range(c)]
                label = int(target[i, 0, y, x])
                if c == 1:  # sigmoid: p_1 = 1 / (1 + e^-z), p_0 = 1 - p_1
                    p1 = 1 / (1 + math.exp(-z[0]))
                    p = p1 if label == 1 else 1 - p1
                else:
                    p = math.exp(z[label]) / sum(math.exp(v) for v in z)
                wx = 1.0 if weight is None else float(weight[i, 0, y, x])
                energy += -wx * math.log(p)
                weights += wx
                pixels += 1
    return energy / (pixels if normalization == "pixels" else weights)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("normalization", ["pixels", "weights"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_weighted_ce_equals_hand_loop_of_eq1(channels, normalization, use_mask):
    logits, target, weight, mask = _data(c=channels)
    mask = mask if use_mask else None
    got = weighted_cross_entropy(logits, target, weight, mask, normalization)
    assert got.item() == pytest.approx(_eq1_hand(logits, target, weight, mask, normalization), rel=1e-10)


def test_weighted_ce_without_weights_is_plain_cross_entropy():
    logits, target, _, _ = _data(c=3)
    assert weighted_cross_entropy(logits, target).item() == pytest.approx(
        F.cross_entropy(logits, target[:, 0]).item(), rel=1e-12
    )
    # Binary with one channel equals a 2-class softmax on logits (0, z).
    z, t, w, m = _data(c=1)
    two = torch.cat([torch.zeros_like(z), z], dim=1)
    for normalization in ("pixels", "weights"):
        assert weighted_cross_entropy(z, t, w, m, normalization).item() == pytest.approx(
            weighted_cross_entropy(two, t, w, m, normalization).item(), rel=1e-12
        )


def test_weight_scales_pixels():
    logits, target, _, _ = _data(c=2)
    base = weighted_cross_entropy(logits, target)
    assert weighted_cross_entropy(logits, target, torch.full_like(logits[:, :1], 3.0)).item() == pytest.approx(
        3 * base.item()
    )
    assert weighted_cross_entropy(
        logits, target, torch.full_like(logits[:, :1], 3.0), normalization="weights"
    ).item() == pytest.approx(base.item())


def test_target_forms_and_errors():
    logits, target, weight, mask = _data(c=3)
    ref = weighted_cross_entropy(logits, target, weight, mask)
    assert torch.equal(weighted_cross_entropy(logits, target[:, 0], weight[:, 0], mask[:, 0]), ref)
    assert torch.equal(weighted_cross_entropy(logits, target.float(), weight, mask), ref)
    with pytest.raises(SegpipeError, match="0..2"):
        weighted_cross_entropy(logits, target + 1)
    with pytest.raises(SegpipeError, match="non-integer"):
        weighted_cross_entropy(logits, target.float() + 0.5)
    with pytest.raises(SegpipeError, match="target has shape"):
        weighted_cross_entropy(logits, target[..., :3])
    with pytest.raises(SegpipeError, match="weight map has shape"):
        weighted_cross_entropy(logits, target, weight[:1])
    with pytest.raises(SegpipeError, match="0..1"):
        weighted_cross_entropy(logits[:, :1], torch.full_like(target, 2))
    with pytest.raises(SegpipeError, match="ce_normalization"):
        weighted_cross_entropy(logits, target, normalization="sum")


def test_empty_mask_gives_zero_loss_and_finite_gradients():
    logits, target, weight, mask = _data(c=3)
    logits.requires_grad_(True)
    empty = torch.zeros_like(mask)
    loss = SegmentationLoss()(logits, target, weight, empty)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(logits.grad).all() and not logits.grad.any()


def test_mask_equals_crop():
    """Pixels outside the mask do not matter: a rectangular mask equals cropping (CE and Dice)."""
    logits, target, weight, _ = _data(n=2, c=3, h=6, w=6)
    mask = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    mask[..., 1:4, 2:6] = True
    crop = (..., slice(1, 4), slice(2, 6))
    assert weighted_cross_entropy(logits, target, weight, mask).item() == pytest.approx(
        weighted_cross_entropy(logits[crop], target[crop], weight[crop]).item(), rel=1e-12
    )
    for include_background in (True, False):
        dice = SoftDiceLoss(include_background=include_background, batch=False)
        monai = DiceLoss(include_background=include_background, softmax=True, to_onehot_y=True)
        assert dice(logits, target, mask).item() == pytest.approx(monai(logits[crop], target[crop]).item(), rel=1e-9)


def _dice_hand(prob, onehot, smooth=1e-5):
    """1 - (2 sum p g + s) / (sum p + sum g + s), sums over batch and pixels, mean over channels."""
    dims = (0, 2, 3)
    num = 2 * (prob * onehot).sum(dims) + smooth
    den = prob.sum(dims) + onehot.sum(dims) + smooth
    return (1 - num / den).mean().item()


def test_soft_dice_by_hand():
    z, t, _, _ = _data(c=1)
    assert SoftDiceLoss()(z, t).item() == pytest.approx(_dice_hand(torch.sigmoid(z), t.double()), rel=1e-12)
    logits, target, _, _ = _data(c=3)
    prob = torch.softmax(logits, 1)
    onehot = F.one_hot(target[:, 0], 3).permute(0, 3, 1, 2).double()
    assert SoftDiceLoss(include_background=True)(logits, target).item() == pytest.approx(
        _dice_hand(prob, onehot), rel=1e-12
    )
    assert SoftDiceLoss(include_background=False)(logits, target).item() == pytest.approx(
        _dice_hand(prob[:, 1:], onehot[:, 1:]), rel=1e-12
    )


def test_soft_dice_empty_and_perfect():
    target = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    sure_background = torch.full((2, 1, 4, 4), -50.0)
    # Empty ground truth and (almost) empty prediction: no loss; a confident wrong prediction: ~1.
    assert SoftDiceLoss()(sure_background, target).item() == pytest.approx(0.0, abs=1e-3)
    assert SoftDiceLoss()(-sure_background, target).item() == pytest.approx(1.0, abs=1e-3)
    target[:, :, 1:3, 1:3] = 1
    perfect = torch.where(target.bool(), 50.0, -50.0).float()
    assert SoftDiceLoss()(perfect, target).item() == pytest.approx(0.0, abs=1e-6)


def test_segmentation_loss_is_weighted_sum():
    logits, target, weight, mask = _data(c=2)
    loss = SegmentationLoss(ce_weight=0.7, dice_weight=2.0)
    terms = loss.terms(logits, target, weight, mask)
    assert terms["ce"].item() == pytest.approx(weighted_cross_entropy(logits, target, weight, mask).item())
    assert terms["dice"].item() == pytest.approx(SoftDiceLoss()(logits, target, mask).item())
    assert terms["loss"].item() == pytest.approx(0.7 * terms["ce"].item() + 2.0 * terms["dice"].item())
    ce_only = SegmentationLoss(dice_weight=0).terms(logits, target, weight, mask)
    assert set(ce_only) == {"ce", "loss"} and torch.equal(ce_only["ce"], ce_only["loss"])
    with pytest.raises(SegpipeError):
        SegmentationLoss(ce_weight=0, dice_weight=0)


def _heads(n_aux: int, c: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, 6, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(n_aux + 1)]


def test_unetpp_averages_heads_u2net_sums_them():
    _, target, weight, mask = _data(c=2, h=6, w=6)
    per_head = SegmentationLoss()
    heads = _heads(3)
    single = [per_head(h, target, weight, mask).item() for h in heads]
    unetpp = build_loss(network=_net("unetpp"))
    assert unetpp.mode == "mean"
    assert unetpp((heads[0], heads[1:]), target, weight, mask).item() == pytest.approx(sum(single) / 4)
    heads = _heads(6)
    single = [per_head(h, target, weight, mask).item() for h in heads]
    u2net = build_loss(network=_net("u2netp"))
    assert u2net.mode == "sum" and build_loss(network=_net("u2net")).mode == "sum"
    total = u2net((heads[0], heads[1:]), target, weight, mask)
    assert total.item() == pytest.approx(sum(single))
    total.backward()
    assert all(h.grad is not None and torch.isfinite(h.grad).all() and h.grad.any() for h in heads)


def test_head_weights_main_mode_and_plain_outputs():
    _, target, _, _ = _data(c=2, h=6, w=6)
    heads = _heads(2)
    single = [SegmentationLoss()(h, target).item() for h in heads]
    weights = [2.0, 1.0, 0.5]
    output = (heads[0], heads[1:])
    assert build_loss({"head_weights": weights, "deep_supervision": "sum"})(output, target).item() == pytest.approx(
        sum(w * head_loss for w, head_loss in zip(weights, single))
    )
    assert build_loss({"head_weights": weights})(output, target).item() == pytest.approx(
        sum(w * head_loss for w, head_loss in zip(weights, single)) / sum(weights)
    )
    main_only = build_loss({"deep_supervision": "main"}, network=_net("unetpp"))
    loss = main_only(output, target)
    assert loss.item() == pytest.approx(single[0])
    loss.backward()
    assert heads[1].grad is None and heads[0].grad is not None
    # eval() output (a tensor) and U-Net's (main, []) give the main head's loss in every mode.
    for name in ("unet", "unetpp", "u2netp"):
        assert build_loss(network=_net(name))(heads[0], target).item() == pytest.approx(single[0])
        assert build_loss(network=_net(name))((heads[0], []), target).item() == pytest.approx(single[0])
    with pytest.raises(SegpipeError, match="3 entries but the network output has 4 heads"):
        build_loss({"head_weights": weights})((heads[0], heads), target)
    with pytest.raises(SegpipeError, match=r"head_weights has 3 entries, network u2netp has 7 heads \['fused', 'S1'"):
        build_loss({"head_weights": weights}, network=_net("u2netp"))
    with pytest.raises(SegpipeError, match="auxiliary head 1 has shape"):
        build_loss(network=_net("unetpp"))((heads[0], [heads[1][..., :4, :4]]), target)
    with pytest.raises(SegpipeError, match="network output"):
        DeepSupervisionLoss(SegmentationLoss())([heads[0]], target)


def test_build_loss_config_validation():
    assert set(LOSS_DEFAULTS) == {
        "ce_weight",
        "dice_weight",
        "ce_normalization",
        "dice_include_background",
        "dice_batch",
        "dice_smooth",
        "deep_supervision",
        "head_weights",
    }
    with pytest.raises(
        SegpipeError,
        match=r"configs/x.yaml: loss: unknown keys \['dice_wieght'\] "
        r"\('dice_wieght': did you mean 'dice_weight'\?\)",
    ):
        build_loss({"dice_wieght": 1}, source="configs/x.yaml: loss")
    bad = [
        {"ce_weight": -1},
        {"ce_weight": "1"},
        {"ce_weight": 0, "dice_weight": 0},
        {"ce_normalization": "sum"},
        {"dice_batch": "yes"},
        {"dice_smooth": 0},
        {"deep_supervision": "max"},
        {"head_weights": [0, 0]},
        {"head_weights": [1, -1]},
        {"head_weights": "1"},
        {"deep_supervision": "main", "head_weights": [1, 1]},
        {"ce_weight": float("nan")},
        {"dice_smooth": float("inf")},
    ]
    for config in bad:
        with pytest.raises(SegpipeError):
            build_loss(config, network=_net("unetpp"))
    assert build_loss({"deep_supervision": "sum"}, network=_net("unetpp")).mode == "sum"  # the config wins


def _net(name: str):
    """A small instance of a registry network: the loss reads only its heads contract."""
    return build_network(name, 1, 1, **({"base_width": 2} if name in ("unet", "unetpp") else {}))


def test_gradients_finite_with_extreme_logits_and_gradcheck():
    logits, target, weight, mask = _data(c=3)
    extreme = (logits.sign() * 200).requires_grad_(True)
    loss = SegmentationLoss()(extreme, target, weight, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(extreme.grad).all()
    z, t, w, m = _data(n=1, c=1, h=3, w=3)
    for c_logits, c_target in ((z, t), (logits[:1, :, :3, :3], target[:1, :, :3, :3])):
        x = c_logits.clone().requires_grad_(True)
        loss_fn = SegmentationLoss(ce_weight=0.5)
        assert torch.autograd.gradcheck(lambda v: loss_fn(v, c_target, w, m), (x,))


def test_metatensor_inputs():
    logits, target, weight, mask = _data(c=2)
    ref = SegmentationLoss()(logits, target, weight, mask)
    got = SegmentationLoss()(MetaTensor(logits), MetaTensor(target.float()), MetaTensor(weight), MetaTensor(mask))
    assert type(got) is torch.Tensor and got.item() == pytest.approx(ref.item())


def test_half_precision_logits_keep_exact_pixel_counts():
    """bf16 logits with and without a large mask: sums and pixel counts are not rounded to bf16."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 2, 300, 300, generator=g)
    target = torch.randint(0, 2, (1, 1, 300, 300), generator=g)
    mask = torch.ones(1, 1, 300, 300, dtype=torch.bool)
    for m in (mask, None):
        ref = weighted_cross_entropy(logits.bfloat16().float(), target, mask=m)
        got = weighted_cross_entropy(logits.bfloat16(), target, mask=m)
        assert got.item() == pytest.approx(ref.item(), rel=1e-3)
