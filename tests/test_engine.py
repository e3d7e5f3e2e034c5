"""The continuous-batching engine on the tiny model (CPU): rows join and leave independently and
each gets exactly what it gets alone; cancelled requests free their slots; sampling repeats."""

import re
import threading
import time

import pytest
import torch

from medvl.engine.scheduler import Overloaded, PromptTooLong, SamplingParams
from medvl.medical.documents import benchmark_documents, render_document
from medvl.medical.prompts import BENCHMARK_PROMPTS
from medvl.model.loading import load_model

from conftest import run_to_end


@pytest.fixture(scope="module")
def prompts(engine):
    docs = benchmark_documents(1234, 3)
    return [engine.prepare(render_document(d), BENCHMARK_PROMPTS[d.kind]) for d in docs]


def test_a_request_that_joins_mid_answer_gets_its_tokens_alone(engine, prompts):
    alone = [engine.generate(p, SamplingParams(30)).token_ids for p in prompts]
    first = engine.submit(prompts[0], SamplingParams(30))
    for _ in range(6):  # the first is mid-answer when the others arrive, one of them later still
        engine.run_once()
    second = engine.submit(prompts[1], SamplingParams(30))
    engine.run_once()
    engine.run_once()
    third = engine.submit(prompts[2], SamplingParams(30))
    results = run_to_end(engine, [first, second, third])
    assert [r.token_ids for r in results] == alone


def test_rows_of_different_lengths_end_independently(engine, prompts):
    """Three rows with their own max_tokens: each ends at its own length (the others go on), and
    the request arriving after the short one ended takes its slot and still gets its own answer."""
    alone = engine.generate(prompts[2], SamplingParams(25, ignore_eos=True)).token_ids
    requests = [engine.submit(p, SamplingParams(n, ignore_eos=True)) for p, n in zip(prompts, (3, 25, 12), strict=True)]
    while not requests[0].future.done():
        engine.run_once()
    assert not requests[1].future.done() and engine.num_running == 2
    late = engine.submit(prompts[2], SamplingParams(25, ignore_eos=True))
    results = run_to_end(engine, [*requests, late])
    assert [r.generated_tokens for r in results] == [3, 25, 12, 25]
    assert [r.finish_reason for r in results] == ["length"] * 4
    assert results[3].token_ids == alone


def test_stop_strings_end_a_row_before_the_string(engine, prompts):
    full = engine.generate(prompts[0], SamplingParams(20, ignore_eos=True)).text
    stop = full[6:9]
    result = engine.generate(prompts[0], SamplingParams(20, ignore_eos=True, stop=(stop,)))
    assert result.finish_reason == "stop" and result.text == full[: full.find(stop)]


def test_seeded_sampling_repeats_and_other_seeds_differ(engine, prompts):
    def sample(seed):
        return engine.generate(prompts[1], SamplingParams(20, temperature=1.0, top_p=0.9, seed=seed)).token_ids

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_a_temperature_near_zero_samples_the_greedy_token(engine, prompts):
    """temperature=1e-300 (a fuzzer sent it) divides logits into +-inf: sampling must stay
    defined, and then it is the argmax."""
    greedy = engine.generate(prompts[1], SamplingParams(10)).token_ids
    assert engine.generate(prompts[1], SamplingParams(10, temperature=1e-300, seed=1)).token_ids == greedy


def test_cancelled_requests_free_their_slots(engine, prompts):
    """Fill every slot with long answers from a worker thread, cancel them all: the next 16
    requests are all answered, and no slot is left running."""
    engine.start()
    try:
        long = [engine.submit(prompts[i % 3], SamplingParams(600, ignore_eos=True)) for i in range(4)]
        deadline = time.monotonic() + 60
        while engine.num_running < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.num_running == 4
        for request in long:
            request.cancel()
        results = [engine.submit(prompts[i % 3], SamplingParams(5)).future.result(timeout=120) for i in range(16)]
        assert len(results) == 16 and all(0 < r.generated_tokens <= 5 for r in results)
        assert [r.future.result().finish_reason for r in long] == ["cancelled"] * 4
        assert all(len(r.future.result().token_ids) < 600 for r in long)
    finally:
        engine.stop()
        engine._thread = None  # the other tests drive the loop themselves
    assert engine.num_running == 0


def test_a_full_queue_and_a_too_long_request_are_refused_at_once(engine, prompts):
    with pytest.raises(PromptTooLong, match="decode.max_cache_len"):
        engine.submit(prompts[0], SamplingParams(engine.decoder.max_cache_len))
    queued = [engine.submit(prompts[0], SamplingParams(2)) for _ in range(engine.max_waiting)]
    with pytest.raises(Overloaded):
        engine.submit(prompts[0], SamplingParams(2))
    run_to_end(engine, queued)


def test_a_failing_prefill_fails_only_its_own_request(engine, prompts):
    """A prompt whose image tensors are broken is prefilled beside two good ones: the batch is
    retried one by one, the broken request fails and the others answer as alone."""
    alone = [engine.generate(p, SamplingParams(8)).token_ids for p in prompts[:2]]
    images = "image_embeds" if "image_embeds" in prompts[2].tensors else "pixel_values"
    broken = type(prompts[2])({**prompts[2].tensors, images: prompts[2].tensors[images][:7]})
    requests = [engine.submit(prompts[0], SamplingParams(8)), engine.submit(broken, SamplingParams(8)),
                engine.submit(prompts[1], SamplingParams(8))]
    while not all(r.future.done() for r in requests):
        engine.run_once()
    engine.drain()
    assert requests[1].future.exception() is not None
    assert [requests[0].future.result().token_ids, requests[2].future.result().token_ids] == alone


def test_streaming_text_is_the_answer(engine, prompts):
    """The pieces join into the answer, and their log-probabilities into the answer's."""
    pieces: list[str] = []
    entries: list = []
    lock = threading.Lock()

    def on_text(piece, logprobs):
        with lock:
            pieces.append(piece)
            entries.extend(logprobs)

    request = engine.submit(prompts[0], SamplingParams(20, ignore_eos=True, logprobs=2), on_text)
    (result,) = run_to_end(engine, [request])
    assert "".join(pieces) == result.text and len(pieces) > 1
    assert entries == result.logprobs and len(entries) == result.generated_tokens


def test_engine_matches_plain_generate(tiny_model_dir, tiny_settings, engine, prompts):
    """The engine's greedy answer is transformers' greedy generate on the same prompt (its
    inputs made by the processor here: the engine's prompt holds image embeddings, made when it
    was prepared, where generate takes the pixels)."""
    model = load_model(tiny_model_dir, tiny_settings, batched_vision=False)
    doc = benchmark_documents(1234, 1)[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": BENCHMARK_PROMPTS[doc.kind]}]}]
    text = engine.processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = dict(engine.processor(text=[text], images=[render_document(doc)], return_tensors="pt"))
    assert "image_embeds" in prompts[0].tensors and "pixel_values" not in prompts[0].tensors
    assert torch.equal(inputs["input_ids"], prompts[0].tensors["input_ids"])
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = set(model.generation_config.eos_token_id)
    expected = expected[: next((i + 1 for i, t in enumerate(expected) if t in eos), len(expected))]
    assert engine.generate(prompts[0], SamplingParams(20)).token_ids == expected


def test_prompts_at_the_exact_limit_prefilled_together_stay_inside_their_slots(engine, prompts):
    """Issue 30's reproduction: text-only chats (prompt + max_tokens = max_cache_len exactly)
    prefilled together with a page (far longer prompt) once wrote from the batch's padded width
    and ran past the cache (IndexError on a CPU, a device-side assert on a GPU). Here each row
    writes from its own length. The page fits exactly too and ends first, from the last slot:
    the step over the 4-slot bucket that still computes its freed slot writes inside it."""
    limit = engine.decoder.max_cache_len
    chat = engine.prepare(None, "Name one drug and its dose.")
    page = prompts[0]
    assert chat.length < page.length and limit - page.length < limit - chat.length
    chat_alone = engine.generate(chat, SamplingParams(limit - chat.length, ignore_eos=True)).token_ids
    page_alone = engine.generate(page, SamplingParams(limit - page.length, ignore_eos=True)).token_ids
    requests = [engine.submit(chat, SamplingParams(limit - chat.length, ignore_eos=True)) for _ in range(3)]
    requests.append(engine.submit(page, SamplingParams(limit - page.length, ignore_eos=True)))
    engine.run_once()
    assert engine.stats.prefill_rows >= 4 and engine.num_running == 4  # one prefill, padded to the page
    results = run_to_end(engine, requests)
    assert [r.finish_reason for r in results] == ["length"] * 4
    assert [r.generated_tokens for r in results] == [limit - chat.length] * 3 + [limit - page.length]
    assert all(r.token_ids == chat_alone for r in results[:3]) and results[3].token_ids == page_alone
    assert int(engine.decoder.write_at.max()) <= limit


def test_a_cancelled_waiting_request_leaves_the_queue_at_once(engine, prompts):
    """A request that times out while it waits no longer holds a place under max_waiting (it
    once did until it reached the head of the queue, causing 503s during the overload that made
    it time out)."""
    requests = [engine.submit(prompts[i % 3], SamplingParams(4)) for i in range(6)]
    assert engine.num_waiting == 6
    requests[5].cancel()
    assert engine.num_waiting == 5 and requests[5].future.result().finish_reason == "cancelled"
    results = run_to_end(engine, requests[:5])
    assert [r.finish_reason for r in results] == ["length"] * 5


def test_a_failing_step_kills_the_engine_loudly(tiny_model_dir, tiny_settings, prompts):
    """vLLM's EngineDeadError behaviour: a decoding step that raises (on a GPU, a device-side
    assert poisons the CUDA context) fails every running and waiting request with EngineDead,
    refuses every later one, and ends the loop thread, instead of logging and going on."""
    from medvl.engine.loader import build_engine
    from medvl.engine.scheduler import EngineDead
    from medvl.model.loading import load_processor

    engine = build_engine(load_model(tiny_model_dir, tiny_settings), load_processor(tiny_model_dir, None),
                          tiny_settings.decode, slots=2)
    calls = {"n": 0}
    step = engine.decoder.step

    def failing_step(rows):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("CUDA error: device-side assert triggered (injected)")
        return step(rows)

    engine.decoder.step = failing_step
    engine.start()
    requests = [engine.submit(prompts[i], SamplingParams(20, ignore_eos=True)) for i in range(3)]  # one waits
    for request in requests:
        with pytest.raises(EngineDead, match="injected"):
            request.future.result(timeout=120)
    engine._thread.join(timeout=10)
    assert not engine._thread.is_alive() and engine.dead is not None
    with pytest.raises(EngineDead):
        engine.submit(prompts[0], SamplingParams(4))


def test_metrics_read_as_a_serving_engineer_reads_them(engine, prompts):
    """Cache usage counts reserved slots (a row holds its whole slot: every slot taken reads 1,
    where the token count read ~0.6), tokens filled are a second gauge, the engine's totals are
    counters, and engine metrics carry the model_name label vLLM's dashboards filter on."""
    from medvl.http.metrics import ServerMetrics

    metrics = ServerMetrics("medvl-test")
    requests = [engine.submit(prompts[i % 3], SamplingParams(8)) for i in range(4)]
    engine.run_once()
    text = metrics.render(engine)
    assert 'medvl_kv_cache_usage_perc{model_name="medvl-test"} 1.0' in text  # 4 rows in 4 slots
    filled = float(next(line.split()[-1] for line in text.splitlines()
                        if line.startswith("medvl_kv_cache_filled_perc{")))
    assert 0 < filled < 1
    assert re.search(r"# TYPE medvl_engine_prefills(_total)? counter", text)
    assert 'medvl_engine_prefills_total{model_name="medvl-test"}' in text
    assert 'medvl_num_requests_running{model_name="medvl-test"} 4.0' in text
    run_to_end(engine, requests)
    assert 'medvl_kv_cache_usage_perc{model_name="medvl-test"} 0.0' in metrics.render(engine)


def test_the_vision_tower_at_preparation_or_in_the_prefill_gives_the_same_answers(tiny_model_dir, tiny_settings,
                                                                                   engine, prompts):
    """decode.vision_in_prepare moves the tower out of the engine's loop; it must change nothing
    else: the same tokens, alone and prefilled together, as with the tower inside the prefill."""
    from dataclasses import replace

    from medvl.engine.loader import build_engine
    from medvl.model.loading import load_processor

    inside = build_engine(load_model(tiny_model_dir, tiny_settings), load_processor(tiny_model_dir, None),
                          replace(tiny_settings.decode, vision_in_prepare=False), slots=4)
    docs = benchmark_documents(1234, 3)
    plain = [inside.prepare(render_document(d), BENCHMARK_PROMPTS[d.kind]) for d in docs]
    assert "pixel_values" in plain[0].tensors and "image_embeds" not in plain[0].tensors
    together = [inside.submit(p, SamplingParams(12)) for p in plain]
    expected = [r.token_ids for r in run_to_end(inside, together)]
    early = [engine.submit(p, SamplingParams(12)) for p in prompts]
    assert [r.token_ids for r in run_to_end(engine, early)] == expected


def test_a_prompt_prefilled_in_chunks_between_steps_gets_its_tokens_alone(tiny_model_dir, tiny_settings, prompts):
    """Chunked prefill (decode.max_prefill_tokens=128): two chats fill most of the first turn's
    budget and start decoding; the page behind them gets the rest, then 128 tokens a turn with a
    decoding step between chunks. The short chat ends while the page is still partial, so the
    page's half-filled slot moves down to keep the rows packed. Every answer is its answer alone."""
    from dataclasses import replace

    from medvl.engine.loader import build_engine
    from medvl.model.loading import load_processor

    chunked = build_engine(load_model(tiny_model_dir, tiny_settings), load_processor(tiny_model_dir, None),
                           replace(tiny_settings.decode, max_prefill_tokens=128), slots=4)
    docs = benchmark_documents(1234, 1)
    page = chunked.prepare(render_document(docs[0]), BENCHMARK_PROMPTS[docs[0].kind])
    chats = [chunked.prepare(None, "Name one drug."), chunked.prepare(None, "Give a dose, briefly.")]
    assert sum(c.length for c in chats) < 128 and page.length > 2 * 128
    budgets = [SamplingParams(2, ignore_eos=True), SamplingParams(30, ignore_eos=True), SamplingParams(12, ignore_eos=True)]
    alone = [chunked.generate(p, b).token_ids for p, b in zip([*chats, page], budgets, strict=True)]
    moves = []
    move = chunked.decoder.move
    chunked.decoder.move = lambda source, target: (moves.append((source, target)), move(source, target))
    requests = [chunked.submit(p, b) for p, b in zip([*chats, page], budgets, strict=True)]
    chunked.run_once()
    assert chunked.num_running == 2 and chunked.prefilling is requests[2] and requests[2].slot == 2
    assert requests[2].prefilled == 128 - sum(c.length for c in chats)
    results = run_to_end(chunked, requests)
    assert (2, 1) in moves  # the partial page followed the rows down when the short chat ended
    assert chunked.stats.prefills >= page.length // 128
    assert [r.token_ids for r in results] == alone
    assert [r.generated_tokens for r in results] == [2, 30, 12]


def test_pages_waiting_for_the_vision_tower_share_one_call(engine):
    """Three pages prepared by three threads while the tower is busy (its lock held here): the
    first thread to get it runs all three in one call, and each page's embeddings are the ones
    it gets alone. If that shared call fails, each page is retried alone: none fails for another."""
    docs = benchmark_documents(1234, 3)
    images = [render_document(d) for d in docs]
    alone = [engine.prepare(image, "Read.").tensors["image_embeds"] for image in images]
    model = engine.decoder.base.model
    tower = model.get_image_features

    def prepare_three_at_once(fail_batches: bool) -> tuple[list[int], dict]:
        calls: list[int] = []

        def counted(pixels, grid, **kwargs):
            calls.append(int(grid.shape[0]))
            if fail_batches and grid.shape[0] > 1:
                raise RuntimeError("a batch failed (injected)")
            return tower(pixels, grid, **kwargs)

        model.get_image_features = counted
        results: dict = {}
        with engine._vision_lock:
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, engine.prepare(images[i], "Read.")))
                       for i in range(3)]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 30
            while len(engine._vision_queue) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
        for thread in threads:
            thread.join(timeout=60)
        return calls, results

    try:
        for fail_batches, expected_calls in ((False, [3]), (True, [3, 1, 1, 1])):
            calls, results = prepare_three_at_once(fail_batches)
            assert calls == expected_calls
            for i in range(3):
                torch.testing.assert_close(results[i].tensors["image_embeds"], alone[i])
    finally:
        model.get_image_features = tower


def test_log_probabilities_come_with_every_token(engine, prompts):
    """logprobs=3: one entry per generated token, streamed rows and plain alike; a greedy token is
    the most likely one, its log-probability the first alternative's; alternatives are in
    descending order; under a grammar (a JSON object) every alternative is a token the grammar
    allowed (finite), and the probabilities are among those; a sampled token has a finite one."""
    import math

    from medvl.engine.grammar import ResponseFormat

    requests = [engine.submit(prompts[0], SamplingParams(12, logprobs=3)),
                engine.submit(prompts[1], SamplingParams(12, logprobs=3, response_format=ResponseFormat.json_object())),
                engine.submit(prompts[2], SamplingParams(12, logprobs=0, temperature=1.0, seed=3)),
                engine.submit(prompts[0], SamplingParams(12))]
    greedy, grammar, sampled, plain = run_to_end(engine, requests)
    assert plain.logprobs is None and greedy.token_ids == plain.token_ids
    for result in (greedy, grammar):
        assert [e.token for e in result.logprobs] == result.token_ids
        for entry in result.logprobs:
            assert len(entry.top) == 3 and entry.top[0][0] == entry.token
            assert entry.logprob == pytest.approx(entry.top[0][1], abs=1e-5) and entry.logprob <= 0
            assert [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True)
    assert all(math.isfinite(v) for entry in grammar.logprobs for _, v in entry.top) or any(
        math.isinf(v) for entry in grammar.logprobs for _, v in entry.top[1:])  # fewer than 3 allowed: -inf after them
    assert sum(math.exp(v) for _, v in grammar.logprobs[0].top) <= 1 + 1e-5
    assert [e.token for e in sampled.logprobs] == sampled.token_ids
    assert all(math.isfinite(e.logprob) and e.top == () for e in sampled.logprobs)


def test_a_record_answer_gets_a_confidence_for_every_field_it_fills(engine, prompts):
    """The lab page decoded under the record's grammar with log-probabilities: every non-empty
    field gets a confidence in (0, 1], placed on the field's own characters (the tokens' bytes make
    the answer), and a field's confidence is the product of its tokens' probabilities."""
    from medvl.engine.grammar import RECORD_FORMAT
    from medvl.engine.tokens import answer_tokens
    from medvl.medical.confidence import field_confidences, value_spans

    result = engine.generate(prompts[1], SamplingParams(300, response_format=RECORD_FORMAT, logprobs=0))
    tokens = answer_tokens(engine.processor.tokenizer, result.logprobs)
    assert b"".join(raw for raw, _ in tokens) == result.text.encode()
    confidences = field_confidences(result.text, tokens)
    filled = [p for p, a, b in value_spans(result.text) if b > a]
    assert filled and sorted(confidences) == sorted(filled)
    assert all(0 < c <= 1 for c in confidences.values())
    assert min(confidences.values()) < 0.999  # random weights: some field is not sure
