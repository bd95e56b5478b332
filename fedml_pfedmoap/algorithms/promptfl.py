"""PromptFL (Guo et al., IEEE TMC 2023): FedAvg over CoOp prompts; the global prompt is evaluated on every client."""
from .base import PromptAlgorithm, register_algorithm


@register_algorithm("promptfl")
class PromptFL(PromptAlgorithm):
    """Participants train the global ctx for E epochs; the server averages uploads weighted by sample count."""

    name = "promptfl"
