"""What the demo prints: its progress lines, flushed at once (a step can run for minutes), and each
continuation of a held-out prompt, shown the same way for both of its models."""

from __future__ import annotations

from retlm.utils import quoted


def say(message: str) -> None:
    print(message, flush=True)


def show_continuation(title: str, document: str | None, prompt: str, continuation: str, reading: str) -> None:
    """``=== title (held out: document) ===``, the quoted prompt and continuation, then the heading of
    what the model read (``reading``), which the caller prints under it."""
    where = f" (held out: {document})" if document else ""
    say(f"\n=== {title}{where} ===")
    say(quoted(prompt))
    say("=== continuation ===")
    say(quoted(continuation))
    say(f"=== {reading} ===")
