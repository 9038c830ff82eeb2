"""ONNX exporters for BCA-adapted models (installed as ``bca_deploy.exporters``)."""
