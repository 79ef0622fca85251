"""Generative Semantic Segmentation (GSS, CVPR 2023): the method of the paper, in its order. Labels are painted
into maskiges (X), tokenized by a frozen VQ tokenizer, predicted from images by I_psi, decoded and read back (X^-1).

    1. Palettes X              make_palette (appendix B), official_palette, paint, upsample_labels_2x
    2. X^-1 variants           NearestColour (GSS-FF), LeastSquares, FTInverse, FTWInverse, build_inverse;
                               the GSS-TF/TT objectives paint_soft, relaxed_roundtrip, tf_loss
    3. Tokenizer               Tokenizer (encode, decode), build_tokenizer, reconstruct, recon_scores
    4. Image encoder I_psi     build_backbone, MLA, GSSHead, GSSConfig, GSS
    5. Targets and losses      token_targets, token_cross_entropy, compute_loss (Eq. 7)
    6. Inference               predict, generate, crop_maskige, aux_scores, infer, slide_windows; beyond the paper
                               token_probs, sample_tokens, majority_vote, sample_agreement
    7. Official checkpoints    load_official_checkpoint, official_key, official_config
    8. Files and validation    UserError, load_file, save_atomic, load_tokenizer, convert_dalle, load_posterior

Usage (an official GSS-FF checkpoint of fudan-zvg/GSS, images normalized as in evaluate.py):

    import gss
    model, tokenizer, inverse = gss.load_official_checkpoint('gss-ff_swin-l_512x512_160k_ade20k.pth')
    inverse = inverse or gss.NearestColour(gss.official_palette('ade20k')[:-1])  # last row: the ignore colour
    scores = gss.predict(model.eval(), tokenizer, inverse, images)  # (B, 3, H, W) -> (B, K, H, W)
"""
import dataclasses
import math
import os
import re
import tempfile
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import swin

# Chunk sizes of the speed and memory paths, in one place: results do not depend on them (tested), peak memory does.
TOKEN_CHUNK = 2048  # token positions per (n, vocab) block of logits: token_cross_entropy, token_argmax
COLOUR_CHUNK = 2 ** 16  # pixels per block of NearestColour.labels
STRIP_ELEMENTS = 2 ** 22  # strips of rows of at most ~16 MB (float32) in and out, for convs run without autograd
ENCODE_PIXELS = 2 ** 18  # pixels per micro-batch of Tokenizer.encode (one 512x512 image)
LOGIT_ELEMENTS = 2 ** 21  # Tokenizer.encode's vocab logits per strip of token rows (~8 MB)
DECODE_TOKENS = 2 ** 12  # tokens per micro-batch of Tokenizer.decode (one 64x64-token image)


def _chunks(x, chunk):
    """The chunking of the speed paths: x (B, C, h, w) -> (b, rows, x[b, :, rows] as (C, n)) over blocks of whole
    rows of one image, about `chunk` positions each (at least one row)."""
    B, C, h, w = x.shape
    step = max(1, chunk // w)
    for b in range(B):
        for r in range(0, h, step):
            rows = slice(r, min(r + step, h))
            yield b, rows, x[b, :, rows].flatten(1)  # (C, n), n = rows * w


def _micro_batches(x, budget):
    """x (B, ..., h, w) split along B into micro-batches of at most `budget` positions (at least one image)."""
    return x.split(max(1, budget // (x.shape[-2] * x.shape[-1])))


# ----------------------------------------------------------------------------------------------------------
# 1. Palettes: the maskige transform X (Sec. 3.3), a colour table beta (K, 3) on the 0-255 scale

# decode_head.palette of configs/gss/<dataset>/*.py: hex RRGGBB in class order, then the ignore/unlabeled colour
OFFICIAL_PALETTES = {
    'ade20k': (  # 150 classes, posterior_learning.py grid 5x6x5 with noise and hand edits, ignore D7D8C4
        'DEDE91 121E07 08172F 1E0660 010DA4 0C1CBF 193420 1D3034 0F335F 1938A7 192AD2 1B511F 095836 1B5C71 0B6397 '
        '1A6EB7 18821A 047A4B 038462 1A93A7 1184C5 05A91C 13B843 00BE7A 0CA793 06A1C4 02CD03 05DC3D 17E16B 07D99D '
        '19D0BF 4A0A08 451E45 380462 3D1DA4 3C0AC2 3C3413 4A4534 414474 5129A1 463CC5 42510E 376B3D 4C6E6C 4A68A2 '
        '485EC5 3C8510 458043 3B9468 41859A 4480B7 4FB50B 4CAA38 47AF67 35A289 35B6B7 33E51A 33CA33 45D57A 3FD5A1 '
        '47CBC5 780B1F 7C0344 830262 7101A2 660DD1 6D321E 7E292F 6B2E76 703193 6D29BD 67530F 7E6346 7C6568 83679F '
        '806EB7 779409 708932 7B7F74 6B7CA7 6694CB 7CB40F 74A841 68B666 6FA4A3 69AEBF 66DA14 7ECB40 6CD76D 6EDD9D '
        '6BE6C0 A0190B A50C41 990275 B6158D A013BC B03A13 AF3A38 AA455D B02A92 9D2CD3 9D6902 B46249 B6555C A95D98 '
        '9C59CA 9D9016 B4974D 9A9276 A2888F AB86B8 AAAE0F B2B441 B0B778 AFA993 B5A5C5 9CE303 A7DA3D A0D877 A4FB8D '
        'B1C9FB E71E0D DB063B D31A7A D81099 D10CC0 D8460F D72E3C EA3D70 E0359D E331CF DD6C08 DC5D49 E66F71 DA598F '
        'E75AC3 E39016 D08931 D28074 E1879D DD87C1 D3AE12 DEB932 E5B75D E9A29B FFA7CD D3D70F E8E147 000000 FFFFFF '
        'D7D8C4'),
    'cityscapes': (  # 19 trainIds, the standard Cityscapes colours, ignore black
        '804080 F423E8 464646 66669C BE9999 999999 FAAA1E DCDC00 6B8E23 98FB98 4682B4 DC143C FF0000 00008E 000046 '
        '003C64 005064 0000E6 770B20 000000'),
    'mseg': (  # 194 universal classes, posterior_learning.py grid 5x5x8 [6:] with noise, ignore black
        '0207D6 0910EA 033405 0D4132 09344F 05406A 054388 0341B4 093ED7 0E3BF2 067508 03682A 0B734C 027173 047286 '
        '056CA7 026ECB 0676F1 0EA80D 0D9C28 059E52 099E65 059B89 09A6A9 0EA0D4 02A5F3 0CD20D 09D729 07D64E 0CD26C '
        '0BD08A 00D8B1 00CEC8 0ED2EA 3A0A09 370F32 420752 460172 3B0486 3F10AE 440BCD 3A10F5 3D3606 39342E 434045 '
        '3C3C68 3D3E95 3A42A7 413BCB 3C43F7 42760E 37752E 376D4A 436D71 446C89 406CB5 4169D5 3774F3 45A709 41A228 '
        '3BA64D 3CA165 3E9E8C 3FA0B2 469ACF 419EF7 3DD504 3ED72C 42DA4F 39D96C 3FD488 3CD7B3 37CDC8 38D2EF 70040E '
        '730623 7B0552 77066D 740587 7902B5 6F05D4 7606EE 744205 7A352B 743B45 6E3570 703792 753DAF 783DD3 6F39F8 '
        '7C760B 7A6A24 7B6953 6E6A6C 747389 7468AB 6F6CD1 7769EA 7DA709 7AA630 77A948 76A365 73A189 74A2A7 76A2D3 '
        '7BA6EC 7CDA02 76D125 7CD753 6FD374 73DB8B 7CCDB0 73DBD3 72CFF8 AB0D0F B30A2D AC0A4F AB0E74 B10687 AD04B6 '
        'B401D7 AB08EB AB4205 B33923 A84246 AB3E6B AC388A A939B2 B243CD B443EC B2730A AD7529 B36B4F B16873 AE6889 '
        'A673A9 A76DD4 AF74EB ACA80F B09E24 A99F44 A59E73 A79A93 B09AAC A59ACE AB9AF7 B0D804 A6CD32 A9D853 B4D86A '
        'B0CF8C ABCDB3 ADDBD7 B4DCF6 EA030A E50E2E E00F45 E30767 E60794 EB0DA9 DD02D5 E507EB EA3E0A EB3526 E24144 '
        'E33C69 E53891 E736A8 E634D7 E839F0 E4670A DD6F2F E56746 E5766C EA6B8A E66DB1 E571D1 EA67EF E7A811 EA9A2B '
        'E3A253 E3A470 DE9C92 E99BAE DC9ED5 DDA3EC E4D304 E8DC28 E9D54E E9DC71 E9D28E DFD9AD E1CFCF E2DCF3 000000'),
}
PALETTE_T = 15  # appendix B (iii): random additive factors t in [0, T], T = 15


def official_palette(name):
    """The official config palette of `name` (ade20k, cityscapes, mseg) -> LongTensor (K+1, 3); last row = ignore."""
    if name not in OFFICIAL_PALETTES:
        raise UserError(f"--palette official: no official palette for dataset {name!r}; "
                        f"expected one of {', '.join(OFFICIAL_PALETTES)}")
    return torch.tensor([[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in OFFICIAL_PALETTES[name].split()])


def _grid_sizes(num_classes):
    """Values per channel (nr, ng, nb) for the Cartesian product of Eq. 18: the fewest values per channel n (so the
    interval 255/(n-1) is widest), then the fewest cells >= K; ties favour more values on G, then R (ADE: 5x6x5)."""
    n = 1
    while n ** 3 < num_classes:
        n += 1
    sizes = [(r, g, b) for r in range(1, n + 1) for g in range(1, n + 1) for b in range(1, n + 1)
             if r * g * b >= num_classes]
    return min(sizes, key=lambda s: (s[0] * s[1] * s[2], -s[1], -s[0]))


def _lattice(step):
    """The colours whose channels are multiples of step (17: 0, 17, ..., 255) -> (C, 3)."""
    axis = torch.arange(0, 256, step)
    return torch.cartesian_prod(axis, axis, axis)


def _refine(colours, step=17):
    """Appendix B (iv) without the paper's per-class IoU feedback: greedy max-min on score = min(distance to the nearest
    other colour, distance to mid grey, which blends of any two colours approach). While it helps, move the worst
    colour to the best lattice colour. Integer arithmetic on doubled coordinates: the same result on every machine."""
    colours = colours.clone().long()
    lattice = _lattice(step)  # (C, 3)
    sq = lambda a, b: ((2 * a[:, None] - 2 * b[None]) ** 2).sum(-1)  # (len a, len b) squared distances x 4
    grey = lambda a: ((2 * a - 255) ** 2).sum(-1)  # (len a,) squared distance to mid grey x 4
    big = 2 ** 40
    lattice_grey = grey(lattice)  # (C,)
    to_lattice = sq(lattice, colours)  # (C, K)
    pairs = sq(colours, colours).fill_diagonal_(big)  # (K, K)
    for _ in range(len(colours)):
        score = torch.minimum(pairs.min(1).values, grey(colours))  # (K,)
        worst = int(score.argmin())
        others = to_lattice.clone()
        others[:, worst] = big  # the worst colour itself is the one that moves
        lattice_score = torch.minimum(others.min(1).values, lattice_grey)  # (C,)
        best = int(lattice_score.argmax())
        if lattice_score[best] <= score[worst]:
            break
        colours[worst] = lattice[best]
        to_lattice[:, worst] = sq(lattice, colours[worst:worst + 1])[:, 0]
        pairs[worst] = pairs[:, worst] = sq(colours, colours[worst:worst + 1])[:, 0]
        pairs[worst, worst] = big
    return colours


def make_palette(num_classes, seed=0, arithmetic=True, misaligned=True, random_factors=True, refine=True):
    """Maximal-distance palette beta (K, 3) on 0-255 (appendix B), deterministic for a seed; each step can be switched
    off for Table 9 (arithmetic=False: GSS-FF-R's random colours). Colours differ by >= min_m k^m - T before refinement
    (K=150: 5x6x5 grid, >= 32; the official palettes reach 20.0 (ADE20K) and 18.7 (MSeg))."""
    if num_classes < 1:
        raise UserError(f"palette: {num_classes} classes; expected at least 1")
    gen = torch.Generator().manual_seed(seed)
    if arithmetic:
        t = PALETTE_T if random_factors else 0
        seqs = []
        for m, n in enumerate(_grid_sizes(num_classes)):
            a1 = m if misaligned else 0  # a_1^r, a_1^g, a_1^b = 0, 1, 2 (appendix B ii)
            k = (255 - t - a1) // max(n - 1, 1)  # interval k^m: the largest that keeps a_n^m + t <= 255
            seqs.append(a1 + k * torch.arange(n))  # Eq. 17
        colours = torch.cartesian_prod(*seqs).reshape(-1, 3)[:num_classes]  # (K, 3), Eq. 18
        if random_factors:
            colours = colours + torch.randint(0, t + 1, colours.shape, generator=gen)  # Eq. 20
    else:  # K distinct uniformly random colours: duplicates redrawn
        colours = torch.randint(0, 256, (num_classes, 3), generator=gen)
        while len(set(map(tuple, colours.tolist()))) < num_classes:
            colours = torch.unique(colours, dim=0)
            extra = torch.randint(0, 256, (num_classes - len(colours), 3), generator=gen)
            colours = torch.cat([colours, extra])[torch.randperm(num_classes, generator=gen)]
    if refine or len(set(map(tuple, colours.tolist()))) != num_classes:  # the noise can merge colours if K > 16^3
        colours = _refine(colours)
    return colours.long()


def random_palette(num_classes, seed=0):
    """GSS-FF-R's beta (Table 1): K distinct uniformly random colours (K, 3) on 0-255."""
    return make_palette(num_classes, seed, arithmetic=False, misaligned=False, random_factors=False, refine=False)


def ignore_colour_for(palette):
    """A colour for ignore/unlabeled pixels (3,): the lattice colour (step 17) farthest from every class colour."""
    lattice = _lattice(17)  # (C, 3)
    dist2 = ((lattice[:, None] - palette.long()[None]) ** 2).sum(-1).min(1).values  # (C,) exact integers
    return lattice[dist2.argmax()]


def paint(labels, palette, ignore_colour):
    """X (Sec. 3.3, x = c beta): labels (B, H, W) -> maskige (B, 3, H, W) in [0, 1]. Labels >= K (255 = ignore) get
    ignore_colour: the official encode_to_segmap clamps them to index K (generative_segmentation_head_ff.py)."""
    K = len(palette)
    table = torch.cat([palette.reshape(K, 3), ignore_colour.reshape(1, 3)]).to(labels.device, torch.float32) / 255
    return F.embedding(labels.clamp(0, K), table).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)


def upsample_labels_2x(labels):
    """labels (B, H, W) -> (B, 2H, 2W) by nearest repetition: exactly the official one-hot over K+1, bilinear
    (align_corners=False), argmax (generative_segmentation_head_ff.py), whose source pixel weighs >= 0.75 at 2x."""
    B, H, W = labels.shape
    return labels[:, :, None, :, None].expand(B, H, 2, W, 2).reshape(B, 2 * H, 2 * W)


# ----------------------------------------------------------------------------------------------------------
# 2. X^-1: maskige (B, 3, H, W) in [0, 1] -> class scores (B, K, H, W)

# Speed path: the candidate-table nearest colour (_candidate_table, NearestColour.labels). Its plain
# one-line equivalent, tested equal (test_nearest_colour_soft_scores_labels_and_ties):
#     _sq_dist(255 * x[:, None], palette).argmin(1)  # every pixel against all K colours

def _sq_dist(x, p):
    """Squared distances, channels summed in order like the official sum over dim 2: x (..., 3), p (..., 3) -> (...)."""
    d = (x[..., 0] - p[..., 0]) ** 2
    d += (x[..., 1] - p[..., 1]) ** 2
    d += (x[..., 2] - p[..., 2]) ** 2
    return d


def _candidate_table(palette, cells):
    """For each of the cells^3 boxes of the RGB cube, the classes that can be nearest to a point in it: those within D
    of the box, D = the smallest distance from any colour to the box's farthest point, plus a float margin.
    -> (cells^3, M) class indices, ascending, padded with the first (M = 13 for the official ADE20K)."""
    p = palette.float()  # (K, 3)
    lo = torch.arange(cells, device=p.device)[:, None, None] * (255 / cells)  # (cells, 1, 1) box starts per axis
    hi = lo + 255 / cells
    near = ((lo - p).clamp(min=0) + (p - hi).clamp(min=0)) ** 2  # (cells, K, 3) per-axis distance to the box
    far = torch.maximum((lo - p).abs(), (hi - p).abs()) ** 2  # (cells, K, 3) ... to its farthest point
    box = lambda t: t[:, None, None, :, 0] + t[None, :, None, :, 1] + t[None, None, :, :, 2]  # (cells, cells, cells, K)
    cand = box(near) <= box(far).min(-1, keepdim=True).values + 1.0
    K, M = len(p), int(cand.sum(-1).max())
    k = torch.arange(K, device=p.device)
    idx = torch.where(cand, k, K).sort(-1).values[..., :M].reshape(-1, M)  # (cells^3, M)
    return torch.where(idx == K, idx[:, :1], idx)


class NearestColour(nn.Module):
    """GSS-FF's inverse, the official decode_from_segmap (generative_segmentation_head_ff.py): the class of the nearest
    palette colour in 0-255 RGB; soft scores -||255 x - p_k||^2 / tau, or .labels(), the argmin (speed path above)."""

    cells = 16  # candidate-table resolution per axis (boxes of 16 colour units)

    def __init__(self, palette, tau=1.0):
        super().__init__()
        self.tau = tau
        self.register_buffer('palette', palette.float().reshape(-1, 3))  # (K, 3) on 0-255
        self.register_buffer('candidates', _candidate_table(self.palette, self.cells), persistent=False)

    def forward(self, maskige):
        x = maskige.float() * 255  # (B, 3, H, W)
        xp = torch.einsum('bchw,kc->bkhw', x, self.palette)  # (B, K, H, W)
        d = (x * x).sum(1, keepdim=True) - 2 * xp + (self.palette ** 2).sum(1)[:, None, None]  # squared distances
        return -d / self.tau

    @torch.no_grad()
    def labels(self, maskige, chunk=COLOUR_CHUNK):
        """argmin_k ||255 x - p_k||^2 -> (B, H, W) long, identical to the official broadcast over all K (same float
        formula, first index wins ties) at a fraction of the cost: each pixel is compared only with the M candidate
        colours of its box of the RGB cube (_candidate_table); pixels outside the cube compare with all K."""
        B, _, H, W = maskige.shape
        out = torch.empty(B, H, W, dtype=torch.long, device=maskige.device)
        n = self.cells
        for b, rows, xc in _chunks(maskige, chunk):
            xc = xc.t().float() * 255  # (c, 3)
            box = (xc * (n / 255)).long().clamp(0, n - 1)  # (c, 3)
            cand = self.candidates[(box[:, 0] * n + box[:, 1]) * n + box[:, 2]]  # (c, M)
            d = _sq_dist(xc[:, None], self.palette[cand])  # (c, M)
            best = cand.gather(1, d.argmin(1, keepdim=True))[:, 0]  # (c,)
            outside = ((xc < 0) | (xc > 255)).any(1)  # (c,)
            if outside.any():
                best[outside] = _sq_dist(xc[outside, None], self.palette).argmin(1)
            out[b, rows] = best.view(-1, W)
        return out

# (end of the speed path)


class LeastSquares(nn.Module):
    """The paper's linear inverse (appendix A.2, Eq. 15): c_hat = x gamma with gamma = (beta^T beta)^-1 beta^T (3, K),
    beta = palette / 255 in maskige units. A rank-3 map: for K > 3 a class whose gamma column is not on the convex
    hull never wins the argmax, hence measured against NearestColour in bench.py inverse."""

    def __init__(self, palette):
        super().__init__()
        beta = palette.double().reshape(-1, 3) / 255  # (K, 3)
        self.register_buffer('gamma', (torch.linalg.inv(beta.t() @ beta) @ beta.t()).float())  # (3, K)

    def forward(self, maskige):
        return torch.einsum('bchw,ck->bkhw', maskige.float(), self.gamma)  # (B, K, H, W)


class FTInverse(nn.Module):
    """GSS-FT's non-linear inverse (appendix D iii): conv 1x1 -> conv 3x3 -> conv 1x1 with ReLUs (also GSS-TT's)."""

    def __init__(self, num_classes, hidden=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv3 = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, maskige):
        x = F.relu(self.conv1(maskige))  # (B, hidden, H, W)
        x = F.relu(self.conv2(x))  # (B, hidden, H, W)
        return self.conv3(x)  # (B, K, H, W)


class FTWInverse(nn.Module):
    """GSS-FT-W's inverse (generative_segmentation_head_ftw.py): 1x1 conv 3->128 (no bias) + BN + ReLU, Swin blocks
    (4 heads, window 7, FFN 2x; depth 1 Cityscapes, 2 ADE), LayerNorm, 1x1 conv to K, at the maskige's resolution."""

    def __init__(self, num_classes, depth=2, dim=128, num_heads=4, window_size=7):
        super().__init__()
        self.projection = nn.Conv2d(3, dim, 1, bias=False)
        self.projection_bn = nn.BatchNorm2d(dim)
        self.blocks = swin.SwinStage(dim, depth, num_heads, window_size, mlp_ratio=2.0)
        self.norm = nn.LayerNorm(dim)
        self.cls = nn.Conv2d(dim, num_classes, 1)

    def forward(self, maskige):
        x = F.relu(self.projection_bn(self.projection(maskige)))  # (B, C, H, W)
        x, _ = self.blocks(x.permute(0, 2, 3, 1))  # (B, H, W, C)
        return self.cls(self.norm(x).permute(0, 3, 1, 2))  # (B, K, H, W)


def build_inverse(posterior):
    """The X^-1 module of a stage-I artifact (load_posterior). GSS-TF keeps GSS-FF's inverse (nearest colour, which
    is what the official code runs for the paper's 'least squares') on its learned beta; lstsq is Eq. 15 literally."""
    palette = torch.tensor(posterior['palette'])
    variant, cfg = posterior['variant'], posterior['inverse_config']
    if variant in ('ff', 'ff-r', 'tf'):
        return NearestColour(palette)
    if variant == 'lstsq':
        return LeastSquares(palette)
    inverse = FTInverse(len(palette), **cfg) if variant in ('ft', 'tt') else FTWInverse(len(palette), **cfg)
    inverse.load_state_dict(posterior['inverse'])
    return inverse.eval()


def resize_one_hot(labels, num_classes, size):
    """F.interpolate(one_hot(labels), size, mode='bilinear', align_corners=False) for labels (B, H, W) -> (B, K, *size)
    without the (B, K, H, W) one-hot: each output pixel adds the bilinear weights of its 4 source taps to their
    classes (4 scatter-adds at the output size). Same source indices and weights as PyTorch's kernel."""
    B, H, W = labels.shape
    taps = []
    for n_in, n_out in ((H, size[0]), (W, size[1])):
        dst = torch.arange(n_out, device=labels.device, dtype=torch.float32)
        src = ((dst + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)  # source coordinate of each output pixel
        i0 = src.floor().long().clamp(max=n_in - 1)
        frac = src - i0
        taps.append(((i0, 1 - frac), ((i0 + 1).clamp(max=n_in - 1), frac)))  # (index, weight) x 2 per axis
    scores = torch.zeros(B, num_classes, *size, device=labels.device)
    for iy, wy in taps[0]:
        for ix, wx in taps[1]:
            scores.scatter_add_(1, labels[:, iy][:, :, ix][:, None], (wy[:, None] * wx[None]).expand(B, 1, *size))
    return scores


def maskige_scores(inverse, maskige, size):
    """X^-1 then the official bilinear resize to `size` (forward_test of the heads) -> (B, K, *size): nearest colour
    resizes its one-hot (a smoothed majority vote; resize_one_hot), learned inverses their logits."""
    if isinstance(inverse, NearestColour):
        return resize_one_hot(inverse.labels(maskige), len(inverse.palette), tuple(size))
    scores = inverse(maskige)  # (B, K, H, W)
    if tuple(scores.shape[-2:]) != tuple(size):
        scores = F.interpolate(scores, size=tuple(size), mode='bilinear', align_corners=False)
    return scores


# GSS-TF / GSS-TT (appendix A.2): beta trained through the frozen tokenizer

def seed_of(*numbers):
    """A well-mixed 32-bit seed for a tuple of non-negative integers."""
    return int(np.random.SeedSequence(numbers).generate_state(1)[0])


def keyed(fn, seeds, tag, *batches):
    """fn on each sample alone (batches of one), torch's RNG seeded by (the sample's seed, tag) -> the results
    concatenated: the random draws are keyed by the sample, so 2 ranks x b images draw what 1 rank x 2b images draw,
    and a resumed run what the uninterrupted one drew."""
    out = []
    for seed, *samples in zip(seeds.tolist(), *batches):
        torch.manual_seed(seed_of(seed, tag))
        out.append(fn(*(x[None] for x in samples)))
    return torch.cat(out)


def paint_soft(beta, ignore_colour, labels):
    """X with a trainable beta (K, 3) in [0, 1]: labels (B, H, W) -> maskige (B, 3, H, W), differentiable in beta."""
    table = torch.cat([beta, ignore_colour.to(beta)[None] / 255])  # (K+1, 3)
    return F.embedding(labels.clamp(max=len(beta)), table).permute(0, 3, 1, 2)


def relaxed_roundtrip(tok, maskige, seeds):
    """Encoder logits -> hard Gumbel-softmax (argmax forward, straight-through gradients; Sec. 3.3; the paper gives no
    temperature, we use 1), its noise keyed by the samples' seeds -> decode_soft."""
    logits = tok.encoder_logits(maskige)  # (B, vocab, h, w)
    z = keyed(lambda x: F.gumbel_softmax(x, tau=1.0, hard=True, dim=1), seeds, 2, logits)  # one-hots, same shape
    return tok.decode_soft(z)  # (B, 3, H, W)


def tf_loss(beta, maskige, recon, labels):
    """The GSS-TF objective of appendix A.2 (Eqs. 11-12, cascaded): (||X^ - C beta|| ||gamma_t|| +
    ||C beta gamma_t - C||)^2 with gamma_t = (beta^T beta)^-1 beta^T (Eq. 15) held fixed for the step. Norms are
    root-mean-squares over the labelled pixels, so the loss does not grow with the batch."""
    K = len(beta)
    valid = labels < K  # (B, H, W)
    gamma = LeastSquares(beta.detach() * 255).gamma  # (3, K); LeastSquares takes 0-255 colours
    recon_err = ((recon - maskige) ** 2).sum(1)[valid].mean().sqrt()  # ||X^ - C beta||
    per_class = ((beta @ gamma - torch.eye(K, device=beta.device)) ** 2).sum(1)  # (K,) ||beta_c gamma - e_c||^2
    fit_err = per_class[labels[valid]].mean().sqrt()  # ||C beta gamma - C||
    return (recon_err * gamma.norm() + fit_err) ** 2


# ----------------------------------------------------------------------------------------------------------
# 3. Tokenizer: the frozen VQ-VAE of Eq. 5 (DALL-E dVAE architecture, dall_e package) over maskiges

LOGIT_LAPLACE_EPS = 0.1  # dall_e.utils.logit_laplace_eps: map_pixels x -> 0.8 x + 0.1, unmap clamps back

# Memory path: the lean dVAE executor (_conv, _relu_conv, _residual_stack). Its plain equivalent, tested
# to 1e-5 (test_convert_dalle_pickles_reload_identically, test_tokenizer_memory_paths_match_plain_autograd_paths):
#     encoder(map_pixels(x)), decoder(one_hot(tokens))  # the dall_e modules themselves
CHANNELS_LAST = torch.channels_last  # the tokenizer's convs run on (B, H, W, C)-ordered tensors: oneDNN's fast path
# (measured here: encode of 16 synthetic 128x128 maskiges 1.44 s -> 0.93 s on 2 CPU threads, same tokens)


def _conv(conv, x):
    """A dall_e Conv2d (params w, b) applied in x's dtype: float32 on every device (dall_e casts to fp16 on CUDA)."""
    return F.conv2d(x, conv.w.to(x.dtype), conv.b.to(x.dtype), padding=(conv.kw - 1) // 2)


def _relu_conv(conv, x, out=None, alpha=1.0, channels=None, keep_input=False, dtype=None):
    """conv(relu(x)) for a dall_e Conv2d (optionally only its first `channels` outputs) computed in `dtype` (default
    x's), or out += alpha * that when `out` is given. Without autograd: ReLU in place unless keep_input, and when the
    result would be a second full-size tensor (keep_input, or accumulating into out) the conv runs over strips of
    rows, each with its halo, so neither relu(x) nor the conv output ever exists at full size."""
    dtype = dtype or x.dtype
    w, b = conv.w[:channels].to(dtype), conv.b[:channels].to(dtype)
    p = (conv.kw - 1) // 2
    if torch.is_grad_enabled():
        y = F.conv2d(F.relu(x).to(dtype), w, b, padding=p)
        return y if out is None else out + alpha * y
    if not keep_input:
        x = x.relu_()
        if out is None:
            return F.conv2d(x.to(dtype), w, b, padding=p)
    B, C, H, W = x.shape
    if out is None:
        out, alpha = torch.empty(B, len(w), H, W, dtype=dtype, device=x.device, memory_format=CHANNELS_LAST), None
    rows = max(1, STRIP_ELEMENTS // (B * max(C, len(w)) * W))
    for r0 in range(0, H, rows):
        r1 = min(r0 + rows, H)
        lo, hi = max(r0 - p, 0), min(r1 + p, H)  # the strip and its halo rows
        s = x[:, :, lo:hi].to(dtype, copy=keep_input)  # (B, C, hi - lo, W)
        y = F.conv2d(s.relu_() if keep_input else s, w, b, padding=p)[:, :, r0 - lo:r1 - lo]  # (B, n_out, r1-r0, W)
        if alpha is None:  # (the zero padding at the strip's inner edges only reaches the halo rows' outputs)
            out[:, :, r0:r1] = y
        else:
            out[:, :, r0:r1].add_(y, alpha=alpha)
    return out


def _residual_stack(blocks, x, dtype):
    """A dall_e Encoder/Decoder's groups by hand, each intermediate freed early: block = id_path(x) + post_gain *
    res_path(x). A nearest 2x upsample moves past the next 1x1 id_path and conv_1 (they commute), so the wide tensor
    never exists at the high resolution. The stream x stays float32 (bf16 would lose the small post_gain updates)."""
    upsample = False
    for group in (blocks.group_1, blocks.group_2, blocks.group_3, blocks.group_4):
        for layer in group.children():
            if isinstance(layer, nn.MaxPool2d):
                x = F.max_pool2d(x, 2)
                continue
            if isinstance(layer, nn.Upsample):
                upsample = True
                continue
            r = layer.res_path
            h = _relu_conv(r.conv_1, x, keep_input=True, dtype=dtype)  # (B, n_hid, H, W); x still needed
            x = x if isinstance(layer.id_path, nn.Identity) else _conv(layer.id_path, x)  # (B, n_out, H, W)
            if upsample:
                h = F.interpolate(h, scale_factor=2.0, mode='nearest')  # (B, n_hid, 2H, 2W)
                x = F.interpolate(x, scale_factor=2.0, mode='nearest')  # (B, n_out, 2H, 2W)
                upsample = False
            h = _relu_conv(r.conv_2, h)
            h = _relu_conv(r.conv_3, h)
            x = _relu_conv(r.conv_4, h, out=x, alpha=layer.post_gain)  # x + post_gain * conv_4(relu(h))
            del h
    if upsample:
        x = F.interpolate(x, scale_factor=2.0, mode='nearest')
    return x

# (end of the memory path)


class Tokenizer(nn.Module):
    """Frozen dVAE of Eq. 5 (DALL-E's architecture): maskige (B, 3, H, W) in [0, 1] <-> tokens (B, H/8, W/8).
    Always eval, float32, autocast off; dtype=torch.bfloat16: bf16 residual branches (half the memory; CUDA, AMX)."""

    def __init__(self, encoder, decoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.vocab_size = decoder.vocab_size
        self.info = {}
        self.requires_grad_(False)
        self.to(memory_format=CHANNELS_LAST)  # conv weights (O, kh, kw, I)-ordered; load_state_dict keeps that
        self.eval()

    def train(self, mode=True):  # frozen: stays in eval mode inside a model that is being trained
        return super().train(False)

    def encoder_logits(self, maskige):
        """Encoder logits (B, vocab, H/8, W/8), differentiable w.r.t. the maskige (GSS-TF/TT, tokenizer training)."""
        with torch.autocast(maskige.device.type, enabled=False):
            x = self._encoder_trunk(maskige)  # (B, 8 n_hid, H/8, W/8)
            return _relu_conv(self.encoder.blocks.output.conv, x).float()  # (B, vocab, H/8, W/8)

    def _encoder_trunk(self, maskige, dtype=torch.float32):
        """map_pixels, the encoder's first conv and groups: (B, 3, H, W) -> (B, 8 n_hid, H/8, W/8) float32."""
        x = (1 - 2 * LOGIT_LAPLACE_EPS) * maskige.to(dtype) + LOGIT_LAPLACE_EPS  # dall_e's map_pixels
        x = _conv(self.encoder.blocks.input, x.contiguous(memory_format=CHANNELS_LAST)).float()  # (B, n_hid, H, W)
        return _residual_stack(self.encoder.blocks, x, dtype)  # the residual stream stays float32

    @torch.no_grad()
    def encode(self, maskige, dtype=torch.float32, max_pixels=ENCODE_PIXELS):
        """Tokens = argmax of the encoder logits (official get_codebook_indices) -> (B, H/8, W/8) long. Runs over
        micro-batches of at most max_pixels pixels (one image for 512x512 and larger), and the final 1x1 conv to
        vocab logits runs per strip of token rows with the argmax, so the (B, vocab, h, w) logits never exist."""
        with torch.autocast(maskige.device.type, enabled=False):
            tokens = []
            for x in _micro_batches(maskige, max_pixels):  # (b, 3, H, W)
                x = self._encoder_trunk(x, dtype)  # (b, 8 n_hid, h, w)
                conv, x = self.encoder.blocks.output.conv, x.relu_()
                rows = max(1, LOGIT_ELEMENTS // (x.shape[0] * self.vocab_size * x.shape[3]))
                tokens.append(torch.cat([_conv(conv, s).argmax(1) for s in x.split(rows, dim=2)], dim=1))
            return torch.cat(tokens)  # (B, h, w)

    def _decoder_trunk(self, x, dtype=torch.float32):
        """Decoder after its first conv: x (B, n_init, h, w) -> the 3 colour logits (B, 3, 8h, 8w), i.e. the
        logit-Laplace means (channels :3 of 6; the scale channels 3: are not computed)."""
        x = _residual_stack(self.decoder.blocks, x, dtype)  # (B, n_hid, 8h, 8w)
        return _relu_conv(self.decoder.blocks.output.conv, x, channels=3).float()  # (B, 3, 8h, 8w)

    @torch.no_grad()
    def decode(self, tokens, dtype=torch.float32, max_tokens=DECODE_TOKENS):
        """tokens (B, h, w) -> maskige (B, 3, 8h, 8w) in [0, 1] = unmap(sigmoid(colour logits)), over micro-batches
        of at most max_tokens tokens (one 64x64-token image). The one-hot first 1x1 conv is a gather of its columns."""
        conv = self.decoder.blocks.input
        table = conv.w[:, :, 0, 0].t()  # (vocab, n_init)
        with torch.autocast(tokens.device.type, enabled=False):
            out = []
            for t in _micro_batches(tokens, max_tokens):  # (b, h, w)
                x = (F.embedding(t, table) + conv.b).permute(0, 3, 1, 2)  # (b, n_init, h, w), channels-last
                out.append(_unmap(torch.sigmoid(self._decoder_trunk(x, dtype))))
            return torch.cat(out)  # (B, 3, 8h, 8w)

    def decoder_logits(self, probs):
        """Differentiable: token probabilities or relaxed one-hots (B, vocab, h, w) -> colour logits (B, 3, 8h, 8w)
        (the official Dalle_VAE.forward feeds soft probabilities the same way; GSS-TF/TT, tokenizer training)."""
        with torch.autocast(probs.device.type, enabled=False):
            x = probs.float().contiguous(memory_format=CHANNELS_LAST)  # (B, vocab, h, w)
            return self._decoder_trunk(_conv(self.decoder.blocks.input, x))

    def decode_soft(self, probs):
        """Differentiable decode: (B, vocab, h, w) probabilities -> maskige (B, 3, 8h, 8w) in [0, 1]."""
        return _unmap(torch.sigmoid(self.decoder_logits(probs)))


def _unmap(x):
    """dall_e's unmap_pixels: [eps, 1 - eps] -> [0, 1], clamped."""
    return ((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)


def build_tokenizer(n_hid=64, vocab_size=512, n_init=128, n_blk_per_group=2):
    """A fresh tokenizer with dall_e's architecture (DALL-E's own: n_hid=256, vocab_size=8192, n_init=128, 2 blocks;
    the package requires n_hid >= 64 and vocab_size >= 512). Weights are dall_e's random init."""
    import dall_e  # here, not at the top: everything but the tokenizer works without the package
    return Tokenizer(dall_e.Encoder(n_hid=n_hid, n_blk_per_group=n_blk_per_group, vocab_size=vocab_size),
                     dall_e.Decoder(n_init=n_init, n_hid=n_hid, n_blk_per_group=n_blk_per_group, vocab_size=vocab_size))


def tokenizer_config(tok):
    return {'n_hid': tok.encoder.n_hid, 'vocab_size': tok.vocab_size, 'n_init': tok.decoder.n_init,
            'n_blk_per_group': tok.encoder.n_blk_per_group}


def reconstruct(tokenizer, labels, palette, ignore_colour):
    """X then the VQ round trip: labels (B, H, W), 255 painted with the ignore colour -> tokens at 1/8 -> decoded
    maskige (B, 3, 8(H//8), 8(W//8))."""
    return tokenizer.decode(tokenizer.encode(paint(labels, palette, ignore_colour)))


@torch.no_grad()
def recon_scores(tokenizer, inverse, labels, palette, ignore_colour, size=None, upsample=False):
    """The official maskige-reconstruction oracle (configs/gss/<dataset>/dalle_reconstruction_*.py): label maps
    (B, H, W) resized (nearest) to the test resolution `size`, reconstructed (tokens at 1/8), X^-1, scores resized
    back -> (B, K, H, W). upsample=True takes stage II's 2x path instead (tokens at 1/4 of the test resolution)."""
    src = labels
    if size is not None and tuple(size) != tuple(labels.shape[-2:]):  # mmseg resizes the GT with nearest, as here
        src = F.interpolate(labels[:, None].float(), size=tuple(size), mode='nearest')[:, 0].long()  # (B, h, w)
    if upsample:
        src = upsample_labels_2x(src)
    return maskige_scores(inverse, reconstruct(tokenizer, src, palette, ignore_colour), labels.shape[-2:])


# ----------------------------------------------------------------------------------------------------------
# 4. Image encoder I_psi: backbone -> MLA -> Swin blocks -> token logits at 1/4
#    (paper Sec. 3.4; configs/gss/_base_/models/*.py)

class ResNet(nn.Module):
    """torchvision ResNet-50/101 dilated like the official ResNet-V1c-D8 (configs/gss/_base_/models/gss-ff_r101.py):
    layer3 and layer4 trade their stride for dilation 2 and 4 (first block contracted), so levels 2-4 stay at stride 8.
    deep_stem: the V1c stem of three 3x3 convs (mmseg keys stem.0 ... stem.7), to load the official R101 files."""

    def __init__(self, depth, deep_stem=False):
        super().__init__()
        import torchvision  # here, not at the top: only the ResNet backbones need it
        net = getattr(torchvision.models, f'resnet{depth}')(replace_stride_with_dilation=[False, True, True])
        if deep_stem:
            self.stem = nn.Sequential(*[m for cin, cout, stride in ((3, 32, 2), (32, 32, 1), (32, 64, 1)) for m in (
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))])
        else:
            self.stem = nn.Sequential(net.conv1, net.bn1, net.relu)
        self.maxpool = net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.channels = [256, 512, 1024, 2048]

    def forward(self, x):
        """(B, 3, H, W) -> 4 levels (B, C_i, ceil(H/s), ceil(W/s)) at strides s = 4, 8, 8, 8."""
        x = self.maxpool(self.stem(x))  # (B, 64, H/4, W/4)
        outs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outs.append(x)
        return outs


BACKBONES = [*swin.SWIN_PRESETS, 'resnet50', 'resnet101', 'resnet50_v1c', 'resnet101_v1c']


def build_backbone(name, pretrained=None):
    """-> (module mapping images (B, 3, H, W) to 4 feature levels, their channels). Swin presets of swin.py
    (the paper's main backbone: swin_l) or dilated ResNets; pretrained: a local ImageNet file (official,
    torchvision or mmseg layout)."""
    if name in swin.SWIN_PRESETS:
        model = swin.build_swin(name, drop_path_rate=0.3)  # official gss-ff_swin-l.py
        if pretrained:
            missing, unexpected = _load_swin(model, load_file(pretrained, 'Swin checkpoint'), pretrained)
            missing = [k for k in missing if not k.startswith(('norm0.', 'norm1.', 'norm2.', 'norm3.'))]  # new norms
            if missing or unexpected:
                raise UserError(f"{pretrained}: {_key_report(missing, unexpected)}; expected a {name} checkpoint")
    elif name in BACKBONES:
        model = ResNet(int(name.removesuffix('_v1c')[len('resnet'):]), deep_stem=name.endswith('_v1c'))
        if pretrained:
            sd = load_file(pretrained, 'ResNet checkpoint')
            sd = sd.get('state_dict', sd)
            sd = {k.removeprefix('backbone.'): v for k, v in sd.items() if not k.startswith('fc.')}
            for old, new in (('conv1.', 'stem.0.'), ('bn1.', 'stem.1.')):  # torchvision names of the 7x7 stem
                sd = {new + k[len(old):] if k.startswith(old) else k: v for k, v in sd.items()}
            _load_strict(model, sd, pretrained)
    else:
        raise UserError(f"--backbone: unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
    return model, model.channels


class ConvBNReLU(nn.Module):
    """1x1 conv (no bias) + BatchNorm + ReLU: mmcv's ConvModule as the official head uses it."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        nn.init.kaiming_normal_(self.conv.weight, mode='fan_out', nonlinearity='relu')  # mmcv ConvModule init

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class MLA(nn.Module):
    """Multi-Level Aggregation (feature_aggregation of generative_segmentation_head_ff.py): per level 1x1 conv + BN +
    ReLU, bilinear resize to the stride-4 level, concat, 1x1 conv + BN + ReLU. Levels in natural order (the official
    in_index=[1, 0, 2, 3] order is undone when its checkpoints are loaded)."""

    def __init__(self, in_channels, channels, out_channels):
        super().__init__()
        self.convs = nn.ModuleList([ConvBNReLU(c, channels) for c in in_channels])
        self.fusion = ConvBNReLU(len(in_channels) * channels, out_channels)

    def forward(self, feats):
        """4 levels (B, C_i, h_i, w_i) -> (B, out_channels, h_0, w_0)."""
        size = feats[0].shape[-2:]
        x = [F.interpolate(conv(f), size, mode='bilinear', align_corners=False) for conv, f in zip(self.convs, feats)]
        return self.fusion(torch.cat(x, 1))  # (B, 4 * channels, h, w) -> (B, out_channels, h, w)


class GSSHead(nn.Module):
    """Token head: MLA -> D Swin blocks -> LayerNorm -> 1x1 conv + BN + ReLU -> Dropout2d -> conv_seg to the vocabulary
    (GenerativeSegHeadFF), and the unlabeled-area auxiliary head p_xi (Sec. 3.4): a separate MLA -> 1x1 conv to K."""

    def __init__(self, in_channels, c):  # c: a GSSConfig
        super().__init__()
        self.tokens = c.tokens
        self.mla = MLA(in_channels, c.mla_channels, c.fused_channels)
        self.blocks = swin.SwinStage(c.fused_channels, c.depth, c.num_heads, c.window_size, mlp_ratio=2.0)  # FFN 2x
        self.swin_norm = nn.LayerNorm(c.fused_channels)
        self.conv_before_seg = ConvBNReLU(c.fused_channels, c.token_channels)
        self.dropout = nn.Dropout2d(c.dropout)
        self.conv_seg = nn.Conv2d(c.token_channels, c.vocab_size, 1)
        self.aux_mla = MLA(in_channels, c.mla_channels, c.mla_channels)
        self.aux_cls = nn.Conv2d(c.mla_channels, c.num_classes, 1)
        for conv in (self.conv_seg, self.aux_cls):  # mmseg BaseDecodeHead.init_weights
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def token_features(self, feats):
        """4 levels -> (B, token_channels, h, w) at stride d = tokens (4, or 8: the MLA output average-pooled 2x),
        after dropout: conv_seg's input."""
        x = self.mla(feats)  # (B, fused, H/4, W/4)
        x = (x if self.tokens == 4 else F.avg_pool2d(x, 2, ceil_mode=True)).permute(0, 2, 3, 1)  # (B, h, w, fused)
        x = self.swin_norm(self.blocks(x)[0])  # (B, h, w, fused)
        return self.dropout(self.conv_before_seg(x.permute(0, 3, 1, 2).contiguous()))  # (B, token_channels, h, w)

    def aux_logits(self, feats):
        """4 levels -> (B, K, h, w) per-pixel class logits at stride 4."""
        return self.aux_cls(self.aux_mla(feats))

    def forward(self, feats):
        return self.token_features(feats), self.aux_logits(feats)


@dataclasses.dataclass
class GSSConfig:
    """The image encoder's shape (GSS-FF Swin-L on ADE20K by default); checkpoints store it as a plain dict."""
    backbone: str = 'swin_l'
    num_classes: int = 150
    vocab_size: int = 8192
    mla_channels: int = 384
    fused_channels: int = 512
    token_channels: int = 2048
    depth: int = None  # None: paper's D = 2 for Swin, 6 for ResNet-101; 0 = Table 3's "without MLA" (MLP only)
    tokens: int = 4  # token stride d (Table 3): 4 = tokens of the 2x-upsampled GT (official); 8 = of the 1x GT
    aux_fill: bool = True  # Table 3 "Unlabel": unlabeled pixels take the aux head's argmax; False: the ignore colour
    num_heads: int = 16
    window_size: int = 7
    dropout: float = 0.1

    def __post_init__(self):
        if self.depth is None:
            self.depth = 6 if self.backbone.startswith('resnet') else 2
        if self.tokens not in (4, 8):
            raise UserError(f"--model-config tokens={self.tokens}: expected 4 or 8 (tokens at 1/4 or 1/8 of the image)")


class GSS(nn.Module):
    """The image encoder I_psi: backbone + GSSHead. self.config, a plain dict, rebuilds it: GSS.from_config."""

    def __init__(self, config, pretrained=None):
        super().__init__()
        self.config = dataclasses.asdict(config)
        self.backbone, channels = build_backbone(config.backbone, pretrained)
        self.head = GSSHead(channels, config)

    @classmethod
    def from_config(cls, config, pretrained=None):
        return cls(GSSConfig(**config), pretrained)

    def forward(self, images):
        """(B, 3, H, W) -> (token features (B, token_channels, H/4, W/4), aux logits (B, K, H/4, W/4))."""
        return self.head(self.backbone(images))


# ----------------------------------------------------------------------------------------------------------
# 5. Targets and losses (paper Eq. 7 as generative_segmentation_head_ff.py computes it)

# Memory path: chunked token cross-entropy (TokenCrossEntropy, token_argmax, over _chunks). Its plain
# equivalents, tested (test_token_cross_entropy_equals_naive):
#     F.cross_entropy(conv(feats), target, ignore_index=ignore_index), conv(feats).argmax(1)

class TokenCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of a 1x1 conv's logits over non-ignored positions, one chunk of (n, V) logits at a time. The
    loss ends the graph: gradients are computed in forward while the logits are at hand, backward only scales them."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, ignore_index, chunk, with_grad):
        W = weight.flatten(1)  # (V, C)
        valid = target != ignore_index  # (B, h, w)
        loss = torch.zeros((), device=x.device)
        correct = torch.zeros((), dtype=torch.long, device=x.device)
        if with_grad:  # gradients of the summed loss; backward divides by the count (fp16-safe magnitudes)
            gx = torch.empty_like(x)
            gw, gb = W.new_zeros(W.shape, dtype=torch.float32), W.new_zeros(W.shape[0], dtype=torch.float32)
        for b, rows, xc in _chunks(x, chunk):
            t, m = target[b, rows].flatten(), valid[b, rows].flatten()  # (n,)
            logits = torch.addmm(bias, xc.t(), W.t()).float()  # (n, V); the matmul follows autocast
            tc = t.clamp(max=W.shape[0] - 1)[:, None]  # (n, 1); ignored rows are masked below
            target_logit, top = logits.gather(1, tc)[:, 0], logits.argmax(1)  # (n,)
            peak = logits.amax(1, keepdim=True)  # (n, 1)
            e = logits.sub_(peak).exp_()  # (n, V) exp(logits - peak), in place
            total = e.sum(1)  # (n,)
            loss += ((peak[:, 0] + total.log() - target_logit) * m).sum()  # logsumexp - target logit
            correct += ((top == t) & m).sum()
            if with_grad:  # d loss_sum / d logits = softmax - onehot(t) on valid rows, 0 elsewhere
                g = e.mul_((m / total)[:, None]).scatter_add_(1, tc, -m[:, None].float()).to(x.dtype)  # (n, V)
                gx[b, :, rows] = (W.t() @ g.t()).view(x.shape[1], -1, x.shape[3])  # (C, rows, w)
                gw += g.t() @ xc.t()  # (V, C)
                gb += g.sum(0)  # (V,)
        ctx.count = valid.sum().clamp(min=1)  # a mean over valid positions (official avg_non_ignore=True)
        ctx.grads = (gx, gw.view_as(weight), gb) if with_grad else None
        ctx.mark_non_differentiable(correct)
        return loss / ctx.count, correct

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_correct):
        if ctx.grads is None:
            raise RuntimeError("token_cross_entropy: backward without gradients (called under no_grad, or twice)")
        (gx, gw, gb), ctx.grads = ctx.grads, None  # freed after use: a second backward is an error, not a silent one
        scale = grad_loss / ctx.count
        return gx.mul_(scale), gw.mul_(scale), gb.mul_(scale), None, None, None, None


def token_cross_entropy(feats, conv, target, ignore_index, chunk=TOKEN_CHUNK):
    """F.cross_entropy(conv(feats), target, ignore_index) (mean over valid positions) computed in chunks of
    positions, and the number of correct argmax tokens there. feats (B, C, h, w), target (B, h, w) long."""
    with_grad = torch.is_grad_enabled() and (feats.requires_grad or conv.weight.requires_grad)
    return TokenCrossEntropy.apply(feats, conv.weight, conv.bias, target, ignore_index, chunk, with_grad)


@torch.no_grad()
def token_argmax(feats, conv, chunk=TOKEN_CHUNK):
    """argmax over the vocabulary of conv(feats), chunk by chunk: (B, C, h, w) -> tokens (B, h, w)."""
    W = conv.weight.flatten(1)  # (V, C)
    tokens = torch.empty(feats.shape[0], *feats.shape[2:], dtype=torch.long, device=feats.device)
    for b, rows, xc in _chunks(feats, chunk):
        tokens[b, rows] = torch.addmm(conv.bias, xc.t(), W.t()).argmax(1).view(-1, feats.shape[3])
    return tokens

# (end of the memory path)


@torch.no_grad()
def token_targets(tokenizer, palette, labels2x, aux2x, fill=True):
    """The official token targets (forward_train of generative_segmentation_head_ff.py): unlabeled (255) pixels of the
    2x labels take the auxiliary head's argmax (c~ = M_u c_bar + (1 - M_u) c, Sec. 3.4), then paint and tokenize; a
    token whose whole 8x8 block is unlabeled gets the ignore index tokenizer.vocab_size. fill=False (Table 3 without
    "Unlabel"): they keep 255 and get ignore_colour_for(palette), as in the reconstruction oracle.
    labels2x (B, 2H, 2W), aux2x (B, K, 2H, 2W), palette (K, 3) -> (tokens (B, H/4, W/4), composed (B, 2H, 2W))."""
    unlabeled = labels2x == 255  # (B, 2H, 2W)
    composed = torch.where(unlabeled, aux2x.argmax(1), labels2x) if fill else labels2x  # (B, 2H, 2W)
    tokens = tokenizer.encode(paint(composed, palette, ignore_colour_for(palette)))  # (B, H/4, W/4); float32
    labeled = F.max_pool2d((~unlabeled)[:, None].float(), 8)[:, 0] > 0  # (B, H/4, W/4): any labeled pixel
    return tokens.masked_fill(~labeled, tokenizer.vocab_size), composed


def compute_loss(model, tokenizer, palette, images, labels):
    """Stage-II loss: 0.8 x token CE (ignore = vocab_size) + 0.2 x auxiliary pixel CE at fH x fW (ignore 255), each a
    mean over valid elements (the fork's mmseg/models/losses/cross_entropy_loss.py: avg_non_ignore=True).
    images (B, 3, H, W), labels (B, H, W), palette (K, 3) -> (loss, logs: loss_token and loss_aux weighted as the
    official loss_ce and loss_ce_pixel, acc_token and acc_aux in percent; 0-d float64 tensors on the loss's device)."""
    H, W = images.shape[-2:]
    m = getattr(model, 'module', model)  # through a DDP wrapper
    d, f = m.head.tokens, 8 // m.head.tokens  # tokens at 1/d of the image = 1/8 of the labels at f x (Table 3)
    if H % d or W % d:
        raise UserError(f"training crop {H}x{W}: expected sides that are multiples of {d} (tokens sit at 1/{d})")
    feats, aux = model(images)  # (B, C, H/d, W/d), (B, K, H/4, W/4)
    aux = F.interpolate(aux, (f * H, f * W), mode='bilinear', align_corners=False)  # (B, K, fH, fW)
    labels_f = upsample_labels_2x(labels) if f == 2 else labels  # (B, fH, fW)
    targets, _ = token_targets(tokenizer, palette, labels_f, aux, m.config['aux_fill'])  # (B, H/d, W/d)
    loss_token, correct = token_cross_entropy(feats, m.head.conv_seg, targets, tokenizer.vocab_size)
    valid = labels_f != 255  # (B, fH, fW)
    loss_aux = F.cross_entropy(aux, labels_f, ignore_index=255, reduction='sum') / valid.sum().clamp(min=1)
    loss = 0.8 * loss_token + 0.2 * loss_aux
    count = lambda mask: mask.sum().double()  # float64 as Python's: the figures .item() logged, without its host sync
    logs = dict(loss_token=0.8 * loss_token.detach().double(), loss_aux=0.2 * loss_aux.detach().double(),
                acc_token=100.0 * correct.double() / count(targets != tokenizer.vocab_size).clamp(min=1),
                acc_aux=100.0 * count((aux.argmax(1) == labels_f) & valid) / count(valid).clamp(min=1))
    return loss, logs


# ----------------------------------------------------------------------------------------------------------
# 6. Generative inference (paper Sec. 3.5; mmseg/models/segmentors/encoder_decoder.py)

def slide_windows(H, W, crop, stride):
    """mmseg's slide_inference windows [(y1, y2, x1, x2)]: a grid at `stride`, the last window snapped to the
    border, windows clipped to images smaller than the crop. crop, stride: int or (h, w)."""
    (ch, cw), (sh, sw) = [(v, v) if isinstance(v, int) else tuple(v) for v in (crop, stride)]
    boxes = []
    for i in range(max(H - ch + sh - 1, 0) // sh + 1):
        for j in range(max(W - cw + sw - 1, 0) // sw + 1):
            y2, x2 = min(i * sh + ch, H), min(j * sw + cw, W)
            boxes.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return boxes


def infer(window_fn, images, mode='whole', crop=None, stride=None):
    """Whole image, or mmseg's sliding windows: each of window_fn's maps ({name: (B, C, f h, f w)}, f = 1 for class
    scores, 2 for the maskige) summed into its canvas (B, C, f H, f W), divided by the overlap count."""
    if mode == 'whole':
        return window_fn(images)
    if mode != 'slide' or crop is None or stride is None:
        raise UserError(f"--mode {mode}: expected 'whole', or 'slide' with a crop and a stride")
    B, _, H, W = images.shape
    out, count = {}, images.new_zeros(1, 1, H, W)
    for y1, y2, x1, x2 in slide_windows(H, W, crop, stride):
        for name, s in window_fn(images[:, :, y1:y2, x1:x2]).items():  # (B, C, f (y2-y1), f (x2-x1))
            f = s.shape[2] // (y2 - y1)
            if name not in out:
                out[name] = torch.zeros(B, s.shape[1], f * H, f * W, device=s.device)  # float32 sums
            out[name][:, :, f * y1:f * y2, f * x1:f * x2] += s
        count[:, :, y1:y2, x1:x2] += 1
    return {name: o / F.interpolate(count, o.shape[2:], mode='nearest') for name, o in out.items()}


@torch.no_grad()
def predict(model, tokenizer, inverse, images, mode='whole', crop=None, stride=None):
    """Generative inference: image -> tokens (argmax) -> tokenizer.decode -> maskige at 2H x 2W -> X^-1 -> class
    scores resized to the input (maskige_scores): (B, 3, H, W) -> (B, K, H, W). Put the modules in eval mode."""
    window_fn = lambda x: {'': maskige_scores(inverse, generate(model, tokenizer, x), x.shape[-2:])}  # (B, K, h, w)
    return infer(window_fn, images, mode, crop, stride)['']


@torch.no_grad()
def generate(model, tokenizer, images, feats=None):
    """The generated maskige: image (B, 3, H, W) -> token logits -> argmax -> tokenizer.decode -> (B, 3, fH, fW),
    f = 8 / d: 2 (tokens at 1/4), 1 (at 1/8). feats: the backbone's features of `images`, when already computed."""
    model = getattr(model, 'module', model)  # through a DDP wrapper
    feats = model.backbone(images) if feats is None else feats
    tokens = token_argmax(model.head.token_features(feats), model.head.conv_seg)  # (B, ceil(H/d), ceil(W/d))
    return crop_maskige(model, tokenizer.decode(tokens), images.shape[-2:])


def crop_maskige(model, maskige, size):
    """A decoded maskige (B, 3, 8h, 8w) of tokens at 1/d of padded images, cropped to the images' `size` (H, W) at
    f = 8 / d: (B, 3, fH, fW), f = 2 for tokens at 1/4 (official), 1 at 1/8 (Table 3)."""
    f = 8 // getattr(model, 'module', model).head.tokens
    return maskige[:, :, :f * size[0], :f * size[1]]


# Beyond the paper: the token distribution that the argmax throws away, sampled, decoded softly and read
# as a per-pixel confidence; measured against the auxiliary head's softmax by `python bench.py confidence`.

@torch.no_grad()
def token_probs(model, feats, temperature=1.0, top_k=None):
    """The token distribution: softmax(logits / T) over the vocabulary, only the top_k largest logits kept; T = 0: the
    one-hot of generate's argmax (token_argmax, bit for bit). feats: the backbone's -> (B, V, h, w), h = H/4 (or /8)."""
    head = getattr(model, 'module', model).head
    x = head.token_features(feats)  # (B, C, h, w)
    if temperature == 0:
        return F.one_hot(token_argmax(x, head.conv_seg), head.conv_seg.out_channels).permute(0, 3, 1, 2).float()
    logits = head.conv_seg(x) / temperature  # (B, V, h, w), materialised (unlike token_argmax's chunks)
    if top_k:
        logits = logits.masked_fill(logits < logits.topk(top_k, 1).values[:, -1:], -math.inf)
    return logits.softmax(1)


def sample_tokens(probs, seeds, draws):
    """Token maps drawn from probs (B, V, h, w) by the Gumbel-max trick, one per index in `draws`, each keyed by (the
    image's seed, the index): the same tokens batched or one by one -> (len(draws), B, h, w) long."""
    gumbel_max = lambda p: (p.log() - torch.empty_like(p).exponential_().log()).argmax(1)  # (1, h, w), one draw ~ p
    return torch.stack([keyed(gumbel_max, seeds, n, probs) for n in draws])


def majority_vote(labels, num_classes):
    """labels (N, B, H, W) of N samples -> (their per-pixel majority (B, H, W), the fraction of the N that agree with
    it (B, H, W) in [1/N, 1]). Counts as (B, K, H, W), not a one-hot per sample; ties: torch.max's pick."""
    per_image = labels.transpose(0, 1)  # (B, N, H, W)
    counts = torch.zeros(labels.shape[1], num_classes, *labels.shape[2:], device=labels.device)  # (B, K, H, W)
    counts.scatter_add_(1, per_image, torch.ones_like(per_image, dtype=counts.dtype))
    top = counts.max(1)
    return top.indices, top.values / len(labels)


@torch.no_grad()
def sample_agreement(model, tokenizer, inverse, feats, size, n=8, temperature=1.0, top_k=5):
    """The confidence `bench.py confidence` picked: n token maps drawn at T from the top_k tokens (keyed by seed 0 and
    the draw: reproducible), decoded as one batch, each inverted; the fraction of them that agree with their per-pixel
    majority -> (B, 1, *size) in [1/n, 1]. feats: the backbone's of images of `size`."""
    probs = token_probs(model, feats, temperature, top_k)  # (B, V, h, w)
    tokens = sample_tokens(probs, torch.zeros(len(probs), dtype=torch.long), range(n))  # (n, B, h, w)
    maskiges = crop_maskige(model, tokenizer.decode(tokens.flatten(0, 1)), size)  # (n B, 3, fH, fW)
    labels = torch.stack([maskige_scores(inverse, m, size).argmax(1) for m in maskiges.split(len(probs))])
    return majority_vote(labels, int(labels.max()) + 1)[1][:, None]  # labels (n, B, *size): classes seen suffice


def aux_scores(model, feats, size):
    """The auxiliary head's per-pixel logits (B, K, h, w), h = ceil(H/4), upsampled 4x and cropped to size (H, W)."""
    a = getattr(model, 'module', model).head.aux_logits(feats)  # (B, K, h, w)
    a = F.interpolate(a, (4 * a.shape[2], 4 * a.shape[3]), mode='bilinear', align_corners=False)
    return a[:, :, :size[0], :size[1]]  # (B, K, H, W)


# ----------------------------------------------------------------------------------------------------------
# 7. The official checkpoints (fudan-zvg/GSS, mmseg 0.26) into these modules

OFFICIAL_NAMES = [  # (official decode_head.* name prefix, ours): the heads' _ff.py / _ftw.py
    ('convs.0.', 'head.mla.convs.1.'), ('convs.1.', 'head.mla.convs.0.'),  # in_index=[1, 0, 2, 3]: levels 1, 0 swap
    ('convs.2.', 'head.mla.convs.2.'), ('convs.3.', 'head.mla.convs.3.'), ('fusion_conv.', 'head.mla.fusion.'),
    ('transformer_block.', 'head.blocks.'), ('swin_ln.', 'head.swin_norm.'),
    ('conv_before_seg.', 'head.conv_before_seg.'), ('conv_seg.', 'head.conv_seg.'),
    ('convs_pixel.0.', 'head.aux_mla.convs.1.'), ('convs_pixel.1.', 'head.aux_mla.convs.0.'),
    ('convs_pixel.2.', 'head.aux_mla.convs.2.'), ('convs_pixel.3.', 'head.aux_mla.convs.3.'),
    ('fusion_conv_pixel.', 'head.aux_mla.fusion.'), ('conv_seg_pixel.', 'head.aux_cls.'),
    ('d_vae.', 'tokenizer.'),
    ('projection.conv.', 'inverse.projection.'), ('projection.bn.', 'inverse.projection_bn.'),  # FT-W's X^-1
    ('post_transformer_block.', 'inverse.blocks.'), ('post_swin_ln.', 'inverse.norm.'),
    ('cls_segmap.conv.', 'inverse.cls.'),
]
_SWIN_NAMES = [('.attn.', '.attn.w_msa.'), ('.mlp.fc1.', '.ffn.layers.0.0.'), ('.mlp.fc2.', '.ffn.layers.1.')]  # mmseg


def official_key(key):
    """Our 'head.*' / 'tokenizer.*' / 'inverse.*' state-dict key -> the official 'decode_head.*' key."""
    ours = next(p for p in OFFICIAL_NAMES if key.startswith(p[1]))
    key = ours[0] + key[len(ours[1]):]
    for a, b in _SWIN_NAMES:
        key = key.replace(a, b)
    return 'decode_head.' + key


def _window(table):
    """Window size of a Swin relative-position bias table ((2 ws - 1)^2, heads)."""
    return (math.isqrt(table.shape[0]) + 1) // 2


def _count(sd, prefix):
    """Number of numbered blocks under prefix ('x.blocks.' -> distinct i of 'x.blocks.i.*')."""
    return len({k[len(prefix):].split('.')[0] for k in sd if k.startswith(prefix)})


def official_config(sd):
    """GSS config of an official segmentor state dict, read from its shapes (configs/gss/_base_/models/*.py)."""
    try:
        if 'backbone.patch_embed.projection.weight' in sd:  # mmseg Swin
            stages = range(_count(sd, 'backbone.stages.'))
            tables = [sd[f'backbone.stages.{i}.blocks.0.attn.w_msa.relative_position_bias_table'] for i in stages]
            shape = (sd['backbone.patch_embed.projection.weight'].shape[0],
                     tuple(_count(sd, f'backbone.stages.{i}.blocks.') for i in stages),
                     tuple(t.shape[1] for t in tables), _window(tables[0]))
            presets = {(p['embed_dim'], tuple(p['depths']), tuple(p['num_heads']), p['window_size']): name
                       for name, p in swin.SWIN_PRESETS.items()}
            backbone = presets.get(shape)
            if backbone is None:
                raise UserError(f"official checkpoint: Swin backbone (embed, depths, heads, window) = {shape} "
                                f"matches no preset in swin.SWIN_PRESETS")
        elif 'backbone.stem.0.weight' in sd:  # mmseg ResNet-V1c
            backbone = 'resnet101_v1c' if _count(sd, 'backbone.layer3.') == 23 else 'resnet50_v1c'  # 23 or 6 blocks
        else:
            raise UserError("official checkpoint: no backbone.* keys of an mmseg Swin or ResNet-V1c; pass model=")
        table = sd['decode_head.transformer_block.blocks.0.attn.w_msa.relative_position_bias_table']
        K = sd.get('decode_head.conv_seg_pixel.weight', sd.get('decode_head.cls_segmap.conv.weight'))
        return dict(backbone=backbone, num_classes=K.shape[0], vocab_size=sd['decode_head.conv_seg.weight'].shape[0],
                    mla_channels=sd['decode_head.convs.0.conv.weight'].shape[0],
                    fused_channels=sd['decode_head.fusion_conv.conv.weight'].shape[0],
                    token_channels=sd['decode_head.conv_before_seg.conv.weight'].shape[0],
                    depth=_count(sd, 'decode_head.transformer_block.blocks.'), num_heads=table.shape[1],
                    window_size=_window(table), dropout=0.1)
    except (KeyError, AttributeError) as e:
        raise UserError(f"official checkpoint: not a GSS segmentor state dict (no {e})") from None


def load_official_checkpoint(checkpoint, model=None, variant=None):
    """An official GSS checkpoint (path, state dict or bare decode_head state dict) -> (model, tokenizer, FTWInverse
    or None for GSS-FF), strictly. model: load into this GSS (default: built from the shapes); variant: 'ff', 'ft-w'."""
    is_path = isinstance(checkpoint, (str, os.PathLike))
    what = os.fspath(checkpoint) if is_path else 'official checkpoint'
    sd = load_file(checkpoint, 'official GSS checkpoint') if is_path else checkpoint
    sd = sd.get('state_dict', sd)
    if not any(k.startswith(('decode_head.', 'backbone.')) for k in sd):  # the head's own state dict
        sd = {'decode_head.' + k: v for k, v in sd.items()}
    variant = variant or ('ft-w' if 'decode_head.cls_segmap.conv.weight' in sd else 'ff')
    model = GSS.from_config(official_config(sd)) if model is None else model
    try:
        tokenizer = build_tokenizer(n_hid=sd['decode_head.d_vae.encoder.blocks.input.w'].shape[0],
                                    vocab_size=sd['decode_head.d_vae.encoder.blocks.output.conv.w'].shape[0],
                                    n_init=sd['decode_head.d_vae.decoder.blocks.input.w'].shape[0])
        inverse = None
        if variant == 'ft-w':
            table = sd['decode_head.post_transformer_block.blocks.0.attn.w_msa.relative_position_bias_table']
            inverse = FTWInverse(model.config['num_classes'], dim=sd['decode_head.projection.conv.weight'].shape[0],
                                 depth=_count(sd, 'decode_head.post_transformer_block.blocks.'),
                                 num_heads=table.shape[1], window_size=_window(table))
    except KeyError as e:
        raise UserError(f"{what}: no {e}; expected an official GSS-{variant.upper()} checkpoint") from None
    _load_decode_head(sd, model, {'head': model.head, 'tokenizer': tokenizer, 'inverse': inverse}, variant, what)
    backbone = {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}
    if isinstance(model.backbone, swin.SwinTransformer):
        missing, unexpected = _load_swin(model.backbone, backbone, f"{what}: backbone")
        if missing or unexpected:
            raise UserError(f"{what}: backbone: {_key_report(missing, unexpected)}")
    elif backbone or model.backbone.state_dict():
        _load_strict(model.backbone, backbone, f"{what}: backbone")
    return model, tokenizer, inverse


def _load_decode_head(sd, model, parts, variant, what):
    """The official decode_head.* weights into our parts {'head', 'tokenizer', 'inverse' (or None)} by official_key,
    strictly: a UserError names every missing, unexpected or mis-shaped key."""
    parts = {p: m for p, m in parts.items() if m is not None}
    expected = {official_key(f'{p}.{k}'): (p, k, v.shape) for p, m in parts.items() for k, v in m.state_dict().items()}
    loaded = {p: {} for p in parts}
    unexpected, mismatched = [], []
    for key, v in sd.items():
        if key.startswith('backbone.') or key.endswith('relative_position_index'):  # loaded apart; recomputed buffers
            continue
        if key.startswith('decode_head.norm.'):  # stale LayerNorm of released files (GSS issue #12)
            continue
        if key not in expected:
            unexpected.append(key)
            continue
        p, k, shape = expected[key]
        if v.shape != shape:
            mismatched.append(f"{key} {tuple(v.shape)} vs ours {tuple(shape)}")
        else:
            loaded[p][k] = v
            if k.endswith('fusion.conv.weight'):  # (out, 4C, 1, 1): levels 0 and 1 swapped (in_index=[1, 0, 2, 3])
                c = v.shape[1] // 4
                loaded[p][k] = torch.cat([v[:, c:2 * c], v[:, :c], v[:, 2 * c:]], 1)
    missing = [key for key in expected if key not in sd]
    aux = [key for key in missing if 'pixel' in key]
    if variant == 'ft-w' and aux and len(aux) == sum('pixel' in key for key in expected):
        warnings.warn(f"{what}: no auxiliary head (an unmerged GSS-FT-W file); its scores (aux=True) are untrained")
        missing = [key for key in missing if 'pixel' not in key]
        own = model.head.state_dict()
        loaded['head'].update({k: v for k, v in own.items() if k.startswith(('aux_mla.', 'aux_cls.'))})
    if missing or unexpected or mismatched:
        raise UserError(f"{what}: {_key_report(missing, unexpected, mismatched)}; "
                        f"expected a GSS-{variant.upper()} checkpoint")
    for p, m in parts.items():
        m.load_state_dict(loaded[p])


# ----------------------------------------------------------------------------------------------------------
# 8. Files and validation: errors, safe loading, strict state dicts, tokenizer files, the stage-I artifact

DALLE_URLS = 'https://cdn.openai.com/dall-e/encoder.pkl and https://cdn.openai.com/dall-e/decoder.pkl'


class UserError(Exception):
    """A problem the user can fix (bad file, bad flag); CLIs print it as `error: ...` and exit 2."""


def save_atomic(obj, path):
    """torch.save to a temp file in the same directory, fsync, then os.replace: the old file stays intact until
    the new one is complete."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=os.path.basename(path) + '.', suffix='.tmp')
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file 0600; give it the permissions open() would
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_file(path, what):
    """torch.load(weights_only=True) on CPU with one-line UserErrors: missing file, not a torch.save file (or
    truncated), or an object of a type that safe loading refuses (named, with how to convert the file)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such {what}")
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        refused = re.search(r'Unsupported global: GLOBAL (\S+)', str(e))  # pickle.UnpicklingError of weights_only
        if refused is None:
            raise UserError(f"{path}: not a readable {what} (truncated, corrupt or not from torch.save?)") from None
        raise UserError(f"{path}: the {what} holds a {refused[1]}, which safe loading (weights_only=True) refuses; "
                        f"expected tensors and plain Python types: if you trust the file, torch.load it once with "
                        f"weights_only=False and torch.save its state dict alone, or allow the type with "
                        f"torch.serialization.add_safe_globals") from None


def _key_report(missing, unexpected, mismatched=()):
    """One line naming the missing, unexpected and mis-shaped keys of a state dict, six of each at most."""
    def few(keys):
        keys = sorted(keys)
        return ', '.join(keys[:6]) + (f' (+{len(keys) - 6} more)' if len(keys) > 6 else '')
    parts = [('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatch', mismatched)]
    return '; '.join(f"{name} {few(keys)}" for name, keys in parts if keys)


def _load_strict(module, sd, what):
    """load_state_dict(strict=True) with shapes checked first and a one-line UserError naming the keys."""
    own = module.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} vs ours {tuple(own[k].shape)}"
                  for k, v in sd.items() if k in own and v.shape != own[k].shape]
    missing, unexpected = own.keys() - sd.keys(), sd.keys() - own.keys()
    if missing or unexpected or mismatched:
        raise UserError(f"{what}: {_key_report(missing, unexpected, mismatched)}")
    module.load_state_dict(sd)


def _load_swin(model, sd, what):
    """swin.load_pretrained (official or mmseg layout) with its errors as one-line UserErrors."""
    try:
        return swin.load_pretrained(model, sd)
    except (ValueError, RuntimeError) as e:  # unknown layout; size mismatch
        raise UserError(f"{what}: {str(e).strip().splitlines()[-1].strip()}") from None


def save_tokenizer(tok, path, **info):
    """Our tokenizer file: {'encoder': state_dict, 'decoder': state_dict, 'config': build_tokenizer kwargs, 'info':
    plain-typed notes such as what it was trained on}; loads with weights_only=True."""
    save_atomic({'encoder': tok.encoder.state_dict(), 'decoder': tok.decoder.state_dict(),
                 'config': tokenizer_config(tok), 'info': info}, path)


def load_tokenizer(path):
    """The frozen Tokenizer from our file (save_tokenizer / convert_dalle)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such tokenizer file; expected our converted DALL-E dVAE: download {DALLE_URLS}, "
                        f"then run `python train_posterior.py --convert-dalle ENCODER.pkl DECODER.pkl --out {path}` "
                        f"(or train one: `python train_posterior.py --variant tokenizer --out {path}`)")
    ckpt = load_file(path, 'tokenizer file')
    if not isinstance(ckpt, dict) or not {'encoder', 'decoder', 'config'} <= set(ckpt):
        raise UserError(f"{path}: not a tokenizer file; expected a file written by train_posterior.py "
                        f"--convert-dalle or --variant tokenizer")
    tok = build_tokenizer(**ckpt['config'])
    try:
        tok.encoder.load_state_dict(ckpt['encoder'])
        tok.decoder.load_state_dict(ckpt['decoder'])
    except RuntimeError as e:
        raise UserError(f"{path}: tokenizer weights do not match its config {ckpt['config']}: "
                        f"{str(e).splitlines()[0]}") from None
    tok.info = ckpt.get('info', {})  # what it was trained on or converted from (save_tokenizer)
    return tok


def convert_dalle(encoder_pkl, decoder_pkl, out):
    """OpenAI's encoder.pkl / decoder.pkl (whole pickled dall_e modules) -> our state-dict file. The only unpickling
    in the project (torch.load weights_only=False runs code from the file: use it on files you trust). Going through
    state dicts also sidesteps the released decoder's nn.Upsample objects that lack recompute_scale_factor."""
    import dall_e
    for path, name in ((encoder_pkl, 'encoder.pkl'), (decoder_pkl, 'decoder.pkl')):
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such file; expected OpenAI's {name} ({DALLE_URLS})")
    warnings.warn(f"unpickling {encoder_pkl} and {decoder_pkl}: this runs code from the files; only convert files "
                  f"you trust (OpenAI's {DALLE_URLS})")
    modules = []
    for path, cls in ((encoder_pkl, dall_e.Encoder), (decoder_pkl, dall_e.Decoder)):
        try:
            m = torch.load(path, map_location='cpu', weights_only=False)
        except Exception as e:
            raise UserError(f"{path}: not a readable pickle (truncated or corrupt?): {type(e).__name__}") from None
        if not isinstance(m, cls):
            raise UserError(f"{path}: holds a {type(m).__name__}; expected a pickled dall_e.{cls.__name__}")
        modules.append(m)
    enc, dec = modules
    tok = build_tokenizer(n_hid=enc.n_hid, vocab_size=enc.vocab_size, n_init=dec.n_init,
                          n_blk_per_group=enc.n_blk_per_group)
    tok.encoder.load_state_dict(enc.state_dict())
    tok.decoder.load_state_dict(dec.state_dict())
    save_tokenizer(tok, out, source=f"converted from {os.path.basename(encoder_pkl)}, {os.path.basename(decoder_pkl)}")
    return tok


# The stage-I artifact ("posterior"): X (palette), X^-1 and the tokenizer they go with, as plain types

POSTERIOR_VARIANTS = ('ff', 'ff-r', 'lstsq', 'ft', 'ft-w', 'tf', 'tt')


def make_posterior(path, variant, palette, ignore_colour, tokenizer_path, vocab_size, inverse=None,
                   inverse_config=None, dataset='', settings=None):
    """Write the stage-I artifact that train_prior.py and evaluate.py read (load_posterior) to `path`. The tokenizer
    path is stored relative to the artifact's directory, so the two files can move together."""
    post = {'variant': variant, 'num_classes': len(palette), 'palette': [[int(c) for c in rgb] for rgb in palette],
            'ignore_colour': [int(c) for c in ignore_colour],
            'tokenizer': os.path.relpath(os.path.abspath(tokenizer_path), os.path.dirname(os.path.abspath(path))),
            'vocab_size': int(vocab_size), 'inverse': None if inverse is None else inverse.state_dict(),
            'inverse_config': dict(inverse_config or {}), 'dataset': dataset, 'settings': dict(settings or {})}
    save_atomic(post, path)
    return post


def load_posterior(path):
    """The stage-I artifact as a dict (make_posterior), validated; 'tokenizer' comes back as an absolute path."""
    post = load_file(path, 'stage-I artifact')
    keys = {'variant', 'num_classes', 'palette', 'ignore_colour', 'tokenizer', 'vocab_size', 'inverse',
            'inverse_config', 'dataset', 'settings'}
    if not isinstance(post, dict) or not keys <= set(post):
        raise UserError(f"{path}: not a stage-I artifact; expected a file written by train_posterior.py")
    if post['variant'] not in POSTERIOR_VARIANTS:
        raise UserError(f"{path}: unknown variant {post['variant']!r}; expected one of {', '.join(POSTERIOR_VARIANTS)}")
    palette = post['palette']
    if len(palette) != post['num_classes'] or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in palette):
        raise UserError(f"{path}: palette has {len(palette)} entries for {post['num_classes']} classes; expected one "
                        f"RGB colour in 0..255 per class")
    if len(set(map(tuple, palette))) != len(palette):
        dup = next(c for i, c in enumerate(palette) if c in palette[:i])
        raise UserError(f"{path}: palette colour {dup} is used by two classes; expected K distinct colours")
    if post['variant'] in ('ft', 'ft-w', 'tt') and post['inverse'] is None:
        raise UserError(f"{path}: variant {post['variant']} without inverse weights; expected a trained X^-1")
    post['tokenizer'] = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), post['tokenizer']))
    return post


def posterior_summary(posterior, path, ckpt_dir):
    """The stage-I artifact as a stage-II checkpoint in `ckpt_dir` records it: its tokenizer file both relative to
    ckpt_dir and absolute, so that a moved runs folder still evaluates (checkpoint_posterior)."""
    tokenizer = os.path.abspath(posterior['tokenizer'])
    return {**posterior, 'path': os.path.abspath(path), 'tokenizer_abs': tokenizer,
            'tokenizer': os.path.relpath(tokenizer, os.path.abspath(ckpt_dir))}


def checkpoint_posterior(ckpt, path, tokenizer=None):
    """The stage-I artifact that the stage-II checkpoint `ckpt` (loaded from `path`) carries, as load_posterior returns
    it. Its tokenizer: the file `tokenizer` when given, else the one relative to the checkpoint's folder, else the one
    at the absolute path of training time."""
    saved = ckpt['posterior']
    if 'tokenizer_abs' not in saved:  # written before checkpoints carried their artifact
        raise UserError(f"{path}: records only the path of its stage-I artifact, {saved.get('path')}; expected "
                        f"--posterior FILE")
    near = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), saved['tokenizer']))
    tokenizer = tokenizer or next((p for p in (near, saved['tokenizer_abs']) if os.path.isfile(p)), None)
    if tokenizer is None:
        raise UserError(f"{path}: its tokenizer file is neither at {near} nor at {saved['tokenizer_abs']}; expected "
                        f"--tokenizer FILE, the tokenizer of the stage-I artifact it was trained with")
    return {**saved, 'tokenizer': tokenizer}


def check_posterior_match(saved, now, path):
    """UserError naming each of class count / palette / vocabulary size that differs between a checkpoint's record
    `saved` (posterior_summary) and the stage-I artifact `now`."""
    diffs = []
    if saved['num_classes'] != now['num_classes']:
        diffs.append(f"class count {saved['num_classes']} vs {now['num_classes']}")
    elif saved['palette'] != now['palette']:
        k = next(i for i, (a, b) in enumerate(zip(saved['palette'], now['palette'])) if a != b)
        diffs.append(f"palette (first at class {k}: {saved['palette'][k]} vs {now['palette'][k]})")
    if saved['vocab_size'] != now['vocab_size']:
        diffs.append(f"vocabulary size {saved['vocab_size']} vs {now['vocab_size']}")
    if diffs:
        raise UserError(f"{path}: does not match the stage-I artifact: " + "; ".join(diffs) +
                        f" (checkpoint vs artifact); expected the artifact it was trained with, {saved['path']}")
