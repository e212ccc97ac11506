"""Text as the model was trained to read it, applied identically in training and in serving.

Tweets carry things a WordPiece vocabulary reads badly: user names and links (noise that only
memorises), HTML entities as the feeds deliver them ("&amp;"), stretched words ("sooooo"), and
emoji, which the vocabulary of all-MiniLM-L6-v2 maps to [UNK] and so silently drops. Emoticons
such as ":)" and "<3" need nothing: their characters are in the vocabulary.
"""

from __future__ import annotations

import html
import re

import emoji

URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
MENTION = re.compile(r"(?<!\w)@\w+")
STRETCHED = re.compile(r"([^\W\d_])\1{2,}")  # a letter three or more times; digits stay


def normalize_text(text: str) -> str:
    """For example `@ann LOVE it sooooo much 😍 http://t.co/x` becomes
    `@user LOVE it soo much  smiling face with heart-eyes  http`."""
    text = html.unescape(text)
    text = URL.sub("http", text)
    text = MENTION.sub("@user", text)
    text = STRETCHED.sub(r"\1\1", text)
    if not text.isascii():  # emoji never are: most texts skip demojize's scan (~15 us each)
        text = emoji.demojize(text, delimiters=(" ", " "))
    return text.replace("_", " ")
