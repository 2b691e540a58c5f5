"""Prompt templates: the teacher's instruction prompt and the student's training format."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from cot.errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[1]
TEACHER_TEMPLATE = REPO_ROOT / "templates" / "prompts" / "teacher.txt"
STUDENT_TEMPLATE = REPO_ROOT / "templates" / "prompts" / "student.txt"


@lru_cache(maxsize=16)
def load_template(path: str | Path) -> str:
    """Read a prompt template, dropping the leading ``# `` comment lines and the final newline.

    Raises:
        ValueError: the file does not exist or has no ``{question}`` placeholder.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"prompt template {p} not found")
    lines = p.read_text(encoding="utf-8").splitlines()
    # A comment is "#" alone or "# text"; "### Question:" is part of the seed's format.
    while lines and (lines[0] == "#" or lines[0].startswith("# ")):
        lines.pop(0)
    text = "\n".join(lines)
    if "{question}" not in text:
        raise InputError(f"prompt template {p} has no {{question}} placeholder")
    return text


def render(template: str, question: str) -> str:
    """Fill a template; only ``{question}`` is substituted, other braces stay as written."""
    return template.replace("{question}", question)


def next_turn_stop(template: str) -> str | None:
    """The stop string that ends a raw completion where the model would start the next question.

    A base model continuing a raw prompt writes the answer and then, as often as not, a new
    ``Q: ...`` of its own. The marker is what the template writes before ``{question}``: the
    text before it on its line (``Q:``), or else the nearest non-empty line above
    (``### Question:``), preceded by a newline. None when the template has neither.
    """
    head = template.split("{question}", 1)[0] if "{question}" in template else ""
    lines = head.split("\n")
    marker = lines[-1].strip() or next((x.strip() for x in reversed(lines[:-1]) if x.strip()), "")
    return "\n" + marker if marker else None


def prompt(template: str, question: str) -> str:
    """A full prompt: the template filled in, ending in a newline where the model continues."""
    return render(template, question) + "\n"


def student_prompt(question: str) -> str:
    """The seed's student format up to the answer: ``### Question:`` ... ``### Answer:``."""
    return prompt(load_template(STUDENT_TEMPLATE), question)


PROMPT_FORMATS = ("auto", "raw", "chat")


def resolve_format(fmt: str, tokenizer: Any | None) -> str:
    """``raw`` or ``chat`` for ``--prompt-format``: ``auto`` is chat when the tokenizer has a
    chat template (and when there is no local tokenizer to ask, as with a remote server)."""
    if fmt not in PROMPT_FORMATS:
        raise InputError(f"prompt format must be one of {list(PROMPT_FORMATS)}, got {fmt!r}")
    if fmt != "auto":
        if (
            fmt == "chat"
            and tokenizer is not None
            and not getattr(tokenizer, "chat_template", None)
        ):
            name = getattr(tokenizer, "name_or_path", "the tokenizer")
            raise InputError(
                f"--prompt-format chat: {name} has no chat template (use --prompt-format raw)"
            )
        return fmt
    if tokenizer is None:
        return "chat"
    return "chat" if getattr(tokenizer, "chat_template", None) else "raw"


def as_prompt(text: str, fmt: str) -> str | list[dict[str, str]]:
    """The filled-in template as sent: raw text, or the one user message of a chat."""
    return [{"role": "user", "content": text}] if fmt == "chat" else text


def teacher_prompt(template: str, question: str, fmt: str) -> str | list[dict[str, str]]:
    """The teacher's prompt, verbatim: the template filled in, as raw text or the user message."""
    return as_prompt(render(template, question), fmt)
