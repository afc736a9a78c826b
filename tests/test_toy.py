"""The toy task, its tokenizer and the base-model builder (a few tiny steps, not the real recipe)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opsdc_megatron.eval.scoring import score
from opsdc_megatron.prompts import encode_prompt
from opsdc_megatron.toy import task
from opsdc_megatron.toy.base_model import BUILD_INFO, BuildSettings, build_base_model, ensure_base_model, recipe_hash
from opsdc_megatron.toy.task import (
    TOY_INSTRUCTION,
    apply_op,
    concise_solution,
    final_answer,
    make_problem,
    split_of,
    toy_prompts,
    verbose_solution,
)
from opsdc_megatron.toy.tokenizer import build_toy_tokenizer

_EQUATION = re.compile(r"(\d+) ([+*-]) (\d+) = (\d+)")
_OPS = {"+": "add", "-": "sub", "*": "double"}


def wrong_equations(solution: str) -> int:
    return sum(apply_op(int(a), (_OPS[s], int(b))) != int(c) for a, s, b, c in _EQUATION.findall(solution))


def problems(seed: int, count: int) -> list[task.ToyProblem]:
    rng = random.Random(seed)
    return [make_problem(rng, rng.choice(task.LEVELS)) for _ in range(count)]


# --- task -------------------------------------------------------------------------------------------


def test_problems_are_deterministic_and_bounded() -> None:
    assert problems(3, 50) == problems(3, 50)
    assert problems(3, 50) != problems(4, 50)
    for problem in problems(0, 500):
        assert len(problem.ops) == problem.level
        value = problem.start
        for op in problem.ops:
            value = apply_op(value, op)
            assert 0 <= value <= task.MAX_VALUE
        assert value == problem.answer
        assert problem.question.endswith("?")


def test_make_problem_rejects_bad_levels() -> None:
    with pytest.raises(ValueError):
        make_problem(random.Random(0), 0)


def test_toy_prompts_deterministic_distinct_and_split_disjoint() -> None:
    train = toy_prompts(seed=0, count=400, split="train")
    heldout = toy_prompts(seed=0, count=200, split="heldout")
    assert train == toy_prompts(seed=0, count=400, split="train")
    assert toy_prompts(seed=1, count=50, split="heldout") != heldout[:50]
    train_questions, heldout_questions = {r.prompt for r in train}, {r.prompt for r in heldout}
    assert len(train_questions) == 400 and len(heldout_questions) == 200
    assert not train_questions & heldout_questions
    # the split is a property of the question text, whatever seed drew it
    assert all(split_of(q) == "heldout" for q in heldout_questions)
    assert not {r.prompt for r in toy_prompts(seed=7, count=400, split="train")} & heldout_questions
    assert {r.extra["level"] for r in heldout} == set(task.LEVELS)
    with pytest.raises(ValueError):
        toy_prompts(seed=0, count=1, split="test")


def test_prompt_answers_are_the_gold_answers() -> None:
    for record in toy_prompts(seed=2, count=50, split="heldout"):
        assert record.answer.isdigit()
        assert isinstance(record.extra["level"], int)


def test_concise_solution_ends_with_gold_answer() -> None:
    for problem in problems(1, 200):
        solution = concise_solution(problem)
        assert solution.endswith(f"Answer : {problem.answer}")
        assert wrong_equations(solution) == 0
        assert solution.count("=") == problem.level


def test_verbose_without_slips_ends_with_gold_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(task, "SLIP_RATE", 0.0)
    rng = random.Random(5)
    for problem in problems(1, 200):
        solution = verbose_solution(problem, rng)
        assert solution.endswith(f"Answer : {problem.answer}")
        assert wrong_equations(solution) == 0


def test_verbose_slips_happen_at_a_plausible_rate_and_propagate() -> None:
    rng = random.Random(11)
    wrong = verifications = 0
    sample = problems(2, 2000)
    for problem in sample:
        solution = verbose_solution(problem, rng)
        slips = wrong_equations(solution)
        if slips == 0:
            assert final_answer(solution) == problem.answer
        elif slips == 1:  # one slip always changes the result: every operation is injective
            assert final_answer(solution) != problem.answer
        wrong += final_answer(solution) != problem.answer
        verifications += len(re.findall(r"\b(wait|hmm) ,", solution))
    steps = sum(p.level for p in sample)
    assert abs(verifications / steps - task.VERIFY_RATE) < 0.03
    assert abs(wrong / verifications - task.SLIP_RATE) < 0.03  # per-check slip rate
    assert 0.1 < wrong / len(sample) < 0.4


def test_verbose_decisions_are_spread_over_the_response() -> None:
    rng = random.Random(3)
    positions = set()
    for problem in problems(4, 300):
        solution = verbose_solution(problem, rng)
        steps = solution.split(" . ")
        positions.update(i for i, part in enumerate(steps) if part.startswith(("wait", "hmm")))
        assert solution.startswith("let me restate the problem")
        assert len(solution.split()) > 2 * len(concise_solution(problem).split())
    assert len(positions) >= 5  # re-checks occur after many different steps, not at one fixed place


# --- tokenizer --------------------------------------------------------------------------------------


def test_tokenizer_covers_every_text_and_round_trips() -> None:
    tokenizer = build_toy_tokenizer()
    rng = random.Random(0)
    for problem in problems(6, 300):
        for text in (problem.question, concise_solution(problem), verbose_solution(problem, rng), TOY_INSTRUCTION):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids, text
            assert len(ids) == len(text.split())
            assert tokenizer.decode(ids) == text
    for number in range(task.MAX_NUMBER + 1):
        assert len(tokenizer(str(number), add_special_tokens=False)["input_ids"]) == 1


def test_chat_template_plain_vs_instructed() -> None:
    tokenizer = build_toy_tokenizer()
    prompt = "tom has 7 apples . tom finds 3 apples . how many apples does tom have now ?"
    plain = encode_prompt(tokenizer, prompt)
    instructed = encode_prompt(tokenizer, prompt, TOY_INSTRUCTION)
    instruction_ids = tokenizer(TOY_INSTRUCTION, add_special_tokens=False)["input_ids"]
    assert plain[0] == tokenizer.bos_token_id
    assert tokenizer.convert_ids_to_tokens(plain[1]) == "<|user|>"
    assert tokenizer.convert_ids_to_tokens(plain[-1]) == "<|assistant|>"
    assert instructed == plain[:2] + instruction_ids + plain[2:]
    assert len(instruction_ids) == 3
    assert tokenizer.decode(plain, skip_special_tokens=True) == prompt

    response = tokenizer("7 + 3 = 10 . Answer : 10", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    text = tokenizer.decode(response, skip_special_tokens=True)
    assert text == "7 + 3 = 10 . Answer : 10"
    assert score(text, "10")
    conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": "7 + 3 = 10 . Answer : 10"}]
    full = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
    assert list(full) == plain + response


def test_tokenizer_saves_and_loads_offline(tmp_path: Path) -> None:
    tokenizer = build_toy_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    prompt = "ann has 2 cards . ann doubles the cards . how many cards does ann have now ?"
    assert encode_prompt(loaded, prompt, TOY_INSTRUCTION) == encode_prompt(tokenizer, prompt, TOY_INSTRUCTION)
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == (
        tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
    ids = tokenizer.convert_tokens_to_ids(["Answer", ":", "13"]) + [tokenizer.eos_token_id]
    assert loaded.decode(ids, skip_special_tokens=True) == "Answer : 13"


# --- base model builder (tiny runs) -----------------------------------------------------------------

TINY = BuildSettings(batch_size=4, bucket_batches=2, warmup_steps=1)


def test_build_writes_a_loadable_model_dir_atomically(tmp_path: Path) -> None:
    out = tmp_path / "model"
    assert build_base_model(out, seed=0, steps=5, settings=TINY, progress=False) == out
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", BUILD_INFO} <= names
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary sibling left behind
    info = json.loads((out / BUILD_INFO).read_text())
    assert info["settings"]["steps"] == 5

    model = AutoModelForCausalLM.from_pretrained(out)
    config = model.config
    assert config.model_type == "qwen3" and config.tie_word_embeddings
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 32)
    assert next(model.parameters()).dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert config.vocab_size >= len(tokenizer) and config.vocab_size % 16 == 0
    assert model.generation_config.top_k == 0 and model.generation_config.temperature == 1.0
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    # a rebuild replaces the folder in one rename, and the same seed gives the same weights
    first = (out / "model.safetensors").read_bytes()
    build_base_model(out, seed=0, steps=5, settings=TINY, progress=False)
    assert (out / "model.safetensors").read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_ensure_base_model_caches_by_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = BuildSettings(steps=2, batch_size=4, bucket_batches=1, warmup_steps=1)
    path = ensure_base_model(tmp_path, settings=settings)
    assert path.name == f"toy_base-{recipe_hash(settings, 0)}"
    stamp = (path / BUILD_INFO).stat().st_mtime_ns
    assert ensure_base_model(tmp_path, settings=settings) == path
    assert (path / BUILD_INFO).stat().st_mtime_ns == stamp  # not rebuilt
    assert recipe_hash(BuildSettings(steps=3), 0) != recipe_hash(BuildSettings(steps=2), 0)
    assert recipe_hash(settings, 1) != recipe_hash(settings, 0)
    # an edit to the task's ranges, texts or split is another model, though settings and vocabulary stay
    before, real_read = recipe_hash(settings, 0), Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: "edited" if self.name == "task.py" else real_read(self, encoding=encoding))
    assert recipe_hash(settings, 0) != before
