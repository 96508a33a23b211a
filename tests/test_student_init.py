import pytest
import torch

from ted_scale.model import GPT, GPTConfig, student_from_teacher


def test_student_copies_exactly_the_mapped_blocks_tensor_by_tensor():
    torch.manual_seed(0)
    teacher = GPT(GPTConfig(vocab_size=50, n_positions=16, n_embd=32, n_layer=12, n_head=2))
    blocks = [0, 2, 4, 7, 9, 11]
    student = student_from_teacher(teacher, blocks)
    assert student.config.n_layer == 6
    for k, b in enumerate(blocks):
        theirs = teacher.blocks[b].state_dict()
        for name, tensor in student.blocks[k].state_dict().items():
            assert torch.equal(tensor, theirs[name]), f"student block {k} {name}"
            assert tensor.data_ptr() != theirs[name].data_ptr(), "student must own its tensors"
    for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
        assert torch.equal(student.state_dict()[name], teacher.state_dict()[name]), name


def test_student_dropout_can_differ_from_the_teacher():
    teacher = GPT(
        GPTConfig(vocab_size=50, n_positions=16, n_embd=32, n_layer=4, n_head=2, dropout=0.0)
    )
    student = student_from_teacher(teacher, [1, 3], dropout=0.1)
    assert student.config.dropout == 0.1 and student.drop.p == 0.1
    assert student.blocks[0].attn.attn_dropout == 0.1


@pytest.mark.parametrize("blocks", [[], [0, 4], [-1]])
def test_student_rejects_blocks_outside_the_teacher(blocks):
    teacher = GPT(GPTConfig(vocab_size=50, n_positions=16, n_embd=32, n_layer=4, n_head=2))
    with pytest.raises(ValueError, match="teacher blocks"):
        student_from_teacher(teacher, blocks)


def test_a_student_of_a_pruned_teacher_keeps_each_copied_blocks_shape():
    config = GPTConfig(
        vocab_size=50,
        n_positions=16,
        n_embd=32,
        n_layer=4,
        n_head=2,
        n_head_per_layer=[2, 1, 0, 2],
        n_inner_per_layer=[128, 9, 3, 0],
    )
    student = student_from_teacher(GPT(config), [1, 3])
    assert student.config.layer_heads == (1, 2)
    assert student.config.layer_inner == (9, 0)
