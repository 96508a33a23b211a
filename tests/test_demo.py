"""`make demo`'s rows: the "student alone" row starts where the distilled students start and gets
their budget, and every student config shares data, student and optimizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ted_scale.demo_pipeline import STUDENTS, config_file
from ted_scale.distill.methods import load_run_config
from ted_scale.study.config import load_study_config

REPO = Path(__file__).resolve().parents[1]


def test_demo_has_a_student_alone_row_with_the_distilled_students_init_and_budget():
    configs = {name: load_run_config(config_file(name)) for name in STUDENTS}
    lm = configs["lm"]
    assert configs["lm"].method == "lm" and STUDENTS["lm"] == "student alone"
    assert {c.method for c in configs.values()} == {"lm", "kd", "lwd", "ted", "cr_ild", "minidisc"}
    for name, c in configs.items():
        assert c.student == lm.student, name  # teacher_layers, 3 blocks, no dropout
        assert c.teacher.pretrained == lm.teacher.pretrained, name
        assert (c.data, c.batch, c.optim) == (lm.data, lm.batch, lm.optim), name
        assert c.stage2.max_steps == lm.stage2.max_steps, name
    assert configs["lm"].student.init == "teacher_layers"


def test_demo_teacher_has_the_study_teachers_shape_and_longer_training_than_students():
    teacher = load_run_config(config_file("teacher"))
    study = load_study_config(REPO / "configs" / "study-cpu.yaml")
    assert teacher.teacher.arch.__dict__ == {
        **teacher.teacher.arch.__dict__,
        **study.teacher["teacher"]["arch"],
    }
    assert teacher.teacher.arch.vocab_size == study.corpus.vocab_size
    student = load_run_config(config_file("ted"))
    assert teacher.stage2.max_steps > 2 * (student.stage1.max_steps + student.stage2.max_steps)


@pytest.mark.usefixtures("one_thread")
def test_student_alone_starts_from_the_teacher_blocks_like_a_distilled_student(tiny_data, tmp_path):
    """method lm with student.init teacher_layers: the same student as KD's, and no teacher kept."""
    from ted_scale.train.trainer import Trainer

    common = [f"data.path={tiny_data}", "checkpoint.interval=0"]
    config = REPO / "configs" / "tiny-kd.yaml"
    kd = Trainer(load_run_config(config, [*common, f"output_dir={tmp_path / 'kd'}"]))
    alone = Trainer(load_run_config(config, [*common, "method=lm", f"output_dir={tmp_path / 'a'}"]))
    assert alone.teacher is None and kd.teacher is not None
    theirs = kd.student.state_dict()
    ours = alone.student.state_dict()
    assert ours.keys() == theirs.keys() and len(alone.student.blocks) == 2
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # ... and those are the teacher's blocks 0 and 3 (the paper's map for 4 -> 2)
    teacher = kd.teacher.state_dict()
    second = [k for k in ours if k.startswith("blocks.1.")]
    assert second and all(torch.equal(ours[k], teacher[k.replace(".1.", ".3.", 1)]) for k in second)
