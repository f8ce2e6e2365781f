"""SVFit's training step with its forward before and after it forms W = W_res + U_r diag(s) V_r^T, and FT.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/svfit_floor.py             (the demo's MiniLM, 32 x 64 tokens)
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/svfit_floor.py --rank 8    (a small rank: the factored path)

One process, one thread: the old forward (the factored formula, patched onto SVFitLinear for its steps only), the new
one and full fine-tuning take their steps interleaved (old, new, FT, old, ...), each model with its own AdamW, so
drift on a shared machine hits all three alike. A step is forward, backward and AdamW step (`toukit.step.train_step`).
Memory is what autograd saves for backward in one training forward, parameters left out (the weights are the same
for old and new): counted by storage through saved-tensor hooks, so it is exact and needs no allocator tracing; the
training estimate adds the trainable parameters' fp32 gradients and AdamW moments.
"""
import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import toukit
from toukit.meter import peak_mib, timed
from toukit.models import call_model
from toukit.step import train_step


def old_forward(self, x):
    """SVFitLinear's forward before this change: x W_res^T + b plus the factored path x V_r diag(s) U_r^T."""
    low = F.linear(F.linear(x, self.svfit_Vh) * self.svfit_s, self.svfit_U)
    return F.linear(x, self.base_weight, self.bias) + low


@contextlib.contextmanager
def old_svfit():
    """SVFitLinear with its old forward inside the block (the class attribute, so every layer of every model)."""
    new = toukit.SVFitLinear.forward
    toukit.SVFitLinear.forward = old_forward
    try:
        yield
    finally:
        toukit.SVFitLinear.forward = new


def saved_for_backward_mib(model, inputs, labels):
    """MiB of the tensors autograd saves in one training forward, by distinct storage, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(call_model(model, inputs).float(), labels)
    del loss
    model.zero_grad(set_to_none=True)
    return sum(seen.values()) / 2 ** 20


def header(args, title):
    dev = f'{platform.processor() or "cpu"}, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s) used'
    print(f'# {title}')
    print(f'# model {args.model}, batch {args.batch_size}, seq {args.seq_len}, SVFit rank {args.rank}, device cpu '
          f'({dev}), precision fp32, torch {torch.__version__}, {time.strftime("%Y-%m-%d %H:%M")}')
    print(f'# command: python benchmarks/svfit_floor.py {" ".join(sys.argv[1:])}')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='minilm', choices=['minilm', 'tiny-bert'])
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--seq-len', type=int, default=64)
    p.add_argument('--rank', default='energy:0.99', type=lambda s: int(s) if s.isdigit() else s,
                   help="SVFit's rank: an int or a rule ('energy:0.99', its default)")
    p.add_argument('--warmup', type=int, default=1, help='interleaved rounds not timed')
    p.add_argument('--rounds', type=int, default=7, help='interleaved rounds timed (one step of each per round)')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--json', default=None, help='also write the results here')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    header(args, f'SVFit training step, old (factored) vs new (formed weight) forward, and FT; median of '
                 f'{args.rounds} interleaved rounds after {args.warmup} warm-up, one process')

    torch.manual_seed(0)
    base = toukit.create_model(args.model, num_classes=5, pretrained=args.model == 'minilm')
    ids = torch.randint(1000, 5000, (args.batch_size, args.seq_len))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    labels = torch.randint(0, 5, (args.batch_size,))
    svfit = toukit.apply_method(copy.deepcopy(base), 'svfit', rank=args.rank)  # every target ('all')
    models = dict(old=svfit, new=copy.deepcopy(svfit), ft=toukit.apply_method(base, 'ft'))
    layers = [m for m in svfit.modules() if isinstance(m, toukit.SVFitLinear)]
    tokens = args.batch_size * args.seq_len
    with torch.enable_grad():
        formed = sum(m._forms_weight(tokens) for m in layers)
    ranks = [m.rank for m in layers]
    print(f'# {len(layers)} SVFit layers, ranks {min(ranks)}-{max(ranks)} (mean {statistics.mean(ranks):.0f}); at '
          f'{tokens} tokens {formed} of them form W in training')

    # the two forwards on the same weights, dropout off: outputs and the singular values' gradients
    svfit.eval()
    results = {}
    for kind in ('old', 'new'):
        with old_svfit() if kind == 'old' else contextlib.nullcontext():
            svfit.zero_grad(set_to_none=True)
            logits = call_model(svfit, inputs)
            F.cross_entropy(logits, labels).backward()
            results[kind] = (logits.detach(), torch.cat([m.svfit_s.grad for m in layers]))
    svfit.zero_grad(set_to_none=True)
    out_diff = float((results['old'][0] - results['new'][0]).abs().max())
    grad_diff = float((results['old'][1] - results['new'][1]).abs().max())
    grad_scale = float(results['old'][1].abs().max())

    memory = {}
    for kind, model in models.items():
        model.train()
        with old_svfit() if kind == 'old' else contextlib.nullcontext():
            memory[kind] = saved_for_backward_mib(model, inputs, labels)
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=5e-5) for k, m in models.items()}
    times = {k: [] for k in models}
    device = torch.device('cpu')
    for round_ in range(args.warmup + args.rounds):
        for kind, model in models.items():
            with old_svfit() if kind == 'old' else contextlib.nullcontext(), timed(device) as t:
                train_step(model, opts[kind], inputs, labels, 'fp32')
            if round_ >= args.warmup:
                times[kind].append(t[0])

    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f'{"forward":8s} {"ms/step":>8s} {"min":>8s} {"max":>8s} {"vs FT":>6s} {"saved MiB":>10s} '
          f'{"train MiB":>10s} {"trainable":>11s} {"total":>11s}')
    train_mib = {}
    for kind, model in models.items():
        trainable, total = toukit.count_parameters(model)
        train_mib[kind] = memory[kind] + 3 * 4 * trainable / 2 ** 20  # + fp32 gradient and AdamW's two moments
        print(f'{kind:8s} {ms[kind]:8.1f} {min(times[kind]) * 1e3:8.1f} {max(times[kind]) * 1e3:8.1f} '
              f'{ms[kind] / ms["ft"]:6.2f} {memory[kind]:10.1f} {train_mib[kind]:10.1f} {trainable:11,d} {total:11,d}')
    paired = {k: statistics.median(a / b for a, b in zip(times[k[0]], times[k[1]]))
              for k in (('new', 'old'), ('old', 'ft'), ('new', 'ft'))}
    print(f'new / old {ms["new"] / ms["old"]:.2f}   old / FT {ms["old"] / ms["ft"]:.2f}   '
          f'new / FT {ms["new"] / ms["ft"]:.2f}   (ratios of medians; medians of the per-round ratios: '
          + ', '.join(f'{a} / {b} {r:.2f}' for (a, b), r in paired.items()) + ')')
    print(f'old vs new, same weights, dropout off: max |logits difference| {out_diff:.2e}, max |svfit_s gradient '
          f'difference| {grad_diff:.2e} (largest gradient {grad_scale:.2e})')
    print(f'process peak RSS {peak_mib(device):.0f} MiB (the three models together); "saved MiB": activations autograd '
          f'keeps for backward in one training forward, parameters excluded; "train MiB": that plus the trainable '
          f'parameters\' gradients and AdamW state (fp32)')
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(
            benchmark='svfit_floor', args=vars(args), ms_per_step=ms, step_s=times, saved_mib=memory,
            train_mib=train_mib, paired_ratios={'/'.join(k): r for k, r in paired.items()},
            layers=len(layers), formed=formed, ranks=ranks, max_logit_diff=out_diff, max_grad_diff=grad_diff),
            indent=1))


if __name__ == '__main__':
    main()
