"""rfc_compile: Relational Feature Caching traced into the graph of diffusion transformers.

    import rfc_compile
    pipe.transformer = rfc_compile.optimize(pipe.transformer, rfc_compile.RFCConfig(mode="rfc"))
"""

from .config import MODES, RFCConfig
from .errors import UnsupportedModelError
from .calibrate import calibrate
from .runtime import CacheSession, CachedModel, RFCStats, optimize

__all__ = ["RFCConfig", "MODES", "optimize", "calibrate", "CachedModel", "CacheSession", "RFCStats",
           "UnsupportedModelError"]
__version__ = "0.1.0"
