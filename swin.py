"""
Swin Transformer backbone (Liu et al., ICCV 2021, arXiv:2103.14030), from scratch; imports only torch, so the file can
be copied alone. Attention inside M x M windows (Sec. 3.2), shifted by M/2 in every other block (Fig. 2), with a
learned relative position bias (Eq. 4); matches torchvision's swin_t once loaded with load_pretrained.

In order: window helpers, the modules (SwinBlock ... SwinTransformer, build_swin), then load_pretrained for official,
torchvision and mmsegmentation checkpoints. Tensors flow channels-last, (B, H, W, C), and any H, W works.

    model = build_swin('swin_t')
    load_pretrained(model, 'swin_tiny_patch4_window7_224.pth')  # official, torchvision or mmseg file
    feats = model(images)  # 4 maps (B, C_i, H/4/2^i, W/4/2^i)
"""
import functools
import math
import os
import re
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

SWIN_PRESETS = {
    'swin_t': dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    'swin_s': dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    'swin_b': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7),
    'swin_l': dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12),  # GSS's backbone
    'swin_mini': dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=7),  # CPU tests
}

# -----------------------------------------------------------------------------
# windows

def window_partition(x, ws):
    """(B, H, W, C) with H, W multiples of ws -> windows (B*nW, ws*ws, C), in row-major order."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // ws, ws, W // ws, ws, C)
    return x.transpose(2, 3).reshape(-1, ws * ws, C)  # (B*nW, ws*ws, C)


@functools.lru_cache(maxsize=16)  # shared by all blocks; a few sizes at a time (training crops, test images)
@torch.inference_mode(False)  # cached, so must stay usable by autograd after an inference_mode pass
def window_layout(H, W, ws, shift, device):
    """Where an (H, W) map's tokens go in (shifted) windows: index (nW*N,) the token id of each window slot, H*W for
    padding; inverse (H*W,) each token's slot; mask (nW, N, N), -100 across regions of the rolled map, or None."""
    Hp, Wp = H + (-H) % ws, W + (-W) % ws
    # no shift along an axis that one window already covers (torchvision and Microsoft's code;
    # mmsegmentation keeps the shift there, which splits that single window into masked regions)
    sh, sw = (shift if Hp > ws else 0), (shift if Wp > ws else 0)
    ids = torch.arange(H * W, device=device).view(1, H, W, 1)
    ids = F.pad(ids, (0, 0, 0, Wp - W, 0, Hp - H), value=H * W)  # (1, Hp, Wp, 1)
    ids = torch.roll(ids, (-sh, -sw), (1, 2))  # cyclic shift towards the top-left (paper Fig. 4)
    index = window_partition(ids, ws).flatten()  # (nW*N,)
    inverse = index.argsort()[:H * W]  # (H*W,): each real id occurs once, the padding id sorts last
    if not (sh or sw):
        return index, inverse, None

    def regions(n, s):  # 0 | 1 | 2 for rows [0, n-ws) | [n-ws, n-s) | [n-s, n) of the rolled map
        r = torch.arange(n, device=device)
        return (r >= n - ws).long() + (r >= n - s).long() if s else torch.zeros_like(r)
    label = regions(Hp, sh)[:, None] * 3 + regions(Wp, sw)[None, :]  # (Hp, Wp)
    label = window_partition(label[None, :, :, None], ws)  # (nW, N, 1)
    return index, inverse, (label != label.transpose(1, 2)).float() * -100.0  # (nW, N, N), official -100


def attention(q, k, v, attn_mask):
    """softmax(q k^T / sqrt(d) + attn_mask) v (paper Eq. 4); q, k, v (B, h, nW, N, d), attn_mask (h, nW or 1, N, N)."""
    if q.device.type != 'cpu':  # fused kernels (flash / memory-efficient): no N x N matrix kept in memory
        h, nW, N = q.shape[1:4]  # they take 4-D inputs: fold the windows into the head axis
        attn_mask = attn_mask.expand(h, nW, N, N).reshape(h * nW, N, N).to(q.dtype)  # broadcasts over B
        x = F.scaled_dot_product_attention(q.flatten(1, 2), k.flatten(1, 2), v.flatten(1, 2), attn_mask=attn_mask)
        return x.view(q.shape)
    # On CPU, SDPA takes its math path when the mask needs a gradient (the bias table does), which also
    # keeps scaled copies of q and k and a second copy of the weights: these lines are faster and lighter.
    attn = torch.add(attn_mask, q @ k.transpose(-2, -1), alpha=q.shape[-1] ** -0.5).softmax(-1)  # (B, h, nW, N, N)
    return attn @ v  # (B, h, nW, N, d)


def drop_path(x, p, training):
    """Stochastic depth (Huang et al. 2016): zero a residual branch per sample, rescale the survivors."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *(1,) * (x.dim() - 1)).bernoulli_(1.0 - p)  # (B, 1, 1, 1)
    return x * (keep / (1.0 - p))

# -----------------------------------------------------------------------------
# modules

class WindowAttention(nn.Module):
    """Window self-attention with a relative position bias (Eq. 4): SwinBlock runs qkv, attend(), proj."""

    def __init__(self, dim, window_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # one learned scalar per head for each of the (2M-1)^2 relative offsets
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # index[i, j] = (dh + M-1) * (2M-1) + (dw + M-1) for tokens i, j of a window; recomputable, so not saved
        ij = torch.cartesian_prod(torch.arange(window_size), torch.arange(window_size)).t()  # (2, N), N = M*M
        rel = ij[:, :, None] - ij[:, None, :] + window_size - 1  # (2, N, N), each in [0, 2M-2]
        self.register_buffer('relative_position_index', rel[0] * (2 * window_size - 1) + rel[1], persistent=False)

    def attend(self, q, k, v, mask=None):
        """q, k, v (B, h, nW, N, d); mask (nW, N, N) or None -> (B, h, nW, N, d)."""
        bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)  # (h, N, N)
        return attention(q, k, v, bias[:, None] + (0.0 if mask is None else mask))  # mask (h, nW or 1, N, N)


class SwinBlock(nn.Module):
    """x + (S)W-MSA(LN(x)), then x + MLP(LN(x)) (paper Eq. 3); shift_size > 0 makes it SW-MSA."""

    def __init__(self, dim, num_heads, window_size=7, shift_size=0, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.window_size, self.shift_size, self.drop_path = window_size, shift_size, drop_path
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim)))

    def shifted_window_attention(self, x):
        """(S)W-MSA of a normalised map x (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        h, N = self.attn.num_heads, self.window_size ** 2
        index, inverse, mask = window_layout(H, W, self.window_size, self.shift_size, x.device)
        # Official order: zero-pad to window multiples, roll, partition, attend, and back. qkv and proj act per token,
        # so they see only the H*W real tokens plus one zero token (q, k, v = the qkv biases, as with official zero
        # padding) that every padded slot points at; pad + roll + partition is one gather by `index` (a 256x256
        # input pads stage 4 to 3x its tokens)
        qkv = self.attn.qkv(F.pad(x.reshape(B, H * W, C), (0, 0, 0, 1)))  # (B, H*W+1, 3C)
        qkv = qkv.view(B, H * W + 1, 3, h, C // h).permute(2, 0, 3, 1, 4).index_select(3, index)  # (3, B, h, nW*N, d)
        x = self.attn.attend(*qkv.view(3, B, h, -1, N, C // h), mask)  # (B, h, nW, N, d)
        x = x.view(B, h, -1, C // h).transpose(1, 2).index_select(1, inverse)  # (B, H*W, h, d), raster order
        return self.attn.proj(x.reshape(B, H, W, C))

    def forward(self, x):
        """x (B, H, W, C), any H, W -> (B, H, W, C)."""
        x = x + drop_path(self.shifted_window_attention(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (4C), LayerNorm, Linear to 2C: halves H and W (paper Sec. 3.1)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C); odd sizes are zero-padded (as torchvision)."""
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))  # (B, Hp, Wp, C)
        x = x.reshape(B, x.shape[1] // 2, 2, x.shape[2] // 2, 2, C)  # (B, H/2, dh, W/2, dw, C)
        # channel order of the official code: [x(0,0) | x(1,0) | x(0,1) | x(1,1)], i.e. dw-major, then dh
        x = x.permute(0, 1, 3, 4, 2, 5).flatten(3)  # (B, H/2, W/2, 4C)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """depth SwinBlocks, shifts alternating 0, M/2, then optional PatchMerging."""

    def __init__(self, dim, depth, num_heads, window_size=7, mlp_ratio=4.0, drop_path=0.0, downsample=False):
        super().__init__()
        rates = drop_path if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nn.ModuleList([
            SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, mlp_ratio, rates[i])
            for i in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None
        for m in self.modules():  # official init: truncated normal(0.02) Linear weights, zero biases
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        """x (B, H, W, C) -> (out (B, H, W, C), next (B, H/2, W/2, 2C) or None)."""
        for block in self.blocks:
            x = block(x)
        return x, (self.downsample(x) if self.downsample is not None else None)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> C channels (a strided conv), then LayerNorm."""

    def __init__(self, patch_size, in_chans, dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        """(B, 3, H, W) -> (B, ceil(H/p), ceil(W/p), C); pads bottom/right to a multiple of p (as official)."""
        p = self.patch_size
        x = F.pad(x, (0, (-x.shape[3]) % p, 0, (-x.shape[2]) % p))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, H/p, W/p, C)


class SwinTransformer(nn.Module):
    """Four stages at strides 4, 8, 16, 32; each output goes through its own LayerNorm norm0..norm3."""

    def __init__(self, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7,
                 mlp_ratio=4.0, drop_path_rate=0.0, patch_size=4, in_chans=3):
        super().__init__()
        self.channels = [embed_dim * 2 ** i for i in range(len(depths))]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        n = sum(depths)  # stochastic depth linear in the block index (official: torch.linspace)
        rates = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            self.layers.append(SwinStage(self.channels[i], depth, heads, window_size, mlp_ratio,
                                         rates[sum(depths[:i]):sum(depths[:i + 1])], downsample=i < len(depths) - 1))
        for i, c in enumerate(self.channels):
            self.add_module(f'norm{i}', nn.LayerNorm(c))

    def forward(self, x):
        """(B, in_chans, H, W) -> [(B, C_i, ceil(H/4/2^i), ceil(W/4/2^i)) for i in 0..3]."""
        x = self.patch_embed(x)  # (B, H/4, W/4, C)
        outs = []
        for i, layer in enumerate(self.layers):
            out, x = layer(x)  # out (B, H_i, W_i, C_i), x the merged input of the next stage
            outs.append(getattr(self, f'norm{i}')(out).permute(0, 3, 1, 2).contiguous())  # (B, C_i, H_i, W_i)
        return outs


def build_swin(name, **overrides):
    """A SwinTransformer from SWIN_PRESETS[name], any constructor argument overridden."""
    if name not in SWIN_PRESETS:
        raise ValueError(f"swin: unknown preset {name!r}; expected one of {', '.join(SWIN_PRESETS)}")
    return SwinTransformer(**{**SWIN_PRESETS[name], **overrides})

# -----------------------------------------------------------------------------
# checkpoints: Microsoft's official (layers.*), torchvision (features.*), mmsegmentation (stages.*)

def _from_torchvision(key):
    """features.0.{0,2} patch conv/norm; features.{2i+1}.{j} blocks of stage i; features.{2i+2} merging i."""
    m = re.match(r'features\.(\d+)\.(.*)', key)
    if m is None:
        return key
    i, rest = int(m[1]), m[2]
    if i == 0:
        return 'patch_embed.' + {'0': 'proj', '2': 'norm'}[rest[0]] + rest[1:]  # features.0.1 is a Permute
    if i % 2 == 0:
        return f'layers.{i // 2 - 1}.downsample.{rest}'
    return f'layers.{i // 2}.blocks.{rest}'.replace('.mlp.0.', '.mlp.fc1.').replace('.mlp.3.', '.mlp.fc2.')


def _from_mmseg(key, t):
    """Inverse of mmseg's tools/model_converters/swin2mmseg.py: its renames, and its correct_unfold_*_order, since
    mmseg merges with nn.Unfold: 4C channels c*4 + (0,0),(0,1),(1,0),(1,1), official (0,0),(1,0),(0,1),(1,1)."""
    key = re.sub(r'^stages\.', 'layers.', key).replace('patch_embed.projection.', 'patch_embed.proj.')
    key = key.replace('.attn.w_msa.', '.attn.').replace('.ffn.layers.0.0.', '.mlp.fc1.')
    key = key.replace('.ffn.layers.1.', '.mlp.fc2.')
    if key.endswith('downsample.reduction.weight'):
        out, c4 = t.shape
        t = t.reshape(out, c4 // 4, 4).transpose(1, 2)[:, [0, 2, 1, 3]].reshape(out, c4)
    elif re.search(r'downsample\.norm\.(weight|bias)$', key):
        t = t.reshape(-1, 4).t()[[0, 2, 1, 3]].reshape(-1)
    return key, t


def _resize_bias_table(t, n):
    """Bicubic resize of a ((2M-1)^2, heads) table to n rows (official load_pretrained recipe)."""
    s, s2 = math.isqrt(t.shape[0]), math.isqrt(n)
    t = t.t().reshape(1, -1, s, s).float()  # (1, heads, 2M-1, 2M-1)
    return F.interpolate(t, size=(s2, s2), mode='bicubic', align_corners=False).reshape(-1, n).t()  # (n, heads)


def load_pretrained(model, checkpoint):
    """Load an official / torchvision / mmseg Swin checkpoint (path or state dict): heads and buffers dropped, bias
    tables resized to the model's window. -> load_state_dict(strict=False)'s (missing, unexpected)."""
    sd = checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        sd = torch.load(checkpoint, map_location='cpu', weights_only=True)
    for wrapper in ('model', 'state_dict'):  # official files: {'model': sd}; mmcv: {'state_dict': sd, 'meta': ...}
        if isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    prefixes = r'^((module|backbone|_orig_mod)\.)+'  # DDP, segmentor, torch.compile
    clean = {re.sub(prefixes, '', key): t for key, t in sd.items()}
    if not any(k.startswith(('layers.', 'features.', 'stages.')) for k in clean):
        raise ValueError(f"swin checkpoint: not an official (layers.*), torchvision (features.*) or mmseg "
                         f"(stages.*) Swin state dict; first unrecognised keys: {', '.join(list(clean)[:5])}")
    mmseg = any(k.startswith('stages.') for k in clean)
    own = model.state_dict()
    out = {}
    for key, t in clean.items():
        if key.startswith('head.') or key.endswith(('relative_position_index', 'attn_mask', 'relative_coords_table')):
            continue
        key, t = _from_mmseg(key, t) if mmseg else (_from_torchvision(key), t)  # official names pass unchanged
        if key.startswith('norm.'):  # the classifier's final norm sits where our last output norm is
            key = 'norm3.' + key[len('norm.'):]
        if key.endswith('relative_position_bias_table') and key in own and t.shape[0] != own[key].shape[0]:
            t = _resize_bias_table(t, own[key].shape[0]).to(t.dtype)
        out[key] = t
    return model.load_state_dict(out, strict=False)
