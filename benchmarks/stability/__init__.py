"""The seeded stability study (README.md here)."""
