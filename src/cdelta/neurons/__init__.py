"""MLP neurons as units of localization and editing (NeST: neuron-selective safety tuning)."""

from cdelta.neurons.nest import NestConfig, SafetyNeurons, find_safety_neurons, nest_delta
from cdelta.neurons.params import merge_masks, neuron_ids, neuron_param_masks, parse_neuron_ids

__all__ = ["NestConfig", "SafetyNeurons", "find_safety_neurons", "merge_masks", "nest_delta", "neuron_ids", "neuron_param_masks", "parse_neuron_ids"]
