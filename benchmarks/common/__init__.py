"""What the main job, the claims and the speed share: contenders, bytes, records, reports."""
