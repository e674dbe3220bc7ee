"""The speed: time per step against its bytes and its peers (step_time.py, gpu_check.py)."""
