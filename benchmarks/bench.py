"""Side-by-side benchmarks of every method: each measurement runs in its own process, ratios are taken within
one invocation (these machines are noisy; compare nothing across invocations).

    python benchmarks/bench.py methods   --model vit_base_patch16_224 --batch-size 8
    python benchmarks/bench.py methods   --model minilm --batch-size 32 --seq-len 128
    python benchmarks/bench.py factorize --model vit_base_patch16_224
    python benchmarks/bench.py inference --model vit_base_patch16_224 --batch-size 8
    python benchmarks/bench.py profile   --batch-size 8 --precision bf16 --steps 2   (where a step's time goes)
    python benchmarks/bench.py layer     --batch-size 8                 (one block's linears, dense vs TOU)
    python benchmarks/bench.py rank-sweep --model vit_base_patch16_224 --batch-size 8 \
        --figure figures/benchmarks/rank_sweep
    python benchmarks/bench.py factorize-llm --device cuda --precision bf16   (Llama-2-7B shapes, random weights)
    python benchmarks/bench.py scaling   --preset test --batch-size 16  (1 vs 2 processes through torchrun)
    python benchmarks/bench.py regression --before ../old-checkout     (TOU/FT step ratio and factorize time)

Add --device cuda [--precision bf16] on a GPU machine. Random weights are used for timing (shapes decide cost).
"""
import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import toukit
from toukit import method_names
from toukit.config import PRESETS
from toukit.meter import allocated_mib, peak_mib, peak_since_reset_mib, reset_peak, synchronize, timed
from toukit.models import call_model
from toukit.step import autocast, to_device, train_step



# ---------------------------------------------------------------------------------------------------------------
# worker side: one process, one measurement, one JSON line on stdout


def _model_and_batch(args):
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


def _options(method, rank, lora_rank):
    """TOU at `rank`, LoRA and PiSSA at `lora_rank`, every other option the method's default."""
    if method in ('tou', 'tou_frozen_ffn'):
        return dict(rank=rank)
    if method in ('lora', 'pissa'):
        return dict(rank=lora_rank)
    return {}


def _prepared(args):
    """The model with `args.method` applied, its AdamW, and one batch, on the device; then the prepare time."""
    device = torch.device(args.device)
    model, inputs, labels = _model_and_batch(args)
    model.to(device)
    inputs, labels = to_device((inputs, labels), device)
    if device.type == 'cuda':
        reset_peak(device)
    with timed(device) as prepare_s:
        toukit.apply_method(model, args.method, **_options(args.method, args.rank, args.lora_rank))
        model.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    model.train()
    return model, opt, inputs, labels, prepare_s[0]


def worker_step(args):
    """Time training steps of one method (forward, backward, AdamW step)."""
    device = torch.device(args.device)
    rss_before = peak_mib(device)
    model, opt, inputs, labels, prepare_s = _prepared(args)
    trainable, total = toukit.count_parameters(model)
    net = torch.compile(model) if args.compile else model  # compiled during the warm-up steps
    times = []
    for i in range(args.warmup + args.steps):
        with timed(device) as t:
            train_step(net, opt, inputs, labels, args.precision)
        if i >= args.warmup:
            times.append(t[0])
    step = statistics.median(times)
    return dict(method=args.method, step_s=step, steps=len(times), samples_per_s=args.batch_size / step,
                peak_mib=peak_mib(device), start_mib=rss_before, prepare_s=prepare_s, trainable=trainable,
                total=total)


# operator -> category of the profile tables (aten names; anything else is 'other')
OP_CATEGORIES = {
    'matmul': ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm', 'aten::linear', 'aten::matmul',
               'aten::_convolution', 'aten::convolution', 'aten::mkldnn_convolution', 'aten::cudnn_convolution',
               'aten::convolution_backward'),
    'attention (sdpa)': ('aten::_scaled_dot_product_flash_attention_for_cpu',
               'aten::_scaled_dot_product_flash_attention_for_cpu_backward',
               'aten::_scaled_dot_product_efficient_attention', 'aten::_efficient_attention_backward',
               'aten::_scaled_dot_product_flash_attention', 'aten::_flash_attention_backward',
               'aten::_scaled_dot_product_cudnn_attention', 'aten::_cudnn_attention_backward'),
    'copy / cast': ('aten::copy_', 'aten::_to_copy', 'aten::clone', 'aten::contiguous', 'aten::to',
                    'aten::_reshape_alias', 'aten::cat', 'aten::stack'),
    'optimizer': ('aten::_foreach_', 'aten::_fused_adamw_', 'Optimizer.step', 'aten::addcdiv_', 'aten::addcmul_',
                  'aten::lerp_', 'aten::sqrt', 'aten::_foreach_sqrt'),
    'reduction (grad sums)': ('aten::sum',),
    'norm': ('aten::native_layer_norm', 'aten::native_layer_norm_backward', 'aten::layer_norm'),
    'activation': ('aten::gelu', 'aten::gelu_backward'),
    'zero / fill': ('aten::zero_', 'aten::fill_', 'aten::zeros', 'aten::empty', 'aten::empty_strided'),
}


# a GPU profile's self time is in its kernels, named by the libraries: matched by substring (lower case)
KERNEL_CATEGORIES = {
    'attention (sdpa)': ('fmha', 'flash', 'attention'),
    'matmul': ('gemm', 'cutlass', 'xmma', 'cublas', 'matmul', 'conv', 'implicit'),
    'copy / cast': ('copy', 'cast', 'convert', 'memcpy', 'transpose', 'cat', 'stack'),
    'optimizer': ('adam', 'foreach', 'multi_tensor'),
    'reduction (grad sums)': ('reduce',),
    'norm': ('layer_norm', 'layernorm'),
    'activation': ('gelu',),
    'zero / fill': ('fill', 'memset'),
}


def _category(op, kernel=False):
    if kernel:
        for cat, parts in KERNEL_CATEGORIES.items():
            if any(p in op.lower() for p in parts):
                return cat
        return 'other'
    for cat, names in OP_CATEGORIES.items():
        if any(op == n or (n.endswith('_') and op.startswith(n)) for n in names):
            return cat
    return 'other'


MATMULS = ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm')
# an H200 SXM's dense peaks (NVIDIA's data sheet): bf16 tensor cores, fp32 without TF32, HBM3e bandwidth
H200 = dict(bf16_flops=989e12, fp32_flops=67e12, bytes_per_s=4.8e12)


def worker_profile(args):
    """torch.profiler over `args.steps` training steps of one method after warm-up: self time by operator (CPU
    time on the CPU, device time on a GPU), the number of operator calls, and the FLOPs the profiler counts for
    matrix products (mm, addmm, bmm, baddbmm: forward and backward)."""
    from torch.profiler import ProfilerActivity, profile
    device = torch.device(args.device)
    model, opt, inputs, labels, _ = _prepared(args)
    for _ in range(args.warmup):
        train_step(model, opt, inputs, labels, args.precision)
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with profile(activities=activities, with_flops=True, record_shapes=True) as prof:
        for _ in range(args.steps):
            train_step(model, opt, inputs, labels, args.precision)
        synchronize(device)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps
    walls = []  # the same steps unprofiled: against the profiled time, how busy the device (or core) was
    for _ in range(args.steps):
        with timed(device) as t:
            train_step(model, opt, inputs, labels, args.precision)
        walls.append(t[0])
    gemms = dict(flops=0.0, bytes=0.0, calls=0, roofline_s=0.0, memory_bound_s=0.0, by_shape={})
    size = 2 if args.precision == 'bf16' else 4  # bytes per element of the matrix products' operands
    peak = H200['bf16_flops' if args.precision == 'bf16' else 'fp32_flops']
    for e in prof.events():  # the matrix products' FLOPs and the bytes they must move at least: a roofline
        if e.name not in MATMULS or not e.input_shapes or any(c.name in MATMULS for c in e.cpu_children):
            continue  # the innermost product only: autocast's wrapper and baddbmm's own bmm record it twice
        shapes = [tuple(x) for x in e.input_shapes if isinstance(x, (list, tuple)) and len(x) >= 2]
        left, right = shapes[-2:]
        out = (*left[:-1], right[-1])
        moved = size * sum(math.prod(x) for x in (left, right, out))
        flops = 2 * math.prod(out) * left[-1]
        gemms['flops'] += flops / args.steps
        gemms['bytes'] += moved / args.steps
        gemms['calls'] += 1 / args.steps
        compute_s, memory_s = flops / peak, moved / H200['bytes_per_s']
        gemms['roofline_s'] += max(compute_s, memory_s) / args.steps
        gemms['memory_bound_s'] += (memory_s if memory_s > compute_s else 0.0) / args.steps
        key = f'{e.name} {left}x{right}'
        gemms['by_shape'][key] = gemms['by_shape'].get(key, 0) + 1 / args.steps
    ops = {}  # name -> self time (CPU on the CPU; on a GPU only kernels carry time), calls, FLOPs, kernel or not
    for e in prof.key_averages():
        kernel = device.type == 'cuda' and str(e.device_type).endswith('CUDA')
        if device.type == 'cuda':
            # an operator's self device time is its kernels' (counted on the kernels themselves): time from kernels
            own = getattr(e, 'self_device_time_total', None)
            own = (e.self_cuda_time_total if own is None else own) if kernel else 0.0
            if getattr(e, 'is_user_annotation', False):
                continue
        else:
            own = e.self_cpu_time_total
        if own <= 0 and not e.flops and e.count == 0:
            continue
        ops[e.key] = dict(self_ms=own / 1e3 / args.steps, calls=e.count / args.steps, flops=(e.flops or 0) / args.steps,
                          kernel=kernel)
    gemms['memory_bound_share'] = gemms.pop('memory_bound_s') / max(gemms['roofline_s'], 1e-12)
    return dict(method=args.method, ops=ops, step_ms=sum(o['self_ms'] for o in ops.values()), gemms=gemms,
                page_faults=faults, wall_ms=statistics.median(walls) * 1e3)


def worker_inference(args):
    """Forward latency (no grad) of the original model, the merged TOU model and the unmerged factorized one."""
    import copy
    device = torch.device(args.device)
    original, inputs, labels = _model_and_batch(args)
    factorized = toukit.apply_tou(copy.deepcopy(original), rank=args.rank, svd_method='gram')
    merged = toukit.merge(copy.deepcopy(factorized))
    models = dict(original=original.to(device).eval(), merged=merged.to(device).eval(),
                  factorized=factorized.to(device).eval())
    inputs, _ = to_device((inputs, labels), device)
    times = {k: [] for k in models}
    with torch.no_grad(), autocast(device, args.precision):
        for i in range(args.warmup + args.steps):
            for name, model in models.items():  # interleaved, so drift hits all three alike
                with timed(device) as t:
                    call_model(model, inputs)
                if i >= args.warmup:
                    times[name].append(t[0])
    return {k: statistics.median(v) for k, v in times.items()}


def worker_factorize(args):
    """Time apply_tou on the model with one SVD method; error of the kept factors against the exact SVD's."""
    import copy
    from toukit.targets import layer_matrices
    torch.set_num_threads(torch.get_num_threads())
    device = torch.device(args.device)
    model, _, _ = _model_and_batch(args)
    model.to(device)
    originals = [w.detach().double().cpu() for _, _, w in layer_matrices(model)]
    factored = copy.deepcopy(model)
    with timed(device) as t:
        toukit.apply_tou(factored, rank=args.rank, noise_scale=0.0, svd_method=args.svd_method)
    seconds = t[0]
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


LLAMA_SHAPES = {  # configs of public checkpoints (shapes only: the weights are random)
    'llama-2-7b': dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    # TinyLlama-1.1B: Llama-2's architecture at 1.1B parameters, grouped-query attention (k, v are 256 x 2048)
    'llama-1.1b': dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5),
}


def worker_factorize_llm(args):
    """apply_tou on every block linear of a Llama-shaped causal LM (random weights from the config, built on
    the device): time, peak memory over the weights' size, and the error of layer 0's factors against the optimum.
    On the CPU memory is resident set size, so the runtime's own (measured before the model exists) is subtracted."""
    from transformers import LlamaConfig, LlamaForCausalLM
    device = torch.device(args.device)
    base = LLAMA_SHAPES[args.shape]
    shape = dict(base, num_hidden_layers=args.layers or base['num_hidden_layers'])
    shape.update(hidden_size=shape['hidden_size'] // args.width_div,
                 intermediate_size=shape['intermediate_size'] // args.width_div)
    dtype = torch.bfloat16 if args.precision == 'bf16' else torch.float32
    torch.manual_seed(0)
    runtime = 0.0 if device.type == 'cuda' else allocated_mib(device)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with timed(device) as t, device:
            model = LlamaForCausalLM(LlamaConfig(**shape))
    finally:
        torch.set_default_dtype(default)
    build_s = t[0]
    params = sum(p.numel() for p in model.parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
    before = allocated_mib(device) - runtime  # the model alone
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules()  # counted in the peak: keep few
                 if n.endswith(('layers.0.self_attn.q_proj', 'layers.0.mlp.down_proj'))}
    copies = sum(w.numel() * w.element_size() for w in originals.values()) / 2 ** 20
    reset_peak(device)
    with timed(device) as t:
        toukit.apply_tou(model, rank=args.rank, svd_method=args.svd_method, chunk=getattr(args, 'chunk', None))
    seconds = t[0]
    peak, after = peak_since_reset_mib(device) - runtime, allocated_mib(device) - runtime
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
    with timed(device) as t:
        toukit.merge(model)
    merge_s = t[0]
    return dict(svd_method=args.svd_method, config=shape, params=params, weights_dtype=str(dtype), build_s=build_s,
                seconds=seconds, merge_s=merge_s, weights_mib=weights, runtime_mib=runtime, copies_mib=copies,
                model_mib=before,
                peak_mib=peak, after_mib=after, threads=torch.get_num_threads(),
                trainable=trainable, total=total, ranks=ranks, layer0=errors)


def worker_layer(args):
    """Forward + backward of each ViT-B/16 block linear, dense (weight trains) vs TOU (A frozen), interleaved."""
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


WORKERS = dict(layer=worker_layer, step=worker_step, profile=worker_profile, inference=worker_inference,
               factorize=worker_factorize,
               factorize_llm=worker_factorize_llm)


# ---------------------------------------------------------------------------------------------------------------
# driver side


def spawn(kind, args, source=None, **overrides):
    """Run one worker in a fresh process (importing toukit from `source`, a checkout's root, when given); returns
    its JSON result."""
    cfg = dict(vars(args), **overrides, worker=kind)
    cfg.pop('func', None)
    env = dict(os.environ, TQDM_DISABLE='1')
    if source:
        env['PYTHONPATH'] = os.pathsep.join([str(source)] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    out = subprocess.run([sys.executable, __file__, '_worker', json.dumps(cfg)], capture_output=True, text=True,
                         env=env)
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
    modes = [False, True] if args.eager_and_compiled else [bool(args.compile)]
    header(args, f'training step per method (median of {args.steps} steps after {args.warmup} warm-up, '
                 f'best of {args.rounds} round(s), each method{" and mode" if len(modes) > 1 else ""} in its own '
                 f'process)')
    runs = [(m, c) for m in args.methods for c in modes]
    key = {run: run[0] + (' compiled' if run[1] and len(modes) > 1 else '') for run in runs}
    rows, failed = {}, {}
    w = max(16, *(len(k) for k in key.values()))
    print(f'{"method":{w}s} {"step s":>8s} {"samples/s":>10s} {"vs FT":>6s} {"peak MiB":>9s} {"vs FT":>6s} '
          f'{"trainable":>11s} {"total":>11s} {"prepare s":>9s}')
    for round_ in range(args.rounds):
        for run in runs:
            k = key[run]
            try:
                r = spawn('step', args, method=run[0], compile=run[1])
            except RuntimeError as e:  # one method's failure leaves the others' rows
                if k not in rows:
                    failed[k] = str(e).strip().splitlines()[-1]
            else:
                failed.pop(k, None)
                if k not in rows or r['step_s'] < rows[k]['step_s']:
                    rows[k] = dict(r, compiled=run[1])
            if round_ == args.rounds - 1 and k in rows:  # a row as soon as it is final (list FT first for ratios)
                r, ft = rows[k], rows.get('ft')
                t_ratio = r['step_s'] / ft['step_s'] if ft else float('nan')
                m_ratio = r['peak_mib'] / ft['peak_mib'] if ft else float('nan')
                print(f'{k:{w}s} {r["step_s"]:8.3f} {r["samples_per_s"]:10.2f} {t_ratio:6.2f} {r["peak_mib"]:9.0f} '
                      f'{m_ratio:6.2f} {r["trainable"]:11,d} {r["total"]:11,d} {r["prepare_s"]:9.2f}', flush=True)
                _save(args, 'methods', rows)
    for k, why in failed.items():
        print(f'{k:{w}s} failed: {why}')
    if len(modes) > 1 and 'ft' in rows:
        best = {m: min((r for k, r in rows.items() if k.split()[0] == m), key=lambda r: r['step_s'])
                for m in args.methods if any(k.split()[0] == m for k in rows)}
        print('each method at the faster of eager and compiled, against FT at its faster:')
        for m, r in best.items():
            print(f'{m:16s} {"compiled" if r["compiled"] else "eager":>8s} {r["step_s"]:8.3f} s '
                  f'{r["step_s"] / best["ft"]["step_s"]:6.2f} x FT')
    _save(args, 'methods', dict(rows, **{k: dict(failed=why) for k, why in failed.items()}))


def cmd_profile(args):
    header(args, f'profile of {args.steps} training step(s) per method after {args.warmup} warm-up (torch.profiler; '
                 f'self time per operator, {"device" if args.device == "cuda" else "CPU"} time; each method in its '
                 f'own process)')
    rows = {m: spawn('profile', args, method=m) for m in args.methods}
    names = list(rows)
    cats = list(OP_CATEGORIES) + ['other']
    by_cat = {m: {c: dict(ms=0.0, calls=0.0, flops=0.0) for c in cats} for m in names}
    for m, r in rows.items():
        for op, o in r['ops'].items():
            c = by_cat[m][_category(op, o.get('kernel', False))]
            c['ms'] += o['self_ms']
            c['calls'] += 0 if o.get('kernel') else o['calls']  # operators dispatched on the host
            c['flops'] += o['flops']
    print(f'per step, by category: milliseconds of {"kernel time" if args.device == "cuda" else "operator self time"}'
          f' (share of the profiled step) and operator calls')
    print(f'{"category":22s}' + ''.join(f'{m + " ms":>{max(16, len(m) + 4)}s}{"calls":>7s}' for m in names)
          + (f'{"ratio":>7s}' if len(names) == 2 else ''))
    for c in cats + ['total']:
        vals = [(sum(v['ms'] for v in by_cat[m].values()), sum(v['calls'] for v in by_cat[m].values()))
                if c == 'total' else (by_cat[m][c]['ms'], by_cat[m][c]['calls']) for m in names]
        line = f'{c:22s}' + ''.join(f'{ms:{max(16, len(m) + 4) - 7}.1f} ({ms / rows[m]["step_ms"]:4.0%}){calls:7.0f}'
                                    for (ms, calls), m in zip(vals, names))
        if len(names) == 2:
            line += f'{vals[1][0] / vals[0][0] if vals[0][0] else float("nan"):7.2f}'
        print(line)
    print('wall time per step, unprofiled (median), and the share of it the profiled time above covers '
          f'({"the GPU busy" if args.device == "cuda" else "the core in operators"}): ' + ', '.join(
              f'{m} {rows[m]["wall_ms"]:,.1f} ms ({rows[m]["step_ms"] / rows[m]["wall_ms"]:.0%})' for m in names))
    if args.device == 'cuda':
        print('kernel launches per step: ' + ', '.join(
            f'{m} {sum(o["calls"] for o in rows[m]["ops"].values() if o.get("kernel")):,.0f}' for m in names))
    print('minor page faults per step (memory the allocator takes afresh from the OS, zeroed by the kernel on '
          'first touch): ' + ', '.join(f'{m} {rows[m]["page_faults"]:,.0f}' for m in names))
    print('matrix products (mm, addmm, bmm, baddbmm): GFLOP per step (from their shapes), their self time and rate')
    for m in names:
        gflop = rows[m]['gemms']['flops'] / 1e9
        ms = sum(o['self_ms'] for op, o in rows[m]['ops'].items() if op in MATMULS)
        print(f'{m:16s} {gflop:9.2f} GFLOP {ms:9.1f} ms {gflop / max(ms / 1e3, 1e-9):9.1f} GFLOP/s')
    peak = H200['bf16_flops' if args.precision == 'bf16' else 'fp32_flops']
    print(f'the same matrix products on an H200 by the roofline (each at the slower of {peak / 1e12:.0f} TFLOP/s and '
          f'{H200["bytes_per_s"] / 1e12:.1f} TB/s for its operands and output; attention, elementwise and launch '
          f'costs not included)')
    print(f'{"method":16s} {"products":>9s} {"GFLOP":>8s} {"GB moved":>9s} {"FLOP/byte":>10s} {"roofline ms":>12s} '
          f'{"memory-bound":>13s}')
    for m in names:
        g = rows[m]['gemms']
        print(f'{m:16s} {g["calls"]:9.0f} {g["flops"] / 1e9:8.2f} {g["bytes"] / 1e9:9.3f} '
              f'{g["flops"] / max(g["bytes"], 1):10.0f} {g["roofline_s"] * 1e3:12.3f} {g["memory_bound_share"]:13.0%}')
    for m in names:
        print(f'top operators of {m} (self ms per step, calls per step)')
        top = sorted(rows[m]['ops'].items(), key=lambda kv: -kv[1]['self_ms'])[:args.top]
        for op, o in top:
            print(f'  {op[:44]:44s} {o["self_ms"]:9.2f} {o["calls"]:7.0f}  {_category(op, o.get("kernel", False))}')
    _save(args, 'profile', dict(rows=rows, by_category=by_cat))


def cmd_regression(args):
    """Today's code against another checkout's, interleaved in one invocation: the TOU/FT step ratio and the time
    of factorizing every block linear."""
    before = Path(args.before).resolve()
    if not (before / 'toukit' / '__init__.py').is_file():
        raise SystemExit(f'--before {args.before}: not a checkout of toukit (no toukit/__init__.py there)')
    sha = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=before, capture_output=True, text=True).stdout
    header(args, f'this checkout ({Path(toukit.__file__).parent.parent}) against {before} (commit {sha.strip()}), '
                 f'{args.rounds} interleaved round(s), each measurement in its own process')
    codes = dict(before=str(before), now=None)
    rows = {k: dict(ft=[], tou=[], factorize=[]) for k in codes}
    for _ in range(args.rounds):
        for k, source in codes.items():
            for m in ('ft', 'tou'):
                rows[k][m].append(spawn('step', args, source=source, method=m)['step_s'])
            rows[k]['factorize'].append(spawn('factorize', args, source=source, svd_method='gram')['seconds'])
    print(f'{"code":8s} {"FT step s":>10s} {"TOU step s":>11s} {"TOU / FT":>9s} {"factorize s":>12s}   (medians)')
    for k, r in rows.items():
        ft, tou, fac = (statistics.median(r[x]) for x in ('ft', 'tou', 'factorize'))
        print(f'{k:8s} {ft:10.3f} {tou:11.3f} {tou / ft:9.2f} {fac:12.2f}')
    _save(args, 'regression', rows)


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
    args.model = args.shape
    base = LLAMA_SHAPES[args.shape]
    scale = '' if (args.layers in (None, base['num_hidden_layers']) and args.width_div == 1) else \
        f' (scaled down: {args.layers or base["num_hidden_layers"]} layers, widths / {args.width_div})'
    header(args, f'factorizing every block linear of a {args.shape}-shaped model{scale}, random weights in '
                 f'{args.precision}, apply_tou rank {args.rank}, chunk {args.chunk}; each SVD method in its own '
                 f'process')
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
          f'ranks {first["ranks"]}; memory net of the runtime ({first["runtime_mib"]:.0f} MiB RSS before the model '
          f'was built); the peak includes {first["copies_mib"]:.0f} MiB of layer-0 copies for the error column')
    print(f'{"svd method":12s} {"build s":>8s} {"factorize s":>11s} {"merge s":>8s} {"weights MiB":>11s} '
          f'{"peak MiB":>9s} {"peak/weights":>12s} {"after MiB":>10s} {"layer-0 err / optimum":>22s}')
    for m, r in rows.items():
        worst = max(e['error'] / e['optimal_error'] for e in r['layer0'])
        print(f'{m:12s} {r["build_s"]:8.1f} {r["seconds"]:11.1f} {r["merge_s"]:8.1f} {r["weights_mib"]:11.0f} '
              f'{r["peak_mib"]:9.0f} {r["peak_mib"] / r["weights_mib"]:12.2f} {r["after_mib"]:10.0f} {worst:22.4f}')
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
    m.add_argument('--eager-and-compiled', action='store_true', help='each method eager and compiled, side by side')
    m.set_defaults(func=cmd_methods)
    pr = sub.add_parser('profile', parents=[common], help='torch.profiler of training steps, by operator')
    pr.add_argument('--methods', nargs='+', default=['ft', 'tou'])
    pr.add_argument('--top', type=int, default=15, help='operators listed per method')
    pr.set_defaults(func=cmd_profile)
    rg = sub.add_parser('regression', parents=[common], help="this checkout's TOU/FT step ratio and factorization "
                                                             "time against another checkout's")
    rg.add_argument('--before', required=True, help='root of the other checkout (e.g. a git worktree)')
    rg.add_argument('--rounds', type=int, default=2)
    rg.set_defaults(func=cmd_regression)
    sub.add_parser('inference', parents=[common]).set_defaults(func=cmd_inference)
    sub.add_parser('layer', parents=[common]).set_defaults(func=cmd_layer)
    f = sub.add_parser('factorize', parents=[common])
    f.add_argument('--svd-methods', nargs='+', default=['exact', 'gram', 'randomized'])
    f.set_defaults(func=cmd_factorize)
    ll = sub.add_parser('factorize-llm', parents=[common], help='apply_tou on a Llama-shaped model')
    ll.add_argument('--shape', default='llama-2-7b', choices=sorted(LLAMA_SHAPES))
    ll.add_argument('--svd-methods', nargs='+', default=['gram', 'randomized'])
    ll.add_argument('--layers', type=int, default=None, help="fewer blocks than the shape's (a smoke test)")
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
