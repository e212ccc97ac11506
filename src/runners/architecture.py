"""The classifier architecture of the default model, and the one way to load any classifier.

all-MiniLM-L6-v2 was trained so that the *mean* of its token vectors describes a sentence; its
[CLS] vector and pooler were never trained for that. Classifying the mean-pooled vector gave
higher validation accuracy than Hugging Face's standard [CLS] head (README, Model). The class is
registered with the Auto classes, so a saved model is an ordinary Hugging Face folder whose
config.json names it, and models people bring with the standard head load the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    BertPreTrainedModel,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPoolingBertConfig(BertConfig):
    model_type = "kubesentiment-mean-pooling-bert"


class MeanPoolingBertForSequenceClassification(BertPreTrainedModel):
    config_class = MeanPoolingBertConfig

    def __init__(self, config: MeanPoolingBertConfig) -> None:
        super().__init__(config)
        assert config.num_labels is not None, "from_pretrained(num_labels=...) or a saved config"
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = torch.nn.Dropout(config.hidden_dropout_prob)
        self.classifier = torch.nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The sentence vector: the mean of the token vectors, padding left out."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any
    ) -> SequenceClassifierOutput:
        pooled = self.pool(input_ids, attention_mask)
        return SequenceClassifierOutput(logits=self.classifier(self.dropout(pooled)))

    @classmethod
    def from_encoder(
        cls, encoder_dir: Path, labels: tuple[str, ...]
    ) -> MeanPoolingBertForSequenceClassification:
        """A new classifier on a pretrained BERT encoder (its pooler is left out)."""
        settings = BertConfig.from_pretrained(encoder_dir).to_dict()
        settings.pop("model_type")  # ours, not "bert": say so, or transformers warns
        settings["id2label"] = dict(enumerate(labels))
        settings["label2id"] = {label: i for i, label in enumerate(labels)}
        config = MeanPoolingBertConfig(**settings)
        model: MeanPoolingBertForSequenceClassification = cls.from_pretrained(
            encoder_dir, config=config
        )
        return model


AutoConfig.register(MeanPoolingBertConfig.model_type, MeanPoolingBertConfig)
AutoModelForSequenceClassification.register(
    MeanPoolingBertConfig, MeanPoolingBertForSequenceClassification
)


def load_classifier(source: str | Path) -> PreTrainedModel:
    """Any sequence classifier folder (or hub id), ours included."""
    model: PreTrainedModel = AutoModelForSequenceClassification.from_pretrained(source)
    return model
