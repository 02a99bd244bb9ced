"""Small hand-written models, each exercising one channel-mapping situation."""
import math

import torch
import torch.nn.functional as F
from torch import nn


class LeNet(nn.Module):
    """Hard-coded ``view(-1, 16*5*5)`` into a Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, 16 * 5 * 5)
        return self.fc2(F.relu(self.fc1(x)))


class ResidualChain(nn.Module):
    """Three residual adds on one stream, one through a projection."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1))
                                     for _ in range(3)])
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.bn(self.stem(x))
        for b in self.blocks:
            x = x + b(x)
        return self.head(x.mean((2, 3)))


class Branches(nn.Module):
    """Concat of three branches, then a conv reading all of them; a slice of the concat."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 12, 3, padding=1)
        self.c = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(24)
        self.mix = nn.Conv2d(24, 10, 1)
        self.side = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x), self.c(x)], dim=1)
        y = F.relu(self.bn(y))
        s = self.side(y[:, :8])  # the first branch's channels, by a hard-coded slice
        z = torch.cat([self.mix(y), s], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


class SEBlock(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(fc(pool(x)))``."""

    def __init__(self, c=16):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc1 = nn.Conv2d(c, 4, 1)
        self.fc2 = nn.Conv2d(4, c, 1)
        self.out = nn.Conv2d(c, 8, 1)

    def forward(self, x):
        x = F.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.out(x * s)


class GroupedDepthwise(nn.Module):
    """Grouped conv (4 groups) and depthwise conv with channel multiplier 2."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 1)
        self.grouped = nn.Conv2d(16, 24, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(24, 48, 3, padding=1, groups=24)
        self.bn = nn.BatchNorm2d(48)
        self.pw = nn.Conv2d(48, 8, 1)

    def forward(self, x):
        return self.pw(F.relu(self.bn(self.dw(F.relu(self.grouped(self.conv1(x)))))))


class SplitChunk(nn.Module):
    """``torch.split`` with explicit sizes and ``chunk``: each piece feeds its own consumer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 20, 1)
        self.p = nn.Conv2d(8, 4, 1)
        self.q = nn.Conv2d(12, 4, 1)
        self.conv2 = nn.Conv2d(8, 16, 1)
        self.r = nn.Conv2d(8, 4, 1)
        self.s = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a, b = torch.split(self.conv(x), [8, 12], dim=1)
        c, d = self.conv2(a).chunk(2, dim=1)
        return self.p(a) + self.q(b) + self.r(c) + self.s(d)


class SharedModule(nn.Module):
    """One conv called twice (shared weights)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a = self.shared(F.relu(self.conv1(x)))
        b = self.shared(F.relu(self.conv2(x)))
        return self.head(a + b)


class ChannelsLast(nn.Module):
    """ConvNeXt-style: permute to channels-last, Linear over channels, permute back, layer scale."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 12)
        self.scale = nn.Parameter(torch.rand(12, 1, 1) + 0.5)
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        x = self.conv(x)
        y = x.permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(y)))
        y = y.permute(0, 3, 1, 2)
        return self.head(x + self.scale * y)


class Shuffle(nn.Module):
    """Channel shuffle with literal group sizes: view -> transpose -> view."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        n, _, h, w = y.shape
        y = y.view(n, 2, 8, h, w).transpose(1, 2).contiguous().view(n, 16, h, w)
        return self.head(y)


class ReshapeHardcoded(nn.Module):
    """``reshape(b, 32, 4, 4)`` and LayerNorm/GroupNorm on channels (prunable, not exact)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.gn = nn.GroupNorm(4, 32)
        self.fc = nn.Linear(32 * 4 * 4, 6)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.gn(self.conv(x)), 4)
        return self.fc(x.reshape(x.shape[0], 32 * 16))


class SoftmaxOverChannels(nn.Module):
    """Softmax across channels mixes them: not prunable."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.softmax(self.conv(x), dim=1))


class ChannelReduction(nn.Module):
    """A mean over the channel axis: not prunable; a second branch stays prunable."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.other = nn.Conv2d(3, 6, 1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        attention = self.conv(x).mean(dim=1, keepdim=True)
        return self.head(F.relu(self.other(x)) * attention)


class Untraceable(nn.Module):
    """Data-dependent control flow inside a submodule."""

    class Gate(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.gate = Untraceable.Gate()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.gate(self.conv(x)))


class SizeFromOtherTensor(nn.Module):
    """``y.reshape(B, C, H * W)`` with ``C`` read off another tensor: nothing else ties the two
    channel sets, so the rewrite must give ``C`` the new width of ``y`` for the reshape to fit."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.head_a = nn.Conv1d(8, 4, 1)
        self.head_b = nn.Conv1d(8, 4, 1)

    def forward(self, x):
        a = torch.relu(self.a(x))
        B, C, H, W = a.shape
        y = self.b(x).reshape(B, C, H * W)
        return self.head_a(a.flatten(2)), self.head_b(y)


class SizeIntoUnprunableAxis(nn.Module):
    """MaxViT's pattern: a channel count read off one tensor reshapes another whose axis carries
    no prunable channel (here a parameter), so the channels behind the count must stay."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8 * 16, 10)
        self.table = nn.Parameter(torch.randn(8 * 16))

    def forward(self, x):
        h = torch.relu(self.conv(x))
        B, C, H, W = h.shape
        bias = self.table.reshape(1, C, H * W).sum()
        return self.head(h.flatten(1)) + bias


class MyConv(nn.Conv2d):
    """A Conv2d subclass outside torch.nn that keeps Conv2d's forward: still a Conv2d."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.note = "custom init only"


class SubclassedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = MyConv(3, 8, 3, padding=1)
        self.conv2 = MyConv(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


class UntraceableTop(nn.Module):
    """Data-dependent control flow in the model's own forward (as in detection models)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        f = self.backbone(x)
        return self.head(f) if f.mean() > 0 else self.head(-f)


class SelfAttention(nn.Module):
    """A transformer block written out (as in timm): one qkv projection split into heads, q @ kᵀ,
    softmax, @ v, heads merged back, projection; then an MLP. ``merge="C"`` merges heads with the
    channel count read off the input (x.reshape(B, N, C)), ``merge="-1"`` with -1."""

    def __init__(self, merge="-1", dim=32, heads=4):
        super().__init__()
        self.merge, self.heads = merge, heads
        self.embed = nn.Linear(16, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 64)
        self.fc2 = nn.Linear(64, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * 0.25).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2)
        out = out.reshape(B, N, C) if self.merge == "C" else out.reshape(B, N, -1)
        x = x + self.proj(out)
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x.mean(1))


class SelfAttentionMergeC(SelfAttention):
    def __init__(self):
        super().__init__(merge="C")


class MixedSizeReshape(SizeFromOtherTensor):
    """A channel count multiplied by a spatial size shapes another tensor's channel axis: no
    literal can replace it (the spatial size may change), so both channel sets stay whole."""

    def __init__(self):
        super().__init__()
        self.head_b = nn.Conv1d(64, 4, 1)

    def forward(self, x):
        a = self.a(x)
        B, C, H, W = a.shape
        return self.head_a(a.flatten(2)), self.head_b(self.b(x).reshape(B, C * H, W))


class SelfAttentionSDPA(SelfAttention):
    """The same block through F.scaled_dot_product_attention (default scale)."""

    def forward(self, x):
        x = self.embed(x)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        x = x + self.proj(out)
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x.mean(1))


class UnflattenGroups(nn.Module):
    """Channels split into (groups, width) by ``unflatten`` with literal sizes and shuffled (as in
    ShuffleNet): the width is pruned the same in every group and the literal follows."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1)
        self.b = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        y = self.a(x).unflatten(1, (3, 4)).transpose(1, 2)  # (B, 4, 3, H, W)
        return self.b(torch.flatten(y, 1, 2))


class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm subclass whose own forward adds an activation (the norm-act layers of model
    libraries such as timm): fx traces into it and sees ``F.batch_norm`` on the module's state."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.SiLU()

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or self.running_mean is None
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         use_batch, factor, self.eps)
        return self.act(y)


class NormAct(nn.Module):
    """Convs with norm-act layers, a residual add and an SE gate."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct(16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = BatchNormAct(16)
        self.se1 = nn.Conv2d(16, 4, 1)
        self.se2 = nn.Conv2d(4, 16, 1)
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        x = self.bn1(self.stem(x))
        y = self.bn2(self.conv(x))
        y = y * torch.sigmoid(self.se2(F.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        return self.head(x + y)


class FunctionalBatchNorm(nn.Module):
    """``F.batch_norm`` on a plain module's own parameters and buffers (not a BatchNorm module)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(12) + 0.5)
        self.beta = nn.Parameter(torch.randn(12))
        self.register_buffer("mean", torch.randn(12))
        self.register_buffer("var", torch.rand(12) + 0.5)
        self.out = nn.Conv2d(12, 8, 1)

    def forward(self, x):
        y = F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-5)
        return self.out(F.relu(y))


class BlurPool(nn.Module):
    """A fixed depthwise blur filter applied with F.pad and F.conv2d (anti-aliased downsampling)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        blur = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("filt", (blur[:, None] * blur[None, :] / 16).expand(12, 1, 3, 3).clone())
        self.conv2 = nn.Conv2d(12, 8, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=12)
        return self.conv2(x)


class FunctionalPools(nn.Module):
    """Volumes pooled with F.max_pool3d / F.avg_pool3d / F.adaptive_avg_pool3d, then a 1-D head
    pooled with F.adaptive_max_pool1d: pooling never mixes channels."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv3d(8, 12, 3, padding=1)
        self.mix = nn.Conv1d(12, 10, 1)
        self.head = nn.Conv1d(10, 4, 1)

    def forward(self, x):
        x = F.max_pool3d(F.relu(self.conv1(x)), 2, ceil_mode=True)
        x = F.avg_pool3d(self.conv2(x), 3, stride=1, padding=1)
        x = F.adaptive_avg_pool3d(x, (2, None, 1)).flatten(2)  # (N, 12, 2 * W)
        return self.head(F.adaptive_max_pool1d(F.relu(self.mix(x)), 3))


class Unpooling(nn.Module):
    """SegNet's decoder: max pools that return their indices (module and functional) and max
    unpooling with them, sized by ``output_size=x.size()``. The indices tie each encoder
    channel to the decoder channel unpooled with it."""

    def __init__(self):
        super().__init__()
        self.enc1 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.enc2 = nn.Conv2d(12, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)
        self.mid = nn.Conv2d(16, 20, 3, padding=1)
        self.dec2 = nn.Conv2d(20, 16, 3, padding=1)
        self.dec1 = nn.Conv2d(16, 12, 3, padding=1)
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        e1 = F.relu(self.bn1(self.enc1(x)))
        p1, i1 = F.max_pool2d(e1, 2, return_indices=True)
        e2 = F.relu(self.enc2(p1))
        p2, i2 = self.pool(e2)
        d2 = self.unpool(self.dec2(F.relu(self.mid(p2))), i2, output_size=e2.size())
        d1 = F.max_unpool2d(F.relu(self.dec1(d2)), i1, 2, output_size=e1.shape[2:])
        return self.head(F.relu(d1))


class TransposedConvs(nn.Module):
    """A U-Net decoder: transposed convolutions (plain, sized by ``output_size``; grouped;
    depthwise with two outputs per channel) upsample, and a skip connection is concatenated."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 12, 3, padding=1)
        self.down = nn.Conv2d(12, 16, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(16, 10, 3, stride=2, padding=1)
        self.fuse = nn.Conv2d(22, 12, 3, padding=1)
        self.grouped = nn.ConvTranspose2d(12, 8, 2, stride=2, groups=2)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.ConvTranspose2d(8, 16, 3, padding=1, groups=8, bias=False)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        e = F.relu(self.enc(x))
        u = F.relu(self.up(F.relu(self.down(e)), output_size=e.size()))
        y = F.relu(self.fuse(torch.cat([e, u], dim=1)))
        y = F.relu(self.bn(self.grouped(y)))
        return self.head(F.relu(self.depthwise(y)))


class SuperResolution(nn.Module):
    """Space-to-depth and back (ESPCN-style sub-pixel upsampling), a channel shuffle module,
    circular padding and an RMSNorm over the width (input 8 x 10)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.unshuffle = nn.PixelUnshuffle(2)  # 4 -> 16 channels at half resolution
        self.body = nn.Conv2d(16, 12, 3, padding=1, groups=2)
        self.shuffle = nn.ChannelShuffle(2)
        self.pad = nn.CircularPad2d(1)
        self.mix = nn.Conv2d(12, 12, 3)
        self.norm = nn.RMSNorm(5)
        self.up = nn.Conv2d(12, 3 * 4, 3, padding=1)
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        y = self.body(self.unshuffle(F.relu(self.stem(x))))
        y = F.relu(self.mix(self.pad(self.shuffle(y))))
        return self.head(F.pixel_shuffle(self.up(self.norm(y)), 2))


class GatedDecoder(nn.Module):
    """A generator-style decoder: a code vector through a Linear unflattened into a 1x1 map
    (``nn.Unflatten``), transposed convs, gated linear units over the channels (``nn.GLU`` and
    ``F.glu``: channel i of one half gates channel i of the other). Input (batch, 10)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 32)
        self.unflatten = nn.Unflatten(-1, (32, 1, 1))
        self.up1 = nn.ConvTranspose2d(32, 16, 4)
        self.gate = nn.GLU(dim=1)  # 16 -> 8 channels
        self.up2 = nn.ConvTranspose2d(8, 12, 4, stride=2, padding=1)
        self.head = nn.Conv2d(6, 3, 3, padding=1)

    def forward(self, z):
        y = self.gate(self.up1(F.relu(self.unflatten(self.fc(z)))))
        return self.head(F.glu(self.up2(y), 1))


class MapDecoder(nn.Module):
    """A VAE-style decoder: Linear layers whose features are viewed as feature maps, once by
    ``view`` with literal sizes, once by ``nn.Unflatten``; a map channel is a block of H·W of the
    Linear's features and goes with it. Input (batch, 10)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 8 * 3 * 3)
        self.bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1)  # 3x3 -> 6x6
        self.fc2 = nn.Linear(10, 5 * 6 * 6)
        self.unflatten = nn.Unflatten(1, (5, 6, 6))
        self.conv = nn.Conv2d(5, 6, 1)
        self.head = nn.Conv2d(6, 3, 3, padding=1)

    def forward(self, z):
        y = self.up(F.relu(self.bn(self.fc(z).view(-1, 8, 3, 3))))
        y = y + self.conv(self.unflatten(torch.relu(self.fc2(z))))
        return self.head(y)


class ChunkedAttention(nn.Module):
    """Attention on the model's own input, q, k and v chunked off one projection and each split
    into heads with ``C // heads`` read off the (unlabeled) input; ``einsum=True`` writes the two
    products as einsums (as MaxViT does). Then an einsum over channels with a parameter, stored
    (out, in): a Linear layer written out. Input (batch, tokens, 16)."""

    def __init__(self, einsum=False, dim=16, heads=2):
        super().__init__()
        self.einsum, self.heads = einsum, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mix = nn.Parameter(torch.randn(12, dim) * 0.2)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, N, self.heads, C // self.heads).permute(0, 2, 1, 3) for t in (q, k, v))
        if self.einsum:
            attn = torch.einsum("bhid,bhjd->bhij", q * 0.35, k).softmax(-1)
            out = torch.einsum("bhij,bhjd->bhid", attn, v)
        else:
            out = ((q * 0.35) @ k.transpose(-1, -2)).softmax(-1) @ v
        y = torch.relu(self.proj(out.permute(0, 2, 1, 3).reshape(B, N, C)))
        return self.head(torch.einsum("oc,bnc->bno", self.mix, y).mean(1))


class EinsumAttention(ChunkedAttention):
    def __init__(self):
        super().__init__(einsum=True)


class ComputedSlices(nn.Module):
    """Two halves of a layer's channels sliced with bounds computed from its width
    (``y[:, :C // 2]``, ``y[:, C // 2:]``), each into its own conv; a residual add in place."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.left, self.right = nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        C = y.size(1)
        z = self.left(y[:, : C // 2])
        z += self.right(y[:, C // 2 :])
        return self.head(torch.relu(z))


class ElementwiseOps(nn.Module):
    """Branches joined by elementwise ops of several tensors: addcmul, addcdiv, lerp, fmax,
    hypot; their channels meet position by position as in a residual add."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2d(3, 8, 3, padding=1) for _ in range(3))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a, b, c = self.a(x), self.b(x), torch.sigmoid(self.c(x)) + 1.0
        y = torch.addcmul(a, b, c, value=0.5) + torch.addcdiv(b, a, c, value=0.25)
        y = torch.lerp(y, torch.fmax(a, b), 0.3) + torch.hypot(a, c)
        return self.head(y)


class WholeGroupNorms(nn.Module):
    """GroupNorms that lose whole groups (exact): 8 groups of 2 channels, one channel per group
    (as InstanceNorm), and F.group_norm on a module's own parameters; a concat with the model's
    input puts one of conv3's channels into a group with an input channel (it cannot go)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gn1 = nn.GroupNorm(8, 16)
        self.conv2 = nn.Conv2d(16, 12, 3, padding=1)
        self.gn2 = nn.GroupNorm(12, 12, affine=False)
        self.conv3 = nn.Conv2d(12, 5, 1)
        self.weight = nn.Parameter(torch.rand(8) + 0.5)
        self.bias = nn.Parameter(torch.randn(8))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.relu(self.gn1(self.conv1(x)))
        y = torch.relu(self.gn2(self.conv2(y)))
        y = torch.cat([x, self.conv3(y)], 1)
        return self.head(F.group_norm(y, num_groups=4, weight=self.weight, bias=self.bias))


class StackedFeatures(nn.Module):
    """``torch.stack`` of feature maps: a BiFPN-style weighted fusion (stack on a new last axis,
    summed over it) and an interleave (stack on axis 2, flattened into the channels: a, b, a,
    b...). Channel c of each stacked map goes with channel c of the others."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.w = nn.Parameter(torch.ones(2))
        self.c, self.d = nn.Conv2d(8, 6, 1), nn.Conv2d(8, 6, 1)
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        w = torch.relu(self.w)
        w = w / (w.sum() + 1e-4)
        y = torch.stack([w[0] * self.a(x), w[1] * self.b(x)], dim=-1).sum(dim=-1)
        y = torch.relu(y)
        return self.head(torch.stack([self.c(y), self.d(y)], 2).flatten(1, 2))


class SplitAttention(nn.Module):
    """ResNeSt / SKNet split attention: a conv's radix x C channels viewed as (radix, C), summed
    over the radix axis, squeezed into radix x C logits, a softmax over the radix axis weighting
    the branches. A channel goes with its whole slice along the radix axis (``C`` computed from
    the conv's width)."""

    def __init__(self, radix=2, width=8):
        super().__init__()
        self.radix = radix
        self.conv = nn.Conv2d(3, radix * width, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(width, 4, 1), nn.Conv2d(4, radix * width, 1)
        self.head = nn.Conv2d(width, 2, 1)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        B, RC, H, W = x.shape
        x = x.reshape(B, self.radix, RC // self.radix, H, W)
        attn = self.fc2(torch.relu(self.fc1(x.sum(dim=1).mean((2, 3), keepdim=True))))
        attn = F.softmax(attn.view(B, 1, self.radix, -1).transpose(1, 2), dim=1).reshape(B, -1)
        return self.head((x * attn.reshape(B, self.radix, RC // self.radix, 1, 1)).sum(dim=1))


class IteratedSplits(nn.Module):
    """Loops over the pieces of a split, as Res2Net-style blocks and hand-written multi-branch
    code do (fx cannot iterate a traced value): a conv per chunk, a running sum over
    ``first, *rest``, ``sum()`` of a split's pieces, and a loop over rows (``unbind`` along the
    height: as many pieces as the input has rows)."""

    def __init__(self, width=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 4 * width, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(4))
        self.mix = nn.Conv2d(4 * width, 2 * width, 1)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        outs = [conv(t) for t, conv in zip(x.chunk(4, 1), self.convs)]
        first, *rest = outs
        for r in rest:
            first = first + r
        y = self.mix(torch.cat(outs, 1)) + torch.cat([first, first], 1)
        y = sum(y.split(y.shape[1] // 2, 1))
        rows = [row.mean(-1) for row in y.unbind(2)]
        return self.head(torch.stack(rows, -1).mean(-1))


class ConvRecurrent(nn.Module):
    """A CRNN (text recognition): conv features, each column's channels x rows flattened into a
    recurrent layer's input features (its last axis, sequence first or batch first), a
    classifier per step. ``initial_state``: the first hidden state computed from the features by
    a Linear (its outputs are hidden units, which stay whole)."""

    def __init__(self, cell="LSTM", bidirectional=True, batch_first=True, initial_state=False):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=(1, 1), stride=(2, 1))
        self.batch_first, self.directions = batch_first, 2 if bidirectional else 1
        self.rnn = getattr(nn, cell)(6 * 3, 10, num_layers=2, bidirectional=bidirectional, batch_first=batch_first)
        self.init = nn.Linear(6, 10) if initial_state else None
        self.fc = nn.Linear(10 * self.directions, 5)

    def forward(self, x):
        f = self.conv2(torch.relu(self.bn(self.conv1(x))))  # (B, C, 3, W)
        b, c, h, w = f.shape
        seq = f.permute(0, 3, 1, 2).reshape(b, w, c * h)
        if not self.batch_first:
            seq = seq.transpose(0, 1)
        if self.init is not None:
            h0 = torch.tanh(self.init(f.mean((2, 3))))
            out, _ = self.rnn(seq, h0.unsqueeze(0).expand(2 * self.directions, b, 10).contiguous())
        else:
            out, _ = self.rnn(seq)
        return self.fc(out)


class ConvGRUSequenceFirst(ConvRecurrent):
    def __init__(self):
        super().__init__("GRU", bidirectional=False, batch_first=False, initial_state=True)


class TensorOps(nn.Module):
    """Ops whose channel handling is easy to get wrong: floor division and remainder of tensors
    (elementwise, not size arithmetic), masked_fill, zeros_like, pow, scales computed from the
    channel count (they keep their unpruned value), ``narrow`` along the channels (a slice), a max
    over the width read as ``.values``, and tensors the forward creates: one along the width
    (channels untouched) and one along the channels (input width 10)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 6, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.conv1(x)
        y = y - torch.floor_divide(y, 2.0) + y % 1.5
        y = y * y.shape[1] ** -0.5 + y / math.sqrt(y.size(1))  # scales from the channel count
        y = y.clamp(max=y.shape[1] / 2) + torch.where(y > 0, y, y.shape[1] * 0.1)
        y = y.masked_fill(y < -2, -2.0) + torch.zeros_like(y) + 0.1 * y.pow(2).sign() + F.softsign(y)
        y = self.conv2(y).narrow(1, 2, 4)
        y = y * y.max(dim=3, keepdim=True).values + torch.linspace(0.0, 1.0, 10)
        y = self.conv3(y).clamp(min=torch.full((1, 6, 1, 1), -0.5))
        return self.head(y)


class TransposedParameterMatmul(nn.Module):
    """A 1-D conv with InstanceNorm1d, pooled, then hand-written linear layers ``x @ W.t()`` and
    ``x @ V.T`` (weights stored out x in, as nn.Linear's)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3)
        self.norm = nn.InstanceNorm1d(8, affine=True)
        self.W = nn.Parameter(torch.randn(6, 8) / 3)
        self.V = nn.Parameter(torch.randn(5, 8) / 3)
        self.head = nn.Linear(11, 2)

    def forward(self, x):
        f = torch.relu(self.norm(self.conv(x))).mean(2)
        return self.head(torch.cat([f @ self.W.t(), f @ self.V.T], 1))


class LayerScales(nn.Module):
    """Per-channel scales written three ways: ``view(1, -1, 1, 1)``, ``[:, None, None]``, and
    ``view(C, 1, 1)`` with C a literal."""

    def __init__(self, c=16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.conv3 = nn.Conv2d(c, c, 3, padding=1)
        self.g1 = nn.Parameter(torch.rand(c) + 0.5)
        self.g2 = nn.Parameter(torch.rand(c) + 0.5)
        self.g3 = nn.Parameter(torch.rand(c) + 0.5)
        self.shape = (c, 1, 1)
        self.out = nn.Conv2d(c, 8, 1)

    def forward(self, x):
        x = self.conv1(x) * self.g1.view(1, -1, 1, 1)
        x = self.conv2(x) * self.g2[:, None, None]
        x = self.conv3(x).mul(self.g3.view(self.shape))
        return self.out(x)


class RolledChannelsLast(nn.Module):
    """Channels-last tokens rolled and padded along their spatial axes (Swin's shifted windows)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 2, stride=2)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = self.conv(x).permute(0, 2, 3, 1)
        x = torch.roll(x, shifts=(1, 1), dims=(1, 2))
        x = F.pad(x, (0, 0, 1, 1, 1, 1))
        return self.fc(x)


class TalkingHeads(SelfAttention):
    """Attention logits mixed across heads by a Linear over the heads axis (CaiT's talking
    heads), then multiplied with v, whose heads are fixed: the heads axis meets v's heads."""

    def __init__(self):
        super().__init__()
        self.proj_l = nn.Linear(self.heads, self.heads)

    def forward(self, x):
        x = self.embed(x)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self.proj_l((q @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, -1)
        x = x + self.proj(out)
        return self.head(x.mean(1))


class RelativePosition(SelfAttention):
    """q also contracted with a parameter table (relative-position logits): its columns go with
    q's head dims."""

    def __init__(self, tokens=5):
        super().__init__()
        self.rel = nn.Parameter(torch.randn(tokens, 32 // self.heads))

    def forward(self, x):
        x = self.embed(x)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1) + q @ self.rel.transpose(-1, -2)).softmax(dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1))
        return self.head(x.mean(1))


class ParameterMatmul(nn.Module):
    """``x @ self.w`` with a parameter matrix: the parameter's rows read x's channels."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 24)
        self.w = nn.Parameter(torch.randn(24, 12) / 5)
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc(x)) @ self.w)


class ClassTokenSlice(nn.Module):
    """A class token from one layer concatenated before tokens from another, split off again by a
    length read at run time (PiT): channels vary along the token axis, which keeps its length."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Linear(16, 12)
        self.tok = nn.Linear(16, 12)
        self.mix = nn.Linear(12, 12)
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        cls_tokens = self.cls(x[:, :1])
        n = cls_tokens.shape[1]
        t = self.mix(torch.cat((cls_tokens, self.tok(x)), dim=1))
        return self.head(t[:, :n].squeeze(1) + t[:, n:].mean(1))


class ClassTokenParameter(nn.Module):
    """A ViT's stream without its LayerNorms (so pruning it is exact): patch embedding, a class
    token parameter concatenated before the patch tokens (``expand(B, -1, -1)``), a position
    embedding parameter added, an MLP block, the class token read out. The two parameters hold
    the stream's channels along their last axis. Input (batch, 3, 8, 8)."""

    def __init__(self, dim=12):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, dim))
        self.fc1, self.fc2 = nn.Linear(dim, 20), nn.Linear(20, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x[:, 0])


class TiedWeights(nn.Module):
    """Two convs sharing one weight Parameter (weight tying): their channels must move together."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.b.weight = self.mid.weight
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.mid(torch.relu(self.a(x))))))


class EmbeddingTiedHead(nn.Module):
    """Token embedding, a residual MLP, and an output layer tied to the embedding table (as in
    language models): the embedding's columns are the residual stream's channels."""

    def __init__(self, vocab=40, dim=16, hidden=24, functional=False):
        super().__init__()
        self.functional = functional
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        x = F.embedding(ids, self.emb.weight) if self.functional else self.emb(ids)
        x = x + self.fc2(F.relu(self.fc1(x)))
        return self.head(x)


class KeywordCalls(nn.Module):
    """Layers and functions called with keyword arguments (``self.conv(input=x)``)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = F.relu(input=self.bn(input=self.a(input=x)))
        return self.fc(input=self.b(input=y).mean(dim=(2, 3)))


class StdConv(nn.Conv2d):
    """Weight standardisation as timm's ScaledStdConv2d writes it (BiT, NFNets): each filter
    normalised over its fan-in by ``F.batch_norm`` in training mode, times a per-filter gain and a
    constant."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StandardisedConvs(nn.Module):
    """Convs with standardised weights: their filters prune exactly (conv1's 16 and conv3's 8,
    read by a depthwise standardised conv, whose filters each read one channel, and plain layers);
    conv2's 12 are read by a standardised conv, whose filter statistics span them: prunable, not
    exactly."""

    def __init__(self):
        super().__init__()
        self.conv1 = StdConv(3, 16, 3, padding=1)
        self.dw = StdConv(16, 16, 3, padding=1, groups=16, bias=False)
        self.conv2 = nn.Conv2d(16, 12, 1)
        self.conv3 = StdConv(12, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.dw(torch.relu(self.conv1(x))))
        y = torch.relu(self.conv3(torch.relu(self.conv2(y))))
        return self.head(y.mean((2, 3)))


class LayerNorm2d(nn.Module):
    """The official ConvNeXt's channels-first LayerNorm, written out: mean and variance across
    the channels (kept as an axis of 1), then a per-channel affine."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)
        self.bias = nn.Parameter(torch.randn(channels))

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN on channels-last features: each channel's L2 norm over the positions,
    divided by the mean of those norms across the channels."""

    def __init__(self, channels):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(channels))
        self.beta = nn.Parameter(torch.randn(channels))

    def forward(self, x):
        gx = x.norm(p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class NormalisedByHand(nn.Module):
    """Normalisations written with reductions across the channels (LayerNorm2d, GRN): their
    channels are prunable, not exactly, as through nn.LayerNorm; conv2's stay exact."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.norm = LayerNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.fc1 = nn.Linear(6, 10)
        self.grn = GlobalResponseNorm(10)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x):
        y = self.conv2(self.norm(self.conv1(x))).permute(0, 2, 3, 1)
        return self.fc2(self.grn(F.gelu(self.fc1(y)))).mean((1, 2))


class SpatialAttention(nn.Module):
    """CBAM's spatial attention: the mean and max across the channels, concatenated, make a map;
    the counts of channels are in those values, so the channels stay whole."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.att = nn.Conv2d(2, 1, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        a = torch.cat([y.mean(1, keepdim=True), y.amax(1, keepdim=True)], 1)
        return self.head(y * torch.sigmoid(self.att(a)))


class GlobalContextBlock(nn.Module):
    """GCNet's global context: a one-channel map, softmaxed over the positions, pools x by a
    matrix product ((C, HW) @ (HW, 1)); an MLP of the context is added back to x. The map's one
    channel is no channel of x's: x's channels stay one group."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_attn = nn.Conv2d(8, 1, 1)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        B, C, H, W = x.shape
        attn = torch.softmax(self.conv_attn(x).reshape(B, 1, H * W), dim=-1).unsqueeze(-1)
        context = (x.reshape(B, C, H * W).unsqueeze(1) @ attn).view(B, C, 1, 1)
        return self.head(x + self.fc2(torch.relu(self.fc1(context))))


class ScaledAttention(nn.Module):
    """Attention with learned scales broadcast over the heads' axes: queries scaled per head dim
    (one vector for every head) and logits per head by a (heads, 1, 1) temperature, as XCiT does."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(16, 3 * dim)
        self.q_scale = nn.Parameter(torch.rand(dim // heads) + 0.5)
        self.temperature = nn.Parameter(torch.rand(heads, 1, 1) + 0.5)
        self.proj = nn.Linear(dim, 10)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.q_scale) @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).flatten(2)).mean(1)


class MultiQueryAttention(nn.Module):
    """Multi-query attention: 4 query heads share one key and one value head (broadcast along the
    heads axis), through ``F.scaled_dot_product_attention`` or written out."""

    def __init__(self, sdpa=True, dim=32, heads=4):
        super().__init__()
        self.sdpa, self.heads, self.d = sdpa, heads, dim // heads
        self.q = nn.Linear(16, dim)
        self.kv = nn.Linear(16, 2 * self.d)
        self.proj = nn.Linear(dim, 10)

    def forward(self, x):
        B, N, _ = x.shape
        q = self.q(x).view(B, N, self.heads, self.d).transpose(1, 2)  # (B, heads, N, d)
        k, v = self.kv(x).view(B, N, 2, 1, self.d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, 1, N, d)
        if self.sdpa:
            out = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            out = (q @ k.transpose(-2, -1) / self.d ** 0.5).softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, -1)).mean(1)


class MultiQueryMatmul(MultiQueryAttention):
    def __init__(self):
        super().__init__(sdpa=False)


class RelativePositionBias(nn.Module):
    """Window attention with a relative-position bias gathered from a table with one column per
    head and added to the logits, as Swin and MaxViT write it."""

    def __init__(self, dim=32, heads=4, tokens=5):
        super().__init__()
        self.heads, self.tokens = heads, tokens
        self.qkv = nn.Linear(16, 3 * dim)
        self.table = nn.Parameter(torch.randn(2 * tokens - 1, heads))
        coords = torch.arange(tokens)
        self.register_buffer("index", coords[:, None] - coords[None, :] + tokens - 1)
        self.proj = nn.Linear(dim, 10)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.table[self.index.view(-1)].view(N, N, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        attn = (q @ k.transpose(-2, -1) * 0.3 + bias).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).flatten(2)).mean(1)


class ShapeChecks(nn.Module):
    """Checks of its input's sizes in the forward, as timm's ``_assert`` writes them: of channel
    counts (which pruning changes; the checks must still pass) and of a spatial size (which it
    does not; that check must still fail on other inputs)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.conv1(x).relu()
        B, C, H, W = y.shape
        torch._assert(C == 16, "conv1 gives 16 channels")
        torch._assert(y.size(1) >= 4, "at least 4 channels")
        torch._assert(H == 8, "8 rows")
        z = self.conv2(y)
        torch._assert(z.shape[1] % 2 == 0, "an even number of channels")
        return self.fc(z.mean((2, 3)))


class ShapeBranches(nn.Module):
    """A forward that branches on its input's shape, as windowed attention and patch embeddings
    write it: pads to a multiple of the window if needed, checks rank, dtype and a channel count
    (``assert``, ``if``). The graph follows the branches the example inputs take."""

    def __init__(self, window=4):
        super().__init__()
        self.window = window
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        y = self.conv1(x).relu()
        B, C, H, W = y.shape
        pad_h, pad_w = (self.window - H % self.window) % self.window, (self.window - W % self.window) % self.window
        if pad_h > 0 or pad_w > 0:
            y = F.pad(y, (0, pad_w, 0, pad_h))
        assert C == 16, "conv1 gives 16 channels"
        if y.dtype == torch.float16:
            y = y.float()
        z = self.conv2(y)
        if z.shape[1] != 8:
            z = z[:, :8]
        return self.fc(F.adaptive_avg_pool2d(z, 1).flatten(1))


class PatchUnfold(nn.Module):
    """Patches unfolded and folded back as MobileViT writes it: reshapes to sizes computed from
    the batch size and the channel count together (``B * C * rows``), a per-channel scale over the
    unfolded tokens in between."""

    def __init__(self, patch=2):
        super().__init__()
        self.patch = patch
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)
        self.conv2 = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        y = self.conv1(x)
        B, C, H, W = y.shape
        p = self.patch
        nh, nw = H // p, W // p
        t = y.reshape(B * C * nh, p, nw, p).transpose(1, 2)  # (B·C·nh, nw, p, p)
        t = t.reshape(B, C, nh * nw, p * p).transpose(1, 3)  # (B, p·p, patches, C)
        t = t.reshape(B * p * p, nh * nw, -1) * self.scale  # tokens with C channels last
        t = t.contiguous().view(B, p * p, nh * nw, -1).transpose(1, 3)
        t = t.reshape(B * C * nh, nw, p, p).transpose(1, 2).reshape(B, C, nh * p, nw * p)
        return self.conv2(t)


class OptionalArguments(nn.Module):
    """A forward with arguments callers leave out (a mask, a flag), as timm's ViT and Hiera write
    it: traced as ``model(x)`` calls it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x, mask=None, pool_max: bool = False):
        y = self.conv(x).relu()
        if mask is not None:
            y = y * mask.view(mask.shape[0], 1, *y.shape[2:])
        y = y.amax((2, 3)) if pool_max else y.mean((2, 3))
        return self.fc(y)
