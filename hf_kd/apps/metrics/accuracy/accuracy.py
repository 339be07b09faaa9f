"""Accuracy as a local ``evaluate`` metric module.

``evaluate.load("accuracy")`` fetches the metric script from the Hugging Face Hub, which fails
offline. This file is a self-contained copy of the same metric (same name, same inputs, same
output key) that ``evaluate.load`` can import from a local path without any network access::

    import evaluate
    metric = evaluate.load("/path/to/hf_kd/apps/metrics/accuracy")        # folder ...
    metric = evaluate.load("/path/to/hf_kd/apps/metrics/accuracy/accuracy.py")  # ... or file
    metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])      # {"accuracy": 0.666...}

Use ``hf_kd.apps.metrics.load_metric("accuracy")`` to get it without spelling out the path.

Keep the imports in this file to ``datasets``/``evaluate``/the standard library: ``evaluate``
copies the script into its dynamic-module cache and checks every import it finds there.
"""

import datasets
import evaluate

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among the total number of cases processed:
Accuracy = (TP + TN) / (TP + TN + FP + FN).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted labels.
    references (`list` of `int`): Ground truth labels.
    normalize (`bool`): If False, return the number of correctly classified samples instead of
        the fraction. Defaults to True.
    sample_weight (`list` of `float`): Sample weights. Defaults to None.

Returns:
    accuracy (`float` or `int`): Accuracy in [0, 1] (or the weighted count when normalize=False).

Examples:
    >>> metric = evaluate.load("hf_kd/apps/metrics/accuracy")
    >>> metric.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0])
    {'accuracy': 0.5}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int32")),
                    "references": datasets.Sequence(datasets.Value("int32")),
                }
                if self.config_name == "multilabel"
                else {
                    "predictions": datasets.Value("int32"),
                    "references": datasets.Value("int32"),
                }
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = list(predictions)
        references = list(references)
        if len(predictions) != len(references):
            raise ValueError(
                f"predictions and references differ in length: {len(predictions)} != {len(references)}"
            )
        if sample_weight is None:
            weights = [1.0] * len(references)
        else:
            weights = [float(w) for w in sample_weight]
            if len(weights) != len(references):
                raise ValueError("sample_weight must have one weight per example")
        correct = 0.0
        for p, r, w in zip(predictions, references, weights):
            same = list(p) == list(r) if isinstance(p, (list, tuple)) else p == r
            if same:
                correct += w
        if not normalize:
            return {"accuracy": float(correct)}
        total = sum(weights)
        return {"accuracy": float(correct / total) if total else 0.0}
