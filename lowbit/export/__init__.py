"""Export: integer-only reference, ONNX QCDQ for onnxruntime, packed low-bit weights."""
