"""Rerun a task's recorded runs on this machine, one after another, to tell the methods' time from the machines'.

    OMP_NUM_THREADS=1 python benchmarks/machine_speed.py --preset dinov2_fashion --methods ft lora tou --core 1

A sweep's records of one task are made over several sessions, and the machines differ in speed (the same run has
taken 140 s and 265 s), so a time ratio between two methods' records holds the machines' ratio too. This script
takes each method's tuned-protocol record at `--seed` (the run the manifest `results/<preset>.sweep.json` names),
reruns its configuration with `toukit train` into a scratch folder (one process per run, pinned to `--core`, one
thread, the way the sweep workers ran), and prints, per run: the record's train seconds, training memory and machine
(`env.platform` names the VM's kernel build) against the rerun's, and whether the test predictions are the same. Then
the reruns' time and memory ratios to each other, all measured on this machine in this one call. The rerun's run id
must equal the record's (same configuration); the code is the checkout `--checkout` names (default: this one; name a
worktree at the records' commit to rerun their code), its commit printed beside the record's. Writes benchmarks/results/machine_speed_<preset>.txt and .json.
"""
import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from toukit.results import read_manifest, read_record

ROOT = Path(__file__).resolve().parent.parent


def recorded_run(results: Path, preset: str, method: str, seed: int, protocol: str) -> dict:
    """The record the manifest names for this method, protocol and seed; a clear error when there is none."""
    manifest = read_manifest(results / f'{preset}.sweep.json')
    ids = manifest['runs'].get(protocol, {}).get(method, [])
    for run_id in ids:
        path = results / f'{run_id}.json'
        if not path.exists():
            continue
        record = read_record(path)
        if record['run']['config']['seed'] == seed and record.get('status') == 'ok':
            return record
    raise SystemExit(f'no finished {protocol} record of {method!r} at seed {seed} in {results} '
                     f'(the manifest names {ids or "none"})')


def rerun(record: dict, scratch: Path, core, checkout: Path) -> dict:
    """Train the record's configuration again into `scratch`; returns the new record."""
    config = record['run']['config']
    args = ['--preset', config['preset'], '--method', config['method'], '--lr', repr(config['lr']),
            '--seed', str(config['seed']), '--results-dir', str(scratch), '--quiet']
    command = [sys.executable, '-m', 'toukit.cli', 'train', *args]
    if core is not None:
        command = ['taskset', '-c', str(core), *command]
    env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    print('+', ' '.join(command[-len(args) - 1:]), flush=True)
    subprocess.run(command, check=True, env=env, cwd=checkout)
    path = scratch / f"{record['run']['id']}.json"
    if not path.exists():
        made = sorted(p.name for p in scratch.glob('*.json'))
        raise SystemExit(f"the rerun of {record['run']['id']} wrote {made}, not its run id: the configuration differs")
    return read_record(path)


def machine(record: dict) -> str:
    """The VM kernel build in env.platform (e.g. 'fc-v1300'), or the whole platform string."""
    text = record['env'].get('platform', '?')
    return next((part for part in text.split('-') if part.startswith('v') and part[1:].isdigit()), text)


def row(record: dict, again: dict) -> dict:
    old, new = record['cost'], again['cost']
    same = record['metrics']['final']['test_predictions'] == again['metrics']['final']['test_predictions']
    return {'run': record['run']['id'], 'method': record['run']['config']['method'],
            'recorded_at': record['run']['created'], 'recorded_machine': machine(record),
            'recorded_commit': record['env']['git_sha'], 'rerun_commit': again['env']['git_sha'],
            'recorded_s': old['train_seconds'], 'rerun_s': new['train_seconds'],
            'recorded_mib': old['train_memory_mib'], 'rerun_mib': new['train_memory_mib'],
            'recorded_test_accuracy': record['metrics']['final']['test_accuracy'],
            'rerun_test_accuracy': again['metrics']['final']['test_accuracy'],
            'same_test_predictions': same}


def report(rows: list, preset: str, core, machine_now: str) -> str:
    lines = [f'{preset}: tuned-protocol records rerun one after another on this machine ({machine_now}, '
             f'core {core if core is not None else "any"}, one thread), against their records.',
             f"{'run':44} {'rec. at (UTC)':16} {'rec. VM':8} {'commit':15} {'rec. s':>7} {'rerun s':>7} "
             f"{'ratio':>5} {'rec. MiB':>8} {'rerun MiB':>9}  same test predictions"]
    for r in rows:
        lines.append(f"{r['run']:44} {r['recorded_at'][:16].replace('T', ' '):16} {r['recorded_machine']:8} "
                     f"{r['recorded_commit'] + '/' + r['rerun_commit']:15} {r['recorded_s']:7.1f} {r['rerun_s']:7.1f} "
                     f"{r['recorded_s'] / r['rerun_s']:5.2f} {r['recorded_mib']:8.0f} {r['rerun_mib']:9.0f}  "
                     f"{r['same_test_predictions']}"
                     + ('' if r['same_test_predictions'] else
                        f" ({r['recorded_test_accuracy']:.4f} recorded, {r['rerun_test_accuracy']:.4f} rerun)"))
    lines.append('Side by side on this machine (the reruns; time = train seconds, memory = training memory):')
    for b, a in itertools.combinations(rows, 2):  # a later method over an earlier one, in the order given
        lines.append(f"  {a['method']} / {b['method']}: time {a['rerun_s'] / b['rerun_s']:.2f}x "
                     f"(records: {a['recorded_s'] / b['recorded_s']:.2f}x), "
                     f"memory {a['rerun_mib'] / b['rerun_mib']:.2f}x "
                     f"(records: {a['recorded_mib'] / b['recorded_mib']:.2f}x)")
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--preset', default='dinov2_fashion')
    parser.add_argument('--methods', nargs='+', default=['ft', 'lora', 'tou'])
    parser.add_argument('--seed', type=int, default=1)
    parser.add_argument('--protocol', default='tuned')
    parser.add_argument('--results-dir', type=Path, default=ROOT / 'results')
    parser.add_argument('--core', type=int, default=None, help='pin each rerun to this core (taskset)')
    parser.add_argument('--checkout', type=Path, default=ROOT, help="the toukit checkout the reruns import")
    parser.add_argument('--out', type=Path, default=ROOT / 'benchmarks' / 'results')
    args = parser.parse_args(argv)
    records = [recorded_run(args.results_dir, args.preset, m, args.seed, args.protocol) for m in args.methods]
    scratch = Path(tempfile.mkdtemp(prefix='machine_speed_'))
    try:
        rows = [row(record, rerun(record, scratch, args.core, args.checkout.resolve())) for record in records]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    machine_now = machine({'env': {'platform': platform.platform()}})
    text = report(rows, args.preset, args.core, machine_now)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f'machine_speed_{args.preset}'
    stem.with_suffix('.txt').write_text(text + '\n')
    stem.with_suffix('.json').write_text(json.dumps({'preset': args.preset, 'protocol': args.protocol,
                                                     'seed': args.seed, 'core': args.core,
                                                     'machine': platform.platform(), 'rows': rows}, indent=1))


if __name__ == '__main__':
    main()
