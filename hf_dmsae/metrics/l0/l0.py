"""Mean number of active SAE latents per token, split into the distilled core and the rest."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """L0 of a DMSAE: the mean number of latents active per token among the core latents (`l0_core`), among
the non-core latents (`l0_noncore`), and in total (`l0`). A plain SAE has no core, so its `l0_core` is 0."""

_INPUTS = """
Args:
    l0_core (`list` of `int`): active core latents of each token.
    l0_noncore (`list` of `int`): active non-core latents of each token.
Returns:
    l0_core, l0_noncore, l0 (`float`): means over tokens.
Example:
    >>> l0 = evaluate.load("hf_dmsae/metrics/l0")
    >>> l0.compute(l0_core=[2, 4], l0_noncore=[10, 20])
    {'l0_core': 3.0, 'l0_noncore': 15.0, 'l0': 18.0}
"""

_CITATION = """@article{dmsae2025, title={Distilled Matryoshka Sparse Autoencoders}, journal={arXiv:2512.24975}, year={2025}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class L0(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({"l0_core": datasets.Value("int64"), "l0_noncore": datasets.Value("int64")}),
        )

    def _compute(self, l0_core, l0_noncore):
        core, noncore = np.asarray(l0_core, dtype=np.float64), np.asarray(l0_noncore, dtype=np.float64)
        return {"l0_core": float(core.mean()), "l0_noncore": float(noncore.mean()), "l0": float((core + noncore).mean())}
