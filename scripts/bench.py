"""Speed of a DMSAE training step against its peers, and of harvesting and attribution, on this machine.

    python scripts/bench.py [--sizes 4096 16384] [--steps 11] [--cycle_tokens 65536] [--out reports/bench.json]
    python scripts/bench.py --device cuda --parts steps --sizes 4096 16384 65536 --out reports/bench-cuda.json

Training steps: the same in-memory activations (d_in 576, batch 4096 tokens, k 64 unless told, Matryoshka groups
1/32, 1/16, 1/8, 1/4 and the rest, fp32, all threads), on the CPU or a CUDA device (each step timed to the device's
end), full steps (forward, every prefix loss, AuxK, backward, optimiser step
(ours: the Trainer's, fused AdamW), decoder norm) timed interleaved, one step of each implementation per round,
medians over rounds, for:
our DMSAE (sparse kernels, dense core of 2% of the dictionary and no core; the first under bf16 autocast too; the
reference kernels), SAELens' `MatryoshkaBatchTopKTrainingSAE`, dictionary_learning's Matryoshka BatchTopK trainer,
and the limit: one dense encoder matmul + ReLU. Peers that cannot be imported are reported as such
(`make bench` installs them).

Harvesting: the embedded SmolLM2 run to the middle layer only vs a full forward with hidden states. Attribution:
scoring an SAE (4096 latents) from cached (x, g) pairs, as every cycle does after the one-time harvest, vs what each
scoring would cost without the cache: the LM's forward + backward to the hooked activation.
Peak memory is the rise of the process's resident set (on CUDA: of the memory torch's allocator holds) during one
more step of each implementation, untimed.
Distillation cycles: a real run of the embedded default (`configs/smollm2-135m.json`, cycles 0 and 1 with fewer
tokens, in a fresh folder and cache), each cycle's seconds and tokens/s per stage as its state records them:
harvest (LM forward into the activation cache), train, attribution (scoring from the cached pairs), evaluation.

    python scripts/bench.py --paper_memory [--out reports/memory-paper-scale.json]

measures, each in a fresh process, the peak resident set of one training step, one attribution batch and a held-out
evaluation at the paper's scale (d_in 2304, 65 536 latents, batch 4096, core of 197, k_noncore 160; random
activations), and of an evaluation of 1M tokens at d_in 2304 (1024 latents: the metrics' memory, which is what grows
with tokens, without 50 minutes of CPU encoding).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from transformers import Trainer

from hf_dmsae import DMSAEConfig, DMSAEModel
from hf_dmsae.model.configuration_dmsae import SAEBENCH_GROUP_FRACTIONS, matryoshka_group_sizes
from hf_dmsae.run.trainer import DMSAETrainingArguments

CPU = torch.device("cpu")


@dataclass(frozen=True)
class StepSetting:
    """What every timed training step runs on."""

    d_in: int = 576
    """Width of the activations."""
    batch: int = 4096
    """Tokens per step."""
    k: int = 64
    """Kept latents per token (BatchTopK's average)."""
    device: torch.device = torch.device("cpu")
    """Where the activations, the models and the optimisers live."""


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer read next measures it (a CUDA host runs ahead)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak rise of the resident set size while the block runs (sampled every millisecond); on CUDA, of the memory
    torch's allocator holds on the device."""

    def __init__(self, device: torch.device = CPU):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        self.process, self.running = psutil.Process(), True
        self.base = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.running = False
            self.thread.join()
        self.rise_mb = (self.peak - self.base) / 2**20


# -- implementations: each returns a function running one full training step on x -------------------------------


def dmsae_step(setting: StepSetting, n: int, core_fraction: float, kernels: str, autocast: bool = False):
    core, d = round(core_fraction * n), setting.d_in
    config = DMSAEConfig(
        d_in=d, dict_size=n, core_size=core, k=setting.k, core_ids=[f"c:{i}" for i in range(core)], kernels=kernels
    )
    model = DMSAEModel.from_core(config, torch.randn(core, d) / d**0.5).to(setting.device).train()
    optimizer = trainer_optimizer(model)

    def step(x):
        with torch.autocast(setting.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(x, return_latents=False).loss
        loss.backward()
        model.remove_parallel_decoder_grad()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.normalize_decoder()

    return step


def trainer_optimizer(model: DMSAEModel) -> torch.optim.Optimizer:
    """The optimiser `DMSAETrainer` builds by default (fused AdamW, where available), at the bench's learning rate."""
    args = DMSAETrainingArguments(output_dir="unused", learning_rate=1e-4, report_to=[])  # nothing is written
    optimizer_class, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return optimizer_class(model.parameters(), **kwargs)


def limit_step(setting: StepSetting, n: int):
    weight = torch.randn(n, setting.d_in, device=setting.device) / setting.d_in**0.5
    bias = torch.zeros(n, device=setting.device)

    def step(x):
        torch.relu(torch.addmm(bias, x, weight.T))

    return step


def saelens_step(setting: StepSetting, n: int):
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import TrainStepInput

    widths = list(torch.tensor(matryoshka_group_sizes(n)).cumsum(0).tolist())
    sae = MatryoshkaBatchTopKTrainingSAE(
        MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=setting.d_in, d_sae=n, k=setting.k, matryoshka_widths=widths, device=str(setting.device)
        )
    )
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    dead = torch.zeros(n, dtype=torch.bool, device=setting.device)

    def step(x):
        out = sae.training_forward_pass(TrainStepInput(x, {}, dead, 0, False))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def dictionary_learning_step(setting: StepSetting, n: int):
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer

    sizes = matryoshka_group_sizes(n)
    trainer = MatryoshkaBatchTopKTrainer(
        steps=10**6,
        activation_dim=setting.d_in,
        dict_size=n,
        k=setting.k,
        layer=0,
        lm_name="bench",
        group_fractions=[s / n for s in sizes],
        device=str(setting.device),
        warmup_steps=1,
    )
    count = iter(range(1, 10**9))  # step 0 would re-initialise b_dec

    def step(x):
        trainer.update(next(count), x)

    return step


def training_steps(setting: StepSetting, sizes: list[int], rounds: int) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(setting.batch, setting.d_in, device=setting.device)
    results = []
    for n in sizes:
        candidates = {
            "limit (encoder matmul + ReLU)": lambda n=n: limit_step(setting, n),
            "dmsae, dense core 2% (sparse kernels)": lambda n=n: dmsae_step(setting, n, 0.02, "sparse"),
            "dmsae, no core (sparse kernels)": lambda n=n: dmsae_step(setting, n, 0.0, "sparse"),
            "dmsae, dense core 2% (sparse kernels, bf16 autocast)": lambda n=n: dmsae_step(
                setting, n, 0.02, "sparse", True
            ),
            "dmsae, dense core 2% (reference kernels)": lambda n=n: dmsae_step(setting, n, 0.02, "reference"),
            "sae_lens MatryoshkaBatchTopKTrainingSAE": lambda n=n: saelens_step(setting, n),
            "dictionary_learning MatryoshkaBatchTopKTrainer": lambda n=n: dictionary_learning_step(setting, n),
        }
        steps, rows = {}, {}
        for name, make in candidates.items():
            try:
                steps[name] = make()
                steps[name](x)  # warm-up
            except Exception as error:  # a peer that is not installed or fails is reported, not dropped
                rows[name] = {"name": name, "dict_size": n, "error": f"{type(error).__name__}: {error}"[:300]}
                steps.pop(name, None)
        times = {name: [] for name in steps}
        for _ in range(rounds):
            for name, step in steps.items():
                synchronize(setting.device)
                start = time.perf_counter()
                step(x)
                synchronize(setting.device)
                times[name].append(time.perf_counter() - start)
        memory = {}
        for name, step in steps.items():  # a round of its own: the sampling thread slows a step by 3–7%
            with PeakMemory(setting.device) as peak:
                step(x)
            memory[name] = peak.rise_mb
        limit = statistics.median(times["limit (encoder matmul + ReLU)"])
        for name in steps:
            median = statistics.median(times[name])
            rows[name] = {
                "name": name,
                "dict_size": n,
                "median_s": median,
                "tokens_per_s": setting.batch / median,
                "vs_limit": median / limit,
                "peak_memory_rise_mb": memory[name],
            }
        ours = rows["dmsae, dense core 2% (sparse kernels)"].get("median_s")
        for row in rows.values():
            if "median_s" in row and ours:
                row["dmsae_speedup"] = row["median_s"] / ours
        results += [rows[name] for name in candidates]
        del steps
        gc.collect()
        if setting.device.type == "cuda":
            torch.cuda.empty_cache()  # the next width's peaks start from what it allocates itself
    return results


def harvest_and_attribution(
    device: torch.device, rounds: int, shape: tuple[int, int] = (8, 128), cached_positions: int = 16_384
) -> dict:
    from hf_dmsae.data.activations import ActivationArguments, TrainingPositions
    from hf_dmsae.data.language_model import LayerActivations, load_language_model
    from hf_dmsae.method.attribution import gxa_scores

    args = ActivationArguments()
    lm, tokenizer = load_language_model(args.model_name_or_path)
    lm.to(device)
    input_ids = torch.randint(3, lm.config.vocab_size, shape, device=device)
    layer = LayerActivations(lm, args.hook_layer)
    sae = DMSAEModel(DMSAEConfig(d_in=576, dict_size=4096, k=64, hook_layer=args.hook_layer)).to(device).eval()
    keep = TrainingPositions(tokenizer, 0.0, None).mask(input_ids, layer(input_ids))
    acts, grads = layer.with_gradient(input_ids)
    # Cached pairs as the attribution cache serves them; repeated rows cost an encode like any other.
    repeats = -(-cached_positions // int(keep.sum()))
    pairs = {
        "activations": acts[keep].repeat(repeats, 1)[:cached_positions],
        "gradients": grads[keep].repeat(repeats, 1)[:cached_positions],
    }

    def truncated():
        with torch.inference_mode():
            layer(input_ids)

    def full():
        with torch.inference_mode():
            lm(input_ids, output_hidden_states=True)

    def live_pairs():  # what every scoring costs without the cache: the LM's forward + backward
        layer.with_gradient(input_ids)

    def cached_scoring():  # what every scoring costs with the cache: training-sized BatchTopK batches, exact quantile
        gxa_scores(sae, [pairs], batch_size=1024, q=0.99, max_rows=cached_positions, progress=False)

    functions = {"truncated": truncated, "full": full, "live_pairs": live_pairs, "cached_scoring": cached_scoring}
    timings = {name: [] for name in functions}
    for function in functions.values():
        function()
    for _ in range(rounds):
        for name, function in functions.items():
            synchronize(device)
            start = time.perf_counter()
            function()
            synchronize(device)
            timings[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in timings.items()}
    live = int(keep.sum()) / medians["live_pairs"]
    cached = cached_positions / medians["cached_scoring"]
    return {
        "tokens_per_batch": input_ids.numel(),
        "hook_layer": args.hook_layer,
        "num_layers": lm.config.num_hidden_layers,
        "median_s": medians,
        "harvest_speedup_vs_full_forward": medians["full"] / medians["truncated"],
        "attribution_live_tok_per_s": live,
        "attribution_cached_tok_per_s": cached,
        "attribution_cached_speedup": cached / live,
    }


def distillation_cycles(config: str, tokens: int, attribution_tokens: int, eval_tokens: int) -> dict:
    """A real distillation (cycle 0 and cycle 1) on `config` (the embedded default: SmolLM2-135M layer 15, 4096
    latents) with `tokens` per cycle, in a fresh folder and activation cache, as `scripts/distill.py` runs it; the
    stage times each cycle records in the run's state (`hf_dmsae.stages`)."""
    from hf_dmsae.data.activations import ActivationArguments
    from hf_dmsae.method.attribution import AttributionArguments
    from hf_dmsae.method.distillation import Distillation, DistillationArguments
    from hf_dmsae.run.arguments import SAEArguments
    from hf_dmsae.run.launch import parse_arguments

    with tempfile.TemporaryDirectory() as folder:
        overrides = {
            "output_dir": f"{folder}/run",
            "activation_cache": f"{folder}/cache",
            "num_tokens": tokens,
            "attribution_tokens": attribution_tokens,
            "eval_tokens": eval_tokens,
            "num_cycles": 1,
            "random_core_control": False,
            "save_steps": 10**6,
            "report_to": "none",
            "disable_tqdm": True,
        }
        argv = [config] + [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
        arguments = parse_arguments(
            (DistillationArguments, SAEArguments, ActivationArguments, AttributionArguments, DMSAETrainingArguments),
            argv,
        )
        run = Distillation(*arguments)
        run.run()
        state = run.state.data
    return {
        "config": config,
        "tokens_per_cycle": tokens,
        "attribution_tokens": attribution_tokens,
        "eval_tokens": eval_tokens,
        "setup": state["setup"]["stages"],
        "cycles": {t: record["stages"] for t, record in state["cycles"].items()},
    }


def cycle_lines(result: dict) -> list[str]:
    """Where each cycle's time goes: seconds, tokens/s and share of the cycle per stage."""
    lines = [
        f"distillation on {result['config']}, {result['tokens_per_cycle']} tokens per cycle "
        f"(attribution split {result['attribution_tokens']} tokens, harvested once before cycle 0):"
    ]
    for name, stages in [("before cycle 0", result["setup"])] + [
        (f"cycle {t}", s) for t, s in result["cycles"].items()
    ]:
        total = sum(s["seconds"] for s in stages.values())
        cells = [
            f"{stage} {s['seconds']:.1f} s ({s['seconds'] / total:.0%}, {s['tokens_per_s']:.0f} tok/s)"
            for stage, s in stages.items()
        ]
        lines.append(f"  {name}: {total:.1f} s = " + ", ".join(cells))
    return lines


# -- memory at the paper's scale ---------------------------------------------------------------------------------

PAPER = {"d_in": 2304, "dict_size": 65_536, "batch": 4096, "core": 197, "k_noncore": 160}


def paper_model(dict_size: int = PAPER["dict_size"]) -> DMSAEModel:
    core = PAPER["core"]
    config = DMSAEConfig(
        d_in=PAPER["d_in"],
        dict_size=dict_size,
        core_size=core,
        k=PAPER["k_noncore"],
        k_noncore=PAPER["k_noncore"],
        core_ids=[f"c:{i}" for i in range(core)],
    )
    rows = torch.randn(core, PAPER["d_in"])
    return DMSAEModel.from_core(config, rows / rows.norm(dim=1, keepdim=True))


def memory_probe(what: str) -> dict:
    """One measurement, in this (fresh) process: the resident set just before the work (Python, torch, the model)
    and its peak during the work."""
    from hf_dmsae.evaluation.held_out import activation_metrics
    from hf_dmsae.method.attribution import StreamingQuantile
    from hf_dmsae.method.scorers import gxa_values

    torch.manual_seed(0)
    batch, d = PAPER["batch"], PAPER["d_in"]
    model = paper_model(1024 if what.startswith("evaluation_") else PAPER["dict_size"])
    x = torch.randn(batch, d)
    if what == "training_step":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def work():
            for _ in range(2):  # the second step has Adam's state allocated
                model(x, return_latents=False).loss.backward()
                model.remove_parallel_decoder_grad()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                model.normalize_decoder()
    elif what == "attribution_batch":
        model.eval()
        pool = model.config.candidate_pool_size
        quantile = StreamingQuantile(pool, 0.99, 1_000_000)

        def work():
            with torch.no_grad():
                quantile.update(gxa_values(model, x, torch.randn(batch, d), pool))
    else:
        model.calibrate_threshold(x)  # a threshold to evaluate with
        model.eval()
        tokens = {"evaluation_1m_tokens": 1_000_000, "evaluation_16k_tokens": 4 * batch}.get(what, 2 * batch)
        generator = torch.Generator().manual_seed(1)

        def work():
            activation_metrics(model, (torch.randn(batch, d, generator=generator) for _ in range(tokens // batch)))

    start = time.perf_counter()
    with PeakMemory() as peak:
        work()
    return {
        "what": what,
        "dict_size": model.config.dict_size,
        "rss_before_mb": peak.base / 2**20,
        "peak_rss_mb": peak.peak / 2**20,
        "seconds": time.perf_counter() - start,
    }


def paper_scale_memory(out: str) -> None:
    import subprocess
    import sys

    rows = []
    for what in ("training_step", "attribution_batch", "evaluation", "evaluation_16k_tokens", "evaluation_1m_tokens"):
        result = subprocess.run(
            [sys.executable, __file__, "--memory_probe", what], capture_output=True, text=True, check=True
        )
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    command = "python scripts/bench.py --paper_memory --out " + out
    report = {
        "command": command,
        "setup": PAPER,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "device": "cpu",
        "measurements": rows,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2))
    lines = [
        "# Memory at the paper's scale",
        "",
        f"`{command}` on {report['machine']} (CPU, torch {torch.__version__})."
        " Each row is a fresh process; `before` is its resident set just before the measured work (Python, torch,"
        " the model's weights), `peak` the highest resident set during the work (sampled every millisecond).",
        "",
        "| measured work | latents | before (MB) | peak (MB) | seconds |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "training_step": "one training step (AdamW, batch 4096)",
        "attribution_batch": "one attribution batch (4096 pairs, pool scores, streaming quantile)",
        "evaluation": "held-out evaluation, 8192 tokens (one batch at a time)",
        "evaluation_16k_tokens": "held-out evaluation, 16 384 tokens (metric sums per batch)",
        "evaluation_1m_tokens": "held-out evaluation, 1M tokens (metric sums per batch)",
    }
    for row in rows:
        lines.append(
            f"| {labels[row['what']]} | {row['dict_size']} | {row['rss_before_mb']:.0f} | "
            f"{row['peak_rss_mb']:.0f} | {row['seconds']:.1f} |"
        )
    Path(out).with_suffix(".md").write_text("\n".join(lines) + "\n")


PARTS = ("steps", "lm", "cycles")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384], help="dictionary sizes to time")
    parser.add_argument(
        "--steps", type=int, default=11, help="timed rounds (one step of each implementation each; medians over them)"
    )
    parser.add_argument("--out", default="reports/bench.json", help="where the JSON report goes")
    parser.add_argument(
        "--cycle_config",
        default="configs/smollm2-135m.json",
        help="the distillation whose cycles are timed stage by stage (default: the embedded default)",
    )
    parser.add_argument("--cycle_tokens", type=int, default=65_536, help="training tokens per timed cycle")
    parser.add_argument(
        "--cycle_attribution_tokens", type=int, default=16_384, help="the timed run's attribution split"
    )
    parser.add_argument("--cycle_eval_tokens", type=int, default=8192, help="the timed run's held-out tokens")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the training steps and the LM's harvest and attribution run (default: cuda where "
        "torch sees one, else cpu); the distillation runs where its Trainer puts it",
    )
    parser.add_argument("--d_in", type=int, default=StepSetting.d_in, help="activation width of the timed steps")
    parser.add_argument("--batch", type=int, default=StepSetting.batch, help="tokens per timed step")
    parser.add_argument("--k", type=int, default=StepSetting.k, help="kept latents per token in the timed steps")
    parser.add_argument(
        "--lm_batch_shape",
        type=int,
        nargs=2,
        default=[8, 128],
        metavar=("SEQUENCES", "TOKENS"),
        help="the LM batch whose harvest and (x, g) pairs are timed",
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="what to measure: training steps, the LM's harvest and attribution (the embedded "
        "SmolLM2), a distillation's cycles (the embedded default)",
    )
    parser.add_argument(
        "--paper_memory",
        action="store_true",
        help="measure memory at the paper's scale instead (written to reports/memory-paper-scale.json unless given)",
    )
    parser.add_argument("--memory_probe", help="internal: run one memory measurement in this process")
    args = parser.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe)))
        return
    if args.paper_memory:
        out = args.out if args.out != "reports/bench.json" else "reports/memory-paper-scale.json"
        paper_scale_memory(out)
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (a CPU build of torch, or no GPU)")
    setting = StepSetting(d_in=args.d_in, batch=args.batch, k=args.k, device=device)

    report = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": str(device),
            "accelerator": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "setup": {
            "d_in": setting.d_in,
            "batch": setting.batch,
            "k": setting.k,
            "group_fractions": list(SAEBENCH_GROUP_FRACTIONS) + ["rest"],
            "memory": "CUDA allocator" if device.type == "cuda" else "resident set",
        },
    }
    if "steps" in args.parts:
        report["training_steps"] = training_steps(setting, args.sizes, args.steps)
        for row in report["training_steps"]:
            if "error" in row:
                print(f"n={row['dict_size']:>6}  {row['name']:<54} NOT RUN: {row['error']}")
            else:
                print(
                    f"n={row['dict_size']:>6}  {row['name']:<54} {row['median_s'] * 1e3:8.1f} ms  "
                    f"{row['tokens_per_s']:9.0f} tok/s  {row['vs_limit']:5.2f}x limit  "
                    f"{row.get('dmsae_speedup', float('nan')):5.2f}x ours  "
                    f"+{row['peak_memory_rise_mb']:.0f} MB"
                )
    if "lm" in args.parts:
        lm = report["lm"] = harvest_and_attribution(device, args.steps, tuple(args.lm_batch_shape))
        print(
            f"harvest (layer {lm['hook_layer']} of {lm['num_layers']}): {lm['harvest_speedup_vs_full_forward']:.2f}x "
            f"faster than a full forward"
        )
        print(
            f"attribution scoring: {lm['attribution_cached_tok_per_s']:.0f} tok/s from cached (x, g) pairs vs "
            f"{lm['attribution_live_tok_per_s']:.0f} tok/s with the live LM's forward + backward "
            f"({lm['attribution_cached_speedup']:.1f}x); per cycle at 120k positions: "
            f"{120_000 / lm['attribution_cached_tok_per_s']:.0f} s vs "
            f"{120_000 / lm['attribution_live_tok_per_s']:.0f} s"
        )
    if "cycles" in args.parts:
        report["distillation_cycles"] = distillation_cycles(
            args.cycle_config, args.cycle_tokens, args.cycle_attribution_tokens, args.cycle_eval_tokens
        )
        print("\n".join(cycle_lines(report["distillation_cycles"])))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
