"""Stage I of GSS (latent posterior learning, paper Sec. 3.3): the maskige transform X (a palette), its inverse X^-1,
and the frozen VQ tokenizer they go with. Writes the stage-I artifact that train_prior.py and evaluate.py read.

The paper's tokenizer is DALL-E's dVAE. Download OpenAI's https://cdn.openai.com/dall-e/encoder.pkl and decoder.pkl,
then convert them once (the only step that unpickles; it warns):
    python train_posterior.py --convert-dalle encoder.pkl decoder.pkl --out runs/dalle.pt
Where no pretrained tokenizer fits (or none can be downloaded), train a small one on the dataset's maskiges
(the conventional stage I, Eq. 3); this is the default for the synthetic set:
    python train_posterior.py --variant tokenizer --dataset synthetic
Then one X / X^-1 variant of Table 1 (default paths: runs/<dataset>/tokenizer.pt -> runs/<dataset>/posterior_<v>.pt):
    python train_posterior.py --variant ff --dataset synthetic                          # GSS-FF, training free
    python train_posterior.py --variant ff --dataset ade20k --tokenizer runs/dalle.pt --palette official
    python train_posterior.py --variant ft-w --dataset ade20k --tokenizer runs/dalle.pt  # also ff-r lstsq ft tf tt
Several GPUs (X^-1 and beta training; gradients are averaged over ranks):
    torchrun --nproc_per_node 8 train_posterior.py --variant ft-w --dataset ade20k --tokenizer runs/dalle.pt
Measure a stage-I artifact with the maskige-reconstruction oracle:
    python evaluate.py --recon --posterior runs/synthetic/posterior_ff.pt --dataset synthetic
On a CPU shared with other jobs, prefix OMP_NUM_THREADS=1: OpenMP threads spin while they wait for each other
(measured here: 2 threads on 2 loaded cores burnt ~8x the CPU time of 1 thread per tokenizer step).
"""
import argparse
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
from train_prior import Logger, cleanup_distributed, lr_at, setup_distributed

# Paper settings (appendix D): beta (TF, TT) 4,000 iterations of SGD at batch 16; X^-1 with AdamW at batch 16,
# GSS-FT 3,000 iterations, GSS-FT-W 40,000 (official: lr 1.5e-3, wd 0.01, poly, warmup 1500; facts 4.2).
# Learning rates the paper does not give (SGD for beta, AdamW for FT) are ours; the tokenizer settings are ours.
SETTINGS = {  # eval: iterations between validation recon metrics (and at the end)
    'tokenizer': dict(iters=5000, batch_size=32, lr=1e-3, crop=32, eval=500),
    'ft': dict(iters=3000, batch_size=16, lr=1e-3, warmup=0, eval=1000),
    'ft-w': dict(iters=40000, batch_size=16, lr=1.5e-3, warmup=1500, eval=5000),
    'tf': dict(iters=4000, batch_size=16, lr=0.01, warmup=0, eval=1000),
    'tt': dict(iters=4000, batch_size=16, lr=0.01, warmup=0, eval=1000),
}
# ours: sized for 2 CPU cores (the synthetic set is 64x64)
SYNTHETIC_SETTINGS = {
    'tokenizer': dict(iters=600, batch_size=32, lr=1e-3, crop=32, eval=100),
    'ft': dict(iters=300, batch_size=16, lr=1e-3, warmup=0, eval=100),
    'ft-w': dict(iters=100, batch_size=4, lr=1e-3, warmup=10, eval=50),
    'tf': dict(iters=100, batch_size=8, lr=0.01, warmup=0, eval=50),
    'tt': dict(iters=200, batch_size=8, lr=0.01, warmup=0, eval=100),
}
TOKENIZER_ARCH = dict(n_hid=64, vocab_size=512, n_init=128, n_blk_per_group=1)  # ours: the smallest dall_e shapes
VAL_IMAGES = 100  # validation images for the recon metrics logged while training


def choose_palette(variant, palette, dataset, num_classes, seed):
    """-> (palette (K, 3), ignore colour (3,)) for --palette maximal / official / random (GSS-FF-R)."""
    if variant == 'ff-r' and palette not in (None, 'random'):
        raise gss.UserError(f"--palette {palette}: GSS-FF-R uses a random palette; expected --palette random or none")
    palette = palette or ('random' if variant == 'ff-r' else 'maximal')
    if palette == 'official':
        full = gss.official_palette(dataset)
        if len(full) != num_classes + 1:
            raise gss.UserError(f"--palette official: the {dataset} palette has {len(full) - 1} classes but the "
                                f"dataset has {num_classes}; expected --palette maximal")
        return full[:-1], full[-1]
    colours = gss.random_palette(num_classes, seed) if palette == 'random' else gss.make_palette(num_classes, seed)
    return colours, gss.ignore_colour_for(colours)


def label_batches(ds, batch_size, seed, device):
    """Endless random training crops' labels (B, crop, crop) long, 255 = ignore."""
    gen = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=2 ** 62, generator=gen)
    loader = torch.utils.data.DataLoader(ds, batch_size, sampler=sampler, drop_last=True,
                                         num_workers=4 if device.type == 'cuda' else 0)
    for batch in loader:
        yield batch['label'].to(device, non_blocking=True)


def val_labels(args, n):
    """The first n validation items as (label (1, H, W) at the original resolution, test-resolution size)."""
    ds = datasets.build_dataset(args.dataset, 'val', args.data_root, train=False)
    return [(item['label'][None], item['image'].shape[-2:]) for item in (ds[i] for i in range(min(n, len(ds))))]


def recon_metrics(tok, inverse, palette, ignore_colour, val, num_classes, upsample=False):
    """Maskige-reconstruction mIoU / aAcc over validation items (gss.recon_scores: the evaluate.py --recon oracle;
    upsample=True: stage II's 2x path)."""
    metric = evaluate.SegMetric(num_classes)
    for label, size in val:
        label = label.to(palette.device)
        metric.update(gss.recon_scores(tok, inverse, label, palette, ignore_colour, size, upsample).argmax(1), label)
    m = metric.compute()
    return {'mIoU': round(float(m['mIoU']), 2), 'aAcc': round(float(m['aAcc']), 2)}


def sync_grads(params, world_size):
    """Average gradients over DDP ranks (one all-reduce per tensor; these models are tiny)."""
    if world_size > 1:
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= world_size


def paint_soft(beta, ignore_colour, labels):
    """X with a trainable beta (K, 3) in [0, 1]: labels (B, H, W) -> maskige (B, 3, H, W), differentiable in beta."""
    table = torch.cat([beta, ignore_colour.to(beta)[None] / 255])  # (K+1, 3)
    return F.embedding(labels.clamp(max=len(beta)), table).permute(0, 3, 1, 2)


def relaxed_roundtrip(tok, maskige):
    """Encoder logits -> hard Gumbel-softmax (argmax forward, straight-through gradients; Sec. 3.3; the paper gives no
    temperature, we use 1) -> decode_soft."""
    z = F.gumbel_softmax(tok.encoder_logits(maskige), tau=1.0, hard=True, dim=1)  # (B, vocab, h, w) one-hot
    return tok.decode_soft(z)  # (B, 3, H, W)


def training_maskige(tok, labels, palette, ignore_colour):
    """The maskige X^-1 learns from: the tokenizer's reconstruction of the 2x ground truth, as stage II's inference
    produces at 2H x 2W. (The paper's noisy maskiges from a stage-II model's predictions would come in here.)"""
    return gss.reconstruct(tok, gss.upsample_labels_2x(labels), palette, ignore_colour)  # (B, 3, 2H, 2W)


def train_tokenizer(args, s, num_classes, palette, ignore_colour, device, rank, world_size, log):
    """Eq. 3 / the first term of Eq. 5: a dall_e-architecture encoder/decoder trained on the dataset's maskiges with
    the Gumbel-softmax relaxation (relaxed one-hots into the decoder, temperature annealed 1 -> 1/16 as DALL-E's),
    MSE between the decoder's sigmoid colour means and map_pixels(maskige). Adam, gradients clipped at norm 1, the
    learning rate decaying linearly to 0 as the temperature falls (without the decay, low temperatures undo the
    training). Random crops of the 1x or the 2x label maps (the tokens of the oracle and of stage II), ignore painted
    with the ignore colour. Logs the oracle's reconstruction mIoU (1x) and stage II's (2x) on validation images."""
    tok = gss.build_tokenizer(**TOKENIZER_ARCH).to(device)
    tok.requires_grad_(True)
    opt = torch.optim.Adam(tok.parameters(), lr=s['lr'])
    ds = datasets.build_dataset(args.dataset, 'train', args.data_root, train=True)
    batches = label_batches(ds, s['batch_size'], args.seed + rank, device)
    val = val_labels(args, VAL_IMAGES)
    inverse = gss.NearestColour(palette).to(device)
    crop, t0 = s['crop'], time.time()
    for it in range(s['iters']):
        labels = next(batches)  # (B, crop_size, crop_size)
        if torch.rand(()) < 0.5:
            labels = gss.upsample_labels_2x(labels)
        y, x = (int(torch.randint(0, n - crop + 1, ())) for n in labels.shape[1:])
        maskige = gss.paint(labels[:, y:y + crop, x:x + crop], palette, ignore_colour)  # (B, 3, crop, crop)
        tau = (1 / 16) ** (it / s['iters'])
        z = F.gumbel_softmax(tok.encoder_logits(maskige), tau=tau, dim=1)  # (B, vocab, crop/8, crop/8) relaxed
        mean = torch.sigmoid(tok.decoder_logits(z))  # (B, 3, crop, crop)
        loss = F.mse_loss(mean, (1 - 2 * gss.LOGIT_LAPLACE_EPS) * maskige + gss.LOGIT_LAPLACE_EPS)
        for g in opt.param_groups:
            g['lr'] = lr_at(it, s['lr'], s['iters'], warmup_iters=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_grads(tok.parameters(), world_size)
        nn.utils.clip_grad_norm_(tok.parameters(), 1.0)
        opt.step()
        last = it == s['iters'] - 1
        validate = rank == 0 and ((it + 1) % s['eval'] == 0 or last)
        if it % 20 == 0 or validate or last:
            stats = {'loss': loss.item(), 'tau': tau, 'minutes': round((time.time() - t0) / 60, 2)}
            if validate:
                stats.update(recon_metrics(tok, inverse, palette, ignore_colour, val, num_classes))
                stats.update({f'{k}_2x': v for k, v in recon_metrics(tok, inverse, palette, ignore_colour, val,
                                                                     num_classes, upsample=True).items()})
            log.log(it, stats)
    tok.requires_grad_(False)
    return tok, stats


def train_inverse(args, s, num_classes, palette, ignore_colour, tok, device, rank, world_size, log):
    """GSS-FT / FT-W (train X^-1 on reconstructed maskiges, AdamW, CE) and GSS-TF / TT (train beta through the frozen
    tokenizer with hard Gumbel-softmax, SGD). -> (palette, inverse module or None, inverse_config)."""
    v = args.variant
    ds = datasets.build_dataset(args.dataset, 'train', args.data_root, train=True)
    batches = label_batches(ds, s['batch_size'], args.seed + rank, device)
    val = val_labels(args, VAL_IMAGES)
    beta = nn.Parameter(palette.float().to(device) / 255) if v in ('tf', 'tt') else None  # (K, 3) in [0, 1]
    config = {'ft': {'hidden': 64}, 'tt': {'hidden': 64}, 'ft-w': {'depth': args.depth}, 'tf': {}}[v]
    inverse = {'ft': gss.FTInverse, 'tt': gss.FTInverse, 'ft-w': gss.FTWInverse}[v](num_classes, **config) \
        if v != 'tf' else None
    params = ([beta] if beta is not None else []) + (list(inverse.parameters()) if inverse is not None else [])
    if inverse is not None:
        inverse.to(device).train()
    if v in ('tf', 'tt'):  # appendix D ii: SGD
        opt = torch.optim.SGD(params, lr=s['lr'], momentum=0.9)
    else:  # appendix D iii: AdamW (official FT-W: betas 0.9/0.999, weight decay 0.01)
        opt = torch.optim.AdamW(params, lr=s['lr'], weight_decay=0.01)
    t0 = time.time()
    for it in range(s['iters']):
        labels = next(batches)  # (B, H, W)
        if v in ('ft', 'ft-w'):
            logits = inverse(training_maskige(tok, labels, palette.to(device), ignore_colour.to(device)))
            loss = F.cross_entropy(F.interpolate(logits, labels.shape[-2:], mode='bilinear', align_corners=False),
                                   labels, ignore_index=255)  # official FT-W: logits at 2H resized to the label
        else:
            labels2 = gss.upsample_labels_2x(labels)
            maskige = paint_soft(beta, ignore_colour, labels2)  # (B, 3, 2H, 2W)
            recon = relaxed_roundtrip(tok, maskige)
            if v == 'tt':  # beta and X^-1 jointly, CE through both
                logits = F.interpolate(inverse(recon), labels.shape[-2:], mode='bilinear', align_corners=False)
                loss = F.cross_entropy(logits, labels, ignore_index=255)
            else:  # TF, appendix A.2: beta_{t+1} = argmin (||X^ - C beta|| ||gamma_t|| + ||C beta gamma_t - C||)^2
                loss = tf_loss(beta, maskige, recon, labels2)
        for g in opt.param_groups:
            g['lr'] = lr_at(it, s['lr'], s['iters'], s['warmup'])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_grads(params, world_size)
        opt.step()
        if beta is not None:
            with torch.no_grad():
                beta.clamp_(0, 1)  # a maskige is an image in [0, 1]
        last = it == s['iters'] - 1
        validate = rank == 0 and ((it + 1) % s['eval'] == 0 or last)
        if it % 20 == 0 or validate or last:
            stats = {'loss': loss.item(), 'minutes': round((time.time() - t0) / 60, 2)}
            if validate:
                pal_now, inv_now = current_stage1(beta, palette, inverse)
                pal_now, ign = pal_now.to(device), ignore_colour.to(device)
                stats.update(recon_metrics(tok, inv_now, pal_now, ign, val, num_classes))
                stats.update({f'{k}_2x': x for k, x in recon_metrics(tok, inv_now, pal_now, ign, val, num_classes,
                                                                     upsample=True).items()})
                inv_now.train()  # back to batch statistics (FT-W's BatchNorm)
            log.log(it, stats)
    palette, inverse = current_stage1(beta, palette, inverse)
    return palette, None if v == 'tf' else inverse, config  # GSS-TF's inverse follows from its learned beta


def tf_loss(beta, maskige, recon, labels):
    """The GSS-TF objective of appendix A.2 (Eqs. 11-12, cascaded): (||X^ - C beta|| ||gamma_t|| +
    ||C beta gamma_t - C||)^2 with gamma_t = (beta^T beta)^-1 beta^T (Eq. 15) held fixed for the step. Norms are
    root-mean-squares over the labelled pixels, so the loss does not grow with the batch."""
    K = len(beta)
    valid = labels < K  # (B, H, W)
    gamma = gss.LeastSquares(beta.detach() * 255).gamma  # (3, K); LeastSquares takes 0-255 colours
    recon_err = ((recon - maskige) ** 2).sum(1)[valid].mean().sqrt()  # ||X^ - C beta||
    per_class = ((beta @ gamma - torch.eye(K, device=beta.device)) ** 2).sum(1)  # (K,) ||beta_c gamma - e_c||^2
    fit_err = per_class[labels[valid]].mean().sqrt()  # ||C beta gamma - C||
    return (recon_err * gamma.norm() + fit_err) ** 2


def current_stage1(beta, palette, inverse):
    """(palette (K, 3) long on 0-255, X^-1 module in eval mode) as they stand."""
    if beta is not None:
        palette = (beta.detach() * 255).round().long().cpu()
    if inverse is None:
        return palette, gss.NearestColour(palette).to(beta.device)  # TF: GSS-FF's inverse on the learned beta
    return palette, inverse.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--variant', choices=['ff', 'ff-r', 'lstsq', 'ft', 'ft-w', 'tf', 'tt', 'tokenizer'])
    parser.add_argument('--dataset', default='synthetic', help='ade20k, cityscapes, synthetic or folder')
    parser.add_argument('--data-root', default=None, help="dataset directory (default: the preset's)")
    parser.add_argument('--tokenizer', default=None, help='tokenizer file (default runs/<dataset>/tokenizer.pt)')
    parser.add_argument('--palette', choices=['maximal', 'official', 'random'], default=None,
                        help='maximal (appendix B, default), official (the official config palette) or random')
    parser.add_argument('--depth', type=int, default=2, help='Swin blocks in the FT-W inverse (official: 2 ADE20K, '
                        '1 Cityscapes)')
    parser.add_argument('--iters', type=int, default=None)
    parser.add_argument('--batch-size', type=int, default=None)
    parser.add_argument('--lr', type=float, default=None)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default=None, help='output file (default runs/<dataset>/posterior_<variant>.pt)')
    parser.add_argument('--convert-dalle', nargs=2, metavar=('ENCODER_PKL', 'DECODER_PKL'),
                        help="convert OpenAI's encoder.pkl and decoder.pkl into a tokenizer file (--out)")
    args = parser.parse_args(argv)

    if args.convert_dalle:
        if not args.out:
            raise gss.UserError("--convert-dalle: needs --out FILE; expected e.g. --out runs/dalle.pt")
        tok = gss.convert_dalle(*args.convert_dalle, args.out)
        print(f"wrote {args.out} (vocabulary {tok.vocab_size}, n_hid {tok.encoder.n_hid})")
        return
    if args.variant is None:
        raise gss.UserError("--variant: required; expected one of ff, ff-r, lstsq, ft, ft-w, tf, tt, tokenizer "
                            "(or --convert-dalle)")
    v = args.variant
    rank, world_size, _, device = setup_distributed()
    torch.manual_seed(args.seed + rank)
    preset = datasets.DATASET_PRESETS.get(args.dataset)
    if preset is None:
        raise gss.UserError(f"--dataset {args.dataset}: unknown dataset; expected one of "
                            f"{', '.join(datasets.DATASET_PRESETS)}")
    num_classes = preset['num_classes'] or datasets.build_dataset(args.dataset, 'val', args.data_root).num_classes
    run_dir = os.path.join('runs', args.dataset)
    tok_path = args.tokenizer or os.path.join(run_dir, 'tokenizer.pt')
    out = args.out or (tok_path if v == 'tokenizer' else os.path.join(run_dir, f'posterior_{v}.pt'))
    s = dict((SYNTHETIC_SETTINGS if args.dataset == 'synthetic' else SETTINGS).get(v, {}))
    s.update({k: getattr(args, k) for k in ('iters', 'batch_size', 'lr') if getattr(args, k) is not None})
    palette, ignore_colour = choose_palette(v, args.palette, args.dataset, num_classes, args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    log = Logger(os.path.dirname(os.path.abspath(out)), rank)
    log.info(f"stage I, variant {v}, dataset {args.dataset} ({num_classes} classes), settings {s}, device {device}")

    if v == 'tokenizer':
        tok, stats = train_tokenizer(args, s, num_classes, palette.to(device), ignore_colour.to(device), device, rank,
                                     world_size, log)
        if rank == 0:
            gss.save_tokenizer(tok, out, dataset=args.dataset, palette=palette.tolist(),
                               ignore_colour=ignore_colour.tolist(), settings=s, final=stats)
            log.info(f"wrote {out}")
        cleanup_distributed()
        return

    tok = gss.load_tokenizer(tok_path).to(device)
    trained_on = tok.info.get('palette')
    if trained_on is not None and trained_on != palette.tolist():
        log.info(f"warning: {tok_path} was trained on maskiges of another palette; reconstruction will suffer")
    inverse, config = None, {}
    if v in ('ft', 'ft-w', 'tf', 'tt'):
        palette, inverse, config = train_inverse(args, s, num_classes, palette, ignore_colour, tok, device, rank,
                                                 world_size, log)
        if v in ('tf', 'tt') and len(set(map(tuple, palette.tolist()))) < num_classes:
            raise gss.UserError(f"--lr {s['lr']}: training merged two palette colours; expected a smaller --lr")
    if rank == 0:
        settings = {**s, 'seed': args.seed, 'palette': args.palette or ('random' if v == 'ff-r' else 'maximal')}
        gss.make_posterior(out, v, palette, ignore_colour, tok_path, tok.vocab_size, inverse, config, args.dataset,
                           settings)
        log.info(f"wrote {out}")
    cleanup_distributed()


if __name__ == '__main__':
    try:
        main()
    except gss.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
