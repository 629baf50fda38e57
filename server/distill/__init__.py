"""Stage 3, training on the synthetic set: the server's teacher, students and their losses (one registry,
one module per method), the standard evaluation protocol, and reused baseline students."""
