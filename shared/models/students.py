"""Student / evaluator networks, keyed by name.

`convnet3` is the dataset-distillation standard evaluator (DC/DSA/DM/IDC): 3 x [conv3x3(128),
instance norm, ReLU, avg-pool 2], then a linear classifier, so our numbers compare with published
tables. torchvision students are adapted to small single-channel inputs (stride-1 stem, no max-pool).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from shared.registry import Registry

STUDENTS: Registry = Registry("student model")


class ConvNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 128, depth: int = 3, image_size: int = 32):
        super().__init__()
        layers, c = [], in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(width, width, affine=True),
                       nn.ReLU(), nn.AvgPool2d(2)]
            c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * (image_size // 2 ** depth) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


@STUDENTS.register("convnet3")
def convnet3(in_channels: int, num_classes: int, image_size: int = 32) -> nn.Module:
    return ConvNet(in_channels, num_classes, 128, 3, image_size)


@STUDENTS.register("convnet3_w32")
def convnet3_w32(in_channels: int, num_classes: int, image_size: int = 32) -> nn.Module:
    """ConvNet-3 at width 32: a cheap student for CPU tests and shadow models."""
    return ConvNet(in_channels, num_classes, 32, 3, image_size)


@STUDENTS.register("resnet18")
def resnet18(in_channels: int, num_classes: int, image_size: int = 32) -> nn.Module:
    net = torchvision.models.resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    return net


@STUDENTS.register("resnet8")
def resnet8(in_channels: int, num_classes: int, image_size: int = 32) -> nn.Module:
    """ResNet-8 (CIFAR ResNets of He et al. 2016: a 3x3 stem, then one basic block per stage at widths
    16 / 32 / 64): the small student of the KD literature (mdistiller's resnet8)."""
    net = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    net.conv1, net.bn1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
    net.maxpool = nn.Identity()
    net.inplanes = 16
    net.layer1, net.layer2 = net._make_layer(torchvision.models.resnet.BasicBlock, 16, 1), \
        net._make_layer(torchvision.models.resnet.BasicBlock, 32, 1, stride=2)
    net.layer3 = net._make_layer(torchvision.models.resnet.BasicBlock, 64, 1, stride=2)
    net.layer4 = nn.Identity()
    net.fc = nn.Linear(64, num_classes)
    return net


def _mobilenet_v2(in_channels: int, num_classes: int, width_mult: float) -> nn.Module:
    net = torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=width_mult)
    stem = net.features[0][0]
    net.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, 1, 1, bias=False)
    return net


@STUDENTS.register("mobilenet_v2")
def mobilenet_v2(in_channels: int, num_classes: int, image_size: int = 32) -> nn.Module:
    return _mobilenet_v2(in_channels, num_classes, 1.0)


@STUDENTS.register("mobilenet_v2_w05")
def mobilenet_v2_w05(in_channels: int, num_classes: int, image_size: int = 32) -> nn.Module:
    """MobileNetV2 at width multiplier 0.5 (Sandler et al. 2018): a reduced-width student that trains on a CPU."""
    return _mobilenet_v2(in_channels, num_classes, 0.5)


def _shufflenet_v2(in_channels: int, num_classes: int, build) -> nn.Module:
    net = build(num_classes=num_classes)
    net.conv1[0] = nn.Conv2d(in_channels, net.conv1[0].out_channels, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    return net


@STUDENTS.register("shufflenet_v2")
def shufflenet_v2(in_channels: int, num_classes: int, image_size: int = 32) -> nn.Module:
    return _shufflenet_v2(in_channels, num_classes, torchvision.models.shufflenet_v2_x1_0)


@STUDENTS.register("shufflenet_v2_x05")
def shufflenet_v2_x05(in_channels: int, num_classes: int, image_size: int = 32) -> nn.Module:
    """ShuffleNetV2 0.5x (Ma et al. 2018): the reduced-width student of the KD literature's tables."""
    return _shufflenet_v2(in_channels, num_classes, torchvision.models.shufflenet_v2_x0_5)


class EnsembleConvNet(nn.Module):
    """`members` independent ConvNets computed side by side: grouped convolutions (one group per member),
    instance norm (per channel, so per member) and one linear head per member. Member m is initialised and
    trained exactly as a lone ConvNet would be; its input is channel group m of (B, members * C, S, S), and
    its logits are row m of the (members, B, K) output. Many evaluators then cost one pass on a GPU."""

    def __init__(self, members: int, in_channels: int = 1, num_classes: int = 10, width: int = 128, depth: int = 3,
                 image_size: int = 32):
        super().__init__()
        self.members, self.num_classes = members, num_classes
        layers, c = [], in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(members * c, members * width, 3, padding=1, groups=members),
                       nn.GroupNorm(members * width, members * width, affine=True), nn.ReLU(), nn.AvgPool2d(2)]
            c = width
        self.features = nn.Sequential(*layers)
        feat = width * (image_size // 2 ** depth) ** 2
        heads = [nn.Linear(feat, num_classes) for _ in range(members)]
        self.weight = nn.Parameter(torch.stack([h.weight.detach() for h in heads]))       # (M, K, F)
        self.bias = nn.Parameter(torch.stack([h.bias.detach() for h in heads]))           # (M, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, members * C, S, S) -> logits (members, B, K)."""
        h = self.features(x)
        h = h.view(h.shape[0], self.members, -1).transpose(0, 1)                           # (M, B, F)
        return torch.baddbmm(self.bias[:, None, :], h, self.weight.transpose(1, 2))


def build_student(name: str, in_channels: int, num_classes: int, image_size: int = 32) -> nn.Module:
    """The named network; `.arch` keeps its name, which locates its distillation point when it teaches."""
    net = STUDENTS[name](in_channels, num_classes, image_size)
    net.arch = name
    return net
