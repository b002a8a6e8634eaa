"""Finding the custom-op library and creating ONNX Runtime sessions."""
