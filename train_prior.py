"""Stage II of GSS (latent prior learning, paper Sec. 3.4): train the image encoder I_psi to predict the frozen
tokenizer's codes of the ground-truth maskige (Eq. 6).

    python train_prior.py --dataset synthetic                                   # 2 CPU cores, minutes
    torchrun --nproc_per_node 2 train_prior.py --dataset synthetic              # DDP (Gloo on CPU, NCCL on CUDA)
    torchrun --nproc_per_node 8 train_prior.py --dataset ade20k --posterior P --pretrained SWIN_L.pth
    python train_prior.py --dataset synthetic --resume auto                     # after a crash, a kill, a time limit

Contents: FLAGS, the defaults table the command line is built from; the plumbing train_posterior.py imports
(distributed setup, lr_at, Logger, Checkpoints: atomic save, resume, stop on a signal or a non-finite loss; the seeded
sampler); stage II: parse_args, param_groups, validate, train and its steps. --batch-size is the TOTAL batch.
Randomness is keyed by what is computed, not by where or when (a sample's augmentation by (seed, epoch, position),
dropout / drop path by (seed, iteration, micro-batch)): a resume needs no RNG state and reaches the weights of an
uninterrupted run, and 2 ranks x 1 image equal 1 rank x 2 accumulated images.
As the official configs (configs/gss/ade20k/*.py, configs/_base_/schedules/): AdamW, poly lr after a 1500-iteration
linear warmup, SyncBatchNorm. Ours: bf16 autocast on CUDA (official: fp32); on CPU each rank normalises over its own
images (PyTorch's SyncBatchNorm is GPU-only); the synthetic preset trains a CPU-sized head (SYNTHETIC_HEAD).
"""
import argparse
import ast
import contextlib
import dataclasses
import datetime
import glob
import json
import math
import os
import resource
import signal
import sys
import time

import torch
import torch.distributed as dist

import datasets
import evaluate
import gss

# ----------------------------------------------------------------------------------------------------------
# Defaults, one line per flag, as nanoGPT's train.py: name=(type, a tuple of choices or bool for a switch; default;
# help). None: derived in parse_args from the --dataset preset (datasets.DATASET_PRESETS) or from the device.
# --long means the same in both trainers: the synthetic preset's run that reaches the README's targets.
LONG_HELP = "synthetic: the longer schedule that reaches the README's targets"
_LONG = datasets.DATASET_PRESETS['synthetic']['long']
FLAGS = dict(
    dataset=(str, None, "preset (required): " + ", ".join(datasets.DATASET_PRESETS)),
    backbone=(str, None, "backbone name (default swin_l, the paper's main one; swin_mini for synthetic)"),
    pretrained=(str, None, "backbone weights file (ImageNet Swin / ResNet checkpoint)"),
    model_config=(str, '', "KEY=VALUE,... overrides of gss.GSSConfig, e.g. dropout=0 (synthetic: SYNTHETIC_HEAD); "
                           "Table 3's ablations: tokens=8 (d = 1/8), aux_fill=False (no Unlabel), depth=0 (no MLA)"),
    posterior=(str, None, "stage-I artifact from train_posterior.py (default runs/<dataset>/posterior_ff.pt)"),
    data_root=(str, None, "dataset root (default: the preset's)"),
    iters=(int, None, "training iterations (default: the preset's, 160000 for ade20k)"),
    batch_size=(int, None, "TOTAL batch over all ranks (default: the preset's, 32 for ade20k)"),
    micro_batch=(int, None, "images per rank per forward; gradients accumulate (default: all at once)"),
    lr=(float, None, "peak learning rate (default: the preset's, 1.2e-4 for ade20k)"),
    warmup_iters=(int, None, "linear warmup (default: the preset's, 1500 as official)"),
    amp=(('bf16', 'fp16', 'none'), None, "autocast dtype (default bf16 on CUDA where supported, else fp16; CPU none)"),
    out=(str, None, "output folder for latest.pt, best.pt, log.jsonl (default runs/<dataset>/prior)"),
    resume=(str, None, "checkpoint to resume from, or 'auto' = <out>/latest.pt if it exists"),
    stop_at=(int, None, "save and exit after this iteration (for time-limited jobs)"),
    long=(bool, False, f"{LONG_HELP} ({_LONG['iters']} iterations, validating every {_LONG['eval_interval']})"),
    eval_interval=(int, None, "validate every N iterations and at the end; 0 = never (default iters/10, >= 100)"),
    log_interval=(int, None, "log every N iterations (default 50, iters/20 if smaller)"),
    ckpt_interval=(int, 1000, "write <out>/latest.pt every N iterations (default 1000)"),
    compile=(bool, False, "torch.compile the model"),
    seed=(int, 0, "seeds the initial weights, the sample order, augmentation and dropout"),
    workers=(int, None, "data loader workers per rank (default 4 on CUDA, as official; 0 on CPU)"),
    deterministic=(bool, False, "torch.use_deterministic_algorithms, no cuDNN autotuning (bitwise-reproducible)"),
    device=(('cuda', 'cpu'), None, "default cuda when available"),
)
# ours: the synthetic preset trains a CPU-sized head (head dim 32 as official); with the paper's 384/512/2048 widths
# and 16 heads the head is ~70% of a synthetic step on CPU (python bench.py train: a 3x slower step)
SYNTHETIC_HEAD = dict(mla_channels=96, fused_channels=128, token_channels=256, num_heads=4)


def add_flags(parser, flags, required=()):
    """Build argparse flags from a defaults table (FLAGS)."""
    for name, (kind, default, text) in flags.items():
        flag = '--' + name.replace('_', '-')
        if kind is bool:
            parser.add_argument(flag, action='store_true', help=text)
        else:
            choices = kind if isinstance(kind, tuple) else None
            parser.add_argument(flag, type=str if choices else kind, choices=choices, default=default, help=text,
                                required=name in required)


def check_positive(args, names):
    for flag in names:
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise gss.UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected a positive integer")


def with_long(settings, long, what):
    """--long: the settings updated by their 'long' entry; a one-line error (naming `what`) where there is none."""
    if long and 'long' not in settings:
        raise gss.UserError(f"--long: {what}; expected --iters N")
    chosen = {**settings, **settings['long']} if long else dict(settings)
    chosen.pop('long', None)
    return chosen


def cli(run, parse_args, argv):
    """Both trainers' entry: run(parse_args(argv)) -> exit code; a user error prints one line and exits 2."""
    try:
        return run(parse_args(argv))
    except (gss.UserError, datasets.UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():  # run started a process group
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# Training plumbing shared with train_posterior.py

def setup_distributed(device=None):
    """torchrun's env vars -> (rank, world_size, local_rank, device): NCCL on CUDA, Gloo on CPU, one process without."""
    device_type = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if 'RANK' not in os.environ:
        return 0, 1, 0, torch.device(device_type)
    rank, world_size, local_rank = (int(os.environ[k]) for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'))
    if device_type == 'cuda':
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group('nccl', device_id=device)
    else:
        device = torch.device('cpu')
        dist.init_process_group('gloo')
    return rank, world_size, local_rank, device


def per_rank(batch_size, world_size):
    """The TOTAL --batch-size -> images per rank; a one-line error when the ranks cannot share it evenly."""
    if batch_size % world_size:
        raise gss.UserError(f"--batch-size {batch_size} is not divisible by {world_size} ranks; "
                            f"expected a multiple of {world_size}")
    return batch_size // world_size


def sync_batchnorm(model, world_size, device):
    """BatchNorm over the images of all ranks, as official; PyTorch's SyncBatchNorm is GPU-only."""
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if world_size > 1 and device.type == 'cuda' else model


def lr_at(it, base_lr, max_iters, warmup_iters=1500, warmup_ratio=1e-6, power=1.0):
    """mmcv's poly schedule (min_lr 0) with linear warmup, as the official configs (schedule_160k.py):
    lr = base * (1 - it/max)^power, times 1 - (1 - it/warmup) * (1 - ratio) while it < warmup. `it` is 0-based."""
    lr = base_lr * (1 - it / max_iters) ** power
    if it < warmup_iters:
        lr *= 1 - (1 - it / warmup_iters) * (1 - warmup_ratio)
    return lr


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group['lr'] = lr
    return lr


class Logger:
    """One console line and one JSON line (appended to the file `path`) per log call, on rank 0 only."""

    def __init__(self, path, rank=0):
        self.path, self.rank = path, rank
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # the trainers' outputs go there too

    def log(self, step, metrics):
        if self.rank != 0:
            return
        parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
        print(f"iter {step} | " + " | ".join(parts), flush=True)
        with open(self.path, 'a') as f:  # opened per line: a killed run loses at most the line being written
            f.write(json.dumps({'iter': step, **metrics}) + "\n")

    def info(self, msg):
        if self.rank == 0:
            print(msg, flush=True)


def load_checkpoint(path, kind, posterior=None):
    """A checkpoint of `kind` ('gss-prior', ...), weights_only; checked against the stage-I artifact `posterior`."""
    ckpt = gss.load_file(path, 'checkpoint')
    if not isinstance(ckpt, dict) or ckpt.get('kind') != kind:
        got = ckpt.get('kind') if isinstance(ckpt, dict) else type(ckpt).__name__
        raise gss.UserError(f"{path}: not a {kind} checkpoint (kind {got!r}); expected a file written by "
                            f"{'train_prior.py' if kind == 'gss-prior' else 'train_posterior.py'}")
    if posterior is not None:
        gss.check_posterior_match(ckpt['posterior'], posterior, path)
    return ckpt


class Checkpoints:
    """The crash safety of both trainers: atomic saves, a killed write's <path>.*.tmp removed at start, --resume
    ('auto': `latest` if it exists). Within the block SIGTERM / SIGINT only set .signum, acted on at the end of the
    iteration (every rank stops together, saves, exits 128 + signum); a second signal kills at once."""

    def __init__(self, latest, resume, rank, world_size, device, log, others=()):
        self.latest, self.rank, self.world_size, self.device, self.log = latest, rank, world_size, device, log
        self.saved_it = None  # the iteration of `latest`, as this run wrote or read it
        stale = [tmp for path in (latest, *others) for tmp in glob.glob(f'{path}.*.tmp')]
        if rank == 0 and stale:
            for path in stale:
                os.remove(path)
            log.info(f"removed {len(stale)} unfinished checkpoint file(s) of a killed run: {', '.join(stale)}")
        if resume == 'auto':  # `latest` if there is one, else a fresh start
            resume = latest if os.path.exists(latest) else None
        self.resume = resume

    def __enter__(self):
        self.signum = 0
        self.handlers = {s: signal.signal(s, self.request) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def request(self, signum, frame):
        if self.signum:  # the second one: die of it now (the last checkpoint stays intact)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self.handlers.items():
            signal.signal(s, h)

    def load(self, kind, posterior=None):
        """-> (the --resume checkpoint or None, its iteration, epoch, samples of this rank's share consumed)."""
        if not self.resume:
            return None, 0, 0, 0
        ckpt = load_checkpoint(self.resume, kind, posterior)
        self.saved_it = ckpt['iter']
        return ckpt, ckpt['iter'], ckpt['data']['epoch'], ckpt['data']['position'] // self.world_size

    def save(self, ckpt, path=None):
        """ckpt: a dict of plain types with 'iter', written atomically to `path` (default `latest`) by rank 0."""
        path = path or self.latest
        try:
            if self.rank == 0:
                gss.save_atomic(ckpt, path)  # on any failure, e.g. a full disk, the file at `path` is intact
        except OSError as e:
            raise gss.UserError(f"{path}: could not write the checkpoint ({e.strerror or e}); "
                                f"the previous checkpoint there is intact") from None
        if path == self.latest:
            self.saved_it = ckpt['iter']

    def stop(self, finite, it):
        """finite: a 0-d bool tensor on the training device -> the signal number any rank received (0: none), the same
        on every rank; a non-finite loss on any rank is a UserError naming the iteration. The flags are built on the
        device (NCCL refuses CPU tensors; torch.full copies nothing from the host): .tolist() is the iteration's one
        host sync, which every rank needs to agree on stopping."""
        not_finite = (~finite).to(self.device, torch.float)  # a no-op for a loss on the training device
        flags = torch.stack([torch.full((), float(self.signum), device=self.device), not_finite])  # (2,)
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, not_finite = flags.tolist()
        if not_finite:
            raise gss.UserError(f"non-finite loss at iteration {it + 1}; stopped without saving; " + (
                f"the last good checkpoint {self.latest} (iteration {self.saved_it}) is intact"
                if self.saved_it is not None else "no checkpoint was written yet"))
        return int(signum)

    def stopped(self, signum, it):
        """After `latest` was saved on a signal: -> the exit code 128 + signum."""
        self.log.info(f"stopped by signal {signum} after iteration {it}; saved {self.latest}; "
                      f"continue with --resume auto")
        return 128 + signum


# ----------------------------------------------------------------------------------------------------------
# Randomness that depends on what is computed, not on where or when: exact resume, any number of ranks

class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (shuffle, drop_last) from `start` samples into this rank's share of the epoch, yielding
    (index, seed): the seed depends only on (seed, epoch, position in the epoch's permutation)."""

    def __init__(self, dataset, num_replicas, rank, seed):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self):
        indices = list(super().__iter__())  # this rank's share: permutation[rank::num_replicas]
        for i in range(self.start, len(indices)):
            position = i * self.num_replicas + self.rank
            yield indices[i], gss.seed_of(self.seed, 0, self.epoch, position)  # 0: data


class SeededItems(torch.utils.data.Dataset):
    """dataset[index] augmented under torch's RNG seeded by the sampler's seed, which the item carries as 'seed'."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index_seed):
        index, seed = index_seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return dict(self.dataset[index], seed=seed)


def ignore_sigint(worker_id):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the trainer handles it


def endless(loader, epoch, consumed):
    """Micro-batches from `consumed` samples into this rank's share of `epoch` on -> (batch, epoch, consumed)."""
    while True:
        loader.sampler.set_epoch(epoch)
        loader.sampler.start = consumed
        for batch in loader:
            consumed += loader.batch_size
            yield batch, epoch, consumed
        epoch, consumed = epoch + 1, 0


def seeded_loader(dataset, batch_size, rank, world_size, seed, workers, device):
    """Micro-batches of this rank's share, each item augmented by its own seed (ResumableSampler, SeededItems)."""
    sampler = ResumableSampler(dataset, world_size, rank, seed)
    return torch.utils.data.DataLoader(SeededItems(dataset), batch_size=batch_size, sampler=sampler, drop_last=True,
                                       num_workers=workers, pin_memory=device.type == 'cuda',
                                       worker_init_fn=ignore_sigint)


# ----------------------------------------------------------------------------------------------------------
# Stage-II training (GSS-FF latent prior learning, Sec. 3.4, Eq. 6)

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, FLAGS, required=('dataset',))
    args = p.parse_args(argv)
    preset = with_long(datasets.dataset_preset(args.dataset), args.long,
                       f"--dataset {args.dataset} has no longer schedule")
    synthetic = args.dataset == 'synthetic'
    cuda = (args.device or ('cuda' if torch.cuda.is_available() else 'cpu')) == 'cuda'
    if cuda and not torch.cuda.is_available():
        raise gss.UserError("--device cuda: no CUDA device is visible; expected --device cpu or a GPU machine")
    derived = dict(backbone='swin_mini' if synthetic else 'swin_l',
                   posterior=os.path.join('runs', args.dataset, 'posterior_ff.pt'),
                   out=os.path.join('runs', args.dataset, 'prior'),
                   iters=preset['iters'], batch_size=preset['batch_size'], lr=preset['lr'],
                   warmup_iters=preset['warmup'],
                   amp=('bf16' if torch.cuda.is_bf16_supported() else 'fp16') if cuda else 'none',
                   workers=4 if cuda else 0)
    for k, v in derived.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.eval_interval is None:  # official: every 16k of 160k iterations
        args.eval_interval = preset.get('eval_interval', max(100, args.iters // 10))
    args.log_interval = args.log_interval or max(1, min(50, args.iters // 20))
    check_positive(args, ('iters', 'batch_size', 'micro_batch', 'log_interval', 'ckpt_interval', 'stop_at'))
    if args.backbone not in gss.BACKBONES:
        raise gss.UserError(f"--backbone {args.backbone}: unknown backbone; expected one of {', '.join(gss.BACKBONES)}")
    args.model_config = {**(SYNTHETIC_HEAD if synthetic else {}), **parse_model_config(args.model_config)}
    world_size = int(os.environ.get('WORLD_SIZE', 1))  # known before the process group starts
    images = per_rank(args.batch_size, world_size)
    args.micro_batch = args.micro_batch or images
    if images % args.micro_batch:
        raise gss.UserError(f"--micro-batch {args.micro_batch} does not divide the {images} "
                            f"images per rank (--batch-size {args.batch_size} over {world_size} ranks)")
    if not os.path.isfile(args.posterior):
        raise gss.UserError(f"--posterior {args.posterior}: no such stage-I artifact; expected the file of "
                            f"`python train_posterior.py --variant ff --dataset {args.dataset}` (after --variant "
                            f"tokenizer or --convert-dalle, see its help)")
    return args


def parse_model_config(text):
    """'a=1,b=0.5' -> {'a': 1, 'b': 0.5}, keys checked against gss.GSS's head arguments."""
    valid = [f.name for f in dataclasses.fields(gss.GSSConfig) if f.name not in ('backbone', 'num_classes',
                                                                                   'vocab_size')]
    config = {}
    for item in filter(None, text.split(',')):
        key, _, value = item.partition('=')
        if key not in valid or not value:
            raise gss.UserError(f"--model-config {item}: expected KEY=VALUE with KEY one of {', '.join(valid)}")
        try:
            config[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise gss.UserError(f"--model-config {item}: {value!r} is not a number; expected KEY=VALUE") from None
    return config


def param_groups(model, weight_decay=0.01, prefix=''):
    """AdamW groups of a gss.GSS (or an FT-W X^-1, prefix='inverse') by the official paramwise_cfg: no weight decay
    where the official name contains one of no_decay; everything else decays, biases and BatchNorms ('bn') too."""
    no_decay = ('norm', 'relative_position_bias_table', 'absolute_pos_embed')
    decay, rest = [], []
    for name, p in model.named_parameters(prefix):
        official = gss.official_key(name) if name.startswith(('head.', 'inverse.')) else name  # backbone's agree
        if p.requires_grad:
            (rest if any(s in official for s in no_decay) else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': rest, 'weight_decay': 0.0}]


@torch.no_grad()
def validate(model, tokenizer, inverse, val_set, preset, autocast, rank, world_size):
    """-> (mIoU of the generative prediction, mIoU of the auxiliary head) over the whole val split in the dataset's
    test mode: each rank takes every world_size-th image (evaluate.evaluate_split), the areas are summed over ranks."""
    if world_size > 1:  # every rank evaluates rank 0's BatchNorm statistics, the ones a checkpoint keeps
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    model.eval()
    test = dict(mode=preset['test_mode'], crop=preset['test_crop'], stride=preset['test_stride'])
    with autocast:
        metrics = evaluate.evaluate_split(model, tokenizer, {'generative': inverse}, val_set, test,
                                          indices=range(rank, len(val_set), world_size))
    model.train()
    return tuple(metrics[name].all_reduce().compute()['mIoU'] for name in ('generative', 'aux head'))


def set_kernels(deterministic):
    """Both trainers' CUDA kernels. TF32 matmuls and convolutions (Ampere and later: inputs rounded to 10 mantissa bits,
    float32 sums), so --amp none is not IEEE float32 there; TF32 kernels are deterministic, exact resume holds.
    cuDNN autotuning (official cudnn_benchmark True) picks kernels by timing: off under --deterministic, which also
    gives cuBLAS the fixed workspace its deterministic mode needs (read when CUDA starts)."""
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def configure_torch(args, rank, device):
    """Seed the initial weights (DDP broadcasts rank 0's), set the kernels (set_kernels) -> the --amp autocast."""
    torch.manual_seed(args.seed + rank)
    set_kernels(args.deterministic)
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': None}[args.amp]
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()


def load_data(args, world_size, device):
    """-> (the stage-I artifact, training set, validation set, its frozen tokenizer, X^-1 for validation, palette
    (K, 3)), the artifact checked against the dataset and the dataset against the batch."""
    posterior = gss.load_posterior(args.posterior)
    train_set = datasets.build_dataset(args.dataset, 'train', root=args.data_root)
    val_set = datasets.build_dataset(args.dataset, 'val', root=args.data_root, train=False)
    K = train_set.num_classes
    if posterior['num_classes'] != K:
        raise gss.UserError(f"--posterior {args.posterior}: the stage-I artifact has {posterior['num_classes']} "
                            f"classes; expected {K} for --dataset {args.dataset}")
    if len(train_set) // world_size < args.micro_batch:
        raise gss.UserError(f"--dataset {args.dataset}: {len(train_set)} training images are fewer than "
                            f"{args.micro_batch} per rank on {world_size} ranks; expected a larger split")
    tokenizer = gss.load_tokenizer(posterior['tokenizer']).to(device)
    inverse = gss.build_inverse(posterior).to(device)
    palette = torch.tensor(posterior['palette'], device=device)  # (K, 3)
    return posterior, train_set, val_set, tokenizer, inverse, palette


def resume(ckpts, args, posterior, model, optimizer, scaler, log):
    """Weights, optimizer and scaler from --resume -> (iteration, epoch, samples of this rank's share consumed,
    best val mIoU, last val mIoU); a fresh start without one."""
    ckpt, it, epoch, consumed = ckpts.load('gss-prior', posterior)
    if ckpt is None:
        return 0, 0, 0, -math.inf, None
    saved = dataclasses.asdict(gss.GSSConfig(**ckpt['config']))  # fields added since it was saved take defaults
    if saved != model.config:
        diff = ", ".join(f"{k} {saved.get(k)} vs {model.config.get(k)}" for k in sorted(set(saved) | set(model.config))
                         if saved.get(k) != model.config.get(k))
        raise gss.UserError(f"{ckpts.resume}: checkpoint of a different model ({diff}; checkpoint vs flags); "
                            f"expected the flags it was trained with")
    model.load_state_dict(ckpt['model'])
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    changed = [f"--{k.replace('_', '-')} {ckpt['args'][k]} -> {getattr(args, k)}"
               for k in ('iters', 'batch_size', 'micro_batch', 'lr', 'warmup_iters', 'seed')
               if ckpt['args'][k] != getattr(args, k)]
    if changed:
        log.info(f"{ckpts.resume}: resuming with changed flags ({', '.join(changed)}): not the run it would have been")
    log.info(f"resumed from {ckpts.resume} at iteration {it} (epoch {epoch}, sample {consumed} of this rank's share)")
    return it, epoch, consumed, ckpt['best_miou'], ckpt['val_miou']


def forward_backward(model, batches, tokenizer, palette, scaler, autocast, it, accum, seed, rank, world_size, device,
                     sums):
    """One iteration's gradients, accumulated over `accum` micro-batches (Eq. 6, gss.compute_loss); the loss and its
    parts, averaged over the micro-batches, are added to `sums` (device tensors: no host sync in the step)
    -> (all finite: a 0-d bool tensor on the device, epoch, consumed)."""
    finite = torch.ones((), dtype=torch.bool, device=device)
    for micro_step in range(accum):
        batch, epoch, consumed = next(batches)
        images = batch['image'].to(device, non_blocking=True)  # (b, 3, crop, crop)
        labels = batch['label'].to(device, non_blocking=True)  # (b, crop, crop), 255 = ignore
        if world_size > 1:  # all-reduce the gradients on the last micro-step only
            model.require_backward_grad_sync = micro_step == accum - 1
        # dropout and drop path draw from a generator seeded by (seed, iteration, micro-batch): the same masks for
        # the same images on any number of ranks, with any accumulation, and after a resume
        torch.manual_seed(gss.seed_of(seed, 1, it, micro_step * world_size + rank))  # 1: model
        with autocast:
            loss, parts = gss.compute_loss(model, tokenizer, palette, images, labels)
        scaler.scale(loss / accum).backward()
        finite &= loss.detach().isfinite()
        for k, v in {'loss': loss.detach().double(), **parts}.items():  # float64 as the Python floats they were
            sums[k] = sums.get(k, 0.0) + v / accum
    return finite, epoch, consumed


def log_means(log, it, sums, n, seconds, left, lr, device, world_size):
    """Log the means of `sums` over the last n iterations and all ranks, the lr, the speed, the ETA, peak memory."""
    means = torch.stack(list(sums.values())).float() / n  # (len(sums),) float32 as before: the same logged figures
    if world_size > 1:
        dist.all_reduce(means)
        means /= world_size
    peak_mb = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == 'cuda'
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # the CPU's: peak RSS, Linux in KiB
    log.log(it, {**dict(zip(sums, means.tolist())), 'lr': lr, 's_per_iter': seconds / n,
                 'eta': str(datetime.timedelta(seconds=round(seconds / n * left))), 'peak_mem_mb': round(peak_mb)})


def build_model(args, num_classes, vocab_size, world_size, device):
    """-> (gss.GSS, not yet wrapped by DDP; AdamW as official; the fp16 gradient scaler)."""
    model = gss.GSS.from_config(dict(backbone=args.backbone, num_classes=num_classes, vocab_size=vocab_size,
                                     **args.model_config), args.pretrained)
    model = sync_batchnorm(model, world_size, device).to(device)
    optimizer = torch.optim.AdamW(param_groups(model), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.01,
                                  fused=True)  # one kernel over all tensors: 3x less CPU time than the per-tensor loop
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')  # a no-op for bf16 and none
    return model, optimizer, scaler


def wrap(model, compile, world_size, local_rank, device):
    """torch.compile (--compile) and DDP (several ranks; it broadcasts rank 0's initial weights)."""
    model = torch.compile(model) if compile else model
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == 'cuda'
                                                          else None)
    return model


def train(args):
    """Stage II -> the exit code: 0 when done (or at --stop-at), 128 + signal number after SIGTERM / SIGINT."""
    rank, world_size, local_rank, device = setup_distributed(args.device)
    autocast = configure_torch(args, rank, device)
    log = Logger(os.path.join(args.out, 'log.jsonl'), rank)
    accum = args.batch_size // world_size // args.micro_batch
    posterior, train_set, val_set, tokenizer, inverse, palette = load_data(args, world_size, device)
    loader = seeded_loader(train_set, args.micro_batch, rank, world_size, args.seed, args.workers, device)
    raw_model, optimizer, scaler = build_model(args, train_set.num_classes, posterior['vocab_size'], world_size, device)
    best = os.path.join(args.out, 'best.pt')
    ckpts = Checkpoints(os.path.join(args.out, 'latest.pt'), args.resume, rank, world_size, device, log, [best])
    it, epoch, consumed, best_miou, val_miou = resume(ckpts, args, posterior, raw_model, optimizer, scaler, log)
    model = wrap(raw_model, args.compile, world_size, local_rank, device)

    def checkpoint():  # plain types only: weights_only-loadable
        return {'kind': 'gss-prior', 'iter': it, 'model': raw_model.state_dict(), 'config': raw_model.config,
                'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
                'data': {'epoch': epoch, 'position': consumed * world_size},
                'best_miou': best_miou, 'val_miou': val_miou, 'args': vars(args),
                'posterior': gss.posterior_summary(posterior, args.posterior, args.out)}

    log.info(f"training {args.dataset} on {world_size} x {device.type}: {args.iters} iterations, batch "
             f"{args.batch_size} = {world_size} ranks x {accum} steps x {args.micro_batch}, amp {args.amp}, "
             f"{sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f} M parameters, "
             f"{len(train_set)} training images")
    batches = endless(loader, epoch, consumed)
    sums, train_time, it0 = {}, 0.0, it
    with ckpts:
        while it < args.iters:
            t0 = time.time()
            lr = set_lr(optimizer, lr_at(it, args.lr, args.iters, args.warmup_iters))
            finite, epoch, consumed = forward_backward(model, batches, tokenizer, palette, scaler, autocast, it, accum,
                                                       args.seed, rank, world_size, device, sums)
            signum = ckpts.stop(finite, it)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            it += 1
            train_time += time.time() - t0
            if it % args.log_interval == 0 or it == args.iters:
                log_means(log, it, sums, it - it0, train_time, args.iters - it, lr, device, world_size)
                sums, train_time, it0 = {}, 0.0, it
            if signum:
                ckpts.save(checkpoint())
                return ckpts.stopped(signum, it)
            if args.eval_interval and (it % args.eval_interval == 0 or it == args.iters):
                val_miou, aux_miou = validate(raw_model, tokenizer, inverse, val_set,
                                              datasets.DATASET_PRESETS[args.dataset], autocast, rank, world_size)
                log.log(it, {'val_mIoU': val_miou, 'val_aux_mIoU': aux_miou})
                if val_miou > best_miou:
                    best_miou = val_miou
                    ckpts.save(checkpoint(), best)
            if it % args.ckpt_interval == 0 or it == args.iters or it == args.stop_at:
                ckpts.save(checkpoint())
            if it == args.stop_at:
                log.info(f"stopped at iteration {it} (--stop-at); saved {ckpts.latest}; continue with --resume auto")
                return 0
    log.info(f"done: {it} iterations; checkpoints in {args.out}" +
             (f"; best val mIoU {best_miou:.2f}" if val_miou is not None else ""))
    return 0


def main(argv=None):
    return cli(train, parse_args, argv)


if __name__ == '__main__':
    sys.exit(main())
