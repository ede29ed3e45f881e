"""Fraction of variance unexplained of SAE reconstructions."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² over all rows: the squared reconstruction error relative to the variance of
the activations around their mean. 0 is a perfect reconstruction; 1 is as good as predicting the mean."""

_INPUTS = """
Args:
    predictions (`list` of `list` of `float`): reconstructions x̂, one row per token.
    references (`list` of `list` of `float`): activations x, same shape.
Returns:
    fvu (`float`): fraction of variance unexplained.
Example:
    >>> fvu = evaluate.load("hf_dmsae/metrics/fvu")
    >>> fvu.compute(predictions=[[1.0, 0.0], [0.0, 1.0]], references=[[1.0, 0.0], [0.0, 1.0]])
    {'fvu': 0.0}
"""

_CITATION = """@article{gao2024scaling, title={Scaling and evaluating sparse autoencoders}, author={Gao, Leo and others},
journal={arXiv:2406.04093}, year={2024}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class FVU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")),
                 "references": datasets.Sequence(datasets.Value("float32"))}
            ),
        )

    def _compute(self, predictions, references):
        x = np.asarray(references, dtype=np.float64)
        x_hat = np.asarray(predictions, dtype=np.float64)
        if x.shape != x_hat.shape or x.ndim != 2:
            raise ValueError(f"predictions {x_hat.shape} and references {x.shape} must be equal [rows, d] arrays")
        total = ((x - x.mean(0)) ** 2).sum()
        return {"fvu": float(((x - x_hat) ** 2).sum() / total)}
