"""Running toukit's notebooks headless with papermill (each in a fresh kernel: a run's memory figures are its own)."""
from pathlib import Path

__all__ = ['NOTEBOOKS', 'run_notebook']

NOTEBOOKS = Path(__file__).resolve().parent.parent / 'notebooks'


def run_notebook(name: str, output: Path, parameters: dict, cwd: Path, progress: bool = True) -> None:
    """Execute notebooks/`name` with papermill, writing the executed copy to `output`."""
    import papermill  # imported here: ~1.5 s at import, paid by every `toukit` command (the CLI imports this module)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(NOTEBOOKS / name), str(output), parameters=parameters, cwd=str(cwd),
                               progress_bar=progress, kernel_name='python3')
