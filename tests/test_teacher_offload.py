"""The teacher's weights streamed from host memory (distill/teacher_offload.py), in one CPU process.

Without a GPU the compute device is the CPU, so a fetch is a host-to-host copy: these tests check
what does not depend on the device (the same logits, which weights are copied in and dropped when,
the refresh writing the host copy, the fused loss's output weight). The CUDA path (side stream,
pinned memory, the memory saving) is tests/gpu/test_teacher_offload_gpu.py; the whole OPSDC loop
with offload is in tests/test_opsdc_loop.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config

from opsdc_megatron.config import ParallelConfig, TrainConfig
from opsdc_megatron.distill.batch import ScoredSequence, make_micro_batch
from opsdc_megatron.distill.stage import DistillStage
from opsdc_megatron.distill.teacher import TeacherSnapshot
from opsdc_megatron.models.qwen3.model import build_gpt_model
from opsdc_megatron.train.build import build_training_model
from opsdc_megatron.train.checkpoint import load_checkpoint, save_checkpoint
from tests.tiny_models import save_tiny_model

pytestmark = pytest.mark.parallel

VOCAB = 97


def hf_config(tied: bool) -> Qwen3Config:
    return Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=tied)


def student_and_streamed_teacher(tied: bool, stream_output_layer: bool = True):
    """A randomly initialised model and an offloaded teacher snapshot of it."""
    torch.manual_seed(0)
    student = build_gpt_model(hf_config(tied), 1)
    # Norms away from 1, so a norm the snapshot did not copy would show in the logits. (On CPU a tensor
    # left out of the stream computes from its host copy, the same values: the data-pointer tests check the streaming.)
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    teacher = TeacherSnapshot(torch.nn.ModuleList([build_gpt_model(hf_config(tied), 1, empty_on_host=True)]), 50,
                              offload=True, stream_output_layer=stream_output_layer)
    teacher.copy_from(torch.nn.ModuleList([student]))
    return student, teacher


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).expand_as(ids), attention_mask=None)


def host_pointers(model: torch.nn.Module) -> dict[str, int]:
    """Where each tensor's data lives between forwards (its host copy)."""
    return {name: t.data_ptr() for name, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_streamed_teacher_gives_the_same_logits(one_rank, tied) -> None:
    student, teacher = student_and_streamed_teacher(tied)
    ids = tokens()
    assert torch.equal(logits(teacher.model[0], ids), logits(student, ids))


def test_at_most_two_units_on_the_device_and_none_after(one_rank) -> None:
    """Observed from the tensors themselves: a parameter whose data is not its host tensor is a
    fetched copy. While a unit runs, exactly its weights and the next unit's (on their way) are."""
    _, teacher = student_and_streamed_teacher(tied=True)
    model = teacher.model[0]
    host = host_pointers(model)
    order = ["embedding", "decoder.layers.0", "decoder.layers.1", "decoder.layers.2", "decoder.final_layernorm", "output_layer"]
    assert [unit.name for unit in teacher.streams[0].units] == order

    def fetched() -> set[str]:
        return {name for name, t in model.named_parameters() if t.data_ptr() != host[name]}

    def weights(unit: str) -> set[str]:
        return {name for name, _ in model.named_parameters() if name.startswith(unit + ".")}

    seen: list[tuple[str, set[str]]] = []
    for unit in order:  # registered after the stream's hooks: sees the state the unit runs in
        model.get_submodule(unit).register_forward_pre_hook(lambda _m, _a, unit=unit: seen.append((unit, fetched())))
    logits(model, tokens())

    tied_output_weight = {"embedding.word_embeddings.weight"}  # GPTModel hands it to the output layer
    assert weights("output_layer") == set()
    expected = [(unit, weights(unit) | weights(following)) for unit, following in zip(order[:4], order[1:5])]
    expected += [("decoder.final_layernorm", weights("decoder.final_layernorm") | tied_output_weight), ("output_layer", tied_output_weight)]
    assert seen == expected
    assert fetched() == set() and host_pointers(model) == host, "every tensor is back to its host copy after the forward"


def test_refresh_writes_the_host_copy_and_the_next_forward_uses_it(one_rank) -> None:
    student, teacher = student_and_streamed_teacher(tied=False)
    model, ids = teacher.model[0], tokens()
    before, host = logits(model, ids), host_pointers(model)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.mul_(1.5)
    assert torch.equal(logits(model, ids), before), "the snapshot does not follow the student between refreshes"
    teacher.copy_from(torch.nn.ModuleList([student]))
    assert host_pointers(model) == host, "refreshed in place, into the same host tensors"
    after = logits(model, ids)
    assert not torch.equal(after, before)
    assert torch.equal(after, logits(student, ids))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_fused_output_layer_gets_the_output_weight_on_the_device(one_rank, tied) -> None:
    """With the fused output layer the teacher's output layer is not streamed; the stage hands the
    loss a copy of its weight (the tied embedding, or the output layer's own) and the host copy stays
    where it was. Untied, the stream was refused at build (it took the embedding for the output weight)."""
    student, teacher = student_and_streamed_teacher(tied=tied, stream_output_layer=False)
    model, stream = teacher.model[0], teacher.streams[0]
    assert "output_layer" not in [unit.name for unit in stream.units]
    host = host_pointers(model)
    sequences = [ScoredSequence([5, 6, 7], [1, 2, 5, 6, 7], [8, 9, 10, 11]), ScoredSequence([12, 13], [1, 2, 12, 13], [14, 15])]
    batch = make_micro_batch(sequences, pad_id=0)
    streamed = DistillStage(student, model, VOCAB, fused_output_layer=True, teacher_stream=stream)(batch)
    reference_teacher = build_gpt_model(hf_config(tied), 1)
    reference_teacher.load_state_dict(student.state_dict())
    reference = DistillStage(student, reference_teacher, VOCAB, fused_output_layer=True)(batch)
    for got, expected in zip(streamed, reference):
        assert torch.equal(got, expected)
    assert streamed[3].data_ptr() != host["embedding.word_embeddings.weight" if tied else "output_layer.weight"], "a copy, not the host tensor"
    assert host_pointers(model) == host


def test_first_micro_batch_flag_reaches_student_and_teacher_layers(one_rank) -> None:
    """megatron's schedules call `set_is_first_microbatch` on the chunk they run (if it has one);
    with FP8, every Transformer Engine layer of student and teacher must see it, or they reuse the
    FP8 weights cached at their first forward forever. TE is not installed here: a plain attribute
    `is_first_microbatch` on two layers stands in for TE's (megatron sets every module's that has one)."""
    student, teacher = student_and_streamed_teacher(tied=False)
    stage = DistillStage(student, teacher.model[0], VOCAB, teacher_stream=teacher.streams[0])
    layers = [student.decoder.layers[0].mlp.linear_fc1, teacher.model[0].decoder.layers[-1].self_attention.linear_qkv]
    for layer in layers:
        layer.is_first_microbatch = False
    for model in (student, teacher.model[0]):
        model.config.fp8 = "hybrid"  # megatron only sets the flags for FP8 models
    try:
        stage.set_is_first_microbatch()
    finally:
        for model in (student, teacher.model[0]):
            model.config.fp8 = None
    assert [layer.is_first_microbatch for layer in layers] == [True, True]


def checkpointable_model(tmp_path, teacher_offload: bool):
    """A one-rank training model of a tiny Qwen3 whose optimizer has Adam's state, which a checkpoint holds."""
    hf_dir = save_tiny_model("qwen3_tied", tmp_path / "hf")
    model = build_training_model(Qwen3Config.from_pretrained(hf_dir), str(hf_dir), ParallelConfig(), torch.float32, TrainConfig(), 0,
                                 teacher_offload=teacher_offload)
    model.optimizer.step()  # zero gradients: creates Adam's state
    return model


def test_checkpoint_saves_and_restores_the_host_teacher(one_rank, tmp_path) -> None:
    """train/checkpoint.py with an offloaded teacher: saved from host memory, loaded back into the
    same pinned-or-not host tensors (a refresh in between is undone)."""
    model = checkpointable_model(tmp_path, teacher_offload=True)
    teacher = model.teacher.model[0]
    saved = {name: t.clone() for name, t in teacher.state_dict().items() if t is not None}
    save_checkpoint(tmp_path / "checkpoints", 1, model.ddps, model.optimizer, model.teacher, {"step": 1, "teacher_age_steps": 1}, keep_last=1)
    host = host_pointers(teacher)
    with torch.no_grad():
        for parameter in model.student[0].parameters():
            parameter.add_(1.0)
    model.teacher.copy_from(torch.nn.ModuleList(model.student))
    assert not torch.equal(teacher.embedding.word_embeddings.weight, saved["embedding.word_embeddings.weight"])
    load_checkpoint(tmp_path / "checkpoints" / "step_000001", model.ddps, model.optimizer, model.teacher)
    assert host_pointers(teacher) == host
    for name, tensor in teacher.state_dict().items():
        if tensor is not None:
            assert torch.equal(tensor, saved[name]), name


def test_a_checkpoint_that_holds_its_teacher_itself_still_loads(one_rank, tmp_path) -> None:
    """Checkpoints from before the teacher had folders of its own (train/checkpoint.py) hold the teacher's tensors
    beside the student's and name no teacher folder: the teacher comes from the checkpoint, and the next save
    writes it to a folder of its own."""
    import json
    import shutil

    from megatron.core import dist_checkpointing

    from opsdc_megatron.torch_dist_save import InProcessTorchDistSave
    from opsdc_megatron.train import checkpoint

    model = checkpointable_model(tmp_path, teacher_offload=True)
    teacher = model.teacher.model[0]
    saved = {name: t.clone() for name, t in teacher.state_dict().items() if t is not None}
    host = host_pointers(teacher)
    old = tmp_path / "checkpoints" / "step_000001"
    old.mkdir(parents=True)
    state = {**checkpoint._sharded_state_dict(model.ddps, model.optimizer, is_loading=False), **checkpoint._teacher_sharded_state_dict(model.teacher)}
    dist_checkpointing.save(state, str(old), sharded_strategy=InProcessTorchDistSave())
    (old / "trainer_state.json").write_text(json.dumps({"step": 1, "teacher_age_steps": 1}))
    with torch.no_grad():
        for parameter in model.student[0].parameters():
            parameter.add_(1.0)
    model.teacher.copy_from(torch.nn.ModuleList(model.student))
    loaded = load_checkpoint(old, model.ddps, model.optimizer, model.teacher)
    assert loaded["step"] == 1 and model.teacher.saved_as is None and host_pointers(teacher) == host
    for name, tensor in teacher.state_dict().items():
        if tensor is not None:
            assert torch.equal(tensor, saved[name]), name
    model.teacher.age_steps += 1  # step 2, as after_optimizer_step counts it: the teacher is still step 0's
    save_checkpoint(tmp_path / "checkpoints", 2, model.ddps, model.optimizer, model.teacher, {"step": 2, "teacher_age_steps": 2}, keep_last=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000002", "teacher_step_000000_saved_000002"]
    shutil.rmtree(tmp_path / "checkpoints" / "teacher_step_000000_saved_000002")
    with pytest.raises(FileNotFoundError, match=r"step_000002: its teacher's folder .*teacher_step_000000_saved_000002 is missing or incomplete"):
        load_checkpoint(tmp_path / "checkpoints" / "step_000002", model.ddps, model.optimizer, model.teacher)


def test_a_save_redone_after_a_resume_from_an_earlier_checkpoint_writes_its_own_teacher(one_rank, tmp_path) -> None:
    """Steps 1 and 2 saved (a refresh at 2), then a resume from step 1 (as after a crash before step 2's `latest`)
    that trains step 2 otherwise and saves it again: its teacher goes to a folder of its own (`_2`), not over the
    one the abandoned step 2 named, which goes once that checkpoint is replaced. Each checkpoint loads the teacher
    it was saved with."""
    import json

    model = checkpointable_model(tmp_path, teacher_offload=False)
    root, student, teacher = tmp_path / "checkpoints", torch.nn.ModuleList(model.student), model.teacher

    def save(step: int) -> None:
        save_checkpoint(root, step, model.ddps, model.optimizer, teacher, {"step": step, "teacher_age_steps": teacher.age_steps}, keep_last=3)

    def step_and_refresh(shift: float) -> dict:
        with torch.no_grad():
            for parameter in student.parameters():
                parameter.add_(shift)
        teacher.copy_from(student)
        return {name: t.clone() for name, t in teacher.model[0].state_dict().items() if t is not None}

    teacher.age_steps = 1
    save(1)
    step_and_refresh(1.0)
    save(2)
    assert sorted(p.name for p in root.glob("teacher_*")) == ["teacher_step_000000_saved_000001", "teacher_step_000002_saved_000002"]
    load_checkpoint(root / "step_000001", model.ddps, model.optimizer, teacher)
    redone = step_and_refresh(2.0)
    save(2)
    assert sorted(p.name for p in root.glob("teacher_*")) == ["teacher_step_000000_saved_000001", "teacher_step_000002_saved_000002_2"]
    assert json.loads((root / "step_000002" / "trainer_state.json").read_text())["teacher_checkpoint"] == "teacher_step_000002_saved_000002_2"
    step_and_refresh(3.0)
    load_checkpoint(root / "step_000002", model.ddps, model.optimizer, teacher)
    for name, tensor in teacher.model[0].state_dict().items():
        if tensor is not None:
            assert torch.equal(tensor, redone[name]), name
