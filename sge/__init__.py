"""SGE-ImageNet core package: the SGE layer, config, engine, checkpoints and helpers.

``from sge import SpatialGroupEnhance`` gives the readable reference layer.
"""
from sge.layer import SpatialGroupEnhance, check_groups

__all__ = ["SpatialGroupEnhance", "check_groups", "sge_layer"]

SGE_IMPLS = ("reference", "fused")


def sge_layer(impl: str = "reference"):
    """Return the SGE module class for ``impl`` ("reference" or "fused")."""
    if impl == "reference":
        return SpatialGroupEnhance
    if impl == "fused":
        from sge.fused import FusedSpatialGroupEnhance
        return FusedSpatialGroupEnhance
    raise ValueError(f"sge_impl={impl!r} is not one of {SGE_IMPLS}")
