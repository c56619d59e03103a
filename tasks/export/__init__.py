"""ONNX export: tracing, metadata and the parity gate."""
