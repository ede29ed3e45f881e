"""Share of an SAE's latents that never fire on a dataset."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Dead fraction: the share of the `dict_size` latents that are active on no token of the evaluated data.
Each example is the set of latent ids that fired in one batch, so the inputs stay small however many tokens are
evaluated."""

_INPUTS = """
Args:
    fired_latents (`list` of `list` of `int`): per batch, the ids of the latents active on at least one of its tokens.
    dict_size (`int`): number of latents of the SAE.
Returns:
    dead_fraction (`float`): share of latents in no batch's list.
Example:
    >>> dead = evaluate.load("hf_dmsae/metrics/dead_latents")
    >>> dead.compute(fired_latents=[[0, 1], [1, 2]], dict_size=8)
    {'dead_fraction': 0.625}
"""

_CITATION = """@article{gao2024scaling, title={Scaling and evaluating sparse autoencoders},
author={Gao, Leo and others},
journal={arXiv:2406.04093}, year={2024}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class DeadLatents(evaluate.Metric):
    """The metric this module's card describes (`_DESCRIPTION`), as an `evaluate` module fed one example of sums
    per batch."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({"fired_latents": datasets.Sequence(datasets.Value("int64"))}),
        )

    def _compute(self, fired_latents, dict_size):
        fired = np.zeros(dict_size, dtype=bool)
        for ids in fired_latents:
            fired[np.asarray(ids, dtype=np.int64)] = True
        return {"dead_fraction": float(1.0 - fired.mean())}
