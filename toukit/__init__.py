"""toukit: truncated-SVD fine-tuning (TOU) of pretrained transformers, its relatives and its analysis."""
__version__ = '0.1.0'

from .config import PRESETS, TrainConfig, resolve_config, run_id
from .layers import (AdapterLinear, DeLoRALinear, FactorizedLinear, ResidualFactorizedLinear, SVFitLinear, WeightInfo,
                     fuse_qkv, split_qkv)
from .linalg import (effective_rank, energy_curve, relative_error, rank_for_energy, singular_values, stable_rank,
                     truncated_svd)
from .methods import (DEFAULT_NOISE_SCALE, METHODS, apply_method, apply_tou, count_parameters, is_prepared, merge,
                      method_label, method_names)
from .models import check_model, create_model
from .ranks import RankPolicy, allocate_ranks, parse_rank
from .results import load_runs
from .spectrum import rank_table, spectrum_table
from .targets import find_targets, layer_matrices, new_modules
from .train import run
from .updates import update_table

__all__ = [
    'FactorizedLinear', 'ResidualFactorizedLinear', 'SVFitLinear', 'DeLoRALinear', 'AdapterLinear', 'WeightInfo',
    'singular_values', 'truncated_svd', 'energy_curve', 'rank_for_energy', 'stable_rank', 'effective_rank',
    'relative_error',
    'RankPolicy', 'parse_rank', 'allocate_ranks',
    'find_targets', 'new_modules', 'split_qkv', 'fuse_qkv',
    'apply_tou', 'apply_method', 'merge', 'count_parameters', 'is_prepared', 'METHODS', 'method_names',
    'method_label',
    'DEFAULT_NOISE_SCALE',
    'spectrum_table', 'rank_table', 'layer_matrices', 'update_table',
    'create_model', 'check_model', 'load_runs', 'run_id',
    'TrainConfig', 'PRESETS', 'resolve_config', 'run',
]
