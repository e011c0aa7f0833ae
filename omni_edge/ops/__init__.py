"""Native ops with torch reference twins.

Families: `q4` (4-bit GPTQ matmul), `attention` (prefill/decode over a KV cache, varlen encoders),
`rvq` (residual VQ decode/encode). Each op validates its inputs, runs the native CPU or CUDA kernel and
has a `*_ref` in plain torch that tests compare against.
"""
