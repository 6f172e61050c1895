"""Hybrid offload: neuron placement (ILP and greedy), the device/host hybrid engine and the disk tier."""
