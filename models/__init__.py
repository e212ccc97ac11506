"""The offline model pipeline: data, training, evaluation, ONNX export and the model store."""

LABELS = ("NEGATIVE", "POSITIVE")
# The model names our recipes (models.train.RECIPES) register under; any other name is a model
# someone imported.
RECIPE_OF_NAME = {
    "sentiment": "default",
    "sentiment-large": "large",
    "sentiment-distilled": "distilled",
}
# What a distilled recipe's transfer set can be made of (models.distill).
TRANSFER_SOURCES = ("phrases", "perturbed", "review_windows")
