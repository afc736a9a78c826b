"""Teacher/student scoring: aligned sequences, the teacher snapshot, the per-micro-batch divergence."""
