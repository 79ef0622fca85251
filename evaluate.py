"""
Evaluation for GSS: segmentation metrics with mmsegmentation's exact semantics (conventions 3.4,
official_gss_facts 11), and the inference CLI.
"""
import math

import numpy as np
import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# metrics: per-class areas accumulated over the whole dataset, then IoU / Acc (mmseg IoUMetric)

class SegMetric:
    """Accumulates per-class intersect, union, predicted and label areas (int64, CPU) over a dataset."""

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
        pred, label = pred[keep], label[keep]
        K = self.num_classes
        def hist(x):  # torch.histc(bins=K, min=0, max=K-1): values outside [0, K-1] are not counted
            return torch.bincount(x[(x >= 0) & (x < K)], minlength=K)
        inter, area_pred, area_label = hist(pred[pred == label]), hist(pred), hist(label)
        self.areas += torch.stack([inter, area_pred + area_label - inter, area_pred, area_label]).cpu()

    def all_reduce(self):
        """Sum the areas over all ranks when torch.distributed is initialised; returns self."""
        if dist.is_available() and dist.is_initialized():
            device = f'cuda:{torch.cuda.current_device()}' if dist.get_backend() == 'nccl' else 'cpu'
            areas = self.areas.to(device)
            dist.all_reduce(areas)
            self.areas = areas.cpu()
        return self

    def compute(self):
        """-> dict aAcc, mIoU, mAcc (percent floats) and per-class IoU, Acc (percent float64 arrays).
        A class absent from prediction and GT has IoU NaN (skipped by the mean); predicted but absent
        from GT has IoU 0 (counted); Acc is NaN whenever the GT area is 0."""
        inter, union, _, label = self.areas.double().numpy()
        with np.errstate(divide='ignore', invalid='ignore'):
            iou, acc = inter / union * 100, inter / label * 100  # (K,), (K,)
            aacc = inter.sum() / label.sum() * 100
        return dict(aAcc=float(aacc), mIoU=nanmean(iou), mAcc=nanmean(acc), IoU=iou, Acc=acc)

def nanmean(x):
    """np.nanmean without the empty-slice warning (NaN when every entry is NaN)."""
    x = np.asarray(x, np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan

def segmentation_metrics(preds, labels, num_classes, ignore_index=255):
    """Metrics over lists (or any iterables, e.g. a stream) of integer label maps; see SegMetric.compute."""
    metric = SegMetric(num_classes, ignore_index)
    for pred, label in zip(preds, labels, strict=True):
        metric.update(pred, label)
    return metric.compute()

def format_table(metrics, class_names):
    """A per-class IoU / Acc table (percent, 2 decimals, nan for absent classes) with the summary below."""
    w = max(len('Class'), *(len(n) for n in class_names))
    lines = [f"{'Class':<{w}} | {'IoU':>6} | {'Acc':>6}", '-' * (w + 18)]
    for name, iou, acc in zip(class_names, metrics['IoU'], metrics['Acc'], strict=True):
        lines.append(f"{name:<{w}} | {iou:6.2f} | {acc:6.2f}")
    lines += ['-' * (w + 18), f"aAcc {metrics['aAcc']:.2f}  mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}"]
    return '\n'.join(lines)

def harmonic_mean(values):
    """Harmonic mean, e.g. of per-dataset mIoUs in cross-domain tables (MSeg 'h.mean', GSS Table 6); 0 if any is 0."""
    values = [float(v) for v in values]
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)
