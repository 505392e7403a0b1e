"""The algorithm, as pure functions where it can be: rewards (``rewards``), preference pairs (``pairs``), the
DPO loss family (``loss``), vocab-parallel log-probs (``logprob``), one step's experience — generate, score,
pair (``experience``) — and the metrics a step logs (``step_metrics``)."""
