"""Custom operators: multi-scale deformable attention with pluggable backends."""

from openseed.ops.deform_attn import MSDeformAttn, available_backends, ms_deform_attn, register_backend

__all__ = ["MSDeformAttn", "available_backends", "ms_deform_attn", "register_backend"]
