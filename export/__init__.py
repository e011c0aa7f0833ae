"""omni_edge.export: ONNX graphs of the dense stages, written into an edge bundle (an offline tool).

`omni-edge export BUNDLE --stages vision,audio_encoder,speech` exports each stage's torch module, checks the
graph (onnx checker, strict shape inference, TensorRT-parsable ops, no data-dependent shapes), measures its
parity against the torch module in onnxruntime, and only then moves it into the bundle and lists it in the
manifest's "graphs" table (see `omni_edge.backends`). One module per stage: `export/<stage>.py` defines
`export(ctx) -> List[GraphFile]`; `export/common.py` holds what they share.

The runtime never imports this package; it may import onnx and other offline extras.
"""
