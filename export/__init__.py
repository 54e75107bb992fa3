"""ONNX export, precision conversion and TensorRT engine builds (installed as ``ecm.export``)."""
