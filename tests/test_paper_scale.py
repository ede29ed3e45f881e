"""The paper-scale dry run's cost model (`scripts/paper_scale.py`) against the architecture it models."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from test_scripts import undocumented_options
from transformers import Gemma2Config, Gemma2ForCausalLM, HfArgumentParser

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "paper_scale.py"
spec = importlib.util.spec_from_file_location("paper_scale", SCRIPT)
paper_scale = sys.modules["paper_scale"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(paper_scale)


def test_the_lm_flops_are_two_per_weight_of_gemma_2_2b_plus_attention():
    """Built on the meta device (no memory): the matmul FLOPs per token are twice the weights the token meets (each
    block's, the tied embedding once as the head), and attention adds 2 · 2 · heads · head_dim per attended key."""
    config = paper_scale.GEMMA_2_2B
    with torch.device("meta"):
        lm = Gemma2ForCausalLM(Gemma2Config(**config))
    block = sum(p.numel() for name, p in lm.model.layers[0].named_parameters() if "norm" not in name)
    head = lm.lm_head.weight.numel()
    context = 1024
    attention = 2 * 2 * config["num_attention_heads"] * config["head_dim"] * context / 2
    expected = 13 * (2 * block + attention) + 2 * head
    assert paper_scale.lm_flops_per_token(config, 13, context, head=True) == pytest.approx(expected, rel=1e-9)
    assert 2.6e9 < sum(p.numel() for p in lm.parameters()) < 2.7e9, "Gemma-2-2B has 2.6B parameters"


def test_the_projected_cost_scales_with_the_configs_budget():
    run = {
        "dict_size": 65_536,
        "k": 160,
        "context_length": 1024,
        "hook_layer": 12,
        "num_cycles": 7,
        "num_tokens": 500_000_000,
        "per_device_train_batch_size": 4096,
        "attribution_tokens": 1_000_000,
        "eval_tokens": 1_000_000,
    }
    cost = paper_scale.projected_cost(run)
    doubled = paper_scale.projected_cost({**run, "num_tokens": 2 * run["num_tokens"]})
    for stage in ("harvest (per cycle)", "training (per cycle)"):
        assert doubled["stages"][stage]["flops"] == pytest.approx(2 * cost["stages"][stage]["flops"])
    assert doubled["stages"]["attribution pairs (once)"] == cost["stages"]["attribution pairs (once)"]
    assert cost["total_lower_bound_s"] == pytest.approx(
        cost["stages"]["attribution pairs (once)"]["lower_bound_s"] + 8 * cost["per_cycle_lower_bound_s"]
    )


def test_every_option_is_documented():
    """In-process (the script's parser is one dataclass), sparing the --help test of the other scripts a process."""
    help_text = HfArgumentParser(paper_scale.PaperScaleArguments).format_help()
    assert help_text.count("\n  --") > 3 and not undocumented_options(help_text)
