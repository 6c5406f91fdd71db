"""What the tests share: the tiny case models (`models`), fixture factories (`fixtures`), assertions
against the independent references (`checks`), FX graph helpers (`graphs`), a tiny synthetic decoder
stack for pass tests (`tiny_stack`), hypothesis strategies (`fuzz_configs`), a fresh interpreter
(`fresh_python`). Nothing here imports hetgraph at package import time: subprocess checks import
`support.models` before hetgraph."""
