"""Placeholder until the fused SGE lands (issue 5): selecting it is an explicit error."""


class FusedSpatialGroupEnhance:  # pragma: no cover - replaced by issue 5
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("sge_impl='fused' is not implemented yet; use 'reference'")
