"""The registry of built-in datasets: name -> loader, modality and number of classes (timm's register_model)."""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from .base import DataBundle, LoadOptions

Loader = Callable[[object, str, LoadOptions], DataBundle]  # (model, modality, options) -> the three sets


@dataclass(frozen=True)
class BuiltinDataset:
    """A built-in dataset: its loader, what input it is and how many classes it has."""
    name: str
    loader: Loader
    modality: str  # 'text', 'image' or 'any' (made to fit the model: synthetic)
    num_classes: int


_BUILTIN: Dict[str, BuiltinDataset] = {}


def register_builtin_dataset(name: str, modality: str, num_classes: int) -> Callable[[Loader], Loader]:
    """Decorator: make `loader(model, modality, options) -> DataBundle` the built-in dataset `name`.

    Raises:
        ValueError: `name` is taken, or `modality` is not 'text', 'image' or 'any'.
    """
    if modality not in ('text', 'image', 'any'):
        raise ValueError(f"modality={modality!r}: must be 'text', 'image' or 'any'")

    def register(loader: Loader) -> Loader:
        if name in _BUILTIN:
            raise ValueError(f'dataset {name!r} is registered already')
        _BUILTIN[name] = BuiltinDataset(name, loader, modality, num_classes)
        return loader
    return register


def builtin_dataset(name) -> Optional[BuiltinDataset]:
    """The built-in dataset called `name`, or None."""
    return _BUILTIN.get(name) if isinstance(name, str) else None


def builtin_names() -> List[str]:
    """The built-in datasets' names, in the order they were registered."""
    return list(_BUILTIN)
