"""Datasets for GSS with mmsegmentation 0.x's pipelines (configs/_base_/datasets/*.py); imports only torch, numpy and
pillow, so the file can be copied alone. In order: class names and label tables, DATASET_PRESETS, file reading, the
train and test pipelines, the layouts (ADE20K, Cityscapes, a folder) behind build_dataset, the synthetic scenes.
Items: train {'image': (3, crop, crop) normalised, 'label': (crop, crop) long, 255 = ignore}; test {'image': (3, h, w)
at the test scale, 'label': (H, W) long at the ORIGINAL size, 'path': str}.

    train_set = build_dataset('ade20k', 'train', root='data/ade')  # or ('synthetic', 'train'): nothing to download
    item = train_set[0]  # {'image': (3, 512, 512), 'label': (512, 512)}
"""
import colorsys
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IGNORE = 255


class UserError(Exception):
    """A problem with the user's data (missing file, bad label value); the CLIs print it as one line."""

    def __init__(self, msg):  # a DataLoader worker's error is re-raised as UserError(its traceback): keep its message
        super().__init__(msg.rstrip('\n').rpartition('UserError: ')[2])


# -----------------------------------------------------------------------------
# class names and label tables (ADE20K objectInfo150.txt, cityscapesScripts labels.py)

_ADE = """wall, building, sky, floor, tree, ceiling, road, bed, windowpane, grass, cabinet, sidewalk, person, earth,
door, table, mountain, plant, curtain, chair, car, water, painting, sofa, shelf, house, sea, mirror, rug,
field, armchair, seat, fence, desk, rock, wardrobe, lamp, bathtub, railing, cushion, base, box, column,
signboard, chest of drawers, counter, sand, sink, skyscraper, fireplace, refrigerator, grandstand, path,
stairs, runway, case, pool table, pillow, screen door, stairway, river, bridge, bookcase, blind, coffee table,
toilet, flower, book, hill, bench, countertop, stove, palm, kitchen island, computer, swivel chair, boat, bar,
arcade machine, hovel, bus, towel, light, truck, tower, chandelier, awning, streetlight, booth, television
receiver, airplane, dirt track, apparel, pole, land, bannister, escalator, ottoman, bottle, buffet, poster,
stage, van, ship, fountain, conveyer belt, canopy, washer, plaything, swimming pool, stool, barrel, basket,
waterfall, tent, bag, minibike, cradle, oven, ball, food, step, tank, trade name, microwave, pot, animal,
bicycle, lake, dishwasher, screen, blanket, sculpture, hood, sconce, vase, traffic light, tray, ashcan, fan,
pier, crt screen, plate, monitor, bulletin board, shower, radiator, glass, clock, flag"""
ADE20K_CLASSES = tuple(' '.join(_ADE.split()).split(', '))  # 150 names, objectInfo150.txt order
CITYSCAPES_CLASSES = ('road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light', 'traffic sign',
                      'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train',
                      'motorcycle', 'bicycle')
# cityscapesScripts labels.py: labelId -> trainId; every id not listed -> 255
CITYSCAPES_ID_TO_TRAINID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                            24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SYNTHETIC_CLASSES = ('sky', 'building', 'grass', 'road', 'water', 'sand', 'ball', 'crate', 'sign', 'fence')

def label_lut(train_ids, default=-1):
    """(256,) lookup table raw PNG value -> train id; values not in train_ids get default (-1 = invalid)."""
    lut = np.full(256, default, np.int16)
    lut[list(train_ids)] = list(train_ids.values())
    return lut

def identity_lut(num_classes):
    """Labels already in train ids: 0..K-1 and 255 (ignore), anything else invalid."""
    return label_lut({**{k: k for k in range(num_classes)}, IGNORE: IGNORE})

# -----------------------------------------------------------------------------
# presets: the official configs/gss/{ade20k,cityscapes}/gss-ff_*.py and their configs/_base_/datasets/*.py.
# img_scale is (long, short) as in mmseg.

_COMMON = dict(ratio_range=(0.5, 2.0), cat_max_ratio=0.75, warmup=1500)
DATASET_PRESETS = {
    'ade20k': dict(_COMMON, num_classes=150, classes=ADE20K_CLASSES, root='data/ade/ADEChallengeData2016',
                   crop_size=512, img_scale=(2048, 512), test_scale=(2048, 512), batch_size=32, iters=160000,
                   lr=1.2e-4, test_mode='whole', test_crop=512, test_stride=341),
    'cityscapes': dict(_COMMON, num_classes=19, classes=CITYSCAPES_CLASSES, root='data/cityscapes',
                       crop_size=768, img_scale=(2049, 1025), test_scale=(2048, 1024), batch_size=16, iters=80000,
                       lr=1.5e-3, test_mode='slide', test_crop=768, test_stride=512),
    # ours: small and fast on a CPU; milder scale jitter keeps the 2-6 px textures readable
    'synthetic': dict(_COMMON, num_classes=10, classes=SYNTHETIC_CLASSES, root=None, ratio_range=(0.75, 1.5),
                      warmup=50, crop_size=64, img_scale=(128, 128), test_scale=(128, 128), batch_size=16,
                      iters=280, eval_interval=0, long=dict(iters=1000, eval_interval=500, warmup=100), lr=1e-3,
                      test_mode='whole', test_crop=128, test_stride=96),
}
DATASET_PRESETS['folder'] = dict(DATASET_PRESETS['ade20k'], num_classes=None, classes=None, root=None, batch_size=16,
                                 iters=80000)


def dataset_preset(name):
    """--dataset NAME -> its DATASET_PRESETS entry; a one-line error for an unknown one (all three CLIs)."""
    if name not in DATASET_PRESETS:
        raise UserError(f"--dataset {name}: unknown dataset; expected one of {', '.join(DATASET_PRESETS)}")
    return DATASET_PRESETS[name]


# -----------------------------------------------------------------------------
# file I/O with one-line UserErrors

def read_image(path):
    """-> (H, W, 3) uint8 RGB: 8-bit modes convert as PIL does (alpha dropped); 16-bit greyscale (also stored as 32-bit
    integers, older Pillow's mode) keeps the high byte, as cv2.imread (mmcv); float and wider images are refused."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode[0] not in 'IF':  # via RGBA for palettes: PIL warns when going straight to RGB drops transparency
                return np.asarray((im.convert('RGBA') if mode == 'P' else im).convert('RGB'))  # (H, W, 3)
            grey = np.asarray(im)  # (H, W) 16/32-bit integer or float
    except Exception as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__}: {e}); expected a JPEG or PNG") from None
    if mode == 'F' or grey.min() < 0 or grey.max() > 65535:
        raise UserError(f"{path}: a 32-bit {'float' if mode == 'F' else 'integer'} image (values {grey.min()}.."
                        f"{grey.max()}); expected 8- or 16-bit greyscale, RGB(A), palette or CMYK")
    return np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=2)  # (H, W, 3)

def load_pair(img_path, lab_path, lut, expected):
    """An image and its single-channel (or palette) PNG label mapped through lut -> (H, W, 3) uint8, (H, W) uint8."""
    img = read_image(img_path)
    if not os.path.isfile(lab_path):
        raise UserError(f"{lab_path}: no such label file")
    try:
        with Image.open(lab_path) as im:
            mode, raw = im.mode, np.asarray(im)  # (H, W) raw label values
    except Exception as e:
        raise UserError(f"{lab_path}: not a readable label image ({type(e).__name__}: {e}); expected a PNG") from None
    if raw.ndim != 2:
        raise UserError(f"{lab_path}: label is a {mode} image; expected a single-channel PNG of class indices")
    if raw.dtype != np.uint8 and (raw.min() < 0 or raw.max() > 255):
        raise UserError(f"{lab_path}: label value {raw.max()} out of range; expected 8-bit class indices")
    raw = raw.astype(np.uint8, copy=False)
    if img.shape[:2] != raw.shape:
        raise UserError(f"{lab_path}: label is {raw.shape[1]}x{raw.shape[0]} but its image {img_path} is "
                        f"{img.shape[1]}x{img.shape[0]}; expected equal sizes")
    lab = lut[raw]
    if lab.min() < 0:
        bad = np.unique(raw[lab < 0])
        raise UserError(f"{lab_path}: label value {bad[0]} out of range for this dataset; expected {expected}")
    return img, lab.astype(np.uint8)

# -----------------------------------------------------------------------------
# pipelines (mmseg Resize / RandomCrop / RandomFlip / PhotoMetricDistortion / Normalize / Pad)

MEAN = torch.tensor([123.675, 116.28, 103.53])[:, None, None]  # ImageNet, RGB
STD = torch.tensor([58.395, 57.12, 57.375])[:, None, None]

def rescale_size(h, w, scale):
    """mmcv keep-ratio rescale: the largest size with long side <= max(scale) and short side <= min(scale)."""
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)

def _linear(a, m, sl, axis):
    """Outputs sl of axis `axis` of a resized from n to m samples as cv2 INTER_LINEAR (half-pixel centres, clamped,
    no antialiasing) -> float32."""
    n = a.shape[axis]
    x = ((np.arange(sl.start, sl.stop) + 0.5) * (n / m) - 0.5).clip(0, n - 1)  # (len(sl),) source coordinates
    i = x.astype(int)
    w = (x - i).astype(np.float32).reshape(-1, *[1] * (a.ndim - axis - 1))  # weight of sample i + 1
    first = a.take(i, axis).astype(np.float32)  # a with axis `axis` now len(sl) long
    return first + (a.take(np.minimum(i + 1, n - 1), axis) - first) * w

def resize_image(img, size, box=None):
    """(H, W, 3) uint8 resized to (h, w) as mmcv (cv2 INTER_LINEAR, within 1 grey level); only the region box =
    (y slice, x slice) of the result is computed (resize-then-crop)."""
    (H, W), (h, w) = img.shape[:2], size
    ys, xs = box or (slice(0, h), slice(0, w))
    if (H, W) == (h, w):
        return img[ys, xs]
    rows = _linear(img, w, xs, axis=1)  # (H, w', 3), horizontal pass first as cv2
    return np.rint(_linear(rows, h, ys, axis=0)).astype(np.uint8)  # (h', w', 3)

def resize_label(lab, size):
    """(H, W) -> (h, w) as cv2 INTER_NEAREST: output i takes input floor(i * H / h) (PIL: floor((i + .5) * H / h))."""
    (H, W), (h, w) = lab.shape, size
    ys, xs = ((np.arange(m) * (1 / (m / n))).astype(int) for n, m in ((H, h), (W, w)))
    return lab.take(ys, axis=0).take(xs, axis=1)  # (h, w)

def crop_box(lab, crop, cat_max_ratio, rng):
    """mmseg RandomCrop: retry up to 10 times until no class covers >= cat_max_ratio of the valid pixels;
    -> (y slice, x slice), clipped to the image when it is smaller than the crop."""
    H, W = lab.shape
    def sample():
        y, x = rng.integers(0, max(H - crop, 0) + 1), rng.integers(0, max(W - crop, 0) + 1)
        return slice(y, min(y + crop, H)), slice(x, min(x + crop, W))
    box = sample()
    if cat_max_ratio < 1:
        for _ in range(10):
            cnt = np.bincount(lab[box].ravel(), minlength=256)[:IGNORE]  # (255,) valid classes only
            if (cnt > 0).sum() > 1 and cnt.max() < cat_max_ratio * cnt.sum():
                break
            box = sample()
    return box

def photometric_distortion(img, rng):
    """mmseg PhotoMetricDistortion on (H, W, 3) uint8 -> float32, each step with p=0.5: brightness +-32,
    contrast 0.5-1.5 (before or after the HSV steps), saturation 0.5-1.5, hue +-18 (OpenCV units, 2 deg)."""
    x = img.astype(np.float32)
    if rng.random() < 0.5:
        x = np.clip(x + rng.uniform(-32, 32), 0, 255)
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        x = np.clip(x * rng.uniform(0.5, 1.5), 0, 255)
    sat, hue = rng.random() < 0.5, rng.random() < 0.5
    if sat or hue:
        hsv = np.array(Image.fromarray(x.astype(np.uint8)).convert('HSV'))  # (H, W, 3) uint8, hue 0..255 = 360 deg
        if sat:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 255)
        if hue:  # OpenCV hue has 180 steps per turn, PIL 256; uint8 addition wraps around the circle
            hsv[..., 0] += np.uint8(round(rng.integers(-18, 18) * 256 / 180) % 256)
        x = np.asarray(Image.fromarray(hsv, 'HSV').convert('RGB'), np.float32)
    if not contrast_first and rng.random() < 0.5:
        x = np.clip(x * rng.uniform(0.5, 1.5), 0, 255)
    return x

def normalize(img):
    """(H, W, 3) array in 0..255 -> (3, H, W) float32 tensor, ImageNet-normalised."""
    x = torch.empty(3, *img.shape[:2])
    x.copy_(torch.from_numpy(np.require(img, requirements='CW')).permute(2, 0, 1))  # (3, H, W)
    return x.sub_(MEAN).div_(STD)

def train_transform(img, lab, p, rng):
    """Resize x U[ratio_range], crop, flip, photometric distortion, normalise, pad (configs/_base_/datasets/*.py)."""
    r = rng.uniform(*p['ratio_range'])
    size = rescale_size(*lab.shape, (int(p['img_scale'][0] * r), int(p['img_scale'][1] * r)))
    lab = resize_label(lab, size)
    box = crop_box(lab, p['crop_size'], p['cat_max_ratio'], rng)
    img, lab = resize_image(img, size, box), lab[box]  # only the cropped region of the image is resized
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    c, (h, w) = p['crop_size'], lab.shape
    image = torch.zeros(3, c, c)  # pad: 0 in the normalised image, 255 in the label
    image[:, :h, :w] = normalize(photometric_distortion(img, rng))
    label = torch.full((c, c), IGNORE, dtype=torch.long)
    label[:h, :w] = torch.from_numpy(lab.astype(np.int64))
    return {'image': image, 'label': label}

def test_transform(img, lab, p):
    """Keep-ratio resize to test_scale and normalise; the label stays at the original size."""
    img = resize_image(img, rescale_size(*lab.shape, p['test_scale']))
    return {'image': normalize(img), 'label': torch.from_numpy(lab.astype(np.int64))}

# -----------------------------------------------------------------------------
# datasets

class SegDataset(torch.utils.data.Dataset):
    """(image, label, lut) files plus a preset; items as in the module docstring."""

    def __init__(self, files, preset, train, expected):
        self.files, self.preset, self.train, self.expected = files, preset, train, expected
        self.num_classes, self.classes = preset['num_classes'], preset['classes']

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img_path, lab_path, lut = self.files[i]
        img, lab = load_pair(img_path, lab_path, lut, self.expected)
        if self.train:  # a fresh numpy generator per item, drawn from torch's RNG (seeded per DataLoader worker)
            return train_transform(img, lab, self.preset, np.random.default_rng(torch.randint(2**62, ()).item()))
        return dict(test_transform(img, lab, self.preset), path=img_path)

IMAGE_EXTS = ('.jpg', '.jpeg', '.png')
SPLIT_ALIASES = {'train': 'training', 'training': 'train', 'val': 'validation', 'validation': 'val'}

def _need_dir(path, what):
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such directory; expected {what}")

def split_files(root, split, lut, layout):
    """Images under root/images/<split> (train/training, val/validation) with the .png labels at the same relative
    paths under root/annotations/<split>."""
    images = os.path.join(root, 'images')
    _need_dir(images, layout)
    s = next((s for s in (split, SPLIT_ALIASES.get(split)) if s and os.path.isdir(os.path.join(images, s))), None)
    if s is None:
        raise UserError(f"{os.path.join(images, split)}: no such split directory; "
                        f"expected one of {sorted(d for d in os.listdir(images) if not d.startswith('.'))}")
    img_dir, lab_dir = os.path.join(images, s), os.path.join(root, 'annotations', s)
    imgs = sorted(p for p in Path(img_dir).rglob('*') if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith('.'))
    if not imgs:
        raise UserError(f"{img_dir}: no images in this split; expected *.jpg or *.png files")
    files = []
    for p in imgs:
        lab = Path(lab_dir) / p.relative_to(img_dir).with_suffix('.png')
        if not lab.is_file():
            raise UserError(f"{p}: image without its label; expected {lab}")
        files.append((str(p), str(lab), lut))
    return files

def ade_files(root, split, num_classes):
    """ADEChallengeData2016 layout: images/<split>/*.jpg, annotations/<split>/*.png (root may be its parent)."""
    if os.path.isdir(os.path.join(root, 'ADEChallengeData2016')):
        root = os.path.join(root, 'ADEChallengeData2016')
    _need_dir(root, "the ADE20K layout ADEChallengeData2016/{images,annotations}/{training,validation}")
    reduce_zero_label = label_lut({0: IGNORE, **{k + 1: k for k in range(num_classes)}})  # 0 = other, ignored
    return split_files(root, split, reduce_zero_label, "ADEChallengeData2016/images/{training,validation}")

def cityscapes_files(root, split):
    """leftImg8bit/<split>/<city>/*_leftImg8bit.png with gtFine/.../*_gtFine_labelTrainIds.png, else labelIds."""
    _need_dir(root, "the Cityscapes layout leftImg8bit/<split>/<city>/*_leftImg8bit.png and gtFine/...")
    img_dir, lab_dir = os.path.join(root, 'leftImg8bit', split), os.path.join(root, 'gtFine', split)
    _need_dir(img_dir, f"leftImg8bit/{split}/<city>/*_leftImg8bit.png")
    train_ids, ids = identity_lut(19), label_lut(CITYSCAPES_ID_TO_TRAINID, IGNORE)  # ids without a trainId: 255
    imgs = sorted(Path(img_dir).glob('*/*_leftImg8bit.png'))
    if not imgs:
        raise UserError(f"{img_dir}: no images in this split; expected <city>/*_leftImg8bit.png files")
    files = []
    for p in imgs:
        base = Path(lab_dir) / p.parent.name / p.name.replace('_leftImg8bit.png', '_gtFine_')
        if Path(f'{base}labelTrainIds.png').is_file():
            files.append((str(p), f'{base}labelTrainIds.png', train_ids))
        elif Path(f'{base}labelIds.png').is_file():
            files.append((str(p), f'{base}labelIds.png', ids))
        else:
            raise UserError(f"{p}: image without its label; expected {base}labelTrainIds.png (or labelIds.png)")
    return files

def folder_files(root, split):
    """root/classes.txt (one name per line, label 0 first), images/<split>, annotations/<split> -> (files, names)."""
    if root is None:
        raise UserError("--data-root: required for the folder dataset; expected a directory with "
                        "images/<split>, annotations/<split> and classes.txt")
    _need_dir(root, "a directory with images/<split>, annotations/<split> and classes.txt")
    path = os.path.join(root, 'classes.txt')
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; expected one class name per line (label 0 first)")
    with open(path) as f:
        names = tuple(line.strip() for line in f if line.strip())
    if not 1 <= len(names) <= 255:
        raise UserError(f"{path}: {len(names)} class names; expected 1 to 255 (255 is the ignore label)")
    return split_files(root, split, identity_lut(len(names)), "images/<split>/ with the image files"), names

def build_dataset(name, split, root=None, train=True):
    """name in DATASET_PRESETS; split 'train'/'val' (also 'training'/'validation'); root overrides the preset's."""
    p = dict(dataset_preset(name))
    root = root or p['root']
    if name == 'ade20k':
        files, expected = ade_files(root, split, 150), "0..150 (0 = other)"
    elif name == 'synthetic':
        files, expected = ade_files(synthetic_root(root), split, 10), "0..10 (0 = other)"
    elif name == 'cityscapes':
        files, expected = cityscapes_files(root, split), "trainIds 0..18 or 255"
    else:
        files, p['classes'] = folder_files(root, split)
        p['num_classes'] = len(p['classes'])
        expected = f"0..{p['num_classes'] - 1} or 255 (ignore)"
    return SegDataset(files, p, train, expected)

# -----------------------------------------------------------------------------
# synthetic: procedural outdoor scenes, ADE20K layout, label 0 = other/unlabeled, classes 1..10.
# Colour distributions overlap between classes (blue sky/water, beige sand/building/crate, grey road/overcast
# sky/fence); what separates them is texture at the 3x3..7x7 scale, shape and context.

SYNTHETIC_VERSION = 'v2'
SKY, BUILDING, GRASS, ROAD, WATER, SAND, BALL, CRATE, SIGN, FENCE = range(1, 11)
# (hue centres in degrees, hue spread, saturation range, value range) per class; other (0) is uniform
_COLOURS = {SKY: ((215, 30), 25, (0.05, 0.55), (0.55, 0.95)), BUILDING: ((15, 35), 20, (0.15, 0.55), (0.35, 0.85)),
            GRASS: ((95, 60), 25, (0.25, 0.7), (0.3, 0.75)), ROAD: ((0, 180), 180, (0.0, 0.15), (0.25, 0.65)),
            WATER: ((200, 170), 25, (0.2, 0.65), (0.3, 0.8)), SAND: ((40, 25), 15, (0.2, 0.5), (0.5, 0.9)),
            BALL: ((0, 180), 180, (0.3, 0.9), (0.45, 0.95)), CRATE: ((30, 20), 15, (0.25, 0.6), (0.35, 0.8)),
            SIGN: ((0, 180), 180, (0.4, 0.9), (0.5, 0.95)), FENCE: ((30, 210), 40, (0.0, 0.4), (0.3, 0.85)),
            0: ((0, 180), 180, (0.0, 1.0), (0.2, 0.95))}

def _colour(rng, cls):
    """A base RGB colour (3,) in 0..255 drawn from the class's hue/saturation/value ranges."""
    hues, spread, s, v = _COLOURS[cls]
    h = (rng.choice(hues) + rng.uniform(-spread, spread)) % 360
    return np.array(colorsys.hsv_to_rgb(h / 360, rng.uniform(*s), rng.uniform(*v)), np.float32) * 255

def _noise(rng, S, cy, cx):
    """Smooth value noise (S, S) in [-1, 1]: a random grid with cell cy x cx pixels, bilinearly interpolated."""
    g = rng.uniform(-1, 1, ((S - 1) // cy + 3, (S - 1) // cx + 3)).astype(np.float32)
    ty, tx = np.arange(S) / cy + rng.uniform(0, 1), np.arange(S) / cx + rng.uniform(0, 1)
    iy, ix = ty.astype(int), tx.astype(int)
    fy, fx = (ty - iy).astype(np.float32)[:, None], (tx - ix).astype(np.float32)
    rows = g[iy] * (1 - fy) + g[iy + 1] * fy  # (S, grid width)
    return rows[:, ix] * (1 - fx) + rows[:, ix + 1] * fx  # (S, S)

def _texture(rng, cls, yy, xx):
    """Full-frame (S, S, 3) float texture of a class; the caller keeps the pixels inside the class's mask."""
    S = yy.shape[0]
    base = _colour(rng, cls)
    if cls == SKY:  # smooth: vertical gradient and faint large clouds
        t = (yy / S - 0.5) * rng.uniform(0.2, 0.6) + 0.1 * _noise(rng, S, 16, 16)
    elif cls == BUILDING:  # bricks: dark mortar lines every 4-6 px, staggered joints
        bh, bw = rng.integers(4, 7), rng.integers(7, 12)
        y = yy + rng.integers(bh)
        mortar = (y % bh < 1) | ((xx + (y // bh % 2) * (bw // 2)) % bw < 1)
        t = np.where(mortar, -0.45, 0.08 * _noise(rng, S, bh, bw))
    elif cls == GRASS:  # vertical blades: noise stretched along y
        t = 0.45 * _noise(rng, S, 5, 1) + 0.1 * rng.standard_normal((S, S))
    elif cls == ROAD:  # fine isotropic grain
        t = 0.22 * rng.standard_normal((S, S)) + 0.1 * _noise(rng, S, 12, 12)
    elif cls == WATER:  # horizontal ripples, period 3-5 px, wavy along x
        t = 0.3 * np.sin(2 * np.pi * yy / rng.uniform(3, 5) + 2.5 * _noise(rng, S, 16, 8)) + (yy / S - 0.5) * 0.3
    elif cls == SAND:  # diagonal dune ripples, period 5-8 px, and blotches
        a = rng.choice([-1, 1]) * rng.uniform(0.35, 1.2)
        t = 0.2 * np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / rng.uniform(5, 8)) \
            + 0.15 * _noise(rng, S, 3, 3)
    elif cls == FENCE:  # painted wood: almost flat
        t = 0.05 * _noise(rng, S, 4, 4)
    else:  # other (0): concentric rings around a random centre
        cy, cx = rng.uniform(0, S, 2)
        t = 0.4 * np.sin(2 * np.pi * np.hypot(yy - cy, xx - cx) / rng.uniform(3, 6))
    return base * (1 + t[..., None])

def _rotated(yy, xx, cy, cx, angle):
    """Coordinates (u, v) relative to (cy, cx), rotated by angle (radians)."""
    c, s = np.cos(angle), np.sin(angle)
    return (xx - cx) * c + (yy - cy) * s, (yy - cy) * c - (xx - cx) * s

def _border(mask):
    """Pixels of mask with a 4-neighbour outside it (a 1 px inner ring)."""
    p = np.pad(mask, 1)
    return mask & ~(p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:])

def _stuff(rng, yy, xx, put, lab):
    """Sky over a wavy horizon, maybe buildings, ground, another ground's patch, a road, an unlabeled band -> row h0."""
    S = yy.shape[0]
    h0 = S * rng.uniform(0.25, 0.6)
    horizon = h0 + rng.uniform(-0.15, 0.15) * (xx - S / 2) + 0.03 * S * np.sin(xx / S * 6 + rng.uniform(0, 6))
    sky = yy < horizon
    put(sky, SKY)
    for _ in range(rng.integers(1, 5) if rng.random() < 0.5 else 0):
        x0, w, h = rng.uniform(-0.1, 0.9) * S, rng.uniform(0.1, 0.35) * S, rng.uniform(0.1, 0.4) * S
        put(sky & (xx >= x0) & (xx < x0 + w) & (yy >= horizon - h), BUILDING)
    ground = ~sky
    put(ground, rng.choice([GRASS, SAND, WATER], p=[0.4, 0.3, 0.3]))
    if rng.random() < 0.4:  # a patch of another ground type
        u, v = _rotated(yy, xx, rng.uniform(h0, S), rng.uniform(0, S), rng.uniform(0, np.pi))
        put(ground & ((u / rng.uniform(0.15, 0.4) / S) ** 2 + (v / rng.uniform(0.08, 0.2) / S) ** 2 < 1),
            rng.choice([GRASS, SAND, WATER]))
    if rng.random() < 0.6:  # a road in perspective from the bottom to a vanishing point, with dashed centre line
        t = np.clip((yy - h0) / (S - h0), 0, 1)
        centre = (1 - t) * rng.uniform(0.2, 0.8) * S + t * rng.uniform(0.1, 0.9) * S
        road = ground & (np.abs(xx - centre) < t * rng.uniform(0.15, 0.4) * S)
        tex = _texture(rng, ROAD, yy, xx)
        dash = (np.abs(xx - centre) < 0.5 + t) & (np.sqrt(np.maximum(yy - h0, 0)) * 2.5 % 2 < 1)
        tex[dash] = np.clip(tex[dash] + 110, 0, 255)
        put(road, ROAD, tex)
    if rng.random() < 0.3:  # unlabeled band along the horizon
        lab[np.abs(yy - horizon) < 1] = 0
    return h0

def _thing(rng, cls, yy, xx, cy, cx):
    """A ball, crate or sign centred at (cy, cx) -> (mask (S, S) bool, texture (S, S, 3))."""
    S = yy.shape[0]
    if cls == BALL:  # shaded sphere with a specular highlight
        r = rng.uniform(0.1, 0.22) * S
        d2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / r ** 2
        spot = np.exp(-((yy - cy + 0.35 * r) ** 2 + (xx - cx + 0.35 * r) ** 2) / (0.06 * r * r))
        shade = 0.5 * np.sqrt(np.clip(1 - d2, 0, 1)) - 0.25 + 0.6 * spot
        return d2 < 1, np.clip(_colour(rng, BALL) * (1 + shade[..., None]), 0, 255)
    if cls == CRATE:  # rotated rectangle with a 4-6 px checker and a dark frame
        u, v = _rotated(yy, xx, cy, cx, rng.uniform(-0.35, 0.35))
        hw, hh = rng.uniform(0.1, 0.22, 2) * S
        mask = (np.abs(u) < hw) & (np.abs(v) < hh)
        half = rng.integers(2, 4)
        checker = ((np.floor(u / half) + np.floor(v / half)) % 2) * 2 - 1
        t = 0.2 * checker - 0.45 * _border(mask)
        return mask, _colour(rng, CRATE) * (1 + t[..., None])
    # sign: triangle with a flat face and a 2 px contrasting rim
    a, r = rng.choice([-np.pi / 2, np.pi / 2]) + rng.uniform(-0.2, 0.2), rng.uniform(0.09, 0.17) * S
    dist = np.max([(xx - cx) * np.cos(a + k * 2 * np.pi / 3) + (yy - cy) * np.sin(a + k * 2 * np.pi / 3)
                   for k in range(3)], axis=0)  # (S, S), < r inside the triangle of inradius r
    return dist < r, np.where((dist > r - 2)[..., None], _colour(rng, SIGN), _colour(rng, SIGN))

def _things(rng, yy, xx, h0, put, lab):
    """Things on the ground below row h0, later over earlier: maybe a fence, 1-3 balls, crates or signs, an "other"."""
    S = yy.shape[0]
    if rng.random() < 0.45:  # fence: 2 px bars and rails over a band, the background visible in the gaps
        y0, h = rng.uniform(h0 - 0.1 * S, 0.9 * S), rng.uniform(0.12, 0.3) * S
        x0, x1 = sorted(rng.uniform(-0.2, 1.2, 2) * S)
        period = rng.integers(4, 7)
        band = (yy >= y0 - h) & (yy < y0) & (xx >= x0) & (xx < x1)
        rails = (np.abs(yy - (y0 - 0.25 * h)) <= 1) | (np.abs(yy - (y0 - 0.75 * h)) <= 1)
        put(band & (((xx - x0) % period < 2) | rails), FENCE)
        lab[band] = FENCE  # annotated as a whole, gaps included (as Cityscapes and ADE20K annotate fences)
    unlabeled_rims = rng.random() < 0.5
    for _ in range(rng.integers(1, 4)):
        cls = rng.choice([BALL, CRATE, SIGN])
        mask, tex = _thing(rng, cls, yy, xx, rng.uniform(h0 - 0.05 * S, S), rng.uniform(0, S))
        put(mask, cls, tex)
        if unlabeled_rims:
            lab[_border(mask)] = 0
    if rng.random() < 0.3:  # an "other" object: ring-textured ellipse labelled 0
        u, v = _rotated(yy, xx, rng.uniform(0.2, 0.9) * S, rng.uniform(0, S), rng.uniform(0, np.pi))
        put((u / rng.uniform(0.08, 0.2) / S) ** 2 + (v / rng.uniform(0.08, 0.2) / S) ** 2 < 1, 0)

def synthetic_scene(rng, S=128):
    """One scene -> (image (S, S, 3) uint8, label (S, S) uint8 with 0 = other/unlabeled, 1..10 classes)."""
    yy, xx = np.mgrid[:S, :S].astype(np.float32)
    img = np.zeros((S, S, 3), np.float32)
    lab = np.zeros((S, S), np.uint8)

    def put(mask, cls, tex=None):  # paint and label a region, over whatever was there
        img[mask] = (_texture(rng, cls, yy, xx) if tex is None else tex)[mask]
        lab[mask] = cls
    h0 = _stuff(rng, yy, xx, put, lab)
    _things(rng, yy, xx, h0, put, lab)
    img = img * rng.uniform(0.75, 1.2) + rng.normal(0, 2.5, img.shape)  # exposure and sensor noise
    return np.clip(img, 0, 255).astype(np.uint8), lab

def synthetic_root(root=None, seed=0, size=128, num_train=2000, num_val=200):
    """Directory of the synthetic set (ADE20K layout), generated once under ~/.cache/gss by default; scene i of a split
    depends only on (seed, split, i), so smaller sets are prefixes of larger ones."""
    base = Path(root) if root else Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'gss'
    out = base / f'synthetic-{SYNTHETIC_VERSION}-seed{seed}-{size}px-{num_train}-{num_val}'
    if out.is_dir():
        return str(out)
    tmp = base / f'.{out.name}.tmp{os.getpid()}'  # generate aside, then rename: never a half-written set
    shutil.rmtree(tmp, ignore_errors=True)
    for k, (split, prefix, n) in enumerate([('training', 'ADE_train', num_train), ('validation', 'ADE_val', num_val)]):
        (tmp / 'images' / split).mkdir(parents=True)
        (tmp / 'annotations' / split).mkdir(parents=True)
        for i in range(n):
            img, lab = synthetic_scene(np.random.default_rng([seed, k, i]), size)
            Image.fromarray(img).save(tmp / 'images' / split / f'{prefix}_{i + 1:08d}.png')
            Image.fromarray(lab).save(tmp / 'annotations' / split / f'{prefix}_{i + 1:08d}.png')
    try:
        os.rename(tmp, out)
    except OSError:  # another process (e.g. a DDP rank) finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)
