"""eval/tasks."""
