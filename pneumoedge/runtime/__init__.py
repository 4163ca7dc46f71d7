"""onnxruntime-only inference: sessions, ensembles, folder runs. Never imports TensorFlow."""
