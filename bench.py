"""
Benchmarks for every hot path of gss, as ratios measured side by side in one run (nanoGPT's bench.py
spirit). Each subcommand prints a readable table and, as its last line, one `BENCH {json}` object.

    python bench.py swin        # our Swin-T vs torchvision's swin_t
    python bench.py data        # images/s through the training pipeline
    python bench.py inverse     # nearest colour vs least squares accuracy; fast vs naive nearest colour
    python bench.py tokenizer   # DALL-E-size encode/decode: ours vs the naive dall_e usage
    python bench.py token-loss  # chunked 2048->8192 conv + CE vs naive
    python bench.py train       # one stage-II step split into its parts
    python bench.py infer       # end-to-end generative inference, whole vs slide

Peak memory on CPU is measured honestly: each side runs in its own fresh subprocess, which reports its
peak resident set size (ru_maxrss) minus its own baseline taken after imports and input creation.
Timings are medians of interleaved repeats.
"""
import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _child(setup, args, repeats, threads, queue):
    import torch
    torch.set_num_threads(threads)
    fn = setup(*args)  # builds inputs and returns a zero-argument callable
    base = _peak_rss_mb()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    queue.put({'seconds': times, 'peak_mb': _peak_rss_mb() - base})


def measure(setup, args=(), repeats=3, threads=2):
    """Run setup(*args)() `repeats` times in a fresh process; return (median seconds, peak MB above baseline).

    `setup` must be a module-level function (it is pickled into a spawned process) returning the callable
    to time; the first call counts towards memory but the median is taken over all calls.
    """
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(setup, args, repeats, threads, queue))
    p.start()
    result = queue.get()
    p.join()
    return statistics.median(result['seconds']), result['peak_mb']


def report(title, rows, figures):
    """Print a table (list of tuples, first row = header) and the BENCH line."""
    print(title)
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print('  '.join(str(c).ljust(w) for c, w in zip(r, widths)))
    print('BENCH ' + json.dumps(figures))


BENCHES = {}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('name', choices=sorted(BENCHES))
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args()
    BENCHES[args.name](args)


if __name__ == '__main__':
    main()
