"""Share of the language model's next-token loss that survives splicing an SAE's reconstruction into it."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """CE loss recovered = (L_zero − L_sae) / (L_zero − L_clean),
where L_clean is the LM's mean next-token loss,
L_sae its loss with the SAE's reconstruction spliced in at the hooked layer, and L_zero its loss with that
activation zero-ablated. 1 means the SAE loses nothing the LM needs; 0 means it is as bad as removing the layer's
output. Each example is one batch's summed losses."""

_INPUTS = """
Args:
    loss_clean (`float`): next-token loss summed over the batch's predicted tokens, unmodified LM.
    loss_spliced (`float`): the same with the reconstruction spliced in.
    loss_zero_ablated (`float`): the same with the activation set to zero.
    tokens (`int`): predicted tokens in the batch.
Returns:
    ce_loss_clean, ce_loss_spliced, ce_loss_zero_ablated (`float`): mean losses per token;
    ce_loss_recovered (`float`): the share recovered.
Example:
    >>> ce = evaluate.load("hf_dmsae/metrics/ce_loss_recovered")
    >>> ce.compute(loss_clean=[2.0], loss_spliced=[4.0], loss_zero_ablated=[10.0], tokens=[2])["ce_loss_recovered"]
    0.75
"""

_CITATION = """@article{bricken2023monosemanticity, title={Towards Monosemanticity},
author={Bricken, Trenton and others},
journal={Transformer Circuits Thread}, year={2023}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class CELossRecovered(evaluate.Metric):
    """The metric this module's card describes (`_DESCRIPTION`), as an `evaluate` module fed one example of sums
    per batch."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    **{name: datasets.Value("float64") for name in ("loss_clean", "loss_spliced", "loss_zero_ablated")},
                    "tokens": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, loss_clean, loss_spliced, loss_zero_ablated, tokens):
        count = float(np.sum(tokens))
        clean, spliced, zero = (float(np.sum(v)) / count for v in (loss_clean, loss_spliced, loss_zero_ablated))
        return {
            "ce_loss_clean": clean,
            "ce_loss_spliced": spliced,
            "ce_loss_zero_ablated": zero,
            "ce_loss_recovered": (zero - spliced) / (zero - clean),
        }
