"""MobileNetV2 for CIFAR-10.

Sandler, Howard, Zhu, Zhmoginov, Chen, "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
CVPR 2018 (Table 2 configuration). CIFAR variant as in common ports: the stem conv has stride 1
and the first two stride-2 stages of the ImageNet table (24 and 32 channels) use stride 1, so a
32x32 input is downsampled 4x (to 8x8) before global pooling.

Inverted residual block: expand 1x1-bn-relu6 (omitted when t=1), depthwise 3x3-bn-relu6, project
1x1-bn (linear bottleneck); residual add when stride is 1 and input and output channels match.
``width_mult`` defaults to 0.5 to keep the example cheap.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_CLASSES = 10

# (expand ratio t, output channels c, repeats n, stride s); CIFAR strides.
CIFAR_CONFIG = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 on ImageNet
    (6, 32, 3, 1),  # stride 2 on ImageNet
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def _make_divisible(v, divisor=8):
    """Round channels to a multiple of ``divisor``, never dropping more than 10% (as in the paper's code)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def conv_bn_relu6(in_ch, out_ch, kernel_size=3, stride=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, in_ch, out_ch, stride, expand_ratio):
        super().__init__()
        hidden = int(round(in_ch * expand_ratio))
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers = []
        if expand_ratio != 1:
            layers.append(conv_bn_relu6(in_ch, hidden, kernel_size=1))
        layers += [
            conv_bn_relu6(hidden, hidden, kernel_size=3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:  # fixed at construction, not a tensor value
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, width_mult=0.5, num_classes=NUM_CLASSES, config=CIFAR_CONFIG):
        super().__init__()
        in_ch = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features = [conv_bn_relu6(3, in_ch, kernel_size=3, stride=1)]
        for t, c, n, s in config:
            out_ch = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        features.append(conv_bn_relu6(in_ch, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def build_model(width_mult=0.5):
    return MobileNetV2(width_mult=width_mult)


def example_input():
    return torch.randn(2, 3, 32, 32)
