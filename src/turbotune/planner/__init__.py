"""Memory and speed prediction: model shapes, the peak-memory model, the plan search."""
