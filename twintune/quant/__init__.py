"""Backend-neutral quantization formats (numpy): NF4 as bitsandbytes lays it out."""
