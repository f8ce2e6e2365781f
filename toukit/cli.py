"""The `toukit` command: regenerate runs, analyses and figures; print a model's spectrum table.

    toukit reproduce                      every method on the demo preset, the noise-scale runs, the analysis
                                          and figures notebooks (runs whose successful record exists are skipped)
    toukit reproduce --redo               run everything again
    toukit reproduce --preset paper       the TOU paper's setting (GPU and internet)
    toukit spectrum --model minilm        the spectrum table of a model's linears
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from .methods import DEFAULT_NOISE_SCALE, METHODS
from .results import read_record

__all__ = ['main', 'reproduce', 'run_notebook']

NOTEBOOKS = Path(__file__).resolve().parent.parent / 'notebooks'
ANALYSIS_NOTEBOOKS = ('spectrum.ipynb', 'rank_selection.ipynb', 'reconstruction.ipynb')
NOISE_SCALES = (0.0, 1e-4, 1e-3, 1e-2, 3e-2)  # the study's sweep; the default alpha's point is the plain tou run


def run_notebook(name: str, output: Path, parameters: dict, cwd: Path, progress: bool = True) -> None:
    """Execute notebooks/`name` with papermill, writing the executed copy to `output`."""
    import papermill
    output.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(NOTEBOOKS / name), str(output), parameters=parameters, cwd=str(cwd),
                               progress_bar=progress, kernel_name='python3')


def _done(record_path: Path) -> bool:
    try:
        return read_record(record_path).get('status') == 'ok'
    except (OSError, ValueError):
        return False


def planned_runs(preset: str, methods: Sequence[str], seeds: Sequence[int], noise_scales: Sequence[float]) -> List[dict]:
    """The training runs `reproduce` makes: every method and seed, then TOU at each noise scale (seed 0)."""
    runs = [dict(method=m, preset=preset, seed=s, run_name=f'{preset}_{m}_s{s}') for s in seeds for m in methods]
    runs += [dict(method='tou', preset=preset, seed=seeds[0], noise_scale=float(a),
                  run_name=f'{preset}_tou_noise{a:g}_s{seeds[0]}') for a in noise_scales
             if not ('tou' in methods and a == DEFAULT_NOISE_SCALE)]
    return runs


def reproduce(preset: str = 'demo', methods: Optional[Sequence[str]] = None, seeds: Sequence[int] = (0,),
              noise_scales: Sequence[float] = NOISE_SCALES, results_dir: str = 'results', figures_dir: str = 'figures',
              redo: bool = False, analysis: bool = True, extra: Optional[dict] = None,
              analysis_parameters: Optional[dict] = None, cwd: str = '.') -> None:
    """Run the training notebook for every planned run, then the analysis and figures notebooks.

    Args:
        extra: more parameters for every training notebook (e.g. max_steps_per_epoch for a quick check).
        analysis_parameters: notebook name -> more parameters for that analysis notebook.
    """
    from tqdm.auto import tqdm
    cwd_path = Path(cwd).resolve()
    methods = list(methods or METHODS)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f'methods={bad!r}: unknown; choose from {", ".join(METHODS)}')
    results = cwd_path / results_dir
    executed = results / 'notebooks'
    runs = planned_runs(preset, methods, seeds, noise_scales)
    for run in tqdm(runs, desc='training runs'):
        record = results / f'{run["run_name"]}.json'
        if not redo and _done(record):
            print(f'skip {run["run_name"]}: {record} exists')
            continue
        print(f'run {run["run_name"]}')
        run_notebook('train.ipynb', executed / f'{run["run_name"]}.ipynb',
                     dict(run, results_dir=str(results), **(extra or {})), cwd_path)
    if not analysis:
        return
    for name in tqdm(ANALYSIS_NOTEBOOKS + ('figures.ipynb',), desc='analysis and figures'):
        params = dict(preset=preset, results_dir=str(results), figures_dir=str(cwd_path / figures_dir),
                      **(analysis_parameters or {}).get(name, {}))
        run_notebook(name, executed / f'{preset}_{name}', params, cwd_path)


def _spectrum(args) -> None:
    from .models import create_model
    from .spectrum import spectrum_table
    import pandas as pd
    model = create_model(args.model, num_classes=2, pretrained=not args.random_weights)
    table = spectrum_table(model, targets=args.targets)
    with pd.option_context('display.width', 200, 'display.max_rows', 500, 'display.precision', 3):
        print(table.drop(columns=['singular_values']).to_string(index=False))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='toukit', description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    rep = sub.add_parser('reproduce', help='run every method, the analyses and the figures')
    rep.add_argument('--preset', default='demo')
    rep.add_argument('--methods', nargs='+', default=None, help=f'default: all ({", ".join(METHODS)})')
    rep.add_argument('--seeds', nargs='+', type=int, default=[0])
    rep.add_argument('--noise-scales', nargs='*', type=float, default=list(NOISE_SCALES),
                     help='TOU runs for the noise-scale study (none: skip them)')
    rep.add_argument('--results-dir', default='results')
    rep.add_argument('--figures-dir', default='figures')
    rep.add_argument('--redo', action='store_true', help='run again even where a successful record exists')
    rep.add_argument('--no-analysis', action='store_true', help='training runs only')
    spec = sub.add_parser('spectrum', help="print a model's spectrum table")
    spec.add_argument('--model', default='minilm')
    spec.add_argument('--targets', default='all')
    spec.add_argument('--random-weights', action='store_true')
    args = parser.parse_args(argv)
    if args.command == 'reproduce':
        reproduce(args.preset, args.methods, args.seeds, args.noise_scales, args.results_dir, args.figures_dir,
                  redo=args.redo, analysis=not args.no_analysis)
    else:
        _spectrum(args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
