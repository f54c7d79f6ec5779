"""The Soft Teacher method as pure functions on tensors."""
