"""The training engine: set-up (a run's complete parts), the loop, one step's maths (embed, gather,
loss, backward), losses, precision, optimizer and schedule, health checks, checkpoints, stops."""
