"""Raw prompts stop where the template's next question would start; chat turns do not."""

from __future__ import annotations

from cot.engines import Decoding, ServerEngine
from cot.prompts import TEACHER_TEMPLATE, load_template
from jobs.engine import stop_at_next_turn


def test_raw_prompts_get_the_templates_marker_as_stop_chat_prompts_none() -> None:
    template = load_template(TEACHER_TEMPLATE)
    raw = ServerEngine("http://127.0.0.1:9", "m", Decoding(max_new_tokens=8))
    stop_at_next_turn(raw, template, "raw")
    assert raw.decoding.stop == ("\nQ:",) and raw.decoding.max_new_tokens == 8
    chat = ServerEngine("http://127.0.0.1:9", "m", Decoding(max_new_tokens=8))
    stop_at_next_turn(chat, template, "chat")
    assert chat.decoding.stop == ()
