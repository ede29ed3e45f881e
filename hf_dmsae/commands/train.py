"""Train one Matryoshka SAE or DMSAE on a causal LM's activations.

    accelerate launch scripts/train.py configs/smollm2-135m.json [--field value ...]

The JSON file holds any field of `SAEArguments`, `ActivationArguments` and `DMSAETrainingArguments` (fields of the
distillation's arguments are skipped, so one file serves both scripts); command-line flags override it. The run reads
`num_tokens` rows of the training split (streamed, or through `activation_cache`) and evaluates on the held-out split.
Re-running the same command resumes from the last complete checkpoint in `output_dir`; other arguments are refused.
"""

import json
import logging

from hf_dmsae.data.activations import ActivationArguments
from hf_dmsae.evaluation.held_out import activation_metrics
from hf_dmsae.method.attribution import AttributionArguments
from hf_dmsae.method.distillation import DistillationArguments
from hf_dmsae.reporting.convergence import convergence_line
from hf_dmsae.run.arguments import SAEArguments, new_model, refuse_unread
from hf_dmsae.run.data import RunData
from hf_dmsae.run.launch import end_processes, parse_arguments
from hf_dmsae.run.state import RunState, arguments_identity
from hf_dmsae.run.trainer import DMSAETrainingArguments
from hf_dmsae.run.training import train_sae, training_steps


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sae_args, activation_args, training_args = parse_arguments(
        (SAEArguments, ActivationArguments, DMSAETrainingArguments),
        shared=(DistillationArguments, AttributionArguments),
    )
    core_settings = ("sparsity", "core_sparsity_coef", "jumprelu_bandwidth")
    refuse_unread(sae_args, core_settings, "they set a core's mode, and train.py trains an SAE without a core")
    training_steps(activation_args.num_tokens, training_args)  # before the run's folder records anything
    identity = arguments_identity(sae_args, activation_args, training_args)
    state = RunState(training_args.output_dir, "train", identity, writer=training_args.process_index == 0)
    data = RunData(activation_args, training_args, state)
    model = new_model(sae_args, data, seed=training_args.seed)
    trainer = train_sae(model, data, data.training_slice("train"), training_args)
    if trainer.is_world_process_zero():
        state.data["convergence"] = trainer.convergence
        if data.eval_slice is not None:
            metrics = activation_metrics(model, data.eval_batches(training_args.per_device_eval_batch_size))
            state.data["metrics"] = metrics
            print(json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=2))
        state.save()
        print(convergence_line(trainer.convergence))
    end_processes()


if __name__ == "__main__":
    main()
