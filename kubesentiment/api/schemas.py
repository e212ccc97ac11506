"""Request and response bodies of the HTTP API. Limits come from settings, so a 400 names the
field and the configured limit, and the OpenAPI document shows both with examples."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field

from kubesentiment.settings import get_settings

settings = get_settings()


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("text is empty or only whitespace")
    if "\x00" in text:  # no text column (PostgreSQL's) can hold it, and no reader means it
        raise ValueError("text contains a NUL character")
    return text


# What _not_blank checks, for the document: no NUL, and a character that str.strip() keeps.
# Spelled out because the document's patterns are ECMA-262 regexes, whose \s lacks \x1c-\x1f
# and \x85.
_KEPT_BY_STRIP = r"[^\x00\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
NOT_BLANK = rf"^[^\x00]*{_KEPT_BY_STRIP}[^\x00]*$"
Text = Annotated[
    str,
    Field(
        min_length=1,
        max_length=settings.max_text_chars,
        examples=["I love this movie, it was wonderful!"],
        json_schema_extra={"pattern": NOT_BLANK},
    ),
    AfterValidator(_not_blank),
]
EXAMPLE_TEXTS = [["What a great film.", "This was a terrible waste of time."]]
BatchTexts = Annotated[
    list[Text], Field(min_length=1, max_length=settings.max_batch_texts, examples=EXAMPLE_TEXTS)
]
JobTexts = Annotated[
    list[Text], Field(min_length=1, max_length=settings.max_job_texts, examples=EXAMPLE_TEXTS)
]


class SentimentScore(BaseModel):
    label: Literal["POSITIVE", "NEGATIVE"] = Field(examples=["POSITIVE"])
    score: float = Field(ge=0, le=1, description="Probability of the label", examples=[0.998])


class ModelRef(BaseModel):
    name: str = Field(examples=["sentiment"])
    version: str = Field(examples=["mlxhakxj6whvsax4"])
    backend: str = Field(examples=["onnx-int8"])


class PredictResponse(BaseModel):
    text: str
    sentiment: SentimentScore
    model: ModelRef


class BatchPredictResponse(BaseModel):
    results: list[PredictResponse] = Field(description="In the order of the input texts")
    model: ModelRef


class JobStatus(BaseModel):
    job_id: str
    status: Literal["queued", "running", "completed", "failed"]
    total: int = Field(description="Texts in the job")
    processed: int = Field(description="Texts scored so far")
    progress: float = Field(ge=0, le=1)
    created_at: float
    updated_at: float
    # OpenAPI 3.0 spells "or null" `nullable`: BentoML's document of an API's output keeps only
    # the first type of an Optional field (a string), which a null `error` then breaks.
    error: str | None = Field(None, json_schema_extra={"nullable": True})


class JobResultItem(BaseModel):
    """A scored text, or one that failed alone (its `error` says why; the job went on)."""

    index: int
    text: str
    sentiment: SentimentScore | None = None
    error: str | None = Field(default=None, examples=[None])


class JobResults(BaseModel):
    job_id: str
    status: str
    total: int
    offset: int
    limit: int
    next_offset: int | None = Field(
        description="Where the next page starts; null once the job is finished and this page "
        "holds its last results",
        json_schema_extra={"nullable": True},
    )
    results: list[JobResultItem]


class JobLoopHealth(BaseModel):
    state: Literal["starting", "running", "retrying", "stopped"]
    error: str | None = Field(
        None, description="The class of the error the loop is retrying after, while it is"
    )


class QueueHealth(BaseModel):
    interactive_texts: int = Field(
        description="Texts of /predict calls waiting for a batch (a long text: its windows)"
    )
    interactive_tokens: int = Field(
        description="Their tokens, which admission control counts (MAX_QUEUED_TOKENS)"
    )
    bulk_texts: int = Field(
        description="Texts of batch jobs waiting for a batch (a long text: its windows)"
    )
    requests_in_flight: int = Field(description="Requests waiting or being scored")


class BackendCheckInfo(BaseModel):
    """What the start-up self-check of this worker found (runners/self_check.py)."""

    requested: str = Field(description="The back end BACKEND asks for")
    served: str = Field(description="The back end that scores texts in this worker")
    reason: str | None = Field(None, description="Why served differs from requested")
    probe_texts: int | None = Field(None, description="Probe texts scored; null: not checked")
    label_flips: int | None = Field(None, description="Probe labels int8 changed against fp32")
    max_label_flips: int | None = Field(None, description="The most the check allows")
    mean_probability_difference: float | None = None
    seconds: float | None = Field(None, description="What the check cost at start")
    cpu: dict[str, Any] = Field(
        description="The CPU this worker runs on, with the flags that matter"
    )


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    reason: str | None = Field(None, description="Why the status is not ok")
    model_loaded: bool
    backend: str = Field(description="The back end that serves (see backend_check)")
    backend_check: BackendCheckInfo
    model_version: str
    uptime_seconds: float
    jobs: JobLoopHealth
    queue: QueueHealth


class ModelInfo(BaseModel):
    name: str
    tag: str
    version: str
    backend: str = Field(description="The back end that serves (see backend_check)")
    labels: list[str]
    max_length: int
    source: str | None
    data_hash: str | None
    accuracy: dict[str, float] = Field(
        description="Test accuracy per domain of the back end that serves",
        examples=[{"tweets": 0.93, "amazon": 0.86, "amazon_reviews": 0.9, "nyt": 0.77}],
    )
    test_examples: dict[str, int] = Field(description="Size of each domain's test split")
    normalize_text: bool = Field(description="Whether texts are normalised as in training")
    window_aggregation: str = Field(description="How a long text's window scores are folded")
    metrics: dict[str, Any] = Field(
        description="Per domain, per back end: accuracy, F1, confusion matrix, agreement"
    )
    backend_check: BackendCheckInfo
    int8: dict[str, Any] | None = Field(
        None, description="The int8 graph's layout and its paired comparison with fp32 at build"
    )
    built_on: dict[str, Any] | None = Field(None, description="The CPU the model was built on")
