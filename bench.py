"""
Benchmarks of gss's hot paths as ratios measured side by side in one run. Each subcommand prints tables and, last,
one `BENCH {json}` line. The cores may be shared: compare ratios, not seconds.

    python bench.py swin        # our Swin-T vs torchvision's swin_t
    python bench.py data        # images/s through the training pipeline
    python bench.py inverse     # nearest colour vs least squares accuracy; fast vs naive nearest colour
    python bench.py tokenizer   # DALL-E-size encode/decode: ours vs the naive dall_e usage
    python bench.py token-loss  # chunked 2048->8192 conv + CE vs naive
    python bench.py train       # one stage-II step split into its parts
    python bench.py infer       # gss.predict end to end; Swin-L 1024x2048 slide 768/512 against 8 GB (--windows)
    python bench.py ablate-palette / ablate-posterior / ablate-prior  # the paper's Tables 9, 1, 3 on synthetic data
    python bench.py confidence  # beyond the paper: confidence maps vs the aux head's softmax, samples, soft decoding

Every measurement runs in a fresh subprocess (run_side): peak memory is its peak RSS (VmHWM, reset after setup and
warm-up, once the memory they freed is handed back to the OS) minus its RSS then; timings are medians of rounds.
"""
import argparse
import collections
import ctypes
import json
import math
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import datasets
import evaluate
import gss
import swin
import train_posterior
import train_prior


def _rss_mb(field):
    """VmRSS (now) or VmHWM (peak since the last reset) of this process in MB, from /proc/self/status (Linux)."""
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ':')) / 1024


def _wall_and_cpu():
    """(wall seconds, CPU seconds of this process): the second is robust to other load on the machine."""
    return np.array([time.perf_counter(), time.process_time()])


def _child(setup, args, threads, warmup, queue):
    torch.set_num_threads(threads)
    fn = setup(*args)  # builds the model and inputs, returns the callable to time
    if warmup:
        fn()  # first call: kernel creation, allocator growth
    # hand the memory that setup and warm-up freed back to the OS (glibc keeps it otherwise, and the timed call would
    # reuse it unseen), then reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0): ru_maxrss cannot be reset,
    # and a spawned child inherits its parent's high-water mark
    ctypes.CDLL('libc.so.6').malloc_trim(0)
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    base = _rss_mb('VmRSS')
    t0 = _wall_and_cpu()
    result = fn()
    seconds, cpu_seconds = _wall_and_cpu() - t0
    out = {'seconds': seconds, 'cpu_seconds': cpu_seconds, 'peak_mb': _rss_mb('VmHWM') - base}
    if hasattr(fn, 'details'):  # optional extra figures, computed after the measurement: fn.details(result, base)
        out['details'] = fn.details(result, base)
    queue.put(out)


def run_side(setup, args=(), threads=2, warmup=True):
    """setup(*args)() in a fresh spawned process (after a warm-up call unless warmup=False) -> dict of its wall and
    CPU seconds, its peak RSS above the RSS just before the call, and 'details' if the callable has fn.details.
    `setup` must be a module-level function."""
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(setup, args, threads, warmup, queue))
    p.start()
    out = queue.get()
    p.join()
    return out


def interleaved(sides, repeats, threads, warmup=True):
    """sides {name: (setup, args)}: `repeats` rounds, one fresh process per side per round, sides alternating ->
    {name: medians of 'seconds', 'cpu_seconds', 'peak_mb', plus 'details' of the run nearest the median time}."""
    runs = {name: [] for name in sides}
    for _ in range(repeats):
        for name, (setup, args) in sides.items():
            runs[name].append(run_side(setup, args, threads, warmup))
    out = {}
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ('seconds', 'cpu_seconds', 'peak_mb')}
        nearest = min(rs, key=lambda r: abs(r['seconds'] - med['seconds']))
        out[name] = dict(med, details=nearest.get('details'))
    return out


def table(title, rows):
    """Print a title and rows (the first is the header; floats with 3 significant digits, or none from 100 up)."""
    print(title)
    rows = [[(f'{c:.0f}' if abs(c) >= 100 else f'{c:.3g}') if isinstance(c, float) else str(c) for c in r]
            for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print('  '.join(c.ljust(w) for c, w in zip(r, widths)))


def compare(title, sides, args, warmup=True):
    """interleaved() of sides {name: (setup, args)}, printed with time and memory ratios to sides['naive'] ->
    {name: medians of 'seconds', 'cpu_seconds', 'peak_mb', and 'time_ratio', 'mem_ratio'}."""
    m = interleaved(sides, args.repeats, args.threads, warmup)
    rows = [('side', 'wall s', 'CPU s', 'peak MB', 'time ratio', 'mem ratio')]
    for name, v in m.items():
        v.update(time_ratio=v['seconds'] / m['naive']['seconds'], mem_ratio=v['peak_mb'] / m['naive']['peak_mb'])
        rows.append((name, v['seconds'], v['cpu_seconds'], v['peak_mb'], v['time_ratio'], v['mem_ratio']))
    table(title, rows)
    return m


def targets(rows):
    """Print (figure, value, '<=' or '>=', limit) rows with whether each target is met."""
    rows = [(name, v, f'{op} {limit}', v <= limit if op == '<=' else v >= limit) for name, v, op, limit in rows]
    table('targets', [('figure', 'value', 'target', 'met')] + rows)


def _write_ade(root, scenes):
    """(image (H, W, 3), label (H, W)) uint8 pairs -> an ADE20K training split under root."""
    for i, (img, lab) in enumerate(scenes):
        for sub, array, ext in (('images', img, 'jpg'), ('annotations', lab, 'png')):
            os.makedirs(f'{root}/{sub}/training', exist_ok=True)
            Image.fromarray(np.asarray(array)).save(f'{root}/{sub}/training/ADE_train_{i:08d}.{ext}', quality=90)


def _swin_setup(side, mode):
    """One side's training step without the optimizer ('fwd_bwd') or inference forward ('fwd'), batch 2 of 256^2."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 256, 256)
    if side == 'torchvision':
        model = torchvision.models.swin_t()  # stochastic_depth_prob=0.2 is fixed by this builder
        loss = lambda: model.norm(model.features(x)).mean()  # features + final norm, no classifier head
    else:
        model = swin.build_swin('swin_t', drop_path_rate=0.2)
        loss = lambda: sum(o.mean() for o in model(x))  # the 4 normed output maps
    model.train(mode == 'fwd_bwd')
    if mode == 'fwd':
        return torch.no_grad()(loss)

    def step():
        model.zero_grad(set_to_none=True)
        loss().backward()
    return step


def bench_swin(args):
    threads = torch.get_num_threads()
    figures = {'bench': 'swin', 'model': 'swin_t', 'input': [2, 3, 256, 256], 'device': 'cpu', 'threads': threads,
               'repeats': args.repeats,
               'memory_method': 'VmHWM minus VmRSS after setup, own subprocess per side, median of 3'}
    sides = {(s, m): (_swin_setup, (s, m)) for s in ('ours', 'torchvision') for m in ('fwd_bwd', 'fwd')}
    runs = {'_s': interleaved(sides, args.repeats, threads)}
    if threads > 1:  # one thread too: steadier when the cores are shared with other jobs
        runs['_1thread_s'] = interleaved(sides, args.repeats, 1)
    runs['_peak_mib'] = interleaved(sides, 3, 2, warmup=False)  # the first call's peak, allocator growth included
    rows = [('', 'ours', 'torchvision', 'ours/tv')]
    for suffix, run in runs.items():
        for m in ('fwd_bwd', 'fwd'):
            ours, tv = (run[s, m]['peak_mb' if suffix == '_peak_mib' else 'seconds'] for s in ('ours', 'torchvision'))
            rows.append((m + suffix, ours, tv, ours / tv))
            figures.update({f'ours_{m}{suffix}': ours, f'tv_{m}{suffix}': tv, f'ratio_{m}{suffix}': ours / tv})
    table(f'swin_t vs torchvision swin_t, {threads} threads: seconds; peak RSS of a first call (MiB)', rows)
    return figures


def bench_data(args):
    """Images/s through the training pipeline (DataLoader, 2 workers) on the synthetic set and on 64 ADE20K-sized
    512x683 JPEG/PNG pairs written here; CPU ms per image in one process; the synthetic set's generation time."""
    rows = [('dataset', 'image', 'crop', 'batch', 'CPU ms/img', 'img/s 2 workers')]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = _wall_and_cpu()
        datasets.synthetic_root(tmp)
        gen_s, gen_cpu = _wall_and_cpu() - t0
        figures = {'synthetic_generation_s': round(gen_s, 2), 'synthetic_generation_cpu_s': round(gen_cpu, 2)}
        rng = np.random.default_rng(0)

        def scene():  # a smooth random scene with blocky labels 0..150, 512x683
            img = Image.fromarray(rng.integers(0, 256, (16, 21, 3), np.uint8)).resize((683, 512), Image.BILINEAR)
            img = np.clip(np.asarray(img, np.int16) + rng.integers(-20, 21, (512, 683, 3)), 0, 255).astype(np.uint8)
            return img, Image.fromarray(rng.integers(0, 151, (8, 11), np.uint8)).resize((683, 512), Image.NEAREST)
        _write_ade(f'{tmp}/ade', (scene() for _ in range(64)))
        sets = [('synthetic', 'synthetic', tmp, 1024, 16), ('ade', 'ade20k', f'{tmp}/ade', 64, 8)]
        for key, name, root, n, batch in sets:
            ds = datasets.build_dataset(name, 'train', root)
            torch.manual_seed(0)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as in a DataLoader worker
            t0 = time.process_time()
            for i in range(64):
                ds[i]
            ms = (time.process_time() - t0) / 64 * 1000
            torch.set_num_threads(threads)
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch, shuffle=True,
                                                 num_workers=2, persistent_workers=True)
            speeds = []
            for _ in range(4):  # the first pass starts the workers and is not counted
                t0 = time.perf_counter()
                for _ in loader:
                    pass
                speeds.append(n / (time.perf_counter() - t0))
            ips = statistics.median(speeds[1:])
            size = 'x'.join(map(str, datasets.read_image(ds.files[0][0]).shape[:2]))
            rows.append((name, size, ds.preset['crop_size'], batch, round(ms, 2), round(ips, 1)))
            figures.update({f'{key}_cpu_ms_per_image': round(ms, 2), f'{key}_images_per_s_2workers': round(ips, 1)})
    table(f'synthetic set generated in {gen_s:.1f} s ({gen_cpu:.1f} s CPU); img/s: median of 3 passes after a warm-up',
          rows)
    return figures


def _token_loss_setup(side, B, h, w, C, V):
    """The token head's features x (B, C, h, w), its last conv C -> V and targets; returns one side's forward +
    backward -> [loss, grad x, grad weight, grad bias]."""
    torch.manual_seed(0)
    x = torch.randn(B, C, h, w, requires_grad=True)  # the token head's features after dropout
    conv = torch.nn.Conv2d(C, V, 1)
    torch.nn.init.normal_(conv.weight, std=0.01)  # conv_seg's init
    target = torch.randint(0, V, (B, h, w))
    target[:, :h // 8] = V  # some ignored tokens (fully unlabeled blocks)

    def step():
        if side == 'naive':
            loss = F.cross_entropy(conv(x), target, ignore_index=V)  # (B, V, h, w) logits at once
        else:
            loss = gss.token_cross_entropy(x, conv, target, V)[0]
        return [loss.detach(), *torch.autograd.grad(loss, (x, conv.weight, conv.bias))]
    return step


TOKEN_LOSS_SHAPE = (2, 128, 128, 2048, 8192)  # batch 2, a 512 crop's 128x128 tokens, conv 2048 -> 8192 (the paper's)


def bench_token_loss(args):
    B, h, w, C, V = TOKEN_LOSS_SHAPE
    m = compare(f'token-loss fwd+bwd: batch {B}, {h}x{w} positions, {C} -> {V}; naive: conv + F.cross_entropy',
                {side: (_token_loss_setup, (side, B, h, w, C, V)) for side in ('naive', 'ours')}, args, warmup=False)
    # same numbers: loss and gradients at a quarter of the positions, in this process
    grads = {side: _token_loss_setup(side, B, h // 2, w // 2, C, V)() for side in m}
    rel = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads['ours'], grads['naive']))
    return dict(shape=dict(batch=B, positions=f'{h}x{w}', channels=C, vocab=V), threads=args.threads,
                seconds_naive=round(m['naive']['seconds'], 2), seconds_ours=round(m['ours']['seconds'], 2),
                time_ratio=round(m['ours']['time_ratio'], 3), peak_mb_naive=round(m['naive']['peak_mb']),
                peak_mb_ours=round(m['ours']['peak_mb']), memory_ratio=round(m['ours']['mem_ratio'], 3),
                max_rel_diff_loss_and_grads=rel,
                memory_method='bench.run_side: VmHWM above the RSS after setup, fresh subprocess per run, median')


def blobs(B, S, K, seed):
    """Label maps (B, S, S) covering all K classes with random rectangles."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(B * S * S).view(B, S, S) % K
    labels = labels[:, torch.randperm(S, generator=g)]
    for _ in range(4 * K):
        b, y, x = (int(torch.randint(0, n, (), generator=g)) for n in (B, S - 8, S - 8))
        h, w = (int(torch.randint(8, S // 3, (), generator=g)) for _ in range(2))
        labels[b, y:y + h, x:x + w] = int(torch.randint(0, K, (), generator=g))
    return labels


def _nearest_setup(side, S, K):
    palette = gss.make_palette(K)
    maskige = torch.rand(1, 3, S, S, generator=torch.Generator().manual_seed(0))
    if side == 'ours':
        nc = gss.NearestColour(palette)
        return lambda: nc.labels(maskige)
    p = palette.float()
    # the official decode_from_segmap: squared distances to every class colour by broadcasting, then argmin
    return lambda: ((maskige[:, None] * 255 - p[None, :, :, None, None]) ** 2).sum(2).argmin(1)  # (1, K, S, S)


NEAREST_SHAPE = (150, 1024)  # K classes, a S x S maskige


def bench_inverse(args):
    """X^-1 accuracy (nearest colour, least squares; official ADE20K and random FF-R palettes) on clean and noisy
    maskiges, and the nearest-colour decode: ours (chunked 2x.p - |p|^2 matmul) vs the naive (1, K, 3, S, S)."""
    K, S = NEAREST_SHAPE
    palettes = {'ade': gss.official_palette('ade20k')[:-1], 'ffr': gss.random_palette(150)}
    labels = blobs(4, 256, 150, seed=0)
    noise = 0.1 * torch.randn(4, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    rows, figures = [('palette', 'inverse', 'maskige (noisy: + N(0, 0.1))', 'acc', 'mIoU')], {}
    for pname, palette in palettes.items():
        clean = gss.paint(labels, palette, gss.ignore_colour_for(palette))  # (4, 3, 256, 256), no ignore pixels
        for iname, inverse in {'nearest': gss.NearestColour(palette), 'lstsq': gss.LeastSquares(palette)}.items():
            for nname, maskige in (('clean', clean), ('noisy', (clean + noise).clamp(0, 1))):
                with torch.no_grad():
                    pred = inverse(maskige).argmax(1)  # (4, 256, 256)
                metric = evaluate.SegMetric(150)
                metric.update(pred, labels)
                r = metric.compute()  # no ignored pixels here: aAcc is the pixel accuracy
                rows.append([pname, iname, nname, r['aAcc'], r['mIoU']])
                key = f"{pname}_{iname}_{nname}"
                figures.update({f"{key}_acc": round(r['aAcc'], 2), f"{key}_miou": round(r['mIoU'], 2)})
    table('X^-1 accuracy, K=150, 4 blob label maps 256x256 with all classes (pixel accuracy %, mIoU %)', rows)
    same = torch.equal(_nearest_setup('ours', S, K)(), _nearest_setup('naive', S, K)())
    m = compare(f'\nnearest-colour decode of a {S}x{S} maskige, K={K}',
                {s: (_nearest_setup, (s, S, K)) for s in ('naive', 'ours')}, args)
    t_ratio = m['ours']['time_ratio']
    mem_ratio = max(m['ours']['peak_mb'], 1.0) / m['naive']['peak_mb']  # a peak under 1 MB counts as 1 MB
    targets([('nearest time ratio', t_ratio, '<=', 0.2), ('nearest memory ratio', mem_ratio, '<=', 0.1),
             ('nearest identical labels', same, '>=', True)])
    return dict(figures, nearest_time_ratio=round(t_ratio, 4), nearest_mem_ratio=round(mem_ratio, 4),
                nearest_identical=same, nearest_naive_s=round(m['naive']['seconds'], 3),
                nearest_ours_s=round(m['ours']['seconds'], 4), nearest_naive_mb=round(m['naive']['peak_mb'], 1),
                nearest_ours_mb=round(m['ours']['peak_mb'], 1))


DALLE_ARCH = dict(n_hid=256, vocab_size=8192, n_init=128, n_blk_per_group=2)  # DALL-E's dVAE shapes


def _dalle_size():
    torch.manual_seed(0)
    tok = gss.build_tokenizer(**DALLE_ARCH)
    # random weights give an almost flat grey maskige; spread the colours as a trained decoder would (as the golden
    # vectors of the official code do), so the bf16 class agreement below is measured on varied colours
    with torch.no_grad():
        tok.decoder.blocks.output.conv.w.mul_(300)
        tok.decoder.blocks.output.conv.b.normal_(0, 1)
    return tok


def _naive(tok, op, x):
    """The official code's dall_e usage: get_codebook_indices (argmax of the Encoder's logits) and Dalle_VAE.decode
    (a one-hot over the vocabulary into the Decoder)."""
    import dall_e
    with torch.no_grad():
        if op == 'encode':
            return tok.encoder(dall_e.utils.map_pixels(x)).argmax(1)  # logits (1, 8192, S/8, S/8)
        onehot = F.one_hot(x, tok.vocab_size).permute(0, 3, 1, 2).float()  # (1, 8192, S/8, S/8)
        return dall_e.utils.unmap_pixels(torch.sigmoid(tok.decoder(onehot)[:, :3].float()))


def _tokenizer_setup(side, op, S):
    tok = _dalle_size()
    maskige = gss.paint(blobs(1, S, 150, seed=0), gss.make_palette(150), torch.tensor([0, 0, 0]))  # (1, 3, S, S)
    x = tok.encode(maskige) if op == 'decode' else maskige
    if side == 'naive':
        tok.to(memory_format=torch.contiguous_format)  # the dall_e modules as they are (ours: channels-last)
        return lambda: _naive(tok, op, x)
    if op == 'encode':
        return lambda: tok.encode(x)
    return lambda: tok.decode(x, dtype=torch.bfloat16 if side == 'ours bf16' else torch.float32)


TOKENIZER_SIZES = (256, 512)  # the outputs are compared at the last


def bench_tokenizer(args):
    """DALL-E-size dVAE (random weights), batch 1, float32 unless bf16: ours vs the naive dall_e usage."""
    figures = {}
    for S in TOKENIZER_SIZES:
        for op in ('encode', 'decode'):
            sides = ['naive', 'ours'] + (['ours bf16'] if op == 'decode' else [])
            m = compare(f'{op} {S}x{S}', {s: (_tokenizer_setup, (s, op, S)) for s in sides}, args)
            for s, v in m.items():
                key = f"{op}{S}" + ('' if s == 'naive' else '_' + s.replace(' ', '_'))
                figures.update({f"{key}_s": round(v['seconds'], 2), f"{key}_mb": round(v['peak_mb'], 1)})
                if s != 'naive':
                    figures.update({f"{key}_time_ratio": round(v['time_ratio'], 3),
                                    f"{key}_mem_ratio": round(v['mem_ratio'], 3)})
    # outputs, in this process: ours vs naive (float32), and bf16 classes after nearest colour
    tok = _dalle_size()
    palette = gss.make_palette(150)
    maskige = gss.paint(blobs(1, S, 150, seed=0), palette, torch.tensor([0, 0, 0]))  # (1, 3, S, S)
    tokens = tok.encode(maskige)
    same_tokens = torch.equal(tokens, _naive(tok, 'encode', maskige))
    ours, bf16 = tok.decode(tokens), tok.decode(tokens, dtype=torch.bfloat16)
    diff = (ours - _naive(tok, 'decode', tokens)).abs().max().item()
    nc = gss.NearestColour(palette)
    agree = (nc.labels(bf16) == nc.labels(ours)).float().mean().item() * 100
    targets([(f'encode{S} tokens identical', same_tokens, '>=', True),
             (f'decode{S} max |ours - naive|', diff, '<=', 1e-5),
             (f'decode{S} bf16 same class % (K=150)', agree, '>=', 99.9)])
    return dict(figures, encode512_tokens_identical=same_tokens, decode512_max_abs_diff=diff,
                decode512_bf16_same_class_pct=round(agree, 3),
                decode512_bf16_max_abs_diff=(bf16 - ours).abs().max().item())


# synthetic: the synthetic preset as `python train_prior.py --dataset synthetic` trains it (swin_mini, the CPU-sized
#   head, batch 16 of 64x64 crops) with the tokenizer train_posterior.py trains for it; synthetic-paper-head: the same
#   with the paper's head widths (384/512/2048, 16 heads); swin_t: Swin-T, the paper's head, the DALL-E-size tokenizer,
#   the ADE20K pipeline, batch 1 at 256x256 (a 512 crop has 4x the FLOPs: about 85 s per step on one core).
TRAIN_BENCH_CONFIGS = {
    'synthetic': dict(backbone='swin_mini', head=train_prior.SYNTHETIC_HEAD, dataset='synthetic', num_classes=10,
                      crop=64, batch=16, tok=train_posterior.TOKENIZER_ARCH),
    'synthetic-paper-head': dict(backbone='swin_mini', head={}, dataset='synthetic', num_classes=10, crop=64, batch=16,
                                 tok=train_posterior.TOKENIZER_ARCH),
    'swin_t': dict(backbone='swin_t', head={}, dataset='ade20k', num_classes=150, crop=256, batch=1,
                   tok=DALLE_ARCH, steps=1),
}


def _timed(fn, times, key):
    """fn, adding the (wall, CPU) seconds of each call to times[key]."""
    def timed(*args):
        t0 = _wall_and_cpu()
        out = fn(*args)
        times[key] += _wall_and_cpu() - t0
        return out
    return timed


def _train_setup(c, steps):
    """One configuration's call: a warm-up step (its FLOPs counted), `steps` timed ones -> per-part (wall, CPU)
    seconds (lists over steps), FLOPs, a dense 2048^3 fp32 matmul's FLOP/s (best of 10) and the peak RSS."""
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    if c['dataset'] == 'ade20k':  # two 512x512 scenes in the ADE20K layout, read through the real ADE20K pipeline
        _write_ade(tmp.name, (datasets.synthetic_scene(np.random.default_rng(i), 512) for i in range(2)))
        dataset = datasets.build_dataset('ade20k', 'train', root=tmp.name)
        dataset.preset = dict(dataset.preset, crop_size=c['crop'])
    else:
        dataset = datasets.build_dataset('synthetic', 'train')
    model = gss.GSS(gss.GSSConfig(c['backbone'], c['num_classes'], c['tok']['vocab_size'], **c['head']))
    tokenizer = gss.build_tokenizer(**c['tok'])
    palette = gss.make_palette(c['num_classes'])  # (K, 3)
    optimizer = torch.optim.AdamW(train_prior.param_groups(model), lr=1e-4, weight_decay=0.01, fused=True)
    times, encode = {}, tokenizer.encode
    model.forward = _timed(model.forward, times, 'encoder forward')  # what gss.compute_loss calls, timed
    tokenizer.encode = _timed(encode, times, 'tokenizer')

    def step(i):
        times['encoder forward'] = times['tokenizer'] = 0.0
        marks = [_wall_and_cpu()]
        batch = [dataset[(i * c['batch'] + j) % len(dataset)] for j in range(c['batch'])]
        images = torch.stack([b['image'] for b in batch])  # (B, 3, crop, crop)
        labels = torch.stack([b['label'] for b in batch])  # (B, crop, crop)
        marks.append(_wall_and_cpu())
        loss, _ = gss.compute_loss(model, tokenizer, palette, images, labels)
        marks.append(_wall_and_cpu())
        loss.backward()
        marks.append(_wall_and_cpu())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(_wall_and_cpu())
        data, loss_s, backward, opt = (marks[k + 1] - marks[k] for k in range(4))
        return {'data': data, 'encoder forward': times['encoder forward'], 'tokenizer': times['tokenizer'],
                'token CE (conv_seg fwd+grads), aux CE': loss_s - times['encoder forward'] - times['tokenizer'],
                'backward': backward, 'optimizer': opt}

    def run():
        with FlopCounterMode(display=False) as step_flops:
            step(0)
        parts = [step(i) for i in range(1, 1 + steps)]
        tmp.cleanup()  # the ADE20K scenes the steps read
        with FlopCounterMode(display=False) as tokenizer_flops:
            encode(torch.rand(c['batch'], 3, 2 * c['crop'], 2 * c['crop']))  # the 2x maskige (B, 3, 2H, 2W)
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        mm = []
        for _ in range(11):
            t0 = _wall_and_cpu()
            a @ b
            mm.append(2 * 2048 ** 3 / (_wall_and_cpu() - t0))  # (wall, CPU) FLOP/s
        return {'parts': {k: [p[k] for p in parts] for k in parts[0]}, 'step_flops': step_flops.get_total_flops(),
                'tokenizer_flops': tokenizer_flops.get_total_flops(), 'matmul_flops': np.max(mm[1:], axis=0),
                'params': sum(p.numel() for p in model.parameters()),
                'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    run.details = lambda result, base: result
    return run


def bench_train(args):
    """Per configuration: seconds per part (median of --repeats steps; 1 for swin_t), FLOPs per step, and the
    achieved FLOP/s as a fraction of a dense matmul's. On a busy machine use --threads 1 and read the CPU seconds."""
    sides = {name: (_train_setup, (c, c.get('steps', args.repeats))) for name, c in TRAIN_BENCH_CONFIGS.items()}
    runs = interleaved(sides, 1, args.threads, warmup=False)
    figures, summary = {}, [('config', 'M params', 'img/s', 'TFLOP', 'tokenizer TFLOP', '% of matmul', 'per CPU s')]
    for name, c in TRAIN_BENCH_CONFIGS.items():
        r = runs[name]['details']
        med = {k: np.median(v, axis=0) for k, v in r['parts'].items()}  # part -> (wall, CPU) seconds
        total = sum(med.values())
        achieved = r['step_flops'] / (total - med['data']) / r['matmul_flops']  # (wall, CPU), outside data loading
        rows = [(k, wall, 100 * wall / total[0], cpu, 100 * cpu / total[1]) for k, (wall, cpu) in med.items()]
        table(f"\n{name}: {c['backbone']}, batch {c['batch']} x {c['crop']}^2, {args.threads} threads",
              [('part', 'wall s', 'share %', 'CPU s', 'share %')] + rows + [('step', total[0], 100.0, total[1], 100.0)])
        figures[name] = {'wall_s': {k: round(v[0], 4) for k, v in med.items()},
                         'cpu_s': {k: round(v[1], 4) for k, v in med.items()},
                         'step_wall_s': round(total[0], 3), 'step_cpu_s': round(total[1], 3),
                         'images_per_s': round(c['batch'] / total[0], 3),
                         'step_tflops': round(r['step_flops'] / 1e12, 4),
                         'tokenizer_tflops': round(r['tokenizer_flops'] / 1e12, 4),
                         'fraction_of_matmul_peak': round(achieved[0], 3),
                         'fraction_of_matmul_peak_per_cpu_s': round(achieved[1], 3),
                         'matmul_gflops': round(r['matmul_flops'][0] / 1e9, 1), 'peak_rss_mb': round(r['peak_rss_mb'])}
        f = figures[name]
        summary.append((name, r['params'] / 1e6, f['images_per_s'], f['step_tflops'], f['tokenizer_tflops'],
                        100 * achieved[0], 100 * achieved[1]))
    table('', summary)
    over = figures['synthetic-paper-head']['step_cpu_s'] / figures['synthetic']['step_cpu_s']
    figures['synthetic_paper_head_over_cpu_head_cpu_s'] = round(over, 2)  # the cost the CPU-sized head avoids
    return figures


# name -> (backbone, K, image (H, W), mode, crop, stride); the paper's head and the DALL-E-size tokenizer everywhere.
# Cityscapes' test setting is Swin-L on 1024x2048, slide 768/512 = 2 x 4 windows: the 8 GB target. Whole mode at
# 1024x2048 is not run (3.6x a 768 window's pixels: about 17-20 GB, too much for a shared machine).
INFER_CASES = {
    'swin_t_512_whole': ('swin_t', 150, (512, 512), 'whole', None, None),
    'swin_t_512_slide': ('swin_t', 150, (512, 512), 'slide', 512, 341),
    'swin_l_1024x2048_slide': ('swin_l', 19, (1024, 2048), 'slide', 768, 512),
}
INFER_TARGET_MB = 8192  # Swin-L, 1024x2048, slide 768/512, DALL-E-size tokenizer, on CPU


def _infer_windows(case):
    _, _, (H, W), mode, crop, stride = case
    return gss.slide_windows(H, W, crop, stride) if mode == 'slide' else [(0, H, 0, W)]


@torch.no_grad()
def _infer_tflop(case):
    """TFLOPs of one gss.predict call up to the maskige, and the decoder's share: the model counted on the meta
    device, the decoder on 8x8 real tokens scaled by the token count (its convs' FLOPs are proportional to it);
    nearest colour and the canvas are negligible."""
    with torch.device('meta'):
        model = gss.GSS(gss.GSSConfig(case[0], case[1], 8192)).eval()
    tokenizer = gss.build_tokenizer(**DALLE_ARCH)
    with FlopCounterMode(display=False) as counter:
        tokenizer.decode(torch.zeros(1, 8, 8, dtype=torch.long))
    decode_per_token = counter.get_total_flops() / 64
    total = decode = 0
    for y1, y2, x1, x2 in _infer_windows(case):
        with FlopCounterMode(display=False) as counter:
            feats = model.head.token_features(model.backbone(torch.empty(1, 3, y2 - y1, x2 - x1, device='meta')))
        h, w = feats.shape[2:]
        decode += decode_per_token * h * w
        total += counter.get_total_flops() + 2 * h * w * model.head.conv_seg.weight.numel() + decode_per_token * h * w
    return total / 1e12, decode / total


def _infer_setup(case, windows):
    """The model, tokenizer, palette and a random image of `case`; returns one gss.predict call. Slide mode runs only
    the first `windows` windows when windows > 0 (gss.slide_windows patched in this child process; the canvas keeps
    the full size). gss.maskige_scores, which predict calls once per window, last, is wrapped to record each end."""
    backbone, K, (H, W), mode, crop, stride = case
    torch.manual_seed(0)
    model = gss.GSS(gss.GSSConfig(backbone, K, 8192)).eval()
    tokenizer = _dalle_size()
    inverse = gss.NearestColour(gss.make_palette(K))
    images = torch.randn(1, 3, H, W)
    boxes = _infer_windows(case)
    if mode == 'slide' and 0 < windows < len(boxes):
        gss.slide_windows = lambda *a: boxes[:windows]
    marks, scores_of = [], gss.maskige_scores

    def recorded(*a, **k):
        scores = scores_of(*a, **k)
        marks.append((*_wall_and_cpu(), _rss_mb('VmHWM'), _rss_mb('VmRSS')))
        return scores
    gss.maskige_scores = recorded

    def call():
        marks[:] = [(*_wall_and_cpu(), None, None)]
        return gss.predict(model, tokenizer, inverse, images, mode, crop, stride)

    def details(scores, base):
        covered = torch.isfinite(scores).all(1)  # (1, H, W); pixels of windows not run are 0/0
        return {'windows_timed': len(marks) - 1, 'windows_total': len(boxes), 'baseline_rss_mb': round(base),
                'per_window_s': [b[0] - a[0] for a, b in zip(marks, marks[1:])],
                'per_window_cpu_s': [b[1] - a[1] for a, b in zip(marks, marks[1:])],
                'peak_mb_after_window': [m[2] - base for m in marks[1:]],
                'rss_mb_after_window': [m[3] - base for m in marks[1:]],
                'covered_fraction': covered.float().mean().item(),
                'max_abs_score_sum_minus_1': (scores.sum(1)[covered] - 1).abs().max().item(),
                'classes_predicted': scores.argmax(1)[covered].unique().numel(),
                'params_model': sum(p.numel() for p in model.parameters()),
                'params_tokenizer_decoder': sum(p.numel() for p in tokenizer.decoder.parameters())}
    call.details = details
    return call


def bench_infer(args):
    """gss.predict per case in float32, batch 1, random weights; no warm-up call (a call takes minutes)."""
    sides = {name: (_infer_setup, (case, args.windows)) for name, case in INFER_CASES.items()}
    runs = interleaved(sides, args.repeats, args.threads, warmup=False)
    figures = {'bench': 'infer', 'device': 'cpu', 'dtype': 'float32', 'threads': args.threads, 'repeats': args.repeats,
               'tokenizer': 'DALL-E size (n_hid 256, vocab 8192, 2 blocks per group), random weights',
               'memory_method': 'bench.run_side: VmHWM of the timed call above the RSS before it (model, tokenizer, '
                                'image built), fresh subprocess per case, no warm-up call'}
    rows = [('case', 'windows', 'wall s', 'CPU s', 'TFLOP', 'decode %', 'GFLOP/s', 'peak MB', 'base MB')]
    for name, case in INFER_CASES.items():
        backbone, K, (H, W), mode, crop, stride = case
        med, d = runs[name], runs[name]['details']
        n, total = d['windows_timed'], d['windows_total']
        tflop, decode = _infer_tflop(case)
        tflop *= n / total  # windows are equal-sized in every case here
        f = figures[name] = dict(backbone=backbone, num_classes=K, image=[H, W], mode=mode, crop=crop, stride=stride,
                                 seconds=round(med['seconds'], 2), cpu_seconds=round(med['cpu_seconds'], 2),
                                 peak_mb=round(med['peak_mb']), tflop=round(tflop, 2),
                                 gflops_per_s=round(1e3 * tflop / med['seconds'], 1),
                                 decode_flop_share=round(decode, 3),
                                 **{k: [round(v, 1) for v in d[k]] if isinstance(d[k], list) else d[k] for k in d})
        if n < total:  # ESTIMATE: the remaining windows cost what the timed ones did on average
            f['estimate_all_windows_seconds'] = round(med['seconds'] * total / n, 1)
        rows.append((name, f'{n}/{total}', med['seconds'], med['cpu_seconds'], tflop, 100 * decode,
                     f['gflops_per_s'], med['peak_mb'], d['baseline_rss_mb']))
    table(f'infer: gss.predict with nearest colour, {args.threads} threads, MB above the RSS before the call', rows)
    big = figures['swin_l_1024x2048_slide']
    targets([('swin_l_1024x2048_slide peak MB', big['peak_mb'], '<=', INFER_TARGET_MB)])
    # ESTIMATE, not measured: a GPU in bf16 holds about half the float32 activation peak plus the bf16 weights of the
    # model and tokenizer decoder (gss's bf16 decode keeps its float32 residual stream: expect more)
    gpu = round(big['peak_mb'] / 2 + 2 * (big['params_model'] + big['params_tokenizer_decoder']) / 2 ** 20)
    return dict(figures, target_peak_mb=INFER_TARGET_MB, target_met=big['peak_mb'] <= INFER_TARGET_MB,
                target_measured_windows=f"{big['windows_timed']}/{big['windows_total']}", estimate_gpu_bf16_peak_mb=gpu)


# ---- --device cuda: train, infer and tokenizer on the GPU, in this process (the allocator reports peak memory)

def _cuda_time(fn, repeats):
    """fn() after a warm-up call -> (median seconds of `repeats` calls, peak MB allocated above what was before)."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()  # kernels run asynchronously: time to their end
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds), (torch.cuda.max_memory_allocated() - base) / 2**20


def _bf16_peak_flops():
    """The GPU's dense bf16 matmul FLOP/s, measured first in the run: an 8192^3 product, best of 10."""
    a, b = torch.randn(2, 8192, 8192, device='cuda', dtype=torch.bfloat16)
    return 2 * 8192 ** 3 / min(_cuda_time(lambda: a @ b, 1)[0] for _ in range(10))


GPU_TRAIN = {'ade20k_swin_l_512_b4': (150, 512, 4), 'cityscapes_swin_l_768_b2': (19, 768, 2)}  # official per GPU


def _gpu_train_step(K, crop, batch):
    """One bf16 stage-II step of Swin-L, the paper's head and the DALL-E-size tokenizer on random images."""
    model, tokenizer = gss.GSS(gss.GSSConfig('swin_l', K, 8192)).cuda(), _dalle_size().cuda()
    optimizer = torch.optim.AdamW(train_prior.param_groups(model), lr=1e-4, fused=True)
    palette, images = gss.make_palette(K).cuda(), torch.randn(batch, 3, crop, crop, device='cuda')
    labels = torch.randint(0, K, (batch, crop, crop), device='cuda')

    def step():
        with torch.autocast('cuda', torch.bfloat16):
            loss, _ = gss.compute_loss(model, tokenizer, palette, images, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _gpu_infer_call(case):
    backbone, K, (H, W), mode, crop, stride = case
    model, tokenizer = gss.GSS(gss.GSSConfig(backbone, K, 8192)).cuda().eval(), _dalle_size().cuda()
    inverse, images = gss.NearestColour(gss.make_palette(K)).cuda(), torch.randn(1, 3, H, W, device='cuda')

    def call():
        with torch.autocast('cuda', torch.bfloat16):  # as validation runs it; the tokenizer stays float32
            return gss.predict(model, tokenizer, inverse, images, mode, crop, stride)
    return call


def bench_gpu(args):
    """train / infer: images/s, peak MB and the fraction of the bf16 matmul peak (FLOPs counted by FlopCounterMode);
    tokenizer: the bf16 decode at 512x512 against float32 (time, memory, same class after nearest colour)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train_prior.set_kernels
    peak, figures = _bf16_peak_flops(), {'device': torch.cuda.get_device_name()}
    figures['bf16_matmul_tflops'] = round(peak / 1e12, 1)
    if args.name == 'tokenizer':
        tok, palette = _dalle_size().cuda(), gss.make_palette(150).cuda()
        tokens = tok.encode(gss.paint(blobs(1, 512, 150, seed=0).cuda(), palette, palette.new_zeros(3)))
        (t32, m32), (t16, m16) = (_cuda_time(lambda: tok.decode(tokens, dtype=d), args.repeats)
                                  for d in (torch.float32, torch.bfloat16))
        nc = gss.NearestColour(palette).cuda()
        agree = (nc.labels(tok.decode(tokens, dtype=torch.bfloat16)) == nc.labels(tok.decode(tokens))).float()
        figures.update(decode512_bf16_time_ratio=round(t16 / t32, 3), decode512_bf16_mem_ratio=round(m16 / m32, 3),
                       decode512_bf16_same_class_pct=round(100 * agree.mean().item(), 3))
        rows = [('figure', 'value')] + [(k, float(v)) for k, v in figures.items() if k.startswith('decode')]
    cases = {n: (_gpu_train_step, c, c[2]) for n, c in GPU_TRAIN.items()} if args.name == 'train' else \
        {n: (_gpu_infer_call, (c,), 1) for n, c in INFER_CASES.items()} if args.name == 'infer' else {}
    rows = [('case', 'img/s', 'peak MB', 'TFLOP', '% of bf16 matmul peak')] if cases else rows
    for name, (setup, setup_args, images) in cases.items():
        fn = setup(*setup_args)  # one case's model at a time
        with FlopCounterMode(display=False) as flops:
            fn()
        seconds, mb = _cuda_time(fn, args.repeats)
        tflop = flops.get_total_flops() / 1e12
        figures[name] = dict(images_per_s=round(images / seconds, 2), peak_mb=round(mb), tflop=round(tflop, 3),
                             fraction_of_bf16_matmul_peak=round(tflop * 1e12 / seconds / peak, 3))
        rows.append((name, images / seconds, mb, tflop, 100 * tflop * 1e12 / seconds / peak))
    table(f"{args.name} on {figures['device']}: dense bf16 matmul {figures['bf16_matmul_tflops']} TFLOP/s", rows)
    return figures


# ---- ablate-*: the paper's ablation tables (ADE20K val) beside ours on the synthetic val split. Stage I reuses the
# --runs folder's tokenizer (and posterior_ff.pt, prior/latest.pt: the default run's models); what a row trains runs as
# its command line (train_posterior.py, torchrun train_prior.py) into --out, at the synthetic preset's size (or --iters)
ABLATIONS = {  # subcommand: (title, [(row, setting, the paper's figure)])
    'ablate-palette': ('Table 9: palette design steps (gss.make_palette), GSS-FF reconstruction oracle', [
        ('arithmetic sequence', dict(misaligned=False, random_factors=False, refine=False), '85.99 / 94.37'),
        ('+ misaligned starts', dict(random_factors=False, refine=False), '86.12 / 94.45'),
        ('+ random additive factors', dict(refine=False), '87.42 / 95.08'),
        ('+ category-specific refinement', {}, '87.73 / 95.29')]),
    'ablate-posterior': ('Table 1: X^-1 variants (train_posterior.py --variant), reconstruction oracle', [
        (f'GSS-{v.upper()}', v, paper) for v, paper in (('ff-r', '62.83'), ('ff', '84.31'), ('tf', '84.37'),
                                                      ('ft', '86.10'), ('ft-w', '87.73'), ('tt', '36.11'))]),
    'ablate-prior': ('Table 3: latent prior (train_prior.py --model-config), GSS-FF on generated maskiges', [
        ('d 1/8', 'tokens=8,aux_fill=False,depth=0', '40.64 / 52.55'), ('d 1/8 + Unlabel', 'tokens=8,depth=0',
                                                                        '43.72 / 56.08'),
        ('d 1/4 + Unlabel', 'depth=0', '43.98 / 56.11'), ('d 1/4 + Unlabel + MLA (default)', '', '46.29 / 57.84')]),
}


def _ablate_row(args, setting, tok, items, val):
    """One row's SegMetric: a palette's oracle, a trained stage-I variant's oracle, or a trained stage-II config's
    GSS-FF on the first --images validation images."""
    K, run = val.num_classes, lambda *cmd: subprocess.run([sys.executable, *cmd, *args.iters], check=True)
    if args.name == 'ablate-palette':
        palette = gss.make_palette(K, **setting)
        return evaluate.reconstruction_oracle(tok, gss.NearestColour(palette), palette,
                                              gss.ignore_colour_for(palette), items, K)
    if args.name == 'ablate-posterior':
        out = f'{args.out}/posterior_{setting}.pt'
        run('train_posterior.py', '--variant', setting, '--dataset', 'synthetic', '--tokenizer',
            f'{args.runs}/tokenizer.pt', '--out', out)
        post = gss.load_posterior(out)
        return evaluate.reconstruction_oracle(tok, gss.build_inverse(post), torch.tensor(post['palette']),
                                              torch.tensor(post['ignore_colour']), items, K)
    ckpt = f'{args.runs}/prior/latest.pt'  # the default row: the default run's model, unless --iters changes it
    if setting or args.iters or not os.path.isfile(ckpt):
        ckpt = f'{args.out}/prior_{setting or "default"}'
        run('-m', 'torch.distributed.run', '--nproc_per_node', '2', 'train_prior.py', '--dataset', 'synthetic',
            '--posterior', f'{args.runs}/posterior_ff.pt', '--model-config', setting, '--out', ckpt)
        ckpt += '/latest.pt'
    model, tok, inverses, _, _ = evaluate.load_stage2(ckpt, None, 'synthetic', 'cpu')
    return evaluate.evaluate_split(model, tok, inverses, val, dict(mode='whole'), False, range(args.images))['GSS-FF']


def bench_ablate(args):
    """One of the paper's ablation tables: ours (mIoU / aAcc or mAcc, minutes, per-class IoU) beside the paper's."""
    title, rows = ABLATIONS[args.name]
    torch.set_num_threads(args.threads)
    tok = gss.load_tokenizer(f'{args.runs}/tokenizer.pt')
    val = datasets.build_dataset('synthetic', 'val', train=False)
    items = list(evaluate.labels_and_test_sizes(val, range(args.images)))
    second = 'mAcc' if args.name == 'ablate-prior' else 'aAcc'
    os.makedirs(args.out, exist_ok=True)
    figures, printed = {}, [('row', 'setting', 'mIoU', second, 'paper (ADE20K)', 'minutes')]
    for name, setting, paper in rows:
        t0 = time.time()
        m = _ablate_row(args, setting, tok, items, val).compute()
        figures[name] = dict(mIoU=round(m['mIoU'], 2), **{second: round(m[second], 2)}, paper=paper,
                             minutes=round((time.time() - t0) / 60, 2), IoU=[round(float(v), 1) for v in m['IoU']])
        shown = setting if isinstance(setting, str) else ''  # palettes: the row name says which steps are on
        printed.append((name, shown, m['mIoU'], m[second], paper, figures[name]['minutes']))
    table(f'{title}; {args.images} synthetic val images', printed)
    table('per-class IoU', [('row', *val.classes)] + [(name, *f['IoU']) for name, f in figures.items()])
    return figures


# ---- confidence, beyond the paper: the token distribution beyond its argmax, against the aux head's softmax

SAMPLES, BATCHING_IMAGES = 8, 10  # samples per image; images whose T=1 samples time the batched decoder
DRAWS = {'T=0.5': (0.5, None), 'T=1': (1.0, None), 'T=1 top-5': (1.0, 5)}  # name: (temperature, top_k)
SIGNALS = ('top-1 token probability', '1 - token entropy', 'palette margin', *(f'sample agreement {d}' for d in DRAWS),
           'aux softmax', 'aux softmax')  # the last judges the aux head's own labels


def auroc(score, good):
    """Area under the ROC curve of `score` telling good (True) from bad pixels (Mann-Whitney; ties count one half)."""
    _, inv, cnt = torch.unique(score, return_inverse=True, return_counts=True)
    rank = (cnt.cumsum(0) - (cnt - 1) / 2).double()[inv]  # (n,) 1-based tie-averaged ranks
    n1 = good.sum().item()
    return (rank[good].sum().item() - n1 * (n1 + 1) / 2) / (n1 * (len(good) - n1))


def ece(score, good, bins=15):
    """Expected calibration error: |accuracy - mean score| over 15 equal-width bins, weighted by their pixel share."""
    b = (score * bins).long().clamp(max=bins - 1)  # (n,)
    gap = torch.bincount(b, good.double(), bins) - torch.bincount(b, score.double(), bins)  # (bins,)
    return (gap.abs().sum() / len(b)).item()


def top_miou(score, pred, label, q, K):
    """mIoU over the fraction q of the pixels with the highest score (ties: in pixel order)."""
    keep = score.argsort(descending=True, stable=True)[:int(q * len(score))]
    m = evaluate.SegMetric(K)
    m.update(pred[keep], label[keep])
    return m.compute()['mIoU']


# the signals the numbers did not pick for the library (README: beyond the paper)

def token_confidence(probs, size, stride=4):
    """Top-1 probability and 1 - entropy / log V of the token distribution (B, V, h, w) at 1/stride (the head's
    `tokens`, Table 3's d), brought to `size` as gss.aux_scores does -> (B, 2, *size) in [0, 1]."""
    entropy = torch.special.entr(probs).sum(1) / math.log(probs.shape[1])  # (B, h, w), 0 = one-hot, 1 = uniform
    c = torch.stack([probs.max(1).values, 1 - entropy], 1)  # (B, 2, h, w)
    c = F.interpolate(c, (stride * c.shape[2], stride * c.shape[3]), mode='bilinear', align_corners=False)
    return c[:, :, :size[0], :size[1]].clamp(0, 1)


def palette_confidence(maskige, palette, size):
    """1 - d1 / d2, d1 and d2 the distances of each maskige colour (B, 3, 2H, 2W) to its nearest and second-nearest
    palette colours (K, 3) on 0-255: 1 on a palette colour, 0 halfway between two; area-resized -> (B, 1, *size)."""
    x = 255 * maskige.float().permute(0, 2, 3, 1)[..., None, :]  # (B, 2H, 2W, 1, 3)
    d = gss._sq_dist(x, palette.float()).topk(2, -1, largest=False).values.sqrt()  # (B, 2H, 2W, 2), ascending
    return F.interpolate((1 - d[..., 0] / d[..., 1].clamp(min=1e-6))[:, None], size=tuple(size), mode='area')


def signal_table(c, K, title):
    """Print and return each signal's AUROC, ECE and mIoU on its most confident pixels; c: flat per-pixel columns."""
    rows, figures = [('signal', 'judges', 'AUROC', 'ECE', 'mIoU top 50%', 'top 80%', 'top 90%', 'all')], {}
    for j, s in enumerate(SIGNALS):
        judged = c['aux'] if j == len(SIGNALS) - 1 else c['gss']
        score, good = c[s].float(), judged == c['label']
        r = [auroc(score, good), ece(score, good)] + [top_miou(score, judged, c['label'], q, K)
                                                      for q in (.5, .8, .9, 1)]
        rows.append((s, 'aux head' if j == len(SIGNALS) - 1 else 'GSS-FF', *r))
        figures[f'{s} judging {rows[-1][1]}'] = r
    table(title, rows)
    return figures


def decoder_batching(tok, token_maps, repeats):
    """Seconds per image to decode N sampled token maps (N, h, w) as one batch and one by one, interleaved over
    `repeats` rounds, at the set threads and at 1 -> {threads: (batched, one by one, batched / one by one)}."""
    out, threads = {}, torch.get_num_threads()
    for n in (threads, 1):
        torch.set_num_threads(n)
        t = {True: [], False: []}
        for r in range(repeats):
            for batched in (True, False) if r % 2 == 0 else (False, True):
                t0 = time.perf_counter()
                for tokens in token_maps:
                    for batch in [tokens] if batched else tokens[:, None]:  # one call, or one per sample
                        tok.decode(batch)
                t[batched].append((time.perf_counter() - t0) / len(token_maps))
        out[n] = (statistics.median(t[True]), statistics.median(t[False]))
        out[n] += (out[n][0] / out[n][1],)
    torch.set_num_threads(threads)
    return out


@torch.no_grad()
def bench_confidence(args):
    """Confidence signals vs the aux head's softmax, N = 8 samples, soft decoding on the synthetic val split."""
    torch.set_num_threads(args.threads)
    model, tok, inverses, palette, _ = evaluate.load_stage2(args.checkpoint, None, 'synthetic', torch.device('cpu'))
    inv, data = next(iter(inverses.values())), datasets.build_dataset('synthetic', 'val', train=False)
    K, N, n = data.num_classes, SAMPLES, min(len(data), args.images)
    stride = model.head.tokens  # the token stride, Table 3's d
    metric = {k: evaluate.SegMetric(K) for k in ['argmax', 'soft', *(f'{w} {d}' for d in DRAWS
                                                                       for w in ('majority', 'best-of-8'))]}
    cols, times = {k: [] for k in ('label', 'gss', 'aux', *SIGNALS[:-1])}, collections.defaultdict(float)
    agree, kept = {}, []  # {draw: agreement (1, H, W)}; the first images' T=1 samples (N, h/4, w/4)
    timed = lambda key, fn, *a: _timed(fn, times, key)(*a)
    for i in range(n):
        x, label = data[i]['image'][None], data[i]['label']  # (1, 3, h, w), (H, W)
        size, valid = tuple(x.shape[-2:]), label != 255
        labels_of = lambda m: evaluate.resized_argmax(gss.maskige_scores(inv, m, size), label.shape)  # (n, H, W)
        feats = timed('backbone', model.backbone, x)
        m = timed('argmax: tokens, decode', gss.generate, model, tok, x, feats)  # (1, 3, 2h, 2w)
        pred = timed('X^-1', labels_of, m)[0]  # (H, W)
        aux = timed('aux head', lambda: F.interpolate(gss.aux_scores(model, feats, size), label.shape,
                                                      mode='bilinear').softmax(1)[0])  # (K, H, W)
        probs = timed('token softmax', gss.token_probs, model, feats)  # (1, V, h/4, w/4)
        conf = timed('top-1 / entropy', lambda: F.interpolate(token_confidence(probs, size, stride), label.shape,
                                                              mode='bilinear')[0])  # (2, H, W)
        margin = timed('palette margin', palette_confidence, m, palette, label.shape)[0, 0]  # (H, W)
        soft = gss.crop_maskige(model, timed('soft decoding', tok.decode_soft, probs), size)
        metric['argmax'].update(pred, label)
        metric['soft'].update(labels_of(soft)[0], label)
        for d, (t, k) in DRAWS.items():
            tokens = timed(f'draw 8, {d}', gss.sample_tokens, gss.token_probs(model, feats, t, k), torch.tensor([i]),
                           range(N))[:, 0]  # (N, h/4, w/4), keyed by the image index
            ms = gss.crop_maskige(model, timed(f'decode 8 batched, {d}', tok.decode, tokens), size)
            kept += [tokens] if d == 'T=1' and i < BATCHING_IMAGES else []
            sampled = labels_of(ms)  # (N, H, W)
            vote, agree[d] = gss.majority_vote(sampled[:, None], K)  # (1, H, W) each
            metric[f'majority {d}'].update(vote[0], label)
            metric[f'best-of-8 {d}'].update(sampled[((sampled == label) & valid).sum((1, 2)).argmax()], label)
        for k, v in zip(cols, (label, pred, aux.argmax(0), *conf, margin, *(a[0] for a in agree.values()),
                               aux.max(0).values)):
            cols[k].append(v[valid])
        if (i + 1) % 25 == 0:
            print(f'{i + 1}/{n} images', file=sys.stderr, flush=True)
    c = {k: torch.cat(v) for k, v in cols.items()}
    figures = signal_table(c, K, f"confidence of {len(c['label'])} pixels, {n} synthetic val images")
    mious = {k: v.compute()['mIoU'] for k, v in metric.items()}
    agreement = {d: c[f'sample agreement {d}'].mean().item() for d in DRAWS}  # with the majority
    table(f'decoding: {N} samples (keyed by the image index), soft, argmax', [('decoding', 'mIoU')] +
          list(mious.items()) + [(f'mean agreement {d}', a) for d, a in agreement.items()])
    per_image = {k: (v / n).tolist() for k, v in times.items()}
    table('seconds per image', [('step', 'wall s', 'CPU s')] + [(k, *v) for k, v in per_image.items()])
    batching = decoder_batching(tok, kept, args.repeats)
    table(f'decoding {N} samples, seconds per image, first {len(kept)} images, median of {args.repeats} rounds',
          [('threads', 'batched', 'one by one', 'ratio')] + [(k, *v) for k, v in batching.items()])
    return dict(confidence=figures, miou=mious, agreement=agreement, seconds_per_image=per_image, batching=batching)


BENCHES = {'swin': bench_swin, 'data': bench_data, 'inverse': bench_inverse, 'tokenizer': bench_tokenizer,
           'token-loss': bench_token_loss, 'train': bench_train, 'infer': bench_infer, 'confidence': bench_confidence,
           **dict.fromkeys(ABLATIONS, bench_ablate)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('name', choices=sorted(BENCHES))
    parser.add_argument('--repeats', type=int, default=None, help='rounds (default 3; 1 for infer)')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--windows', type=int, default=3, help='infer: the first N of 1024x2048\'s 8 windows (0: all)')
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu', help='train, infer, tokenizer: on a GPU')
    parser.add_argument('--runs', default='runs/synthetic', help='ablate-*: the default run (tokenizer.pt, ...)')
    parser.add_argument('--out', default='runs/ablations', help='ablate-*: where trained rows are written')
    parser.add_argument('--images', type=int, default=200, help='ablate-*, confidence: the first N val images')
    parser.add_argument('--iters', type=int, help="ablate-*: trained rows' iterations (default: the preset's)")
    parser.add_argument('--checkpoint', default='runs/synthetic/prior/latest.pt', help='confidence: the model')
    args = parser.parse_args()
    args.iters = ['--iters', str(args.iters)] if args.iters else []
    if args.repeats is None:
        args.repeats = 1 if args.name == 'infer' and args.device == 'cpu' else 3
    why = (f'{args.name} runs on the CPU only' if args.name not in ('train', 'infer', 'tokenizer') else
           'no CUDA device is visible' if not torch.cuda.is_available() else None)
    if args.device == 'cuda' and why:
        print(f"error: --device cuda: {why}; expected train, infer or tokenizer on a GPU machine", file=sys.stderr)
        return 2
    figures = (bench_gpu if args.device == 'cuda' else BENCHES[args.name])(args)
    print(f'load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; torch {torch.__version__}')
    print('BENCH ' + json.dumps(figures))


if __name__ == '__main__':
    sys.exit(main())
