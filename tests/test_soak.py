"""The soak test's short form: the real tiny server under the randomized mix of bench/soak.py
(pages and text-only chats, answers up to exactly the context left and over it, streamed and
not, hang-ups, overload bursts). Every request ends with the status its kind allows, none hangs,
no 5xx but 503 overloaded, and /health stays 200 throughout. The long form is
``python bench/soak.py --seconds 600``."""

from bench.soak import run
from medvl.core.settings import load_settings
from medvl.http.validate import running_server


def test_a_short_soak_ends_every_request_with_its_status(phases_1_2):
    context = load_settings("tiny").decode.max_cache_len
    extra = ["--set", "decode.max_waiting=6", "--max-new-tokens", "64"]
    with running_server(phases_1_2, extra_args=extra) as base:
        result = run(base, context, seconds=45, clients=4, seed=1)
    assert result["errors"] == 0, result["error_examples"]
    outcomes = result["outcomes"]
    assert result["requests"] >= 20 and outcomes.get("health: 200", 0) >= 30
    assert any(k.endswith(": 200") and "stream" in k for k in outcomes)  # streams ran to [DONE]
    assert set(k.split(": ", 1)[1] for k in outcomes) <= {"200", "400 over the context", "503 overloaded", "hung up"}
