"""Driving a live model: finding its cross-attention blocks, tapping what reaches them, and
reading their weights and gradients in place.

`capture_probe`, model mode (`diagnose --model`) and the training monitor all drive a live
model; they share these pieces, so a block is hooked, read and measured the same way in each.
"""
