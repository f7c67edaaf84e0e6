"""The distribution worker and its handlers."""
