"""Grammar-constrained decoding on the tiny model (CPU): the record's schema accepts every
training answer token for token, and the random tiny model's answers under it are always JSON
valid against it, beside unconstrained rows that are left exactly as they were."""

import json

import jsonschema
import pytest

from medvl.engine.grammar import CLOSE_RESERVE, RECORD_FORMAT, GrammarError, ResponseFormat
from medvl.engine.scheduler import SamplingParams
from medvl.medical.documents import KINDS, benchmark_documents, generate_document, render_document
from medvl.medical.prompts import BENCHMARK_PROMPTS, EXTRACTION_PROMPT
from medvl.medical.records import RECORD_SCHEMA, is_valid_record, structured_result

from conftest import run_to_end


@pytest.fixture(scope="module")
def pages(engine):
    docs = benchmark_documents(99, 3)
    return [render_document(d) for d in docs], [BENCHMARK_PROMPTS[d.kind] for d in docs]


def test_the_record_grammar_accepts_every_training_answer_token_by_token(engine):
    """The schema derives from the record that writes the training answers: the two agree in
    keys, order and spacing, so a model that learned the answers is never masked away from them."""
    tokenizer = engine.processor.tokenizer
    end = engine.decoder.eos_ids[0]
    for index in range(25):
        answer = generate_document(index, KINDS[index % len(KINDS)]).target_answer()
        jsonschema.validate(json.loads(answer), RECORD_SCHEMA)
        row = engine.grammars.row(RECORD_FORMAT)
        for token in tokenizer(answer, add_special_tokens=False)["input_ids"] + [end]:
            assert row.accept(token), (answer, tokenizer.decode([token]))
        assert row.finished


def test_the_empty_object_is_not_a_record(engine):
    """Every key of the record is required (lists may be empty): ``{}`` is refused by the schema,
    by the record's validator and by the grammar /extract decodes under (after ``{`` the grammar
    allows no ``}``); the empty record with all its keys is accepted."""
    from medvl.medical.records import empty_structured

    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({}, RECORD_SCHEMA)
    assert not is_valid_record("{}") and is_valid_record(json.dumps(empty_structured()))
    tokenizer = engine.processor.tokenizer
    row = engine.grammars.row(RECORD_FORMAT)
    ids = tokenizer("{}", add_special_tokens=False)["input_ids"] + [engine.decoder.eos_ids[0]]
    assert not all(row.accept(token) for token in ids), tokenizer.convert_ids_to_tokens(ids)


def test_grammar_rows_answer_valid_json_beside_free_rows_that_stay_unchanged(engine, pages):
    images, prompts = pages
    free_alone = [engine.generate(engine.prepare(images[i], prompts[i]), SamplingParams(20)).token_ids for i in (1, 2)]
    extract = [engine.prepare(image, EXTRACTION_PROMPT) for image in images]
    grammar_alone = engine.generate(extract[0], SamplingParams(120, response_format=RECORD_FORMAT))
    mixed = [engine.submit(extract[0], SamplingParams(120, response_format=RECORD_FORMAT)),
             engine.submit(engine.prepare(images[1], prompts[1]), SamplingParams(20))]
    for _ in range(5):
        engine.run_once()  # the next rows join mid-answer
    mixed += [engine.submit(engine.prepare(images[2], prompts[2]), SamplingParams(20)),
              engine.submit(extract[1], SamplingParams(120, response_format=RECORD_FORMAT))]
    results = run_to_end(engine, mixed)
    assert [results[1].token_ids, results[2].token_ids] == free_alone
    assert results[0].token_ids == grammar_alone.token_ids  # masks follow their own row, whatever joins
    for result in (results[0], results[3]):
        jsonschema.validate(json.loads(result.text), RECORD_SCHEMA)
        assert result.finish_reason == "stop"
        assert structured_result(result.text)["parse_status"] == "json"
    assert engine.stats.grammar_masks > 0


NOTE_SCHEMA = {"type": "object", "properties": {"note": {"type": "string"}, "codes": {"type": "array", "items": {"type": "string"}}},
               "required": ["note", "codes"], "additionalProperties": False}


@pytest.mark.parametrize("budget", [CLOSE_RESERVE + 2, 60])
def test_a_budget_that_runs_out_still_closes_the_json(engine, pages, budget):
    """The random tiny model does not close a required string by itself (it writes until the
    budget ends); with CLOSE_RESERVE tokens left the row is steered to close, and the answer is
    valid JSON, marked closed_early. The record schema the same, from a budget with room for its
    required keys; below that the answer is cut at the budget and says so."""
    prompt = engine.prepare(pages[0][0], EXTRACTION_PROMPT)
    free = engine.generate(prompt, SamplingParams(4 * budget, response_format=ResponseFormat.json_schema(NOTE_SCHEMA)))
    assert free.generated_tokens > budget  # left alone, it would not have closed in time
    result = engine.generate(prompt, SamplingParams(budget, response_format=ResponseFormat.json_schema(NOTE_SCHEMA)))
    jsonschema.validate(json.loads(result.text), NOTE_SCHEMA)
    assert result.finish_reason == "stop" and result.generated_tokens <= budget and result.closed_early
    record = engine.generate(prompt, SamplingParams(budget, response_format=RECORD_FORMAT))
    jsonschema.validate(json.loads(record.text), RECORD_SCHEMA)
    for small in (2, 3):  # too few for every required key: cut at the budget, said so
        record = engine.generate(prompt, SamplingParams(small, response_format=RECORD_FORMAT))
        assert record.finish_reason == "length" and not is_valid_record(record.text)


def test_a_user_schema_and_json_object_are_followed_with_sampling(engine, pages):
    schema = {"type": "object", "properties": {"drug": {"type": "string"}, "dose_mg": {"type": "integer"},
                                               "route": {"enum": ["oral", "iv"]}},
              "required": ["drug", "dose_mg", "route"], "additionalProperties": False}
    prompt = engine.prepare(pages[0][0], "Name one drug as JSON.")
    for seed in (1, 2):
        result = engine.generate(prompt, SamplingParams(80, temperature=1.0, seed=seed,
                                                        response_format=ResponseFormat.json_schema(schema)))
        jsonschema.validate(json.loads(result.text), schema)
    result = engine.generate(prompt, SamplingParams(30, response_format=ResponseFormat.json_object()))
    assert isinstance(json.loads(result.text), dict)


@pytest.mark.parametrize("schema, words", [({"type": "bogus"}, "Invalid type: bogus"),
                                           ({"type": "string", "pattern": "(["}, "unclosed character class")])
def test_a_schema_that_does_not_compile_is_refused_at_submit(engine, pages, schema, words):
    prompt = engine.prepare(pages[0][0], "x")
    with pytest.raises(GrammarError, match=words):
        engine.submit(prompt, SamplingParams(5, response_format=ResponseFormat.json_schema(schema)))
    assert engine.num_waiting == 0
