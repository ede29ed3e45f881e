"""Mean number of active SAE latents per token, split into the distilled core and the rest, from per-batch counts."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """L0 of a DMSAE: the mean number of latents active per token among the core latents (`l0_core`), among
the non-core latents (`l0_noncore`), and in total (`l0`, Eq. 9: E[L0 core] + E[L0 non-core]). A plain SAE has no
core, so its `l0_core` is 0. Each example is one batch's totals."""

_INPUTS = """
Args:
    core_active (`int`): active core latents summed over the batch's tokens.
    noncore_active (`int`): active non-core latents summed over the batch's tokens.
    rows (`int`): tokens in the batch.
Returns:
    l0_core, l0_noncore, l0 (`float`): means over all tokens.
Example:
    >>> l0 = evaluate.load("hf_dmsae/metrics/l0")
    >>> l0.compute(core_active=[6], noncore_active=[30], rows=[2])
    {'l0_core': 3.0, 'l0_noncore': 15.0, 'l0': 18.0}
"""

_CITATION = (
    """@article{dmsae2025, title={Distilled Matryoshka Sparse Autoencoders}, journal={arXiv:2512.24975}, year={2025}}"""
)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class L0(evaluate.Metric):
    """The metric this module's card describes (`_DESCRIPTION`), as an `evaluate` module fed one example of sums
    per batch."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "core_active": datasets.Value("int64"),
                    "noncore_active": datasets.Value("int64"),
                    "rows": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, core_active, noncore_active, rows):
        count = float(np.sum(rows))
        core, noncore = float(np.sum(core_active)) / count, float(np.sum(noncore_active)) / count
        return {"l0_core": core, "l0_noncore": noncore, "l0": core + noncore}
