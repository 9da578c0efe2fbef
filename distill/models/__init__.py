"""Teacher/student model layer: loading, pair checks, teacher-adapter fetch, checkpoints, export."""
