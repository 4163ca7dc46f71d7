"""Measuring models on this computer (`pneumoedge bench`, `pneumoedge tune`): onnxruntime only.

Apart from the runtime it measures: `bench` times each stage of a prediction (decode,
preprocess, model, out-of-distribution score, heatmaps, writing) and `tune` measures folder
throughput of the candidate configurations and stores the fastest (`runtime.tuning` reads it).
"""
