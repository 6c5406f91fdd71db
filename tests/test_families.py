"""What holds for every family at once: building and running GptOss, Llama4 and NemotronH models
leaves transformers' classes and modules exactly as they were; `inspect` reports them."""

from __future__ import annotations

import json
import textwrap

import pytest

from hetgraph.inspect import inspect_config
from test_build import run_python
from test_gpt_oss import hetero_config as gpt_oss_config
from test_llama4 import hetero_config as llama4_config
from test_nemotron_h import hetero_config as nemotron_h_config

_CHECK = textwrap.dedent(
    """
    import importlib, json, sys, torch, transformers
    import transformers.cache_utils, transformers.masking_utils, transformers.modeling_utils
    assert "hetgraph" not in sys.modules
    from test_gpt_oss import hetero_config as gpt_oss
    from test_llama4 import hetero_config as llama4
    from test_nemotron_h import hetero_config as nemotron_h

    MODULES = {"gpt_oss": "GptOss", "llama4": "Llama4", "nemotron_h": "NemotronH"}
    owners = [transformers.masking_utils, transformers.cache_utils, transformers.modeling_utils,
              transformers.PreTrainedModel, transformers.GenerationMixin, torch.nn.Module]
    for name, cap in MODULES.items():
        mod = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        owners.append(mod)
        owners += [v for k, v in vars(mod).items() if isinstance(v, type) and k.startswith(cap)]

    def snapshot():
        return {getattr(o, "__qualname__", o.__name__) + "@" + o.__module__ if isinstance(o, type) else o.__name__:
                dict(vars(o)) for o in owners}

    def diff(before, after):
        # `__slotnames__` is the stdlib's cache of a class's slots, written by the first `copy.copy` of an instance.
        return [f"{owner}.{key}" for owner, b in before.items() for key in set(b) | set(after[owner])
                if b.get(key, None) is not after[owner].get(key, None) and key != "__slotnames__"]

    def use(config):
        m = hetgraph.from_config(config)
        ids = torch.randint(1, 100, (2, 6))
        m(ids)
        m.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0,
                   cache=hetgraph.make_cache(m, batch_size=2, max_cache_len=9))

    # transformers caches a few things on first use (e.g. `smart_apply`): do the stock work first.
    for name, cap in MODULES.items():
        cfg = {"gpt_oss": gpt_oss, "llama4": llama4, "nemotron_h": nemotron_h}[name]()
        cfg.pop("per_layer_config")
        model_type = cfg.pop("model_type")
        stock = getattr(transformers, cap + "ForCausalLM")(transformers.AutoConfig.for_model(model_type, **cfg))
        stock.generate(torch.randint(1, 100, (1, 4)), max_new_tokens=2, do_sample=False, pad_token_id=0)
    before = snapshot()
    import hetgraph
    errors = {}
    for name, config in (("gpt_oss", gpt_oss()), ("llama4", llama4()), ("nemotron_h", nemotron_h())):
        try:
            use(config)
        except Exception as e:  # reported, after the patching check it would otherwise hide
            errors[name] = repr(e)
    json.dump({"changes": diff(before, snapshot()), "errors": errors}, open(OUT, "w"))
    """
)


def test_building_and_running_do_not_patch_transformers(tmp_path):
    out = tmp_path / "result.json"
    run_python(f"OUT = {str(out)!r}\n" + _CHECK)
    result = json.loads(out.read_text())
    assert result == {"changes": [], "errors": {}}, result


@pytest.mark.parametrize("config", [gpt_oss_config, llama4_config, nemotron_h_config], ids=lambda f: f.__module__)
def test_inspect_reports_each_layer(config):
    """Parameter counts come from the LayerSpec table and a skeleton on the meta device: no storage."""
    import hetgraph

    d = config()
    report = inspect_config(d)
    model = hetgraph.from_config(d)
    layers = model.model.layers
    assert len(report.rows) == len(layers)
    for row, layer in zip(report.rows, layers):
        assert row.parameters == sum(p.numel() for p in layer.parameters()), row.spec
    embeddings = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("model.layers."))
    assert report.totals.parameters == sum(p.numel() for p in model.parameters())
    assert report.other_parameters == embeddings
    assert report.totals.kv_bytes_per_token == sum(s.kv_bytes_per_token(4) for s in hetgraph.build.model_spec(model))
    assert report.parent.parameters > report.totals.parameters
    assert "layer" in report.to_text()
