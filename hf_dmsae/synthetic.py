"""Ground-truth benchmark on `sae_lens.synthetic`: distillation + transfer against Matryoshka SAEs with known features.

Synthetic activations `x = f W + b` come from a `SyntheticModel` with hierarchical ground-truth features `f` (rows
of `W`). Per seed, the benchmark runs the distillation (cycle 0 a Matryoshka SAE, then DMSAEs around the previous
core, `C* = C^(T) ∩ C^(T−1)`) and trains, on the same fresh token budget, a DMSAE around `C*` and a Matryoshka
baseline at each k. Scores are sae_lens's own (`eval_sae_on_synthetic_data`: MCC against the true features,
explained variance, dead latents, L0), and cross-seed consistency is the mean best-match |cos| between the two
seeds' decoder directions. The DMSAE is trained in both core modes: dense core (the core never masked, so its L0 adds
to k) and sparse core (one BatchTopK of k over all latents, L0 matched with the baseline).

Attribution objective. There is no LM here, so `∂L/∂x` comes from `L(x) = ½‖x − b‖²`, the energy of the signal
around the dictionary's bias: `g = x − b`, and `GxA_j = |a_j · ŵ_j·(x − b)|` is the part of the input's signal
that latent j carries. With no downstream network every direction of the signal matters alike, so the latents
that keep carrying a large share of it (frequent, strong features) are the consistently useful ones. Scores use
the same code as on an LM (`gxa_values`, exact streaming quantile, coverage selection).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import set_seed

from .activations import norm_factor
from .attribution import StreamingQuantile, gxa_values, select_by_coverage
from .configuration_dmsae import SAEBENCH_GROUP_FRACTIONS, DMSAEConfig, matryoshka_group_sizes
from .modeling_dmsae import DMSAEModel
from .integrity import write_json_atomically
from .runs import last_complete_checkpoint
from .trainer import DMSAETrainer, DMSAETrainingArguments
from .transfer import VARIANTS

logger = logging.getLogger(__name__)


@dataclass
class SyntheticArguments:
    """The synthetic world, the SAEs and the budget."""

    num_features: int = field(default=1024, metadata={"help": 'Ground-truth features.'})
    hidden_dim: int = field(default=128, metadata={"help": 'Dimension of the synthetic activations.'})
    root_features: int = field(default=64, metadata={"help": 'Roots of the feature hierarchy (each with children, grandchildren).'})
    branching_factor: int = field(default=3, metadata={"help": 'Children per parent in the hierarchy.'})
    dict_size: int = field(default=1024, metadata={"help": 'Latents per SAE.'})
    group_fractions: list[float] = field(default_factory=lambda: list(SAEBENCH_GROUP_FRACTIONS), metadata={"help": 'Matryoshka group fractions; the rest forms the last group.'})
    distill_k: int = field(default=16, metadata={"help": 'k of the distillation cycles.'})
    transfer_ks: list[int] = field(default_factory=lambda: [8, 16, 32], metadata={"help": 'k of the transferred SAEs and baselines.'})
    variants: list[str] = field(default_factory=lambda: list(VARIANTS), metadata={"help": 'Transferred SAEs: DMSAE in dense- and sparse-core mode, and the Matryoshka baseline.'})
    cycles: int = field(default=3, metadata={"help": 'Distillation cycles T + 1 (cycle 0 included).'})
    train_tokens: int = field(default=200_000, metadata={"help": 'Synthetic rows per SAE.'})
    attribution_tokens: int = field(default=16_384, metadata={"help": 'Rows scored per attribution.'})
    eval_tokens: int = field(default=50_000, metadata={"help": "Rows for sae_lens's evaluation."})
    q: float = field(default=0.99, metadata={"help": 'Quantile of GxA that scores a latent.'})
    tau: float = field(default=0.9, metadata={"help": 'Coverage the core reaches.'})
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": 'Training seeds (the synthetic world is the same for all).'})
    world_seed: int = field(default=1234, metadata={"help": 'Seed of the synthetic model.'})
    output_dir: str = field(default="runs/synthetic", metadata={"help": 'Where models, results and the report go.'})
    batch_size: int = field(default=1024, metadata={"help": 'Rows per training step.'})
    learning_rate: float = field(default=3e-3, metadata={"help": 'Adam learning rate.'})

    def __post_init__(self):
        unknown = set(self.variants) - set(VARIANTS)
        if unknown:
            raise ValueError(f"variants={self.variants} is invalid: {sorted(unknown)} not among {VARIANTS}")
        if self.cycles < 2:
            raise ValueError(f"cycles={self.cycles} is invalid: the distilled core needs at least 2 cycles")


class Rows(torch.utils.data.Dataset):
    """In-memory activation rows with the interface of the activation caches (`__getitems__`, `sample`)."""

    def __init__(self, rows: torch.Tensor):
        self.rows, self.d_in, self.norm_factor = rows, rows.shape[1], norm_factor(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices) -> torch.Tensor:
        return self.rows[torch.as_tensor(indices, dtype=torch.long)]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"activations": self.rows[index]}

    def sample(self, n: int) -> torch.Tensor:
        return self.rows[:n]


def synthetic_model(args: SyntheticArguments):
    from sae_lens.synthetic import HierarchyConfig, SyntheticModel, SyntheticModelConfig

    config = SyntheticModelConfig(
        num_features=args.num_features, hidden_dim=args.hidden_dim, seed=args.world_seed,
        hierarchy=HierarchyConfig(total_root_nodes=args.root_features, branching_factor=args.branching_factor,
                                  max_depth=2, compensate_probabilities=True),
    )  # fmt: skip
    return SyntheticModel(config)


def consistency(decoder_a: torch.Tensor, decoder_b: torch.Tensor) -> float:
    """Mean best-match |cos| between two decoders' directions, averaged over both directions of matching."""
    a = decoder_a / decoder_a.norm(dim=1, keepdim=True)
    b = decoder_b / decoder_b.norm(dim=1, keepdim=True)
    cos = (a @ b.T).abs()
    return float((cos.max(1).values.mean() + cos.max(0).values.mean()) / 2)


class SyntheticBenchmark:
    """One benchmark run; results go to `<output_dir>/results.json` after every SAE, so re-running resumes."""

    def __init__(self, args: SyntheticArguments):
        self.args = args
        self.output_dir = Path(args.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.results_path = self.output_dir / "results.json"
        self.results: dict = json.loads(self.results_path.read_text()) if self.results_path.is_file() else {}
        self.world = synthetic_model(args)
        self.bias = self.world.feature_dict.bias.detach()
        self.norm_factor = self.rows(16_384, seed=999_999).norm_factor

    def rows(self, n: int, seed: int) -> Rows:
        torch.manual_seed(seed)
        return Rows(self.world.sample(n).detach())

    def config(self, k: int, core_size: int = 0, core_ids=None, sparsity: str = "dense_core") -> DMSAEConfig:
        a = self.args
        return DMSAEConfig(d_in=a.hidden_dim, dict_size=a.dict_size, core_size=core_size, core_ids=core_ids,
                           group_sizes=matryoshka_group_sizes(a.dict_size - core_size, tuple(a.group_fractions)),
                           k=k, sparsity=sparsity, threshold_beta=0.99, dead_tokens_threshold=100_000,
                           norm_factor=self.norm_factor)  # fmt: skip

    def train(self, model: DMSAEModel, name: str, data_seed: int) -> DMSAEModel:
        folder = self.output_dir / name
        if (folder / "model.safetensors").is_file():
            return DMSAEModel.from_pretrained(folder)
        a = self.args
        args = DMSAETrainingArguments(
            output_dir=str(folder), per_device_train_batch_size=a.batch_size, num_train_epochs=1, learning_rate=a.learning_rate,
            save_steps=100, logging_steps=50, report_to="none", seed=data_seed, disable_tqdm=True, init_decoder_bias_rows=4096,
        )  # fmt: skip
        trainer = DMSAETrainer(model=model, args=args, train_dataset=self.rows(a.train_tokens, data_seed))
        trainer.train(resume_from_checkpoint=last_complete_checkpoint(folder))
        trainer.save_model(folder)
        return model

    @torch.no_grad()
    def scores(self, sae: DMSAEModel, seed: int) -> torch.Tensor:
        """The q-quantile GxA of the candidate pool under `L = ½‖x − b‖²` (module docstring)."""
        a = self.args
        sae.eval()
        pool = sae.config.candidate_pool_size
        quantile = StreamingQuantile(pool, a.q, a.attribution_tokens)
        for x in self.rows(a.attribution_tokens, seed).rows.split(a.batch_size):
            quantile.update(gxa_values(sae, x, x - self.bias, pool))
        return quantile.compute()

    def distill(self, seed: int) -> tuple[torch.Tensor, list[str], list[dict]]:
        """Cycles 0…T for one seed: the distilled core's encoder rows and ids, and each cycle's record."""
        a = self.args
        core_rows, core_ids, previous_ids, cycles = None, None, None, []
        for cycle in range(a.cycles):
            set_seed(seed)
            name = f"seed{seed}/cycle{cycle}"
            if core_ids is None:
                model = DMSAEModel(self.config(a.distill_k))
            else:
                model = DMSAEModel.from_core(self.config(a.distill_k, len(core_ids), core_ids), core_rows, core_ids)
            model.config.cycle = cycle
            model = self.train(model, name, data_seed=1000 * seed + cycle)
            scores = self.scores(model, seed=10_000 + 1000 * seed + cycle)
            selection = select_by_coverage(scores, a.tau)
            ids = model.config.latent_ids()
            previous_ids, core_ids = core_ids, [ids[i] for i in selection.indices.tolist()]
            core_rows = model.W_enc[selection.indices].detach().clone()
            carried = len(set(core_ids) & set(previous_ids)) if previous_ids else None
            cycles.append({"cycle": cycle, "core_size": len(core_ids), "carried_over": carried,
                           "mcc_core": self.mcc(model.W_dec[selection.indices])})  # fmt: skip
        distilled = [i for i, latent in enumerate(core_ids) if latent in set(previous_ids)]
        return core_rows[distilled], [core_ids[i] for i in distilled], cycles

    def mcc(self, decoder: torch.Tensor) -> float:
        from sae_lens.synthetic import mean_correlation_coefficient

        return mean_correlation_coefficient(decoder.detach(), self.world.feature_dict.feature_vectors.detach())

    def evaluate(self, sae: DMSAEModel, seed: int) -> dict[str, float]:
        from sae_lens.synthetic import eval_sae_on_synthetic_data

        torch.manual_seed(20_000 + seed)
        result = eval_sae_on_synthetic_data(sae.eval(), self.world.feature_dict, self.world.activation_generator,
                                            num_samples=self.args.eval_tokens, batch_size=4096)  # fmt: skip
        return {"mcc": result.mcc, "explained_variance": result.explained_variance, "dead_latents": result.dead_latents,
                "l0": result.sae_l0, "true_l0": result.true_l0, "uniqueness": result.uniqueness}  # fmt: skip

    def run(self) -> dict:
        a = self.args
        for seed in a.seeds:
            key = f"seed{seed}"
            record = self.results.setdefault(key, {"models": {}})
            core_rows, core_ids, cycles = self.distill(seed)
            record |= {"cycles": cycles, "distilled_core_size": len(core_ids)}
            for k in a.transfer_ks:
                for variant in a.variants:
                    name = f"k{k}-{variant}"
                    if name in record["models"]:
                        continue
                    set_seed(seed)
                    if variant == "matryoshka":
                        model = DMSAEModel(self.config(k))
                    else:
                        config = self.config(k, len(core_ids), core_ids, sparsity=variant)
                        model = DMSAEModel.from_core(config, core_rows, core_ids)
                    model = self.train(model, f"{key}/{name}", data_seed=1000 * seed + 999)
                    record["models"][name] = {"k": k, "variant": variant, **self.evaluate(model, seed)}
                    write_json_atomically(self.results_path, self.results)
        self.results["consistency"] = self.consistency()
        write_json_atomically(self.results_path, self.results)
        return self.results

    def consistency(self) -> dict[str, float]:
        """Per trained SAE name, the best-match |cos| between its decoders under the first two seeds."""
        a = self.args
        if len(a.seeds) < 2:
            return {}
        first, second = (self.output_dir / f"seed{s}" for s in a.seeds[:2])
        names = [f"k{k}-{v}" for k in a.transfer_ks for v in a.variants]
        return {name: consistency(DMSAEModel.from_pretrained(first / name).W_dec.detach(),
                                  DMSAEModel.from_pretrained(second / name).W_dec.detach()) for name in names}  # fmt: skip

    def report(self) -> str:
        """`report.md` (and its figure): the cycles, the seed-averaged scores per k and variant, and consistency."""
        from . import figures

        seeds = [self.results[f"seed{s}"] for s in self.args.seeds if f"seed{s}" in self.results]
        columns = ("mcc", "explained_variance", "dead_latents", "l0", "uniqueness")
        rows = []
        for name in seeds[0]["models"] if seeds else []:
            runs = [seed["models"][name] for seed in seeds if name in seed["models"]]
            row = {"k": runs[0]["k"], "variant": runs[0]["variant"], "seeds": len(runs)}
            row |= {c: sum(r[c] for r in runs) / len(runs) for c in columns}
            if name in self.results.get("consistency", {}):
                row["consistency"] = self.results["consistency"][name]
            rows.append(row)
        a = self.args
        lines = [f"# Synthetic ground-truth benchmark (sae_lens.synthetic)", "",
                 f"{a.num_features} hierarchical features ({a.root_features} roots, branching {a.branching_factor}, "
                 f"depth 2) in {a.hidden_dim} dimensions; SAEs of {a.dict_size} latents, {a.train_tokens} rows each; "
                 f"distillation at k={a.distill_k} over {a.cycles} cycles; seeds {a.seeds}.", "",
                 "## Distillation cycles", "", "| seed | cycle | core size | carried over | MCC of the core |",
                 "|---|---|---|---|---|"]  # fmt: skip
        for seed, record in zip(a.seeds, seeds):
            for c in record["cycles"]:
                lines.append(f"| {seed} | {c['cycle']} | {c['core_size']} | {c['carried_over'] if c['carried_over'] is not None else '–'} | {c['mcc_core']:.4f} |")
            lines.append(f"| {seed} | distilled | {record['distilled_core_size']} | | |")
        shown = columns + ("consistency",)
        lines += ["", "## Transfer: DMSAEs around the distilled core vs Matryoshka (mean over seeds)", "",
                  "MCC, explained variance, dead latents, L0 and uniqueness are sae_lens's `eval_sae_on_synthetic_data`; "
                  "consistency is the mean best-match |cos| between the two seeds' decoders.", "",
                  "| k | variant | " + " | ".join(shown) + " |", "|---|---|" + "---|" * len(shown)]  # fmt: skip
        for row in sorted(rows, key=lambda r: (r["k"], r["variant"])):
            lines.append(f"| {row['k']} | {row['variant']} | " + " | ".join(f"{row[c]:.4f}" if c in row else "–" for c in shown) + " |")
        if rows:
            plotted = tuple(c for c in ("mcc", "explained_variance", "dead_latents", "consistency") if c in rows[0])
            plot = figures.metrics_against_k(rows, plotted, self.output_dir / "figures" / "synthetic_vs_k.png")
            lines += ["", f"![synthetic metrics against k](figures/{plot.name})"]
        text = "\n".join(lines) + "\n"
        (self.output_dir / "report.md").write_text(text)
        return text
