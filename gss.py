"""Generative Semantic Segmentation (GSS, CVPR 2023): a minimal from-scratch reference implementation.

Stage I (latent posterior): a frozen VQ tokenizer (DALL-E dVAE) over "maskiges" (label maps painted with a
palette, X), and an inverse X^-1 from maskige back to class logits. Stage II (latent prior): an image encoder
predicting the tokenizer's discrete codes.
"""
import os
import tempfile
import warnings

import dall_e
import torch
import torch.nn as nn
import torch.nn.functional as F

import swin


# ----------------------------------------------------------------------------------------------------------
# 1. Errors and file I/O

class UserError(Exception):
    """A problem the user can fix (bad file, bad flag); CLIs print it as `error: ...` and exit 2."""


def save_atomic(obj, path):
    """torch.save to a temp file in the same directory, fsync, then os.replace: the old file stays intact until
    the new one is complete."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=os.path.basename(path) + '.', suffix='.tmp')
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
    """torch.load(weights_only=True) on CPU with one-line UserErrors for missing or unreadable files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such {what}")
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a readable {what} (truncated or corrupt?): {type(e).__name__}") from None



# ----------------------------------------------------------------------------------------------------------
# 2. Palettes: the maskige transform X as a colour table beta (K, 3) on the 0-255 scale

# Official palettes (facts 2.4), hex RRGGBB in class order; the last entry is the colour of ignore/unlabeled pixels.
OFFICIAL_PALETTES = {
    'ade20k': (  # 150 classes, posterior_learning.py grid 5x6x5 with noise and hand edits, ignore D7D8C4
        'DEDE91 121E07 08172F 1E0660 010DA4 0C1CBF 193420 1D3034 0F335F 1938A7 192AD2 1B511F 095836 1B5C71 0B6397 1A6EB7 '
        '18821A 047A4B 038462 1A93A7 1184C5 05A91C 13B843 00BE7A 0CA793 06A1C4 02CD03 05DC3D 17E16B 07D99D 19D0BF 4A0A08 '
        '451E45 380462 3D1DA4 3C0AC2 3C3413 4A4534 414474 5129A1 463CC5 42510E 376B3D 4C6E6C 4A68A2 485EC5 3C8510 458043 '
        '3B9468 41859A 4480B7 4FB50B 4CAA38 47AF67 35A289 35B6B7 33E51A 33CA33 45D57A 3FD5A1 47CBC5 780B1F 7C0344 830262 '
        '7101A2 660DD1 6D321E 7E292F 6B2E76 703193 6D29BD 67530F 7E6346 7C6568 83679F 806EB7 779409 708932 7B7F74 6B7CA7 '
        '6694CB 7CB40F 74A841 68B666 6FA4A3 69AEBF 66DA14 7ECB40 6CD76D 6EDD9D 6BE6C0 A0190B A50C41 990275 B6158D A013BC '
        'B03A13 AF3A38 AA455D B02A92 9D2CD3 9D6902 B46249 B6555C A95D98 9C59CA 9D9016 B4974D 9A9276 A2888F AB86B8 AAAE0F '
        'B2B441 B0B778 AFA993 B5A5C5 9CE303 A7DA3D A0D877 A4FB8D B1C9FB E71E0D DB063B D31A7A D81099 D10CC0 D8460F D72E3C '
        'EA3D70 E0359D E331CF DD6C08 DC5D49 E66F71 DA598F E75AC3 E39016 D08931 D28074 E1879D DD87C1 D3AE12 DEB932 E5B75D '
        'E9A29B FFA7CD D3D70F E8E147 000000 FFFFFF D7D8C4'),
    'cityscapes': (  # 19 trainIds, the standard Cityscapes colours, ignore black
        '804080 F423E8 464646 66669C BE9999 999999 FAAA1E DCDC00 6B8E23 98FB98 4682B4 DC143C FF0000 00008E 000046 003C64 '
        '005064 0000E6 770B20 000000'),
    'mseg': (  # 194 universal classes, posterior_learning.py grid 5x5x8 [6:] with noise, ignore black
        '0207D6 0910EA 033405 0D4132 09344F 05406A 054388 0341B4 093ED7 0E3BF2 067508 03682A 0B734C 027173 047286 056CA7 '
        '026ECB 0676F1 0EA80D 0D9C28 059E52 099E65 059B89 09A6A9 0EA0D4 02A5F3 0CD20D 09D729 07D64E 0CD26C 0BD08A 00D8B1 '
        '00CEC8 0ED2EA 3A0A09 370F32 420752 460172 3B0486 3F10AE 440BCD 3A10F5 3D3606 39342E 434045 3C3C68 3D3E95 3A42A7 '
        '413BCB 3C43F7 42760E 37752E 376D4A 436D71 446C89 406CB5 4169D5 3774F3 45A709 41A228 3BA64D 3CA165 3E9E8C 3FA0B2 '
        '469ACF 419EF7 3DD504 3ED72C 42DA4F 39D96C 3FD488 3CD7B3 37CDC8 38D2EF 70040E 730623 7B0552 77066D 740587 7902B5 '
        '6F05D4 7606EE 744205 7A352B 743B45 6E3570 703792 753DAF 783DD3 6F39F8 7C760B 7A6A24 7B6953 6E6A6C 747389 7468AB '
        '6F6CD1 7769EA 7DA709 7AA630 77A948 76A365 73A189 74A2A7 76A2D3 7BA6EC 7CDA02 76D125 7CD753 6FD374 73DB8B 7CCDB0 '
        '73DBD3 72CFF8 AB0D0F B30A2D AC0A4F AB0E74 B10687 AD04B6 B401D7 AB08EB AB4205 B33923 A84246 AB3E6B AC388A A939B2 '
        'B243CD B443EC B2730A AD7529 B36B4F B16873 AE6889 A673A9 A76DD4 AF74EB ACA80F B09E24 A99F44 A59E73 A79A93 B09AAC '
        'A59ACE AB9AF7 B0D804 A6CD32 A9D853 B4D86A B0CF8C ABCDB3 ADDBD7 B4DCF6 EA030A E50E2E E00F45 E30767 E60794 EB0DA9 '
        'DD02D5 E507EB EA3E0A EB3526 E24144 E33C69 E53891 E736A8 E634D7 E839F0 E4670A DD6F2F E56746 E5766C EA6B8A E66DB1 '
        'E571D1 EA67EF E7A811 EA9A2B E3A253 E3A470 DE9C92 E99BAE DC9ED5 DDA3EC E4D304 E8DC28 E9D54E E9DC71 E9D28E DFD9AD '
        'E1CFCF E2DCF3 000000'),
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


def _pairwise_min(colours):
    """Distance of each colour (N, 3) to its nearest other colour -> (N,) float."""
    d2 = ((colours[:, None].long() - colours[None].long()) ** 2).sum(-1)  # (N, N) exact integers
    return d2.fill_diagonal_(2 ** 40).min(1).values.double().sqrt()


def _refine(colours, step=17):
    """Appendix B (iv) category-specific refinement, without the per-class IoU feedback of the paper's manual edits:
    keep colours away from grey (the centre of the RGB cube, close to many colours and to the blend of any two) and
    away from each other. Greedy max-min on score = min(distance to nearest other colour, distance to mid grey): move
    the worst-scoring colour to the lattice colour (step 17: 0, 17, ..., 255 per channel) scoring best against the
    rest, while that improves it. E.g. a mid grey (128, 128, 128) goes to a saturated colour such as (0, 136, 255).
    Integer arithmetic on doubled coordinates (grey = 255), so the result is the same on every machine."""
    colours = colours.clone().long()
    axis = torch.arange(0, 256, step)
    lattice = torch.cartesian_prod(axis, axis, axis)  # (C, 3)
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
    """Maximal-distance palette beta (K, 3) on 0-255 (appendix B), deterministic for a seed. Each step can be switched
    off for Table 9's ablation: (i) arithmetic sequences per channel, Cartesian product in r->g->b order (Eqs. 16-18;
    off: uniformly random colours, the beta of GSS-FF-R), (ii) misaligned starts 0, 1, 2 (Eq. 19), (iii) random
    additive factors t in [0, 15] per channel and colour (Eq. 20), (iv) category-specific refinement (_refine).
    Intervals k^m span the whole 0-255 range, so colours differ by >= min_m k^m - T before refinement
    (K=150: 5x6x5 grid, >= 33; the official palettes reach 20.0 (ADE20K) and 18.7 (MSeg))."""
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
    else:
        colours = _random_colours(num_classes, gen)
        if random_factors:
            colours = (colours + torch.randint(0, PALETTE_T + 1, colours.shape, generator=gen)).clamp(max=255)
    if refine:
        colours = _refine(colours)
    if len(set(map(tuple, colours.tolist()))) != num_classes:  # only an unrefined random draw can collide
        colours = _refine(colours)
    return colours.long()


def _random_colours(num_classes, gen):
    """K distinct uniformly random colours (K, 3); redraws duplicates."""
    colours = torch.randint(0, 256, (num_classes, 3), generator=gen)
    while len(set(map(tuple, colours.tolist()))) < num_classes:
        colours = torch.unique(colours, dim=0)
        extra = torch.randint(0, 256, (num_classes - len(colours), 3), generator=gen)
        colours = torch.cat([colours, extra])[torch.randperm(num_classes, generator=gen)]
    return colours


def random_palette(num_classes, seed=0):
    """GSS-FF-R's beta (Table 1): K distinct uniformly random colours (K, 3) on 0-255."""
    return make_palette(num_classes, seed, arithmetic=False, misaligned=False, random_factors=False, refine=False)


def ignore_colour_for(palette):
    """A colour for ignore/unlabeled pixels (3,): the lattice colour (step 17) farthest from every class colour."""
    axis = torch.arange(0, 256, 17)
    lattice = torch.cartesian_prod(axis, axis, axis)  # (C, 3)
    dist2 = ((lattice[:, None] - palette.long()[None]) ** 2).sum(-1).min(1).values  # (C,) exact integers
    return lattice[dist2.argmax()]


# ----------------------------------------------------------------------------------------------------------
# 3. X: label map -> maskige

def paint(labels, palette, ignore_colour):
    """X (Sec. 3.3, x = c beta): labels (B, H, W) long -> maskige (B, 3, H, W) float in [0, 1]. Labels >= K (255 =
    ignore) get ignore_colour, as the official encode_to_segmap clamps them to index K (facts 2.5)."""
    K = len(palette)
    table = torch.cat([palette.reshape(K, 3), ignore_colour.reshape(1, 3)]).to(labels.device, torch.float32) / 255
    return F.embedding(labels.clamp(0, K), table).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)


def upsample_labels_2x(labels):
    """labels (B, H, W) -> (B, 2H, 2W) by nearest repetition. The official path (one-hot over K+1 with ignore as the
    extra class, bilinear with align_corners=False, argmax; facts 5) gives exactly this at 2x: each output pixel
    mixes its source pixel with weight >= 0.75 (tested)."""
    B, H, W = labels.shape
    return labels[:, :, None, :, None].expand(B, H, 2, W, 2).reshape(B, 2 * H, 2 * W)


# ----------------------------------------------------------------------------------------------------------
# 4. X^-1: maskige (B, 3, H, W) in [0, 1] -> class logits (B, K, H, W)

class NearestColour(nn.Module):
    """GSS-FF's inverse as the official code implements it (facts 3): the class of the nearest palette colour in
    0-255 RGB, as soft scores -||255 x - p_k||^2 / tau. .labels() gives the argmin without any (B, K, H, W) tensor."""

    def __init__(self, palette, tau=1.0):
        super().__init__()
        self.tau = tau
        self.register_buffer('palette', palette.float().reshape(-1, 3))  # (K, 3) on 0-255

    def forward(self, maskige):
        x = maskige.float() * 255  # (B, 3, H, W)
        xp = torch.einsum('bchw,kc->bkhw', x, self.palette)  # (B, K, H, W)
        d = (x * x).sum(1, keepdim=True) - 2 * xp + (self.palette ** 2).sum(1)[:, None, None]  # squared distances
        return -d / self.tau

    @torch.no_grad()
    def labels(self, maskige, chunk=16384):
        """argmin_k ||255 x - p_k||^2 -> (B, H, W) long, as argmax_k of 2 x.p_k - |p_k|^2 (|x|^2 is the same for
        every k) over chunks of pixels: one small matmul per chunk. Exact in float32 for integer colours; ties:
        first index wins, like the official argmin."""
        B, _, H, W = maskige.shape
        x = maskige.float().permute(0, 2, 3, 1).reshape(-1, 3) * 255  # (N, 3), N = B*H*W
        weight = 2 * self.palette.t()  # (3, K)
        bias = -(self.palette ** 2).sum(1)  # (K,)
        out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        for i in range(0, x.shape[0], chunk):
            out[i:i + chunk] = torch.addmm(bias, x[i:i + chunk], weight).argmax(1)  # (n, K) -> (n,)
        return out.view(B, H, W)


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
    """GSS-FT-W's inverse (facts 4.1): 1x1 conv stem 3->128 (no bias) + BN + ReLU, Swin blocks (4 heads, window 7,
    FFN 2x), LayerNorm, 1x1 conv to K; per pixel of the maskige, no downsampling. Depth 1 (Cityscapes) or 2 (ADE)."""

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
    """The X^-1 module of a stage-I artifact (section 6). GSS-TF keeps GSS-FF's inverse (nearest colour, which is what
    the official code runs for the paper's 'least squares') on its learned beta; lstsq is Eq. 15 literally."""
    palette = torch.tensor(posterior['palette'])
    variant, cfg = posterior['variant'], posterior['inverse_config']
    if variant in ('ff', 'ff-r', 'tf'):
        return NearestColour(palette)
    if variant == 'lstsq':
        return LeastSquares(palette)
    inverse = FTInverse(len(palette), **cfg) if variant in ('ft', 'tt') else FTWInverse(len(palette), **cfg)
    inverse.load_state_dict(posterior['inverse'])
    return inverse.eval()


def maskige_scores(inverse, maskige, size):
    """X^-1 then the official resize to `size` (facts 10): nearest colour is one-hot before the bilinear resize (a
    smoothed majority vote), learned inverses resize their logits. -> (B, K, *size) scores for an argmax."""
    if isinstance(inverse, NearestColour):
        scores = F.one_hot(inverse.labels(maskige), len(inverse.palette)).permute(0, 3, 1, 2).float()  # (B, K, H, W)
    else:
        scores = inverse(maskige)  # (B, K, H, W)
    if tuple(scores.shape[-2:]) != tuple(size):
        scores = F.interpolate(scores, size=size, mode='bilinear', align_corners=False)
    return scores


# ----------------------------------------------------------------------------------------------------------
# 5. Tokenizer: the frozen VQ-VAE (DALL-E dVAE architecture, dall_e package) over maskiges

DALLE_URLS = 'https://cdn.openai.com/dall-e/encoder.pkl and https://cdn.openai.com/dall-e/decoder.pkl'
LOGIT_LAPLACE_EPS = dall_e.utils.logit_laplace_eps  # 0.1: map_pixels x -> 0.8 x + 0.1, unmap clamps back


def _conv(conv, x):
    """A dall_e Conv2d (params w, b) applied in x's dtype: float32 on every device (dall_e casts to fp16 on CUDA)."""
    return F.conv2d(x, conv.w.to(x.dtype), conv.b.to(x.dtype), padding=(conv.kw - 1) // 2)


def _relu_conv(conv, x, out=None, alpha=1.0, channels=None):
    """conv(relu(x)) for a dall_e Conv2d (optionally only its first `channels` outputs), or out += alpha * that, in
    place, when `out` is given. Without autograd it runs over strips of rows (with the conv's halo), so neither
    relu(x) nor a full-size conv output is ever materialised."""
    w, b = conv.w[:channels].to(x.dtype), conv.b[:channels].to(x.dtype)
    p = (conv.kw - 1) // 2
    if torch.is_grad_enabled():
        y = F.conv2d(F.relu(x), w, b, padding=p)
        return y if out is None else out + alpha * y
    B, C, H, W = x.shape
    if out is None:
        out, alpha = x.new_empty(B, len(w), H, W), None
    rows = max(1, 2 ** 22 // (B * max(C, len(w)) * W))  # strips of ~16 MB (float32) in and out
    for r0 in range(0, H, rows):
        r1 = min(r0 + rows, H)
        s = F.relu(x[:, :, max(r0 - p, 0):min(r1 + p, H)])  # (B, C, strip + halo, W)
        s = F.pad(s, (0, 0, p - (r0 - max(r0 - p, 0)), p - (min(r1 + p, H) - r1)))  # zero rows at the borders
        y = F.conv2d(s, w, b, padding=(0, p))  # (B, n_out, r1 - r0, W)
        if alpha is None:
            out[:, :, r0:r1] = y
        else:
            out[:, :, r0:r1].add_(y, alpha=alpha)
    return out


def _residual_stack(blocks, x):
    """The groups of a dall_e Encoder/Decoder (`blocks.group_1..4`), run by hand so that every intermediate dies as
    soon as it can: each block is id_path(x) + post_gain * res_path(x), res_path = (ReLU, conv) x 4. Max-pools run
    as they come; a nearest 2x upsample is moved past the next block's pointwise id_path and conv_1 (they commute
    exactly), so the wide tensor before them never exists at the high resolution."""
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
            if upsample and r.conv_1.kw != 1:  # not the case in dall_e's Decoder; kept exact for other shapes
                x, upsample = F.interpolate(x, scale_factor=2.0, mode='nearest'), False
            h = _relu_conv(r.conv_1, x)  # (B, n_hid, H, W)
            x = x if isinstance(layer.id_path, nn.Identity) else _conv(layer.id_path, x)  # (B, n_out, H, W)
            if upsample:
                h, x = F.interpolate(h, scale_factor=2.0, mode='nearest'), F.interpolate(x, scale_factor=2.0, mode='nearest')
                upsample = False
            h = _relu_conv(r.conv_2, h)
            h = _relu_conv(r.conv_3, h)
            x = _relu_conv(r.conv_4, h, out=x, alpha=layer.post_gain)  # x + post_gain * conv_4(relu(h))
            del h
    if upsample:
        x = F.interpolate(x, scale_factor=2.0, mode='nearest')
    return x


class Tokenizer(nn.Module):
    """Frozen dVAE of Eq. 5 (DALL-E's architecture): maskige (B, 3, H, W) in [0, 1] <-> tokens (B, H/8, W/8).
    Always eval, no gradients to its weights, float32 with autocast off (dtype=torch.bfloat16 opts into bf16).
    Decoding gathers the first 1x1 conv's weight columns instead of feeding a (B, vocab, h, w) one-hot (the same
    numbers), and all convs run by hand (_residual_stack): same outputs as the dall_e modules, less memory."""

    def __init__(self, encoder, decoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.vocab_size = decoder.vocab_size
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):  # frozen: stays in eval mode inside a model that is being trained
        return super().train(False)

    def encoder_logits(self, maskige, dtype=torch.float32):
        """Encoder logits (B, vocab, H/8, W/8), differentiable w.r.t. the maskige (GSS-TF/TT, tokenizer training)."""
        with torch.autocast(maskige.device.type, enabled=False):
            x = _conv(self.encoder.blocks.input, (1 - 2 * LOGIT_LAPLACE_EPS) * maskige.to(dtype) + LOGIT_LAPLACE_EPS)
            x = _residual_stack(self.encoder.blocks, x)  # (B, 8 n_hid, H/8, W/8)
            return _relu_conv(self.encoder.blocks.output.conv, x).float()  # (B, vocab, H/8, W/8)

    @torch.no_grad()
    def encode(self, maskige, dtype=torch.float32, max_pixels=2 ** 18):
        """Tokens = argmax of the encoder logits (official get_codebook_indices) -> (B, H/8, W/8) long. Runs over
        micro-batches of at most max_pixels pixels (one image for 512x512 and larger), and the final 1x1 conv to
        vocab logits runs per strip of token rows with the argmax, so the (B, vocab, h, w) logits never exist."""
        with torch.autocast(maskige.device.type, enabled=False):
            tokens = []
            for x in maskige.split(max(1, max_pixels // (maskige.shape[2] * maskige.shape[3]))):
                x = _conv(self.encoder.blocks.input, (1 - 2 * LOGIT_LAPLACE_EPS) * x.to(dtype) + LOGIT_LAPLACE_EPS)
                x = _residual_stack(self.encoder.blocks, x)  # (b, 8 n_hid, h, w)
                conv = self.encoder.blocks.output.conv
                rows = max(1, 2 ** 21 // (x.shape[0] * self.vocab_size * x.shape[3]))  # ~8 MB of logits per strip
                tokens.append(torch.cat([_conv(conv, F.relu(s)).argmax(1) for s in x.split(rows, dim=2)], dim=1))
            return torch.cat(tokens)  # (B, h, w)

    def decoder_logits(self, x):
        """Decoder trunk on the first conv's output x (B, n_init, h, w) -> the 3 colour logits (B, 3, 8h, 8w): the
        logit-Laplace means (channels :3 of 6); the scale channels 3: are not computed."""
        x = _residual_stack(self.decoder.blocks, x)  # (B, n_hid, 8h, 8w)
        return _relu_conv(self.decoder.blocks.output.conv, x, channels=3).float()  # (B, 3, 8h, 8w)

    @torch.no_grad()
    def decode(self, tokens, dtype=torch.float32, max_tokens=2 ** 12):
        """tokens (B, h, w) -> maskige (B, 3, 8h, 8w) in [0, 1] = unmap(sigmoid(decoder logits)), over micro-batches
        of at most max_tokens tokens (one 64x64-token image). The one-hot first 1x1 conv is a gather of its columns."""
        conv = self.decoder.blocks.input
        table = conv.w[:, :, 0, 0].t().to(dtype)  # (vocab, n_init)
        with torch.autocast(tokens.device.type, enabled=False):
            out = []
            for t in tokens.split(max(1, max_tokens // (tokens.shape[1] * tokens.shape[2]))):
                x = (F.embedding(t, table) + conv.b.to(dtype)).permute(0, 3, 1, 2).contiguous()  # (b, n_init, h, w)
                out.append(_unmap(torch.sigmoid(self.decoder_logits(x))))
            return torch.cat(out)  # (B, 3, 8h, 8w)

    def decode_soft(self, probs):
        """Differentiable decode of token probabilities / relaxed one-hots (B, vocab, h, w) -> maskige (B, 3, 8h, 8w)
        in [0, 1] (the official Dalle_VAE.forward path; GSS-TF/TT)."""
        with torch.autocast(probs.device.type, enabled=False):
            x = _conv(self.decoder.blocks.input, probs.float())  # (B, n_init, h, w)
            return _unmap(torch.sigmoid(self.decoder_logits(x)))


def _unmap(x):
    """dall_e's unmap_pixels: [eps, 1 - eps] -> [0, 1], clamped."""
    return ((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)


def build_tokenizer(n_hid=64, vocab_size=512, n_init=128, n_blk_per_group=2):
    """A fresh tokenizer with dall_e's architecture (DALL-E's own: n_hid=256, vocab_size=8192, n_init=128, 2 blocks;
    the package requires n_hid >= 64 and vocab_size >= 512). Weights are dall_e's random init."""
    return Tokenizer(dall_e.Encoder(n_hid=n_hid, n_blk_per_group=n_blk_per_group, vocab_size=vocab_size),
                     dall_e.Decoder(n_init=n_init, n_hid=n_hid, n_blk_per_group=n_blk_per_group,
                                    vocab_size=vocab_size))


def tokenizer_config(tok):
    return {'n_hid': tok.encoder.n_hid, 'vocab_size': tok.vocab_size, 'n_init': tok.decoder.n_init,
            'n_blk_per_group': tok.encoder.n_blk_per_group}


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
    return tok


def convert_dalle(encoder_pkl, decoder_pkl, out):
    """OpenAI's encoder.pkl / decoder.pkl (whole pickled dall_e modules) -> our state-dict file. The only unpickling
    in the project (torch.load weights_only=False runs code from the file: use it on files you trust). Going through
    state dicts also sidesteps the released decoder's nn.Upsample objects that lack recompute_scale_factor."""
    warnings.warn(f"unpickling {encoder_pkl} and {decoder_pkl}: this runs code from the files; only convert files "
                  f"you trust (OpenAI's {DALLE_URLS})")
    modules = []
    for path, cls in ((encoder_pkl, dall_e.Encoder), (decoder_pkl, dall_e.Decoder)):
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such file; expected OpenAI's {cls.__name__.lower()}.pkl ({DALLE_URLS})")
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


def reconstruct(tokenizer, labels, palette, ignore_colour):
    """The official maskige-reconstruction oracle's round trip (facts 5): labels (B, H, W) at test resolution, no 2x
    upsampling, 255 painted with the ignore colour, tokens at 1/8 -> decoded maskige (B, 3, 8(H//8), 8(W//8))."""
    return tokenizer.decode(tokenizer.encode(paint(labels, palette, ignore_colour)))


# ----------------------------------------------------------------------------------------------------------
# 6. The stage-I artifact ("posterior"): X (palette), X^-1 and the tokenizer they go with, as plain types

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
    post['tokenizer'] = os.path.join(os.path.dirname(os.path.abspath(path)), post['tokenizer'])
    return post


try:
    from _parts.gss_prior import *  # noqa: E402,F401,F403  TEMP: stage-II part until the lead merges it
except ImportError as e:  # TEMP
    import warnings; warnings.warn(f"stage-II part not loaded: {e}")
