"""Training: the trainer loop, checkpoints (dist_checkpointing), metrics/TensorBoard, analytic FLOPs, evaluation."""
