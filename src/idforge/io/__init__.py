"""Input/output: storage (local paths and S3 URIs), atomic writes, image decoding, manifest schemas."""
