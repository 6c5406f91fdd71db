"""lm-evaluation-harness model type "hetgraph": `HFLM` with the model loaded by hetgraph.

Given a path, lm-eval's own `hf` model loads through `AutoModelForCausalLM`, which builds every layer
from the global config (wrong for these models; hetgraph's guard makes it refuse instead). This
subclass keeps everything else of `HFLM` (batching, loglikelihood, generation, chat templates) and
replaces the three steps that read the path:

    lm_eval --model hetgraph --model_args pretrained=PATH,dtype=float32 --tasks ...
    python -m hetgraph lm-eval --model hetgraph --model_args pretrained=PATH --tasks ...   # any lm-eval

The first form needs an lm-eval that loads the `lm_eval.models` entry points hetgraph declares; the
second registers the model itself, then runs lm-eval's own command line. From Python:
`lm_eval.simple_evaluate(model="hetgraph", model_args={"pretrained": PATH}, ...)` after importing
this module, or `HetgraphLM(pretrained=PATH)` as the model. Model arguments beyond HFLM's:
`attn_implementation`, and `compile=True` (`torch.compile(model.forward, backend="hetgraph")`).
"""

from __future__ import annotations

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from transformers import AutoTokenizer

from hetgraph.build import from_pretrained

_UNSUPPORTED = ("peft", "delta", "autogptq", "gptqmodel", "gguf_file", "parallelize", "tp_plan")


@register_model("hetgraph")
class HetgraphLM(HFLM):
    """`HFLM` whose `pretrained=PATH` is read by `hetgraph.from_pretrained` (any layout hetgraph reads)."""

    def __init__(self, pretrained, *, attn_implementation: str | None = None, compile: bool = False, **kwargs):
        for name in _UNSUPPORTED:
            if kwargs.get(name):
                raise ValueError(f"hetgraph lm-eval model: {name}={kwargs[name]!r} is not supported; load the model "
                                 "with hetgraph and pass it as `pretrained=<model>` instead")
        self._hetgraph_args = {"attn_implementation": attn_implementation, "compile": compile,
                               "dtype": kwargs.get("dtype", "auto")}  # fmt: skip
        kwargs.setdefault("backend", "causal")
        super().__init__(pretrained=pretrained, **kwargs)

    def _get_config(self, pretrained, **kwargs) -> None:
        if not isinstance(pretrained, str):
            return super()._get_config(pretrained, **kwargs)
        args = self._hetgraph_args
        model = from_pretrained(pretrained, dtype=_dtype(args["dtype"]), device=str(self._device),
                                attn_implementation=args["attn_implementation"])  # fmt: skip
        if args["compile"]:
            model.forward = torch.compile(model.forward, backend="hetgraph")
        self._hetgraph_model = model
        self._config = model.config

    def _create_model(self, pretrained, **kwargs) -> None:
        if not isinstance(pretrained, str):
            return super()._create_model(pretrained, **kwargs)
        self._model = self._hetgraph_model

    def _create_tokenizer(self, pretrained, tokenizer, *, revision="main", use_fast_tokenizer=True,
                          add_bos_token=None, subfolder="", **kwargs) -> None:  # fmt: skip
        if not (isinstance(pretrained, str) and (tokenizer is None or isinstance(tokenizer, str))):
            return super()._create_tokenizer(
                pretrained, tokenizer, revision=revision, use_fast_tokenizer=use_fast_tokenizer,
                add_bos_token=add_bos_token, subfolder=subfolder, **kwargs,
            )  # fmt: skip
        # `config=`: AutoTokenizer would otherwise read config.json through AutoConfig, which a
        # hetgraph checkpoint may refuse on purpose (`hetgraph.stock_guard`).
        options = {"revision": revision, "use_fast": use_fast_tokenizer, "config": self._config}
        if add_bos_token is not None:
            options["add_bos_token"] = add_bos_token
        if subfolder:
            options["subfolder"] = subfolder
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or pretrained, **options)


def _dtype(dtype) -> torch.dtype | None:
    """lm-eval's dtype argument ("auto", "float32", "bfloat16", a torch.dtype) -> from_pretrained's."""
    if dtype in (None, "auto"):
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"hetgraph lm-eval model: dtype={dtype!r} is not a torch dtype; e.g. float32, bfloat16, auto")
    return value


def main(argv=None) -> int:
    """lm-eval's command line, with the "hetgraph" model type registered (`python -m hetgraph lm-eval`)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    argv = sys.argv[1:] if argv is None else list(argv)
    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
