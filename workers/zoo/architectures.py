"""The zoo's networks, built from JSON-able config dicts.

The config travels in the manifest (``Variant.arch``), so the cloud worker
rebuilds a large variant with ``build_network(variant.arch)`` and then loads its
weights with ``load_state_dict(torch.load(path, weights_only=True))``: nothing
pickled, no code in the model file. Two kinds:

``{"kind": "mlp", "input_shape": [1, 12, 12], "hidden": [32], "num_classes": 10}``
    Flatten, then Linear + ReLU per hidden width, then a Linear classifier.

``{"kind": "cnn", "input_shape": [1, 16, 16], "stages": [16, 32], "convs_per_stage": 2,
"head": 64, "num_classes": 8, "dropout": 0.1}``
    Per stage: ``convs_per_stage`` x (3x3 conv, BatchNorm, ReLU), then 2x2 max-pool.
    Then flatten, a hidden Linear of width ``head`` (0: none) and the classifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def build_network(arch: dict[str, Any]) -> nn.Module:
    kind = arch["kind"]
    in_shape = tuple(int(d) for d in arch["input_shape"])
    classes = int(arch["num_classes"])
    if kind == "mlp":
        return _mlp(in_shape, [int(h) for h in arch["hidden"]], classes)
    if kind == "cnn":
        return _cnn(
            in_shape,
            stages=[int(c) for c in arch["stages"]],
            convs_per_stage=int(arch.get("convs_per_stage", 1)),
            head=int(arch.get("head", 0)),
            classes=classes,
            dropout=float(arch.get("dropout", 0.0)),
        )
    raise ValueError(f"unknown network kind {kind!r}")


def _mlp(in_shape: tuple[int, ...], hidden: Sequence[int], classes: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = _numel(in_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def _cnn(
    in_shape: tuple[int, ...],
    stages: Sequence[int],
    convs_per_stage: int,
    head: int,
    classes: int,
    dropout: float,
) -> nn.Module:
    channels, height, width = in_shape
    layers: list[nn.Module] = []
    for out_channels in stages:
        for _ in range(convs_per_stage):
            layers += [
                # No conv bias: the BatchNorm right after has one.
                nn.Conv2d(channels, out_channels, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(),
            ]
            channels = out_channels
        layers.append(nn.MaxPool2d(2))
        height, width = height // 2, width // 2
    layers.append(nn.Flatten())
    features = channels * height * width
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    if head > 0:
        layers += [nn.Linear(features, head), nn.ReLU()]
        features = head
    layers.append(nn.Linear(features, classes))
    return nn.Sequential(*layers)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs for one sample: 2 x the multiply-accumulates of every conv and linear layer.

    BatchNorm folds into the conv at inference, and ReLU / pooling are a rounding
    error next to the MACs, so they are not counted.
    """
    total = 0

    def on_conv(module: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Conv2d)
        kh, kw = module.kernel_size
        per_output = (module.in_channels // module.groups) * kh * kw
        total += 2 * per_output * out[0].numel()

    def on_linear(module: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Linear)
        total += 2 * module.in_features * module.out_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(on_conv))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(on_linear))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total
