"""Next-token accuracy, an `evaluate` metric that loads offline from this folder.

    import evaluate
    metric = evaluate.load(path_to_this_folder)   # or the path of this file
    metric.compute(predictions=[3, 5, 7, 9], references=[3, 5, 0, -100])   # {"accuracy": 0.666...}

Predictions and references are flat sequences of token ids: for a causal LM, the argmax of the logits at
positions ``0 .. T-2`` against the labels at ``1 .. T-1`` (the shift that the model's loss applies). Positions whose
reference equals ``ignore_index`` (-100, the label of padding) are left out of the count.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = (
    "Next-token accuracy: the fraction of positions where the predicted token id equals the reference token id, "
    "over the positions whose reference is not `ignore_index` (default -100)."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted token ids, one per position (already shifted for next-token targets).
    references (`list` of `int`): reference token ids, the same length; `ignore_index` marks positions to skip.
    ignore_index (`int`, default -100): reference value of positions left out of the count.
Returns:
    accuracy (`float`): correct / counted positions, in [0, 1] (0.0 when no position is counted).
Examples:
    >>> metric = evaluate.load("mst_hf/metrics/token_accuracy")
    >>> metric.compute(predictions=[3, 5, 7, 9], references=[3, 5, 0, -100])
    {'accuracy': 0.6666666666666666}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TokenAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, ignore_index: int = -100):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if predictions.shape != references.shape:
            raise ValueError(
                f"`predictions` and `references` must have the same length, got {predictions.shape[0]} and "
                f"{references.shape[0]}: shift the logits' argmax by one position against the labels first."
            )
        counted = references != ignore_index
        total = int(counted.sum())
        if total == 0:
            return {"accuracy": 0.0}
        return {"accuracy": float((predictions[counted] == references[counted]).sum() / total)}
