"""Stage I of GSS (latent posterior learning, paper Sec. 3.3): the maskige transform X (a palette), its inverse X^-1
and the frozen VQ tokenizer they go with -> the stage-I artifact that train_prior.py and evaluate.py read.

    python train_posterior.py --convert-dalle encoder.pkl decoder.pkl --out runs/dalle.pt   # OpenAI's dVAE, once
    python train_posterior.py --variant tokenizer --dataset synthetic     # or train a small one (Eq. 3)
    python train_posterior.py --variant ff --dataset synthetic            # GSS-FF, training free (Table 1)
    python train_posterior.py --variant ft --dataset ade20k --tokenizer runs/dalle.pt   # also ff-r lstsq tf tt
    python train_posterior.py --variant ft-w --dataset synthetic --prior runs/synthetic/prior/latest.pt
    torchrun --nproc_per_node 8 train_posterior.py --variant ft-w --dataset ade20k --prior runs/ade20k/prior/iter.pt

Contents: SETTINGS (appendix D), FTW_RECIPES (the official FT-W configs), FLAGS; palettes; the objectives
(tokenizer_loss, inverse_loss; TF / TT through gss.paint_soft, relaxed_roundtrip, tf_loss); train, the loop of every
trained variant, crash safe with train_prior.py's Checkpoints; train_tokenizer, train_inverse; parse_args, stage1.
GSS-FT-W as officially trained: X^-1 learns from what a frozen stage-II model (--prior) generates for augmented
training crops. On a CPU shared with other jobs, prefix OMP_NUM_THREADS=1: OpenMP threads spin while they wait for
each other (measured here: 2 threads on 2 loaded cores burnt ~8x the CPU time of 1 thread per tokenizer step).
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import datasets
import evaluate
import gss
import train_prior
from train_prior import Logger, lr_at, setup_distributed

# The official GSS-FT-W recipes (configs/gss/<dataset>/gss-ft-w_<backbone>_*.py: AdamW, wd 0.01, poly, warmup 1500)
# by --dataset and the backbone of the --prior model (Swin without --prior); others take ADE20K Swin-L's, the paper's.
FTW_RECIPES = {
    ('ade20k', 'swin'): dict(depth=2, lr=1.5e-3, iters=40000, batch_size=16),
    ('cityscapes', 'swin'): dict(depth=1, lr=7.5e-4, iters=40000, batch_size=8),
    ('cityscapes', 'resnet'): dict(depth=1, lr=1.5e-3, iters=80000, batch_size=16),
}
# Paper settings (appendix D): beta (TF, TT) 4,000 iterations of SGD at batch 16; X^-1 with AdamW at batch 16,
# GSS-FT 3,000 iterations, GSS-FT-W 40,000. Batches are TOTAL over the ranks (per iteration).
# Learning rates the paper does not give (SGD for beta, AdamW for FT) are ours; the tokenizer settings are ours.
SETTINGS = {  # eval: iterations between validation recon metrics (and at the end)
    'tokenizer': dict(iters=5000, batch_size=32, lr=1e-3, crop=32, eval=500),
    'ft': dict(iters=3000, batch_size=16, lr=1e-3, warmup=0, eval=1000),
    'ft-w': dict(FTW_RECIPES['ade20k', 'swin'], warmup=1500, eval=5000),
    'tf': dict(iters=4000, batch_size=16, lr=0.01, warmup=0, eval=1000),
    'tt': dict(iters=4000, batch_size=16, lr=0.01, warmup=0, eval=1000),
}
# ours: sized for 2 CPU cores (the synthetic set is 128x128, crops of 64); long: --long (train_prior.LONG_HELP)
SYNTHETIC_SETTINGS = {
    'tokenizer': dict(iters=450, batch_size=8, lr=1e-3, crop=64, eval=450, long=dict(iters=5000, eval=1000)),
    'ft': dict(iters=300, batch_size=16, lr=1e-3, warmup=0, eval=100),
    'ft-w': dict(iters=200, batch_size=8, lr=1e-3, warmup=20, eval=100, depth=2, ftw=dict(dim=32, num_heads=2)),
    'tf': dict(iters=100, batch_size=8, lr=0.01, warmup=0, eval=50),
    'tt': dict(iters=200, batch_size=8, lr=0.01, warmup=0, eval=100),
}
# Defaults, one line per flag, as train_prior.FLAGS: (type, choices or bool; default; help). None: derived from the
# tables above (train_settings) or from --dataset (parse_args).
FLAGS = dict(
    variant=(('ff', 'ff-r', 'lstsq', 'ft', 'ft-w', 'tf', 'tt', 'tokenizer'), None, None),
    dataset=(str, 'synthetic', "ade20k, cityscapes, synthetic or folder"),
    data_root=(str, None, "dataset directory (default: the preset's)"),
    tokenizer=(str, None, "tokenizer file (default runs/<dataset>/tokenizer.pt; with --prior, the prior's)"),
    prior=(str, None, "ft-w / ft: X^-1 learns this stage-II checkpoint's maskiges (official ones need --tokenizer)"),
    palette=(('maximal', 'official', 'random'), None, "maximal (appendix B, default), official (config) or random"),
    depth=(int, None, "Swin blocks in the FT-W inverse (default: the official recipe's, FTW_RECIPES)"),
    long=(bool, False, f"{train_prior.LONG_HELP} (tokenizer: {SYNTHETIC_SETTINGS['tokenizer']['long']['iters']} "
          "iterations)"),
    iters=(int, None, None),
    batch_size=(int, None, "TOTAL batch over all ranks (default: the variant's, e.g. 16 for ft-w)"),
    lr=(float, None, None),
    seed=(int, 0, None),
    out=(str, None, "output file (default runs/<dataset>/posterior_<variant>.pt)"),
    resume=(str, None, "trained variants: checkpoint to resume from, or 'auto' = <out stem>.latest.pt if it exists"),
    ckpt_interval=(int, 500, "write <out stem>.latest.pt every N iterations"),
)
TOKENIZER_ARCH = dict(n_hid=64, vocab_size=512, n_init=128, n_blk_per_group=1)  # ours: the smallest dall_e shapes
DIVERSITY = 0.01  # weight of the codebook-usage term of the tokenizer loss (train_tokenizer)
VAL_IMAGES = 100  # validation images for the recon metrics logged while training


def choose_palette(variant, palette, dataset, num_classes, seed):
    """-> (palette (K, 3), ignore colour (3,), its name) for --palette maximal / official / random (GSS-FF-R)."""
    if variant == 'ff-r' and palette not in (None, 'random'):
        raise gss.UserError(f"--palette {palette}: GSS-FF-R uses a random palette; expected --palette random or none")
    palette = palette or ('random' if variant == 'ff-r' else 'maximal')
    if palette == 'official':
        full = gss.official_palette(dataset)
        if len(full) != num_classes + 1:
            raise gss.UserError(f"--palette official: the {dataset} palette has {len(full) - 1} classes but the "
                                f"dataset has {num_classes}; expected --palette maximal")
        return full[:-1], full[-1], palette
    colours = gss.random_palette(num_classes, seed) if palette == 'random' else gss.make_palette(num_classes, seed)
    return colours, gss.ignore_colour_for(colours), palette


def val_labels(args, n):
    """The first n validation items as (label (1, H, W) at the original resolution, test-resolution size)."""
    ds = datasets.build_dataset(args.dataset, 'val', args.data_root, train=False)
    return list(evaluate.labels_and_test_sizes(ds, range(min(n, len(ds)))))


def recon_metrics(tok, inverse, palette, ignore_colour, val, num_classes):
    """Maskige-reconstruction mIoU / aAcc over validation items (the evaluate.py --recon oracle), and with '_2x' on
    stage II's 2x path."""
    out = {}
    for upsample, suffix in ((False, ''), (True, '_2x')):
        m = evaluate.reconstruction_oracle(tok, inverse, palette, ignore_colour, val, num_classes, upsample).compute()
        out.update({f'mIoU{suffix}': round(float(m['mIoU']), 2), f'aAcc{suffix}': round(float(m['aAcc']), 2)})
    return out


def sync_grads(params, world_size):
    """Average gradients over DDP ranks in one all-reduce of a flat buffer (not one collective per tensor)."""
    if world_size > 1:
        flat = torch.cat([p.grad.flatten() for p in params])  # (sum of the numels,)
        dist.all_reduce(flat)
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p)).div_(world_size)


# ----------------------------------------------------------------------------------------------------------
# the objectives

def tokenizer_loss(tok, labels, seeds, palette, ignore_colour, crop, progress):
    """Eq. 3 on a random crop of each 1x or 2x label map: MSE between the decoder's sigmoid means (fed relaxed
    one-hots) and map_pixels(maskige), plus DIVERSITY x (log V - entropy of the batch's mean code distribution),
    wav2vec 2.0's codebook-diversity term: without it training collapses onto ~22 of 512 codes. DALL-E's Gumbel-softmax
    temperature anneals from 1 to 1/16 and its noise from full to none (progress: fraction done), meant to end the
    decoder on test time's argmax codes; with --long it does not (README: known defect). Crops, noise: keyed by seed."""
    def random_crop(label):  # (1, H, W) -> (1, crop, crop) of the 1x or the 2x map
        label = gss.upsample_labels_2x(label) if torch.rand(()) < 0.5 else label
        y, x = (int(torch.randint(0, n - crop + 1, ())) for n in label.shape[1:])
        return label[:, y:y + crop, x:x + crop]
    maskige = gss.paint(gss.keyed(random_crop, seeds, 1, labels), palette, ignore_colour)  # (B, 3, crop, crop)
    logits = tok.encoder_logits(maskige)  # (B, V, crop/8, crop/8)
    gumbel = gss.keyed(lambda x: -torch.empty_like(x).exponential_().log(), seeds, 2, logits)  # (B, V, crop/8, crop/8)
    z = ((logits + (1 - progress) * gumbel) / (1 / 16) ** progress).softmax(1)  # relaxed one-hots
    mean = torch.sigmoid(tok.decoder_logits(z))  # (B, 3, crop, crop)
    q = logits.softmax(1).mean((0, 2, 3))  # (V,) this rank's code distribution
    if dist.is_initialized():  # the whole batch's over the ranks; its gradient flows through this rank's share
        total = q.detach().clone()  # (V,)
        dist.all_reduce(total)
        q = q + (total / dist.get_world_size() - q).detach()
    diversity = math.log(len(q)) + (q * torch.log(q + 1e-10)).sum()  # log V - H(q) >= 0
    return F.mse_loss(mean, (1 - 2 * gss.LOGIT_LAPLACE_EPS) * maskige + gss.LOGIT_LAPLACE_EPS) + DIVERSITY * diversity


def prior_maskige(prior, tok, images):
    """The noisy maskige of the official FT-W recipe (gss-ft-w_*.py): a frozen stage-II model's generation for augmented
    training crops, its backbone in eval mode as official frozen_stages=4 keeps it (no drop path, BatchNorm on running
    statistics), its head in train mode (Dropout2d active, BatchNorm on the batch's statistics)."""
    prior.eval().head.train()
    return gss.generate(prior, tok, images)  # (B, 3, 2H, 2W), no gradients


def inverse_loss(v, batch, tok, palette, ignore_colour, beta, inverse, prior):
    """GSS-FT / FT-W: CE of X^-1 on a maskige at 2H (reconstructed ground truth, or --prior's generation), logits
    resized to the label as the official FT-W head does. GSS-TF / TT: beta through the frozen tokenizer."""
    labels = batch['label']  # (B, H, W), 255 = ignore
    if v in ('ft', 'ft-w'):
        with torch.no_grad():
            if prior is not None:
                maskige = prior_maskige(prior, tok, batch['image'])  # (B, 3, 2H, 2W)
            else:  # the tokenizer's reconstruction of the 2x ground truth, as stage II's inference from perfect tokens
                maskige = gss.reconstruct(tok, gss.upsample_labels_2x(labels), palette, ignore_colour)
        logits = F.interpolate(inverse(maskige), labels.shape[-2:], mode='bilinear', align_corners=False)
        return F.cross_entropy(logits, labels, ignore_index=255)
    labels2 = gss.upsample_labels_2x(labels)
    maskige = gss.paint_soft(beta, ignore_colour, labels2)  # (B, 3, 2H, 2W)
    recon = gss.relaxed_roundtrip(tok, maskige, batch['seed'])
    if v == 'tt':  # beta and X^-1 jointly, CE through both
        logits = F.interpolate(inverse(recon), labels.shape[-2:], mode='bilinear', align_corners=False)
        return F.cross_entropy(logits, labels, ignore_index=255)
    return gss.tf_loss(beta, maskige, recon, labels2)  # TF, appendix A.2


def current_stage1(beta, palette, inverse, device):
    """(palette (K, 3) long on 0-255, X^-1 module in eval mode) as they stand."""
    if beta is not None:
        palette = (beta.detach() * 255).round().long().cpu()
    if inverse is None:
        return palette, gss.NearestColour(palette).to(device)  # TF: GSS-FF's inverse on the learned beta
    return palette, inverse.eval()


# ----------------------------------------------------------------------------------------------------------
# the training loop, crash safe with train_prior.py's plumbing; randomness keyed as there

def train(args, s, trained, optimizer, loss_fn, validate, ds, log, rank, world_size, device, clip=None, clamp=None):
    """Minimise loss_fn(batch, progress) with `optimizer`, checkpointing `trained` ({name: module or Parameter}), for
    s['iters'] iterations of s['batch_size'] images over all ranks; gradients clipped at norm `clip`, `clamp` kept in
    [0, 1]; validate() on rank 0 every s['eval'] iterations. -> (exit code: 0 or 128 + signal, the last stats)."""
    params = [p for group in optimizer.param_groups for p in group['params']]
    loader = train_prior.seeded_loader(ds, train_prior.per_rank(s['batch_size'], world_size), rank, world_size,
                                       args.seed, 4 if device.type == 'cuda' else 0, device)
    ckpts = train_prior.Checkpoints(args.checkpoint_path, args.resume, rank, world_size, device, log)
    it, epoch, consumed = resume(ckpts, args, trained, optimizer, log)

    def checkpoint():
        return {'kind': 'gss-posterior', 'variant': args.variant, 'iter': it, 'optimizer': optimizer.state_dict(),
                'trained': {k: t.state_dict() if isinstance(t, nn.Module) else t.detach() for k, t in trained.items()},
                'data': {'epoch': epoch, 'position': consumed * world_size}, 'args': vars(args)}

    batches = train_prior.endless(loader, epoch, consumed)
    t0, stats = time.time(), {}
    with ckpts:
        while it < s['iters']:
            batch, epoch, consumed = next(batches)
            batch = {k: v if k == 'seed' else v.to(device, non_blocking=True)  # seeds stay on the CPU (gss.keyed)
                     for k, v in batch.items() if torch.is_tensor(v)}
            train_prior.set_lr(optimizer, lr_at(it, s['lr'], s['iters'], s.get('warmup', 0)))
            torch.manual_seed(gss.seed_of(args.seed, 1, it, rank))  # 1: the draws not keyed by the sample
            loss = loss_fn(batch, it / s['iters'])
            signum = ckpts.stop(loss.detach().isfinite(), it)  # the iteration's one host sync
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            sync_grads(params, world_size)
            if clip:
                nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            if clamp is not None:
                with torch.no_grad():
                    clamp.clamp_(0, 1)  # a maskige is an image in [0, 1]
            it += 1
            last = it == s['iters']
            if it % 20 == 0 or last or it % s['eval'] == 0:
                stats = {'loss': loss.item(), 'minutes': round((time.time() - t0) / 60, 2)}
                if rank == 0 and (it % s['eval'] == 0 or last):
                    stats.update(validate())
                log.log(it, stats)
            if signum or last or it % args.ckpt_interval == 0:
                ckpts.save(checkpoint())
            if signum:
                return ckpts.stopped(signum, it), stats
    return 0, stats


def resume(ckpts, args, trained, optimizer, log):
    """The trained tensors and the optimizer from --resume -> (iteration, epoch, samples consumed), or zeros."""
    ckpt, it, epoch, consumed = ckpts.load('gss-posterior')
    if ckpt is None:
        return 0, 0, 0
    if ckpt['variant'] != args.variant or set(ckpt['trained']) != set(trained):
        raise gss.UserError(f"{ckpts.resume}: checkpoint of --variant {ckpt['variant']}; expected --variant "
                            f"{args.variant}")
    try:
        for name, t in trained.items():
            if isinstance(t, nn.Module):
                t.load_state_dict(ckpt['trained'][name])
            else:
                t.data.copy_(ckpt['trained'][name])
        optimizer.load_state_dict(ckpt['optimizer'])  # (one written before FT-W's two weight-decay groups: error)
    except (RuntimeError, ValueError) as e:
        raise gss.UserError(f"{ckpts.resume}: does not match the flags or this version ({str(e).splitlines()[0]}); "
                            f"expected the flags it was trained with") from None
    log.info(f"resumed from {ckpts.resume} at iteration {it}")
    return it, epoch, consumed


def train_tokenizer(args, s, num_classes, palette, ignore_colour, device, rank, world_size, log):
    """A dall_e-architecture tokenizer (TOKENIZER_ARCH) trained with Adam, clipped at norm 1, the lr decaying to 0 as
    the temperature falls (without it, low temperatures undo the training). -> (tokenizer, exit code, stats)."""
    tok = gss.build_tokenizer(**TOKENIZER_ARCH).to(device)
    tok.requires_grad_(True)
    opt = torch.optim.Adam(tok.parameters(), lr=s['lr'])
    ds = datasets.build_dataset(args.dataset, 'train', args.data_root, train=True)
    val = val_labels(args, VAL_IMAGES)
    inverse = gss.NearestColour(palette).to(device)

    def validate():
        tok.requires_grad_(False)
        out = recon_metrics(tok, inverse, palette, ignore_colour, val, num_classes)
        tok.requires_grad_(True)
        return out

    def loss_fn(batch, progress):
        return tokenizer_loss(tok, batch['label'], batch['seed'], palette, ignore_colour, s['crop'], progress)
    code, stats = train(args, dict(s, warmup=0), {'tokenizer': tok}, opt, loss_fn, validate, ds, log, rank,
                        world_size, device, clip=1.0)
    tok.requires_grad_(False)
    return tok, code, stats


def train_inverse(args, s, num_classes, palette, ignore_colour, tok, prior, device, rank, world_size, log):
    """GSS-FT / FT-W (train X^-1 with AdamW and CE) and GSS-TF / TT (train beta through the frozen tokenizer with hard
    Gumbel-softmax, SGD). -> (palette, inverse module or None, inverse_config, exit code)."""
    v = args.variant
    ds = datasets.build_dataset(args.dataset, 'train', args.data_root, train=True)
    val = val_labels(args, VAL_IMAGES)
    beta = nn.Parameter(palette.float().to(device) / 255) if v in ('tf', 'tt') else None  # (K, 3) in [0, 1]
    ftw = {'depth': s.get('depth'), **s.get('ftw', {})}  # the synthetic preset's CPU-sized widths, if any
    config = {'ft': {'hidden': 64}, 'tt': {'hidden': 64}, 'ft-w': ftw, 'tf': {}}[v]
    inverse = {'ft': gss.FTInverse, 'tt': gss.FTInverse, 'ft-w': gss.FTWInverse}[v](num_classes, **config) \
        if v != 'tf' else None
    if inverse is not None:  # FT-W's BatchNorm over the images of all ranks, as official
        inverse = train_prior.sync_batchnorm(inverse, world_size, device).to(device).train()
    trained = {**({'beta': beta} if beta is not None else {}), **({'inverse': inverse} if inverse is not None else {})}
    params = [p for t in trained.values() for p in (t.parameters() if isinstance(t, nn.Module) else [t])]
    if v in ('tf', 'tt'):  # appendix D ii: SGD
        opt = torch.optim.SGD(params, lr=s['lr'], momentum=0.9)
    else:  # appendix D iii: AdamW (official FT-W: betas 0.9/0.999, weight decay 0.01 except on norms, as stage II)
        groups = train_prior.param_groups(inverse, prefix='inverse') if v == 'ft-w' else params
        opt = torch.optim.AdamW(groups, lr=s['lr'], weight_decay=0.01)
    pal, ign = palette.to(device), ignore_colour.to(device)

    def validate():
        pal_now, inv_now = current_stage1(beta, palette, inverse, device)
        out = recon_metrics(tok, inv_now, pal_now.to(device), ign, val, num_classes)
        if inverse is not None:
            inverse.train()  # back to batch statistics (FT-W's BatchNorm)
        return out

    loss_fn = lambda batch, progress: inverse_loss(v, batch, tok, pal, ign, beta, inverse, prior)
    code, _ = train(args, s, trained, opt, loss_fn, validate, ds, log, rank, world_size, device, clamp=beta)
    palette, inverse = current_stage1(beta, palette, inverse, device)
    return palette, None if v == 'tf' else inverse, config, code  # GSS-TF's inverse follows from its learned beta


# ----------------------------------------------------------------------------------------------------------
# command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_prior.add_flags(parser, FLAGS)
    parser.add_argument('--convert-dalle', nargs=2, metavar=('ENCODER_PKL', 'DECODER_PKL'),
                        help="convert OpenAI's encoder.pkl and decoder.pkl into a tokenizer file (--out)")
    args = parser.parse_args(argv)
    if args.convert_dalle:
        if not args.out:
            raise gss.UserError("--convert-dalle: needs --out FILE; expected e.g. --out runs/dalle.pt")
        return args
    if args.variant is None:
        raise gss.UserError("--variant: required; expected one of ff, ff-r, lstsq, ft, ft-w, tf, tt, tokenizer "
                            "(or --convert-dalle)")
    datasets.dataset_preset(args.dataset)
    if args.prior and args.variant not in ('ft', 'ft-w'):
        raise gss.UserError(f"--prior: only for --variant ft-w or ft (X^-1 on generated maskiges); got {args.variant}")
    train_prior.check_positive(args, ('iters', 'batch_size', 'depth', 'ckpt_interval'))
    run_dir = os.path.join('runs', args.dataset)
    v = args.variant
    args.tokenizer_path = args.tokenizer or os.path.join(run_dir, 'tokenizer.pt')
    args.out = args.out or (args.tokenizer_path if v == 'tokenizer' else os.path.join(run_dir, f'posterior_{v}.pt'))
    stem, ext = os.path.splitext(args.out)
    args.checkpoint_path = f"{stem}.latest{ext or '.pt'}"
    return args


def train_settings(args, prior):
    """The variant's settings: the preset's (FT-W: the official recipe of --dataset and the prior's backbone), --long,
    then the flags."""
    v = args.variant
    longer = [k for k, s in SYNTHETIC_SETTINGS.items() if 'long' in s]
    s = train_prior.with_long((SYNTHETIC_SETTINGS if args.dataset == 'synthetic' else SETTINGS).get(v, {}), args.long,
                              f"only {', '.join(f'--variant {k}' for k in longer)} on --dataset synthetic has a "
                              f"longer setting")
    if v == 'ft-w':  # the prior's backbone family (without --prior: Swin-L, the paper's)
        family = 'resnet' if prior is not None and prior.config['backbone'].startswith('resnet') else 'swin'
        s.update(FTW_RECIPES.get((args.dataset, family), {}))
    s.update({k: getattr(args, k) for k in ('iters', 'batch_size', 'lr', 'depth') if getattr(args, k) is not None})
    return s


def load_prior(args, device, world_size):
    """--prior: (frozen stage-II model, its tokenizer, palette, ignore colour, tokenizer path, record of the prior);
    the model's head normalises over the images of all ranks (SyncBN), as official."""
    model, tok, _, palette, ignore = evaluate.load_stage2(args.prior, None, args.dataset, device, args.tokenizer)
    ckpt = gss.load_file(args.prior, 'checkpoint')
    if isinstance(ckpt, dict) and ckpt.get('kind') == 'gss-prior':
        tok_path = gss.checkpoint_posterior(ckpt, args.prior, args.tokenizer)['tokenizer']
        record = {'prior': os.path.abspath(args.prior), 'prior_iter': int(ckpt['iter'])}
    else:  # an official release: its DALL-E weights are OpenAI's; the artifact refers to our converted file of them
        if not args.tokenizer:
            raise gss.UserError(f"--prior {args.prior}: an official checkpoint; expected --tokenizer with the "
                                f"converted DALL-E file the artifact should refer to (python train_posterior.py "
                                f"--convert-dalle)")
        tok_path = args.tokenizer
        record = {'prior': os.path.abspath(args.prior)}
    model.requires_grad_(False)
    return train_prior.sync_batchnorm(model, world_size, device), tok, palette, ignore, tok_path, record


def main(argv=None):
    return train_prior.cli(run, parse_args, argv)


def run(args):
    if args.convert_dalle:
        tok = gss.convert_dalle(*args.convert_dalle, args.out)
        print(f"wrote {args.out} (vocabulary {tok.vocab_size}, n_hid {tok.encoder.n_hid})")
        return 0
    rank, world_size, _, device = setup_distributed()
    train_prior.set_kernels(False)  # TF32 and cuDNN autotuning as stage II's default
    return stage1(args, rank, world_size, device)


def stage1(args, rank, world_size, device):
    """The palette, the tokenizer (trained here, or --tokenizer's, or --prior's), X^-1 (trained or not) -> the file
    --out (a tokenizer file, or the stage-I artifact, gss.make_posterior) and the exit code."""
    v = args.variant
    torch.manual_seed(args.seed)  # the same initial weights on every rank: nothing broadcasts them
    preset = datasets.DATASET_PRESETS[args.dataset]
    num_classes = preset['num_classes'] or datasets.build_dataset(args.dataset, 'val', args.data_root).num_classes
    palette, ignore_colour, palette_name = choose_palette(v, args.palette, args.dataset, num_classes, args.seed)
    tok_path, prior, record = args.tokenizer_path, None, {}
    if args.prior:  # the palette and tokenizer of the stage-II model
        prior, tok, palette, ignore_colour, tok_path, record = load_prior(args, device, world_size)
        if len(palette) != num_classes:
            raise gss.UserError(f"--prior {args.prior}: {len(palette)} classes; expected {num_classes} for "
                                f"--dataset {args.dataset}")
    s = train_settings(args, prior)
    log = Logger(os.path.splitext(args.out)[0] + '.log.jsonl', rank)
    log.info(f"stage I, variant {v}, dataset {args.dataset} ({num_classes} classes), settings {s}, device {device}")
    if v == 'tokenizer':
        tok, code, stats = train_tokenizer(args, s, num_classes, palette.to(device), ignore_colour.to(device),
                                           device, rank, world_size, log)
        if code == 0 and rank == 0:
            gss.save_tokenizer(tok, args.out, dataset=args.dataset, palette=palette.tolist(),
                               ignore_colour=ignore_colour.tolist(), settings=s, final=stats)
            log.info(f"wrote {args.out}")
        return code
    if prior is None:
        tok = gss.load_tokenizer(tok_path).to(device)
        if tok.info.get('palette') not in (None, palette.tolist()):  # the palette it was trained on, if recorded
            log.info(f"warning: {tok_path} was trained on maskiges of another palette; reconstruction will suffer")
    inverse, config, code = None, {}, 0
    if v in ('ft', 'ft-w', 'tf', 'tt'):
        palette, inverse, config, code = train_inverse(args, s, num_classes, palette, ignore_colour, tok, prior,
                                                       device, rank, world_size, log)
        if v in ('tf', 'tt') and len(set(map(tuple, palette.tolist()))) < num_classes:
            raise gss.UserError(f"--lr {s['lr']}: training merged two palette colours; expected a smaller --lr")
    if code == 0 and rank == 0:
        settings = {**s, 'seed': args.seed, **record, 'palette': palette_name}
        gss.make_posterior(args.out, v, palette, ignore_colour, tok_path, tok.vocab_size, inverse, config,
                           args.dataset, settings)
        log.info(f"wrote {args.out}")
    return code


if __name__ == '__main__':
    sys.exit(main())
