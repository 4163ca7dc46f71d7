"""pneumoedge: chest X-ray pneumonia classifiers, from Keras training to fast ONNX inference."""
