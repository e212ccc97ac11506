"""The classifier architecture of our models, and the one way to load any classifier.

all-MiniLM-L6-v2 and all-mpnet-base-v2 were trained so that the *mean* of their token vectors
describes a sentence; their [CLS] vectors and poolers were never trained for that. Classifying
the mean-pooled vector gave higher validation accuracy than Hugging Face's standard [CLS] head
(docs/model.md). One class per encoder family (BERT, MPNet), each registered with the Auto
classes, so a saved model is an ordinary Hugging Face folder whose config.json names it, and
models people bring with the standard head load the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    BertPreTrainedModel,
    MPNetConfig,
    MPNetModel,
    MPNetPreTrainedModel,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPoolingClassifier(PreTrainedModel):
    """A linear layer on the mean of an encoder's token vectors; subclasses say which encoder.
    The encoder sits under the family's own attribute name (`bert`, `mpnet`: its
    base_model_prefix), so pretrained checkpoints load into it unchanged."""

    encoder_class: ClassVar[type[PreTrainedModel]]

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        assert config.num_labels is not None, "from_pretrained(num_labels=...) or a saved config"
        encoder = self.encoder_class(config, add_pooling_layer=False)
        setattr(self, self.base_model_prefix, encoder)
        self.dropout = torch.nn.Dropout(config.hidden_dropout_prob)
        self.classifier = torch.nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The sentence vector: the mean of the token vectors, padding left out."""
        encoder = self.base_model  # the BertModel or MPNetModel, named by base_model_prefix
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any
    ) -> SequenceClassifierOutput:
        pooled = self.pool(input_ids, attention_mask)
        return SequenceClassifierOutput(logits=self.classifier(self.dropout(pooled)))


class MeanPoolingBertConfig(BertConfig):
    model_type = "kubesentiment-mean-pooling-bert"


class MeanPoolingBertForSequenceClassification(MeanPoolingClassifier, BertPreTrainedModel):
    """all-MiniLM-L6-v2 and any other BERT encoder (the default model)."""

    config_class = MeanPoolingBertConfig
    encoder_class = BertModel


class MeanPoolingMPNetConfig(MPNetConfig):
    model_type = "kubesentiment-mean-pooling-mpnet"


class MeanPoolingMPNetForSequenceClassification(MeanPoolingClassifier, MPNetPreTrainedModel):
    """all-mpnet-base-v2 (`make model-large`)."""

    config_class = MeanPoolingMPNetConfig
    encoder_class = MPNetModel


# Encoder model_type -> our config and classifier for it.
CLASSIFIERS: dict[str, tuple[type[PretrainedConfig], type[MeanPoolingClassifier]]] = {
    "bert": (MeanPoolingBertConfig, MeanPoolingBertForSequenceClassification),
    "mpnet": (MeanPoolingMPNetConfig, MeanPoolingMPNetForSequenceClassification),
}


def new_classifier(encoder_dir: Path, labels: tuple[str, ...]) -> MeanPoolingClassifier:
    """A new classifier on a pretrained encoder (its pooler is left out)."""
    settings = AutoConfig.from_pretrained(encoder_dir).to_dict()
    kind = settings.pop("model_type")  # ours replaces it, or transformers warns
    if kind not in CLASSIFIERS:
        raise ValueError(f"no mean-pooling classifier for {kind!r} encoders")
    settings["id2label"] = dict(enumerate(labels))
    settings["label2id"] = {label: i for i, label in enumerate(labels)}
    config_class, classifier = CLASSIFIERS[kind]
    model: MeanPoolingClassifier = classifier.from_pretrained(
        encoder_dir, config=config_class(**settings)
    )
    return model


for config_class, classifier in CLASSIFIERS.values():
    AutoConfig.register(config_class.model_type, config_class)
    AutoModelForSequenceClassification.register(config_class, classifier)


def load_classifier(source: str | Path) -> PreTrainedModel:
    """Any sequence classifier folder (or hub id), ours included."""
    model: PreTrainedModel = AutoModelForSequenceClassification.from_pretrained(source)
    return model
