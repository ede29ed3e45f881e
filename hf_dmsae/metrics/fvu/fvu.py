"""Fraction of variance unexplained of SAE reconstructions, from per-batch sums."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² over all rows:
the squared reconstruction error relative to the variance of
the activations around their mean. 0 is a perfect reconstruction; 1 is as good as predicting the mean. Each example
is one batch's sums (not its rows), so memory does not grow with the number of tokens evaluated."""

_INPUTS = """
Args:
    squared_error (`float`): Σ‖x − x̂‖² over the batch's rows.
    sum (`list` of `float`): Σx over the batch's rows, per dimension.
    sum_of_squares (`float`): Σ‖x‖² over the batch's rows.
    rows (`int`): number of rows in the batch.
Returns:
    fvu (`float`): fraction of variance unexplained over all batches.
Example:
    >>> fvu = evaluate.load("hf_dmsae/metrics/fvu")
    >>> fvu.compute(squared_error=[0.5], sum=[[2.0, 0.0]], sum_of_squares=[4.0], rows=[2])
    {'fvu': 0.25}
"""

_CITATION = """@article{gao2024scaling, title={Scaling and evaluating sparse autoencoders},
author={Gao, Leo and others},
journal={arXiv:2406.04093}, year={2024}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class FVU(evaluate.Metric):
    """The metric this module's card describes (`_DESCRIPTION`), as an `evaluate` module fed one example of sums
    per batch."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "squared_error": datasets.Value("float64"),
                    "sum": datasets.Sequence(datasets.Value("float64")),
                    "sum_of_squares": datasets.Value("float64"),
                    "rows": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, squared_error, sum, sum_of_squares, rows):
        count = float(np.sum(rows))
        total = np.asarray(sum, dtype=np.float64).sum(0)
        variance = float(np.sum(sum_of_squares)) - float(total @ total) / count
        return {"fvu": float(np.sum(squared_error)) / variance}
