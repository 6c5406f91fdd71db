"""hetgraph: heterogeneous transformer models on stock transformers classes, and a torch.compile backend."""

from hetgraph import export  # the module, callable: hetgraph.export(model, path) and hetgraph.export.read_metadata
from hetgraph.backend import BackendOptions
from hetgraph.backend import register as _register_backend
from hetgraph.build import from_config, from_pretrained
from hetgraph.cache import make_cache
from hetgraph.errors import HeteroConfigError
from hetgraph.explain import explain
from hetgraph.lora import lora_targets
from hetgraph.profiling import LatencyTable, profile, profile_variants
from hetgraph.runtime import generate_with_exported
from hetgraph.spec import LayerSpec, ModelSpec
from hetgraph.warmup import compile_cache_dir, warmup

__all__ = [
    "from_config",
    "from_pretrained",
    "make_cache",
    "explain",
    "lora_targets",
    "compile_cache_dir",
    "warmup",
    "export",
    "generate_with_exported",
    "profile",
    "profile_variants",
    "LatencyTable",
    "BackendOptions",
    "HeteroConfigError",
    "LayerSpec",
    "ModelSpec",
]
__version__ = "0.1.0"

_register_backend()
