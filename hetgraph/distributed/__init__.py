"""Multi-device inference on torch.distributed: a per-layer tensor-parallel plan (`tp_plan`,
`tensor_parallel`), cost-balanced pipeline splits (`split_layers`, `layer_costs`), pipeline stages
(`pipeline_stage`) and generation through them (`generate`)."""

from hetgraph.distributed.pipeline import StageModule, generate, pipeline_stage, stage_config, stage_ranges
from hetgraph.distributed.split import layer_costs, split_layers
from hetgraph.distributed.tensor import attention_split, tensor_parallel, tp_plan

__all__ = ["split_layers", "layer_costs", "tp_plan", "tensor_parallel", "attention_split", "pipeline_stage",
           "generate", "StageModule", "stage_config", "stage_ranges"]  # fmt: skip
