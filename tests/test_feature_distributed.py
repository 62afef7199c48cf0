"""Feature KD on 2 real gloo ranks: 2 ranks x 2 sequences == 1 process x 4, step for step, with the hidden-layer map
(learned projections, DDP-wrapped) and MiniLMv2 relations; the projections' checkpoint files agree."""

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import REPO, distill_args, launch_two_ranks, train_logs, weights

from llm_distill.jobs.distill import main as run_distillation
from llm_distill.trainer import FEATURE_PROJECTION_FILE

FEATURES = ["--alpha_hidden", "1.0", "--hidden_layer_map", "0:1,1:2", "--alpha_attn_relation", "1.0",
            "--relation_heads", "2"]


@pytest.mark.slow
def test_feature_kd_on_two_gloo_ranks_matches_one_process(saved_pair, tmp_path, one_thread):
    one, two = tmp_path / "one", tmp_path / "two"
    launch_two_ranks(REPO / "scripts" / "distill.py", distill_args(saved_pair, two, 2, *FEATURES), tmp_path)
    run_distillation(distill_args(saved_pair, one, 4, *FEATURES))
    logs1, logs2 = train_logs(one), train_logs(two)
    assert sorted(logs2) == [1, 2, 3, 4]
    for step in logs1:
        for key in ("loss", "kd_loss", "hidden_loss", "attn_relation_loss", "grad_norm"):
            assert logs2[step][key] == pytest.approx(logs1[step][key], rel=1e-4, abs=2e-6), (step, key)
    for name, value in weights(one).items():
        torch.testing.assert_close(weights(two)[name], value, rtol=1e-4, atol=1e-5)
    p1 = load_file(str(one / "checkpoint-4" / FEATURE_PROJECTION_FILE))
    p2 = load_file(str(two / "checkpoint-4" / FEATURE_PROJECTION_FILE))
    assert sorted(p1) == ["maps.0.weight", "maps.1.weight"]
    for name, value in p1.items():
        torch.testing.assert_close(p2[name], value, rtol=1e-4, atol=1e-5)
