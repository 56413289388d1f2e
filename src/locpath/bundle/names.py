"""Component names of a bundle, spelled once."""

TILE_ENCODER = "tile_encoder"
RESAMPLER = "resampler"
TIS = "tis"
CROSS_KV = "cross_kv"
DECODER = "decoder"  # the plain dynamo graph: any ONNX runtime, TensorRT, OpenVINO
DECODER_FUSED = "decoder_fused"  # the ONNX Runtime contrib-op graph (GroupQueryAttention, shared K/V buffers)
# optional: the fused graph built for the prefill (more than one new token per step, e.g. on AMX INT8 matmuls);
# same decoder contract as DECODER_FUSED, so both sessions share one K/V cache
DECODER_FUSED_PREFILL = "decoder_fused_prefill"

REQUIRED = (TILE_ENCODER, RESAMPLER, TIS, CROSS_KV)
DECODERS = (DECODER, DECODER_FUSED)
ALL = REQUIRED + DECODERS + (DECODER_FUSED_PREFILL,)
