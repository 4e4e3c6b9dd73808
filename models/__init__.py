"""Model registry: every model we offer, by name.

``create_model(name, **kwargs)`` and ``list_models()`` cover the plain baselines
(``resnet18..152``), SGE (``sge_resnet18..152``) and SE (``se_resnet50/101``). Importing
this package also registers the ``sge_*`` and ``se_*`` models in timm's registry.
"""
from __future__ import annotations

import difflib

import timm

from models import resnet

_REGISTRY = {f"resnet{d}": resnet.plain_resnet(d) for d in sorted(resnet.LAYERS)}
_REGISTRY.update({f"sge_resnet{d}": getattr(resnet, f"sge_resnet{d}") for d in sorted(resnet.LAYERS)})
_REGISTRY.update({f"se_resnet{d}": getattr(resnet, f"se_resnet{d}") for d in (50, 101)})


def list_models() -> list[str]:
    """All model names, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs):
    """Build model ``name`` with the paper's defaults; ``kwargs`` override them."""
    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown model {name!r}{hint} (available: {', '.join(list_models())})")
    return _REGISTRY[name](**kwargs)


def is_sge(name: str) -> bool:
    return name.startswith("sge_")


__all__ = ["create_model", "list_models", "is_sge", "timm"]
