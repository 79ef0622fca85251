"""Evaluation for GSS: SegMetric (mmseg's IoUMetric), evaluate_split (generative inference and the auxiliary head),
reconstruction_oracle (stage I), save_outputs, load_stage2 (ours or an official release); the CLI, also a demo.

    python evaluate.py --checkpoint runs/synthetic/prior/latest.pt                    # GSS-FF + aux head
    python evaluate.py --checkpoint CKPT --posterior runs/synthetic/posterior.pt \
                       --posterior runs/synthetic/posterior-ftw.pt --recon              # several X^-1 + oracle
    python evaluate.py --recon --posterior runs/synthetic/posterior.pt                 # the oracle alone
    python evaluate.py --checkpoint CKPT --images photos/ --save-dir out/               # the demo
    python evaluate.py --checkpoint gss-ff_swin-l_512x512_160k_ade20k.pth --dataset ade20k --data-root data/ade
"""
import argparse
import itertools
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import datasets
import gss

# -----------------------------------------------------------------------------
# metrics: per-class areas accumulated over the whole dataset, then IoU / Acc (mmseg IoUMetric)

class SegMetric:
    """Accumulates per-class intersect, union, predicted and label areas (int64, on the predictions' device: no host
    sync per image) over a dataset; compute() moves them to the CPU."""

    def __init__(self, num_classes, ignore_index=255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.areas = torch.zeros(4, num_classes, dtype=torch.int64)  # intersect, union, pred, label

    def update(self, pred, label):
        """pred, label: integer maps of the same shape (tensors on any device, or numpy arrays)."""
        pred = torch.as_tensor(pred)
        label = torch.as_tensor(label, device=pred.device)
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
        pred, label = pred.reshape(-1).long(), label.reshape(-1).long()
        keep = label != self.ignore_index  # ignored GT pixels are dropped from both maps
        K = self.num_classes
        def hist(x, where):  # torch.histc(bins=K, min=0, max=K-1) of x[where]: values outside [0, K-1] not counted;
            where = where & (x >= 0) & (x < K)  # the rest into bin K: fixed sizes, no host sync (x[mask] and
            return x.new_zeros(K + 1).index_add_(0, torch.where(where, x, K), torch.ones_like(x))[:K]  # bincount do)
        inter, area_pred, area_label = hist(pred, keep & (pred == label)), hist(pred, keep), hist(label, keep)
        self.areas = self.areas.to(pred.device) + torch.stack([inter, area_pred + area_label - inter, area_pred,
                                                               area_label])  # (4, K)

    def all_reduce(self):
        """Sum the areas over all ranks when torch.distributed is initialised; returns self."""
        if dist.is_available() and dist.is_initialized():
            self.areas = self.areas.to(f'cuda:{torch.cuda.current_device()}' if dist.get_backend() == 'nccl' else 'cpu')
            dist.all_reduce(self.areas)
        return self

    def compute(self):
        """-> dict aAcc, mIoU, mAcc (percent floats) and per-class IoU, Acc (percent float64 arrays).
        A class absent from prediction and GT has IoU NaN (skipped by the mean); predicted but absent
        from GT has IoU 0 (counted); Acc is NaN whenever the GT area is 0."""
        inter, union, _, label = self.areas.cpu().double().numpy()
        with np.errstate(divide='ignore', invalid='ignore'):
            iou, acc = inter / union * 100, inter / label * 100  # (K,), (K,)
            aacc = inter.sum() / label.sum() * 100
        return dict(aAcc=float(aacc), mIoU=nanmean(iou), mAcc=nanmean(acc), IoU=iou, Acc=acc)


def nanmean(x):
    """np.nanmean without the empty-slice warning (NaN when every entry is NaN)."""
    x = x[~np.isnan(x)]  # x: a float64 array
    return float(x.mean()) if x.size else math.nan


def format_table(metrics, class_names):
    """A per-class IoU / Acc table (percent, 2 decimals, nan for absent classes) with the summary below."""
    w = max(len('Class'), *(len(n) for n in class_names))
    lines = [f"{'Class':<{w}} | {'IoU':>6} | {'Acc':>6}", '-' * (w + 18)]
    for name, iou, acc in zip(class_names, metrics['IoU'], metrics['Acc'], strict=True):
        lines.append(f"{name:<{w}} | {iou:6.2f} | {acc:6.2f}")
    lines += ['-' * (w + 18), f"aAcc {metrics['aAcc']:.2f}  mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}"]
    return '\n'.join(lines)


# -----------------------------------------------------------------------------
# evaluation of a stage-II model over a dataset split (also used by train_prior.py's validation)

def resized_argmax(scores, size):
    """(B, K, h, w) scores -> (B, *size) labels: bilinear resize to the label's size, then argmax (mmseg)."""
    if tuple(scores.shape[-2:]) != tuple(size):
        scores = F.interpolate(scores.float(), size=size, mode='bilinear', align_corners=False)
    return scores.argmax(1)


def window_maps(model, tokenizer, inverses, aux=False, maskige=False):
    """gss.infer's window_fn: one backbone pass and one generation per window -> {name: (B, K, h, w)} for each X^-1
    in `inverses` ({name: module}), plus 'aux head' (aux=True), the generated 'maskige' (B, 3, 2h, 2w) and its
    'confidence' (B, 1, h, w), gss.sample_agreement with the first X^-1 (maskige=True, for --save-dir)."""
    def window_fn(x):
        feats = getattr(model, 'module', model).backbone(x)
        m = gss.generate(model, tokenizer, x, feats)  # (B, 3, 2h, 2w)
        out = {name: gss.maskige_scores(inv, m, x.shape[-2:]) for name, inv in inverses.items()}
        if aux:
            out['aux head'] = gss.aux_scores(model, feats, x.shape[-2:])
        if maskige:
            out['maskige'] = m
            first = next(iter(inverses.values()))
            out['confidence'] = gss.sample_agreement(model, tokenizer, first, feats, x.shape[-2:])  # (B, 1, h, w)
        return out
    return window_fn


@torch.no_grad()
def evaluate_split(model, tokenizer, inverses, dataset, test_cfg, aux=True, indices=None, on_item=None):
    """{name: SegMetric} of each X^-1 in `inverses` ({name: module}) and of the 'aux head' (aux=True) over the items
    `indices` of `dataset` (default all; a rank's share under DDP). on_item(item, {name: (H, W) labels}, maskige,
    confidence): window_maps' maps of the image."""
    metrics = {name: SegMetric(dataset.num_classes) for name in list(inverses) + (['aux head'] if aux else [])}
    device = next(model.parameters()).device
    window_fn = window_maps(model, tokenizer, inverses, aux, maskige=on_item is not None)
    for i in range(len(dataset)) if indices is None else indices:
        item = dataset[i]
        image = item['image'][None].to(device)  # (1, 3, h, w) at the test scale
        label = item['label'].to(device)  # (H, W) at the original resolution
        scores = gss.infer(window_fn, image, **test_cfg)
        maskige, confidence = scores.pop('maskige', None), scores.pop('confidence', None)  # (1, 3, 2h, 2w), (1,1,h,w)
        preds = {name: resized_argmax(s, label.shape)[0] for name, s in scores.items()}
        for name, pred in preds.items():
            metrics[name].update(pred, label)
        if on_item is not None:
            on_item(item, preds, maskige[0], confidence[0])
    return metrics


def labels_and_test_sizes(dataset, indices):
    """A stream of (label (1, H, W) at the original resolution, size (h, w) of the test-transformed image)."""
    return ((item['label'][None], tuple(item['image'].shape[-2:])) for item in map(dataset.__getitem__, indices))


@torch.no_grad()
def reconstruction_oracle(tokenizer, inverse, palette, ignore_colour, items, num_classes, upsample=False):
    """The stage-I oracle (official dalle_reconstruction configs; gss.recon_scores) over (label, test size) pairs
    -> SegMetric. Labels of one size go in batches of up to 2^18 pixels (histograms sum: the same numbers)."""
    metric = SegMetric(num_classes)
    device = next(tokenizer.parameters()).device
    palette, ignore_colour = palette.to(device), ignore_colour.to(device)
    for (shape, size), run in itertools.groupby(items, key=lambda item: (item[0].shape, item[1])):
        while batch := [label for label, _ in itertools.islice(run, max(1, 2 ** 18 // shape.numel()))]:
            label = torch.cat(batch).to(device)  # (b, H, W)
            scores = gss.recon_scores(tokenizer, inverse, label, palette, ignore_colour, size, upsample)  # (b, K, H, W)
            metric.update(scores.argmax(1), label)
    return metric


# -----------------------------------------------------------------------------
# outputs: label PNGs, overlays, maskiges, Cityscapes labelIds

def save_outputs(save_dir, image_path, pred, palette, maskige=None, cityscapes_ids=False, confidence=None):
    """Write <stem>.png (palette-mode labels, colours = the maskige palette), <stem>_overlay.jpg (labels over the
    image), <stem>_maskige.png (the predicted maskige, when given), <stem>_confidence.png (a heat map of the doubt,
    1 - confidence (1, h, w), when given: black sure, then red, yellow, white unsure) and, for the Cityscapes test
    server, <stem>_labelIds.png (trainIds mapped back to label ids)."""
    os.makedirs(save_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(image_path))[0]
    labels = pred.to(torch.uint8).cpu().numpy()  # (H, W)
    png = Image.fromarray(labels, mode='P')
    flat = palette.to(torch.uint8).flatten().tolist()
    png.putpalette(flat + [0] * (768 - len(flat)))  # classes beyond the palette (255 = ignore) are black
    png.save(os.path.join(save_dir, stem + '.png'))
    image = datasets.read_image(image_path)  # (H, W, 3) uint8
    overlay = (0.5 * image + 0.5 * np.asarray(png.convert('RGB'))).astype(np.uint8)
    Image.fromarray(overlay).save(os.path.join(save_dir, stem + '_overlay.jpg'), quality=92)
    if maskige is not None:
        m = (maskige.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()  # (2H, 2W, 3)
        Image.fromarray(m).save(os.path.join(save_dir, stem + '_maskige.png'))
    if confidence is not None:
        doubt = 1 - F.interpolate(confidence[None].float(), pred.shape, mode='bilinear')[0, 0].cpu().numpy()  # (H, W)
        hot = np.clip(3 * doubt[..., None] - np.arange(3), 0, 1)  # (H, W, 3): the 'hot' colour map
        Image.fromarray((255 * hot).round().astype(np.uint8)).save(os.path.join(save_dir, stem + '_confidence.png'))
    if cityscapes_ids:
        train_to_id = np.zeros(256, np.uint8)  # trainId -> label id; 255 -> 0 (unlabeled)
        train_to_id[list(datasets.CITYSCAPES_ID_TO_TRAINID.values())] = list(datasets.CITYSCAPES_ID_TO_TRAINID)
        ids_path = os.path.join(save_dir, stem.replace('_leftImg8bit', '') + '_labelIds.png')
        Image.fromarray(train_to_id[labels]).save(ids_path)


# -----------------------------------------------------------------------------
# loading a stage-II model: ours (train_prior.py) or an official GSS release

def load_stage2(path, posterior_paths, dataset, device, tokenizer=None):
    """-> (model, tokenizer, {name: inverse}, palette, ignore_colour). Our checkpoints carry their stage-I artifact
    (checked against each --posterior); official releases carry the DALL-E weights (and GSS-FT-W's inverse), not the
    palette: the official one of `dataset`."""
    ckpt = gss.load_file(path, 'checkpoint')
    keys = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else {}  # an official release's parameter names
    if isinstance(ckpt, dict) and ckpt.get('kind') == 'gss-prior':
        posteriors = [gss.load_posterior(p) for p in posterior_paths or []] or \
            [gss.checkpoint_posterior(ckpt, path, tokenizer)]
        for post in posteriors:
            gss.check_posterior_match(ckpt['posterior'], post, path)
        model = gss.GSS.from_config(ckpt['config'])
        model.load_state_dict(ckpt['model'])
        tokenizer = gss.load_tokenizer(tokenizer or posteriors[0]['tokenizer'])
        inverses = {f"GSS-{post['variant'].upper()}": gss.build_inverse(post) for post in posteriors}
        palette, ignore = torch.tensor(posteriors[0]['palette']), torch.tensor(posteriors[0]['ignore_colour'])
    elif any(k.startswith(('decode_head.', 'backbone.')) for k in keys):
        if dataset not in gss.OFFICIAL_PALETTES:
            raise gss.UserError(f"--dataset {dataset}: official checkpoints use the official palette of the dataset "
                                f"they were trained on; expected one of {', '.join(gss.OFFICIAL_PALETTES)}")
        model, tokenizer, ftw = gss.load_official_checkpoint(ckpt)
        official = gss.official_palette(dataset)  # (K+1, 3), the last entry is the ignore colour
        palette, ignore = official[:-1], official[-1]
        inverses = {'GSS-FT-W': ftw} if ftw is not None else {'GSS-FF': gss.NearestColour(palette)}
    else:
        raise gss.UserError(f"{path}: neither a train_prior.py checkpoint nor an official GSS state dict")
    model, tokenizer = model.to(device).eval(), tokenizer.to(device).eval()
    return model, tokenizer, {k: v.to(device).eval() for k, v in inverses.items()}, palette, ignore


# -----------------------------------------------------------------------------
# command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', help="stage-II checkpoint: train_prior.py's latest.pt, or an official GSS .pth")
    p.add_argument('--posterior', action='append', help="stage-I artifact (default: the model's); repeat for several")
    p.add_argument('--tokenizer', help="tokenizer file (default: the stage-I artifact's)")
    p.add_argument('--recon', action='store_true', help="also the maskige-reconstruction oracle (needs --posterior)")
    p.add_argument('--dataset', default='synthetic', help="preset: " + ", ".join(datasets.DATASET_PRESETS))
    p.add_argument('--data-root', help="dataset root (default: the preset's)")
    p.add_argument('--split', default='val')
    p.add_argument('--max-images', type=int, help="evaluate the first N images only")
    p.add_argument('--mode', choices=['whole', 'slide'], help="default: the preset's (ADE20K whole, Cityscapes slide)")
    p.add_argument('--crop', type=int, help="sliding-window size (default: the preset's, 768 for Cityscapes)")
    p.add_argument('--stride', type=int, help="sliding-window stride (default: the preset's, 512 for Cityscapes)")
    p.add_argument('--images', help="segment these image files or folders instead of a dataset split (the demo)")
    p.add_argument('--save-dir', help="write labels, overlays, maskiges, confidence maps (8 sampled decodes a window)")
    p.add_argument('--cityscapes-ids', action='store_true', help="also write *_labelIds.png for the Cityscapes server")
    p.add_argument('--device', choices=['cpu', 'cuda'], help="default cuda when available")
    args = p.parse_args(argv)
    preset = datasets.dataset_preset(args.dataset)
    if args.checkpoint is None and not (args.recon and args.posterior):
        raise gss.UserError("--checkpoint: required (or --recon with --posterior for the reconstruction oracle alone)")
    if args.images and not args.checkpoint:
        raise gss.UserError("--images: needs --checkpoint")
    args.mode = args.mode or preset['test_mode']
    args.crop, args.stride = args.crop or preset['test_crop'], args.stride or preset['test_stride']
    args.device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    return args


def image_files(path):
    """A file, or the images in a folder (recursively)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise gss.UserError(f"--images {path}: no such file or folder")
    files = sorted(str(p) for p in Path(path).rglob('*') if p.suffix.lower() in datasets.IMAGE_EXTS)
    if not files:
        raise gss.UserError(f"--images {path}: no *.jpg or *.png images in this folder")
    return files


def segment_images(args, model, tokenizer, inverse, palette):
    """The demo: segment arbitrary image files, write labels, overlays and maskiges to --save-dir."""
    preset = datasets.DATASET_PRESETS[args.dataset]
    test_cfg = dict(mode=args.mode, crop=args.crop, stride=args.stride)
    save_dir = args.save_dir or 'predictions'
    for path in image_files(args.images):
        img = datasets.read_image(path)  # (H, W, 3) uint8
        H, W = img.shape[:2]
        image = datasets.test_transform(img, np.zeros((H, W), np.uint8), preset)['image'][None].to(args.device)
        with torch.no_grad():
            out = gss.infer(window_maps(model, tokenizer, {'': inverse}, maskige=True), image, **test_cfg)
        pred = resized_argmax(out[''], (H, W))[0]
        save_outputs(save_dir, path, pred, palette, out['maskige'][0], args.cityscapes_ids, out['confidence'][0])
        print(f"{path}: {H}x{W} -> {save_dir}")


def run(args):
    dataset = None if args.images else datasets.build_dataset(args.dataset, args.split, args.data_root, train=False)
    indices = None if dataset is None else range(min(len(dataset), args.max_images or len(dataset)))
    results = {}
    if args.checkpoint:
        model, tokenizer, inverses, palette, ignore = load_stage2(args.checkpoint, args.posterior, args.dataset,
                                                                  args.device, args.tokenizer)
        if args.images:
            return segment_images(args, model, tokenizer, next(iter(inverses.values())), palette)

        def save(item, preds, maskige, confidence):  # the first X^-1's labels, the model's maskige and confidence
            save_outputs(args.save_dir, item['path'], next(iter(preds.values())), palette, maskige,
                         args.cityscapes_ids, confidence)
        t0 = time.time()
        results = evaluate_split(model, tokenizer, inverses, dataset,
                                 dict(mode=args.mode, crop=args.crop, stride=args.stride), indices=indices,
                                 on_item=save if args.save_dir else None)
        print(f"evaluated {len(indices)} images of {args.dataset} {args.split} in {time.time() - t0:.1f} s "
              f"({args.mode} inference)")
    if args.recon:  # the stage-I oracle of the (first) artifact, or of the official checkpoint's palette
        if not args.checkpoint:
            post = gss.load_posterior(args.posterior[0])
            tokenizer = gss.load_tokenizer(args.tokenizer or post['tokenizer']).to(args.device)
            inverses = {'': gss.build_inverse(post).to(args.device).eval()}
            palette, ignore = torch.tensor(post['palette']), torch.tensor(post['ignore_colour'])
        oracle = reconstruction_oracle(tokenizer, next(iter(inverses.values())), palette, ignore,
                                       labels_and_test_sizes(dataset, indices), dataset.num_classes)
        results = {'tokenizer oracle': oracle, **results}
    for name, metric in results.items():
        print(f"\n{name}\n" + format_table(metric.compute(), dataset.classes))
    print(f"\n{args.dataset} {args.split}: {len(indices)} images")
    print(f"{'':<18} {'aAcc':>6} {'mIoU':>6} {'mAcc':>6}")
    for name, metric in results.items():
        m = metric.compute()
        print(f"{name:<18} {m['aAcc']:6.2f} {m['mIoU']:6.2f} {m['mAcc']:6.2f}")
    return results


def main(argv=None):
    """CLI entry: user errors print one line `error: ...` on stderr and exit 2, no traceback."""
    try:
        run(parse_args(argv))
        return 0
    except (gss.UserError, datasets.UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
