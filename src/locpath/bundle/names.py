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

# optional, all or none: the resampler a chunk of STM tokens at a time (memory bounded by the chunk, not the
# slide), for slides with more tokens than the runtime's chunk; the same weights as RESAMPLER
RESAMPLER_PARTIAL = "resampler_partial"
RESAMPLER_WEIGHTS = "resampler_weights"
RESAMPLER_FINISH = "resampler_finish"
RESAMPLER_CHUNKS = (RESAMPLER_PARTIAL, RESAMPLER_WEIGHTS, RESAMPLER_FINISH)

REQUIRED = (TILE_ENCODER, RESAMPLER, TIS, CROSS_KV)
DECODERS = (DECODER, DECODER_FUSED)
ALL = REQUIRED + RESAMPLER_CHUNKS + DECODERS + (DECODER_FUSED_PREFILL,)
