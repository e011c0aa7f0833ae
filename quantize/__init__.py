"""Offline quantization toolchain (installed as `omni_edge.quantize`).

- `gptq`: GPTQ (Frantar et al., 2022) and round-to-nearest on one linear layer, from a Hessian of its inputs.
- `calibration`: built-in bilingual calibration and held-out texts, `--calib FILE` JSON lines, prompt wrapping.
- `pipeline`: the layer-by-layer sequential pass over a checkpoint's decoder (one layer in memory at a time).
- `bundle_writer`: atomic writing of the edge bundle (manifest, copied config/tokenizer, GPTQ tensors).
- `report`: perplexity on held-out text and the per-layer error table.
- `cli`: the `omni-edge quantize` subcommand.

The runtime never imports this package; it may import heavy packages.
"""
