"""Component names of a bundle, spelled once."""

TILE_ENCODER = "tile_encoder"
RESAMPLER = "resampler"
TIS = "tis"
CROSS_KV = "cross_kv"
DECODER = "decoder"  # the plain dynamo graph: any ONNX runtime, TensorRT, OpenVINO
DECODER_FUSED = "decoder_fused"  # the ONNX Runtime contrib-op graph (GroupQueryAttention, shared K/V buffers)

REQUIRED = (TILE_ENCODER, RESAMPLER, TIS, CROSS_KV)
DECODERS = (DECODER, DECODER_FUSED)
ALL = REQUIRED + DECODERS
