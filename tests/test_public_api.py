"""The public API is importable from the package root, and every exported name exists."""

import llm_distill


def test_every_exported_name_resolves():
    missing = [name for name in llm_distill.__all__ if not hasattr(llm_distill, name)]
    assert not missing, f"__all__ names that llm_distill does not define: {missing}"
    assert len(set(llm_distill.__all__)) == len(llm_distill.__all__), "duplicate names in __all__"


def test_main_entry_points_are_at_the_top_level():
    for name in ("DistillationTrainer", "DistillationConfig", "SpeculativeDecoder", "run_generation",
                 "chunked_distillation_loss", "store_teacher_logits",
                 "triple_loss", "student_from_teacher", "prune_heads", "drop_layers", "load_pruned"):
        assert name in llm_distill.__all__
