"""A small MBConv network for CIFAR-10.

MBConv is the inverted-residual block of MobileNetV2 (Sandler et al., CVPR 2018) as used in the
ProxylessNAS search space (Cai, Zhu, Han, "ProxylessNAS: Direct Neural Architecture Search on
Target Task and Hardware", ICLR 2019), with expand ratio in {3, 6} and kernel size in {3, 5, 7},
plus optional squeeze-and-excitation (Hu, Shen, Sun, "Squeeze-and-Excitation Networks", CVPR
2018) as in MnasNet / EfficientNet: x * sigmoid(fc2(relu(fc1(avgpool(x))))).

Block: expand 1x1-bn-relu6, depthwise kxk-bn-relu6, [SE], project 1x1-bn; residual add when the
stride is 1 and channels match. Stem conv3x3-bn-relu6, final 1x1 conv-bn-relu6, pool, linear.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_CLASSES = 10

# (expand ratio, kernel size, output channels, stride, squeeze-excite)
BLOCKS = [
    (3, 3, 16, 1, False),
    (3, 3, 24, 2, False),
    (6, 5, 24, 1, True),
    (3, 7, 40, 2, True),
    (6, 3, 40, 1, False),
    (6, 5, 64, 2, True),
    (3, 7, 64, 1, True),
]


class SqueezeExcite(nn.Module):
    def __init__(self, channels, reduction=4):
        super().__init__()
        hidden = max(8, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)  # acts on a fresh tensor, so in place is safe
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        s = self.fc2(self.relu(self.fc1(s)))
        return x * torch.sigmoid(s)


class MBConv(nn.Module):
    def __init__(self, in_ch, out_ch, expand_ratio, kernel_size, stride, se):
        super().__init__()
        mid = in_ch * expand_ratio
        self.use_residual = stride == 1 and in_ch == out_ch
        self.expand = nn.Sequential(
            nn.Conv2d(in_ch, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(inplace=True))
        self.depthwise = nn.Sequential(
            nn.Conv2d(mid, mid, kernel_size, stride, kernel_size // 2, groups=mid, bias=False),
            nn.BatchNorm2d(mid), nn.ReLU6(inplace=True))
        self.se = SqueezeExcite(mid) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(mid, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        out = self.project(self.se(self.depthwise(self.expand(x))))
        if self.use_residual:  # fixed at construction, not a tensor value
            out = out + x
        return out


class MBConvNet(nn.Module):
    def __init__(self, blocks=BLOCKS, stem_channels=16, head_channels=256, num_classes=NUM_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(stem_channels), nn.ReLU6(inplace=True))
        layers, in_ch = [], stem_channels
        for expand, k, out_ch, stride, se in blocks:
            layers.append(MBConv(in_ch, out_ch, expand, k, stride, se))
            in_ch = out_ch
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Conv2d(in_ch, head_channels, 1, bias=False),
            nn.BatchNorm2d(head_channels), nn.ReLU6(inplace=True))
        self.classifier = nn.Linear(head_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def build_model():
    return MBConvNet()


def example_input():
    return torch.randn(2, 3, 32, 32)
