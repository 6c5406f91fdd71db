"""Multi-device inference on torch.distributed: a per-layer tensor-parallel plan (`tp_plan`,
`tensor_parallel`) and cost-balanced pipeline splits (`split_layers`, `layer_costs`). Pipeline
stages, the generation loop and the CLI are not built yet."""

from hetgraph.distributed.split import layer_costs, split_layers
from hetgraph.distributed.tensor import attention_split, tensor_parallel, tp_plan

__all__ = ["split_layers", "layer_costs", "tp_plan", "tensor_parallel", "attention_split"]
