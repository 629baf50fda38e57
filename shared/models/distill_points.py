"""Distillation points of torchvision students (docs/spec.md §5): where channel-level losses read features.

- ResNet (18, 8): after the residual addition, before the ReLU (last block of `layer3`): the input of the
  block's ReLU on its second call.
- MobileNetV2 (and at width 0.5): after BN, before the activation: the BN of the last conv block (`features[-1][1]`).
- ShuffleNetV2 (1.0x and 0.5x): after the channel shuffle, the output of `stage3`'s last block.
- ConvNet-3: after the instance norm of the last block, before its ReLU.
- the server's teacher: E2's last feature map.
"""
from __future__ import annotations

import torch.nn as nn


class FeatureTap:
    """Registers a hook at a model's distillation point; `.value` holds the latest feature map."""

    def __init__(self, model: nn.Module, name: str):
        self.value = None
        module, mode = distill_point(model, name)
        if mode == "pre":
            self.handle = module.register_forward_pre_hook(lambda m, args: self._keep(args[0]))
        else:
            self.handle = module.register_forward_hook(lambda m, args, out: self._keep(out))

    def _keep(self, tensor):
        self.value = tensor.clone()      # torchvision's ReLUs run in place and would overwrite it

    def remove(self):
        self.handle.remove()


def distill_point(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    if name in ("resnet18", "resnet8"):
        return model.layer3[-1].relu, "pre"
    if name.startswith("mobilenet_v2"):          # every width
        return model.features[-1][1], "post"
    if name.startswith("shufflenet_v2"):         # 1.0x and 0.5x
        return model.stage3[-1], "post"
    if name in ("convnet3", "convnet3_w32"):
        return model.features[-3], "post"
    if name == "teacher":
        return model.second_encoder.body, "post"
    raise KeyError(f"no distillation point known for student '{name}'")
