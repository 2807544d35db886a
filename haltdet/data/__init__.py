"""Data: the synthetic LiDAR simulator and the on-disk frame format."""
