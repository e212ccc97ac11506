"""The offline model pipeline: data, training, evaluation, ONNX export and the model store."""

LABELS = ("NEGATIVE", "POSITIVE")
