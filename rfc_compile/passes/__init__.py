"""Graph passes: capture -> find regions -> rewrite (one concern per module)."""

from .capture import CapturedGraph, capture
from .regions import Region, RegionPlan, check_supported, find_regions
from .rewrite import CachedStep, build_state_spec, rewrite

__all__ = ["CapturedGraph", "capture", "Region", "RegionPlan", "check_supported", "find_regions",
           "CachedStep", "build_state_spec", "rewrite"]
