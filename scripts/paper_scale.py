"""The paper's job at its real shapes on this machine, and what the real run costs.

    python scripts/paper_scale.py                      # make paper-scale; not in CI (about 45 min on 2 CPU cores)

1. Builds Gemma-2-2B's architecture from its published config with random weights (`--lm_dir`, once; SmolLM2's
   tokenizer stands in for Gemma's, whose ids it does not exceed).
2. Runs the user's main job, `accelerate launch scripts/distill.py configs/gemma-2-2b-l12.json`, as shipped but for
   the LM, the text (the embedded corpus, streamed) and a budget small enough to finish: every stage at 65 536
   latents, d_in 2304, k 160, SAEBench's groups, layer 12, context 1024; its repos pushed to a loopback Hub.
3. Runs the browser (`scripts/browse.py`) on the last model over a few thousand tokens.
4. Reads each stage's wall time, tokens/s and peak resident memory from the run's own records (`state.json`), and
   projects the paper run's FLOPs, bytes and lower-bound time on one H100 from the shapes.

Results in `<results_dir>/results.json` and `report.md`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import HfArgumentParser

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the loopback Hub the tests use

GEMMA_2_2B = {
    "vocab_size": 256_000,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "final_logit_softcapping": 30.0,
    "attn_logit_softcapping": 50.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
"""google/gemma-2-2b's config.json (the fields that decide shapes and arithmetic)."""

H100 = {"name": "H100 SXM", "bf16_flops": 989e12, "memory_bytes_per_s": 3.35e12}
"""Peak dense bf16 throughput and HBM bandwidth: the lower bound divides by these."""


@dataclass
class PaperScaleArguments:
    config: str = field(default="configs/gemma-2-2b-l12.json", metadata={"help": "The paper's config, as shipped."})
    lm_dir: str = field(default="runs/gemma-2-2b-random", metadata={"help": "Where the random Gemma-2-2B is built."})
    output_dir: str = field(default="runs/paper-scale", metadata={"help": "The dry run's distillation folder."})
    results_dir: str = field(default="reports/paper-scale", metadata={"help": "Where results and report go."})
    lm_dtype: Literal["float32", "bfloat16"] = field(
        default="float32",
        metadata={"help": "The LM's dtype here: the config's bfloat16 runs ~8x slower on a CPU without bf16 units."},
    )
    num_tokens: int = field(default=4096, metadata={"help": "Training tokens per cycle (one step of 4096)."})
    num_cycles: int = field(
        default=1, metadata={"help": "Cycles after cycle 0 (1: two trainings and a distilled core)."}
    )
    attribution_tokens: int = field(default=2048, metadata={"help": "Positions whose (x, g) pairs score latents."})
    eval_tokens: int = field(default=2048, metadata={"help": "Held-out positions evaluated each cycle."})
    sample_rows: int = field(
        default=2048,
        metadata={"help": "Rows that fix the normalisation, the decoder bias's start and the inference threshold."},
    )
    lm_batch_size: int = field(default=2, metadata={"help": "Sequences of 1024 tokens per LM forward."})
    browse_tokens: int = field(default=2048, metadata={"help": "Positions the browser reads."})
    max_pages: int = field(default=100, metadata={"help": "Latent pages the browser writes (the index lists all)."})
    report_only: bool = field(
        default=False, metadata={"help": "Remake the report (and the projection) from <results_dir>/results.json."}
    )


def build_random_lm(folder: Path, dtype: str) -> float:
    """Gemma-2-2B's architecture with random weights and SmolLM2's tokenizer in `folder` (kept); seconds taken."""
    if (folder / "config.json").is_file():
        return 0.0
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    from hf_dmsae.data.embedded import smollm2_folder

    start = time.perf_counter()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder())
    ids = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = Gemma2Config(**GEMMA_2_2B, **ids)
    config._attn_implementation = "eager"  # Gemma-2's attention soft-capping: no SDPA
    torch.set_default_dtype(getattr(torch, dtype))
    lm = Gemma2ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return time.perf_counter() - start


def run_measured(command: list[str], env: dict) -> dict:
    """Run `command` to its end; its wall seconds and the peak resident set of it and its descendants."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=REPO)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{command[:4]}… failed with exit code {process.returncode}")
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def distill_command(args: PaperScaleArguments) -> list[str]:
    overrides = {
        "model_name_or_path": args.lm_dir,
        "lm_dtype": args.lm_dtype,
        "dataset_name_or_path": "embedded:wiki-summaries",
        "eval_split": "test",
        "num_tokens": args.num_tokens,
        "num_cycles": args.num_cycles,
        "attribution_tokens": args.attribution_tokens,
        "eval_tokens": args.eval_tokens,
        "lm_batch_size": args.lm_batch_size,
        "shuffle_buffer_tokens": args.num_tokens,
        "norm_tokens": args.sample_rows,
        "init_decoder_bias_rows": args.sample_rows,
        "calibrate_threshold_rows": args.sample_rows,
        "output_dir": args.output_dir,
        "push_to_hub": "true",
        "hub_token": "hf_loopback",
        "disable_tqdm": "true",
    }
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "no"]
    launch += ["--num_cpu_threads_per_process", str(os.cpu_count()), "scripts/distill.py", args.config]
    return launch + [a for k, v in overrides.items() for a in (f"--{k}", str(v))]


def browse_command(args: PaperScaleArguments, state: dict) -> list[str]:
    last = state["distilled"]["last_cycle"]
    return [
        sys.executable,
        "scripts/browse.py",
        args.config,
        "--model",
        f"{args.output_dir}/cycle{last}",
        "--site_dir",
        f"{args.output_dir}/browser",
        "--cores",
        f"{args.output_dir}/{state['distilled']['core']}",
        "--split",
        "test",
        "--browse_tokens",
        str(args.browse_tokens),
        "--max_pages",
        str(args.max_pages),
        "--model_name_or_path",
        args.lm_dir,
        "--lm_dtype",
        args.lm_dtype,
        "--dataset_name_or_path",
        "embedded:wiki-summaries",
        "--lm_batch_size",
        str(args.lm_batch_size),
    ]


def stage_table(state: dict) -> list[dict]:
    """Every recorded stage of the run, in order: before cycle 0, each cycle, publishing."""
    parts = [("before cycle 0", state.get("setup", {}))]
    parts += [(f"cycle {t}", record) for t, record in sorted(state["cycles"].items(), key=lambda kv: int(kv[0]))]
    parts += [("publishing", state.get("publish", {}))]
    return [
        {"part": part, "stage": name, **totals} for part, record in parts for name, totals in record["stages"].items()
    ]


# -- the paper run's cost on paper -------------------------------------------------------------------------------


def lm_flops_per_token(config: dict, blocks: int, context: int, head: bool) -> float:
    """Forward FLOPs per token through `blocks` of the LM (matmuls, causal attention over `context`), and the head."""
    d, heads, kv, head_dim = (
        config[name] for name in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    )
    attention_params = d * heads * head_dim * 2 + d * kv * head_dim * 2
    block = 2 * (attention_params + 3 * d * config["intermediate_size"]) + 2 * 2 * heads * head_dim * context / 2
    return blocks * block + (2 * d * config["vocab_size"] if head else 0.0)


def projected_cost(run: dict, lm: dict = GEMMA_2_2B, device: dict = H100) -> dict:
    """FLOPs, bytes and the lower bound on time (the larger of FLOPs at peak and bytes at bandwidth) of each stage
    of the paper run `run` (the config's values), per cycle and in total."""
    d, n, k, context = lm["hidden_size"], run["dict_size"], run["k"], run["context_length"]
    blocks, layers = run["hook_layer"] + 1, lm["num_hidden_layers"]
    cycles, tokens, batch = run["num_cycles"] + 1, run["num_tokens"], run["per_device_train_batch_size"]
    steps = tokens / batch
    sae_params = 2 * n * d + n + d
    harvest = lm_flops_per_token(lm, blocks, context, head=False)
    # Pairs: the whole forward, then input gradients (the LM's weights are frozen) back to the hook: one more
    # forward's worth of the upper blocks and the head.
    pairs = lm_flops_per_token(lm, layers, context, True) + lm_flops_per_token(lm, layers - blocks, context, True)
    encode = 2 * d * n
    stages = {
        "harvest (per cycle)": {
            "flops": tokens * harvest,
            "bytes": tokens * d * 2,  # bf16 activations produced (streamed, never stored)
        },
        "attribution pairs (once)": {
            "flops": run["attribution_tokens"] * pairs,
            "bytes": run["attribution_tokens"] * d * 2 * 2,
        },
        "training (per cycle)": {
            # Encoder matmul, sparse decode and its backward (k entries a row), the encoder's sparse gradient.
            "flops": tokens * (encode + 3 * 2 * k * d),
            # Adam (fp32 weights, gradient, two moments: 16 B read, 12 written per parameter), the encoder cast to
            # bf16 for the matmul (8 B per weight), the pre-activations written and read in bf16.
            "bytes": steps * (28 * sae_params + 8 * n * d + 4 * batch * n),
        },
        "scoring (per cycle)": {
            "flops": run["attribution_tokens"] * (encode + 2 * d * n),  # encode + each latent's g · ŵ
            "bytes": run["attribution_tokens"] * d * 2 * 2,
        },
        "evaluation (per cycle)": {
            "flops": run["eval_tokens"] * (harvest + encode),
            "bytes": run["eval_tokens"] * d * 2,
        },
    }
    for cost in stages.values():
        cost["lower_bound_s"] = max(cost["flops"] / device["bf16_flops"], cost["bytes"] / device["memory_bytes_per_s"])
    per_cycle = sum(c["lower_bound_s"] for name, c in stages.items() if "per cycle" in name)
    once = sum(c["lower_bound_s"] for name, c in stages.items() if "once" in name)
    return {
        "device": device,
        "flops_per_token": {"harvest": harvest, "attribution pairs": pairs, "sae encode": encode},
        "cycles": cycles,
        "tokens_per_cycle": tokens,
        "stages": stages,
        "per_cycle_lower_bound_s": per_cycle,
        "total_lower_bound_s": once + cycles * per_cycle,
        "total_flops": sum(c["flops"] * (1 if "once" in name else cycles) for name, c in stages.items()),
    }


# -- the report ----------------------------------------------------------------------------------------------------


def hours(cost: dict) -> float:
    return cost["total_lower_bound_s"] / 3600


def harvest_share(cost: dict) -> float:
    harvest = sum(c["lower_bound_s"] for name, c in cost["stages"].items() if name.startswith("harvest"))
    return harvest * cost["cycles"] / cost["total_lower_bound_s"]


def report(results: dict) -> str:
    args, run = results["arguments"], results["run"]
    lines = [
        "# The paper's job at its real shapes, on this CPU",
        "",
        f"`{results['command']}` on {results['machine']}. Gemma-2-2B's architecture (26 blocks, d_model 2304, "
        "256 000-token vocabulary with logit soft-capping, sliding-window attention) with random weights, "
        f"{run['dict_size']} latents, d_in {GEMMA_2_2B['hidden_size']}, k {run['k']}, groups {run['group_fractions']}, "
        f"layer {run['hook_layer']} {run['hook_name']}, context {run['context_length']}; "
        f"{args['num_cycles'] + 1} cycles of {args['num_tokens']} tokens, {args['attribution_tokens']} attribution "
        f"positions, {args['eval_tokens']} held-out positions, the browser over {args['browse_tokens']}. The LM runs "
        f"in {args['lm_dtype']} (the config says bfloat16: ~8x slower on this CPU, which has no bf16 units); the SAE "
        "trains under the config's bf16 autocast. Text: the embedded Wikipedia corpus, streamed. Repos: pushed to a "
        "loopback Hub.",
        "",
        "## Each stage (from the run's `state.json`)",
        "",
        "A cycle's harvest holds its training tokens, the held-out slice (evaluated every cycle) and the samples that "
        "fix the decoder bias's start and the inference threshold, each read again from the stream; the browser's "
        "time includes the normalisation statistics its harvester reads first (`norm_tokens`, 16 384 by default). "
        "A stage's peak is the process's resident set at its highest during that stage, the LM's weights included; "
        "a whole process's peak is the larger of its stages' and of what followed the last.",
        "",
        "| part | stage | seconds | tokens | tokens/s | peak resident MB |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["stages"]:
        lines.append(
            f"| {row['part']} | {row['stage']} | {row['seconds']:.1f} | {row['tokens']} | {row['tokens_per_s']:.1f} "
            f"| {row.get('peak_rss_mb', float('nan')):.0f} |"
        )
    for name, process in results["processes"].items():
        lines.append(f"| whole process | {name} | {process['seconds']:.1f} | | | {process['peak_rss_mb']:.0f} |")
    pushed = ", ".join(f"`{repo}` {size / 2**20:.1f} MB" for repo, size in sorted(results["pushed_bytes"].items()))
    lines += ["", f"Repos on the loopback Hub (files, cards included): {pushed}."]
    cost = results["projected"]
    measured = {row["stage"]: row for row in results["stages"] if row["part"] in ("before cycle 0", "cycle 1")}
    lines += [
        "",
        "The cost model against this CPU: the FLOPs per token it counts times the tokens/s measured above.",
        "",
        "| stage | FLOPs per token | measured tokens/s | implied GFLOP/s |",
        "|---|---|---|---|",
    ]
    for stage in ("harvest", "attribution pairs"):
        flops, speed = cost["flops_per_token"][stage], measured[stage]["tokens_per_s"]
        lines.append(f"| {stage} | {flops / 1e9:.2f} G | {speed:.1f} | {flops * speed / 1e9:.0f} |")
    lines += [
        "",
        f"## The paper run, projected ({cost['cycles']} cycles of {cost['tokens_per_cycle']:.3g} tokens; one "
        f"{cost['device']['name']}: {cost['device']['bf16_flops'] / 1e12:.0f} TFLOP/s bf16, "
        f"{cost['device']['memory_bytes_per_s'] / 1e12:.2f} TB/s)",
        "",
        "Lower bound = the larger of FLOPs at peak and bytes at bandwidth; a real run reaches perhaps 30–50% of it.",
        "",
        "| stage | FLOPs | bytes | lower bound |",
        "|---|---|---|---|",
    ]
    for name, c in cost["stages"].items():
        lines.append(f"| {name} | {c['flops']:.3g} | {c['bytes']:.3g} | {c['lower_bound_s'] / 60:.1f} min |")
    lines += [
        f"| **per cycle** | | | {cost['per_cycle_lower_bound_s'] / 60:.1f} min |",
        f"| **whole run** | {cost['total_flops']:.3g} | | {hours(cost):.2f} h |",
        "",
        f"At 40% of the peak the whole run takes {hours(cost) / 0.4:.1f} h on one H100 ({hours(cost) / 0.4 / 8:.1f} h "
        f"on eight: the harvest and training are data parallel). The harvest is {harvest_share(cost):.0%} of it: the "
        "LM's forward to layer 12 over 500M fresh tokens a cycle.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    (args,) = HfArgumentParser(PaperScaleArguments).parse_args_into_dataclasses()
    from hub_server import HubServer

    results_dir, output_dir = Path(args.results_dir), REPO / args.output_dir
    if args.report_only:
        results = json.loads((results_dir / "results.json").read_text())
        write_results(results_dir, results | {"projected": projected_cost(results["run"])})
        return
    built = build_random_lm(REPO / args.lm_dir, args.lm_dtype)
    run = json.loads((REPO / args.config).read_text())
    with HubServer() as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1")
        processes = {"distill": run_measured(distill_command(args), env)}
        state = json.loads((output_dir / "state.json").read_text())
        # The stages reset the kernel's high-water mark, so the process's own covers what followed the last one.
        stage_peaks = [totals.get("peak_rss_mb", 0.0) for totals in stage_table(state)]
        processes["distill"]["peak_rss_mb"] = max([processes["distill"]["peak_rss_mb"], *stage_peaks])
        processes["browse"] = run_measured(browse_command(args, state), env)
        pushed = {repo: sum(len(b) for b in hub.files(repo).values()) for repo in hub.state.repos}
    results = {
        "command": "python scripts/paper_scale.py",
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
        "arguments": asdict(args),
        "run": run,
        "lm_build_seconds": round(built, 1),
        "stages": stage_table(state),
        "processes": processes,
        "pushed_bytes": pushed,
        "projected": projected_cost(run),
    }
    write_results(results_dir, results)


def write_results(results_dir: Path, results: dict) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "results.json").write_text(json.dumps(results, indent=2))
    (results_dir / "report.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
