"""Multi-device inference on torch.distributed. So far: cost-balanced pipeline splits
(`split_layers`, `layer_costs`); the tensor-parallel plan and pipeline stages are not built yet."""

from hetgraph.distributed.split import layer_costs, split_layers

__all__ = ["split_layers", "layer_costs"]
