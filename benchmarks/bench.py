"""Side-by-side benchmarks of every method: each measurement runs in its own process, ratios are taken within
one invocation (these machines are noisy; compare nothing across invocations).

    python benchmarks/bench.py methods   --model vit_base_patch16_224 --batch-size 8
    python benchmarks/bench.py methods   --model minilm --batch-size 32 --seq-len 128
    python benchmarks/bench.py factorize --model vit_base_patch16_224
    python benchmarks/bench.py inference --model vit_base_patch16_224 --batch-size 8
    python benchmarks/bench.py layer     --batch-size 8                 (one block's linears, dense vs TOU)
    python benchmarks/bench.py rank-sweep --model vit_base_patch16_224 --batch-size 8 \
        --figure figures/benchmarks/rank_sweep
    python benchmarks/bench.py factorize-llm --device cuda --precision bf16   (Llama-2-7B shapes, random weights)
    python benchmarks/bench.py scaling   --preset test --batch-size 16  (1 vs 2 processes through torchrun)

Add --device cuda [--precision bf16] on a GPU machine. Random weights are used for timing (shapes decide cost).
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from toukit import method_names
from toukit.models import call_model



# ---------------------------------------------------------------------------------------------------------------
# worker side: one process, one measurement, one JSON line on stdout


def _model_and_batch(args):
    import toukit
    torch.manual_seed(0)
    if args.model in ('minilm', 'tiny-bert'):
        model = toukit.create_model(args.model, num_classes=5, pretrained=args.model == 'minilm')
        ids = torch.randint(1000, 5000, (args.batch_size, args.seq_len))
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
        labels = torch.randint(0, 5, (args.batch_size,))
    else:
        import timm
        model = timm.create_model(args.model, pretrained=False, num_classes=100)
        size = model.pretrained_cfg['input_size']
        inputs = torch.randn(args.batch_size, *size)
        labels = torch.randint(0, 100, (args.batch_size,))
    return model, inputs, labels


def _to(inputs, device):
    return {k: v.to(device) for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.to(device)


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def _peak_mib(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _allocated_mib(device):
    """Memory held now: the CUDA allocator's on a GPU, the process RSS on the CPU."""
    if device.type == 'cuda':
        return torch.cuda.memory_allocated() / 2 ** 20
    from toukit.train import _rss_mib
    return _rss_mib()


def _options(method, rank, lora_rank):
    """TOU at `rank`, LoRA and PiSSA at `lora_rank`, every other option the method's default."""
    if method in ('tou', 'tou_frozen_ffn'):
        return dict(rank=rank)
    if method in ('lora', 'pissa'):
        return dict(rank=lora_rank)
    return {}


def worker_step(args):
    """Time training steps of one method (forward, backward, AdamW step)."""
    import toukit
    device = torch.device(args.device)
    model, inputs, labels = _model_and_batch(args)
    model.to(device)
    inputs, labels = _to(inputs, device), labels.to(device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    rss_before = _peak_mib(device)
    t0 = time.perf_counter()
    toukit.apply_method(model, args.method, **_options(args.method, args.rank, args.lora_rank))
    model.to(device)
    _sync(device)
    prepare_s = time.perf_counter() - t0
    trainable, total = toukit.count_parameters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    model.train()
    net = torch.compile(model) if args.compile else model  # compiled during the warm-up steps
    times = []
    for i in range(args.warmup + args.steps):
        _sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == 'bf16'):
            loss = torch.nn.functional.cross_entropy(call_model(net, inputs).float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    step = statistics.median(times)
    return dict(method=args.method, step_s=step, steps=len(times), samples_per_s=args.batch_size / step,
                peak_mib=_peak_mib(device), start_mib=rss_before, prepare_s=prepare_s, trainable=trainable,
                total=total)


def worker_inference(args):
    """Forward latency (no grad) of the original model, the merged TOU model and the unmerged factorized one."""
    import copy
    import toukit
    device = torch.device(args.device)
    original, inputs, _ = _model_and_batch(args)
    factorized = toukit.apply_tou(copy.deepcopy(original), rank=args.rank, svd_method='gram')
    merged = toukit.merge(copy.deepcopy(factorized))
    models = dict(original=original.to(device).eval(), merged=merged.to(device).eval(),
                  factorized=factorized.to(device).eval())
    inputs = _to(inputs, device)
    times = {k: [] for k in models}
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == 'bf16'):
        for i in range(args.warmup + args.steps):
            for name, model in models.items():  # interleaved, so drift hits all three alike
                _sync(device)
                t = time.perf_counter()
                call_model(model, inputs)
                _sync(device)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def worker_factorize(args):
    """Time apply_tou on the model with one SVD method; error of the kept factors against the exact SVD's."""
    import copy
    import toukit
    from toukit.spectrum import layer_matrices
    torch.set_num_threads(torch.get_num_threads())
    device = torch.device(args.device)
    model, _, _ = _model_and_batch(args)
    model.to(device)
    originals = [w.detach().double().cpu() for _, _, w in layer_matrices(model)]
    factored = copy.deepcopy(model)
    _sync(device)
    t = time.perf_counter()
    toukit.apply_tou(factored, rank=args.rank, noise_scale=0.0, svd_method=args.svd_method)
    _sync(device)
    seconds = time.perf_counter() - t
    # relative error of the factorization vs the optimum (sqrt tail energy) over all matrices
    merged = toukit.merge(factored)
    num = den = opt = 0.0
    for (w0, (_, _, w1)) in zip(originals, layer_matrices(merged)):
        s = torch.linalg.svdvals(w0)
        r = toukit.parse_rank(args.rank).resolve(tuple(w0.shape))
        num += float(torch.linalg.norm(w1.double().cpu() - w0) ** 2)
        opt += float((s[r:] ** 2).sum())
        den += float((s ** 2).sum())
    return dict(svd_method=args.svd_method, seconds=seconds, error=(num / den) ** 0.5, optimal_error=(opt / den) ** 0.5,
                matrices=len(originals))


LLAMA_2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)


def worker_factorize_llm(args):
    """apply_tou on every block linear of a Llama-2-7B-shaped causal LM (random weights from the config, built on
    the device): time, peak memory, and the error of layer 0's factors against the optimum."""
    import toukit
    from transformers import LlamaConfig, LlamaForCausalLM
    device = torch.device(args.device)
    shape = dict(LLAMA_2_7B, num_hidden_layers=args.layers or LLAMA_2_7B['num_hidden_layers'])
    shape.update(hidden_size=shape['hidden_size'] // args.width_div,
                 intermediate_size=shape['intermediate_size'] // args.width_div)
    dtype = torch.bfloat16 if args.precision == 'bf16' else torch.float32
    torch.manual_seed(0)
    t = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(LlamaConfig(**shape))
    finally:
        torch.set_default_dtype(default)
    _sync(device)
    build_s = time.perf_counter() - t
    params = sum(p.numel() for p in model.parameters())
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    before = _allocated_mib(device)  # the model alone
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and '.layers.0.' in n}
    t = time.perf_counter()
    toukit.apply_tou(model, rank=args.rank, svd_method=args.svd_method, chunk=getattr(args, 'chunk', None))
    _sync(device)
    seconds = time.perf_counter() - t
    peak, after = _peak_mib(device), _allocated_mib(device)
    trainable, total = toukit.count_parameters(model)
    ranks = sorted(set(model.toukit_ranks.values()))
    errors = []  # layer 0's matrices: relative error of A B (noise included) against the optimal rank-r error
    for name, w0 in originals.items():
        module = model.get_submodule(name)
        s = torch.linalg.svdvals(w0.float())
        error = torch.linalg.norm(module.effective_weight().float() - w0.float()) / torch.linalg.norm(s)
        errors.append(dict(layer=name, rank=module.rank, optimal_error=float(torch.linalg.norm(s[module.rank:]) /
                                                                             torch.linalg.norm(s)),
                           error=float(error)))
    t = time.perf_counter()
    toukit.merge(model)
    _sync(device)
    merge_s = time.perf_counter() - t
    return dict(svd_method=args.svd_method, config=shape, params=params, weights_dtype=str(dtype), build_s=build_s,
                seconds=seconds, merge_s=merge_s, model_mib=before, peak_mib=peak, after_mib=after,
                trainable=trainable, total=total, ranks=ranks, layer0=errors)


def worker_layer(args):
    """Forward + backward of each ViT-B/16 block linear, dense (weight trains) vs TOU (A frozen), interleaved."""
    import toukit
    from torch import nn
    torch.manual_seed(0)
    tokens = args.batch_size * 197
    d = 768
    shapes = dict(qkv=(3 * d, d, 3), proj=(d, d, 1), fc1=(4 * d, d, 1), fc2=(d, 4 * d, 1))
    out = {}
    for name, (o, i, splits) in shapes.items():
        dense = nn.Linear(i, o)
        r = toukit.parse_rank(args.rank).resolve((o // splits, i))
        fact = toukit.FactorizedLinear.from_linear(dense, r, splits=splits, svd_method='gram')
        x = torch.randn(tokens, i, requires_grad=True)
        times = dict(dense=[], tou=[])
        for k in range(args.warmup + args.steps):
            for kind, layer in (('dense', dense), ('tou', fact)):
                t = time.perf_counter()
                layer(x).sum().backward()
                if k >= args.warmup:
                    times[kind].append(time.perf_counter() - t)
                layer.zero_grad(set_to_none=True)
                x.grad = None
        dense_flops = 3 * o * i  # forward, grad of x, grad of W (per token)
        tou_flops = splits * r * (o // splits) * 2 + splits * r * i * 3  # y and dh from A; h, dx, dB from B
        out[name] = dict(dense_ms=statistics.median(times['dense']) * 1e3, tou_ms=statistics.median(times['tou']) * 1e3,
                         rank=r, flop_ratio=tou_flops / dense_flops)
    return out


WORKERS = dict(layer=worker_layer, step=worker_step, inference=worker_inference, factorize=worker_factorize,
               factorize_llm=worker_factorize_llm)


# ---------------------------------------------------------------------------------------------------------------
# driver side


def spawn(kind, args, **overrides):
    """Run one worker in a fresh process; returns its JSON result."""
    cfg = dict(vars(args), **overrides, worker=kind)
    cfg.pop('func', None)
    out = subprocess.run([sys.executable, __file__, '_worker', json.dumps(cfg)], capture_output=True, text=True,
                         env=dict(os.environ, TQDM_DISABLE='1'))
    if out.returncode != 0:
        raise RuntimeError(f'worker {kind} {overrides} failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def header(args, title):
    dev = torch.cuda.get_device_name(0) if args.device == 'cuda' else f'{platform.processor() or "cpu"}, ' \
                                                                        f'{os.cpu_count()} cores'
    print(f'# {title}')
    print(f'# model {args.model}, batch {args.batch_size}' + (f', seq {args.seq_len}' if args.model in (
        'minilm', 'tiny-bert') else '') + f', device {args.device} ({dev}), precision {args.precision}, '
          f'torch {torch.__version__}, {time.strftime("%Y-%m-%d %H:%M")}')
    print(f'# command: python benchmarks/bench.py {" ".join(sys.argv[1:])}')


def cmd_methods(args):
    header(args, f'training step per method (median of {args.steps} steps after {args.warmup} warm-up, '
                 f'best of {args.rounds} round(s), each method in its own process)')
    rows, failed = {}, {}
    print(f'{"method":16s} {"step s":>8s} {"samples/s":>10s} {"vs FT":>6s} {"peak MiB":>9s} {"vs FT":>6s} '
          f'{"trainable":>11s} {"total":>11s} {"prepare s":>9s}')
    for round_ in range(args.rounds):
        for m in args.methods:
            try:
                r = spawn('step', args, method=m)
            except RuntimeError as e:  # one method's failure leaves the others' rows
                if m not in rows:
                    failed[m] = str(e).strip().splitlines()[-1]
            else:
                failed.pop(m, None)
                if m not in rows or r['step_s'] < rows[m]['step_s']:
                    rows[m] = r
            if round_ == args.rounds - 1 and m in rows:  # a row as soon as it is final (list FT first for ratios)
                r, ft = rows[m], rows.get('ft')
                t_ratio = r['step_s'] / ft['step_s'] if ft else float('nan')
                m_ratio = r['peak_mib'] / ft['peak_mib'] if ft else float('nan')
                print(f'{m:16s} {r["step_s"]:8.3f} {r["samples_per_s"]:10.2f} {t_ratio:6.2f} {r["peak_mib"]:9.0f} '
                      f'{m_ratio:6.2f} {r["trainable"]:11,d} {r["total"]:11,d} {r["prepare_s"]:9.2f}', flush=True)
                _save(args, 'methods', rows)
    for m, why in failed.items():
        print(f'{m:16s} failed: {why}')
    _save(args, 'methods', dict(rows, **{m: dict(failed=why) for m, why in failed.items()}))


def cmd_inference(args):
    header(args, f'inference latency, no grad (median of {args.steps} interleaved forwards)')
    r = spawn('inference', args)
    for k in ('original', 'merged', 'factorized'):
        print(f'{k:12s} {r[k] * 1000:9.1f} ms   vs original {r[k] / r["original"]:.3f}')
    _save(args, 'inference', r)


def cmd_layer(args):
    header(args, f'one block linear, forward + backward on {args.batch_size} x 197 tokens (median of {args.steps})')
    rows = spawn('layer', args)
    print(f'{"layer":6s} {"rank":>5s} {"dense ms":>9s} {"TOU ms":>8s} {"time ratio":>10s} {"FLOP ratio":>10s}')
    for name, r in rows.items():
        print(f'{name:6s} {r["rank"]:5d} {r["dense_ms"]:9.1f} {r["tou_ms"]:8.1f} {r["tou_ms"] / r["dense_ms"]:10.2f} '
              f'{r["flop_ratio"]:10.2f}')
    dense, tou = sum(r['dense_ms'] for r in rows.values()), sum(r['tou_ms'] for r in rows.values())
    print(f'block total: {tou / dense:.2f} of dense time')
    _save(args, 'layer', rows)


def cmd_factorize(args):
    header(args, f'factorizing every block linear (apply_tou, rank {args.rank}), each SVD method in its own process')
    rows = {m: spawn('factorize', args, svd_method=m) for m in args.svd_methods}
    base = rows.get('exact')
    print(f'{"svd method":12s} {"seconds":>8s} {"vs exact":>8s} {"rel. error":>11s} {"optimum":>10s}')
    for m, r in rows.items():
        print(f'{m:12s} {r["seconds"]:8.2f} {r["seconds"] / base["seconds"] if base else float("nan"):8.2f} '
              f'{r["error"]:11.6f} {r["optimal_error"]:10.6f}   ({r["matrices"]} matrices)')
    _save(args, 'factorize', rows)


def cmd_factorize_llm(args):
    args.model = 'llama-2-7b'
    scale = '' if (args.layers in (None, 32) and args.width_div == 1) else \
        f' (scaled down: {args.layers or 32} layers, widths / {args.width_div})'
    header(args, f'factorizing every block linear of a Llama-2-7B-shaped model{scale}, random weights in '
                 f'{args.precision}, apply_tou rank {args.rank}; each SVD method in its own process')
    rows = {}
    for m in args.svd_methods:
        try:
            rows[m] = spawn('factorize_llm', args, svd_method=m)
        except RuntimeError as e:  # one method's failure (out of memory, say) leaves the others' rows
            print(f'{m}: failed: {str(e).strip().splitlines()[-1]}')
    if not rows:
        raise SystemExit('factorize-llm: every SVD method failed')
    first = next(iter(rows.values()))
    print(f'# {first["params"]:,d} parameters; TOU: {first["trainable"]:,d} trainable of {first["total"]:,d}; '
          f'ranks {first["ranks"]}')
    print(f'{"svd method":12s} {"build s":>8s} {"factorize s":>11s} {"merge s":>8s} {"model MiB":>10s} '
          f'{"peak MiB":>9s} {"peak/model":>10s} {"after MiB":>10s} {"layer-0 err / optimum":>22s}')
    for m, r in rows.items():
        worst = max(e['error'] / e['optimal_error'] for e in r['layer0'])
        print(f'{m:12s} {r["build_s"]:8.1f} {r["seconds"]:11.1f} {r["merge_s"]:8.1f} {r["model_mib"]:10.0f} '
              f'{r["peak_mib"]:9.0f} {r["peak_mib"] / r["model_mib"]:10.2f} {r["after_mib"]:10.0f} {worst:22.4f}')
    _save(args, 'factorize_llm', rows)


def cmd_rank_sweep(args):
    header(args, 'TOU training step vs rank (each point its own process), FT as the reference')
    ft = spawn('step', args, method='ft')
    points = []
    for r in args.ranks:
        res = spawn('step', args, method='tou', rank=r)
        points.append(dict(rank=r, step_s=res['step_s'], ratio=res['step_s'] / ft['step_s'], trainable=res['trainable'],
                           total=res['total']))
        print(f'rank {r:5d}  step {res["step_s"]:7.3f}s  vs FT {points[-1]["ratio"]:5.2f}  trainable '
              f'{res["trainable"]:>12,d}  total {res["total"]:>12,d}')
    print(f'FT         step {ft["step_s"]:7.3f}s  trainable {ft["trainable"]:>12,d}')
    cheaper = [p['rank'] for p in points if p['ratio'] < 1]
    above = [p['rank'] for p in points if p['ratio'] >= 1]
    if above:
        print(f'break-even: TOU stops being cheaper than FT between rank {max(cheaper, default=0)} and {min(above)}')
    else:
        print(f'break-even: TOU is cheaper than FT at every rank measured (up to {max(args.ranks)})')
    _save(args, 'rank_sweep', dict(ft=ft, points=points))
    if args.figure:
        _rank_sweep_figure(points, ft, args)


def _rank_sweep_figure(points, ft, args):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from toukit.plots import save_figure
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ranks = [p['rank'] for p in points]
    ax.plot(ranks, [p['ratio'] for p in points], marker='o', label='TOU step time / FT step time')
    ax.plot(ranks, [p['trainable'] / ft['trainable'] for p in points], marker='s',
            label='TOU trainable / FT trainable parameters')
    ax.axhline(1.0, color='grey', ls=':')
    ax.set(xlabel='TOU rank', ylabel='ratio to full fine-tuning',
           title=f'{args.model}, batch {args.batch_size}, {args.device}')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, args.figure)


def cmd_scaling(args):
    """The training loop on 1 and on N processes (torchrun; gloo on the CPU, NCCL on GPUs) at one global batch."""
    import tempfile
    from toukit.train import PRESETS
    args.model = args.preset_model or PRESETS[args.preset]['model']
    header(args, f'toukit train on 1 and {args.processes} processes, global batch {args.batch_size}, '
                 f'{args.train_steps} steps of {args.method} on preset {args.preset}')
    rows = {}
    for n in (1, args.processes):
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={n}', '-m', 'toukit.cli', 'train',
                   '--method', args.method, '--preset', args.preset, '--epochs', '1', '--batch-size',
                   str(args.batch_size), '--max-steps-per-epoch', str(args.train_steps), '--device', args.device,
                   '--precision', args.precision, '--results-dir', out, '--quiet']
            if args.preset_model:
                cmd += ['--model', args.preset_model]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(done.stderr[-2000:])
            [record] = [json.loads(p.read_text()) for p in Path(out).glob('*.json')]
        step = record['cost']['train_seconds'] / len(record['metrics']['steps'])
        rows[n] = dict(processes=n, step_s=step, samples_per_s=args.batch_size / step,
                       threads_per_process=record['env']['device'])
    print(f'{"processes":>10} {"step (s)":>10} {"samples/s":>10} {"vs 1":>6}')
    for n, r in rows.items():
        print(f'{n:>10} {r["step_s"]:>10.4f} {r["samples_per_s"]:>10.1f} {rows[1]["step_s"] / r["step_s"]:>6.2f}')
    _save(args, 'scaling', rows)


def _save(args, name, data):
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(benchmark=name, args={k: v for k, v in vars(args).items()
                                                                          if k != 'func'}, results=data), indent=1))


def main(argv=None):
    if len(sys.argv) > 2 and sys.argv[1] == '_worker':
        cfg = argparse.Namespace(**json.loads(sys.argv[2]))
        print(json.dumps(WORKERS[cfg.worker](cfg)))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--model', default='vit_base_patch16_224')
    common.add_argument('--batch-size', type=int, default=8)
    common.add_argument('--seq-len', type=int, default=128)
    common.add_argument('--device', default='cpu')
    common.add_argument('--precision', default='fp32', choices=['fp32', 'bf16'])
    common.add_argument('--rank', default=0.375, type=lambda s: float(s) if '.' in s else int(s),
                        help="TOU rank: an int or a fraction (0.375 = the paper's 288 of 768)")
    common.add_argument('--lora-rank', type=int, default=8)
    common.add_argument('--warmup', type=int, default=2)
    common.add_argument('--steps', type=int, default=5)
    common.add_argument('--json', default=None, help='also write the results here')
    common.add_argument('--compile', action='store_true', help='torch.compile the prepared model (methods: compiled '
                                                               'in the warm-up steps; pass --warmup 3 or more)')
    m = sub.add_parser('methods', parents=[common])
    m.add_argument('--methods', nargs='+', default=method_names())
    m.add_argument('--rounds', type=int, default=1)
    m.set_defaults(func=cmd_methods)
    sub.add_parser('inference', parents=[common]).set_defaults(func=cmd_inference)
    sub.add_parser('layer', parents=[common]).set_defaults(func=cmd_layer)
    f = sub.add_parser('factorize', parents=[common])
    f.add_argument('--svd-methods', nargs='+', default=['exact', 'gram', 'randomized'])
    f.set_defaults(func=cmd_factorize)
    ll = sub.add_parser('factorize-llm', parents=[common], help='apply_tou on a Llama-2-7B-shaped model')
    ll.add_argument('--svd-methods', nargs='+', default=['gram', 'randomized'])
    ll.add_argument('--layers', type=int, default=None, help='fewer blocks than 32 (a smoke test)')
    ll.add_argument('--width-div', type=int, default=1, help='divide hidden and MLP widths (a smoke test)')
    ll.add_argument('--chunk', type=int, default=None, help='factorize at most this many same-shape matrices at once')
    ll.set_defaults(func=cmd_factorize_llm)
    r = sub.add_parser('rank-sweep', parents=[common])
    r.add_argument('--ranks', nargs='+', type=int, default=[32, 96, 192, 288, 384, 480, 576, 768])
    r.add_argument('--figure', default=None, help='write the figure here (png and pdf)')
    r.set_defaults(func=cmd_rank_sweep)
    c = sub.add_parser('scaling', parents=[common], help='step time and samples/s on 1 and N processes')
    c.add_argument('--processes', type=int, default=2)
    c.add_argument('--method', default='tou')
    c.add_argument('--preset', default='test')
    c.add_argument('--preset-model', default=None, help="a model other than the preset's")
    c.add_argument('--train-steps', type=int, default=10)
    c.set_defaults(func=cmd_scaling)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == '__main__':
    main()
