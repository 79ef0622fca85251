"""Tests for gss: CPU-only, offline, deterministic. Run: python -m pytest -q test_gss.py"""
import math
import re
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.swin_transformer import PatchMerging as TVPatchMerging
from torchvision.models.swin_transformer import SwinTransformerBlock as TVSwinBlock
import json
import os
import numpy as np
from PIL import Image

import swin
import datasets, evaluate


@pytest.fixture(scope='module')
def tv_swin_t():
    """torchvision swin_t, random init (seed 0) plus noise on every tensor, so zero biases and unit
    LayerNorms (the defaults of a fresh init) cannot hide a mistake."""
    torch.manual_seed(0)
    tv = torchvision.models.swin_t().eval()
    with torch.no_grad():
        for p in tv.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return tv


def tv_to_official(sd):
    """torchvision -> official names (the table in the facts doc), plus the buffers an official file has."""
    out = {}
    for key, t in sd.items():
        key = re.sub(r'^features\.0\.0\.', 'patch_embed.proj.', key)
        key = re.sub(r'^features\.0\.2\.', 'patch_embed.norm.', key)
        key = re.sub(r'^features\.(\d+)\.(\d+)\.',
                     lambda m: f'layers.{(int(m[1]) - 1) // 2}.blocks.{m[2]}.', key)  # odd: blocks
        key = re.sub(r'^features\.(\d+)\.', lambda m: f'layers.{int(m[1]) // 2 - 1}.downsample.', key)  # even: merging
        key = key.replace('.mlp.0.', '.mlp.fc1.').replace('.mlp.3.', '.mlp.fc2.')
        if key.endswith('relative_position_index'):
            t = t.view(49, 49)  # official stores it (N, N)
        out[key] = t
    out['layers.0.blocks.1.attn_mask'] = torch.zeros(64, 49, 49)  # a 224-input buffer, must be dropped
    return out


def official_to_mmseg(sd, reorder=True):
    """swin2mmseg.py's renames plus (reorder) correct_unfold_reduction_order / correct_unfold_norm_order."""
    out = {}
    for key, t in sd.items():
        if key.startswith('head.') or key.endswith('attn_mask'):
            continue
        if reorder and key.endswith('downsample.reduction.weight'):
            out_ch, c4 = t.shape
            t = t.reshape(out_ch, 4, c4 // 4)[:, [0, 2, 1, 3]].transpose(1, 2).reshape(out_ch, c4)
        elif reorder and re.search(r'downsample\.norm\.(weight|bias)$', key):
            t = t.reshape(4, -1)[[0, 2, 1, 3]].transpose(0, 1).reshape(-1)
        key = re.sub(r'^layers\.', 'stages.', key).replace('patch_embed.proj.', 'patch_embed.projection.')
        key = key.replace('.attn.', '.attn.w_msa.').replace('.mlp.fc1.', '.ffn.layers.0.0.')
        key = key.replace('.mlp.fc2.', '.ffn.layers.1.')
        out[re.sub(r'^norm\.', 'norm3.', key)] = t
    return out


def stage_outputs(model, x):
    """Our 4 stage outputs before the output norms, (B, H, W, C)."""
    outs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outs.append(o[0])) for layer in model.layers]
    final = model(x)
    for h in hooks:
        h.remove()
    return outs, final


def loaded_swin_t(sd):
    model = swin.build_swin('swin_t').eval()
    missing, unexpected = swin.load_pretrained(model, sd)
    return model, missing, unexpected

# -----------------------------------------------------------------------------
# parity with torchvision

@pytest.mark.parametrize('shape', [(2, 3, 224, 224), (1, 3, 256, 320)])
def test_parity_with_torchvision(tv_swin_t, shape):
    model, missing, unexpected = loaded_swin_t(tv_swin_t.state_dict())
    assert sorted(missing) == [f'norm{i}.{p}' for i in range(3) for p in ('bias', 'weight')] and unexpected == []
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, final = stage_outputs(model, x)
        ref, y = [], x
        for i, f in enumerate(tv_swin_t.features):
            y = f(y)
            if i % 2 == 1:
                ref.append(y)  # after the blocks of each stage, before merging
        last = tv_swin_t.norm(y).permute(0, 3, 1, 2)
    assert (final[-1] - last).abs().max() < 1e-4
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-4
    H, W = shape[2:]
    sizes = [(shape[0], 96 * 2 ** i, math.ceil(H / 4 / 2 ** i), math.ceil(W / 4 / 2 ** i)) for i in range(4)]
    assert [tuple(o.shape) for o in final] == sizes


def test_blocks_match_torchvision_on_any_size():
    """Padding, the shift mask and the per-axis shift drop against torchvision's block, on maps that are
    not window multiples, exactly one window, or one window along one axis only."""
    torch.manual_seed(0)
    for shift in (0, 3):
        ours = swin.SwinBlock(32, 2, window_size=7, shift_size=shift).eval()
        tv = TVSwinBlock(32, 2, [7, 7], [shift, shift], stochastic_depth_prob=0.0).eval()
        with torch.no_grad():
            for p in ours.parameters():
                p.normal_(0, 0.3)
        sd = {k.replace('mlp.fc1', 'mlp.0').replace('mlp.fc2', 'mlp.3'): v for k, v in ours.state_dict().items()}
        tv.load_state_dict(sd, strict=False)
        for H, W in [(13, 20), (7, 7), (7, 15), (8, 8), (14, 14), (1, 30)]:
            x = torch.randn(2, H, W, 32)
            with torch.no_grad():
                assert (ours(x) - tv(x)).abs().max() < 1e-5, (shift, H, W)
    merge, tv_merge = swin.PatchMerging(16), TVPatchMerging(16)
    tv_merge.load_state_dict(merge.state_dict())
    x = torch.randn(2, 13, 20, 16)
    with torch.no_grad():
        assert merge(x).shape == (2, 7, 10, 32) and (merge(x) - tv_merge(x)).abs().max() < 1e-6


def test_stage_on_its_own():
    torch.manual_seed(0)
    stage = swin.SwinStage(dim=32, depth=2, num_heads=2, window_size=7, mlp_ratio=2.0, downsample=True)
    assert [b.shift_size for b in stage.blocks] == [0, 3]
    out, nxt = stage(torch.randn(2, 13, 20, 32))
    assert out.shape == (2, 13, 20, 32) and nxt.shape == (2, 7, 10, 64)
    out, nxt = swin.SwinStage(dim=32, depth=1, num_heads=4)(torch.randn(1, 5, 9, 32))
    assert out.shape == (1, 5, 9, 32) and nxt is None


def test_block_is_plain_attention_on_one_window():
    """A block on a map that is exactly one window, written out as plain attention math."""
    torch.manual_seed(0)
    C, h, ws = 16, 2, 7
    block = swin.SwinBlock(C, h, window_size=ws, shift_size=0).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(3, ws, ws, C)
    t = block.norm1(x).reshape(3, ws * ws, C)
    q, k, v = block.attn.qkv(t).reshape(3, ws * ws, 3, h, C // h).permute(2, 0, 3, 1, 4)  # (B, h, N, d) each
    pos = [(i, j) for i in range(ws) for j in range(ws)]
    rel = torch.tensor([[(a[0] - b[0] + ws - 1) * (2 * ws - 1) + a[1] - b[1] + ws - 1 for b in pos] for a in pos])
    bias = block.attn.relative_position_bias_table[rel].permute(2, 0, 1)  # (h, N, N)
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // h) + bias, -1)
    y = x + block.attn.proj((attn @ v).transpose(1, 2).reshape(3, ws, ws, C))
    y = y + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(y))))
    with torch.no_grad():
        assert (block(x) - y).abs().max() < 1e-5
        # the window covers the map, so a shifted block drops its shift and computes the same
        shifted = swin.SwinBlock(C, h, window_size=ws, shift_size=3).eval()
        shifted.load_state_dict(block.state_dict())
        assert (shifted(x) - y).abs().max() < 1e-5


def test_window_attention_on_windows_is_the_official_pipeline():
    """WindowAttention on explicit windows (pad, roll, window_partition, attention, unpartition, roll back,
    crop: the official order) equals the block's gather-based path."""
    torch.manual_seed(0)
    block = swin.SwinBlock(32, 2, window_size=7, shift_size=3).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 13, 20, 32)
    _, _, mask = swin.window_layout(13, 20, 7, 3, x.device)
    y = torch.roll(F.pad(x, (0, 0, 0, 1, 0, 1)), (-3, -3), (1, 2))  # (2, 14, 21, 32)
    windows, pad_hw = swin.window_partition(y, 7)
    with torch.no_grad():
        y = swin.window_unpartition(block.attn(windows, mask), 7, pad_hw, pad_hw)
        y = torch.roll(y, (3, 3), (1, 2))[:, :13, :20]
        assert (block.shifted_window_attention(x) - y).abs().max() < 1e-5


def test_sdpa_path_keeps_the_numbers():
    """Off CPU the attention runs through F.scaled_dot_product_attention; same numbers as the CPU lines."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 6, 49, 16).unbind(0)
    mask = torch.randn(6, 49, 49) + (torch.rand(6, 49, 49) < 0.3) * -100.0
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (swin.attention(q, k, v, mask) - sdpa).abs().max() < 1e-5
    block = swin.SwinBlock(32, 2, window_size=7, shift_size=3).to('meta')  # meta: takes the SDPA branch
    assert block(torch.empty(2, 13, 20, 32, device='meta')).shape == (2, 13, 20, 32)


def test_window_partition_round_trip():
    x = torch.randn(2, 13, 20, 5)
    windows, (Hp, Wp) = swin.window_partition(x, 7)
    assert windows.shape == (2 * 2 * 3, 49, 5) and (Hp, Wp) == (14, 21)
    assert windows[3, 42:].abs().sum() == 0 and windows[3, :42].abs().min() > 0  # window (1, 0): last row is padding
    assert torch.equal(swin.window_unpartition(windows, 7, (Hp, Wp), (13, 20)), x)

# -----------------------------------------------------------------------------
# checkpoint layouts

def test_official_and_mmseg_layouts_load_identically(tv_swin_t, tmp_path):
    x = torch.randn(1, 3, 72, 100, generator=torch.Generator().manual_seed(2))
    ref, _, _ = loaded_swin_t(tv_swin_t.state_dict())
    official = tv_to_official(tv_swin_t.state_dict())
    torch.save({'model': {'module.' + k: v for k, v in official.items()}}, tmp_path / 'official.pth')
    norms = {}
    torch.manual_seed(3)
    for i, c in enumerate((96, 192, 384)):  # mmseg files carry their own output norms
        norms[f'norm{i}.weight'], norms[f'norm{i}.bias'] = torch.randn(c), torch.randn(c)
    mmseg = {**official_to_mmseg(official), **norms}
    with torch.no_grad():
        want = ref(x)
        m, missing, unexpected = loaded_swin_t(str(tmp_path / 'official.pth'))
        assert sorted(missing) == [f'norm{i}.{p}' for i in range(3) for p in ('bias', 'weight')] and unexpected == []
        assert all((a - b).abs().max() < 1e-6 for a, b in zip(m(x), want))
        m, missing, unexpected = loaded_swin_t({'state_dict': {'backbone.' + k: v for k, v in mmseg.items()}})
        assert missing == [] and unexpected == []
        outs, got = stage_outputs(m, x)
        assert (got[-1] - want[-1]).abs().max() < 1e-6
        assert (got[0] - F.layer_norm(outs[0], (96,), norms['norm0.weight'], norms['norm0.bias']).permute(0, 3, 1, 2)
                ).abs().max() < 1e-6  # mmseg's norm0 went to our norm0
        # the Unfold order must be converted back: loading a file that skipped it changes the outputs
        m, _, _ = loaded_swin_t({**official_to_mmseg(official, reorder=False), **norms})
        assert (m(x)[-1] - want[-1]).abs().max() > 1e-2


def test_bias_table_resized_for_another_window():
    torch.manual_seed(0)
    big = swin.build_swin('swin_mini', window_size=12)
    with torch.no_grad():
        big.layers[0].blocks[0].attn.relative_position_bias_table.fill_(0.5)
    small = swin.build_swin('swin_mini', window_size=7)
    missing, unexpected = swin.load_pretrained(small, {'model': big.state_dict()})
    assert missing == [] and unexpected == []
    table = small.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == (13 * 13, 1) and torch.allclose(table, torch.full_like(table, 0.5))
    small(torch.randn(1, 3, 64, 64))


def test_unrecognised_checkpoint_is_a_clear_error(tmp_path):
    torch.save({'encoder.conv.weight': torch.zeros(1), 'decoder.fc.bias': torch.zeros(1)}, tmp_path / 'x.pth')
    with pytest.raises(ValueError, match=r'first unrecognised keys: encoder\.conv\.weight, decoder\.fc\.bias'):
        swin.load_pretrained(swin.build_swin('swin_mini'), str(tmp_path / 'x.pth'))

# -----------------------------------------------------------------------------
# the model

def test_state_dict_layout_and_presets():
    keys = swin.build_swin('swin_mini').state_dict().keys()
    assert not any('relative_position_index' in k or 'attn_mask' in k for k in keys)
    for k in ('patch_embed.proj.weight', 'patch_embed.norm.bias', 'layers.3.blocks.0.attn.qkv.weight',
              'layers.2.blocks.1.attn.relative_position_bias_table', 'layers.0.blocks.0.mlp.fc2.bias',
              'layers.2.downsample.reduction.weight', 'layers.2.downsample.norm.weight', 'norm3.weight'):
        assert k in keys
    with torch.device('meta'):
        large = swin.build_swin('swin_l')
    assert large.channels == [192, 384, 768, 1536]
    assert large.layers[0].blocks[1].attn.relative_position_bias_table.shape == (23 * 23, 6)
    # official Swin-L has 195,198,516 parameters without its head; we add norm0..2
    assert sum(p.numel() for p in large.parameters()) == 195_198_516 + 2 * (192 + 384 + 768)
    with pytest.raises(ValueError, match='swin_t'):
        swin.build_swin('swin_xl')


def test_drop_path_is_per_sample_linear_and_train_only():
    model = swin.build_swin('swin_mini', drop_path_rate=0.3)
    rates = [b.drop_path for layer in model.layers for b in layer.blocks]
    assert rates == pytest.approx([0.0, 0.075, 0.15, 0.225, 0.3])  # linear in block index
    x = torch.ones(256, 3, 2)
    y = swin.drop_path(x, 0.5, training=True)
    assert set(y.unique().tolist()) == {0.0, 2.0} and (y == y[:, :1, :1]).all()  # whole samples dropped
    assert swin.drop_path(x, 0.5, training=False) is x


def confusion_metrics(preds, labels, K, ignore=255):
    """Independent reference: a (K, K+1) confusion matrix, column K = predictions outside [0, K-1]."""
    cm = np.zeros((K, K + 1), np.int64)
    for p, l in zip(preds, labels):
        p, l = p.ravel().astype(np.int64), l.ravel().astype(np.int64)
        keep = (l != ignore) & (l >= 0) & (l < K)
        p, l = p[keep], l[keep]
        p = np.where((p >= 0) & (p < K), p, K)
        np.add.at(cm, (l, p), 1)
    tp, gt, pr = np.diag(cm[:, :K]).astype(float), cm.sum(1).astype(float), cm[:, :K].sum(0).astype(float)
    with np.errstate(invalid='ignore', divide='ignore'):
        iou, acc = tp / (gt + pr - tp) * 100, tp / gt * 100
    return dict(aAcc=tp.sum() / gt.sum() * 100, IoU=iou, Acc=acc,
                mIoU=np.mean(iou[~np.isnan(iou)]), mAcc=np.mean(acc[~np.isnan(acc)]))

def test_metric_matches_confusion_matrix():
    rng = np.random.default_rng(0)
    K = 7
    preds, labels = [], []
    for i in range(5):
        shape = (int(rng.integers(5, 40)), int(rng.integers(5, 40)))
        label = rng.integers(0, 5, shape)  # classes 5 and 6 never in GT
        label[rng.random(shape) < 0.2] = 255  # ignore pixels
        pred = np.where(rng.random(shape) < 0.6, label, rng.integers(0, 6, shape))  # 5 predicted, 6 never
        pred[rng.random(shape) < 0.05] = 9  # out of range: not counted (mmseg histc)
        pred[rng.random(shape) < 0.05] = -1
        preds.append(pred), labels.append(label)
    ref = confusion_metrics(preds, labels, K)
    got = evaluate.segmentation_metrics(preds, labels, K)
    np.testing.assert_allclose(got['IoU'], ref['IoU'], equal_nan=True)
    np.testing.assert_allclose(got['Acc'], ref['Acc'], equal_nan=True)
    for k in ('aAcc', 'mIoU', 'mAcc'):
        assert got[k] == pytest.approx(ref[k])
    assert got['IoU'][5] == 0 and np.isnan(got['IoU'][6]) and np.isnan(got['Acc'][5])  # FP counts, absent skipped
    assert 0 < got['mIoU'] < 100
    # the accumulator: torch inputs, per-image updates in another order, ranks split and summed by hand
    a, b = evaluate.SegMetric(K), evaluate.SegMetric(K)
    for i, (p, l) in enumerate(zip(preds, labels)):
        (a if i % 2 else b).update(torch.from_numpy(p), torch.from_numpy(l).to(torch.uint8))
    a.areas += b.all_reduce().areas  # all_reduce is a no-op without torch.distributed
    np.testing.assert_allclose(a.compute()['IoU'], ref['IoU'], equal_nan=True)

def test_metric_edge_cases_and_table():
    empty = evaluate.segmentation_metrics([np.zeros((2, 2))], [np.full((2, 2), 255)], 3)
    assert np.isnan(empty['mIoU']) and np.isnan(empty['aAcc'])
    with pytest.raises(ValueError):
        evaluate.segmentation_metrics([np.zeros((2, 2))], [], 3)
    m = evaluate.segmentation_metrics([np.array([[0, 1], [1, 1]])], [np.array([[0, 1], [0, 255]])], 3)
    assert m['IoU'][0] == 50 and m['IoU'][1] == 50 and np.isnan(m['IoU'][2]) and m['aAcc'] == pytest.approx(200 / 3)
    table = evaluate.format_table(m, ['cat', 'dog', 'cow'])
    assert 'cow' in table and 'nan' in table and '50.00' in table and 'mIoU 50.00' in table
    assert evaluate.harmonic_mean([50, 25]) == pytest.approx(100 / 3) and evaluate.harmonic_mean([3, 0]) == 0

# -----------------------------------------------------------------------------
# layouts

def save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)

def test_ade20k_layout(tmp_path):
    rng = np.random.default_rng(0)
    ade = tmp_path / 'ADEChallengeData2016'
    raws = []
    for i in range(2):
        raw = rng.integers(0, 151, (30, 40))
        raw[0, :3] = [0, 1, 150]
        raws.append(raw)
        save(ade / f'images/training/ADE_train_{i:08d}.jpg', rng.integers(0, 256, (30, 40, 3)))
        save(ade / f'annotations/training/ADE_train_{i:08d}.png', raw)
    ds = datasets.build_dataset('ade20k', 'train', root=str(tmp_path), train=False)  # parent dir is found too
    assert len(ds) == 2 and ds.num_classes == 150 and ds.classes[0] == 'wall' and ds.classes[149] == 'flag'
    item = ds[1]
    assert item['image'].shape == (3, 512, 683) and item['path'].endswith('ADE_train_00000001.jpg')
    expect = np.where(raws[1] == 0, 255, raws[1] - 1)  # reduce_zero_label
    assert item['label'].dtype == torch.long and (item['label'].numpy() == expect).all()
    assert item['label'][0, :3].tolist() == [255, 0, 149]

def test_cityscapes_layout(tmp_path):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 34, (16, 32))
    ids[0, :6] = [7, 26, 33, 0, 9, 31]
    train_ids = rng.choice([0, 5, 18, 255], (16, 32))
    for city, lab_name, lab in [('aachen', 'labelTrainIds', train_ids), ('bremen', 'labelIds', ids)]:
        stem = f'{city}_000000_000019'
        save(tmp_path / f'leftImg8bit/val/{city}/{stem}_leftImg8bit.png', rng.integers(0, 256, (16, 32, 3)))
        save(tmp_path / f'gtFine/val/{city}/{stem}_gtFine_{lab_name}.png', lab)
    ds = datasets.build_dataset('cityscapes', 'val', root=str(tmp_path), train=False)
    assert len(ds) == 2 and ds.num_classes == 19
    assert (ds[0]['label'].numpy() == train_ids).all()
    lab = ds[1]['label'].numpy()
    assert lab[0, :6].tolist() == [0, 13, 18, 255, 255, 16]
    table = dict(datasets.CITYSCAPES_ID_TO_TRAINID)
    assert (lab == np.vectorize(lambda i: table.get(i, 255))(ids)).all()
    assert ds[1]['image'].shape == (3, 1024, 2048)

def test_folder_dataset(tmp_path):
    (tmp_path / 'classes.txt').write_text('cat\ndog\n\nbird\n')
    lab = np.array([[0, 1], [2, 255]]).repeat(8, 0).repeat(8, 1)
    save(tmp_path / 'images/train/a.png', np.zeros((16, 16, 3)))
    save(tmp_path / 'annotations/train/a.png', lab)
    ds = datasets.build_dataset('folder', 'training', root=str(tmp_path), train=False)
    assert ds.classes == ('cat', 'dog', 'bird') and ds.num_classes == 3
    assert (ds[0]['label'].numpy() == lab).all()
    save(tmp_path / 'annotations/train/a.png', lab.clip(0, 3))
    with pytest.raises(datasets.UserError, match='value 3 out of range'):
        ds[0]

def test_embedded_class_names_match_shared():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'data', 'class_names.json')
    if not os.path.isfile(path):
        pytest.skip('../shared/data/class_names.json not available (developer-only check)')
    names = json.load(open(path))
    assert list(datasets.ADE20K_CLASSES) == names['ade20k'] and list(datasets.CITYSCAPES_CLASSES) == names['cityscapes']

# -----------------------------------------------------------------------------
# pipelines

PRESET = dict(datasets.DATASET_PRESETS['ade20k'], crop_size=48, img_scale=(64, 48))

def test_train_pipeline_keeps_image_and_label_aligned():
    rng = np.random.default_rng(0)
    palette = rng.permutation(256 ** 3)[:256]  # distinct colours per label value
    palette = np.stack([palette // 65536, palette // 256 % 256, palette % 256], 1).astype(np.uint8)
    checked, classes = 0, 0
    for seed in range(30):
        lab = rng.choice([0, 1, 2, 3, 4, 255], (6, 8)).repeat(8, 0).repeat(8, 1).astype(np.uint8)  # (48, 64) blocks
        item = datasets.train_transform(palette[lab], lab, PRESET, np.random.default_rng(seed))
        x, y = item['image'], item['label']  # (3, 48, 48), (48, 48)
        assert x.shape == (3, 48, 48) and y.shape == (48, 48) and y.dtype == torch.long
        # pixels whose 5x5 label neighbourhood is uniform must all have one colour per label value
        win = y.unfold(0, 5, 1).unfold(1, 5, 1).reshape(44, 44, 25)
        inner = (win == win[..., :1]).all(-1)
        yc, xc = y[2:-2, 2:-2][inner], x[:, 2:-2, 2:-2][:, inner]  # (N,), (3, N)
        means = []
        for c in yc.unique()[:-1] if (yc == 255).any() else yc.unique():  # 255 is also the padding
            colours = xc[:, yc == c]
            assert (colours - colours[:, :1]).abs().max() < 1e-5, f"seed {seed}: class {c} mixes colours"
            means.append(colours[:, 0])
            checked += colours.shape[1]
        if len(means) > 1:  # different labels keep different colours (no label/image swap)
            classes += 1
            assert torch.cdist(torch.stack(means), torch.stack(means)).fill_diagonal_(1).min() > 0
    assert checked > 10000 and classes > 20

def test_crop_box_respects_cat_max_ratio():
    lab = np.zeros((64, 64), np.uint8)
    lab[:32, :32] = 1
    lab[40:, 40:] = 255  # ignored pixels do not count
    def ok(c):
        cnt = np.bincount(c.ravel(), minlength=256)[:255]
        return (cnt > 0).sum() > 1 and cnt.max() < 0.75 * cnt.sum()
    base = np.mean([ok(lab[datasets.crop_box(lab, 32, 1.0, np.random.default_rng(s))]) for s in range(200)])
    crops = [lab[datasets.crop_box(lab, 32, 0.75, np.random.default_rng(s))] for s in range(200)]
    assert all(c.shape == (32, 32) for c in crops)
    assert 0.2 < base < 0.5 and np.mean([ok(c) for c in crops]) > 0.95
    one = np.zeros((64, 64), np.uint8)
    assert one[datasets.crop_box(one, 32, 0.75, np.random.default_rng(0))].shape == (32, 32)  # gives up after 10 tries
    assert one[datasets.crop_box(one[:20], 32, 0.75, np.random.default_rng(0))].shape == (20, 32)  # smaller than crop

def test_region_resize_equals_resize_then_crop():
    img = np.random.default_rng(0).integers(0, 256, (37, 53, 3), np.uint8)
    for size in [(74, 106), (20, 29), (37, 53), (50, 61)]:
        box = (slice(3, min(3 + 16, size[0])), slice(5, 5 + 24))
        full = datasets.resize_image(img, size)
        assert full.shape == (*size, 3)
        np.testing.assert_allclose(datasets.resize_image(img, size, box).astype(int), full[box].astype(int), atol=1)

def test_train_pipeline_pads_with_zero_and_255():
    lab = np.arange(20 * 30).reshape(20, 30).astype(np.uint8) % 7
    p = dict(PRESET, img_scale=(30, 20), ratio_range=(1.0, 1.0))
    for seed in range(4):
        item = datasets.train_transform(np.full((20, 30, 3), 200, np.uint8), lab, p, np.random.default_rng(seed))
        x, y = item['image'], item['label']
        assert (y[20:] == 255).all() and (y[:, 30:] == 255).all()
        assert (x[:, 20:] == 0).all() and (x[:, :, 30:] == 0).all()
        assert (y[:20, :30].numpy() == lab).all() or (y[:20, :30].numpy() == lab[:, ::-1]).all()
        assert (x[:, :20, :30] != 0).all()

def test_rescale_size_matches_mmcv():
    assert datasets.rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert datasets.rescale_size(1024, 2048, (2048, 1024)) == (1024, 2048)
    assert datasets.rescale_size(300, 4000, (2048, 512)) == (154, 2048)  # long side bound
    assert datasets.rescale_size(1024, 2048, (1024, 256)) == (256, 512)

# -----------------------------------------------------------------------------
# bad input: one-line UserError naming the file

def ade_set(tmp_path, n=1, size=(8, 8)):
    root = tmp_path / 'ADEChallengeData2016'
    for i in range(n):
        save(root / f'images/training/ADE_train_{i:08d}.jpg', np.zeros((*size, 3)))
        save(root / f'annotations/training/ADE_train_{i:08d}.png', np.ones(size))
    return root

def expect_error(fn, *fragments):
    with pytest.raises(datasets.UserError) as e:
        fn()
    msg = str(e.value)
    assert '\n' not in msg and all(f in msg for f in fragments), msg

def test_user_errors(tmp_path):
    expect_error(lambda: datasets.build_dataset('ade20k', 'train', root=str(tmp_path / 'nope')), 'nope', 'no such')
    expect_error(lambda: datasets.build_dataset('imagenet', 'train'), 'imagenet', 'ade20k')
    root = ade_set(tmp_path)
    expect_error(lambda: datasets.build_dataset('ade20k', 'test', root=str(root)), 'test', 'training')
    (root / 'images/validation').mkdir()
    expect_error(lambda: datasets.build_dataset('ade20k', 'val', root=str(root)), 'validation', 'no images')
    save(root / 'images/training/ADE_train_00000009.jpg', np.zeros((8, 8, 3)))
    expect_error(lambda: datasets.build_dataset('ade20k', 'train', root=str(root)), 'ADE_train_00000009.jpg', 'label')
    os.remove(root / 'images/training/ADE_train_00000009.jpg')
    ds = datasets.build_dataset('ade20k', 'train', root=str(root))
    lab_path = str(root / 'annotations/training/ADE_train_00000000.png')
    img_path = str(root / 'images/training/ADE_train_00000000.jpg')
    save(lab_path, np.full((8, 8), 200))
    expect_error(lambda: ds[0], lab_path, '200', '0..150')
    save(lab_path, np.ones((8, 9)))
    expect_error(lambda: ds[0], lab_path, img_path, '9x8', '8x8')
    save(lab_path, np.ones((8, 8, 3)))
    expect_error(lambda: ds[0], lab_path, 'single-channel')
    save(lab_path, np.ones((8, 8)))
    with open(img_path, 'wb') as f:
        f.write(b'\xff\xd8 not really a jpeg')
    expect_error(lambda: ds[0], img_path, 'not a readable image')
    expect_error(lambda: datasets.build_dataset('folder', 'train'), '--data-root')
    expect_error(lambda: datasets.build_dataset('folder', 'train', root=str(tmp_path)), 'classes.txt')

# -----------------------------------------------------------------------------
# synthetic

def test_synthetic_deterministic_with_promised_properties(tmp_path):
    kw = dict(seed=3, num_train=20, num_val=4)
    a = datasets.synthetic_root(str(tmp_path / 'a'), **kw)
    assert datasets.synthetic_root(str(tmp_path / 'a'), **kw) == a  # cached
    b = datasets.synthetic_root(str(tmp_path / 'b'), **kw)
    assert os.listdir(tmp_path / 'a') == [os.path.basename(a)]  # no temp dir left behind
    files = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs)
    assert len(files) == 48
    for f in files:
        assert open(os.path.join(a, f), 'rb').read() == open(os.path.join(b, f), 'rb').read(), f
    other = datasets.synthetic_root(str(tmp_path / 'b'), seed=4, num_train=20, num_val=4)
    assert open(os.path.join(other, files[0]), 'rb').read() != open(os.path.join(a, files[0]), 'rb').read()

    ds = datasets.build_dataset('ade20k', 'train', root=a, train=False)  # the real ADE20K loader reads it
    labels = np.stack([ds[i]['label'].numpy() for i in range(len(ds))])  # (20, 64, 64) after reduce_zero_label
    images = np.stack([np.asarray(Image.open(ds.files[i][0])) for i in range(len(ds))])  # (20, 64, 64, 3)
    assert labels.shape == (20, 64, 64) and images.shape == (20, 64, 64, 3)
    assert set(np.unique(labels)) == set(range(10)) | {255}  # all 10 classes and some unlabeled pixels
    assert 0.005 < (labels == 255).mean() < 0.15 and (labels == 255).any((1, 2)).mean() > 0.3
    for c in range(10):  # texture matters: per-class colour spreads are wide
        assert images[labels == c].std(0).mean() > 12, datasets.SYNTHETIC_CLASSES[c]
    item = datasets.SegDataset(ds.files, datasets.DATASET_PRESETS['synthetic'], True, '')[0]
    assert item['image'].shape == (3, 64, 64) and item['label'].shape == (64, 64)

def test_presets():
    ade, city = datasets.DATASET_PRESETS['ade20k'], datasets.DATASET_PRESETS['cityscapes']
    assert [ade[k] for k in ('crop_size', 'batch_size', 'iters', 'lr', 'test_mode')] == [512, 32, 160000, 1.2e-4, 'whole']
    assert [city[k] for k in ('crop_size', 'batch_size', 'iters', 'lr')] == [768, 16, 80000, 1.5e-3]
    assert city['img_scale'] == (2049, 1025) and city['test_scale'] == (2048, 1024)
    assert (city['test_mode'], city['test_crop'], city['test_stride']) == ('slide', 768, 512)
    assert len(datasets.ADE20K_CLASSES) == 150 and len(datasets.CITYSCAPES_CLASSES) == 19
    assert len(datasets.SYNTHETIC_CLASSES) == datasets.DATASET_PRESETS['synthetic']['num_classes'] == 10
