"""Offline evaluation for vlmprune: tasks, the embedded model's training, benchmark runners."""
