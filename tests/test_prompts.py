import pytest

from opsdc_megatron.prompts import PromptFileError, PromptRecord, load_prompts, prompt_opens_reasoning, write_prompts


def test_round_trip_keeps_extra_fields(tmp_path):
    records = [PromptRecord("1 + 1 ?", "2", {"level": 1}), PromptRecord("2 + 2 ?", "4")]
    write_prompts(tmp_path / "p.jsonl", records)
    assert load_prompts(tmp_path / "p.jsonl") == records
    assert not (tmp_path / "p.jsonl.tmp").exists()


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a", "answer": "1"}', '{"prompt": "b", "answer": '], r"p.jsonl:2: invalid JSON \(Expecting value at column 27\)"),
        (['{"prompt": "a"}'], r"p.jsonl:1: field 'answer' must be a string or an integer, got missing"),
        (['{"prompt": "a", "answer": true}'], r"p.jsonl:1: field 'answer' must be a string or an integer, got bool"),
        (['{"prompt": 3, "answer": "1"}'], r"p.jsonl:1: field 'prompt' must be a string, got int"),
        (['[1, 2]'], r"p.jsonl:1: expected a JSON object"),
        (['{"prompt": "a", "answer": "1"}', '{"prompt": "a\\ud800", "answer": "1"}'], r"p.jsonl:2: field 'prompt' holds an unpaired surrogate \\ud800"),
        ([""], r"no prompts"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PromptFileError, match=message):
        load_prompts(path)


def test_a_byte_order_mark_and_extra_fields_named_like_the_record_ones(tmp_path):
    """Editors on Windows open files with a BOM; `extra` keys never replace the prompt or answer."""
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "answer": "1"}\n')
    assert load_prompts(path) == [PromptRecord("a", "1")]
    write_prompts(path, [PromptRecord("real", "1", {"prompt": "overwritten", "level": 2})])
    assert load_prompts(path) == [PromptRecord("real", "1", {"level": 2})]


def test_an_integer_answer_is_its_text_as_in_the_benchmark_files(tmp_path):
    """`opsdc eval` read `"answer": 7` and `opsdc train` refused the same line."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "answer": 7}\n')
    assert load_prompts(path) == [PromptRecord("a", "7")]


def test_missing_file(tmp_path):
    with pytest.raises(PromptFileError, match="not found"):
        load_prompts(tmp_path / "nope.jsonl")


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(PromptFileError, match=r"p.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        load_prompts(path)


def test_tokenizer_needs_a_chat_template_and_pads_with_eos_without_a_pad_token(tmp_path):
    """Llama 3's tokenizers have no pad token; a base model's may have no chat template."""
    from opsdc_megatron.prompts import load_tokenizer
    from opsdc_megatron.toy.tokenizer import build_toy_tokenizer

    tokenizer = build_toy_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "no_pad")
    loaded = load_tokenizer(tmp_path / "no_pad")
    assert loaded.pad_token_id == loaded.eos_token_id is not None
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "no_template")
    with pytest.raises(PromptFileError, match=r"no_template: the tokenizer has no chat template"):
        load_tokenizer(tmp_path / "no_template")


def test_responses_stop_at_every_end_of_sequence_token_of_the_generation_config(tmp_path):
    """Qwen3's generation_config.json lists <|im_end|> and <|endoftext|>; the tokenizer names one."""
    import json

    from opsdc_megatron.prompts import stop_token_ids
    from opsdc_megatron.toy.tokenizer import build_toy_tokenizer

    tokenizer = build_toy_tokenizer()
    eos = tokenizer.eos_token_id
    assert stop_token_ids(tmp_path, tokenizer) == [eos]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos + 5, eos, eos + 7]}))
    assert stop_token_ids(tmp_path, tokenizer) == [eos, eos + 5, eos + 7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos + 5}))
    assert stop_token_ids(tmp_path, tokenizer) == [eos, eos + 5]
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [1,')
    with pytest.raises(PromptFileError, match=r"generation_config.json: invalid JSON"):
        stop_token_ids(tmp_path, tokenizer)


def test_prompt_tokens_do_not_depend_on_the_day():
    """Llama 3.1/3.2 chat templates write today's date (transformers' strftime_now) unless given a date_string:
    a run resumed the next day sampled from other prompt tokens."""
    import datetime
    from unittest import mock

    import transformers.utils.chat_template_utils as chat_template_utils

    from opsdc_megatron.prompts import CHAT_TEMPLATE_DATE, encode_prompt
    from opsdc_megatron.toy.tokenizer import build_toy_tokenizer

    tokenizer = build_toy_tokenizer()
    tokenizer.chat_template = (  # the date header of Llama 3.2 Instruct's template, then the messages
        "{%- if not date_string is defined %}{%- if strftime_now is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
        "{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}{%- endif %}"
        "{{ date_string }} {% for m in messages %}{{ m['content'] }}{% endfor %}"
    )

    def on(day: int) -> list[int]:
        class Clock(datetime.datetime):
            @classmethod
            def now(cls, tz=None):
                return datetime.datetime(2026, 11, day, 12, 0)

        with mock.patch.object(chat_template_utils, "datetime", Clock):
            return encode_prompt(tokenizer, "1 + 2")

    assert on(27) == on(28)
    assert tokenizer.decode(on(27)).startswith(CHAT_TEMPLATE_DATE.split()[0])


def test_a_chat_template_that_opens_the_reasoning_block_is_seen():
    """Qwen3-Thinking-2507's generation prompt ends with `<think>`: its responses start inside the block, and the
    scorer must not read a response cut off there as answered (eval.scoring.final_part)."""
    from opsdc_megatron.toy.tokenizer import CHAT_TEMPLATE, build_toy_tokenizer

    tokenizer = build_toy_tokenizer()
    tokenizer.add_tokens(["<think>", "</think>"])
    assert not prompt_opens_reasoning(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE.replace("<|assistant|>{% endif %}", "<|assistant|> <think>{% endif %}")
    assert prompt_opens_reasoning(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE.replace("<|assistant|>{% endif %}", "<|assistant|> <think> </think>{% endif %}")
    assert not prompt_opens_reasoning(tokenizer)  # a template that switches thinking off closes the block


def test_the_teachers_instruction_takes_the_place_of_dapos_task_header():
    """As the paper's teacher prompt: the instruction (with its answer-format line), the problem, DAPO's closing line.
    Prepended to the published message it told the teacher to answer "concisely" and then "step by step", with the
    format line twice. A prompt without such a header gets the instruction in front."""
    from pathlib import Path

    from opsdc_megatron.config import PAPER_INSTRUCTION_V1
    from opsdc_megatron.eval.datasets import load_dataset_file
    from opsdc_megatron.prompts import user_message

    _, records = load_dataset_file(Path(__file__).parent / "data" / "dapo_math_17k_sample.parquet", "auto")
    for record in records:
        problem_and_closing = record.prompt.split("\n\n", 1)[1]
        assert user_message(record.prompt) == record.prompt  # the student's: as published
        assert user_message(record.prompt, PAPER_INSTRUCTION_V1) == f"{PAPER_INSTRUCTION_V1}\n\n{problem_and_closing}"
        teacher = user_message(record.prompt, PAPER_INSTRUCTION_V1)
        assert "step by step" not in teacher and teacher.count("The last line of your response") == 1
    assert user_message("What is 2 + 2?", "Be brief.") == "Be brief.\n\nWhat is 2 + 2?"


def test_a_student_prompt_longer_than_the_teachers_is_held_to_the_limit_too(tmp_path):
    """The teacher's instruction replaces DAPO's task header (prompts.user_message): with an instruction shorter
    than that header the student's prompt is the longer one, and only the teacher's was held to
    data.max_prompt_tokens; a longer student prompt passed the start and broke a micro-batch's token budget later."""
    from opsdc_megatron.config import load_config
    from opsdc_megatron.prompts import TASK_HEADERS, encode_prompt
    from opsdc_megatron.toy.tokenizer import build_toy_tokenizer
    from opsdc_megatron.train.prompt_stream import PromptStream, PromptTooLongError

    tokenizer = build_toy_tokenizer()
    prompt = f"{TASK_HEADERS[0]}\n\nwhat is 2 + 3 ?"
    student, teacher = encode_prompt(tokenizer, prompt), encode_prompt(tokenizer, prompt, "be brief")
    assert len(student) > len(teacher)
    def config(limit: int):
        return load_config("recipes/toy_cpu.yaml", [f"out_dir={tmp_path}", "model.hf_path=m", "data.train_prompts=p.jsonl", "eval.every_steps=0",
                                                     "distill.instruction=be brief", f"data.max_prompt_tokens={limit}"])

    with pytest.raises(PromptTooLongError, match=rf"prompt 1 is {len(student)} tokens as the student's and {len(teacher)} with the teacher's instruction: more than data.max_prompt_tokens = {len(teacher)}$"):
        PromptStream([PromptRecord(prompt, "5")], tokenizer, config(len(teacher)))
    assert PromptStream([PromptRecord(prompt, "5")], tokenizer, config(len(student))).prompts[0].student_ids == student
